import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import nacl from 'tweetnacl';
import { parseXMatrix, requestSigningBytes, signRequest, verifyRequestSignature } from '../../src/federation/xmatrix.js';
import { decodeBase64 } from '../../src/matrix/base64.js';
import { signingKeyFromSeed } from '../../src/matrix/signing.js';
import { canonical } from '../support/keys.js';

describe('parsing the X-Matrix Authorization header', () => {
  const expected = { origin: 'origin.example', destination: 'dest.example', key: 'ed25519:key1', sig: 'ABCDEF' };

  test('reads the spec example', () => {
    assert.deepEqual(parseXMatrix('X-Matrix origin="origin.example",destination="dest.example",key="ed25519:key1",sig="ABCDEF"'), expected);
  });

  test('accepts parameters in any order, with names in any case', () => {
    assert.deepEqual(parseXMatrix('X-Matrix SIG="ABCDEF",Key="ed25519:key1",destination="dest.example",ORIGIN="origin.example"'), expected);
  });

  test('accepts unquoted values, colons included, and spaces or tabs around commas', () => {
    assert.deepEqual(parseXMatrix('x-matrix   origin=origin.example ,\tdestination=dest.example , key=ed25519:key1,sig=ABCDEF'), expected);
  });

  test('accepts "signature" for "sig", and ignores unknown parameters', () => {
    assert.deepEqual(parseXMatrix('X-Matrix origin="origin.example",destination="dest.example",key="ed25519:key1",signature="ABCDEF",colour="blue"'), expected);
  });

  test('unescapes backslashes in quoted values', () => {
    const r = parseXMatrix('X-Matrix origin="origin\\.example",key="ed25519:\\"k\\"",sig="AB\\\\C"');
    assert.deepEqual(r, { origin: 'origin.example', destination: undefined, key: 'ed25519:"k"', sig: 'AB\\C' });
  });

  test('accepts a trailing comma and empty list elements, as RFC 9110 lists allow', () => {
    assert.deepEqual(parseXMatrix('X-Matrix origin="origin.example",destination="dest.example",key="ed25519:key1",sig="ABCDEF",'), expected);
    assert.deepEqual(parseXMatrix('X-Matrix ,origin="origin.example", ,destination="dest.example",,key="ed25519:key1",sig="ABCDEF" , '), expected);
  });

  test('takes the first of duplicate parameters, so a later copy cannot change the origin or the signature', () => {
    assert.deepEqual(
      parseXMatrix('X-Matrix origin="origin.example",destination="dest.example",key="ed25519:key1",sig="ABCDEF",origin="evil.example",sig="XYZ",SIG="XYZ",key="ed25519:k2"'),
      expected,
    );
  });

  test('refuses an unterminated quoted value, even one that ends in a backslash', () => {
    assert.equal(parseXMatrix('X-Matrix key="ed25519:key1",sig="ABCDEF",origin="origin.example'), 'the value of "origin" in the X-Matrix header has no closing quote');
    assert.equal(parseXMatrix('X-Matrix origin="origin.example",key="ed25519:key1",sig="ABCDEF\\'), 'the value of "sig" in the X-Matrix header has no closing quote');
    assert.equal(parseXMatrix('X-Matrix origin="origin.example",key="ed25519:key1",sig="ABCDEF\\"'), 'the value of "sig" in the X-Matrix header has no closing quote');
  });

  test('refuses an empty unquoted value, a parameter without a name, and a name with a colon', () => {
    assert.equal(parseXMatrix('X-Matrix origin=,key="ed25519:key1",sig="ABCDEF"'), 'parameter "origin" of the X-Matrix header has an empty value');
    assert.equal(parseXMatrix('X-Matrix origin="origin.example",="x",key="ed25519:key1",sig="ABCDEF"'), 'unexpected character "=" at position 33 of the X-Matrix header');
    assert.equal(parseXMatrix('X-Matrix origin="origin.example",@x=1,key="ed25519:key1",sig="ABCDEF"'), 'unexpected character "@" at position 33 of the X-Matrix header');
    // A colon may appear in values, not in names (it would otherwise hide "x:origin" as an unknown parameter).
    assert.equal(parseXMatrix('X-Matrix origin="origin.example",key="ed25519:key1",sig="ABCDEF",x:y="z"'), 'parameter "x" of the X-Matrix header has no value');
  });

  test('refuses a header that mentions X-Matrix anywhere but at the start', () => {
    // Nine characters before the scheme, so a parser that searched for it would land on "origin".
    assert.equal(parseXMatrix('Bearer a,origin="origin.example",key="ed25519:key1",sig="ABCDEF",x="X-Matrix "'), 'the Authorization header does not use the X-Matrix scheme');
  });

  test('says what is wrong with a malformed header', () => {
    assert.match(String(parseXMatrix('Bearer xyz')), /X-Matrix scheme/);
    assert.match(String(parseXMatrix('X-Matrix origin="a.example,key="k",sig="s"')), /no closing quote|expected/);
    assert.match(String(parseXMatrix('X-Matrix origin')), /no value/);
    assert.match(String(parseXMatrix('X-Matrix key="ed25519:a",sig="s"')), /no origin/);
    assert.match(String(parseXMatrix('X-Matrix origin="a.example",sig="s"')), /no key/);
    assert.match(String(parseXMatrix('X-Matrix origin="a.example",key="ed25519:a"')), /no sig/);
    assert.match(String(parseXMatrix('X-Matrix origin="a" key="b"')), /expected ","/);
  });
});

describe('signing requests', () => {
  // appendices.md "Cryptographic Test Vectors": the spec's seed, server name "domain", key ed25519:1.
  const seed = decodeBase64('YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1')!;
  const key = signingKeyFromSeed('1', seed);
  const request = { method: 'POST', uri: '/_matrix/federation/v1/user/keys/query', origin: 'domain', destination: 'dest.example', content: { device_keys: { '@a:dest.example': [] } } };

  test('signs the canonical JSON of method, uri, origin, destination and content, as an independent implementation does', () => {
    const header = signRequest(request, key);
    const parsed = parseXMatrix(header);
    assert.ok(typeof parsed !== 'string');
    assert.equal(parsed.key, 'ed25519:1');
    const message = Buffer.from(canonical(request));
    assert.deepEqual(requestSigningBytes(request), message);
    const pair = nacl.sign.keyPair.fromSeed(seed);
    assert.ok(nacl.sign.detached.verify(message, Buffer.from(parsed.sig, 'base64'), pair.publicKey));
    assert.ok(verifyRequestSignature(request, parsed.sig, key.publicKey));
  });

  test('leaves content out when there is no body', () => {
    const { content: _c, ...noBody } = request;
    assert.equal(requestSigningBytes({ ...noBody, method: 'GET' }).toString(), canonical({ ...noBody, method: 'GET' }));
  });
});
