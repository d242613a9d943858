/**
 * Server-side key backups (e2e spec, "Server-side key backups"; key_backup.yaml): a user's backup
 * versions, each with its `algorithm` and `auth_data`, and the encrypted Megolm session keys
 * stored in them. The newest version that is not deleted is the current one; keys are written
 * only to it, and a stored key is replaced only by a better one. Uses the BackupStore only; no
 * HTTP, no driver. The encrypted data is opaque here and comes back as it was uploaded.
 */
import { MatrixError } from '../matrix/errors.js';
import type { BackupStore, RoomKeyMetadata, RoomKeyScope, StoredBackupVersion, StoredRoomKey, StoredRoomKeyMetadata } from '../storage/store.js';
import { parseRoomKeys, parseVersionBody } from './validate.js';

export interface KeyBackupOptions {
  readonly store: BackupStore;
  /** Most sessions one PUT /room_keys/keys request may carry. */
  readonly maxSessionsPerRequest: number;
  /** Most sessions all of a user's backup versions may hold together. */
  readonly maxSessionsPerUser: number;
  /** Most bytes of `session_data` all of a user's backup versions may hold together. */
  readonly maxBytesPerUser: number;
  /** Most backup versions (not deleted) a user may have. */
  readonly maxVersionsPerUser: number;
  /** Called after a version was deleted: its keys wait to be purged (BackupPurger). */
  readonly onVersionDeleted?: () => void;
}

/** The answer to a change of keys (RoomKeysUpdateResponse). */
export interface RoomKeysUpdate {
  readonly etag: string;
  readonly count: number;
}

/** Keys read per statement when answering a GET of many keys. */
const PAGE = 1000;

/**
 * e2e spec: an uploaded key replaces a stored one if it is verified and the stored one is not;
 * with equal `is_verified`, if its `first_message_index` is lower; with both equal, if its
 * `forwarded_count` is lower. (Synapse compares the three one after another without the
 * "equal" conditions, so an unverified key can replace a verified one there; we follow the spec.)
 */
export function isBetterRoomKey(candidate: RoomKeyMetadata, stored: RoomKeyMetadata): boolean {
  if (candidate.isVerified !== stored.isVerified) return candidate.isVerified;
  if (candidate.firstMessageIndex !== stored.firstMessageIndex) return candidate.firstMessageIndex < stored.firstMessageIndex;
  return candidate.forwardedCount < stored.forwardedCount;
}

/** Backup versions are decimal numbers to us; anything else names no version. */
function versionNumber(version: string): number | undefined {
  return /^[0-9]{1,15}$/.test(version) ? Number(version) : undefined;
}

function unknownVersion(version: string): MatrixError {
  return new MatrixError('M_NOT_FOUND', `Unknown backup version "${version.slice(0, 40)}"; GET /room_keys/version gives the current one`);
}

function requireVersionParam(version: string | undefined): string {
  if (version === undefined) throw new MatrixError('M_MISSING_PARAM', 'The "version" query parameter is required: the backup version, as GET /room_keys/version gives it');
  return version;
}

/** The KeyBackupData JSON of a stored key. */
function keyText(k: StoredRoomKey): string {
  return `{"first_message_index":${k.firstMessageIndex},"forwarded_count":${k.forwardedCount},"is_verified":${k.isVerified},"session_data":${k.sessionData}}`;
}

function versionText(v: StoredBackupVersion): string {
  return `{"algorithm":${JSON.stringify(v.algorithm)},"auth_data":${v.authData},"count":${v.count},"etag":"${v.etag}","version":"${v.version}"}`;
}

const update = (v: StoredBackupVersion): RoomKeysUpdate => ({ etag: String(v.etag), count: v.count });

export class KeyBackup {
  private readonly store: BackupStore;

  constructor(private readonly options: KeyBackupOptions) {
    this.store = options.store;
  }

  /** POST /room_keys/version: a new version, which becomes the current one. */
  async createVersion(userId: string, body: unknown): Promise<{ version: string }> {
    const { algorithm, authData } = parseVersionBody(body);
    const max = this.options.maxVersionsPerUser;
    const version = await this.store.transaction(userId, async (tx) => {
      if ((await tx.usage()).versions >= max) {
        throw new MatrixError(
          'M_FORBIDDEN',
          `You already have ${max} backup versions, the most this server keeps per user (key_backup.max_versions_per_user); delete one you no longer use with DELETE /room_keys/version/{version}`,
        );
      }
      return tx.createVersion(algorithm, authData);
    });
    return { version: String(version) };
  }

  /** GET /room_keys/version[/{version}]: the version's algorithm, auth_data, count and etag, as JSON text. */
  async getVersion(userId: string, version: string | undefined): Promise<string> {
    if (version === undefined) {
      const current = await this.store.getVersion(userId, 'current');
      if (!current) throw new MatrixError('M_NOT_FOUND', 'No current backup version; create one with POST /room_keys/version');
      return versionText(current);
    }
    const n = versionNumber(version);
    const found = n === undefined ? undefined : await this.store.getVersion(userId, n);
    if (!found) throw unknownVersion(version);
    return versionText(found);
  }

  /** PUT /room_keys/version/{version}: replaces `auth_data`; nothing else may change. */
  async updateVersion(userId: string, version: string, body: unknown): Promise<void> {
    const parsed = parseVersionBody(body);
    if (parsed.version !== undefined && parsed.version !== version) {
      throw new MatrixError('M_INVALID_PARAM', `"version" in the body (${parsed.version.slice(0, 40)}) does not match the version in the path (${version.slice(0, 40)})`);
    }
    const n = versionNumber(version);
    await this.store.transaction(userId, async (tx) => {
      const found = n === undefined ? undefined : await tx.getVersion(n);
      if (!found) throw unknownVersion(version);
      if (found.algorithm !== parsed.algorithm) {
        throw new MatrixError('M_INVALID_PARAM', `"algorithm" does not match the backup's algorithm (${found.algorithm}); only auth_data can change, create a new version for another algorithm`);
      }
      await tx.setAuthData(found.version, parsed.authData);
    });
  }

  /**
   * DELETE /room_keys/version/{version}: the version and its keys. Deleting a version deleted
   * before succeeds, as the spec asks; Synapse does the same, and 404s only versions that never were.
   * The version and its keys are gone for the client when this returns; the rows of the keys are
   * removed afterwards in the background, a batch at a time (BackupPurger).
   */
  async deleteVersion(userId: string, version: string): Promise<void> {
    const n = versionNumber(version);
    await this.store.transaction(userId, async (tx) => {
      if (n === undefined || !(await tx.versionExists(n))) throw unknownVersion(version);
      await tx.deleteVersion(n);
    });
    this.options.onVersionDeleted?.();
  }

  /**
   * PUT /room_keys/keys[/{roomId}[/{sessionId}]]?version=: stores the keys in the current version.
   * Each key is added, or replaces the stored key of its session if it is better; all in one
   * transaction, or nothing when the request is refused.
   */
  async putKeys(userId: string, versionParam: string | undefined, scope: RoomKeyScope, body: unknown): Promise<RoomKeysUpdate> {
    const version = requireVersionParam(versionParam);
    const keys = parseRoomKeys(body, scope);
    if (keys.length > this.options.maxSessionsPerRequest) {
      throw new MatrixError('M_TOO_LARGE', `This request carries ${keys.length} sessions; at most ${this.options.maxSessionsPerRequest} are accepted per request, send them in several requests`, 413);
    }
    const n = versionNumber(version);
    return this.store.transaction(userId, async (tx) => {
      const current = await tx.currentVersion();
      if (current === undefined || current.version !== n) {
        // Synapse: 404 for a version that does not exist (or was deleted), 403 for an older one.
        if (current === undefined || n === undefined || !(await tx.getVersion(n))) throw unknownVersion(version);
        throw new MatrixError('M_WRONG_ROOM_KEYS_VERSION', `Backup version ${version} is not the current one; keys can only be stored in the current version, ${current.version}`, 403, {
          current_version: String(current.version),
        });
      }
      const stored = new Map<string, StoredRoomKeyMetadata>();
      for (const k of await tx.getRoomKeyMetadata(current.version, keys)) stored.set(`${k.roomId}\0${k.sessionId}`, k);
      const writes: StoredRoomKey[] = [];
      let added = 0;
      let addedBytes = 0;
      for (const k of keys) {
        const old = stored.get(`${k.roomId}\0${k.sessionId}`);
        if (old === undefined) added++;
        if (old === undefined || isBetterRoomKey(k, old)) {
          writes.push(k);
          addedBytes += Buffer.byteLength(k.sessionData) - (old?.bytes ?? 0);
        }
      }
      if (added > 0 || addedBytes > 0) {
        const usage = await tx.usage();
        const { maxSessionsPerUser, maxBytesPerUser } = this.options;
        if (usage.sessions + added > maxSessionsPerUser) {
          throw new MatrixError(
            'M_TOO_LARGE',
            `Your key backups hold ${usage.sessions} sessions; this request would add ${added}, more than the ${maxSessionsPerUser} this server keeps per user. Delete old backup versions, or ask the server's administrator`,
            413,
          );
        }
        if (addedBytes > 0 && usage.bytes + addedBytes > maxBytesPerUser) {
          throw new MatrixError(
            'M_TOO_LARGE',
            `Your key backups hold ${usage.bytes} bytes of session data; this request would add ${addedBytes}, more than the ${maxBytesPerUser} this server keeps per user. Delete old backup versions, or ask the server's administrator`,
            413,
          );
        }
      }
      if (writes.length === 0) return update(current);
      await tx.putRoomKeys(current.version, writes, added, addedBytes);
      return update((await tx.getVersion(current.version))!);
    });
  }

  /**
   * GET /room_keys/keys[/{roomId}[/{sessionId}]]?version=: the stored keys of any version that is
   * not deleted, as JSON text; a large answer as a sequence of pieces, read a page at a time.
   * Like Synapse: a room without keys is `{"sessions": {}}`, a missing session is 404.
   */
  async getKeys(userId: string, versionParam: string | undefined, scope: RoomKeyScope): Promise<string | AsyncIterable<string>> {
    const version = requireVersionParam(versionParam);
    const n = versionNumber(version);
    if (n === undefined || !(await this.store.getVersion(userId, n))) throw unknownVersion(version);
    const first = await this.store.getRoomKeys(userId, n, scope, PAGE);
    if (scope.sessionId !== undefined) {
      if (first.length === 0) throw new MatrixError('M_NOT_FOUND', `No key for session ${scope.sessionId.slice(0, 80)} of room ${scope.roomId?.slice(0, 80)} in backup version ${version}`);
      return keyText(first[0]!);
    }
    const pieces = this.keyPages(userId, n, scope, first);
    if (first.length < PAGE) {
      let text = '';
      for await (const piece of pieces) text += piece;
      return text;
    }
    return pieces;
  }

  /** `{"rooms": {…}}` (or `{"sessions": {…}}` for one room) from `first` and the pages after it. */
  private async *keyPages(userId: string, version: number, scope: RoomKeyScope, first: StoredRoomKey[]): AsyncGenerator<string> {
    const oneRoom = scope.roomId !== undefined;
    /** The room whose `sessions` object is open (all rooms), and whether it has a member yet. */
    let room: string | undefined;
    let comma = false;
    let page = first;
    yield oneRoom ? '{"sessions":{' : '{"rooms":{';
    for (;;) {
      let out = '';
      for (const k of page) {
        if (!oneRoom && k.roomId !== room) {
          out += `${room === undefined ? '' : '}},'}${JSON.stringify(k.roomId)}:{"sessions":{`;
          room = k.roomId;
          comma = false;
        }
        out += `${comma ? ',' : ''}${JSON.stringify(k.sessionId)}:${keyText(k)}`;
        comma = true;
      }
      if (out !== '') yield out;
      const last = page[page.length - 1];
      if (page.length < PAGE || last === undefined) break;
      page = await this.store.getRoomKeys(userId, version, scope, PAGE, last);
    }
    yield !oneRoom && room !== undefined ? '}}}}' : '}}';
  }

  /** DELETE /room_keys/keys[/{roomId}[/{sessionId}]]?version=: from any version that is not deleted (as Synapse). */
  async deleteKeys(userId: string, versionParam: string | undefined, scope: RoomKeyScope): Promise<RoomKeysUpdate> {
    const version = requireVersionParam(versionParam);
    const n = versionNumber(version);
    return this.store.transaction(userId, async (tx) => {
      const found = n === undefined ? undefined : await tx.getVersion(n);
      if (!found) throw unknownVersion(version);
      if ((await tx.deleteRoomKeys(found.version, scope)) === 0) return update(found);
      return update((await tx.getVersion(found.version))!);
    });
  }
}
