/**
 * The outbound client for remote keys: the `RemoteKeyLookup` the key rules use for users of other
 * servers in a client's /keys/query and /keys/claim (keys.yaml). Every server is asked in
 * parallel, and the whole request waits at most until its deadline (the client's `timeout`).
 *
 * Queries: a user asked for with all devices (the usual case) is tracked: their list comes from
 * the device-list cache, fetched with GET /user/devices/{userId} when missing or stale (Synapse
 * resyncs tracked users the same way). If their server cannot be reached, the last cached list is
 * served and the server is not a failure: a device list does not vanish because its server is
 * down. Users asked for with particular device IDs and not cached go, one request per server, in
 * a POST /user/keys/query with all of them (what Synapse does for users it does not track).
 * Claims: one POST /user/keys/claim per server. Answers are checked (remote-answers.ts) first.
 */
import type { RemoteKeyLookup, RemoteQueryResult, ServerFailure } from '../keys/remote.js';
import type { ClaimedKey, ClaimRequest, KeysOfUsers, RemoteDeviceList, RemoteDeviceListsStore } from '../storage/store.js';
import { settleWithin } from './client.js';
import type { Destinations } from './destinations.js';
import { ask, MAX_REMOTE_ANSWER_BYTES, type Asked, type RemoteDeviceListCache, type SignedRequester } from './device-list-cache.js';
import { checkKeysClaimAnswer, checkKeysQueryAnswer, Problems, serverOf } from './remote-answers.js';

export interface RemoteKeysOptions {
  readonly client: SignedRequester;
  readonly destinations: Destinations;
  readonly cache: RemoteDeviceListCache;
  readonly store: Pick<RemoteDeviceListsStore, 'getKeysOf'>;
  readonly now?: () => number;
  readonly log?: (level: 'info' | 'warn', message: string, details: Record<string, unknown>) => void;
}

const F = '/_matrix/federation/v1';

/** `items` grouped by the server of their user. */
function byServer<T>(items: Iterable<T>, userOf: (item: T) => string): Map<string, T[]> {
  const out = new Map<string, T[]>();
  for (const item of items) {
    const server = serverOf(userOf(item))!;
    const list = out.get(server);
    if (list) list.push(item);
    else out.set(server, [item]);
  }
  return out;
}

export class RemoteKeys implements RemoteKeyLookup {
  private readonly now: () => number;

  constructor(private readonly options: RemoteKeysOptions) {
    this.now = options.now ?? Date.now;
  }

  private log(level: 'info' | 'warn', message: string, details: Record<string, unknown>): void {
    this.options.log?.(level, message, details);
  }

  private timedOut(server: string, deadline: number, started: number): ServerFailure {
    return { status: 504, message: `${server} did not answer within ${Math.max(0, deadline - started)} ms` };
  }

  async queryKeys(wanted: ReadonlyMap<string, readonly string[]>, deadline: number): Promise<RemoteQueryResult> {
    const started = this.now();
    const { cache } = this.options;
    const lists = new Map((await cache.getLists([...wanted.keys()])).map((l) => [l.userId, l]));
    const known = new Set<string>();
    const failures = new Map<string, ServerFailure>();
    const fetched: KeysOfUsers = { devices: [], crossSigning: [], signatures: [] };

    await Promise.all(
      [...byServer(wanted.keys(), (u) => u)].map(async ([server, users]) => {
        const toResync: string[] = [];
        const toQuery = new Map<string, readonly string[]>();
        for (const userId of users) {
          const list = lists.get(userId);
          if (list && cache.isFresh(list)) {
            cache.stats.hits++;
            known.add(userId);
            continue;
          }
          cache.stats.misses++;
          if (list || wanted.get(userId)!.length === 0) toResync.push(userId);
          else toQuery.set(userId, wanted.get(userId)!);
        }
        if (toResync.length === 0 && toQuery.size === 0) return;
        const work = this.askServer(server, toResync, toQuery, lists, deadline);
        const outcome = await settleWithin(work, deadline - Date.now(), () => ({ known: [] as string[], keys: undefined, failure: this.timedOut(server, deadline, started) }));
        for (const u of outcome.known) known.add(u);
        if (outcome.keys) {
          fetched.devices.push(...outcome.keys.devices);
          fetched.crossSigning.push(...outcome.keys.crossSigning);
        }
        if (outcome.failure) {
          failures.set(server, outcome.failure);
          // Whatever was cached before still stands: served, and the server is no failure for it.
          for (const u of toResync) if (lists.has(u)) known.add(u);
          if (toQuery.size === 0 && toResync.every((u) => lists.has(u))) failures.delete(server);
        }
      }),
    );
    const cached = known.size > 0 ? await this.options.store.getKeysOf([...known]) : { devices: [], crossSigning: [], signatures: [] };
    return {
      keys: { devices: [...cached.devices, ...fetched.devices], crossSigning: [...cached.crossSigning, ...fetched.crossSigning], signatures: [] },
      known: [...known],
      failures,
    };
  }

  /** Asks one server: resyncs of tracked users, and one key query for the others. */
  private async askServer(
    server: string,
    toResync: readonly string[],
    toQuery: ReadonlyMap<string, readonly string[]>,
    lists: ReadonlyMap<string, RemoteDeviceList>,
    deadline: number,
  ): Promise<{ known: string[]; keys: KeysOfUsers | undefined; failure: ServerFailure | undefined }> {
    const known: string[] = [];
    let failure: ServerFailure | undefined;
    const resyncs = toResync.map(async (userId) => {
      const outcome = await this.options.cache.resync(userId, deadline);
      if (outcome.ok || lists.has(userId)) known.push(userId);
      else failure ??= { status: outcome.status, message: outcome.message };
    });
    let keys: KeysOfUsers | undefined;
    const query = (async () => {
      if (toQuery.size === 0) return;
      const answer = await ask(this.options.client, this.options.destinations, server, `${F}/user/keys/query`, {
        method: 'POST',
        body: { device_keys: Object.fromEntries(toQuery) },
        deadline,
        maxBytes: MAX_REMOTE_ANSWER_BYTES,
      });
      const checked = this.checked(answer, server, 'key query', (body, problems) => checkKeysQueryAnswer(body, toQuery, problems));
      if ('failure' in checked) failure = checked.failure;
      else keys = checked.value;
    })();
    await Promise.all([...resyncs, query]);
    return { known, keys, failure };
  }

  /** An answer checked by `check`, or the failure entry it amounts to. */
  private checked<T>(answer: Asked<unknown>, server: string, what: string, check: (body: unknown, problems: Problems) => T | string): { value: T } | { failure: ServerFailure } {
    if (!answer.ok) return { failure: { status: answer.status, message: answer.message } };
    const problems = new Problems();
    const value = check(answer.value, problems);
    if (problems.count > 0) this.log('warn', `dropped parts of a remote ${what} answer that do not follow the spec`, { server, problems: problems.list, count: problems.count });
    if (typeof value === 'string') {
      this.log('warn', `refused a remote ${what} answer`, { server, reason: value });
      return { failure: { status: 502, message: `${server} sent an answer that does not follow the spec: ${value}` } };
    }
    return { value };
  }

  async claimKeys(requests: readonly ClaimRequest[], deadline: number): Promise<{ claimed: ClaimedKey[]; failures: ReadonlyMap<string, ServerFailure> }> {
    const started = this.now();
    const claimed: ClaimedKey[] = [];
    const failures = new Map<string, ServerFailure>();
    await Promise.all(
      [...byServer(requests, (r) => r.userId)].map(async ([server, asked]) => {
        const body: Record<string, Record<string, string>> = {};
        for (const r of asked) (body[r.userId] ??= {})[r.deviceId] = r.algorithm;
        const work = ask(this.options.client, this.options.destinations, server, `${F}/user/keys/claim`, {
          method: 'POST',
          body: { one_time_keys: body },
          deadline,
          maxBytes: MAX_REMOTE_ANSWER_BYTES,
        }).then((answer) => this.checked(answer, server, 'key claim', (b, problems) => checkKeysClaimAnswer(b, asked, problems)));
        const outcome = await settleWithin(work, deadline - Date.now(), () => ({ failure: this.timedOut(server, deadline, started) }));
        if ('failure' in outcome) failures.set(server, outcome.failure);
        else claimed.push(...outcome.value);
      }),
    );
    return { claimed, failures };
  }
}
