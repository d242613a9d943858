import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import nacl from 'tweetnacl';
import { decodeBase64 } from '../../src/matrix/base64.js';
import { checkJsonSignature, generateSigningKey, signBytes, signingKeyFromSeed, signJson, verifyBytes, verifyBytesAsync, verifyJsonSignature } from '../../src/matrix/signing.js';

// appendices.md "Cryptographic Test Vectors".
const SEED = decodeBase64('YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1')!;
const key = signingKeyFromSeed('1', SEED);

describe('signing JSON', () => {
  test('signs an empty object exactly as the spec test vector', () => {
    assert.deepEqual(signJson({}, 'domain', key), {
      signatures: { domain: { 'ed25519:1': 'K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ' } },
    });
  });

  test('signs an object with data exactly as the spec test vector', () => {
    assert.deepEqual(signJson({ one: 1, two: 'Two' }, 'domain', key), {
      one: 1,
      two: 'Two',
      signatures: { domain: { 'ed25519:1': 'KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw' } },
    });
  });

  test('derives the public key that an independent Ed25519 implementation derives from the seed', () => {
    const pair = nacl.sign.keyPair.fromSeed(SEED);
    assert.equal(Buffer.from(pair.publicKey).toString('base64').replace(/=+$/, ''), key.publicKey);
  });

  test('keeps other signatures and unsigned data, which the signature does not cover', () => {
    const other = generateSigningKey('other');
    const signed = signJson(signJson({ a: 1, unsigned: { age: 5 } }, 'domain', key), 'other.example', other);
    assert.deepEqual(Object.keys(signed['signatures'] as object).sort(), ['domain', 'other.example']);
    assert.deepEqual(signed['unsigned'], { age: 5 });
    const changedUnsigned = { ...signed, unsigned: { age: 99 } };
    assert.ok(verifyJsonSignature(changedUnsigned, 'domain', 'ed25519:1', key.publicKey));
    assert.ok(verifyJsonSignature(changedUnsigned, 'other.example', 'ed25519:other', other.publicKey));
  });

  test('a second signature with the same key ID replaces nothing else', () => {
    const k2 = signingKeyFromSeed('2', Buffer.alloc(32, 1));
    const signed = signJson(signJson({ x: 1 }, 'domain', key), 'domain', k2);
    assert.deepEqual(Object.keys((signed['signatures'] as Record<string, object>)['domain']!).sort(), ['ed25519:1', 'ed25519:2']);
  });

  test('verification fails for changed content, another key, a missing entity or a garbled signature', () => {
    const signed = signJson({ one: 1 }, 'domain', key);
    assert.ok(verifyJsonSignature(signed, 'domain', 'ed25519:1', key.publicKey));
    assert.ok(!verifyJsonSignature({ ...signed, one: 2 }, 'domain', 'ed25519:1', key.publicKey));
    assert.ok(!verifyJsonSignature(signed, 'domain', 'ed25519:1', generateSigningKey().publicKey));
    assert.ok(!verifyJsonSignature(signed, 'nobody', 'ed25519:1', key.publicKey));
    assert.ok(!verifyJsonSignature({ ...signed, signatures: { domain: { 'ed25519:1': '!!!' } } }, 'domain', 'ed25519:1', key.publicKey));
    assert.ok(!verifyJsonSignature(signed, 'domain', 'ed25519:1', 'not a key'));
  });

  test('the thread-pool verification agrees with the synchronous one on good and bad signatures', async () => {
    const message = Buffer.from('{"method":"POST"}');
    const sig = signBytes(key, message);
    const cases: [string, Buffer, string][] = [
      [key.publicKey, message, sig],
      [key.publicKey, Buffer.from('{"method":"GET"}'), sig],
      [generateSigningKey().publicKey, message, sig],
      [key.publicKey, message, sig.slice(0, -2)],
      ['not a key', message, sig],
    ];
    for (const [publicKey, bytes, signature] of cases) {
      assert.equal(await verifyBytesAsync(publicKey, bytes, signature), verifyBytes(publicKey, bytes, signature));
    }
    assert.equal(await verifyBytesAsync(key.publicKey, message, sig), true);
  });

  test('the full check names what is wrong', () => {
    const signed = signJson({ one: 1 }, 'domain', key);
    const keys = new Map([['ed25519:1', key.publicKey]]);
    assert.equal(checkJsonSignature(signed, 'domain', keys), undefined);
    assert.match(checkJsonSignature({ one: 1 }, 'domain', keys) ?? '', /no signature from domain/);
    assert.match(checkJsonSignature(signed, 'domain', new Map()) ?? '', /no known verification key/);
    assert.match(checkJsonSignature({ ...signed, signatures: { domain: { 'curve25519:1': 'x' } } }, 'domain', keys) ?? '', /no ed25519 signature/);
    assert.match(checkJsonSignature({ ...signed, one: 3 }, 'domain', keys) ?? '', /does not verify/);
  });
});
