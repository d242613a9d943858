/**
 * Authenticating incoming federation requests: the one check every signed federation endpoint
 * passes through. Handlers receive only the verified origin.
 */
import { limitExceeded, MatrixError, serviceUnavailable } from '../matrix/errors.js';
import { isValidServerName } from '../matrix/ids.js';
import { CanonicalJsonError } from '../matrix/canonical-json.js';
import { RateLimiter, type RateLimit } from '../matrix/ratelimit.js';
import { parseXMatrix, verifyRequestSignatureAsync } from './xmatrix.js';
import { FETCH_BUSY_RETRY_MS, type FetchRequester, type KeyLookup } from './key-ring.js';

export interface IncomingFederationRequest {
  readonly method: string;
  /** The request target exactly as received (path and query, percent-encoding untouched). */
  readonly uri: string;
  readonly authorization: string | undefined;
  /** The parsed JSON body, or undefined when the request has none. */
  readonly content: unknown;
  /** The client address the request came from (fairness of key fetches). */
  readonly address?: string | undefined;
}

export interface RequestAuthenticatorOptions {
  readonly serverName: string;
  readonly keys: { requestKey(serverName: string, keyId: string, requester: FetchRequester): Promise<KeyLookup> };
  readonly rateLimit: RateLimit;
  /** Called with the origin of every request that passes (a server that talks to us is up). */
  readonly onAccepted?: (origin: string) => void;
}

const unauthorized = (why: string) => new MatrixError('M_UNAUTHORIZED', why, 401);

export class RequestAuthenticator {
  private readonly limiter: RateLimiter;
  /** Counts for metrics. */
  readonly stats = { accepted: 0, refused: 0 };

  constructor(private readonly options: RequestAuthenticatorOptions) {
    this.limiter = new RateLimiter(options.rateLimit);
  }

  /** Resolves to the verified origin server name; throws 401 M_UNAUTHORIZED saying what failed. */
  async authenticate(r: IncomingFederationRequest): Promise<string> {
    try {
      const origin = await this.check(r);
      this.stats.accepted++;
      this.options.onAccepted?.(origin);
      return origin;
    } catch (e) {
      this.stats.refused++;
      throw e;
    }
  }

  private async check(r: IncomingFederationRequest): Promise<string> {
    if (r.authorization === undefined || r.authorization === '') {
      throw unauthorized('Missing Authorization header: federation requests must be signed with X-Matrix');
    }
    const auth = parseXMatrix(r.authorization);
    if (typeof auth === 'string') throw unauthorized(`Malformed Authorization header: ${auth}`);
    if (!isValidServerName(auth.origin)) throw unauthorized(`The X-Matrix origin "${auth.origin}" is not a valid server name`);
    if (auth.destination !== undefined && auth.destination !== this.options.serverName) {
      throw unauthorized(`The request is addressed to ${auth.destination}, but this server is ${this.options.serverName}`);
    }
    if (!auth.key.startsWith('ed25519:')) throw unauthorized(`Unsupported key ${auth.key}: only ed25519 keys sign requests`);
    const key = await this.options.keys.requestKey(auth.origin, auth.key, { kind: 'request', address: r.address });
    if ('error' in key) throw unauthorized(`Cannot check the signature: ${key.error}`);
    if ('busy' in key) {
      // Our capacity, not the peer's fault: a retryable answer rather than a 401 blaming its keys.
      const message = `Cannot check the signature yet: ${key.reason}; retry in ${FETCH_BUSY_RETRY_MS / 1000} s`;
      throw key.busy === 'origin' ? limitExceeded(message, FETCH_BUSY_RETRY_MS) : serviceUnavailable(message, FETCH_BUSY_RETRY_MS);
    }
    let valid: Promise<boolean>;
    try {
      valid = verifyRequestSignatureAsync(
        { method: r.method, uri: r.uri, origin: auth.origin, destination: auth.destination ?? this.options.serverName, content: r.content },
        auth.sig,
        key.verifyKey,
      );
    } catch (e) {
      if (e instanceof CanonicalJsonError) throw new MatrixError('M_BAD_JSON', `The request body cannot be signed as canonical JSON: ${e.message}`);
      throw e;
    }
    if (!(await valid)) {
      throw unauthorized(`The signature by ${auth.origin}'s key ${auth.key} does not match this request (method, path with query, destination and body are signed)`);
    }
    this.limiter.take(auth.origin, `requests from ${auth.origin}`);
    return auth.origin;
  }
}
