/**
 * The Matrix standard error response: `{"errcode": "M_…", "error": "…"}` (client-server spec,
 * "Standard error response"). Every request-level failure in mxkeys is a thrown MatrixError;
 * the HTTP layer turns it into a response. Per-item failures that the spec reports inside a 200
 * (`failures`) are data, never exceptions.
 */

/** The error codes mxkeys uses, with the HTTP status each one usually travels with. */
export const ERRCODES = {
  M_BAD_JSON: 400,
  M_NOT_JSON: 400,
  M_INVALID_PARAM: 400,
  M_MISSING_PARAM: 400,
  M_INVALID_SIGNATURE: 400,
  M_INVALID_USERNAME: 400,
  M_USER_IN_USE: 400,
  M_UNAUTHORIZED: 401,
  M_MISSING_TOKEN: 401,
  M_UNKNOWN_TOKEN: 401,
  M_FORBIDDEN: 403,
  /** Key backup: keys may only be written to the current backup version (with `current_version`). */
  M_WRONG_ROOM_KEYS_VERSION: 403,
  M_NOT_FOUND: 404,
  M_UNRECOGNIZED: 404,
  M_TOO_LARGE: 413,
  M_LIMIT_EXCEEDED: 429,
  /** MSC4342 (limiting the number of devices per user), under its unstable name. */
  ORG_MATRIX_MSC4342_M_TOO_MANY_DEVICES: 403,
  M_UNKNOWN: 500,
} as const;

export type Errcode = keyof typeof ERRCODES;

export class MatrixError extends Error {
  readonly errcode: Errcode;
  readonly status: number;
  /** Extra top-level fields for the response body (e.g. `retry_after_ms`, UIA `flows`). */
  readonly extra: Readonly<Record<string, unknown>> | undefined;
  /** When to try again, sent as `Retry-After` (from `retry_after_ms`, or set for a 503). */
  readonly retryAfterMs: number | undefined;

  constructor(errcode: Errcode, message: string, status?: number, extra?: Record<string, unknown>, retryAfterMs?: number) {
    super(message);
    this.name = 'MatrixError';
    this.errcode = errcode;
    this.status = status ?? ERRCODES[errcode];
    this.extra = extra;
    const inBody = extra?.['retry_after_ms'];
    this.retryAfterMs = retryAfterMs ?? (typeof inBody === 'number' ? inBody : undefined);
  }

  /** The JSON body the spec requires; `errcode` and `error` are always present. */
  toJSON(): Record<string, unknown> {
    return { ...this.extra, errcode: this.errcode, error: this.message };
  }
}

/** 503 M_UNKNOWN with `Retry-After`: the server cannot do this now but expects to soon. */
export const serviceUnavailable = (message: string, retryAfterMs: number): MatrixError =>
  new MatrixError('M_UNKNOWN', message, 503, undefined, retryAfterMs);

/** 429 M_LIMIT_EXCEEDED with `retry_after_ms` and `Retry-After`. */
export const limitExceeded = (message: string, retryAfterMs: number): MatrixError =>
  new MatrixError('M_LIMIT_EXCEEDED', message, 429, { retry_after_ms: retryAfterMs });

export const badJson = (message: string): MatrixError => new MatrixError('M_BAD_JSON', message);
export const invalidParam = (message: string): MatrixError => new MatrixError('M_INVALID_PARAM', message);
export const missingParam = (message: string): MatrixError => new MatrixError('M_MISSING_PARAM', message);
