/**
 * Our own server signing keys as published at GET /_matrix/key/v2/server
 * (server-server API, "Publishing Keys"; schema data/api/server-server/definitions/keys.yaml).
 */
import { canonicalJson } from '../matrix/canonical-json.js';
import { signJson, type SigningKey } from '../matrix/signing.js';

export interface OldVerifyKey {
  readonly key: string;
  readonly expired_ts: number;
}

export interface OwnServerKeysOptions {
  readonly serverName: string;
  /** The first key signs; all are published as `verify_keys`. */
  readonly keys: readonly SigningKey[];
  readonly oldVerifyKeys: Readonly<Record<string, OldVerifyKey>>;
  /** How long a published response stays valid (`valid_until_ts` = now + this). */
  readonly validityMs: number;
  readonly now?: () => number;
}

export class OwnServerKeys {
  readonly serverName: string;
  readonly signingKey: SigningKey;
  private readonly options: OwnServerKeysOptions;
  private readonly now: () => number;
  private cached: { body: string; object: Record<string, unknown>; builtAt: number } | undefined;

  constructor(options: OwnServerKeysOptions) {
    if (options.keys.length === 0) throw new Error('at least one signing key is needed');
    this.options = options;
    this.serverName = options.serverName;
    this.signingKey = options.keys[0]!;
    this.now = options.now ?? Date.now;
  }

  /**
   * The signed key object. Rebuilt at most once a minute (or sooner for short validity), so
   * `valid_until_ts` always lies at least 90% of the validity period ahead.
   */
  keyObject(): Record<string, unknown> {
    return this.current().object;
  }

  /** The same object as canonical JSON text: some peers verify the raw response bytes. */
  keyResponseBody(): string {
    return this.current().body;
  }

  private current(): { body: string; object: Record<string, unknown> } {
    const now = this.now();
    const maxAge = Math.min(60_000, this.options.validityMs / 10);
    if (this.cached && now - this.cached.builtAt < maxAge) return this.cached;
    const unsigned = {
      server_name: this.serverName,
      valid_until_ts: now + this.options.validityMs,
      verify_keys: Object.fromEntries(this.options.keys.map((k) => [k.keyId, { key: k.publicKey }])),
      old_verify_keys: Object.fromEntries(
        Object.entries(this.options.oldVerifyKeys).map(([id, k]) => [id, { key: k.key, expired_ts: k.expired_ts }]),
      ),
    };
    let object: Record<string, unknown> = unsigned;
    for (const key of this.options.keys) object = signJson(object, this.serverName, key);
    this.cached = { body: canonicalJson(object), object, builtAt: now };
    return this.cached;
  }
}
