/**
 * nftables changes run off the event loop and together.
 *
 * Every libnftables call costs 0.3-0.5 ms of CPU whatever it carries (issue #14, measured
 * with nft 1.0.6), and on the event loop it holds every session back. The removals after a
 * transfer (its mapping, then its counters) answer no command, yet they delayed the session's
 * next one: QUIT after a kernel-carried RETR came back 1.4 ms later than direct, against 0.8
 * ms on the relay. A new mapping is awaited by its 227/229 only. So changes are queued, run
 * in one batch per event-loop turn on a libuv pool thread (the addon's nftRunBatch), and
 * whatever is queued while a batch runs goes in the next one: at concurrency 50 one call
 * carries several transfers' changes.
 *
 * Order is kept: a synchronous call (adding a mapping, reading counters) first runs what is
 * still queued, and the addon's lock makes it wait for a batch in flight, so the table it sees
 * is the one the calls made in order would leave (a port leased again must not have its new
 * mapping deleted by the old one's late removal).
 *
 * Owns no socket. Each change hears how its scripts went (an add waits for that).
 */
import { runEachIfNeeded, type NftBatchRunner, type NftRunner } from './nft-runner.js';

/** Told each script's outcome ('' took effect, else why not), in the order submitted. */
export type ChangeDone = (errors: readonly string[]) => void;

interface Change {
  readonly scripts: readonly string[];
  readonly done: ChangeDone | null;
}

export class NftChangeQueue {
  private readonly run: NftRunner;
  private readonly runBatch: NftBatchRunner | null;
  private queued: Change[] = [];
  private scheduled = false;
  private inFlight = false;
  private closed = false;
  private waiters: Array<() => void> = [];

  /** Without a batch runner (tests, an addon without nftRunBatch) a change runs at once. */
  constructor(run: NftRunner, runBatch: NftBatchRunner | null) {
    this.run = run;
    this.runBatch = runBatch;
  }

  /** Nothing queued and no batch in flight. */
  get idle(): boolean {
    return !this.inFlight && this.queued.length === 0;
  }

  /** Resolves once every change submitted so far has been run (at once when idle, or closed). */
  whenIdle(): Promise<void> {
    if (this.idle || this.closed) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /**
   * Queue scripts that must take effect, in this order, before any later synchronous call;
   * `done` hears how each went (after close: every script 'closed').
   */
  submit(scripts: readonly string[], done: ChangeDone | null = null): void {
    if (this.closed || scripts.length === 0) {
      done?.(scripts.map(() => 'closed'));
      return;
    }
    const change: Change = { scripts, done };
    if (!this.runBatch) {
      this.runNow([change]);
      return;
    }
    this.queued.push(change);
    this.schedule();
  }

  /** Before a synchronous call: run what is queued now (a batch in flight finishes first, in the addon). */
  drain(): void {
    if (this.queued.length === 0) return;
    const changes = this.queued;
    this.queued = [];
    this.runNow(changes);
    if (!this.inFlight) this.wake();
  }

  /** Drop what is queued (the table is about to go with everything in it); their callers hear 'closed'. Idempotent. */
  close(): void {
    this.closed = true;
    const dropped = this.queued;
    this.queued = [];
    for (const change of dropped) change.done?.(change.scripts.map(() => 'closed'));
    this.wake();
  }

  private runNow(changes: readonly Change[]): void {
    const results = runEachIfNeeded(this.run, changes.flatMap((change) => change.scripts));
    tell(changes, results.map((result) => (result.ok ? '' : result.error || 'libnftables failed')));
  }

  /** One batch per event-loop turn: whatever the turn queued goes together. */
  private schedule(): void {
    if (this.scheduled || this.inFlight) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.send();
    });
  }

  private send(): void {
    if (this.closed || this.inFlight || this.queued.length === 0) return;
    const changes = this.queued;
    this.queued = [];
    this.inFlight = true;
    this.runBatch!(changes.flatMap((change) => change.scripts), (errors) => {
      this.inFlight = false;
      tell(changes, errors);
      if (this.queued.length > 0) this.schedule();
      else this.wake();
    });
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const resolve of waiters) resolve();
  }
}

/** Hand each change its scripts' outcomes out of the batch's flat list. */
function tell(changes: readonly Change[], errors: readonly string[]): void {
  let at = 0;
  for (const change of changes) {
    const mine = errors.slice(at, at + change.scripts.length);
    at += change.scripts.length;
    change.done?.(mine);
  }
}
