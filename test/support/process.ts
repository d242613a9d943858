/**
 * Running the built CLI (`dist/main.js`, built by `npm test` before the tests) as a real process.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { after } from 'node:test';
import { fileURLToPath } from 'node:url';

export const MAIN = fileURLToPath(new URL('../../dist/main.js', import.meta.url));

export interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Environment for child processes: ours minus MXKEYS_* settings that would leak into them. */
export function childEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !(k.startsWith('MXKEYS_') && !k.startsWith('MXKEYS_TEST_'))) env[k] = v;
  return { ...env, ...extra };
}

export function runCli(args: readonly string[], options: { cwd?: string; env?: Record<string, string> } = {}): CliResult {
  const r = spawnSync(process.execPath, [MAIN, ...args], { cwd: options.cwd, env: childEnv(options.env), encoding: 'utf8', timeout: 30_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

export interface ServerProcess {
  readonly child: ChildProcess;
  readonly url: string;
  /** Everything the process wrote so far. */
  output(): string;
  /** Resolves with the exit code once the process has ended. */
  readonly exited: Promise<number | null>;
}

const children: ChildProcess[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

/**
 * How long a server process may take to start listening: only a bound for a process that hangs,
 * not a measure (on a loaded two-core machine a cluster's workers took over 20 s).
 */
const START_TIMEOUT_MS = 45_000;

/**
 * Starts `mxkeys serve` and waits for its "listening" log line. `onSpawn` gets the process at once
 * (to act on what it does while starting).
 */
export async function startServerProcess(
  args: readonly string[],
  options: { cwd?: string; env?: Record<string, string>; onSpawn?: (child: ChildProcess) => void } = {},
): Promise<ServerProcess> {
  const child = spawn(process.execPath, [MAIN, 'serve', ...args], { cwd: options.cwd, env: childEnv({ MXKEYS_LISTEN_PORT: '0', ...options.env }), stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  options.onSpawn?.(child);
  let out = '';
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const url = await new Promise<string>((resolve, reject) => {
    const onData = (d: Buffer) => {
      out += d.toString();
      const m = /"url":"(https?:\/\/[^"]+)"[^\n]*mxkeys is listening/.exec(out);
      if (m) resolve(m[1]!);
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    void exited.then((code) => reject(new Error(`mxkeys exited with ${code} before listening:\n${out}`)));
    setTimeout(() => reject(new Error(`mxkeys did not start within ${START_TIMEOUT_MS / 1000} s:\n${out}`)), START_TIMEOUT_MS).unref();
  });
  return { child, url, output: () => out, exited };
}
