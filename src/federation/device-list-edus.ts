/**
 * Outgoing device-list EDUs (server-server API, Device Management): built from the changes queued
 * per destination (`device_list_outbound_pokes`, written with each change) when the sender has a
 * transaction to fill.
 *
 * - A device change becomes an m.device_list_update carrying the device's state at send time
 *   (keys with the owner's signatures, `deleted: true` once it is gone). Several changes to one
 *   device still queued are sent as one, with the newest stream_id.
 * - `prev_id` chains the updates per user and destination: the stream_id of the update this
 *   destination last acknowledged for the user (or, after it read the whole list with
 *   /user/devices, that list's stream_id), so the receiver can tell whether it missed one. A chain
 *   that was broken (a lapsed subscription, a compressed queue) starts again with an empty
 *   prev_id, which makes the receiver fetch the whole list.
 * - A cross-signing change becomes an m.signing_key_update with the current master and
 *   self-signing keys (never the user-signing key).
 */
import type { FederationStore, LocalDeviceState } from '../storage/store.js';
import type { Edu, EduSource, OutgoingEdus } from './sender.js';

/** Queued changes read per transaction; coalescing usually shrinks them below 100 EDUs. */
const WINDOW = 1000;

export interface LocalKeysView {
  federationKeysOf(userId: string): Promise<{ devices: Map<string, string>; masterKey: string | undefined; selfSigningKey: string | undefined }>;
}

export interface DeviceListEdusOptions {
  readonly store: Pick<FederationStore, 'pendingPokes' | 'lastSentStreamIds' | 'pokesDelivered' | 'destinationsWithPokes' | 'localDeviceStates' | 'pokeCounts'>;
  readonly keys: LocalKeysView;
  /** Include device display names (`federation.allow_device_name_lookup`, as for /user/devices). */
  readonly displayNames: boolean;
}

export class DeviceListEdus implements EduSource {
  readonly kind = 'device_list';

  constructor(private readonly options: DeviceListEdusOptions) {}

  destinations(now: number): Promise<string[]> {
    return this.options.store.destinationsWithPokes(now);
  }

  queued(): Promise<Map<string, number>> {
    return this.options.store.pokeCounts();
  }

  async take(destination: string, limit: number): Promise<OutgoingEdus | undefined> {
    const { store } = this.options;
    const pokes = await store.pendingPokes(destination, WINDOW);
    if (pokes.length === 0) return undefined;
    const keyOf = (p: { userId: string; deviceId: string | null }) => `${p.userId}\0${p.deviceId ?? ''}`;
    const newest = new Map<string, (typeof pokes)[number]>();
    for (const p of pokes) newest.set(keyOf(p), p);
    const chosen = [...newest.values()].sort((a, b) => a.streamId - b.streamId).slice(0, limit);
    const chosenKeys = new Set(chosen.map(keyOf));
    const acknowledged = pokes.filter((p) => chosenKeys.has(keyOf(p))).map((p) => p.streamId);

    const users = [...new Set(chosen.map((p) => p.userId))];
    const lastSent = await store.lastSentStreamIds(destination, users);
    const views = new Map(await Promise.all(users.map(async (u) => [u, await this.options.keys.federationKeysOf(u)] as const)));
    const states = new Map<string, LocalDeviceState>();
    for (const u of users) {
      const deviceIds = chosen.filter((p) => p.userId === u && p.deviceId !== null).map((p) => p.deviceId!);
      for (const s of await store.localDeviceStates(u, deviceIds)) states.set(`${u}\0${s.deviceId}`, s);
    }

    const edus: Edu[] = [];
    const chains = new Map<string, { from: number | undefined; to: number }>();
    for (const p of chosen) {
      const view = views.get(p.userId)!;
      if (p.deviceId === null) {
        edus.push({
          edu_type: 'm.signing_key_update',
          content: {
            user_id: p.userId,
            ...(view.masterKey !== undefined ? { master_key: JSON.parse(view.masterKey) as unknown } : {}),
            ...(view.selfSigningKey !== undefined ? { self_signing_key: JSON.parse(view.selfSigningKey) as unknown } : {}),
          },
        });
        continue;
      }
      const previous = chains.get(p.userId)?.to ?? lastSent.get(p.userId);
      const state = states.get(keyOf(p));
      const keys = view.devices.get(p.deviceId);
      edus.push({
        edu_type: 'm.device_list_update',
        content: {
          user_id: p.userId,
          device_id: p.deviceId,
          stream_id: p.streamId,
          prev_id: previous === undefined ? [] : [previous],
          ...(state === undefined ? { deleted: true } : {}),
          ...(state !== undefined && keys !== undefined ? { keys: JSON.parse(keys) as unknown } : {}),
          ...(state !== undefined && this.options.displayNames && state.displayName !== null ? { device_display_name: state.displayName } : {}),
        },
      });
      chains.set(p.userId, { from: chains.get(p.userId)?.from ?? lastSent.get(p.userId), to: p.streamId });
    }
    return { edus, delivered: () => store.pokesDelivered(destination, acknowledged, chains) };
  }
}
