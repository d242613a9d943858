import type { FastifyPluginAsync } from 'fastify';
import type { OwnServerKeys } from '../../federation/own-keys.js';

export interface ServerKeyRoutesOptions {
  readonly ownKeys: OwnServerKeys;
}

export const serverKeyRoutes: FastifyPluginAsync<ServerKeyRoutesOptions> = async (app, { ownKeys }) => {
  /**
   * GET /_matrix/key/v2/server — spec: server-server API "Publishing Keys" (keys_server.yaml).
   * No authentication. The body is canonical JSON, because some servers verify the raw bytes.
   */
  const handler = async (_request: unknown, reply: import('fastify').FastifyReply) =>
    reply.type('application/json').send(ownKeys.keyResponseBody());
  app.get('/_matrix/key/v2/server', handler);
  /** GET /_matrix/key/v2/server/{keyId} — deprecated form; the key ID is ignored, as in Synapse. */
  app.get('/_matrix/key/v2/server/:keyId', handler);
};
