// StrykerJS configuration for `npm run mutation` (scripts/mutation.mjs sets the MXKEYS_MUTATION_*
// variables; see docs/mutation-testing.md). Not part of `npm test` or CI.
//
// The tap runner starts one node process per test file (node:test through tsx, TAP output) and
// records which mutants each file reaches, so a mutant is tried only against the files that
// execute it. Running `npx stryker run` by hand without the variables mutates the six
// security-critical modules against their test files.
const list = (name, fallback) => (process.env[name] ? process.env[name].split(',') : fallback);
const report = process.env.MXKEYS_MUTATION_REPORT ?? 'reports/mutation/mutation';

export default {
  testRunner: 'tap',
  tap: {
    testFiles: list('MXKEYS_MUTATION_TESTS', ['test/unit/*.test.ts', 'test/federation/*.test.ts', 'test/e2e/keys-*.test.ts', 'test/e2e/federation-*.test.ts']),
    // No --test: the file runs in this process, where Stryker's hook file collects coverage.
    nodeArgs: ['--import', 'tsx', '--test-reporter=tap', '-r', '{{hookFile}}', '{{testFile}}'],
    forceBail: true,
  },
  mutate: list('MXKEYS_MUTATE', [
    'src/keys/cross-signing.ts',
    'src/keys/validate.ts',
    'src/matrix/canonical-json.ts',
    'src/matrix/ids.ts',
    'src/federation/xmatrix.ts',
    'src/federation/request-auth.ts',
  ]),
  coverageAnalysis: 'perTest',
  // The machine is shared (2 cores): one test process at a time. `--concurrency N` overrides it.
  concurrency: 1,
  // Servers, databases and scrypt make a test file take seconds; a busy machine needs slack.
  timeoutMS: 20_000,
  timeoutFactor: 2,
  reporters: ['clear-text', 'progress-append-only', 'html', 'json'],
  htmlReporter: { fileName: `${report}.html` },
  jsonReporter: { fileName: `${report}.json` },
  clearTextReporter: { allowColor: false, logTests: false, reportScoreTable: true },
  // dist/ is copied: a few in-process test files also start the built CLI (unmutated) for one step.
  ignorePatterns: ['/reports', '/data', '/.bench-tmp'],
  tempDirName: '.stryker-tmp',
  cleanTempDir: true,
};
