/**
 * Which servers receive a local user's device-list updates. The spec sends them to "all the
 * servers who share a room with a given local user"; mxkeys has no rooms, so a server subscribes
 * by asking about the user (/user/keys/query, /user/devices, /user/keys/claim) and stays
 * subscribed for `lifetimeMs` after its last such request. Servers that keep a cached copy ask
 * again well within that time (mxkeys refetches cached lists every `device_list_refresh_interval`),
 * so their subscription never lapses while they care. An embedding homeserver, which knows the
 * rooms, adds and removes servers itself; those subscriptions do not lapse.
 */
import type { FederationStore } from '../storage/store.js';

export interface SubscriptionsOptions {
  readonly store: Pick<FederationStore, 'subscribe' | 'unsubscribe' | 'subscribers' | 'noteDeviceListRead'>;
  readonly lifetimeMs: number;
  readonly now?: () => number;
}

/** Renewals remembered per process, so repeated requests do not write on every request. */
const REMEMBERED = 100_000;

export class DeviceListSubscriptions {
  private readonly renewed = new Map<string, number>();
  private readonly now: () => number;

  constructor(private readonly options: SubscriptionsOptions) {
    this.now = options.now ?? Date.now;
  }

  /** `server` asked about these local users: it is subscribed to them for another lifetime. */
  async touch(server: string, userIds: readonly string[]): Promise<void> {
    const now = this.now();
    const { lifetimeMs } = this.options;
    // Written again only once a tenth of the lifetime (at most an hour) has passed since the last write.
    const slack = Math.min(lifetimeMs / 10, 3_600_000);
    const due = userIds.filter((u) => {
      const expires = this.renewed.get(`${server}\0${u}`);
      return expires === undefined || expires - now < lifetimeMs - slack;
    });
    if (due.length === 0) return;
    const expiresTs = now + lifetimeMs;
    await this.options.store.subscribe(server, due, expiresTs, now);
    if (this.renewed.size + due.length > REMEMBERED) this.renewed.clear();
    for (const u of due) this.renewed.set(`${server}\0${u}`, expiresTs);
  }

  /** `server` read the user's whole list at `streamId` (/user/devices). */
  noteRead(server: string, userId: string, streamId: number): Promise<void> {
    return this.options.store.noteDeviceListRead(server, userId, streamId);
  }

  /** Library API: these servers receive the user's updates until removed (an embedding homeserver's rooms). */
  async add(userId: string, servers: readonly string[]): Promise<void> {
    for (const server of servers) {
      this.renewed.delete(`${server}\0${userId}`);
      await this.options.store.subscribe(server, [userId], null, this.now());
    }
  }

  /** Library API: these servers no longer receive the user's updates. */
  async remove(userId: string, servers: readonly string[]): Promise<void> {
    for (const server of servers) {
      this.renewed.delete(`${server}\0${userId}`);
      await this.options.store.unsubscribe(server, [userId]);
    }
  }

  /** The servers receiving a user's updates now, with when each subscription ends (null: never). */
  list(userId: string): Promise<{ serverName: string; expiresTs: number | null }[]> {
    return this.options.store.subscribers(userId, this.now());
  }
}
