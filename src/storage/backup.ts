/**
 * BackupStore: server-side key backups, the `e2e_room_keys_versions` and `e2e_room_keys` tables
 * (Synapse's names). One SQL text for both backends. Every statement names the user, so one
 * user's backups are never read or changed on another's behalf.
 *
 * A version row keeps the count of its keys, their bytes of `session_data` and its etag, updated in
 * the same transaction as the keys, so answering `count` or checking a user's budget never counts
 * rows.
 *
 * Deleting a version only marks it deleted (one row: the version and its keys are invisible at
 * once); its keys stay in the table until purgeDeletedKeys removes them a batch per transaction,
 * so deleting a million keys never holds the database (on SQLite, the whole process) for long.
 * Once its keys are gone the version row is dropped, except the user's newest one: version numbers
 * are never reused, and the next number is one more than the newest row.
 */
import { valuesList, type Dialect, type Queryable, type SqlDatabase, type SqlValue } from './sql.js';
import type { BackupStore, BackupTransaction, BackupUsage, RoomKeyMetadata, RoomKeyScope, StoredBackupVersion, StoredRoomKey, StoredRoomKeyMetadata } from './store.js';

/** Rows per multi-row statement (9 parameters each): well below both databases' limits. */
const CHUNK = 500;
/** Serialises backup writes per user on PostgreSQL: pg_advisory_xact_lock(BACKUP_LOCK, hashtext(user)). */
const BACKUP_LOCK = 7352833;

interface VersionRow {
  version: number;
  algorithm: string;
  auth_data: string;
  etag: number;
  key_count: number;
}

interface KeyRow {
  room_id: string;
  session_id: string;
  first_message_index: number;
  forwarded_count: number;
  is_verified: number | boolean;
  session_data: string;
  bytes: number;
}

const VERSION_COLUMNS = 'version, algorithm, auth_data, etag, key_count';

/** The size of a key's `session_data` in bytes (UTF-8), as Buffer.byteLength counts it. */
const sessionDataBytes = (dialect: Dialect, table = ''): string =>
  dialect === 'postgres' ? `octet_length(${table}session_data)` : `length(CAST(${table}session_data AS BLOB))`;

const toVersion = (r: VersionRow): StoredBackupVersion => ({ version: r.version, algorithm: r.algorithm, authData: r.auth_data, etag: r.etag, count: r.key_count });

const toMetadata = (r: Omit<KeyRow, 'session_data' | 'bytes'>): RoomKeyMetadata => ({
  roomId: r.room_id,
  sessionId: r.session_id,
  firstMessageIndex: r.first_message_index,
  forwardedCount: r.forwarded_count,
  isVerified: Boolean(r.is_verified),
});

/** ` AND room_id = ? AND session_id = ?` for a scope, with its parameters. */
function scopeFilter(scope: RoomKeyScope): { sql: string; params: SqlValue[] } {
  if (scope.roomId === undefined) return { sql: '', params: [] };
  if (scope.sessionId === undefined) return { sql: ' AND room_id = ?', params: [scope.roomId] };
  return { sql: ' AND room_id = ? AND session_id = ?', params: [scope.roomId, scope.sessionId] };
}

async function readVersion(q: Queryable, userId: string, version: number | 'current'): Promise<StoredBackupVersion | undefined> {
  const row =
    version === 'current'
      ? await q.get<VersionRow>(`SELECT ${VERSION_COLUMNS} FROM e2e_room_keys_versions WHERE user_id = ? AND deleted = ? ORDER BY version DESC LIMIT 1`, [userId, false])
      : await q.get<VersionRow>(`SELECT ${VERSION_COLUMNS} FROM e2e_room_keys_versions WHERE user_id = ? AND version = ? AND deleted = ?`, [userId, version, false]);
  return row && toVersion(row);
}

class SqlBackupTransaction implements BackupTransaction {
  constructor(
    private readonly tx: Queryable,
    private readonly userId: string,
    private readonly now: number,
  ) {}

  currentVersion(): Promise<StoredBackupVersion | undefined> {
    return readVersion(this.tx, this.userId, 'current');
  }

  getVersion(version: number): Promise<StoredBackupVersion | undefined> {
    return readVersion(this.tx, this.userId, version);
  }

  async versionExists(version: number): Promise<boolean> {
    // Numbers go 1, 2, 3, … without gaps, so every number up to the newest was once a version
    // (the rows of old deleted versions are dropped once their keys are purged).
    const row = await this.tx.get<{ v: number | null }>('SELECT MAX(version) AS v FROM e2e_room_keys_versions WHERE user_id = ?', [this.userId]);
    return version >= 1 && version <= Number(row?.v ?? 0);
  }

  async createVersion(algorithm: string, authData: string): Promise<number> {
    const row = await this.tx.get<{ v: number }>('SELECT COALESCE(MAX(version), 0) + 1 AS v FROM e2e_room_keys_versions WHERE user_id = ?', [this.userId]);
    const version = Number(row!.v);
    await this.tx.run('INSERT INTO e2e_room_keys_versions (user_id, version, algorithm, auth_data, created_ts) VALUES (?, ?, ?, ?, ?)', [
      this.userId,
      version,
      algorithm,
      authData,
      this.now,
    ]);
    // A deleted version that was the newest kept its row for its number; the new one takes over.
    await this.tx.run('DELETE FROM e2e_room_keys_versions WHERE user_id = ? AND version < ? AND deleted = ? AND key_count = 0', [this.userId, version, true]);
    return version;
  }

  async setAuthData(version: number, authData: string): Promise<void> {
    await this.tx.run('UPDATE e2e_room_keys_versions SET auth_data = ? WHERE user_id = ? AND version = ?', [authData, this.userId, version]);
  }

  async deleteVersion(version: number): Promise<void> {
    await this.tx.run('UPDATE e2e_room_keys_versions SET deleted = ? WHERE user_id = ? AND version = ?', [true, this.userId, version]);
    // Without keys to purge, the row is not needed unless it holds the newest number.
    await this.tx.run(
      'DELETE FROM e2e_room_keys_versions WHERE user_id = ? AND version = ? AND key_count = 0 AND version < (SELECT MAX(version) FROM e2e_room_keys_versions WHERE user_id = ?)',
      [this.userId, version, this.userId],
    );
  }

  async getRoomKeyMetadata(version: number, ids: readonly { roomId: string; sessionId: string }[]): Promise<StoredRoomKeyMetadata[]> {
    const out: StoredRoomKeyMetadata[] = [];
    for (let i = 0; i < ids.length; i += CHUNK) {
      const part = ids.slice(i, i + CHUNK);
      const pairs = part.flatMap((k) => [k.roomId, k.sessionId]);
      // PostgreSQL: one primary-key probe per session (LATERAL). With IN (VALUES …) it may scan the
      // whole version once per session when its statistics predate a bulk upload (seconds for 10⁴ keys).
      const rows =
        this.tx.dialect === 'postgres'
          ? await this.tx.all<Omit<KeyRow, 'session_data'>>(
              `SELECT k.room_id, k.session_id, k.first_message_index, k.forwarded_count, k.is_verified, ${sessionDataBytes('postgres', 'k.')} AS bytes
               FROM (VALUES ${valuesList(part.length, 2).replace('(?, ?)', '(?::text, ?::text)')}) AS v (room_id, session_id)
               CROSS JOIN LATERAL (SELECT * FROM e2e_room_keys r
                 WHERE r.user_id = ? AND r.version = ? AND r.room_id = v.room_id AND r.session_id = v.session_id) k`,
              [...pairs, this.userId, version],
            )
          : await this.tx.all<Omit<KeyRow, 'session_data'>>(
              `SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, ${sessionDataBytes('sqlite')} AS bytes FROM e2e_room_keys
               WHERE user_id = ? AND version = ? AND (room_id, session_id) IN (VALUES ${valuesList(part.length, 2)})`,
              [this.userId, version, ...pairs],
            );
      for (const r of rows) out.push({ ...toMetadata(r), bytes: Number(r.bytes) });
    }
    return out;
  }

  async putRoomKeys(version: number, keys: readonly StoredRoomKey[], added: number, addedBytes: number): Promise<void> {
    if (keys.length === 0) return;
    for (let i = 0; i < keys.length; i += CHUNK) {
      const part = keys.slice(i, i + CHUNK);
      const params: SqlValue[] = [];
      for (const k of part) params.push(this.userId, version, k.roomId, k.sessionId, k.firstMessageIndex, k.forwardedCount, k.isVerified, k.sessionData, this.now);
      await this.tx.run(
        `INSERT INTO e2e_room_keys (user_id, version, room_id, session_id, first_message_index, forwarded_count, is_verified, session_data, ts)
         VALUES ${valuesList(part.length, 9)}
         ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET
           first_message_index = excluded.first_message_index, forwarded_count = excluded.forwarded_count,
           is_verified = excluded.is_verified, session_data = excluded.session_data, ts = excluded.ts`,
        params,
      );
    }
    await this.tx.run('UPDATE e2e_room_keys_versions SET etag = etag + 1, key_count = key_count + ?, key_bytes = key_bytes + ? WHERE user_id = ? AND version = ?', [
      added,
      addedBytes,
      this.userId,
      version,
    ]);
  }

  async deleteRoomKeys(version: number, scope: RoomKeyScope): Promise<number> {
    const filter = scopeFilter(scope);
    const where = `WHERE user_id = ? AND version = ?${filter.sql}`;
    const params = [this.userId, version, ...filter.params];
    const found = await this.tx.get<{ n: number; bytes: number }>(`SELECT COUNT(*) AS n, COALESCE(SUM(${sessionDataBytes(this.tx.dialect)}), 0) AS bytes FROM e2e_room_keys ${where}`, params);
    const n = Number(found?.n ?? 0);
    if (n === 0) return 0;
    await this.tx.run(`DELETE FROM e2e_room_keys ${where}`, params);
    await this.tx.run('UPDATE e2e_room_keys_versions SET etag = etag + 1, key_count = key_count - ?, key_bytes = key_bytes - ? WHERE user_id = ? AND version = ?', [
      n,
      Number(found!.bytes),
      this.userId,
      version,
    ]);
    return n;
  }

  async usage(): Promise<BackupUsage> {
    const row = await this.tx.get<{ versions: number; sessions: number | null; bytes: number | null }>(
      'SELECT COUNT(*) AS versions, SUM(key_count) AS sessions, SUM(key_bytes) AS bytes FROM e2e_room_keys_versions WHERE user_id = ? AND deleted = ?',
      [this.userId, false],
    );
    return { versions: Number(row?.versions ?? 0), sessions: Number(row?.sessions ?? 0), bytes: Number(row?.bytes ?? 0) };
  }
}

export class SqlBackupStore implements BackupStore {
  constructor(private readonly db: SqlDatabase) {}

  transaction<T>(userId: string, fn: (tx: BackupTransaction) => Promise<T>): Promise<T> {
    return this.locked(userId, (tx) => fn(new SqlBackupTransaction(tx, userId, Date.now())));
  }

  /** A transaction in which nobody else changes `userId`'s backups. */
  private locked<T>(userId: string, fn: (tx: Queryable) => Promise<T>): Promise<T> {
    return this.db.transaction(async (tx) => {
      // SQLite's BEGIN IMMEDIATE already keeps every other writer out.
      if (tx.dialect === 'postgres') await tx.get('SELECT pg_advisory_xact_lock(?, hashtext(?))', [BACKUP_LOCK, userId]);
      return fn(tx);
    });
  }

  getVersion(userId: string, version: number | 'current'): Promise<StoredBackupVersion | undefined> {
    return readVersion(this.db, userId, version);
  }

  async getRoomKeys(userId: string, version: number, scope: RoomKeyScope, limit: number, after?: { roomId: string; sessionId: string }): Promise<StoredRoomKey[]> {
    const filter = scopeFilter(scope);
    const page = after ? { sql: ' AND (room_id, session_id) > (?, ?)', params: [after.roomId, after.sessionId] } : { sql: '', params: [] };
    // Keys of a deleted version wait in the table for purgeDeletedKeys, but nobody sees them.
    const rows = await this.db.all<KeyRow>(
      `SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data FROM e2e_room_keys
       WHERE user_id = ? AND version = ?${filter.sql}${page.sql}
         AND EXISTS (SELECT 1 FROM e2e_room_keys_versions v WHERE v.user_id = ? AND v.version = ? AND v.deleted = ?)
       ORDER BY room_id, session_id LIMIT ?`,
      [userId, version, ...filter.params, ...page.params, userId, version, false, limit],
    );
    return rows.map((r) => ({ ...toMetadata(r), sessionData: r.session_data }));
  }

  async deletedVersionsWithKeys(limit: number): Promise<{ userId: string; version: number }[]> {
    const rows = await this.db.all<{ user_id: string; version: number }>(
      'SELECT user_id, version FROM e2e_room_keys_versions WHERE deleted = ? AND key_count > 0 ORDER BY user_id, version LIMIT ?',
      [true, limit],
    );
    return rows.map((r) => ({ userId: r.user_id, version: Number(r.version) }));
  }

  purgeDeletedKeys(userId: string, version: number, limit: number): Promise<number> {
    return this.locked(userId, async (tx) => {
      const v = await tx.get<{ deleted: number | boolean }>('SELECT deleted FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?', [userId, version]);
      if (!v || !v.deleted) return 0;
      const gone = await tx.all<{ bytes: number }>(
        `DELETE FROM e2e_room_keys WHERE user_id = ? AND version = ? AND (room_id, session_id) IN
           (SELECT room_id, session_id FROM e2e_room_keys WHERE user_id = ? AND version = ? LIMIT ?)
         RETURNING ${sessionDataBytes(tx.dialect)} AS bytes`,
        [userId, version, userId, version, limit],
      );
      if (gone.length === limit) {
        const bytes = gone.reduce((sum, r) => sum + Number(r.bytes), 0);
        await tx.run('UPDATE e2e_room_keys_versions SET key_count = key_count - ?, key_bytes = key_bytes - ? WHERE user_id = ? AND version = ?', [gone.length, bytes, userId, version]);
      } else {
        // All gone (the counts say so too, whatever they said before). The row goes as well,
        // unless it is the newest (the next version's number follows it) of a user not deactivated.
        await tx.run('UPDATE e2e_room_keys_versions SET key_count = 0, key_bytes = 0 WHERE user_id = ? AND version = ?', [userId, version]);
        await tx.run(
          `DELETE FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?
             AND (version < (SELECT MAX(version) FROM e2e_room_keys_versions WHERE user_id = ?)
                  OR EXISTS (SELECT 1 FROM users WHERE user_id = ? AND deactivated = ?))`,
          [userId, version, userId, userId, true],
        );
      }
      return gone.length;
    });
  }
}
