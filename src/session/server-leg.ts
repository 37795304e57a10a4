/**
 * The session's side toward the server: dialling the control connection (timeout, metrics,
 * the server's addresses read once), framing what the server sends into whole replies
 * (multi-line included, bounded), dispatching them through the UpstreamExchange, and telling
 * the session when the server is lost (closed, or not speaking FTP). With `upstream.tls` the
 * connection is secured (session/upstream-tls.ts) before the session sees it. Forward mode
 * will choose the target per session here.
 */
import type net from 'node:net';
import type { FramedLine } from '../control/line-framer.js';
import { formatEndpoint } from '../control/ip.js';
import { ReplyAssembler, type Reply } from '../control/reply.js';
import type { ListenerConfig } from '../config/schema.js';
import { dial, type Dial } from '../data/dial.js';
import { addressesOf, type SocketAddresses } from '../data/socket-address.js';
import { resetSocket } from '../data/relay.js';
import { ProxyError, type ErrorCode } from '../errors.js';
import type { Logger } from '../log.js';
import type { ProxyMetrics, RejectionReason } from '../metrics.js';
import { UpstreamTls } from './upstream-tls.js';
import { ReplyReader, type ReplyReaderLimits } from './reply-reader.js';
import type { SecureDataLeg } from './client-tls.js';
import type { ReplyQueue } from '../reply-queue.js';
import { ControlConnection } from './control-connection.js';
import { UpstreamExchange, type UpstreamExchangeHooks } from './upstream-exchange.js';
import type { UpstreamForData } from './data-setup.js';
import type { UpstreamControl } from './state.js';

/** Server replies are relayed whole; a line may be longer than the client's limit. */
const MIN_REPLY_LINE_BYTES = 8192;

/** Where a session's control connection goes. */
export interface UpstreamTarget {
  /** The address to dial (an IP address, or the configured host name for a fixed server). */
  readonly address: string;
  readonly port: number;
  /** The server as named (configured host, the client's name, or the address): the TLS name to verify when none is configured. */
  readonly host: string;
}

/** The configured server (upstream.host; selection fixed). */
export function fixedTarget(config: ListenerConfig): UpstreamTarget {
  return { address: config.upstream.host, port: config.upstream.port, host: config.upstream.host };
}

export interface ServerLegHooks<T> extends Omit<UpstreamExchangeHooks<T>, 'send'> {
  /** The control connection is up; replies start arriving after this. */
  connected(upstream: UpstreamControl): void;
  /** The server could not be reached (logged and counted here). */
  unreachable(err: ProxyError): void;
  /** A reply was dispatched (flow control; a 421 means the server is going away). */
  replied(reply: Reply): void;
  /**
   * The server is gone: its connection closed (`code` null) or it sent something that is not
   * an FTP reply (`code`, connection dropped). Every reply still owed has been settled;
   * `orphans` are the transfers that will never get their final reply.
   */
  lost(reason: string, code: ErrorCode | null, orphans: T[]): void;
  limitHit(reason: RejectionReason, fields: Record<string, unknown>): void;
}

export class ServerLeg<T> {
  /** What the session waits for from the server, in order. */
  readonly exchange: UpstreamExchange<T>;
  private readonly config: ListenerConfig;
  private readonly metrics: ProxyMetrics;
  private readonly log: Logger;
  private readonly hooks: ServerLegHooks<T>;
  private readonly assembler: ReplyAssembler;
  private connection: ControlConnection | null = null;
  private addresses: SocketAddresses | null = null;
  private pendingDial: Dial | null = null;
  /** TLS toward the server (null: plain FTP). */
  readonly tls: UpstreamTls | null;
  /** The socket being secured (upstream.tls), until the session gets it. */
  private securing: net.Socket | null = null;
  private failed = false;
  /** No more replies are taken (abandoned, or the server broke the protocol). */
  private stopped = false;

  constructor(config: ListenerConfig, metrics: ProxyMetrics, log: Logger, replies: ReplyQueue, hooks: ServerLegHooks<T>) {
    this.config = config;
    this.metrics = metrics;
    this.log = log;
    this.hooks = hooks;
    this.assembler = new ReplyAssembler(config.limits.maxReplyBytes);
    const upstreamTls = config.upstream.tls;
    this.tls = upstreamTls
      ? new UpstreamTls(upstreamTls, {
        handshakeMs: config.timeouts.tlsHandshakeMs,
        replyMs: config.timeouts.upstreamReplyMs,
        maxLineBytes: Math.max(config.limits.maxLineBytes, MIN_REPLY_LINE_BYTES),
        maxReplyBytes: config.limits.maxReplyBytes,
      }, log, { handshake: (channel, result) => metrics.tlsHandshake(config.name, 'server', channel, result) })
      : null;
    this.exchange = new UpstreamExchange<T>(replies, config.timeouts.upstreamReplyMs, {
      send: (line) => this.connection?.writeLine(line),
      transferReply: hooks.transferReply,
      clientReply: hooks.clientReply,
      timeout: hooks.timeout,
    });
  }

  /** Settle everything still owed by the server (it is gone, or abandoned); returns the orphaned transfers. */
  failAll(): T[] {
    return this.exchange.failAll();
  }

  /**
   * What data setup may use of the server's connection: null before it is up, once it is
   * lost, or while `finished` says the session takes no new work (its requests are refused then).
   */
  forData(finished: () => boolean): UpstreamForData | null {
    const { addresses, exchange, log } = this;
    if (!addresses || this.stopped || finished()) return null;
    return {
      addresses,
      request(command: string): Promise<Reply> {
        if (finished()) return Promise.reject(new ProxyError('FTPP_ERR_SHUTDOWN', 'session closing'));
        log.debug({ event: 'upstream-command', command }, 'proxy command to server');
        return exchange.request(command);
      },
      transferRepliesSettled: () => exchange.transferRepliesSettled(),
      get awaitsTransferReply() {
        return exchange.awaitsTransferReply;
      },
    };
  }

  /** Give up the server now (it does not answer, or the proxy must stop): no more replies are taken. */
  abandon(): void {
    this.stopped = true;
    this.cancel();
    this.connection?.abort();
  }

  /** How the server's data connections are secured (null: plain). */
  dataLeg(): SecureDataLeg | null {
    return this.tls?.dataLeg() ?? null;
  }

  /**
   * Dial `target` (the configured server, or the original destination under interception);
   * its greeting goes to whatever the exchange expects first. Failure: hooks.unreachable.
   */
  connect(target: UpstreamTarget): void {
    this.open(target, false).then(
      (opened) => {
        if (opened) this.ready(opened.socket, opened.addresses, opened.greeting?.raw ?? null);
      },
      (err: ProxyError) => {
        if (this.failed) return;
        this.failed = true;
        this.hooks.unreachable(err);
      },
    );
  }

  /**
   * Forward mode: dial the server the client named and read its greeting here, so the client,
   * already greeted by the proxy, never sees a second bare 220. Resolves with the greeting
   * once the session has the connection (hooks.connected), null when the session gave up
   * meanwhile; rejects (nothing reported, the leg can be tried again) when the server cannot
   * be reached, will not do TLS, or greets with anything but 2yz.
   */
  async login(target: UpstreamTarget): Promise<Reply | null> {
    const opened = await this.open(target, true);
    if (!opened) return null;
    const greeting = opened.greeting!;
    if (greeting.code < 200 || greeting.code >= 300) {
      opened.socket.destroy();
      throw new ProxyError('FTPP_ERR_UPSTREAM_UNREACHABLE', `the server answered "${(greeting.lines.at(-1) ?? '').slice(0, 200)}"`);
    }
    this.ready(opened.socket, opened.addresses, null);
    return greeting;
  }

  /**
   * Dial, secure (upstream.tls) and, if asked or done by TLS anyway, read the greeting.
   * null: the dial was given up (cancel()) meanwhile. Logged and counted here.
   */
  private async open(target: UpstreamTarget, readGreeting: boolean): Promise<{ socket: net.Socket; addresses: SocketAddresses; greeting: Reply | null } | null> {
    const { upstream, timeouts } = this.config;
    const where = formatEndpoint(target.address, target.port);
    const started = process.hrtime.bigint();
    const seconds = (): number => Number(process.hrtime.bigint() - started) / 1e9;
    const attempt = dial({
      host: target.address,
      port: target.port,
      localAddress: upstream.bind,
      timeoutMs: timeouts.upstreamConnectMs,
      errorCode: 'FTPP_ERR_UPSTREAM_UNREACHABLE',
      timeoutCode: 'FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT',
      allowHalfOpen: false,
    });
    this.pendingDial = attempt;
    let socket: net.Socket;
    try {
      socket = await attempt.connected;
    } catch (err) {
      const cancelled = this.pendingDial !== attempt;
      if (!cancelled) this.pendingDial = null;
      // A dial the session gave up (it is closing) is no unreachable server: nothing to report.
      if (cancelled) return null;
      const error = err as ProxyError;
      this.metrics.upstreamConnect(this.config.name, false, seconds());
      if (error.code === 'FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT') this.hooks.limitHit('upstream-connect-timeout', { upstream: where });
      this.log.warn({ event: 'upstream-unreachable', code: error.code, upstream: where, err: error.message }, 'upstream unreachable');
      throw error;
    }
    if (this.pendingDial !== attempt) {
      socket.destroy(); // given up meanwhile
      return null;
    }
    this.pendingDial = null;
    // The server's address is what data connections are checked against and dialled: a
    // connection reset before we could read it is a failed connect, not a placeholder.
    const addresses = addressesOf(socket);
    if (!addresses) {
      socket.destroy();
      this.metrics.upstreamConnect(this.config.name, false, seconds());
      throw new ProxyError('FTPP_ERR_UPSTREAM_UNREACHABLE', `connection to ${where} reset right after connect`);
    }
    this.metrics.upstreamConnect(this.config.name, true, seconds());
    this.log.debug({ event: 'upstream-connected', upstream: `${addresses.remote.ip}:${addresses.remote.port}`, via: addresses.local.ip }, 'upstream connected');
    if (!this.tls && !readGreeting) return { socket, addresses, greeting: null };
    this.securing = socket;
    try {
      let secured: { socket: net.Socket; greeting: Reply };
      if (this.tls) {
        this.tls.target(target.host);
        secured = await this.tls.secure(socket);
      } else {
        const reader = new ReplyReader(socket, this.readerLimits(), 'FTPP_ERR_UPSTREAM_UNREACHABLE');
        try {
          secured = { socket, greeting: await reader.greeting() };
        } finally {
          reader.release();
        }
      }
      if (this.securing !== socket) {
        resetSocket(secured.socket); // given up meanwhile
        return null;
      }
      this.securing = null;
      return { socket: secured.socket, addresses, greeting: secured.greeting };
    } catch (err) {
      if (this.securing !== socket) return null;
      this.securing = null;
      socket.destroy();
      const error = err as ProxyError;
      if (this.tls) this.log.warn({ event: 'upstream-tls-failed', code: error.code, err: error.message, servername: this.tls.verifiedName }, 'TLS toward the server failed');
      else this.log.warn({ event: 'upstream-greeting-failed', code: error.code, err: error.message }, 'no greeting from the server');
      throw error;
    }
  }

  private readerLimits(): ReplyReaderLimits {
    return { replyMs: this.config.timeouts.upstreamReplyMs, maxLineBytes: Math.max(this.config.limits.maxLineBytes, MIN_REPLY_LINE_BYTES), maxReplyBytes: this.config.limits.maxReplyBytes };
  }

  /** The control connection is the session's now; `greeting` was read while securing it. */
  private ready(socket: net.Socket, addresses: SocketAddresses, greeting: Buffer | null): void {
    this.connection = this.wrap(socket);
    this.addresses = addresses;
    this.hooks.connected({ connection: this.connection, addresses });
    if (greeting) this.connection.feed(greeting);
  }

  /** Give up a dial (or its TLS negotiation) still in progress. Idempotent. */
  cancel(): void {
    this.pendingDial?.cancel();
    this.pendingDial = null;
    const securing = this.securing;
    this.securing = null;
    securing?.destroy();
  }

  private wrap(socket: net.Socket): ControlConnection {
    return new ControlConnection(socket, Math.max(this.config.limits.maxLineBytes, MIN_REPLY_LINE_BYTES), {
      lines: this.onLines,
      overflow: () => this.protocolError('FTPP_ERR_UPSTREAM_REPLY_TOO_LONG', null),
      end: () => {}, // allowHalfOpen is off: 'close' follows
      close: this.onClose,
    });
  }

  private readonly onLines = (lines: readonly FramedLine[]): void => {
    for (const line of lines) {
      if (this.stopped) return;
      const pushed = this.assembler.push(line);
      if (pushed.kind === 'reply') {
        this.exchange.dispatch(pushed.reply);
        this.hooks.replied(pushed.reply);
      } else if (pushed.kind === 'error') {
        return this.protocolError(pushed.reason === 'too-long' ? 'FTPP_ERR_UPSTREAM_REPLY_TOO_LONG' : 'FTPP_ERR_UPSTREAM_PROTOCOL', line.text);
      }
    }
  };

  private protocolError(code: ErrorCode, line: Buffer | null): void {
    this.log.warn({ event: 'upstream-protocol-error', code, line: line?.subarray(0, 80).toString('latin1') }, 'server sent something that is not an FTP reply');
    this.abandon();
    this.hooks.lost('upstream protocol error', code, this.failAll());
  }

  private readonly onClose = (error: Error | null): void => {
    this.stopped = true;
    this.hooks.lost(error ? `upstream error: ${error.message}` : 'upstream closed', null, this.failAll());
  };
}
