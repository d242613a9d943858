/** GET /_matrix/client/versions and the .well-known documents. */
import type { FastifyPluginAsync } from 'fastify';
import { MatrixError } from '../../matrix/errors.js';

export interface DiscoveryRoutesOptions {
  readonly publicBaseurl: string | undefined;
  readonly serveServerWellknown: boolean;
}

/** The spec versions whose key-management and account parts mxkeys follows. */
export const SUPPORTED_VERSIONS = Array.from({ length: 19 }, (_, i) => `v1.${i + 1}`);

export const discoveryRoutes: FastifyPluginAsync<DiscoveryRoutesOptions> = async (app, { publicBaseurl, serveServerWellknown }) => {
  const versions = JSON.stringify({ versions: SUPPORTED_VERSIONS, unstable_features: {} });
  /** GET /_matrix/client/versions — no authentication. */
  app.get('/_matrix/client/versions', async (_request, reply) => reply.type('application/json').send(versions));

  /** GET /.well-known/matrix/client — from public_baseurl. */
  app.get('/.well-known/matrix/client', async () => {
    if (publicBaseurl === undefined) throw new MatrixError('M_NOT_FOUND', 'No client discovery information: public_baseurl is not configured');
    return { 'm.homeserver': { base_url: publicBaseurl.replace(/\/+$/, '') } };
  });

  /** GET /.well-known/matrix/server — delegation to public_baseurl's host on port 443, as Synapse does. */
  app.get('/.well-known/matrix/server', async () => {
    if (!serveServerWellknown || publicBaseurl === undefined) {
      throw new MatrixError('M_NOT_FOUND', 'No server delegation: serve_server_wellknown is off or public_baseurl is not configured');
    }
    const url = new URL(publicBaseurl);
    return { 'm.server': `${url.hostname}:${url.port || '443'}` };
  });
};
