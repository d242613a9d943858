/**
 * Outbound HTTP to other Matrix servers: discovery (server names → address, Host, TLS name),
 * HTTPS with certificate checks against the right name (plus an optional extra CA), timeouts and
 * a response size limit. Used to fetch server keys; the requests it makes need no X-Matrix.
 */
import { request as httpsRequest } from 'node:https';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { checkServerIdentity, rootCertificates, type PeerCertificate } from 'node:tls';
import { isIP } from 'node:net';
import { resolveSrv } from 'node:dns/promises';
import { VERSION } from '../version.js';
import { parseWellKnownServer, ServerDiscovery, wellKnownCacheMs, WELL_KNOWN_ERROR_CACHE_MS, type DiscoveryNetwork, type WellKnownResult } from './discovery.js';

export interface FederationResponse {
  readonly status: number;
  readonly body: unknown;
  readonly headers: IncomingMessage['headers'];
}

export class FederationRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FederationRequestError';
  }
}

export interface HttpGetOptions {
  readonly method?: 'GET' | 'POST';
  readonly body?: unknown;
  /** Host header; defaults to the URL's host. */
  readonly host?: string;
  /** Name the server certificate must be valid for; defaults to the URL's hostname. */
  readonly tlsName?: string;
  readonly timeoutMs: number;
  readonly maxBytes: number;
  readonly ca: readonly string[] | undefined;
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
    ...(payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {}),
  };
  return new Promise((resolve, reject) => {
    const req = (secure ? httpsRequest : httpRequest)(
      {
        protocol: u.protocol,
        hostname: u.hostname.replace(/^\[|\]$/g, ''),
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
    req.on('timeout', () => req.destroy(new FederationRequestError(`no answer from ${u.host} within ${options.timeoutMs} ms`)));
    req.on('error', (e) => reject(e instanceof FederationRequestError ? e : new FederationRequestError(`cannot reach ${u.host}: ${(e as Error).message}`)));
    req.end(payload);
  });
}

export interface FederationClientOptions {
  /** Static base URLs per server name (`federation.resolve`). */
  readonly resolve: Readonly<Record<string, string>>;
  /** Extra CA certificates (PEM) trusted besides the system ones. */
  readonly extraCa?: string | undefined;
  readonly timeoutMs?: number;
  /** Discovery's network operations; defaults to real HTTPS and DNS. */
  readonly network?: DiscoveryNetwork;
}

const MAX_RESPONSE_BYTES = 1024 * 1024;

export class FederationClient {
  readonly discovery: ServerDiscovery;
  private readonly ca: readonly string[] | undefined;
  private readonly timeoutMs: number;

  constructor(options: FederationClientOptions) {
    this.ca = options.extraCa ? [...rootCertificates, options.extraCa] : undefined;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.discovery = new ServerDiscovery(options.network ?? this.realNetwork(), options.resolve);
  }

  private realNetwork(): DiscoveryNetwork {
    return {
      resolveSrv: (name) => resolveSrv(name),
      fetchWellKnown: (hostname) => this.fetchWellKnown(hostname),
    };
  }

  /** GET https://<hostname>/.well-known/matrix/server, following up to 5 redirects. */
  private async fetchWellKnown(hostname: string): Promise<WellKnownResult> {
    let url = `https://${hostname}/.well-known/matrix/server`;
    for (let hop = 0; hop < 5; hop++) {
      const r = await requestJson(url, { timeoutMs: this.timeoutMs, maxBytes: 64 * 1024, ca: this.ca }).catch(() => undefined);
      if (!r) return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
      const location = r.headers.location;
      if (r.status >= 300 && r.status < 400 && typeof location === 'string') {
        url = new URL(location, url).toString();
        continue;
      }
      if (r.status !== 200) return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
      const server = parseWellKnownServer(r.body);
      return { server, cacheMs: server === undefined ? WELL_KNOWN_ERROR_CACHE_MS : wellKnownCacheMs(r.headers['cache-control']) };
    }
    return { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
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
    });
  }
}
