/**
 * The end-to-end key rules: upload, claim, query, changes, cross-signing keys and signatures, and
 * the key parts of /sync (put together in sync.ts). Used by the client-server API and, with a
 * server as the viewer, by the federation API. Uses the KeysStore and DeviceListsStore only; no
 * HTTP, no driver.
 */
import { MatrixError } from '../matrix/errors.js';
import { canonicalJson } from '../matrix/canonical-json.js';
import { isLocalUser, isValidDeviceId, isValidKeyPart, parseUserId } from '../matrix/ids.js';
import type { ClaimedKey, ClaimRequest, DeviceListsStore, KeysOfUser, KeysOfUsers, KeysStore, StoredCrossSigningKey, StoredSignature } from '../storage/store.js';
import type { RemoteKeyLookup, RemoteQueryResult, ServerFailure } from './remote.js';
import { sameKeyIgnoringSignatures, withSignatures } from './json-text.js';
import { answerBytes, objectText, UserAnswerCache, userAnswer, type UserAnswer, type Viewer } from './query-text.js';
import { badJson, checkTimeout, parseKeyMap, requireObject, requireObjectField, validateDeviceKeys } from './validate.js';
import { parseStreamToken } from './sync-token.js';

/** The user and device making a client request. */
export interface Requester {
  readonly userId: string;
  readonly deviceId: string;
}

export type { Viewer } from './query-text.js';

/** How much one key query or claim may ask for; more is refused with 400 naming the setting. */
export interface RequestLimits {
  /** Users named in one /keys/query (`max_key_query_users`). */
  readonly queryUsers: number;
  /** Device IDs named in one /keys/query, over all users (`max_key_query_device_ids`). */
  readonly queryDeviceIds: number;
  /** Devices named in one /keys/claim (`max_key_claim_devices`). */
  readonly claimDevices: number;
}

export const DEFAULT_REQUEST_LIMITS: RequestLimits = { queryUsers: 10_000, queryDeviceIds: 10_000, claimDevices: 10_000 };

export interface KeysOptions {
  readonly store: KeysStore;
  readonly deviceLists: DeviceListsStore;
  readonly serverName: string;
  readonly maxOneTimeKeysPerDevice: number;
  readonly limits?: RequestLimits;
  /** Keys of users on other servers; without it they are listed in `failures`. */
  readonly remote?: RemoteKeyLookup | undefined;
  readonly now?: () => number;
  /** Store device keys whose self-signature is missing or does not verify (for test suites). */
  readonly acceptInvalidDeviceSelfSignatures?: boolean;
}

export type { ServerFailure } from './remote.js';

type JsonObject = Record<string, unknown>;

/**
 * A function that adds to a stored key object the uploaded signatures on it that `viewer` may see
 * (e2e spec, "Key and signature security"). Only user-signing-key signatures are made by someone
 * other than the key's owner; those are for the signer's eyes only.
 */
function withVisibleSignatures(signatures: readonly StoredSignature[], viewer: Viewer): (json: string, owner: string, targetKeyId: string) => string {
  const byTarget = new Map<string, StoredSignature[]>();
  for (const s of signatures) {
    if (s.signerUserId !== s.targetUserId && (viewer === null || s.signerUserId !== viewer.userId)) continue;
    const key = `${s.targetUserId}\0${s.targetKeyId}`;
    const list = byTarget.get(key);
    if (list) list.push(s);
    else byTarget.set(key, [s]);
  }
  return (json, owner, targetKeyId) => withSignatures(json, byTarget.get(`${owner}\0${targetKeyId}`) ?? []);
}

export interface QueryOptions {
  /** Add `unsigned.device_display_name` (always for clients; per config over federation). */
  readonly displayNames: boolean;
  /** Include `failures` and `user_signing_keys` (client-server API only). */
  readonly clientApi: boolean;
}

/** Counts for metrics, kept by the key rules themselves. */
export interface KeyStats {
  oneTimeKeysClaimed: number;
  fallbackKeysClaimed: number;
  /** Claims for a device that had neither a one-time key nor a fallback key. */
  claimsUnanswered: number;
}

/**
 * Query answers are kept for reuse while the data is unchanged, bounded by what they hold: the
 * request (the key) and the answer count, so a small answer to a huge request cannot pin memory.
 * Sizes are in bytes (the request counted in UTF-16 code units: the same for the ASCII of IDs).
 */
const MAX_KEPT_ANSWER_BYTES = 16_384;
const MAX_KEPT_REQUEST_CHARS = 4096;
/**
 * All kept requests and answers together: ~4 MB. Under load V8 lets the heap grow to about twice
 * what is live (HEAP_GROWING_PERCENT, cli/run.ts), so each MB of the read caches' budgets (these two
 * and KEYS_OF_USER_BUDGET_BYTES in storage/keys.ts) costs about two of resident memory: halving
 * them from 8 + 24 + 8 MB took ~20 MiB off the peak on 10^5 devices (docs/benchmarks.md, "Memory").
 */
export const ANSWER_CACHE_BUDGET_BYTES = 4 * 1024 * 1024;
/**
 * The same for users' parts of answers (query-text.ts), counting the parts and the keys they were
 * built from: ~12 MB, the keys of about 2,500 users with three devices each.
 */
const USER_ANSWER_BUDGET_BYTES = 12 * 1024 * 1024;

/** The `failures` object of a client answer. */
function failuresText(failures: ReadonlyMap<string, ServerFailure>): string {
  return objectText([...failures].map(([server, f]) => [server, JSON.stringify(f)] as const));
}

const EMPTY_KEYS: KeysOfUsers = { devices: [], crossSigning: [], signatures: [] };

export class Keys {
  private readonly store: KeysStore;
  readonly stats: KeyStats = { oneTimeKeysClaimed: 0, fallbackKeysClaimed: 0, claimsUnanswered: 0 };
  /**
   * Query answers by viewer, options and request, valid for one data version of the store: the
   * same question about unchanged data has the same answer (clients and servers repeat queries).
   */
  private readonly answers = new Map<string, Buffer>();
  private answersVersion: number | undefined;
  private answersBytes = 0;
  /** Each user's part of query answers, while the data is unchanged. */
  private readonly userAnswerCache = new UserAnswerCache(USER_ANSWER_BUDGET_BYTES);
  private readonly limits: RequestLimits;
  private readonly now: () => number;

  constructor(private readonly options: KeysOptions) {
    this.store = options.store;
    this.limits = options.limits ?? DEFAULT_REQUEST_LIMITS;
    this.now = options.now ?? Date.now;
  }

  /** Splits the user IDs of a request into ours and other servers'; a malformed ID is a 400. */
  private partition(userIds: Iterable<string>, field: string): { local: string[]; remote: string[] } {
    const local: string[] = [];
    const remote: string[] = [];
    for (const userId of userIds) {
      const parts = parseUserId(userId);
      if (!parts) throw new MatrixError('M_INVALID_PARAM', `${field}: "${userId}" is not a valid user ID`);
      if (parts.serverName === this.options.serverName) local.push(userId);
      else remote.push(userId);
    }
    return { local, remote };
  }

  /** Federation requests may only name our users (Synapse answers 400 otherwise). */
  requireLocalUsers(userIds: readonly string[], field: string): string[] {
    const { local, remote } = this.partition(userIds, field);
    if (remote.length > 0) {
      throw new MatrixError('M_INVALID_PARAM', `${field}: user ${remote[0]} is not hosted on this server (${this.options.serverName})`);
    }
    return local;
  }

  /** Refuses a request naming more than a limit allows, saying which setting it is. */
  private static checkLimit(count: number, limit: number, what: string, setting: string): void {
    if (count > limit) {
      throw new MatrixError('M_INVALID_PARAM', `The request names ${count} ${what}, more than the ${limit} this server answers at once (${setting}); split it into smaller requests`);
    }
  }

  /** Used by the query-answer cache, in bytes (metrics and tests). */
  answerCacheBytes(): number {
    return this.answersBytes;
  }

  /** POST /keys/upload */
  async upload(requester: Requester, body: JsonObject): Promise<{ one_time_key_counts: Record<string, number> }> {
    const { userId, deviceId } = requester;
    const acceptInvalidSelfSignature = this.options.acceptInvalidDeviceSelfSignatures ?? false;
    const deviceKeys =
      body['device_keys'] === undefined || body['device_keys'] === null ? undefined : validateDeviceKeys(body['device_keys'], userId, deviceId, { acceptInvalidSelfSignature });
    const oneTimeKeys = parseKeyMap(body['one_time_keys'], 'one_time_keys');
    const fallbackKeys = parseKeyMap(body['fallback_keys'], 'fallback_keys');
    const fallbackAlgorithms = new Set<string>();
    for (const k of fallbackKeys) {
      if (fallbackAlgorithms.has(k.algorithm)) throw new MatrixError('M_INVALID_PARAM', `fallback_keys: at most one key per algorithm, found several for ${k.algorithm}`);
      fallbackAlgorithms.add(k.algorithm);
    }
    const max = this.options.maxOneTimeKeysPerDevice;

    const counts = await this.store.transaction(async (tx) => {
      if (!(await tx.lockDevice(userId, deviceId))) throw new MatrixError('M_UNKNOWN_TOKEN', 'This device has been deleted; log in again', 401, { soft_logout: false });

      let deviceListChanged = false;
      if (deviceKeys) {
        const existing = await tx.getDeviceKeys(userId, deviceId);
        const json = JSON.stringify(deviceKeys.object);
        if (existing === undefined) {
          await tx.putDeviceKeys(userId, deviceId, json);
          deviceListChanged = true;
        } else {
          const old = JSON.parse(existing) as JsonObject;
          if (canonicalJson(old['keys']) !== canonicalJson(deviceKeys.object['keys'])) {
            throw new MatrixError(
              'M_INVALID_PARAM',
              `device_keys: device ${deviceId} already has different identity keys. Identity keys cannot change; log in as a new device to use new keys`,
            );
          }
          if (canonicalJson(old) !== canonicalJson(deviceKeys.object)) {
            await tx.putDeviceKeys(userId, deviceId, json);
            deviceListChanged = true;
          }
        }
      }

      if (oneTimeKeys.length > 0) {
        const existing = new Map((await tx.findOneTimeKeys(userId, deviceId, oneTimeKeys)).map((k) => [`${k.algorithm}:${k.keyId}`, k]));
        const fresh = oneTimeKeys.filter((k) => {
          const old = existing.get(`${k.algorithm}:${k.keyId}`);
          if (old === undefined) return true;
          if (!sameKeyIgnoringSignatures(JSON.parse(old.json), k.value)) {
            throw new MatrixError('M_INVALID_PARAM', `One-time key ${k.algorithm}:${k.keyId} already exists with a different value; nothing from this upload was stored`);
          }
          return false;
        });
        if (fresh.length > 0) {
          const held = await tx.countOneTimeKeys(userId, deviceId);
          if (held + fresh.length > max) {
            throw new MatrixError(
              'M_INVALID_PARAM',
              `Too many one-time keys: device ${deviceId} holds ${held} and this upload adds ${fresh.length}, but at most ${max} may be stored per device`,
            );
          }
          await tx.addOneTimeKeys(userId, deviceId, fresh.map((k) => ({ algorithm: k.algorithm, keyId: k.keyId, json: k.json })));
        }
      }

      if (fallbackKeys.length > 0) {
        const current = new Map((await tx.getFallbackKeys(userId, deviceId)).map((k) => [k.algorithm, k]));
        for (const k of fallbackKeys) {
          const old = current.get(k.algorithm);
          // Re-uploading the same key keeps its "used" flag; a new key starts unused.
          if (old && old.keyId === k.keyId && sameKeyIgnoringSignatures(JSON.parse(old.json), k.value)) continue;
          await tx.putFallbackKey(userId, deviceId, { algorithm: k.algorithm, keyId: k.keyId, json: k.json, used: false });
        }
      }
      const counts = await tx.oneTimeKeyCounts(userId, deviceId);
      // Last: on PostgreSQL this takes the stream lock, held until the commit.
      if (deviceListChanged) await tx.recordDeviceListChange(userId, deviceId);
      return counts;
    });
    // Some clients (matrix-nio) require signed_curve25519 to be present.
    return { one_time_key_counts: { signed_curve25519: 0, ...counts } };
  }

  /**
   * POST /keys/claim (client) and /user/keys/claim (federation): the response body as JSON text.
   * `localOnly` makes other servers' users a 400 instead of a claim on their servers.
   */
  async claim(body: unknown, localOnly: boolean): Promise<string> {
    const wanted = requireObjectField(body, 'one_time_keys');
    const deadline = this.now() + checkTimeout(body as JsonObject);
    const byUserDevices = new Map<string, [string, string][]>();
    let devices = 0;
    for (const [userId, entries] of Object.entries(wanted)) {
      const list = Object.entries(requireObject(entries, `one_time_keys["${userId}"]`));
      for (const [deviceId, algorithm] of list) {
        if (typeof algorithm !== 'string') throw badJson(`one_time_keys["${userId}"]["${deviceId}"]`, 'an algorithm name (a string)');
      }
      devices += list.length;
      byUserDevices.set(userId, list as [string, string][]);
    }
    Keys.checkLimit(devices, this.limits.claimDevices, 'devices', 'max_key_claim_devices');
    const userIds = [...byUserDevices.keys()];
    const { local, remote } = localOnly ? { local: this.requireLocalUsers(userIds, 'one_time_keys'), remote: [] } : this.partition(userIds, 'one_time_keys');
    const requestsOf = (users: readonly string[]): ClaimRequest[] =>
      users.flatMap((userId) =>
        byUserDevices.get(userId)!.map(([deviceId, algorithm]) => {
          if (!isValidDeviceId(deviceId)) throw new MatrixError('M_INVALID_PARAM', `one_time_keys["${userId}"]: "${deviceId}" is not a valid device ID`);
          if (!isValidKeyPart(algorithm)) throw new MatrixError('M_INVALID_PARAM', `one_time_keys["${userId}"]["${deviceId}"]: "${algorithm}" is not a valid algorithm name`);
          return { userId, deviceId, algorithm };
        }),
      );
    const localRequests = requestsOf(local);
    const remoteRequests = requestsOf(remote);

    const [claimed, fromRemote] = await Promise.all([
      localRequests.length > 0 ? this.store.claimKeys(localRequests) : [],
      this.claimRemote(remoteRequests, deadline),
    ]);
    for (const k of claimed) {
      if (k.fallback) this.stats.fallbackKeysClaimed++;
      else this.stats.oneTimeKeysClaimed++;
    }
    this.stats.claimsUnanswered += localRequests.length - claimed.length;
    const oneTimeKeys = Keys.claimedText([...claimed, ...fromRemote.claimed]);
    return localOnly ? `{"one_time_keys":${oneTimeKeys}}` : `{"one_time_keys":${oneTimeKeys},"failures":${failuresText(fromRemote.failures)}}`;
  }

  private async claimRemote(requests: readonly ClaimRequest[], deadline: number): Promise<{ claimed: ClaimedKey[]; failures: ReadonlyMap<string, ServerFailure> }> {
    if (requests.length === 0) return { claimed: [], failures: new Map() };
    if (this.options.remote) return this.options.remote.claimKeys(requests, deadline);
    return { claimed: [], failures: this.unreachable(requests.map((r) => r.userId)) };
  }

  /** Failures for every server of `userIds`, when this Keys has no way to ask other servers. */
  private unreachable(userIds: readonly string[]): Map<string, ServerFailure> {
    const failure: ServerFailure = { status: 503, message: 'this server is not set up to ask other servers' };
    return new Map(userIds.map((u) => [parseUserId(u)!.serverName, failure]));
  }

  /** `{"user":{"device":{"alg:id":key}}}` of claimed keys. */
  private static claimedText(claimed: readonly ClaimedKey[]): string {
    const byUser = new Map<string, Map<string, string[]>>();
    for (const k of claimed) {
      let devices = byUser.get(k.userId);
      if (!devices) byUser.set(k.userId, (devices = new Map()));
      let keys = devices.get(k.deviceId);
      if (!keys) devices.set(k.deviceId, (keys = []));
      keys.push(`${JSON.stringify(`${k.algorithm}:${k.keyId}`)}:${k.json}`);
    }
    return objectText([...byUser].map(([u, devices]) => [u, objectText([...devices].map(([d, keys]) => [d, `{${keys.join(',')}}`]))] as const));
  }

  /**
   * POST /keys/query (client) and /user/keys/query (federation): the response body, JSON as UTF-8.
   * Keys come back exactly as uploaded, plus `unsigned` and the signatures the viewer may see.
   * Users on other servers (client API only) come from the remote key lookup.
   */
  async query(viewer: Viewer, body: unknown, options: QueryOptions): Promise<Buffer> {
    const wanted = requireObjectField(body, 'device_keys');
    const deadline = this.now() + checkTimeout(body as JsonObject);
    const userIds = Object.keys(wanted);
    let deviceIds = 0;
    for (const [userId, devices] of Object.entries(wanted)) {
      if (!Array.isArray(devices) || devices.some((d) => typeof d !== 'string')) throw badJson(`device_keys["${userId}"]`, 'a list of device IDs');
      deviceIds += devices.length;
    }
    Keys.checkLimit(userIds.length, this.limits.queryUsers, 'users', 'max_key_query_users');
    Keys.checkLimit(deviceIds, this.limits.queryDeviceIds, 'device IDs', 'max_key_query_device_ids');
    const { local, remote } = options.clientApi ? this.partition(userIds, 'device_keys') : { local: this.requireLocalUsers(userIds, 'device_keys'), remote: [] };

    if (remote.length > 0) {
      const fromRemote = this.options.remote
        ? await this.options.remote.queryKeys(new Map(remote.map((u) => [u, wanted[u] as string[]])), deadline)
        : { keys: EMPTY_KEYS, known: [], failures: this.unreachable(remote) };
      if (viewer) await this.store.trackUsers(viewer.userId, [...local, ...fromRemote.known]);
      return this.answerWithRemote(viewer, wanted, local, remote, fromRemote, options);
    }

    const version = this.store.dataVersion();
    const request = JSON.stringify(wanted);
    const answerKey =
      version === undefined || request.length > MAX_KEPT_REQUEST_CHARS ? undefined : `${viewer?.userId ?? ''}\0${Number(options.displayNames)}${Number(options.clientApi)}\0${request}`;
    if (answerKey !== undefined) {
      if (version !== this.answersVersion) {
        this.answers.clear();
        this.answersBytes = 0;
        this.answersVersion = version;
      }
      // Kept only if nothing changed since it was built, after its users were tracked: a hit
      // needs no tracking either.
      const kept = this.answers.get(answerKey);
      if (kept !== undefined) return kept;
    }
    const parts = await this.userAnswers(version, local, options.displayNames);
    // Users without an account here are not tracked (nobody can answer for them); the read
    // above said which have one.
    if (viewer) await this.store.trackUsers(viewer.userId, local.filter((u) => parts.get(u)!.account), true);
    const answer = answerBytes(local, parts, wanted, viewer, options.clientApi, options.clientApi ? ',"failures":{}' : '');
    // Built from data as of `version`; tracking that wrote, or any other change, moved it on.
    if (answerKey !== undefined && this.store.dataVersion() === version && this.answersVersion === version && answer.length <= MAX_KEPT_ANSWER_BYTES) {
      this.keepAnswer(answerKey, answer);
    }
    return answer;
  }

  /** Keeps an answer, dropping the oldest ones while the cache would exceed its budget. */
  private keepAnswer(key: string, answer: Buffer): void {
    const size = key.length + answer.length;
    for (const [oldKey, oldAnswer] of this.answers) {
      if (this.answersBytes + size <= ANSWER_CACHE_BUDGET_BYTES) break;
      this.answers.delete(oldKey);
      this.answersBytes -= oldKey.length + oldAnswer.length;
    }
    this.answers.set(key, answer);
    this.answersBytes += size;
  }

  /**
   * The answer parts of local users: those kept for this data version as they are, the others
   * from one read of the store (reusing a kept part when the keys read are the ones it was built
   * from).
   */
  private async userAnswers(version: number | undefined, users: readonly string[], displayNames: boolean): Promise<Map<string, UserAnswer>> {
    const { found, missing } = this.userAnswerCache.lookup(version, users, displayNames);
    if (missing.length === 0) return found;
    const read = await this.store.keysByUser(missing);
    // Current for `version` only if nothing changed while reading.
    const readAt = version !== undefined && this.store.dataVersion() === version ? version : undefined;
    for (const [u, keys] of read) found.set(u, this.userAnswerCache.partFor(u, keys, displayNames, readAt));
    return found;
  }

  /** A client query naming users of other servers: their keys as fetched, with the signatures our users made on them. */
  private async answerWithRemote(viewer: Viewer, wanted: JsonObject, local: readonly string[], remote: readonly string[], result: RemoteQueryResult, options: QueryOptions): Promise<Buffer> {
    // Remote users whose server answered (or whose list is cached) are listed, with or without devices.
    const known = new Set(result.known);
    const answered = remote.filter((u) => known.has(u) || !result.failures.has(parseUserId(u)!.serverName));
    const parts = await this.userAnswers(this.store.dataVersion(), local, options.displayNames);
    // For remote users the store holds only signatures our users made on their keys.
    const stored = answered.length > 0 ? await this.store.keysByUser(answered) : new Map<string, KeysOfUser>();
    for (const u of answered) {
      const keys: KeysOfUser = {
        account: false,
        devices: result.keys.devices.filter((d) => d.userId === u),
        crossSigning: result.keys.crossSigning.filter((k) => k.userId === u),
        signatures: stored.get(u)?.signatures ?? [],
      };
      parts.set(u, userAnswer(u, keys, options.displayNames));
    }
    return answerBytes([...local, ...answered], parts, wanted, viewer, options.clientApi, `,"failures":${failuresText(result.failures)}`);
  }

  /**
   * GET /_matrix/federation/v1/user/devices/{userId} (user_devices.yaml): the user's devices with
   * keys, their cross-signing keys, and the stream position of their device list: the answer as
   * JSON text, and that position.
   */
  async userDevices(userId: string, displayNames: boolean): Promise<{ body: string; streamId: number }> {
    this.requireLocalUsers([userId], 'userId');
    // The position first: keys read afterwards are at least that new, so a remote server that
    // resumes from this stream_id cannot miss a change.
    const streamId = await this.options.deviceLists.latestStreamIdForUser(userId);
    const { devices, crossSigning, signatures } = await this.store.getKeysOf([userId]);
    const signed = withVisibleSignatures(signatures, null);
    const list = [...devices]
      .sort((a, b) => (a.deviceId < b.deviceId ? -1 : a.deviceId > b.deviceId ? 1 : 0))
      .map((d) => {
        const name = displayNames && d.displayName !== null ? `,"device_display_name":${JSON.stringify(d.displayName)}` : '';
        return `{"device_id":${JSON.stringify(d.deviceId)},"keys":${signed(d.json, userId, d.deviceId)}${name}}`;
      });
    let out = `{"user_id":${JSON.stringify(userId)},"stream_id":${streamId},"devices":[${list.join(',')}]`;
    for (const k of crossSigning) {
      if (k.keyType === 'master') out += `,"master_key":${signed(k.json, userId, k.publicKey)}`;
      if (k.keyType === 'self_signing') out += `,"self_signing_key":${signed(k.json, userId, k.publicKey)}`;
    }
    return { body: `${out}}`, streamId };
  }

  /**
   * What other servers may see of a local user's keys (for outgoing device-list EDUs): each
   * device's keys and the master and self-signing keys, as JSON text with only the signatures
   * everyone may see (the owner's own; e2e spec, "Key and signature security").
   */
  async federationKeysOf(userId: string): Promise<{ devices: Map<string, string>; masterKey: string | undefined; selfSigningKey: string | undefined }> {
    const { devices, crossSigning, signatures } = await this.store.getKeysOf([userId]);
    const signed = withVisibleSignatures(signatures, null);
    const key = (type: StoredCrossSigningKey['keyType']) => {
      const k = crossSigning.find((c) => c.keyType === type);
      return k && signed(k.json, userId, k.publicKey);
    };
    return {
      devices: new Map(devices.map((d) => [d.deviceId, signed(d.json, userId, d.deviceId)])),
      masterKey: key('master'),
      selfSigningKey: key('self_signing'),
    };
  }

  /** GET /keys/changes: users the viewer follows whose keys changed between two tokens. */
  async changes(viewer: string, from: string, to: string | undefined): Promise<{ changed: string[]; left: string[] }> {
    const fromPos = parseStreamToken(from, 'from');
    const toPos = to === undefined ? await this.options.deviceLists.currentStreamId() : parseStreamToken(to, 'to');
    return this.changesBetween(viewer, fromPos, toPos);
  }

  /**
   * `changed` and `left` between two stream positions, as `viewer` may see them. With no rooms,
   * a user leaves the viewer's view only by being deactivated: from then on they are in `left`.
   */
  async changesBetween(viewer: string, fromPos: number, toPos: number): Promise<{ changed: string[]; left: string[] }> {
    const users = toPos > fromPos ? await this.store.changedUsers(viewer, fromPos, toPos) : [];
    const local = users.filter((u) => isLocalUser(u, this.options.serverName));
    const gone = new Set(local.length > 0 ? await this.store.deactivatedUsers(local) : []);
    return { changed: users.filter((u) => !gone.has(u)), left: users.filter((u) => gone.has(u)) };
  }

  /** The `device_one_time_keys_count` and `device_unused_fallback_key_types` of /sync. */
  async deviceKeyCounts(requester: Requester): Promise<{ device_one_time_keys_count: Record<string, number>; device_unused_fallback_key_types: string[] }> {
    const [counts, fallback] = await Promise.all([
      this.store.oneTimeKeyCounts(requester.userId, requester.deviceId),
      this.store.unusedFallbackKeyTypes(requester.userId, requester.deviceId),
    ]);
    return { device_one_time_keys_count: { signed_curve25519: 0, ...counts }, device_unused_fallback_key_types: fallback };
  }

  /** Whether a device ID would collide with one of the user's cross-signing public keys. */
  isReservedDeviceId(userId: string, deviceId: string): Promise<boolean> {
    return this.store.isCrossSigningPublicKey(userId, deviceId);
  }
}
