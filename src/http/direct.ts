/**
 * The hot key routes, served straight on node:http ahead of Fastify: key queries and claims are
 * most of what a key server answers, and Fastify's per-request machinery (hook chain,
 * content-type parsing, schema validation, reply serialisation) cost more than the key lookup
 * itself (docs/benchmarks.md). Only the plumbing is separate: these routes use the same
 * authentication, body parser, key rules and error mapping as the Fastify routes, and every other
 * request (other paths and methods, CORS pre-flight) goes on to Fastify.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { performance } from 'node:perf_hooks';
import { MatrixError } from '../matrix/errors.js';
import { parseJsonBody } from './json-body.js';
import { errorResponse, type ErrorContext } from './errors.js';

/** The Content-Type of every JSON answer, exactly: no charset parameter, as Synapse sends it. */
export const JSON_CONTENT_TYPE = 'application/json';

export interface DirectRoute {
  readonly method: 'GET' | 'POST';
  /** The exact path; the query string is not part of the match. */
  readonly path: string;
  /**
   * Resolves to the JSON of a 200 answer, as text or as UTF-8 bytes; throws as a Fastify handler
   * would. `body` is the parsed JSON body (`undefined` when there is none): the whole body is read
   * before the route runs, as Synapse does, so its authentication and reads happen in one go.
   */
  handle(raw: IncomingMessage, body: unknown): Promise<string | Buffer>;
}

export interface DirectRoutesOptions {
  readonly maxRequestBodyBytes: number;
  /** Headers every answer carries (CORS). */
  readonly headers: Readonly<Record<string, string>>;
  readonly log: ErrorContext['log'];
  readonly newRequestId: () => string;
  readonly observeRequest?: ((method: string, route: string, status: number, seconds: number) => void) | undefined;
}

/**
 * The client's address, as Fastify's request.ip gives it: the socket's peer, or with `trustProxy`
 * the first address in X-Forwarded-For (the client, as the proxies in front of us saw it).
 */
export function clientAddress(raw: IncomingMessage, trustProxy: boolean): string | undefined {
  const forwarded = trustProxy ? raw.headers['x-forwarded-for'] : undefined;
  const first = typeof forwarded === 'string' ? forwarded.split(',', 1)[0]!.trim() : '';
  return first !== '' ? first : raw.socket.remoteAddress;
}

/** Reads a request body, refusing more than `limit` bytes with 413 M_TOO_LARGE. */
function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const tooLarge = () => new MatrixError('M_TOO_LARGE', 'The request body is larger than this server accepts (max_request_body_bytes)', 413);
  if (Number(req.headers['content-length'] ?? 0) > limit) return Promise.reject(tooLarge());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        req.removeAllListeners('data');
        reject(tooLarge());
      } else chunks.push(chunk);
    });
    req.on('end', () => resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

export class DirectRoutes {
  private readonly routes = new Map<string, DirectRoute>();
  private readonly jsonHeaders: Readonly<Record<string, string>>;
  /** The headers of a 200, reused: writeHead reads them at once and keeps no reference. */
  private readonly okHeaders: Record<string, string>;
  /** Set when the server starts shutting down: new requests get 503 (as Fastify's return503OnClosing). */
  closing = false;

  constructor(private readonly options: DirectRoutesOptions) {
    this.jsonHeaders = { ...options.headers, 'content-type': JSON_CONTENT_TYPE };
    this.okHeaders = { ...this.jsonHeaders, 'content-length': '0' };
  }

  add(route: DirectRoute): void {
    this.routes.set(route.path, route);
  }

  /** The routes (app.ts also gives them to Fastify, for requests that reach it directly). */
  list(): readonly DirectRoute[] {
    return [...this.routes.values()];
  }

  /** Answers the request when it is for one of these routes; false leaves it to Fastify. */
  serve(req: IncomingMessage, res: ServerResponse): boolean {
    const url = req.url ?? '';
    const q = url.indexOf('?');
    const route = this.routes.get(q < 0 ? url : url.slice(0, q));
    if (route === undefined || route.method !== req.method) return false;
    const start = this.options.observeRequest ? performance.now() : 0;
    const answered = this.closing
      ? Promise.reject(new MatrixError('M_UNKNOWN', 'The server is shutting down; try again shortly', 503))
      : readBody(req, this.options.maxRequestBodyBytes).then((raw) => route.handle(req, parseJsonBody(raw)));
    answered.then(
      (text) => this.send(req, res, route, start, 200, undefined, text),
      (error: unknown) => {
        const r = errorResponse(error, { id: this.options.newRequestId(), method: req.method ?? '', url, log: this.options.log });
        // An unread or refused body must not be taken for the next request on the connection.
        const closeAfter = r.status === 413 || this.closing ? { connection: 'close' } : {};
        this.send(req, res, route, start, r.status, { ...r.headers, ...closeAfter }, r.body);
      },
    );
    return true;
  }

  private send(req: IncomingMessage, res: ServerResponse, route: DirectRoute, start: number, status: number, extra: Record<string, string> | undefined, text: string | Buffer): void {
    if (res.headersSent || res.destroyed) return;
    const length = String(typeof text === 'string' ? Buffer.byteLength(text) : text.length);
    if (extra === undefined) {
      this.okHeaders['content-length'] = length;
      res.writeHead(status, this.okHeaders);
    } else res.writeHead(status, { ...this.jsonHeaders, ...extra, 'content-length': length });
    res.end(text);
    this.options.observeRequest?.(req.method ?? '', route.path, status, (performance.now() - start) / 1000);
  }
}
