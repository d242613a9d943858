/**
 * What mxkeys exports to Prometheus, and the small HTTP listener that serves it (`metrics` in the
 * configuration). Kept off the main listener so it is never exposed by the reverse proxy by mistake.
 */
import { createServer, type Server } from 'node:http';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Counter, Histogram, Observed, Registry } from './registry.js';
import type { KeyStats } from '../keys/service.js';
import type { ToDeviceStats } from '../todevice/service.js';
import type { Store } from '../storage/store.js';

export interface MetricSources {
  readonly store: Store;
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

/** Values read from the database are read again at most this often, when scraped. */
const DATABASE_READ_EVERY_MS = 5_000;

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class MxkeysMetrics {
  readonly registry = new Registry();
  private readonly requests: Counter;
  private readonly latency: Histogram;
  private readonly loopDelay = monitorEventLoopDelay({ resolution: 20 });
  /** Reads of values kept in the database, done before a scrape is answered. */
  private readonly refreshers: (() => Promise<void>)[] = [];

  constructor(sources: MetricSources) {
    const r = this.registry;
    this.requests = r.add(new Counter('mxkeys_http_requests_total', 'HTTP requests answered, by route, method and status code.'));
    this.latency = r.add(new Histogram('mxkeys_http_request_duration_seconds', 'Time to answer an HTTP request, by route.', LATENCY_BUCKETS));
    r.add(new Observed('mxkeys_db_statements_total', 'Database statements run by this process.', 'counter', () => sources.store.statementCount()));
    r.add(
      new Observed('mxkeys_keys_claimed_total', 'One-time key claims by what they handed out.', 'counter', () => [
        [{ result: 'one_time_key' }, sources.keyStats.oneTimeKeysClaimed],
        [{ result: 'fallback_key' }, sources.keyStats.fallbackKeysClaimed],
        [{ result: 'none' }, sources.keyStats.claimsUnanswered],
      ]),
    );
    r.add(
      new Observed('mxkeys_federation_requests_authenticated_total', 'Signed federation requests by X-Matrix outcome.', 'counter', () => [
        [{ result: 'accepted' }, sources.federationAuth.accepted],
        [{ result: 'refused' }, sources.federationAuth.refused],
      ]),
    );
    r.add(
      new Observed('mxkeys_server_key_fetches_total', "Fetches of other servers' signing keys by outcome.", 'counter', () => [
        [{ result: 'from_server' }, sources.serverKeyFetches.fromServer],
        [{ result: 'from_notary' }, sources.serverKeyFetches.fromNotary],
        [{ result: 'failed' }, sources.serverKeyFetches.failed],
      ]),
    );
    const fed = sources.federation;
    if (fed) {
      r.add(
        new Observed('mxkeys_federation_transactions_sent_total', 'Outgoing federation transactions by outcome.', 'counter', () => [
          [{ result: 'accepted' }, fed.sender.stats.transactionsSent],
          [{ result: 'failed' }, fed.sender.stats.transactionsFailed],
        ]),
      );
      r.add(new Observed('mxkeys_federation_edus_sent_total', 'EDUs delivered to other servers.', 'counter', () => fed.sender.stats.edusSent));
      r.add(
        new Observed(
          'mxkeys_federation_queued_edus',
          'EDUs waiting to be sent, per destination and kind: device-list changes, to-device messages (read every few seconds).',
          'gauge',
          () => fed.sender.queueDepths.map(({ destination, kind, queued }) => [{ destination, kind }, queued] as const),
        ),
      );
      r.add(new Observed('mxkeys_federation_destinations_waiting', 'Destinations in their retry wait after failures.', 'gauge', () => fed.destinations.waiting().length));
      const lists = fed.remoteDeviceLists.stats;
      r.add(
        new Observed('mxkeys_remote_device_list_lookups_total', 'Remote device lists needed for key queries: served from the cache, or fetched.', 'counter', () => [
          [{ result: 'hit' }, lists.hits],
          [{ result: 'miss' }, lists.misses],
        ]),
      );
      r.add(
        new Observed('mxkeys_remote_device_list_resyncs_total', 'Fetches of whole remote device lists (GET /user/devices) by outcome.', 'counter', () => [
          [{ result: 'ok' }, lists.resyncs - lists.resyncFailures],
          [{ result: 'failed' }, lists.resyncFailures],
        ]),
      );
      r.add(
        new Observed('mxkeys_remote_device_list_updates_total', 'Incoming device-list EDUs by what became of them.', 'counter', () => [
          [{ result: 'applied' }, lists.updatesApplied],
          [{ result: 'ignored' }, lists.updatesIgnored],
          [{ result: 'gap' }, lists.gaps],
          [{ result: 'dropped' }, lists.updatesDropped],
        ]),
      );
      r.add(
        new Observed('mxkeys_federation_transactions_received_total', 'Incoming federation transactions: processed, or repeats answered from the record.', 'counter', () => [
          [{ result: 'processed' }, fed.transactions.stats.transactions],
          [{ result: 'repeated' }, fed.transactions.stats.repeated],
        ]),
      );
    }
    const toDevice = sources.toDevice;
    if (toDevice) {
      const t = toDevice.stats;
      r.add(
        new Observed('mxkeys_to_device_messages_total', 'To-device messages stored for local devices, by where they came from.', 'counter', () => [
          [{ source: 'client' }, t.fromClients],
          [{ source: 'federation' }, t.fromFederation],
        ]),
      );
      r.add(
        new Observed('mxkeys_to_device_messages_dropped_total', "To-device messages dropped unread because their device's inbox was full (to_device.max_pending_per_device).", 'counter', () => t.droppedInboxFull),
      );
      r.add(
        new Observed('mxkeys_to_device_repeats_total', 'Repeated to-device sends that stored nothing again: a txnId a device used before, a message_id a server sent before.', 'counter', () => [
          [{ kind: 'txn_id' }, t.repeatedTxns],
          [{ kind: 'message_id' }, t.repeatedEdus],
        ]),
      );
      r.add(
        new Observed('mxkeys_to_device_edus_total', 'm.direct_to_device EDUs queued for other servers, received from them, and received but unusable (dropped).', 'counter', () => [
          [{ result: 'queued' }, t.edusQueued],
          [{ result: 'received' }, t.edusReceived],
          [{ result: 'dropped' }, t.edusDropped],
        ]),
      );
      let pending = 0;
      let pendingAt = 0;
      this.refreshers.push(async () => {
        if (Date.now() - pendingAt < DATABASE_READ_EVERY_MS) return;
        pendingAt = Date.now();
        pending = await toDevice.pendingMessages();
      });
      r.add(new Observed('mxkeys_to_device_pending_messages', 'To-device messages waiting in local devices\' inboxes, all devices together (read every few seconds).', 'gauge', () => pending));
    }
    r.add(new Observed('process_resident_memory_bytes', 'Resident memory size in bytes.', 'gauge', () => process.memoryUsage.rss()));
    r.add(new Observed('nodejs_heap_used_bytes', 'V8 heap in use, in bytes.', 'gauge', () => process.memoryUsage().heapUsed));
    r.add(new Observed('process_cpu_seconds_total', 'User and system CPU time spent, in seconds.', 'counter', () => {
      const u = process.cpuUsage();
      return (u.user + u.system) / 1e6;
    }));
    this.loopDelay.enable();
    r.add(new Observed('nodejs_eventloop_delay_p99_seconds', 'The 99th percentile of event loop delay since the last scrape.', 'gauge', () => {
      const p99 = this.loopDelay.percentile(99) / 1e9;
      this.loopDelay.reset();
      return Number.isFinite(p99) ? p99 : 0;
    }));
  }

  /** Records one answered HTTP request. */
  observeRequest(method: string, route: string, status: number, seconds: number): void {
    this.requests.inc({ route, method, status: String(status) });
    this.latency.observe({ route }, seconds);
  }

  /** The exposition text, with values kept in the database read again if due (a failed read keeps the last value). */
  async render(): Promise<string> {
    await Promise.all(this.refreshers.map((refresh) => refresh().catch(() => undefined)));
    return this.registry.render();
  }

  /** Starts the metrics listener; resolves to its URL. */
  async listen(host: string, port: number): Promise<{ url: string; server: Server }> {
    const server = createServer((req, res) => {
      if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
        void this.render().then((text) => {
          res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
          res.end(text);
        });
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

  stop(): void {
    this.loopDelay.disable();
  }
}
