/**
 * Outbound HTTP to other Matrix servers: discovery (server names → address, Host, TLS name),
 * HTTPS with certificate checks against the right name (plus an optional extra CA), timeouts,
 * a response size limit, kept-alive connections, and X-Matrix signing for authenticated requests
 * (server-server API, "Request Authentication").
 */
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { Agent as HttpAgent, request as httpRequest, type IncomingMessage } from 'node:http';
import { checkServerIdentity, rootCertificates, type PeerCertificate } from 'node:tls';
import { BlockList, isIP, type LookupFunction } from 'node:net';
import { lookup as dnsLookup } from 'node:dns';
import { resolveSrv } from 'node:dns/promises';
import { VERSION } from '../version.js';
import type { SigningKey } from '../matrix/signing.js';
import { signRequest } from './xmatrix.js';
import { parseWellKnownServer, ServerDiscovery, wellKnownCacheMs, WELL_KNOWN_ERROR_CACHE_MS, type DiscoveryNetwork, type WellKnownResult } from './discovery.js';

export interface FederationResponse {
  readonly status: number;
  readonly body: unknown;
  readonly headers: IncomingMessage['headers'];
}

export class FederationRequestError extends Error {
  constructor(
    message: string,
    /** The request ran out of time (rather than failing outright). */
    readonly timedOut = false,
  ) {
    super(message);
    this.name = 'FederationRequestError';
  }
}

/**
 * A request cut short by the caller's own deadline (a client's `timeout`), not by the
 * destination: it says nothing about whether the destination is up.
 */
export class DeadlineExceeded extends FederationRequestError {
  constructor(message: string) {
    super(message, true);
    this.name = 'DeadlineExceeded';
  }
}

/**
 * Which addresses outbound requests may connect to. Other servers name themselves (server names,
 * .well-known, SRV records), so without a filter anyone could make us connect to our own
 * network: loopback, private ranges, cloud metadata services. As in Synapse's
 * `ip_range_blacklist` / `ip_range_whitelist`; the whitelist wins.
 */
export class AddressPolicy {
  private readonly blocked = new BlockList();
  private readonly allowed = new BlockList();

  constructor(blacklist: readonly string[], whitelist: readonly string[] = []) {
    const add = (list: BlockList, cidr: string) => {
      const [address, bits] = cidr.split('/');
      const family = isIP(address ?? '') === 6 ? 'ipv6' : 'ipv4';
      list.addSubnet(address!, bits === undefined ? (family === 'ipv6' ? 128 : 32) : Number(bits), family);
    };
    for (const c of blacklist) add(this.blocked, c);
    for (const c of whitelist) add(this.allowed, c);
  }

  private listed(address: string, family: 'ipv4' | 'ipv6'): boolean {
    return !this.allowed.check(address, family) && this.blocked.check(address, family);
  }

  permits(address: string): boolean {
    const family = isIP(address) === 6 ? 'ipv6' : 'ipv4';
    if (this.listed(address, family)) return false;
    // An IPv6 address that carries an IPv4 address reaches that IPv4 host (through the kernel, a
    // NAT64 gateway or a 6to4 relay), so the IPv4 address must be allowed as well.
    const embedded = family === 'ipv6' ? embeddedIpv4(address) : undefined;
    return embedded === undefined || !this.listed(embedded, 'ipv4');
  }

  /** A DNS lookup for http(s).request that refuses to hand out forbidden addresses. */
  lookup(): LookupFunction {
    return (hostname, options, callback) => {
      dnsLookup(hostname, { ...options, all: true }, (err, addresses) => {
        if (err) return callback(err, '', 0);
        const ok = addresses.filter((a) => this.permits(a.address));
        if (ok.length === 0) return callback(new FederationRequestError(`${hostname} resolves only to addresses outbound requests may not reach (federation.ip_range_blacklist)`), '', 0);
        if (options.all) return (callback as unknown as (e: null, a: typeof ok) => void)(null, ok);
        callback(null, ok[0]!.address, ok[0]!.family);
      });
    };
  }
}

/**
 * Synapse's default blacklist (loopback, private, link-local, shared, documentation and multicast
 * ranges), plus the IPv6 ranges that embed an IPv4 address: IPv4-compatible (`::/96`), NAT64
 * (`64:ff9b::/96`, `64:ff9b:1::/48`) and 6to4 (`2002::/16`). IPv4-mapped addresses
 * (`::ffff:a.b.c.d`) are judged by their IPv4 address (AddressPolicy.permits); listing
 * `::ffff:0:0/96` itself would block every IPv4 address, as Node's BlockList treats IPv4 addresses
 * as mapped ones.
 */
export const DEFAULT_IP_RANGE_BLACKLIST: readonly string[] = [
  '127.0.0.0/8', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '100.64.0.0/10', '192.0.0.0/24', '169.254.0.0/16',
  '192.88.99.0/24', '198.18.0.0/15', '192.0.2.0/24', '198.51.100.0/24', '203.0.113.0/24', '224.0.0.0/4', '0.0.0.0/8',
  '::1/128', 'fe80::/10', 'fc00::/7', '2001:db8::/32', 'ff00::/8', 'fec0::/10', '::/128',
  '::/96', '64:ff9b::/96', '64:ff9b:1::/48', '2002::/16',
];

/** The sixteen bytes of an IPv6 address (already known to be one). */
function ipv6Bytes(address: string): number[] {
  let text = address.replace(/^\[|\]$/g, '').split('%')[0]!;
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (v4) {
    const [a, b, c, d] = v4.slice(1).map(Number) as [number, number, number, number];
    text = `${text.slice(0, v4.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.includes('::') ? text.split('::') : [text, undefined];
  const parse = (part: string | undefined) => (part ? part.split(':').map((h) => parseInt(h, 16)) : []);
  const first = parse(head);
  const last = parse(tail);
  const groups = tail === undefined ? first : [...first, ...new Array<number>(8 - first.length - last.length).fill(0), ...last];
  return groups.flatMap((g) => [g >> 8, g & 0xff]);
}

/**
 * The IPv4 address inside an IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible (`::/96`), NAT64
 * (`64:ff9b::/96`) or 6to4 (`2002::/16`) IPv6 address; undefined for others.
 */
export function embeddedIpv4(address: string): string | undefined {
  const b = ipv6Bytes(address);
  const zero = (from: number, to: number) => b.slice(from, to).every((x) => x === 0);
  let at: number | undefined;
  if (zero(0, 10) && b[10] === 0xff && b[11] === 0xff) at = 12;
  else if (zero(0, 12)) at = 12;
  else if (b[0] === 0x00 && b[1] === 0x64 && b[2] === 0xff && b[3] === 0x9b && zero(4, 12)) at = 12;
  else if (b[0] === 0x20 && b[1] === 0x02) at = 2;
  return at === undefined ? undefined : b.slice(at, at + 4).join('.');
}

const NETWORK_ERRORS: Readonly<Record<string, string>> = {
  ENOTFOUND: 'DNS lookup failed (no such name)',
  EAI_NONAME: 'DNS lookup failed (no such name)',
  EAI_AGAIN: 'DNS lookup failed (no answer from the DNS server)',
  EAI_FAIL: 'DNS lookup failed',
  ECONNREFUSED: 'connection refused',
  ECONNRESET: 'connection reset',
  ETIMEDOUT: 'connection timed out',
  EHOSTUNREACH: 'host unreachable',
  ENETUNREACH: 'network unreachable',
  EPROTO: 'TLS handshake failed',
};

/** A socket or TLS error in words an operator reads at a glance, with the code for searching. */
function describeNetworkError(e: Error): string {
  const code = (e as NodeJS.ErrnoException).code;
  const known = code === undefined ? undefined : NETWORK_ERRORS[code];
  if (known) return `${known} (${code})`;
  if (code !== undefined && /CERT|SIGNATURE|ALTNAME|ISSUER|SELF_SIGNED/.test(code)) return `the TLS certificate is not accepted: ${e.message} (${code})`;
  return e.message;
}

export interface HttpGetOptions {
  readonly method?: 'GET' | 'POST' | 'PUT';
  readonly body?: unknown;
  /** Host header; defaults to the URL's host. */
  readonly host?: string;
  /** Name the server certificate must be valid for; defaults to the URL's hostname. */
  readonly tlsName?: string;
  /** The whole request, connection to last byte, must finish within this. */
  readonly timeoutMs: number;
  readonly maxBytes: number;
  readonly ca: readonly string[] | undefined;
  /** Where the request may connect; without one, anywhere (operator-configured URLs). */
  readonly addresses?: AddressPolicy | undefined;
  /** The Authorization header (X-Matrix for signed federation requests). */
  readonly authorization?: string;
  /** Connection pools to reuse connections from (one request per connection without). */
  readonly agents?: { readonly http: HttpAgent; readonly https: HttpsAgent } | undefined;
}

/** One JSON request over HTTP(S), no redirects. Rejects on network errors, timeouts and non-JSON. */
export function requestJson(url: string, options: HttpGetOptions): Promise<FederationResponse> {
  const u = new URL(url);
  const secure = u.protocol === 'https:';
  const tlsName = (options.tlsName ?? u.hostname).replace(/^\[|\]$/g, '');
  const payload = options.body === undefined ? undefined : Buffer.from(JSON.stringify(options.body));
  const headers: Record<string, string> = {
    host: options.host ?? u.host,
    'user-agent': `mxkeys/${VERSION}`,
    accept: 'application/json',
    ...(options.authorization !== undefined ? { authorization: options.authorization } : {}),
    ...(payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {}),
  };
  const policy = options.addresses;
  const literal = u.hostname.replace(/^\[|\]$/g, '');
  if (policy && isIP(literal) && !policy.permits(literal)) {
    return Promise.reject(new FederationRequestError(`${u.host} is an address outbound requests may not reach (federation.ip_range_blacklist)`));
  }
  return new Promise((resolve, reject) => {
    const req = (secure ? httpsRequest : httpRequest)(
      {
        ...(policy ? { lookup: policy.lookup() } : {}),
        ...(options.agents ? { agent: secure ? options.agents.https : options.agents.http } : {}),
        signal: AbortSignal.timeout(options.timeoutMs),
        protocol: u.protocol,
        hostname: literal,
        port: u.port || (secure ? 443 : 80),
        path: `${u.pathname}${u.search}`,
        method: options.method ?? 'GET',
        headers,
        timeout: options.timeoutMs,
        ...(secure
          ? {
              ...(isIP(tlsName) ? {} : { servername: tlsName }),
              checkServerIdentity: (_host: string, cert: PeerCertificate) => checkServerIdentity(tlsName, cert),
              ...(options.ca ? { ca: [...options.ca] } : {}),
            }
          : {}),
      },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > options.maxBytes) {
            req.destroy(new FederationRequestError(`response from ${u.host} is larger than ${options.maxBytes} bytes`));
            return;
          }
          chunks.push(chunk);
        });
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown;
          try {
            body = text === '' ? undefined : JSON.parse(text);
          } catch {
            reject(new FederationRequestError(`${u.host} answered ${res.statusCode} with a body that is not JSON`));
            return;
          }
          resolve({ status: res.statusCode ?? 0, body, headers: res.headers });
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new FederationRequestError(`no answer from ${u.host} within ${options.timeoutMs} ms`, true)));
    req.on('error', (e) => {
      if (e instanceof FederationRequestError) reject(e);
      else if ((e as Error).name === 'AbortError') reject(new FederationRequestError(`${u.host} did not answer completely within ${options.timeoutMs} ms`, true));
      else reject(new FederationRequestError(`cannot reach ${u.host}: ${describeNetworkError(e)}`));
    });
    req.end(payload);
  });
}

export interface FederationClientOptions {
  /** Static base URLs per server name (`federation.resolve`); not subject to the address policy. */
  readonly resolve: Readonly<Record<string, string>>;
  /** Addresses that discovered servers may not be reached at (default: Synapse's list). */
  readonly ipRangeBlacklist?: readonly string[];
  readonly ipRangeWhitelist?: readonly string[];
  /** Extra CA certificates (PEM) trusted besides the system ones. */
  readonly extraCa?: string | undefined;
  readonly timeoutMs?: number;
  /** Discovery's network operations; defaults to real HTTPS and DNS. */
  readonly network?: DiscoveryNetwork;
  /** Our server name and the key that signs our requests (X-Matrix). */
  readonly signer?: { readonly serverName: string; readonly key: SigningKey };
}

const MAX_RESPONSE_BYTES = 1024 * 1024;

/**
 * Settles as `work` does, or as `late()` does if `ms` pass first (`work` goes on, unwatched):
 * `late` returns the answer for a late piece of work, or a rejected promise to fail it.
 */
export function settleWithin<T>(work: Promise<T>, ms: number, late: () => T | PromiseLike<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => resolve(late()), Math.max(0, ms));
    work.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e as Error);
      },
    );
  });
}

/** `work`, or `timeout()` as a rejection if it has not settled within `ms`. */
function withTimeout<T>(work: Promise<T>, ms: number, timeout: () => Error): Promise<T> {
  return settleWithin(work, ms, () => Promise.reject(timeout()));
}

export interface SignedRequestOptions {
  readonly method: 'GET' | 'POST' | 'PUT';
  /** The JSON body; covered by the signature. */
  readonly body?: unknown;
  /** The request must be answered by then (ms since the epoch); capped by the configured timeout. */
  readonly deadline?: number;
  readonly maxBytes?: number;
}

export class FederationClient {
  readonly discovery: ServerDiscovery;
  private readonly ca: readonly string[] | undefined;
  private readonly timeoutMs: number;
  private readonly addresses: AddressPolicy;
  private readonly overrides: Readonly<Record<string, string>>;
  private readonly signer: FederationClientOptions['signer'];
  /** Kept-alive connections for signed requests: a destination is usually asked again soon. */
  private readonly agents = {
    http: new HttpAgent({ keepAlive: true, maxSockets: 16 }),
    https: new HttpsAgent({ keepAlive: true, maxSockets: 16 }),
  };

  constructor(options: FederationClientOptions) {
    this.signer = options.signer;
    this.ca = options.extraCa ? [...rootCertificates, options.extraCa] : undefined;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.addresses = new AddressPolicy(options.ipRangeBlacklist ?? DEFAULT_IP_RANGE_BLACKLIST, options.ipRangeWhitelist ?? []);
    this.overrides = options.resolve;
    this.discovery = new ServerDiscovery(options.network ?? this.realNetwork(), options.resolve);
  }

  private realNetwork(): DiscoveryNetwork {
    return {
      resolveSrv: (name) => resolveSrv(name),
      fetchWellKnown: (hostname) => this.fetchWellKnown(hostname),
    };
  }

  /** GET https://<hostname>/.well-known/matrix/server, following up to 5 redirects (HTTPS only). */
  private async fetchWellKnown(hostname: string): Promise<WellKnownResult> {
    let url = `https://${hostname}/.well-known/matrix/server`;
    for (let hop = 0; hop < 5; hop++) {
      const r = await requestJson(url, { timeoutMs: this.timeoutMs, maxBytes: 64 * 1024, ca: this.ca, addresses: this.addresses }).catch(() => undefined);
      if (!r) return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
      const location = r.headers.location;
      if (r.status >= 300 && r.status < 400 && typeof location === 'string') {
        const next = new URL(location, url);
        if (next.protocol !== 'https:') return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
        url = next.toString();
        continue;
      }
      if (r.status !== 200) return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
      const server = parseWellKnownServer(r.body);
      return { server, cacheMs: server === undefined ? WELL_KNOWN_ERROR_CACHE_MS : wellKnownCacheMs(r.headers['cache-control']) };
    }
    return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
  }

  /**
   * An X-Matrix signed request to `destination` at `path` (path and query, as signed). Resolves to
   * the answer whatever its status; rejects on network errors, timeouts and bodies that are not JSON.
   */
  async signedRequest(destination: string, path: string, options: SignedRequestOptions): Promise<FederationResponse> {
    if (!this.signer) throw new Error('this federation client has no signing key');
    const started = Date.now();
    const left = options.deadline === undefined ? Infinity : options.deadline - started;
    const timeoutMs = Math.min(this.timeoutMs, left);
    if (timeoutMs <= 0) throw new DeadlineExceeded(`no time left to ask ${destination}`);
    const cutShort = (e: unknown) => {
      if (left < this.timeoutMs && e instanceof FederationRequestError && e.timedOut) return new DeadlineExceeded(`${destination} did not answer within the ${Math.round(left)} ms the request allowed`);
      return e;
    };
    // Discovery (.well-known, SRV) shares the same time budget as the request itself.
    const target = await withTimeout(this.discovery.resolve(destination), timeoutMs, () => new FederationRequestError(`finding ${destination} (server discovery) took longer than ${Math.round(timeoutMs)} ms`, true)).catch(
      (e: unknown) => Promise.reject(cutShort(e)),
    );
    const remaining = timeoutMs - (Date.now() - started);
    if (remaining <= 0) throw cutShort(new FederationRequestError(`no time left to ask ${destination}`, true));
    const authorization = signRequest(
      { method: options.method, uri: path, origin: this.signer.serverName, destination, ...(options.body !== undefined ? { content: options.body } : {}) },
      this.signer.key,
    );
    return requestJson(`${target.baseUrl}${path}`, {
      method: options.method,
      ...(options.body !== undefined ? { body: options.body } : {}),
      host: target.host,
      tlsName: target.tlsName,
      timeoutMs: Math.max(1, Math.floor(remaining)),
      maxBytes: options.maxBytes ?? MAX_RESPONSE_BYTES,
      ca: this.ca,
      addresses: this.overrides[destination] === undefined ? this.addresses : undefined,
      authorization,
      agents: this.agents,
    }).catch((e: unknown) => Promise.reject(cutShort(e)));
  }

  /** Closes kept-alive connections (at shutdown). */
  close(): void {
    this.agents.http.destroy();
    this.agents.https.destroy();
  }

  /** A request to `serverName` at `path` (an unauthenticated key API request). */
  async request(serverName: string, path: string, options: { method?: 'GET' | 'POST'; body?: unknown } = {}): Promise<FederationResponse> {
    const target = await this.discovery.resolve(serverName);
    return requestJson(`${target.baseUrl}${path}`, {
      ...options,
      host: target.host,
      tlsName: target.tlsName,
      timeoutMs: this.timeoutMs,
      maxBytes: MAX_RESPONSE_BYTES,
      ca: this.ca,
      // Operator-configured URLs may point anywhere; discovered addresses may not.
      addresses: this.overrides[serverName] === undefined ? this.addresses : undefined,
    });
  }
}
