/**
 * The one mapping from anything thrown in a request to a Matrix error response. Request handlers
 * throw MatrixError; Fastify's own errors (validation, body size, bad URLs) are translated here;
 * anything else is our bug: 500 M_UNKNOWN, logged with the request id, no details to the client.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { MatrixError, serviceUnavailable, type Errcode } from '../matrix/errors.js';
import { redactUrl } from './redact.js';
import { DatabaseUnavailableError } from '../storage/errors.js';

/** How soon to try again while the database is unreachable (a PostgreSQL restart takes a second or two). */
export const DATABASE_RETRY_AFTER_MS = 2000;

interface ValidationIssue {
  keyword: string;
  instancePath: string;
  message?: string;
  params: Record<string, unknown>;
}

function describeValidation(issue: ValidationIssue, context: string): string {
  const where = `${context}${issue.instancePath.replace(/\//g, '.')}`;
  switch (issue.keyword) {
    case 'required':
      return `${where} is missing the required field "${String(issue.params['missingProperty'])}"`;
    case 'type':
      return `${where} must be ${String(issue.params['type'])}`;
    case 'additionalProperties':
      return `${where} has an unexpected field "${String(issue.params['additionalProperty'])}"`;
    default:
      return `${where} ${issue.message ?? 'is invalid'}`;
  }
}

/** Turns a thrown value into the MatrixError we answer with. */
export function toMatrixError(error: unknown, requestId: string): { matrix: MatrixError; unexpected: boolean } {
  if (error instanceof MatrixError) return { matrix: error, unexpected: false };
  // Logged once by the storage layer when the connection goes, not once per request.
  if (error instanceof DatabaseUnavailableError) {
    return { matrix: serviceUnavailable('The database is unavailable just now; try again shortly', DATABASE_RETRY_AFTER_MS), unexpected: false };
  }
  const fe = error as Partial<FastifyError> & { validation?: ValidationIssue[]; validationContext?: string };
  if (Array.isArray(fe.validation) && fe.validation.length > 0) {
    const issue = fe.validation[0]!;
    const errcode: Errcode = issue.keyword === 'required' ? 'M_MISSING_PARAM' : 'M_BAD_JSON';
    const context = fe.validationContext === 'body' ? 'the request body' : (fe.validationContext ?? 'the request');
    return { matrix: new MatrixError(errcode, describeValidation(issue, context)), unexpected: false };
  }
  if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE' || fe.statusCode === 413) {
    return { matrix: new MatrixError('M_TOO_LARGE', 'The request body is larger than this server accepts (max_request_body_bytes)', 413), unexpected: false };
  }
  // PostgreSQL "data exception" (SQLSTATE class 22, e.g. a NUL character in text): a value from
  // the request the database cannot store. Inputs are checked before they get that far; this is
  // the net under those checks, so a client's mistake never becomes a 500.
  const sqlState = (error as { code?: unknown; severity?: unknown }).code;
  if (typeof sqlState === 'string' && /^22[0-9A-Z]{3}$/.test(sqlState) && (error as { severity?: unknown }).severity !== undefined) {
    return { matrix: new MatrixError('M_INVALID_PARAM', 'The request contains a value that cannot be stored (for example a NUL character)'), unexpected: false };
  }
  if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    const errcode: Errcode = fe.statusCode === 400 ? 'M_BAD_JSON' : 'M_UNKNOWN';
    return { matrix: new MatrixError(errcode, fe.message ?? 'Bad request', fe.statusCode), unexpected: false };
  }
  return {
    matrix: new MatrixError('M_UNKNOWN', `Internal server error; the server log has the details under request id ${requestId}`, 500),
    unexpected: true,
  };
}

export interface ErrorContext {
  readonly id: string;
  readonly method: string;
  readonly url: string;
  readonly log: Pick<Logger, 'error' | 'warn'>;
}

/** The status, extra headers and body of the error response for `error`, logging what needs it. */
export function errorResponse(error: unknown, request: ErrorContext): { status: number; headers: Record<string, string>; body: string } {
  const { matrix, unexpected } = toMatrixError(error, request.id);
  if (unexpected) request.log.error({ err: error, reqId: request.id, method: request.method, url: redactUrl(request.url) }, 'unexpected error while handling a request');
  // A 503 that says when to retry is a known, passing condition, logged once where it is noticed
  // (a lost database connection, a busy key fetcher), not once per request.
  else if (matrix.status >= 500 && matrix.retryAfterMs === undefined) request.log.warn({ reqId: request.id, errcode: matrix.errcode }, matrix.message);
  const headers: Record<string, string> = {};
  if (matrix.retryAfterMs !== undefined) headers['retry-after'] = String(Math.max(1, Math.ceil(matrix.retryAfterMs / 1000)));
  return { status: matrix.status, headers, body: JSON.stringify(matrix.toJSON()) };
}

export function sendMatrixError(error: unknown, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  const r = errorResponse(error, request);
  return reply.code(r.status).headers(r.headers).type('application/json').send(r.body);
}
