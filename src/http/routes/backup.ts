/**
 * Server-side key backup (key_backup.yaml): backup versions and the room keys stored in them.
 * Handlers parse the path and query, call the backup rules and send the JSON they build.
 */
import type { FastifyPluginAsync, FastifyReply } from 'fastify';
import { Type } from '@sinclair/typebox';
import { Readable } from 'node:stream';
import type { Accounts } from '../../accounts/service.js';
import type { KeyBackup } from '../../backup/service.js';
import { requesterOf, requireAccessToken } from '../auth.js';

export interface BackupRoutesOptions {
  readonly backup: KeyBackup;
  readonly accounts: Accounts;
  readonly allowAccessTokenInQuery: boolean;
}

const C = '/_matrix/client/v3';
const VersionQuery = { querystring: Type.Object({ version: Type.Optional(Type.String()) }, { additionalProperties: true }) };

interface KeyParams {
  roomId?: string;
  sessionId?: string;
}

const json = (reply: FastifyReply, text: string | AsyncIterable<string>) =>
  reply.type('application/json').send(typeof text === 'string' ? text : Readable.from(text, { objectMode: false }));

export const backupRoutes: FastifyPluginAsync<BackupRoutesOptions> = async (app, { backup, accounts, allowAccessTokenInQuery }) => {
  app.addHook('onRequest', requireAccessToken(accounts, allowAccessTokenInQuery));
  const userOf = (request: Parameters<typeof requesterOf>[0]) => requesterOf(request).userId;

  /** POST /_matrix/client/v3/room_keys/version — spec: key_backup.yaml */
  app.post(`${C}/room_keys/version`, async (request) => backup.createVersion(userOf(request), request.body));

  /** GET /_matrix/client/v3/room_keys/version — spec: key_backup.yaml (the current version) */
  app.get(`${C}/room_keys/version`, async (request, reply) => json(reply, await backup.getVersion(userOf(request), undefined)));

  /** GET /_matrix/client/v3/room_keys/version/{version} — spec: key_backup.yaml */
  app.get(`${C}/room_keys/version/:version`, async (request, reply) =>
    json(reply, await backup.getVersion(userOf(request), (request.params as { version: string }).version)),
  );

  /** PUT /_matrix/client/v3/room_keys/version/{version} — spec: key_backup.yaml */
  app.put(`${C}/room_keys/version/:version`, async (request) => {
    await backup.updateVersion(userOf(request), (request.params as { version: string }).version, request.body);
    return {};
  });

  /** DELETE /_matrix/client/v3/room_keys/version/{version} — spec: key_backup.yaml */
  app.delete(`${C}/room_keys/version/:version`, async (request) => {
    await backup.deleteVersion(userOf(request), (request.params as { version: string }).version);
    return {};
  });

  // PUT, GET and DELETE /room_keys/keys, /room_keys/keys/{roomId}, /room_keys/keys/{roomId}/{sessionId}
  for (const path of ['/room_keys/keys', '/room_keys/keys/:roomId', '/room_keys/keys/:roomId/:sessionId']) {
    const scope = (request: { params: unknown }) => {
      const p = request.params as KeyParams;
      return { roomId: p.roomId, sessionId: p.sessionId };
    };
    const version = (request: { query: unknown }) => (request.query as { version?: string }).version;

    /** PUT /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version= — spec: key_backup.yaml */
    app.put(`${C}${path}`, { schema: VersionQuery }, async (request) => backup.putKeys(userOf(request), version(request), scope(request), request.body));

    /** GET /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version= — spec: key_backup.yaml */
    app.get(`${C}${path}`, { schema: VersionQuery }, async (request, reply) => json(reply, await backup.getKeys(userOf(request), version(request), scope(request))));

    /** DELETE /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version= — spec: key_backup.yaml */
    app.delete(`${C}${path}`, { schema: VersionQuery }, async (request) => backup.deleteKeys(userOf(request), version(request), scope(request)));
  }
};
