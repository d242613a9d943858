/**
 * The bytes of a key query answer, put together per user. Each user's part (their devices' keys
 * with `unsigned` and the signatures stored apart merged in, and their cross-signing keys) is
 * built from the stored key text once, encoded as UTF-8 once, and kept while the stored data is
 * unchanged: answering a query about many users then costs a lookup per user and one copy of the
 * bytes, not work per device. Keys are never rebuilt from a model: the text is the uploaded text
 * (json-text.ts).
 */
import { keysOfUserBytes, type KeysOfUser, type StoredSignature } from '../storage/store.js';
import { withSignatures, withUnsigned } from './json-text.js';

/** Who reads keys: a local user, or another server (no user: only owners' own signatures show). */
export type Viewer = { readonly userId: string } | null;

/**
 * A key's answer text: the same for every viewer, or depending on the viewer when other users
 * signed it (user-signing-key signatures are for the signer's eyes only; e2e spec, "Key and
 * signature security").
 */
type ViewedText = string | ((viewer: Viewer) => string);

/**
 * A member of one of the answer's objects, `,"<user ID>":<value>` (the leading comma is left out
 * for the first member): UTF-8 bytes when the same for every viewer, else made per viewer.
 */
type Member = Buffer | ((viewer: Viewer) => string);

const view = (t: ViewedText, viewer: Viewer): string => (typeof t === 'string' ? t : t(viewer));
const then = (t: ViewedText, f: (s: string) => string): ViewedText => (typeof t === 'string' ? f(t) : (viewer) => f(t(viewer)));
const memberOf = (quoted: string, t: ViewedText): Member => (typeof t === 'string' ? Buffer.from(`,${quoted}:${t}`) : (viewer) => `,${quoted}:${t(viewer)}`);

/** One user's part of a query answer, for one setting of display names. */
export interface UserAnswer {
  /** Whether the user has an account here (worth tracking for /keys/changes). */
  readonly account: boolean;
  /** The user ID as a JSON string. */
  readonly quoted: string;
  /** Each device's keys object (for queries naming devices), in the order read. */
  readonly devices: readonly (readonly [string, ViewedText])[];
  /** The user's member of `device_keys` with every device. */
  readonly allDevices: Member;
  readonly master: Member | undefined;
  readonly selfSigning: Member | undefined;
  readonly userSigning: Member | undefined;
  /** Bytes held (roughly), for the cache budget. */
  readonly size: number;
}

/** `{"k":v,…}` from keys and already-encoded JSON values. */
export function objectText(entries: Iterable<readonly [string, string]>): string {
  let out = '{';
  let first = true;
  for (const [k, v] of entries) {
    if (!first) out += ',';
    first = false;
    out += `${JSON.stringify(k)}:${v}`;
  }
  return `${out}}`;
}

/** `userId`'s part of an answer from their stored keys (and, for users of other servers, fetched ones). */
export function userAnswer(userId: string, keys: KeysOfUser, displayNames: boolean): UserAnswer {
  const byTarget = new Map<string, StoredSignature[]>();
  for (const s of keys.signatures) {
    const list = byTarget.get(s.targetKeyId);
    if (list) list.push(s);
    else byTarget.set(s.targetKeyId, [s]);
  }
  const signed = (json: string, targetKeyId: string): ViewedText => {
    const all = byTarget.get(targetKeyId);
    if (all === undefined) return json;
    if (all.every((s) => s.signerUserId === s.targetUserId)) return withSignatures(json, all);
    return (viewer) => withSignatures(json, all.filter((s) => s.signerUserId === s.targetUserId || (viewer !== null && s.signerUserId === viewer.userId)));
  };

  const quoted = JSON.stringify(userId);
  const devices = keys.devices.map((d) => {
    const unsigned = displayNames && d.displayName !== null ? `{"device_display_name":${JSON.stringify(d.displayName)}}` : '{}';
    return [d.deviceId, then(signed(d.json, d.deviceId), (json) => withUnsigned(json, unsigned))] as const;
  });
  const allDevices = memberOf(
    quoted,
    devices.every(([, t]) => typeof t === 'string')
      ? objectText(devices as (readonly [string, string])[])
      : (viewer) => objectText(devices.map(([id, t]) => [id, view(t, viewer)] as const)),
  );
  const crossSigning = (type: string): Member | undefined => {
    const k = keys.crossSigning.find((c) => c.keyType === type);
    return k && memberOf(quoted, signed(k.json, k.publicKey));
  };
  const part = { account: keys.account, quoted, devices, allDevices, master: crossSigning('master'), selfSigning: crossSigning('self_signing'), userSigning: crossSigning('user_signing') };
  // The objects themselves, the encoded members, the devices' texts and the stored text kept
  // alongside (UserAnswerCache): a rough count, but not one that leaves much out.
  let size = 1000;
  for (const m of [part.allDevices, part.master, part.selfSigning, part.userSigning]) size += m !== undefined && typeof m !== 'function' ? m.length : 0;
  for (const d of keys.devices) size += 2 * d.json.length;
  for (const k of keys.crossSigning) size += k.json.length;
  return { ...part, size };
}

const ascii = (s: string) => Buffer.from(s, 'latin1');
const DEVICE_KEYS = ascii('{"device_keys":{');
const MASTER_KEYS = ascii('},"master_keys":{');
const SELF_SIGNING_KEYS = ascii('},"self_signing_keys":{');
const USER_SIGNING_KEYS = ascii('},"user_signing_keys":{');
const END = ascii('}}');

/**
 * A query answer: `device_keys`, `master_keys` and `self_signing_keys` (and `user_signing_keys`
 * for the client API), members in the order of `users`, then `tail` (e.g. `,"failures":{}`), as
 * UTF-8. `wanted` maps each user to the device IDs asked for (none: all).
 */
export function answerBytes(
  users: readonly string[],
  parts: ReadonlyMap<string, UserAnswer>,
  wanted: Readonly<Record<string, unknown>>,
  viewer: Viewer,
  clientApi: boolean,
  tail: string,
): Buffer {
  const chunks: Buffer[] = [DEVICE_KEYS];
  const section = (pick: (p: UserAnswer, u: string) => Member | undefined) => {
    let first = true;
    for (const u of users) {
      const m = pick(parts.get(u)!, u);
      if (m === undefined) continue;
      const bytes = typeof m === 'function' ? Buffer.from(m(viewer)) : m;
      chunks.push(first ? bytes.subarray(1) : bytes);
      first = false;
    }
  };
  section((p, u) => {
    const only = wanted[u] as readonly string[];
    if (only.length === 0) return p.allDevices;
    return memberOf(p.quoted, objectText(p.devices.filter(([id]) => only.includes(id)).map(([id, t]) => [id, view(t, viewer)] as const)));
  });
  chunks.push(MASTER_KEYS);
  section((p) => p.master);
  chunks.push(SELF_SIGNING_KEYS);
  section((p) => p.selfSigning);
  if (clientApi) {
    chunks.push(USER_SIGNING_KEYS);
    // A user-signing key is shown to its owner only.
    section((p, u) => (viewer !== null && viewer.userId === u ? p.userSigning : undefined));
  }
  chunks.push(tail === '' ? END : Buffer.from(`}${tail}}`));
  return Buffer.concat(chunks);
}

/** Whether two reads of a user's keys found the same (in the same order). */
function sameKeys(a: KeysOfUser, b: KeysOfUser): boolean {
  if (a === b) return true;
  if (a.account !== b.account || a.devices.length !== b.devices.length || a.crossSigning.length !== b.crossSigning.length || a.signatures.length !== b.signatures.length) return false;
  for (let i = 0; i < a.devices.length; i++) {
    const x = a.devices[i]!;
    const y = b.devices[i]!;
    if (x.deviceId !== y.deviceId || x.displayName !== y.displayName || x.json !== y.json) return false;
  }
  for (let i = 0; i < a.crossSigning.length; i++) {
    const x = a.crossSigning[i]!;
    const y = b.crossSigning[i]!;
    if (x.keyType !== y.keyType || x.publicKey !== y.publicKey || x.json !== y.json) return false;
  }
  for (let i = 0; i < a.signatures.length; i++) {
    const x = a.signatures[i]!;
    const y = b.signatures[i]!;
    if (x.targetKeyId !== y.targetKeyId || x.signerUserId !== y.signerUserId || x.signerKeyId !== y.signerKeyId || x.signature !== y.signature) return false;
  }
  return true;
}

interface Kept {
  /** What the part was built from. */
  readonly keys: KeysOfUser;
  readonly part: UserAnswer;
  /** The bytes of both, as counted against the budget. */
  readonly bytes: number;
  /** The data version it is known to be current for; undefined: only its keys say what it is. */
  version: number | undefined;
}

/**
 * Users' answer parts, kept with the keys they were built from, bounded by the bytes they hold
 * (oldest dropped first). A part is used without reading when the store's data version is the
 * one it was read at; otherwise the keys are read again, and the part is used if they are the
 * same as before (cheaper than building it anew: a comparison instead of merging and encoding).
 */
export class UserAnswerCache {
  /** By user ID, one map per setting of display names. */
  private readonly entries = [new Map<string, Kept>(), new Map<string, Kept>()] as const;
  private bytes = 0;

  constructor(private readonly budgetBytes: number) {}

  /** The parts of `users` known to be current at `version`, and the users whose keys must be read. */
  lookup(version: number | undefined, users: readonly string[], displayNames: boolean): { found: Map<string, UserAnswer>; missing: string[] } {
    const entries = this.entries[displayNames ? 1 : 0];
    const found = new Map<string, UserAnswer>();
    const missing: string[] = [];
    for (const u of users) {
      const kept = version === undefined ? undefined : entries.get(u);
      if (kept !== undefined && kept.version === version) found.set(u, kept.part);
      else missing.push(u);
    }
    return { found, missing };
  }

  /**
   * The part for keys just read: the kept one if built from the same keys, else a new one, kept.
   * `version` is the data version the keys are current for, if known.
   */
  partFor(userId: string, keys: KeysOfUser, displayNames: boolean, version: number | undefined): UserAnswer {
    const entries = this.entries[displayNames ? 1 : 0];
    const kept = entries.get(userId);
    if (kept !== undefined && sameKeys(kept.keys, keys)) {
      kept.version = version;
      return kept.part;
    }
    const part = userAnswer(userId, keys, displayNames);
    const bytes = part.size + keysOfUserBytes(keys);
    // Room is made by dropping kept parts, map by map, oldest first.
    for (const m of this.entries) {
      for (const [oldUser, old] of m) {
        if (this.bytes + bytes <= this.budgetBytes) break;
        m.delete(oldUser);
        this.bytes -= old.bytes;
      }
    }
    const before = entries.get(userId);
    if (before !== undefined) this.bytes -= before.bytes;
    entries.set(userId, { keys, part, version, bytes });
    this.bytes += bytes;
    return part;
  }

  /** Bytes held (roughly; metrics and tests). */
  size(): number {
    return this.bytes;
  }
}
