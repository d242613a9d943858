import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { createServer } from 'node:net';
import { runCli } from '../support/process.js';
import { tempDir } from '../support/backends.js';
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
});
