/**
 * Send-to-device messaging (to_device.yaml): PUT /sendToDevice. The messages reach devices in
 * their /sync (routes/keys.ts).
 */
import type { FastifyPluginAsync } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Accounts } from '../../accounts/service.js';
import type { ToDevice } from '../../todevice/service.js';
import { requesterOf, requireAccessToken } from '../auth.js';

export interface ToDeviceRoutesOptions {
  readonly toDevice: ToDevice;
  readonly accounts: Accounts;
  readonly allowAccessTokenInQuery: boolean;
}

const C = '/_matrix/client/v3';

export const toDeviceRoutes: FastifyPluginAsync<ToDeviceRoutesOptions> = async (app, { toDevice, accounts, allowAccessTokenInQuery }) => {
  app.addHook('onRequest', requireAccessToken(accounts, allowAccessTokenInQuery));

  /** PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId} — spec: to_device.yaml */
  app.put(
    `${C}/sendToDevice/:eventType/:txnId`,
    { schema: { params: Type.Object({ eventType: Type.String(), txnId: Type.String() }) } },
    async (request) => {
      const { eventType, txnId } = request.params as { eventType: string; txnId: string };
      await toDevice.send(requesterOf(request), eventType, txnId, request.body);
      return {};
    },
  );
};
