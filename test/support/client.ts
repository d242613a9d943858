/** Client-side helpers for tests: accounts over real HTTP, the way admin tools and clients do it. */
import { createHmac } from 'node:crypto';
import assert from 'node:assert/strict';
import { http } from './http.js';
import type { TestServer } from './server.js';

export const SHARED_SECRET = 'test-shared-secret';

export interface Session {
  readonly userId: string;
  readonly accessToken: string;
  readonly deviceId: string;
  readonly password: string;
}

export function registrationMac(secret: string, nonce: string, username: string, password: string, admin: boolean): string {
  return createHmac('sha1', secret).update(`${nonce}\0${username}\0${password}\0${admin ? 'admin' : 'notadmin'}`).digest('hex');
}

/** Registers a user through Synapse's shared-secret admin API (the server needs SHARED_SECRET). */
export async function registerUser(server: TestServer, username: string, password = `pw-${username}`, admin = false): Promise<Session> {
  let nonce = await http<{ nonce: string; retry_after_ms?: number }>(server.url, 'GET', '/_synapse/admin/v1/register');
  // Nonces are rate-limited per address (20 at once, then 2 a second): a test registering many
  // users waits as the server asks, as an admin script would.
  while (nonce.status === 429) {
    await new Promise((r) => setTimeout(r, nonce.body.retry_after_ms ?? 500));
    nonce = await http(server.url, 'GET', '/_synapse/admin/v1/register');
  }
  const { status, text, body } = nonce;
  assert.equal(status, 200, `GET /_synapse/admin/v1/register: ${text}`);
  const r = await http(server.url, 'POST', '/_synapse/admin/v1/register', {
    body: { nonce: body.nonce, username, password, admin, mac: registrationMac(SHARED_SECRET, body.nonce, username, password, admin) },
  });
  assert.equal(r.status, 200, r.text);
  return { userId: r.body['user_id'] as string, accessToken: r.body['access_token'] as string, deviceId: r.body['device_id'] as string, password };
}

export async function login(server: TestServer, user: string, password: string, extra: Record<string, unknown> = {}): Promise<Session> {
  const r = await http(server.url, 'POST', '/_matrix/client/v3/login', {
    body: { type: 'm.login.password', identifier: { type: 'm.id.user', user }, password, ...extra },
  });
  assert.equal(r.status, 200, r.text);
  return { userId: r.body['user_id'] as string, accessToken: r.body['access_token'] as string, deviceId: r.body['device_id'] as string, password };
}

/** The user-interactive auth dict for a password stage. */
export function passwordAuth(session: Session, uiaSession?: string): Record<string, unknown> {
  return {
    type: 'm.login.password',
    identifier: { type: 'm.id.user', user: session.userId },
    password: session.password,
    ...(uiaSession ? { session: uiaSession } : {}),
  };
}

/** Asserts a Matrix error response: the status, the errcode, a human message (matching `message` if given). */
export function expectMatrixError(r: { status: number; body: Record<string, unknown>; text?: string }, status: number, errcode: string, message?: RegExp): void {
  const shown = r.text ?? JSON.stringify(r.body);
  assert.equal(r.status, status, shown);
  assert.equal(r.body['errcode'], errcode, shown);
  assert.equal(typeof r.body['error'], 'string', shown);
  if (message) assert.match(String(r.body['error']), message);
}

/** A pattern that matches exactly `text` (for error messages that contain user IDs or base64 keys). */
export function exactly(text: string): RegExp {
  return new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`);
}
