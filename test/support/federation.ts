/**
 * Several real mxkeys servers federating with each other over loopback for tests: each has its own
 * database, server name and port, and finds the others through `federation.resolve`. Optionally a
 * counting proxy stands in front of a server, so a test can see what requests reach it.
 */
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after } from 'node:test';
import { startServer, type TestServer } from './server.js';
import { SHARED_SECRET } from './client.js';
import type { Backend } from './backends.js';

/** A port that was free a moment ago (servers need to know each other's addresses before they start). */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

/** Settings that make federation tests quick: short retry waits, no long backoff. */
export const QUICK_FEDERATION = {
  destination_min_retry_interval: 200,
  destination_max_retry_interval: 1000,
};

const proxies: CountingProxy[] = [];
after(async () => {
  for (const p of proxies.splice(0)) await p.stop();
});

/** An HTTP proxy that forwards everything to `target` and remembers each request's method and path. */
export class CountingProxy {
  readonly requests: { method: string; path: string }[] = [];
  /** When false, connections are refused (the server looks down). */
  up = true;
  private server!: Server;
  url = '';

  /** Where requests go; may be set after start (the proxy's address is needed before its target's). */
  private constructor(public target: string) {}

  static async start(target: string, port = 0): Promise<CountingProxy> {
    const p = new CountingProxy(target);
    p.server = createServer((req, res) => p.forward(req, res));
    await new Promise<void>((resolve) => p.server.listen(port, '127.0.0.1', resolve));
    p.url = `http://127.0.0.1:${(p.server.address() as AddressInfo).port}`;
    proxies.push(p);
    return p;
  }

  /** Requests whose path starts with `prefix`. */
  count(prefix: string): number {
    return this.requests.filter((r) => r.path.startsWith(prefix)).length;
  }

  private forward(req: IncomingMessage, res: ServerResponse): void {
    if (!this.up) {
      req.socket.destroy();
      return;
    }
    this.requests.push({ method: req.method ?? '', path: req.url ?? '' });
    const target = new URL(this.target);
    const out = request({ hostname: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    out.on('error', () => res.destroy());
    req.pipe(out);
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

export interface Federation {
  readonly servers: TestServer[];
  /** The proxy in front of each server, as the other servers reach it. */
  readonly proxies: CountingProxy[];
}

/**
 * Starts `names.length` servers that federate with each other; each one's peers reach it through
 * a counting proxy. `config` is added to every server's configuration.
 */
export async function startFederation(
  backend: Backend,
  names: readonly string[],
  config: Record<string, unknown> = {},
  /** More servers every one of them can reach (name → base URL). */
  others: Record<string, string> = {},
): Promise<Federation> {
  // The proxies start first, as every server must know the others' addresses; each server then
  // listens on a port of its own choosing (no free-port race) and its proxy is pointed at it.
  const fronts = await Promise.all(names.map(() => CountingProxy.start('')));
  const servers: TestServer[] = [];
  for (const [i, name] of names.entries()) {
    const resolve = { ...others, ...Object.fromEntries(names.flatMap((other, j) => (j === i ? [] : [[other, fronts[j]!.url]]))) };
    const federation = { ...QUICK_FEDERATION, ...((config['federation'] as object | undefined) ?? {}), resolve };
    servers.push(
      await startServer({
        backend,
        config: { registration_shared_secret: SHARED_SECRET, ...config, server_name: name, listen: { host: '127.0.0.1', port: 0 }, federation },
      }),
    );
    fronts[i]!.target = servers[i]!.url;
  }
  return { servers, proxies: fronts };
}

/** Polls `check` until it returns a value that is not undefined, or fails after `ms`. */
export async function eventually<T>(what: string, check: () => Promise<T | undefined>, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
