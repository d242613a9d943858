/**
 * `mxkeys serve --workers N`: N worker processes (node:cluster) share the listening port; this
 * supervisor starts them, replaces one that dies (waiting longer after each quick failure, so a
 * crash loop does not spin), passes SIGHUP on, drains them all on SIGTERM or SIGINT, and serves
 * the metrics of all of them on the metrics listener. It opens no database and answers no
 * request itself. What must happen once per cluster (federation sending, housekeeping) is
 * coordinated by the workers through the database, as between any processes sharing it.
 */
import cluster, { type Worker } from 'node:cluster';
import { availableParallelism } from 'node:os';
import type { Logger } from 'pino';
import type { Config } from '../config/schema.js';
import { ListenError } from '../compose.js';
import { ClusterMetrics } from '../metrics/cluster.js';
import { serveMetrics } from '../metrics/mxkeys.js';
import { VERSION } from '../version.js';

/** Set by the supervisor in each worker's environment: its slot, 1…N (kept by a replacement). */
export const WORKER_ENV = 'MXKEYS_WORKER';
/** A worker tells the supervisor it is listening (and its background work has started). */
export const READY_MESSAGE = 'mxkeys:ready';

const MAX_WORKERS = 1024;
/** Replacement back-off: doubled after each worker that dies before this long, up to the maximum. */
const FIRST_RETRY_MS = 100;
const MAX_RETRY_MS = 30_000;
const STABLE_AFTER_MS = 30_000;

/** `--workers N` or `auto` (one per core); undefined when the value is not one of those. */
export function parseWorkers(value: string | undefined): number | undefined {
  if (value === undefined) return 1;
  if (value === 'auto') return availableParallelism();
  if (!/^[1-9][0-9]*$/.test(value) || Number(value) > MAX_WORKERS) return undefined;
  return Number(value);
}

/** The worker slot this process serves as, or undefined outside a cluster worker. */
export function workerSlot(): number | undefined {
  if (!cluster.isWorker) return undefined;
  const slot = Number(process.env[WORKER_ENV]);
  return Number.isInteger(slot) && slot > 0 ? slot : cluster.worker!.id;
}

/** In a worker: tells the supervisor this worker is serving. */
export function reportReady(url: string): void {
  process.send?.({ type: READY_MESSAGE, url });
}

/**
 * In a worker: resolves on the first SIGTERM. SIGINT is ignored (Ctrl-C reaches every process of
 * the terminal's group; the supervisor then stops the workers), as are repeated SIGTERMs (a
 * service manager may signal every process of the service as well as the supervisor), and so is
 * a SIGHUP that reaches a worker still starting (the supervisor passes it on once it is serving).
 */
export function workerStopSignal(): Promise<string> {
  process.on('SIGINT', () => undefined);
  process.on('SIGHUP', () => undefined);
  return new Promise((resolve) => {
    process.on('SIGTERM', () => resolve('SIGTERM'));
  });
}

export interface SuperviseOptions {
  readonly config: Readonly<Config>;
  readonly workers: number;
  readonly logger: Logger;
  readonly stopSignal: () => Promise<string>;
  readonly onReload?: ((handler: () => void) => void) | undefined;
}

interface Slot {
  worker: Worker | undefined;
  ready: boolean;
  /** A SIGHUP came while this worker was starting: it may have read the files before they changed. */
  reloadWhenReady: boolean;
  startedAt: number;
  failures: number;
  timer: NodeJS.Timeout | undefined;
}

/** A worker ended before it was serving, while the cluster was starting. */
class StartupFailure extends Error {
  constructor(
    readonly slot: number,
    readonly code: number,
  ) {
    super(`worker ${slot} ended with exit code ${code} before it was serving`);
  }
}

function describeExit(code: number | null, signal: string | null): string {
  return signal ? `killed by ${signal}` : `exit code ${code}`;
}

/** Runs the cluster until a stop signal; resolves to the exit code. */
export async function superviseWorkers(options: SuperviseOptions): Promise<number> {
  const { config, logger } = options;
  const slots = new Map<number, Slot>();
  let starting = true;
  let stopping = false;
  let url: string | undefined;
  let startupFailure: ((e: StartupFailure) => void) | undefined;
  const serving = new Map<number, Worker>();
  const metrics = new ClusterMetrics({ slots: options.workers, workers: () => serving, log: (message, details) => logger.warn(details, message) });

  const fork = (n: number): Promise<void> => {
    const slot = slots.get(n) ?? { worker: undefined, ready: false, reloadWhenReady: false, startedAt: 0, failures: 0, timer: undefined };
    slots.set(n, slot);
    const worker = cluster.fork({ [WORKER_ENV]: String(n) });
    Object.assign(slot, { worker, ready: false, reloadWhenReady: false, startedAt: Date.now(), timer: undefined });
    logger.info({ worker: n, worker_pid: worker.process.pid }, 'started a worker');
    return new Promise<void>((resolve) => {
      worker.on('message', (m: { type?: unknown; url?: unknown }) => {
        if (m?.type !== READY_MESSAGE || slot.worker !== worker) return;
        slot.ready = true;
        serving.set(n, worker);
        if (slot.reloadWhenReady) reload(n, slot);
        url ??= String(m.url);
        resolve();
      });
      worker.on('exit', (code, signal) => {
        if (slot.worker !== worker) return;
        metrics.workerEnded(n, worker.process.pid);
        serving.delete(n);
        slot.worker = undefined;
        const wasReady = slot.ready;
        slot.ready = false;
        if (stopping) {
          if (code !== 0) logger.warn({ worker: n, worker_pid: worker.process.pid, exit: describeExit(code, signal) }, 'a worker did not stop cleanly');
          return;
        }
        if (starting && !wasReady) {
          startupFailure?.(new StartupFailure(n, code ?? 1));
          return;
        }
        // A worker that served for a while starts the back-off afresh.
        slot.failures = Date.now() - slot.startedAt >= STABLE_AFTER_MS ? 1 : slot.failures + 1;
        const delay = Math.min(MAX_RETRY_MS, FIRST_RETRY_MS * 2 ** (slot.failures - 1));
        logger.error(
          { worker: n, worker_pid: worker.process.pid, exit: describeExit(code, signal), restart_in_ms: delay },
          wasReady ? 'a worker ended unexpectedly; starting a replacement' : 'a replacement worker ended before it was serving; trying again',
        );
        metrics.workerReplaced();
        slot.timer = setTimeout(() => void fork(n), delay);
      });
    });
  };

  const reload = (n: number, slot: Slot) => {
    const w = slot.worker;
    if (!w) return;
    if (!slot.ready) {
      slot.reloadWhenReady = true;
      return;
    }
    slot.reloadWhenReady = false;
    logger.info({ worker: n, worker_pid: w.process.pid }, 'passing SIGHUP on to a worker');
    w.process.kill('SIGHUP');
  };
  // From the start: without a handler, a SIGHUP (default action: end the process) would end the
  // supervisor, and with it the cluster.
  // A worker started after it reads the renewed files as it starts.
  options.onReload?.(() => {
    for (const [n, slot] of slots) reload(n, slot);
  });

  // A stop signal during start-up stops the workers started so far.
  let stopSignal: string | undefined;
  const stopped = options.stopSignal().then((signal) => (stopSignal = signal));
  // The first worker alone (it applies migrations, and creates the signing key if there is none),
  // then the others together.
  try {
    await new Promise<void>((resolve, reject) => {
      startupFailure = reject;
      void stopped.then(() => resolve());
      void fork(1)
        .then(() => Promise.all(Array.from({ length: options.workers - 1 }, (_, i) => fork(i + 2))))
        .then(() => resolve());
    });
  } catch (e) {
    stopping = true;
    const failure = e as StartupFailure;
    logger.error({ worker: failure.slot, exit_code: failure.code }, 'a worker could not start (its error is logged above); stopping the others');
    await stopAll();
    return failure.code === 0 ? 1 : failure.code;
  }
  starting = false;
  startupFailure = undefined;
  if (stopSignal !== undefined) {
    stopping = true;
    logger.info({ signal: stopSignal }, 'asked to stop while starting: stopping the workers');
    return (await stopAll()) ? 0 : 1;
  }

  let metricsServer: Awaited<ReturnType<typeof serveMetrics>> | undefined;
  if (config.metrics.enabled) {
    try {
      metricsServer = await serveMetrics(config.metrics.host, config.metrics.port, () => metrics.render());
    } catch (e) {
      stopping = true;
      await stopAll();
      throw new ListenError('metrics', config.metrics.host, config.metrics.port, e);
    }
  }
  logger.info(
    { url, workers: options.workers, server_name: config.server_name, database: config.database.postgres ? 'postgres' : 'sqlite', version: VERSION },
    'mxkeys is listening',
  );
  if (metricsServer) logger.info({ url: metricsServer.url }, 'serving metrics');

  const signal = await stopped;
  stopping = true;
  logger.info({ signal, workers: serving.size }, 'shutting down: every worker finishes its in-flight requests');
  metricsServer?.server.close();
  const clean = await stopAll();
  logger.info('stopped');
  return clean ? 0 : 1;

  /** SIGTERM to every worker; resolves once all have exited, true when all exited with 0. */
  async function stopAll(): Promise<boolean> {
    let clean = true;
    const exits: Promise<void>[] = [];
    for (const slot of slots.values()) {
      if (slot.timer) clearTimeout(slot.timer);
      const w = slot.worker;
      if (!w) continue;
      exits.push(
        new Promise<void>((resolve) => {
          if (w.process.exitCode !== null || w.process.signalCode !== null) return resolve();
          w.process.once('exit', (code) => {
            if (code !== 0) clean = false;
            resolve();
          });
        }),
      );
      w.process.kill('SIGTERM');
    }
    await Promise.all(exits);
    return clean;
  }
}
