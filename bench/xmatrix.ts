/**
 * Federation requests for the benchmarks: a remote server of our own (its signing key, and
 * /_matrix/key/v2/server answered from the harness process) and requests signed by it, each over
 * its own URI (a distinct `?n=`) so that every request costs mxkeys one Ed25519 verification.
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { canonical } from '../test/support/keys.js';
import type { BenchRequest } from './load.js';
import { Ed25519Key } from './support.js';

export interface Origin {
  readonly name: string;
  readonly url: string;
  readonly key: Ed25519Key;
  stop(): void;
}

/** A remote server answering /_matrix/key/v2/server; mxkeys finds it through `federation.resolve`. */
export async function startOrigin(): Promise<Origin> {
  const key = new Ed25519Key();
  let name = '';
  const server = createServer((req, res) => {
    req.resume();
    const body = { server_name: name, valid_until_ts: Date.now() + 3_600_000, verify_keys: { 'ed25519:bench': { key: key.publicKey } }, old_verify_keys: {} };
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(key.sign(body, name, 'ed25519:bench')));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  name = `origin-${port}.example`;
  return { name, url: `http://127.0.0.1:${port}`, key, stop: () => server.close() };
}

/** Numbers the signed URIs: requests signed in one run of the harness never repeat. */
let nextUri = 0;

/** `count` POST requests to `path` from `origin` to `destination`, each signed over its own URI. */
export function presign(origin: Origin, destination: string, path: string, body: string, count: number): BenchRequest[] {
  const content = JSON.parse(body) as unknown;
  const out: BenchRequest[] = [];
  for (let i = 0; i < count; i++) {
    const uri = `${path}?n=${nextUri++}`;
    const sig = origin.key.signText(canonical({ content, destination, method: 'POST', origin: origin.name, uri }));
    out.push({ path: uri, body, headers: { Authorization: `X-Matrix origin="${origin.name}",destination="${destination}",key="ed25519:bench",sig="${sig}"` } });
  }
  return out;
}
