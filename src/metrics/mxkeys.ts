/**
 * What mxkeys exports to Prometheus (through prom-client), and the small HTTP listener that serves
 * it (`metrics` in the configuration). Kept off the main listener so it is never exposed by the
 * reverse proxy by mistake. Under `mxkeys serve --workers N` each worker keeps its own registry
 * and the supervisor serves their sum (metrics/cluster.ts); each metric says how its values from
 * several workers combine: counts add up, figures read from the shared database do not.
 */
import { createServer, type Server } from 'node:http';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry, type Aggregator } from 'prom-client';
import type { KeyStats } from '../keys/service.js';
import type { ToDeviceStats } from '../todevice/service.js';
import type { Store } from '../storage/store.js';
import { DatabaseReading, type ReadingOptions } from './reading.js';

export interface MetricSources {
  readonly store: Pick<Store, 'statementCount' | 'retryCount' | 'stats'>;
  readonly keyStats: KeyStats;
  readonly federationAuth: { readonly accepted: number; readonly refused: number };
  readonly serverKeyFetches: { readonly fromServer: number; readonly fromNotary: number; readonly failed: number };
  readonly federation?: {
    readonly sender: { readonly stats: { readonly transactionsSent: number; readonly edusSent: number; readonly transactionsFailed: number }; readonly queueDepths: readonly { readonly destination: string; readonly kind: string; readonly queued: number }[] };
    readonly destinations: { waiting(): string[] };
    readonly remoteDeviceLists: { readonly stats: Readonly<Record<'hits' | 'misses' | 'resyncs' | 'resyncFailures' | 'updatesApplied' | 'updatesIgnored' | 'gaps' | 'updatesDropped', number>> };
    readonly transactions: { readonly stats: Readonly<Record<'transactions' | 'repeated' | 'edus' | 'edusIgnored', number>> };
  };
  readonly toDevice?: { readonly stats: Readonly<ToDeviceStats>; pendingMessages(): Promise<number> };
}

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** `mxkeys_devices_with_few_one_time_keys{fewer_than}`: a device below these runs out soon. */
export const FEW_ONE_TIME_KEYS = [1, 10, 50] as const;

type Labels = Readonly<Record<string, string>>;
type Series = ReadonlyArray<readonly [Labels, number]>;
type Reading = number | Series;

/**
 * Figures read from the database are read at most this often (however many scrapes come, from
 * however many Prometheus servers), and a scrape waits this long for one before it is served
 * the last figure read: well inside Prometheus's default 10 s scrape timeout.
 */
export const DATABASE_READ_EVERY_MS = 5_000;
export const DATABASE_READ_WAIT_MS = 1_000;

export const PROMETHEUS_CONTENT_TYPE = Registry.PROMETHEUS_CONTENT_TYPE;

export class MxkeysMetrics {
  readonly registry = new Registry();
  private readonly requests: Counter<'route' | 'method' | 'status'>;
  private readonly latency: Histogram<'route'>;
  private readonly loopDelay = monitorEventLoopDelay({ resolution: 20 });
  private readonly readingOptions: ReadingOptions;
  /** The figures read from the database, by metric name. */
  private readonly readings = new Map<string, DatabaseReading<unknown>>();

  constructor(sources: MetricSources, options: Partial<ReadingOptions> = {}) {
    const r = this.registry;
    this.readingOptions = { everyMs: DATABASE_READ_EVERY_MS, waitMs: DATABASE_READ_WAIT_MS, now: Date.now, ...options };
    const { readings, readingOptions } = this;
    new Gauge({
      name: 'mxkeys_metrics_database_reading_age_seconds',
      help: 'How old the figure shown for a metric read from the database is: it grows while the database cannot be read (the last figure read is shown meanwhile).',
      labelNames: ['metric'],
      registers: [r],
      aggregator: 'max',
      async collect() {
        this.reset();
        for (const [metric, reading] of readings) {
          const got = await reading.get();
          if (got) this.set({ metric }, (readingOptions.now() - got.readAt) / 1000);
        }
      },
    });
    new Counter({
      name: 'mxkeys_metrics_database_read_failures_total',
      help: 'Reads of a metric from the database that failed; scrapes showed the last figure read instead.',
      labelNames: ['metric'],
      registers: [r],
      async collect() {
        this.reset();
        // After this scrape's read, so that its failure is counted in this scrape.
        for (const [metric, reading] of readings) {
          await reading.get();
          this.inc({ metric }, reading.failures);
        }
      },
    });
    this.requests = new Counter({ name: 'mxkeys_http_requests_total', help: 'HTTP requests answered, by route, method and status code.', labelNames: ['route', 'method', 'status'], registers: [r] });
    this.latency = new Histogram({ name: 'mxkeys_http_request_duration_seconds', help: 'Time to answer an HTTP request, by route.', labelNames: ['route'], buckets: LATENCY_BUCKETS, registers: [r] });
    this.observed('mxkeys_db_statements_total', 'Database statements run by this process.', 'counter', [], () => sources.store.statementCount());
    this.observed('mxkeys_db_retries_total', 'Statements and transactions run again after a deadlock or serialization conflict (PostgreSQL); should stay near zero.', 'counter', [], () => sources.store.retryCount());
    this.observed('mxkeys_keys_claimed_total', 'One-time key claims by what they handed out.', 'counter', ['result'], () => [
      [{ result: 'one_time_key' }, sources.keyStats.oneTimeKeysClaimed],
      [{ result: 'fallback_key' }, sources.keyStats.fallbackKeysClaimed],
      [{ result: 'none' }, sources.keyStats.claimsUnanswered],
    ]);
    this.observed('mxkeys_federation_requests_authenticated_total', 'Signed federation requests by X-Matrix outcome.', 'counter', ['result'], () => [
      [{ result: 'accepted' }, sources.federationAuth.accepted],
      [{ result: 'refused' }, sources.federationAuth.refused],
    ]);
    this.observed('mxkeys_server_key_fetches_total', "Fetches of other servers' signing keys by outcome.", 'counter', ['result'], () => [
      [{ result: 'from_server' }, sources.serverKeyFetches.fromServer],
      [{ result: 'from_notary' }, sources.serverKeyFetches.fromNotary],
      [{ result: 'failed' }, sources.serverKeyFetches.failed],
    ]);
    this.fromDatabase(
      'mxkeys_devices_with_few_one_time_keys',
      'Devices with fewer unclaimed one-time keys than fewer_than (cumulative). Devices at 0 hand out their fallback key or nothing: a rise here comes before undecryptable messages.',
      ['fewer_than'],
      () => sources.store.stats.devicesWithFewOneTimeKeys(FEW_ONE_TIME_KEYS),
      (counts) => FEW_ONE_TIME_KEYS.map((limit, i) => [{ fewer_than: String(limit) }, counts[i] ?? 0] as const),
    );
    const fed = sources.federation;
    if (fed) {
      this.observed('mxkeys_federation_transactions_sent_total', 'Outgoing federation transactions by outcome.', 'counter', ['result'], () => [
        [{ result: 'accepted' }, fed.sender.stats.transactionsSent],
        [{ result: 'failed' }, fed.sender.stats.transactionsFailed],
      ]);
      this.observed('mxkeys_federation_edus_sent_total', 'EDUs delivered to other servers.', 'counter', [], () => fed.sender.stats.edusSent);
      // Both read from the database by every process's sender: the same figure in each worker.
      this.observed(
        'mxkeys_federation_queued_edus',
        'EDUs waiting to be sent, per destination and kind: device-list changes, to-device messages (read every few seconds).',
        'gauge',
        ['destination', 'kind'],
        () => fed.sender.queueDepths.map(({ destination, kind, queued }) => [{ destination, kind }, queued] as const),
        'max',
      );
      this.observed('mxkeys_federation_destinations_waiting', 'Destinations in their retry wait after failures.', 'gauge', [], () => fed.destinations.waiting().length, 'max');
      const lists = fed.remoteDeviceLists.stats;
      this.observed('mxkeys_remote_device_list_lookups_total', 'Remote device lists needed for key queries: served from the cache, or fetched.', 'counter', ['result'], () => [
        [{ result: 'hit' }, lists.hits],
        [{ result: 'miss' }, lists.misses],
      ]);
      this.observed('mxkeys_remote_device_list_resyncs_total', 'Fetches of whole remote device lists (GET /user/devices) by outcome.', 'counter', ['result'], () => [
        [{ result: 'ok' }, lists.resyncs - lists.resyncFailures],
        [{ result: 'failed' }, lists.resyncFailures],
      ]);
      this.observed('mxkeys_remote_device_list_updates_total', 'Incoming device-list EDUs by what became of them.', 'counter', ['result'], () => [
        [{ result: 'applied' }, lists.updatesApplied],
        [{ result: 'ignored' }, lists.updatesIgnored],
        [{ result: 'gap' }, lists.gaps],
        [{ result: 'dropped' }, lists.updatesDropped],
      ]);
      this.observed('mxkeys_federation_transactions_received_total', 'Incoming federation transactions: processed, or repeats answered from the record.', 'counter', ['result'], () => [
        [{ result: 'processed' }, fed.transactions.stats.transactions],
        [{ result: 'repeated' }, fed.transactions.stats.repeated],
      ]);
    }
    const toDevice = sources.toDevice;
    if (toDevice) {
      const t = toDevice.stats;
      this.observed('mxkeys_to_device_messages_total', 'To-device messages stored for local devices, by where they came from.', 'counter', ['source'], () => [
        [{ source: 'client' }, t.fromClients],
        [{ source: 'federation' }, t.fromFederation],
      ]);
      this.observed('mxkeys_to_device_messages_dropped_total', 'To-device messages dropped undelivered, by why: a local inbox was full, a received message was over the size or count limits, another server did not take it within federation.max_undelivered_age.', 'counter', ['reason'], () => [
        [{ reason: 'inbox_full' }, t.droppedInboxFull],
        [{ reason: 'too_large' }, t.droppedTooLarge],
        [{ reason: 'too_many' }, t.droppedTooMany],
        [{ reason: 'undelivered' }, t.droppedUndelivered],
      ]);
      this.observed('mxkeys_to_device_repeats_total', 'Repeated to-device sends that stored nothing again: a txnId a device used before, a message_id a server sent before.', 'counter', ['kind'], () => [
        [{ kind: 'txn_id' }, t.repeatedTxns],
        [{ kind: 'message_id' }, t.repeatedEdus],
      ]);
      this.observed('mxkeys_to_device_edus_total', 'm.direct_to_device EDUs queued for other servers, received from them, and received but unusable (dropped).', 'counter', ['result'], () => [
        [{ result: 'queued' }, t.edusQueued],
        [{ result: 'received' }, t.edusReceived],
        [{ result: 'dropped' }, t.edusDropped],
      ]);
      this.fromDatabase('mxkeys_to_device_pending_messages', "To-device messages waiting in local devices' inboxes, all devices together.", [], () => toDevice.pendingMessages(), (n) => [[{}, n]]);
    }
    // prom-client's standard process_* and nodejs_* metrics (process_resident_memory_bytes and
    // process_cpu_seconds_total among them), plus the two mxkeys has always exported.
    collectDefaultMetrics({ register: r });
    this.observed('nodejs_heap_used_bytes', 'V8 heap in use, in bytes.', 'gauge', [], () => process.memoryUsage().heapUsed);
    this.loopDelay.enable();
    this.observed(
      'nodejs_eventloop_delay_p99_seconds',
      'The 99th percentile of event loop delay since the last scrape (the worst worker under --workers).',
      'gauge',
      [],
      () => {
        const p99 = this.loopDelay.percentile(99) / 1e9;
        this.loopDelay.reset();
        return Number.isFinite(p99) ? p99 : 0;
      },
      'max',
    );
  }

  /**
   * A gauge read from the shared database (DatabaseReading: bounded in time, cached). Every worker
   * of a cluster reads the same figure, so the cluster shows it once, not summed.
   */
  private fromDatabase<T>(name: string, help: string, labelNames: readonly string[], read: () => Promise<T>, show: (value: T) => Series): void {
    const reading = new DatabaseReading(read, this.readingOptions);
    this.readings.set(name, reading);
    new Gauge({
      name,
      help,
      labelNames,
      registers: [this.registry],
      aggregator: 'max',
      async collect() {
        const got = await reading.get();
        this.reset();
        // Nothing shown until a first read succeeds: no figure rather than a made-up 0.
        if (got) for (const [labels, n] of show(got.value)) this.set(labels, n);
      },
    });
  }

  /** A counter or gauge kept elsewhere, read when scraped. */
  private observed(name: string, help: string, type: 'counter' | 'gauge', labelNames: readonly string[], read: () => Reading, aggregator: Aggregator = 'sum'): void {
    const apply = (set: (labels: Labels, value: number) => void) => {
      const v = read();
      if (typeof v === 'number') set({}, v);
      else for (const [labels, n] of v) set(labels, n);
    };
    const common = { name, help, labelNames, registers: [this.registry], aggregator };
    if (type === 'counter') {
      new Counter({
        ...common,
        collect() {
          this.reset();
          apply((labels, value) => this.inc(labels, value));
        },
      });
    } else {
      new Gauge({
        ...common,
        collect() {
          this.reset();
          apply((labels, value) => this.set(labels, value));
        },
      });
    }
  }

  /** Records one answered HTTP request. */
  observeRequest(method: string, route: string, status: number, seconds: number): void {
    this.requests.inc({ route, method, status: String(status) });
    this.latency.observe({ route }, seconds);
  }

  /** The text exposition of every metric. */
  render(): Promise<string> {
    return this.registry.metrics();
  }

  stop(): void {
    this.loopDelay.disable();
  }
}

/**
 * Serves `render()` at GET /metrics on its own listener; resolves to its URL. A failed render is
 * answered 500 with the reason, so the scrape shows as failed rather than as missing data.
 */
export async function serveMetrics(host: string, port: number, render: () => Promise<string>): Promise<{ url: string; server: Server }> {
  const server = createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
      render().then(
        (text) => {
          res.writeHead(200, { 'content-type': PROMETHEUS_CONTENT_TYPE });
          res.end(text);
        },
        (e: unknown) => {
          res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(`could not gather the metrics: ${(e as Error).message}\n`);
        },
      );
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('metrics are at /metrics\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  const actualPort = typeof address === 'object' && address ? address.port : port;
  return { url: `http://${host.includes(':') ? `[${host}]` : host}:${actualPort}/metrics`, server };
}
