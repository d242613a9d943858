/** PostgreSQL schema migrations; the same versions as ../sqlite/migrations.ts. */
import type { Migration } from '../migrations.js';

export const migrations: readonly Migration[] = [
  {
    version: 1,
    name: 'server signing keys of other servers',
    sql: `
      CREATE TABLE server_signing_keys (
        server_name TEXT NOT NULL,
        key_id TEXT NOT NULL,
        verify_key TEXT NOT NULL,
        valid_until_ts BIGINT NOT NULL,
        expired_ts BIGINT,
        fetched_ts BIGINT NOT NULL,
        PRIMARY KEY (server_name, key_id)
      );
      CREATE TABLE server_keys_json (
        server_name TEXT NOT NULL PRIMARY KEY,
        from_server TEXT NOT NULL,
        valid_until_ts BIGINT NOT NULL,
        fetched_ts BIGINT NOT NULL,
        key_json TEXT NOT NULL
      );
    `,
  },
];
