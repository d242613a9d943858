/**
 * The client-server end-to-end keys API (keys.yaml, cross_signing.yaml) and the key parts of
 * /sync. Handlers parse, call the key rules, and send the JSON text those build.
 */
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Keys } from '../../keys/service.js';
import type { CrossSigning } from '../../keys/cross-signing.js';
import type { Accounts } from '../../accounts/service.js';
import { pathOf, requesterOf, requireAccessToken } from '../auth.js';

export interface KeyRoutesOptions {
  readonly keys: Keys;
  readonly crossSigning: CrossSigning;
  readonly accounts: Accounts;
  readonly allowAccessTokenInQuery: boolean;
}

type Body = Record<string, unknown>;
const C = '/_matrix/client/v3';
const UNSTABLE = '/_matrix/client/unstable';

const AnyObject = Type.Object({}, { additionalProperties: true });
const Timeout = Type.Optional(Type.Integer({ minimum: 0 }));
const QueryBody = Type.Object({ device_keys: Type.Record(Type.String(), Type.Array(Type.String())), timeout: Timeout }, { additionalProperties: true });
const ClaimBody = Type.Object({ one_time_keys: Type.Record(Type.String(), Type.Record(Type.String(), Type.String())), timeout: Timeout }, { additionalProperties: true });
const UploadBody = Type.Object(
  {
    device_keys: Type.Optional(Type.Union([AnyObject, Type.Null()])),
    one_time_keys: Type.Optional(Type.Union([AnyObject, Type.Null()])),
    fallback_keys: Type.Optional(Type.Union([AnyObject, Type.Null()])),
  },
  { additionalProperties: true },
);

const json = (reply: FastifyReply, text: string) => reply.type('application/json').send(text);

export const keyRoutes: FastifyPluginAsync<KeyRoutesOptions> = async (app, { keys, crossSigning, accounts, allowAccessTokenInQuery }) => {
  app.addHook('onRequest', requireAccessToken(accounts, allowAccessTokenInQuery));

  /** POST /_matrix/client/v3/keys/upload — spec: keys.yaml */
  app.post(`${C}/keys/upload`, { schema: { body: UploadBody } }, async (request) => keys.upload(requesterOf(request), request.body as Body));

  /** POST /_matrix/client/v3/keys/query — spec: keys.yaml */
  app.post(`${C}/keys/query`, { schema: { body: QueryBody } }, async (request, reply) =>
    json(reply, await keys.query({ userId: requesterOf(request).userId }, request.body as Body, { displayNames: true, clientApi: true })),
  );

  /** POST /_matrix/client/v3/keys/claim — spec: keys.yaml */
  app.post(`${C}/keys/claim`, { schema: { body: ClaimBody } }, async (request, reply) => json(reply, await keys.claim(request.body as Body, false)));

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
   * GET /_matrix/client/v3/sync — only the end-to-end encryption parts a key server has
   * (e2e spec, "Extensions to /sync"): device list changes, one-time key counts and unused
   * fallback key types, with `next_batch` for /keys/changes. An incremental sync waits up to
   * `timeout` ms for a device-list change the caller can see.
   */
  app.get(
    `${C}/sync`,
    { schema: { querystring: Type.Object({ since: Type.Optional(Type.String()), timeout: Type.Optional(Type.String({ pattern: '^[0-9]{1,9}$' })) }, { additionalProperties: true }) } },
    async (request) => {
      const q = request.query as { since?: string; timeout?: string };
      return keys.sync(requesterOf(request), q.since, Number(q.timeout ?? 0), () => request.raw.destroyed);
    },
  );
};
