/**
 * The composition root: configuration in, a running mxkeys out. The only file that wires concrete
 * implementations together.
 */
import pino, { type Logger } from 'pino';
import type { Config } from './config/schema.js';
import { durationMs } from './config/load.js';
import { openStore, type OpenStoreOptions, type Store } from './storage/index.js';
import { loadOrCreateSigningKeys, readSigningKeys, SigningKeyFileError } from './federation/signing-key-file.js';
import { OwnServerKeys } from './federation/own-keys.js';
import { buildApp, type App } from './http/app.js';
import { Accounts } from './accounts/service.js';
import { Keys } from './keys/service.js';
import { CrossSigning } from './keys/cross-signing.js';
import { KeyBackup } from './backup/service.js';
import { BackupPurger } from './backup/purge.js';
import { accessSync, constants as fsConstants, existsSync, readFileSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';
import { Admin, type AdminActor } from './accounts/admin.js';
import { FederationClient } from './federation/client.js';
import { KeyRing } from './federation/key-ring.js';
import { federationKeyFetcher, Notary } from './federation/notary.js';
import { RequestAuthenticator } from './federation/request-auth.js';
import { ConfigError } from './config/load.js';
import { MxkeysMetrics, serveMetrics } from './metrics/mxkeys.js';
import { answerSupervisor } from './metrics/cluster.js';
import type { Server } from 'node:http';
import type { Server as TlsServer } from 'node:https';
import { Destinations } from './federation/destinations.js';
import { RemoteDeviceListCache } from './federation/device-list-cache.js';
import { RemoteKeys } from './federation/remote-keys.js';
import { DeviceListSubscriptions } from './federation/subscriptions.js';
import { FederationSender, newLeaseOwner } from './federation/sender.js';
import { DeviceListEdus } from './federation/device-list-edus.js';
import { ToDeviceEdus } from './federation/to-device-edus.js';
import { ToDevice } from './todevice/service.js';
import { Sync } from './keys/sync.js';
import { InboundTransactions } from './federation/transactions.js';
import { FederationMaintenance } from './federation/maintenance.js';
import type { RemoteKeyLookup } from './keys/remote.js';

export interface Mxkeys {
  readonly config: Readonly<Config>;
  readonly app: App;
  readonly store: Store;
  readonly ownKeys: OwnServerKeys;
  readonly accounts: Accounts;
  readonly admin: Admin;
  readonly keys: Keys;
  /** To-device messaging: sending, receiving from other servers, and the inboxes /sync reads. */
  readonly toDevice: ToDevice;
  readonly keyRing: KeyRing;
  readonly logger: Logger;
  /**
   * Which servers receive a local user's device-list updates. Servers that ask about a user are
   * added for `federation.device_list_subscription_lifetime`; an embedding homeserver that knows
   * its rooms adds and removes the servers sharing them (these never lapse).
   */
  readonly deviceListSubscriptions: DeviceListSubscriptions;
  /** Removes the keys of deleted backup versions in the background (drain() waits for it). */
  readonly backupPurger: BackupPurger;
  /** The federation machinery, for embedding and tests. */
  readonly federation: {
    readonly sender: FederationSender;
    readonly maintenance: FederationMaintenance;
    readonly remoteDeviceLists: RemoteDeviceListCache;
    readonly destinations: Destinations;
    readonly transactions: InboundTransactions;
  };
  /** Reads the TLS certificate and key again (SIGHUP); open connections keep theirs. */
  reloadTls(): void;
  /** Starts listening; resolves to the base URL, e.g. http://127.0.0.1:8008. */
  listen(): Promise<string>;
  /** Where metrics are served once listening, when `metrics.enabled` (undefined in a cluster worker). */
  metricsUrl(): string | undefined;
  /** Stops accepting requests, lets in-flight ones finish, closes the database. */
  close(): Promise<void>;
}

export interface CreateOptions {
  readonly logger?: Logger;
  /**
   * Set in a worker of `mxkeys serve --workers N`: the supervisor serves the metrics of all
   * workers on the metrics listener, so this process hands its metrics to the supervisor instead.
   */
  readonly clusterWorker?: boolean;
}

function readCaFile(path: string | undefined): string | undefined {
  if (path === undefined) return undefined;
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(`config key "federation.tls_ca_file": cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

/** A listener (the main one or the metrics one) could not be opened: says which, and what to set. */
export class ListenError extends Error {
  constructor(
    readonly setting: 'listen' | 'metrics',
    host: string,
    port: number,
    cause: unknown,
  ) {
    const code = (cause as NodeJS.ErrnoException).code ?? (cause as Error).message;
    const what = setting === 'listen' ? 'the main listener' : 'the metrics listener';
    const why: Record<string, string> = {
      EADDRINUSE: 'the port is in use; stop whatever uses it, or ',
      EACCES: 'ports below 1024 need privileges; ',
      EADDRNOTAVAIL: 'no network interface has that address; ',
      ENOTFOUND: 'the host name does not resolve; ',
    };
    super(`cannot open ${what} on ${host}:${port} (${code}): ${why[code] ?? ''}set ${setting}.host/${setting}.port to a free address`);
    this.name = 'ListenError';
  }
}

function storeOptions(config: Readonly<Config>): OpenStoreOptions {
  return {
    serverName: config.server_name,
    connectTimeoutMs: durationMs(config.database.connect_timeout),
    cacheStalenessBoundMs: durationMs(config.database.cache_staleness_bound),
  };
}

function keysFor(config: Readonly<Config>, store: Store, remote?: RemoteKeyLookup): Keys {
  return new Keys({
    store: store.keys,
    deviceLists: store.deviceLists,
    serverName: config.server_name,
    maxOneTimeKeysPerDevice: config.max_one_time_keys_per_device,
    limits: { queryUsers: config.max_key_query_users, queryDeviceIds: config.max_key_query_device_ids, claimDevices: config.max_key_claim_devices },
    remote,
    acceptInvalidDeviceSelfSignatures: config.accept_invalid_device_self_signatures,
  });
}

function readTls(config: Readonly<Config>): { key: Buffer; cert: Buffer } | undefined {
  const certPath = config.tls_certificate_path;
  const keyPath = config.tls_private_key_path;
  if (certPath === undefined || keyPath === undefined) return undefined;
  const read = (key: string, path: string) => {
    try {
      return readFileSync(path);
    } catch (e) {
      throw new ConfigError(`config key "${key}": cannot read ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  };
  return { cert: read('tls_certificate_path', certPath), key: read('tls_private_key_path', keyPath) };
}

/** How often the sender looks for EDUs queued by other processes, and retries that are due. */
const SENDER_POLL_MS = 1000;
/** How often federation housekeeping runs (in one process of those sharing the database). */
const MAINTENANCE_INTERVAL_MS = 60_000;

function accountsFor(config: Readonly<Config>, store: Store, keys: Keys, logger?: Logger, leaseOwner?: string): Accounts {
  return new Accounts({
    store: store.accounts,
    serverName: config.server_name,
    registrationSharedSecret: config.registration_shared_secret,
    enableRegistration: config.enable_registration,
    failedLoginLimit: config.rc_login.failed_attempts,
    maxDevicesPerUser: config.max_devices_per_user,
    scryptLogN: config.password_hashing.scrypt_log_n,
    isReservedDeviceId: (userId, deviceId) => keys.isReservedDeviceId(userId, deviceId),
    // One process of those sharing the database sweeps: it keeps the lease as long as it runs.
    ...(leaseOwner ? { takeSweep: (now: number, intervalMs: number) => store.federation.takeLease('job:auth-state-sweep', leaseOwner, now + 2 * intervalMs, now) } : {}),
    // At info, one line per failure with user and address, for fail2ban-style tools (operations.md).
    ...(logger ? { onFailedLogin: (user: string, address: string | undefined) => logger.info({ user, address: address ?? null }, 'failed login') } : {}),
  });
}

function adminFor(config: Readonly<Config>, store: Store, accounts: Accounts, logger: Logger, afterDeactivation: () => Promise<void> | void): Admin {
  return new Admin({
    accounts: store.accounts,
    hashPassword: (password) => accounts.passwords.hash(password),
    keys: store.keys,
    serverName: config.server_name,
    afterDeactivation,
    log: (message: string, details: Record<string, unknown>) => logger.info(details, message),
  });
}

/**
 * JSON log lines on standard output (or standard error: `fd` 2), written synchronously. When the
 * reader of our output goes away (EPIPE), logging stops instead of blocking the process: pino's
 * default destination can then hang on exit while it retries the flush.
 */
export function createLogger(config: Readonly<Config>, options: { readonly fields?: Readonly<Record<string, unknown>>; readonly fd?: 1 | 2 } = {}): Logger {
  const fd = options.fd ?? 1;
  let broken = false;
  const out = {
    write(line: string): void {
      if (broken) return;
      try {
        writeSync(fd, line);
      } catch {
        broken = true;
      }
    },
  };
  return pino({ level: config.log_level, base: { service: 'mxkeys', ...options.fields } }, out);
}

export async function createMxkeys(config: Readonly<Config>, options: CreateOptions = {}): Promise<Mxkeys> {
  const logger = options.logger ?? createLogger(config);
  const signingKeys = loadOrCreateSigningKeys(config.signing_key_path);
  if (signingKeys.created) {
    const key = signingKeys.keys[0]!;
    logger.warn(
      { path: config.signing_key_path, key_id: key.keyId, public_key: key.publicKey },
      "created a new server signing key: it is this server's identity towards other servers; back it up, and restore it (rather than letting a new one be made) when moving the server",
    );
  }
  const store = await openStore(config.database, {
    ...storeOptions(config),
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
  const log = (level: 'info' | 'warn', message: string, details: Record<string, unknown>) => logger[level](details, message);
  const destinations = new Destinations({
    store: store.federation,
    policy: {
      minIntervalMs: durationMs(config.federation.destination_min_retry_interval),
      multiplier: config.federation.destination_retry_multiplier,
      maxIntervalMs: durationMs(config.federation.destination_max_retry_interval),
    },
    log: (message, details) => logger.info(details, message),
  });
  const requestTimeoutMs = durationMs(config.federation.request_timeout);
  const federationClient = new FederationClient({
    resolve: config.federation.resolve,
    extraCa: readCaFile(config.federation.tls_ca_file),
    timeoutMs: requestTimeoutMs,
    ...(config.federation.ip_range_blacklist ? { ipRangeBlacklist: config.federation.ip_range_blacklist } : {}),
    ipRangeWhitelist: config.federation.ip_range_whitelist,
    signer: { serverName: config.server_name, key: ownKeys.signingKey },
  });
  const remoteDeviceLists = new RemoteDeviceListCache({
    store: store.remoteDeviceLists,
    client: federationClient,
    destinations,
    refreshAfterMs: durationMs(config.federation.device_list_refresh_interval),
    requestTimeoutMs,
    log,
  });
  const remoteKeys = new RemoteKeys({ client: federationClient, destinations, cache: remoteDeviceLists, store: store.remoteDeviceLists, log });
  const keys = keysFor(config, store, remoteKeys);
  // This process's name in the leases that make one process of those sharing the database do a job.
  const leaseOwner = newLeaseOwner();
  const accounts = accountsFor(config, store, keys, logger, leaseOwner);
  const backupPurger = new BackupPurger({
    store: store.backup,
    lease: {
      take: (expiresTs, now) => store.federation.takeLease('job:backup-purge', leaseOwner, expiresTs, now),
      release: () => store.federation.releaseLease('job:backup-purge', leaseOwner),
    },
    log: (message, details) => logger.warn(details, message),
  });
  const admin = adminFor(config, store, accounts, logger, () => backupPurger.kick());
  const crossSigning = new CrossSigning({
    store: store.keys,
    serverName: config.server_name,
    requireUserInteractiveAuth: (requester, request) => accounts.requirePassword(requester, request),
  });
  const backup = new KeyBackup({
    store: store.backup,
    maxSessionsPerRequest: config.key_backup.max_sessions_per_request,
    maxSessionsPerUser: config.key_backup.max_sessions_per_user,
    maxBytesPerUser: config.key_backup.max_bytes_per_user,
    maxVersionsPerUser: config.key_backup.max_versions_per_user,
    onVersionDeleted: () => backupPurger.kick(),
  });
  const keyRing = new KeyRing({
    serverName: config.server_name,
    store: store.serverKeys,
    fetcher: federationKeyFetcher(federationClient),
    trustedKeyServers: config.federation.trusted_key_servers,
    log: (message, details) => logger.warn(details, message),
  });
  const toDevice = new ToDevice({
    store: store.toDevice,
    serverName: config.server_name,
    maxMessagesPerRequest: config.to_device.max_messages_per_request,
    maxPendingPerDevice: config.to_device.max_pending_per_device,
    maxPendingBytesPerDevice: config.to_device.max_pending_bytes_per_device,
    maxUndeliveredAgeMs: durationMs(config.federation.max_undelivered_age),
    log,
  });
  const sync = new Sync({ keys, deviceLists: store.deviceLists, toDevice });
  const subscriptions = new DeviceListSubscriptions({ store: store.federation, lifetimeMs: durationMs(config.federation.device_list_subscription_lifetime) });
  const sender = new FederationSender({
    serverName: config.server_name,
    client: federationClient,
    store: store.federation,
    destinations,
    // To-device messages first, as Synapse sends them: encryption channels depend on them.
    sources: [new ToDeviceEdus(store.toDevice), new DeviceListEdus({ store: store.federation, keys, displayNames: config.federation.allow_device_name_lookup })],
    owner: leaseOwner,
    pollIntervalMs: SENDER_POLL_MS,
    log,
  });
  const maintenance = new FederationMaintenance({
    store: store.federation,
    cache: remoteDeviceLists,
    destinations,
    owner: sender.owner,
    intervalMs: MAINTENANCE_INTERVAL_MS,
    maxUndeliveredAgeMs: durationMs(config.federation.max_undelivered_age),
    housekeeping: [() => toDevice.cleanup()],
    log,
  });
  const transactions = new InboundTransactions({
    store: store.federation,
    handlers: {
      'm.device_list_update': (origin, content) => remoteDeviceLists.deviceListUpdate(origin, content),
      'm.signing_key_update': (origin, content) => remoteDeviceLists.signingKeyUpdate(origin, content),
      'm.direct_to_device': (origin, content) => toDevice.receiveEdu(origin, content),
    },
  });
  // A change committed here is sent at once (changes made by other processes are found by polling).
  store.deviceLists.onChange(() => sender.soon());
  store.toDevice.onChange(({ destinations }) => {
    if (destinations.length > 0) sender.soon();
  });
  destinations.onRecovered((d) => sender.wake(d));
  const authenticator = new RequestAuthenticator({
    serverName: config.server_name,
    keys: keyRing,
    rateLimit: config.federation.rate_limit,
    // A server that talks to us is up: stop waiting to send to it (as Synapse does).
    onAccepted: (origin) => void destinations.succeeded(origin).catch(() => undefined),
  });
  const metrics = config.metrics.enabled
    ? new MxkeysMetrics({
        store,
        keyStats: keys.stats,
        federationAuth: authenticator.stats,
        serverKeyFetches: keyRing.stats,
        federation: { sender, destinations, remoteDeviceLists, transactions },
        toDevice,
      })
    : undefined;
  const app = buildApp({
    logger,
    maxRequestBodyBytes: config.max_request_body_bytes,
    trustProxy: config.listen.x_forwarded,
    observeRequest: metrics && ((method, route, status, seconds) => metrics.observeRequest(method, route, status, seconds)),
    ownKeys,
    accounts,
    admin,
    keys,
    sync,
    toDevice,
    crossSigning,
    backup,
    databaseAnswers: () => store.ping(),
    logRequests: config.log_requests,
    federation: {
      authenticator,
      notary: new Notary(ownKeys, keyRing),
      allowDeviceNameLookup: config.federation.allow_device_name_lookup,
      subscriptions,
      transactions,
    },
    tls: readTls(config),
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
    admin,
    keys,
    toDevice,
    keyRing,
    logger,
    deviceListSubscriptions: subscriptions,
    backupPurger,
    federation: { sender, maintenance, remoteDeviceLists, destinations, transactions },
    reloadTls() {
      const tls = readTls(config);
      if (tls) (app.server as unknown as TlsServer).setSecureContext({ key: tls.key, cert: tls.cert });
    },
    async listen() {
      let listening: string;
      try {
        listening = await app.listen({ host: config.listen.host, port: config.listen.port });
      } catch (e) {
        throw new ListenError('listen', config.listen.host, config.listen.port, e);
      }
      const address = config.tls_certificate_path === undefined ? listening : listening.replace(/^http:/, 'https:');
      await sender.start();
      maintenance.start();
      backupPurger.start();
      if (metrics && options.clusterWorker) answerSupervisor(metrics.registry);
      else if (metrics) {
        let m: Awaited<ReturnType<typeof serveMetrics>>;
        try {
          m = await serveMetrics(config.metrics.host, config.metrics.port, () => metrics.render());
        } catch (e) {
          throw new ListenError('metrics', config.metrics.host, config.metrics.port, e);
        }
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
      // Stop taking requests first (open /sync long-polls are answered at once), while the
      // federation work winds down: a transaction in flight is cut off and sent again after the
      // restart (its EDUs stay queued until a destination acknowledges them).
      // Connections that go idle while in-flight requests finish are closed as they do, so
      // keep-alive clients cannot hold the shutdown open.
      const closer = setInterval(() => app.server.closeIdleConnections(), 25);
      const appClosed = app.close().finally(() => clearInterval(closer));
      federationClient.close();
      await Promise.all([maintenance.stop(), sender.stop(), backupPurger.stop(), appClosed]);
      remoteDeviceLists.stop();
      await store.close();
    },
  };
}

/**
 * Runs `fn` with the services of the configured database, then closes it (command-line tools).
 * What they log goes to standard error as JSON lines, like the server's: standard output is the
 * command's answer.
 */
async function withServices<T>(config: Readonly<Config>, fn: (services: { accounts: Accounts; admin: Admin }) => Promise<T>): Promise<T> {
  const store = await openStore(config.database, storeOptions(config));
  const logger = createLogger(config, { fd: 2 });
  try {
    const accounts = accountsFor(config, store, keysFor(config, store));
    // No server runs here to purge a deactivated user's key backups later: purge before exiting,
    // without the servers' purge lease (a one-off; each batch takes its user's backup lock, so it
    // may run beside a server's purge). Should that fail (it is logged), a server's sweep finishes it.
    const purger = new BackupPurger({ store: store.backup, log: (message, details) => logger.warn(details, message) });
    return await fn({ accounts, admin: adminFor(config, store, accounts, logger, () => purger.drain().catch(() => undefined)) });
  } finally {
    await store.close();
  }
}

/** Creates a user straight in the configured database (`mxkeys register-user`). */
export function registerUser(config: Readonly<Config>, localpart: string, password: string, admin: boolean): Promise<string> {
  return withServices(config, ({ accounts }) => accounts.createUser(localpart, password, admin));
}

/** Runs an administration task on the configured database (`mxkeys users …`), as the operator. */
export function administer<T>(config: Readonly<Config>, fn: (admin: Admin, actor: AdminActor) => Promise<T>): Promise<T> {
  return withServices(config, ({ admin }) => fn(admin, 'command line'));
}

/** What is wrong with the listener's TLS certificate and key files, as `serve` would find it. */
function checkTlsFiles(config: Readonly<Config>): string[] {
  let tls;
  try {
    tls = readTls(config);
  } catch (e) {
    return [(e as Error).message];
  }
  if (tls === undefined) return [];
  const certPath = config.tls_certificate_path!;
  const keyPath = config.tls_private_key_path!;
  let cert: X509Certificate | undefined;
  let key: KeyObject | undefined;
  const problems: string[] = [];
  try {
    cert = new X509Certificate(tls.cert);
  } catch {
    problems.push(`config key "tls_certificate_path": ${certPath} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`);
  }
  try {
    key = createPrivateKey(tls.key);
  } catch {
    problems.push(`config key "tls_private_key_path": ${keyPath} holds no unencrypted PEM private key ("-----BEGIN PRIVATE KEY-----")`);
  }
  if (cert && key && !cert.checkPrivateKey(key)) {
    problems.push(`config keys "tls_certificate_path" and "tls_private_key_path": the key in ${keyPath} does not belong to the certificate in ${certPath}`);
  }
  return problems;
}

/**
 * What `serve` would trip over in the files the configuration names, found without starting:
 * `problems` stop a start, `notes` say what a start will do.
 */
export function checkConfigFiles(config: Readonly<Config>): { problems: string[]; notes: string[] } {
  const problems: string[] = [];
  const notes: string[] = [];
  const keyPath = config.signing_key_path;
  if (existsSync(keyPath)) {
    try {
      const keys = readSigningKeys(keyPath);
      notes.push(`signing_key_path: ${keyPath} holds ${keys.map((k) => k.keyId).join(', ')}`);
    } catch (e) {
      problems.push(e instanceof SigningKeyFileError && !e.message.startsWith('signing_key_path') ? `signing_key_path: ${e.message}` : (e as Error).message);
    }
  } else if (existsSync(dirname(keyPath))) {
    notes.push(`signing_key_path: ${keyPath} does not exist yet; the first start creates a new signing key there`);
  } else {
    problems.push(`signing_key_path: neither ${keyPath} nor its directory ${dirname(keyPath)} exists; fix the path, or create the key with "mxkeys generate-key --out ${keyPath}"`);
  }
  if (config.federation.tls_ca_file !== undefined) {
    try {
      if (!readCaFile(config.federation.tls_ca_file)!.includes('-----BEGIN CERTIFICATE-----')) {
        problems.push(`config key "federation.tls_ca_file": ${config.federation.tls_ca_file} holds no PEM certificate ("-----BEGIN CERTIFICATE-----")`);
      }
    } catch (e) {
      problems.push((e as Error).message);
    }
  }
  problems.push(...checkTlsFiles(config));
  const sqlite = config.database.sqlite;
  if (sqlite !== undefined && sqlite !== ':memory:') {
    const target = existsSync(sqlite) ? sqlite : dirname(sqlite);
    if (!existsSync(target)) notes.push(`database.sqlite: the directory ${target} does not exist yet; the first start creates it`);
    else {
      try {
        accessSync(target, fsConstants.R_OK | fsConstants.W_OK);
      } catch {
        problems.push(`database.sqlite: ${target} is not readable and writable by this user`);
      }
    }
  }
  return { problems, notes };
}
