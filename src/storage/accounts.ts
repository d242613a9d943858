/** AccountsStore on the driver-neutral SQL surface (same SQL on both backends). */
import { placeholders, type Queryable, type SqlDatabase } from './sql.js';
import { readCacheFor, type ReadCache } from './read-cache.js';
import type { AccountsStore, LoginOptions, LoginOutcome, NewSession, StoredDevice, StoredUser, UiaSession, UserAccount, UserListQuery } from './store.js';
import type { DeviceListWriter } from './device-lists.js';

interface UserRow {
  user_id: string;
  password_hash: string | null;
  admin: number | boolean;
  deactivated: number | boolean;
}

interface AccountRow {
  user_id: string;
  admin: number | boolean;
  deactivated: number | boolean;
  created_ts: number;
  last_seen_ts: number | null;
}

const toAccount = (r: AccountRow): UserAccount => ({
  userId: r.user_id,
  admin: Boolean(r.admin),
  deactivated: Boolean(r.deactivated),
  createdTs: r.created_ts,
  lastSeenTs: r.last_seen_ts,
});

/** Users with the last time one of their devices was seen. */
const ACCOUNTS = `SELECT u.user_id, u.admin, u.deactivated, u.created_ts, d.last_seen_ts
  FROM users u LEFT JOIN (SELECT user_id, MAX(last_seen_ts) AS last_seen_ts FROM devices GROUP BY user_id) d ON d.user_id = u.user_id`;

const ORDER_COLUMNS: Record<UserListQuery['orderBy'], string> = {
  name: 'u.user_id',
  admin: 'u.admin',
  deactivated: 'u.deactivated',
  creation_ts: 'u.created_ts',
  last_seen_ts: 'd.last_seen_ts',
};

interface DeviceRow {
  user_id: string;
  device_id: string;
  display_name: string | null;
  last_seen_ts: number | null;
  last_seen_ip: string | null;
}

interface UiaRow {
  session_id: string;
  user_id: string | null;
  operation: string;
  completed: string;
  created_ts: number;
}

const toDevice = (r: DeviceRow): StoredDevice => ({
  userId: r.user_id,
  deviceId: r.device_id,
  displayName: r.display_name,
  lastSeenTs: r.last_seen_ts,
  lastSeenIp: r.last_seen_ip,
});

/**
 * Tables with rows per (user_id, device_id) that go when the device goes. Every table that
 * references a device must be listed here (a test checks that no row of a deleted device remains
 * in any table). The inbox goes after the device row: a to-device batch writing to the device
 * meanwhile holds a key-share lock on that row (PostgreSQL), so its messages are committed, and seen
 * here, before the device row can be deleted.
 */
const PER_DEVICE_TABLES = ['access_tokens', 'e2e_device_keys', 'e2e_one_time_keys', 'e2e_one_time_key_counts', 'e2e_fallback_keys', 'devices', 'device_inbox', 'to_device_txns'] as const;

/**
 * Deletes devices and everything keyed to them inside a transaction, recording a device-list
 * change for each device that existed (AccountsStore.deleteDevices). Returns the IDs deleted.
 */
async function deleteDevicesIn(tx: Queryable, deviceLists: DeviceListWriter, userId: string, deviceIds: readonly string[] | 'all'): Promise<string[]> {
  // Locked (PostgreSQL) so an upload to one of these devices, which locks its row too, is either
  // done before they go (and its keys go with them) or finds them gone; never keys left behind.
  const forUpdate = tx.dialect === 'postgres' ? ' ORDER BY device_id FOR UPDATE' : '';
  const rows =
    deviceIds === 'all'
      ? await tx.all<{ device_id: string }>(`SELECT device_id FROM devices WHERE user_id = ?${forUpdate}`, [userId])
      : await tx.all<{ device_id: string }>(`SELECT device_id FROM devices WHERE user_id = ? AND device_id IN (${placeholders(deviceIds.length)})${forUpdate}`, [userId, ...deviceIds]);
  const existing = rows.map((r) => r.device_id);
  // Rows keyed to a device may outlive a device row that is already gone (e.g. after a crash
  // of an older version); the requested IDs are cleaned up either way.
  const targets = deviceIds === 'all' ? existing : [...deviceIds];
  if (targets.length === 0) return [];
  const inList = placeholders(targets.length);
  for (const table of PER_DEVICE_TABLES) {
    await tx.run(`DELETE FROM ${table} WHERE user_id = ? AND device_id IN (${inList})`, [userId, ...targets]);
  }
  // Signatures made on the device (by the self-signing key) and by it (on the master key).
  await tx.run(
    `DELETE FROM e2e_cross_signing_signatures
     WHERE (target_user_id = ? AND target_key_id IN (${inList})) OR (signer_user_id = ? AND signer_key_id IN (${inList}))`,
    [userId, ...targets, userId, ...targets.map((d) => `ed25519:${d}`)],
  );
  await deviceLists.record(tx, userId, existing, Date.now());
  return existing;
}

export class SqlAccountsStore implements AccountsStore {
  /** Access tokens by hash: every authenticated request looks one up. */
  private readonly tokens: ReadCache<{ userId: string; deviceId: string }> | undefined;

  constructor(
    private readonly db: SqlDatabase,
    private readonly deviceLists: DeviceListWriter,
  ) {
    this.tokens = readCacheFor(db);
  }

  private async insertDevice(tx: Queryable, userId: string, s: NewSession): Promise<void> {
    await tx.run('INSERT INTO devices (user_id, device_id, display_name, created_ts, last_seen_ts, last_seen_ip) VALUES (?, ?, ?, ?, ?, ?)', [
      userId,
      s.deviceId,
      s.displayName,
      s.ts,
      s.ts,
      s.ip,
    ]);
  }

  private async insertToken(tx: Queryable, userId: string, s: NewSession): Promise<void> {
    await tx.run('INSERT INTO access_tokens (token_hash, user_id, device_id, created_ts) VALUES (?, ?, ?, ?)', [s.tokenHash, userId, s.deviceId, s.ts]);
  }

  async createUser(user: StoredUser & { readonly createdTs: number }, session?: NewSession): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      const inserted = await tx.run('INSERT INTO users (user_id, password_hash, admin, created_ts) VALUES (?, ?, ?, ?) ON CONFLICT (user_id) DO NOTHING', [
        user.userId,
        user.passwordHash,
        user.admin,
        user.createdTs,
      ]);
      if (inserted === 0) return false;
      if (session) {
        await this.insertDevice(tx, user.userId, session);
        await this.insertToken(tx, user.userId, session);
        await this.deviceLists.record(tx, user.userId, [session.deviceId], session.ts);
      }
      return true;
    });
  }

  async getUser(userId: string): Promise<(StoredUser & { deactivated: boolean }) | undefined> {
    const r = await this.db.get<UserRow>('SELECT user_id, password_hash, admin, deactivated FROM users WHERE user_id = ?', [userId]);
    return r && { userId: r.user_id, passwordHash: r.password_hash, admin: Boolean(r.admin), deactivated: Boolean(r.deactivated) };
  }

  async getUserAccount(userId: string): Promise<UserAccount | undefined> {
    const r = await this.db.get<AccountRow>(`${ACCOUNTS} WHERE u.user_id = ?`, [userId]);
    return r && toAccount(r);
  }

  async listUsers(q: UserListQuery): Promise<{ users: UserAccount[]; total: number }> {
    const where: string[] = [];
    const params: (string | boolean)[] = [];
    if (!q.includeDeactivated) {
      where.push('u.deactivated = ?');
      params.push(false);
    }
    if (q.admins !== undefined) {
      where.push('u.admin = ?');
      params.push(q.admins);
    }
    if (q.userIdContains !== undefined && q.userIdContains !== '') {
      // instr/strpos rather than LIKE: no wildcard escaping to get wrong.
      where.push(this.db.dialect === 'sqlite' ? 'instr(u.user_id, ?) > 0' : 'strpos(u.user_id, ?) > 0');
      params.push(q.userIdContains);
    }
    const filter = where.length > 0 ? ` WHERE ${where.join(' AND ')}` : '';
    const dir = q.direction === 'b' ? 'DESC' : 'ASC';
    // NULLs (never seen) sort first going forwards on both databases, as on SQLite by default.
    const nulls = q.orderBy === 'last_seen_ts' ? (dir === 'ASC' ? ' NULLS FIRST' : ' NULLS LAST') : '';
    const rows = await this.db.all<AccountRow>(`${ACCOUNTS}${filter} ORDER BY ${ORDER_COLUMNS[q.orderBy]} ${dir}${nulls}, u.user_id ASC LIMIT ? OFFSET ?`, [
      ...params,
      q.limit,
      q.from,
    ]);
    const total = await this.db.get<{ n: number }>(`SELECT COUNT(*) AS n FROM users u${filter}`, params);
    return { users: rows.map(toAccount), total: Number(total?.n ?? 0) };
  }

  async setPasswordHash(userId: string, passwordHash: string, logout: boolean): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      // A deactivation that committed while the new hash was being made wins: no password again.
      if ((await tx.run('UPDATE users SET password_hash = ? WHERE user_id = ? AND deactivated = ?', [passwordHash, userId, false])) === 0) return false;
      // Synapse's set_password with logout_devices deletes every device, as a logout would.
      if (logout) await deleteDevicesIn(tx, this.deviceLists, userId, 'all');
      return true;
    });
  }

  async deactivateUser(userId: string): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      if ((await tx.run('UPDATE users SET password_hash = NULL, deactivated = ? WHERE user_id = ?', [true, userId])) === 0) return false;
      await deleteDevicesIn(tx, this.deviceLists, userId, 'all');
      // Synapse deletes the cross-signing keys with the account; signatures by or on them go too.
      await tx.run('DELETE FROM e2e_cross_signing_signatures WHERE target_user_id = ? OR signer_user_id = ?', [userId, userId]);
      await tx.run('DELETE FROM e2e_cross_signing_keys WHERE user_id = ?', [userId]);
      await tx.run('DELETE FROM access_tokens WHERE user_id = ?', [userId]);
      // They follow nobody any more (those following them keep their rows: they are told in `left`).
      await tx.run('DELETE FROM e2e_tracked_users WHERE user_id = ?', [userId]);
      // Their key backups go, as Synapse deletes them: versions without keys now, the others are
      // marked deleted (invisible from now on) and their keys purged in batches afterwards, the
      // way a deleted version's are (storage/backup.ts), so a big backup never holds the database.
      await tx.run('DELETE FROM e2e_room_keys_versions WHERE user_id = ? AND key_count = 0', [userId]);
      await tx.run('UPDATE e2e_room_keys_versions SET deleted = ? WHERE user_id = ?', [true, userId]);
      // One change for the user as a whole, so those tracking a user without devices see it too.
      await this.deviceLists.record(tx, userId, [null], Date.now());
      return true;
    });
  }

  async replacePasswordHash(userId: string, oldHash: string, newHash: string): Promise<boolean> {
    return (await this.db.run('UPDATE users SET password_hash = ? WHERE user_id = ? AND password_hash = ?', [newHash, userId, oldHash])) > 0;
  }

  async loginDevice(userId: string, session: NewSession, options: LoginOptions): Promise<LoginOutcome> {
    return this.db.transaction(async (tx) => {
      // The user's row lock serialises this user's logins with each other and with deactivation
      // and password changes, so parallel logins cannot all pass the device count, and a login
      // cannot outlive a deactivation or password reset that committed after its password check
      // (SQLite transactions are serial anyway).
      const user = await tx.get<{ password_hash: string | null; deactivated: number | boolean }>(
        `SELECT password_hash, deactivated FROM users WHERE user_id = ?${tx.dialect === 'postgres' ? ' FOR UPDATE' : ''}`,
        [userId],
      );
      if (!user || Boolean(user.deactivated) || user.password_hash !== options.passwordHash) return { created: false, refused: 'credentials' };
      const existing = await tx.get('SELECT device_id FROM devices WHERE user_id = ? AND device_id = ?', [userId, session.deviceId]);
      if (!existing && options.maxDevices !== undefined) {
        const row = await tx.get<{ n: number }>('SELECT COUNT(*) AS n FROM devices WHERE user_id = ?', [userId]);
        if ((row?.n ?? 0) >= options.maxDevices) return { created: false, refused: 'too many devices' };
      }
      if (existing) {
        await tx.run('DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?', [userId, session.deviceId]);
        await tx.run('UPDATE devices SET last_seen_ts = ?, last_seen_ip = ? WHERE user_id = ? AND device_id = ?', [session.ts, session.ip, userId, session.deviceId]);
      } else {
        await this.insertDevice(tx, userId, session);
      }
      await this.insertToken(tx, userId, session);
      if (!existing) await this.deviceLists.record(tx, userId, [session.deviceId], session.ts);
      return { created: !existing };
    });
  }

  getAccessToken(tokenHash: string): Promise<{ userId: string; deviceId: string } | undefined> {
    const read = async () => {
      const r = await this.db.get<{ user_id: string; device_id: string }>('SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?', [tokenHash]);
      return r && { userId: r.user_id, deviceId: r.device_id };
    };
    return this.tokens ? this.tokens.get(tokenHash, read) : read();
  }

  async getDevice(userId: string, deviceId: string): Promise<StoredDevice | undefined> {
    const r = await this.db.get<DeviceRow>(
      'SELECT user_id, device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id = ? AND device_id = ?',
      [userId, deviceId],
    );
    return r && toDevice(r);
  }

  async listDevices(userId: string): Promise<StoredDevice[]> {
    const rows = await this.db.all<DeviceRow>(
      'SELECT user_id, device_id, display_name, last_seen_ts, last_seen_ip FROM devices WHERE user_id = ? ORDER BY device_id',
      [userId],
    );
    return rows.map(toDevice);
  }

  async setDeviceDisplayName(userId: string, deviceId: string, displayName: string | null): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      const changed = await tx.run('UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?', [displayName, userId, deviceId]);
      if (changed === 0) return false;
      await this.deviceLists.record(tx, userId, [deviceId], Date.now());
      return true;
    });
  }

  async deleteDevices(userId: string, deviceIds: readonly string[] | 'all'): Promise<string[]> {
    if (deviceIds !== 'all' && deviceIds.length === 0) return [];
    return this.db.transaction((tx) => deleteDevicesIn(tx, this.deviceLists, userId, deviceIds));
  }

  async addRegistrationNonce(nonce: string, createdTs: number): Promise<void> {
    await this.db.run('INSERT INTO registration_nonces (nonce, created_ts) VALUES (?, ?)', [nonce, createdTs]);
  }

  async consumeRegistrationNonce(nonce: string, notBeforeTs: number): Promise<boolean> {
    // One statement: two concurrent registrations with the same nonce cannot both succeed.
    const row = await this.db.get<{ created_ts: number }>('DELETE FROM registration_nonces WHERE nonce = ? RETURNING created_ts', [nonce]);
    return row !== undefined && row.created_ts >= notBeforeTs;
  }

  async createUiaSession(s: UiaSession): Promise<void> {
    await this.db.run('INSERT INTO uia_sessions (session_id, user_id, operation, completed, created_ts) VALUES (?, ?, ?, ?, ?)', [
      s.sessionId,
      s.userId,
      s.operation,
      JSON.stringify(s.completed),
      s.createdTs,
    ]);
  }

  async getUiaSession(sessionId: string): Promise<UiaSession | undefined> {
    const r = await this.db.get<UiaRow>('SELECT session_id, user_id, operation, completed, created_ts FROM uia_sessions WHERE session_id = ?', [sessionId]);
    return r && { sessionId: r.session_id, userId: r.user_id, operation: r.operation, completed: JSON.parse(r.completed) as string[], createdTs: r.created_ts };
  }

  async completeUiaStage(sessionId: string, stage: string): Promise<void> {
    await this.db.transaction(async (tx) => {
      const r = await tx.get<{ completed: string }>('SELECT completed FROM uia_sessions WHERE session_id = ?', [sessionId]);
      if (!r) return;
      const completed = JSON.parse(r.completed) as string[];
      if (!completed.includes(stage)) completed.push(stage);
      await tx.run('UPDATE uia_sessions SET completed = ? WHERE session_id = ?', [JSON.stringify(completed), sessionId]);
    });
  }

  async deleteUiaSession(sessionId: string): Promise<void> {
    await this.db.run('DELETE FROM uia_sessions WHERE session_id = ?', [sessionId]);
  }

  async deleteExpiredAuthState(uiaBeforeTs: number, nonceBeforeTs: number): Promise<void> {
    await this.db.run('DELETE FROM uia_sessions WHERE created_ts < ?', [uiaBeforeTs]);
    await this.db.run('DELETE FROM registration_nonces WHERE created_ts < ?', [nonceBeforeTs]);
  }
}
