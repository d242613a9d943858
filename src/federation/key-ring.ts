/**
 * Other servers' signing keys (server-server API, "Retrieving server keys"): fetched from the server
 * itself at /_matrix/key/v2/server, or — when it cannot be reached — from the notaries in
 * `federation.trusted_key_servers` via POST /_matrix/key/v2/query. Every response is checked
 * (server name, self-signature, and the notary's signature) before use, kept in memory and in the
 * database until `valid_until_ts`, which is capped at now + 7 days as the spec requires.
 *
 * Concurrent lookups for one server share one fetch; a key ID we do not know triggers at most one
 * refetch per server per REFETCH_INTERVAL_MS, so garbage key IDs cannot make us hammer a server.
 */
import { checkJsonSignature, isObject, KEY_VERSION } from '../matrix/signing.js';
import { isUnpaddedBase64OfLength } from '../matrix/base64.js';
import { CanonicalJsonError } from '../matrix/canonical-json.js';
import type { ServerKeysResponse, ServerKeysStore, StoredServerKey } from '../storage/store.js';

export const MAX_KEY_VALIDITY_MS = 7 * 24 * 3_600_000;
export const REFETCH_INTERVAL_MS = 30_000;
/** Key fetches in flight at once: anyone can make us fetch (an unknown origin's key comes first), so it is bounded. */
export const MAX_CONCURRENT_FETCHES = 32;
/** Servers whose keys we keep in memory (the database holds the rest). */
const MEMORY_SERVERS = 10_000;

type JsonObject = Record<string, unknown>;

/** What the key ring needs from the network. */
export interface KeyFetcher {
  /** GET /_matrix/key/v2/server of `serverName`; the parsed body. */
  fetchOwnKeys(serverName: string): Promise<unknown>;
  /**
   * POST /_matrix/key/v2/query to `notary` asking for `serverName`'s keys (naming `keyId` with
   * `minimum_valid_until_ts` when we are after one key); the parsed body.
   */
  queryNotary(notary: string, serverName: string, keyId: string | undefined, minimumValidUntilTs: number): Promise<unknown>;
}

export interface TrustedKeyServer {
  readonly server_name: string;
  /** Pinned keys of the notary (key ID → public key); fetched from the notary itself when absent. */
  readonly verify_keys?: Readonly<Record<string, string>> | undefined;
}

export interface KeyRingOptions {
  readonly serverName: string;
  readonly store: ServerKeysStore;
  readonly fetcher: KeyFetcher;
  readonly trustedKeyServers: readonly TrustedKeyServer[];
  readonly now?: () => number;
  readonly log?: (message: string, details: Record<string, unknown>) => void;
}

/** A checked key response: its keys and the validity we grant them. */
export interface CheckedKeys {
  readonly object: JsonObject;
  readonly validUntilTs: number;
  readonly keys: { keyId: string; verifyKey: string; expiredTs: number | null }[];
}

/**
 * Checks a `/_matrix/key/v2/server` object claimed to be `serverName`'s: right name, well-formed
 * keys, and signed by (every one of its signatures from) its own verify keys.
 * Returns a reason string when it is not acceptable.
 */
export function checkServerKeys(body: unknown, serverName: string, now: number): CheckedKeys | string {
  if (!isObject(body)) return 'the key response is not a JSON object';
  if (body['server_name'] !== serverName) return `the key response is for ${JSON.stringify(body['server_name'])}, not ${serverName}`;
  const validUntil = body['valid_until_ts'];
  if (typeof validUntil !== 'number' || !Number.isSafeInteger(validUntil)) return 'the key response has no valid_until_ts';
  const verifyKeys = body['verify_keys'];
  if (!isObject(verifyKeys)) return 'the key response has no verify_keys';
  const keys: CheckedKeys['keys'] = [];
  const current = new Map<string, string>();
  for (const [keyId, k] of Object.entries(verifyKeys)) {
    const [alg, version] = keyId.split(':', 2);
    if (alg !== 'ed25519' || version === undefined || !KEY_VERSION.test(version)) continue;
    if (!isObject(k) || typeof k['key'] !== 'string' || !isUnpaddedBase64OfLength(k['key'], 32)) return `verify_keys["${keyId}"] is not an unpadded base64 Ed25519 key`;
    current.set(keyId, k['key']);
    keys.push({ keyId, verifyKey: k['key'], expiredTs: null });
  }
  if (current.size === 0) return 'the key response lists no ed25519 verify key';
  const old = body['old_verify_keys'];
  if (isObject(old)) {
    for (const [keyId, k] of Object.entries(old)) {
      if (current.has(keyId) || !isObject(k) || typeof k['key'] !== 'string' || typeof k['expired_ts'] !== 'number') continue;
      if (!keyId.startsWith('ed25519:') || !isUnpaddedBase64OfLength(k['key'], 32)) continue;
      keys.push({ keyId, verifyKey: k['key'], expiredTs: k['expired_ts'] });
    }
  }
  let problem: string | undefined;
  try {
    problem = checkJsonSignature(body, serverName, current);
  } catch (e) {
    if (e instanceof CanonicalJsonError) return `the key response is not canonical JSON: ${e.message}`;
    throw e;
  }
  if (problem) return `the key response's self-signature is not valid: ${problem}`;
  return { object: body, validUntilTs: Math.min(validUntil, now + MAX_KEY_VALIDITY_MS), keys };
}

interface CachedKey {
  readonly verifyKey: string;
  readonly validUntilTs: number;
  readonly expiredTs: number | null;
}

export type KeyLookup = { readonly verifyKey: string } | { readonly error: string };

export class KeyRing {
  private readonly memory = new Map<string, Map<string, CachedKey>>();
  private readonly loadedFromDb = new Set<string>();
  private readonly inflight = new Map<string, Promise<void>>();
  private readonly lastFetch = new Map<string, number>();
  private readonly now: () => number;
  /** Counts for metrics: key responses accepted from servers themselves or from notaries, and fetches that found nothing usable. */
  readonly stats = { fromServer: 0, fromNotary: 0, failed: 0 };

  constructor(private readonly options: KeyRingOptions) {
    this.now = options.now ?? Date.now;
  }

  private remember(serverName: string, keys: readonly Omit<StoredServerKey, 'serverName'>[]): void {
    let m = this.memory.get(serverName);
    if (!m) {
      if (this.memory.size >= MEMORY_SERVERS) {
        // Forget together: a server not in memory must be looked up in the database again.
        this.memory.clear();
        this.loadedFromDb.clear();
      }
      this.memory.set(serverName, (m = new Map()));
    }
    for (const k of keys) m.set(k.keyId, { verifyKey: k.verifyKey, validUntilTs: k.validUntilTs, expiredTs: k.expiredTs });
  }

  private async cached(serverName: string, keyId: string): Promise<CachedKey | undefined> {
    if (!this.loadedFromDb.has(serverName)) {
      this.remember(serverName, await this.options.store.getServerKeys(serverName));
      this.loadedFromDb.add(serverName);
    }
    return this.memory.get(serverName)?.get(keyId);
  }

  private usableForRequests(k: CachedKey | undefined): boolean {
    return k !== undefined && k.expiredTs === null && k.validUntilTs >= this.now();
  }

  /**
   * The public key with which to verify a request signed by `serverName` with `keyId`. Only keys
   * in the server's current `verify_keys` that are valid now count; `old_verify_keys` never do.
   */
  async requestKey(serverName: string, keyId: string): Promise<KeyLookup> {
    if (serverName === this.options.serverName) return { error: 'requests claiming to come from this server itself are not accepted' };
    let k = await this.cached(serverName, keyId);
    if (!this.usableForRequests(k)) {
      await this.refresh(serverName, keyId);
      k = this.memory.get(serverName)?.get(keyId);
    }
    if (k === undefined) return { error: `${serverName} has no published key ${keyId}` };
    if (k.expiredTs !== null) return { error: `${keyId} is an old key of ${serverName} (in old_verify_keys) and cannot sign requests` };
    if (k.validUntilTs < this.now()) return { error: `${keyId} of ${serverName} expired at ${new Date(k.validUntilTs).toISOString()}` };
    return { verifyKey: k.verifyKey };
  }

  /** Fetches `serverName`'s keys now, unless that happened within the refetch interval. */
  async refresh(serverName: string, keyId?: string): Promise<void> {
    const running = this.inflight.get(serverName);
    if (running) return running;
    const now = this.now();
    const last = this.lastFetch.get(serverName);
    if (last !== undefined && now - last < REFETCH_INTERVAL_MS) return;
    if (this.inflight.size >= MAX_CONCURRENT_FETCHES) {
      this.log('too many key fetches in progress; not fetching', { server: serverName });
      return;
    }
    if (this.lastFetch.size >= MEMORY_SERVERS) {
      for (const [name, at] of this.lastFetch) if (now - at >= REFETCH_INTERVAL_MS) this.lastFetch.delete(name);
    }
    this.lastFetch.set(serverName, now);
    const p = this.fetchAndStore(serverName, keyId).finally(() => this.inflight.delete(serverName));
    this.inflight.set(serverName, p);
    return p;
  }

  private log(message: string, details: Record<string, unknown>): void {
    this.options.log?.(message, details);
  }

  private async fetchAndStore(serverName: string, keyId: string | undefined): Promise<void> {
    const now = this.now();
    try {
      const body = await this.options.fetcher.fetchOwnKeys(serverName);
      const checked = checkServerKeys(body, serverName, now);
      if (typeof checked !== 'string') {
        await this.keep(serverName, serverName, checked);
        this.stats.fromServer++;
        return;
      }
      this.log('refused the key response of a server', { server: serverName, reason: checked });
    } catch (e) {
      this.log('could not fetch the keys of a server', { server: serverName, reason: (e as Error).message });
    }
    for (const notary of this.options.trustedKeyServers) {
      if (notary.server_name === serverName) continue;
      try {
        const checked = await this.fromNotary(notary, serverName, keyId, now);
        if (typeof checked !== 'string') {
          await this.keep(serverName, notary.server_name, checked);
          this.stats.fromNotary++;
          return;
        }
        this.log('refused a notary response', { server: serverName, notary: notary.server_name, reason: checked });
      } catch (e) {
        this.log('could not query a notary', { server: serverName, notary: notary.server_name, reason: (e as Error).message });
      }
    }
    this.stats.failed++;
  }

  private async keep(serverName: string, fromServer: string, checked: CheckedKeys): Promise<void> {
    const response: ServerKeysResponse = {
      serverName,
      fromServer,
      keyJson: JSON.stringify(checked.object),
      validUntilTs: checked.validUntilTs,
      fetchedTs: this.now(),
      keys: checked.keys,
    };
    await this.options.store.storeServerKeys(response);
    // Keys the server no longer lists stop authenticating requests now (the store retires them too).
    const listed = new Set(checked.keys.map((k) => k.keyId));
    for (const [keyId, k] of this.memory.get(serverName) ?? []) {
      if (!listed.has(keyId) && k.expiredTs === null) this.memory.get(serverName)!.set(keyId, { ...k, expiredTs: response.fetchedTs });
    }
    this.remember(serverName, checked.keys.map((k) => ({ ...k, validUntilTs: checked.validUntilTs })));
  }

  /** The notary's own verify keys: pinned in the configuration, or fetched from the notary. */
  private async notaryKeys(notary: TrustedKeyServer): Promise<ReadonlyMap<string, string>> {
    if (notary.verify_keys) return new Map(Object.entries(notary.verify_keys));
    let keys = this.memory.get(notary.server_name);
    const now = this.now();
    if (!keys || ![...keys.values()].some((k) => k.expiredTs === null && k.validUntilTs >= now)) {
      const checked = checkServerKeys(await this.options.fetcher.fetchOwnKeys(notary.server_name), notary.server_name, now);
      if (typeof checked === 'string') throw new Error(`the notary's own keys: ${checked}`);
      await this.keep(notary.server_name, notary.server_name, checked);
      keys = this.memory.get(notary.server_name)!;
    }
    return new Map([...keys].filter(([, k]) => k.expiredTs === null && k.validUntilTs >= now).map(([id, k]) => [id, k.verifyKey]));
  }

  /** Asks a notary for `serverName`'s keys; checks the server's own signature and the notary's. */
  private async fromNotary(notary: TrustedKeyServer, serverName: string, keyId: string | undefined, now: number): Promise<CheckedKeys | string> {
    const body = await this.options.fetcher.queryNotary(notary.server_name, serverName, keyId, now);
    if (!isObject(body) || !Array.isArray(body['server_keys'])) return 'the notary response has no server_keys list';
    const notaryKeys = await this.notaryKeys(notary);
    let reason = `the notary returned no keys for ${serverName}`;
    for (const entry of body['server_keys']) {
      if (!isObject(entry) || entry['server_name'] !== serverName) continue;
      const checked = checkServerKeys(entry, serverName, now);
      if (typeof checked === 'string') {
        reason = checked;
        continue;
      }
      const notaryProblem = checkJsonSignature(entry, notary.server_name, notaryKeys);
      if (notaryProblem) {
        reason = `the notary's signature is not valid: ${notaryProblem}`;
        continue;
      }
      return checked;
    }
    return reason;
  }

  /**
   * For our notary endpoint: the last verified key response of `serverName`, refreshed first when
   * it is not valid until `minimumValidUntilTs` (if the server answers). Stale answers are still
   * returned when nothing fresher can be had, as the spec asks of notaries.
   */
  async notaryResponse(serverName: string, minimumValidUntilTs: number): Promise<JsonObject | undefined> {
    let [stored] = await this.options.store.getServerKeysJson([serverName]);
    if (!stored || stored.validUntilTs < minimumValidUntilTs) {
      await this.refresh(serverName);
      [stored] = await this.options.store.getServerKeysJson([serverName]);
    }
    return stored ? (JSON.parse(stored.keyJson) as JsonObject) : undefined;
  }
}
