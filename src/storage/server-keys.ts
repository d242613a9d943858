/** ServerKeysStore on the driver-neutral SQL surface (same SQL on both backends). */
import type { SqlDatabase } from './sql.js';
import type { ServerKeysResponse, ServerKeysStore, StoredKeysJson, StoredServerKey } from './store.js';
import { placeholders } from './sql.js';

interface KeyRow {
  server_name: string;
  key_id: string;
  verify_key: string;
  valid_until_ts: number;
  expired_ts: number | null;
}

interface JsonRow {
  server_name: string;
  key_id: string;
  from_server: string;
  valid_until_ts: number;
  fetched_ts: number;
  key_json: string;
}

export class SqlServerKeysStore implements ServerKeysStore {
  constructor(private readonly db: SqlDatabase) {}

  async storeServerKeys(r: ServerKeysResponse): Promise<void> {
    await this.db.transaction(async (tx) => {
      // Keys the server no longer lists in a fresh response stop counting as current.
      await tx.run(
        `UPDATE server_signing_keys SET expired_ts = ? WHERE server_name = ? AND expired_ts IS NULL
           AND key_id NOT IN (${placeholders(Math.max(1, r.keys.length))})`,
        [r.fetchedTs, r.serverName, ...(r.keys.length ? r.keys.map((k) => k.keyId) : [''])],
      );
      for (const k of r.keys) {
        await tx.run(
          `INSERT INTO server_signing_keys (server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (server_name, key_id) DO UPDATE SET
             verify_key = excluded.verify_key, valid_until_ts = excluded.valid_until_ts,
             expired_ts = excluded.expired_ts, fetched_ts = excluded.fetched_ts`,
          [r.serverName, k.keyId, k.verifyKey, r.validUntilTs, k.expiredTs, r.fetchedTs],
        );
        // The response is now the newest one listing this key in verify_keys.
        if (k.expiredTs !== null) continue;
        await tx.run(
          `INSERT INTO server_key_responses (server_name, key_id, from_server, valid_until_ts, fetched_ts, key_json)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (server_name, key_id) DO UPDATE SET
             from_server = excluded.from_server, valid_until_ts = excluded.valid_until_ts,
             fetched_ts = excluded.fetched_ts, key_json = excluded.key_json`,
          [r.serverName, k.keyId, r.fromServer, r.validUntilTs, r.fetchedTs, r.keyJson],
        );
      }
    });
  }

  async getServerKeys(serverName: string): Promise<StoredServerKey[]> {
    const rows = await this.db.all<KeyRow>(
      'SELECT server_name, key_id, verify_key, valid_until_ts, expired_ts FROM server_signing_keys WHERE server_name = ?',
      [serverName],
    );
    return rows.map((r) => ({
      serverName: r.server_name,
      keyId: r.key_id,
      verifyKey: r.verify_key,
      validUntilTs: r.valid_until_ts,
      expiredTs: r.expired_ts,
    }));
  }

  async getServerKeyResponses(serverName: string): Promise<StoredKeysJson[]> {
    const rows = await this.db.all<JsonRow>(
      'SELECT server_name, key_id, from_server, valid_until_ts, fetched_ts, key_json FROM server_key_responses WHERE server_name = ?',
      [serverName],
    );
    return rows.map((r) => ({
      serverName: r.server_name,
      keyId: r.key_id,
      fromServer: r.from_server,
      keyJson: r.key_json,
      validUntilTs: r.valid_until_ts,
      fetchedTs: r.fetched_ts,
    }));
  }
}
