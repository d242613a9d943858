/**
 * Signing key files in Synapse's format, so operators can bring an existing key: one key per line,
 * `ed25519 <key_version> <unpadded base64 seed>`. The first key signs; every key in the file is
 * published in `verify_keys`.
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, linkSync, mkdirSync, readFileSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { decodeBase64, encodeUnpaddedBase64 } from '../matrix/base64.js';
import { generateSigningKey, KEY_VERSION, signingKeyFromSeed, type SigningKey } from '../matrix/signing.js';

export class SigningKeyFileError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SigningKeyFileError';
  }
}

export function formatSigningKeys(keys: readonly SigningKey[]): string {
  return keys.map((k) => `ed25519 ${k.version} ${encodeUnpaddedBase64(k.seed)}\n`).join('');
}

export function parseSigningKeys(text: string, source: string): SigningKey[] {
  const keys: SigningKey[] = [];
  text.split('\n').forEach((line, i) => {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) return;
    const where = `${source} line ${i + 1}`;
    const parts = trimmed.split(/\s+/);
    if (parts.length !== 3) throw new SigningKeyFileError(`${where}: expected "ed25519 <key_version> <base64 seed>", found ${parts.length} fields`);
    const [alg, version, seedText] = parts as [string, string, string];
    if (alg !== 'ed25519') throw new SigningKeyFileError(`${where}: unsupported algorithm "${alg}"; only ed25519 keys are used in Matrix`);
    if (!KEY_VERSION.test(version)) throw new SigningKeyFileError(`${where}: key version "${version}" may only contain a-z, A-Z, 0-9 and _`);
    const seed = decodeBase64(seedText);
    if (!seed || seed.length !== 32) throw new SigningKeyFileError(`${where}: the key must be the base64 of a 32-byte ed25519 seed`);
    keys.push(signingKeyFromSeed(version, seed));
  });
  if (keys.length === 0) throw new SigningKeyFileError(`${source} holds no signing key; delete it to have a new one generated, or run "mxkeys generate-key --out ${source}"`);
  return keys;
}

export function readSigningKeys(path: string): SigningKey[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new SigningKeyFileError(`cannot read the signing key file ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  return parseSigningKeys(text, path);
}

/**
 * Writes a new key file (mode 0600); refuses to overwrite an existing file. The key is written to a
 * private temporary file first and then linked into place, so a process starting at the same moment
 * sees either no file or the whole key, never an empty file.
 */
export function writeNewSigningKeyFile(path: string, key: SigningKey = generateSigningKey()): SigningKey {
  mkdirSync(dirname(path), { recursive: true });
  const temporary = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    writeFileSync(temporary, formatSigningKeys([key]), { flag: 'wx', mode: 0o600 });
    chmodSync(temporary, 0o600);
    linkSync(temporary, path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new SigningKeyFileError(`${path} already exists; refusing to overwrite a signing key`);
    throw new SigningKeyFileError(`cannot write the signing key file ${path}: ${(e as Error).message}`);
  } finally {
    try {
      unlinkSync(temporary);
    } catch {
      // Never created: the write itself failed and was reported above.
    }
  }
  return key;
}

/**
 * Reads the key file, creating it with a fresh key on first start — but only in a directory that
 * exists: a typo in the path must not quietly give the server a new identity in a new directory.
 */
export function loadOrCreateSigningKeys(path: string): { keys: SigningKey[]; created: boolean } {
  if (!existsSync(path)) {
    const dir = dirname(path);
    if (!existsSync(dir)) {
      throw new SigningKeyFileError(
        `signing_key_path: ${path} does not exist, and neither does its directory ${dir}. ` +
          `Check the path for a typo (the key is the server's identity); to start with a new key, create it with "mxkeys generate-key --out ${path}", or create the directory ${dir}`,
      );
    }
    try {
      return { keys: [writeNewSigningKeyFile(path)], created: true };
    } catch (e) {
      // Another process sharing the data directory created it first.
      if (!(e instanceof SigningKeyFileError) || !existsSync(path)) throw e;
    }
  }
  return { keys: readSigningKeys(path), created: false };
}

/** `ed25519:<version> <public key>` per key: what other servers see, and what old_signing_keys needs. */
export function formatPublicKeys(keys: readonly SigningKey[]): string {
  return keys.map((k) => `${k.keyId} ${k.publicKey}\n`).join('');
}
