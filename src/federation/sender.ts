/**
 * The outgoing federation sender (server-server API, "Transactions"): EDUs waiting in the
 * database for a destination are sent in PUT /_matrix/federation/v1/send/{txnId} transactions of
 * at most 100 EDUs. A transaction is retried with the same txnId until the destination answers
 * 200 ("must wait and retry for a 200 OK response before sending a transaction with a different
 * txnId"), with the destination's exponential retry wait between attempts; only then are its EDUs
 * removed from the queue. Delivery is at least once: a crash between the 200 and that removal
 * sends them again, which receivers absorb (stream_id order, message_id duplicates).
 *
 * The queue lives in the database, so a restart or kill -9 loses nothing. With several processes
 * on one database, a lease row makes one of them the sender for a destination at a time. The
 * sender is woken at once by changes made in this process, and polls for work queued by others.
 *
 * What is sent comes from EDU sources (device-list updates, to-device messages), each owning its
 * queue; the sender owns transactions, retries and leases.
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import type { FederationStore } from '../storage/store.js';
import type { Destinations } from './destinations.js';
import { isDatabaseOutage } from './device-list-cache.js';
import { ask, type SignedRequester } from './device-list-cache.js';

export interface Edu {
  readonly edu_type: string;
  readonly content: Record<string, unknown>;
}

export interface OutgoingEdus {
  readonly edus: readonly Edu[];
  /** Removes these EDUs from the queue once the destination has acknowledged them. */
  delivered(): Promise<void>;
}

export interface EduSource {
  /** What it sends, for metrics: `device_list`, `to_device`. */
  readonly kind: string;
  /** Up to `limit` EDUs waiting for `destination`, oldest first; undefined when there are none. */
  take(destination: string, limit: number): Promise<OutgoingEdus | undefined>;
  /** Destinations with EDUs waiting that are not in their retry wait at `now`. */
  destinations(now: number): Promise<string[]>;
  /** EDUs (or changes they are built from) waiting per destination, for metrics. */
  queued(): Promise<Map<string, number>>;
}

/** transactions.yaml: "Must not include more than 100 EDUs." */
export const MAX_EDUS_PER_TRANSACTION = 100;
const LEASE_MS = 30_000;
/** How long new changes are gathered before they are sent. */
const GATHER_MS = 10;
/** Queue depths are read from the database at most this often (they are a metric). */
const QUEUE_DEPTH_EVERY_MS = 5_000;

export interface SenderOptions {
  readonly serverName: string;
  readonly client: SignedRequester;
  readonly store: Pick<FederationStore, 'takeLease' | 'releaseLease' | 'leaseOwners' | 'releaseLeasesOf'>;
  readonly destinations: Destinations;
  readonly sources: readonly EduSource[];
  /** The lease owner name of this process (newLeaseOwner()); a new one when left out. */
  readonly owner?: string;
  /** How often to look for work queued by other processes (and retries that are due). */
  readonly pollIntervalMs: number;
  readonly now?: () => number;
  readonly log?: (level: 'info' | 'warn', message: string, details: Record<string, unknown>) => void;
}

interface Transaction {
  readonly txnId: string;
  readonly edus: readonly Edu[];
  readonly delivered: readonly (() => Promise<void>)[];
}

interface DestinationQueue {
  running: boolean;
  /** Woken while running: look for work again before stopping. */
  again: boolean;
  /** A transaction sent at least once and not yet acknowledged: retried as it is. */
  unsent: Transaction | undefined;
  retryTimer: NodeJS.Timeout | undefined;
}

/** Lease owners are `<host>/<pid>/<random>`, so a restarted process can free its dead predecessor's leases. */
export function newLeaseOwner(): string {
  return `${hostname()}/${process.pid}/${randomBytes(4).toString('hex')}`;
}

function processIsAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class FederationSender {
  /** This process's name in `leases` (other jobs of the process may hold leases under it too). */
  readonly owner: string;
  private readonly queues = new Map<string, DestinationQueue>();
  private readonly now: () => number;
  private pollTimer: NodeJS.Timeout | undefined;
  private soonTimer: NodeJS.Timeout | undefined;
  private polling: Promise<void> | undefined;
  private stopped = false;
  private counter = 0;
  /** Counts for metrics. */
  readonly stats = { transactionsSent: 0, edusSent: 0, transactionsFailed: 0 };
  /** Queued EDUs per destination and source kind, as last read (metrics). */
  queueDepths: readonly { readonly destination: string; readonly kind: string; readonly queued: number }[] = [];
  private queueDepthsAt = 0;

  constructor(private readonly options: SenderOptions) {
    this.now = options.now ?? Date.now;
    this.owner = options.owner ?? newLeaseOwner();
  }

  private log(level: 'info' | 'warn', message: string, details: Record<string, unknown>): void {
    this.options.log?.(level, message, details);
  }

  /** Starts polling; frees leases left by processes of this host that have died (kill -9). */
  async start(): Promise<void> {
    const [host] = this.owner.split('/');
    for (const owner of await this.options.store.leaseOwners()) {
      const [h, pid] = owner.split('/');
      if (h === host && pid !== undefined && Number(pid) !== process.pid && !processIsAlive(Number(pid))) await this.options.store.releaseLeasesOf(owner);
    }
    this.pollTimer = setInterval(() => void this.poll(), this.options.pollIntervalMs);
    this.pollTimer.unref();
    void this.poll();
  }

  /** Looks for destinations with work: queued by any process, or due for a retry. */
  poll(): Promise<void> {
    this.polling ??= (async () => {
      try {
        await this.options.destinations.refresh();
        const now = this.now();
        for (const source of this.options.sources) for (const d of await source.destinations(now)) this.wake(d);
        if (now - this.queueDepthsAt >= QUEUE_DEPTH_EVERY_MS) {
          this.queueDepthsAt = now;
          const depths: { destination: string; kind: string; queued: number }[] = [];
          for (const source of this.options.sources) for (const [destination, queued] of await source.queued()) depths.push({ destination, kind: source.kind, queued });
          this.queueDepths = depths;
        }
      } catch (e) {
        // A database outage is reported once by the storage layer, not on every poll.
        if (!isDatabaseOutage(e)) this.log('warn', 'the federation sender could not look for queued EDUs; trying again shortly', { reason: (e as Error).message });
      } finally {
        this.polling = undefined;
      }
    })();
    return this.polling;
  }

  /**
   * Something was queued: look for work shortly. A burst of changes (a user's devices, many users
   * at once) is gathered for a few milliseconds, so it travels in fewer, fuller transactions.
   */
  soon(): void {
    if (this.soonTimer !== undefined || this.stopped) return;
    this.soonTimer = setTimeout(() => {
      this.soonTimer = undefined;
      void this.poll();
    }, GATHER_MS);
  }

  /** Sends what is queued for `destination` now (unless it is in its retry wait). */
  wake(destination: string): void {
    if (this.stopped) return;
    let q = this.queues.get(destination);
    if (!q) this.queues.set(destination, (q = { running: false, again: false, unsent: undefined, retryTimer: undefined }));
    if (q.running) {
      q.again = true;
      return;
    }
    void this.run(destination, q);
  }

  private async run(destination: string, q: DestinationQueue): Promise<void> {
    q.running = true;
    try {
      do {
        q.again = false;
        await this.drain(destination, q);
      } while (q.again && !this.stopped);
    } catch (e) {
      if (!isDatabaseOutage(e)) this.log('warn', 'the federation sender failed; it will try again', { destination, reason: (e as Error).message });
      this.retryLater(destination, q, this.now() + this.options.pollIntervalMs);
    } finally {
      q.running = false;
      if (q.unsent === undefined && q.retryTimer === undefined) this.queues.delete(destination);
    }
  }

  private retryLater(destination: string, q: DestinationQueue, at: number): void {
    if (this.stopped || q.retryTimer !== undefined) return;
    q.retryTimer = setTimeout(() => {
      q.retryTimer = undefined;
      this.wake(destination);
    }, Math.max(0, at - this.now()));
    q.retryTimer.unref();
  }

  private newTxnId(): string {
    return `${this.now().toString(36)}${(this.counter++).toString(36)}${this.owner.slice(-8)}`;
  }

  private async build(destination: string): Promise<Transaction | undefined> {
    const edus: Edu[] = [];
    const delivered: (() => Promise<void>)[] = [];
    for (const source of this.options.sources) {
      if (edus.length >= MAX_EDUS_PER_TRANSACTION) break;
      const batch = await source.take(destination, MAX_EDUS_PER_TRANSACTION - edus.length);
      if (!batch || batch.edus.length === 0) continue;
      edus.push(...batch.edus);
      delivered.push(() => batch.delivered());
    }
    return edus.length === 0 ? undefined : { txnId: this.newTxnId(), edus, delivered };
  }

  /** Sends transactions to `destination` until its queue is empty, it fails, or another process holds it. */
  private async drain(destination: string, q: DestinationQueue): Promise<void> {
    const { destinations, store } = this.options;
    if (destinations.isWaiting(destination)) {
      this.retryLater(destination, q, destinations.retryAfter(destination));
      return;
    }
    const lease = `send:${destination}`;
    const take = () => store.takeLease(lease, this.owner, this.now() + LEASE_MS, this.now());
    if (!(await take())) {
      // Another process sends to this destination: what this one built may be stale by now.
      q.unsent = undefined;
      return;
    }
    // Renewed while sending, so a slow destination cannot make the lease lapse mid-request.
    let held = true;
    const renewal = setInterval(() => void take().then((ok) => (held &&= ok), () => (held = false)), LEASE_MS / 3);
    renewal.unref();
    try {
      while (!this.stopped) {
        const txn = q.unsent ?? (await this.build(destination));
        if (!txn) return;
        q.unsent = txn;
        if (!held || !(await take())) {
          q.unsent = undefined;
          return;
        }
        const body = { origin: this.options.serverName, origin_server_ts: this.now(), pdus: [], edus: txn.edus };
        const answer = await ask(this.options.client, destinations, destination, `/_matrix/federation/v1/send/${encodeURIComponent(txn.txnId)}`, {
          method: 'PUT',
          body,
          // A transaction is delivered only by a 200; any other answer means "later".
          onlyOkIsSuccess: true,
        });
        if (!answer.ok) {
          this.stats.transactionsFailed++;
          this.log('info', 'a federation transaction was not accepted; it will be sent again', { destination, txnId: txn.txnId, status: answer.status, reason: answer.message });
          this.retryLater(destination, q, destinations.retryAfter(destination));
          return;
        }
        for (const done of txn.delivered) await done();
        q.unsent = undefined;
        this.stats.transactionsSent++;
        this.stats.edusSent += txn.edus.length;
      }
    } finally {
      clearInterval(renewal);
      await store.releaseLease(lease, this.owner).catch(() => undefined);
    }
  }

  /** Stops sending: no new transactions; waits for the ones in flight. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.pollTimer) clearInterval(this.pollTimer);
    if (this.soonTimer) clearTimeout(this.soonTimer);
    await this.polling;
    for (const q of this.queues.values()) if (q.retryTimer) clearTimeout(q.retryTimer);
    while ([...this.queues.values()].some((q) => q.running)) await new Promise((r) => setTimeout(r, 10));
  }
}
