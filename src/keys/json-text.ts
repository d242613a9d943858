/**
 * Keys are stored as the JSON text the client uploaded and served from that text, so every value
 * comes back exactly as uploaded (signatures depend on it). These helpers add what the spec lets a
 * server add: an `unsigned` object, and signatures uploaded separately.
 */
import { canonicalJson } from '../matrix/canonical-json.js';
import type { StoredSignature } from '../storage/store.js';

type JsonObject = Record<string, unknown>;

/** `{…}` + `"unsigned": {…}`, without parsing the stored text. */
export function withUnsigned(json: string, unsigned: string): string {
  return json.length <= 2 ? `{"unsigned":${unsigned}}` : `${json.slice(0, -1)},"unsigned":${unsigned}}`;
}

/**
 * The same key is served with the same extra signatures again and again; merging costs a parse
 * and a stringify, so the last result per key text and signature set is remembered.
 */
const merged = new Map<string, { readonly json: string; readonly out: string }>();

/** Adds separately stored signatures to a key object's `signatures`; untouched when there are none. */
export function withSignatures(json: string, signatures: readonly StoredSignature[]): string {
  if (signatures.length === 0) return json;
  let memoKey = '';
  for (const s of signatures) memoKey += `${s.signerUserId}\0${s.signerKeyId}\0${s.signature}\0`;
  const hit = merged.get(memoKey);
  if (hit !== undefined && hit.json === json) return hit.out;
  const out = mergeSignatures(json, signatures);
  if (json.length <= 16_384) {
    if (merged.size >= 20_000) merged.clear();
    merged.set(memoKey, { json, out });
  }
  return out;
}

function mergeSignatures(json: string, signatures: readonly StoredSignature[]): string {
  const obj = JSON.parse(json) as JsonObject;
  const sigs = (typeof obj['signatures'] === 'object' && obj['signatures'] !== null ? { ...(obj['signatures'] as JsonObject) } : {}) as Record<string, JsonObject>;
  for (const s of signatures) sigs[s.signerUserId] = { ...sigs[s.signerUserId], [s.signerKeyId]: s.signature };
  obj['signatures'] = sigs;
  return JSON.stringify(obj);
}

/** Canonical JSON of an object without its `signatures` and `unsigned`: what signatures cover. */
export function signedContent(obj: JsonObject): string {
  const { signatures: _s, unsigned: _u, ...rest } = obj;
  return canonicalJson(rest);
}

/** Two uploaded values are the same key when they are equal apart from signatures (Synapse's rule). */
export function sameKeyIgnoringSignatures(a: unknown, b: unknown): boolean {
  const strip = (v: unknown): unknown => {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) return v;
    const { signatures: _s, ...rest } = v as JsonObject;
    return rest;
  };
  try {
    return canonicalJson(strip(a)) === canonicalJson(strip(b));
  } catch {
    return false;
  }
}
