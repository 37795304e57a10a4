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
import { ReplyAssembler, type Reply } from '../control/reply.js';
import type { ListenerConfig } from '../config/schema.js';
import { dial, type Dial } from '../data/dial.js';
import { addressesOf, type SocketAddresses } from '../data/socket-address.js';
import { resetSocket } from '../data/relay.js';
import { ProxyError, type ErrorCode } from '../errors.js';
import type { Logger } from '../log.js';
import type { ProxyMetrics, RejectionReason } from '../metrics.js';
import { UpstreamTls } from './upstream-tls.js';
import type { SecureDataLeg } from './client-tls.js';
import type { ReplyQueue } from '../reply-queue.js';
import { ControlConnection } from './control-connection.js';
import { UpstreamExchange, type UpstreamExchangeHooks } from './upstream-exchange.js';
import type { UpstreamForData } from './data-setup.js';
import type { UpstreamControl } from './state.js';

/** Server replies are relayed whole; a line may be longer than the client's limit. */
const MIN_REPLY_LINE_BYTES = 8192;

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

  /** Dial the configured server. */
  connect(): void {
    const { upstream, timeouts } = this.config;
    const target = `${upstream.host}:${upstream.port}`;
    const started = process.hrtime.bigint();
    const seconds = (): number => Number(process.hrtime.bigint() - started) / 1e9;
    const attempt = dial({
      host: upstream.host,
      port: upstream.port,
      localAddress: upstream.bind,
      timeoutMs: timeouts.upstreamConnectMs,
      errorCode: 'FTPP_ERR_UPSTREAM_UNREACHABLE',
      timeoutCode: 'FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT',
      allowHalfOpen: false,
    });
    this.pendingDial = attempt;
    const fail = (err: ProxyError): void => {
      const cancelled = this.pendingDial === null;
      this.pendingDial = null;
      // A dial the session gave up (it is closing) is no unreachable server: nothing to report.
      if (this.failed || cancelled) return;
      this.failed = true;
      this.metrics.upstreamConnect(this.config.name, false, seconds());
      if (err.code === 'FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT') this.hooks.limitHit('upstream-connect-timeout', { upstream: target });
      this.log.warn({ event: 'upstream-unreachable', code: err.code, err: err.message }, 'upstream unreachable');
      this.hooks.unreachable(err);
    };
    attempt.connected.then((socket) => {
      if (this.pendingDial === null) {
        socket.destroy(); // given up meanwhile
        return;
      }
      this.pendingDial = null;
      // The server's address is what data connections are checked against and dialled: a
      // connection reset before we could read it is a failed connect, not a placeholder.
      const addresses = addressesOf(socket);
      if (!addresses) {
        socket.destroy();
        fail(new ProxyError('FTPP_ERR_UPSTREAM_UNREACHABLE', `connection to ${target} reset right after connect`));
        return;
      }
      this.metrics.upstreamConnect(this.config.name, true, seconds());
      this.log.debug({ event: 'upstream-connected', upstream: `${addresses.remote.ip}:${addresses.remote.port}`, via: addresses.local.ip }, 'upstream connected');
      if (!this.tls) return this.ready(socket, addresses, null);
      this.securing = socket;
      this.tls.secure(socket).then(
        (secured) => {
          if (this.securing !== socket) return void resetSocket(secured.socket); // given up meanwhile
          this.securing = null;
          this.ready(secured.socket, addresses, secured.greeting);
        },
        (err: ProxyError) => {
          if (this.securing !== socket) return;
          this.securing = null;
          socket.destroy();
          this.failed = true;
          this.log.warn({ event: 'upstream-tls-failed', code: err.code, err: err.message, servername: this.config.upstream.tls?.servername }, 'TLS toward the server failed');
          this.hooks.unreachable(err);
        },
      );
    }, fail);
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
