/**
 * A real mxkeys on a real port for tests: real config loading, real database, real HTTP.
 */
import { after } from 'node:test';
import { join } from 'node:path';
import { loadConfig } from '../../src/config/load.js';
import { createMxkeys, type Mxkeys } from '../../src/compose.js';
import type { Config } from '../../src/config/schema.js';
import pino from 'pino';
import { tempDir, type Backend } from './backends.js';

export interface TestServer {
  readonly url: string;
  readonly mx: Mxkeys;
  readonly config: Readonly<Config>;
  close(): Promise<void>;
}

const running: TestServer[] = [];
after(async () => {
  for (const s of running.splice(0)) await s.close();
});

export interface StartOptions {
  readonly backend: Backend;
  /** Top-level config values (server_name defaults to "test.local"). */
  readonly config?: Readonly<Record<string, unknown>>;
  /** Reuse a database from an earlier server (restart tests). */
  readonly database?: Readonly<Record<string, unknown>>;
  readonly signingKeyPath?: string;
  /** Where the server logs (default: nowhere, or MXKEYS_TEST_LOG's level on standard output). */
  readonly logger?: pino.Logger;
}

/** Builds (but does not start) an mxkeys with test defaults: a fresh database and a temp signing key. */
export async function createTestMxkeys(options: StartOptions): Promise<Mxkeys> {
  const database = options.database ?? (await options.backend.freshDatabase());
  const config = loadConfig({
    env: {},
    overrides: {
      server_name: 'test.local',
      listen: { host: '127.0.0.1', port: 0 },
      signing_key_path: options.signingKeyPath ?? join(tempDir(), 'signing.key'),
      log_level: 'silent',
      // Cheap password hashes keep the suite fast; the default cost has tests of its own.
      password_hashing: { scrypt_log_n: 10 },
      ...options.config,
      database,
    },
  });
  return createMxkeys(config, { logger: options.logger ?? pino({ level: process.env['MXKEYS_TEST_LOG'] ?? 'silent' }) });
}

export async function startServer(options: StartOptions): Promise<TestServer> {
  const mx = await createTestMxkeys(options);
  const url = await mx.listen();
  let closed = false;
  const server: TestServer = {
    url,
    mx,
    config: mx.config,
    async close() {
      if (closed) return;
      closed = true;
      await mx.close();
    },
  };
  running.push(server);
  return server;
}

export { http, type HttpResult, type RequestOptions } from './http.js';
