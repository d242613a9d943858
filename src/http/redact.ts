/**
 * What may be logged of a request target: the path and query with the value of every
 * `access_token` parameter replaced, so a token sent in the query string never reaches a log.
 */
export function redactUrl(url: string): string {
  const q = url.indexOf('?');
  if (q < 0) return url;
  return url.slice(0, q + 1) + url.slice(q + 1).replace(/(^|&)(access_token=)[^&]*/gi, '$1$2<redacted>');
}
