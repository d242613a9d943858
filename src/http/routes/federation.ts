/**
 * The federation user-key API (user_keys.yaml, user_devices.yaml), behind X-Matrix request
 * authentication. The key rules are the client-server API's, with another server as the viewer.
 */
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import type { IncomingMessage } from 'node:http';
import { clientAddress, type DirectRoute } from '../direct.js';
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
  /** Take the client address from X-Forwarded-For (listen.x_forwarded), as Fastify's request.ip does. */
  readonly trustProxy: boolean;
}

const F = '/_matrix/federation/v1';

/** What X-Matrix authentication checks of a request: the raw request target, exactly as received. */
const signedRequest = (raw: IncomingMessage, content: unknown, address: string | undefined) => ({
  method: raw.method ?? '',
  uri: raw.url ?? '',
  authorization: raw.headers.authorization,
  content,
  address,
});
const json = (reply: FastifyReply, text: string) => reply.type('application/json').send(text);

/**
 * POST /user/keys/query and /user/keys/claim (user_keys.yaml), the hot routes, served by
 * DirectRoutes: the signature (which covers the body) is checked, then the key rules check the body.
 */
export function federationDirectRoutes({ keys, authenticator, allowDeviceNameLookup, trustProxy }: FederationRoutesOptions): DirectRoute[] {
  const verify = (raw: IncomingMessage, content: unknown) => authenticator.authenticate(signedRequest(raw, content, clientAddress(raw, trustProxy)));
  return [
    {
      method: 'POST',
      path: `${F}/user/keys/query`,
      handle: async (raw, body) => {
        await verify(raw, body);
        return keys.query(null, body, { displayNames: allowDeviceNameLookup, clientApi: false });
      },
    },
    {
      method: 'POST',
      path: `${F}/user/keys/claim`,
      handle: async (raw, body) => {
        await verify(raw, body);
        return keys.claim(body, true);
      },
    },
  ];
}

export const federationRoutes: FastifyPluginAsync<FederationRoutesOptions> = async (app, { keys, authenticator, allowDeviceNameLookup }) => {
  // After the body is parsed (the signature covers it) and before it is validated, so an unsigned
  // request learns nothing about what a valid body looks like.
  app.addHook('preValidation', async (request) => {
    request.origin = await authenticator.authenticate(signedRequest(request.raw, request.body, request.ip));
  });

  /** GET /_matrix/federation/v1/user/devices/{userId} — spec: user_devices.yaml */
  app.get(`${F}/user/devices/:userId`, async (request, reply) =>
    json(reply, await keys.userDevices((request.params as { userId: string }).userId, allowDeviceNameLookup)),
  );
};
