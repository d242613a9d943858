/**
 * Metrics under `mxkeys serve --workers N`, through prom-client's cluster aggregation: each
 * worker answers the supervisor's request with the metrics of its own registry, and the supervisor
 * combines them metric by metric (counts and histograms add up; figures every worker reads from the
 * shared database are taken once, see metrics/mxkeys.ts) and serves one page for all of them.
 *
 * A scrape never waits long for one worker: one that does not answer within WORKER_TIMEOUT_MS is
 * shown as down (`mxkeys_cluster_worker_up`), with its counts as of its last answer. Counts never
 * go down across a worker's replacement either: what a worker that ended had counted (as of its
 * last answer) stays in the cluster's totals.
 */
import type { Worker } from 'node:cluster';
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client';

/** prom-client's message types between a cluster's primary and its workers. */
const REQUEST = 'prom-client:getMetricsReq';
const RESPONSE = 'prom-client:getMetricsRes';
/** Well inside Prometheus's default 10 s scrape timeout; a worker's own reads wait 1 s at most. */
export const WORKER_TIMEOUT_MS = 3_000;

/** One metric as prom-client's getMetricsAsJSON gives it (and workers send it). */
interface MetricJson {
  readonly name: string;
  readonly help: string;
  readonly type: string;
  readonly aggregator: string;
  readonly values: readonly { readonly value: number; readonly labels: Readonly<Record<string, string | number>>; readonly metricName?: string }[];
}

/**
 * In a worker: answers the supervisor's metric requests with `registry` (with nothing until one
 * is given, so a worker that is still starting does not hold up a scrape).
 */
export function answerSupervisor(registry?: Registry): void {
  // Constructing one installs prom-client's listener for the supervisor's requests (once per process).
  new AggregatorRegistry();
  AggregatorRegistry.setRegistries(registry ? [registry] : []);
}

let requests = 0;

type Answer = { readonly metrics: MetricJson[] } | { readonly missing: string };

/** One worker's metrics (those of each of its registries, one after the other), or why there are none. */
function askWorker(worker: Worker, slot: number, timeoutMs: number): Promise<Answer> {
  const requestId = `mxkeys-${++requests}`;
  return new Promise((resolve) => {
    const finish = (answer: Answer) => {
      clearTimeout(timer);
      worker.off('message', onMessage);
      worker.off('exit', onExit);
      resolve(answer);
    };
    const onMessage = (m: { type?: unknown; requestId?: unknown; metrics?: MetricJson[][]; error?: string }) => {
      if (m?.type !== RESPONSE || m.requestId !== requestId) return;
      finish(m.error === undefined ? { metrics: (m.metrics ?? []).flat() } : { missing: `worker ${slot} could not gather its metrics: ${m.error}` });
    };
    const onExit = () => finish({ missing: `worker ${slot} ended` });
    const timer = setTimeout(() => finish({ missing: `worker ${slot} (pid ${worker.process.pid}) did not answer within ${timeoutMs / 1000} s` }), timeoutMs);
    worker.on('message', onMessage);
    worker.once('exit', onExit);
    try {
      worker.send({ type: REQUEST, requestId });
    } catch {
      finish({ missing: `worker ${slot} could not be asked` });
    }
  });
}

/** Counters and histograms: cumulative figures that add up across workers and over time. */
function isCount(m: MetricJson): boolean {
  return (m.type === 'counter' || m.type === 'histogram') && (m.aggregator ?? 'sum') === 'sum';
}

/** Running sums of counts, per metric and series (what workers that ended had counted). */
class CountTotals {
  private readonly metrics = new Map<string, { meta: Omit<MetricJson, 'values'>; series: Map<string, { value: number; labels: MetricJson['values'][number]['labels']; metricName?: string }> }>();

  add(metrics: readonly MetricJson[]): void {
    for (const m of metrics) {
      let total = this.metrics.get(m.name);
      if (!total) this.metrics.set(m.name, (total = { meta: { name: m.name, help: m.help, type: m.type, aggregator: m.aggregator }, series: new Map() }));
      for (const v of m.values) {
        const key = JSON.stringify([v.metricName ?? '', Object.entries(v.labels).sort(([a], [b]) => (a < b ? -1 : 1))]);
        const s = total.series.get(key);
        if (s) s.value += v.value;
        else total.series.set(key, { value: v.value, labels: v.labels, ...(v.metricName === undefined ? {} : { metricName: v.metricName }) });
      }
    }
  }

  toJson(): MetricJson[] {
    return [...this.metrics.values()].map(({ meta, series }) => ({ ...meta, values: [...series.values()] }));
  }
}

export interface ClusterMetricsOptions {
  /** How many worker slots the cluster has (1…N). */
  readonly slots: number;
  /** The workers serving now, by slot. */
  readonly workers: () => ReadonlyMap<number, Worker>;
  readonly timeoutMs?: number;
  readonly log?: (message: string, details: Record<string, unknown>) => void;
}

/** The supervisor's side: its own figures, and the sum over the workers. */
export class ClusterMetrics {
  private readonly registry = new Registry();
  private readonly restarts: Counter;
  private readonly up: Gauge<'worker'>;
  /** Per slot, the counts of its worker (by pid) at its last answer. */
  private readonly lastCounts = new Map<number, { pid: number | undefined; counts: MetricJson[] }>();
  private readonly retired = new CountTotals();

  constructor(private readonly options: ClusterMetricsOptions) {
    const { workers } = options;
    new Gauge({
      name: 'mxkeys_workers',
      help: 'Worker processes serving requests (mxkeys serve --workers).',
      registers: [this.registry],
      collect() {
        this.set(workers().size);
      },
    });
    this.up = new Gauge({
      name: 'mxkeys_cluster_worker_up',
      help: 'Whether a worker slot answered this scrape (1) or not (0: starting, being replaced, or stuck; its counts are shown as of its last answer).',
      labelNames: ['worker'],
      registers: [this.registry],
    });
    this.restarts = new Counter({ name: 'mxkeys_worker_restarts_total', help: 'Workers that ended unexpectedly and were replaced.', registers: [this.registry] });
  }

  workerReplaced(): void {
    this.restarts.inc();
  }

  /** A worker has ended: what it counted up to its last answer stays in the cluster's totals. */
  workerEnded(slot: number, pid: number | undefined): void {
    const last = this.lastCounts.get(slot);
    if (!last || last.pid !== pid) return;
    this.lastCounts.delete(slot);
    this.retired.add(last.counts);
  }

  /** One exposition page for the cluster, with whatever workers answered in time. */
  async render(): Promise<string> {
    const serving = [...this.options.workers()];
    const timeoutMs = this.options.timeoutMs ?? WORKER_TIMEOUT_MS;
    const answers = await Promise.all(serving.map(([slot, w]) => askWorker(w, slot, timeoutMs)));
    const all: MetricJson[][] = [];
    const answered = new Set<number>();
    serving.forEach(([slot, w], i) => {
      const answer = answers[i]!;
      if ('metrics' in answer) {
        answered.add(slot);
        all.push(answer.metrics);
        this.lastCounts.set(slot, { pid: w.process.pid, counts: answer.metrics.filter(isCount) });
      } else {
        this.options.log?.('a worker is left out of this metrics scrape; its counts are shown as of its last answer', { worker: slot, worker_pid: w.process.pid, reason: answer.missing });
      }
    });
    // Slots that did not answer (stuck, or between a worker and its replacement): counts as last seen.
    for (const [slot, last] of this.lastCounts) if (!answered.has(slot)) all.push(last.counts);
    all.push(this.retired.toJson());
    for (let slot = 1; slot <= this.options.slots; slot++) this.up.set({ worker: String(slot) }, answered.has(slot) ? 1 : 0);
    all.push((await this.registry.getMetricsAsJSON()) as unknown as MetricJson[]);
    return AggregatorRegistry.aggregate(all as unknown as Parameters<typeof AggregatorRegistry.aggregate>[0]).metrics();
  }
}
