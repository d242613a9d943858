/**
 * The device-list change stream (`device_lists_stream`): one row each time a user's device list
 * or cross-signing keys change. Its positions are the `/keys/changes` tokens and the federation
 * `stream_id`s.
 *
 * Positions must become visible in order, or a reader that has seen position N could later miss
 * a smaller one that committed after it. SQLite has one writer at a time anyway; on PostgreSQL the
 * writer takes a transaction-scoped advisory lock before drawing a position, so positions are
 * drawn and committed in the same order, across all processes.
 */
import type { Queryable, SqlDatabase } from './sql.js';
import type { DeviceListsStore } from './store.js';

const STREAM_LOCK = 7352832;

/**
 * Appends one change per device (or one with no device) for `userId`; with `privateTo`, only that
 * user is told about it. Call as late as possible in a transaction: on PostgreSQL it holds the
 * stream lock until commit.
 */
export async function recordDeviceListChanges(
  tx: Queryable,
  userId: string,
  deviceIds: readonly (string | null)[],
  ts: number,
  privateTo: string | null = null,
): Promise<void> {
  if (deviceIds.length === 0) return;
  if (tx.dialect === 'postgres') await tx.get('SELECT pg_advisory_xact_lock(?)', [STREAM_LOCK]);
  for (const deviceId of deviceIds) {
    await tx.run('INSERT INTO device_lists_stream (user_id, device_id, ts, private_to) VALUES (?, ?, ?, ?)', [userId, deviceId, ts, privateTo]);
  }
}

export class SqlDeviceListsStore implements DeviceListsStore {
  constructor(private readonly db: SqlDatabase) {}

  async currentStreamId(): Promise<number> {
    const row = await this.db.get<{ v: number | null }>('SELECT MAX(stream_id) AS v FROM device_lists_stream');
    return row?.v ?? 0;
  }

  async latestStreamIdForUser(userId: string): Promise<number> {
    const row = await this.db.get<{ v: number | null }>('SELECT MAX(stream_id) AS v FROM device_lists_stream WHERE user_id = ? AND private_to IS NULL', [userId]);
    return row?.v ?? 0;
  }
}
