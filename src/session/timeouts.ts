/**
 * A session's clocks, each with what it means when it runs out:
 * - login: no 230 within loginSeconds -> abandon with 421 Login timeout.
 * - idle: no complete command within idleSeconds -> abandon with 421 Timeout. (a running
 *   transfer keeps the session: a long download keeps the control connection quiet);
 * - close deadline: a closing session that does not finish (a hung peer) is torn down;
 * - close grace: after the last reply, how long the client has to read it and close.
 * Node only reports time; the session decides what abandoning and tearing down mean.
 */
import type { TimeoutsConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import type { RejectionReason } from '../metrics.js';
import { REPLY_FOR_CODE } from '../errors.js';

/** After the last reply is flushed, how long a closing session waits for the client's FIN. */
export const CLOSE_GRACE_MS = 2000;

export interface SessionTimeoutsHooks {
  /** A transfer is running. */
  busy(): boolean;
  /** The session takes no new work (closing or closed). */
  finished(): boolean;
  /** Give up on the server and close with `replyText`. */
  abandon(reason: string, replyText: string): void;
  /** Release everything now; `reason` if none was given before. */
  teardown(reason: string): void;
  limitHit(reason: RejectionReason, fields: Record<string, unknown>): void;
}

type Clock = 'idle' | 'login' | 'close-deadline' | 'close-grace';

export class SessionTimeouts {
  private readonly timers = new Map<Clock, NodeJS.Timeout>();
  private readonly timeouts: TimeoutsConfig;
  private readonly log: Logger;
  private readonly hooks: SessionTimeoutsHooks;

  constructor(timeouts: TimeoutsConfig, log: Logger, hooks: SessionTimeoutsHooks) {
    this.timeouts = timeouts;
    this.log = log;
    this.hooks = hooks;
  }

  /** The session began: the login and idle clocks run. */
  start(): void {
    this.set('login', this.timeouts.loginMs, this.onLoginTimeout);
    this.activity();
  }

  /** A complete command arrived (issue #10: the bytes of an endless line are not activity). */
  readonly activity = (): void => {
    if (this.hooks.finished()) return;
    // Restarted in place: clearing the clock's only timer and making a new one costs Node a
    // timer list per command (issue #14).
    const idle = this.timers.get('idle');
    if (idle) idle.refresh();
    else this.set('idle', this.timeouts.idleMs, this.onIdle);
  };

  /** The server said 230: the login clock stops. */
  loggedIn(): void {
    this.clear('login');
  }

  /** The session is closing: tear it down after `ms` (default: the longest reply wait + grace) whatever is pending. */
  closing(ms?: number): void {
    if (this.timers.has('close-deadline')) return;
    const { transferReplyHoldMs, upstreamReplyMs } = this.timeouts;
    this.set('close-deadline', ms ?? Math.max(transferReplyHoldMs, upstreamReplyMs) + CLOSE_GRACE_MS, () => {
      this.log.warn({ event: 'close-deadline' }, 'session did not finish closing in time; tearing down');
      this.hooks.teardown('close deadline');
    });
  }

  /** The last reply is out: give the client CLOSE_GRACE_MS to close. False when already started. */
  grace(): boolean {
    if (this.timers.has('close-grace')) return false;
    this.set('close-grace', CLOSE_GRACE_MS, () => this.hooks.teardown('closed')).unref();
    return true;
  }

  stopAll(): void {
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
  }

  private readonly onIdle = (): void => {
    if (this.hooks.finished()) return;
    if (this.hooks.busy()) return this.activity();
    this.hooks.limitHit('idle-timeout', { code: 'FTPP_ERR_IDLE_TIMEOUT', idleMs: this.timeouts.idleMs });
    // Abandon, not a graceful close: if the server still owes a reply it is hung, and the
    // 421 must not wait behind that reply.
    this.hooks.abandon('idle timeout', REPLY_FOR_CODE.FTPP_ERR_IDLE_TIMEOUT);
  };

  private readonly onLoginTimeout = (): void => {
    if (this.hooks.finished()) return;
    this.hooks.limitHit('login-timeout', { code: 'FTPP_ERR_LOGIN_TIMEOUT', loginMs: this.timeouts.loginMs });
    this.hooks.abandon('login timeout', REPLY_FOR_CODE.FTPP_ERR_LOGIN_TIMEOUT);
  };

  private set(clock: Clock, ms: number, fn: () => void): NodeJS.Timeout {
    this.clear(clock);
    const timer = setTimeout(() => {
      this.timers.delete(clock);
      fn();
    }, ms);
    this.timers.set(clock, timer);
    return timer;
  }

  private clear(clock: Clock): void {
    const timer = this.timers.get(clock);
    if (timer) clearTimeout(timer);
    this.timers.delete(clock);
  }
}
