/**
 * What ships and how it is installed and run in production: the npm package's contents, the
 * `prepare` step without dev dependencies, the systemd unit and the Dockerfile
 * (docs/operations.md, "Installing for production").
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../support/backends.js';
import { loadConfig } from '../../src/config/load.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const read = (path: string) => readFileSync(join(ROOT, path), 'utf8');

describe('the npm package', () => {
  test('ships the built dist/, the docs and deploy files, and no tests, benchmarks, CI files, sources or configs', () => {
    // --ignore-scripts: list what would be packed without building (npm test has built dist/).
    const r = spawnSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: ROOT, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    const files = (JSON.parse(r.stdout) as { files: { path: string }[] }[])[0]!.files.map((f) => f.path);
    for (const needed of ['package.json', 'README.md', 'dist/main.js', 'dist/index.js', 'dist/index.d.ts', 'docs/operations.md', 'deploy/mxkeys.service', 'scripts/prepare.mjs']) {
      assert.ok(files.includes(needed), `${needed} is in the package`);
    }
    const unwanted = files.filter(
      (f) => /^(test|bench|src|\.ci|data)\//.test(f) || /\.(ya?ml|env|key|db|log)$/.test(f) || (f.startsWith('scripts/') && f !== 'scripts/prepare.mjs') || f.endsWith('.map'),
    );
    assert.deepEqual(unwanted, [], 'nothing else is packed');
  });

  test('npm start is "node dist/main.js serve", the README\'s command', () => {
    const pkg = JSON.parse(read('package.json')) as { scripts: Record<string, string>; bin: Record<string, string> };
    assert.equal(pkg.scripts['start'], 'node dist/main.js serve');
    assert.equal(pkg.bin['mxkeys'], 'dist/main.js');
    assert.match(read('src/main.ts'), /^#!\/usr\/bin\/env node/);
  });

  test('the prepare step of a production install uses the shipped dist/, and without it says what to do', () => {
    const release = tempDir();
    mkdirSync(join(release, 'scripts'));
    copyFileSync(join(ROOT, 'scripts/prepare.mjs'), join(release, 'scripts/prepare.mjs'));
    // No node_modules/typescript here, as after `npm ci --omit=dev`.
    const missing = spawnSync(process.execPath, ['scripts/prepare.mjs'], { cwd: release, encoding: 'utf8' });
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /dist\/ is missing and TypeScript \(a dev dependency\) is not installed/);
    assert.match(missing.stderr, /npm pack/);
    mkdirSync(join(release, 'dist'));
    writeFileSync(join(release, 'dist/main.js'), '');
    const shipped = spawnSync(process.execPath, ['scripts/prepare.mjs'], { cwd: release, encoding: 'utf8' });
    assert.equal(shipped.status, 0, shipped.stderr);
  });
});

describe('deploy/mxkeys.service', () => {
  const unit = read('deploy/mxkeys.service');

  test('runs node directly as its own user, hardened, with only the state directory writable', () => {
    const settings = new Map(
      unit
        .split('\n')
        .filter((l) => /^[A-Za-z]+=/.test(l))
        .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)] as const),
    );
    assert.match(settings.get('ExecStart') ?? '', /^\/usr\/bin\/node \/opt\/mxkeys\/dist\/main\.js serve --config /, 'node itself, so SIGTERM reaches the server');
    assert.equal(settings.get('User'), 'mxkeys');
    assert.equal(settings.get('NoNewPrivileges'), 'yes');
    assert.equal(settings.get('ProtectSystem'), 'strict');
    assert.equal(settings.get('ProtectHome'), 'yes');
    assert.equal(settings.get('StateDirectory'), 'mxkeys');
    assert.equal(settings.get('ReadWritePaths'), '/var/lib/mxkeys');
    assert.equal(settings.get('WorkingDirectory'), '/var/lib/mxkeys');
    assert.equal(settings.get('CapabilityBoundingSet'), '');
    assert.equal(settings.get('KillSignal'), 'SIGTERM');
    assert.ok(!settings.has('MemoryDenyWriteExecute'), "V8's JIT needs writable, executable memory");
  });

  test('passes systemd-analyze verify', { skip: !existsSync('/usr/bin/systemd-analyze') && 'systemd-analyze is not installed' }, () => {
    // verify checks that ExecStart's program exists: point it at this machine's node.
    const dir = tempDir();
    const copy = join(dir, 'mxkeys.service');
    writeFileSync(copy, unit.replace('/usr/bin/node ', `${process.execPath} `));
    const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr.trim(), '', 'no warnings');
  });
});

describe('Dockerfile', () => {
  // No container engine runs on the test machines (docs/operations.md says so); these check what
  // can be checked without one.
  const dockerfile = read('Dockerfile');
  const instructions = dockerfile
    .replace(/\\\n/g, ' ')
    .split('\n')
    .filter((l) => /^[A-Z]+ /.test(l))
    .map((l) => ({ op: l.slice(0, l.indexOf(' ')), arg: l.slice(l.indexOf(' ') + 1).trim() }));
  const stages = instructions.reduce<(typeof instructions)[]>((acc, i) => (i.op === 'FROM' ? [...acc, [i]] : (acc[acc.length - 1]!.push(i), acc)), []);
  const final = stages[stages.length - 1]!;
  const last = (op: string) => [...final].reverse().find((i) => i.op === op)?.arg;

  test('builds in one stage and runs in another, as an unprivileged user with a data volume and a health check', () => {
    assert.ok(stages.length >= 2, 'multi-stage');
    assert.match(stages[0]![0]!.arg, /^node:20/);
    assert.match(final[0]!.arg, /^node:20/);
    assert.ok(stages[0]!.some((i) => i.op === 'RUN' && /npm ci/.test(i.arg) && /npm prune --omit=dev/.test(i.arg)), 'production dependencies only are carried over');
    assert.equal(last('USER'), 'node');
    assert.match(last('VOLUME') ?? '', /\/var\/lib\/mxkeys\/data/);
    assert.equal(last('WORKDIR'), '/var/lib/mxkeys', './data resolves to the volume');
    assert.match(last('HEALTHCHECK') ?? '', /\/health/);
    assert.match(last('ENTRYPOINT') ?? '', /^\["node", "\/opt\/mxkeys\/dist\/main\.js"\]$/, 'exec form, node itself');
    assert.equal(last('STOPSIGNAL'), 'SIGTERM');
    assert.ok(!final.some((i) => i.op === 'COPY' && !i.arg.startsWith('--from=')), 'the run stage copies only from the build stage');
  });

  test('listens through a config file of its own, not MXKEYS_LISTEN_* variables that would override a mounted one', () => {
    const envLines = final.filter((i) => i.op === 'ENV').map((i) => i.arg).join(' ');
    assert.doesNotMatch(envLines, /MXKEYS_LISTEN/);
    assert.match(envLines, /MXKEYS_CONFIG=\/etc\/mxkeys\/mxkeys\.yaml/);
    // Write the image's file as its RUN step does, here, and read it as serve would.
    const writes = final.filter((i) => i.op === 'RUN').flatMap((i) => i.arg.split('&&')).find((c) => c.includes('> /etc/mxkeys/mxkeys.yaml'));
    assert.ok(writes, 'a RUN step writes /etc/mxkeys/mxkeys.yaml');
    const file = join(tempDir(), 'mxkeys.yaml');
    const r = spawnSync('sh', ['-c', writes.replace('/etc/mxkeys/mxkeys.yaml', file)], { encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    // The server name comes from MXKEYS_SERVER_NAME, as docs/operations.md shows.
    const env = { MXKEYS_SERVER_NAME: 'example.org' };
    const config = loadConfig({ file, env });
    assert.deepEqual([config.listen.host, config.listen.port], ['0.0.0.0', 8008]);
    assert.equal(loadConfig({ file, env: { ...env, MXKEYS_LISTEN_PORT: '9000' } }).listen.port, 9000, 'variables still override it');
  });

  test('the health check asks GET /health on the port the configuration names', async () => {
    const argv = JSON.parse(last('HEALTHCHECK')!.replace(/^.*?CMD /, '')) as string[];
    assert.equal(argv[0], 'node');
    const script = argv.slice(1).map((a) => a.replace('/opt/mxkeys/dist/', join(ROOT, 'dist/')));
    const health = createServer((req, res) => res.writeHead(req.url === '/health' ? 200 : 404).end());
    await new Promise<void>((resolve) => health.listen(0, '127.0.0.1', resolve));
    try {
      const port = (health.address() as AddressInfo).port;
      const file = join(tempDir(), 'mxkeys.yaml');
      writeFileSync(file, `server_name: example.org\nlisten: { host: 0.0.0.0, port: ${port} }\n`);
      const check = (env: Record<string, string>) =>
        new Promise<number | null>((resolve) => execFile(process.execPath, script, { env: { PATH: process.env['PATH'] ?? '', ...env } }, (e) => resolve(e ? (e.code as number) : 0)));
      assert.equal(await check({ MXKEYS_CONFIG: file }), 0, "the mounted file's port");
      writeFileSync(file, 'server_name: example.org\nlisten: { host: 0.0.0.0, port: 1 }\n');
      assert.equal(await check({ MXKEYS_CONFIG: file }), 1, 'nothing listens there');
      assert.equal(await check({ MXKEYS_CONFIG: file, MXKEYS_LISTEN_PORT: String(port) }), 0, 'a variable overrides the file, as for serve');
    } finally {
      health.close();
    }
  });

  test('copies only files that exist and that .dockerignore lets through', () => {
    const allowed = read('.dockerignore')
      .split('\n')
      .filter((l) => l.startsWith('!'))
      .map((l) => l.slice(1).replace(/\/$/, ''));
    for (const copy of stages[0]!.filter((i) => i.op === 'COPY')) {
      const sources = copy.arg.split(/\s+/).slice(0, -1);
      for (const source of sources) {
        assert.ok(existsSync(join(ROOT, source)), `${source} exists`);
        assert.ok(allowed.includes(source), `${source} is let through by .dockerignore`);
      }
    }
  });
});
