/**
 * One load measurement with autocannon: an optional warm-up run, then the measured run. Requests
 * per second count 2xx answers only; latencies are taken from every 2xx answer's response time
 * (autocannon's own histogram rounds to whole milliseconds, too coarse for sub-millisecond
 * answers).
 *
 * Prepared requests (each one different, e.g. with its own X-Matrix signature) are sent by a
 * small keep-alive HTTP/1.1 client of our own instead: autocannon builds such requests one by one
 * in its setupRequest hook, which cost ~150 µs of CPU per request on the 2-core benchmark machine,
 * a quarter of the CPU that the server under test also needs. Ours sends bytes serialised before
 * the run.
 */
import autocannon from 'autocannon';
import { connect, type Socket } from 'node:net';

export interface LoadSpec {
  /** Base URL of the server under load. */
  readonly url: string;
  readonly path: string;
  readonly token: string;
  /** One body for every request, or several sent in turn (round robin over all connections). */
  readonly bodies: readonly string[];
  readonly connections: number;
  /** Seconds. */
  readonly duration: number;
  /**
   * Fully prepared requests sent in turn instead of `path`/`token`/`bodies` (e.g. federation
   * requests, each with its own X-Matrix signature).
   */
  readonly prepared?: readonly PreparedRequest[];
}

export interface PreparedRequest {
  readonly path: string;
  readonly headers: Readonly<Record<string, string>>;
  readonly body: string;
}

export interface Latency {
  /** Milliseconds. */
  readonly mean: number;
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly max: number;
}

export interface LoadResult {
  /** 2xx answers in the measured window. */
  readonly ok: number;
  readonly non2xx: number;
  readonly errors: number;
  readonly seconds: number;
  readonly rps: number;
  readonly latency: Latency;
  /** Status codes seen, with counts. */
  readonly statuses: Record<string, number>;
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

function options(spec: LoadSpec, duration: number, amount: number | undefined): autocannon.Options {
  const headers = { 'content-type': 'application/json', authorization: `Bearer ${spec.token}` };
  const base: autocannon.Options = {
    url: spec.url + spec.path,
    method: 'POST',
    headers,
    connections: spec.connections,
    duration,
    ...(amount !== undefined ? { amount } : {}),
    timeout: 30,
  };
  if (spec.bodies.length === 1) return { ...base, body: spec.bodies[0]! };
  let next = 0;
  const bodies = spec.bodies;
  return {
    ...base,
    requests: [
      {
        method: 'POST',
        setupRequest: (request) => ({ ...request, method: 'POST', headers, body: bodies[next++ % bodies.length]! }),
      },
    ],
  };
}

/** Response times of 2xx answers, and the other outcomes. */
class Tally {
  private latencies = new Float64Array(1 << 16);
  ok = 0;
  non2xx = 0;
  errors = 0;
  readonly statuses: Record<string, number> = {};

  answer(status: number, ms: number): void {
    this.statuses[status] = (this.statuses[status] ?? 0) + 1;
    if (status < 200 || status > 299) {
      this.non2xx++;
      return;
    }
    if (this.ok === this.latencies.length) {
      const bigger = new Float64Array(this.latencies.length * 2);
      bigger.set(this.latencies);
      this.latencies = bigger;
    }
    this.latencies[this.ok++] = ms;
  }

  result(seconds: number): LoadResult {
    const n = this.ok;
    const sorted = this.latencies.slice(0, n).sort();
    let sum = 0;
    for (const v of sorted) sum += v;
    return {
      ok: n,
      non2xx: this.non2xx,
      errors: this.errors,
      seconds,
      rps: n / seconds,
      latency: { mean: n ? sum / n : NaN, p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99), max: n ? sorted[n - 1]! : NaN },
      statuses: this.statuses,
    };
  }
}

/** Runs autocannon (or, for prepared requests, our own client) for `duration` seconds (or until `amount` answers) and measures it. */
export async function runLoad(spec: LoadSpec, duration = spec.duration, amount?: number): Promise<LoadResult> {
  if (spec.prepared) return runPrepared(spec, spec.prepared, duration);
  const tally = new Tally();
  const instance = autocannon(options(spec, duration, amount));
  const start = performance.now();
  let last = start;
  instance.on('response', (_client, statusCode, _bytes, responseTime) => {
    last = performance.now();
    tally.answer(statusCode, responseTime);
  });
  const result = await instance;
  tally.errors = result.errors;
  // From the start to the last answer: autocannon only notices the end (of the duration, or of
  // `amount` answers) at its next once-a-second tick, so its own duration can be up to 1 s long.
  return tally.result((last - start) / 1000);
}

const HEADER_END = Buffer.from('\r\n\r\n');

/**
 * Sends the prepared requests in turn over `spec.connections` keep-alive connections, each
 * connection one request at a time, for `duration` seconds. Answers must carry Content-Length.
 */
async function runPrepared(spec: LoadSpec, prepared: readonly PreparedRequest[], duration: number): Promise<LoadResult> {
  const url = new URL(spec.url);
  const wire = prepared.map((r) => {
    const body = Buffer.from(r.body);
    const headers = { host: url.host, 'content-type': 'application/json', ...r.headers, 'content-length': String(body.length) };
    const head = `POST ${r.path} HTTP/1.1\r\n${Object.entries(headers)
      .map(([k, v]) => `${k}: ${v}\r\n`)
      .join('')}\r\n`;
    return Buffer.concat([Buffer.from(head, 'latin1'), body]);
  });
  const tally = new Tally();
  let next = 0;
  const start = performance.now();
  const deadline = start + duration * 1000;
  let last = start;

  const drive = (socket: Socket) =>
    new Promise<void>((resolve) => {
      let pending: Buffer = Buffer.alloc(0);
      let sentAt = 0;
      const send = () => {
        if (performance.now() >= deadline) {
          socket.end();
          resolve();
          return;
        }
        sentAt = performance.now();
        socket.write(wire[next++ % wire.length]!);
      };
      socket.on('data', (chunk: Buffer) => {
        pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
        const end = pending.indexOf(HEADER_END);
        if (end < 0) return;
        const head = pending.subarray(0, end).toString('latin1');
        const length = /\r\ncontent-length: *(\d+)/i.exec(head);
        if (!length) {
          tally.errors++;
          socket.destroy();
          resolve();
          return;
        }
        const total = end + 4 + Number(length[1]);
        if (pending.length < total) return;
        last = performance.now();
        tally.answer(Number(head.slice(9, 12)), last - sentAt);
        pending = pending.subarray(total);
        send();
      });
      socket.on('error', () => {
        tally.errors++;
        resolve();
      });
      socket.on('close', () => resolve());
      send();
    });

  const sockets = await Promise.all(
    Array.from(
      { length: spec.connections },
      () =>
        new Promise<Socket>((resolve, reject) => {
          const s = connect({ host: url.hostname, port: Number(url.port), noDelay: true }, () => resolve(s));
          s.once('error', reject);
        }),
    ),
  );
  await Promise.all(sockets.map(drive));
  return tally.result((last - start) / 1000);
}
