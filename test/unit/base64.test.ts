import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { decodeBase64, encodeUnpaddedBase64, isUnpaddedBase64OfLength } from '../../src/matrix/base64.js';

describe('unpadded base64', () => {
  // appendices.md "Unpadded Base64" examples.
  const examples: [string, string][] = [
    ['', ''],
    ['f', 'Zg'],
    ['fo', 'Zm8'],
    ['foo', 'Zm9v'],
    ['foob', 'Zm9vYg'],
    ['fooba', 'Zm9vYmE'],
    ['foobar', 'Zm9vYmFy'],
  ];
  for (const [plain, encoded] of examples) {
    test(`encodes "${plain}" as "${encoded}" and decodes it back`, () => {
      assert.equal(encodeUnpaddedBase64(Buffer.from(plain)), encoded);
      assert.equal(decodeBase64(encoded)?.toString(), plain);
    });
  }

  test('accepts padded input too', () => {
    assert.equal(decodeBase64('Zg==')?.toString(), 'f');
    assert.equal(decodeBase64('Zm8=')?.toString(), 'fo');
  });

  test('rejects characters outside the standard alphabet, including the URL-safe ones', () => {
    for (const bad of ['Zm9v!', 'Zm9-', 'Zm9_', 'Zm 9v', 'Z', 'Zg=', 'Z===', '=Zg']) assert.equal(decodeBase64(bad), undefined, bad);
  });

  test('checks unpadded base64 of an exact length', () => {
    const key = encodeUnpaddedBase64(Buffer.alloc(32, 7));
    assert.ok(isUnpaddedBase64OfLength(key, 32));
    assert.ok(!isUnpaddedBase64OfLength(`${key}=`, 32));
    assert.ok(!isUnpaddedBase64OfLength(key.slice(1), 32));
  });
});
