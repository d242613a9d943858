/**
 * Many fake remote homeservers in one process, for bench/federation-out.ts (run in a child process
 * of its own, so they do not share the event loop with the harness or mxkeys). Each fake has its
 * own server name and Ed25519 key, publishes /_matrix/key/v2/server, and:
 *  - answers GET /user/devices/{userId} and POST /user/keys/query after `delay` ms (one device per user);
 *  - accepts PUT /send/{txnId} and records, per user, the highest m.device_list_update stream_id,
 *    and counts the to-device messages of m.direct_to_device EDUs (and repeated message_ids).
 * A control listener takes commands:
 *  - POST /subscribe {mxkeys, users}: every fake reads every user's list from mxkeys (signed GET
 *    /user/devices), which subscribes it; answers the stream_ids seen;
 *  - GET /progress: per fake and user the highest stream_id received, EDU and transaction counts,
 *    the largest transaction, and when the first and last EDU arrived; per fake the to-device
 *    messages received, with the m.direct_to_device EDUs, repeats and when the last one arrived.
 *
 *   node --import tsx bench/fake-servers.ts <count> <delay ms>   → prints one JSON line: {control, servers: {name: url}}
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { generateSigningKey, signJson } from '../src/matrix/signing.js';
import { signRequest } from '../src/federation/xmatrix.js';

type Json = Record<string, unknown>;
const [count, delay] = [Number(process.argv[2] ?? 10), Number(process.argv[3] ?? 0)];

interface Fake {
  readonly name: string;
  url: string;
  readonly key: ReturnType<typeof generateSigningKey>;
  readonly seen: Map<string, number>;
  edus: number;
  transactions: number;
  largest: number;
  toDeviceMessages: number;
  toDeviceEdus: number;
  readonly messageIds: Set<string>;
  repeatedMessageIds: number;
}

let firstEduAt = 0;
let lastEduAt = 0;
let lastToDeviceAt = 0;

function readBody(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve) => {
    let text = '';
    req.on('data', (c: Buffer) => (text += c.toString()));
    req.on('end', () => {
      try {
        resolve(text ? JSON.parse(text) : undefined);
      } catch {
        resolve(undefined);
      }
    });
  });
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const later = (ms: number) => new Promise((r) => setTimeout(r, ms));

function deviceKeys(userId: string): Json {
  return { user_id: userId, device_id: 'FAKEDEV', algorithms: ['m.olm.v1.curve25519-aes-sha2'], keys: { 'curve25519:FAKEDEV': 'A'.repeat(43), 'ed25519:FAKEDEV': 'B'.repeat(43) }, signatures: {} };
}

async function handle(fake: Fake, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = req.url ?? '';
  if (url === '/_matrix/key/v2/server') {
    const body = { server_name: fake.name, valid_until_ts: Date.now() + 3_600_000, verify_keys: { [fake.key.keyId]: { key: fake.key.publicKey } }, old_verify_keys: {} };
    return send(res, 200, signJson(body, fake.name, fake.key));
  }
  const body = await readBody(req);
  if (req.method === 'PUT' && url.startsWith('/_matrix/federation/v1/send/')) {
    const edus = ((body as Json | undefined)?.['edus'] as Json[] | undefined) ?? [];
    fake.transactions++;
    fake.largest = Math.max(fake.largest, edus.length);
    for (const edu of edus) {
      if (edu['edu_type'] === 'm.direct_to_device') {
        const c = edu['content'] as { message_id: string; messages: Record<string, Record<string, unknown>> };
        fake.toDeviceEdus++;
        if (fake.messageIds.has(c.message_id)) fake.repeatedMessageIds++;
        else {
          fake.messageIds.add(c.message_id);
          for (const devices of Object.values(c.messages)) fake.toDeviceMessages += Object.keys(devices).length;
        }
        lastToDeviceAt = Date.now();
        continue;
      }
      if (edu['edu_type'] !== 'm.device_list_update') continue;
      const c = edu['content'] as { user_id: string; stream_id: number };
      fake.edus++;
      fake.seen.set(c.user_id, Math.max(fake.seen.get(c.user_id) ?? 0, c.stream_id));
      lastEduAt = Date.now();
      firstEduAt ||= lastEduAt;
    }
    return send(res, 200, { pdus: {} });
  }
  if (req.method === 'GET' && url.startsWith('/_matrix/federation/v1/user/devices/')) {
    await later(delay);
    const userId = decodeURIComponent(url.split('/').pop()!);
    return send(res, 200, { user_id: userId, stream_id: 1, devices: [{ device_id: 'FAKEDEV', keys: deviceKeys(userId) }] });
  }
  if (req.method === 'POST' && url === '/_matrix/federation/v1/user/keys/query') {
    await later(delay);
    const users = Object.keys(((body as Json | undefined)?.['device_keys'] as Json | undefined) ?? {});
    return send(res, 200, { device_keys: Object.fromEntries(users.map((u) => [u, { FAKEDEV: deviceKeys(u) }])) });
  }
  send(res, 404, { errcode: 'M_UNRECOGNIZED', error: 'not here' });
}

async function subscribe(fakes: readonly Fake[], mxkeys: string, destination: string, users: readonly string[]): Promise<Record<string, number>> {
  const streams: Record<string, number> = {};
  // A few servers at a time: mxkeys fetches each one's signing key first, and bounds those fetches.
  for (let i = 0; i < fakes.length; i += 10) await Promise.all(
    fakes.slice(i, i + 10).map(async (fake) => {
      for (const userId of users) {
        const path = `/_matrix/federation/v1/user/devices/${encodeURIComponent(userId)}`;
        const authorization = signRequest({ method: 'GET', uri: path, origin: fake.name, destination }, fake.key);
        const r = await fetch(mxkeys + path, { headers: { authorization } });
        const answer = (await r.json()) as Json;
        if (r.status !== 200) throw new Error(`${fake.name} could not read ${userId}: ${r.status} ${JSON.stringify(answer)}`);
        streams[userId] = answer['stream_id'] as number;
      }
    }),
  );
  return streams;
}

async function main(): Promise<void> {
  const fakes: Fake[] = [];
  for (let i = 0; i < count; i++) {
    const fake: Fake = {
      name: `fake${i}.bench`,
      url: '',
      key: generateSigningKey('fake'),
      seen: new Map(),
      edus: 0,
      transactions: 0,
      largest: 0,
      toDeviceMessages: 0,
      toDeviceEdus: 0,
      messageIds: new Set(),
      repeatedMessageIds: 0,
    };
    const server = createServer((req, res) => void handle(fake, req, res));
    server.keepAliveTimeout = 60_000;
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    fake.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    fakes.push(fake);
  }
  const control = createServer((req, res) => {
    void (async () => {
      if (req.method === 'POST' && req.url === '/subscribe') {
        const { mxkeys, destination, users } = (await readBody(req)) as { mxkeys: string; destination: string; users: string[] };
        try {
          send(res, 200, await subscribe(fakes, mxkeys, destination, users));
        } catch (e) {
          send(res, 500, { error: (e as Error).message });
        }
        return;
      }
      if (req.url === '/progress') {
        return send(res, 200, {
          servers: Object.fromEntries(fakes.map((f) => [f.name, Object.fromEntries(f.seen)])),
          edus: fakes.reduce((n, f) => n + f.edus, 0),
          transactions: fakes.reduce((n, f) => n + f.transactions, 0),
          largestTransaction: Math.max(...fakes.map((f) => f.largest)),
          firstEduAt,
          lastEduAt,
          toDevice: Object.fromEntries(fakes.map((f) => [f.name, { messages: f.toDeviceMessages, edus: f.toDeviceEdus, repeated: f.repeatedMessageIds }])),
          lastToDeviceAt,
        });
      }
      send(res, 404, {});
    })();
  });
  await new Promise<void>((resolve) => control.listen(0, '127.0.0.1', resolve));
  process.stdout.write(`${JSON.stringify({ control: `http://127.0.0.1:${(control.address() as AddressInfo).port}`, servers: Object.fromEntries(fakes.map((f) => [f.name, f.url])) })}\n`);
}

void main();
