/**
 * Passwords, access tokens and generated IDs.
 *
 * Passwords are hashed with scrypt (memory-hard; by default N=2^17, r=8, p=1: 128 MiB and about
 * half a second per hash) and stored as `scrypt$<N>$<r>$<p>$<salt>$<hash>`, so a hash made with
 * another cost still verifies, and is replaced at the next successful login. Access tokens carry
 * 256 random bits; only their SHA-256 is stored.
 */
import { createHash, randomBytes, randomInt, scrypt, timingSafeEqual } from 'node:crypto';
import { serviceUnavailable } from '../matrix/errors.js';
import { Slots, SlotsBusy } from '../matrix/slots.js';

export const DEFAULT_SCRYPT_LOG_N = 17;
const R = 8;
const P = 1;
const KEY_LENGTH = 32;
/**
 * Hashes running at once per process: each takes 128·N·r bytes (128 MiB at the default cost) and
 * a libuv thread for its whole run, and the thread pool (4 threads by default) also checks
 * federation request signatures. Others wait their turn.
 */
export const MAX_CONCURRENT_HASHES = 2;
const HASH_WAIT_MS = 60_000;

function scryptAsync(password: string, salt: Buffer, n: number, r: number, p: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    // maxmem: scrypt needs 128·N·r bytes; Node refuses more than 32 MiB unless told.
    scrypt(password.normalize('NFKC'), salt, KEY_LENGTH, { N: n, r, p, maxmem: 256 * n * r }, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

export interface PasswordCheck {
  readonly ok: boolean;
  /** The stored hash was made with another cost than the current one: hash the password again. */
  readonly outdated: boolean;
}

export class PasswordHasher {
  private readonly n: number;
  private readonly slots = new Slots();
  /** A hash of a random password: checked against when the user does not exist, to take the same time. */
  private dummyHash: Promise<string> | undefined;

  constructor(logN: number = DEFAULT_SCRYPT_LOG_N) {
    this.n = 2 ** logN;
  }

  private async limited<T>(work: () => Promise<T>): Promise<T> {
    let release;
    try {
      release = await this.slots.acquire([{ key: 'scrypt', limit: MAX_CONCURRENT_HASHES, queue: 1000 }], HASH_WAIT_MS);
    } catch (e) {
      if (e instanceof SlotsBusy) throw serviceUnavailable('The server is busy checking passwords; try again shortly', 5000);
      throw e;
    }
    try {
      return await work();
    } finally {
      release();
    }
  }

  async hash(password: string): Promise<string> {
    const salt = randomBytes(16);
    const key = await this.limited(() => scryptAsync(password, salt, this.n, R, P));
    return `scrypt$${this.n}$${R}$${P}$${salt.toString('base64')}$${key.toString('base64')}`;
  }

  /** Compares in constant time. `hash` null or undefined (no such user, or no password) is never a match. */
  async verify(password: string, hash: string | null | undefined): Promise<PasswordCheck> {
    const stored = hash ?? (await (this.dummyHash ??= this.hash(randomBytes(16).toString('hex'))));
    const parts = stored.split('$');
    if (parts.length !== 6 || parts[0] !== 'scrypt') return { ok: false, outdated: false };
    const [n, r, p] = [Number(parts[1]), Number(parts[2]), Number(parts[3])];
    const expected = Buffer.from(parts[5]!, 'base64');
    const actual = await this.limited(() => scryptAsync(password, Buffer.from(parts[4]!, 'base64'), n, r, p));
    const ok = actual.length === expected.length && timingSafeEqual(actual, expected) && hash !== null && hash !== undefined;
    return { ok, outdated: ok && (n !== this.n || r !== R || p !== P) };
  }
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
