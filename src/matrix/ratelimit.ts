/**
 * A leaky-bucket rate limiter, per key (a user ID, an address, a server name), as Synapse's
 * `rc_*` settings describe one: `burst_count` actions at once, refilling at `per_second`.
 * Rejections carry `retry_after_ms` for the 429 M_LIMIT_EXCEEDED response (C-S spec, "Rate limiting").
 * State is per process.
 */
import { limitExceeded } from './errors.js';

export interface RateLimit {
  readonly per_second: number;
  readonly burst_count: number;
}

interface Bucket {
  level: number;
  at: number;
}

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();

  constructor(
    private readonly limit: RateLimit,
    private readonly now: () => number = Date.now,
  ) {}

  private levelOf(key: string, now: number): number {
    const b = this.buckets.get(key);
    if (!b) return 0;
    return Math.max(0, b.level - ((now - b.at) / 1000) * this.limit.per_second);
  }

  /** Milliseconds until one more action is allowed for `key`; 0 when it is allowed now. */
  retryAfterMs(key: string): number {
    const level = this.levelOf(key, this.now());
    if (level + 1 <= this.limit.burst_count) return 0;
    return Math.ceil(((level + 1 - this.limit.burst_count) / this.limit.per_second) * 1000);
  }

  /** Records one action for `key`. */
  record(key: string): void {
    const now = this.now();
    const level = this.levelOf(key, now);
    if (this.buckets.size >= 50_000) this.sweep(now);
    this.buckets.set(key, { level: level + 1, at: now });
  }

  /** Takes back one recorded action (e.g. an attempt that turned out to succeed). */
  refund(key: string): void {
    const b = this.buckets.get(key);
    if (b) b.level = Math.max(0, b.level - 1);
  }

  /** Records an action if allowed; otherwise throws 429 M_LIMIT_EXCEEDED. */
  take(key: string, what: string): void {
    this.assertAllowed(key, what);
    this.record(key);
  }

  /** Throws 429 M_LIMIT_EXCEEDED when `key` has no action left, without recording one. */
  assertAllowed(key: string, what: string): void {
    const retry = this.retryAfterMs(key);
    if (retry > 0) {
      throw limitExceeded(`Too many ${what}; retry in ${Math.ceil(retry / 1000)} s`, retry);
    }
  }

  private sweep(now: number): void {
    for (const [key] of this.buckets) if (this.levelOf(key, now) === 0) this.buckets.delete(key);
  }
}
