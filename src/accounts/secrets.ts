/**
 * Passwords, access tokens and generated IDs.
 *
 * Passwords are hashed with scrypt (memory-hard; N=2^15, r=8, p=1: 32 MiB and tens of ms per
 * hash) and stored as `scrypt$<N>$<r>$<p>$<salt>$<hash>`, so the cost can be raised later without
 * invalidating old hashes. Access tokens carry 256 random bits; only their SHA-256 is stored.
 */
import { createHash, randomBytes, randomInt, scrypt, timingSafeEqual } from 'node:crypto';

const N = 2 ** 15;
const R = 8;
const P = 1;
const KEY_LENGTH = 32;

function scryptAsync(password: string, salt: Buffer, n: number, r: number, p: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(password.normalize('NFKC'), salt, KEY_LENGTH, { N: n, r, p, maxmem: 256 * n * r }, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

export async function hashPassword(password: string): Promise<string> {
  const salt = randomBytes(16);
  const key = await scryptAsync(password, salt, N, R, P);
  return `scrypt$${N}$${R}$${P}$${salt.toString('base64')}$${key.toString('base64')}`;
}

/** A hash of a random password: checked against when the user does not exist, to take the same time. */
let dummyHash: Promise<string> | undefined;

/** Compares in constant time. `hash` null or undefined (no such user, or no password) is never a match. */
export async function verifyPassword(password: string, hash: string | null | undefined): Promise<boolean> {
  const stored = hash ?? (await (dummyHash ??= hashPassword(randomBytes(16).toString('hex'))));
  const parts = stored.split('$');
  if (parts.length !== 6 || parts[0] !== 'scrypt') return false;
  const [n, r, p] = [Number(parts[1]), Number(parts[2]), Number(parts[3])];
  const expected = Buffer.from(parts[5]!, 'base64');
  const actual = await scryptAsync(password, Buffer.from(parts[4]!, 'base64'), n, r, p);
  return timingSafeEqual(actual, expected) && hash !== null && hash !== undefined;
}

export function newAccessToken(): string {
  return `mxk_${randomBytes(32).toString('base64url')}`;
}

/**
 * Recent tokens' hashes: every authenticated request hashes its token, and a client sends the same
 * one again and again (Synapse, too, keeps recent raw tokens in memory, keying its token cache
 * on them). Only tokens that hash to a stored token are remembered (rememberTokenHash).
 */
const tokenHashes = new Map<string, string>();

export function hashAccessToken(token: string): string {
  return tokenHashes.get(token) ?? createHash('sha256').update(token).digest('base64');
}

/** Remembers the hash of a token that authenticated someone. */
export function rememberTokenHash(token: string, hash: string): void {
  if (tokenHashes.size >= 10_000) tokenHashes.clear();
  tokenHashes.set(token, hash);
}

/** A device ID as Synapse makes them: ten random upper-case letters. */
export function newDeviceId(): string {
  let id = '';
  for (let i = 0; i < 10; i++) id += String.fromCharCode(65 + randomInt(26));
  return id;
}

export function newOpaqueId(bytes = 18): string {
  return randomBytes(bytes).toString('base64url');
}

/** Whether `id` looks like one of ours (base64url); anything else was never issued and is not looked up. */
export function isOpaqueId(id: string): boolean {
  return /^[A-Za-z0-9_-]{1,64}$/.test(id);
}
