/**
 * Outgoing to-device messages (server-server API, "Send-to-device messaging"): the
 * m.direct_to_device EDUs queued per destination (`device_federation_outbox`, written with the
 * client's request), oldest first. They go before device-list updates in a transaction, as
 * Synapse sends them, keeping some room for those: encryption channels depend on them.
 */
import type { ToDeviceStore } from '../storage/store.js';
import { MAX_EDUS_PER_TRANSACTION, type EduSource, type OutgoingEdus } from './sender.js';

/** Synapse keeps 10 of a transaction's 100 EDUs for device-list updates; so do we. */
const MAX_PER_TRANSACTION = MAX_EDUS_PER_TRANSACTION - 10;

export class ToDeviceEdus implements EduSource {
  readonly kind = 'to_device';

  constructor(private readonly store: Pick<ToDeviceStore, 'pendingEdus' | 'edusDelivered' | 'destinationsWithEdus' | 'eduCounts'>) {}

  destinations(now: number): Promise<string[]> {
    return this.store.destinationsWithEdus(now);
  }

  queued(): Promise<Map<string, number>> {
    return this.store.eduCounts();
  }

  async take(destination: string, limit: number): Promise<OutgoingEdus | undefined> {
    const rows = await this.store.pendingEdus(destination, Math.min(limit, MAX_PER_TRANSACTION));
    if (rows.length === 0) return undefined;
    return {
      edus: rows.map((r) => ({ edu_type: 'm.direct_to_device', content: JSON.parse(r.eduJson) as Record<string, unknown> })),
      delivered: () => this.store.edusDelivered(destination, rows.map((r) => r.streamId)),
    };
  }
}
