/**
 * Incoming federation transactions: PUT /_matrix/federation/v1/send/{txnId} (transactions.yaml).
 * The request is already authenticated (X-Matrix); here the body is checked (its `origin` must be
 * the server that signed it, at most 50 PDUs and 100 EDUs), each EDU is handed to the part of
 * mxkeys that owns its type, and the answer is recorded, so a repeated txnId from the same origin
 * gets the same answer and applies nothing twice. Unknown EDU types are ignored (EDUs need no
 * reply). mxkeys holds no rooms: every PDU is answered with an error entry, never by failing the
 * whole transaction.
 */
import { createHash } from 'node:crypto';
import { MatrixError } from '../matrix/errors.js';
import { isObject } from '../matrix/signing.js';
import { canonicalJsonBytes, CanonicalJsonError } from '../matrix/canonical-json.js';
import type { FederationStore } from '../storage/store.js';

/** transactions.yaml: "The list of PDUs. Must not include more than 50 PDUs." / "…more than 100 EDUs." */
const MAX_PDUS = 50;
const MAX_EDUS = 100;
const MAX_TXN_ID_LENGTH = 255;

export type EduHandler = (origin: string, content: unknown) => Promise<void>;

export interface InboundTransactionsOptions {
  readonly store: Pick<FederationStore, 'getInboundTransaction' | 'putInboundTransaction'>;
  /** The handler of each EDU type mxkeys understands. */
  readonly handlers: Readonly<Record<string, EduHandler>>;
  readonly now?: () => number;
}

/** The keys each room version keeps when redacting an event (the top level, v11 rules). */
const KEPT_TOP_LEVEL = ['event_id', 'type', 'room_id', 'sender', 'state_key', 'content', 'hashes', 'signatures', 'depth', 'prev_events', 'auth_events', 'origin_server_ts'];
const KEPT_CONTENT: Readonly<Record<string, readonly string[] | 'all'>> = {
  'm.room.member': ['membership', 'join_authorised_via_users_server'],
  'm.room.create': 'all',
  'm.room.join_rules': ['join_rule', 'allow'],
  'm.room.power_levels': ['ban', 'events', 'events_default', 'invite', 'kick', 'redact', 'state_default', 'users', 'users_default'],
  'm.room.history_visibility': ['history_visibility'],
};

/**
 * The event ID of a PDU, for the `pdus` answer: `event_id` when the PDU carries it (room versions
 * 1 and 2), otherwise its reference hash (room versions 3+: SHA-256 of the redacted event without
 * `signatures` and `unsigned`, URL-safe unpadded base64). We hold no rooms and cannot know the
 * room version, so the redaction follows the current (v11) rules. Undefined when it cannot be
 * computed (the PDU is not canonical JSON).
 */
export function pduEventId(pdu: unknown): string | undefined {
  if (!isObject(pdu)) return undefined;
  if (typeof pdu['event_id'] === 'string') return pdu['event_id'];
  const redacted: Record<string, unknown> = {};
  for (const k of KEPT_TOP_LEVEL) if (k in pdu && k !== 'signatures') redacted[k] = pdu[k];
  const content = isObject(pdu['content']) ? pdu['content'] : {};
  const kept = typeof pdu['type'] === 'string' ? KEPT_CONTENT[pdu['type']] : undefined;
  redacted['content'] = kept === 'all' ? content : Object.fromEntries((kept ?? []).filter((k) => k in content).map((k) => [k, content[k]]));
  try {
    return `$${createHash('sha256').update(canonicalJsonBytes(redacted)).digest('base64url')}`;
  } catch (e) {
    if (e instanceof CanonicalJsonError) return undefined;
    throw e;
  }
}

export class InboundTransactions {
  private readonly inflight = new Map<string, Promise<string>>();
  private readonly now: () => number;
  /** Counts for metrics. */
  readonly stats = { transactions: 0, repeated: 0, edus: 0, edusIgnored: 0 };

  constructor(private readonly options: InboundTransactionsOptions) {
    this.now = options.now ?? Date.now;
  }

  /** PUT /send/{txnId} from `origin`: resolves to the answer's JSON text. */
  receive(origin: string, txnId: string, body: unknown): Promise<string> {
    if (txnId.length === 0 || txnId.length > MAX_TXN_ID_LENGTH) throw new MatrixError('M_INVALID_PARAM', `The transaction ID must be 1 to ${MAX_TXN_ID_LENGTH} characters`);
    const key = `${origin}\0${txnId}`;
    const running = this.inflight.get(key);
    if (running) return running;
    const p = this.process(origin, txnId, body).finally(() => this.inflight.delete(key));
    this.inflight.set(key, p);
    return p;
  }

  private async process(origin: string, txnId: string, body: unknown): Promise<string> {
    if (!isObject(body)) throw new MatrixError('M_BAD_JSON', 'The transaction must be a JSON object');
    if (body['origin'] !== origin) {
      throw new MatrixError('M_FORBIDDEN', `The transaction's origin ${JSON.stringify(body['origin'])} is not ${origin}, the server that signed the request`);
    }
    const ts = body['origin_server_ts'];
    if (typeof ts !== 'number' || !Number.isSafeInteger(ts)) throw new MatrixError('M_BAD_JSON', 'origin_server_ts must be an integer (milliseconds)');
    const pdus = body['pdus'];
    if (!Array.isArray(pdus)) throw new MatrixError('M_BAD_JSON', 'pdus must be a list (it may be empty)');
    if (pdus.length > MAX_PDUS) throw new MatrixError('M_BAD_JSON', `A transaction may carry at most ${MAX_PDUS} PDUs; this one has ${pdus.length}`);
    const edus = body['edus'] ?? [];
    if (!Array.isArray(edus)) throw new MatrixError('M_BAD_JSON', 'edus must be a list');
    if (edus.length > MAX_EDUS) throw new MatrixError('M_BAD_JSON', `A transaction may carry at most ${MAX_EDUS} EDUs; this one has ${edus.length}`);

    const stored = await this.options.store.getInboundTransaction(origin, txnId);
    if (stored !== undefined) {
      this.stats.repeated++;
      return stored;
    }
    for (const edu of edus) {
      const type = isObject(edu) && typeof edu['edu_type'] === 'string' ? edu['edu_type'] : undefined;
      // Own properties only: "hasOwnProperty" is not an EDU type.
      const handler = type !== undefined && Object.hasOwn(this.options.handlers, type) ? this.options.handlers[type] : undefined;
      if (!handler) {
        this.stats.edusIgnored++;
        continue;
      }
      this.stats.edus++;
      // Handlers drop what they cannot use; what they throw (a database failure) fails the
      // transaction without recording it, so the sender sends it again.
      await handler(origin, (edu as Record<string, unknown>)['content']);
    }
    const answer: Record<string, { error: string }> = {};
    for (const pdu of pdus) {
      const id = pduEventId(pdu);
      if (id !== undefined) answer[id] = { error: 'This server is a key server and holds no rooms; the event was not accepted' };
    }
    const response = JSON.stringify({ pdus: answer });
    await this.options.store.putInboundTransaction(origin, txnId, response, this.now());
    this.stats.transactions++;
    return response;
  }
}
