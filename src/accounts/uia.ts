/**
 * User-Interactive Authentication (C-S spec, "User-Interactive Authentication API").
 *
 * A request without `auth` gets 401 with the flows and a new session. The client repeats the
 * request with `auth: {type, session, …}`; each stage it passes is recorded in the session (in the
 * database, so any mxkeys process can continue it). When every stage of one flow is complete the
 * request goes ahead. A session is bound to the user and to the exact request it was started for
 * (method, path and body without `auth`), as Synapse binds it, so a password typed to delete one
 * device cannot be replayed to delete another. Completed sessions stay valid until they expire, so
 * a client retrying a completed request gets its result, as the spec requires.
 */
import { createHash } from 'node:crypto';
import { MatrixError, type Errcode } from '../matrix/errors.js';
import { canonicalJson } from '../matrix/canonical-json.js';
import type { AccountsStore, UiaSession } from '../storage/store.js';
import { isOpaqueId, newOpaqueId } from './secrets.js';

export const UIA_SESSION_LIFETIME_MS = 30 * 60_000;

export interface UiaBody {
  readonly flows: readonly { readonly stages: readonly string[] }[];
  readonly params: Readonly<Record<string, unknown>>;
  readonly session: string;
  readonly completed?: readonly string[];
}

/** The 401 answer of an unfinished user-interactive auth: the flows, plus an error after a failed stage. */
export class UiaRequired extends MatrixError {
  readonly failed: boolean;

  constructor(
    readonly uia: UiaBody,
    failure?: { errcode: Errcode; message: string },
  ) {
    super(failure?.errcode ?? 'M_UNAUTHORIZED', failure?.message ?? 'User-interactive authentication is required', 401);
    this.failed = failure !== undefined;
  }

  override toJSON(): Record<string, unknown> {
    // Without a failed stage the body is just the UIA object, as in the spec's examples.
    return this.failed ? { ...this.uia, errcode: this.errcode, error: this.message } : { ...this.uia };
  }
}

/** Checks one stage's auth dict; resolves to an error to report, or undefined when it passed. */
export type StageChecker = (auth: Readonly<Record<string, unknown>>, userId: string | null) => Promise<{ errcode: Errcode; message: string } | undefined>;

export interface UiaRequest {
  /** The authenticated user, or null (registration). */
  readonly userId: string | null;
  readonly method: string;
  readonly path: string;
  /** The request body without `auth`: the session is bound to it. */
  readonly body: unknown;
  /** The `auth` field of the request, as sent. */
  readonly auth: unknown;
  /** Alternative flows, each a list of stage types. */
  readonly flows: readonly (readonly string[])[];
}

export class UserInteractiveAuth {
  constructor(
    private readonly store: AccountsStore,
    private readonly stages: Readonly<Record<string, StageChecker>>,
    private readonly now: () => number = Date.now,
  ) {}

  private operation(r: UiaRequest): string {
    let body = '';
    try {
      body = canonicalJson(r.body ?? null);
    } catch {
      body = JSON.stringify(r.body ?? null);
    }
    // Stored hashed: the path and body may name devices or carry secrets.
    return createHash('sha256').update(`${r.method} ${r.path} ${body}`).digest('base64');
  }

  private uiaBody(r: UiaRequest, sessionId: string, completed: readonly string[]): UiaBody {
    return {
      flows: r.flows.map((stages) => ({ stages: [...stages] })),
      params: {},
      session: sessionId,
      ...(completed.length > 0 ? { completed: [...completed] } : {}),
    };
  }

  private async newSession(r: UiaRequest, operation: string): Promise<UiaSession> {
    const session: UiaSession = { sessionId: newOpaqueId(), userId: r.userId, operation, completed: [], createdTs: this.now() };
    await this.store.createUiaSession(session);
    return session;
  }

  private done(r: UiaRequest, completed: readonly string[]): boolean {
    return r.flows.some((flow) => flow.every((stage) => completed.includes(stage)));
  }

  /** Resolves when the request is fully authenticated; otherwise throws the 401 (or 4xx) to answer. */
  async require(r: UiaRequest): Promise<void> {
    const operation = this.operation(r);
    if (r.auth === undefined || r.auth === null) {
      const session = await this.newSession(r, operation);
      throw new UiaRequired(this.uiaBody(r, session.sessionId, []));
    }
    if (typeof r.auth !== 'object' || Array.isArray(r.auth)) throw new MatrixError('M_BAD_JSON', '"auth" must be an object');
    const auth = r.auth as Record<string, unknown>;
    if (auth['session'] !== undefined && typeof auth['session'] !== 'string') throw new MatrixError('M_BAD_JSON', '"auth.session" must be a string');
    if (auth['type'] !== undefined && typeof auth['type'] !== 'string') throw new MatrixError('M_BAD_JSON', '"auth.type" must be a string');

    let session: UiaSession;
    if (auth['session'] === undefined) {
      // Synapse starts a session when the client skips the empty first request.
      session = await this.newSession(r, operation);
    } else {
      const id = auth['session'] as string;
      const found = isOpaqueId(id) ? await this.store.getUiaSession(id) : undefined;
      if (!found || found.createdTs < this.now() - UIA_SESSION_LIFETIME_MS) {
        throw new MatrixError('M_UNKNOWN', 'Unknown or expired user-interactive auth session; start again without "auth.session"', 400);
      }
      if (found.userId !== r.userId || found.operation !== operation) {
        throw new MatrixError('M_FORBIDDEN', 'This auth session was started for a different request; start a new one for this request', 403);
      }
      session = found;
    }

    let completed = session.completed;
    const type = auth['type'] as string | undefined;
    if (type !== undefined && !completed.includes(type)) {
      const allowed = r.flows.some((flow) => flow.includes(type));
      const checker = this.stages[type];
      if (!allowed || !checker) {
        throw new MatrixError('M_UNRECOGNIZED', `Auth type "${type}" is not offered here; use one of: ${[...new Set(r.flows.flat())].join(', ')}`, 400);
      }
      const failure = await checker(auth, r.userId);
      if (failure) throw new UiaRequired(this.uiaBody(r, session.sessionId, completed), failure);
      await this.store.completeUiaStage(session.sessionId, type);
      completed = [...completed, type];
    }
    if (!this.done(r, completed)) throw new UiaRequired(this.uiaBody(r, session.sessionId, completed));
  }
}
