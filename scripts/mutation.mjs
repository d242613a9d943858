#!/usr/bin/env node
// Mutation testing (`npm run mutation`): StrykerJS changes one spot of a module at a time (a
// mutant) and runs the tests that reach it; a mutant the tests do not notice "survives". Not part
// of `npm test` or CI: a module takes minutes to an hour. See docs/mutation-testing.md.
//
//   npm run mutation                     the six security-critical modules, one after another
//   npm run mutation -- ids xmatrix      only these (names below, or their src/ paths)
//   npm run mutation -- everything       all of src/ against every test file that runs in-process
//   npm run mutation -- ids --concurrency 2   extra arguments go to `stryker run`
//
// Each module is mutated against the test files listed for it, so its run does not start servers
// for unrelated tests. Reports: reports/mutation/<name>.html and .json. PostgreSQL is left out
// (MXKEYS_TEST_POSTGRES is cleared): the modules do not depend on the database kind.
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('..', import.meta.url).pathname;

/** Each module with the test files that exercise it. */
const MODULES = {
  'cross-signing': { file: 'src/keys/cross-signing.ts', tests: ['test/e2e/keys-query-cross-signing.test.ts'] },
  validate: { file: 'src/keys/validate.ts', tests: ['test/e2e/keys-upload-claim.test.ts', 'test/e2e/keys-query-cross-signing.test.ts'] },
  'canonical-json': { file: 'src/matrix/canonical-json.ts', tests: ['test/unit/canonical-json.test.ts', 'test/unit/signing.test.ts', 'test/federation/xmatrix.test.ts'] },
  ids: { file: 'src/matrix/ids.ts', tests: ['test/unit/ids.test.ts', 'test/federation/discovery.test.ts'] },
  xmatrix: { file: 'src/federation/xmatrix.ts', tests: ['test/federation/xmatrix.test.ts', 'test/e2e/federation-auth.test.ts'] },
  'request-auth': { file: 'src/federation/request-auth.ts', tests: ['test/e2e/federation-auth.test.ts'] },
};

/** Test files that only drive the built program (dist/main.js), which Stryker does not mutate. */
const OUT_OF_PROCESS = ['test/e2e/cli.test.ts', 'test/e2e/multiprocess.test.ts'];

function testFiles(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return testFiles(p);
    return name.endsWith('.test.ts') ? [relative(root, p)] : [];
  });
}

const args = process.argv.slice(2);
const firstOption = args.findIndex((a) => a.startsWith('-'));
const names = firstOption < 0 ? args : args.slice(0, firstOption);
const strykerArgs = firstOption < 0 ? [] : args.slice(firstOption);

const runs = [];
for (const name of names.length === 0 ? Object.keys(MODULES) : names) {
  if (name === 'everything') {
    const tests = testFiles(join(root, 'test')).filter((f) => !OUT_OF_PROCESS.includes(f)).sort();
    runs.push({ name, mutate: ['src/**/*.ts'], tests });
    continue;
  }
  const entry = Object.entries(MODULES).find(([n, m]) => n === name || m.file === name);
  if (!entry) {
    process.stderr.write(`Unknown module "${name}". Choose from: ${Object.keys(MODULES).join(', ')}, everything\n`);
    process.exit(2);
  }
  runs.push({ name: entry[0], mutate: [entry[1].file], tests: entry[1].tests });
}

if (runs.some((r) => r.name === 'everything')) {
  // Some in-process test files also run one step through the built CLI.
  const build = spawnSync(join(root, 'node_modules', '.bin', 'tsc'), ['-p', 'tsconfig.build.json'], { cwd: root, stdio: 'inherit' });
  if (build.status !== 0) process.exit(build.status || 1);
}

const { MXKEYS_TEST_POSTGRES: _pg, ...baseEnv } = process.env;
const summary = [];
for (const run of runs) {
  const report = `reports/mutation/${run.name}`;
  process.stdout.write(`\n== mutation testing ${run.mutate.join(', ')} against ${run.tests.length} test file(s)\n`);
  const started = Date.now();
  const r = spawnSync(join(root, 'node_modules', '.bin', 'stryker'), ['run', 'stryker.config.mjs', ...strykerArgs], {
    cwd: root,
    stdio: 'inherit',
    env: { ...baseEnv, MXKEYS_MUTATE: run.mutate.join(','), MXKEYS_MUTATION_TESTS: run.tests.join(','), MXKEYS_MUTATION_REPORT: report },
  });
  if (r.status !== 0) {
    process.stdout.write(`\nStryker failed on ${run.name} (exit ${r.status ?? r.signal}); see stryker.log and the output above\n`);
    process.exit(r.status || 1);
  }
  if (strykerArgs.includes('--dryRunOnly')) continue; // no mutants were tried, so there is no report
  summary.push({ name: run.name, minutes: (Date.now() - started) / 60_000, ...count(join(root, `${report}.json`)) });
}

/** Counts mutant outcomes in a Stryker JSON report (mutation-testing-report-schema). */
function count(file) {
  const c = { killed: 0, timeout: 0, survived: 0, noCoverage: 0, other: 0 };
  const report = JSON.parse(readFileSync(file, 'utf8'));
  for (const f of Object.values(report.files)) {
    for (const m of f.mutants) {
      if (m.status === 'Killed') c.killed++;
      else if (m.status === 'Timeout') c.timeout++;
      else if (m.status === 'Survived') c.survived++;
      else if (m.status === 'NoCoverage') c.noCoverage++;
      else c.other++;
    }
  }
  return c;
}

process.stdout.write('\n== summary (score = (killed + timeout) / (killed + timeout + survived + no coverage))\n');
for (const s of summary) {
  const detected = s.killed + s.timeout;
  const score = (100 * detected) / (detected + s.survived + s.noCoverage);
  process.stdout.write(
    `${s.name.padEnd(16)} ${score.toFixed(1).padStart(5)} %  killed ${s.killed}, timeout ${s.timeout}, survived ${s.survived}, no coverage ${s.noCoverage}` +
      `${s.other ? `, errors/ignored ${s.other}` : ''}  (${s.minutes.toFixed(1)} min)\n`,
  );
}
