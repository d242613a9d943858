/**
 * Canonical JSON (appendices, "Canonical JSON"): the shortest UTF-8 encoding, object keys sorted by
 * Unicode code point, integers only within ±(2^53−1), no floats. `-0` is the integer zero (the
 * spec's own example encodes `{"a": -0}` as `{"a":0}`).
 *
 * Anything that cannot be encoded canonically raises CanonicalJsonError naming the offending path;
 * we never silently rewrite a value, because a rewritten value would be signed or verified as
 * something the author did not write.
 */

export class CanonicalJsonError extends Error {
  constructor(readonly path: string, reason: string) {
    super(`${path || '(root)'}: ${reason}`);
    this.name = 'CanonicalJsonError';
  }
}

/** Deeper values are refused rather than risking the call stack; real Matrix objects nest < 10. */
export const MAX_CANONICAL_DEPTH = 100;

/**
 * Compares two strings by Unicode code point. JavaScript's default `<` compares UTF-16 code units,
 * which puts U+E000–U+FFFF after supplementary characters (surrogate pairs): wrong for Matrix.
 */
export function compareCodePoints(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    // Surrogates (D800–DFFF) encode code points above FFFF, so they must sort after E000–FFFF.
    if (x >= 0xd800 && y >= 0xd800) {
      x = x >= 0xe000 ? x - 0x800 : x + 0x2000;
      y = y >= 0xe000 ? y - 0x800 : y + 0x2000;
    }
    return x - y;
  }
  return a.length - b.length;
}

function encodeString(s: string, path: string): string {
  if (!s.isWellFormed()) throw new CanonicalJsonError(path, 'string contains a lone UTF-16 surrogate');
  // JSON.stringify already emits the canonical escapes: \" \\ \b \t \n \f \r and lowercase \u00XX.
  return JSON.stringify(s);
}

function sortKeys(keys: string[]): string[] {
  // Default sort is code-point order unless two keys differ at a surrogate; only then pay for the
  // slower comparator.
  for (const k of keys) {
    for (let i = 0; i < k.length; i++) {
      if (k.charCodeAt(i) >= 0xd800) return keys.sort(compareCodePoints);
    }
  }
  return keys.sort();
}

function encode(value: unknown, path: string, depth: number, out: string[]): void {
  switch (typeof value) {
    case 'string':
      out.push(encodeString(value, path));
      return;
    case 'number':
      if (!Number.isInteger(value)) {
        throw new CanonicalJsonError(path, `${value} is not an integer (canonical JSON allows no floats)`);
      }
      if (!Number.isSafeInteger(value)) {
        throw new CanonicalJsonError(path, `${value} is outside the integer range ±(2^53−1)`);
      }
      out.push(value === 0 ? '0' : String(value));
      return;
    case 'boolean':
      out.push(value ? 'true' : 'false');
      return;
    case 'object':
      break;
    default:
      throw new CanonicalJsonError(path, `a ${typeof value} cannot be encoded as JSON`);
  }
  if (value === null) {
    out.push('null');
    return;
  }
  if (depth >= MAX_CANONICAL_DEPTH) throw new CanonicalJsonError(path, `nested deeper than ${MAX_CANONICAL_DEPTH} levels`);
  if (Array.isArray(value)) {
    out.push('[');
    for (let i = 0; i < value.length; i++) {
      if (i > 0) out.push(',');
      encode(value[i], `${path}[${i}]`, depth + 1, out);
    }
    out.push(']');
    return;
  }
  const proto = Object.getPrototypeOf(value) as unknown;
  if (proto !== Object.prototype && proto !== null) {
    throw new CanonicalJsonError(path, 'only plain objects, arrays and primitives can be encoded');
  }
  const obj = value as Record<string, unknown>;
  const keys = sortKeys(Object.keys(obj));
  out.push('{');
  let first = true;
  for (const k of keys) {
    const v = obj[k];
    if (v === undefined) continue; // like JSON.stringify: an absent value
    if (!first) out.push(',');
    first = false;
    out.push(encodeString(k, path), ':');
    encode(v, path ? `${path}.${k}` : k, depth + 1, out);
  }
  out.push('}');
}

/** Encodes a parsed JSON value as canonical JSON text. */
export function canonicalJson(value: unknown): string {
  const out: string[] = [];
  encode(value, '', 0, out);
  return out.join('');
}

/** Canonical JSON as the UTF-8 bytes that get signed. */
export function canonicalJsonBytes(value: unknown): Buffer {
  return Buffer.from(canonicalJson(value), 'utf8');
}
