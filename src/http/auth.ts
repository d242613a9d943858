/**
 * Client authentication: the access token from `Authorization: Bearer` (or, when
 * allow_access_token_in_query is on, the deprecated `?access_token=`), resolved once per request:
 * in an onRequest hook before the body is read, or by a direct route (direct.ts) after it.
 */
import type { IncomingMessage } from 'node:http';
import type { FastifyReply, FastifyRequest, onRequestAsyncHookHandler } from 'fastify';
import { MatrixError } from '../matrix/errors.js';
import type { Accounts, Requester } from '../accounts/service.js';

declare module 'fastify' {
  interface FastifyRequest {
    requester: Requester | undefined;
  }
}

/** The access token of a request (Fastify's or a direct route's: only the raw request is read). */
export function accessTokenOf(raw: IncomingMessage, allowQuery: boolean): string {
  const header = raw.headers.authorization;
  if (header !== undefined) {
    const m = /^Bearer +(\S+)\s*$/i.exec(header);
    if (!m) throw new MatrixError('M_MISSING_TOKEN', 'The Authorization header must be "Bearer <access token>"', 401);
    return m[1]!;
  }
  const q = allowQuery ? (raw.url ?? '').indexOf('?') : -1;
  if (q >= 0) {
    const token = new URLSearchParams((raw.url ?? '').slice(q + 1)).get('access_token');
    if (token !== null && token !== '') return token;
  }
  throw new MatrixError('M_MISSING_TOKEN', 'Missing access token: send "Authorization: Bearer <token>"', 401);
}

/** An onRequest hook that authenticates every route of the plugin it is added to. */
export function requireAccessToken(accounts: Accounts, allowQuery: boolean): onRequestAsyncHookHandler {
  return async (request: FastifyRequest, _reply: FastifyReply) => {
    request.requester = await accounts.authenticate(accessTokenOf(request.raw, allowQuery));
  };
}

/** The authenticated requester of a route behind requireAccessToken. */
export function requesterOf(request: FastifyRequest): Requester {
  const r = request.requester;
  if (!r) throw new Error('route is missing the requireAccessToken hook');
  return r;
}

/** The request path without the query string (which may carry an access token). */
export function pathOf(request: FastifyRequest): string {
  const q = request.url.indexOf('?');
  return q < 0 ? request.url : request.url.slice(0, q);
}
