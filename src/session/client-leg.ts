/**
 * The session's side toward the client: its control connection and the command pipeline fed
 * from it, the two bounds on what a client may send (line length, queued commands), flow
 * control (stop reading while the queue or the server's backlog is long), and the ways the
 * client can go (FIN, reset, close). The session decides what each command means.
 */
import type net from 'node:net';
import type { FramedLine } from '../control/line-framer.js';
import { REPLY_FOR_CODE, isProxyError } from '../errors.js';
import type { ListenerConfig } from '../config/schema.js';
import type { Logger } from '../log.js';
import type { RejectionReason } from '../metrics.js';
import { CommandPipeline } from './command-pipeline.js';
import { ControlConnection } from './control-connection.js';

export interface ClientLegHooks {
  /** Carry out one command line; the next waits until this settles. */
  execute(line: FramedLine): Promise<void>;
  /** A complete command arrived. */
  activity(): void;
  /** The client must be closed with `replyText` (a limit, or a bug). */
  close(reason: string, replyText: string): void;
  /** The client half-closed its side (FIN). */
  fin(): void;
  /** The client's connection is gone. */
  gone(reason: string): void;
  /** Everything written to the client was handed to the kernel (flow control). */
  drained(): void;
  /** Replies still owed by the server (flow control). */
  outstanding(): number;
  limitHit(reason: RejectionReason, fields: Record<string, unknown>): void;
}

export class ClientLeg {
  readonly connection: ControlConnection;
  readonly pipeline: CommandPipeline;
  private readonly config: ListenerConfig;
  private readonly log: Logger;
  private readonly hooks: ClientLegHooks;

  constructor(socket: net.Socket, config: ListenerConfig, log: Logger, hooks: ClientLegHooks) {
    this.config = config;
    this.log = log;
    this.hooks = hooks;
    this.connection = new ControlConnection(socket, config.limits.maxLineBytes, {
      lines: (lines, framer) => this.pipeline.accept(lines, framer),
      overflow: this.onLineTooLong,
      end: hooks.fin,
      close: (error) => hooks.gone(error ? `client error: ${error.message}` : 'client closed'),
      drain: hooks.drained,
    });
    this.pipeline = new CommandPipeline(
      { maxQueued: config.limits.maxQueuedCommands, abortIdleMs: config.timeouts.abortIdleMs },
      { execute: hooks.execute, activity: hooks.activity, overflow: this.onQueueOverflow, changed: this.updateFlow, failed: this.onFailed },
    );
  }

  /** Stop reading while the command queue, or the replies the server still owes, are long. */
  readonly updateFlow = (): void => {
    const max = this.config.limits.maxQueuedCommands;
    this.connection.holdWhile('backlog', this.pipeline.length >= Math.max(1, max >> 1) || this.hooks.outstanding() >= max);
  };

  /** Take no more commands and stop reading (replies still go out). */
  stop(): void {
    this.pipeline.stop();
    this.connection.pause('closing');
  }

  private readonly onLineTooLong = (): void => {
    // RFC 959 §4.2.1 "500 Syntax error, command unrecognized ... command line too long";
    // vsftpd also closes the session here (protocol.md §1.1, §8.18).
    this.hooks.limitHit('line-too-long', { code: 'FTPP_ERR_LINE_TOO_LONG', maxBytes: this.config.limits.maxLineBytes });
    this.hooks.close('line too long', REPLY_FOR_CODE.FTPP_ERR_LINE_TOO_LONG);
  };

  private readonly onQueueOverflow = (): void => {
    this.log.warn({ event: 'queue-overflow', code: 'FTPP_ERR_QUEUE_OVERFLOW' }, 'too many queued commands');
    this.hooks.close('command queue overflow', REPLY_FOR_CODE.FTPP_ERR_QUEUE_OVERFLOW);
  };

  private readonly onFailed = (err: unknown): void => {
    if (isProxyError(err, 'FTPP_ERR_SHUTDOWN')) return;
    this.log.error({ event: 'session-error', code: 'FTPP_ERR_INTERNAL', err }, 'unexpected error while processing a command');
    this.hooks.close('internal error', REPLY_FOR_CODE.FTPP_ERR_INTERNAL);
  };
}
