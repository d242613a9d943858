/**
 * Removing the keys of deleted backup versions (DELETE /room_keys/version/{version}, and every
 * version of a deactivated user). The deletion itself only marks the version deleted, so its keys
 * are gone for clients at once; the rows are removed here afterwards, PURGE_BATCH keys per
 * transaction with a turn of the event loop between batches. A version of a million keys then
 * never holds the database (on SQLite, the whole process) for more than one batch, where a single
 * DELETE would hold it for seconds. Work left by a crash, or by another process (a command-line
 * deactivation), is found by a sweep at start and every minute. Of the processes sharing a
 * database (the workers of `serve --workers`, nodes on one PostgreSQL), one purges: the one holding
 * the purge lease, which it keeps from sweep to sweep as long as it runs. Uses the BackupStore, and
 * the lease it is given.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { BackupStore } from '../storage/store.js';

/** Keys removed per transaction: a few milliseconds of database time. */
export const PURGE_BATCH = 2000;
const SWEEP_INTERVAL_MS = 60_000;

/** The once-per-cluster lease on purging, as the composition root binds it to this process. */
export interface PurgeLease {
  /** Takes or renews the lease until `expiresTs`; false while another process holds it. */
  take(expiresTs: number, now: number): Promise<boolean>;
  release(): Promise<void>;
}

export interface BackupPurgerOptions {
  readonly store: BackupStore;
  /** Left out for a one-off run (a command-line deactivation): it then purges whenever asked. */
  readonly lease?: PurgeLease;
  readonly batchSize?: number;
  readonly intervalMs?: number;
  readonly now?: () => number;
  /** Reports a purge that failed (it is tried again at the next sweep). */
  readonly log?: (message: string, details: Record<string, unknown>) => void;
}

export class BackupPurger {
  private readonly batchSize: number;
  private running: Promise<void> | undefined;
  /** Another run was asked for while one was going on. */
  private again = false;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private readonly intervalMs: number;
  private readonly now: () => number;
  /** When the lease was last taken or renewed while purging. */
  private renewedAt = -Infinity;

  constructor(private readonly options: BackupPurgerOptions) {
    this.batchSize = options.batchSize ?? PURGE_BATCH;
    this.intervalMs = options.intervalMs ?? SWEEP_INTERVAL_MS;
    this.now = options.now ?? Date.now;
  }

  /** Sweeps now and then every minute, in the background. */
  start(): void {
    this.stopped = false;
    this.kick();
    this.timer = setInterval(() => this.kick(), this.intervalMs);
    this.timer.unref();
  }

  /**
   * Purges what deleted versions hold, soon, in the background. In a process that does not hold
   * the purge lease this does nothing: the process holding it finds the work at its next sweep.
   */
  kick(): void {
    void this.drain().catch(() => undefined);
  }

  /**
   * Resolves once no deleted version has keys left, or at once when another process holds the
   * purge lease (a failed purge rejects).
   */
  drain(): Promise<void> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    const run = this.run().finally(() => {
      this.running = undefined;
    });
    this.running = run;
    return run;
  }

  /**
   * Takes or renews the lease, generously while purging (a sweep may take a while); false if
   * another process holds it. Renewed at most every half interval, not on every batch.
   */
  private async holdLease(): Promise<boolean> {
    const lease = this.options.lease;
    if (!lease) return true;
    const now = this.now();
    if (now - this.renewedAt < this.intervalMs / 2) return true;
    if (!(await lease.take(now + 2 * this.intervalMs + 60_000, now))) return false;
    this.renewedAt = now;
    return true;
  }

  private async run(): Promise<void> {
    try {
      this.renewedAt = -Infinity;
      this.again = false;
      while (!(await this.holdLease())) {
        // A drain asked for while the lease was being tried (another process may have released
        // it meanwhile) tries once more, rather than returning what began before it.
        if (!this.again || this.stopped) return;
        this.again = false;
      }
      try {
        do {
          this.again = false;
          for (;;) {
            const pending = await this.options.store.deletedVersionsWithKeys(100);
            if (pending.length === 0 || this.stopped) break;
            for (const { userId, version } of pending) {
              for (;;) {
                // Another process took the lease over (this one was taken for dead): it goes on.
                if (!(await this.holdLease())) return;
                if (this.stopped || (await this.options.store.purgeDeletedKeys(userId, version, this.batchSize)) < this.batchSize) break;
                await nextTurn();
              }
              await nextTurn();
            }
          }
        } while (this.again && !this.stopped);
      } finally {
        // Kept until a little after this process's next sweep is due, so no other process sweeps
        // meanwhile; it lapses if this process stops without releasing it.
        if (!this.stopped) await this.options.lease?.take(this.now() + Math.round(1.5 * this.intervalMs), this.now());
      }
    } catch (e) {
      // A database outage is logged once by the storage layer, not again on every sweep.
      if ((e as Error).name !== 'DatabaseUnavailableError') {
        this.options.log?.('could not remove the keys of deleted key backup versions; trying again at the next sweep', { reason: (e as Error).message });
      }
      throw e;
    }
  }

  /** Stops sweeping, waits for the batch in progress, and lets another process take the purging over. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.running?.catch(() => undefined);
    await this.options.lease?.release().catch(() => undefined);
  }
}
