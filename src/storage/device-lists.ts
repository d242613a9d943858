/**
 * The device-list change stream (`device_lists_stream`): one row each time a user's device list
 * or cross-signing keys change. Its positions are the `/keys/changes` tokens and the federation
 * `stream_id`s. Rows are written for local users (by uploads, logins, renames, deletions) and for
 * remote users whose cached list changed (so local users tracking them hear of it).
 *
 * Positions must become visible in order, or a reader that has seen position N could later miss
 * a smaller one that committed after it. SQLite has one writer at a time anyway; on PostgreSQL the
 * writer takes a transaction-scoped advisory lock before drawing a position, so positions are
 * drawn and committed in the same order, across all processes.
 *
 * A public change of a local user also queues a "poke" for every server subscribed to that user
 * (`device_list_outbound_pokes`), in the same transaction: the outgoing `m.device_list_update` /
 * `m.signing_key_update` EDUs are built from them, so a change is never lost between commit and send.
 */
import type { Queryable, SqlDatabase } from './sql.js';
import type { DeviceListsStore } from './store.js';

const STREAM_LOCK = 7352832;

/**
 * Takes the stream lock (PostgreSQL; SQLite transactions are serialised anyway). Everything that
 * writes device-list state takes it first, before any row lock, so no two such transactions can
 * wait for each other the wrong way round.
 */
export async function lockDeviceListStream(tx: Queryable): Promise<void> {
  if (tx.dialect === 'postgres') await tx.get('SELECT pg_advisory_xact_lock(?)', [STREAM_LOCK]);
}

export interface RecordOptions {
  /** Only this user is told about the change (e.g. a new user-signing key concerns only its owner). */
  readonly privateTo?: string | null;
  /** Queue outgoing updates for subscribed servers (local users' public changes). */
  readonly pokes?: boolean;
}

/** Writes stream rows and tells listeners in this process once they are committed. */
export class DeviceListWriter {
  private readonly listeners = new Set<(userIds: readonly string[]) => void>();

  onChange(listener: (userIds: readonly string[]) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(userIds: readonly string[]): void {
    for (const l of this.listeners) {
      try {
        l(userIds);
      } catch {
        // A listener's failure must not undo or hide a committed change.
      }
    }
  }

  /**
   * Appends one change per device (or one with no device: cross-signing keys) for `userId`.
   * Call as late as possible in a transaction: on PostgreSQL it holds the stream lock until commit.
   */
  async record(tx: Queryable, userId: string, deviceIds: readonly (string | null)[], ts: number, options: RecordOptions = {}): Promise<void> {
    if (deviceIds.length === 0) return;
    const privateTo = options.privateTo ?? null;
    await lockDeviceListStream(tx);
    for (const deviceId of deviceIds) {
      const row = await tx.get<{ stream_id: number }>(
        'INSERT INTO device_lists_stream (user_id, device_id, ts, private_to) VALUES (?, ?, ?, ?) RETURNING stream_id',
        [userId, deviceId, ts, privateTo],
      );
      if (privateTo === null && options.pokes !== false) {
        await tx.run(
          `INSERT INTO device_list_outbound_pokes (destination, stream_id, user_id, device_id)
           SELECT server_name, ?, ?, ? FROM device_list_subscriptions WHERE user_id = ? AND (expires_ts IS NULL OR expires_ts > ?)`,
          [row!.stream_id, userId, deviceId, userId, ts],
        );
      }
    }
    tx.afterCommit(() => this.emit([userId]));
  }
}

export class SqlDeviceListsStore implements DeviceListsStore {
  constructor(
    private readonly db: SqlDatabase,
    private readonly writer: DeviceListWriter,
  ) {}

  async currentStreamId(): Promise<number> {
    const row = await this.db.get<{ v: number | null }>('SELECT MAX(stream_id) AS v FROM device_lists_stream');
    return row?.v ?? 0;
  }

  async latestStreamIdForUser(userId: string): Promise<number> {
    // Device rows only: the `stream_id` of /user/devices is matched against the `prev_id`s of
    // m.device_list_update EDUs, which cross-signing changes (m.signing_key_update) are not part of.
    const row = await this.db.get<{ v: number | null }>(
      'SELECT MAX(stream_id) AS v FROM device_lists_stream WHERE user_id = ? AND private_to IS NULL AND device_id IS NOT NULL',
      [userId],
    );
    return row?.v ?? 0;
  }

  onChange(listener: (userIds: readonly string[]) => void): () => void {
    return this.writer.onChange(listener);
  }
}
