/**
 * ToDeviceStore on the driver-neutral SQL surface (same SQL on both backends): device inboxes
 * (`device_inbox`), the outbox to other servers (`device_federation_outbox`), received message IDs
 * (`device_federation_inbox`) and clients' transaction IDs (`to_device_txns`); Synapse's table
 * names. See store.ts for what each method promises.
 *
 * A device's messages must become visible in stream order, or a /sync that has acknowledged
 * position N could later find (and never deliver) a smaller one that committed after it. SQLite
 * has one writer at a time. On PostgreSQL a batch takes a transaction-scoped advisory lock per
 * recipient user (all of them, in one order, so two batches cannot deadlock) before drawing stream
 * IDs: stream IDs for one device are drawn and committed in the same order across processes, while
 * batches for other users go ahead in parallel. The devices a batch writes to are key-share-locked
 * on PostgreSQL, so a device deleted meanwhile takes its new messages with it (deleteDevices
 * removes the inbox after the device row).
 */
import { createHash } from 'node:crypto';
import { chunks, placeholders, valuesList, type Queryable, type SqlDatabase, type SqlValue } from './sql.js';
import type { NewToDeviceMessage, PendingToDevice, StoredToDevice, ToDeviceBatch, ToDeviceStore } from './store.js';
import { readyDestinations } from './federation.js';

/** First key of the per-user advisory locks: pg_advisory_xact_lock(TO_DEVICE_LOCK, lockKey(user_id)). */
const TO_DEVICE_LOCK = 7352834;
/** Outbox rows removed per statement when undelivered EDUs expire. */
const EXPIRE_BATCH = 1000;

type Change = { readonly userIds: readonly string[]; readonly destinations: readonly string[] };
type Written = { user_id: string; device_id: string };

/** `(CAST(? AS TEXT), CAST(? AS BIGINT)), …`: a VALUES list PostgreSQL can type without looking at its use. */
function typedValues(rows: number, types: readonly ('TEXT' | 'BIGINT' | 'INTEGER')[]): string {
  const tuple = `(${types.map((t) => `CAST(? AS ${t})`).join(', ')})`;
  return new Array<string>(rows).fill(tuple).join(', ');
}

const bytesOf = (m: NewToDeviceMessage) => Buffer.byteLength(m.messageJson);

/** The second key of a user's advisory lock: any 32-bit hash; two users sharing one only wait for each other. */
const lockKey = (userId: string) => createHash('sha256').update(userId).digest().readInt32BE(0);

/**
 * Takes the advisory locks of the recipient users (PostgreSQL), in ascending key order across
 * all statements, so that two batches never wait for each other in a circle.
 */
async function lockRecipients(tx: Queryable, userIds: readonly string[]): Promise<void> {
  if (tx.dialect !== 'postgres' || userIds.length === 0) return;
  const keys = [...new Set(userIds.map(lockKey))].sort((x, y) => x - y);
  for (const part of chunks(keys)) {
    // A sorted subquery is not flattened into its query: the locks are taken in its order.
    await tx.all(`SELECT pg_advisory_xact_lock(?, k) FROM (SELECT column1 AS k FROM (VALUES ${typedValues(part.length, ['INTEGER'])}) v ORDER BY column1) h`, [
      TO_DEVICE_LOCK,
      ...part,
    ]);
  }
}

/**
 * Inserts the local messages of a batch; returns the (user, device) of every row written. Named
 * devices and `*` entries are each inserted set-based (INSERT … SELECT over the devices table, in
 * chunks), so a fan-out costs a few statements however many users and devices it reaches.
 */
async function insertLocal(tx: Queryable, messages: readonly NewToDeviceMessage[], now: number): Promise<Written[]> {
  const named = messages.filter((m) => m.deviceId !== '*');
  const wildcards = messages.filter((m) => m.deviceId === '*');
  // KEY SHARE: blocks the device row's deletion, not updates such as last_seen_ts or a rename.
  const share = tx.dialect === 'postgres' ? ' FOR KEY SHARE OF d' : '';
  const written: Written[] = [];
  const insert = async (select: string, params: SqlValue[]) =>
    written.push(...(await tx.all<Written>(`INSERT INTO device_inbox (user_id, device_id, message_json, message_bytes, received_ts) ${select}${share} RETURNING user_id, device_id`, params)));
  for (const part of chunks(named)) {
    await insert(
      `SELECT d.user_id, d.device_id, v.column3, v.column4, ? FROM (VALUES ${typedValues(part.length, ['TEXT', 'TEXT', 'TEXT', 'BIGINT'])}) v
       JOIN devices d ON d.user_id = v.column1 AND d.device_id = v.column2`,
      [now, ...part.flatMap((m) => [m.userId, m.deviceId, m.messageJson, bytesOf(m)])],
    );
  }
  // A device named in the same batch as its user's `*` has its own message. That mix is rare: those
  // users get a statement each, the others share a statement per chunk.
  const namedUsers = new Set(named.map((m) => m.userId));
  for (const part of chunks(wildcards.filter((m) => !namedUsers.has(m.userId)))) {
    await insert(
      `SELECT d.user_id, d.device_id, v.column2, v.column3, ? FROM (VALUES ${typedValues(part.length, ['TEXT', 'TEXT', 'BIGINT'])}) v
       JOIN devices d ON d.user_id = v.column1`,
      [now, ...part.flatMap((m) => [m.userId, m.messageJson, bytesOf(m)])],
    );
  }
  for (const m of wildcards.filter((w) => namedUsers.has(w.userId))) {
    const own = named.filter((n) => n.userId === m.userId).map((n) => n.deviceId);
    await insert(`SELECT d.user_id, d.device_id, ?, ?, ? FROM devices d WHERE d.user_id = ? AND d.device_id NOT IN (${placeholders(own.length)})`, [
      m.messageJson,
      bytesOf(m),
      now,
      m.userId,
      ...own,
    ]);
  }
  return written;
}

/**
 * Drops the oldest messages of the given devices beyond `maxMessages` each, or beyond `maxBytes`
 * of event JSON each (counted from the newest); returns the counts per device.
 */
async function enforceCaps(tx: Queryable, devices: readonly Written[], maxMessages: number, maxBytes: number): Promise<StoredToDevice['dropped']> {
  const counts = new Map<string, { userId: string; deviceId: string; count: number }>();
  for (const part of chunks(devices)) {
    const rows = await tx.all<Written>(
      `DELETE FROM device_inbox WHERE stream_id IN (
         SELECT stream_id FROM (
           SELECT stream_id, ROW_NUMBER() OVER newest AS n, SUM(message_bytes) OVER newest AS bytes
           FROM device_inbox WHERE (user_id, device_id) IN (VALUES ${typedValues(part.length, ['TEXT', 'TEXT'])})
           WINDOW newest AS (PARTITION BY user_id, device_id ORDER BY stream_id DESC ROWS UNBOUNDED PRECEDING)
         ) ranked WHERE n > ? OR bytes > ?)
       RETURNING user_id, device_id`,
      [...part.flatMap((d) => [d.user_id, d.device_id]), maxMessages, maxBytes],
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
        const params: SqlValue[] = part.flatMap((e) => [e.destination, e.eduJson, e.messages, now]);
        await tx.run(`INSERT INTO device_federation_outbox (destination, edu_json, message_count, queued_ts) VALUES ${valuesList(part.length, 4)}`, params);
      }
      let written: Written[] = [];
      let dropped: StoredToDevice['dropped'] = [];
      if (batch.local.length > 0) {
        // Last, so the recipients' locks are held only for the inserts and the commit.
        await lockRecipients(tx, batch.local.map((m) => m.userId));
        written = await insertLocal(tx, batch.local, now);
        const devices = [...new Map(written.map((w) => [`${w.user_id}\0${w.device_id}`, w])).values()];
        if (devices.length > 0) dropped = await enforceCaps(tx, devices, batch.maxPendingPerDevice, batch.maxPendingBytesPerDevice);
      }
      const change = { userIds: [...new Set(written.map((w) => w.user_id))], destinations: [...new Set(batch.remote.map((e) => e.destination))] };
      if (change.userIds.length > 0 || change.destinations.length > 0) tx.afterCommit(() => this.emit(change));
      return { stored: true, messages: written.length, dropped };
    });
  }

  async messagesAfter(userId: string, deviceId: string, after: number, limit: number, maxBytes: number): Promise<PendingToDevice[]> {
    // The budget is counted on the index (stream_id, message_bytes); only the texts sent are read.
    const rows = await this.db.all<{ stream_id: number; message_json: string }>(
      `SELECT i.stream_id, i.message_json FROM (
         SELECT stream_id, ROW_NUMBER() OVER oldest AS n, SUM(message_bytes) OVER oldest AS bytes FROM (
           SELECT stream_id, message_bytes FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id > ? ORDER BY stream_id LIMIT ?
         ) f
         WINDOW oldest AS (ORDER BY stream_id ROWS UNBOUNDED PRECEDING)
       ) w JOIN device_inbox i ON i.stream_id = w.stream_id
       WHERE w.n = 1 OR w.bytes <= ?
       ORDER BY i.stream_id`,
      [userId, deviceId, after, limit, maxBytes],
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

  async expireEdus(queuedBeforeTs: number): Promise<{ destination: string; edus: number; messages: number }[]> {
    const out = new Map<string, { destination: string; edus: number; messages: number }>();
    for (;;) {
      // In slices, so a long backlog is not one long transaction.
      const rows = await this.db.all<{ destination: string; message_count: number }>(
        `DELETE FROM device_federation_outbox WHERE stream_id IN (SELECT stream_id FROM device_federation_outbox WHERE queued_ts < ? LIMIT ?)
         RETURNING destination, message_count`,
        [queuedBeforeTs, EXPIRE_BATCH],
      );
      for (const r of rows) {
        const d = out.get(r.destination) ?? { destination: r.destination, edus: 0, messages: 0 };
        d.edus++;
        d.messages += Number(r.message_count);
        out.set(r.destination, d);
      }
      if (rows.length < EXPIRE_BATCH) return [...out.values()];
    }
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
