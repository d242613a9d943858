/**
 * Group commit: writes that arrive together (in one turn of the event loop) are committed in one
 * transaction, so they share one commit — on SQLite one fsync, which costs more than the writes.
 * Each write still runs on its own; if the shared transaction fails, each is retried in a
 * transaction of its own, so one bad write cannot fail the others.
 */
import type { Queryable, SqlDatabase } from './sql.js';

export class GroupCommit<T, R> {
  private queue: { item: T; resolve: (r: R) => void; reject: (e: unknown) => void }[] = [];

  constructor(
    private readonly db: SqlDatabase,
    private readonly write: (tx: Queryable, item: T) => Promise<R>,
  ) {}

  submit(item: T): Promise<R> {
    return new Promise((resolve, reject) => {
      this.queue.push({ item, resolve, reject });
      if (this.queue.length === 1) setImmediate(() => void this.flush());
    });
  }

  private async flush(): Promise<void> {
    const batch = this.queue;
    this.queue = [];
    if (batch.length > 1) {
      try {
        const results = await this.db.transaction(async (tx) => {
          const out: R[] = [];
          for (const b of batch) out.push(await this.write(tx, b.item));
          return out;
        });
        batch.forEach((b, i) => b.resolve(results[i]!));
        return;
      } catch {
        // One at a time below: only the writes that fail on their own fail.
      }
    }
    for (const b of batch) {
      try {
        b.resolve(await this.db.transaction((tx) => this.write(tx, b.item)));
      } catch (e) {
        b.reject(e);
      }
    }
  }
}
