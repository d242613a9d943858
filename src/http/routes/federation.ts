/**
 * The federation user-key API (user_keys.yaml, user_devices.yaml), behind X-Matrix request
 * authentication. The key rules are the client-server API's, with another server as the viewer.
 */
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Keys } from '../../keys/service.js';
import type { RequestAuthenticator } from '../../federation/request-auth.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The verified origin server of a federation request. */
    origin: string | undefined;
  }
}

export interface FederationRoutesOptions {
  readonly keys: Keys;
  readonly authenticator: RequestAuthenticator;
  readonly allowDeviceNameLookup: boolean;
}

type Body = Record<string, unknown>;
const F = '/_matrix/federation/v1';
const json = (reply: FastifyReply, text: string) => reply.type('application/json').send(text);

const QueryBody = Type.Object({ device_keys: Type.Record(Type.String(), Type.Array(Type.String())) }, { additionalProperties: true });
const ClaimBody = Type.Object({ one_time_keys: Type.Record(Type.String(), Type.Record(Type.String(), Type.String())) }, { additionalProperties: true });

export const federationRoutes: FastifyPluginAsync<FederationRoutesOptions> = async (app, { keys, authenticator, allowDeviceNameLookup }) => {
  // After the body is parsed (the signature covers it) and before it is validated, so an unsigned
  // request learns nothing about what a valid body looks like.
  app.addHook('preValidation', async (request) => {
    request.origin = await authenticator.authenticate({
      method: request.method,
      uri: request.raw.url ?? request.url,
      authorization: request.headers.authorization,
      content: request.body,
    });
  });

  /** POST /_matrix/federation/v1/user/keys/query — spec: user_keys.yaml */
  app.post(`${F}/user/keys/query`, { schema: { body: QueryBody } }, async (request, reply) =>
    json(reply, await keys.query(null, request.body as Body, { displayNames: allowDeviceNameLookup, clientApi: false })),
  );

  /** POST /_matrix/federation/v1/user/keys/claim — spec: user_keys.yaml */
  app.post(`${F}/user/keys/claim`, { schema: { body: ClaimBody } }, async (request, reply) => json(reply, await keys.claim(request.body as Body, true)));

  /** GET /_matrix/federation/v1/user/devices/{userId} — spec: user_devices.yaml */
  app.get(`${F}/user/devices/:userId`, async (request, reply) =>
    json(reply, await keys.userDevices((request.params as { userId: string }).userId, allowDeviceNameLookup)),
  );
};
