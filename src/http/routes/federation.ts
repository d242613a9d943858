/**
 * The federation API of a key server, behind X-Matrix request authentication: the user-key API
 * (user_keys.yaml, user_devices.yaml), whose key rules are the client-server API's with another
 * server as the viewer, and incoming transactions (transactions.yaml) carrying EDUs. A server that
 * asks about a local user subscribes to that user's device-list updates.
 */
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import type { IncomingMessage } from 'node:http';
import { clientAddress, type DirectRoute } from '../direct.js';
import type { Keys } from '../../keys/service.js';
import type { RequestAuthenticator } from '../../federation/request-auth.js';
import type { DeviceListSubscriptions } from '../../federation/subscriptions.js';
import type { InboundTransactions } from '../../federation/transactions.js';

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
  readonly subscriptions: DeviceListSubscriptions;
  readonly transactions: InboundTransactions;
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

/** The user IDs a (validated) query or claim body names under `field`. */
const usersIn = (body: unknown, field: string): string[] => Object.keys((body as Record<string, Record<string, unknown>>)[field]!);

/**
 * POST /user/keys/query and /user/keys/claim (user_keys.yaml), the hot routes, served by
 * DirectRoutes: the signature (which covers the body) is checked, then the key rules check the body.
 */
export function federationDirectRoutes({ keys, authenticator, allowDeviceNameLookup, subscriptions, trustProxy }: Omit<FederationRoutesOptions, 'transactions'>): DirectRoute[] {
  const verify = (raw: IncomingMessage, content: unknown) => authenticator.authenticate(signedRequest(raw, content, clientAddress(raw, trustProxy)));
  return [
    {
      method: 'POST',
      path: `${F}/user/keys/query`,
      handle: async (raw, body) => {
        const origin = await verify(raw, body);
        const answer = await keys.query(null, body, { displayNames: allowDeviceNameLookup, clientApi: false });
        await subscriptions.touch(origin, usersIn(body, 'device_keys'));
        return answer;
      },
    },
    {
      method: 'POST',
      path: `${F}/user/keys/claim`,
      handle: async (raw, body) => {
        const origin = await verify(raw, body);
        const answer = await keys.claim(body, true);
        await subscriptions.touch(origin, usersIn(body, 'one_time_keys'));
        return answer;
      },
    },
  ];
}

export const federationRoutes: FastifyPluginAsync<FederationRoutesOptions> = async (app, { keys, authenticator, allowDeviceNameLookup, subscriptions, transactions }) => {
  // After the body is parsed (the signature covers it) and before it is validated, so an unsigned
  // request learns nothing about what a valid body looks like.
  app.addHook('preValidation', async (request) => {
    request.origin = await authenticator.authenticate(signedRequest(request.raw, request.body, request.ip));
  });

  /** GET /_matrix/federation/v1/user/devices/{userId} — spec: user_devices.yaml */
  app.get(`${F}/user/devices/:userId`, async (request, reply) => {
    const userId = (request.params as { userId: string }).userId;
    // Subscribed before the list is read: a change after the read is then queued for the server.
    keys.requireLocalUsers([userId], 'userId');
    await subscriptions.touch(request.origin!, [userId]);
    const { body, streamId } = await keys.userDevices(userId, allowDeviceNameLookup);
    await subscriptions.noteRead(request.origin!, userId, streamId);
    return json(reply, body);
  });

  /** PUT /_matrix/federation/v1/send/{txnId} — spec: transactions.yaml */
  app.put(`${F}/send/:txnId`, async (request, reply) =>
    json(reply, await transactions.receive(request.origin!, (request.params as { txnId: string }).txnId, request.body)),
  );
};
