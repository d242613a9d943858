import type { FastifyPluginAsync } from 'fastify';
import { VERSION } from '../../version.js';

export const federationInfoRoutes: FastifyPluginAsync = async (app) => {
  const body = JSON.stringify({ server: { name: 'mxkeys', version: VERSION } });
  /** GET /_matrix/federation/v1/version — spec: server-server API (version.yaml). No authentication. */
  app.get('/_matrix/federation/v1/version', async (_request, reply) => reply.type('application/json').send(body));
};
