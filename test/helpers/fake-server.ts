/**
 * A scripted fake upstream FTP server for session tests (shape of basic-ftp's
 * test/MockFtpServer.js): a net server on 127.0.0.1:0 that greets, answers each command
 * from a per-test handler or a vsftpd-like default, opens its own passive data listeners
 * and records everything it received. It produces what vsftpd never will: odd 227 forms,
 * replies split across segments, early closes, a 226 sent while data is still in flight.
 *
 * Commands of one session are handled one at a time, in order (like vsftpd), so a pipelined
 * command is answered after the previous handler finished.
 */
import net from 'node:net';
import { FtpClient, openData, type ConnectOptions } from './ftp-client.js';
import { waitFor, withTimeout } from './async.js';
import { readAll, type ReadResult } from './sockets.js';
import type { TapTest, TeardownHost } from './tap.js';
import { proxyYaml, startTestProxy, type TestProxy } from './proxy.js';

export interface FakeCommand {
  /** Upper-case verb. */
  readonly verb: string;
  readonly arg: string;
  /** The whole line without CRLF. */
  readonly line: string;
}

/** Return true when the command was answered; anything else falls through to the default. */
export type FakeHandler = (command: FakeCommand, session: FakeSession, server: FakeFtpServer) => boolean | void | Promise<boolean | void>;

export interface FakeServerOptions {
  /** First line(s) sent on connect, without the final CRLF; null = send nothing. */
  readonly greeting?: string | null;
  readonly handler?: FakeHandler;
  /** Called once per control connection, after the greeting was written. */
  readonly onConnection?: (session: FakeSession, server: FakeFtpServer) => void;
  /** Files RETR can serve. */
  readonly files?: Record<string, Buffer | string>;
  /** Keep control connections open after the proxy's FIN (a hung server). */
  readonly halfOpen?: boolean;
}

export interface FakeUpload {
  readonly name: string;
  readonly data: Buffer;
  /** 'end' = clean FIN; 'error' = reset/error; 'close' = closed without either. */
  readonly outcome: 'end' | 'error' | 'close';
  readonly error: string | null;
}

/** A one-shot passive data listener of the fake server. */
export class FakeDataListener {
  readonly server: net.Server;
  readonly port: number;
  readonly accepted: Promise<net.Socket>;
  /** Remote addresses of every connection this listener saw. */
  readonly remotes: string[] = [];

  private constructor(server: net.Server, port: number, accepted: Promise<net.Socket>, remotes: string[]) {
    this.server = server;
    this.port = port;
    this.accepted = accepted;
    this.remotes = remotes;
  }

  static async open(sockets: Set<net.Socket>): Promise<FakeDataListener> {
    const remotes: string[] = [];
    let resolveAccepted!: (socket: net.Socket) => void;
    const accepted = new Promise<net.Socket>((resolve) => {
      resolveAccepted = resolve;
    });
    const server = net.createServer({ allowHalfOpen: false }, (socket) => {
      sockets.add(socket);
      socket.on('error', () => {});
      socket.once('close', () => sockets.delete(socket));
      remotes.push(socket.remoteAddress ?? '');
      // One connection per PASV (vsftpd closes its listener after accept).
      server.close();
      resolveAccepted(socket);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        server.removeListener('error', reject);
        resolve();
      });
    });
    return new FakeDataListener(server, (server.address() as net.AddressInfo).port, accepted, remotes);
  }

  close(): void {
    if (this.server.listening) this.server.close();
  }
}

export class FakeSession {
  readonly id: number;
  readonly socket: net.Socket;
  readonly server: FakeFtpServer;
  /** Command lines received on this connection, in order. */
  readonly received: string[] = [];
  private rawChunks: Buffer[] = [];
  private buffer = Buffer.alloc(0);
  private queue: string[] = [];
  private busy = false;
  /** The last PASV/EPSV listener, consumed by the next transfer command. */
  pendingData: FakeDataListener | null = null;

  constructor(id: number, socket: net.Socket, server: FakeFtpServer) {
    this.id = id;
    this.socket = socket;
    this.server = server;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', () => {});
  }

  /** Every byte received on this control connection. */
  get raw(): Buffer {
    return Buffer.concat(this.rawChunks);
  }

  /** Write one reply line; CRLF is added. */
  reply(line: string): void {
    this.write(`${line}\r\n`);
  }

  /** Write bytes exactly as given (latin1 for strings). */
  write(bytes: string | Buffer): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    this.socket.write(typeof bytes === 'string' ? Buffer.from(bytes, 'latin1') : bytes);
  }

  /** Graceful close of the control connection (FIN). */
  end(): void {
    if (!this.socket.destroyed) this.socket.end();
  }

  /** Abortive close of the control connection (RST). */
  reset(): void {
    if (!this.socket.destroyed) this.socket.resetAndDestroy();
  }

  /** Open a passive listener and make it the pending data connection. */
  async openPassive(): Promise<FakeDataListener> {
    this.pendingData?.close();
    const listener = await FakeDataListener.open(this.server.dataSockets);
    this.server.dataListeners.add(listener);
    this.pendingData = listener;
    return listener;
  }

  /** Take the pending data connection (waiting for it to connect), or null. */
  async takeData(timeoutMs = 5000): Promise<net.Socket | null> {
    const listener = this.pendingData;
    this.pendingData = null;
    if (!listener) return null;
    try {
      return await withTimeout(listener.accepted, timeoutMs, `fake data accept on ${listener.port}`);
    } catch {
      listener.close();
      return null;
    }
  }

  private onData(chunk: Buffer): void {
    this.rawChunks.push(chunk);
    this.server.rawChunks.push(chunk);
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (;;) {
      const lf = this.buffer.indexOf(0x0a);
      if (lf < 0) break;
      const line = this.buffer.subarray(0, lf).toString('latin1').replace(/\r+$/, '');
      this.buffer = this.buffer.subarray(lf + 1);
      this.received.push(line);
      this.server.received.push(line);
      this.queue.push(line);
    }
    void this.process();
  }

  private async process(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length > 0 && !this.socket.destroyed) {
        const line = this.queue.shift()!;
        const space = line.indexOf(' ');
        const command: FakeCommand = {
          verb: (space < 0 ? line : line.slice(0, space)).toUpperCase(),
          arg: space < 0 ? '' : line.slice(space + 1),
          line,
        };
        const handled = await this.server.options.handler?.(command, this, this.server);
        if (handled !== true) await this.server.defaultHandler(command, this);
      }
    } finally {
      this.busy = false;
    }
  }
}

export const FAKE_FEATURES = ['211-Features:', ' EPRT', ' EPSV', ' MDTM', ' PASV', ' REST STREAM', ' SIZE', ' TVFS', '211 End'];

export class FakeFtpServer {
  readonly options: FakeServerOptions;
  readonly server: net.Server;
  readonly host = '127.0.0.1';
  port = 0;
  readonly sessions: FakeSession[] = [];
  /** Every command line received on any control connection, in arrival order. */
  readonly received: string[] = [];
  readonly rawChunks: Buffer[] = [];
  readonly uploads: FakeUpload[] = [];
  readonly dataListeners = new Set<FakeDataListener>();
  readonly dataSockets = new Set<net.Socket>();
  /** Remote address of every data connection the fake accepted. */
  readonly dataRemotes: string[] = [];
  readonly files: Map<string, Buffer>;
  private readonly controlSockets = new Set<net.Socket>();
  private sessionWaiters: Array<() => void> = [];

  private constructor(options: FakeServerOptions) {
    this.options = options;
    this.files = new Map(Object.entries(options.files ?? {}).map(([name, data]) => [name, Buffer.isBuffer(data) ? data : Buffer.from(data)]));
    this.server = net.createServer({ allowHalfOpen: options.halfOpen ?? false }, (socket) => this.onConnection(socket));
  }

  static async start(options: FakeServerOptions = {}): Promise<FakeFtpServer> {
    const fake = new FakeFtpServer(options);
    await new Promise<void>((resolve, reject) => {
      fake.server.once('error', reject);
      fake.server.listen(0, '127.0.0.1', () => {
        fake.server.removeListener('error', reject);
        resolve();
      });
    });
    fake.port = (fake.server.address() as net.AddressInfo).port;
    return fake;
  }

  /** Every byte received on any control connection. */
  get raw(): Buffer {
    return Buffer.concat(this.rawChunks);
  }

  /** Wait until `count` control connections arrived. */
  async waitForSessions(count: number, timeoutMs = 5000): Promise<FakeSession> {
    const waited = new Promise<void>((resolve) => {
      const check = (): void => {
        if (this.sessions.length >= count) resolve();
        else this.sessionWaiters.push(check);
      };
      check();
    });
    await withTimeout(waited, timeoutMs, `${count} fake control connection(s)`);
    return this.sessions[count - 1]!;
  }

  /** Received command verbs (upper case), in order. */
  verbs(): string[] {
    return this.received.map((line) => line.split(' ', 1)[0]!.toUpperCase());
  }

  private onConnection(socket: net.Socket): void {
    this.controlSockets.add(socket);
    socket.once('close', () => this.controlSockets.delete(socket));
    const session = new FakeSession(this.sessions.length + 1, socket, this);
    this.sessions.push(session);
    const greeting = this.options.greeting === undefined ? '220 (fake FTP)' : this.options.greeting;
    if (greeting !== null) session.reply(greeting);
    this.options.onConnection?.(session, this);
    for (const waiter of this.sessionWaiters.splice(0)) waiter();
  }

  /** vsftpd-like answers for the commands the session tests use. */
  async defaultHandler(command: FakeCommand, session: FakeSession): Promise<void> {
    switch (command.verb) {
      case 'USER':
        return session.reply('331 Please specify the password.');
      case 'PASS':
        return session.reply('230 Login successful.');
      case 'SYST':
        return session.reply('215 UNIX Type: L8');
      case 'TYPE':
        return session.reply('200 Switching to Binary mode.');
      case 'NOOP':
        return session.reply('200 NOOP ok.');
      case 'FEAT':
        return session.write(FAKE_FEATURES.join('\r\n') + '\r\n');
      case 'EPSV': {
        const listener = await session.openPassive();
        return session.reply(`229 Entering Extended Passive Mode (|||${listener.port}|)`);
      }
      case 'PASV': {
        const listener = await session.openPassive();
        return session.reply(`227 Entering Passive Mode (127,0,0,1,${listener.port >> 8},${listener.port & 255}).`);
      }
      case 'RETR':
      case 'LIST': {
        const content = command.verb === 'LIST' ? Buffer.from('-rw-r--r-- 1 0 0 5 Jan 01 00:00 hello\r\n') : this.files.get(command.arg);
        if (!content) {
          session.pendingData?.close();
          session.pendingData = null;
          return session.reply('550 Failed to open file.');
        }
        const data = await session.takeData();
        if (!data) return session.reply('425 Failed to establish connection.');
        this.dataRemotes.push(data.remoteAddress ?? '');
        session.reply(command.verb === 'LIST' ? '150 Here comes the directory listing.' : `150 Opening BINARY mode data connection for ${command.arg} (${content.length} bytes).`);
        const ok = await writeAndClose(data, content);
        return session.reply(ok ? (command.verb === 'LIST' ? '226 Directory send OK.' : '226 Transfer complete.') : '426 Failure writing network stream.');
      }
      case 'STOR': {
        const data = await session.takeData();
        if (!data) return session.reply('425 Failed to establish connection.');
        this.dataRemotes.push(data.remoteAddress ?? '');
        session.reply('150 Ok to send data.');
        const upload = await readUpload(command.arg, data);
        this.uploads.push(upload);
        if (upload.outcome === 'end') this.files.set(upload.name, upload.data);
        return session.reply(upload.outcome === 'end' ? '226 Transfer complete.' : '426 Failure reading network stream.');
      }
      case 'STAT':
        return session.reply('211 fake status');
      case 'QUIT':
        session.reply('221 Goodbye.');
        return session.end();
      default:
        return session.reply('500 Unknown command.');
    }
  }

  /** Close everything: listeners, control and data sockets. */
  async close(): Promise<void> {
    for (const listener of this.dataListeners) listener.close();
    for (const socket of [...this.controlSockets, ...this.dataSockets]) socket.destroy();
    await new Promise<void>((resolve) => {
      if (!this.server.listening) return resolve();
      this.server.close(() => resolve());
    });
  }
}

/** Write `content`, FIN, and wait until the socket closed; false when it failed. */
function writeAndClose(socket: net.Socket, content: Buffer): Promise<boolean> {
  return new Promise((resolve) => {
    let failed = false;
    socket.once('error', () => {
      failed = true;
    });
    socket.once('close', () => resolve(!failed));
    socket.end(content);
  });
}

/** Read an upload to its end and tell a clean FIN from a reset. */
export function readUpload(name: string, socket: net.Socket): Promise<FakeUpload> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let ended = false;
    let error: NodeJS.ErrnoException | null = null;
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    // A reset that lands while reading is paused can surface as EOF in libuv; a zero-length
    // write tells them apart (see readAll in sockets.ts). Prepended so it runs before
    // net's own auto-end of a socket without allowHalfOpen.
    socket.prependOnceListener('end', () => {
      if (socket.destroyed || socket.writableEnded || socket.writableLength > 0) {
        ended = true;
        return;
      }
      socket.write(Buffer.alloc(0), (err) => {
        if (err) error ??= err as NodeJS.ErrnoException;
        else ended = true;
      });
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      error ??= err;
    });
    socket.once('close', () => {
      resolve({
        name,
        data: Buffer.concat(chunks),
        outcome: error ? 'error' : ended ? 'end' : 'close',
        error: error ? ((error as NodeJS.ErrnoException).code ?? (error as Error).message) : null,
      });
    });
  });
}

/** A TCP port on 127.0.0.1 that nobody listens on (bound, then released). */
export async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

// ------------------------------------------------------------------ session-test harness

/** Relay port ranges for one test file: consecutive blocks inside [base, base+999]. */
export class PortBlocks {
  private next: number;
  private readonly base: number;
  constructor(base: number) {
    this.base = base;
    // A random start inside the block so back-to-back runs do not reuse the same ports.
    this.next = base + Math.floor(Math.random() * 50) * 10;
  }

  take(size = 10): { first: number; last: number; text: string } {
    if (this.next + size - 1 > this.base + 999) this.next = this.base;
    const first = this.next;
    this.next += size;
    return { first, last: first + size - 1, text: `${first}-${first + size - 1}` };
  }
}

export interface HarnessOptions {
  readonly fake?: FakeServerOptions;
  readonly ports: PortBlocks;
  readonly portCount?: number;
  /** Extra YAML lines under the listener (4-space indent), e.g. timeouts. */
  readonly extraYaml?: string;
  /** Use this upstream port instead of starting a fake (e.g. a closed port). */
  readonly upstreamPort?: number;
  /** `client.advertise` of the listener (default `auto`). */
  readonly advertise?: string;
}

export interface Harness {
  readonly fake: FakeFtpServer | null;
  readonly proxy: TestProxy;
  readonly range: { first: number; last: number; text: string };
  /** A raw control client to the proxy, closed at teardown. */
  connect(options?: ConnectOptions): Promise<FtpClient>;
  /** Connect and log in (greeting, USER, PASS); returns the client. */
  login(options?: ConnectOptions): Promise<FtpClient>;
}

/** Short timeouts so a wrong behaviour fails the test fast instead of hanging it. */
export const FAST_TIMEOUTS_YAML = [
  '    timeouts:',
  '      dataConnectSeconds: 2',
  '      dataAcceptSeconds: 5',
  '      upstreamConnectSeconds: 2',
  '      upstreamReplySeconds: 5',
  '      transferReplyHoldSeconds: 10',
].join('\n');

export async function startHarness(t: TeardownHost, options: HarnessOptions): Promise<Harness> {
  let fake: FakeFtpServer | null = null;
  let upstreamPort = options.upstreamPort;
  const clients: FtpClient[] = [];
  let proxy: TestProxy | null = null;
  // One teardown, in a fixed order and bounded: clients, then the fake server (so a session
  // stuck on a hung server unwinds), then the proxy. A proxy.close() that never settles is a
  // bug the test itself reports; it must not hang the whole file.
  t.teardown(async () => {
    for (const client of clients) client.destroy();
    if (fake) await withTimeout(fake.close(), 5000, 'fake server close').catch(() => {});
    if (proxy) await withTimeout(proxy.close(), 5000, 'proxy close').catch(() => {});
  });
  if (upstreamPort === undefined) {
    fake = await FakeFtpServer.start(options.fake ?? {});
    upstreamPort = fake.port;
  }
  const range = options.ports.take(options.portCount ?? 10);
  const started = await startTestProxy(proxyYaml({
    upstreamHost: '127.0.0.1',
    upstreamPort,
    passivePorts: range.text,
    extraYaml: options.extraYaml ?? FAST_TIMEOUTS_YAML,
    ...(options.advertise !== undefined ? { advertise: options.advertise } : {}),
  }));
  proxy = started;
  const connect = async (connectOptions: ConnectOptions = {}): Promise<FtpClient> => {
    const client = await FtpClient.connect(started.host, started.port, connectOptions);
    clients.push(client);
    return client;
  };
  const login = async (connectOptions: ConnectOptions = {}): Promise<FtpClient> => {
    const client = await connect(connectOptions);
    const reply = await client.login();
    if (reply.code !== 230) throw new Error(`login failed: ${reply.text}`);
    return client;
  };
  return { fake, proxy: started, range, connect, login };
}

export interface LeakState {
  readonly sessions: number;
  readonly leased: number;
}

/** Poll until the proxy has no session and no leased port (or the time runs out). */
export async function settleLeaks(proxy: TestProxy, timeoutMs = 5000): Promise<LeakState> {
  const state = (): LeakState => ({
    sessions: proxy.server.sessionCount,
    leased: proxy.server.poolStats().reduce((sum, pool) => sum + pool.leased, 0),
  });
  await waitFor(() => {
    const s = state();
    return s.sessions === 0 && s.leased === 0;
  }, timeoutMs);
  return state();
}

export interface NoLeaksOptions {
  /** How the clients leave first: 'quit' (QUIT, then close; the default) or 'destroy' (drop the connection). */
  readonly close?: 'quit' | 'destroy';
  /** The assertion's message; default 'no session or relay port left behind'. */
  readonly message?: string;
}

/** Close `clients`, then assert that the proxy kept no session and no leased relay port. */
export async function noLeaks(
  t: TapTest,
  h: Pick<Harness, 'proxy'>,
  clients: FtpClient | readonly FtpClient[],
  options: NoLeaksOptions = {},
): Promise<void> {
  for (const client of clients instanceof FtpClient ? [clients] : clients) {
    if (options.close === 'destroy') client.destroy();
    else await client.quit();
  }
  t.same(await settleLeaks(h.proxy), { sessions: 0, leased: 0 }, options.message ?? 'no session or relay port left behind');
}

/** Open a data connection to a relay port and read it to the end. */
export async function downloadFrom(port: number, localAddress = '127.0.0.1', timeoutMs = 10000): Promise<ReadResult> {
  const socket = await openData('127.0.0.1', port, { localAddress });
  return readAll(socket, timeoutMs);
}
