/**
 * nftables changes that are nobody's reply, run off the event loop and together.
 *
 * Every libnftables call costs 0.3-0.5 ms of CPU whatever it carries (issue #14, measured
 * with nft 1.0.6). The removals after a transfer (its mapping, then its counters) answer no
 * command, yet run on the event loop they held the session's next command back: QUIT after a
 * kernel-carried RETR came back 1.4 ms later than direct, against 0.8 ms on the relay. Here
 * they are queued, run in one batch per event-loop turn on a libuv pool thread (the addon's
 * nftRunBatch), and whatever is queued while a batch runs goes in the next one, so at
 * concurrency 50 one call carries several transfers' changes.
 *
 * Order is kept: a synchronous call (adding a mapping, reading counters) first runs what is
 * still queued, and the addon's lock makes it wait for a batch in flight, so the table it sees
 * is the one the calls made in order would leave (a port leased again must not have its new
 * mapping deleted by the old one's late removal).
 *
 * Owns no socket; a batch's outcome only matters to the caller's warning.
 */
import type { NftResult, NftRunner } from './kernel-forward.js';

/**
 * Run these scripts in one transaction off the event loop; when that fails, each on its own
 * (in order). `errors[i]` is '' when script i took effect, else libnftables' words.
 */
export type NftBatchRunner = (scripts: readonly string[], done: (errors: readonly string[]) => void) => void;

/** One transaction, or each script on its own when that fails: the synchronous twin of a batch. */
export function runEachIfNeeded(run: NftRunner, scripts: readonly string[]): NftResult[] {
  if (scripts.length === 0) return [];
  const together = run(scripts.join('\n'));
  if (together.ok) return scripts.map(() => together);
  return scripts.length === 1 ? [together] : scripts.map((script) => run(script));
}

export class NftChangeQueue {
  private readonly run: NftRunner;
  private readonly runBatch: NftBatchRunner | null;
  private queued: string[] = [];
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

  /** Queue scripts that must take effect, in this order, before any later synchronous call. */
  submit(scripts: readonly string[]): void {
    if (this.closed || scripts.length === 0) return;
    if (!this.runBatch) {
      runEachIfNeeded(this.run, scripts);
      return;
    }
    this.queued.push(...scripts);
    this.schedule();
  }

  /** Before a synchronous call: run what is queued now (a batch in flight finishes first, in the addon). */
  drain(): void {
    if (this.queued.length === 0) return;
    const scripts = this.queued;
    this.queued = [];
    runEachIfNeeded(this.run, scripts);
    if (!this.inFlight) this.wake();
  }

  /** Drop what is queued (the table is about to go with everything in it). Idempotent. */
  close(): void {
    this.closed = true;
    this.queued = [];
    this.wake();
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
    const scripts = this.queued;
    this.queued = [];
    this.inFlight = true;
    this.runBatch!(scripts, () => {
      // Failures are expected and harmless here (a DNAT element that expired on its own);
      // the batch already tried each script alone.
      this.inFlight = false;
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
