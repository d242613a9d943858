/**
 * The user and device part of Synapse's admin API, behind the access token of an admin user
 * (`register-user --admin`). Same paths, request bodies and answers as Synapse, so admin tools
 * written for Synapse work; docs/api.md lists what exists.
 */
import type { FastifyPluginAsync } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Accounts } from '../../accounts/service.js';
import type { Admin } from '../../accounts/admin.js';
import { requesterOf, requireAccessToken } from '../auth.js';

export interface AdminRoutesOptions {
  readonly accounts: Accounts;
  readonly admin: Admin;
  readonly allowAccessTokenInQuery: boolean;
}

const V1 = '/_synapse/admin/v1';
const V2 = '/_synapse/admin/v2';
const AnyObject = Type.Object({}, { additionalProperties: true });
type Body = Record<string, unknown>;
type UserParams = { userId: string };
type DeviceParams = { userId: string; deviceId: string };

export const adminRoutes: FastifyPluginAsync<AdminRoutesOptions> = async (app, { accounts, admin, allowAccessTokenInQuery }) => {
  app.addHook('onRequest', requireAccessToken(accounts, allowAccessTokenInQuery));
  app.addHook('preHandler', async (request) => admin.requireAdmin(requesterOf(request).userId));
  const actor = (request: Parameters<typeof requesterOf>[0]) => ({ userId: requesterOf(request).userId });

  /** GET /_synapse/admin/v2/users — list accounts (Synapse "List Accounts (V2)"). */
  app.get(`${V2}/users`, async (request) => admin.listUsers(request.query as Record<string, string | undefined>));

  /** GET /_synapse/admin/v2/users/{userId} — query one account. */
  app.get(`${V2}/users/:userId`, async (request) => admin.getUser((request.params as UserParams).userId));

  /** POST /_synapse/admin/v1/reset_password/{userId} — `{new_password, logout_devices?}`. */
  app.post(`${V1}/reset_password/:userId`, { schema: { body: AnyObject } }, async (request) =>
    admin.resetPassword(actor(request), (request.params as UserParams).userId, request.body as Body),
  );

  /** POST /_synapse/admin/v1/deactivate/{userId} — `{erase?}`; an empty body is allowed. */
  app.post(`${V1}/deactivate/:userId`, async (request) => admin.deactivate(actor(request), (request.params as UserParams).userId, (request.body ?? {}) as Body));

  /** GET /_synapse/admin/v2/users/{userId}/devices */
  app.get(`${V2}/users/:userId/devices`, async (request) => admin.listDevices((request.params as UserParams).userId));

  /** POST /_synapse/admin/v2/users/{userId}/delete_devices — `{devices: [...]}`. */
  app.post(
    `${V2}/users/:userId/delete_devices`,
    { schema: { body: Type.Object({ devices: Type.Array(Type.Unknown()) }, { additionalProperties: true }) } },
    async (request) => admin.deleteDevices(actor(request), (request.params as UserParams).userId, (request.body as { devices: unknown[] }).devices),
  );

  /** GET /_synapse/admin/v2/users/{userId}/devices/{deviceId} */
  app.get(`${V2}/users/:userId/devices/:deviceId`, async (request) => {
    const p = request.params as DeviceParams;
    return admin.getDevice(p.userId, p.deviceId);
  });

  /** PUT /_synapse/admin/v2/users/{userId}/devices/{deviceId} — `{display_name}`. */
  app.put(`${V2}/users/:userId/devices/:deviceId`, async (request) => {
    const p = request.params as DeviceParams;
    return admin.updateDevice(p.userId, p.deviceId, (request.body ?? {}) as Body);
  });

  /** DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId} */
  app.delete(`${V2}/users/:userId/devices/:deviceId`, async (request) => {
    const p = request.params as DeviceParams;
    return admin.deleteDevices(actor(request), p.userId, [p.deviceId]);
  });

  /** POST /_synapse/admin/v1/users/{userId}/_allow_cross_signing_replacement_without_uia */
  app.post(`${V1}/users/:userId/_allow_cross_signing_replacement_without_uia`, async (request) =>
    admin.allowCrossSigningReplacementWithoutUia(actor(request), (request.params as UserParams).userId),
  );
};
