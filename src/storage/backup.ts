/**
 * BackupStore: server-side key backups, the `e2e_room_keys_versions` and `e2e_room_keys` tables
 * (Synapse's names). One SQL text for both backends. Every statement names the user, so one
 * user's backups are never read or changed on another's behalf.
 *
 * A version row keeps the count of its keys and its etag, updated in the same transaction as the
 * keys, so answering `count` never counts rows.
 */
import { valuesList, type Queryable, type SqlDatabase, type SqlValue } from './sql.js';
import type { BackupStore, BackupTransaction, RoomKeyMetadata, RoomKeyScope, StoredBackupVersion, StoredRoomKey } from './store.js';

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
}

const VERSION_COLUMNS = 'version, algorithm, auth_data, etag, key_count';

const toVersion = (r: VersionRow): StoredBackupVersion => ({ version: r.version, algorithm: r.algorithm, authData: r.auth_data, etag: r.etag, count: r.key_count });

const toMetadata = (r: Omit<KeyRow, 'session_data'>): RoomKeyMetadata => ({
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
    return (await this.tx.get('SELECT 1 AS x FROM e2e_room_keys_versions WHERE user_id = ? AND version = ?', [this.userId, version])) !== undefined;
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
    return version;
  }

  async setAuthData(version: number, authData: string): Promise<void> {
    await this.tx.run('UPDATE e2e_room_keys_versions SET auth_data = ? WHERE user_id = ? AND version = ?', [authData, this.userId, version]);
  }

  async deleteVersion(version: number): Promise<void> {
    await this.tx.run('DELETE FROM e2e_room_keys WHERE user_id = ? AND version = ?', [this.userId, version]);
    await this.tx.run('UPDATE e2e_room_keys_versions SET deleted = ?, key_count = 0 WHERE user_id = ? AND version = ?', [true, this.userId, version]);
  }

  async getRoomKeyMetadata(version: number, ids: readonly { roomId: string; sessionId: string }[]): Promise<RoomKeyMetadata[]> {
    const out: RoomKeyMetadata[] = [];
    for (let i = 0; i < ids.length; i += CHUNK) {
      const part = ids.slice(i, i + CHUNK);
      const pairs = part.flatMap((k) => [k.roomId, k.sessionId]);
      // PostgreSQL: one primary-key probe per session (LATERAL). With IN (VALUES …) it may scan the
      // whole version once per session when its statistics predate a bulk upload (seconds for 10⁴ keys).
      const rows =
        this.tx.dialect === 'postgres'
          ? await this.tx.all<Omit<KeyRow, 'session_data'>>(
              `SELECT k.room_id, k.session_id, k.first_message_index, k.forwarded_count, k.is_verified
               FROM (VALUES ${valuesList(part.length, 2).replace('(?, ?)', '(?::text, ?::text)')}) AS v (room_id, session_id)
               CROSS JOIN LATERAL (SELECT * FROM e2e_room_keys r
                 WHERE r.user_id = ? AND r.version = ? AND r.room_id = v.room_id AND r.session_id = v.session_id) k`,
              [...pairs, this.userId, version],
            )
          : await this.tx.all<Omit<KeyRow, 'session_data'>>(
              `SELECT room_id, session_id, first_message_index, forwarded_count, is_verified FROM e2e_room_keys
               WHERE user_id = ? AND version = ? AND (room_id, session_id) IN (VALUES ${valuesList(part.length, 2)})`,
              [this.userId, version, ...pairs],
            );
      for (const r of rows) out.push(toMetadata(r));
    }
    return out;
  }

  async putRoomKeys(version: number, keys: readonly StoredRoomKey[], added: number): Promise<void> {
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
    await this.tx.run('UPDATE e2e_room_keys_versions SET etag = etag + 1, key_count = key_count + ? WHERE user_id = ? AND version = ?', [added, this.userId, version]);
  }

  async deleteRoomKeys(version: number, scope: RoomKeyScope): Promise<number> {
    const filter = scopeFilter(scope);
    const deleted = await this.tx.run(`DELETE FROM e2e_room_keys WHERE user_id = ? AND version = ?${filter.sql}`, [this.userId, version, ...filter.params]);
    if (deleted > 0) {
      await this.tx.run('UPDATE e2e_room_keys_versions SET etag = etag + 1, key_count = key_count - ? WHERE user_id = ? AND version = ?', [deleted, this.userId, version]);
    }
    return deleted;
  }

  async countAllRoomKeys(): Promise<number> {
    const row = await this.tx.get<{ n: number | null }>('SELECT SUM(key_count) AS n FROM e2e_room_keys_versions WHERE user_id = ? AND deleted = ?', [this.userId, false]);
    return Number(row?.n ?? 0);
  }
}

export class SqlBackupStore implements BackupStore {
  constructor(private readonly db: SqlDatabase) {}

  transaction<T>(userId: string, fn: (tx: BackupTransaction) => Promise<T>): Promise<T> {
    return this.db.transaction(async (tx) => {
      // SQLite's BEGIN IMMEDIATE already keeps every other writer out.
      if (tx.dialect === 'postgres') await tx.get('SELECT pg_advisory_xact_lock(?, hashtext(?))', [BACKUP_LOCK, userId]);
      return fn(new SqlBackupTransaction(tx, userId, Date.now()));
    });
  }

  getVersion(userId: string, version: number | 'current'): Promise<StoredBackupVersion | undefined> {
    return readVersion(this.db, userId, version);
  }

  async getRoomKeys(userId: string, version: number, scope: RoomKeyScope, limit: number, after?: { roomId: string; sessionId: string }): Promise<StoredRoomKey[]> {
    const filter = scopeFilter(scope);
    const page = after ? { sql: ' AND (room_id, session_id) > (?, ?)', params: [after.roomId, after.sessionId] } : { sql: '', params: [] };
    const rows = await this.db.all<KeyRow>(
      `SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data FROM e2e_room_keys
       WHERE user_id = ? AND version = ?${filter.sql}${page.sql}
       ORDER BY room_id, session_id LIMIT ?`,
      [userId, version, ...filter.params, ...page.params, limit],
    );
    return rows.map((r) => ({ ...toMetadata(r), sessionData: r.session_data }));
  }
}
