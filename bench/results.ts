/**
 * The JSON the load harness writes (bench/run.ts, by default to bench/results/latest.json) and
 * bench/report.ts turns into tables and a chart: every measured run as it came, plus the settings
 * and the machine, so that a report can be made again from the file alone.
 */
import type { LoadResult } from './load.js';
import type { CpuShare } from './support.js';
import { median } from './harness.js';

export const WORKLOAD_IDS = ['query-1x1', 'claim-1', 'fed-query', 'query-10x3', 'query-100x3', 'query-1000x3'] as const;
export type WorkloadId = (typeof WORKLOAD_IDS)[number];
export type BackendName = 'sqlite' | 'postgres';

/**
 * Targets from issue #13, as mxkeys req/s over the same-run node:http ceiling, one process.
 * Workloads without a target are reported only.
 */
export const TARGETS: Record<BackendName, Partial<Record<WorkloadId, number>>> = {
  sqlite: { 'query-1x1': 0.5, 'claim-1': 0.2, 'fed-query': 0.15, 'query-100x3': 0.1 },
  postgres: { 'query-1x1': 0.35, 'claim-1': 0.12, 'fed-query': 0.12, 'query-100x3': 0.06 },
};

export interface RunRecord {
  readonly server: 'baseline' | 'mxkeys';
  /** mxkeys processes serving (`serve --workers N`); 1 for the baseline. */
  readonly workers: number;
  readonly result: LoadResult;
  /** During the measured window. */
  readonly cpu: CpuShare;
  /** Distinct prepared requests available to the window (federation); `result.built` above it means some were sent twice. */
  readonly distinctRequests?: number;
  /** Claims: one-time keys answered and deleted in the window, and the fewest left on a device after it. */
  readonly claims?: { readonly answered: number; readonly deleted: number; readonly minLeft: number };
  /** Milliseconds of a 4 KiB write + fdatasync next to the database just before the window. */
  readonly fsyncMs?: number;
  /** Measured again this many times because other processes used the CPU. */
  readonly retries?: number;
  /** With --cpu-prof: the top of the profile. */
  readonly profile?: string;
}

export interface WorkloadResult {
  readonly id: WorkloadId;
  readonly title: string;
  /** Bytes of the answer mxkeys gave (and the baseline sends), and of one request body. */
  readonly answerBytes: number;
  readonly requestBytes: number;
  readonly target?: number;
  readonly baseline: RunRecord[];
  /** By number of workers. */
  readonly mxkeys: Record<string, RunRecord[]>;
}

export interface MemoryResult {
  /** What was added to the database for the memory job (on top of the workloads' data). */
  readonly added: { readonly users: number; readonly devices: number; readonly oneTimeKeys: number; readonly seconds: number };
  /** Rows in the database when the process started. */
  readonly stored: { readonly devices: number; readonly oneTimeKeys: number };
  /** Bytes: resident set after start-up, after the load, and the peak (VmHWM). */
  readonly rssStart: number;
  readonly rssEnd: number;
  readonly rssPeak: number;
  /**
   * The load the process served before the reading: lists of requests sent in turn (each request
   * once, in wrk runs of the measuring duration, for at most 30 s per list).
   */
  readonly loads: {
    readonly title: string;
    /** Requests of the list sent, of how many. */
    readonly sent: number;
    readonly of: number;
    readonly ok: number;
    readonly non2xx: number;
    readonly seconds: number;
    readonly rps: number;
    /** Median over the wrk runs. */
    readonly p50: number;
  }[];
  /** The 1 × 1 query and the claim run again on this database (one worker), against the same run on the small one. */
  readonly largeDatabase: { readonly id: WorkloadId; readonly small: RunRecord; readonly large: RunRecord }[];
}

export interface BackendResult {
  readonly backend: BackendName;
  readonly version: string;
  readonly setupSeconds: number;
  readonly workloads: WorkloadResult[];
  readonly memory?: MemoryResult;
}

export interface Results {
  readonly format: 1;
  readonly started: string;
  readonly finished: string;
  /** The commit measured, with "+ uncommitted changes in src/" if src/ differed from it. */
  readonly code: string;
  readonly machine: { readonly cpu: string; readonly cores: number; readonly memoryBytes: number; readonly node: string; readonly wrk: string };
  readonly settings: {
    readonly duration: number;
    readonly warmup: number;
    readonly connections: number;
    readonly threads: number;
    readonly rounds: number;
    readonly workers: readonly number[];
    readonly waitedForQuiet: boolean;
    readonly note?: string;
  };
  readonly backends: BackendResult[];
}

export interface WorkloadSummary {
  readonly baselineRps: number;
  /** By number of workers: median 2xx req/s, ratio to the baseline, latency of the median run. */
  readonly mxkeys: Record<string, { readonly rps: number; readonly ratio: number; readonly p50: number; readonly p99: number; readonly cpu: CpuShare }>;
  /** Workers 2 over workers 1 (or the highest count over 1). */
  readonly factor?: number;
  readonly non2xx: number;
  readonly socketErrors: number;
  /** Some window sent a prepared request twice (fewer distinct requests than it needed). */
  readonly repeated: boolean;
}

function medianRun(runs: readonly RunRecord[]): RunRecord | undefined {
  const sorted = [...runs].sort((a, b) => a.result.rps - b.result.rps);
  return sorted[(sorted.length - 1) >> 1];
}

export function summarize(w: WorkloadResult): WorkloadSummary {
  const baselineRps = median(w.baseline.map((r) => r.result.rps));
  const mxkeys: Record<string, WorkloadSummary['mxkeys'][string]> = {};
  for (const [workers, runs] of Object.entries(w.mxkeys)) {
    const mid = medianRun(runs);
    if (!mid) continue;
    const rps = median(runs.map((r) => r.result.rps));
    mxkeys[workers] = { rps, ratio: rps / baselineRps, p50: mid.result.latency.p50, p99: mid.result.latency.p99, cpu: mid.cpu };
  }
  const counts = Object.keys(mxkeys).map(Number).sort((a, b) => a - b);
  const most = counts[counts.length - 1];
  const factor = mxkeys['1'] && most !== undefined && most > 1 ? mxkeys[String(most)]!.rps / mxkeys['1'].rps : undefined;
  const all = [...w.baseline, ...Object.values(w.mxkeys).flat()];
  return {
    baselineRps,
    mxkeys,
    ...(factor !== undefined ? { factor } : {}),
    non2xx: all.reduce((a, r) => a + r.result.non2xx, 0),
    socketErrors: all.reduce((a, r) => a + r.result.errors.connect + r.result.errors.read + r.result.errors.write + r.result.errors.timeout, 0),
    repeated: all.some((r) => r.distinctRequests !== undefined && r.result.built > r.distinctRequests),
  };
}
