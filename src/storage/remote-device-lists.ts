/**
 * RemoteDeviceListsStore: the cache of remote users' device lists (server-server API, Device
 * Management: "populate a local cache", then apply incremental updates). Key objects are kept as
 * received (JSON text). Every change to a cached list is also a row in the device-list stream, so
 * local users tracking that remote user see it in /sync and /keys/changes.
 */
import { CHUNK, placeholders, type Queryable, type SqlDatabase } from './sql.js';
import { GroupCommit } from './group-commit.js';
import { lockDeviceListStream, type DeviceListWriter } from './device-lists.js';
import type {
  ChainDecision,
  CrossSigningKeyType,
  KeysOfUsers,
  RemoteCrossSigningKey,
  RemoteDevice,
  RemoteDeviceList,
  RemoteDeviceListSnapshot,
  RemoteDeviceListsStore,
  RemoteDeviceUpdate,
} from './store.js';

interface ListRow {
  user_id: string;
  server_name: string;
  stream_id: number;
  stale: number | boolean;
  synced_ts: number;
}

const toList = (r: ListRow): RemoteDeviceList => ({ userId: r.user_id, serverName: r.server_name, streamId: r.stream_id, stale: Boolean(r.stale), syncedTs: r.synced_ts });

const LIST_COLUMNS = 'user_id, server_name, stream_id, stale, synced_ts';

/**
 * The list row of one user, locked until the transaction ends (PostgreSQL; SQLite locks the
 * database). The stream lock comes first: these transactions record stream changes too, and every
 * writer takes the stream lock before row locks, so none can deadlock another.
 */
async function lockedList(tx: Queryable, userId: string): Promise<(ListRow & { pending_stream_id: number | null }) | undefined> {
  await lockDeviceListStream(tx);
  const forUpdate = tx.dialect === 'postgres' ? ' FOR UPDATE' : '';
  return tx.get(`SELECT ${LIST_COLUMNS}, pending_stream_id FROM remote_device_lists WHERE user_id = ?${forUpdate}`, [userId]);
}

export class SqlRemoteDeviceListsStore implements RemoteDeviceListsStore {
  constructor(
    private readonly db: SqlDatabase,
    private readonly deviceLists: DeviceListWriter,
  ) {
    this.replacements = new GroupCommit(db, (tx, r) => this.replaceIn(tx, r.snapshot, r.now));
  }

  async getLists(userIds: readonly string[]): Promise<RemoteDeviceList[]> {
    const out: RemoteDeviceList[] = [];
    for (let i = 0; i < userIds.length; i += CHUNK) {
      const part = userIds.slice(i, i + CHUNK);
      const rows = await this.db.all<ListRow>(`SELECT ${LIST_COLUMNS} FROM remote_device_lists WHERE user_id IN (${placeholders(part.length)})`, part);
      out.push(...rows.map(toList));
    }
    return out;
  }

  async getKeysOf(userIds: readonly string[]): Promise<KeysOfUsers> {
    const out: KeysOfUsers = { devices: [], crossSigning: [], signatures: [] };
    for (let i = 0; i < userIds.length; i += CHUNK) {
      const part = userIds.slice(i, i + CHUNK);
      const inList = placeholders(part.length);
      const rows = await this.db.all<{ kind: number; user_id: string; a: string; b: string | null; c: string }>(
        `SELECT 0 AS kind, user_id, device_id AS a, display_name AS b, key_json AS c FROM remote_devices WHERE user_id IN (${inList}) AND key_json IS NOT NULL
         UNION ALL
         SELECT 1, user_id, key_type, public_key, key_json FROM remote_cross_signing_keys WHERE user_id IN (${inList})`,
        [...part, ...part],
      );
      for (const r of rows) {
        if (r.kind === 0) out.devices.push({ userId: r.user_id, deviceId: r.a, displayName: r.b, json: r.c });
        else out.crossSigning.push({ userId: r.user_id, keyType: r.a as CrossSigningKeyType, publicKey: r.b!, json: r.c });
      }
    }
    return out;
  }

  /** Sets (or, with `key` undefined, removes) one cross-signing key; true when it changed. */
  private async putCrossSigningKey(tx: Queryable, userId: string, keyType: CrossSigningKeyType, key: RemoteCrossSigningKey | undefined): Promise<boolean> {
    const old = await tx.get<{ public_key: string; key_json: string }>('SELECT public_key, key_json FROM remote_cross_signing_keys WHERE user_id = ? AND key_type = ?', [userId, keyType]);
    if (old?.key_json === key?.json) return false;
    if (old && old.public_key !== key?.publicKey) {
      // Signatures our users made on a key that is gone (user-signing signatures on a master key).
      await tx.run('DELETE FROM e2e_cross_signing_signatures WHERE target_user_id = ? AND target_key_id = ?', [userId, old.public_key]);
    }
    if (key === undefined) await tx.run('DELETE FROM remote_cross_signing_keys WHERE user_id = ? AND key_type = ?', [userId, keyType]);
    else {
      await tx.run(
        `INSERT INTO remote_cross_signing_keys (user_id, key_type, public_key, key_json) VALUES (?, ?, ?, ?)
         ON CONFLICT (user_id, key_type) DO UPDATE SET public_key = excluded.public_key, key_json = excluded.key_json`,
        [userId, keyType, key.publicKey, key.json],
      );
    }
    return true;
  }

  private async putDevice(tx: Queryable, userId: string, d: RemoteDevice): Promise<void> {
    await tx.run(
      `INSERT INTO remote_devices (user_id, device_id, display_name, key_json) VALUES (?, ?, ?, ?)
       ON CONFLICT (user_id, device_id) DO UPDATE SET display_name = excluded.display_name, key_json = excluded.key_json`,
      [userId, d.deviceId, d.displayName, d.keyJson],
    );
  }

  /** Lists fetched at about the same time (one query naming many users) share one commit. */
  private readonly replacements: GroupCommit<{ snapshot: RemoteDeviceListSnapshot; now: number }, { changed: boolean; complete: boolean }>;

  replaceList(snapshot: RemoteDeviceListSnapshot, now: number): Promise<{ changed: boolean; complete: boolean }> {
    return this.replacements.submit({ snapshot, now });
  }

  private async replaceIn(tx: Queryable, snapshot: RemoteDeviceListSnapshot, now: number): Promise<{ changed: boolean; complete: boolean }> {
    const { userId } = snapshot;
    const current = await lockedList(tx, userId);
    // An update applied since this snapshot was taken is newer than the snapshot.
    if (current && !current.stale && current.stream_id > snapshot.streamId) {
      await tx.run('UPDATE remote_device_lists SET synced_ts = ? WHERE user_id = ?', [now, userId]);
      return { changed: false, complete: true };
    }
    const old = new Map(
      (await tx.all<{ device_id: string; display_name: string | null; key_json: string | null }>('SELECT device_id, display_name, key_json FROM remote_devices WHERE user_id = ?', [userId])).map(
        (r) => [r.device_id, r],
      ),
    );
    const changed: (string | null)[] = [];
    for (const d of snapshot.devices) {
      const o = old.get(d.deviceId);
      old.delete(d.deviceId);
      if (o && o.display_name === d.displayName && o.key_json === d.keyJson) continue;
      await this.putDevice(tx, userId, d);
      changed.push(d.deviceId);
    }
    for (const gone of old.keys()) {
      await tx.run('DELETE FROM remote_devices WHERE user_id = ? AND device_id = ?', [userId, gone]);
      changed.push(gone);
    }
    const masterChanged = await this.putCrossSigningKey(tx, userId, 'master', snapshot.masterKey);
    const selfSigningChanged = await this.putCrossSigningKey(tx, userId, 'self_signing', snapshot.selfSigningKey);
    if (masterChanged || selfSigningChanged) changed.push(null);
    // An update seen meanwhile (a gap) is newer than the snapshot: the list is newer than it was,
    // but still not known to be complete.
    const behind = current !== undefined && current.pending_stream_id !== null && current.pending_stream_id > snapshot.streamId;
    await tx.run(
      `INSERT INTO remote_device_lists (user_id, server_name, stream_id, stale, pending_stream_id, synced_ts) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (user_id) DO UPDATE SET server_name = excluded.server_name, stream_id = excluded.stream_id, stale = excluded.stale,
         pending_stream_id = excluded.pending_stream_id, synced_ts = excluded.synced_ts`,
      [userId, snapshot.serverName, snapshot.streamId, behind, behind ? current.pending_stream_id : null, now],
    );
    // The first fetch is no news to anyone: nobody here could have been tracking the user yet.
    if (current && changed.length > 0) await this.deviceLists.record(tx, userId, changed, now, { pokes: false });
    return { changed: current === undefined || changed.length > 0, complete: !behind };
  }

  async applyDeviceUpdate(update: RemoteDeviceUpdate, decide: (current: RemoteDeviceList) => ChainDecision, now: number): Promise<ChainDecision | 'untracked'> {
    return this.db.transaction(async (tx) => {
      const row = await lockedList(tx, update.userId);
      if (!row) return 'untracked';
      const decision = decide(toList(row));
      if (decision === 'gap') {
        // Remembered, so a resync that answers with an older list does not count as complete.
        await tx.run(
          `UPDATE remote_device_lists SET stale = ?,
             pending_stream_id = CASE WHEN pending_stream_id IS NULL OR pending_stream_id < ? THEN ? ELSE pending_stream_id END
           WHERE user_id = ?`,
          [true, update.streamId, update.streamId, update.userId],
        );
        return decision;
      }
      if (decision === 'ignore') return decision;
      if (update.deleted) await tx.run('DELETE FROM remote_devices WHERE user_id = ? AND device_id = ?', [update.userId, update.deviceId]);
      else await this.putDevice(tx, update.userId, { deviceId: update.deviceId, displayName: update.displayName, keyJson: update.keyJson });
      await tx.run('UPDATE remote_device_lists SET stream_id = ? WHERE user_id = ?', [update.streamId, update.userId]);
      await this.deviceLists.record(tx, update.userId, [update.deviceId], now, { pokes: false });
      return decision;
    });
  }

  async applySigningKeys(userId: string, keys: { master?: RemoteCrossSigningKey; selfSigning?: RemoteCrossSigningKey }, now: number): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      if (!(await lockedList(tx, userId))) return false;
      let changed = false;
      if (keys.master) changed = (await this.putCrossSigningKey(tx, userId, 'master', keys.master)) || changed;
      if (keys.selfSigning) changed = (await this.putCrossSigningKey(tx, userId, 'self_signing', keys.selfSigning)) || changed;
      if (changed) await this.deviceLists.record(tx, userId, [null], now, { pokes: false });
      return true;
    });
  }

  async markStale(userId: string): Promise<void> {
    await this.db.run('UPDATE remote_device_lists SET stale = ? WHERE user_id = ?', [true, userId]);
  }

  async dueForResync(syncedBeforeTs: number, limit: number): Promise<string[]> {
    const rows = await this.db.all<{ user_id: string }>(
      'SELECT user_id FROM remote_device_lists WHERE stale = ? OR synced_ts < ? ORDER BY synced_ts LIMIT ?',
      [true, syncedBeforeTs, limit],
    );
    return rows.map((r) => r.user_id);
  }

  async forgetUntracked(): Promise<number> {
    return this.db.transaction(async (tx) => {
      const untracked = 'SELECT user_id FROM remote_device_lists WHERE user_id NOT IN (SELECT tracked_user_id FROM e2e_tracked_users)';
      await tx.run(`DELETE FROM remote_devices WHERE user_id IN (${untracked})`);
      await tx.run(`DELETE FROM remote_cross_signing_keys WHERE user_id IN (${untracked})`);
      await tx.run(`DELETE FROM e2e_cross_signing_signatures WHERE target_user_id IN (${untracked})`);
      return tx.run(`DELETE FROM remote_device_lists WHERE user_id IN (${untracked})`);
    });
  }

  async counts(): Promise<{ lists: number; stale: number }> {
    const row = await this.db.get<{ lists: number; stale: number | null }>('SELECT COUNT(*) AS lists, SUM(CASE WHEN stale = ? THEN 1 ELSE 0 END) AS stale FROM remote_device_lists', [true]);
    return { lists: row?.lists ?? 0, stale: row?.stale ?? 0 };
  }
}
