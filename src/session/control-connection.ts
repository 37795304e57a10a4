/**
 * One control connection, client side or server side: the socket, its line framer, flow
 * control and its three endings. The session sees lines and events, never the socket.
 *
 * - Listeners are named class members, attached once per socket and removed on upgrade.
 * - Flow control: reading pauses while any named reason holds (a full command queue, a reply
 *   backlog, closing) and resumes when none does; `discardInput()` reads and drops what
 *   still arrives, so the peer's FIN is seen at once while a session closes.
 * - Endings (libp2p socket-to-conn): `end()` is a graceful FIN after what was written,
 *   `abort()` drops the connection now, `reset()` sends a TCP reset.
 * - `upgrade()` swaps the socket for a TLS socket wrapped around it, in place (basic-ftp's
 *   FtpContext socket setter): listeners move to the new socket, and bytes already read but
 *   not framed into a line (a ClientHello behind a PROXY header, RFC 4217 §4) are put back
 *   into the stream the TLS layer reads, so nothing that was read is lost.
 */
import type net from 'node:net';
import type tls from 'node:tls';
import { LineFramer, type FramedLine } from '../control/line-framer.js';
import { resetSocket } from '../data/relay.js';

const CRLF = Buffer.from('\r\n');

export interface ControlConnectionHandlers {
  /**
   * The complete lines of one read, in order (possibly none: every read is reported, since
   * new bytes matter to a tail waiting for its LF). `framer` gives the unterminated tail.
   */
  lines(lines: readonly FramedLine[], framer: LineFramer): void;
  /** A line exceeded maxLineBytes; nothing more will be framed. */
  overflow(): void;
  /** The peer half-closed (FIN). */
  end(): void;
  /** The socket is gone, for whatever reason (error included). Fires once. */
  close(error: Error | null): void;
  /** Everything written has been handed to the kernel. */
  drain?(): void;
}

export type PauseReason = 'backlog' | 'closing';

export class ControlConnection {
  private socketValue: net.Socket;
  private readonly framer: LineFramer;
  private readonly handlers: ControlConnectionHandlers;
  private readonly pausedFor = new Set<PauseReason>();
  private discarding = false;
  private closed = false;
  private lastError: Error | null = null;

  constructor(socket: net.Socket, maxLineBytes: number, handlers: ControlConnectionHandlers) {
    this.socketValue = socket;
    this.framer = new LineFramer(maxLineBytes);
    this.handlers = handlers;
    socket.setNoDelay(true);
    this.attach(socket);
  }

  get socket(): net.Socket {
    return this.socketValue;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Bytes written but not yet handed to the kernel. */
  get writableLength(): number {
    return this.socketValue.writableLength;
  }

  /** Frame bytes that arrived before the session took the socket (behind a PROXY header). */
  feed(bytes: Buffer): void {
    if (bytes.length > 0) this.onData(bytes);
  }

  /** Write raw bytes (replies are relayed byte for byte). False when nothing can be written any more. */
  write(bytes: Buffer): boolean {
    const socket = this.socketValue;
    if (this.closed || socket.destroyed || socket.writableEnded) return false;
    socket.write(bytes);
    return true;
  }

  /** Write one command line; CRLF is added. */
  writeLine(line: Buffer): boolean {
    return this.write(Buffer.concat([line, CRLF]));
  }

  pause(reason: PauseReason): void {
    this.pausedFor.add(reason);
    this.socketValue.pause();
  }

  resume(reason: PauseReason): void {
    this.pausedFor.delete(reason);
    if (this.pausedFor.size === 0 || this.discarding) this.socketValue.resume();
  }

  isPausedFor(reason: PauseReason): boolean {
    return this.pausedFor.has(reason);
  }

  /** Pause for `reason` while `busy`, resume for it when not (flow control, called on every change). */
  holdWhile(reason: PauseReason, busy: boolean): void {
    if (busy && !this.pausedFor.has(reason)) this.pause(reason);
    else if (!busy && this.pausedFor.has(reason)) this.resume(reason);
  }

  /** Start reading (sockets arrive paused: pauseOnConnect). */
  start(): void {
    if (this.pausedFor.size === 0) this.socketValue.resume();
  }

  /** From now on read and drop everything: only the peer's FIN still matters. */
  discardInput(): void {
    this.discarding = true;
    this.socketValue.resume();
  }

  /** Graceful close: FIN after everything written. */
  end(): void {
    const socket = this.socketValue;
    if (!socket.destroyed && !socket.writableEnded) socket.end();
  }

  /** Drop the connection now (no more reads or writes; the kernel sends FIN or RST as it sees fit). */
  abort(): void {
    this.socketValue.on('error', ignoreError);
    this.socketValue.destroy();
  }

  /** Abortive close: the peer sees a TCP reset. */
  reset(): void {
    resetSocket(this.socketValue);
  }

  /**
   * Replace the socket by a TLS socket made from it, in place. The plain socket's listeners
   * are detached first; bytes already read but not framed into a line (and `alreadyRead`,
   * e.g. what followed a PROXY header before implicit TLS) go back into the plain socket so
   * the TLS layer reads them first: nothing read is lost. Complete lines read before the
   * upgrade are the caller's to drop (RFC 4217 §4: nothing pipelined after AUTH may run
   * once the connection is protected; a client must wait for the 234 before its ClientHello).
   */
  upgrade(wrap: (plain: net.Socket) => tls.TLSSocket, alreadyRead: Buffer | null = null): tls.TLSSocket {
    const plain = this.socketValue;
    this.detach(plain);
    const pending = this.framer.flushPending();
    const unread = Buffer.concat([alreadyRead ?? Buffer.alloc(0), pending?.raw ?? Buffer.alloc(0)]);
    if (unread.length > 0) plain.unshift(unread);
    const secure = wrap(plain);
    this.socketValue = secure;
    this.attach(secure);
    if (this.pausedFor.size > 0 && !this.discarding) secure.pause();
    return secure;
  }

  private attach(socket: net.Socket): void {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    socket.on('drain', this.onDrain);
  }

  private detach(socket: net.Socket): void {
    socket.removeListener('data', this.onData);
    socket.removeListener('end', this.onEnd);
    socket.removeListener('error', this.onError);
    socket.removeListener('close', this.onClose);
    socket.removeListener('drain', this.onDrain);
    // A reset between now and the new socket's listeners must not become an uncaught error.
    socket.on('error', ignoreError);
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.closed || this.discarding) return;
    const framed = this.framer.push(chunk);
    this.handlers.lines(framed.lines, this.framer);
    if (framed.overflow) this.handlers.overflow();
  };

  private readonly onEnd = (): void => {
    if (!this.closed) this.handlers.end();
  };

  private readonly onError = (err: Error): void => {
    this.lastError ??= err;
  };

  private readonly onClose = (): void => {
    if (this.closed) return;
    this.closed = true;
    this.socketValue.on('error', ignoreError);
    this.handlers.close(this.lastError);
  };

  private readonly onDrain = (): void => {
    this.handlers.drain?.();
  };
}

function ignoreError(): void {}
