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
  /** Who answered: the server itself or a notary. */
  readonly fromServer: string;
  /** The verified `/_matrix/key/v2/server` object, as JSON text, kept for our notary endpoint. */
  readonly keyJson: string;
  readonly validUntilTs: number;
  readonly fetchedTs: number;
}

export interface ServerKeysResponse extends StoredKeysJson {
  readonly keys: readonly { readonly keyId: string; readonly verifyKey: string; readonly expiredTs: number | null }[];
}

/** Other servers' signing keys (`server_signing_keys`, `server_keys_json`). */
export interface ServerKeysStore {
  /**
   * Records a verified key response. Keys it lists are inserted or updated; current keys seen in
   * earlier responses but absent from this one are marked expired (kept, but no longer current).
   */
  storeServerKeys(response: ServerKeysResponse): Promise<void>;
  /** Every key we hold for `serverName`, current and old, in no particular order. */
  getServerKeys(serverName: string): Promise<StoredServerKey[]>;
  /** The last verified response of each named server that we hold. */
  getServerKeysJson(serverNames: readonly string[]): Promise<StoredKeysJson[]>;
}

export interface StoredUser {
  readonly userId: string;
  /** Null when the account cannot log in with a password. */
  readonly passwordHash: string | null;
  readonly admin: boolean;
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

/** Users, devices, access tokens, registration nonces and user-interactive auth sessions. */
export interface AccountsStore {
  /**
   * Creates a user and, when `session` is given, its first device and access token, in one
   * transaction. Returns false (and changes nothing) when the user ID is taken.
   */
  createUser(user: StoredUser & { readonly createdTs: number }, session?: NewSession): Promise<boolean>;
  getUser(userId: string): Promise<StoredUser | undefined>;
  /**
   * Logs a device in: creates the device if the user does not have it (recording a device-list
   * change), otherwise keeps it and its keys but revokes its earlier access tokens; then stores the
   * new token. One transaction. Returns whether the device was created.
   */
  loginDevice(userId: string, session: NewSession): Promise<{ created: boolean }>;
  /** The user and device an access token belongs to, if the token is live. */
  getAccessToken(tokenHash: string): Promise<{ userId: string; deviceId: string } | undefined>;
  getDevice(userId: string, deviceId: string): Promise<StoredDevice | undefined>;
  /** The user's devices, ordered by device ID. */
  listDevices(userId: string): Promise<StoredDevice[]>;
  /** Renames a device and records a device-list change; false when the device does not exist. */
  setDeviceDisplayName(userId: string, deviceId: string, displayName: string | null): Promise<boolean>;
  /**
   * Deletes devices and everything keyed to them (access tokens, device keys, one-time and
   * fallback keys, signatures made on or by them) in one transaction, and records a device-list
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
  /** The latest public stream position of one user's device list (0 when it never changed). */
  latestStreamIdForUser(userId: string): Promise<number>;
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
  putCrossSigningKey(key: StoredCrossSigningKey): Promise<void>;
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
  getCrossSigningKeys(userIds: readonly string[]): Promise<StoredCrossSigningKey[]>;
  /**
   * Claims one key per request: the device's oldest one-time key of the algorithm, deleted in the
   * same statement so it is handed out at most once even across processes; for devices that have
   * none left, the fallback key (marked used). Two statements, whatever the number of devices.
   * Devices with neither are absent from the result.
   */
  claimKeys(requests: readonly ClaimRequest[]): Promise<ClaimedKey[]>;
  oneTimeKeyCounts(userId: string, deviceId: string): Promise<Record<string, number>>;
  /** Algorithms whose fallback key has not been handed out since it was uploaded. */
  unusedFallbackKeyTypes(userId: string, deviceId: string): Promise<string[]>;
  /** Remembers that `userId` has asked for these users' keys (for /keys/changes). */
  trackUsers(userId: string, tracked: readonly string[]): Promise<void>;
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
}

export interface Store {
  readonly backend: 'sqlite' | 'postgres';
  readonly keys: KeysStore;
  readonly serverKeys: ServerKeysStore;
  readonly accounts: AccountsStore;
  readonly deviceLists: DeviceListsStore;
  /** Database statements this process has run (a metric; tests use it to count round trips). */
  statementCount(): number;
  /** Names of the tables that hold data (for tests and operator tooling). */
  tableNames(): Promise<string[]>;
  close(): Promise<void>;
}
