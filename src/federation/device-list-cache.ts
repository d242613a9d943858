/**
 * The remote device-list cache (server-server API, Device Management; e2e spec, "Tracking the
 * device list for a user"): the first time a local user needs a remote user's devices, the whole
 * list is fetched with GET /user/devices/{userId} (gap G2 of the extract: only that endpoint
 * carries `stream_id`) and kept; m.device_list_update EDUs then change it one device at a time,
 * in stream order, and m.signing_key_update EDUs replace its cross-signing keys.
 *
 * An update whose prev_id points past what the cache holds (a gap) marks the list stale and
 * resyncs it in the background, with retries. A list is also fetched again when it is older than
 * the refresh interval: that renews this server's subscription at the remote server, and is how
 * changes on servers that never send us updates are seen at all.
 */
import type { RemoteDeviceList, RemoteDeviceListsStore, RemoteDeviceUpdate } from '../storage/store.js';
import { DeadlineExceeded, type FederationResponse, type SignedRequestOptions } from './client.js';
import type { Destinations } from './destinations.js';
import { checkDeviceListUpdate, checkSigningKeyUpdate, checkUserDevicesAnswer, isSelfSigningKeySignedBy, Problems, serverOf } from './remote-answers.js';

/**
 * Whether `e` is the storage layer's "the database cannot be reached" (it logs the outage once;
 * background work should not repeat it on every attempt).
 */
export function isDatabaseOutage(e: unknown): boolean {
  return e instanceof Error && e.name === 'DatabaseUnavailableError';
}

/** Remote answers about one user's devices: ~10,000 devices of a few KB stay well below this. */
export const MAX_REMOTE_ANSWER_BYTES = 8 * 1024 * 1024;
/** Background resyncs after a gap are tried again after these waits, then left to the refresh job. */
const RESYNC_RETRY_MS = [1_000, 10_000, 60_000];

export interface SignedRequester {
  signedRequest(destination: string, path: string, options: SignedRequestOptions): Promise<FederationResponse>;
}

export interface DeviceListCacheOptions {
  readonly store: RemoteDeviceListsStore;
  readonly client: SignedRequester;
  readonly destinations: Destinations;
  /** A list fetched longer ago than this is fetched again before it is used. */
  readonly refreshAfterMs: number;
  readonly requestTimeoutMs: number;
  readonly now?: () => number;
  readonly log?: (level: 'info' | 'warn', message: string, details: Record<string, unknown>) => void;
}

/** The outcome of asking a server for something, as a `failures` entry would describe it. */
export type Asked<T> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly status: number; readonly message: string };

export interface AskOptions extends SignedRequestOptions {
  /** Any answer but 200 counts as a failure of the destination (a refused transaction), not only 5xx. */
  readonly onlyOkIsSuccess?: boolean;
}

/**
 * One signed request and the bookkeeping every caller needs: the destination's retry state (a
 * network failure or a 5xx counts as a failure, any other answer as a success; a request cut
 * short by the caller's own deadline counts as neither) and a short description of what went wrong.
 */
export async function ask(client: SignedRequester, destinations: Destinations, destination: string, path: string, options: AskOptions): Promise<Asked<unknown>> {
  if (destinations.isWaiting(destination)) {
    const at = new Date(destinations.retryAfter(destination)).toISOString();
    return { ok: false, status: 503, message: `${destination} failed recently; not asking it again before ${at}` };
  }
  let res: FederationResponse;
  try {
    res = await client.signedRequest(destination, path, options);
  } catch (e) {
    const message = (e as Error).message;
    if (e instanceof DeadlineExceeded) return { ok: false, status: 504, message };
    await destinations.failed(destination, message);
    return { ok: false, status: 503, message };
  }
  if (res.status >= 500 || (options.onlyOkIsSuccess === true && res.status !== 200)) {
    const error = typeof (res.body as { error?: unknown } | undefined)?.error === 'string' ? `: ${(res.body as { error: string }).error}` : '';
    await destinations.failed(destination, `answered ${res.status}${error}`);
    return { ok: false, status: res.status, message: `${destination} answered ${res.status}${error}` };
  }
  await destinations.succeeded(destination);
  if (res.status !== 200) {
    const error = typeof (res.body as { error?: unknown } | undefined)?.error === 'string' ? `: ${(res.body as { error: string }).error}` : '';
    return { ok: false, status: res.status, message: `${destination} answered ${res.status}${error}` };
  }
  return { ok: true, value: res.body };
}

export class RemoteDeviceListCache {
  private readonly now: () => number;
  private readonly resyncs = new Map<string, Promise<Asked<undefined>>>();
  private readonly userQueues = new Map<string, Promise<unknown>>();
  /** Background resyncs waiting to be tried again, per user. */
  private readonly retries = new Map<string, NodeJS.Timeout>();
  private stopped = false;
  /** Counts for metrics. */
  readonly stats = { hits: 0, misses: 0, resyncs: 0, resyncFailures: 0, updatesApplied: 0, updatesIgnored: 0, gaps: 0, updatesDropped: 0 };

  constructor(private readonly options: DeviceListCacheOptions) {
    this.now = options.now ?? Date.now;
  }

  private log(level: 'info' | 'warn', message: string, details: Record<string, unknown>): void {
    this.options.log?.(level, message, details);
  }

  /** A cached list that can be used without asking its server. */
  isFresh(list: RemoteDeviceList): boolean {
    return !list.stale && this.now() - list.syncedTs < this.options.refreshAfterMs;
  }

  getLists(userIds: readonly string[]): Promise<RemoteDeviceList[]> {
    return this.options.store.getLists(userIds);
  }

  /**
   * Fetches a user's whole list and stores it; concurrent calls for one user share one request.
   * `ok` when the cache holds a list fetched now; otherwise what went wrong.
   */
  resync(userId: string, deadline: number): Promise<Asked<undefined>> {
    const running = this.resyncs.get(userId);
    if (running) return running;
    const p = this.fetchList(userId, deadline).finally(() => this.resyncs.delete(userId));
    this.resyncs.set(userId, p);
    return p;
  }

  private async fetchList(userId: string, deadline: number): Promise<Asked<undefined>> {
    const server = serverOf(userId);
    if (server === undefined) return { ok: false, status: 400, message: `${userId} is not a valid user ID` };
    this.stats.resyncs++;
    const answer = await ask(this.options.client, this.options.destinations, server, `/_matrix/federation/v1/user/devices/${encodeURIComponent(userId)}`, {
      method: 'GET',
      deadline,
      maxBytes: MAX_REMOTE_ANSWER_BYTES,
    });
    if (!answer.ok) {
      this.stats.resyncFailures++;
      this.log('info', 'could not fetch a remote device list', { user: userId, status: answer.status, reason: answer.message });
      return answer;
    }
    const problems = new Problems();
    const snapshot = checkUserDevicesAnswer(answer.value, userId, server, problems);
    if (problems.count > 0) this.log('warn', 'dropped parts of a remote device list that do not follow the spec', { user: userId, problems: problems.list, count: problems.count });
    if (typeof snapshot === 'string') {
      this.stats.resyncFailures++;
      this.log('warn', 'refused a remote device list', { user: userId, server, reason: snapshot });
      return { ok: false, status: 502, message: `${server} sent a device list of ${userId} that does not follow the spec: ${snapshot}` };
    }
    const { complete } = await this.options.store.replaceList(snapshot, this.now());
    if (!complete) return { ok: false, status: 503, message: `${server} sent a list of ${userId} older than an update it had already sent; fetching it again` };
    return { ok: true, value: undefined };
  }

  /**
   * Resyncs in the background, retrying a few times; the refresh job picks up what still fails.
   * At most one retry is waiting per user, however many gaps arrive meanwhile.
   */
  scheduleResync(userId: string, attempt = 0): void {
    if (this.stopped || (attempt === 0 && this.retries.has(userId))) return;
    void this.resync(userId, this.now() + this.options.requestTimeoutMs)
      .then(
        (r) => r.ok,
        (e: unknown) => {
          if (!isDatabaseOutage(e)) this.log('warn', 'resyncing a remote device list failed', { user: userId, reason: (e as Error).message });
          return false;
        },
      )
      .then((ok) => {
        const wait = RESYNC_RETRY_MS[attempt];
        if (ok || wait === undefined || this.stopped || this.retries.has(userId)) return;
        const server = serverOf(userId)!;
        const timer = setTimeout(() => {
          this.retries.delete(userId);
          this.scheduleResync(userId, attempt + 1);
        }, Math.max(wait, this.options.destinations.retryAfter(server) - this.now()));
        timer.unref();
        this.retries.set(userId, timer);
      });
  }

  /** Runs `fn` after every earlier update of the same user (updates of one user apply in order). */
  private serially<T>(userId: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.userQueues.get(userId) ?? Promise.resolve();
    const next = previous.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.userQueues.set(userId, tail);
    void tail.then(() => {
      if (this.userQueues.get(userId) === tail) this.userQueues.delete(userId);
    });
    return next;
  }

  /**
   * Whether an update continues the cached list: updates at or below the cached position are
   * already in it; the others apply when every prev_id is one the cache has seen (a position at
   * or below its own: a resync at a later position includes everything before it). An empty
   * prev_id starts a new chain, so the list is fetched again (as Synapse does).
   */
  static decide(update: Pick<RemoteDeviceUpdate, 'streamId' | 'prevIds'>, current: Pick<RemoteDeviceList, 'streamId' | 'stale'>): 'apply' | 'ignore' | 'gap' {
    if (current.stale) return 'gap';
    if (update.streamId <= current.streamId) return 'ignore';
    if (update.prevIds.length === 0) return 'gap';
    return update.prevIds.every((p) => p <= current.streamId) ? 'apply' : 'gap';
  }

  /** An m.device_list_update EDU from `origin` (already authenticated). */
  async deviceListUpdate(origin: string, content: unknown): Promise<void> {
    const update = checkDeviceListUpdate(content, origin);
    if (typeof update === 'string') {
      this.stats.updatesDropped++;
      this.log('info', 'dropped an m.device_list_update', { origin, reason: update });
      return;
    }
    const outcome = await this.serially(update.userId, () => this.options.store.applyDeviceUpdate(update, (current) => RemoteDeviceListCache.decide(update, current), this.now()));
    if (outcome === 'apply') this.stats.updatesApplied++;
    else if (outcome === 'ignore' || outcome === 'untracked') this.stats.updatesIgnored++;
    else {
      this.stats.gaps++;
      this.scheduleResync(update.userId);
    }
  }

  /** An m.signing_key_update EDU from `origin` (already authenticated). */
  async signingKeyUpdate(origin: string, content: unknown): Promise<void> {
    const update = checkSigningKeyUpdate(content, origin);
    if (typeof update === 'string') {
      this.stats.updatesDropped++;
      this.log('info', 'dropped an m.signing_key_update', { origin, reason: update });
      return;
    }
    const { userId, master, selfSigning } = update;
    await this.serially(userId, async () => {
      if (selfSigning) {
        const stored = master ?? (await this.options.store.getKeysOf([userId])).crossSigning.find((k) => k.keyType === 'master');
        if (!isSelfSigningKeySignedBy(selfSigning, stored, userId)) {
          this.stats.updatesDropped++;
          this.log('info', 'dropped an m.signing_key_update whose self-signing key is not signed by the master key', { origin, user: userId });
          return;
        }
      }
      const applied = await this.options.store.applySigningKeys(userId, { ...(master ? { master } : {}), ...(selfSigning ? { selfSigning } : {}) }, this.now());
      if (applied) this.stats.updatesApplied++;
      else this.stats.updatesIgnored++;
    });
  }

  /**
   * One round of the refresh job: lists that are stale or older than the refresh interval, oldest
   * first, skipping servers in their retry wait (their lists wait their turn, and do not crowd out
   * the lists of servers that answer).
   */
  async refreshDue(limit: number): Promise<number> {
    const candidates = await this.options.store.dueForResync(this.now() - this.options.refreshAfterMs, limit * 4);
    const due = candidates.filter((u) => !this.options.destinations.isWaiting(serverOf(u)!)).slice(0, limit);
    await Promise.all(due.map((u) => this.resync(u, this.now() + this.options.requestTimeoutMs).catch(() => undefined)));
    return due.length;
  }

  /** Drops the cached lists of remote users nobody here tracks any more. */
  forgetUntracked(): Promise<number> {
    return this.options.store.forgetUntracked();
  }

  stop(): void {
    this.stopped = true;
    for (const t of this.retries.values()) clearTimeout(t);
    this.retries.clear();
  }
}
