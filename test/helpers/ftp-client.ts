/**
 * A tiny raw-socket FTP control client for tests. It sends exactly the bytes a test asks
 * for (split, pipelined, over-long, malformed) and reads complete replies, multi-line ones
 * included (RFC 959 §4.2: a `ddd-` reply ends at the first later line that starts with the
 * same code followed by SP or end-of-line). Every wait is bounded by a timeout.
 */
import net from 'node:net';
import { DEFAULT_WAIT_MS, withTimeout } from './async.js';

export interface FtpReply {
  readonly code: number;
  /** Lines without CRLF. */
  readonly lines: readonly string[];
  /** The exact bytes of the reply, CRLFs included. */
  readonly raw: Buffer;
  /** First line, for messages. */
  readonly text: string;
}

export interface ConnectOptions {
  readonly localAddress?: string;
  readonly timeoutMs?: number;
}

export class FtpClient {
  readonly socket: net.Socket;
  /** Every byte received so far on the control connection. */
  private receivedChunks: Buffer[] = [];
  private buffer = Buffer.alloc(0);
  private readonly replies: FtpReply[] = [];
  private waiters: Array<() => void> = [];
  private partial: { code: number; lines: string[] } | null = null;
  private endedValue = false;
  private closedValue = false;
  /** Error seen on the control socket, if any. */
  error: Error | null = null;
  /** Resolves when the control socket has closed. */
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => {
      this.endedValue = true;
      this.wake();
    });
    socket.on('error', (err) => {
      this.error = err;
    });
    socket.on('close', () => {
      this.closedValue = true;
      this.wake();
    });
  }

  static connect(host: string, port: number, options: ConnectOptions = {}): Promise<FtpClient> {
    const socket = net.connect({ host, port, ...(options.localAddress ? { localAddress: options.localAddress } : {}) });
    const connected = new Promise<FtpClient>((resolve, reject) => {
      socket.once('connect', () => {
        socket.removeListener('error', reject);
        resolve(new FtpClient(socket));
      });
      socket.once('error', reject);
    });
    return withTimeout(connected, options.timeoutMs ?? DEFAULT_WAIT_MS, `connect ${host}:${port}`).catch((err: unknown) => {
      socket.destroy();
      throw err;
    });
  }

  /**
   * Drive a socket that is already connected, e.g. the TLSSocket that replaced a control
   * connection after `AUTH TLS` / `234` (RFC 4217 §4): nothing has been read from it yet.
   */
  static over(socket: net.Socket): FtpClient {
    return new FtpClient(socket);
  }

  /** The server sent FIN (or the socket closed). */
  get ended(): boolean {
    return this.endedValue || this.closedValue;
  }

  get isClosed(): boolean {
    return this.closedValue;
  }

  /** All control bytes received so far. */
  get received(): Buffer {
    return Buffer.concat(this.receivedChunks);
  }

  /** Complete replies received but not yet taken by readReply(). */
  get queued(): number {
    return this.replies.length;
  }

  /** Send one command line; CRLF is added. */
  send(line: string): void {
    this.socket.write(Buffer.from(`${line}\r\n`, 'latin1'));
  }

  /** Send bytes exactly as given. */
  sendRaw(bytes: Buffer | string): void {
    this.socket.write(typeof bytes === 'string' ? Buffer.from(bytes, 'latin1') : bytes);
  }

  /** Next complete reply; rejects on timeout or when the connection ends first. */
  async readReply(timeoutMs = DEFAULT_WAIT_MS): Promise<FtpReply> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const reply = this.replies.shift();
      if (reply) return reply;
      if (this.ended) throw new Error(`control connection ended while waiting for a reply (received ${JSON.stringify(this.received.toString('latin1'))})`);
      const left = end - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms (received ${JSON.stringify(this.received.toString('latin1'))})`);
      await this.waitForEvent(left);
    }
  }

  /** Send a command and read its (final) reply, passing any 1yz replies first. */
  async command(line: string, timeoutMs = DEFAULT_WAIT_MS): Promise<FtpReply> {
    this.send(line);
    for (;;) {
      const reply = await this.readReply(timeoutMs);
      if (reply.code >= 200) return reply;
    }
  }

  /** Read the greeting, USER, PASS; asserts nothing, returns the last reply. */
  async login(user = 'test', password = 'secret'): Promise<FtpReply> {
    const greeting = await this.readReply();
    if (greeting.code !== 220) return greeting;
    const userReply = await this.command(`USER ${user}`);
    if (userReply.code !== 331) return userReply;
    return this.command(`PASS ${password}`);
  }

  /** Resolves true once the server closed the connection, false on timeout. */
  async waitClosed(timeoutMs = DEFAULT_WAIT_MS): Promise<boolean> {
    return withTimeout(this.closed.then(() => true), timeoutMs, 'control close').catch(() => false);
  }

  /** Resolves true once the peer sent FIN or the socket closed, false on timeout. */
  async waitEnded(timeoutMs = DEFAULT_WAIT_MS): Promise<boolean> {
    const end = Date.now() + timeoutMs;
    while (!this.ended) {
      const left = end - Date.now();
      if (left <= 0) return false;
      await this.waitForEvent(left);
    }
    return true;
  }

  /** QUIT politely (ignoring errors) and close. */
  async quit(): Promise<void> {
    if (!this.ended && !this.socket.destroyed) {
      try {
        await this.command('QUIT', 2000);
      } catch {
        // the proxy may already be gone
      }
    }
    this.destroy();
  }

  destroy(): void {
    this.socket.destroy();
  }

  private waitForEvent(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      timer.unref();
      const waiter = (): void => done();
      this.waiters.push(waiter);
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
    });
  }

  private wake(): void {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  private onData(chunk: Buffer): void {
    this.receivedChunks.push(chunk);
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (;;) {
      const lf = this.buffer.indexOf(0x0a);
      if (lf < 0) break;
      const lineBytes = this.buffer.subarray(0, lf + 1);
      this.buffer = this.buffer.subarray(lf + 1);
      this.onLine(lineBytes);
    }
    this.wake();
  }

  private pendingRaw: Buffer[] = [];
  private onLine(lineBytes: Buffer): void {
    const text = lineBytes.toString('latin1').replace(/\r?\n$/, '');
    this.pendingRaw.push(lineBytes);
    if (this.partial) {
      this.partial.lines.push(text);
      const code = String(this.partial.code);
      if (text.startsWith(code) && (text.length === 3 || text[3] === ' ')) {
        this.finishReply(this.partial.code, this.partial.lines);
        this.partial = null;
      }
      return;
    }
    const match = /^(\d{3})([ -]|$)/.exec(text);
    if (!match) {
      // Not a reply start: keep it as a one-line pseudo reply so a test can see it.
      this.finishReply(0, [text]);
      return;
    }
    const code = Number(match[1]);
    if (match[2] === '-') {
      this.partial = { code, lines: [text] };
      return;
    }
    this.finishReply(code, [text]);
  }

  private finishReply(code: number, lines: string[]): void {
    const raw = Buffer.concat(this.pendingRaw);
    this.pendingRaw = [];
    this.replies.push({ code, lines, raw, text: lines[0] ?? '' });
  }
}

/** Port from `227 ... (h1,h2,h3,h4,p1,p2)`. */
export function parse227(reply: FtpReply): { host: string; port: number } {
  const match = /\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)/.exec(reply.text);
  if (!match) throw new Error(`not a canonical 227: ${reply.text}`);
  const n = match.slice(1, 7).map(Number);
  return { host: n.slice(0, 4).join('.'), port: n[4]! * 256 + n[5]! };
}

/** Port from `229 ... (|||port|)`. */
export function parse229(reply: FtpReply): number {
  const match = /\(\|\|\|(\d+)\|\)/.exec(reply.text);
  if (!match) throw new Error(`not a canonical 229: ${reply.text}`);
  return Number(match[1]);
}

export interface DataConnectOptions {
  readonly localAddress?: string;
  readonly timeoutMs?: number;
  readonly allowHalfOpen?: boolean;
}

/** Open a data connection; rejects on error or timeout. */
export function openData(host: string, port: number, options: DataConnectOptions = {}): Promise<net.Socket> {
  const socket = net.connect({
    host,
    port,
    allowHalfOpen: options.allowHalfOpen ?? true,
    ...(options.localAddress ? { localAddress: options.localAddress } : {}),
  });
  const connected = new Promise<net.Socket>((resolve, reject) => {
    socket.once('connect', () => {
      socket.removeListener('error', reject);
      resolve(socket);
    });
    socket.once('error', reject);
  });
  return withTimeout(connected, options.timeoutMs ?? DEFAULT_WAIT_MS, `data connect ${host}:${port}`).catch((err: unknown) => {
    socket.destroy();
    throw err;
  });
}
