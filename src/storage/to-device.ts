/**
 * ToDeviceStore on the driver-neutral SQL surface (same SQL on both backends): device inboxes
 * (`device_inbox`), the outbox to other servers (`device_federation_outbox`), received message IDs
 * (`device_federation_inbox`) and clients' transaction IDs (`to_device_txns`); Synapse's table
 * names. See store.ts for what each method promises.
 *
 * A device's messages must become visible in stream order, or a /sync that has acknowledged
 * position N could later find (and never deliver) a smaller one that committed after it. SQLite
 * has one writer at a time; on PostgreSQL a batch takes a transaction-scoped advisory lock before
 * drawing stream IDs, so they are drawn and committed in the same order across processes. The
 * devices a batch writes to are key-share-locked on PostgreSQL, so a device deleted meanwhile takes
 * its new messages with it (deleteDevices removes the inbox after the device row).
 */
import { chunks, placeholders, type Queryable, type SqlDatabase, type SqlValue } from './sql.js';
import type { NewToDeviceMessage, PendingToDevice, StoredToDevice, ToDeviceBatch, ToDeviceStore } from './store.js';
import { readyDestinations } from './federation.js';

const TO_DEVICE_LOCK = 7352834;

type Change = { readonly userIds: readonly string[]; readonly destinations: readonly string[] };

/** `(CAST(? AS TEXT), …), …`: a VALUES list PostgreSQL can type without looking at its use. */
function textValues(rows: number, width: number): string {
  const tuple = `(${new Array<string>(width).fill('CAST(? AS TEXT)').join(', ')})`;
  return new Array<string>(rows).fill(tuple).join(', ');
}

/** Inserts the local messages of a batch; returns the (user, device) of every row written. */
async function insertLocal(tx: Queryable, messages: readonly NewToDeviceMessage[], now: number): Promise<{ user_id: string; device_id: string }[]> {
  const named = messages.filter((m) => m.deviceId !== '*');
  const wildcards = messages.filter((m) => m.deviceId === '*');
  // KEY SHARE: blocks the device row's deletion, not updates such as last_seen_ts or a rename.
  const share = tx.dialect === 'postgres' ? ' FOR KEY SHARE OF d' : '';
  const written: { user_id: string; device_id: string }[] = [];
  for (const part of chunks(named)) {
    written.push(
      ...(await tx.all<{ user_id: string; device_id: string }>(
        `INSERT INTO device_inbox (user_id, device_id, message_json, received_ts)
         SELECT d.user_id, d.device_id, v.column3, ? FROM (VALUES ${textValues(part.length, 3)}) v
         JOIN devices d ON d.user_id = v.column1 AND d.device_id = v.column2${share}
         RETURNING user_id, device_id`,
        [now, ...part.flatMap((m) => [m.userId, m.deviceId, m.messageJson])],
      )),
    );
  }
  for (const m of wildcards) {
    // Devices named in the same batch have their own message.
    const own = named.filter((n) => n.userId === m.userId).map((n) => n.deviceId);
    const except = own.length > 0 ? ` AND d.device_id NOT IN (${placeholders(own.length)})` : '';
    written.push(
      ...(await tx.all<{ user_id: string; device_id: string }>(
        `INSERT INTO device_inbox (user_id, device_id, message_json, received_ts)
         SELECT d.user_id, d.device_id, ?, ? FROM devices d WHERE d.user_id = ?${except}${share}
         RETURNING user_id, device_id`,
        [m.messageJson, now, m.userId, ...own],
      )),
    );
  }
  return written;
}

/** Drops the oldest messages of the given devices beyond `max` each; returns the counts per device. */
async function enforceCap(tx: Queryable, devices: readonly { user_id: string; device_id: string }[], max: number): Promise<StoredToDevice['dropped']> {
  const counts = new Map<string, { userId: string; deviceId: string; count: number }>();
  for (const part of chunks(devices)) {
    const rows = await tx.all<{ user_id: string; device_id: string }>(
      `DELETE FROM device_inbox WHERE stream_id IN (
         SELECT stream_id FROM (
           SELECT stream_id, ROW_NUMBER() OVER (PARTITION BY user_id, device_id ORDER BY stream_id DESC) AS n
           FROM device_inbox WHERE (user_id, device_id) IN (VALUES ${textValues(part.length, 2)})
         ) ranked WHERE n > ?)
       RETURNING user_id, device_id`,
      [...part.flatMap((d) => [d.user_id, d.device_id]), max],
    );
    for (const r of rows) {
      const key = `${r.user_id}\0${r.device_id}`;
      const c = counts.get(key);
      if (c) c.count++;
      else counts.set(key, { userId: r.user_id, deviceId: r.device_id, count: 1 });
    }
  }
  return [...counts.values()];
}

export class SqlToDeviceStore implements ToDeviceStore {
  private readonly listeners = new Set<(change: Change) => void>();

  constructor(private readonly db: SqlDatabase) {}

  onChange(listener: (change: Change) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private emit(change: Change): void {
    for (const l of this.listeners) {
      try {
        l(change);
      } catch {
        // A listener's failure must not undo or hide a committed batch.
      }
    }
  }

  addMessages(batch: ToDeviceBatch): Promise<StoredToDevice> {
    return this.db.transaction(async (tx) => {
      const { txn, inbound, now } = batch;
      if (txn) {
        const fresh = await tx.run(
          'INSERT INTO to_device_txns (user_id, device_id, event_type, txn_id, received_ts) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING',
          [txn.userId, txn.deviceId, txn.eventType, txn.txnId, now],
        );
        if (fresh === 0) return { stored: false, messages: 0, dropped: [] };
      }
      if (inbound) {
        const fresh = await tx.run('INSERT INTO device_federation_inbox (origin, message_id, received_ts) VALUES (?, ?, ?) ON CONFLICT DO NOTHING', [
          inbound.origin,
          inbound.messageId,
          now,
        ]);
        if (fresh === 0) return { stored: false, messages: 0, dropped: [] };
      }
      for (const part of chunks(batch.remote)) {
        const params: SqlValue[] = part.flatMap((e) => [e.destination, e.eduJson, now]);
        await tx.run(`INSERT INTO device_federation_outbox (destination, edu_json, queued_ts) VALUES ${new Array<string>(part.length).fill('(?, ?, ?)').join(', ')}`, params);
      }
      let written: { user_id: string; device_id: string }[] = [];
      let dropped: StoredToDevice['dropped'] = [];
      if (batch.local.length > 0) {
        // Last, so the stream lock is held only for the inserts and the commit.
        if (tx.dialect === 'postgres') await tx.get('SELECT pg_advisory_xact_lock(?)', [TO_DEVICE_LOCK]);
        written = await insertLocal(tx, batch.local, now);
        const devices = [...new Map(written.map((w) => [`${w.user_id}\0${w.device_id}`, w])).values()];
        if (devices.length > 0) dropped = await enforceCap(tx, devices, batch.maxPendingPerDevice);
      }
      const change = { userIds: [...new Set(written.map((w) => w.user_id))], destinations: [...new Set(batch.remote.map((e) => e.destination))] };
      if (change.userIds.length > 0 || change.destinations.length > 0) tx.afterCommit(() => this.emit(change));
      return { stored: true, messages: written.length, dropped };
    });
  }

  async messagesAfter(userId: string, deviceId: string, after: number, limit: number): Promise<PendingToDevice[]> {
    const rows = await this.db.all<{ stream_id: number; message_json: string }>(
      'SELECT stream_id, message_json FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id > ? ORDER BY stream_id LIMIT ?',
      [userId, deviceId, after, limit],
    );
    return rows.map((r) => ({ streamId: r.stream_id, messageJson: r.message_json }));
  }

  /** Acknowledgements waiting for the next group commit. */
  private readonly deleteQueue: { userId: string; deviceId: string; upTo: number; done: (count: number, e?: unknown) => void }[] = [];

  async deleteMessagesUpTo(userId: string, deviceId: string, upTo: number): Promise<number> {
    // A read first: most /syncs acknowledge nothing, and a DELETE would take SQLite's write lock.
    const oldest = await this.db.get<{ s: number | null }>('SELECT MIN(stream_id) AS s FROM device_inbox WHERE user_id = ? AND device_id = ?', [userId, deviceId]);
    if (oldest?.s === null || oldest?.s === undefined || oldest.s > upTo) return 0;
    // Many devices acknowledge at about the same time (a message to all of them wakes them all):
    // one transaction (one fsync on SQLite) removes what they all acknowledged.
    return new Promise((resolve, reject) => {
      this.deleteQueue.push({ userId, deviceId, upTo, done: (count, e) => (e === undefined ? resolve(count) : reject(e as Error)) });
      if (this.deleteQueue.length === 1) setImmediate(() => void this.flushDeletes());
    });
  }

  private async flushDeletes(): Promise<void> {
    const batch = this.deleteQueue.splice(0);
    try {
      const counts = await this.db.transaction(async (tx) => {
        const out: number[] = [];
        for (const d of batch) out.push(await tx.run('DELETE FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id <= ?', [d.userId, d.deviceId, d.upTo]));
        return out;
      });
      batch.forEach((d, i) => d.done(counts[i]!));
    } catch (e) {
      for (const d of batch) d.done(0, e ?? new Error('removing acknowledged to-device messages failed'));
    }
  }

  async pendingEdus(destination: string, limit: number): Promise<{ streamId: number; eduJson: string }[]> {
    const rows = await this.db.all<{ stream_id: number; edu_json: string }>(
      'SELECT stream_id, edu_json FROM device_federation_outbox WHERE destination = ? ORDER BY stream_id LIMIT ?',
      [destination, limit],
    );
    return rows.map((r) => ({ streamId: r.stream_id, eduJson: r.edu_json }));
  }

  async edusDelivered(destination: string, streamIds: readonly number[]): Promise<void> {
    for (const part of chunks(streamIds)) {
      await this.db.run(`DELETE FROM device_federation_outbox WHERE destination = ? AND stream_id IN (${placeholders(part.length)})`, [destination, ...part]);
    }
  }

  destinationsWithEdus(now: number): Promise<string[]> {
    return readyDestinations(this.db, 'device_federation_outbox', now);
  }

  async eduCounts(): Promise<Map<string, number>> {
    const rows = await this.db.all<{ destination: string; n: number }>('SELECT destination, COUNT(*) AS n FROM device_federation_outbox GROUP BY destination');
    return new Map(rows.map((r) => [r.destination, Number(r.n)]));
  }

  async pendingMessageCount(): Promise<number> {
    const row = await this.db.get<{ n: number }>('SELECT COUNT(*) AS n FROM device_inbox');
    return Number(row?.n ?? 0);
  }

  async cleanup(txnsBeforeTs: number, messageIdsBeforeTs: number): Promise<void> {
    await this.db.run('DELETE FROM to_device_txns WHERE received_ts < ?', [txnsBeforeTs]);
    await this.db.run('DELETE FROM device_federation_inbox WHERE received_ts < ?', [messageIdsBeforeTs]);
  }
}
