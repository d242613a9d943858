/**
 * Commits by other processes on one PostgreSQL database, noticed through LISTEN/NOTIFY, so the
 * read caches (read-cache.ts, the query-answer cache) can be used on PostgreSQL as on SQLite.
 *
 * Triggers (migration 11) send a notification on CHANGE_CHANNEL, with the schema's name as the
 * payload, from every statement that changes a table a cached read reads. This process listens on
 * a connection of its own and moves its data generation on for each one.
 *
 * The staleness bound: every `bound / 5` the listener also notifies itself ("ping"). PostgreSQL
 * delivers notifications in commit order, so when a ping sent at time s comes back, every change
 * committed before s has been delivered already. Caches are used only while the last ping that
 * came back was sent less than `bound` ago; otherwise (connection lost, database slow, not yet
 * connected) `live()` is false, and the caches are dropped and every read goes to the database.
 * So a cached answer never misses a change committed more than `bound` before it was served.
 */
import pg from 'pg';
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';

export const CHANGE_CHANNEL = 'mxkeys_changes';
export const LISTENER_NAME = 'mxkeys change listener';
/** Payloads: `c<schema>` for a change, `p<instance>:<n>` for a ping. */
const CHANGE = 'c';
const PING = 'p';

const RECONNECT_MIN_MS = 100;
const RECONNECT_MAX_MS = 5_000;
const MIN_PING_INTERVAL_MS = 20;

export interface ChangeListenerOptions {
  readonly connectionString: string;
  /** Milliseconds; see the file comment. */
  readonly boundMs: number;
  readonly connectTimeoutMs: number;
  /** Called for every change committed (by any process, this one included) on this schema. */
  readonly onChange: () => void;
}

export class ChangeListener {
  private readonly instance = randomUUID().slice(0, 8);
  private readonly pingPrefix = `${PING}${this.instance}:`;
  private readonly pingIntervalMs: number;
  private client: pg.Client | undefined;
  private schemaPayload: string | undefined;
  /** Pings sent and not yet back, oldest first: [number, performance.now() when sent]. */
  private readonly pending: [number, number][] = [];
  private nextPing = 0;
  /** When the last ping that came back was sent (performance.now()). */
  private confirmedSentAt = -Infinity;
  private timer: NodeJS.Timeout | undefined;
  private reconnectDelay = RECONNECT_MIN_MS;
  private closed = false;

  constructor(private readonly options: ChangeListenerOptions) {
    this.pingIntervalMs = Math.max(MIN_PING_INTERVAL_MS, Math.floor(options.boundMs / 5));
    void this.connect();
  }

  /** Whether caches may be used now: every change committed more than `boundMs` ago is known. */
  live(now = performance.now()): boolean {
    return now - this.confirmedSentAt < this.options.boundMs;
  }

  private async connect(): Promise<void> {
    if (this.closed) return;
    const client = new pg.Client({
      connectionString: this.options.connectionString,
      connectionTimeoutMillis: this.options.connectTimeoutMs,
      application_name: LISTENER_NAME,
      keepAlive: true,
    });
    this.client = client;
    client.on('error', () => this.drop(client));
    client.on('end', () => this.drop(client));
    client.on('notification', (n) => this.received(n.payload ?? ''));
    try {
      await client.connect();
      // Named after its schema, so an operator (or a test) can tell listeners apart in pg_stat_activity.
      const row = (await client.query<{ s: string }>(`SELECT current_schema() AS s, set_config('application_name', $1 || ' (' || current_schema() || ')', false)`, [LISTENER_NAME])).rows[0];
      this.schemaPayload = `${CHANGE}${row?.s ?? ''}`;
      await client.query(`LISTEN ${CHANGE_CHANNEL}`);
    } catch {
      this.drop(client);
      return;
    }
    if (this.client !== client) return;
    this.reconnectDelay = RECONNECT_MIN_MS;
    // Anything may have changed while nobody listened: the caches start empty.
    this.options.onChange();
    this.ping();
    this.timer = setInterval(() => this.ping(), this.pingIntervalMs);
    this.timer.unref();
  }

  private ping(): void {
    const client = this.client;
    if (client === undefined) return;
    const now = performance.now();
    const oldest = this.pending[0];
    if (oldest !== undefined) {
      // A ping that has not come back within a few bounds: the connection is dead without
      // having said so (e.g. a network partition). Start over on a new one.
      if (now - oldest[1] > Math.max(4 * this.options.boundMs, this.options.connectTimeoutMs)) {
        this.drop(client);
        return;
      }
      // One ping in flight at a time: a slow connection is not flooded.
      if (now - oldest[1] < this.pingIntervalMs * 4) return;
    }
    const n = this.nextPing++;
    this.pending.push([n, now]);
    client.query('SELECT pg_notify($1, $2)', [CHANGE_CHANNEL, `${this.pingPrefix}${n}`]).catch(() => this.drop(client));
  }

  private received(payload: string): void {
    if (payload === this.schemaPayload) {
      this.options.onChange();
      return;
    }
    if (!payload.startsWith(this.pingPrefix)) return; // another schema's change, or another process's ping
    const n = Number(payload.slice(this.pingPrefix.length));
    while (this.pending.length > 0 && this.pending[0]![0] <= n) {
      const [m, sentAt] = this.pending.shift()!;
      if (m === n) this.confirmedSentAt = sentAt;
    }
  }

  /** Forgets `client` (lost, or failed to connect) and connects again after a pause. */
  private drop(client: pg.Client): void {
    if (this.client !== client) return;
    this.client = undefined;
    this.confirmedSentAt = -Infinity;
    this.pending.length = 0;
    clearInterval(this.timer);
    client.removeAllListeners('notification');
    client.on('error', () => undefined);
    void client.end().catch(() => undefined);
    if (this.closed) return;
    const delay = this.reconnectDelay;
    this.reconnectDelay = Math.min(this.reconnectDelay * 2, RECONNECT_MAX_MS);
    setTimeout(() => void this.connect(), delay).unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    const client = this.client;
    this.client = undefined;
    this.confirmedSentAt = -Infinity;
    if (client) await client.end().catch(() => undefined);
  }
}
