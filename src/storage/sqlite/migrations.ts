/** SQLite schema migrations; the same versions as ../postgres/migrations.ts. */
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
  {
    version: 2,
    name: 'users, devices, access tokens, user-interactive auth, device list stream',
    sql: `
      CREATE TABLE users (
        user_id TEXT NOT NULL PRIMARY KEY,
        password_hash TEXT,
        admin BOOLEAN NOT NULL DEFAULT 0,
        created_ts BIGINT NOT NULL
      );
      CREATE TABLE devices (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        display_name TEXT,
        created_ts BIGINT NOT NULL,
        last_seen_ts BIGINT,
        last_seen_ip TEXT,
        PRIMARY KEY (user_id, device_id)
      );
      CREATE TABLE access_tokens (
        token_hash TEXT NOT NULL PRIMARY KEY,
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        created_ts BIGINT NOT NULL
      );
      CREATE INDEX access_tokens_by_device ON access_tokens (user_id, device_id);
      CREATE TABLE registration_nonces (
        nonce TEXT NOT NULL PRIMARY KEY,
        created_ts BIGINT NOT NULL
      );
      CREATE TABLE uia_sessions (
        session_id TEXT NOT NULL PRIMARY KEY,
        user_id TEXT,
        operation TEXT NOT NULL,
        completed TEXT NOT NULL,
        created_ts BIGINT NOT NULL
      );
      CREATE TABLE device_lists_stream (
        stream_id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        device_id TEXT,
        ts BIGINT NOT NULL
      );
      CREATE INDEX device_lists_stream_by_user ON device_lists_stream (user_id, stream_id);
    `,
  },
  {
    version: 3,
    name: 'end-to-end keys: device keys, one-time and fallback keys, cross-signing keys and signatures, tracked users',
    sql: `
      CREATE TABLE e2e_device_keys (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        key_json TEXT NOT NULL,
        ts BIGINT NOT NULL,
        PRIMARY KEY (user_id, device_id)
      );
      CREATE TABLE e2e_one_time_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        key_id TEXT NOT NULL,
        key_json TEXT NOT NULL,
        ts BIGINT NOT NULL,
        UNIQUE (user_id, device_id, algorithm, key_id)
      );
      CREATE INDEX e2e_one_time_keys_oldest ON e2e_one_time_keys (user_id, device_id, algorithm, id);
      CREATE TABLE e2e_fallback_keys (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        key_id TEXT NOT NULL,
        key_json TEXT NOT NULL,
        used BOOLEAN NOT NULL DEFAULT 0,
        ts BIGINT NOT NULL,
        PRIMARY KEY (user_id, device_id, algorithm)
      );
      CREATE TABLE e2e_cross_signing_keys (
        user_id TEXT NOT NULL,
        key_type TEXT NOT NULL,
        public_key TEXT NOT NULL,
        key_json TEXT NOT NULL,
        ts BIGINT NOT NULL,
        PRIMARY KEY (user_id, key_type)
      );
      CREATE INDEX e2e_cross_signing_keys_by_public_key ON e2e_cross_signing_keys (user_id, public_key);
      CREATE TABLE e2e_cross_signing_signatures (
        target_user_id TEXT NOT NULL,
        target_key_id TEXT NOT NULL,
        signer_user_id TEXT NOT NULL,
        signer_key_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        ts BIGINT NOT NULL,
        PRIMARY KEY (target_user_id, target_key_id, signer_user_id, signer_key_id)
      );
      CREATE INDEX e2e_cross_signing_signatures_by_signer ON e2e_cross_signing_signatures (signer_user_id, signer_key_id);
      CREATE TABLE e2e_tracked_users (
        user_id TEXT NOT NULL,
        tracked_user_id TEXT NOT NULL,
        PRIMARY KEY (user_id, tracked_user_id)
      );
      CREATE INDEX e2e_tracked_users_by_tracked ON e2e_tracked_users (tracked_user_id);
      ALTER TABLE device_lists_stream ADD COLUMN private_to TEXT;
    `,
  },
  {
    version: 4,
    name: 'federation: device-list subscriptions and outbound updates, destinations, leases, inbound transactions, remote device-list cache',
    sql: `
      CREATE TABLE device_list_subscriptions (
        user_id TEXT NOT NULL,
        server_name TEXT NOT NULL,
        expires_ts BIGINT,
        PRIMARY KEY (user_id, server_name)
      );
      CREATE INDEX device_list_subscriptions_by_server ON device_list_subscriptions (server_name);
      CREATE TABLE device_list_outbound_pokes (
        destination TEXT NOT NULL,
        stream_id BIGINT NOT NULL,
        user_id TEXT NOT NULL,
        device_id TEXT,
        PRIMARY KEY (destination, stream_id)
      );
      CREATE TABLE device_list_outbound_last_sent (
        destination TEXT NOT NULL,
        user_id TEXT NOT NULL,
        stream_id BIGINT NOT NULL,
        PRIMARY KEY (destination, user_id)
      );
      CREATE TABLE federation_destinations (
        destination TEXT NOT NULL PRIMARY KEY,
        failure_count INTEGER NOT NULL,
        retry_after_ts BIGINT NOT NULL,
        first_failure_ts BIGINT
      );
      CREATE TABLE leases (
        name TEXT NOT NULL PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_ts BIGINT NOT NULL
      );
      CREATE TABLE federation_inbound_transactions (
        origin TEXT NOT NULL,
        txn_id TEXT NOT NULL,
        response_json TEXT NOT NULL,
        received_ts BIGINT NOT NULL,
        PRIMARY KEY (origin, txn_id)
      );
      CREATE TABLE remote_device_lists (
        user_id TEXT NOT NULL PRIMARY KEY,
        server_name TEXT NOT NULL,
        stream_id BIGINT NOT NULL,
        stale BOOLEAN NOT NULL,
        pending_stream_id BIGINT,
        synced_ts BIGINT NOT NULL
      );
      CREATE INDEX remote_device_lists_by_server ON remote_device_lists (server_name);
      CREATE TABLE remote_devices (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        display_name TEXT,
        key_json TEXT,
        PRIMARY KEY (user_id, device_id)
      );
      CREATE TABLE remote_cross_signing_keys (
        user_id TEXT NOT NULL,
        key_type TEXT NOT NULL,
        public_key TEXT NOT NULL,
        key_json TEXT NOT NULL,
        PRIMARY KEY (user_id, key_type)
      );
    `,
  },
  {
    version: 5,
    name: 'server-side key backup: backup versions and the room keys stored in them',
    sql: `
      CREATE TABLE e2e_room_keys_versions (
        user_id TEXT NOT NULL,
        version BIGINT NOT NULL,
        algorithm TEXT NOT NULL,
        auth_data TEXT NOT NULL,
        etag BIGINT NOT NULL DEFAULT 0,
        key_count BIGINT NOT NULL DEFAULT 0,
        deleted BOOLEAN NOT NULL DEFAULT 0,
        created_ts BIGINT NOT NULL,
        PRIMARY KEY (user_id, version)
      );
      CREATE TABLE e2e_room_keys (
        user_id TEXT NOT NULL,
        version BIGINT NOT NULL,
        room_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        first_message_index BIGINT NOT NULL,
        forwarded_count BIGINT NOT NULL,
        is_verified BOOLEAN NOT NULL,
        session_data TEXT NOT NULL,
        ts BIGINT NOT NULL,
        PRIMARY KEY (user_id, version, room_id, session_id)
      );
    `,
  },
  {
    version: 6,
    name: 'the server name the database belongs to, deactivated users, cross-signing replacement without UIA',
    sql: `
      CREATE TABLE mxkeys_server (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        server_name TEXT NOT NULL,
        recorded_ts BIGINT NOT NULL
      );
      ALTER TABLE users ADD COLUMN deactivated BOOLEAN NOT NULL DEFAULT 0;
      ALTER TABLE e2e_cross_signing_keys ADD COLUMN updatable_without_uia_before_ms BIGINT;
    `,
  },
  {
    version: 7,
    name: 'other servers\' key responses kept per key ID, for the notary',
    sql: `
      CREATE TABLE server_key_responses (
        server_name TEXT NOT NULL,
        key_id TEXT NOT NULL,
        from_server TEXT NOT NULL,
        valid_until_ts BIGINT NOT NULL,
        fetched_ts BIGINT NOT NULL,
        key_json TEXT NOT NULL,
        PRIMARY KEY (server_name, key_id)
      );
      INSERT INTO server_key_responses (server_name, key_id, from_server, valid_until_ts, fetched_ts, key_json)
        SELECT j.server_name, k.key_id, j.from_server, j.valid_until_ts, j.fetched_ts, j.key_json
        FROM server_keys_json j JOIN server_signing_keys k ON k.server_name = j.server_name AND k.expired_ts IS NULL;
      DROP TABLE server_keys_json;
    `,
  },
  {
    version: 8,
    name: 'to-device messages: local device inboxes, the outbox to other servers, received message IDs and transaction IDs',
    sql: `
      CREATE TABLE device_inbox (
        stream_id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        message_json TEXT NOT NULL,
        received_ts BIGINT NOT NULL
      );
      CREATE INDEX device_inbox_by_device ON device_inbox (user_id, device_id, stream_id);
      CREATE TABLE device_federation_outbox (
        stream_id INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        edu_json TEXT NOT NULL,
        queued_ts BIGINT NOT NULL
      );
      CREATE INDEX device_federation_outbox_by_destination ON device_federation_outbox (destination, stream_id);
      CREATE TABLE device_federation_inbox (
        origin TEXT NOT NULL,
        message_id TEXT NOT NULL,
        received_ts BIGINT NOT NULL,
        PRIMARY KEY (origin, message_id)
      );
      CREATE INDEX device_federation_inbox_by_ts ON device_federation_inbox (received_ts);
      CREATE TABLE to_device_txns (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        txn_id TEXT NOT NULL,
        received_ts BIGINT NOT NULL,
        PRIMARY KEY (user_id, device_id, event_type, txn_id)
      );
      CREATE INDEX to_device_txns_by_ts ON to_device_txns (received_ts);
    `,
  },
  {
    version: 9,
    name: 'key backup: the bytes of session data each backup version holds, for the per-user budget',
    sql: `
      ALTER TABLE e2e_room_keys_versions ADD COLUMN key_bytes BIGINT NOT NULL DEFAULT 0;
      UPDATE e2e_room_keys_versions SET key_bytes = (
        SELECT COALESCE(SUM(length(CAST(k.session_data AS BLOB))), 0) FROM e2e_room_keys k
        WHERE k.user_id = e2e_room_keys_versions.user_id AND k.version = e2e_room_keys_versions.version
      );
    `,
  },
  {
    version: 10,
    name: 'one-time keys left per device, kept by triggers (the metric of devices running out)',
    // Devices with device keys or one-time keys each have a row; the triggers keep n equal to the
    // device's unclaimed one-time keys, so the metric reads one narrow row per device, not every key.
    sql: `
      CREATE TABLE e2e_one_time_key_counts (
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (user_id, device_id)
      ) WITHOUT ROWID;
      INSERT INTO e2e_one_time_key_counts (user_id, device_id, n)
        SELECT user_id, device_id, COUNT(*) FROM e2e_one_time_keys GROUP BY user_id, device_id;
      INSERT OR IGNORE INTO e2e_one_time_key_counts (user_id, device_id, n)
        SELECT user_id, device_id, 0 FROM e2e_device_keys;
      CREATE TRIGGER e2e_one_time_keys_added AFTER INSERT ON e2e_one_time_keys BEGIN
        INSERT OR IGNORE INTO e2e_one_time_key_counts (user_id, device_id, n) VALUES (new.user_id, new.device_id, 0);
        UPDATE e2e_one_time_key_counts SET n = n + 1 WHERE user_id = new.user_id AND device_id = new.device_id;
      END;
      CREATE TRIGGER e2e_one_time_keys_removed AFTER DELETE ON e2e_one_time_keys BEGIN
        UPDATE e2e_one_time_key_counts SET n = n - 1 WHERE user_id = old.user_id AND device_id = old.device_id;
      END;
      CREATE TRIGGER e2e_device_keys_counted AFTER INSERT ON e2e_device_keys BEGIN
        INSERT OR IGNORE INTO e2e_one_time_key_counts (user_id, device_id, n) VALUES (new.user_id, new.device_id, 0);
      END;
    `,
  },
  {
    version: 11,
    name: 'change notifications for the read caches of other processes (LISTEN/NOTIFY)',
    // PostgreSQL only. Nothing to do on SQLite: other processes' commits are seen in the database
    // file itself (driver.ts). The version exists so both backends report the same schema version.
    sql: ``,
  },
  {
    version: 12,
    name: 'to-device: the bytes of each waiting message (per-device byte cap, /sync answers bounded in bytes) and the messages each queued EDU carries',
    // The bytes sit in the per-device index, so the caps and /sync's budget are read from the index alone.
    sql: `
      ALTER TABLE device_inbox ADD COLUMN message_bytes INTEGER NOT NULL DEFAULT 0;
      UPDATE device_inbox SET message_bytes = length(CAST(message_json AS BLOB));
      DROP INDEX device_inbox_by_device;
      CREATE INDEX device_inbox_by_device ON device_inbox (user_id, device_id, stream_id, message_bytes);
      ALTER TABLE device_federation_outbox ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0;
      UPDATE device_federation_outbox SET message_count = (
        SELECT COUNT(*) FROM json_each(device_federation_outbox.edu_json, '$.messages') u, json_each(u.value) d
      );
      CREATE INDEX device_federation_outbox_by_ts ON device_federation_outbox (queued_ts);
    `,
  },
  {
    version: 13,
    name: 'one-time key counts: claims take their keys off the count themselves',
    // PostgreSQL only. On SQLite the row trigger of migration 10 stays: with one writer at a time
    // it costs a row update, nothing more. The version exists so both backends report the same one.
    sql: ``,
  },
];
