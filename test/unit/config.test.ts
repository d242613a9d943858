import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, durationMs, envVariables, loadConfig, maskSecrets } from '../../src/config/load.js';
import { tempDir } from '../support/backends.js';

function configFile(text: string): string {
  const path = join(tempDir(), 'mxkeys.yaml');
  writeFileSync(path, text);
  return path;
}

function configError(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof ConfigError, `expected a ConfigError, got ${String(e)}`);
    return e.message;
  }
  assert.fail('expected a ConfigError');
}

describe('configuration', () => {
  test('without a file every key has a default and the server is "localhost" on SQLite', () => {
    const c = loadConfig({ env: {} });
    assert.equal(c.server_name, 'localhost');
    assert.deepEqual(c.listen, { host: '127.0.0.1', port: 8008, x_forwarded: false });
    assert.equal(c.enable_registration, false);
    assert.equal(c.allow_access_token_in_query, false);
    assert.equal(c.database.sqlite, './data/mxkeys.db');
    assert.equal(c.signing_key_path, './data/signing.key');
    assert.equal(c.federation.allow_device_name_lookup, false);
    assert.equal(c.max_request_body_bytes, 10485760);
  });

  test('reads the documented keys from YAML', () => {
    const c = loadConfig({
      env: {},
      file: configFile(`
server_name: example.org
listen: { host: 0.0.0.0, port: 9000 }
database:
  postgres: postgres://u:p@db:5432/mx
signing_key_path: /etc/mxkeys/signing.key
registration_shared_secret: s3cret
federation:
  resolve: { "other.example": "http://127.0.0.1:8009" }
  trusted_key_servers: [ { server_name: matrix.org } ]
  allow_device_name_lookup: true
max_request_body_bytes: 2048
`),
    });
    assert.equal(c.server_name, 'example.org');
    assert.equal(c.listen.port, 9000);
    assert.equal(c.database.postgres, 'postgres://u:p@db:5432/mx');
    assert.equal(c.database.sqlite, undefined);
    assert.deepEqual(c.federation.resolve, { 'other.example': 'http://127.0.0.1:8009' });
    assert.deepEqual(c.federation.trusted_key_servers, [{ server_name: 'matrix.org' }]);
    assert.equal(c.federation.allow_device_name_lookup, true);
  });

  test('a config file must name the server', () => {
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('listen: { port: 1 }\n') })), /"server_name" is required/);
  });

  test('unknown keys are refused with their full path', () => {
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\nfederation: { resolv: {} }\n') })), /"federation.resolv" is not a known setting/);
  });

  test('wrong types are refused with the key, what was found and what was expected', () => {
    const msg = configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\nlisten: { port: "eighty" }\n') }));
    assert.match(msg, /"listen.port"/);
    assert.match(msg, /found "eighty"/);
    assert.match(msg, /integer/);
  });

  test('both databases at once are refused', () => {
    assert.match(
      configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\ndatabase: { sqlite: x.db, postgres: "postgres://h/db" }\n') })),
      /exactly one of/,
    );
  });

  test('invalid server names, database URLs and resolve targets are refused', () => {
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: "not a name"\n') })), /not a valid Matrix server name/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\ndatabase: { postgres: "mysql://x" }\n') })), /database.postgres/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\nfederation: { resolve: { "x.y": "ftp://z" } }\n') })), /federation.resolve.x.y/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\nkey_refresh_interval: soon\n') })), /key_refresh_interval/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\nold_signing_keys: { "ed25519:x": { key: "short", expired_ts: 1 } }\n') })), /32-byte/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: a.b\nfederation: { ip_range_whitelist: ["10.0.0.0/99"] }\n') })), /ip_range_whitelist\[0\]/);
  });

  test('a file that is missing or not YAML is reported with its path', () => {
    assert.match(configError(() => loadConfig({ env: {}, file: '/nonexistent/mxkeys.yaml' })), /cannot read the config file \/nonexistent\/mxkeys.yaml: ENOENT/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: [unclosed\n') })), /not valid YAML at line/);
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('- a list\n') })), /must be a YAML mapping/);
  });

  test('environment variables override the file, including nested keys', () => {
    const c = loadConfig({
      file: configFile('server_name: file.example\nlisten: { port: 1000 }\ndatabase: { sqlite: file.db }\n'),
      env: {
        MXKEYS_SERVER_NAME: 'env.example',
        MXKEYS_LISTEN_PORT: '2000',
        MXKEYS_DATABASE_POSTGRES: 'postgres://h/db',
        MXKEYS_FEDERATION_ALLOW_DEVICE_NAME_LOOKUP: 'true',
        MXKEYS_FEDERATION_RESOLVE: '{"o.example": "http://127.0.0.1:1"}',
        MXKEYS_CONFIG: 'ignored: names the file, not a key',
        PATH: '/bin',
      },
    });
    assert.equal(c.server_name, 'env.example');
    assert.equal(c.listen.port, 2000);
    assert.equal(c.database.postgres, 'postgres://h/db');
    assert.equal(c.database.sqlite, undefined, 'choosing postgres in the environment replaces the file\'s sqlite');
    assert.equal(c.federation.allow_device_name_lookup, true);
    assert.deepEqual(c.federation.resolve, { 'o.example': 'http://127.0.0.1:1' });
  });

  test('a misspelt MXKEYS_ environment variable is refused rather than ignored', () => {
    assert.match(configError(() => loadConfig({ env: { MXKEYS_SERVERNAME: 'x' } })), /MXKEYS_SERVERNAME is not a configuration key/);
    assert.match(configError(() => loadConfig({ env: { MXKEYS_LISTEN_PORT: 'many' } })), /listen.port/);
  });

  test('every settable key has a documented environment variable', () => {
    const names = envVariables().map((v) => v.name);
    for (const n of ['MXKEYS_SERVER_NAME', 'MXKEYS_LISTEN_HOST', 'MXKEYS_LISTEN_PORT', 'MXKEYS_DATABASE_SQLITE', 'MXKEYS_DATABASE_POSTGRES', 'MXKEYS_SIGNING_KEY_PATH', 'MXKEYS_FEDERATION_TRUSTED_KEY_SERVERS']) {
      assert.ok(names.includes(n), n);
    }
  });

  test('the loaded configuration is frozen', () => {
    const c = loadConfig({ env: {} });
    assert.throws(() => {
      (c as { server_name: string }).server_name = 'x';
    }, TypeError);
    assert.throws(() => {
      (c.listen as { port: number }).port = 1;
    }, TypeError);
  });

  test('printing masks the shared secret and the database password', () => {
    const c = loadConfig({ env: { MXKEYS_REGISTRATION_SHARED_SECRET: 'hunter2', MXKEYS_DATABASE_POSTGRES: 'postgres://u:pw@h/db' } });
    const printed = JSON.stringify(maskSecrets(c));
    assert.ok(!printed.includes('hunter2'));
    assert.ok(!printed.includes(':pw@'));
    assert.match(printed, /postgres:\/\/u:\*+@h\/db/);
  });

  test('durations accept milliseconds and unit suffixes', () => {
    assert.equal(durationMs(1500), 1500);
    assert.equal(durationMs('1d'), 86_400_000);
    assert.equal(durationMs('30s'), 30_000);
    assert.equal(durationMs('250ms'), 250);
    assert.throws(() => durationMs('1.5h'));
  });
});

describe('docs/configuration.md', () => {
  test('documents every configuration key and its environment variable', async () => {
    const { readFileSync } = await import('node:fs');
    const doc = readFileSync(new URL('../../docs/configuration.md', import.meta.url), 'utf8');
    const missing = envVariables().flatMap((v) => {
      const key = v.path.join('.');
      const out: string[] = [];
      if (!doc.includes(`| \`${key}\` |`)) out.push(`key ${key}`);
      if (!doc.includes(`| \`${v.name}\` | \`${key}\` |`)) out.push(`variable ${v.name}`);
      return out;
    });
    assert.deepEqual(missing, []);
  });

  test('a value outside a fixed set lists the allowed values', () => {
    const message = configError(() => loadConfig({ env: {}, file: configFile('server_name: example.org\nlog_level: verbose\n') }));
    assert.equal(message, 'config key "log_level": found "verbose", expected one of "fatal", "error", "warn", "info", "debug", "trace", "silent"');
  });

  test('a bad value that came from an environment variable names the variable', () => {
    assert.match(
      configError(() => loadConfig({ env: { MXKEYS_LOG_LEVEL: 'verbose' } })),
      /^environment variable MXKEYS_LOG_LEVEL \(config key "log_level"\): found "verbose", expected one of "fatal"/,
    );
    assert.match(configError(() => loadConfig({ env: { MXKEYS_LISTEN_PORT: 'eighty' } })), /^environment variable MXKEYS_LISTEN_PORT \(config key "listen.port"\)/);
    assert.match(configError(() => loadConfig({ env: { MXKEYS_DATABASE_CONNECT_TIMEOUT: 'soon' } })), /^environment variable MXKEYS_DATABASE_CONNECT_TIMEOUT \(config key "database.connect_timeout"\): "soon" is not a duration/);
    assert.match(
      configError(() => loadConfig({ env: { MXKEYS_FEDERATION_TRUSTED_KEY_SERVERS: '[{server_name: "no way"}]' } })),
      /^environment variable MXKEYS_FEDERATION_TRUSTED_KEY_SERVERS \(config key "federation.trusted_key_servers\[0\].server_name"\)/,
    );
    // The same mistake in the file names the key only.
    assert.match(configError(() => loadConfig({ env: {}, file: configFile('server_name: example.org\nlisten: { port: eighty }\n') })), /^config key "listen.port"/);
  });

  test('database.connect_timeout defaults to 10 s and log_requests to off', () => {
    const c = loadConfig({ env: {} });
    assert.equal(durationMs(c.database.connect_timeout), 10_000);
    assert.equal(c.log_requests, false);
  });
});
