/**
 * A lean FTP client for load generation: one control connection, replies read in order
 * (multi-line replies assembled, RFC 959 §4.2), PASV data connections. No retries, no
 * leniency: anything unexpected is an error with the reply text, so the load client counts
 * it as a failed session.
 */
import net from 'node:net';
import { createHash } from 'node:crypto';

export interface Reply {
  readonly code: number;
  readonly text: string;
}

export class FtpError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FtpError';
  }
}

interface Waiter {
  resolve(reply: Reply): void;
  reject(err: Error): void;
}

/** Connect with a timeout; the socket has no timer left on it afterwards. */
export function connectSocket(host: string, port: number, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port, noDelay: true });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new FtpError(`connect ${host}:${port} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeListener('error', onError);
      resolve(socket);
    });
    const onError = (err: Error): void => {
      clearTimeout(timer);
      reject(new FtpError(`connect ${host}:${port}: ${err.message}`));
    };
    socket.once('error', onError);
  });
}

export class FtpControl {
  readonly socket: net.Socket;
  private pending = '';
  private multi: { code: string; lines: string[] } | null = null;
  private readonly ready: Reply[] = [];
  private readonly waiters: Waiter[] = [];
  private failure: Error | null = null;

  constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setEncoding('latin1');
    socket.on('data', (text: string) => this.onData(text));
    socket.on('error', (err) => this.fail(new FtpError(`control: ${err.message}`)));
    socket.on('close', () => this.fail(new FtpError('control connection closed')));
  }

  static async open(host: string, port: number, timeoutMs: number): Promise<FtpControl> {
    const control = new FtpControl(await connectSocket(host, port, timeoutMs));
    await control.expect(await control.next(), [220]);
    return control;
  }

  /** The next complete reply. */
  next(): Promise<Reply> {
    const reply = this.ready.shift();
    if (reply) return Promise.resolve(reply);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  send(line: string): void {
    this.socket.write(`${line}\r\n`);
  }

  async command(line: string, codes: readonly number[]): Promise<Reply> {
    this.send(line);
    return this.expect(await this.next(), codes, line);
  }

  expect(reply: Reply, codes: readonly number[], sent = ''): Reply {
    if (!codes.includes(reply.code)) throw new FtpError(`${sent.split(' ')[0] || 'greeting'}: unexpected reply "${reply.text.slice(0, 120)}"`);
    return reply;
  }

  async login(user: string, password: string): Promise<void> {
    await this.command(`USER ${user}`, [331]);
    await this.command(`PASS ${password}`, [230]);
  }

  /** PASV, then connect to the address in the 227 (RFC 959 §4.1.2). */
  async pasv(timeoutMs: number): Promise<net.Socket> {
    const reply = await this.command('PASV', [227]);
    const m = /(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})/.exec(reply.text);
    if (!m) throw new FtpError(`PASV: no address in "${reply.text}"`);
    const n = m.slice(1).map(Number);
    if (n.some((v) => v > 255)) throw new FtpError(`PASV: octet > 255 in "${reply.text}"`);
    return connectSocket(`${n[0]}.${n[1]}.${n[2]}.${n[3]}`, n[4]! * 256 + n[5]!, timeoutMs);
  }

  /** RETR over an already connected data socket: data to its end and 1yz + 226 in either order. */
  async retr(data: net.Socket, path: string): Promise<{ bytes: number; sha256: string }> {
    const hash = createHash('sha256');
    let bytes = 0;
    const received = new Promise<void>((resolve, reject) => {
      data.on('data', (chunk: Buffer) => {
        bytes += chunk.length;
        hash.update(chunk);
      });
      data.once('end', () => resolve());
      data.once('error', (err) => reject(new FtpError(`data: ${err.message}`)));
    });
    this.send(`RETR ${path}`);
    await this.expect(await this.next(), [125, 150], 'RETR');
    const [final] = await Promise.all([this.next(), received]);
    this.expect(final, [226], 'RETR');
    data.destroy();
    return { bytes, sha256: hash.digest('hex') };
  }

  /** STOR over an already connected data socket: 1yz, send, FIN, wait for the data close and 226. */
  async stor(data: net.Socket, path: string, body: Buffer): Promise<void> {
    const closed = new Promise<void>((resolve, reject) => {
      data.on('data', () => {});
      data.once('close', () => resolve());
      data.once('error', (err) => reject(new FtpError(`data: ${err.message}`)));
    });
    this.send(`STOR ${path}`);
    await this.expect(await this.next(), [125, 150], 'STOR');
    data.end(body);
    const [final] = await Promise.all([this.next(), closed]);
    this.expect(final, [226], 'STOR');
  }

  async quit(): Promise<void> {
    await this.command('QUIT', [221]);
    this.socket.end();
  }

  close(): void {
    this.socket.destroy();
  }

  private onData(text: string): void {
    this.pending += text;
    let nl: number;
    while ((nl = this.pending.indexOf('\n')) >= 0) {
      const line = this.pending.slice(0, nl).replace(/\r$/, '');
      this.pending = this.pending.slice(nl + 1);
      this.onLine(line);
    }
    if (this.pending.length > 65536) this.fail(new FtpError('reply line too long'));
  }

  private onLine(line: string): void {
    if (this.multi) {
      this.multi.lines.push(line);
      if (line.startsWith(`${this.multi.code} `)) {
        const done = this.multi;
        this.multi = null;
        this.deliver({ code: Number(done.code), text: done.lines.join('\n') });
      }
      return;
    }
    const m = /^(\d{3})([ -])/.exec(line);
    if (!m) return this.fail(new FtpError(`not an FTP reply: "${line.slice(0, 80)}"`));
    if (m[2] === '-') this.multi = { code: m[1]!, lines: [line] };
    else this.deliver({ code: Number(m[1]), text: line });
  }

  private deliver(reply: Reply): void {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(reply);
    else this.ready.push(reply);
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const waiter of this.waiters.splice(0)) waiter.reject(err);
  }
}

/** Reject after `ms` unless `promise` settles first; the timer never outlives the race. */
export function withDeadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | null = null;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new FtpError(`${what}: no result within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => {
    if (timer) clearTimeout(timer);
  });
}
