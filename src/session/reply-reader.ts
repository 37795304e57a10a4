/**
 * Reads the server's replies before the session's own reader takes the control connection:
 * the greeting and the TLS negotiation (session/upstream-tls.ts), forward mode's greeting
 * (session/server-leg.ts). Bounded like the session's reader (line and reply size), one
 * reply at a time with a deadline; every failure is a ProxyError with the caller's code.
 */
import type net from 'node:net';
import { LineFramer } from '../control/line-framer.js';
import { ReplyAssembler, type Reply } from '../control/reply.js';
import { ProxyError, type ErrorCode } from '../errors.js';

export interface ReplyReaderLimits {
  /** How long each reply may take. */
  readonly replyMs: number;
  readonly maxLineBytes: number;
  readonly maxReplyBytes: number;
}

export class ReplyReader {
  private readonly socket: net.Socket;
  private readonly limits: ReplyReaderLimits;
  private readonly code: ErrorCode;
  private readonly framer: LineFramer;
  private readonly assembler: ReplyAssembler;
  private readonly replies: Reply[] = [];
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(socket: net.Socket, limits: ReplyReaderLimits, code: ErrorCode) {
    this.socket = socket;
    this.limits = limits;
    this.code = code;
    this.framer = new LineFramer(limits.maxLineBytes);
    this.assembler = new ReplyAssembler(limits.maxReplyBytes);
    socket.on('data', this.onData);
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
    socket.resume();
  }

  /** Every reply up to the first that is not 1yz (RFC 959 §5.4: `120` then `220`); the raw bytes of all. */
  async greeting(): Promise<Reply> {
    const parts: Buffer[] = [];
    for (;;) {
      const reply = await this.next('the greeting');
      parts.push(reply.raw);
      if (reply.code >= 200) return { ...reply, raw: Buffer.concat(parts) };
    }
  }

  /** Send `command`; anything but `code` is a refusal, told with the server's words. */
  async expect(command: string, code: number): Promise<void> {
    this.socket.write(`${command}\r\n`);
    const reply = await this.next(command);
    if (reply.code !== code) throw new ProxyError(this.code, `server answered ${command} with "${(reply.lines[0] ?? '').slice(0, 200)}"`);
    if (this.replies.length > 0 || this.framer.pending.length > 0) {
      // Nothing may follow: after 234 the next bytes must be the server's TLS handshake.
      throw new ProxyError(this.code, `server sent more than one reply to ${command}`);
    }
  }

  /** Stop reading; the socket is paused for its next owner. */
  release(): net.Socket {
    this.socket.pause();
    this.socket.removeListener('data', this.onData);
    this.socket.removeListener('close', this.onClose);
    this.socket.removeListener('error', this.onError);
    return this.socket;
  }

  private async next(what: string): Promise<Reply> {
    const deadline = setTimeout(() => this.fail(new ProxyError(this.code, `server did not answer ${what} within ${this.limits.replyMs} ms`)), this.limits.replyMs);
    try {
      while (this.replies.length === 0) {
        if (this.failure) throw this.failure;
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
      return this.replies.shift()!;
    } finally {
      clearTimeout(deadline);
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.wake?.();
  }

  private readonly onData = (chunk: Buffer): void => {
    const framed = this.framer.push(chunk);
    if (framed.overflow) return this.fail(new ProxyError(this.code, 'server reply line too long'));
    for (const line of framed.lines) {
      const pushed = this.assembler.push(line);
      if (pushed.kind === 'error') return this.fail(new ProxyError(this.code, 'server sent something that is not an FTP reply'));
      if (pushed.kind === 'reply') this.replies.push(pushed.reply);
    }
    this.wake?.();
  };

  private readonly onClose = (): void => this.fail(new ProxyError(this.code, 'server closed the connection before its reply'));

  private readonly onError = (err: Error): void => this.fail(new ProxyError(this.code, err.message, { cause: err }));
}
