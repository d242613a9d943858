/**
 * Registration, login, logout, whoami, devices (client-server API), and Synapse's shared-secret
 * registration admin API.
 */
import type { FastifyPluginAsync } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Accounts } from '../../accounts/service.js';
import { pathOf, requesterOf, requireAccessToken } from '../auth.js';

export interface AccountRoutesOptions {
  readonly accounts: Accounts;
  readonly allowAccessTokenInQuery: boolean;
}

const AnyObject = Type.Object({}, { additionalProperties: true });
type Body = Record<string, unknown>;

const C = '/_matrix/client/v3';

export const accountRoutes: FastifyPluginAsync<AccountRoutesOptions> = async (app, { accounts, allowAccessTokenInQuery }) => {
  /** GET /_matrix/client/v3/login — the login types offered. */
  app.get(`${C}/login`, async () => ({ flows: [{ type: 'm.login.password' }] }));

  /** POST /_matrix/client/v3/login — password login. */
  app.post(`${C}/login`, { schema: { body: AnyObject } }, async (request) => accounts.login(request.body as Body, request.ip));

  /** POST /_matrix/client/v3/register — open registration (m.login.dummy), when enabled. */
  app.post(
    `${C}/register`,
    { schema: { body: AnyObject, querystring: Type.Object({ kind: Type.Optional(Type.String()) }, { additionalProperties: true }) } },
    async (request) => accounts.register(request.body as Body, { kind: (request.query as { kind?: string }).kind }, request.ip, pathOf(request)),
  );

  /** GET /_matrix/client/v3/register/available?username= */
  app.get(`${C}/register/available`, { schema: { querystring: Type.Object({ username: Type.String() }, { additionalProperties: true }) } }, async (request) => {
    await accounts.usernameAvailable((request.query as { username: string }).username);
    return { available: true };
  });

  /** GET /_synapse/admin/v1/register — a fresh nonce for shared-secret registration. */
  app.get('/_synapse/admin/v1/register', async (request) => ({ nonce: await accounts.newRegistrationNonce(request.ip) }));

  /** POST /_synapse/admin/v1/register — shared-secret registration, compatible with Synapse. */
  app.post('/_synapse/admin/v1/register', { schema: { body: AnyObject } }, async (request) => accounts.registerWithSharedSecret(request.body as Body, request.ip));

  // Everything below needs an access token.
  await app.register(async (authed) => {
    authed.addHook('onRequest', requireAccessToken(accounts, allowAccessTokenInQuery));

    /** GET /_matrix/client/v3/account/whoami */
    authed.get(`${C}/account/whoami`, async (request) => {
      const r = requesterOf(request);
      return { user_id: r.userId, device_id: r.deviceId, is_guest: false };
    });

    /** POST /_matrix/client/v3/logout — deletes this device, its tokens and its keys. */
    authed.post(`${C}/logout`, async (request) => {
      await accounts.logout(requesterOf(request));
      return {};
    });

    /** POST /_matrix/client/v3/logout/all — deletes every device of the user. */
    authed.post(`${C}/logout/all`, async (request) => {
      await accounts.logoutAll(requesterOf(request));
      return {};
    });

    /** GET /_matrix/client/v3/devices */
    authed.get(`${C}/devices`, async (request) => ({ devices: await accounts.listDevices(requesterOf(request)) }));

    /** GET /_matrix/client/v3/devices/{deviceId} */
    authed.get(`${C}/devices/:deviceId`, async (request) => accounts.getDevice(requesterOf(request), (request.params as { deviceId: string }).deviceId));

    /** PUT /_matrix/client/v3/devices/{deviceId} — rename. */
    authed.put(`${C}/devices/:deviceId`, { schema: { body: AnyObject } }, async (request) => {
      await accounts.renameDevice(requesterOf(request), (request.params as { deviceId: string }).deviceId, request.body as Body);
      return {};
    });

    /** DELETE /_matrix/client/v3/devices/{deviceId} — behind user-interactive auth. */
    authed.delete(`${C}/devices/:deviceId`, async (request) => {
      const body = (request.body ?? {}) as Body;
      await accounts.deleteDevices(requesterOf(request), [(request.params as { deviceId: string }).deviceId], { method: 'DELETE', path: pathOf(request), body });
      return {};
    });

    /** POST /_matrix/client/v3/delete_devices — behind user-interactive auth. */
    authed.post(
      `${C}/delete_devices`,
      { schema: { body: Type.Object({ devices: Type.Array(Type.String()) }, { additionalProperties: true }) } },
      async (request) => {
        const body = request.body as Body & { devices: string[] };
        await accounts.deleteDevices(requesterOf(request), body.devices, { method: 'POST', path: pathOf(request), body });
        return {};
      },
    );
  });
};
