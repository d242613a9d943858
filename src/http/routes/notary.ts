/** The notary endpoints (keys_query.yaml): no authentication. */
import type { FastifyPluginAsync, FastifyRequest } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { Notary } from '../../federation/notary.js';
import { MatrixError } from '../../matrix/errors.js';

export interface NotaryRoutesOptions {
  readonly notary: Notary;
}

const Criteria = Type.Object({ minimum_valid_until_ts: Type.Optional(Type.Integer()) }, { additionalProperties: true });
const QueryBody = Type.Object({ server_keys: Type.Record(Type.String(), Type.Record(Type.String(), Criteria)) }, { additionalProperties: true });

export const notaryRoutes: FastifyPluginAsync<NotaryRoutesOptions> = async (app, { notary }) => {
  const queryOne = {
    schema: { querystring: Type.Object({ minimum_valid_until_ts: Type.Optional(Type.String({ pattern: '^[0-9]{1,16}$' })) }, { additionalProperties: true }) },
  };
  const answerOne = async (request: FastifyRequest) => {
    const q = request.query as { minimum_valid_until_ts?: string };
    const min = q.minimum_valid_until_ts === undefined ? Date.now() : Number(q.minimum_valid_until_ts);
    const params = request.params as { serverName: string; keyId?: string };
    return { server_keys: await notary.query([{ serverName: params.serverName, keyIds: params.keyId === undefined ? [] : [params.keyId], minimumValidUntilTs: min }], request.ip) };
  };
  /** GET /_matrix/key/v2/query/{serverName} — spec: keys_query.yaml */
  app.get('/_matrix/key/v2/query/:serverName', queryOne, answerOne);
  /**
   * GET /_matrix/key/v2/query/{serverName}/{keyId} — the older form, still sent by some servers:
   * answered like the one above (the spec lets a notary return every key whatever IDs are asked for).
   */
  app.get('/_matrix/key/v2/query/:serverName/:keyId', queryOne, answerOne);

  /** POST /_matrix/key/v2/query — spec: keys_query.yaml */
  app.post('/_matrix/key/v2/query', { schema: { body: QueryBody } }, async (request) => {
    const body = request.body as { server_keys: Record<string, Record<string, { minimum_valid_until_ts?: number }>> };
    const now = Date.now();
    const requests = Object.entries(body.server_keys).map(([serverName, keys]) => {
      let min = now;
      for (const k of Object.values(keys)) min = Math.max(min, k.minimum_valid_until_ts ?? now);
      return { serverName, keyIds: Object.keys(keys), minimumValidUntilTs: min };
    });
    if (requests.some((r) => !Number.isSafeInteger(r.minimumValidUntilTs))) throw new MatrixError('M_INVALID_PARAM', 'minimum_valid_until_ts must be a millisecond timestamp');
    return { server_keys: await notary.query(requests, request.ip) };
  });
};
