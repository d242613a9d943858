/**
 * A fake remote homeserver for federation tests: a real HTTP server with its own Ed25519 signing
 * key (tweetnacl, independent of mxkeys' signing code) that publishes /_matrix/key/v2/server, can
 * act as a notary, and sends X-Matrix-signed requests to mxkeys.
 */
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { after } from 'node:test';
import type { AddressInfo } from 'node:net';
import { canonical, TestSigningKey } from './keys.js';

type Json = Record<string, unknown>;

/** What a scripted fake answers: a status and body (or raw text), `'hang'` (never), or undefined (404). */
export type FakeAnswer = { status: number; body?: unknown; raw?: string } | 'hang' | undefined;

export interface PublishedKey {
  readonly version: string;
  readonly key: TestSigningKey;
}

export interface SignedRequestOptions {
  readonly body?: unknown;
  /** Sent as the body instead of JSON-encoding `body` (the signature still covers `body`). */
  readonly rawBody?: string;
  /** X-Matrix parameters; default to this server's values. */
  readonly origin?: string;
  readonly destination?: string | null;
  readonly keyVersion?: string;
  /** Sign with this key instead of the one named by keyVersion. */
  readonly signWith?: TestSigningKey;
  /** What the signature covers, if it should differ from the actual request. */
  readonly signed?: Partial<{ method: string; uri: string; content: unknown; destination: string }>;
  /** Use this Authorization header verbatim. */
  readonly authorization?: string | null;
  /** Send from this local address (any of 127.0.0.0/8 on Linux): another client, as mxkeys sees it. */
  readonly localAddress?: string;
}

const servers: FakeHomeserver[] = [];
after(async () => {
  for (const s of servers.splice(0)) await s.stop();
});

export class FakeHomeserver {
  /** Keys in verify_keys; the first signs requests. */
  verifyKeys: PublishedKey[] = [{ version: 'fake1', key: new TestSigningKey() }];
  /** Keys in old_verify_keys. */
  oldKeys: { version: string; key: TestSigningKey; expiredTs: number }[] = [];
  /** valid_until_ts of the published keys, relative to now. */
  validForMs = 3_600_000;
  /** When false, /_matrix/key/v2/server answers 503 (the server "is down" for key fetches). */
  serveKeys = true;
  /** Key responses of other servers this fake can vouch for as a notary, by server name. */
  readonly notaryFor = new Map<string, () => Json>();
  /** Corrupts the notary countersignature when set. */
  badNotarySignature = false;
  readonly requests: { method: string; url: string }[] = [];
  /**
   * Answers requests the fake does not serve itself (e.g. /_matrix/federation/v1/user/devices/…):
   * return the status and body to send, `'hang'` to never answer, or undefined for 404.
   */
  onRequest:
    | ((method: string, url: string, body: unknown) => FakeAnswer | Promise<FakeAnswer>)
    | undefined;
  private server!: Server;
  serverName = '';
  url = '';

  /**
   * Starts on a free port. Plain HTTP, named `remote-<port>.example` (reach it through
   * `federation.resolve`); or, with `tls`, HTTPS named by its address `127.0.0.1:<port>`, which
   * mxkeys finds through real server discovery (an IP literal with a port).
   */
  static async start(options: { tls?: { key: string; cert: string } } = {}): Promise<FakeHomeserver> {
    const fake = new FakeHomeserver();
    const handler = (req: IncomingMessage, res: ServerResponse) => void fake.handle(req, res);
    fake.server = options.tls ? createHttpsServer(options.tls, handler) : createServer(handler);
    await new Promise<void>((resolve) => fake.server.listen(0, '127.0.0.1', resolve));
    const port = (fake.server.address() as AddressInfo).port;
    fake.url = `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`;
    fake.serverName = options.tls ? `127.0.0.1:${port}` : `remote-${port}.example`;
    servers.push(fake);
    return fake;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** This server's signed /_matrix/key/v2/server object. */
  keyResponse(): Json {
    const body: Json = {
      server_name: this.serverName,
      valid_until_ts: Date.now() + this.validForMs,
      verify_keys: Object.fromEntries(this.verifyKeys.map((k) => [`ed25519:${k.version}`, { key: k.key.publicKey }])),
      old_verify_keys: Object.fromEntries(this.oldKeys.map((k) => [`ed25519:${k.version}`, { key: k.key.publicKey, expired_ts: k.expiredTs }])),
    };
    let signed = body;
    for (const k of this.verifyKeys) signed = k.key.sign(signed, this.serverName, `ed25519:${k.version}`);
    return signed;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    this.requests.push({ method: req.method ?? '', url: req.url ?? '' });
    const send = (status: number, body: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    if (req.method === 'GET' && req.url === '/_matrix/key/v2/server') {
      if (!this.serveKeys) return send(503, { errcode: 'M_UNKNOWN', error: 'down' });
      return send(200, this.keyResponse());
    }
    if (req.method === 'POST' && req.url === '/_matrix/key/v2/query') {
      let text = '';
      for await (const chunk of req) text += chunk;
      const wanted = Object.keys(((JSON.parse(text) as Json)['server_keys'] as Json | undefined) ?? {});
      const answers = wanted.flatMap((name) => {
        const source = this.notaryFor.get(name);
        if (!source) return [];
        const signed = this.verifyKeys[0]!.key.sign(source(), this.serverName, `ed25519:${this.verifyKeys[0]!.version}`);
        if (this.badNotarySignature) ((signed['signatures'] as Record<string, Json>)[this.serverName]![`ed25519:${this.verifyKeys[0]!.version}`] = 'A'.repeat(86));
        return [signed];
      });
      return send(200, { server_keys: answers });
    }
    if (this.onRequest) {
      let text = '';
      for await (const chunk of req) text += chunk;
      let body: unknown;
      try {
        body = text === '' ? undefined : JSON.parse(text);
      } catch {
        body = undefined;
      }
      const answer = await this.onRequest(req.method ?? '', req.url ?? '', body);
      if (answer === 'hang') return;
      if (answer !== undefined) {
        if (answer.raw !== undefined) {
          res.writeHead(answer.status, { 'content-type': 'application/json' });
          res.end(answer.raw);
          return;
        }
        return send(answer.status, answer.body ?? {});
      }
    }
    send(404, { errcode: 'M_UNRECOGNIZED', error: 'not here' });
  }

  /** Requests to paths starting with `prefix`. */
  count(prefix: string): number {
    return this.requests.filter((r) => r.url.startsWith(prefix)).length;
  }

  /** The X-Matrix header for a request, signed over `signed` overrides if given. */
  authorization(method: string, uri: string, destination: string, options: SignedRequestOptions = {}): string {
    const origin = options.origin ?? this.serverName;
    const version = options.keyVersion ?? this.verifyKeys[0]!.version;
    const key = options.signWith ?? this.verifyKeys.find((k) => k.version === version)?.key ?? this.oldKeys.find((k) => k.version === version)?.key;
    if (!key) throw new Error(`no key ${version}`);
    const content = options.signed && 'content' in options.signed ? options.signed.content : options.body;
    const toSign: Json = {
      method: options.signed?.method ?? method,
      uri: options.signed?.uri ?? uri,
      origin,
      destination: options.signed?.destination ?? destination,
      ...(content !== undefined ? { content } : {}),
    };
    const sig = key.sign(toSign, origin, `ed25519:${version}`);
    const signature = (sig['signatures'] as Record<string, Record<string, string>>)[origin]![`ed25519:${version}`]!;
    const dest = options.destination === null ? '' : `destination="${options.destination ?? destination}",`;
    return `X-Matrix origin="${origin}",${dest}key="ed25519:${version}",sig="${signature}"`;
  }

  /** Sends a signed request to mxkeys at `base`, whose server name is `destination`. */
  async request(base: string, destination: string, method: string, uri: string, options: SignedRequestOptions = {}): Promise<{ status: number; text: string; body: Json }> {
    const headers: Record<string, string> = {};
    if (options.authorization !== null) headers['authorization'] = options.authorization ?? this.authorization(method, uri, destination, options);
    let payload: string | undefined;
    if (options.rawBody !== undefined) payload = options.rawBody;
    else if (options.body !== undefined) payload = JSON.stringify(options.body);
    if (payload !== undefined) headers['content-type'] = 'application/json';
    const { status, text } =
      options.localAddress === undefined
        ? await fetch(base + uri, { method, headers, ...(payload !== undefined ? { body: payload } : {}) }).then(async (res) => ({ status: res.status, text: await res.text() }))
        : await requestFrom(options.localAddress, base + uri, method, headers, payload);
    let body: Json = {};
    try {
      body = JSON.parse(text) as Json;
    } catch {
      body = {};
    }
    return { status, text, body };
  }
}

/** One HTTP request from a chosen local address (fetch cannot choose one). */
function requestFrom(localAddress: string, url: string, method: string, headers: Record<string, string>, payload: string | undefined): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method, headers, localAddress, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(payload);
  });
}

/**
 * A server that accepts connections and reads requests but never answers, like the servers an
 * attacker names to tie up our key fetches. `release()` drops every connection it holds, and every
 * later request at once.
 */
export class Tarpit {
  private readonly held = new Set<ServerResponse>();
  private released = false;
  private server!: Server;
  url = '';
  /** Requests received so far. */
  received = 0;

  static async start(): Promise<Tarpit> {
    const t = new Tarpit();
    t.server = createServer((req, res) => {
      t.received++;
      if (t.released) return void res.destroy();
      t.held.add(res);
      req.resume();
    });
    await new Promise<void>((resolve) => t.server.listen(0, '127.0.0.1', resolve));
    t.url = `http://127.0.0.1:${(t.server.address() as AddressInfo).port}`;
    tarpits.push(t);
    return t;
  }

  /** Resolves once `n` requests have arrived (fails after 30 s rather than hang the suite). */
  async receivedAtLeast(n: number): Promise<void> {
    const deadline = Date.now() + 30_000;
    while (this.received < n) {
      if (Date.now() > deadline) throw new Error(`the tarpit received ${this.received} requests, not ${n}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  release(): void {
    this.released = true;
    for (const res of this.held) res.destroy();
    this.held.clear();
  }

  async stop(): Promise<void> {
    this.release();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

const tarpits: Tarpit[] = [];
after(async () => {
  for (const t of tarpits.splice(0)) await t.stop();
});

export { canonical };
