/**
 * mxkeys as a library, for TypeScript homeservers that embed it:
 *
 *   const config = loadConfig({ overrides: { server_name: 'example.org', database: { sqlite: './keys.db' } } });
 *   const mx = await createMxkeys(config);
 *   await mx.listen();          // or mount mx.app (a Fastify instance) behind your own server
 *   …
 *   await mx.close();
 *
 * The spec primitives (canonical JSON, signing, identifiers) are exported too.
 */
export { createMxkeys, type Mxkeys, type CreateOptions } from './compose.js';
export { loadConfig, ConfigError, durationMs, type LoadConfigOptions } from './config/load.js';
export type { Config } from './config/schema.js';
export { MatrixError, type Errcode } from './matrix/errors.js';
export { canonicalJson, canonicalJsonBytes, CanonicalJsonError, compareCodePoints } from './matrix/canonical-json.js';
export { decodeBase64, encodeUnpaddedBase64 } from './matrix/base64.js';
export { generateSigningKey, signingKeyFromSeed, signJson, verifyJsonSignature, checkJsonSignature, type SigningKey } from './matrix/signing.js';
export { parseUserId, parseServerName, isValidServerName, isValidDeviceId } from './matrix/ids.js';
export { parseXMatrix, signRequest, verifyRequestSignature } from './federation/xmatrix.js';
export { VERSION } from './version.js';
