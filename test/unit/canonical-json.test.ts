import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { canonicalJson, compareCodePoints, CanonicalJsonError } from '../../src/matrix/canonical-json.js';

describe('canonical JSON', () => {
  // Every example from appendices.md "Canonical JSON / Examples", input text parsed as a client would.
  const specExamples: [string, string][] = [
    ['{}', '{}'],
    ['{\n    "one": 1,\n    "two": "Two"\n}', '{"one":1,"two":"Two"}'],
    ['{\n    "b": "2",\n    "a": "1"\n}', '{"a":"1","b":"2"}'],
    ['{"b":"2","a":"1"}', '{"a":"1","b":"2"}'],
    [
      '{"auth":{"success":true,"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"medium":"email","address":"john.doe@example.org"},{"medium":"msisdn","address":"123456789"}]}}}',
      '{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}',
    ],
    ['{"a": "日本語"}', '{"a":"日本語"}'],
    ['{"本": 2, "日": 1}', '{"日":1,"本":2}'],
    ['{"a": "\\u65E5"}', '{"a":"日"}'],
    ['{"a": null}', '{"a":null}'],
    ['{"a": -0, "b": 1e10}', '{"a":0,"b":10000000000}'],
  ];
  for (const [input, expected] of specExamples) {
    test(`encodes the spec example ${input.replace(/\s+/g, ' ').slice(0, 40)} as ${expected.slice(0, 40)}`, () => {
      assert.equal(canonicalJson(JSON.parse(input)), expected);
    });
  }

  test('sorts keys by Unicode code point, not by UTF-16 code unit', () => {
    // U+1F600 (a surrogate pair in UTF-16) is above U+FFFD as a code point, so it sorts after it.
    const obj = { '\u{1F600}': 1, '\uFFFD': 2, a: 3 };
    assert.equal(canonicalJson(obj), '{"a":3,"\uFFFD":2,"\u{1F600}":1}');
    assert.ok(compareCodePoints('\uFFFD', '\u{1F600}') < 0);
    assert.ok(compareCodePoints('\u{1F600}', '\u{1F601}') < 0);
    assert.ok(compareCodePoints('ab', 'abc') < 0);
  });

  test('uses only the escapes the grammar allows and writes other characters as raw UTF-8', () => {
    assert.equal(canonicalJson({ s: '\u0000\u0001\b\t\n\f\r\u001f"\\/é\u2028' }), '{"s":"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f\\"\\\\/é\u2028"}');
  });

  test('leaves out insignificant whitespace in nested arrays and objects', () => {
    assert.equal(canonicalJson({ a: [1, { c: true, b: false }, []], d: {} }), '{"a":[1,{"b":false,"c":true},[]],"d":{}}');
  });

  test('refuses floats, unsafe integers and lone surrogates with the path of the value', () => {
    assert.throws(() => canonicalJson({ a: { b: 1.5 } }), (e: unknown) => e instanceof CanonicalJsonError && e.message.includes('a.b') && e.message.includes('not an integer'));
    assert.throws(() => canonicalJson({ n: 2 ** 53 }), /outside the integer range/);
    assert.throws(() => canonicalJson({ n: -(2 ** 53) }), /outside the integer range/);
    assert.equal(canonicalJson({ n: 2 ** 53 - 1, m: -(2 ** 53) + 1 }), '{"m":-9007199254740991,"n":9007199254740991}');
    assert.throws(() => canonicalJson({ s: 'x\uD800y' }), /lone UTF-16 surrogate/);
    assert.throws(() => canonicalJson({ ['\uDC00']: 1 }), /lone UTF-16 surrogate/);
    assert.throws(() => canonicalJson({ n: Number.NaN }), /not an integer/);
  });

  test('refuses values JSON cannot carry instead of dropping them silently', () => {
    assert.throws(() => canonicalJson([undefined]), /cannot be encoded/);
    assert.throws(() => canonicalJson({ d: new Date(0) }), /plain objects/);
    assert.throws(() => canonicalJson(10n), /cannot be encoded/);
  });

  test('refuses absurdly deep nesting instead of overflowing the stack', () => {
    let deep: unknown = 1;
    for (let i = 0; i < 5000; i++) deep = [deep];
    assert.throws(() => canonicalJson(deep), /nested deeper/);
  });
});
