/**
 * Errors of the storage layer that callers may act on. Everything else a driver throws is a bug
 * (or a value the database cannot store) and travels as is.
 */

/**
 * The database cannot be reached just now: the connection was refused or lost, or the server is
 * shutting down or starting (a PostgreSQL restart). Retrying later may succeed; the pool opens
 * new connections by itself.
 */
export class DatabaseUnavailableError extends Error {
  constructor(
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`the database is unavailable: ${reason}`, options);
    this.name = 'DatabaseUnavailableError';
  }
}
