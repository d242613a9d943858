/**
 * To-device messaging (send_to_device.md): PUT /sendToDevice stores messages for local devices
 * and queues m.direct_to_device EDUs for other servers, once per (device, event type, txnId);
 * messages from other servers' EDUs are stored once per (origin, message_id); /sync hands each
 * device its messages in order (sync.ts, through ToDeviceInbox) and removes them once the next
 * /sync acknowledges them. Uses the ToDeviceStore only; no HTTP, no driver. The federation sender
 * sends the queued EDUs (federation/to-device-edus.ts); those a server has not taken within
 * `federation.max_undelivered_age` are dropped by the periodic cleanup.
 */
import { randomBytes } from 'node:crypto';
import { parseUserId } from '../matrix/ids.js';
import type { NewToDeviceMessage, StoredToDevice, ToDeviceStore } from '../storage/store.js';
import type { Requester } from '../keys/service.js';
import type { ToDeviceInbox } from '../keys/sync.js';
import { checkPathId, directToDeviceEdus, eventText, MAX_MESSAGE_BYTES, parseDirectToDevice, parseSendBody, type DeviceMessage } from './messages.js';

/** send_to_device.md: "100 messages is recommended as a reasonable limit" per /sync (Synapse's too). */
export const MESSAGES_PER_SYNC = 100;
/**
 * And at most this many bytes of events per /sync (beyond the first message, which goes whatever
 * its size): 100 messages of 60 KiB would make a 6 MB answer for a phone on a slow link.
 */
export const BYTES_PER_SYNC = 1024 * 1024;
/** Clients retry a transaction within minutes; its ID is remembered for a day. */
const TXN_RETENTION_MS = 24 * 3_600_000;
/** Servers retry a transaction for as long as they keep it; a message ID is remembered for a week. */
const MESSAGE_ID_RETENTION_MS = 7 * 24 * 3_600_000;

export interface ToDeviceOptions {
  readonly store: ToDeviceStore;
  readonly serverName: string;
  /** Most device messages one PUT /sendToDevice may carry (`to_device.max_messages_per_request`). */
  readonly maxMessagesPerRequest: number;
  /** Most messages waiting for one device; beyond it the oldest are dropped (`to_device.max_pending_per_device`). */
  readonly maxPendingPerDevice: number;
  /** Most bytes of messages waiting for one device; beyond it the oldest are dropped (`to_device.max_pending_bytes_per_device`). */
  readonly maxPendingBytesPerDevice: number;
  /** EDUs queued for another server longer than this are dropped undelivered (`federation.max_undelivered_age`). */
  readonly maxUndeliveredAgeMs: number;
  readonly now?: () => number;
  readonly log?: (level: 'info' | 'warn', message: string, details: Record<string, unknown>) => void;
}

/** Counts for metrics. */
export interface ToDeviceStats {
  /** Messages stored for local devices, from local clients and from other servers. */
  fromClients: number;
  fromFederation: number;
  /** Messages dropped because their device's inbox was full (`maxPendingPerDevice` or `maxPendingBytesPerDevice`). */
  droppedInboxFull: number;
  /** Messages of received EDUs dropped: contents over MAX_MESSAGE_BYTES, entries beyond `maxMessagesPerRequest`. */
  droppedTooLarge: number;
  droppedTooMany: number;
  /** Messages for other servers dropped because the server did not take them within `maxUndeliveredAgeMs`. */
  droppedUndelivered: number;
  /** Repeated requests (same txnId) and repeated EDUs (same message_id): nothing stored again. */
  repeatedTxns: number;
  repeatedEdus: number;
  /** m.direct_to_device EDUs queued for other servers, received, and received but unusable. */
  edusQueued: number;
  edusReceived: number;
  edusDropped: number;
}

export class ToDevice implements ToDeviceInbox {
  readonly stats: ToDeviceStats = {
    fromClients: 0,
    fromFederation: 0,
    droppedInboxFull: 0,
    droppedTooLarge: 0,
    droppedTooMany: 0,
    droppedUndelivered: 0,
    repeatedTxns: 0,
    repeatedEdus: 0,
    edusQueued: 0,
    edusReceived: 0,
    edusDropped: 0,
  };
  private readonly store: ToDeviceStore;
  private readonly now: () => number;

  constructor(private readonly options: ToDeviceOptions) {
    this.store = options.store;
    this.now = options.now ?? Date.now;
  }

  private log(level: 'info' | 'warn', message: string, details: Record<string, unknown>): void {
    this.options.log?.(level, message, details);
  }

  /** Local messages as stored: one event text per device entry (or `*`). */
  private static local(sender: string, type: string, messages: readonly DeviceMessage[]): NewToDeviceMessage[] {
    return messages.map((m) => ({ userId: m.userId, deviceId: m.deviceId, messageJson: eventText(sender, type, m.content) }));
  }

  private noteDropped(result: StoredToDevice): void {
    for (const d of result.dropped) {
      this.stats.droppedInboxFull += d.count;
      this.log('info', "a device's to-device inbox was full: its oldest messages were dropped (to_device.max_pending_per_device, to_device.max_pending_bytes_per_device)", {
        user: d.userId,
        device: d.deviceId,
        dropped: d.count,
        limit: this.options.maxPendingPerDevice,
        limit_bytes: this.options.maxPendingBytesPerDevice,
      });
    }
  }

  /**
   * PUT /sendToDevice/{eventType}/{txnId}: stores the messages for local devices that exist
   * (unknown users and devices are skipped, as Synapse does) and queues EDUs for other servers, in
   * one transaction. A txnId this device already used for this event type stores nothing again
   * (Synapse keys its transaction cache by the request path, which holds the event type).
   */
  async send(requester: Requester, eventType: string, txnId: string, body: unknown): Promise<void> {
    checkPathId(eventType, 'eventType');
    checkPathId(txnId, 'txnId');
    const messages = parseSendBody(body, this.options.maxMessagesPerRequest);
    const local: DeviceMessage[] = [];
    const byServer = new Map<string, DeviceMessage[]>();
    for (const m of messages) {
      const server = parseUserId(m.userId)!.serverName;
      if (server === this.options.serverName) local.push(m);
      else {
        const list = byServer.get(server);
        if (list) list.push(m);
        else byServer.set(server, [m]);
      }
    }
    const remote = [...byServer].flatMap(([destination, list]) =>
      directToDeviceEdus(requester.userId, eventType, list, () => randomBytes(12).toString('base64url')).map((e) => ({ destination, eduJson: e.json, messages: e.messages })),
    );
    const result = await this.store.addMessages({
      txn: { userId: requester.userId, deviceId: requester.deviceId, eventType, txnId },
      local: ToDevice.local(requester.userId, eventType, local),
      remote,
      maxPendingPerDevice: this.options.maxPendingPerDevice,
      maxPendingBytesPerDevice: this.options.maxPendingBytesPerDevice,
      now: this.now(),
    });
    if (!result.stored) {
      this.stats.repeatedTxns++;
      return;
    }
    this.stats.fromClients += result.messages;
    this.stats.edusQueued += remote.length;
    this.noteDropped(result);
  }

  /**
   * An m.direct_to_device EDU from `origin` (already authenticated): its messages for local
   * devices are stored like local ones, unless this origin sent this message_id before, and held
   * to the same limits (MAX_MESSAGE_BYTES per content, `maxMessagesPerRequest` entries). What
   * cannot be used is dropped with a log line; only a database failure throws (the origin then
   * sends the transaction again).
   */
  async receiveEdu(origin: string, content: unknown): Promise<void> {
    this.stats.edusReceived++;
    const edu = parseDirectToDevice(origin, content, this.options.serverName, this.options.maxMessagesPerRequest);
    if (typeof edu === 'string') {
      this.stats.edusDropped++;
      this.log('info', 'dropped an m.direct_to_device EDU', { origin, reason: edu });
      return;
    }
    if (edu.skipped > 0) this.log('info', 'dropped entries of an m.direct_to_device EDU that are not for a device of this server', { origin, message_id: edu.messageId, skipped: edu.skipped });
    const result = await this.store.addMessages({
      inbound: { origin, messageId: edu.messageId },
      local: ToDevice.local(edu.sender, edu.type, edu.messages),
      remote: [],
      maxPendingPerDevice: this.options.maxPendingPerDevice,
      maxPendingBytesPerDevice: this.options.maxPendingBytesPerDevice,
      now: this.now(),
    });
    if (!result.stored) {
      this.stats.repeatedEdus++;
      return;
    }
    // Counted and logged once per message_id, not again for each repeat of the EDU.
    if (edu.tooLarge > 0 || edu.tooMany > 0) {
      this.stats.droppedTooLarge += edu.tooLarge;
      this.stats.droppedTooMany += edu.tooMany;
      this.log('info', 'dropped messages of an m.direct_to_device EDU beyond the limits of a local request', {
        origin,
        message_id: edu.messageId,
        sender: edu.sender,
        too_large: edu.tooLarge,
        max_message_bytes: MAX_MESSAGE_BYTES,
        too_many: edu.tooMany,
        max_messages: this.options.maxMessagesPerRequest,
      });
    }
    this.stats.fromFederation += result.messages;
    this.noteDropped(result);
  }

  /** ToDeviceInbox: the device's next messages for /sync, after removing acknowledged ones. */
  async take(requester: Requester, after: number, acknowledge: boolean): Promise<{ events: readonly string[]; position: number }> {
    const { userId, deviceId } = requester;
    if (acknowledge && after > 0) await this.store.deleteMessagesUpTo(userId, deviceId, after);
    const pending = await this.store.messagesAfter(userId, deviceId, after, MESSAGES_PER_SYNC, BYTES_PER_SYNC);
    return { events: pending.map((p) => p.messageJson), position: pending.at(-1)?.streamId ?? after };
  }

  onMessage(listener: (userIds: readonly string[]) => void): () => void {
    return this.store.onChange(({ userIds }) => {
      if (userIds.length > 0) listener(userIds);
    });
  }

  /**
   * Housekeeping: forgets old transaction and message IDs, and drops EDUs that other servers have
   * not taken within `maxUndeliveredAgeMs`, so a server that is gone for good does not make the
   * outbox grow forever (Synapse keeps them until delivered). Such messages are mostly room keys
   * and verification steps that the devices will have asked for again, or given up on, by then.
   */
  async cleanup(): Promise<void> {
    const now = this.now();
    await this.store.cleanup(now - TXN_RETENTION_MS, now - MESSAGE_ID_RETENTION_MS);
    for (const d of await this.store.expireEdus(now - this.options.maxUndeliveredAgeMs)) {
      this.stats.droppedUndelivered += d.messages;
      this.log('warn', 'dropped to-device messages a server has not taken for federation.max_undelivered_age', {
        destination: d.destination,
        messages: d.messages,
        edus: d.edus,
        max_undelivered_age_ms: this.options.maxUndeliveredAgeMs,
      });
    }
  }

  /** Messages waiting in local inboxes (metrics). */
  pendingMessages(): Promise<number> {
    return this.store.pendingMessageCount();
  }
}
