/**
 * Counted slots for work that must not all run at once (password hashes, fetches of other
 * servers' keys). An acquisition names every limit it counts against (`{ key, limit }`: at most
 * `limit` holders of `key` at a time) and runs when it fits under all of them. Otherwise it waits,
 * in order of arrival but skipping waiters that are still blocked (so one busy key never holds up
 * the others), until it fits or its time is up. Waiting is bounded per key too (`queue`), so one
 * source of work cannot fill the queue for everyone. State is per process.
 */

export interface SlotLimit {
  readonly key: string;
  /** Most holders of `key` at once. */
  readonly limit: number;
  /** Most acquisitions waiting on `key` at once; beyond it they give up at once (default: no bound). */
  readonly queue?: number;
}

/** Gives the slot back; calling it again does nothing. */
export type Release = () => void;

/** Thrown when an acquisition gives up: `limit` is the limit that was full. */
export class SlotsBusy extends Error {
  constructor(readonly limit: SlotLimit) {
    super(`more than ${limit.limit} at once for ${limit.key}`);
    this.name = 'SlotsBusy';
  }
}

interface Waiter {
  readonly limits: readonly SlotLimit[];
  readonly grant: (release: Release) => void;
  readonly timer: NodeJS.Timeout;
}

export class Slots {
  private readonly held = new Map<string, number>();
  private readonly waitingOn = new Map<string, number>();
  private readonly waiting: Waiter[] = [];

  /** The first limit that has no free slot, if any. */
  private full(limits: readonly SlotLimit[]): SlotLimit | undefined {
    return limits.find((l) => (this.held.get(l.key) ?? 0) >= l.limit);
  }

  private take(limits: readonly SlotLimit[]): Release {
    for (const l of limits) this.held.set(l.key, (this.held.get(l.key) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const l of limits) {
        const n = (this.held.get(l.key) ?? 1) - 1;
        if (n === 0) this.held.delete(l.key);
        else this.held.set(l.key, n);
      }
      this.grantWaiting();
    };
  }

  private count(map: Map<string, number>, key: string, delta: number): void {
    const n = (map.get(key) ?? 0) + delta;
    if (n <= 0) map.delete(key);
    else map.set(key, n);
  }

  private unqueue(w: Waiter): void {
    const i = this.waiting.indexOf(w);
    if (i >= 0) this.waiting.splice(i, 1);
    for (const l of w.limits) this.count(this.waitingOn, l.key, -1);
  }

  private grantWaiting(): void {
    for (const w of [...this.waiting]) {
      if (this.full(w.limits)) continue;
      this.unqueue(w);
      clearTimeout(w.timer);
      w.grant(this.take(w.limits));
    }
  }

  /** A slot now, or the limit that is full. */
  tryAcquire(limits: readonly SlotLimit[]): Release | SlotLimit {
    // A waiter is granted the moment its limits allow it (in release()), so no waiter could use
    // a slot that is free now: taking it overtakes nobody.
    return this.full(limits) ?? this.take(limits);
  }

  /** A slot, waiting up to `waitMs` for one; rejects with SlotsBusy when there is none by then. */
  acquire(limits: readonly SlotLimit[], waitMs: number): Promise<Release> {
    const now = this.tryAcquire(limits);
    if (typeof now === 'function') return Promise.resolve(now);
    const queueFull = limits.find((l) => l.queue !== undefined && (this.waitingOn.get(l.key) ?? 0) >= l.queue);
    if (queueFull || waitMs <= 0) return Promise.reject(new SlotsBusy(queueFull ?? now));
    return new Promise<Release>((resolve, reject) => {
      const waiter: Waiter = {
        limits,
        grant: resolve,
        timer: setTimeout(() => {
          this.unqueue(waiter);
          reject(new SlotsBusy(this.full(limits) ?? now));
        }, waitMs),
      };
      this.waiting.push(waiter);
      for (const l of limits) this.count(this.waitingOn, l.key, 1);
    });
  }

  /** Holders of `key` right now (metrics and tests). */
  holding(key: string): number {
    return this.held.get(key) ?? 0;
  }
}
