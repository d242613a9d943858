/**
 * User and device administration: the rules behind Synapse's user admin API
 * (`/_synapse/admin/v2/users…`, `/v1/reset_password`, `/v1/deactivate`, the devices of a user, and
 * `/v1/users/{userId}/_allow_cross_signing_replacement_without_uia`) and behind the
 * `mxkeys users` commands, so both do the same thing. Answers have Synapse's shapes: admin tools
 * written for Synapse read them. Uses the AccountsStore and KeysStore only; no HTTP, no driver.
 */
import { MatrixError } from '../matrix/errors.js';
import { isValidDeviceId, parseUserId } from '../matrix/ids.js';
import type { AccountsStore, KeysStore, UserAccount, UserListQuery } from '../storage/store.js';
import { checkDisplayName, deviceToJson, MAX_DEVICES_PER_DELETE } from './service.js';

export interface AdminOptions {
  readonly accounts: AccountsStore;
  /** Hashes a new password as logins check it (the Accounts service's hasher: same cost, same limits). */
  readonly hashPassword: (password: string) => Promise<string>;
  readonly keys: KeysStore;
  readonly serverName: string;
  /**
   * Called after a deactivation: the user's key backups were marked deleted and wait to be purged
   * (the server purges in the background, the command line before it exits).
   */
  readonly afterDeactivation?: () => Promise<void> | void;
  /** Records what an administrator did (who, to whom). */
  readonly log?: (message: string, details: Record<string, unknown>) => void;
  readonly now?: () => number;
}

/** Who asks: an admin user (HTTP) or the operator at the command line. */
export type AdminActor = { readonly userId: string } | 'command line';

type Body = Readonly<Record<string, unknown>>;
type Query = Readonly<Record<string, string | undefined>>;

/** How long `_allow_cross_signing_replacement_without_uia` opens the window (Synapse: 10 minutes). */
export const CROSS_SIGNING_REPLACEMENT_WINDOW_MS = 10 * 60_000;
/** Synapse's limit on passwords set through the admin API. */
const MAX_PASSWORD_LENGTH = 512;

const ORDER_BY: Record<string, UserListQuery['orderBy']> = {
  name: 'name',
  admin: 'admin',
  deactivated: 'deactivated',
  creation_ts: 'creation_ts',
  last_seen_ts: 'last_seen_ts',
  // Synapse's other sort keys name things mxkeys does not keep (every user has the same value),
  // so they order by name, Synapse's tie-break.
  is_guest: 'name',
  user_type: 'name',
  shadow_banned: 'name',
  displayname: 'name',
  avatar_url: 'name',
};

function nonNegativeInteger(query: Query, name: string, fallback: number): number {
  const raw = query[name];
  if (raw === undefined) return fallback;
  if (!/^\d{1,9}$/.test(raw)) throw new MatrixError('M_INVALID_PARAM', `Query parameter ${name} must be a string representing a positive integer.`);
  return Number(raw);
}

function booleanParam(query: Query, name: string): boolean | undefined {
  const raw = query[name];
  if (raw === undefined) return undefined;
  if (raw !== 'true' && raw !== 'false') throw new MatrixError('M_INVALID_PARAM', `Boolean query parameter '${name}' must be one of ['true', 'false']`);
  return raw === 'true';
}

function optionalBoolean(body: Body, name: string, fallback: boolean): boolean {
  const v = body[name];
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new MatrixError('M_BAD_JSON', `Param '${name}' must be a boolean, if given`);
  return v;
}

/** A user as in Synapse's List Accounts answer (`creation_ts` in milliseconds there). */
function listedUser(u: UserAccount): Record<string, unknown> {
  return {
    name: u.userId,
    is_guest: false,
    admin: u.admin,
    user_type: null,
    deactivated: u.deactivated,
    erased: false,
    shadow_banned: false,
    displayname: null,
    avatar_url: null,
    creation_ts: u.createdTs,
    last_seen_ts: u.lastSeenTs,
    locked: false,
  };
}

export class Admin {
  private readonly now: () => number;

  constructor(private readonly options: AdminOptions) {
    this.now = options.now ?? Date.now;
  }

  /** 403 unless `userId` is a server admin (Synapse's answer, word for word). */
  async requireAdmin(userId: string): Promise<void> {
    const user = await this.options.accounts.getUser(userId);
    if (!user?.admin || user.deactivated) throw new MatrixError('M_FORBIDDEN', 'You are not a server admin');
  }

  /** The user ID, if it is a well-formed ID of this server; 400 otherwise (`what` as in Synapse's messages). */
  private localUserId(userId: string, what: string): string {
    const parts = parseUserId(userId);
    if (!parts) throw new MatrixError('M_INVALID_PARAM', `"${userId}" is not a valid user ID`);
    if (parts.serverName !== this.options.serverName) throw new MatrixError('M_INVALID_PARAM', `Can only ${what} local users`);
    return userId;
  }

  private async existingUser(userId: string, what: string): Promise<UserAccount> {
    const account = await this.options.accounts.getUserAccount(this.localUserId(userId, what));
    if (!account) throw new MatrixError('M_NOT_FOUND', 'User not found');
    return account;
  }

  private record(actor: AdminActor, message: string, details: Record<string, unknown>): void {
    this.options.log?.(message, { by: actor === 'command line' ? actor : actor.userId, ...details });
  }

  /** GET /_synapse/admin/v2/users */
  async listUsers(query: Query): Promise<Record<string, unknown>> {
    const from = nonNegativeInteger(query, 'from', 0);
    const limit = nonNegativeInteger(query, 'limit', 100);
    const orderBy = ORDER_BY[query['order_by'] ?? 'name'];
    if (orderBy === undefined) throw new MatrixError('M_INVALID_PARAM', `Query parameter "order_by" must be one of ${Object.keys(ORDER_BY).join(', ')}`);
    const dir = query['dir'] ?? 'f';
    if (dir !== 'f' && dir !== 'b') throw new MatrixError('M_INVALID_PARAM', 'Query parameter "dir" must be one of f, b');
    booleanParam(query, 'guests'); // mxkeys has no guests: either answer is the same
    // `name` searches localparts (and display names, which mxkeys does not keep); it wins over `user_id`.
    const name = query['name'];
    const { users, total } = await this.options.accounts.listUsers({
      from,
      limit,
      userIdContains: name !== undefined ? name : query['user_id'],
      admins: booleanParam(query, 'admins'),
      includeDeactivated: booleanParam(query, 'deactivated') ?? false,
      orderBy,
      direction: dir,
    });
    const answer: Record<string, unknown> = { users: users.map(listedUser), total };
    if (from + limit < total) answer['next_token'] = String(from + users.length);
    return answer;
  }

  /** GET /_synapse/admin/v2/users/{userId} (`creation_ts` in seconds here, as Synapse answers). */
  async getUser(userId: string): Promise<Record<string, unknown>> {
    const u = await this.existingUser(userId, 'look up');
    return {
      name: u.userId,
      displayname: null,
      threepids: [],
      avatar_url: null,
      is_guest: false,
      admin: u.admin,
      deactivated: u.deactivated,
      erased: false,
      shadow_banned: false,
      creation_ts: Math.floor(u.createdTs / 1000),
      last_seen_ts: u.lastSeenTs,
      appservice_id: null,
      consent_server_notice_sent: null,
      consent_version: null,
      consent_ts: null,
      external_ids: [],
      user_type: null,
      locked: false,
      suspended: false,
    };
  }

  /** POST /_synapse/admin/v1/reset_password/{userId} and `mxkeys users reset-password`. */
  async resetPassword(actor: AdminActor, userId: string, body: Body): Promise<Record<string, never>> {
    const password = body['new_password'];
    if (password === undefined) throw new MatrixError('M_MISSING_PARAM', 'Missing params: ["new_password"]');
    if (typeof password !== 'string' || password === '' || password.length > MAX_PASSWORD_LENGTH) {
      throw new MatrixError('M_INVALID_PARAM', `"new_password" must be a non-empty string of at most ${MAX_PASSWORD_LENGTH} characters`);
    }
    const logout = optionalBoolean(body, 'logout_devices', true);
    const user = await this.existingUser(userId, 'reset passwords of');
    const deactivated = () => new MatrixError('M_INVALID_PARAM', `${userId} is deactivated; a deactivated account cannot be given a password again`);
    if (user.deactivated) throw deactivated();
    // The store refuses, too, if the account was deactivated while the hash was being made.
    if (!(await this.options.accounts.setPasswordHash(userId, await this.options.hashPassword(password), logout))) throw deactivated();
    this.record(actor, 'password reset by an administrator', { user: userId, logout_devices: logout });
    return {};
  }

  /** POST /_synapse/admin/v1/deactivate/{userId} and `mxkeys users deactivate`. */
  async deactivate(actor: AdminActor, userId: string, body: Body): Promise<{ id_server_unbind_result: string }> {
    // `erase` is accepted for compatibility: mxkeys keeps no profile or messages to erase.
    optionalBoolean(body, 'erase', false);
    await this.existingUser(userId, 'deactivate');
    await this.options.accounts.deactivateUser(userId);
    this.record(actor, 'user deactivated by an administrator', { user: userId });
    await this.options.afterDeactivation?.();
    // Synapse's answer; mxkeys binds nothing at identity servers, so there is nothing to unbind.
    return { id_server_unbind_result: 'success' };
  }

  /** GET /_synapse/admin/v2/users/{userId}/devices */
  async listDevices(userId: string): Promise<{ devices: Record<string, unknown>[]; total: number }> {
    await this.existingUser(userId, 'lookup');
    const devices = (await this.options.accounts.listDevices(userId)).map((d) => ({ ...deviceToJson(d), user_id: userId }));
    return { devices, total: devices.length };
  }

  /** GET /_synapse/admin/v2/users/{userId}/devices/{deviceId} */
  async getDevice(userId: string, deviceId: string): Promise<Record<string, unknown>> {
    await this.existingUser(userId, 'lookup');
    const device = isValidDeviceId(deviceId) ? await this.options.accounts.getDevice(userId, deviceId) : undefined;
    if (!device) throw new MatrixError('M_NOT_FOUND', 'No device found');
    return { ...deviceToJson(device), user_id: userId };
  }

  /** PUT /_synapse/admin/v2/users/{userId}/devices/{deviceId}: renames the device. */
  async updateDevice(userId: string, deviceId: string, body: Body): Promise<Record<string, never>> {
    await this.getDevice(userId, deviceId);
    const name = body['display_name'];
    if (name === undefined) return {};
    if (name !== null && typeof name !== 'string') throw new MatrixError('M_BAD_JSON', '"display_name" must be a string');
    checkDisplayName(name);
    await this.options.accounts.setDeviceDisplayName(userId, deviceId, name);
    return {};
  }

  /** DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId} and POST …/delete_devices. */
  async deleteDevices(actor: AdminActor, userId: string, deviceIds: readonly unknown[]): Promise<Record<string, never>> {
    await this.existingUser(userId, 'lookup');
    if (deviceIds.length > MAX_DEVICES_PER_DELETE) throw new MatrixError('M_INVALID_PARAM', `At most ${MAX_DEVICES_PER_DELETE} devices can be deleted in one request`);
    if (deviceIds.some((d) => typeof d !== 'string')) throw new MatrixError('M_BAD_JSON', '"devices" must be a list of device IDs (strings)');
    // IDs that cannot be device IDs name no device: nothing to delete.
    const deleted = await this.options.accounts.deleteDevices(userId, (deviceIds as string[]).filter(isValidDeviceId));
    if (deleted.length > 0) this.record(actor, 'devices deleted by an administrator', { user: userId, devices: deleted });
    return {};
  }

  /** POST /_synapse/admin/v1/users/{userId}/_allow_cross_signing_replacement_without_uia */
  async allowCrossSigningReplacementWithoutUia(actor: AdminActor, userId: string): Promise<{ updatable_without_uia_before_ms: number }> {
    await this.existingUser(userId, 'lookup');
    const until = this.now() + CROSS_SIGNING_REPLACEMENT_WINDOW_MS;
    if (!(await this.options.keys.allowMasterKeyReplacementWithoutUia(userId, until))) throw new MatrixError('M_NOT_FOUND', 'User has no master cross-signing key');
    this.record(actor, 'cross-signing key replacement without user-interactive auth allowed by an administrator', { user: userId, until });
    return { updatable_without_uia_before_ms: until };
  }
}
