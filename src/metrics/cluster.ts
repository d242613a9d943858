/**
 * Metrics under `mxkeys serve --workers N`, through prom-client's cluster aggregation: each
 * worker answers the supervisor's request with the metrics of its own registry, and the supervisor
 * combines them metric by metric (counts and histograms add up; figures every worker reads from the
 * shared database are taken once, see metrics/mxkeys.ts) and serves one page for all of them.
 */
import type { Worker } from 'node:cluster';
import { AggregatorRegistry, Counter, Gauge, Registry } from 'prom-client';

/** prom-client's message types between a cluster's primary and its workers. */
const REQUEST = 'prom-client:getMetricsReq';
const RESPONSE = 'prom-client:getMetricsRes';
const WORKER_TIMEOUT_MS = 5_000;

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

/** One worker's metrics, as prom-client's worker side sends them; undefined if it exits meanwhile. */
function askWorker(worker: Worker, slot: number): Promise<object[] | undefined> {
  const requestId = `mxkeys-${++requests}`;
  return new Promise((resolve, reject) => {
    const finish = (error: Error | undefined, metrics?: object[]) => {
      clearTimeout(timer);
      worker.off('message', onMessage);
      worker.off('exit', onExit);
      if (error) reject(error);
      else resolve(metrics);
    };
    const onMessage = (m: { type?: unknown; requestId?: unknown; metrics?: object[]; error?: string }) => {
      if (m?.type !== RESPONSE || m.requestId !== requestId) return;
      finish(m.error === undefined ? undefined : new Error(`worker ${slot}: ${m.error}`), m.metrics ?? []);
    };
    const onExit = () => finish(undefined, undefined);
    const timer = setTimeout(() => finish(new Error(`worker ${slot} (pid ${worker.process.pid}) did not answer within ${WORKER_TIMEOUT_MS / 1000} s`)), WORKER_TIMEOUT_MS);
    worker.on('message', onMessage);
    worker.once('exit', onExit);
    try {
      worker.send({ type: REQUEST, requestId });
    } catch {
      finish(undefined, undefined);
    }
  });
}

/** The supervisor's side: its own figures, and the sum over the workers serving now. */
export class ClusterMetrics {
  private readonly registry = new Registry();
  private readonly restarts: Counter;

  constructor(private readonly workers: () => ReadonlyMap<number, Worker>) {
    new Gauge({
      name: 'mxkeys_workers',
      help: 'Worker processes serving requests (mxkeys serve --workers).',
      registers: [this.registry],
      collect() {
        this.set(workers().size);
      },
    });
    this.restarts = new Counter({ name: 'mxkeys_worker_restarts_total', help: 'Workers that ended unexpectedly and were replaced.', registers: [this.registry] });
  }

  workerReplaced(): void {
    this.restarts.inc();
  }

  /** One exposition page for the cluster; fails if a serving worker does not answer. */
  async render(): Promise<string> {
    const replies = await Promise.all([...this.workers()].map(([slot, w]) => askWorker(w, slot)));
    const all: object[] = [await this.registry.getMetricsAsJSON()];
    for (const r of replies) if (r) all.push(...r);
    return AggregatorRegistry.aggregate(all).metrics();
  }
}
