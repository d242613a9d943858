/**
 * Other servers' signing keys (server-server API, "Retrieving server keys"): fetched from the server
 * itself at /_matrix/key/v2/server, or — when it cannot be reached — from the notaries in
 * `federation.trusted_key_servers` via POST /_matrix/key/v2/query. Every response is checked
 * (server name, self-signature, and the notary's signature) before use, kept in memory and in the
 * database until `valid_until_ts`, which is capped at now + 7 days as the spec requires.
 *
 * Concurrent lookups for one server share one fetch; a key ID we do not know triggers at most one
 * refetch per server per REFETCH_INTERVAL_MS, so garbage key IDs cannot make us hammer a server.
 *
 * Anyone can make us fetch (an unknown origin's keys come before its signature can be checked, and
 * the notary endpoint needs no authentication at all), and a server that accepts connections but
 * never answers holds a fetch for the whole request timeout. So fetches take slots (see FETCH_LIMITS):
 * a bounded number at once in all, fewer per origin host, fewer on behalf of one client address, and
 * fewer for the notary endpoint, so that no single source of requests can keep everyone else's
 * fetches out. A fetch that finds no slot in time is answered with a retryable error, not as if
 * the origin had no keys.
 */
import { checkJsonSignature, isObject } from '../matrix/signing.js';
import { checkServerKeys, type CheckedKeys } from './server-key-response.js';
import { parseServerName } from '../matrix/ids.js';
import { RateLimiter } from '../matrix/ratelimit.js';
import { Slots, SlotsBusy, type SlotLimit } from '../matrix/slots.js';
import type { ServerKeysResponse, ServerKeysStore, StoredKeysJson, StoredServerKey } from '../storage/store.js';

export { checkServerKeys, MAX_KEY_VALIDITY_MS, type CheckedKeys } from './server-key-response.js';
export const REFETCH_INTERVAL_MS = 30_000;
/**
 * Refetches for a notary caller whose `minimum_valid_until_ts` our copy does not reach may come
 * sooner than REFETCH_INTERVAL_MS, but only this often per origin (a few at once, then one every
 * 10 s): a caller naming a far-off time must not make us hammer the origin.
 */
export const URGENT_REFETCH_LIMIT = { per_second: 0.1, burst_count: 3 } as const;

/** How many key fetches may run at once. */
export const FETCH_LIMITS = {
  /** In all. Each holds one outbound connection for up to `federation.request_timeout`. */
  total: 64,
  /** For one origin host (its server name without the port: many ports of one host are one origin). */
  perHost: 4,
  /** On behalf of one client address (the X-Matrix origin is not verified yet; the address is). */
  perAddress: 8,
  /** Started by the unauthenticated notary endpoint, all callers together. */
  notary: 16,
} as const;
/** How long a fetch may wait for a slot: a federation request, a notary request. */
export const FETCH_WAIT_MS = { request: 3_000, notary: 10_000 } as const;
/** Suggested wait before retrying a request refused for want of a fetch slot. */
export const FETCH_BUSY_RETRY_MS = 5_000;
/** Servers whose keys we keep in memory (the database holds the rest). */
const MEMORY_SERVERS = 10_000;

/** Who a fetch is for: a federation request's key check or a notary query, from a client address. */
export interface FetchRequester {
  readonly kind: 'request' | 'notary';
  readonly address?: string | undefined;
}

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

interface CachedKey {
  readonly verifyKey: string;
  readonly validUntilTs: number;
  readonly expiredTs: number | null;
}

/**
 * The public key to check a request with; or why there is none (`error`, answered 401); or that
 * no fetch slot was free (`busy`: `origin` when the caller's own share is used up, `server` when
 * every slot is taken), answered with a retryable error.
 */
export type KeyLookup = { readonly verifyKey: string } | { readonly error: string } | { readonly busy: 'origin' | 'server'; readonly reason: string };

/** What a refresh came to: nothing to report, or no slot for it. */
type RefreshOutcome = undefined | { readonly busy: 'origin' | 'server'; readonly reason: string };

export class KeyRing {
  private readonly memory = new Map<string, Map<string, CachedKey>>();
  private readonly loadedFromDb = new Set<string>();
  private readonly inflight = new Map<string, Promise<void>>();
  private readonly lastFetch = new Map<string, number>();
  /** Why the last fetch of a server found no usable keys, shown in the 401 that follows. */
  private readonly lastFailure = new Map<string, string>();
  private readonly urgentRefetches: RateLimiter;
  private readonly slots = new Slots();
  private lastBusyLog = 0;
  private readonly now: () => number;
  /** Counts for metrics: key responses accepted from servers themselves or from notaries, and fetches that found nothing usable. */
  readonly stats = { fromServer: 0, fromNotary: 0, failed: 0 };

  constructor(private readonly options: KeyRingOptions) {
    this.now = options.now ?? Date.now;
    this.urgentRefetches = new RateLimiter(URGENT_REFETCH_LIMIT, this.now);
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
  async requestKey(serverName: string, keyId: string, requester: FetchRequester = { kind: 'request' }): Promise<KeyLookup> {
    if (serverName === this.options.serverName) return { error: 'requests claiming to come from this server itself are not accepted' };
    let k = await this.cached(serverName, keyId);
    if (!this.usableForRequests(k)) {
      const outcome = await this.refresh(serverName, requester, { keyId });
      k = this.memory.get(serverName)?.get(keyId);
      if (outcome && !this.usableForRequests(k)) return outcome;
    }
    const failure = this.lastFailure.get(serverName);
    const why = failure === undefined ? '' : ` (fetching its keys failed: ${failure})`;
    if (k === undefined) return { error: `${serverName} has no published key ${keyId}${why}` };
    if (k.expiredTs !== null) return { error: `${keyId} is an old key of ${serverName} (in old_verify_keys) and cannot sign requests` };
    if (k.validUntilTs < this.now()) return { error: `${keyId} of ${serverName} expired at ${new Date(k.validUntilTs).toISOString()}${why}` };
    return { verifyKey: k.verifyKey };
  }

  /** The slots a fetch of `serverName` for `requester` counts against. */
  private limitsFor(serverName: string, requester: FetchRequester): SlotLimit[] {
    const host = (parseServerName(serverName)?.host ?? serverName).toLowerCase();
    const limits: SlotLimit[] = [
      { key: 'total', limit: FETCH_LIMITS.total, queue: 1000 },
      { key: `host:${host}`, limit: FETCH_LIMITS.perHost, queue: 100 },
    ];
    if (requester.address !== undefined) limits.push({ key: `address:${requester.address}`, limit: FETCH_LIMITS.perAddress, queue: 200 });
    if (requester.kind === 'notary') limits.push({ key: 'notary', limit: FETCH_LIMITS.notary, queue: 500 });
    return limits;
  }

  /** Whether a fetch of `serverName` may start now. */
  private mayFetch(serverName: string, urgent: boolean): boolean {
    const last = this.lastFetch.get(serverName);
    if (last === undefined || this.now() - last >= REFETCH_INTERVAL_MS) return true;
    return urgent && this.urgentRefetches.retryAfterMs(serverName) === 0;
  }

  /** Whether a fetch of `serverName` may start now; when it may, notes that it does. */
  private due(serverName: string, urgent: boolean): boolean {
    if (!this.mayFetch(serverName, urgent)) return false;
    const now = this.now();
    const last = this.lastFetch.get(serverName);
    if (last !== undefined && now - last < REFETCH_INTERVAL_MS) this.urgentRefetches.record(serverName);
    if (this.lastFetch.size >= MEMORY_SERVERS) {
      for (const [name, at] of this.lastFetch) {
        if (now - at >= REFETCH_INTERVAL_MS) {
          this.lastFetch.delete(name);
          this.lastFailure.delete(name);
        }
      }
    }
    this.lastFetch.set(serverName, now);
    return true;
  }

  /**
   * Fetches `serverName`'s keys now, unless that happened within the refetch interval (or, when
   * `urgent`, more often than URGENT_REFETCH_LIMIT allows), or no fetch slot came free in time.
   */
  async refresh(serverName: string, requester: FetchRequester = { kind: 'request' }, options: { keyId?: string | undefined; urgent?: boolean } = {}): Promise<RefreshOutcome> {
    const running = this.inflight.get(serverName);
    if (running) return void (await running);
    if (!this.mayFetch(serverName, options.urgent ?? false)) return undefined;
    let release: () => void;
    try {
      release = await this.slots.acquire(this.limitsFor(serverName, requester), FETCH_WAIT_MS[requester.kind]);
    } catch (e) {
      if (!(e instanceof SlotsBusy)) throw e;
      return this.busy(serverName, e.limit);
    }
    // Someone else may have fetched it while we waited for the slot.
    const started = this.inflight.get(serverName);
    if (started || !this.due(serverName, options.urgent ?? false)) {
      release();
      return void (await started);
    }
    const p = this.fetchAndStore(serverName, options.keyId).finally(() => {
      this.inflight.delete(serverName);
      release();
    });
    this.inflight.set(serverName, p);
    return void (await p);
  }

  private busy(serverName: string, full: SlotLimit): RefreshOutcome {
    const scope = full.key.startsWith('host:') || full.key.startsWith('address:') ? 'origin' : 'server';
    const reason =
      scope === 'origin'
        ? `too many key fetches at once for ${full.key.startsWith('host:') ? `the host of ${serverName}` : 'requests from your address'} (at most ${full.limit})`
        : `this server is busy fetching other servers' keys (${full.limit} at once${full.key === 'notary' ? ' for the notary endpoint' : ''})`;
    const now = this.now();
    if (now - this.lastBusyLog >= 60_000) {
      this.lastBusyLog = now;
      this.log('key fetches refused for want of a free slot (logged at most once a minute)', { server: serverName, limit: full.key, reason });
    }
    return { busy: scope, reason };
  }

  private log(message: string, details: Record<string, unknown>): void {
    this.options.log?.(message, details);
  }

  private async fetchAndStore(serverName: string, keyId: string | undefined): Promise<void> {
    const now = this.now();
    const reasons: string[] = [];
    try {
      const body = await this.options.fetcher.fetchOwnKeys(serverName);
      const checked = checkServerKeys(body, serverName, now);
      if (typeof checked !== 'string') {
        await this.keep(serverName, serverName, checked);
        this.stats.fromServer++;
        this.lastFailure.delete(serverName);
        return;
      }
      reasons.push(checked);
      this.log('refused the key response of a server', { server: serverName, reason: checked });
    } catch (e) {
      reasons.push((e as Error).message);
      this.log('could not fetch the keys of a server', { server: serverName, reason: (e as Error).message });
    }
    for (const notary of this.options.trustedKeyServers) {
      if (notary.server_name === serverName) continue;
      try {
        const checked = await this.fromNotary(notary, serverName, keyId, now);
        if (typeof checked !== 'string') {
          await this.keep(serverName, notary.server_name, checked);
          this.stats.fromNotary++;
          this.lastFailure.delete(serverName);
          return;
        }
        reasons.push(`notary ${notary.server_name}: ${checked}`);
        this.log('refused a notary response', { server: serverName, notary: notary.server_name, reason: checked });
      } catch (e) {
        reasons.push(`notary ${notary.server_name}: ${(e as Error).message}`);
        this.log('could not query a notary', { server: serverName, notary: notary.server_name, reason: (e as Error).message });
      }
    }
    this.lastFailure.set(serverName, reasons.join('; '));
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
   * For our notary endpoint: the verified key responses of `serverName` to pass on, fetched first
   * when we have none, when a key asked for (`keyIds`; none means all) is missing, or when what
   * we hold is not valid until `minimumValidUntilTs` — the last two even within the refetch
   * interval, as often as URGENT_REFETCH_LIMIT allows. What comes back: the newest response (even an expired one, with
   * its own valid_until_ts, when nothing fresher can be had, as the spec asks of notaries), plus,
   * for each key asked for, the newest response listing it while that is still valid (or when it
   * is asked for by ID): a later, different answer from the origin never hides a key that is
   * still valid.
   */
  async notaryResponses(serverName: string, keyIds: readonly string[], minimumValidUntilTs: number, requester: FetchRequester): Promise<JsonObject[]> {
    let held = await this.options.store.getServerKeyResponses(serverName);
    const relevant = keyIds.length === 0 ? held : held.filter((r) => keyIds.includes(r.keyId));
    const missing = held.length === 0 || keyIds.some((id) => !held.some((r) => r.keyId === id));
    const stale = relevant.length > 0 && Math.max(...relevant.map((r) => r.validUntilTs)) < minimumValidUntilTs;
    if (missing || stale) {
      // With nothing held this is an ordinary fetch; otherwise the caller wants more than our copy
      // has, which may justify fetching within the refetch interval.
      await this.refresh(serverName, requester, { keyId: keyIds.length === 1 ? keyIds[0] : undefined, urgent: held.length > 0 });
      held = await this.options.store.getServerKeyResponses(serverName);
    }
    return pickNotaryResponses(held, keyIds, this.now()).map((text) => JSON.parse(text) as JsonObject);
  }
}

/** The response texts to pass on (see KeyRing.notaryResponses), each once. */
function pickNotaryResponses(held: readonly StoredKeysJson[], keyIds: readonly string[], now: number): string[] {
  if (held.length === 0) return [];
  const newest = held.reduce((a, b) => (b.fetchedTs > a.fetchedTs ? b : a));
  const picked = new Set([newest.keyJson]);
  for (const r of held) {
    const asked = keyIds.includes(r.keyId);
    if ((keyIds.length === 0 || asked) && (asked || r.validUntilTs >= now)) picked.add(r.keyJson);
  }
  return [...picked];
}
