/**
 * GET /sync, the parts a key server has: `device_lists`, the key counts (e2e spec, "Extensions to
 * /sync") and `to_device` (send_to_device.md, "Extensions to /sync"). The `since` token
 * acknowledges the to-device messages of the answer that issued it: they are removed then, not
 * before, so an answer that never arrives loses nothing (the same `since` gets them again).
 * Uses the key rules, the device-list stream and a ToDeviceInbox; no HTTP, no driver.
 */
import type { DeviceListsStore } from '../storage/store.js';
import type { Keys, Requester } from './service.js';
import { parseSyncToken, syncToken, type SyncPosition } from './sync-token.js';

/** A device's to-device messages, as /sync hands them out (implemented in todevice/). */
export interface ToDeviceInbox {
  /**
   * The device's messages after position `after` (at most one answer's worth), oldest first, as
   * event JSON texts, with the position of the last one (`after` when there are none). With
   * `acknowledge`, the messages up to `after` are removed first.
   */
  take(requester: Requester, after: number, acknowledge: boolean): Promise<{ events: readonly string[]; position: number }>;
  /** Calls `listener` with the users who received messages through this process, once stored. */
  onMessage(listener: (userIds: readonly string[]) => void): () => void;
}

export interface SyncOptions {
  readonly keys: Pick<Keys, 'changesBetween' | 'deviceKeyCounts'>;
  readonly deviceLists: Pick<DeviceListsStore, 'currentStreamId'>;
  /** Without it, /sync has no `to_device`. */
  readonly toDevice?: ToDeviceInbox | undefined;
}

/** Longest a /sync waits for news, whatever the client asks for. */
const MAX_SYNC_WAIT_MS = 30_000;
/** How often a waiting /sync looks for news from other processes. */
const SYNC_POLL_MS = 500;

/** Wakes a waiting /sync at once when a to-device message for its user is stored in this process. */
class Wakeup {
  private woken = false;
  private resolve: (() => void) | undefined;
  private readonly unsubscribe: () => void;

  constructor(inbox: ToDeviceInbox | undefined, userId: string) {
    this.unsubscribe = inbox?.onMessage((userIds) => {
      if (!userIds.includes(userId)) return;
      this.woken = true;
      this.resolve?.();
    }) ?? (() => undefined);
  }

  /** Waits `ms`, or less when woken or `stop` is aborted. */
  wait(ms: number, stop: AbortSignal): Promise<void> {
    if (this.woken || stop.aborted) {
      this.woken = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        stop.removeEventListener('abort', done);
        this.resolve = undefined;
        this.woken = false;
        resolve();
      };
      const timer = setTimeout(done, ms);
      stop.addEventListener('abort', done, { once: true });
      this.resolve = done;
    });
  }

  close(): void {
    this.unsubscribe();
  }
}

export class Sync {
  constructor(private readonly options: SyncOptions) {}

  /**
   * The /sync answer as JSON text. An incremental sync (with `since`) waits up to `timeoutMs` (at
   * most 30 s) for a device-list change the caller can see or a to-device message, unless there is
   * one already; `stop` ends the wait at once (shutdown, or the client went away).
   */
  async sync(requester: Requester, since: string | undefined, timeoutMs: number, stop: AbortSignal): Promise<string> {
    const { keys, deviceLists, toDevice } = this.options;
    const from: SyncPosition | undefined = since === undefined ? undefined : parseSyncToken(since, 'since');
    // Subscribed before reading, so a message stored in between wakes the wait below.
    const wakeup = new Wakeup(toDevice, requester.userId);
    try {
      let inbox = toDevice ? await toDevice.take(requester, from?.toDevice ?? 0, from !== undefined) : undefined;
      let position = await deviceLists.currentStreamId();
      let changes: { changed: string[]; left: string[] } | undefined;
      if (from !== undefined) {
        const deadline = Date.now() + Math.min(timeoutMs, MAX_SYNC_WAIT_MS);
        for (;;) {
          changes = await keys.changesBetween(requester.userId, from.deviceLists, position);
          const news = changes.changed.length > 0 || changes.left.length > 0 || (inbox !== undefined && inbox.events.length > 0);
          if (news || Date.now() >= deadline || stop.aborted) break;
          await wakeup.wait(Math.min(SYNC_POLL_MS, deadline - Date.now()), stop);
          // Stopped while waiting: answer with what was read last (nothing new), at once.
          if (stop.aborted) break;
          if (toDevice) inbox = await toDevice.take(requester, from.toDevice, false);
          position = await deviceLists.currentStreamId();
        }
      }
      const counts = await keys.deviceKeyCounts(requester);
      let out = `{"next_batch":${JSON.stringify(syncToken({ deviceLists: position, toDevice: inbox?.position ?? from?.toDevice ?? 0 }))}`;
      if (changes) out += `,"device_lists":${JSON.stringify(changes)}`;
      out += `,"device_one_time_keys_count":${JSON.stringify(counts.device_one_time_keys_count)}`;
      out += `,"device_unused_fallback_key_types":${JSON.stringify(counts.device_unused_fallback_key_types)}`;
      if (inbox) out += `,"to_device":{"events":[${inbox.events.join(',')}]}`;
      return `${out}}`;
    } finally {
      wakeup.close();
    }
  }
}
