/**
 * One load measurement with autocannon: an optional warm-up run, then the measured run. Requests
 * per second count 2xx answers only; latencies are taken from every 2xx answer's response time
 * (autocannon's own histogram rounds to whole milliseconds, too coarse for sub-millisecond
 * answers).
 */
import autocannon from 'autocannon';

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
  const prepared = spec.prepared;
  if (prepared) {
    let i = 0;
    return {
      ...base,
      requests: [
        {
          method: 'POST',
          setupRequest: (request) => {
            const r = prepared[i++ % prepared.length]!;
            return { ...request, method: 'POST', path: r.path, headers: { 'content-type': 'application/json', ...r.headers }, body: r.body };
          },
        },
      ],
    };
  }
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

/** Runs autocannon for `duration` seconds (or until `amount` answers) and measures it. */
export async function runLoad(spec: LoadSpec, duration = spec.duration, amount?: number): Promise<LoadResult> {
  let latencies = new Float64Array(1 << 16);
  let n = 0;
  let non2xx = 0;
  const instance = autocannon(options(spec, duration, amount));
  const start = performance.now();
  let last = start;
  instance.on('response', (_client, statusCode, _bytes, responseTime) => {
    last = performance.now();
    if (statusCode < 200 || statusCode > 299) {
      non2xx++;
      return;
    }
    if (n === latencies.length) {
      const bigger = new Float64Array(latencies.length * 2);
      bigger.set(latencies);
      latencies = bigger;
    }
    latencies[n++] = responseTime;
  });
  const result = await instance;
  const sorted = latencies.slice(0, n).sort();
  let sum = 0;
  for (const v of sorted) sum += v;
  const statuses: Record<string, number> = {};
  for (const [code, { count }] of Object.entries(result.statusCodeStats)) statuses[code] = Number(count);
  // From the start to the last answer: autocannon only notices the end (of the duration, or of
  // `amount` answers) at its next once-a-second tick, so its own duration can be up to 1 s long.
  const seconds = (last - start) / 1000;
  return {
    ok: n,
    non2xx,
    errors: result.errors,
    seconds,
    rps: n / seconds,
    latency: { mean: n ? sum / n : NaN, p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99), max: n ? sorted[n - 1]! : NaN },
    statuses,
  };
}
