/**
 * The Fastify application, apart from `listen` so tests can drive it with real HTTP on port 0.
 * Cross-cutting behaviour lives here: JSON bodies, the Matrix error mapping, 404/405, CORS.
 * Routes are plugins that each receive only the services they need.
 */
import Fastify, { LogController, type FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import type { Logger } from 'pino';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { DirectRoutes } from './direct.js';
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
import type { CrossSigning } from '../keys/cross-signing.js';
import type { Notary } from '../federation/notary.js';
import type { RequestAuthenticator } from '../federation/request-auth.js';
import { federationDirectRoutes, federationRoutes } from './routes/federation.js';
import { notaryRoutes } from './routes/notary.js';

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
  readonly keys: Keys;
  readonly crossSigning: CrossSigning;
  readonly federation: {
    readonly authenticator: RequestAuthenticator;
    readonly notary: Notary;
    readonly allowDeviceNameLookup: boolean;
  };
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

  const app = Fastify({
    // The hot key routes are answered before Fastify sees the request (direct.ts).
    serverFactory: (handler) => {
      const server = createServer((req, res) => {
        if (!direct.serve(req, res)) handler(req, res);
      });
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

  const observe = deps.observeRequest;
  if (observe) {
    app.addHook('onResponse', (request, reply, done) => {
      observe(request.method, request.routeOptions.url ?? 'unmatched', reply.statusCode, reply.elapsedTime / 1000);
      done();
    });
  }

  app.addHook('preClose', (done) => {
    direct.closing = true;
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

  app.decorateRequest('requester', undefined);
  app.decorateRequest('origin', undefined);
  app.register(serverKeyRoutes, { ownKeys: deps.ownKeys });
  app.register(federationInfoRoutes);
  app.register(discoveryRoutes, { publicBaseurl: deps.client.publicBaseurl, serveServerWellknown: deps.client.serveServerWellknown });
  app.register(accountRoutes, { accounts: deps.accounts, allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery });
  app.register(keyRoutes, {
    keys: deps.keys,
    crossSigning: deps.crossSigning,
    accounts: deps.accounts,
    allowAccessTokenInQuery: deps.client.allowAccessTokenInQuery,
  });
  app.register(federationRoutes, {
    keys: deps.keys,
    authenticator: deps.federation.authenticator,
    allowDeviceNameLookup: deps.federation.allowDeviceNameLookup,
    trustProxy: deps.trustProxy,
  });
  app.register(notaryRoutes, { notary: deps.federation.notary });
  return app;
}
