/**
 * The Fastify application, apart from `listen` so tests can drive it with real HTTP on port 0.
 * Cross-cutting behaviour lives here: JSON bodies, the Matrix error mapping, 404/405, CORS.
 * Routes are plugins that each receive only the services they need.
 */
import Fastify, { LogController, type FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { Logger } from 'pino';
import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { performance } from 'node:perf_hooks';
import { DirectRoutes, JSON_CONTENT_TYPE } from './direct.js';
import { MatrixError } from '../matrix/errors.js';
import { parseJsonBody } from './json-body.js';
import { sendMatrixError } from './errors.js';
import { serverKeyRoutes } from './routes/server-keys.js';
import { federationInfoRoutes } from './routes/federation-info.js';
import type { OwnServerKeys } from '../federation/own-keys.js';
import type { Accounts } from '../accounts/service.js';
import { accountRoutes } from './routes/accounts.js';
import { discoveryRoutes } from './routes/discovery.js';
import { keyDirectRoutes, keyRoutes } from './routes/keys.js';
import type { Keys } from '../keys/service.js';
import type { Sync } from '../keys/sync.js';
import type { ToDevice } from '../todevice/service.js';
import { toDeviceRoutes } from './routes/to-device.js';
import type { CrossSigning } from '../keys/cross-signing.js';
import type { Notary } from '../federation/notary.js';
import type { RequestAuthenticator } from '../federation/request-auth.js';
import type { DeviceListSubscriptions } from '../federation/subscriptions.js';
import type { InboundTransactions } from '../federation/transactions.js';
import { federationDirectRoutes, federationRoutes } from './routes/federation.js';
import { notaryRoutes } from './routes/notary.js';
import { backupRoutes } from './routes/backup.js';
import type { KeyBackup } from '../backup/service.js';
import { adminRoutes } from './routes/admin.js';
import type { Admin } from '../accounts/admin.js';
import { redactUrl } from './redact.js';

export type App = FastifyInstance<
  import('node:http').Server,
  import('node:http').IncomingMessage,
  import('node:http').ServerResponse,
  Logger,
  TypeBoxTypeProvider
>;

export interface AppDeps {
  readonly logger: Logger;
  readonly maxRequestBodyBytes: number;
  /** Trust X-Forwarded-For from a reverse proxy for client addresses. */
  readonly trustProxy: boolean;
  readonly ownKeys: OwnServerKeys;
  readonly accounts: Accounts;
  readonly admin: Admin;
  readonly keys: Keys;
  readonly sync: Sync;
  readonly toDevice: ToDevice;
  readonly crossSigning: CrossSigning;
  readonly backup: KeyBackup;
  /** Resolves when the database answers (GET /health). */
  readonly databaseAnswers: () => Promise<void>;
  /** Log one line per answered request (`log_requests`). */
  readonly logRequests?: boolean;
  readonly federation: {
    readonly authenticator: RequestAuthenticator;
    readonly notary: Notary;
    readonly allowDeviceNameLookup: boolean;
    readonly subscriptions: DeviceListSubscriptions;
    readonly transactions: InboundTransactions;
  };
  /** PEM key and certificate: the listener speaks HTTPS (tls_certificate_path, tls_private_key_path). */
  readonly tls?: { readonly key: Buffer; readonly cert: Buffer } | undefined;
  /** Called once per answered request (metrics). */
  readonly observeRequest?: ((method: string, route: string, status: number, seconds: number) => void) | undefined;
  readonly client: {
    readonly allowAccessTokenInQuery: boolean;
    readonly publicBaseurl: string | undefined;
    readonly serveServerWellknown: boolean;
  };
}

const CORS_HEADERS = {
  'access-control-allow-origin': '*',
  'access-control-allow-methods': 'GET, POST, PUT, DELETE, OPTIONS',
  'access-control-allow-headers': 'X-Requested-With, Content-Type, Authorization',
};

/** The client's address: the first X-Forwarded-For entry when we trust the proxy, else the peer's. */
function clientAddress(req: IncomingMessage, trustProxy: boolean): string | undefined {
  const forwarded = req.headers['x-forwarded-for'];
  if (trustProxy && typeof forwarded === 'string' && forwarded !== '') return forwarded.split(',', 1)[0]!.trim();
  return req.socket.remoteAddress;
}

/** How long GET /health waits for the database before it answers 503. */
const HEALTH_TIMEOUT_MS = 5_000;

/** Turns a route URL (`/a/:b/*`) into a matcher for concrete paths, to tell 405 from 404. */
function routeMatcher(url: string): RegExp {
  const escaped = url
    .split('/')
    .map((seg) => (seg.startsWith(':') ? '[^/]+' : seg === '*' ? '.*' : seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')))
    .join('/');
  return new RegExp(`^${escaped}$`);
}

/** Every route of each app: method and URL pattern (`/a/:b`), OPTIONS left out. */
const routeLists = new WeakMap<App, { method: string; url: string }[]>();

/** The routes `app` serves, once it is ready (tests enumerate them, e.g. to fuzz every one). */
export function listRoutes(app: App): readonly { readonly method: string; readonly url: string }[] {
  return routeLists.get(app) ?? [];
}

export function buildApp(deps: AppDeps): App {
  const prefix = randomBytes(3).toString('hex');
  let counter = 0;
  const newRequestId = () => `${prefix}-${(++counter).toString(36)}`;
  const direct = new DirectRoutes({
    maxRequestBodyBytes: deps.maxRequestBodyBytes,
    headers: CORS_HEADERS,
    log: deps.logger,
    newRequestId,
    observeRequest: deps.observeRequest,
  });
  for (const route of keyDirectRoutes({ keys: deps.keys, accounts: deps.accounts, allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery })) direct.add(route);
  for (const route of federationDirectRoutes({ keys: deps.keys, ...deps.federation, trustProxy: deps.trustProxy })) direct.add(route);

  // Without x_forwarded every client seems to come from the proxy: one client's failed logins
  // would then lock everyone out. Said once, when the first forwarded request shows it.
  let warnedForwarded = deps.trustProxy;
  const beforeRouting = (req: IncomingMessage, res: ServerResponse): void => {
    if (!warnedForwarded && req.headers['x-forwarded-for'] !== undefined) {
      warnedForwarded = true;
      deps.logger.warn(
        { address: req.socket.remoteAddress },
        'requests arrive with an X-Forwarded-For header, but listen.x_forwarded is false: every client behind this proxy shares its address, so login rate limits and last_seen_ip apply to all of them together. Set listen.x_forwarded: true if a reverse proxy you control sets the header',
      );
    }
    if (deps.logRequests) {
      const start = performance.now();
      res.once('close', () => {
        deps.logger.info(
          {
            method: req.method,
            url: redactUrl(req.url ?? ''),
            status: res.statusCode,
            ms: Math.round((performance.now() - start) * 10) / 10,
            address: clientAddress(req, deps.trustProxy),
            ...(res.writableFinished ? {} : { aborted: true }),
          },
          'request',
        );
      });
    }
  };

  const app = Fastify({
    // The hot key routes are answered before Fastify sees the request (direct.ts).
    serverFactory: (handler) => {
      const listener = (req: IncomingMessage, res: ServerResponse) => {
        beforeRouting(req, res);
        if (!direct.serve(req, res)) handler(req, res);
      };
      // An HTTPS server is an http.Server for everything Fastify does with it.
      const server = deps.tls ? (createTlsServer({ key: deps.tls.key, cert: deps.tls.cert }, listener) as unknown as Server) : createServer(listener);
      server.keepAliveTimeout = 72_000; // Fastify's default, which it sets only on servers it creates
      return server;
    },
    loggerInstance: deps.logger,
    // Per-request logs cost throughput; request errors are logged by the error handler.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: deps.maxRequestBodyBytes,
    genReqId: newRequestId,
    // No per-request child logger (it costs throughput): the error handler logs the request id itself.
    childLoggerFactory: (logger) => logger,
    // User IDs (up to 255 bytes, percent-encoded up to 3x) travel in path segments.
    routerOptions: { maxParamLength: 1024 },
    // Validation must never change what a client sent: signed objects are stored verbatim.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false } },
    forceCloseConnections: 'idle',
    trustProxy: deps.trustProxy,
    return503OnClosing: true,
    frameworkErrors: (error, request, reply) => {
      sendMatrixError(error, request, reply);
    },
  }).withTypeProvider<TypeBoxTypeProvider>() as App;

  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', { parseAs: 'buffer' }, (_request, body, done) => {
    try {
      done(null, parseJsonBody(body as Buffer));
    } catch (e) {
      done(e as Error, undefined);
    }
  });

  const routes: { method: string; matcher: RegExp }[] = [];
  const listed: { method: string; url: string }[] = [];
  routeLists.set(app, listed);
  app.addHook('onRoute', (route) => {
    const methods = Array.isArray(route.method) ? route.method : [route.method];
    for (const method of methods) {
      if (method === 'OPTIONS') continue;
      routes.push({ method, matcher: routeMatcher(route.url ?? route.path) });
      listed.push({ method, url: route.url ?? route.path });
    }
  });

  app.addHook('onRequest', (_request, reply, done) => {
    reply.headers(CORS_HEADERS);
    done();
  });

  // JSON answers say exactly "application/json", as Synapse sends it: some clients and test tools
  // compare the header literally, and Fastify would add "; charset=utf-8" (JSON is UTF-8 anyway).
  app.addHook('onSend', (_request, reply, payload, done) => {
    if (reply.getHeader('content-type') === 'application/json; charset=utf-8') reply.header('content-type', JSON_CONTENT_TYPE);
    done(null, payload);
  });

  const observe = deps.observeRequest;
  if (observe) {
    app.addHook('onResponse', (request, reply, done) => {
      observe(request.method, request.routeOptions.url ?? 'unmatched', reply.statusCode, reply.elapsedTime / 1000);
      done();
    });
  }

  // Shutdown: new direct-route requests get 503, and open /sync long-polls end at once.
  const stopping = new AbortController();
  app.addHook('preClose', (done) => {
    direct.closing = true;
    stopping.abort();
    done();
  });

  app.setErrorHandler((error, request, reply) => sendMatrixError(error, request, reply));
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?', 1)[0]!;
    const allowed = [...new Set(routes.filter((r) => r.matcher.test(path)).map((r) => r.method))];
    if (allowed.length > 0) {
      reply.header('allow', allowed.join(', '));
      return sendMatrixError(
        new MatrixError('M_UNRECOGNIZED', `${request.method} is not supported on ${path}; use ${allowed.join(' or ')}`, 405),
        request,
        reply,
      );
    }
    return sendMatrixError(new MatrixError('M_UNRECOGNIZED', `Unrecognized request: ${request.method} ${path}`, 404), request, reply);
  });

  // CORS pre-flight: answered for every path without running any endpoint logic (C-S spec,
  // "Web Browser Clients"); 200 with an empty object, as Synapse answers.
  app.options('*', (_request, reply) => {
    reply.type('application/json').send('{}');
  });

  // The direct routes again, for requests that reach Fastify without our server's listener (an
  // embedding homeserver's own server calling app.routing, or app.inject).
  for (const route of direct.list()) {
    app.route({
      method: route.method,
      url: route.path,
      handler: async (request, reply) => reply.type('application/json').send(await route.handle(request.raw, request.body)),
    });
  }

  /**
   * GET /health — for load balancers and container health checks (as Synapse's /health): 200 "OK"
   * while the database answers, 503 otherwise (and while shutting down).
   */
  app.get('/health', async (_request, reply) => {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        deps.databaseAnswers(),
        new Promise((_resolve, reject) => (timer = setTimeout(() => reject(new Error(`no answer within ${HEALTH_TIMEOUT_MS / 1000} s`)), HEALTH_TIMEOUT_MS))),
      ]);
    } catch (e) {
      deps.logger.warn({ err: (e as Error).message }, 'GET /health: the database does not answer');
      throw new MatrixError('M_UNKNOWN', 'The database does not answer; see the server log', 503);
    } finally {
      clearTimeout(timer);
    }
    return reply.type('text/plain; charset=utf-8').send('OK');
  });

  app.decorateRequest('requester', undefined);
  app.decorateRequest('origin', undefined);
  app.register(serverKeyRoutes, { ownKeys: deps.ownKeys });
  app.register(federationInfoRoutes);
  app.register(discoveryRoutes, { publicBaseurl: deps.client.publicBaseurl, serveServerWellknown: deps.client.serveServerWellknown });
  app.register(accountRoutes, { accounts: deps.accounts, allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery });
  app.register(keyRoutes, {
    keys: deps.keys,
    sync: deps.sync,
    crossSigning: deps.crossSigning,
    accounts: deps.accounts,
    allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery,
    stopping: stopping.signal,
  });
  app.register(toDeviceRoutes, { toDevice: deps.toDevice, accounts: deps.accounts, allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery });
  app.register(backupRoutes, { backup: deps.backup, accounts: deps.accounts, allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery });
  app.register(adminRoutes, { accounts: deps.accounts, admin: deps.admin, allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery });
  app.register(federationRoutes, {
    keys: deps.keys,
    authenticator: deps.federation.authenticator,
    allowDeviceNameLookup: deps.federation.allowDeviceNameLookup,
    subscriptions: deps.federation.subscriptions,
    transactions: deps.federation.transactions,
    trustProxy: deps.trustProxy,
  });
  app.register(notaryRoutes, { notary: deps.federation.notary });
  return app;
}
