/**
 * Unpadded base64 (appendices, "Unpadded Base64"): the standard RFC 4648 alphabet without `=`
 * padding. Decoding accepts padded input (the spec says it SHOULD) but refuses anything else that
 * is not base64: Node's Buffer.from(…, 'base64') silently skips junk and accepts the URL-safe
 * alphabet, which would let two different strings stand for the same key.
 */

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

export function encodeUnpaddedBase64(bytes: Uint8Array): string {
  const s = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
  let end = s.length;
  while (end > 0 && s.charCodeAt(end - 1) === 61 /* = */) end--;
  return s.slice(0, end);
}

/** Decodes standard base64, padded or not. Returns undefined for anything that is not base64. */
export function decodeBase64(s: string): Buffer | undefined {
  if (!BASE64.test(s)) return undefined;
  const unpadded = s.endsWith('=') ? s.replace(/=+$/, '') : s;
  if (unpadded.length % 4 === 1) return undefined;
  if (s.length !== unpadded.length && s.length % 4 !== 0) return undefined; // padding of the wrong length
  return Buffer.from(unpadded, 'base64');
}

/** True when `s` is unpadded base64 of exactly `byteLength` bytes. */
export function isUnpaddedBase64OfLength(s: string, byteLength: number): boolean {
  if (s.includes('=')) return false;
  const bytes = decodeBase64(s);
  return bytes !== undefined && bytes.length === byteLength && encodeUnpaddedBase64(bytes) === s;
}
