/**
 * Periodic federation housekeeping, done by one process of those sharing a database (a lease that
 * the process doing it keeps from round to round, so N processes do one round per interval, not
 * N; another takes over once it lapses), with other stores' cleanup (`housekeeping`): refetching
 * cached remote device lists that are stale or due for a refresh, and dropping those nobody here
 * follows any more; dropping lapsed subscriptions (with their queued updates and chains) and old
 * transaction records; and, for a destination that has taken no
 * transaction for `maxUndeliveredAgeMs`, keeping only the newest queued change per user and
 * breaking its EDU chains, so when it comes back it resyncs instead of replaying a long backlog.
 */
import type { FederationStore } from '../storage/store.js';
import type { Destinations } from './destinations.js';
import { isDatabaseOutage } from './device-list-cache.js';
import type { RemoteDeviceListCache } from './device-list-cache.js';

/** Received transaction records are kept this long: senders retry a txnId well within it. */
const INBOUND_TRANSACTION_RETENTION_MS = 24 * 3_600_000;
/** Remote lists refetched per round, at most. */
const REFRESH_BATCH = 200;
const LEASE = 'job:federation-maintenance';

export interface MaintenanceOptions {
  readonly store: Pick<FederationStore, 'takeLease' | 'releaseLease' | 'cleanup' | 'compressPokes'>;
  readonly cache: RemoteDeviceListCache;
  readonly destinations: Destinations;
  readonly owner: string;
  readonly intervalMs: number;
  readonly maxUndeliveredAgeMs: number;
  /** Other stores' periodic cleanup (old to-device transaction and message IDs), run under the same lease. */
  readonly housekeeping?: readonly (() => Promise<void>)[];
  readonly now?: () => number;
  readonly log?: (level: 'info' | 'warn', message: string, details: Record<string, unknown>) => void;
}

export class FederationMaintenance {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private readonly now: () => number;

  constructor(private readonly options: MaintenanceOptions) {
    this.now = options.now ?? Date.now;
  }

  start(): void {
    this.timer = setInterval(() => void this.runOnce(), this.options.intervalMs);
    this.timer.unref();
  }

  /** One round, unless another process is doing one (or this one already is). */
  runOnce(): Promise<void> {
    this.running ??= this.round().finally(() => (this.running = undefined));
    return this.running;
  }

  private async round(): Promise<void> {
    const { store, owner, log, intervalMs } = this.options;
    try {
      // Held generously while the round runs (it may wait on other servers)…
      if (!(await store.takeLease(LEASE, owner, this.now() + 2 * intervalMs + 60_000, this.now()))) return;
      try {
        const now = this.now();
        const { subscriptionsExpired } = await store.cleanup(now, now - INBOUND_TRANSACTION_RETENTION_MS);
        if (subscriptionsExpired > 0) log?.('info', 'device-list subscriptions lapsed', { count: subscriptionsExpired });
        await this.options.destinations.refresh();
        for (const { destination: d, since } of this.options.destinations.failing()) {
          if (now - since < this.options.maxUndeliveredAgeMs) continue;
          const dropped = await store.compressPokes(d);
          if (dropped > 0) log?.('warn', 'a destination has been unreachable for long; dropped older queued device-list updates (it will refetch the lists)', { destination: d, dropped });
        }
        const forgotten = await this.options.cache.forgetUntracked();
        if (forgotten > 0) log?.('info', 'dropped cached device lists of remote users nobody here follows any more', { count: forgotten });
        for (const job of this.options.housekeeping ?? []) await job();
        await this.options.cache.refreshDue(REFRESH_BATCH);
      } finally {
        // …then kept until a little after this process's next round is due, so no other process
        // runs one meanwhile; it lapses if this process stops without releasing it.
        await store.takeLease(LEASE, owner, this.now() + Math.round(1.5 * intervalMs), this.now());
      }
    } catch (e) {
      if (!isDatabaseOutage(e)) log?.('warn', 'federation housekeeping failed; it will run again', { reason: (e as Error).message });
    }
  }

  /** Stops; lets another process take the housekeeping over at its next round. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.running;
    await this.options.store.releaseLease(LEASE, this.options.owner).catch(() => undefined);
  }
}
