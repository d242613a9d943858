import { DatabaseUnavailableError } from './errors.js';

/**
 * Database failures at start-up, told in the operator's terms: which setting, what went wrong,
 * what to check. The connection URL's password never appears.
 */

export class DatabaseStartupError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DatabaseStartupError';
  }
}

interface DriverError {
  readonly code?: string;
  readonly message?: string;
  readonly severity?: string;
}

/** `host:port/dbname` of a postgres:// URL, without user or password. */
export function postgresTarget(url: string): { where: string; host: string; user: string; database: string } {
  try {
    const u = new URL(url);
    const host = `${u.hostname || 'localhost'}:${u.port || '5432'}`;
    const database = decodeURIComponent(u.pathname.replace(/^\//, '')) || decodeURIComponent(u.username) || 'postgres';
    return { where: host, host, user: decodeURIComponent(u.username) || '(default user)', database };
  } catch {
    return { where: 'the configured server', host: 'the configured server', user: '(unknown)', database: '(unknown)' };
  }
}

const NETWORK: Record<string, string> = {
  ECONNREFUSED: 'connection refused; check that PostgreSQL is running there and listens on that address and port (listen_addresses, port)',
  ENOTFOUND: 'the host name does not resolve; check the host in the URL',
  EAI_AGAIN: 'the host name could not be resolved right now (DNS lookup failed); check the host in the URL and the DNS resolver',
  EHOSTUNREACH: 'the host is unreachable; check the address and the network route',
  ENETUNREACH: 'the network is unreachable; check the address and the network route',
  ECONNRESET: 'the connection was closed by the other side; check that this is PostgreSQL and whether it requires TLS (add ?sslmode=require)',
  ETIMEDOUT: 'the connection timed out; check the host, the port and firewalls',
};

/** Turns an error from connecting to or first using PostgreSQL into a DatabaseStartupError. */
export function describePostgresError(e: unknown, url: string, connectTimeoutMs: number): DatabaseStartupError {
  // The driver reports a refused or lost connection as DatabaseUnavailableError; its cause is the socket error.
  const cause = e instanceof DatabaseUnavailableError ? e.cause : undefined;
  const err = ((cause ?? e) ?? {}) as DriverError;
  const t = postgresTarget(url);
  const prefix = `database.postgres: cannot use PostgreSQL at ${t.where}`;
  const message = err.message ?? String(e);
  if (err.code && NETWORK[err.code]) return new DatabaseStartupError(`database.postgres: cannot connect to ${t.where}: ${NETWORK[err.code]}`);
  if (/timeout/i.test(message) && !err.severity) {
    return new DatabaseStartupError(
      `database.postgres: no answer from ${t.where} within ${connectTimeoutMs / 1000} s (database.connect_timeout); check that this host and port are PostgreSQL's, and firewalls in between`,
    );
  }
  switch (err.code) {
    case '28P01':
      return new DatabaseStartupError(`${prefix}: password authentication failed for user "${t.user}"; check the user and password in the URL`);
    case '28000':
      return new DatabaseStartupError(`${prefix}: the login was refused (${message}); check the user in the URL and pg_hba.conf`);
    case '3D000':
      return new DatabaseStartupError(`${prefix}: database "${t.database}" does not exist; create it (createdb -O ${t.user} ${t.database}) or fix the name in the URL`);
    case '42501':
      return new DatabaseStartupError(`${prefix}: permission denied (${message}); user "${t.user}" must be allowed to create tables in the schema (e.g. own the database)`);
    case '53300':
      return new DatabaseStartupError(`${prefix}: too many connections; raise max_connections or lower database.pool_size`);
    case '57P03':
      return new DatabaseStartupError(`${prefix}: the server is starting up or shutting down; try again shortly`);
    default:
      return new DatabaseStartupError(`${prefix}: ${message}`);
  }
}

/** Turns an error from opening a SQLite file into a DatabaseStartupError. */
export function describeSqliteError(e: unknown, path: string): DatabaseStartupError {
  const err = (e ?? {}) as DriverError;
  const message = err.message ?? String(e);
  const prefix = `database.sqlite: cannot use ${path}`;
  switch (err.code) {
    case 'SQLITE_CANTOPEN':
      return new DatabaseStartupError(`${prefix}: unable to open the file; check that its directory exists and that this user may read and write there`);
    case 'SQLITE_NOTADB':
    case 'SQLITE_CORRUPT':
      return new DatabaseStartupError(`${prefix}: the file is not an SQLite database (or is damaged); check the path, or restore a backup`);
    case 'SQLITE_READONLY':
    case 'SQLITE_PERM':
    case 'EACCES':
    case 'EPERM':
      return new DatabaseStartupError(`${prefix}: permission denied; the file and its directory must be writable by this user (SQLite writes -wal and -shm files beside it)`);
    case 'ENOTDIR':
    case 'EEXIST':
      return new DatabaseStartupError(`${prefix}: a part of the path is a file, not a directory; check the path`);
    default:
      return new DatabaseStartupError(`${prefix}: ${message}`);
  }
}
