/**
 * The X-Matrix Authorization scheme (server-server API, "Request Authentication").
 *
 *   Authorization: X-Matrix origin="origin.example",destination="dest.example",key="ed25519:k",sig="…"
 *
 * Parsing follows RFC 9110 §11.4 auth-params, as the spec asks: one or more spaces after the
 * scheme; comma-separated `name=value` pairs with optional spaces/tabs around the commas; names
 * case-insensitive and in any order; values a token or a quoted string with backslash escapes.
 * Unquoted values may contain colons (spec: receivers should allow them). `sig` is what every
 * server sends; `signature` (the parameter list's name) is accepted too. Unknown parameters are
 * ignored.
 */
import { canonicalJsonBytes } from '../matrix/canonical-json.js';
import { signBytes, verifyBytes, verifyBytesAsync, type SigningKey } from '../matrix/signing.js';

export interface XMatrixAuth {
  readonly origin: string;
  readonly destination: string | undefined;
  readonly key: string;
  readonly sig: string;
}

/** RFC 9110 token characters, plus ':' (allowed unquoted in values, per the spec), by char code. */
const TCHAR = new Uint8Array(128);
for (const c of "!#$%&'*+-.^_`|~:0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") TCHAR[c.charCodeAt(0)] = 1;
const isTchar = (code: number): boolean => code < 128 && TCHAR[code] === 1;

/** Parses an Authorization header value; returns a reason string when it is not valid X-Matrix. */
export function parseXMatrix(header: string): XMatrixAuth | string {
  const m = /^x-matrix +/i.exec(header);
  if (!m) return 'the Authorization header does not use the X-Matrix scheme';
  const params = new Map<string, string>();
  let i = m[0].length;
  const n = header.length;
  const skipOws = () => {
    while (i < n && (header[i] === ' ' || header[i] === '\t')) i++;
  };
  while (i < n) {
    skipOws();
    if (i < n && header[i] === ',') {
      i++;
      continue;
    }
    if (i >= n) break;
    const nameStart = i;
    while (i < n && isTchar(header.charCodeAt(i)) && header[i] !== ':') i++;
    const name = header.slice(nameStart, i).toLowerCase();
    if (name === '') return `unexpected character ${JSON.stringify(header[i])} at position ${i} of the X-Matrix header`;
    skipOws();
    if (header[i] !== '=') return `parameter "${name}" of the X-Matrix header has no value`;
    i++;
    skipOws();
    let value = '';
    if (header[i] === '"') {
      i++;
      let closed = false;
      let start = i;
      while (i < n) {
        const c = header.charCodeAt(i);
        if (c === 0x5c /* backslash */) {
          if (i + 1 >= n) break;
          value += header.slice(start, i) + header[i + 1];
          i += 2;
          start = i;
        } else if (c === 0x22 /* " */) {
          value += header.slice(start, i);
          i++;
          closed = true;
          break;
        } else {
          i++;
        }
      }
      if (!closed) return `the value of "${name}" in the X-Matrix header has no closing quote`;
    } else {
      const start = i;
      while (i < n && isTchar(header.charCodeAt(i))) i++;
      value = header.slice(start, i);
      if (value === '') return `parameter "${name}" of the X-Matrix header has an empty value`;
    }
    if (!params.has(name)) params.set(name, value);
    skipOws();
    if (i < n && header[i] !== ',') return `expected "," after the "${name}" parameter of the X-Matrix header`;
  }
  const origin = params.get('origin');
  const key = params.get('key');
  const sig = params.get('sig') ?? params.get('signature');
  if (origin === undefined) return 'the X-Matrix header has no origin';
  if (key === undefined) return 'the X-Matrix header has no key';
  if (sig === undefined) return 'the X-Matrix header has no sig';
  return { origin, destination: params.get('destination'), key, sig };
}

export interface RequestToSign {
  readonly method: string;
  /** The request target as sent: path and query, starting with /_matrix. */
  readonly uri: string;
  readonly origin: string;
  readonly destination: string;
  /** The JSON body, if the request has one. */
  readonly content?: unknown;
}

/** The canonical JSON bytes a request signature covers. */
export function requestSigningBytes(r: RequestToSign): Buffer {
  const obj: Record<string, unknown> = { method: r.method, uri: r.uri, origin: r.origin, destination: r.destination };
  if (r.content !== undefined) obj['content'] = r.content;
  return canonicalJsonBytes(obj);
}

/** The Authorization header for an outgoing request, in the form every server understands. */
export function signRequest(r: RequestToSign, key: SigningKey): string {
  const sig = signBytes(key, requestSigningBytes(r));
  return `X-Matrix origin="${r.origin}",destination="${r.destination}",key="${key.keyId}",sig="${sig}"`;
}

/** Checks a request signature with the origin's public key. */
export function verifyRequestSignature(r: RequestToSign, sig: string, publicKey: string): boolean {
  return verifyBytes(publicKey, requestSigningBytes(r), sig);
}

/** The same check off the event loop (on the thread pool), for the request path. */
export function verifyRequestSignatureAsync(r: RequestToSign, sig: string, publicKey: string): Promise<boolean> {
  return verifyBytesAsync(publicKey, requestSigningBytes(r), sig);
}
