/**
 * A session's lifecycle as one discriminated union. Each state carries what it owns (the
 * server's control connection exists only from `open` on), and every change goes through
 * `transition()`, which checks it is allowed and logs it.
 *
 *   connecting ──> open ──> closing ──> closed
 *        └───────────┴─────────┴──────────^   (teardown: from anywhere)
 *
 * TLS handshakes did not need a state of their own: the client's implicit handshake runs in
 * `connecting` before the server is dialled, the server's inside ServerLeg before `open`, and
 * AUTH's in `open` while the command pipeline waits on it (session/client-tls.ts,
 * session/upstream-tls.ts). Forward mode did not need one either: until the client names its
 * server the session stays in `connecting` with its command pipeline running (the proxy's own
 * 220 went out, control/pre-login.ts answers), and the chosen server's connection makes it `open`.
 */
import type { SocketAddresses } from '../data/socket-address.js';
import type { Logger } from '../log.js';
import type { ControlConnection } from './control-connection.js';

/** Why the server closing its control connection is no failure (no 421 to the client). */
export type ExpectedServerClose = 'quit' | 'client-fin' | 'server-421';

export interface UpstreamControl {
  readonly connection: ControlConnection;
  /** Read once at connect: the server's control address and ours toward it. */
  readonly addresses: SocketAddresses;
}

export type SessionState =
  /** Dialling the server; the client's greeting slot is reserved, its commands queue up. */
  | { readonly kind: 'connecting'; readonly clientFin: boolean }
  /** Relaying. */
  | {
      readonly kind: 'open';
      readonly upstream: UpstreamControl;
      /** A 230 has come: the login timeout no longer applies. */
      readonly loggedIn: boolean;
      /** The server's close, when it comes, is one the session asked for or was told of. */
      readonly serverCloseExpected: ExpectedServerClose | null;
    }
  /** Taking no more commands; every reply still owed is written, then the client is closed. */
  | { readonly kind: 'closing'; readonly upstream: UpstreamControl | null; readonly why: string }
  /** Everything released. */
  | { readonly kind: 'closed'; readonly why: string };

export type SessionStateKind = SessionState['kind'];

const ALLOWED: Readonly<Record<SessionStateKind, readonly SessionStateKind[]>> = {
  connecting: ['connecting', 'open', 'closing', 'closed'],
  open: ['open', 'closing', 'closed'],
  closing: ['closed'],
  closed: [],
};

/** True when the lifecycle may go from `from` to `to`. */
export function canTransition(from: SessionStateKind, to: SessionStateKind): boolean {
  return ALLOWED[from].includes(to);
}

export class SessionLifecycle {
  private current: SessionState;
  private readonly log: Logger;

  constructor(log: Logger, initial: SessionState = { kind: 'connecting', clientFin: false }) {
    this.log = log;
    this.current = initial;
  }

  get state(): SessionState {
    return this.current;
  }

  /** Closing or closed: no new work is taken. */
  get isFinished(): boolean {
    return this.current.kind === 'closing' || this.current.kind === 'closed';
  }

  get isClosed(): boolean {
    return this.current.kind === 'closed';
  }

  /** The server's control connection while there is one. */
  get upstream(): UpstreamControl | null {
    const state = this.current;
    return state.kind === 'open' || state.kind === 'closing' ? state.upstream : null;
  }

  /**
   * Move to `next`; false (and nothing changes) when the lifecycle cannot go there from where
   * it is, e.g. anything after `closed`: callers need no guard of their own for idempotence.
   */
  transition(next: SessionState): boolean {
    const from = this.current.kind;
    if (!canTransition(from, next.kind)) return false;
    this.current = next;
    if (from !== next.kind) this.log.debug({ event: 'session-state', from, to: next.kind, ...('why' in next ? { why: next.why } : {}) }, `session ${next.kind}`);
    return true;
  }
}
