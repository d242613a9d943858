import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, writeFileSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { childEnv, MAIN, runCli } from '../support/process.js';
import { spawn } from 'node:child_process';
import { tempDir } from '../support/backends.js';
import { testCa } from '../support/tls.js';
import { parseSigningKeys } from '../../src/federation/signing-key-file.js';
import { SqliteDatabase } from '../../src/storage/sqlite/driver.js';

function configIn(dir: string, extra = ''): string {
  const path = join(dir, 'mxkeys.yaml');
  writeFileSync(path, `server_name: cli.example\ndatabase: { sqlite: ${join(dir, 'db.sqlite')} }\nsigning_key_path: ${join(dir, 'signing.key')}\nregistration_shared_secret: topsecret\n${extra}`);
  return path;
}

describe('the mxkeys command line', () => {
  test('--help lists the commands and exits 0; no command at all is a usage error (2)', () => {
    const help = runCli(['--help']);
    assert.equal(help.code, 0);
    for (const c of ['serve', 'generate-key', 'check-config', 'migrate']) assert.match(help.stdout, new RegExp(c));
    const none = runCli([]);
    assert.equal(none.code, 2);
    assert.match(none.stderr, /Usage: mxkeys <command>/);
  });

  test('every command has --help', () => {
    for (const c of ['serve', 'generate-key', 'check-config', 'migrate']) {
      const r = runCli([c, '--help']);
      assert.equal(r.code, 0, c);
      assert.match(r.stdout, new RegExp(`Usage: mxkeys ${c}`));
    }
  });

  test('an unknown command or flag exits 2 and says what was wrong', () => {
    const cmd = runCli(['serv']);
    assert.equal(cmd.code, 2);
    assert.match(cmd.stderr, /unknown command "serv"/);
    const flag = runCli(['serve', '--conifg', 'x']);
    assert.equal(flag.code, 2);
    assert.match(flag.stderr, /--conifg/);
  });

  test('check-config prints the effective configuration with secrets masked', () => {
    const dir = tempDir();
    const r = runCli(['check-config', '--config', configIn(dir)], { env: { MXKEYS_LISTEN_PORT: '9999' } });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /server_name: cli.example/);
    assert.match(r.stdout, /port: 9999/);
    assert.ok(!r.stdout.includes('topsecret'));
  });

  test('check-config without --config, or with a bad config, exits 2 naming the key', () => {
    assert.equal(runCli(['check-config']).code, 2);
    const dir = tempDir();
    const bad = runCli(['check-config', '--config', configIn(dir, 'listen: { port: 70000 }\n')]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /"listen.port"/);
    const unknown = runCli(['check-config', '--config', configIn(dir, 'colour: blue\n')]);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /"colour" is not a known setting/);
  });

  test('serve with a bad configuration exits 2 before touching anything', () => {
    const dir = tempDir();
    const r = runCli(['serve', '--config', configIn(dir, 'federation: { trusted_key_servers: [ { server_name: "no way" } ] }\n')]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /trusted_key_servers\[0\].server_name/);
  });

  test('generate-key writes a Synapse-format key file with mode 0600 and never overwrites one', () => {
    const dir = tempDir();
    const out = join(dir, 'new.key');
    const r = runCli(['generate-key', '--out', out]);
    assert.equal(r.code, 0, r.stderr);
    const text = readFileSync(out, 'utf8');
    assert.match(text, /^ed25519 a_[A-Za-z0-9]{4} [A-Za-z0-9+/]{43}\n$/);
    assert.equal(parseSigningKeys(text, out).length, 1);
    assert.equal(statSync(out).mode & 0o777, 0o600);
    const again = runCli(['generate-key', '--out', out]);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /already exists/);
    assert.equal(readFileSync(out, 'utf8'), text);
    const toStdout = runCli(['generate-key']);
    assert.equal(toStdout.code, 0);
    assert.match(toStdout.stdout, /^ed25519 /);
  });

  test('migrate brings a database to the current schema and reports it; a second run has nothing to do', () => {
    const dir = tempDir();
    const config = configIn(dir);
    const first = runCli(['migrate', '--config', config]);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /migrated the database from schema version 0 to \d+/);
    const second = runCli(['migrate', '--config', config]);
    assert.equal(second.code, 0);
    assert.match(second.stdout, /up to date/);
  });

  test('a schema newer than the code is a runtime failure (1) that explains itself', async () => {
    const dir = tempDir();
    const config = configIn(dir);
    assert.equal(runCli(['migrate', '--config', config]).code, 0);
    const db = new SqliteDatabase({ path: join(dir, 'db.sqlite') });
    await db.run('INSERT INTO mxkeys_schema (version, name, applied_ts) VALUES (?, ?, ?)', [999, 'future', 0]);
    await db.close();
    for (const cmd of ['migrate', 'serve']) {
      const r = runCli([cmd, '--config', config]);
      assert.equal(r.code, 1, cmd);
      assert.match(r.stderr, /schema is at version 999/);
    }
  });

  test('serve on an address already in use exits 1 and says which setting to change', async () => {
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const port = (blocker.address() as { port: number }).port;
    try {
      const dir = tempDir();
      const r = runCli(['serve', '--config', configIn(dir)], { env: { MXKEYS_LISTEN_PORT: String(port) } });
      assert.equal(r.code, 1);
      assert.match(r.stderr, /EADDRINUSE/);
      assert.match(r.stderr, /listen.port/);
    } finally {
      blocker.close();
    }
  });

  test('a corrupt signing key file is a configuration error (2) naming the file and line', () => {
    const dir = tempDir();
    writeFileSync(join(dir, 'signing.key'), 'ed25519 a_x notbase64!\n');
    const r = runCli(['serve', '--config', configIn(dir)]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /signing.key line 1/);
  });

  test('a busy metrics port is reported as the metrics listener, naming metrics.port', async () => {
    const blocker = createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const port = (blocker.address() as { port: number }).port;
    try {
      const r = runCli(['serve', '--config', configIn(tempDir(), `metrics: { enabled: true, port: ${port} }\n`)], { env: { MXKEYS_LISTEN_PORT: '0' } });
      assert.equal(r.code, 1);
      assert.match(r.stderr, new RegExp(`cannot open the metrics listener on 127\\.0\\.0\\.1:${port} \\(EADDRINUSE\\)`));
      assert.match(r.stderr, /metrics\.host\/metrics\.port/);
      assert.doesNotMatch(r.stderr, /listen\.port/);
    } finally {
      blocker.close();
    }
  });

  test('PostgreSQL refusing connections is reported with the setting, the address and what to check', async () => {
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const port = (probe.address() as { port: number }).port;
    await new Promise((resolve) => probe.close(resolve)); // nothing listens there now
    const r = runCli(['serve', '--config', configIn(tempDir())], { env: { MXKEYS_DATABASE_POSTGRES: `postgres://mx:hunter2@127.0.0.1:${port}/mxkeys` } });
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`database\\.postgres: cannot connect to 127\\.0\\.0\\.1:${port}: connection refused`));
    assert.doesNotMatch(r.stderr, /hunter2/, 'the password is not shown');
  });

  test('a server that accepts connections but never answers fails after database.connect_timeout, saying so', async () => {
    const silent = createServer(() => undefined); // accepts, then says nothing
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const port = (silent.address() as { port: number }).port;
    try {
      const config = configIn(tempDir());
      const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [MAIN, 'serve', '--config', config], {
          env: childEnv({ MXKEYS_DATABASE_POSTGRES: `postgres://mx@127.0.0.1:${port}/mxkeys`, MXKEYS_DATABASE_CONNECT_TIMEOUT: '1s' }),
        });
        let stderr = '';
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('exit', (code) => resolve({ code, stderr }));
      });
      assert.equal(r.code, 1);
      assert.match(r.stderr, new RegExp(`database\\.postgres: no answer from 127\\.0\\.0\\.1:${port} within 1 s \\(database\\.connect_timeout\\)`));
    } finally {
      silent.close();
    }
  });

  test('a SQLite path that cannot be a database file names database.sqlite and what is wrong', () => {
    const dir = tempDir();
    writeFileSync(join(dir, 'plain-file'), 'x');
    const r = runCli(['serve', '--config', configIn(dir)], { env: { MXKEYS_DATABASE_SQLITE: join(dir, 'plain-file', 'mxkeys.db') } });
    assert.equal(r.code, 1);
    assert.match(r.stderr, /database\.sqlite: cannot use .*plain-file\/mxkeys\.db: a part of the path is a file, not a directory/);
  });

  test('a database that belongs to another server name stops serve with a configuration error (2)', () => {
    const dir = tempDir();
    assert.equal(runCli(['users', 'list', '--config', configIn(dir)]).code, 0, 'first use records cli.example');
    const r = runCli(['serve', '--config', configIn(dir)], { env: { MXKEYS_SERVER_NAME: 'other.example' } });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /configuration error: config key "server_name" is "other\.example", but this database belongs to "cli\.example"/);
  });

  test('check-config also checks the files the configuration names, as serve would', () => {
    const dir = tempDir();
    const missingCa = runCli(['check-config', '--config', configIn(dir, `federation: { tls_ca_file: ${join(dir, 'no-such-ca.pem')} }\n`)]);
    assert.equal(missingCa.code, 2);
    assert.match(missingCa.stderr, /federation\.tls_ca_file.*no-such-ca\.pem: ENOENT/);
    writeFileSync(join(dir, 'not-a-ca.pem'), 'hello\n');
    const notPem = runCli(['check-config', '--config', configIn(dir, `federation: { tls_ca_file: ${join(dir, 'not-a-ca.pem')} }\n`)]);
    assert.equal(notPem.code, 2);
    assert.match(notPem.stderr, /holds no PEM certificate/);

    // The listener's certificate and key: missing, not PEM, or not a pair.
    const ca = testCa();
    const one = ca.leaf('one', 'DNS:one.example');
    const two = ca.leaf('two', 'DNS:two.example');
    const tls = (cert: string, key: string) => runCli(['check-config', '--config', configIn(dir, `tls_certificate_path: ${cert}\ntls_private_key_path: ${key}\n`)]);
    const missingCert = tls(join(dir, 'no-such-cert.pem'), one.keyPath);
    assert.equal(missingCert.code, 2);
    assert.match(missingCert.stderr, /tls_certificate_path.*no-such-cert\.pem: ENOENT/);
    const missingKey = tls(one.certPath, join(dir, 'no-such-key.pem'));
    assert.equal(missingKey.code, 2);
    assert.match(missingKey.stderr, /tls_private_key_path.*no-such-key\.pem: ENOENT/);
    const notPemCert = tls(join(dir, 'not-a-ca.pem'), one.keyPath);
    assert.equal(notPemCert.code, 2);
    assert.match(notPemCert.stderr, /"tls_certificate_path": .*not-a-ca\.pem holds no PEM certificate/);
    const swapped = tls(one.keyPath, one.certPath);
    assert.equal(swapped.code, 2);
    assert.match(swapped.stderr, /"tls_certificate_path": .*one\.key holds no PEM certificate/);
    assert.match(swapped.stderr, /"tls_private_key_path": .*one\.pem holds no unencrypted PEM private key/);
    const mismatched = tls(one.certPath, two.keyPath);
    assert.equal(mismatched.code, 2);
    assert.match(mismatched.stderr, /the key in .*two\.key does not belong to the certificate in .*one\.pem/);
    const pair = tls(one.certPath, one.keyPath);
    assert.doesNotMatch(pair.stderr, /tls_/, 'a matching pair passes');

    const typo = runCli(['check-config', '--config', configIn(dir)], { env: { MXKEYS_SIGNING_KEY_PATH: join(dir, 'typo', 'signing.key') } });
    assert.equal(typo.code, 2);
    assert.match(typo.stderr, /signing_key_path: neither .*typo\/signing\.key nor its directory .*typo exists/);

    writeFileSync(join(dir, 'signing.key'), 'ed25519 a_x notbase64!\n');
    const corrupt = runCli(['check-config', '--config', configIn(dir)]);
    assert.equal(corrupt.code, 2);
    assert.match(corrupt.stderr, /signing\.key line 1/);

    const fresh = tempDir();
    const ok = runCli(['check-config', '--config', configIn(fresh)]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stderr, /note: signing_key_path: .* does not exist yet; the first start creates a new signing key there/);
    assert.deepEqual(readdirSync(fresh), ['mxkeys.yaml'], 'check-config creates nothing');
  });

  test('generate-key --print-public and show-key print the key ID and public key, never the secret', () => {
    const dir = tempDir();
    const out = join(dir, 'signing.key');
    const made = runCli(['generate-key', '--out', out, '--print-public']);
    assert.equal(made.code, 0, made.stderr);
    const [key] = parseSigningKeys(readFileSync(out, 'utf8'), out);
    assert.equal(made.stdout, `${key!.keyId} ${key!.publicKey}\n`);
    assert.ok(!made.stdout.includes(readFileSync(out, 'utf8').split(' ')[2]!.trim()), 'the seed is not printed');
    assert.equal(runCli(['show-key', '--key', out]).stdout, made.stdout);
    assert.equal(runCli(['show-key', '--config', configIn(dir)]).stdout, made.stdout, 'from the configuration\'s signing_key_path');
    const noOut = runCli(['generate-key', '--print-public']);
    assert.equal(noOut.code, 2);
    assert.match(noOut.stderr, /--print-public needs --out FILE/);
  });

  test('register-user asks for the password on a terminal without echoing it', { skip: !existsSync('/usr/bin/script') && 'util-linux script(1) is not installed' }, async () => {
    const dir = tempDir();
    const config = configIn(dir);
    // script(1) gives the command a pseudo-terminal, as an operator's shell would.
    const command = [process.execPath, MAIN, 'register-user', '--config', config, '--user', 'tty-user'].map((a) => `'${a}'`).join(' ');
    const child = spawn('script', ['-qec', command, '/dev/null'], { env: childEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
    let seen = '';
    const waiters: (() => void)[] = [];
    child.stdout.on('data', (d: Buffer) => {
      seen += d.toString();
      for (const w of waiters.splice(0)) w();
    });
    child.on('exit', () => waiters.splice(0).forEach((w) => w()));
    const waitFor = async (re: RegExp) => {
      while (!re.test(seen)) {
        if (child.exitCode !== null) throw new Error(`exited before ${re}: ${seen}`);
        await new Promise<void>((resolve) => waiters.push(resolve));
      }
    };
    await waitFor(/Password for @tty-user:cli\.example: /);
    child.stdin.write('s3cret-pass\r');
    await waitFor(/Again, to confirm: /);
    child.stdin.write('s3cret-pass\r');
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    assert.equal(code, 0, seen);
    assert.match(seen, /@tty-user:cli\.example/);
    assert.doesNotMatch(seen, /s3cret-pass/, 'the password was not echoed');
  });

  test("the docs' complete example: check-config reports the CA file serve would fail on, and passes once it exists", async () => {
    const { rootCertificates } = await import('node:tls');
    const doc = readFileSync(new URL('../../docs/configuration.md', import.meta.url), 'utf8');
    const example = /## A complete example\n\n```yaml\n([\s\S]*?)```/.exec(doc)![1]!;
    const dir = tempDir();
    mkdirSync(join(dir, 'data'));
    writeFileSync(join(dir, 'mxkeys.yaml'), example);
    const missing = runCli(['check-config', '--config', 'mxkeys.yaml'], { cwd: dir });
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /federation\.tls_ca_file.*\/etc\/mxkeys\/extra-ca\.pem/);
    writeFileSync(join(dir, 'ca.pem'), rootCertificates[0]!);
    writeFileSync(join(dir, 'mxkeys.yaml'), example.replace('/etc/mxkeys/extra-ca.pem', join(dir, 'ca.pem')));
    const ok = runCli(['check-config', '--config', 'mxkeys.yaml'], { cwd: dir });
    assert.equal(ok.code, 0, ok.stderr);
  });
});

