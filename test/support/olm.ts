/**
 * A real Matrix client crypto stack in tests: the Rust crypto behind Element
 * (@matrix-org/matrix-sdk-crypto-wasm). Its outgoing requests go to mxkeys over HTTP and the
 * responses go back to it, exactly as a client would do.
 */
import assert from 'node:assert/strict';
import * as sdk from '@matrix-org/matrix-sdk-crypto-wasm';
import { http, type TestServer } from './server.js';
import { passwordAuth, type Session } from './client.js';

let ready: Promise<void> | undefined;
export function initCrypto(): Promise<void> {
  return (ready ??= sdk.initAsync());
}

const C = '/_matrix/client/v3';

/** The HTTP request (method, path) for each outgoing request type we serve. */
const ROUTES: Partial<Record<sdk.RequestType, [string, string]>> = {
  [sdk.RequestType.KeysUpload]: ['POST', `${C}/keys/upload`],
  [sdk.RequestType.KeysQuery]: ['POST', `${C}/keys/query`],
  [sdk.RequestType.KeysClaim]: ['POST', `${C}/keys/claim`],
  [sdk.RequestType.SignatureUpload]: ['POST', `${C}/keys/signatures/upload`],
};

export interface OutgoingLike {
  readonly id?: string | undefined;
  readonly type: sdk.RequestType;
  readonly body: string;
  /** To-device requests: where they go (PUT /sendToDevice/{event_type}/{txn_id}). */
  readonly event_type?: string;
  readonly txn_id?: string;
}

/** The method and path of an outgoing request, if we serve it. */
function routeOf(request: OutgoingLike): [string, string] | undefined {
  if (request.type === sdk.RequestType.ToDevice) {
    assert.ok(request.event_type && request.txn_id, 'a to-device request names its event type and txnId');
    return ['PUT', `${C}/sendToDevice/${encodeURIComponent(request.event_type)}/${encodeURIComponent(request.txn_id)}`];
  }
  return ROUTES[request.type];
}

export class OlmClient {
  /** The next_batch of the last /sync. */
  private since: string | undefined;

  private constructor(
    readonly machine: sdk.OlmMachine,
    readonly session: Session,
    readonly server: TestServer,
  ) {}

  static async create(server: TestServer, session: Session): Promise<OlmClient> {
    await initCrypto();
    const machine = await sdk.OlmMachine.initialize(new sdk.UserId(session.userId), new sdk.DeviceId(session.deviceId));
    return new OlmClient(machine, session, server);
  }

  /** Sends one request to mxkeys and returns the response text; asserts HTTP 200. */
  async send(method: string, path: string, body: string): Promise<string> {
    const r = await http(this.server.url, method, path, { rawBody: body, token: this.session.accessToken, headers: { 'content-type': 'application/json' } });
    assert.equal(r.status, 200, `${method} ${path} → ${r.status} ${r.text}`);
    return r.text;
  }

  /** Sends a request of the machine's and reports the response back to it. */
  async sendOutgoing(request: OutgoingLike): Promise<string> {
    const route = routeOf(request);
    assert.ok(route, `no route for outgoing request type ${request.type}`);
    const text = await this.send(route[0], route[1], request.body);
    if (request.id) await this.machine.markRequestAsSent(request.id, request.type, text);
    return text;
  }

  /** Sends every pending outgoing request (key uploads, key queries, …) until none is left. */
  async flush(): Promise<void> {
    for (let round = 0; round < 10; round++) {
      const requests = (await this.machine.outgoingRequests()) as OutgoingLike[];
      const ours = requests.filter((r) => routeOf(r));
      if (ours.length === 0) return;
      for (const r of ours) await this.sendOutgoing(r);
    }
  }

  /** Bootstraps cross-signing, completing the user-interactive auth with the account password if asked. */
  async bootstrapCrossSigning(): Promise<{ neededAuth: boolean }> {
    const requests = await this.machine.bootstrapCrossSigning(true);
    if (requests.uploadKeysRequest) await this.sendOutgoing(requests.uploadKeysRequest as OutgoingLike);
    const path = `${C}/keys/device_signing/upload`;
    const body = JSON.parse(requests.uploadSigningKeysRequest.body) as Record<string, unknown>;
    let r = await http(this.server.url, 'POST', path, { body, token: this.session.accessToken });
    const neededAuth = r.status === 401;
    if (neededAuth) {
      assert.ok(r.body['flows'], `expected a user-interactive auth challenge, got ${r.text}`);
      r = await http(this.server.url, 'POST', path, { body: { ...body, auth: passwordAuth(this.session, r.body['session'] as string) }, token: this.session.accessToken });
    }
    assert.equal(r.status, 200, r.text);
    const signatures = JSON.parse(await this.sendOutgoing({ type: sdk.RequestType.SignatureUpload, body: requests.uploadSignaturesRequest.body })) as { failures?: object };
    assert.deepEqual(signatures.failures ?? {}, {}, 'every signature of the bootstrap was accepted');
    return { neededAuth };
  }

  /**
   * One GET /sync (waiting up to `timeoutMs` for news), its to-device events, device-list changes
   * and key counts handed to the machine, then the machine's follow-up requests sent (key uploads,
   * queries, to-device replies). Returns the to-device events as the machine processed them.
   */
  async sync(timeoutMs = 0): Promise<sdk.ProcessedToDeviceEvent[]> {
    const query = this.since === undefined ? '' : `?since=${encodeURIComponent(this.since)}&timeout=${timeoutMs}`;
    const r = await http(this.server.url, 'GET', `${C}/sync${query}`, { token: this.session.accessToken });
    assert.equal(r.status, 200, r.text);
    this.since = r.body['next_batch'] as string;
    const lists = (r.body['device_lists'] ?? {}) as { changed?: string[]; left?: string[] };
    const counts = new Map(Object.entries((r.body['device_one_time_keys_count'] ?? {}) as Record<string, number>));
    const processed = await this.machine.receiveSyncChanges(
      JSON.stringify(((r.body['to_device'] as { events?: unknown[] } | undefined)?.events) ?? []),
      new sdk.DeviceLists((lists.changed ?? []).map((u) => new sdk.UserId(u)), (lists.left ?? []).map((u) => new sdk.UserId(u))),
      counts,
      new Set((r.body['device_unused_fallback_key_types'] ?? []) as string[]),
    );
    await this.flush();
    return processed;
  }

  /** Hands to-device events (and key counts) to the machine as a /sync would. */
  async receiveToDevice(events: unknown[]): Promise<sdk.ProcessedToDeviceEvent[]> {
    return this.machine.receiveSyncChanges(JSON.stringify(events), new sdk.DeviceLists(), new Map(), new Set());
  }

  /** Makes the machine track `userIds` and fetch their keys from mxkeys. */
  async track(userIds: string[]): Promise<void> {
    await this.machine.updateTrackedUsers(userIds.map((u) => new sdk.UserId(u)));
    await this.flush();
  }
}

export { sdk };
