/**
 * Key material for tests, made with an Ed25519 implementation independent of ours (tweetnacl)
 * and a tiny independent canonical JSON (enough for the ASCII objects tests build).
 */
import nacl from 'tweetnacl';

type Json = Record<string, unknown>;

export function canonical(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonical((v as Json)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

const b64 = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64').replace(/=+$/, '');

/** Adds `signatures[entity][keyId]`, made by `signText` over the canonical object without signatures/unsigned. */
export function withSignature<T extends Json>(obj: T, entity: string, keyId: string, signText: (text: string) => string): T {
  const { signatures, unsigned, ...rest } = obj as Json;
  const sigs = { ...(signatures as Record<string, Json> | undefined) };
  sigs[entity] = { ...sigs[entity], [keyId]: signText(canonical(rest)) };
  return { ...obj, signatures: sigs, ...(unsigned !== undefined ? { unsigned } : {}) };
}

export class TestSigningKey {
  readonly pair = nacl.sign.keyPair();
  readonly publicKey = b64(this.pair.publicKey);

  sign<T extends Json>(obj: T, entity: string, keyId: string): T {
    return withSignature(obj, entity, keyId, (text) => b64(nacl.sign.detached(Buffer.from(text), this.pair.secretKey)));
  }
}

/** A device's identity: its ed25519 key and signed device keys. */
export class TestDevice {
  readonly ed25519 = new TestSigningKey();
  readonly curve25519 = b64(nacl.randomBytes(32));

  constructor(
    readonly userId: string,
    readonly deviceId: string,
  ) {}

  unsignedDeviceKeys(extra: Json = {}): Json {
    return {
      user_id: this.userId,
      device_id: this.deviceId,
      algorithms: ['m.olm.v1.curve25519-aes-sha2', 'm.megolm.v1.aes-sha2'],
      keys: { [`curve25519:${this.deviceId}`]: this.curve25519, [`ed25519:${this.deviceId}`]: this.ed25519.publicKey },
      ...extra,
    };
  }

  deviceKeys(extra: Json = {}): Json {
    return this.ed25519.sign(this.unsignedDeviceKeys(extra), this.userId, `ed25519:${this.deviceId}`);
  }

  /** A signed one-time key object, as clients upload them. */
  oneTimeKey(extra: Json = {}): Json {
    return this.ed25519.sign({ key: b64(nacl.randomBytes(32)), ...extra }, this.userId, `ed25519:${this.deviceId}`);
  }

  /** `n` signed one-time keys named signed_curve25519:<prefix><i>. */
  oneTimeKeys(n: number, prefix = 'k'): Record<string, Json> {
    const out: Record<string, Json> = {};
    for (let i = 0; i < n; i++) out[`signed_curve25519:${prefix}${i}`] = this.oneTimeKey();
    return out;
  }

  fallbackKey(): Json {
    return this.oneTimeKey({ fallback: true });
  }
}

/** A user's cross-signing keys, signed as clients do. */
export class TestCrossSigning {
  readonly master = new TestSigningKey();
  readonly selfSigning = new TestSigningKey();
  readonly userSigning = new TestSigningKey();

  constructor(readonly userId: string) {}

  private key(k: TestSigningKey, usage: string): Json {
    return { user_id: this.userId, usage: [usage], keys: { [`ed25519:${k.publicKey}`]: k.publicKey } };
  }

  masterKey(): Json {
    return this.key(this.master, 'master');
  }

  selfSigningKey(): Json {
    return this.master.sign(this.key(this.selfSigning, 'self_signing'), this.userId, `ed25519:${this.master.publicKey}`);
  }

  userSigningKey(): Json {
    return this.master.sign(this.key(this.userSigning, 'user_signing'), this.userId, `ed25519:${this.master.publicKey}`);
  }

  upload(): Json {
    return { master_key: this.masterKey(), self_signing_key: this.selfSigningKey(), user_signing_key: this.userSigningKey() };
  }
}
