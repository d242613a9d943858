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
import { Accounts } from './accounts/service.js';
import { Keys } from './keys/service.js';
import { CrossSigning } from './keys/cross-signing.js';
import { readFileSync, writeSync } from 'node:fs';
import { FederationClient } from './federation/client.js';
import { KeyRing } from './federation/key-ring.js';
import { federationKeyFetcher, Notary } from './federation/notary.js';
import { RequestAuthenticator } from './federation/request-auth.js';
import { ConfigError } from './config/load.js';
import { MxkeysMetrics } from './metrics/mxkeys.js';
import type { Server } from 'node:http';

export interface Mxkeys {
  readonly config: Readonly<Config>;
  readonly app: App;
  readonly store: Store;
  readonly ownKeys: OwnServerKeys;
  readonly accounts: Accounts;
  readonly keys: Keys;
  readonly keyRing: KeyRing;
  readonly logger: Logger;
  /** Starts listening; resolves to the base URL, e.g. http://127.0.0.1:8008. */
  listen(): Promise<string>;
  /** Where metrics are served once listening, when `metrics.enabled`. */
  metricsUrl(): string | undefined;
  /** Stops accepting requests, lets in-flight ones finish, closes the database. */
  close(): Promise<void>;
}

export interface CreateOptions {
  readonly logger?: Logger;
}

function readCaFile(path: string | undefined): string | undefined {
  if (path === undefined) return undefined;
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(`config key "federation.tls_ca_file": cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

function keysFor(config: Readonly<Config>, store: Store): Keys {
  return new Keys({
    store: store.keys,
    deviceLists: store.deviceLists,
    serverName: config.server_name,
    maxOneTimeKeysPerDevice: config.max_one_time_keys_per_device,
  });
}

function accountsFor(config: Readonly<Config>, store: Store, keys: Keys): Accounts {
  return new Accounts({
    store: store.accounts,
    serverName: config.server_name,
    registrationSharedSecret: config.registration_shared_secret,
    enableRegistration: config.enable_registration,
    failedLoginLimit: config.rc_login.failed_attempts,
    maxDevicesPerUser: config.max_devices_per_user,
    scryptLogN: config.password_hashing.scrypt_log_n,
    isReservedDeviceId: (userId, deviceId) => keys.isReservedDeviceId(userId, deviceId),
  });
}

/**
 * JSON log lines on standard output, written synchronously. When the reader of our output goes
 * away (EPIPE), logging stops instead of blocking the process: pino's default destination can
 * then hang on exit while it retries the flush.
 */
export function createLogger(config: Readonly<Config>): Logger {
  let broken = false;
  const stdout = {
    write(line: string): void {
      if (broken) return;
      try {
        writeSync(1, line);
      } catch {
        broken = true;
      }
    },
  };
  return pino({ level: config.log_level, base: { service: 'mxkeys' } }, stdout);
}

export async function createMxkeys(config: Readonly<Config>, options: CreateOptions = {}): Promise<Mxkeys> {
  const logger = options.logger ?? createLogger(config);
  const signingKeys = loadOrCreateSigningKeys(config.signing_key_path);
  if (signingKeys.created) logger.info({ path: config.signing_key_path, keyId: signingKeys.keys[0]!.keyId }, 'generated a new server signing key');
  const store = await openStore(config.database, {
    onAvailabilityChange: (available, reason) => {
      if (available) logger.info('the database answers again; requests are served normally');
      else logger.warn({ reason }, 'lost the database connection (database.postgres): requests get 503 M_UNKNOWN with Retry-After until it is back; the connection is retried by itself');
    },
  });
  const ownKeys = new OwnServerKeys({
    serverName: config.server_name,
    keys: signingKeys.keys,
    oldVerifyKeys: config.old_signing_keys,
    validityMs: durationMs(config.key_refresh_interval),
  });
  const keys = keysFor(config, store);
  const accounts = accountsFor(config, store, keys);
  const crossSigning = new CrossSigning({
    store: store.keys,
    serverName: config.server_name,
    requireUserInteractiveAuth: (requester, request) => accounts.requirePassword(requester, request),
  });
  const federationClient = new FederationClient({
    resolve: config.federation.resolve,
    extraCa: readCaFile(config.federation.tls_ca_file),
    timeoutMs: durationMs(config.federation.request_timeout),
    ...(config.federation.ip_range_blacklist ? { ipRangeBlacklist: config.federation.ip_range_blacklist } : {}),
    ipRangeWhitelist: config.federation.ip_range_whitelist,
  });
  const keyRing = new KeyRing({
    serverName: config.server_name,
    store: store.serverKeys,
    fetcher: federationKeyFetcher(federationClient),
    trustedKeyServers: config.federation.trusted_key_servers,
    log: (message, details) => logger.warn(details, message),
  });
  const authenticator = new RequestAuthenticator({ serverName: config.server_name, keys: keyRing, rateLimit: config.federation.rate_limit });
  const metrics = config.metrics.enabled
    ? new MxkeysMetrics({ store, keyStats: keys.stats, federationAuth: authenticator.stats, serverKeyFetches: keyRing.stats })
    : undefined;
  const app = buildApp({
    logger,
    maxRequestBodyBytes: config.max_request_body_bytes,
    trustProxy: config.listen.x_forwarded,
    observeRequest: metrics && ((method, route, status, seconds) => metrics.observeRequest(method, route, status, seconds)),
    ownKeys,
    accounts,
    keys,
    crossSigning,
    federation: {
      authenticator,
      notary: new Notary(ownKeys, keyRing),
      allowDeviceNameLookup: config.federation.allow_device_name_lookup,
    },
    client: {
      allowAccessTokenInQuery: config.allow_access_token_in_query,
      publicBaseurl: config.public_baseurl,
      serveServerWellknown: config.serve_server_wellknown,
    },
  });

  let closed = false;
  let metricsServer: Server | undefined;
  let metricsUrl: string | undefined;
  return {
    config,
    app,
    store,
    ownKeys,
    accounts,
    keys,
    keyRing,
    logger,
    async listen() {
      const address = await app.listen({ host: config.listen.host, port: config.listen.port });
      if (metrics) {
        const m = await metrics.listen(config.metrics.host, config.metrics.port);
        metricsServer = m.server;
        metricsUrl = m.url;
        logger.info({ url: m.url }, 'serving metrics');
      }
      return address;
    },
    metricsUrl: () => metricsUrl,
    async close() {
      if (closed) return;
      closed = true;
      metricsServer?.close();
      metrics?.stop();
      // Connections that go idle while in-flight requests finish are closed as they do, so
      // keep-alive clients cannot hold the shutdown open.
      const closer = setInterval(() => app.server.closeIdleConnections(), 25);
      try {
        await app.close();
      } finally {
        clearInterval(closer);
      }
      await store.close();
    },
  };
}

/** Creates a user straight in the configured database (`mxkeys register-user`). */
export async function registerUser(config: Readonly<Config>, localpart: string, password: string, admin: boolean): Promise<string> {
  const store = await openStore(config.database);
  try {
    return await accountsFor(config, store, keysFor(config, store)).createUser(localpart, password, admin);
  } finally {
    await store.close();
  }
}
