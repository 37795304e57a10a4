/**
 * What the session is waiting for from the server, in the order the commands went out (FTP
 * answers in order, RFC 959 §4.2): a reply owed to the client (into its reply slot, maybe
 * edited, maybe a transfer's), or a reply to one of the proxy's own commands (EPSV, PASV,
 * PORT toward the server; not shown to the client, bounded by upstreamReplyMs).
 *
 * The exchange never touches a socket: it writes through `send` and reports through hooks.
 */
import { isPreliminary, type Reply } from '../control/reply.js';
import { ProxyError } from '../errors.js';
import type { ReplyQueue, ReplySlot } from '../reply-queue.js';

export interface ForwardOptions<T> {
  /** Rewrite the final reply before it reaches the client (FEAT). */
  readonly transform?: (reply: Reply) => Buffer;
  /** The command starts a transfer: its final reply goes to `transferReply` instead. */
  readonly transfer?: T;
}

export interface UpstreamExchangeHooks<T> {
  /** Write one command line toward the server (CRLF added by the writer). */
  send(line: Buffer): void;
  /** The final reply to a transfer command; the hook owns `slot` from here on. */
  transferReply(slot: ReplySlot, transfer: T, reply: Reply): void;
  /** The final reply to a client command that is not a transfer (after it went into its slot). */
  clientReply(reply: Reply): void;
  /** A proxy command got no reply within the timeout. */
  timeout(command: string, waitedMs: number): void;
}

type Expectation<T> =
  | { readonly kind: 'client'; readonly slot: ReplySlot; readonly transform: ((reply: Reply) => Buffer) | null; readonly transfer: T | null }
  | { readonly kind: 'internal'; readonly command: string; readonly resolve: (reply: Reply) => void; readonly reject: (err: Error) => void; timer: NodeJS.Timeout | null };

export class UpstreamExchange<T> {
  private readonly expectations: Array<Expectation<T>> = [];
  private readonly replies: ReplyQueue;
  private readonly replyTimeoutMs: number;
  private readonly hooks: UpstreamExchangeHooks<T>;
  private readonly transferWaiters: Array<() => void> = [];
  private closed = false;

  constructor(replies: ReplyQueue, replyTimeoutMs: number, hooks: UpstreamExchangeHooks<T>) {
    this.replies = replies;
    this.replyTimeoutMs = replyTimeoutMs;
    this.hooks = hooks;
  }

  /** Replies still owed by the server (flow control). */
  get outstanding(): number {
    return this.expectations.length;
  }

  /** The next reply is owed to the client's `slot` (the greeting, before any command). */
  expect(slot: ReplySlot): void {
    this.expectations.push({ kind: 'client', slot, transform: null, transfer: null });
  }

  /**
   * Answer the first reply owed to the client with the proxy's own `raw` (the server cannot
   * be reached: a 421 answers "connecting"), then settle everything else as failAll does.
   */
  answerInstead(raw: Buffer): T[] {
    const first = this.expectations[0];
    if (first?.kind === 'client') this.replies.push(first.slot, raw);
    return this.failAll();
  }

  /** Send a client command; its replies go to `slot`. */
  forward(line: Buffer, slot: ReplySlot, options: ForwardOptions<T> = {}): void {
    this.expectations.push({ kind: 'client', slot, transform: options.transform ?? null, transfer: options.transfer ?? null });
    this.hooks.send(line);
  }

  /** Send a command of the proxy's own and wait for its final reply. */
  request(command: string): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      if (this.closed) {
        reject(new ProxyError('FTPP_ERR_SHUTDOWN', 'server connection gone'));
        return;
      }
      const expectation: Expectation<T> = { kind: 'internal', command, resolve, reject, timer: null };
      expectation.timer = setTimeout(() => {
        expectation.timer = null;
        this.hooks.timeout(command, this.replyTimeoutMs);
      }, this.replyTimeoutMs);
      this.expectations.push(expectation);
      this.hooks.send(Buffer.from(command, 'latin1'));
    });
  }

  /** A complete reply from the server: to whom it belongs. */
  dispatch(reply: Reply): void {
    const expectation = this.expectations[0];
    if (!expectation) {
      // Unsolicited (e.g. vsftpd's "421 Timeout."): pass it on.
      this.replies.append(reply.raw);
    } else if (expectation.kind === 'internal') {
      // A 1yz to the proxy's own command is not its answer; none of PASV/EPSV/PORT sends one.
      if (isPreliminary(reply.code)) return;
      this.expectations.shift();
      if (expectation.timer) clearTimeout(expectation.timer);
      expectation.resolve(reply);
    } else if (isPreliminary(reply.code)) {
      this.replies.push(expectation.slot, reply.raw);
    } else {
      this.expectations.shift();
      if (expectation.transfer !== null) {
        this.hooks.transferReply(expectation.slot, expectation.transfer, reply);
      } else {
        this.replies.push(expectation.slot, expectation.transform ? expectation.transform(reply) : reply.raw);
        this.replies.end(expectation.slot);
        this.hooks.clientReply(reply);
      }
    }
    this.wakeTransferWaiters();
  }

  /** A transfer command sent to the server still waits for its final reply. */
  get awaitsTransferReply(): boolean {
    return this.expectations.some((expectation) => expectation.kind === 'client' && expectation.transfer !== null);
  }

  /**
   * Settles once no transfer command waits for its final reply, or the server is gone. vsftpd
   * reads no command while it transfers: the proxy's own commands must wait for this.
   */
  transferRepliesSettled(): Promise<void> {
    if (!this.awaitsTransferReply || this.closed) return Promise.resolve();
    return new Promise<void>((resolve) => this.transferWaiters.push(resolve));
  }

  /**
   * Nothing more will come from the server: end every client slot still owed (as is), reject
   * every proxy command, and return the transfers that will never get their final reply.
   */
  failAll(): T[] {
    this.closed = true;
    const orphans: T[] = [];
    for (const expectation of this.expectations.splice(0)) {
      if (expectation.kind === 'internal') {
        if (expectation.timer) clearTimeout(expectation.timer);
        expectation.reject(new ProxyError('FTPP_ERR_SHUTDOWN', 'server connection gone'));
      } else {
        if (expectation.transfer !== null) orphans.push(expectation.transfer);
        this.replies.end(expectation.slot);
      }
    }
    this.wakeTransferWaiters();
    return orphans;
  }

  private wakeTransferWaiters(): void {
    if (this.transferWaiters.length === 0 || (this.awaitsTransferReply && !this.closed)) return;
    for (const wake of this.transferWaiters.splice(0)) wake();
  }
}
