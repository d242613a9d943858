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
   * Records a verified key response. Keys it lists are inserted or updated; keys seen in earlier
   * responses but absent from this one are kept (they may still verify old requests until expiry).
   */
  storeServerKeys(response: ServerKeysResponse): Promise<void>;
  /** Every key we hold for `serverName`, current and old, in no particular order. */
  getServerKeys(serverName: string): Promise<StoredServerKey[]>;
  /** The last verified response of each named server that we hold. */
  getServerKeysJson(serverNames: readonly string[]): Promise<StoredKeysJson[]>;
}

export interface Store {
  readonly backend: 'sqlite' | 'postgres';
  readonly serverKeys: ServerKeysStore;
  /** Names of the tables that hold data (for tests and operator tooling). */
  tableNames(): Promise<string[]>;
  close(): Promise<void>;
}
