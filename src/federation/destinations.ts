/**
 * Per-destination retry state, shared by everything that asks other servers (key queries and
 * claims, device-list resyncs, the EDU sender): after a failure, a destination is not asked again
 * for an interval that grows exponentially up to a cap; while it waits, key requests for its users
 * fail at once instead of waiting for a timeout. Any successful exchange with the destination —
 * an answer from it, or an authenticated request from it — ends the wait (as Synapse does).
 *
 * The state is kept in the database, so all processes sharing it agree, and in memory, so the
 * request path reads no row; each process refreshes its memory from the database when it polls.
 */
import type { DestinationState, FederationStore } from '../storage/store.js';

export interface RetryPolicy {
  /** Wait after the first failure (Synapse: `destination_min_retry_interval`). */
  readonly minIntervalMs: number;
  /** Each further failure multiplies the wait by this (`destination_retry_multiplier`). */
  readonly multiplier: number;
  /** The wait never exceeds this (`destination_max_retry_interval`). */
  readonly maxIntervalMs: number;
}

export interface DestinationsOptions {
  readonly store: Pick<FederationStore, 'getDestinations' | 'putDestination' | 'failingDestinations'>;
  readonly policy: RetryPolicy;
  readonly now?: () => number;
  readonly random?: () => number;
  readonly log?: (message: string, details: Record<string, unknown>) => void;
}

export class Destinations {
  private readonly states = new Map<string, DestinationState>();
  /** When each destination's state was last changed by this process (a counter), so a refresh that read the database before that change does not undo it. */
  private readonly changedAt = new Map<string, number>();
  private changes = 0;
  private readonly recoveredListeners = new Set<(destination: string) => void>();
  private readonly now: () => number;
  private readonly random: () => number;

  constructor(private readonly options: DestinationsOptions) {
    this.now = options.now ?? Date.now;
    this.random = options.random ?? Math.random;
  }

  /** Called when a destination that was failing answers or talks to us again. */
  onRecovered(listener: (destination: string) => void): void {
    this.recoveredListeners.add(listener);
  }

  /** When the destination may be asked again (ms since the epoch; 0 when it may be asked now). */
  retryAfter(destination: string): number {
    return this.states.get(destination)?.retryAfterTs ?? 0;
  }

  isWaiting(destination: string): boolean {
    return this.retryAfter(destination) > this.now();
  }

  /** Destinations currently waiting for a retry (metrics). */
  waiting(): string[] {
    const now = this.now();
    return [...this.states.values()].filter((s) => s.retryAfterTs > now).map((s) => s.destination);
  }

  /** Destinations whose last exchange failed (waiting or not), with when their failures began. */
  failing(): { destination: string; since: number }[] {
    return [...this.states.values()].map((s) => ({ destination: s.destination, since: s.firstFailureTs ?? this.now() }));
  }

  /** The wait after `failures` consecutive failures, with ±20 % jitter so retries do not march in step. */
  delayAfter(failures: number): number {
    const { minIntervalMs, multiplier, maxIntervalMs } = this.options.policy;
    const base = Math.min(maxIntervalMs, minIntervalMs * Math.pow(multiplier, Math.max(0, failures - 1)));
    return Math.round(Math.min(maxIntervalMs, base * (0.8 + 0.4 * this.random())));
  }

  /** Records a failed exchange; returns when the destination may be asked again. */
  async failed(destination: string, reason: string): Promise<number> {
    const now = this.now();
    // Another process may have recorded failures too: count on from the larger number.
    const [stored] = await this.options.store.getDestinations([destination]);
    const current = this.states.get(destination);
    const failureCount = Math.max(current?.failureCount ?? 0, stored?.failureCount ?? 0) + 1;
    const retryAfterTs = now + this.delayAfter(failureCount);
    const state: DestinationState = { destination, failureCount, retryAfterTs, firstFailureTs: stored?.firstFailureTs ?? current?.firstFailureTs ?? now };
    this.states.set(destination, state);
    this.changedAt.set(destination, ++this.changes);
    await this.options.store.putDestination(state);
    this.options.log?.('a destination did not answer; waiting before asking it again', {
      destination,
      reason,
      failures: failureCount,
      retryInSeconds: Math.round((retryAfterTs - now) / 1000),
    });
    return retryAfterTs;
  }

  /** Records a successful exchange: any wait ends at once. */
  async succeeded(destination: string): Promise<void> {
    const current = this.states.get(destination);
    if (current === undefined) return;
    this.states.delete(destination);
    this.changedAt.set(destination, ++this.changes);
    await this.options.store.putDestination({ destination, failureCount: 0, retryAfterTs: 0, firstFailureTs: null });
    for (const l of this.recoveredListeners) l(destination);
  }

  /** Reads the state all processes recorded (at start, and on each poll of the sender). */
  async refresh(): Promise<void> {
    const readAt = this.changes;
    const rows = await this.options.store.failingDestinations();
    // A change made here while the rows were being read is newer than they are.
    const stale = (d: string) => (this.changedAt.get(d) ?? 0) > readAt;
    const seen = new Set<string>();
    for (const r of rows) {
      seen.add(r.destination);
      if (!stale(r.destination)) this.states.set(r.destination, r);
    }
    for (const d of [...this.states.keys()]) if (!seen.has(d) && !stale(d)) this.states.delete(d);
    if (this.changedAt.size > 10_000) this.changedAt.clear();
  }
}
