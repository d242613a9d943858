import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Type } from '@sinclair/typebox';
import pino from 'pino';
import type { App } from '../../src/http/app.js';
import type { Mxkeys } from '../../src/compose.js';
import { MatrixError } from '../../src/matrix/errors.js';
import { createTestMxkeys, http } from '../support/server.js';
import { backends } from '../support/backends.js';

// The application with its real error mapping, plus a few probe routes that stand in for the
// endpoints later issues add, so every row of the error table is exercised over real HTTP.
describe('HTTP errors are Matrix errors', () => {
  let mx: Mxkeys;
  let app: App;
  let base: string;
  const logged: unknown[] = [];

  before(async () => {
    const logger = pino({ level: 'error' }, { write: (line: string) => logged.push(JSON.parse(line)) });
    mx = await createTestMxkeys({ backend: backends[0]!, logger, config: { max_request_body_bytes: 4096 } });
    app = mx.app;
    app.post(
      '/_matrix/client/v3/probe',
      { schema: { body: Type.Object({ device_keys: Type.Record(Type.String(), Type.Array(Type.String())) }) } },
      async (request) => ({ got: request.body }),
    );
    app.get('/_matrix/client/v3/probe/forbidden', async () => {
      throw new MatrixError('M_FORBIDDEN', 'You may not');
    });
    app.get('/_matrix/client/v3/probe/crash', async () => {
      throw new Error('database password is hunter2');
    });
    base = await mx.listen();
  });
  after(() => mx.close());

  test('an unknown endpoint is 404 M_UNRECOGNIZED', async () => {
    const r = await http(base, 'GET', '/_matrix/client/v3/no/such/thing');
    assert.equal(r.status, 404);
    assert.equal(r.body['errcode'], 'M_UNRECOGNIZED');
    assert.equal(typeof r.body['error'], 'string');
  });

  test('a known endpoint with the wrong method is 405 M_UNRECOGNIZED naming the allowed methods', async () => {
    const r = await http(base, 'DELETE', '/_matrix/client/v3/probe');
    assert.equal(r.status, 405);
    assert.equal(r.body['errcode'], 'M_UNRECOGNIZED');
    assert.match(String(r.body['error']), /use POST/);
    assert.equal(r.headers.get('allow'), 'POST');
    const keyServer = await http(base, 'POST', '/_matrix/key/v2/server', { body: {} });
    assert.equal(keyServer.status, 405);
  });

  test('a body that is not JSON is 400 M_NOT_JSON', async () => {
    for (const raw of ['{"device_keys":', 'hello', '\u0000']) {
      const r = await http(base, 'POST', '/_matrix/client/v3/probe', { rawBody: raw, headers: { 'content-type': 'application/json' } });
      assert.equal(r.status, 400, raw);
      assert.equal(r.body['errcode'], 'M_NOT_JSON', raw);
    }
    const invalidUtf8 = await http(base, 'POST', '/_matrix/client/v3/probe', { rawBody: Buffer.from([0x7b, 0xff, 0x7d]) });
    assert.equal(invalidUtf8.body['errcode'], 'M_NOT_JSON');
  });

  test('JSON is accepted whatever the Content-Type says, as clients differ', async () => {
    const r = await http(base, 'POST', '/_matrix/client/v3/probe', { rawBody: '{"device_keys":{}}', headers: { 'content-type': 'text/plain' } });
    assert.equal(r.status, 200);
  });

  test('JSON of the wrong shape is 400 M_BAD_JSON, a missing field 400 M_MISSING_PARAM, both naming the field', async () => {
    const wrongType = await http(base, 'POST', '/_matrix/client/v3/probe', { body: { device_keys: { '@a:b': 'not a list' } } });
    assert.equal(wrongType.status, 400);
    assert.equal(wrongType.body['errcode'], 'M_BAD_JSON');
    assert.match(String(wrongType.body['error']), /device_keys/);
    const missing = await http(base, 'POST', '/_matrix/client/v3/probe', { body: {} });
    assert.equal(missing.status, 400);
    assert.equal(missing.body['errcode'], 'M_MISSING_PARAM');
    assert.match(String(missing.body['error']), /device_keys/);
  });

  test('validation never coerces values: a number where a string goes is refused, not converted', async () => {
    const r = await http(base, 'POST', '/_matrix/client/v3/probe', { body: { device_keys: { '@a:b': [42] } } });
    assert.equal(r.status, 400);
    assert.equal(r.body['errcode'], 'M_BAD_JSON');
  });

  test('a body over max_request_body_bytes is 413 M_TOO_LARGE', async () => {
    const r = await http(base, 'POST', '/_matrix/client/v3/probe', { body: { device_keys: { '@a:b': ['x'.repeat(5000)] } } });
    assert.equal(r.status, 413);
    assert.equal(r.body['errcode'], 'M_TOO_LARGE');
  });

  test('deeply nested JSON, arrays or objects, is refused quickly without hurting the server', async () => {
    for (const deep of ['['.repeat(2000) + ']'.repeat(2000), '{"a":'.repeat(600) + '1' + '}'.repeat(600)]) {
      const r = await http(base, 'POST', '/_matrix/client/v3/probe', { rawBody: deep });
      assert.equal(r.status, 400);
      assert.equal(r.body['errcode'], 'M_BAD_JSON');
      assert.match(String(r.body['error']), /nested/);
    }
    const after = await http(base, 'GET', '/_matrix/federation/v1/version');
    assert.equal(after.status, 200);
  });

  test('a thrown MatrixError keeps its code and status', async () => {
    const r = await http(base, 'GET', '/_matrix/client/v3/probe/forbidden');
    assert.equal(r.status, 403);
    assert.deepEqual(r.body, { errcode: 'M_FORBIDDEN', error: 'You may not' });
  });

  test('an unexpected failure is 500 M_UNKNOWN with a request id and no internals, and is logged', async () => {
    const r = await http(base, 'GET', '/_matrix/client/v3/probe/crash');
    assert.equal(r.status, 500);
    assert.equal(r.body['errcode'], 'M_UNKNOWN');
    assert.ok(!r.text.includes('hunter2'));
    assert.ok(!r.text.includes('at '), 'no stack trace');
    const requestId = /request id (\S+)/.exec(String(r.body['error']))?.[1];
    assert.ok(requestId);
    assert.ok(logged.some((l) => JSON.stringify(l).includes(requestId) && JSON.stringify(l).includes('hunter2')), 'the log has the details under the request id');
  });

  test('the log line of an unexpected failure never shows an access token sent in the query string', async () => {
    const token = 'mxk_secret_token_value';
    const r = await http(base, 'GET', `/_matrix/client/v3/probe/crash?from=1&access_token=${token}&Access_Token=${token}2`);
    assert.equal(r.status, 500);
    const requestId = /request id (\S+)/.exec(String(r.body['error']))?.[1];
    const line = logged.find((l) => JSON.stringify(l).includes(requestId!)) as Record<string, unknown> | undefined;
    assert.ok(line, 'the failure is logged');
    assert.ok(!JSON.stringify(logged).includes(token), JSON.stringify(line));
    assert.match(String(line['url']), /^\/_matrix\/client\/v3\/probe\/crash\?from=1&access_token=<redacted>/, 'the rest of the URL is kept');
  });

  test('client-server responses carry the CORS headers, and OPTIONS runs no endpoint logic', async () => {
    const r = await http(base, 'GET', '/_matrix/client/v3/probe/forbidden');
    assert.equal(r.headers.get('access-control-allow-origin'), '*');
    assert.match(r.headers.get('access-control-allow-methods') ?? '', /POST/);
    assert.match(r.headers.get('access-control-allow-headers') ?? '', /Authorization/);
    const pre = await http(base, 'OPTIONS', '/_matrix/client/v3/probe/crash');
    assert.equal(pre.status, 200);
    assert.equal(pre.headers.get('access-control-allow-origin'), '*');
  });

  test('a malformed URL is a Matrix error, not a crash', async () => {
    const r = await http(base, 'GET', '/_matrix/key/v2/server/%E0%A4%A');
    assert.ok(r.status >= 400 && r.status < 500, String(r.status));
    assert.equal(typeof r.body['errcode'], 'string');
  });
});
