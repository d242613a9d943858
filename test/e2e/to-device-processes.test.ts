/**
 * To-device messages across processes: EDUs queued for another server survive kill -9 of the
 * sender, also after the receiver took them but before the sender heard so, and each message
 * reaches its device exactly once; a waiting /sync is woken by a message sent through another
 * process on the same database.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, request, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { describeEachBackend, tempDir } from '../support/backends.js';
import { http, startServer, type TestServer } from '../support/server.js';
import { registerUser, SHARED_SECRET, type Session } from '../support/client.js';
import { startServerProcess, type ServerProcess } from '../support/process.js';
import { writeClusterConfig } from '../support/cluster.js';
import { eventually, freePort, QUICK_FEDERATION } from '../support/federation.js';

const C = '/_matrix/client/v3';
type Json = Record<string, unknown>;

const at = (url: string) => ({ url }) as TestServer;

/**
 * The receiving server's front door, as the sender reaches it. `down`: connections are refused.
 * `forward`: requests go to the server and its answers back. `swallow`: requests go to the
 * server, which processes them, but the sender never gets the answer (the connection is cut), as
 * when the sender dies just before reading it. Records each m.direct_to_device EDU the server
 * answered 200 for.
 */
class Door {
  mode: 'down' | 'forward' | 'swallow' = 'forward';
  /** message_id → the content of each delivery the receiving server accepted. */
  readonly accepted = new Map<string, string[]>();
  private server!: Server;
  url = '';

  static async start(target: string): Promise<Door> {
    const d = new Door(target);
    d.server = createServer((req, res) => d.handle(req, res));
    await new Promise<void>((resolve) => d.server.listen(0, '127.0.0.1', resolve));
    d.url = `http://127.0.0.1:${(d.server.address() as AddressInfo).port}`;
    doors.push(d);
    return d;
  }

  private constructor(private readonly target: string) {}

  private handle(req: IncomingMessage, res: ServerResponse): void {
    if (this.mode === 'down') {
      req.socket.destroy();
      return;
    }
    const swallow = this.mode === 'swallow';
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const target = new URL(this.target);
      const out = request({ hostname: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
        const parts: Buffer[] = [];
        answer.on('data', (c: Buffer) => parts.push(c));
        answer.on('end', () => {
          if (answer.statusCode === 200 && req.method === 'PUT' && req.url?.startsWith('/_matrix/federation/v1/send/')) this.record(body);
          if (swallow) {
            res.socket?.destroy();
            return;
          }
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          res.end(Buffer.concat(parts));
        });
      });
      out.on('error', () => res.destroy());
      out.end(body);
    });
  }

  private record(body: Buffer): void {
    for (const edu of ((JSON.parse(body.toString()) as Json)['edus'] as Json[] | undefined) ?? []) {
      if (edu['edu_type'] !== 'm.direct_to_device') continue;
      const content = edu['content'] as Json;
      const id = content['message_id'] as string;
      this.accepted.set(id, [...(this.accepted.get(id) ?? []), JSON.stringify(content['messages'])]);
    }
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

const doors: Door[] = [];
after(async () => {
  for (const d of doors.splice(0)) await d.stop();
});

async function stopProcess(p: ServerProcess): Promise<void> {
  p.child.kill('SIGTERM');
  assert.equal(await p.exited, 0, p.output());
}

async function kill9(p: ServerProcess): Promise<void> {
  p.child.kill('SIGKILL');
  await p.exited;
}

describeEachBackend('to-device messages across processes', (backend) => {
  test('messages queued for another server survive kill -9 of the sender, also after that server took them unanswered, and each reaches its device exactly once, in order', async () => {
    // hs2 here; hs1 a child process (restarted on the same port, database and key), reaching hs2 through a door.
    const [port1, port2] = [await freePort(), await freePort()];
    const door = await Door.start(`http://127.0.0.1:${port2}`);
    const hs2 = await startServer({
      backend,
      config: { server_name: 'hs2.test', registration_shared_secret: SHARED_SECRET, listen: { host: '127.0.0.1', port: port2 }, federation: { ...QUICK_FEDERATION, resolve: { 'hs1.test': `http://127.0.0.1:${port1}` } } },
    });
    const config = writeClusterConfig(await backend.freshDatabase(), { server_name: 'hs1.test', log_requests: false, federation: { ...QUICK_FEDERATION, resolve: { 'hs2.test': door.url } } });
    const startHs1 = () => startServerProcess(['--config', config], { env: { MXKEYS_LISTEN_PORT: String(port1) } });
    let hs1 = await startHs1();

    const alice = await registerUser(at(hs1.url), 'alice');
    const bob = await registerUser(hs2, 'bob');
    let since = (await http(hs2.url, 'GET', `${C}/sync`, { token: bob.accessToken })).body['next_batch'] as string;
    const sendToBob = async (n: number) => {
      const r = await http(hs1.url, 'PUT', `${C}/sendToDevice/org.example.note/n${n}`, { token: alice.accessToken, body: { messages: { [bob.userId]: { [bob.deviceId]: { n } } } } });
      assert.equal(r.status, 200, r.text);
    };

    // 1. hs2 is unreachable: five messages wait in hs1's queue; hs1 is killed.
    door.mode = 'down';
    for (let n = 1; n <= 5; n++) await sendToBob(n);
    await eventually('a failed attempt to send', async () => (hs1.output().includes('a destination did not answer') ? true : undefined));
    await kill9(hs1);

    // 2. hs2 takes them, but hs1 never hears so; hs1 is killed again, its queue untouched.
    door.mode = 'swallow';
    hs1 = await startHs1();
    await eventually('hs2 took the five messages', async () => (door.accepted.size === 5 ? true : undefined), 20_000);
    await kill9(hs1);

    // 3. Back to normal: hs1 sends its queue again, then a sixth message.
    door.mode = 'forward';
    hs1 = await startHs1();
    await sendToBob(6);
    const received: number[] = [];
    await eventually(
      'the sixth message at bob',
      async () => {
        const r = await http(hs2.url, 'GET', `${C}/sync?since=${since}&timeout=1000`, { token: bob.accessToken });
        assert.equal(r.status, 200, r.text);
        since = r.body['next_batch'] as string;
        for (const e of (r.body['to_device'] as Json)['events'] as Json[]) received.push((e['content'] as { n: number }).n);
        return received.includes(6) ? true : undefined;
      },
      20_000,
    );
    assert.deepEqual(received, [1, 2, 3, 4, 5, 6], 'each message reached bob exactly once, in order');
    // hs2 took the first five twice (before the crash and after), each time the same EDU with the
    // same message_id: the message_id is what kept them from reaching bob twice.
    const deliveries = await eventually('six messages taken by hs2', async () => (door.accepted.size === 6 ? [...door.accepted.values()] : undefined));
    for (const d of deliveries) assert.equal(new Set(d).size, 1, 'a message_id always carried the same message');
    const times = new Map(deliveries.map((d) => [(JSON.parse(d[0]!) as Record<string, Record<string, { n: number }>>)[bob.userId]![bob.deviceId]!.n, d.length]));
    assert.deepEqual([1, 2, 3, 4, 5].map((n) => (times.get(n) ?? 0) >= 2), [true, true, true, true, true], `times hs2 took each message: ${JSON.stringify([...times])}`);
    await stopProcess(hs1);
    await hs2.close();
  });

});

describeEachBackend('a waiting /sync and another process on the same database', (backend) => {
  let other: ServerProcess;
  let here: TestServer;
  let alice: Session;
  let bob: Session;
  // Set up beforehand: starting a process takes seconds on a busy machine, and the test has a time limit.
  before(async () => {
    const database = await backend.freshDatabase();
    const dir = tempDir();
    other = await startServerProcess(['--config', writeClusterConfig(database, { log_requests: false }, dir)]);
    here = await startServer({ backend, database: database as Record<string, unknown>, signingKeyPath: join(dir, 'signing.key'), config: { registration_shared_secret: SHARED_SECRET } });
    bob = await registerUser(here, 'bob');
    alice = await registerUser(at(other.url), 'alice');
  });
  after(async () => {
    await stopProcess(other);
    await here.close();
  });

  test('a waiting /sync is woken by a message sent through another process', { timeout: 15_000 }, async () => {
    // The /sync asks to wait 25 s; the test's 15 s limit is far above a prompt answer and below a waited-out one.
    const since = (await http(here.url, 'GET', `${C}/sync`, { token: bob.accessToken })).body['next_batch'] as string;
    const poll = http(here.url, 'GET', `${C}/sync?since=${since}&timeout=25000`, { token: bob.accessToken });
    await new Promise((r) => setTimeout(r, 200)); // the poll is waiting on the server
    const sent = await http(other.url, 'PUT', `${C}/sendToDevice/org.example.ping/t1`, { token: alice.accessToken, body: { messages: { [bob.userId]: { [bob.deviceId]: { woke: true } } } } });
    assert.equal(sent.status, 200, sent.text);
    const answer = await poll;
    assert.equal(answer.status, 200, answer.text);
    assert.deepEqual(((answer.body['to_device'] as Json)['events'] as Json[]).map((e) => [e['sender'], e['content']]), [[alice.userId, { woke: true }]]);
  });
});
