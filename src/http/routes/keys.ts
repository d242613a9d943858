/**
 * The client-server end-to-end keys API (keys.yaml, cross_signing.yaml) and the key parts of
 * /sync. Handlers parse, call the key rules, and send the JSON text those build.
 */
import type { FastifyPluginAsync } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Keys } from '../../keys/service.js';
import type { Sync } from '../../keys/sync.js';
import type { CrossSigning } from '../../keys/cross-signing.js';
import type { Accounts } from '../../accounts/service.js';
import { accessTokenOf, pathOf, requesterOf, requireAccessToken } from '../auth.js';
import type { IncomingMessage } from 'node:http';
import type { DirectRoute } from '../direct.js';

export interface KeyRoutesOptions {
  readonly keys: Keys;
  readonly sync: Sync;
  readonly crossSigning: CrossSigning;
  readonly accounts: Accounts;
  readonly allowAccessTokenInQuery: boolean;
  /** Aborted when the server starts shutting down: open /sync long-polls answer at once. */
  readonly stopping?: AbortSignal;
}

type Body = Record<string, unknown>;
const C = '/_matrix/client/v3';
const UNSTABLE = '/_matrix/client/unstable';

const AnyObject = Type.Object({}, { additionalProperties: true });
const UploadBody = Type.Object(
  {
    device_keys: Type.Optional(Type.Union([AnyObject, Type.Null()])),
    one_time_keys: Type.Optional(Type.Union([AnyObject, Type.Null()])),
    fallback_keys: Type.Optional(Type.Union([AnyObject, Type.Null()])),
  },
  { additionalProperties: true },
);

/**
 * POST /keys/query and /keys/claim (keys.yaml), the hot routes, served by DirectRoutes: the key
 * rules check the bodies (Keys.query, Keys.claim), as no Fastify schema runs before them.
 */
export function keyDirectRoutes({ keys, accounts, allowAccessTokenInQuery }: Pick<KeyRoutesOptions, 'keys' | 'accounts' | 'allowAccessTokenInQuery'>): DirectRoute[] {
  const requester = (raw: IncomingMessage) => accounts.authenticate(accessTokenOf(raw, allowAccessTokenInQuery));
  return [
    {
      method: 'POST',
      path: `${C}/keys/query`,
      handle: async (raw, body) => keys.query({ userId: (await requester(raw)).userId }, body, { displayNames: true, clientApi: true }),
    },
    {
      method: 'POST',
      path: `${C}/keys/claim`,
      handle: async (raw, body) => {
        await requester(raw);
        return keys.claim(body, false);
      },
    },
  ];
}

export const keyRoutes: FastifyPluginAsync<KeyRoutesOptions> = async (app, { keys, sync, crossSigning, accounts, allowAccessTokenInQuery, stopping }) => {
  app.addHook('onRequest', requireAccessToken(accounts, allowAccessTokenInQuery));

  // Long-polls waiting right now: ended with an empty answer when the server shuts down, so a
  // shutdown does not wait out their timeouts (up to 30 s, longer than many stop timeouts).
  const waiting = new Set<AbortController>();
  stopping?.addEventListener('abort', () => {
    if (waiting.size > 0) app.log.info({ count: waiting.size }, 'shutting down: ending open /sync long-polls with an empty answer');
    for (const w of waiting) w.abort();
  });

  /** POST /_matrix/client/v3/keys/upload — spec: keys.yaml */
  app.post(`${C}/keys/upload`, { schema: { body: UploadBody } }, async (request) => keys.upload(requesterOf(request), request.body as Body));

  /** GET /_matrix/client/v3/keys/changes?from=&to= — spec: keys.yaml */
  app.get(
    `${C}/keys/changes`,
    { schema: { querystring: Type.Object({ from: Type.String(), to: Type.Optional(Type.String()) }, { additionalProperties: true }) } },
    async (request) => {
      const q = request.query as { from: string; to?: string };
      return keys.changes(requesterOf(request).userId, q.from, q.to);
    },
  );

  /** POST /_matrix/client/v3/keys/device_signing/upload (and the unstable alias) — spec: cross_signing.yaml */
  for (const prefix of [C, UNSTABLE]) {
    app.post(`${prefix}/keys/device_signing/upload`, { schema: { body: AnyObject } }, async (request) => {
      await crossSigning.uploadKeys(requesterOf(request), request.body as Body, { method: 'POST', path: pathOf(request) });
      return {};
    });
    /** POST /_matrix/client/v3/keys/signatures/upload (and the unstable alias) — spec: cross_signing.yaml */
    app.post(`${prefix}/keys/signatures/upload`, { schema: { body: AnyObject } }, async (request) =>
      crossSigning.uploadSignatures(requesterOf(request), request.body as Body),
    );
  }

  /**
   * GET /_matrix/client/v3/sync — only the parts a key server has (e2e spec and
   * send_to_device.md, "Extensions to /sync"): device list changes, one-time key counts, unused
   * fallback key types and to-device messages, with `next_batch` (also for /keys/changes). An
   * incremental sync waits up to `timeout` ms for a device-list change the caller can see or a
   * to-device message.
   */
  app.get(
    `${C}/sync`,
    { schema: { querystring: Type.Object({ since: Type.Optional(Type.String()), timeout: Type.Optional(Type.String({ pattern: '^[0-9]{1,9}$' })) }, { additionalProperties: true }) } },
    async (request, reply) => {
      const q = request.query as { since?: string; timeout?: string };
      const stop = new AbortController();
      if (stopping?.aborted) stop.abort();
      const onClose = () => stop.abort(); // the client went away
      reply.raw.once('close', onClose);
      waiting.add(stop);
      try {
        return reply.type('application/json').send(await sync.sync(requesterOf(request), q.since, Number(q.timeout ?? 0), stop.signal));
      } finally {
        waiting.delete(stop);
        reply.raw.off('close', onClose);
      }
    },
  );
};
