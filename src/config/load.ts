/**
 * Loading the configuration: defaults ← YAML file ← MXKEYS_* environment variables, validated once
 * against the schema, then deep-frozen. Every problem becomes a ConfigError that names the key, says
 * what was found and what was expected.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { Kind, type TObject, type TSchema } from '@sinclair/typebox';
import { Value, type ValueError } from '@sinclair/typebox/value';
import { parse as parseYaml, YAMLParseError } from 'yaml';
import { ConfigSchema, SECRET_KEYS, type Config } from './schema.js';
import { isValidServerName } from '../matrix/ids.js';
import { decodeBase64 } from '../matrix/base64.js';
import { KEY_VERSION } from '../matrix/signing.js';

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export const DEFAULT_SQLITE_PATH = './data/mxkeys.db';
const ENV_PREFIX = 'MXKEYS_';
/** Environment variables with our prefix that are not configuration keys. */
// MXKEYS_WORKER is set by `mxkeys serve --workers N` in each worker (cli/cluster.ts).
const NON_CONFIG_ENV = /^MXKEYS_(CONFIG|WORKER|TEST_.*)$/;

export interface EnvVariable {
  readonly name: string;
  readonly path: readonly string[];
  readonly schema: TSchema;
}

function isFixedObject(schema: TSchema): schema is TObject {
  return schema[Kind] === 'Object' && typeof schema['properties'] === 'object';
}

/** Every configuration key that an environment variable can set, derived from the schema. */
export function envVariables(schema: TObject = ConfigSchema, path: string[] = []): EnvVariable[] {
  const out: EnvVariable[] = [];
  for (const [key, sub] of Object.entries(schema.properties)) {
    const p = [...path, key];
    if (isFixedObject(sub)) out.push(...envVariables(sub, p));
    else out.push({ name: ENV_PREFIX + p.join('_').toUpperCase(), path: p, schema: sub });
  }
  return out;
}

function setPath(target: Record<string, unknown>, path: readonly string[], value: unknown): void {
  let node = target;
  for (const key of path.slice(0, -1)) {
    const next = node[key];
    if (typeof next !== 'object' || next === null || Array.isArray(next)) node[key] = {};
    node = node[key] as Record<string, unknown>;
  }
  node[path[path.length - 1]!] = value;
}

function parseEnvValue(v: EnvVariable, raw: string): unknown {
  const isString = v.schema[Kind] === 'String';
  if (isString) return raw;
  try {
    return parseYaml(raw) as unknown;
  } catch {
    throw new ConfigError(`environment variable ${v.name} (config key "${v.path.join('.')}"): could not parse ${JSON.stringify(raw)} as a value`);
  }
}

/**
 * Names a configuration key for a message: `config key "a.b"`, or, when its value came from an
 * environment variable, `environment variable MXKEYS_A_B (config key "a.b")`.
 */
export type KeyNamer = (key: string) => string;

function keyNamer(fromEnv: ReadonlyMap<string, string>): KeyNamer {
  return (key) => {
    // The variable may set a parent of the key (a map or list given as a whole).
    for (let k = key.replace(/\[\d+\]/g, ''); k !== ''; k = k.includes('.') ? k.slice(0, k.lastIndexOf('.')) : '') {
      const name = fromEnv.get(k);
      if (name !== undefined) return `environment variable ${name} (config key "${key}")`;
    }
    return `config key "${key}"`;
  };
}

/** The allowed values of an enum-like schema (a union of literals), if it is one. */
function allowedValues(schema: TSchema): unknown[] | undefined {
  const anyOf = schema['anyOf'] as TSchema[] | undefined;
  if (!Array.isArray(anyOf) || anyOf.length === 0 || !anyOf.every((s) => 'const' in s)) return undefined;
  return anyOf.map((s) => s['const'] as unknown);
}

function describeError(e: ValueError, name: KeyNamer): string {
  const key = e.path.replace(/^\//, '').split('/').filter(Boolean).map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~')).join('.');
  const where = key ? name(key) : 'the configuration';
  if (e.message.includes('Unexpected property') || e.message.includes('additional properties')) {
    return `${where} is not a known setting; see docs/configuration.md for the keys mxkeys understands`;
  }
  if (e.message.startsWith('Expected required property')) return `${where} is required but missing`;
  const found = e.value === undefined ? 'nothing' : JSON.stringify(e.value);
  const allowed = allowedValues(e.schema);
  if (allowed) return `${where}: found ${found}, expected one of ${allowed.map((v) => JSON.stringify(v)).join(', ')}`;
  const expected = e.schema['description'] ? `${e.message} (${String(e.schema['description'])})` : e.message;
  return `${where}: found ${found}, expected: ${expected.replace(/^Expected /, '').toLowerCase()}`;
}

const DURATION = /^(\d+)\s*(ms|s|m|h|d|w|y)?$/;
const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000, y: 31_536_000_000 };

/** A duration setting in milliseconds: an integer, or a string like "10s", "1h", "1d". */
export function durationMs(value: number | string): number {
  if (typeof value === 'number') return value;
  const m = DURATION.exec(value.trim());
  if (!m) throw new ConfigError(`"${value}" is not a duration; write milliseconds or e.g. "30s", "10m", "1h", "1d"`);
  return Number(m[1]) * UNIT_MS[m[2] ?? 'ms']!;
}

function semanticChecks(c: Config, key: KeyNamer): void {
  if (!isValidServerName(c.server_name)) {
    throw new ConfigError(`${key('server_name')}: "${c.server_name}" is not a valid Matrix server name (expected a hostname or IP literal with an optional :port, e.g. "example.org")`);
  }
  const { sqlite, postgres } = c.database;
  if (sqlite !== undefined && postgres !== undefined) {
    throw new ConfigError(`${key('database')}: set exactly one of "database.sqlite" (a file path) or "database.postgres" (a postgres:// URL), not both`);
  }
  if (postgres !== undefined) {
    let ok = false;
    try {
      ok = ['postgres:', 'postgresql:'].includes(new URL(postgres).protocol);
    } catch {
      ok = false;
    }
    if (!ok) throw new ConfigError(`${key('database.postgres')}: expected a URL like postgres://user:password@host:5432/dbname`);
  }
  const durations: [string, number | string][] = [
    ['key_refresh_interval', c.key_refresh_interval],
    ['federation.request_timeout', c.federation.request_timeout],
    ['federation.device_list_subscription_lifetime', c.federation.device_list_subscription_lifetime],
    ['federation.device_list_refresh_interval', c.federation.device_list_refresh_interval],
    ['federation.destination_min_retry_interval', c.federation.destination_min_retry_interval],
    ['federation.destination_max_retry_interval', c.federation.destination_max_retry_interval],
    ['federation.max_undelivered_age', c.federation.max_undelivered_age],
    ['database.connect_timeout', c.database.connect_timeout],
    ['database.cache_staleness_bound', c.database.cache_staleness_bound],
  ];
  for (const [name, value] of durations) {
    try {
      durationMs(value);
    } catch (e) {
      throw new ConfigError(`${key(name)}: ${(e as Error).message}`);
    }
  }
  if (durationMs(c.federation.device_list_subscription_lifetime) < durationMs(c.federation.device_list_refresh_interval)) {
    throw new ConfigError(
      `${key('federation.device_list_subscription_lifetime')} must be at least federation.device_list_refresh_interval: servers refetch cached lists at that interval, which is what keeps their subscriptions alive`,
    );
  }
  const bound = durationMs(c.database.cache_staleness_bound);
  if (bound !== 0 && bound < 100) {
    throw new ConfigError(`${key('database.cache_staleness_bound')} must be 0 (no read caches on PostgreSQL) or at least 100ms: the caches are checked against the database five times per bound`);
  }
  if ((c.tls_certificate_path === undefined) !== (c.tls_private_key_path === undefined)) {
    throw new ConfigError('config keys "tls_certificate_path" and "tls_private_key_path" go together: set both for an HTTPS listener, or neither');
  }
  for (const [keyId, old] of Object.entries(c.old_signing_keys)) {
    const [alg, version] = keyId.split(':', 2);
    if (alg !== 'ed25519' || version === undefined || !KEY_VERSION.test(version)) {
      throw new ConfigError(`${key(`old_signing_keys.${keyId}`)}: the key ID must look like "ed25519:<version>" with [a-zA-Z0-9_] in the version`);
    }
    if (decodeBase64(old.key)?.length !== 32) {
      throw new ConfigError(`${key(`old_signing_keys.${keyId}.key`)}: expected the unpadded base64 of a 32-byte ed25519 public key`);
    }
  }
  for (const [name, url] of Object.entries(c.federation.resolve)) {
    if (!isValidServerName(name)) throw new ConfigError(`${key('federation.resolve')}: "${name}" is not a valid server name`);
    let ok = false;
    try {
      ok = ['http:', 'https:'].includes(new URL(url).protocol);
    } catch {
      ok = false;
    }
    if (!ok) throw new ConfigError(`${key(`federation.resolve.${name}`)}: expected a base URL like "https://host:8448" or "http://127.0.0.1:8009", found ${JSON.stringify(url)}`);
  }
  for (const list of ['ip_range_blacklist', 'ip_range_whitelist'] as const) {
    (c.federation[list] ?? []).forEach((cidr, i) => {
      const [address, bits, extra] = cidr.split('/');
      const family = isIP(address ?? '');
      const max = family === 6 ? 128 : 32;
      if (family === 0 || extra !== undefined || (bits !== undefined && !(/^\d{1,3}$/.test(bits) && Number(bits) <= max))) {
        throw new ConfigError(`${key(`federation.${list}[${i}]`)}: "${cidr}" is not an IP address or CIDR range like "10.0.0.0/8" or "fc00::/7"`);
      }
    });
  }
  c.federation.trusted_key_servers.forEach((s, i) => {
    if (!isValidServerName(s.server_name)) {
      throw new ConfigError(`${key(`federation.trusted_key_servers[${i}].server_name`)}: "${s.server_name}" is not a valid server name`);
    }
  });
  if (c.public_baseurl !== undefined) {
    try {
      new URL(c.public_baseurl);
    } catch {
      throw new ConfigError(`${key('public_baseurl')}: expected an absolute URL like "https://matrix.example.org/", found ${JSON.stringify(c.public_baseurl)}`);
    }
  }
}

function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null) {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}

export interface LoadConfigOptions {
  /** Path of a YAML config file; without one, every key has a default (server_name "localhost"). */
  readonly file?: string | undefined;
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Values that take precedence over the file and the environment (tests, embedding). */
  readonly overrides?: Readonly<Record<string, unknown>>;
}

export function loadConfig(options: LoadConfigOptions = {}): Readonly<Config> {
  let raw: Record<string, unknown> = {};
  if (options.file !== undefined) {
    let text: string;
    try {
      text = readFileSync(options.file, 'utf8');
    } catch (e) {
      throw new ConfigError(`cannot read the config file ${options.file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}; pass an existing YAML file with --config`);
    }
    let parsed: unknown;
    try {
      parsed = parseYaml(text);
    } catch (e) {
      const where = e instanceof YAMLParseError && e.linePos ? ` at line ${e.linePos[0].line}, column ${e.linePos[0].col}` : '';
      throw new ConfigError(`the config file ${options.file} is not valid YAML${where}: ${(e as Error).message.split('\n')[0]}`);
    }
    if (parsed !== null && parsed !== undefined) {
      if (typeof parsed !== 'object' || Array.isArray(parsed)) throw new ConfigError(`the config file ${options.file} must be a YAML mapping of settings (key: value)`);
      raw = parsed as Record<string, unknown>;
    }
  }

  const env = options.env ?? {};
  const known = new Map(envVariables().map((v) => [v.name, v]));
  const fromEnv = new Map<string, string>();
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith(ENV_PREFIX) || value === undefined || NON_CONFIG_ENV.test(name)) continue;
    const v = known.get(name);
    if (!v) {
      throw new ConfigError(`environment variable ${name} is not a configuration key; see "Environment variables" in docs/configuration.md for the names`);
    }
    if (v.path[0] === 'database' && (v.path[1] === 'sqlite' || v.path[1] === 'postgres')) {
      // Choosing a database in the environment replaces the file's choice rather than adding a second one.
      const db = raw['database'];
      if (typeof db === 'object' && db !== null) delete (db as Record<string, unknown>)[v.path[1] === 'sqlite' ? 'postgres' : 'sqlite'];
    }
    setPath(raw, v.path, parseEnvValue(v, value));
    fromEnv.set(v.path.join('.'), name);
  }
  for (const [key, value] of Object.entries(options.overrides ?? {})) {
    raw[key] = value;
    for (const k of fromEnv.keys()) if (k === key || k.startsWith(`${key}.`)) fromEnv.delete(k);
  }

  if (options.file !== undefined && raw['server_name'] === undefined) {
    throw new ConfigError(`config key "server_name" is required in ${options.file} (for example "server_name: example.org")`);
  }

  const withDefaults = Value.Default(ConfigSchema, structuredClone(raw)) as unknown;
  const errors = [...Value.Errors(ConfigSchema, withDefaults)];
  if (errors.length > 0) {
    // Union members produce one error per alternative; one line per key is enough.
    const lines = [...new Set(errors.map((e) => describeError(e, keyNamer(fromEnv))))].slice(0, 5);
    throw new ConfigError(lines.join('\n'));
  }
  const config = withDefaults as Config;
  if (config.database.sqlite === undefined && config.database.postgres === undefined) config.database.sqlite = DEFAULT_SQLITE_PATH;
  semanticChecks(config, keyNamer(fromEnv));
  return deepFreeze(config);
}

/** The configuration as YAML-ready data with secrets masked, for `mxkeys check-config`. */
export function maskSecrets(config: Readonly<Config>): Record<string, unknown> {
  const copy = structuredClone(config) as Record<string, unknown>;
  for (const key of SECRET_KEYS) if (copy[key] !== undefined) copy[key] = '********';
  const db = copy['database'] as Record<string, unknown>;
  if (typeof db['postgres'] === 'string') {
    const url = new URL(db['postgres']);
    if (url.password) url.password = '********';
    db['postgres'] = url.toString();
  }
  return copy;
}

