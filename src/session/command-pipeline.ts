/**
 * The client's commands, in order, one at a time (RFC 959 §4.2: replies follow commands; the
 * reply queue keeps their order, this keeps the proxy's own work on them in order).
 *
 * - Lines are queued as they are framed and executed once `start()` says the server is
 *   there; a command's execution may wait (data setup), the next one waits behind it.
 * - Bounded: one line more than maxQueued is an overflow (421 and close, by the session).
 * - CPython's urgent ABOR arrives as `ABOR\r` with its LF lost, sometimes with the next
 *   command glued behind it (protocol.md §1.4): glued lines are split, and an unterminated
 *   `ABOR\r` becomes a line of its own after abortIdleMs without further bytes.
 */
import { isUnterminatedAbort, splitGluedAbort } from '../control/command.js';
import type { FramedLine, LineFramer } from '../control/line-framer.js';

export interface CommandPipelineOptions {
  readonly maxQueued: number;
  readonly abortIdleMs: number;
}

export interface CommandPipelineHooks {
  /** Carry out one command line; the next waits until this settles. */
  execute(line: FramedLine): Promise<void>;
  /** A complete command arrived (activity for the idle timer). */
  activity(): void;
  /** The queue overflowed; it has been emptied and takes nothing more. */
  overflow(): void;
  /** The queue length changed (flow control). */
  changed(): void;
  /** execute() threw: a bug. The pipeline stops. */
  failed(err: unknown): void;
}

export class CommandPipeline {
  private readonly options: CommandPipelineOptions;
  private readonly hooks: CommandPipelineHooks;
  private readonly queue: FramedLine[] = [];
  private started = false;
  private stopped = false;
  private running = false;
  private abortTimer: NodeJS.Timeout | null = null;

  constructor(options: CommandPipelineOptions, hooks: CommandPipelineHooks) {
    this.options = options;
    this.hooks = hooks;
  }

  /** Lines waiting to be executed. */
  get length(): number {
    return this.queue.length;
  }

  get isRunning(): boolean {
    return this.running;
  }

  /**
   * One read's complete lines (maybe none), then the framer's unterminated tail: an `ABOR\r`
   * still waiting for its lost LF is taken as a line after abortIdleMs, unless more bytes
   * come first.
   */
  accept(lines: readonly FramedLine[], framer: Pick<LineFramer, 'pending' | 'flushPending'>): void {
    this.clearAbortTimer();
    for (const line of lines) {
      for (const text of splitGluedAbort(line.text)) this.push({ text, raw: text });
    }
    if (this.stopped || !isUnterminatedAbort(framer.pending)) return;
    this.abortTimer = setTimeout(() => {
      this.abortTimer = null;
      const line = framer.flushPending();
      if (line) this.push(line);
    }, this.options.abortIdleMs);
  }

  push(line: FramedLine): void {
    if (this.stopped) return;
    this.hooks.activity();
    if (this.queue.length >= this.options.maxQueued) {
      this.stop();
      this.hooks.overflow();
      return;
    }
    this.queue.push(line);
    this.hooks.changed();
    void this.run();
  }

  /** The server is there: execute what is queued and what comes. */
  start(): void {
    this.started = true;
    void this.run();
  }

  /** Drop what is queued and take nothing more (closing, overflow). Idempotent. */
  stop(): void {
    this.stopped = true;
    this.clearAbortTimer();
    if (this.queue.length > 0) {
      this.queue.length = 0;
      this.hooks.changed();
    }
  }

  /** Drop what is queued but keep taking commands (lines pipelined behind a transport change). */
  dropQueued(): number {
    const dropped = this.queue.length;
    this.queue.length = 0;
    if (dropped > 0) this.hooks.changed();
    return dropped;
  }

  private async run(): Promise<void> {
    if (this.running || !this.started) return;
    this.running = true;
    try {
      while (this.queue.length > 0 && !this.stopped) {
        const line = this.queue.shift()!;
        this.hooks.changed();
        await this.hooks.execute(line);
      }
    } catch (err) {
      this.stop();
      this.hooks.failed(err);
    } finally {
      this.running = false;
    }
  }

  private clearAbortTimer(): void {
    if (this.abortTimer) clearTimeout(this.abortTimer);
    this.abortTimer = null;
  }
}
