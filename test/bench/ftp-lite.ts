/**
 * A lean FTP client for load generation: one control connection, replies read in order
 * (multi-line replies assembled, RFC 959 §4.2), PASV data connections, and explicit FTPS
 * (RFC 4217: AUTH TLS, PBSZ 0, PROT P, data TLS resuming the control session). No retries,
 * no leniency: anything unexpected is an error with the reply text, so the load client
 * counts it as a failed session.
 */
import net from 'node:net';
import tls from 'node:tls';
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

/** How to check the server's certificate once AUTH TLS is accepted. */
export interface TlsClientOptions {
  /** Trusted CA certificates, PEM. */
  readonly ca: string;
  /**
   * Name the certificate must carry: an IP address is checked against its IP SANs and, as
   * RFC 6066 §3 wants, never sent as SNI; a DNS name is both checked and sent.
   */
  readonly host: string;
}

/** A data connection: plain TCP, or TLS on top of it after PROT P. */
export type DataSocket = net.Socket | tls.TLSSocket;

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

/** Start TLS on a connected socket as the client; `session` resumes an earlier one. */
function startClientTls(socket: net.Socket, options: TlsClientOptions, session: Buffer | null): tls.TLSSocket {
  return tls.connect({
    socket,
    ca: options.ca,
    host: options.host,
    ...(net.isIP(options.host) ? {} : { servername: options.host }),
    ...(session ? { session } : {}),
  });
}

export class FtpControl {
  /** The control socket: the TCP socket, then the TLS socket on top of it after AUTH TLS. */
  private current: net.Socket | tls.TLSSocket;
  private pending = '';
  private multi: { code: string; lines: string[] } | null = null;
  private readonly ready: Reply[] = [];
  private readonly waiters: Waiter[] = [];
  private failure: Error | null = null;
  /** Set by `secure()`: data connections are TLS too (PROT P). */
  private protection: { readonly options: TlsClientOptions; session: Buffer | null } | null = null;
  private readonly onChunk = (chunk: Buffer): void => this.onData(chunk.toString('latin1'));

  constructor(socket: net.Socket) {
    this.current = socket;
    // No setEncoding: after AUTH TLS the same socket carries TLS records.
    socket.on('data', this.onChunk);
    this.watch(socket);
  }

  get socket(): net.Socket | tls.TLSSocket {
    return this.current;
  }

  static async open(host: string, port: number, timeoutMs: number): Promise<FtpControl> {
    const control = new FtpControl(await connectSocket(host, port, timeoutMs));
    await control.expect(await control.next(), [220]);
    return control;
  }

  /**
   * Explicit FTPS (RFC 4217 §§4-9): AUTH TLS, the handshake on the same socket right after
   * the 234, then PBSZ 0 and PROT P so that every data connection is TLS as well.
   */
  async secure(options: TlsClientOptions, timeoutMs: number): Promise<void> {
    if (this.protection) throw new FtpError('AUTH TLS: already secured');
    await this.command('AUTH TLS', [234]);
    if (this.ready.length > 0 || this.pending.length > 0) throw new FtpError('AUTH TLS: plain text after the 234');
    const plain = this.current;
    plain.removeListener('data', this.onChunk);
    const secure = startClientTls(plain as net.Socket, options, null);
    const protection: { readonly options: TlsClientOptions; session: Buffer | null } = { options, session: null };
    // TLS 1.3 hands out tickets after the handshake, possibly several: keep the newest
    // for the data connections (protocol.md §5.6; vsftpd require_ssl_reuse, §5.5).
    secure.on('session', (session: Buffer) => (protection.session = session));
    secure.on('data', this.onChunk);
    this.current = secure;
    this.watch(secure);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => done(new FtpError(`AUTH TLS: no handshake within ${timeoutMs} ms`)), timeoutMs);
      const onError = (err: Error): void => done(new FtpError(`AUTH TLS: ${err.message}`));
      function done(err: Error | null): void {
        clearTimeout(timer);
        secure.removeListener('secureConnect', onSecure);
        secure.removeListener('error', onError);
        if (err) reject(err);
        else resolve();
      }
      const onSecure = (): void => done(null);
      secure.once('secureConnect', onSecure);
      secure.once('error', onError);
    });
    await this.command('PBSZ 0', [200]);
    await this.command('PROT P', [200]);
    this.protection = protection;
  }

  /** The next complete reply. */
  next(): Promise<Reply> {
    const reply = this.ready.shift();
    if (reply) return Promise.resolve(reply);
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  send(line: string): void {
    this.current.write(`${line}\r\n`);
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

  /**
   * PASV, then connect to the address in the 227 (RFC 959 §4.1.2). After PROT P the TLS
   * handshake starts at once, resuming the control session, and nobody waits for it: vsftpd
   * answers the ClientHello only after it has sent the 1yz to the transfer command, so
   * that command must go out first (protocol.md §5.4).
   */
  async pasv(timeoutMs: number): Promise<DataSocket> {
    const reply = await this.command('PASV', [227]);
    const m = /(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})/.exec(reply.text);
    if (!m) throw new FtpError(`PASV: no address in "${reply.text}"`);
    const n = m.slice(1).map(Number);
    if (n.some((v) => v > 255)) throw new FtpError(`PASV: octet > 255 in "${reply.text}"`);
    const socket = await connectSocket(`${n[0]}.${n[1]}.${n[2]}.${n[3]}`, n[4]! * 256 + n[5]!, timeoutMs);
    if (!this.protection) return socket;
    return startClientTls(socket, this.protection.options, this.protection.session);
  }

  /**
   * RETR over an already connected data socket: data to its end and 1yz + 226 in either
   * order. `hash: false` only counts the bytes (throughput runs).
   */
  async retr(data: DataSocket, path: string, options: { readonly hash?: boolean } = {}): Promise<{ bytes: number; sha256: string }> {
    const hash = options.hash === false ? null : createHash('sha256');
    let bytes = 0;
    const received = new Promise<void>((resolve, reject) => {
      data.on('data', (chunk: Buffer) => {
        bytes += chunk.length;
        hash?.update(chunk);
      });
      data.once('end', () => {
        // Close our side at once: after a TLS download vsftpd holds the 226 until the
        // client's close_notify/FIN arrives.
        data.end();
        resolve();
      });
      data.once('error', (err) => reject(new FtpError(`data: ${err.message}`)));
    });
    this.send(`RETR ${path}`);
    await this.expect(await this.next(), [125, 150], 'RETR');
    const [final] = await Promise.all([this.next(), received]);
    this.expect(final, [226], 'RETR');
    data.destroy();
    return { bytes, sha256: hash?.digest('hex') ?? '' };
  }

  /**
   * STOR over an already connected data socket: 1yz, send, FIN (after a TLS close_notify,
   * which vsftpd's strict_ssl_read_eof wants), wait for the data close and 226. `body` is
   * a buffer, or a stream piped in (ended with the stream).
   */
  async stor(data: DataSocket, path: string, body: Buffer | NodeJS.ReadableStream): Promise<void> {
    const closed = new Promise<void>((resolve, reject) => {
      data.on('data', () => {});
      data.once('close', () => resolve());
      data.once('error', (err) => reject(new FtpError(`data: ${err.message}`)));
    });
    this.send(`STOR ${path}`);
    await this.expect(await this.next(), [125, 150], 'STOR');
    if (Buffer.isBuffer(body)) data.end(body);
    else {
      body.once('error', (err: Error) => data.destroy(new FtpError(`STOR source: ${err.message}`)));
      body.pipe(data);
    }
    const [final] = await Promise.all([this.next(), closed]);
    this.expect(final, [226], 'STOR');
  }

  async quit(): Promise<void> {
    await this.command('QUIT', [221]);
    this.current.end();
  }

  close(): void {
    this.current.destroy();
  }

  private watch(socket: net.Socket | tls.TLSSocket): void {
    socket.on('error', (err) => this.fail(new FtpError(`control: ${err.message}`)));
    socket.on('close', () => this.fail(new FtpError('control connection closed')));
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
