/**
 * Turns the load harness's JSON (bench/results/latest.json) into the Markdown tables of
 * docs/benchmarks.md and the chart docs/benchmarks.svg (throughput per workload for SQLite,
 * PostgreSQL and the node:http ceiling; SVG written by hand, no chart library).
 *
 *   npm run bench:report -- [--json FILE] [--svg FILE] [--docs FILE] [--stdout]
 *
 * With --docs (default docs/benchmarks.md) the tables replace what stands between the lines
 * `<!-- bench-results:begin -->` and `<!-- bench-results:end -->`; --stdout prints them instead
 * of writing anything.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { summarize, type BackendName, type BackendResult, type Results, type WorkloadId } from './results.js';
import type { CpuShare } from './support.js';

const BEGIN = '<!-- bench-results:begin -->';
const END = '<!-- bench-results:end -->';

const DB: Record<BackendName, string> = { sqlite: 'SQLite', postgres: 'PostgreSQL' };
const SHORT: Record<WorkloadId, string> = {
  'query-1x1': 'query 1 × 1',
  'claim-1': 'claim 1 key',
  'fed-query': 'federation query 1 × 1',
  'query-10x3': 'query 10 × 3 + 1 new',
  'query-100x3': 'query 100 × 3 + 1 new',
  'query-1000x3': 'query 1000 × 3 + 1 new',
};

const f0 = (n: number | undefined) => (n !== undefined && Number.isFinite(n) ? Math.round(n).toLocaleString('en') : '–');
const f2 = (n: number | undefined) => (n !== undefined && Number.isFinite(n) ? n.toFixed(2) : '–');
const ms = (n: number | undefined) => (n !== undefined && Number.isFinite(n) ? (n < 10 ? n.toFixed(2) : n.toFixed(1)) : '–');
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;
const size = (bytes: number) => (bytes >= 1e6 ? `${(bytes / 1e6).toFixed(2)} MB` : bytes >= 1e3 ? `${(bytes / 1e3).toFixed(1)} KB` : `${bytes} B`);

function cpuCell(c: CpuShare | undefined, postgres: boolean): string {
  if (!c) return '–';
  return `${f0(c.server)} / ${f0(c.loadgen)}${postgres ? ` / ${f0(c.postgres)}` : ''} / ${f0(c.other + c.steal)}`;
}

function verdict(ratio: number | undefined, target: number | undefined): string {
  if (target === undefined) return 'report';
  if (ratio === undefined || !Number.isFinite(ratio)) return '–';
  return ratio >= target ? 'met' : `**not met** (${(target / ratio).toFixed(1)}× short)`;
}

function throughputTable(b: BackendResult): string[] {
  const pg = b.backend === 'postgres';
  const counts = [...new Set(b.workloads.flatMap((w) => Object.keys(w.mxkeys).map(Number)))].sort((x, y) => x - y);
  const most = counts[counts.length - 1] ?? 1;
  const out = [
    `#### ${DB[b.backend]}: ${b.version}`,
    '',
    `| Workload | Answer | Ceiling req/s | mxkeys req/s | Ratio | Target | Result |${most > 1 ? ` ${most} workers req/s | × ${most}/1 |` : ''} p50 / p99 ms | CPU % mxkeys / wrk${pg ? ' / PostgreSQL' : ''} / other |`,
    `|---|---:|---:|---:|---:|---:|---|${most > 1 ? '---:|---:|' : ''}---:|---|`,
  ];
  for (const w of b.workloads) {
    const s = summarize(w);
    const one = s.mxkeys['1'];
    const many = s.mxkeys[String(most)];
    const warn = [s.non2xx ? `${s.non2xx} non-2xx` : '', s.socketErrors ? `${s.socketErrors} socket errors` : '', s.repeated ? 'some signed requests sent twice' : ''].filter(Boolean).join(', ');
    out.push(
      `| ${w.title}${warn ? ` ⚠ ${warn}` : ''} | ${size(w.answerBytes)} | ${f0(s.baselineRps)} | ${f0(one?.rps)} | ${f2(one?.ratio)} | ${w.target !== undefined ? `≥ ${w.target.toFixed(2)}` : '–'} | ${verdict(one?.ratio, w.target)} |` +
        `${most > 1 ? ` ${f0(many?.rps)} | ${f2(s.factor)} |` : ''} ${ms(one?.p50)} / ${ms(one?.p99)} | ${cpuCell(one?.cpu, pg)} |`,
    );
  }
  return out;
}

function claimsTable(results: Results): string[] {
  const rows: string[] = [];
  for (const b of results.backends) {
    for (const w of b.workloads) {
      for (const [n, runs] of Object.entries(w.mxkeys)) {
        for (const r of runs) {
          if (!r.claims) continue;
          rows.push(`| ${DB[b.backend]} | ${n} | ${f0(r.claims.answered)} | ${f0(r.claims.deleted)} | ${f0(r.claims.minLeft)} | ${r.claims.minLeft > 0 && r.claims.deleted >= r.claims.answered ? 'yes' : '**no**'} |`);
        }
      }
    }
    for (const l of b.memory?.largeDatabase ?? []) {
      const c = l.large.claims;
      if (c) rows.push(`| ${DB[b.backend]}, large database | 1 | ${f0(c.answered)} | ${f0(c.deleted)} | ${f0(c.minLeft)} | ${c.minLeft > 0 && c.deleted >= c.answered ? 'yes' : '**no**'} |`);
    }
  }
  if (!rows.length) return [];
  return [
    'Claims in the measured windows: every answer must have carried a real one-time key (never the fallback key), so the keys deleted must be at least the keys handed out, with keys left on every device.',
    '',
    '| Database | Workers | Keys handed out (2xx answers) | Keys deleted (count before − after) | Fewest left on a device | All real one-time keys |',
    '|---|---:|---:|---:|---:|---|',
    ...rows,
  ];
}

function memoryTables(results: Results): string[] {
  const withMemory = results.backends.filter((b) => b.memory);
  if (!withMemory.length) return [];
  const out = [
    'Memory: one mxkeys process (one worker) on the database after the workloads, with the rows below added; resident set size (VmRSS) after start-up and after serving the listed load, and its peak (VmHWM). Goal: under 300 MB.',
    '',
    '| Database | Devices / one-time keys stored | Added in | RSS after start | RSS after the load | Peak RSS | Goal < 300 MB | Load served before the reading |',
    '|---|---:|---:|---:|---:|---:|---|---|',
  ];
  for (const b of withMemory) {
    const m = b.memory!;
    const loads = m.loads
      .map((l) => `${l.title}${l.sent < l.of ? ` (${f0(l.sent)} of the ${f0(l.of)} requests, in ${l.seconds.toFixed(0)} s)` : ''}: ${f0(l.rps)} req/s, p50 ${ms(l.p50)} ms${l.non2xx ? ` (${l.non2xx} non-2xx)` : ''}`)
      .join('; ');
    out.push(
      `| ${DB[b.backend]} | ${f0(m.stored.devices)} / ${f0(m.stored.oneTimeKeys)} | ${m.added.seconds.toFixed(0)} s | ${mib(m.rssStart)} | ${mib(m.rssEnd)} | ${mib(m.rssPeak)} | ${m.rssPeak < 300e6 ? 'met' : '**not met**'} | ${loads} |`,
    );
  }
  const large = withMemory.flatMap((b) => b.memory!.largeDatabase.map((l) => ({ b, l })));
  if (large.length) {
    out.push(
      '',
      'The same workloads on that large database (one worker) against the small one; p50 / p99 latency ratios of at most 1.5 mean the stored volume does not slow them down:',
      '',
      '| Database | Workload | Small req/s | Large req/s | Small p50 / p99 ms | Large p50 / p99 ms | Ratio p50 / p99 |',
      '|---|---|---:|---:|---:|---:|---:|',
    );
    for (const { b, l } of large) {
      const s = l.small.result;
      const L = l.large.result;
      out.push(`| ${DB[b.backend]} | ${SHORT[l.id]} | ${f0(s.rps)} | ${f0(L.rps)} | ${ms(s.latency.p50)} / ${ms(s.latency.p99)} | ${ms(L.latency.p50)} / ${ms(L.latency.p99)} | ${f2(L.latency.p50 / s.latency.p50)} / ${f2(L.latency.p99 / s.latency.p99)} |`);
    }
  }
  return out;
}

function targetsTable(results: Results): string[] {
  const out = ['| Database | Workload | Target (ratio to the ceiling) | Measured | Result |', '|---|---|---:|---:|---|'];
  for (const b of results.backends) {
    for (const w of b.workloads) {
      if (w.target === undefined) continue;
      const one = summarize(w).mxkeys['1'];
      out.push(`| ${DB[b.backend]} | ${SHORT[w.id]} | ≥ ${w.target.toFixed(2)} | ${f2(one?.ratio)} | ${verdict(one?.ratio, w.target)} |`);
    }
  }
  return out;
}

export function markdownReport(results: Results): string {
  const s = results.settings;
  const day = results.started.slice(0, 10);
  const out = [
    `### Run of ${day}`,
    '',
    `Code ${results.code}. ${results.machine.cpu}, ${results.machine.cores} cores, ${(results.machine.memoryBytes / 2 ** 30).toFixed(1)} GiB; Node ${results.machine.node}; ${results.machine.wrk}. ` +
      `wrk with ${s.threads} thread${s.threads === 1 ? '' : 's'} and ${s.connections} connections, ${s.warmup} s warm-up then ${s.duration} s measured per run, ` +
      `${s.rounds === 1 ? 'one round' : `medians of ${s.rounds} rounds`}, mxkeys with ${s.workers.join(' and ')} worker${s.workers.length > 1 || s.workers[0] !== 1 ? 's' : ''}` +
      `${s.waitedForQuiet ? '; each run on a quiet machine (repeated if something else ran)' : '; runs taken as they came, without waiting for a quiet machine'}.`,
    ...(s.note ? ['', `**${s.note}**`] : []),
    '',
    'Ratio = mxkeys 2xx req/s (one worker) / the ceiling: a bare node:http server answering the same requests with the same bytes, measured in the same run with the same wrk settings. CPU = % of one core used during the one-worker window.',
    '',
    ...targetsTable(results),
  ];
  for (const b of results.backends) out.push('', ...throughputTable(b));
  const claims = claimsTable(results);
  if (claims.length) out.push('', ...claims);
  const memory = memoryTables(results);
  if (memory.length) out.push('', ...memory);
  return out.join('\n');
}

// ---------------------------------------------------------------------------------------------
// The chart

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

interface Bar {
  readonly label: string;
  readonly color: string;
  readonly value: number | undefined;
  readonly note?: string;
  /** req/s the target stands for (target × this backend's ceiling). */
  readonly target?: number;
}

export function svgChart(results: Results): string {
  const ids = [...new Set(results.backends.flatMap((b) => b.workloads.map((w) => w.id)))];
  const counts = [...new Set(results.backends.flatMap((b) => b.workloads.flatMap((w) => Object.keys(w.mxkeys).map(Number))))].sort((a, b) => a - b);
  const most = counts[counts.length - 1] ?? 1;
  const colors: Record<BackendName, [string, string]> = { sqlite: ['#2166ac', '#92c5de'], postgres: ['#d6604d', '#f4a582'] };
  const groups = ids.map((id) => {
    const per = results.backends.map((b) => ({ b, w: b.workloads.find((x) => x.id === id) })).filter((x) => x.w);
    const bars: Bar[] = [];
    for (const { b, w } of per) {
      const s = summarize(w!);
      const one = s.mxkeys['1'];
      bars.push({ label: `ceiling, ${DB[b.backend]} run`, color: '#a8a8a8', value: s.baselineRps });
      bars.push({ label: `${DB[b.backend]}`, color: colors[b.backend][0], value: one?.rps, note: one ? `${f2(one.ratio)} of the ceiling` : '', ...(w!.target !== undefined ? { target: w!.target * s.baselineRps } : {}) });
      if (most > 1) {
        const many = s.mxkeys[String(most)];
        bars.push({ label: `${DB[b.backend]}, ${most} workers`, color: colors[b.backend][1], value: many?.rps, note: s.factor !== undefined ? `× ${f2(s.factor)}` : '' });
      }
    }
    return { id, bars };
  });

  const values = groups.flatMap((g) => g.bars.map((b) => b.value).filter((v): v is number => v !== undefined && v > 0));
  const lo = Math.pow(10, Math.floor(Math.log10(Math.min(...values, 1e4))));
  const hi = Math.pow(10, Math.ceil(Math.log10(Math.max(...values, 10))));
  const left = 190;
  const plot = 520;
  const right = 170;
  const width = left + plot + right;
  const barH = 11;
  const gap = 3;
  const top = 34 + 16 * Math.ceil((2 + results.backends.length * (most > 1 ? 2 : 1)) / 2) + 8;
  const x = (v: number) => left + (plot * (Math.log10(v) - Math.log10(lo))) / (Math.log10(hi) - Math.log10(lo));
  const parts: string[] = [];
  let y = top;
  for (const g of groups) {
    const h = g.bars.length * (barH + gap);
    parts.push(`<text x="${left - 10}" y="${(y + h / 2 + 4).toFixed(1)}" text-anchor="end" font-weight="bold">${esc(SHORT[g.id])}</text>`);
    for (const b of g.bars) {
      if (b.value !== undefined && b.value > 0) {
        const w = Math.max(1, x(b.value) - left);
        parts.push(`<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barH}" fill="${b.color}"><title>${esc(`${SHORT[g.id]}: ${b.label} ${f0(b.value)} req/s`)}</title></rect>`);
      }
      if (b.target !== undefined && b.target > lo) {
        const tx = x(b.target).toFixed(1);
        parts.push(`<line x1="${tx}" x2="${tx}" y1="${y - 1}" y2="${y + barH + 1}" stroke="#000" stroke-width="2"><title>target ${f0(b.target)} req/s</title></line>`);
      }
      if (b.value !== undefined && b.value > 0) {
        // A white halo keeps the label readable over a target mark.
        const tx = (left + Math.max(1, x(b.value) - left) + 4).toFixed(1);
        parts.push(`<text x="${tx}" y="${y + barH - 2}" font-size="10" stroke="#fff" stroke-width="3" paint-order="stroke">${esc(`${f0(b.value)}${b.note ? ` · ${b.note}` : ''}`)}</text>`);
      }
      y += barH + gap;
    }
    y += 14;
  }
  const bottom = y;
  const grid: string[] = [];
  for (let v = lo; v <= hi * 1.001; v *= 10) {
    for (const m of [1, 2, 5]) {
      const t = v * m;
      if (t > hi * 1.001) break;
      const gx = x(t).toFixed(1);
      grid.push(`<line x1="${gx}" x2="${gx}" y1="${top - 6}" y2="${bottom - 10}" stroke="${m === 1 ? '#bbb' : '#e4e4e4'}"/>`);
      const label = t >= 1000 ? `${t / 1000}k` : String(t);
      grid.push(`<text x="${gx}" y="${bottom + 4}" text-anchor="middle" font-size="10" fill="#555">${label}</text>`);
    }
  }
  // Two columns: the ceiling and the target mark, then each database's one- and N-worker bars.
  const legendItems: { color?: string; text: string }[] = [{ color: '#a8a8a8', text: "ceiling: bare node:http, same bytes (each database's run)" }, { text: 'target (issue #13), 1 worker' }];
  for (const b of results.backends) {
    legendItems.push({ color: colors[b.backend][0], text: `${DB[b.backend]}, 1 worker` });
    if (most > 1) legendItems.push({ color: colors[b.backend][1], text: `${DB[b.backend]}, ${most} workers` });
  }
  const legend = legendItems.map((item, i) => {
    const lx = 10 + (i % 2) * 430;
    const ly = 34 + Math.floor(i / 2) * 16;
    const mark = item.color
      ? `<rect x="${lx}" y="${ly - 9}" width="12" height="10" fill="${item.color}"/>`
      : `<line x1="${lx + 6}" x2="${lx + 6}" y1="${ly - 10}" y2="${ly + 1}" stroke="#000" stroke-width="2"/>`;
    return `${mark}<text x="${lx + 17}" y="${ly}">${esc(item.text)}</text>`;
  });
  const height = bottom + 56;
  const title = `mxkeys throughput per workload, 2xx req/s (log scale): run of ${results.started.slice(0, 10)}`;
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    `<text x="10" y="16" font-size="13" font-weight="bold">${esc(title)}</text>`,
    ...legend,
    ...grid,
    ...parts,
    `<text x="${left + plot / 2}" y="${bottom + 20}" text-anchor="middle" fill="#555">2xx answers per second; labels: req/s · ratio to that database's same-run ceiling, or × the ${most}-worker factor over 1 worker</text>`,
    `<text x="10" y="${bottom + 40}" font-size="10" fill="#555">${esc(`code: ${results.code}; wrk ${results.settings.threads} thread(s), ${results.settings.connections} connections, ${results.settings.duration} s per run`)}</text>`,
    '</svg>',
    '',
  ].join('\n');
}

// ---------------------------------------------------------------------------------------------
// Command line

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { json: { type: 'string' }, svg: { type: 'string' }, docs: { type: 'string' }, stdout: { type: 'boolean' } } });
  const file = resolve(values.json ?? 'bench/results/latest.json');
  let results: Results;
  try {
    results = JSON.parse(readFileSync(file, 'utf8')) as Results;
  } catch (e) {
    process.stderr.write(`cannot read the bench results ${file}: ${(e as Error).message}\nRun \`npm run bench\` first, or give the file with --json FILE.\n`);
    process.exit(1);
  }
  if (results.format !== 1) {
    process.stderr.write(`${file}: not a results file of bench/run.ts (format ${String(results.format)})\n`);
    process.exit(1);
  }
  const tables = markdownReport(results);
  if (values.stdout) {
    process.stdout.write(`${tables}\n`);
  } else {
    const svgFile = resolve(values.svg ?? 'docs/benchmarks.svg');
    writeFileSync(svgFile, svgChart(results));
    const docsFile = resolve(values.docs ?? 'docs/benchmarks.md');
    const docs = readFileSync(docsFile, 'utf8');
    const a = docs.indexOf(BEGIN);
    const b = docs.indexOf(END);
    if (a < 0 || b < a) {
      process.stderr.write(`${docsFile} has no "${BEGIN}" … "${END}" section to replace; wrote only ${svgFile}\n`);
      process.exit(1);
    }
    writeFileSync(docsFile, `${docs.slice(0, a + BEGIN.length)}\n${tables}\n${docs.slice(b)}`);
    process.stderr.write(`wrote ${svgFile} and the tables in ${docsFile}\n`);
  }
}
