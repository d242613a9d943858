/**
 * The composition root: configuration in, a running mxkeys out. The only file that wires concrete
 * implementations together.
 */
import pino, { type Logger } from 'pino';
import type { Config } from './config/schema.js';
import { durationMs } from './config/load.js';
import { openStore, type Store } from './storage/index.js';
import { loadOrCreateSigningKeys } from './federation/signing-key-file.js';
import { OwnServerKeys } from './federation/own-keys.js';
import { buildApp, type App } from './http/app.js';

export interface Mxkeys {
  readonly config: Readonly<Config>;
  readonly app: App;
  readonly store: Store;
  readonly ownKeys: OwnServerKeys;
  readonly logger: Logger;
  /** Starts listening; resolves to the base URL, e.g. http://127.0.0.1:8008. */
  listen(): Promise<string>;
  /** Stops accepting requests, lets in-flight ones finish, closes the database. */
  close(): Promise<void>;
}

export interface CreateOptions {
  readonly logger?: Logger;
}

export function createLogger(config: Readonly<Config>): Logger {
  return pino({ level: config.log_level, base: { service: 'mxkeys' } });
}

export async function createMxkeys(config: Readonly<Config>, options: CreateOptions = {}): Promise<Mxkeys> {
  const logger = options.logger ?? createLogger(config);
  const { keys, created } = loadOrCreateSigningKeys(config.signing_key_path);
  if (created) logger.info({ path: config.signing_key_path, keyId: keys[0]!.keyId }, 'generated a new server signing key');
  const store = await openStore(config.database);
  const ownKeys = new OwnServerKeys({
    serverName: config.server_name,
    keys,
    oldVerifyKeys: config.old_signing_keys,
    validityMs: durationMs(config.key_refresh_interval),
  });
  const app = buildApp({ logger, maxRequestBodyBytes: config.max_request_body_bytes, ownKeys });

  let closed = false;
  return {
    config,
    app,
    store,
    ownKeys,
    logger,
    async listen() {
      const address = await app.listen({ host: config.listen.host, port: config.listen.port });
      return address;
    },
    async close() {
      if (closed) return;
      closed = true;
      await app.close();
      await store.close();
    },
  };
}
