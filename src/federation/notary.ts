/**
 * Our notary service: GET /_matrix/key/v2/query/{serverName} and POST /_matrix/key/v2/query
 * (keys_query.yaml). We answer with our own keys and with the verified keys of other servers
 * (fetched now, or the last verified copy), countersigned by us.
 */
import { MatrixError } from '../matrix/errors.js';
import { isValidServerName } from '../matrix/ids.js';
import { signJson } from '../matrix/signing.js';
import type { OwnServerKeys } from './own-keys.js';
import type { KeyFetcher, KeyRing } from './key-ring.js';
import type { FederationClient } from './client.js';

/** At most this many servers per POST /_matrix/key/v2/query, so one request cannot fan out without bound. */
export const MAX_NOTARY_SERVERS = 100;

export interface NotaryRequest {
  readonly serverName: string;
  /** Key IDs asked for; empty for all of the server's keys. */
  readonly keyIds: readonly string[];
  readonly minimumValidUntilTs: number;
}

export class Notary {
  constructor(
    private readonly ownKeys: OwnServerKeys,
    private readonly keyRing: KeyRing,
  ) {}

  /**
   * Key objects for each server asked for (`keyIds`: the key IDs named, none for all), each signed
   * by us; servers we know nothing of are left out. `address` is the caller's, for fetch fairness.
   */
  async query(requests: readonly NotaryRequest[], address?: string): Promise<Record<string, unknown>[]> {
    if (requests.length > MAX_NOTARY_SERVERS) throw new MatrixError('M_INVALID_PARAM', `At most ${MAX_NOTARY_SERVERS} servers may be queried at once`);
    for (const r of requests) if (!isValidServerName(r.serverName)) throw new MatrixError('M_INVALID_PARAM', `"${r.serverName}" is not a valid server name`);
    const answers = await Promise.all(
      requests.map(async (r) => {
        if (r.serverName === this.ownKeys.serverName) return [this.ownKeys.keyObject()];
        const objects = await this.keyRing.notaryResponses(r.serverName, r.keyIds, r.minimumValidUntilTs, { kind: 'notary', address });
        return objects.map((obj) => signJson(obj, this.ownKeys.serverName, this.ownKeys.signingKey));
      }),
    );
    return answers.flat();
  }
}

/** The key ring's network side, over our federation client. */
export function federationKeyFetcher(client: FederationClient): KeyFetcher {
  const ok = (serverName: string, r: { status: number; body: unknown }, what: string) => {
    if (r.status !== 200) throw new Error(`${serverName} answered ${what} with HTTP ${r.status}`);
    return r.body;
  };
  return {
    fetchOwnKeys: async (serverName) => ok(serverName, await client.request(serverName, '/_matrix/key/v2/server'), 'GET /_matrix/key/v2/server'),
    queryNotary: async (notary, serverName, keyId, minimumValidUntilTs) =>
      ok(
        notary,
        await client.request(notary, '/_matrix/key/v2/query', {
          method: 'POST',
          body: { server_keys: { [serverName]: keyId ? { [keyId]: { minimum_valid_until_ts: minimumValidUntilTs } } : {} } },
        }),
        'POST /_matrix/key/v2/query',
      ),
  };
}
