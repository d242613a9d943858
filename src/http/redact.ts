/**
 * What may be logged of a request target: the path and query with the value of every
 * `access_token` parameter replaced, so a token sent in the query string never reaches a log.
 * Names are decoded as the token lookup (auth.ts, URLSearchParams) decodes them, so an encoded
 * name such as `access%5Ftoken` that is accepted as the token is redacted too.
 */
export function redactUrl(url: string): string {
  const q = url.indexOf('?');
  if (q < 0) return url;
  const parts = url
    .slice(q + 1)
    .split('&')
    .map((part) => {
      const eq = part.indexOf('=');
      if (eq < 0) return part;
      const name = new URLSearchParams(part).keys().next().value;
      // Any case: other spellings are not tokens to us, but may be to a proxy or another server.
      return name?.toLowerCase() === 'access_token' ? `${part.slice(0, eq + 1)}<redacted>` : part;
    });
  return url.slice(0, q + 1) + parts.join('&');
}
