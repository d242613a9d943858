/**
 * Removing the keys of deleted backup versions (DELETE /room_keys/version/{version}, and every
 * version of a deactivated user). The deletion itself only marks the version deleted, so its keys
 * are gone for clients at once; the rows are removed here afterwards, PURGE_BATCH keys per
 * transaction with a turn of the event loop between batches. A version of a million keys then
 * never holds the database (on SQLite, the whole process) for more than one batch, where a single
 * DELETE would hold it for seconds. Work left by a crash, or by another process (a command-line
 * deactivation), is found by a sweep at start and every minute. Uses the BackupStore only.
 */
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { BackupStore } from '../storage/store.js';

/** Keys removed per transaction: a few milliseconds of database time. */
export const PURGE_BATCH = 2000;
const SWEEP_INTERVAL_MS = 60_000;

export interface BackupPurgerOptions {
  readonly store: BackupStore;
  readonly batchSize?: number;
  readonly intervalMs?: number;
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

  constructor(private readonly options: BackupPurgerOptions) {
    this.batchSize = options.batchSize ?? PURGE_BATCH;
  }

  /** Sweeps now and then every minute, in the background. */
  start(): void {
    this.stopped = false;
    this.kick();
    this.timer = setInterval(() => this.kick(), this.options.intervalMs ?? SWEEP_INTERVAL_MS);
    this.timer.unref();
  }

  /** Purges what deleted versions hold, soon, in the background. */
  kick(): void {
    void this.drain().catch(() => undefined);
  }

  /** Resolves once no deleted version has keys left (or a purge failed: it rejects then). */
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

  private async run(): Promise<void> {
    try {
      do {
        this.again = false;
        for (;;) {
          const pending = await this.options.store.deletedVersionsWithKeys(100);
          if (pending.length === 0 || this.stopped) break;
          for (const { userId, version } of pending) {
            while (!this.stopped && (await this.options.store.purgeDeletedKeys(userId, version, this.batchSize)) === this.batchSize) await nextTurn();
            await nextTurn();
          }
        }
      } while (this.again && !this.stopped);
    } catch (e) {
      // A database outage is logged once by the storage layer, not again on every sweep.
      if ((e as Error).name !== 'DatabaseUnavailableError') {
        this.options.log?.('could not remove the keys of deleted key backup versions; trying again at the next sweep', { reason: (e as Error).message });
      }
      throw e;
    }
  }

  /** Stops sweeping and waits for the batch in progress. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.running?.catch(() => undefined);
  }
}
