/**
 * Server discovery (server-server API, "Resolving server names"): from a server name to where to
 * connect, which Host header to send and which name the TLS certificate must carry.
 *
 *   1. IP literal → that IP, the given port or 8448.
 *   2. Explicit port → hostname:port.
 *   3. /.well-known/matrix/server → the delegated name, then 3.1–3.5 (IP, port, SRV
 *      _matrix-fed._tcp, SRV _matrix._tcp, port 8448), certificate for the delegated hostname.
 *   4/5. SRV _matrix-fed._tcp.<hostname>, then _matrix._tcp.<hostname>.
 *   6. hostname:8448.
 *
 * `federation.resolve` overrides all of this with a fixed base URL per server name. Well-known
 * answers are cached as the spec recommends: Cache-Control max-age (at most 48 h), 24 h without
 * one, errors for 1 h.
 */
import { parseServerName } from '../matrix/ids.js';

export interface ResolvedServer {
  /** `https://host:port` (or the override URL), without a trailing slash. */
  readonly baseUrl: string;
  /** The Host header to send. */
  readonly host: string;
  /** The name the TLS certificate must be valid for (a hostname or an IP address). */
  readonly tlsName: string;
}

export interface SrvRecord {
  readonly name: string;
  readonly port: number;
  readonly priority: number;
  readonly weight: number;
}

export interface WellKnownResult {
  /** The `m.server` value, when the response was valid. */
  readonly server: string | undefined;
  /** How long to cache this answer, in ms. */
  readonly cacheMs: number;
}

/** The network operations discovery needs; tests can hand in their own. */
export interface DiscoveryNetwork {
  fetchWellKnown(hostname: string): Promise<WellKnownResult>;
  resolveSrv(name: string): Promise<SrvRecord[]>;
}

export const WELL_KNOWN_DEFAULT_CACHE_MS = 24 * 3_600_000;
export const WELL_KNOWN_MAX_CACHE_MS = 48 * 3_600_000;
export const WELL_KNOWN_ERROR_CACHE_MS = 3_600_000;

const bare = (host: string) => (host.startsWith('[') ? host.slice(1, -1) : host);

function direct(hostname: string, port: number, hostHeader: string, tlsName: string): ResolvedServer {
  return { baseUrl: `https://${hostname}:${port}`, host: hostHeader, tlsName: bare(tlsName) };
}

/** The SRV record to use: lowest priority, then the highest weight (good enough without load spreading). */
function pickSrv(records: readonly SrvRecord[]): SrvRecord | undefined {
  return [...records].filter((r) => r.name !== '.' && r.name !== '').sort((a, b) => a.priority - b.priority || b.weight - a.weight)[0];
}

export class ServerDiscovery {
  private readonly wellKnownCache = new Map<string, { server: string | undefined; until: number }>();

  constructor(
    private readonly network: DiscoveryNetwork,
    private readonly overrides: Readonly<Record<string, string>> = {},
    private readonly now: () => number = Date.now,
  ) {}

  private async wellKnown(hostname: string): Promise<string | undefined> {
    const cached = this.wellKnownCache.get(hostname);
    if (cached && cached.until > this.now()) return cached.server;
    let result: WellKnownResult;
    try {
      result = await this.network.fetchWellKnown(hostname);
    } catch {
      result = { server: undefined, cacheMs: WELL_KNOWN_ERROR_CACHE_MS };
    }
    if (this.wellKnownCache.size > 10_000) this.wellKnownCache.clear();
    this.wellKnownCache.set(hostname, { server: result.server, until: this.now() + result.cacheMs });
    return result.server;
  }

  private async srv(hostname: string): Promise<SrvRecord | undefined> {
    for (const service of ['_matrix-fed._tcp', '_matrix._tcp']) {
      try {
        const record = pickSrv(await this.network.resolveSrv(`${service}.${hostname}`));
        if (record) return record;
      } catch {
        // No such record (or DNS trouble): try the next step.
      }
    }
    return undefined;
  }

  /** Where to reach `serverName`. Throws when the name is not a valid server name. */
  async resolve(serverName: string): Promise<ResolvedServer> {
    const override = this.overrides[serverName];
    if (override !== undefined) {
      const url = new URL(override);
      return { baseUrl: override.replace(/\/+$/, ''), host: url.host, tlsName: bare(url.hostname) };
    }
    const parts = parseServerName(serverName);
    if (!parts) throw new Error(`"${serverName}" is not a valid server name`);
    // 1. IP literal; 2. explicit port.
    if (parts.kind !== 'dns') return direct(parts.host, parts.port ?? 8448, serverName, parts.host);
    if (parts.port !== undefined) return direct(parts.host, parts.port, serverName, parts.host);

    // 3. .well-known delegation.
    const delegated = await this.wellKnown(parts.host);
    const d = delegated === undefined ? undefined : parseServerName(delegated);
    if (d) {
      if (d.kind !== 'dns') return direct(d.host, d.port ?? 8448, delegated!, d.host);
      if (d.port !== undefined) return direct(d.host, d.port, delegated!, d.host);
      const record = await this.srv(d.host);
      if (record) return direct(record.name, record.port, d.host, d.host);
      return direct(d.host, 8448, d.host, d.host);
    }
    // 4, 5. SRV for the server name itself; 6. port 8448.
    const record = await this.srv(parts.host);
    if (record) return direct(record.name, record.port, parts.host, parts.host);
    return direct(parts.host, 8448, parts.host, parts.host);
  }
}

/** max-age from a Cache-Control header, clamped to the spec's recommended maximum. */
export function wellKnownCacheMs(cacheControl: string | undefined): number {
  if (cacheControl && /no-store|no-cache/i.test(cacheControl)) return 0;
  const m = cacheControl ? /max-age=(\d+)/i.exec(cacheControl) : null;
  if (!m) return WELL_KNOWN_DEFAULT_CACHE_MS;
  return Math.min(Number(m[1]) * 1000, WELL_KNOWN_MAX_CACHE_MS);
}

/** Validates a `/.well-known/matrix/server` body: `{"m.server": "<server name>"}`. */
export function parseWellKnownServer(body: unknown): string | undefined {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return undefined;
  const server = (body as Record<string, unknown>)['m.server'];
  return typeof server === 'string' && parseServerName(server) ? server : undefined;
}
