/**
 * Request bodies: Matrix bodies are JSON whatever the Content-Type says (clients differ), so one
 * parser takes every content type. Not UTF-8 or not JSON → 400 M_NOT_JSON. Nesting deeper than
 * MAX_JSON_DEPTH → 400 M_BAD_JSON before parsing, so hostile bodies cannot exhaust the stack of
 * anything that walks them later.
 */
import { MatrixError } from '../matrix/errors.js';

export const MAX_JSON_DEPTH = 64;

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** The deepest nesting of `[`/`{` outside strings, stopping early once it passes `limit`. */
export function jsonDepthExceeds(text: string, limit: number): boolean {
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c /* \ */) i++;
      else if (c === 0x22 /* " */) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      if (++depth > limit) return true;
    } else if (c === 0x7d /* } */ || c === 0x5d /* ] */) depth--;
  }
  return false;
}

/** Parses a request body; an empty body is `undefined`. */
export function parseJsonBody(raw: Buffer): unknown {
  if (raw.length === 0) return undefined;
  let text: string;
  try {
    text = utf8.decode(raw);
  } catch {
    throw new MatrixError('M_NOT_JSON', 'The request body is not valid UTF-8');
  }
  // A body shorter than the limit cannot nest deeper than it.
  if (text.length > MAX_JSON_DEPTH && jsonDepthExceeds(text, MAX_JSON_DEPTH)) {
    throw new MatrixError('M_BAD_JSON', `The request body is nested more than ${MAX_JSON_DEPTH} levels deep`);
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new MatrixError('M_NOT_JSON', `The request body is not valid JSON: ${(e as Error).message}`);
  }
}
