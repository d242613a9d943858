/**
 * KeysStore: the `e2e_*` tables. The SQL is shared by both backends except the claim, where each
 * database gets the statement that makes "at most once" hold under concurrency on it:
 *  - SQLite: one DELETE … RETURNING picking each device's oldest key in a subquery; a statement
 *    holds the database's write lock, so no other connection or process can take the same row.
 *  - PostgreSQL: a DELETE … RETURNING of a pick with FOR UPDATE SKIP LOCKED, so concurrent
 *    claimers each lock (and delete) a different row instead of queueing on one, with the fallback
 *    keys and the per-device counts in the same statement (PG_CLAIM_ONE, PG_CLAIM_MANY).
 */
import { chunks, placeholders, valuesList, type Queryable, type SqlDatabase, type SqlValue } from './sql.js';
import { readCacheFor, type ReadCache } from './read-cache.js';
import { keysOfUserBytes } from './store.js';
import type {
  ClaimedKey,
  ClaimRequest,
  CrossSigningKeyType,
  KeysStore,
  KeysTransaction,
  StoredCrossSigningKey,
  KeysOfUser,
  KeysOfUsers,
  StoredDeviceKeys,
  StoredFallbackKey,
  StoredOneTimeKey,
  StoredSignature,
} from './store.js';
import type { DeviceListWriter } from './device-lists.js';

interface CrossSigningRow {
  user_id: string;
  key_type: CrossSigningKeyType;
  public_key: string;
  key_json: string;
}

interface ClaimRow {
  user_id: string;
  device_id: string;
  algorithm: string;
  key_id: string;
  key_json: string;
}

const toCrossSigning = (r: CrossSigningRow): StoredCrossSigningKey => ({ userId: r.user_id, keyType: r.key_type, publicKey: r.public_key, json: r.key_json });
const toClaimed = (r: ClaimRow & { fallback: boolean }): ClaimedKey => ({ userId: r.user_id, deviceId: r.device_id, algorithm: r.algorithm, keyId: r.key_id, json: r.key_json, fallback: r.fallback });
const deviceKey = (userId: string, deviceId: string, algorithm: string): string => `${userId}\0${deviceId}\0${algorithm}`;

/**
 * Shares out what one statement claimed for several claims: each device's one-time keys, oldest
 * first, to the claims naming it in order; a claim left without one gets the device's fallback
 * key, if it had one (a fallback key may be handed out any number of times).
 */
function handOut(claims: readonly (readonly ClaimRequest[])[], keys: readonly ClaimedKey[]): ClaimedKey[][] {
  const oneTime = new Map<string, ClaimedKey[]>();
  const fallback = new Map<string, ClaimedKey>();
  for (const k of keys) {
    const key = deviceKey(k.userId, k.deviceId, k.algorithm);
    if (k.fallback) fallback.set(key, k);
    else {
      const list = oneTime.get(key);
      if (list) list.push(k);
      else oneTime.set(key, [k]);
    }
  }
  return claims.map((requests) => {
    const out: ClaimedKey[] = [];
    for (const r of requests) {
      const key = deviceKey(r.userId, r.deviceId, r.algorithm);
      const k = oneTime.get(key)?.shift() ?? fallback.get(key);
      if (k) out.push(k);
    }
    return out;
  });
}

/**
 * Claims on PostgreSQL. One-time keys are counted per device in e2e_one_time_key_counts (for the
 * metric of devices running out); a claim takes one off its device's count in the same statement
 * (migration 13 replaced the statement trigger that did it), and that count row, locked until the
 * commit, is the only lock a claim of one device waits for.
 *
 * A claim of one device, the usual case, is one statement: the device's oldest one-time key of the
 * algorithm is locked with SKIP LOCKED, so concurrent claimers each take a different row instead
 * of queueing on one, and deleted: a key is handed out by the one statement that deleted it, at
 * most once. If it had none, its fallback key is marked used and handed out instead. Either the
 * count row or the fallback row is locked, never both.
 *
 * The search for the oldest key starts above a hint, the highest id this process last took from
 * the device (claimHints): a deleted key's index entry stays until VACUUM, so a device claimed
 * thousands of times a second between two autovacuum runs piles up dead entries at the start of
 * its range, and a search from the start walks them all (measured: claims fell from 6,900 to
 * 3,500 a second within two minutes, with PostgreSQL's CPU rising from 58 to 85 %). Keys below
 * the hint are still found: when none is above it (`below` runs only then), so a key that
 * committed late (ids are handed out at insert, not at commit) or whose claim rolled back is
 * handed out later than "oldest first", never lost to the fallback key.
 *
 * The searches order by all the columns of e2e_one_time_keys_oldest, not by id alone (the same
 * order, as the first three are fixed): ordered by id, the planner sometimes walked the primary
 * key from the hint and filtered by device instead, over every user's keys; with the whole plan
 * then costed high enough for JIT compilation, claims fell to ~250 a second with PostgreSQL using
 * both cores (measured in a bench run with 1,000 users' keys stored).
 */
const PG_CLAIM_ONE = `
  WITH above AS (
    SELECT id FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? AND id > ?
    ORDER BY user_id, device_id, algorithm, id LIMIT 1 FOR UPDATE SKIP LOCKED),
  below AS (
    SELECT id FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? AND id <= ?
      AND NOT EXISTS (SELECT 1 FROM above)
    ORDER BY user_id, device_id, algorithm, id LIMIT 1 FOR UPDATE SKIP LOCKED),
  taken AS (
    DELETE FROM e2e_one_time_keys WHERE id = (SELECT id FROM above UNION ALL SELECT id FROM below LIMIT 1)
    RETURNING user_id, device_id, algorithm, key_id, key_json, id),
  counted AS (
    UPDATE e2e_one_time_key_counts c SET n = c.n - 1 FROM taken
    WHERE c.user_id = taken.user_id AND c.device_id = taken.device_id),
  used AS (
    UPDATE e2e_fallback_keys SET used = true
    WHERE user_id = ? AND device_id = ? AND algorithm = ? AND NOT EXISTS (SELECT 1 FROM taken)
    RETURNING user_id, device_id, algorithm, key_id, key_json)
  SELECT user_id, device_id, algorithm, key_id, key_json, false AS fallback, id FROM taken
  UNION ALL
  SELECT user_id, device_id, algorithm, key_id, key_json, true, 0 FROM used`;

/**
 * Claims of several devices, or several claims at once (PG_CLAIM_ONE covers one device of one
 * claim): one statement for all of them. The requests travel as one JSON parameter, one entry
 * per device and algorithm with how many keys are wanted, so the statement text never changes
 * and is prepared once per connection.
 *  - First the devices' count rows are locked in (user, device) order (`locked`, pulled in full
 *    by the one-time filter of `above` before any key is picked); fallback rows are locked after
 *    them, in the same order. Claims naming the same devices in different orders therefore wait
 *    for each other, never deadlock (PG_CLAIM_ONE takes at most one of those locks).
 *  - Each device's oldest `n` keys are locked with SKIP LOCKED and deleted, as in PG_CLAIM_ONE:
 *    above the hint first (`above`), the rest from below it (`below`, LIMIT 0 when none is missing).
 *  - Devices that had fewer than `n` get their fallback key, marked used.
 * Every table is reached through its index (by id, by user_id = ANY, or from a LATERAL per
 * device): with the JSON list the planner cannot know how few rows it names, and a hash join
 * would read whole tables (16 ms for 32,000 keys, measured). Not by ctid: a row updated by a
 * claim committed after this statement began has a new version this statement cannot see.
 */
const PG_CLAIM_MANY = `
  WITH req AS (
    SELECT r->>0 AS user_id, r->>1 AS device_id, r->>2 AS algorithm, (r->>3)::int AS n, (r->>4)::bigint AS hint FROM json_array_elements(?::json) AS r),
  locked AS MATERIALIZED (
    SELECT 1 FROM (SELECT DISTINCT user_id, device_id FROM req ORDER BY user_id, device_id) d
    CROSS JOIN LATERAL (
      SELECT 1 FROM e2e_one_time_key_counts c
      WHERE c.user_id = d.user_id AND c.device_id = d.device_id FOR UPDATE) l),
  above AS (
    SELECT req.user_id, req.device_id, req.algorithm, k.id FROM req CROSS JOIN LATERAL (
      SELECT o.id FROM e2e_one_time_keys o
      WHERE o.user_id = req.user_id AND o.device_id = req.device_id AND o.algorithm = req.algorithm AND o.id > req.hint
      ORDER BY o.user_id, o.device_id, o.algorithm, o.id LIMIT req.n FOR UPDATE SKIP LOCKED) k
    WHERE (SELECT COUNT(*) FROM locked) >= 0),
  below AS (
    SELECT k.id FROM req CROSS JOIN LATERAL (
      SELECT o.id FROM e2e_one_time_keys o
      WHERE o.user_id = req.user_id AND o.device_id = req.device_id AND o.algorithm = req.algorithm AND o.id <= req.hint
      ORDER BY o.user_id, o.device_id, o.algorithm, o.id
      LIMIT req.n - (SELECT COUNT(*) FROM above a WHERE a.user_id = req.user_id AND a.device_id = req.device_id AND a.algorithm = req.algorithm)
      FOR UPDATE SKIP LOCKED) k),
  picked AS (SELECT id FROM above UNION ALL SELECT id FROM below),
  taken AS (
    DELETE FROM e2e_one_time_keys WHERE id = ANY (ARRAY(SELECT id FROM picked))
    RETURNING user_id, device_id, algorithm, key_id, key_json, id),
  counted AS (
    UPDATE e2e_one_time_key_counts c
    SET n = c.n - (SELECT COUNT(*) FROM taken WHERE taken.user_id = c.user_id AND taken.device_id = c.device_id)
    WHERE c.user_id = ANY (ARRAY(SELECT user_id FROM taken))
      AND EXISTS (SELECT 1 FROM taken WHERE taken.user_id = c.user_id AND taken.device_id = c.device_id)),
  fallback AS (
    SELECT r.user_id, r.device_id, r.algorithm FROM (SELECT * FROM req ORDER BY user_id, device_id, algorithm) r
    CROSS JOIN LATERAL (
      SELECT 1 FROM e2e_fallback_keys f
      WHERE f.user_id = r.user_id AND f.device_id = r.device_id AND f.algorithm = r.algorithm
        AND r.n > (SELECT COUNT(*) FROM taken WHERE taken.user_id = r.user_id AND taken.device_id = r.device_id AND taken.algorithm = r.algorithm)
      FOR UPDATE) f),
  used AS (
    UPDATE e2e_fallback_keys f SET used = true
    WHERE f.user_id = ANY (ARRAY(SELECT user_id FROM fallback))
      AND EXISTS (SELECT 1 FROM fallback WHERE fallback.user_id = f.user_id AND fallback.device_id = f.device_id AND fallback.algorithm = f.algorithm)
    RETURNING user_id, device_id, algorithm, key_id, key_json)
  SELECT user_id, device_id, algorithm, key_id, key_json, false AS fallback, id FROM taken
  UNION ALL
  SELECT user_id, device_id, algorithm, key_id, key_json, true, 0 FROM used
  ORDER BY fallback, id`;

/**
 * Every key of a list of users (readKeysOf). On SQLite the list joins each table through its
 * index. On PostgreSQL each table is read by `user_id = ANY (list)`, an index scan for the listed
 * users: with the list as a JSON parameter the planner cannot tell how few users it names, and
 * joins on it became hash joins over whole tables (20 ms for one user among 20,000, measured).
 * (The cast makes ANY take the array, not the subquery's rows.)
 */
const SQLITE_KEYS_OF_USERS = `
  WITH u (user_id) AS (SELECT value AS user_id FROM json_each(?))
  SELECT 0 AS kind, k.user_id, k.device_id AS a, d.display_name AS b, k.key_json AS c, NULL AS d
    FROM u JOIN e2e_device_keys k ON k.user_id = u.user_id JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
  UNION ALL
  SELECT 1, c.user_id, c.key_type, c.public_key, c.key_json, NULL FROM u JOIN e2e_cross_signing_keys c ON c.user_id = u.user_id
  UNION ALL
  SELECT 2, s.target_user_id, s.target_key_id, s.signer_user_id, s.signature, s.signer_key_id
    FROM u JOIN e2e_cross_signing_signatures s ON s.target_user_id = u.user_id
  UNION ALL
  SELECT 3, a.user_id, NULL, NULL, NULL, NULL FROM u JOIN users a ON a.user_id = u.user_id`;
const PG_KEYS_OF_USERS = `
  WITH u AS MATERIALIZED (SELECT ARRAY(SELECT json_array_elements_text(?::json)) AS ids)
  SELECT 0 AS kind, k.user_id, k.device_id AS a, d.display_name AS b, k.key_json AS c, NULL AS d
    FROM e2e_device_keys k JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
    WHERE k.user_id = ANY ((SELECT ids FROM u)::text[]) AND d.user_id = ANY ((SELECT ids FROM u)::text[])
  UNION ALL
  SELECT 1, c.user_id, c.key_type, c.public_key, c.key_json, NULL FROM e2e_cross_signing_keys c WHERE c.user_id = ANY ((SELECT ids FROM u)::text[])
  UNION ALL
  SELECT 2, s.target_user_id, s.target_key_id, s.signer_user_id, s.signature, s.signer_key_id
    FROM e2e_cross_signing_signatures s WHERE s.target_user_id = ANY ((SELECT ids FROM u)::text[])
  UNION ALL
  SELECT 3, a.user_id, NULL, NULL, NULL, NULL FROM users a WHERE a.user_id = ANY ((SELECT ids FROM u)::text[])`;

async function oneTimeKeyCounts(q: Queryable, userId: string, deviceId: string): Promise<Record<string, number>> {
  const rows = await q.all<{ algorithm: string; n: number }>(
    'SELECT algorithm, COUNT(*) AS n FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? GROUP BY algorithm',
    [userId, deviceId],
  );
  return Object.fromEntries(rows.map((r) => [r.algorithm, r.n]));
}

class SqlKeysTransaction implements KeysTransaction {
  constructor(
    private readonly tx: Queryable,
    private readonly now: number,
    private readonly deviceLists: DeviceListWriter,
  ) {}

  async lockDevice(userId: string, deviceId: string): Promise<boolean> {
    const forUpdate = this.tx.dialect === 'postgres' ? ' FOR UPDATE' : '';
    return (await this.tx.get(`SELECT 1 AS x FROM devices WHERE user_id = ? AND device_id = ?${forUpdate}`, [userId, deviceId])) !== undefined;
  }

  async lockUser(userId: string): Promise<void> {
    if (this.tx.dialect === 'postgres') await this.tx.get('SELECT 1 AS x FROM users WHERE user_id = ? FOR UPDATE', [userId]);
  }

  async getDeviceKeys(userId: string, deviceId: string): Promise<string | undefined> {
    return (await this.tx.get<{ key_json: string }>('SELECT key_json FROM e2e_device_keys WHERE user_id = ? AND device_id = ?', [userId, deviceId]))?.key_json;
  }

  async putDeviceKeys(userId: string, deviceId: string, json: string): Promise<void> {
    await this.tx.run(
      `INSERT INTO e2e_device_keys (user_id, device_id, key_json, ts) VALUES (?, ?, ?, ?)
       ON CONFLICT (user_id, device_id) DO UPDATE SET key_json = excluded.key_json, ts = excluded.ts`,
      [userId, deviceId, json, this.now],
    );
  }

  async findOneTimeKeys(userId: string, deviceId: string, ids: readonly { algorithm: string; keyId: string }[]): Promise<StoredOneTimeKey[]> {
    const found: StoredOneTimeKey[] = [];
    for (const part of chunks(ids)) {
      const rows = await this.tx.all<{ algorithm: string; key_id: string; key_json: string }>(
        `SELECT algorithm, key_id, key_json FROM e2e_one_time_keys
         WHERE user_id = ? AND device_id = ? AND (algorithm, key_id) IN (VALUES ${valuesList(part.length, 2)})`,
        [userId, deviceId, ...part.flatMap((k) => [k.algorithm, k.keyId])],
      );
      for (const r of rows) found.push({ algorithm: r.algorithm, keyId: r.key_id, json: r.key_json });
    }
    return found;
  }

  async countOneTimeKeys(userId: string, deviceId: string): Promise<number> {
    return (await this.tx.get<{ n: number }>('SELECT COUNT(*) AS n FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?', [userId, deviceId]))?.n ?? 0;
  }

  async addOneTimeKeys(userId: string, deviceId: string, keys: readonly StoredOneTimeKey[]): Promise<void> {
    for (const part of chunks(keys)) {
      const params: SqlValue[] = [];
      for (const k of part) params.push(userId, deviceId, k.algorithm, k.keyId, k.json, this.now);
      await this.tx.run(`INSERT INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id, key_json, ts) VALUES ${valuesList(part.length, 6)}`, params);
    }
  }

  async getFallbackKeys(userId: string, deviceId: string): Promise<StoredFallbackKey[]> {
    const rows = await this.tx.all<{ algorithm: string; key_id: string; key_json: string; used: number | boolean }>(
      'SELECT algorithm, key_id, key_json, used FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ?',
      [userId, deviceId],
    );
    return rows.map((r) => ({ algorithm: r.algorithm, keyId: r.key_id, json: r.key_json, used: Boolean(r.used) }));
  }

  async putFallbackKey(userId: string, deviceId: string, key: StoredFallbackKey): Promise<void> {
    await this.tx.run(
      `INSERT INTO e2e_fallback_keys (user_id, device_id, algorithm, key_id, key_json, used, ts) VALUES (?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET
         key_id = excluded.key_id, key_json = excluded.key_json, used = excluded.used, ts = excluded.ts`,
      [userId, deviceId, key.algorithm, key.keyId, key.json, key.used, this.now],
    );
  }

  oneTimeKeyCounts(userId: string, deviceId: string): Promise<Record<string, number>> {
    return oneTimeKeyCounts(this.tx, userId, deviceId);
  }

  async getCrossSigningKeys(userId: string): Promise<StoredCrossSigningKey[]> {
    const rows = await this.tx.all<CrossSigningRow>('SELECT user_id, key_type, public_key, key_json FROM e2e_cross_signing_keys WHERE user_id = ?', [userId]);
    return rows.map(toCrossSigning);
  }

  async getRemoteCrossSigningKeys(userId: string): Promise<StoredCrossSigningKey[]> {
    const rows = await this.tx.all<CrossSigningRow>('SELECT user_id, key_type, public_key, key_json FROM remote_cross_signing_keys WHERE user_id = ?', [userId]);
    return rows.map(toCrossSigning);
  }

  async putCrossSigningKey(key: StoredCrossSigningKey): Promise<void> {
    await this.tx.run(
      `INSERT INTO e2e_cross_signing_keys (user_id, key_type, public_key, key_json, ts) VALUES (?, ?, ?, ?, ?)
       ON CONFLICT (user_id, key_type) DO UPDATE SET public_key = excluded.public_key, key_json = excluded.key_json, ts = excluded.ts,
         updatable_without_uia_before_ms = NULL`,
      [key.userId, key.keyType, key.publicKey, key.json, this.now],
    );
  }

  async takeReplacementWithoutUia(userId: string, now: number): Promise<boolean> {
    // One statement: on PostgreSQL a concurrent caller waits for the row and then finds it used.
    const n = await this.tx.run(
      "UPDATE e2e_cross_signing_keys SET updatable_without_uia_before_ms = NULL WHERE user_id = ? AND key_type = 'master' AND updatable_without_uia_before_ms > ?",
      [userId, now],
    );
    return n > 0;
  }

  async deleteSignaturesOfKey(userId: string, publicKey: string): Promise<void> {
    await this.tx.run(
      `DELETE FROM e2e_cross_signing_signatures
       WHERE (signer_user_id = ? AND signer_key_id = ?) OR (target_user_id = ? AND target_key_id = ?)`,
      [userId, `ed25519:${publicKey}`, userId, publicKey],
    );
  }

  async deviceIds(userId: string): Promise<string[]> {
    return (await this.tx.all<{ device_id: string }>('SELECT device_id FROM devices WHERE user_id = ?', [userId])).map((r) => r.device_id);
  }

  async putSignatures(signatures: readonly StoredSignature[]): Promise<void> {
    for (const s of signatures) {
      await this.tx.run(
        `INSERT INTO e2e_cross_signing_signatures (target_user_id, target_key_id, signer_user_id, signer_key_id, signature, ts)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (target_user_id, target_key_id, signer_user_id, signer_key_id) DO UPDATE SET signature = excluded.signature, ts = excluded.ts`,
        [s.targetUserId, s.targetKeyId, s.signerUserId, s.signerKeyId, s.signature, this.now],
      );
    }
  }

  async recordDeviceListChange(userId: string, deviceId: string | null, privateTo?: string): Promise<void> {
    await this.deviceLists.record(this.tx, userId, [deviceId], this.now, { privateTo: privateTo ?? null });
  }
}

/** The most the cache of users' keys (keysByUser) holds (see ANSWER_CACHE_BUDGET_BYTES, keys/service.ts). */
const KEYS_OF_USER_BUDGET_BYTES = 4 * 1024 * 1024;

/** Devices whose claim hint (SqlKeysStore.claimHints) is kept at most, ~100 bytes each. */
const MAX_CLAIM_HINTS = 100_000;

export class SqlKeysStore implements KeysStore {
  /** Pairs (viewer, tracked) known to be stored, so repeated queries do not write again. */
  private readonly trackedCache = new Set<string>();
  /** Each user's device keys, cross-signing keys and signatures (keysByUser), while unchanged. */
  private readonly keysOfUser: ReadCache<KeysOfUser> | undefined;
  /** Claims waiting for the next batch (claimKeys). */
  private readonly claimQueue: { requests: readonly ClaimRequest[]; resolve: (keys: ClaimedKey[]) => void; reject: (e: unknown) => void }[] = [];
  /**
   * PostgreSQL: per device and algorithm, the highest one-time key id this process took, where the
   * next claim's search starts (PG_CLAIM_ONE). Only a hint: forgotten when it grows too large.
   */
  private readonly claimHints = new Map<string, number>();

  constructor(
    private readonly db: SqlDatabase,
    private readonly deviceLists: DeviceListWriter,
  ) {
    this.keysOfUser = readCacheFor(db, { maxBytes: KEYS_OF_USER_BUDGET_BYTES, sizeOf: keysOfUserBytes });
  }

  transaction<T>(fn: (tx: KeysTransaction) => Promise<T>): Promise<T> {
    return this.db.transaction((tx) => fn(new SqlKeysTransaction(tx, Date.now(), this.deviceLists)));
  }

  /** Rows of `sql` (whose `IN (…)` list is filled in) for every user, in chunks of CHUNK users. */
  private async forUsers<R extends object>(userIds: readonly string[], sql: (inList: string) => string, before: readonly SqlValue[] = []): Promise<R[]> {
    const out: R[] = [];
    for (const part of chunks(userIds)) out.push(...(await this.db.all<R>(sql(placeholders(part.length)), [...before, ...part])));
    return out;
  }

  async getKeysOf(userIds: readonly string[]): Promise<KeysOfUsers> {
    const byUser = await this.keysByUser(userIds);
    if (byUser.size === 1) return byUser.values().next().value!;
    const out: KeysOfUsers = { devices: [], crossSigning: [], signatures: [] };
    for (const k of byUser.values()) {
      out.devices.push(...k.devices);
      out.crossSigning.push(...k.crossSigning);
      out.signatures.push(...k.signatures);
    }
    return out;
  }

  keysByUser(userIds: readonly string[]): Promise<Map<string, KeysOfUser>> {
    return this.keysOfUser ? this.keysOfUser.getMany(userIds, (missing) => this.readKeysOf(missing)) : this.readKeysOf(userIds);
  }

  /**
   * One statement for any number of users: their list travels as one JSON parameter, so the
   * statement text never changes (prepared once per connection on PostgreSQL, once per process
   * on SQLite). `kind` tells the four kinds of rows apart; a–d carry their columns.
   */
  private async readKeysOf(userIds: readonly string[]): Promise<Map<string, KeysOfUser>> {
    const out = new Map<string, { account: boolean; devices: StoredDeviceKeys[]; crossSigning: StoredCrossSigningKey[]; signatures: StoredSignature[] }>();
    for (const u of userIds) out.set(u, { account: false, devices: [], crossSigning: [], signatures: [] });
    const rows = await this.db.all<{ kind: number; user_id: string; a: string | null; b: string | null; c: string | null; d: string | null }>(
      this.db.dialect === 'postgres' ? PG_KEYS_OF_USERS : SQLITE_KEYS_OF_USERS,
      [JSON.stringify([...out.keys()])],
    );
    for (const r of rows) {
      const user = out.get(r.user_id)!;
      if (r.kind === 0) user.devices.push({ userId: r.user_id, deviceId: r.a!, displayName: r.b, json: r.c! });
      else if (r.kind === 1) user.crossSigning.push({ userId: r.user_id, keyType: r.a as CrossSigningKeyType, publicKey: r.b!, json: r.c! });
      else if (r.kind === 2) user.signatures.push({ targetUserId: r.user_id, targetKeyId: r.a!, signerUserId: r.b!, signerKeyId: r.d!, signature: r.c! });
      else user.account = true;
    }
    // Device ID order on both databases (SQLite reads them in that order anyway).
    for (const user of out.values()) if (user.devices.length > 1) user.devices.sort((x, y) => (x.deviceId < y.deviceId ? -1 : x.deviceId > y.deviceId ? 1 : 0));
    return out;
  }

  async getCrossSigningKeys(userIds: readonly string[]): Promise<StoredCrossSigningKey[]> {
    const rows = await this.forUsers<CrossSigningRow>(userIds, (inList) => `SELECT user_id, key_type, public_key, key_json FROM e2e_cross_signing_keys WHERE user_id IN (${inList})`);
    return rows.map(toCrossSigning);
  }

  claimKeys(requests: readonly ClaimRequest[]): Promise<ClaimedKey[]> {
    // Claims that arrive together (in one turn of the event loop) are done together: on SQLite in
    // one transaction with one commit and one fsync, on PostgreSQL in one statement (one round
    // trip, one commit). Each gets the keys deleted for it; nobody learns a key before the commit
    // that removed it succeeded. A batch does not wait for the one before it: on SQLite the next
    // one runs while the last commit is being flushed to disk.
    return new Promise((resolve, reject) => {
      this.claimQueue.push({ requests, resolve, reject });
      if (this.claimQueue.length === 1) setImmediate(() => void this.flushClaims());
    });
  }

  private async flushClaims(): Promise<void> {
    const batch = this.claimQueue.splice(0);
    try {
      const results = await this.claimTogether(batch.map((b) => b.requests));
      batch.forEach((b, i) => b.resolve(results[i]!));
    } catch (e) {
      for (const b of batch) b.reject(e);
    }
  }

  /** The keys of each of `claims`. */
  private async claimTogether(claims: readonly (readonly ClaimRequest[])[]): Promise<ClaimedKey[][]> {
    if (this.db.dialect === 'postgres') {
      if (claims.length === 1 && claims[0]!.length === 1) {
        const { userId, deviceId, algorithm } = claims[0]![0]!;
        const hint = this.claimHints.get(deviceKey(userId, deviceId, algorithm)) ?? 0;
        const rows = await this.db.all<ClaimRow & { fallback: boolean; id: number | string }>(PG_CLAIM_ONE, [userId, deviceId, algorithm, hint, userId, deviceId, algorithm, hint, userId, deviceId, algorithm]);
        this.rememberClaimed(rows);
        return [rows.map(toClaimed)];
      }
      return handOut(claims, await this.claimManyOnPostgres(claims.flat()));
    }
    // Always a transaction: a one-device claim is two statements (oneOnSqlite).
    return this.db.transaction(async (tx) => {
      const out: ClaimedKey[][] = [];
      for (const c of claims) out.push(await this.claimOnSqlite(tx, c));
      return out;
    });
  }

  /** PG_CLAIM_MANY for `requests` (a device may be named more than once): the keys taken and the fallback keys handed out. */
  private async claimManyOnPostgres(requests: readonly ClaimRequest[]): Promise<ClaimedKey[]> {
    const wanted = new Map<string, [string, string, string, number, number]>();
    for (const r of requests) {
      const key = deviceKey(r.userId, r.deviceId, r.algorithm);
      const entry = wanted.get(key);
      if (entry) entry[3]++;
      else wanted.set(key, [r.userId, r.deviceId, r.algorithm, 1, this.claimHints.get(key) ?? 0]);
    }
    const rows = await this.db.all<ClaimRow & { fallback: boolean; id: number | string }>(PG_CLAIM_MANY, [JSON.stringify([...wanted.values()])]);
    this.rememberClaimed(rows);
    return rows.map(toClaimed);
  }

  /** Moves the claim hints of the devices whose one-time keys `rows` took (ids come back as text: bigint). */
  private rememberClaimed(rows: readonly (ClaimRow & { fallback: boolean; id: number | string })[]): void {
    for (const r of rows) {
      if (r.fallback) continue;
      const key = deviceKey(r.user_id, r.device_id, r.algorithm);
      const id = Number(r.id);
      if (id <= (this.claimHints.get(key) ?? 0)) continue;
      if (this.claimHints.size >= MAX_CLAIM_HINTS && !this.claimHints.has(key)) this.claimHints.clear();
      this.claimHints.set(key, id);
    }
  }

  /** The claim itself on SQLite, in transaction `q`. */
  private async claimOnSqlite(q: Queryable, requests: readonly ClaimRequest[]): Promise<ClaimedKey[]> {
    if (requests.length === 1) return this.oneOnSqlite(q, requests[0]!);
    // One statement for the one-time keys, then one for the fallback keys of the devices that had none.
    const claimed: ClaimedKey[] = [];
    for (const part of chunks(requests)) {
      const rows = await q.all<ClaimRow>(
        `DELETE FROM e2e_one_time_keys WHERE id IN (
           SELECT (SELECT o.id FROM e2e_one_time_keys o
                   WHERE o.user_id = r.column1 AND o.device_id = r.column2 AND o.algorithm = r.column3
                   ORDER BY o.id LIMIT 1)
           FROM (VALUES ${valuesList(part.length, 3)}) AS r)
         RETURNING user_id, device_id, algorithm, key_id, key_json`,
        part.flatMap((r) => [r.userId, r.deviceId, r.algorithm]),
      );
      const got = new Set<string>();
      for (const r of rows) {
        got.add(deviceKey(r.user_id, r.device_id, r.algorithm));
        claimed.push(toClaimed({ ...r, fallback: false }));
      }
      const missing = part.filter((r) => !got.has(deviceKey(r.userId, r.deviceId, r.algorithm)));
      if (missing.length === 0) continue;
      const fallbacks = await q.all<ClaimRow>(
        `UPDATE e2e_fallback_keys SET used = ?
         WHERE (user_id, device_id, algorithm) IN (VALUES ${valuesList(missing.length, 3)})
         RETURNING user_id, device_id, algorithm, key_id, key_json`,
        [true, ...missing.flatMap((r) => [r.userId, r.deviceId, r.algorithm])],
      );
      for (const r of fallbacks) claimed.push(toClaimed({ ...r, fallback: true }));
    }
    return claimed;
  }

  /**
   * One device's claim, in a transaction: its oldest key read, then deleted by its id (two plain
   * statements cost less than the DELETE … RETURNING with a subquery above, which materialises
   * what it returns), else its fallback key.
   */
  private async oneOnSqlite(tx: Queryable, { userId, deviceId, algorithm }: ClaimRequest): Promise<ClaimedKey[]> {
    const key = await tx.get<ClaimRow & { id: number }>(
      'SELECT id, user_id, device_id, algorithm, key_id, key_json FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? ORDER BY id LIMIT 1',
      [userId, deviceId, algorithm],
    );
    if (key) {
      await tx.run('DELETE FROM e2e_one_time_keys WHERE id = ?', [key.id]);
      return [toClaimed({ ...key, fallback: false })];
    }
    const fallback = await tx.get<ClaimRow>(
      'UPDATE e2e_fallback_keys SET used = ? WHERE user_id = ? AND device_id = ? AND algorithm = ? RETURNING user_id, device_id, algorithm, key_id, key_json',
      [true, userId, deviceId, algorithm],
    );
    return fallback ? [toClaimed({ ...fallback, fallback: true })] : [];
  }

  oneTimeKeyCounts(userId: string, deviceId: string): Promise<Record<string, number>> {
    return oneTimeKeyCounts(this.db, userId, deviceId);
  }

  async unusedFallbackKeyTypes(userId: string, deviceId: string): Promise<string[]> {
    const rows = await this.db.all<{ algorithm: string }>(
      'SELECT algorithm FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ? AND used = ? ORDER BY algorithm',
      [userId, deviceId, false],
    );
    return rows.map((r) => r.algorithm);
  }

  async trackUsers(userId: string, tracked: readonly string[], answerable = false): Promise<void> {
    const fresh = tracked.filter((t) => t !== userId && !this.trackedCache.has(`${userId}\0${t}`));
    if (fresh.length === 0) return;
    for (const part of chunks(fresh)) {
      // Only users this server can answer for: invented IDs would be rows nobody ever needs.
      const inList = placeholders(part.length);
      const known = answerable
        ? part
        : (
            await this.db.all<{ user_id: string }>(
              `SELECT user_id FROM users WHERE user_id IN (${inList}) UNION SELECT user_id FROM remote_device_lists WHERE user_id IN (${inList})`,
              [...part, ...part],
            )
          ).map((k) => k.user_id);
      if (known.length === 0) continue;
      await this.db.run(
        `INSERT INTO e2e_tracked_users (user_id, tracked_user_id) VALUES ${valuesList(known.length, 2)} ON CONFLICT DO NOTHING`,
        known.flatMap((k) => [userId, k]),
      );
      if (this.trackedCache.size > 100_000) this.trackedCache.clear();
      for (const k of known) this.trackedCache.add(`${userId}\0${k}`);
    }
  }

  async changedUsers(viewer: string, fromExclusive: number, toInclusive: number): Promise<string[]> {
    const rows = await this.db.all<{ user_id: string }>(
      `SELECT DISTINCT s.user_id FROM device_lists_stream s
       WHERE s.stream_id > ? AND s.stream_id <= ?
         AND (s.private_to IS NULL OR s.private_to = ?)
         AND (s.user_id = ? OR s.user_id IN (SELECT tracked_user_id FROM e2e_tracked_users WHERE user_id = ?))
       ORDER BY s.user_id`,
      [fromExclusive, toInclusive, viewer, viewer, viewer],
    );
    return rows.map((r) => r.user_id);
  }

  dataVersion(): number | undefined {
    return this.db.dataGeneration?.();
  }

  async isCrossSigningPublicKey(userId: string, key: string): Promise<boolean> {
    return (await this.db.get('SELECT 1 AS x FROM e2e_cross_signing_keys WHERE user_id = ? AND public_key = ?', [userId, key])) !== undefined;
  }

  async deactivatedUsers(userIds: readonly string[]): Promise<string[]> {
    const rows = await this.forUsers<{ user_id: string }>(userIds, (inList) => `SELECT user_id FROM users WHERE deactivated = ? AND user_id IN (${inList})`, [true]);
    return rows.map((r) => r.user_id);
  }

  async allowMasterKeyReplacementWithoutUia(userId: string, untilTs: number): Promise<boolean> {
    const n = await this.db.run("UPDATE e2e_cross_signing_keys SET updatable_without_uia_before_ms = ? WHERE user_id = ? AND key_type = 'master'", [untilTs, userId]);
    return n > 0;
  }

  async masterKeyReplaceableWithoutUiaUntil(userId: string): Promise<number> {
    const r = await this.db.get<{ until: number | null }>(
      "SELECT updatable_without_uia_before_ms AS until FROM e2e_cross_signing_keys WHERE user_id = ? AND key_type = 'master'",
      [userId],
    );
    return r?.until ?? 0;
  }
}
