/**
 * The one configuration schema. The Config type is inferred from it, the defaults live in it, and
 * docs/configuration.md documents it key by key. Names follow Synapse where Synapse has the same
 * setting (server_name, signing_key_path, old_signing_keys, key_refresh_interval,
 * registration_shared_secret, trusted_key_servers).
 */
import { Type, type Static } from '@sinclair/typebox';

const Duration = Type.Union([Type.Integer({ minimum: 0 }), Type.String()], {
  description: 'milliseconds, or a string such as "500ms", "30s", "10m", "1h", "1d", "1w"',
});

const strict = { additionalProperties: false } as const;

export const ConfigSchema = Type.Object(
  {
    server_name: Type.String({ default: 'localhost', description: 'the Matrix server name (the part after ":" in user IDs)' }),
    public_baseurl: Type.Optional(Type.String({ description: 'the public URL clients reach us at, for /.well-known/matrix/client' })),
    listen: Type.Object(
      {
        host: Type.String({ default: '127.0.0.1' }),
        port: Type.Integer({ minimum: 0, maximum: 65535, default: 8008 }),
        x_forwarded: Type.Boolean({ default: false, description: 'trust X-Forwarded-For from a reverse proxy for client addresses' }),
      },
      { ...strict, default: {} },
    ),
    database: Type.Object(
      {
        sqlite: Type.Optional(Type.String({ description: 'path of the SQLite database file' })),
        postgres: Type.Optional(Type.String({ description: 'a postgres:// connection URL' })),
        // At least 2: migrations hold one connection for their lock while working on another.
        pool_size: Type.Integer({ minimum: 2, maximum: 1000, default: 10, description: 'PostgreSQL connections per process, at least 2' }),
        connect_timeout: Type.Union([Duration], { default: '10s' }),
        cache_staleness_bound: Type.Union([Duration], {
          default: '500ms',
          description: 'PostgreSQL: the longest a change committed by another process can go unseen by read caches; 0 turns them off',
        }),
      },
      { ...strict, default: {} },
    ),
    signing_key_path: Type.String({ default: './data/signing.key' }),
    old_signing_keys: Type.Record(
      Type.String(),
      Type.Object({ key: Type.String(), expired_ts: Type.Integer({ minimum: 0 }) }, strict),
      { default: {} },
    ),
    key_refresh_interval: Type.Union([Duration], { default: '1d' }),
    registration_shared_secret: Type.Optional(Type.String({ minLength: 1 })),
    enable_registration: Type.Boolean({ default: false }),
    // Query-string tokens end up in proxy and browser logs, and the spec no longer has them (after v1.19).
    allow_access_token_in_query: Type.Boolean({ default: false }),
    serve_server_wellknown: Type.Boolean({ default: false }),
    rc_login: Type.Object(
      {
        failed_attempts: Type.Object(
          {
            per_second: Type.Number({ exclusiveMinimum: 0, default: 0.17 }),
            burst_count: Type.Integer({ minimum: 1, default: 3 }),
          },
          { ...strict, default: {} },
        ),
      },
      { ...strict, default: {} },
    ),
    federation: Type.Object(
      {
        resolve: Type.Record(Type.String(), Type.String(), { default: {} }),
        trusted_key_servers: Type.Array(
          Type.Object(
            {
              server_name: Type.String(),
              verify_keys: Type.Optional(Type.Record(Type.String(), Type.String())),
            },
            strict,
          ),
          { default: [] },
        ),
        allow_device_name_lookup: Type.Boolean({ default: false }),
        tls_ca_file: Type.Optional(Type.String({ description: 'a PEM file of extra CA certificates to trust for other servers' })),
        rate_limit: Type.Object(
          {
            per_second: Type.Number({ exclusiveMinimum: 0, default: 1000 }),
            burst_count: Type.Integer({ minimum: 1, default: 2000 }),
          },
          { ...strict, default: {} },
        ),
        request_timeout: Type.Union([Duration], { default: '10s' }),
        device_list_subscription_lifetime: Type.Union([Duration], {
          default: '1d',
          description: 'how long a server that asked about a local user keeps receiving that user\'s device-list updates',
        }),
        device_list_refresh_interval: Type.Union([Duration], {
          default: '1h',
          description: 'how old a cached device list of a remote user may get before it is fetched again',
        }),
        destination_min_retry_interval: Type.Union([Duration], { default: '10s' }),
        destination_retry_multiplier: Type.Number({ minimum: 1, default: 2 }),
        destination_max_retry_interval: Type.Union([Duration], { default: '1h' }),
        max_undelivered_age: Type.Union([Duration], {
          default: '1d',
          description: 'after a server has taken no transaction for this long, its queued updates are cut to the newest per user',
        }),
        ip_range_blacklist: Type.Optional(Type.Array(Type.String(), { description: 'CIDR ranges discovered servers may not be reached at' })),
        ip_range_whitelist: Type.Array(Type.String(), { default: [] }),
      },
      { ...strict, default: {} },
    ),
    max_request_body_bytes: Type.Integer({ minimum: 1024, default: 10 * 1024 * 1024 }),
    max_one_time_keys_per_device: Type.Integer({ minimum: 1, default: 10_000 }),
    max_key_query_users: Type.Integer({ minimum: 1, default: 10_000, description: 'users one key query may name' }),
    max_key_query_device_ids: Type.Integer({ minimum: 1, default: 10_000, description: 'device IDs one key query may name, over all its users' }),
    max_key_claim_devices: Type.Integer({ minimum: 1, default: 10_000, description: 'devices one key claim may name' }),
    tls_certificate_path: Type.Optional(Type.String({ description: 'PEM certificate chain; with tls_private_key_path the listener speaks HTTPS' })),
    tls_private_key_path: Type.Optional(Type.String({ description: 'PEM private key of tls_certificate_path' })),
    accept_invalid_device_self_signatures: Type.Boolean({ default: false, description: 'store device keys whose self-signature is missing or does not verify (for test suites)' }),
    key_backup: Type.Object(
      {
        max_sessions_per_request: Type.Integer({ minimum: 1, default: 10_000 }),
        max_sessions_per_user: Type.Integer({ minimum: 1, default: 1_000_000 }),
        max_bytes_per_user: Type.Integer({ minimum: 4096, default: 1024 ** 3, description: "bytes of session_data all of a user's backup versions may hold" }),
        max_versions_per_user: Type.Integer({ minimum: 1, default: 100, description: 'backup versions (not deleted) a user may have' }),
      },
      { ...strict, default: {} },
    ),
    max_devices_per_user: Type.Integer({ minimum: 1, default: 100, description: 'devices one user may have; a login beyond it is refused' }),
    password_hashing: Type.Object(
      {
        scrypt_log_n: Type.Integer({ minimum: 10, maximum: 20, default: 17, description: 'scrypt cost of new password hashes, as log2(N)' }),
      },
      { ...strict, default: {} },
    ),
    to_device: Type.Object(
      {
        max_messages_per_request: Type.Integer({ minimum: 1, default: 10_000, description: 'device messages one PUT /sendToDevice may carry' }),
        max_pending_per_device: Type.Integer({ minimum: 1, default: 10_000, description: 'messages waiting for one device; beyond it the oldest are dropped' }),
        // At least 128 KiB, so that the largest single message (60 KiB of content, with its sender and type) always fits.
        max_pending_bytes_per_device: Type.Integer({
          minimum: 131_072,
          default: 64 * 1024 * 1024,
          description: 'bytes of messages waiting for one device; beyond it the oldest are dropped',
        }),
      },
      { ...strict, default: {} },
    ),
    metrics: Type.Object(
      {
        enabled: Type.Boolean({ default: false }),
        host: Type.String({ default: '127.0.0.1' }),
        port: Type.Integer({ minimum: 0, maximum: 65535, default: 9101 }),
      },
      { ...strict, default: {} },
    ),
    log_requests: Type.Boolean({ default: false }),
    log_level: Type.Union(
      ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l)),
      { default: 'info' },
    ),
  },
  strict,
);

export type Config = Static<typeof ConfigSchema>;

/** Keys whose values are secrets: masked when the configuration is printed. */
export const SECRET_KEYS: ReadonlySet<string> = new Set(['registration_shared_secret']);

