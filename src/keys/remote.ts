/**
 * What the key rules need from other servers, declared here and implemented in federation/
 * (remote-keys.ts), so keys/ never imports an HTTP client: the keys of users on other servers for
 * a client's /keys/query and /keys/claim (keys.yaml: "to wait when downloading keys from remote
 * servers"), with the servers that could not answer as `failures`.
 */
import type { ClaimedKey, ClaimRequest, KeysOfUsers } from '../storage/store.js';

/** A `failures` entry for a server we could not ask (keys.yaml leaves its content free; Synapse's shape). */
export interface ServerFailure {
  readonly status: number;
  readonly message: string;
}

export interface RemoteQueryResult {
  /** Devices with keys and cross-signing keys of the remote users asked for (no uploaded signatures). */
  readonly keys: KeysOfUsers;
  /** Users whose device list is cached here now (the viewer may track them). */
  readonly known: readonly string[];
  readonly failures: ReadonlyMap<string, ServerFailure>;
}

export interface RemoteKeyLookup {
  /**
   * Keys of remote users: `wanted` maps each user to the device IDs asked for (empty: all). All
   * their servers are asked in parallel; whatever has not answered by `deadline` (ms since the
   * epoch) is a failure, and the rest is returned.
   */
  queryKeys(wanted: ReadonlyMap<string, readonly string[]>, deadline: number): Promise<RemoteQueryResult>;
  /** Claims one-time keys of remote users' devices, one request per server, in parallel. */
  claimKeys(requests: readonly ClaimRequest[], deadline: number): Promise<{ claimed: ClaimedKey[]; failures: ReadonlyMap<string, ServerFailure> }>;
}
