/**
 * FederationStore on the driver-neutral SQL surface (same SQL on both backends): device-list
 * subscriptions and the outbound pokes built from them, destination retry state, leases and
 * received transactions. See store.ts for what each method promises.
 */
import { chunks, placeholders, type Queryable, type SqlDatabase } from './sql.js';
import { GroupCommit } from './group-commit.js';
import { lockDeviceListStream } from './device-lists.js';

/** A subscription this close to its end counts as lapsed when renewed (processes' clocks differ a little). */
const LAPSE_MARGIN_MS = 60_000;
import type { DestinationState, DeviceListPoke, FederationStore, LocalDeviceState } from './store.js';

interface DestinationRow {
  destination: string;
  failure_count: number;
  retry_after_ts: number;
  first_failure_ts: number | null;
}

const toDestination = (r: DestinationRow): DestinationState => ({
  destination: r.destination,
  failureCount: r.failure_count,
  retryAfterTs: r.retry_after_ts,
  firstFailureTs: r.first_failure_ts,
});

interface Delivered {
  readonly destination: string;
  readonly streamIds: readonly number[];
  readonly chains: ReadonlyMap<string, { readonly from: number | undefined; readonly to: number }>;
}

/** Destinations with EDUs queued in `table` that are not waiting for a retry at `now`. */
export async function readyDestinations(db: Queryable, table: 'device_list_outbound_pokes' | 'device_federation_outbox', now: number): Promise<string[]> {
  const rows = await db.all<{ destination: string }>(
    `SELECT DISTINCT q.destination FROM ${table} q
     LEFT JOIN federation_destinations d ON d.destination = q.destination
     WHERE d.retry_after_ts IS NULL OR d.retry_after_ts <= ?`,
    [now],
  );
  return rows.map((r) => r.destination);
}

export class SqlFederationStore implements FederationStore {
  constructor(private readonly db: SqlDatabase) {
    this.delivered = new GroupCommit(db, (tx, d) => this.recordDelivered(tx, d));
  }

  async subscribe(serverName: string, userIds: readonly string[], expiresTs: number | null, now: number): Promise<void> {
    for (const part of chunks(userIds)) {
      const inList = placeholders(part.length);
      await this.db.transaction(async (tx) => {
        // After any change being committed now: it either sees this subscription and queues an
        // update, or was committed before, and the subscriber's next read of the list includes it.
        await lockDeviceListStream(tx);
        // A lapsed (or lapsing) subscription's chain is broken: updates made while it had lapsed
        // were never queued. The margin covers clocks of processes that disagree slightly.
        await tx.run(
          `DELETE FROM device_list_outbound_last_sent WHERE destination = ? AND user_id IN (
             SELECT user_id FROM device_list_subscriptions WHERE server_name = ? AND expires_ts <= ? AND user_id IN (${inList}))`,
          [serverName, serverName, now + LAPSE_MARGIN_MS, ...part],
        );
        await tx.run(
          `INSERT INTO device_list_subscriptions (user_id, server_name, expires_ts)
           SELECT user_id, ?, ? FROM users WHERE user_id IN (${inList})
           ON CONFLICT (user_id, server_name) DO UPDATE SET expires_ts = excluded.expires_ts
           WHERE device_list_subscriptions.expires_ts IS NOT NULL
             AND (excluded.expires_ts IS NULL OR excluded.expires_ts > device_list_subscriptions.expires_ts)`,
          [serverName, expiresTs, ...part],
        );
      });
    }
  }

  async unsubscribe(serverName: string, userIds: readonly string[]): Promise<void> {
    for (const part of chunks(userIds)) {
      const inList = placeholders(part.length);
      await this.db.transaction(async (tx) => {
        await tx.run(`DELETE FROM device_list_subscriptions WHERE server_name = ? AND user_id IN (${inList})`, [serverName, ...part]);
        await tx.run(`DELETE FROM device_list_outbound_pokes WHERE destination = ? AND user_id IN (${inList})`, [serverName, ...part]);
        await tx.run(`DELETE FROM device_list_outbound_last_sent WHERE destination = ? AND user_id IN (${inList})`, [serverName, ...part]);
      });
    }
  }

  async subscribers(userId: string, now: number): Promise<{ serverName: string; expiresTs: number | null }[]> {
    const rows = await this.db.all<{ server_name: string; expires_ts: number | null }>(
      'SELECT server_name, expires_ts FROM device_list_subscriptions WHERE user_id = ? AND (expires_ts IS NULL OR expires_ts > ?) ORDER BY server_name',
      [userId, now],
    );
    return rows.map((r) => ({ serverName: r.server_name, expiresTs: r.expires_ts }));
  }

  async noteDeviceListRead(serverName: string, userId: string, streamId: number): Promise<void> {
    await this.db.transaction(async (tx) => {
      // Only for a subscriber: anyone may read a list, but only subscribers have a chain.
      const subscribed = await tx.get('SELECT 1 AS x FROM device_list_subscriptions WHERE user_id = ? AND server_name = ?', [userId, serverName]);
      if (!subscribed) return;
      await tx.run('DELETE FROM device_list_outbound_pokes WHERE destination = ? AND user_id = ? AND stream_id <= ? AND device_id IS NOT NULL', [serverName, userId, streamId]);
      await tx.run(
        `INSERT INTO device_list_outbound_last_sent (destination, user_id, stream_id) VALUES (?, ?, ?)
         ON CONFLICT (destination, user_id) DO UPDATE SET stream_id = excluded.stream_id
         WHERE excluded.stream_id > device_list_outbound_last_sent.stream_id`,
        [serverName, userId, streamId],
      );
    });
  }

  async pendingPokes(destination: string, limit: number): Promise<DeviceListPoke[]> {
    const rows = await this.db.all<{ stream_id: number; user_id: string; device_id: string | null }>(
      'SELECT stream_id, user_id, device_id FROM device_list_outbound_pokes WHERE destination = ? ORDER BY stream_id LIMIT ?',
      [destination, limit],
    );
    return rows.map((r) => ({ streamId: r.stream_id, userId: r.user_id, deviceId: r.device_id }));
  }

  async lastSentStreamIds(destination: string, userIds: readonly string[]): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const part of chunks(userIds)) {
      const rows = await this.db.all<{ user_id: string; stream_id: number }>(
        `SELECT user_id, stream_id FROM device_list_outbound_last_sent WHERE destination = ? AND user_id IN (${placeholders(part.length)})`,
        [destination, ...part],
      );
      for (const r of rows) out.set(r.user_id, r.stream_id);
    }
    return out;
  }

  /** Many destinations acknowledge at about the same time: their records share one commit. */
  private readonly delivered: GroupCommit<Delivered, void>;

  private async recordDelivered(tx: Queryable, d: Delivered): Promise<void> {
    for (const part of chunks(d.streamIds)) {
      await tx.run(`DELETE FROM device_list_outbound_pokes WHERE destination = ? AND stream_id IN (${placeholders(part.length)})`, [d.destination, ...part]);
    }
    for (const [userId, { from, to }] of d.chains) {
      if (from === undefined) {
        // A new chain: unless one was started meanwhile (a list read through /user/devices).
        await tx.run('INSERT INTO device_list_outbound_last_sent (destination, user_id, stream_id) VALUES (?, ?, ?) ON CONFLICT (destination, user_id) DO NOTHING', [d.destination, userId, to]);
      } else {
        await tx.run('UPDATE device_list_outbound_last_sent SET stream_id = ? WHERE destination = ? AND user_id = ? AND stream_id = ?', [to, d.destination, userId, from]);
      }
    }
  }

  pokesDelivered(destination: string, streamIds: readonly number[], chains: ReadonlyMap<string, { readonly from: number | undefined; readonly to: number }>): Promise<void> {
    return this.delivered.submit({ destination, streamIds, chains });
  }

  destinationsWithPokes(now: number): Promise<string[]> {
    return readyDestinations(this.db, 'device_list_outbound_pokes', now);
  }

  async pokeCounts(): Promise<Map<string, number>> {
    const rows = await this.db.all<{ destination: string; n: number }>('SELECT destination, COUNT(*) AS n FROM device_list_outbound_pokes GROUP BY destination');
    return new Map(rows.map((r) => [r.destination, r.n]));
  }

  async compressPokes(destination: string): Promise<number> {
    return this.db.transaction(async (tx) => {
      const dropped = await tx.run(
        `DELETE FROM device_list_outbound_pokes WHERE destination = ? AND stream_id NOT IN (
           SELECT MAX(stream_id) FROM device_list_outbound_pokes WHERE destination = ? GROUP BY user_id, device_id IS NULL)`,
        [destination, destination],
      );
      await tx.run('DELETE FROM device_list_outbound_last_sent WHERE destination = ?', [destination]);
      return dropped;
    });
  }

  async localDeviceStates(userId: string, deviceIds: readonly string[]): Promise<LocalDeviceState[]> {
    const out: LocalDeviceState[] = [];
    for (const part of chunks(deviceIds)) {
      const rows = await this.db.all<{ device_id: string; display_name: string | null; key_json: string | null }>(
        `SELECT d.device_id, d.display_name, k.key_json FROM devices d
         LEFT JOIN e2e_device_keys k ON k.user_id = d.user_id AND k.device_id = d.device_id
         WHERE d.user_id = ? AND d.device_id IN (${placeholders(part.length)})`,
        [userId, ...part],
      );
      for (const r of rows) out.push({ userId, deviceId: r.device_id, displayName: r.display_name, keyJson: r.key_json });
    }
    return out;
  }

  async getDestinations(destinations: readonly string[]): Promise<DestinationState[]> {
    const out: DestinationState[] = [];
    for (const part of chunks(destinations)) {
      const rows = await this.db.all<DestinationRow>(
        `SELECT destination, failure_count, retry_after_ts, first_failure_ts FROM federation_destinations WHERE destination IN (${placeholders(part.length)})`,
        part,
      );
      out.push(...rows.map(toDestination));
    }
    return out;
  }

  async putDestination(s: DestinationState): Promise<void> {
    if (s.failureCount === 0) {
      await this.db.run('DELETE FROM federation_destinations WHERE destination = ?', [s.destination]);
      return;
    }
    await this.db.run(
      `INSERT INTO federation_destinations (destination, failure_count, retry_after_ts, first_failure_ts) VALUES (?, ?, ?, ?)
       ON CONFLICT (destination) DO UPDATE SET failure_count = excluded.failure_count, retry_after_ts = excluded.retry_after_ts,
         first_failure_ts = excluded.first_failure_ts`,
      [s.destination, s.failureCount, s.retryAfterTs, s.firstFailureTs],
    );
  }

  async failingDestinations(): Promise<DestinationState[]> {
    const rows = await this.db.all<DestinationRow>('SELECT destination, failure_count, retry_after_ts, first_failure_ts FROM federation_destinations');
    return rows.map(toDestination);
  }

  async takeLease(name: string, owner: string, expiresTs: number, now: number): Promise<boolean> {
    const changed = await this.db.run(
      `INSERT INTO leases (name, owner, expires_ts) VALUES (?, ?, ?)
       ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_ts = excluded.expires_ts
       WHERE leases.owner = excluded.owner OR leases.expires_ts <= ?`,
      [name, owner, expiresTs, now],
    );
    return changed > 0;
  }

  async releaseLease(name: string, owner: string): Promise<void> {
    await this.db.run('DELETE FROM leases WHERE name = ? AND owner = ?', [name, owner]);
  }

  async leaseOwners(): Promise<string[]> {
    return (await this.db.all<{ owner: string }>('SELECT DISTINCT owner FROM leases')).map((r) => r.owner);
  }

  async releaseLeasesOf(owner: string): Promise<void> {
    await this.db.run('DELETE FROM leases WHERE owner = ?', [owner]);
  }

  async getInboundTransaction(origin: string, txnId: string): Promise<string | undefined> {
    return (await this.db.get<{ response_json: string }>('SELECT response_json FROM federation_inbound_transactions WHERE origin = ? AND txn_id = ?', [origin, txnId]))
      ?.response_json;
  }

  async putInboundTransaction(origin: string, txnId: string, responseJson: string, now: number): Promise<void> {
    await this.db.run(
      'INSERT INTO federation_inbound_transactions (origin, txn_id, response_json, received_ts) VALUES (?, ?, ?, ?) ON CONFLICT (origin, txn_id) DO NOTHING',
      [origin, txnId, responseJson, now],
    );
  }

  async cleanup(now: number, inboundTransactionsBeforeTs: number): Promise<{ subscriptionsExpired: number }> {
    return this.db.transaction(async (tx) => {
      const lapsed = `SELECT server_name, user_id FROM device_list_subscriptions WHERE expires_ts IS NOT NULL AND expires_ts <= ?`;
      await tx.run(`DELETE FROM device_list_outbound_pokes WHERE (destination, user_id) IN (${lapsed})`, [now]);
      await tx.run(`DELETE FROM device_list_outbound_last_sent WHERE (destination, user_id) IN (${lapsed})`, [now]);
      const subscriptionsExpired = await tx.run('DELETE FROM device_list_subscriptions WHERE expires_ts IS NOT NULL AND expires_ts <= ?', [now]);
      // Chains of servers no longer subscribed.
      await tx.run(
        `DELETE FROM device_list_outbound_last_sent WHERE NOT EXISTS (
           SELECT 1 FROM device_list_subscriptions s WHERE s.server_name = device_list_outbound_last_sent.destination AND s.user_id = device_list_outbound_last_sent.user_id)`,
      );
      await tx.run('DELETE FROM federation_inbound_transactions WHERE received_ts < ?', [inboundTransactionsBeforeTs]);
      return { subscriptionsExpired };
    });
  }
}
