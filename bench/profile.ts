/**
 * Summarises a V8 .cpuprofile (from `node --cpu-prof`): top functions by self time, and self time
 * grouped by where the code lives (mxkeys' dist/, a package in node_modules, Node's internals,
 * native/GC). Used by the harness with --cpu-prof, and on its own:
 *
 *   node --import tsx bench/profile.ts FILE.cpuprofile [TOP]
 */
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  children?: number[];
}

interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileSummary {
  /** Milliseconds of samples, idle excluded. */
  readonly busyMs: number;
  readonly idleMs: number;
  readonly functions: { name: string; where: string; ms: number; pct: number }[];
  readonly groups: { group: string; ms: number; pct: number }[];
  /**
   * For the heaviest functions that belong to Node or V8 (writev, hashing, …): who called them,
   * by the origin of the nearest caller that is not Node's or V8's own code.
   */
  readonly callers: { name: string; ms: number; by: { group: string; pct: number }[] }[];
}

const RUNTIME = new Set(['native / builtins', 'node internals', 'GC', '(program: native, outside JS)']);

function shortUrl(url: string): string {
  if (url === '') return '';
  const nm = url.lastIndexOf('/node_modules/');
  if (nm >= 0) return url.slice(nm + '/node_modules/'.length);
  const dist = url.indexOf('/dist/');
  if (dist >= 0) return url.slice(dist + 1);
  return url.replace(/^file:\/\//, '');
}

function groupOf(url: string, name: string): string {
  if (name === '(garbage collector)') return 'GC';
  if (name === '(program)') return '(program: native, outside JS)';
  if (url === '') return 'native / builtins';
  if (url.startsWith('node:')) return 'node internals';
  const nm = url.lastIndexOf('/node_modules/');
  if (nm >= 0) {
    const rest = url.slice(nm + '/node_modules/'.length).split('/');
    return rest[0]!.startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0]!;
  }
  const dist = url.indexOf('/dist/');
  if (dist >= 0) {
    const parts = url.slice(dist + '/dist/'.length).split('/');
    return `mxkeys ${parts.length > 1 ? parts[0] : parts[0]!.replace(/\.js$/, '')}`;
  }
  return shortUrl(url);
}

export function summarizeProfile(file: string, top = 20): ProfileSummary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  /** The origin of the nearest frame above `id` that is not the runtime's own. */
  const callerGroup = (id: number): string => {
    for (let p = parent.get(id); p !== undefined; p = parent.get(p)) {
      const cf = byId.get(p)!.callFrame;
      const g = groupOf(cf.url, cf.functionName);
      if (!RUNTIME.has(g) && cf.functionName !== '(root)') return g;
    }
    return '(runtime only: event loop, timers, …)';
  };
  const selfUs = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const id = profile.samples[i]!;
    // timeDeltas[i] is the time before sample i; attribute the following delta to this sample.
    const dt = profile.timeDeltas[i + 1] ?? 0;
    selfUs.set(id, (selfUs.get(id) ?? 0) + Math.max(0, dt));
  }
  let idle = 0;
  let busy = 0;
  const fns = new Map<string, { name: string; where: string; us: number; runtime: boolean; callers: Map<string, number> }>();
  const groups = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const node = byId.get(id)!;
    const { functionName, url, lineNumber } = node.callFrame;
    if (functionName === '(idle)') {
      idle += us;
      continue;
    }
    busy += us;
    const name = functionName || '(anonymous)';
    const where = url ? `${shortUrl(url)}:${lineNumber + 1}` : '';
    const key = `${name}\0${where}`;
    const g = groupOf(url, functionName);
    const f = fns.get(key) ?? { name, where, us: 0, runtime: RUNTIME.has(g) && functionName !== '(garbage collector)' && functionName !== '(program)', callers: new Map<string, number>() };
    f.us += us;
    if (f.runtime) {
      const cg = callerGroup(id);
      f.callers.set(cg, (f.callers.get(cg) ?? 0) + us);
    }
    fns.set(key, f);
    groups.set(g, (groups.get(g) ?? 0) + us);
  }
  const pct = (us: number) => (100 * us) / Math.max(1, busy);
  const sorted = [...fns.values()].sort((a, b) => b.us - a.us);
  return {
    callers: sorted
      .filter((f) => f.runtime)
      .slice(0, 5)
      .map((f) => ({
        name: f.name,
        ms: f.us / 1000,
        by: [...f.callers.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([group, us]) => ({ group, pct: (100 * us) / f.us })),
      })),
    busyMs: busy / 1000,
    idleMs: idle / 1000,
    functions: sorted
      .slice(0, top)
      .map((f) => ({ name: f.name, where: f.where, ms: f.us / 1000, pct: pct(f.us) })),
    groups: [...groups.entries()].sort((a, b) => b[1] - a[1]).map(([group, us]) => ({ group, ms: us / 1000, pct: pct(us) })),
  };
}

export function formatSummary(s: ProfileSummary, topGroups = 12): string {
  const lines = [`busy ${s.busyMs.toFixed(0)} ms, idle ${s.idleMs.toFixed(0)} ms`, 'self time by function:'];
  for (const f of s.functions) lines.push(`  ${f.pct.toFixed(1).padStart(5)} %  ${f.ms.toFixed(0).padStart(6)} ms  ${f.name}  ${f.where}`);
  lines.push('self time by origin:');
  for (const g of s.groups.slice(0, topGroups)) lines.push(`  ${g.pct.toFixed(1).padStart(5)} %  ${g.ms.toFixed(0).padStart(6)} ms  ${g.group}`);
  lines.push("runtime functions by their nearest caller's origin:");
  for (const c of s.callers) lines.push(`  ${c.name} (${c.ms.toFixed(0)} ms): ${c.by.map((b) => `${b.group} ${b.pct.toFixed(0)} %`).join(', ')}`);
  return lines.join('\n');
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const [file, top] = process.argv.slice(2);
  if (!file) {
    process.stderr.write('usage: node --import tsx bench/profile.ts FILE.cpuprofile [TOP]\n');
    process.exit(2);
  }
  process.stdout.write(`${formatSummary(summarizeProfile(file, Number(top ?? 25)))}\n`);
}
