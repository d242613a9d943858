/**
 * The store interfaces, one per area, in the spec's words. Domain code (keys/, accounts/,
 * federation/) depends on these types only; storage/ is the only place a driver is imported.
 */

export interface StoredServerKey {
  readonly serverName: string;
  readonly keyId: string;
  /** Unpadded base64 Ed25519 public key. */
  readonly verifyKey: string;
  /** Until when the key may be used, as published (`valid_until_ts`, capped by us). */
  readonly validUntilTs: number;
  /** Set for keys that came from `old_verify_keys`: they never authenticate requests. */
  readonly expiredTs: number | null;
}

export interface StoredKeysJson {
  readonly serverName: string;
  /** The key (in `verify_keys`) this response is the newest we hold for. */
  readonly keyId: string;
  /** Who answered: the server itself or a notary. */
  readonly fromServer: string;
  /** The verified `/_matrix/key/v2/server` object, as JSON text, kept for our notary endpoint. */
  readonly keyJson: string;
  readonly validUntilTs: number;
  readonly fetchedTs: number;
}

export interface ServerKeysResponse extends Omit<StoredKeysJson, 'keyId'> {
  readonly keys: readonly { readonly keyId: string; readonly verifyKey: string; readonly expiredTs: number | null }[];
}

/** Other servers' signing keys (`server_signing_keys`, `server_key_responses`). */
export interface ServerKeysStore {
  /**
   * Records a verified key response. Keys it lists are inserted or updated; current keys seen in
   * earlier responses but absent from this one are marked expired (kept, but no longer current).
   * The response itself becomes the newest one held for each key in its `verify_keys`; responses
   * kept for other keys stay (a notary still vouches for them while they are valid).
   */
  storeServerKeys(response: ServerKeysResponse): Promise<void>;
  /** Every key we hold for `serverName`, current and old, in no particular order. */
  getServerKeys(serverName: string): Promise<StoredServerKey[]>;
  /** For each key of `serverName` we have seen in `verify_keys`, the newest verified response listing it. */
  getServerKeyResponses(serverName: string): Promise<StoredKeysJson[]>;
}

export interface StoredUser {
  readonly userId: string;
  /** Null when the account cannot log in with a password. */
  readonly passwordHash: string | null;
  readonly admin: boolean;
}

/** A user as the admin API shows it. */
export interface UserAccount {
  readonly userId: string;
  readonly admin: boolean;
  readonly deactivated: boolean;
  /** Milliseconds since the epoch. */
  readonly createdTs: number;
  /** When one of the user's devices was last seen, if any. */
  readonly lastSeenTs: number | null;
}

export interface UserListQuery {
  /** Offset into the ordered list. */
  readonly from: number;
  readonly limit: number;
  /** Only users whose ID contains this text. */
  readonly userIdContains?: string | undefined;
  /** true: only admins; false: no admins; undefined: both. */
  readonly admins?: boolean | undefined;
  readonly includeDeactivated: boolean;
  readonly orderBy: 'name' | 'admin' | 'deactivated' | 'creation_ts' | 'last_seen_ts';
  readonly direction: 'f' | 'b';
}

export interface StoredDevice {
  readonly userId: string;
  readonly deviceId: string;
  readonly displayName: string | null;
  readonly lastSeenTs: number | null;
  readonly lastSeenIp: string | null;
}

export interface NewSession {
  /** SHA-256 of the access token; the token itself is never stored. */
  readonly tokenHash: string;
  readonly deviceId: string;
  /** Used only when the device is created. */
  readonly displayName: string | null;
  readonly ts: number;
  readonly ip: string | null;
}

export interface UiaSession {
  readonly sessionId: string;
  /** The user the session authenticates; null during registration. */
  readonly userId: string | null;
  /** A hash of the request the session was started for: it cannot be reused for another one. */
  readonly operation: string;
  readonly completed: readonly string[];
  readonly createdTs: number;
}

export interface LoginOptions {
  /** The stored hash the password was verified against. */
  readonly passwordHash: string;
  readonly maxDevices?: number | undefined;
}

export interface LoginOutcome {
  /** Whether the device was created (false: an existing device was logged in again). */
  readonly created: boolean;
  /** Why nothing was stored, if the login was refused. */
  readonly refused?: 'credentials' | 'too many devices';
}

/** Users, devices, access tokens, registration nonces and user-interactive auth sessions. */
export interface AccountsStore {
  /**
   * Creates a user and, when `session` is given, its first device and access token, in one
   * transaction. Returns false (and changes nothing) when the user ID is taken.
   */
  createUser(user: StoredUser & { readonly createdTs: number }, session?: NewSession): Promise<boolean>;
  getUser(userId: string): Promise<(StoredUser & { readonly deactivated: boolean }) | undefined>;
  getUserAccount(userId: string): Promise<UserAccount | undefined>;
  /** A page of users in the order asked for (ties by user ID), and how many match in all. */
  listUsers(query: UserListQuery): Promise<{ users: UserAccount[]; total: number }>;
  /**
   * Replaces the user's password hash; with `logout`, also deletes all the user's devices the way
   * deleteDevices does (access tokens, keys, signatures; device-list changes recorded), as
   * Synapse's set_password with logout_devices does. One transaction. False (and nothing changes)
   * when the user does not exist or is deactivated.
   */
  setPasswordHash(userId: string, passwordHash: string, logout: boolean): Promise<boolean>;
  /**
   * Deactivates a user in one transaction: every device goes the way deleteDevices takes it
   * (access tokens, device keys, one-time and fallback keys, signatures; device-list changes
   * recorded), the cross-signing keys and signatures by or on them go too, every key backup
   * version is deleted (as BackupTransaction.deleteVersion: gone at once, its keys purged
   * afterwards by BackupStore.purgeDeletedKeys, which then drops the version rows), the password
   * is removed and the user is marked deactivated. The user ID stays taken. False when the user does
   * not exist.
   */
  deactivateUser(userId: string): Promise<boolean>;
  /**
   * Replaces a user's password hash, if it is still `oldHash` (a password changed meanwhile is
   * left alone). Returns whether it was replaced.
   */
  replacePasswordHash(userId: string, oldHash: string, newHash: string): Promise<boolean>;
  /**
   * Logs a device in: creates the device if the user does not have it (recording a device-list
   * change), otherwise keeps it and its keys but revokes its earlier access tokens; then stores the
   * new token. One transaction, which first reads the user again (locking the row on PostgreSQL):
   * the login is refused (`refused: 'credentials'`, nothing changes) when the user is gone or
   * deactivated, or their password hash is no longer `options.passwordHash`, the one the password
   * was checked against. A new device is refused (`refused: 'too many devices'`) when the user
   * already has `maxDevices` devices; concurrent logins of one user are serialised for that count.
   */
  loginDevice(userId: string, session: NewSession, options: LoginOptions): Promise<LoginOutcome>;
  /** The user and device an access token belongs to, if the token is live. */
  getAccessToken(tokenHash: string): Promise<{ userId: string; deviceId: string } | undefined>;
  getDevice(userId: string, deviceId: string): Promise<StoredDevice | undefined>;
  /** The user's devices, ordered by device ID. */
  listDevices(userId: string): Promise<StoredDevice[]>;
  /** Renames a device and records a device-list change; false when the device does not exist. */
  setDeviceDisplayName(userId: string, deviceId: string, displayName: string | null): Promise<boolean>;
  /**
   * Deletes devices and everything keyed to them (access tokens, device keys, one-time and
   * fallback keys, signatures made on or by them, pending to-device messages and the device's
   * to-device transaction IDs) in one transaction, and records a device-list
   * change for each device that existed. Devices already gone are ignored. Returns the IDs deleted.
   */
  deleteDevices(userId: string, deviceIds: readonly string[] | 'all'): Promise<string[]>;
  /** Remembers a shared-secret registration nonce. */
  addRegistrationNonce(nonce: string, createdTs: number): Promise<void>;
  /** Uses up a nonce: true only once, and only if it was created at or after `notBeforeTs`. */
  consumeRegistrationNonce(nonce: string, notBeforeTs: number): Promise<boolean>;
  createUiaSession(session: UiaSession): Promise<void>;
  getUiaSession(sessionId: string): Promise<UiaSession | undefined>;
  /** Adds a completed stage to a session. */
  completeUiaStage(sessionId: string, stage: string): Promise<void>;
  deleteUiaSession(sessionId: string): Promise<void>;
  /** Drops sessions and nonces created before `beforeTs`. */
  deleteExpiredAuthState(uiaBeforeTs: number, nonceBeforeTs: number): Promise<void>;
}

export interface DeviceListsStore {
  /** The highest stream position written so far (0 when empty). */
  currentStreamId(): Promise<number>;
  /**
   * The latest public stream position of one user's devices (0 when they never changed): the
   * `stream_id` of /user/devices. Cross-signing key changes are not counted (they travel as
   * m.signing_key_update, outside the device EDUs' prev_id chain).
   */
  latestStreamIdForUser(userId: string): Promise<number>;
  /** Calls `listener` in this process after a transaction that recorded changes commits. */
  onChange(listener: (userIds: readonly string[]) => void): () => void;
}

/** A one-time or fallback key as stored: its algorithm, key ID and the uploaded value as JSON text. */
export interface StoredOneTimeKey {
  readonly algorithm: string;
  readonly keyId: string;
  /** The uploaded value (a string or a signed key object) as JSON text, verbatim. */
  readonly json: string;
}

export interface StoredFallbackKey extends StoredOneTimeKey {
  /** Whether a claim has handed it out since it was uploaded. */
  readonly used: boolean;
}

export type CrossSigningKeyType = 'master' | 'self_signing' | 'user_signing';

export interface StoredCrossSigningKey {
  readonly userId: string;
  readonly keyType: CrossSigningKeyType;
  /** Unpadded base64 Ed25519 public key (the part after `ed25519:` in its key ID). */
  readonly publicKey: string;
  /** The uploaded key object as JSON text, verbatim. */
  readonly json: string;
}

/**
 * A signature uploaded through /keys/signatures/upload, kept apart from the signed object so
 * visibility rules can be applied per viewer. The target is a device (`targetKeyId` = device ID)
 * or a cross-signing key (`targetKeyId` = its public key); the signer key ID is `ed25519:<…>`.
 */
export interface StoredSignature {
  readonly targetUserId: string;
  readonly targetKeyId: string;
  readonly signerUserId: string;
  readonly signerKeyId: string;
  readonly signature: string;
}

export interface StoredDeviceKeys {
  readonly userId: string;
  readonly deviceId: string;
  readonly displayName: string | null;
  /** The uploaded device keys object (without `unsigned`) as JSON text, verbatim. */
  readonly json: string;
}

export interface KeysOfUsers {
  readonly devices: StoredDeviceKeys[];
  readonly crossSigning: StoredCrossSigningKey[];
  readonly signatures: StoredSignature[];
}

/** One user's part of KeysOfUsers (devices in device ID order), and whether they have an account here. */
export interface KeysOfUser extends KeysOfUsers {
  readonly account: boolean;
}

/** Roughly the bytes `keys` takes in memory: its strings, and some for each object (cache budgets). */
export function keysOfUserBytes(keys: KeysOfUser): number {
  let n = 64;
  for (const d of keys.devices) n += 96 + d.userId.length + d.deviceId.length + (d.displayName?.length ?? 0) + d.json.length;
  for (const c of keys.crossSigning) n += 96 + c.userId.length + c.publicKey.length + c.json.length;
  for (const s of keys.signatures) n += 96 + s.targetUserId.length + s.targetKeyId.length + s.signerUserId.length + s.signerKeyId.length + s.signature.length;
  return n;
}

export interface ClaimRequest {
  readonly userId: string;
  readonly deviceId: string;
  readonly algorithm: string;
}

export interface ClaimedKey extends StoredOneTimeKey {
  readonly userId: string;
  readonly deviceId: string;
  /** True when the device had no one-time key left and its fallback key was handed out. */
  readonly fallback: boolean;
}

/** What one key-changing request may do, inside one transaction. */
export interface KeysTransaction {
  /** Whether the device exists; on PostgreSQL also locks it, serialising uploads per device. */
  lockDevice(userId: string, deviceId: string): Promise<boolean>;
  /** On PostgreSQL, locks the user, serialising cross-signing key uploads per user (SQLite runs one transaction at a time anyway). */
  lockUser(userId: string): Promise<void>;
  getDeviceKeys(userId: string, deviceId: string): Promise<string | undefined>;
  putDeviceKeys(userId: string, deviceId: string, json: string): Promise<void>;
  /** Which of the given one-time key IDs the device already holds (unclaimed). */
  findOneTimeKeys(userId: string, deviceId: string, ids: readonly { algorithm: string; keyId: string }[]): Promise<StoredOneTimeKey[]>;
  countOneTimeKeys(userId: string, deviceId: string): Promise<number>;
  /** Adds keys; all keys of one call count as uploaded at the same time. */
  addOneTimeKeys(userId: string, deviceId: string, keys: readonly StoredOneTimeKey[]): Promise<void>;
  getFallbackKeys(userId: string, deviceId: string): Promise<StoredFallbackKey[]>;
  /** Inserts or replaces the device's fallback key for the key's algorithm. */
  putFallbackKey(userId: string, deviceId: string, key: StoredFallbackKey): Promise<void>;
  /** Unclaimed one-time keys per algorithm. */
  oneTimeKeyCounts(userId: string, deviceId: string): Promise<Record<string, number>>;
  getCrossSigningKeys(userId: string): Promise<StoredCrossSigningKey[]>;
  /** The cached cross-signing keys of a remote user (from their server; see RemoteDeviceListsStore). */
  getRemoteCrossSigningKeys(userId: string): Promise<StoredCrossSigningKey[]>;
  putCrossSigningKey(key: StoredCrossSigningKey): Promise<void>;
  /**
   * Uses up the permission to replace the user's cross-signing keys without user-interactive auth
   * (KeysStore.allowMasterKeyReplacementWithoutUia): true, and the permission is gone, if it was
   * open at `now`. Concurrent callers cannot both get true.
   */
  takeReplacementWithoutUia(userId: string, now: number): Promise<boolean>;
  /** Drops signatures made by, or made on, one of the user's keys (`publicKey` of a replaced key). */
  deleteSignaturesOfKey(userId: string, publicKey: string): Promise<void>;
  /** The user's device IDs. */
  deviceIds(userId: string): Promise<string[]>;
  putSignatures(signatures: readonly StoredSignature[]): Promise<void>;
  /**
   * Appends to the device-list change stream. `privateTo` limits who sees the change
   * (e.g. a new user-signing key concerns only its owner).
   */
  recordDeviceListChange(userId: string, deviceId: string | null, privateTo?: string): Promise<void>;
}

/** End-to-end keys: the `e2e_*` tables. */
export interface KeysStore {
  transaction<T>(fn: (tx: KeysTransaction) => Promise<T>): Promise<T>;
  /**
   * Everything a key query returns for the given users, in one statement: the device keys of
   * their devices that have uploaded keys, their cross-signing keys, and the uploaded signatures
   * on either. The result may be shared with other callers (a cache): read it, do not modify it.
   */
  getKeysOf(userIds: readonly string[]): Promise<KeysOfUsers>;
  /** The same per user, for every user asked about (also those without an account or keys). */
  keysByUser(userIds: readonly string[]): Promise<Map<string, KeysOfUser>>;
  getCrossSigningKeys(userIds: readonly string[]): Promise<StoredCrossSigningKey[]>;
  /**
   * Claims one key per request: the device's oldest one-time key of the algorithm, deleted in the
   * same statement so it is handed out at most once even across processes; for devices that have
   * none left, the fallback key (marked used). One statement on PostgreSQL, two on SQLite,
   * whatever the number of devices. Devices with neither are absent from the result.
   */
  claimKeys(requests: readonly ClaimRequest[]): Promise<ClaimedKey[]>;
  oneTimeKeyCounts(userId: string, deviceId: string): Promise<Record<string, number>>;
  /** Algorithms whose fallback key has not been handed out since it was uploaded. */
  unusedFallbackKeyTypes(userId: string, deviceId: string): Promise<string[]>;
  /**
   * Remembers that `userId` has asked for these users' keys (for /keys/changes). Only users this
   * server can answer for are kept: existing local users and remote users with a cached list.
   * `answerable` says the caller has just read that all of them are (KeysOfUser.account), which
   * saves looking it up again.
   */
  trackUsers(userId: string, tracked: readonly string[], answerable?: boolean): Promise<void>;
  /**
   * A number that stays the same while no stored data can have changed, through this process or
   * any other (SQLite: the data generation); undefined when the store cannot tell cheaply
   * (PostgreSQL). Lets the key rules reuse what they built from unchanged data.
   */
  dataVersion(): number | undefined;
  /**
   * Users whose device lists changed with from < position <= to and whom `viewer` sees: the viewer
   * and the users they track; changes private to someone else are left out.
   */
  changedUsers(viewer: string, fromExclusive: number, toInclusive: number): Promise<string[]>;
  /** Whether `key` is the public key of one of the user's cross-signing keys. */
  isCrossSigningPublicKey(userId: string, key: string): Promise<boolean>;
  /** Which of these users are deactivated accounts of this server. */
  deactivatedUsers(userIds: readonly string[]): Promise<string[]>;
  /**
   * Lets the user replace their cross-signing keys without user-interactive auth until `untilTs`
   * (Synapse's admin API); false when the user has no master key. The first replacement uses the
   * permission up (KeysTransaction.takeReplacementWithoutUia).
   */
  allowMasterKeyReplacementWithoutUia(userId: string, untilTs: number): Promise<boolean>;
  /** Until when the user's master key may be replaced without user-interactive auth (0: not). */
  masterKeyReplaceableWithoutUiaUntil(userId: string): Promise<number>;
}

/** A backup version as stored (`e2e_room_keys_versions`). */
export interface StoredBackupVersion {
  /** Versions are numbered per user, 1, 2, 3, …; never reused, even after a deletion. */
  readonly version: number;
  readonly algorithm: string;
  /** The uploaded `auth_data` as JSON text, verbatim. */
  readonly authData: string;
  /** A counter moved on by every change to the version's stored keys. */
  readonly etag: number;
  /** How many keys the version holds. */
  readonly count: number;
}

/** The key of one Megolm session in a backup (`e2e_room_keys`): the spec's KeyBackupData. */
export interface StoredRoomKey {
  readonly roomId: string;
  readonly sessionId: string;
  readonly firstMessageIndex: number;
  readonly forwardedCount: number;
  readonly isVerified: boolean;
  /** The uploaded `session_data` as JSON text, verbatim. */
  readonly sessionData: string;
}

/** The metadata of a stored room key, which decides whether an upload replaces it. */
export type RoomKeyMetadata = Omit<StoredRoomKey, 'sessionData'>;

export interface StoredRoomKeyMetadata extends RoomKeyMetadata {
  /** The size of its `session_data` (JSON text) in bytes. */
  readonly bytes: number;
}

/** What a user's backup versions that are not deleted hold together. */
export interface BackupUsage {
  readonly versions: number;
  readonly sessions: number;
  /** Bytes of `session_data`. */
  readonly bytes: number;
}

/** Which keys of a version a read or a deletion covers: all, one room's, or one session's. */
export interface RoomKeyScope {
  readonly roomId?: string | undefined;
  /** Only together with `roomId`. */
  readonly sessionId?: string | undefined;
}

/** What one backup-changing request may do, inside one transaction. */
export interface BackupTransaction {
  /** The newest version that is not deleted, if any. */
  currentVersion(): Promise<StoredBackupVersion | undefined>;
  /** A version that is not deleted. */
  getVersion(version: number): Promise<StoredBackupVersion | undefined>;
  /** Whether the version was ever created (deleted or not). */
  versionExists(version: number): Promise<boolean>;
  /** Creates the next version (one more than any version the user ever had) and returns its number. */
  createVersion(algorithm: string, authData: string): Promise<number>;
  setAuthData(version: number, authData: string): Promise<void>;
  /**
   * Marks the version deleted: from the commit on, it and its keys are gone for every reader. The
   * keys themselves are removed afterwards by BackupStore.purgeDeletedKeys, a batch at a time.
   */
  deleteVersion(version: number): Promise<void>;
  /** The stored metadata (and size) of those of the given sessions the version holds. */
  getRoomKeyMetadata(version: number, ids: readonly { roomId: string; sessionId: string }[]): Promise<StoredRoomKeyMetadata[]>;
  /**
   * Inserts the keys, replacing stored keys of the same sessions; `added` of them are new, and
   * the version's `session_data` grows by `addedBytes` (negative when it shrinks). Moves the
   * version's etag on and keeps its count and size.
   */
  putRoomKeys(version: number, keys: readonly StoredRoomKey[], added: number, addedBytes: number): Promise<void>;
  /** Deletes the keys in `scope`; when any existed, moves the etag on and keeps the count. Returns how many. */
  deleteRoomKeys(version: number, scope: RoomKeyScope): Promise<number>;
  /** What the user's versions that are not deleted hold together. */
  usage(): Promise<BackupUsage>;
}

/** Server-side key backups: the `e2e_room_keys*` tables. Every user's data is apart from every other's. */
export interface BackupStore {
  /**
   * Runs `fn` in one transaction in which nobody else changes `userId`'s backups: on PostgreSQL
   * a per-user lock, on SQLite the database's write lock.
   */
  transaction<T>(userId: string, fn: (tx: BackupTransaction) => Promise<T>): Promise<T>;
  /** The newest version that is not deleted, or the given version if it is not deleted. */
  getVersion(userId: string, version: number | 'current'): Promise<StoredBackupVersion | undefined>;
  /**
   * The keys in `scope` (none if the version is deleted), ordered by room and session, `limit` at a time: pass the last key of
   * one page as `after` to get the next. Pages are read one by one, so memory stays bounded
   * whatever the size of the backup.
   */
  getRoomKeys(userId: string, version: number, scope: RoomKeyScope, limit: number, after?: { roomId: string; sessionId: string }): Promise<StoredRoomKey[]>;
  /** Deleted versions whose keys are still in the database, waiting for purgeDeletedKeys. */
  deletedVersionsWithKeys(limit: number): Promise<{ userId: string; version: number }[]>;
  /**
   * Removes up to `limit` keys of a deleted version in one short transaction, and returns how many
   * (0 when the version is not deleted). Once none are left, the version's row goes too, unless
   * it is the user's newest (version numbers are never reused) and the user is not deactivated.
   */
  purgeDeletedKeys(userId: string, version: number, limit: number): Promise<number>;
}

/** A to-device message for local devices: one device, or `*` for every device of the user. */
export interface NewToDeviceMessage {
  readonly userId: string;
  readonly deviceId: string;
  /** The event as the recipient receives it in /sync (`content`, `sender`, `type`), JSON text. */
  readonly messageJson: string;
}

/** What one /sendToDevice request or one received m.direct_to_device EDU stores, in one transaction. */
export interface ToDeviceBatch {
  /** A client's request: stored only if this (device, event type, txnId) was never seen. */
  readonly txn?: { readonly userId: string; readonly deviceId: string; readonly eventType: string; readonly txnId: string };
  /** An EDU from another server: stored only if this (origin, message_id) was never seen. */
  readonly inbound?: { readonly origin: string; readonly messageId: string };
  /**
   * Messages for local devices. Devices that do not exist are skipped. A `*` entry reaches every
   * device of the user that has no entry of its own in the batch.
   */
  readonly local: readonly NewToDeviceMessage[];
  /** m.direct_to_device EDU contents (JSON text) to queue for other servers, with the device entries each carries. */
  readonly remote: readonly { readonly destination: string; readonly eduJson: string; readonly messages: number }[];
  /**
   * After storing, each recipient device keeps at most this many messages, of at most this many
   * bytes (of event JSON) together: the oldest go.
   */
  readonly maxPendingPerDevice: number;
  readonly maxPendingBytesPerDevice: number;
  readonly now: number;
}

export interface StoredToDevice {
  /** False when the txnId or message_id was seen before: nothing was stored. */
  readonly stored: boolean;
  /** Local device messages stored. */
  readonly messages: number;
  /** Devices whose oldest messages were dropped to keep within the cap, with how many. */
  readonly dropped: readonly { readonly userId: string; readonly deviceId: string; readonly count: number }[];
}

/** A message waiting in a device's inbox; `streamId` orders a device's messages. */
export interface PendingToDevice {
  readonly streamId: number;
  readonly messageJson: string;
}

/**
 * To-device messages (send_to_device.md; the m.direct_to_device EDU): local devices' inboxes
 * (`device_inbox`), the queue to other servers (`device_federation_outbox`), and what was already
 * received: message IDs from other servers (`device_federation_inbox`) and clients' transaction
 * IDs (`to_device_txns`).
 */
export interface ToDeviceStore {
  /**
   * Stores a batch in one transaction, unless its txnId or message_id was seen before. A
   * device's messages get increasing stream IDs, which become visible in that order (across
   * processes too), so a reader that has seen N never later finds a smaller one.
   */
  addMessages(batch: ToDeviceBatch): Promise<StoredToDevice>;
  /**
   * The device's messages with stream ID above `after`, oldest first: at most `limit` of them, and
   * no more than `maxBytes` of event JSON together, except that the first is returned whatever its size.
   */
  messagesAfter(userId: string, deviceId: string, after: number, limit: number, maxBytes: number): Promise<PendingToDevice[]>;
  /** Removes the device's messages with stream ID up to `upTo` (delivered); returns how many. */
  deleteMessagesUpTo(userId: string, deviceId: string, upTo: number): Promise<number>;
  /**
   * Calls `listener` in this process after a batch commits: the local users who received
   * messages, and the destinations that have EDUs queued.
   */
  onChange(listener: (change: { readonly userIds: readonly string[]; readonly destinations: readonly string[] }) => void): () => void;
  /** The oldest EDUs queued for `destination`. */
  pendingEdus(destination: string, limit: number): Promise<{ streamId: number; eduJson: string }[]>;
  /** Removes EDUs the destination has acknowledged. */
  edusDelivered(destination: string, streamIds: readonly number[]): Promise<void>;
  /** Destinations with queued EDUs that are not waiting for a retry. */
  destinationsWithEdus(now: number): Promise<string[]>;
  /** Removes the EDUs queued before `queuedBeforeTs`, still undelivered; returns what went, per destination. */
  expireEdus(queuedBeforeTs: number): Promise<{ destination: string; edus: number; messages: number }[]>;
  /** Queued EDUs per destination (metrics). */
  eduCounts(): Promise<Map<string, number>>;
  /** Messages waiting in local inboxes, all devices together (metrics). */
  pendingMessageCount(): Promise<number>;
  /** Forgets transaction IDs recorded before `txnsBeforeTs` and message IDs received before `messageIdsBeforeTs`. */
  cleanup(txnsBeforeTs: number, messageIdsBeforeTs: number): Promise<void>;
}

/** Figures read for metrics: each one statement, cheap enough to run at every scrape. */
export interface StatsStore {
  /**
   * For each limit, how many devices have fewer than that many unclaimed one-time keys. Devices
   * count once they have uploaded device keys or one-time keys, until they are deleted.
   */
  devicesWithFewOneTimeKeys(limits: readonly number[]): Promise<number[]>;
}

export interface Store {
  readonly backend: 'sqlite' | 'postgres';
  readonly keys: KeysStore;
  readonly serverKeys: ServerKeysStore;
  readonly accounts: AccountsStore;
  readonly deviceLists: DeviceListsStore;
  readonly federation: FederationStore;
  readonly remoteDeviceLists: RemoteDeviceListsStore;
  readonly backup: BackupStore;
  readonly toDevice: ToDeviceStore;
  readonly stats: StatsStore;
  /** Database statements this process has run (a metric; tests use it to count round trips). */
  statementCount(): number;
  /** Statements and transactions this process ran again after a deadlock or serialization conflict (metrics, tests). */
  retryCount(): number;
  /** Names of the tables that hold data (for tests and operator tooling). */
  tableNames(): Promise<string[]>;
  /** Resolves when the database answers a read (GET /health). */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** A change waiting to be sent to one destination as an EDU (`device_list_outbound_pokes`). */
export interface DeviceListPoke {
  readonly streamId: number;
  readonly userId: string;
  /** Null: the user's cross-signing keys changed (m.signing_key_update). */
  readonly deviceId: string | null;
}

/** A local device's current state, for an outgoing m.device_list_update. */
export interface LocalDeviceState {
  readonly userId: string;
  readonly deviceId: string;
  readonly displayName: string | null;
  /** The uploaded device keys as JSON text, or null when the device has none. */
  readonly keyJson: string | null;
}

export interface DestinationState {
  readonly destination: string;
  readonly failureCount: number;
  /** No request to the destination before this time (0: none pending). */
  readonly retryAfterTs: number;
  /** When the current run of failures began; null while the destination answers. */
  readonly firstFailureTs: number | null;
}

/**
 * Federation bookkeeping (server-server API, Device Management and Transactions): which servers
 * want a local user's device-list updates, the updates still to send them, per-destination retry
 * state, leases that make one process the sender for a destination, and the transactions received.
 */
export interface FederationStore {
  /**
   * Subscribes `serverName` to the device lists of those of `userIds` that exist here, until
   * `expiresTs` (null: until unsubscribed). Only ever extends a subscription. A subscription that
   * had lapsed starts a new EDU chain (the receiver may have missed changes meanwhile).
   */
  subscribe(serverName: string, userIds: readonly string[], expiresTs: number | null, now: number): Promise<void>;
  /** Ends subscriptions and drops what was queued for them. */
  unsubscribe(serverName: string, userIds: readonly string[]): Promise<void>;
  /** The servers subscribed to a user's device list now, with when each subscription ends. */
  subscribers(userId: string, now: number): Promise<{ serverName: string; expiresTs: number | null }[]>;
  /**
   * `serverName` has just read the user's whole device list at `streamId` (/user/devices): queued
   * changes up to it are moot, and the next EDU's prev_id continues from it.
   */
  noteDeviceListRead(serverName: string, userId: string, streamId: number): Promise<void>;

  /** The oldest changes queued for `destination`, in stream order. */
  pendingPokes(destination: string, limit: number): Promise<DeviceListPoke[]>;
  /** Per user, the stream_id of the last update `destination` acknowledged (the next prev_id). */
  lastSentStreamIds(destination: string, userIds: readonly string[]): Promise<Map<string, number>>;
  /**
   * After a 200 for a transaction: drops its pokes and moves each user's chain from the stream_id
   * the updates were built on (`from`; undefined: they started a new chain) to the last one sent
   * (`to`) — only if the chain is still where it was: a chain broken meanwhile (a lapsed
   * subscription, a compressed queue) stays broken, so the next update starts a new one.
   */
  pokesDelivered(destination: string, streamIds: readonly number[], chains: ReadonlyMap<string, { readonly from: number | undefined; readonly to: number }>): Promise<void>;
  /** Destinations with queued changes that are not waiting for a retry. */
  destinationsWithPokes(now: number): Promise<string[]>;
  /** Queued changes per destination (metrics). */
  pokeCounts(): Promise<Map<string, number>>;
  /**
   * For a destination that has not taken a transaction for too long: keeps only the newest change
   * per user and forgets what was sent, so the next update for each user starts a new chain and
   * the receiver resyncs. Returns the number of changes dropped.
   */
  compressPokes(destination: string): Promise<number>;
  /** The current state of the named local devices (deleted ones are absent). */
  localDeviceStates(userId: string, deviceIds: readonly string[]): Promise<LocalDeviceState[]>;

  getDestinations(destinations: readonly string[]): Promise<DestinationState[]>;
  putDestination(state: DestinationState): Promise<void>;
  /** Every destination with failures on record. */
  failingDestinations(): Promise<DestinationState[]>;

  /**
   * Takes (or renews) the lease `name` for `owner` until `expiresTs`, if it is free, expired or
   * already `owner`'s. True when `owner` holds it afterwards.
   */
  takeLease(name: string, owner: string, expiresTs: number, now: number): Promise<boolean>;
  releaseLease(name: string, owner: string): Promise<void>;
  /** Owners currently holding a lease (to find those of processes that died). */
  leaseOwners(): Promise<string[]>;
  releaseLeasesOf(owner: string): Promise<void>;

  /** The stored answer to a transaction already processed, if any. */
  getInboundTransaction(origin: string, txnId: string): Promise<string | undefined>;
  putInboundTransaction(origin: string, txnId: string, responseJson: string, now: number): Promise<void>;

  /** Drops lapsed subscriptions (with what was queued for them) and old transaction records. */
  cleanup(now: number, inboundTransactionsBeforeTs: number): Promise<{ subscriptionsExpired: number }>;
}

/** What this server knows of a remote user's device list (`remote_device_lists`). */
export interface RemoteDeviceList {
  readonly userId: string;
  readonly serverName: string;
  /** The last stream_id applied (from /user/devices or an m.device_list_update). */
  readonly streamId: number;
  /** True when an update could not be applied in order: resync before trusting it. */
  readonly stale: boolean;
  /** When the whole list was last fetched from its server. */
  readonly syncedTs: number;
}

export interface RemoteDevice {
  readonly deviceId: string;
  readonly displayName: string | null;
  /** The device keys as received (JSON text, verbatim), or null when the device has none. */
  readonly keyJson: string | null;
}

export interface RemoteCrossSigningKey {
  readonly publicKey: string;
  /** As received, JSON text. */
  readonly json: string;
}

/** A whole remote device list, as fetched from GET /user/devices/{userId} and checked. */
export interface RemoteDeviceListSnapshot {
  readonly userId: string;
  readonly serverName: string;
  readonly streamId: number;
  readonly devices: readonly RemoteDevice[];
  readonly masterKey: RemoteCrossSigningKey | undefined;
  readonly selfSigningKey: RemoteCrossSigningKey | undefined;
}

/** One m.device_list_update, checked. */
export interface RemoteDeviceUpdate {
  readonly userId: string;
  readonly deviceId: string;
  readonly streamId: number;
  readonly prevIds: readonly number[];
  readonly deleted: boolean;
  readonly displayName: string | null;
  readonly keyJson: string | null;
}

/** How an update relates to the cached list: apply it, ignore it (already have it), or a gap. */
export type ChainDecision = 'apply' | 'ignore' | 'gap';

/** The cache of remote users' device lists (`remote_device_lists`, `remote_devices`, `remote_cross_signing_keys`). */
export interface RemoteDeviceListsStore {
  getLists(userIds: readonly string[]): Promise<RemoteDeviceList[]>;
  /** The cached devices with keys and the cross-signing keys of these users. */
  getKeysOf(userIds: readonly string[]): Promise<KeysOfUsers>;
  /**
   * Replaces a user's cached list with a fetched one (unless the cache already holds a newer,
   * non-stale stream position) and records a device-list change when anything differs. Returns
   * whether the cache changed, and whether it is complete: false when an update newer than the
   * snapshot arrived meanwhile (the list stays stale and needs another fetch).
   */
  replaceList(snapshot: RemoteDeviceListSnapshot, now: number): Promise<{ changed: boolean; complete: boolean }>;
  /**
   * Applies an update to a tracked user's list in one transaction, after `decide` has judged it
   * against the cached state; a gap marks the list stale. 'untracked' when there is no list.
   */
  applyDeviceUpdate(update: RemoteDeviceUpdate, decide: (current: RemoteDeviceList) => ChainDecision, now: number): Promise<ChainDecision | 'untracked'>;
  /** Replaces the named cross-signing keys of a tracked user; false when the user is not tracked. */
  applySigningKeys(userId: string, keys: { master?: RemoteCrossSigningKey; selfSigning?: RemoteCrossSigningKey }, now: number): Promise<boolean>;
  markStale(userId: string): Promise<void>;
  /** Tracked users whose list is stale or was last fetched before `syncedBeforeTs`, oldest first. */
  dueForResync(syncedBeforeTs: number, limit: number): Promise<string[]>;
  /** Drops the cached lists of remote users no local user tracks any more; returns how many. */
  forgetUntracked(): Promise<number>;
  /** Number of cached lists, and of stale ones (metrics). */
  counts(): Promise<{ lists: number; stale: number }>;
}
