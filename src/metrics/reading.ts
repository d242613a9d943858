/**
 * A figure that metrics read from the database at scrape time (devices low on one-time keys,
 * pending to-device messages). A scrape must neither fail nor hang because the database is down
 * or slow, and scrapes that come often (several Prometheus servers, or one per worker) must not
 * each cost a query: the figure is read at most once per `everyMs`, a scrape waits at most
 * `waitMs` for that read, and otherwise gets the last figure read (a slow read finishes in the
 * background and updates it).
 */
export interface ReadingOptions {
  /** A figure read this recently is served without reading again. */
  readonly everyMs: number;
  /** How long a scrape waits for a read before serving the last figure. */
  readonly waitMs: number;
  readonly now: () => number;
}

export interface Reading<T> {
  readonly value: T;
  /** When the value was read (the `now` clock). */
  readonly readAt: number;
}

export class DatabaseReading<T> {
  private last: Reading<T> | undefined;
  /** When the latest read started, successful or not: a failing database is not asked again sooner. */
  private startedAt = -Infinity;
  private inFlight: Promise<void> | undefined;
  /** Reads that failed (a read that is slow but succeeds later is not counted). */
  failures = 0;

  constructor(
    private readonly read: () => Promise<T>,
    private readonly options: ReadingOptions,
  ) {}

  /** The figure for a scrape: fresh if it can be had in time, else the last one; undefined if none was ever read. */
  async get(): Promise<Reading<T> | undefined> {
    const { now, everyMs, waitMs } = this.options;
    if (this.inFlight === undefined && now() - this.startedAt >= everyMs) {
      const startedAt = now();
      this.startedAt = startedAt;
      this.inFlight = Promise.resolve()
        .then(this.read)
        .then(
          (value) => {
            this.last = { value, readAt: startedAt };
          },
          () => {
            this.failures++;
          },
        )
        .finally(() => (this.inFlight = undefined));
    }
    if (this.inFlight !== undefined) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.inFlight, new Promise<void>((resolve) => (timer = setTimeout(resolve, waitMs)))]);
      clearTimeout(timer);
    }
    return this.last;
  }
}
