/**
 * Accounts: registration, login, access tokens and devices — the rules, independent of HTTP.
 * Uses only the AccountsStore. Request bodies arrive shape-checked by the HTTP layer; everything
 * about their meaning (IDs, lengths, secrets) is checked here.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { limitExceeded, MatrixError } from '../matrix/errors.js';
import { isValidDeviceId, isValidNewLocalpart, MAX_USER_ID_BYTES, parseUserId, userIdFor } from '../matrix/ids.js';
import { RateLimiter, type RateLimit } from '../matrix/ratelimit.js';
import type { AccountsStore, StoredDevice } from '../storage/store.js';
import { hashAccessToken, rememberTokenHash, isOpaqueId, newAccessToken, newDeviceId, newOpaqueId, PasswordHasher } from './secrets.js';
import { Slots, SlotsBusy } from '../matrix/slots.js';
import { UserInteractiveAuth, type StageChecker } from './uia.js';

/** Who is making an authenticated request. */
export interface Requester {
  readonly userId: string;
  readonly deviceId: string;
}

export interface LoginResult {
  readonly user_id: string;
  readonly access_token: string;
  readonly device_id: string;
  readonly home_server: string;
}

export interface AccountsOptions {
  readonly store: AccountsStore;
  readonly serverName: string;
  readonly registrationSharedSecret: string | undefined;
  readonly enableRegistration: boolean;
  readonly failedLoginLimit: RateLimit;
  /** Most devices one user may have; a login that would create one more is refused. */
  readonly maxDevicesPerUser?: number;
  /** scrypt cost of new password hashes, as log2(N); default DEFAULT_SCRYPT_LOG_N. */
  readonly scryptLogN?: number;
  readonly now?: () => number;
  /**
   * True when `deviceId` may not be given to a device of `userId` because one of the user's
   * cross-signing keys has that public key (e2e spec: device IDs must not collide with them).
   */
  readonly isReservedDeviceId?: (userId: string, deviceId: string) => Promise<boolean>;
  /** Told of every failed password login: the user as given, and the client's address. */
  readonly onFailedLogin?: (user: string, address: string | undefined) => void;
  /**
   * With several processes on one database: true when this process is the one to delete expired
   * nonces and user-interactive auth sessions now (a lease), so the sweep runs once per interval
   * for all of them. Left out, every process sweeps.
   */
  readonly takeSweep?: (now: number, intervalMs: number) => Promise<boolean>;
}

/** Expired nonces and user-interactive auth sessions are deleted at most this often. */
const SWEEP_INTERVAL_MS = 60_000;
/** Synapse's limit for device display names. */
export const MAX_DEVICE_DISPLAY_NAME_LENGTH = 100;
/** Most devices one /delete_devices request may name. */
export const MAX_DEVICES_PER_DELETE = 1000;
/**
 * Password checks from one client address run one at a time; the others wait their turn (up to
 * PASSWORD_CHECK_QUEUE of them, for at most PASSWORD_CHECK_WAIT_MS). Each check sees the failures
 * of the ones before it, so a burst of parallel guesses from one address is limited exactly like
 * sequential ones (at most rc_login's burst_count reach scrypt), while many users behind one
 * address (a NAT, a proxy) still all log in, one after another. Charging the address before the
 * check instead would refuse those users once more of them log in at once than burst_count.
 */
export const PASSWORD_CHECKS_PER_ADDRESS = 1;
const PASSWORD_CHECK_QUEUE = 50;
const PASSWORD_CHECK_WAIT_MS = 30_000;
/** Shared-secret registration nonces are single-use and expire after a minute. */
export const NONCE_LIFETIME_MS = 60_000;
/**
 * Nonces handed out per client address: each is a database write (fsynced), asked for without
 * authentication. They stay in the database, unlike Synapse's in-memory ones, so that a nonce from
 * one mxkeys process works on another behind the same load balancer.
 */
export const NONCE_RATE_LIMIT: RateLimit = { per_second: 2, burst_count: 20 };

const PASSWORD_FLOWS = [['m.login.password']] as const;

type Body = Readonly<Record<string, unknown>>;

/** A password check: on success, the stored hash it matched, and how to replace an outdated one. */
type PasswordCheckResult =
  | { readonly ok: false }
  | { readonly ok: true; readonly hash: string; readonly rehash?: () => Promise<string> };

function optionalString(body: Body, key: string): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw new MatrixError('M_BAD_JSON', `"${key}" must be a string`);
  return v;
}

function requiredString(body: Body, key: string): string {
  const v = optionalString(body, key);
  if (v === undefined) throw new MatrixError('M_MISSING_PARAM', `"${key}" is required`);
  return v;
}

/** A device display name longer than Synapse allows is refused (400 M_TOO_LARGE), wherever it comes from. */
export function checkDisplayName(name: string | null | undefined): void {
  if (typeof name === 'string' && name.length > MAX_DEVICE_DISPLAY_NAME_LENGTH) {
    throw new MatrixError('M_TOO_LARGE', `A device display name may be at most ${MAX_DEVICE_DISPLAY_NAME_LENGTH} characters`, 400);
  }
}

export function deviceToJson(d: StoredDevice): Record<string, unknown> {
  return {
    device_id: d.deviceId,
    ...(d.displayName !== null ? { display_name: d.displayName } : {}),
    ...(d.lastSeenIp !== null ? { last_seen_ip: d.lastSeenIp } : {}),
    ...(d.lastSeenTs !== null ? { last_seen_ts: d.lastSeenTs } : {}),
  };
}

export class Accounts {
  private readonly store: AccountsStore;
  private readonly now: () => number;
  private readonly failedLogins: RateLimiter;
  private readonly uia: UserInteractiveAuth;
  /** Every password hash of this server goes through here (the configured cost, at most two at once). */
  readonly passwords: PasswordHasher;
  private readonly passwordChecks = new Slots();
  private readonly nonceRequests: RateLimiter;
  private lastSweep = 0;

  constructor(private readonly options: AccountsOptions) {
    this.store = options.store;
    this.now = options.now ?? Date.now;
    this.failedLogins = new RateLimiter(options.failedLoginLimit, this.now);
    this.passwords = new PasswordHasher(options.scryptLogN);
    this.nonceRequests = new RateLimiter(NONCE_RATE_LIMIT, this.now);
    const password: StageChecker = async (auth, userId) => {
      const claimed = this.identifiedUser(auth);
      // Another user's password is 403, not a failed stage (Synapse checks that password first and
      // then refuses; we refuse without checking it, so the answer says nothing about it).
      if (claimed !== userId) throw new MatrixError('M_FORBIDDEN', `The password must be that of the logged-in user (${userId ?? 'nobody'}); authenticate as yourself`, 403);
      return (await this.checkPassword(claimed, auth['password'], undefined)).ok ? undefined : { errcode: 'M_FORBIDDEN', message: 'Invalid password' };
    };
    const dummy: StageChecker = async () => undefined;
    this.uia = new UserInteractiveAuth(this.store, { 'm.login.password': password, 'm.login.dummy': dummy }, this.now);
  }

  get serverName(): string {
    return this.options.serverName;
  }

  /** Resolves an access token to its user and device. */
  async authenticate(token: string): Promise<Requester> {
    const hash = hashAccessToken(token);
    const found = await this.store.getAccessToken(hash);
    if (!found) throw new MatrixError('M_UNKNOWN_TOKEN', 'Unknown or expired access token; log in again', 401, { soft_logout: false });
    rememberTokenHash(token, hash);
    return found;
  }

  /**
   * The user an `identifier` (`m.id.user`) or legacy top-level `user` names: a localpart or a full
   * user ID of this server. Localparts are matched lower-cased, as we only allocate lower case.
   */
  private identifiedUser(body: Body): string | undefined {
    let user: unknown = body['user'];
    const identifier = body['identifier'];
    if (identifier !== undefined) {
      if (typeof identifier !== 'object' || identifier === null || Array.isArray(identifier)) throw new MatrixError('M_BAD_JSON', '"identifier" must be an object');
      const id = identifier as Body;
      if (id['type'] !== 'm.id.user') throw new MatrixError('M_UNKNOWN', `Unsupported identifier type ${JSON.stringify(id['type'])}; use "m.id.user"`, 400);
      user = id['user'];
    }
    if (typeof user !== 'string' || user === '') throw new MatrixError('M_MISSING_PARAM', 'Missing "identifier.user" (or the legacy "user")');
    // Anything that is not a well-formed user ID of ours names nobody (and is never looked up).
    const parts = parseUserId(user.startsWith('@') ? user : userIdFor(user, this.options.serverName));
    if (!parts || parts.serverName !== this.options.serverName) return undefined;
    return userIdFor(parts.localpart.toLowerCase(), parts.serverName);
  }

  /** The user name a login named, as sent (for the log when it names no user of ours). */
  private givenUser(body: Body): string {
    const id = body['identifier'];
    const user = typeof id === 'object' && id !== null ? (id as Body)['user'] : body['user'];
    return typeof user === 'string' ? user.slice(0, 300) : '';
  }

  /**
   * Checks a password, rate limiting failures per user and per address. An unknown user costs the
   * same time and gets the same answer as a wrong password.
   */
  private async checkPassword(userId: string | undefined, password: unknown, ip: string | undefined): Promise<PasswordCheckResult> {
    if (typeof password !== 'string') throw new MatrixError('M_MISSING_PARAM', 'Missing "password"');
    const userKey = userId === undefined ? undefined : `user:${userId}`;
    const ipKey = ip === undefined ? undefined : `ip:${ip}`;
    const assertAllowed = () => {
      for (const key of [userKey, ipKey]) if (key) this.failedLogins.assertAllowed(key, 'failed login attempts');
    };
    assertAllowed();
    let release: (() => void) | undefined;
    if (ipKey) {
      try {
        release = await this.passwordChecks.acquire([{ key: ipKey, limit: PASSWORD_CHECKS_PER_ADDRESS, queue: PASSWORD_CHECK_QUEUE }], PASSWORD_CHECK_WAIT_MS);
      } catch (e) {
        if (e instanceof SlotsBusy) throw limitExceeded('Too many logins at once from your address; try again shortly', 1000);
        throw e;
      }
    }
    try {
      // Again: failures of the checks this one waited for count.
      if (release) assertAllowed();
      // The user's attempt counts as failed before the (slow) check and is refunded on success, so
      // parallel guesses at one account from many addresses cannot all slip past the limit.
      if (userKey) this.failedLogins.record(userKey);
      const user = userId === undefined ? undefined : await this.store.getUser(userId);
      // A deactivated account has no password; should one be left, it is not checked either.
      const hash = user && !user.deactivated ? user.passwordHash : null;
      const { ok, outdated } = await this.passwords.verify(password, hash);
      if (ok && userKey) this.failedLogins.refund(userKey);
      if (!ok && ipKey) this.failedLogins.record(ipKey);
      if (!ok || hash === null) return { ok: false };
      if (!outdated) return { ok, hash };
      return {
        ok,
        hash,
        rehash: async () => {
          const fresh = await this.passwords.hash(password);
          return (await this.store.replacePasswordHash(user!.userId, hash, fresh)) ? fresh : hash;
        },
      };
    } finally {
      release?.();
    }
  }

  private async deviceIdFor(userId: string, requested: string | undefined): Promise<string> {
    if (requested === undefined) return newDeviceId();
    if (!isValidDeviceId(requested)) throw new MatrixError('M_INVALID_PARAM', '"device_id" must be 1 to 255 printable ASCII characters without spaces');
    if (await this.options.isReservedDeviceId?.(userId, requested)) {
      throw new MatrixError('M_INVALID_PARAM', `"${requested}" is the public key of one of your cross-signing keys and cannot be a device ID`);
    }
    return requested;
  }

  private async sweep(): Promise<void> {
    const now = this.now();
    if (now - this.lastSweep < SWEEP_INTERVAL_MS) return;
    this.lastSweep = now;
    if (this.options.takeSweep && !(await this.options.takeSweep(now, SWEEP_INTERVAL_MS))) return;
    await this.store.deleteExpiredAuthState(now - 24 * 3_600_000, now - NONCE_LIFETIME_MS);
  }

  /** POST /login with m.login.password. */
  async login(body: Body, ip: string | undefined): Promise<LoginResult> {
    if (body['type'] !== 'm.login.password') {
      throw new MatrixError('M_UNKNOWN', `Unknown login type ${JSON.stringify(body['type'])}; this server offers "m.login.password"`, 400);
    }
    const userId = this.identifiedUser(body);
    const displayName = optionalString(body, 'initial_device_display_name');
    checkDisplayName(displayName);
    const requestedDevice = optionalString(body, 'device_id');
    const check = await this.checkPassword(userId, body['password'], ip);
    if (!check.ok) {
      this.options.onFailedLogin?.(userId ?? this.givenUser(body), ip);
      throw new MatrixError('M_FORBIDDEN', 'Invalid username or password');
    }
    // A hash made with another scrypt cost (an older mxkeys, or a changed setting) is replaced now
    // that the password is known.
    const passwordHash = (await check.rehash?.()) ?? check.hash;
    const deviceId = await this.deviceIdFor(userId!, requestedDevice);
    const accessToken = newAccessToken();
    const max = this.options.maxDevicesPerUser;
    const session = { tokenHash: hashAccessToken(accessToken), deviceId, displayName: displayName ?? null, ts: this.now(), ip: ip ?? null };
    // The store checks again, in the transaction that creates the device, that the account was
    // neither deactivated nor given another password since the (slow) check above.
    const result = await this.store.loginDevice(userId!, session, { passwordHash, maxDevices: max });
    if (result.refused === 'credentials') throw new MatrixError('M_FORBIDDEN', 'Invalid username or password');
    if (result.refused === 'too many devices') {
      throw new MatrixError(
        'ORG_MATRIX_MSC4342_M_TOO_MANY_DEVICES',
        `You already have ${max} devices, the most this server allows (max_devices_per_user): log out a device you no longer use, or log in again with the device_id of an existing one`,
      );
    }
    return { user_id: userId!, access_token: accessToken, device_id: deviceId, home_server: this.options.serverName };
  }

  private checkNewLocalpart(localpart: string): string {
    if (!isValidNewLocalpart(localpart)) {
      throw new MatrixError('M_INVALID_USERNAME', 'A username may only contain a-z, 0-9, ".", "_", "=", "-", "/" and "+"');
    }
    const userId = userIdFor(localpart, this.options.serverName);
    if (Buffer.byteLength(userId) > MAX_USER_ID_BYTES) throw new MatrixError('M_INVALID_USERNAME', `The user ID ${userId} would be longer than 255 bytes`);
    return userId;
  }

  /** Creates a user with a first device and access token; M_USER_IN_USE if the name is taken. */
  private async createUserWithDevice(userId: string, password: string | undefined, admin: boolean, device: { deviceId?: string | undefined; displayName?: string | undefined; ip?: string | undefined }): Promise<LoginResult> {
    const deviceId = await this.deviceIdFor(userId, device.deviceId);
    const accessToken = newAccessToken();
    const now = this.now();
    const created = await this.store.createUser(
      { userId, passwordHash: password === undefined ? null : await this.passwords.hash(password), admin, createdTs: now },
      { tokenHash: hashAccessToken(accessToken), deviceId, displayName: device.displayName ?? null, ts: now, ip: device.ip ?? null },
    );
    if (!created) throw new MatrixError('M_USER_IN_USE', `The user ID ${userId} is already taken`);
    return { user_id: userId, access_token: accessToken, device_id: deviceId, home_server: this.options.serverName };
  }

  /** For `mxkeys register-user`: creates an account without a device. */
  async createUser(localpart: string, password: string, admin: boolean): Promise<string> {
    const userId = this.checkNewLocalpart(localpart);
    const created = await this.store.createUser({ userId, passwordHash: await this.passwords.hash(password), admin, createdTs: this.now() });
    if (!created) throw new MatrixError('M_USER_IN_USE', `The user ID ${userId} is already taken`);
    return userId;
  }

  private requireSharedSecret(): string {
    const secret = this.options.registrationSharedSecret;
    if (secret === undefined) {
      // 400 M_UNKNOWN, as Synapse answers.
      throw new MatrixError('M_UNKNOWN', 'Shared-secret registration is not enabled on this server (set registration_shared_secret)', 400);
    }
    return secret;
  }

  /** GET /_synapse/admin/v1/register */
  async newRegistrationNonce(ip: string | undefined): Promise<string> {
    this.requireSharedSecret();
    if (ip !== undefined) this.nonceRequests.take(ip, 'registration nonces requested from your address');
    await this.sweep();
    const nonce = newOpaqueId(24);
    await this.store.addRegistrationNonce(nonce, this.now());
    return nonce;
  }

  /** POST /_synapse/admin/v1/register: Synapse's shared-secret registration. */
  async registerWithSharedSecret(body: Body, ip: string | undefined): Promise<LoginResult> {
    const secret = this.requireSharedSecret();
    const nonce = requiredString(body, 'nonce');
    const username = requiredString(body, 'username');
    const password = requiredString(body, 'password');
    const mac = requiredString(body, 'mac');
    const userType = optionalString(body, 'user_type');
    const displayName = optionalString(body, 'displayname');
    const admin = body['admin'] ?? false;
    if (typeof admin !== 'boolean') throw new MatrixError('M_BAD_JSON', '"admin" must be a boolean');
    if (!isOpaqueId(nonce) || !(await this.store.consumeRegistrationNonce(nonce, this.now() - NONCE_LIFETIME_MS))) {
      throw new MatrixError('M_UNKNOWN', 'Unrecognised or expired nonce; fetch a new one with GET /_synapse/admin/v1/register', 400);
    }
    const hmac = createHmac('sha1', secret);
    hmac.update(nonce).update('\0').update(username).update('\0').update(password).update('\0').update(admin ? 'admin' : 'notadmin');
    if (userType !== undefined) hmac.update('\0').update(userType);
    const expected = hmac.digest();
    const given = /^[0-9a-fA-F]{40}$/.test(mac) ? Buffer.from(mac, 'hex') : Buffer.alloc(0);
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) {
      throw new MatrixError('M_FORBIDDEN', 'HMAC incorrect: compute hex HMAC-SHA1 of nonce, username, password and "admin"/"notadmin", NUL-separated, keyed with registration_shared_secret');
    }
    const userId = this.checkNewLocalpart(username);
    return this.createUserWithDevice(userId, password, admin, { displayName, ip });
  }

  /** GET /register/available */
  async usernameAvailable(username: string): Promise<void> {
    const userId = this.checkNewLocalpart(username);
    if (await this.store.getUser(userId)) throw new MatrixError('M_USER_IN_USE', `The user ID ${userId} is already taken`);
  }

  /** POST /register: open registration behind the m.login.dummy flow, when enabled. */
  async register(body: Body, query: { kind?: string | undefined }, ip: string | undefined, path: string): Promise<Partial<LoginResult> & { user_id: string }> {
    if (query.kind === 'guest') throw new MatrixError('M_FORBIDDEN', 'Guest access is disabled on this server');
    if (query.kind !== undefined && query.kind !== 'user') throw new MatrixError('M_INVALID_PARAM', `Unknown registration kind "${query.kind}"`);
    if (!this.options.enableRegistration) throw new MatrixError('M_FORBIDDEN', 'Registration is disabled on this server (enable_registration is false)');
    const username = optionalString(body, 'username');
    const password = optionalString(body, 'password');
    const displayName = optionalString(body, 'initial_device_display_name');
    checkDisplayName(displayName);
    const inhibitLogin = body['inhibit_login'] ?? false;
    if (typeof inhibitLogin !== 'boolean') throw new MatrixError('M_BAD_JSON', '"inhibit_login" must be a boolean');
    const userId = this.checkNewLocalpart(username ?? `u${newDeviceId().toLowerCase()}`);
    if (await this.store.getUser(userId)) throw new MatrixError('M_USER_IN_USE', `The user ID ${userId} is already taken`);
    const { auth, ...rest } = body;
    await this.sweep();
    await this.uia.require({ userId: null, method: 'POST', path, body: rest, auth, flows: [['m.login.dummy']] });
    if (inhibitLogin) {
      // No device and no access token that nobody would ever receive.
      const created = await this.store.createUser({ userId, passwordHash: password === undefined ? null : await this.passwords.hash(password), admin: false, createdTs: this.now() });
      if (!created) throw new MatrixError('M_USER_IN_USE', `The user ID ${userId} is already taken`);
      return { user_id: userId };
    }
    return this.createUserWithDevice(userId, password, false, { deviceId: optionalString(body, 'device_id'), displayName, ip });
  }

  async listDevices(requester: Requester): Promise<Record<string, unknown>[]> {
    return (await this.store.listDevices(requester.userId)).map(deviceToJson);
  }

  async getDevice(requester: Requester, deviceId: string): Promise<Record<string, unknown>> {
    const device = isValidDeviceId(deviceId) ? await this.store.getDevice(requester.userId, deviceId) : undefined;
    if (!device) throw new MatrixError('M_NOT_FOUND', `No device ${deviceId} for ${requester.userId}`);
    return deviceToJson(device);
  }

  async renameDevice(requester: Requester, deviceId: string, body: Body): Promise<void> {
    const name = optionalString(body, 'display_name');
    checkDisplayName(name);
    if (name === undefined) {
      // Nothing to change, but an unknown device is still an error.
      await this.getDevice(requester, deviceId);
      return;
    }
    if (!isValidDeviceId(deviceId) || !(await this.store.setDeviceDisplayName(requester.userId, deviceId, name))) {
      throw new MatrixError('M_NOT_FOUND', `No device ${deviceId} for ${requester.userId}`);
    }
  }

  /** Asks for the user's password (user-interactive auth) before a sensitive request goes ahead. */
  requirePassword(requester: Requester, request: { method: string; path: string; body: Body }): Promise<void> {
    const { auth, ...rest } = request.body;
    return this.sweep().then(() =>
      this.uia.require({ userId: requester.userId, method: request.method, path: request.path, body: rest, auth, flows: PASSWORD_FLOWS }),
    );
  }

  /** DELETE /devices/{deviceId} and POST /delete_devices, after user-interactive auth. */
  async deleteDevices(requester: Requester, deviceIds: readonly string[], request: { method: string; path: string; body: Body }): Promise<void> {
    if (deviceIds.length > MAX_DEVICES_PER_DELETE) throw new MatrixError('M_INVALID_PARAM', `At most ${MAX_DEVICES_PER_DELETE} devices can be deleted in one request`);
    await this.requirePassword(requester, request);
    // IDs that cannot be device IDs name no device: nothing to delete.
    await this.store.deleteDevices(requester.userId, deviceIds.filter(isValidDeviceId));
  }

  /** POST /logout */
  async logout(requester: Requester): Promise<void> {
    await this.store.deleteDevices(requester.userId, [requester.deviceId]);
  }

  /** POST /logout/all */
  async logoutAll(requester: Requester): Promise<void> {
    await this.store.deleteDevices(requester.userId, 'all');
  }
}
