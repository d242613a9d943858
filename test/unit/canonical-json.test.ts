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

  test('orders keys by code point on both sides of the surrogate range, whichever key comes first', () => {
    // U+E000–U+FFFF are single UTF-16 units above the surrogates (D800–DFFF) that encode
    // U+10000 and up, so a code-unit sort puts them after every supplementary character. A wrong
    // order here makes our signatures and other servers' disagree.
    const ascending = ['a', '\uD7FF', '\uE000', '\uFFFD', '\uFFFF', '\u{10000}', '\u{1F600}', '\u{10FFFF}'];
    const byCodePoint = (a: string, b: string) => {
      const x = [...a].map((c) => c.codePointAt(0)!);
      const y = [...b].map((c) => c.codePointAt(0)!);
      for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i]! - y[i]!;
      return x.length - y.length;
    };
    for (let i = 0; i < ascending.length; i++) {
      for (let j = i + 1; j < ascending.length; j++) {
        for (const prefix of ['', 'k']) {
          const [lo, hi] = [prefix + ascending[i]!, prefix + ascending[j]!];
          const shown = `${[...lo].map((c) => c.codePointAt(0)!.toString(16))} vs ${[...hi].map((c) => c.codePointAt(0)!.toString(16))}`;
          assert.ok(byCodePoint(lo, hi) < 0, `reference order ${shown}`);
          assert.ok(compareCodePoints(lo, hi) < 0, shown);
          assert.ok(compareCodePoints(hi, lo) > 0, `${shown}, reversed`);
          assert.equal(canonicalJson({ [hi]: 1, [lo]: 2 }), `{${JSON.stringify(lo)}:2,${JSON.stringify(hi)}:1}`, shown);
          assert.equal(canonicalJson({ [lo]: 2, [hi]: 1 }), `{${JSON.stringify(lo)}:2,${JSON.stringify(hi)}:1}`, `${shown}, given in order`);
        }
      }
    }
    const shuffled = Object.fromEntries([...ascending].reverse().map((k, i) => [k, i]));
    assert.deepEqual(Object.keys(JSON.parse(canonicalJson(shuffled)) as object), ascending, 'all eight keys at once');
  });

  test('uses only the escapes the grammar allows and writes other characters as raw UTF-8', () => {
    assert.equal(canonicalJson({ s: '\u0000\u0001\b\t\n\f\r\u001f"\\/é\u2028' }), '{"s":"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f\\"\\\\/é\u2028"}');
  });

  test('leaves out insignificant whitespace in nested arrays and objects', () => {
    assert.equal(canonicalJson({ a: [1, { c: true, b: false }, []], d: {} }), '{"a":[1,{"b":false,"c":true},[]],"d":{}}');
  });

  test('says where the offending value is: "(root)", a dotted path, or an array index', () => {
    const message = (v: unknown) => {
      try {
        canonicalJson(v);
      } catch (e) {
        assert.ok(e instanceof CanonicalJsonError);
        assert.equal(e.name, 'CanonicalJsonError', 'the name shows in logs');
        return e.message;
      }
      assert.fail('no error');
    };
    assert.equal(message(1.5), '(root): 1.5 is not an integer (canonical JSON allows no floats)');
    assert.equal(message({ a: { b: 1.5 } }), 'a.b: 1.5 is not an integer (canonical JSON allows no floats)');
    assert.equal(message({ keys: [1, { n: 2 ** 53 }] }), `keys[1].n: ${2 ** 53} is outside the integer range ±(2^53−1)`);
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

  test('leaves out properties whose value is undefined, as JSON.stringify does with the text it sends', () => {
    const obj = { a: undefined, b: 1, c: undefined };
    assert.equal(canonicalJson(obj), '{"b":1}');
    assert.equal(canonicalJson(obj), JSON.stringify(obj));
  });

  test('encodes objects without a prototype like any other object', () => {
    const bare = Object.assign(Object.create(null) as Record<string, unknown>, { b: 2, a: 1 });
    assert.equal(canonicalJson({ x: bare }), '{"x":{"a":1,"b":2}}');
  });

  test('refuses absurdly deep nesting of arrays or of objects instead of overflowing the stack', () => {
    let deepArray: unknown = 1;
    let deepObject: unknown = 1;
    for (let i = 0; i < 5000; i++) {
      deepArray = [deepArray];
      deepObject = { a: deepObject };
    }
    assert.throws(() => canonicalJson(deepArray), (e: unknown) => e instanceof CanonicalJsonError && /nested deeper than 100 levels/.test(e.message));
    assert.throws(() => canonicalJson(deepObject), (e: unknown) => e instanceof CanonicalJsonError && /nested deeper than 100 levels/.test(e.message));
  });

  test('accepts 100 levels of nesting and refuses the 101st', () => {
    const nest = (levels: number, wrap: (v: unknown) => unknown) => {
      let v: unknown = 0;
      for (let i = 0; i < levels; i++) v = wrap(v);
      return v;
    };
    for (const wrap of [(v: unknown) => [v], (v: unknown) => ({ k: v })]) {
      assert.equal(canonicalJson(nest(100, wrap)), JSON.stringify(nest(100, wrap)));
      assert.throws(() => canonicalJson(nest(101, wrap)), /nested deeper than 100 levels/);
    }
  });
});
