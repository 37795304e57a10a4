/**
 * One client session: the only module that knows both the FTP protocol and the sockets.
 * It frames both control directions, asks control/rewrite.ts what to do with each command,
 * runs the proxy's own exchanges with the server (EPSV/PASV/PORT), sets up data channels
 * and keeps replies in order. Every socket, timer and port it takes is given back by
 * teardown(), which runs exactly once whatever the path.
 */
import type net from 'node:net';
import { parseCommandLine, isUnterminatedAbort, describeCommandForLog, splitGluedAbort, type ClientCommand } from './control/command.js';
import { LineFramer, type FramedLine } from './control/line-framer.js';
import { ReplyAssembler, isPreliminary, replyLine, type Reply } from './control/reply.js';
import {
  decideCommand,
  editFeatReply,
  interpretUpstreamPassiveReply,
  type CommandDecision,
  type SessionView,
  type TransferDirection,
} from './control/rewrite.js';
import { formatEprtArgument, formatEpsvReply, formatPasvReply, formatPortArgument, type HostPort } from './control/address.js';
import type { ActiveTargetSource } from './control/policy.js';
import { familyOf, normalizeIp, type Family } from './control/ip.js';
import { ProxyError, REPLY_FOR_CODE, isProxyError, type ErrorCode } from './errors.js';
import type { ListenerConfig } from './config/schema.js';
import type { PortLease, PortPool } from './data/port-pool.js';
import { PassiveAccept } from './data/passive.js';
import { dial } from './data/dial.js';
import { DataChannel, type UpstreamLeg } from './data/channel.js';
import { kernelPathBlocker, type ForwardMapping, type KernelForward, type KernelForwarder } from './data/kernel-forward.js';
import { resetSocket, type RelayResult } from './data/relay.js';
import { addressesOf, describePeer, type SocketAddresses } from './data/socket-address.js';
import { ReplyQueue, type ReplySlot } from './reply-queue.js';
import type { Advertiser } from './advertise.js';
import type { Logger } from './log.js';
import type { ProxyMetrics, RejectionReason } from './metrics.js';

const CRLF = Buffer.from('\r\n');
/** Pause reading the server while this much reply text waits for the client. */
const REPLY_HIGH_WATER_BYTES = 256 * 1024;
/** After the last reply is flushed, how long a closing session waits for the client's FIN. */
const CLOSE_GRACE_MS = 2000;
/** After a client FIN with no transfer running: how long pending server replies may take. */
const CLIENT_GONE_DEADLINE_MS = 4000;

/** Where the session really comes from and what it dialled (a PROXY header may say). */
export interface SessionEndpoints {
  /** The real client: PROXY header source, else the socket peer. */
  readonly client: { readonly ip: string; readonly port: number };
  /** What the client dialled: PROXY header destination, else the socket's local address. */
  readonly dialled: { readonly ip: string; readonly port: number };
  /** The control socket's own local address (relay listeners bind here, active dials leave from here). */
  readonly local: { readonly ip: string; readonly port: number };
  /** Bytes that arrived behind a PROXY header (already FTP). */
  readonly initialData: Buffer | null;
}

export interface SessionDeps {
  readonly id: string;
  readonly endpoints: SessionEndpoints;
  readonly metrics: ProxyMetrics;
  readonly config: ListenerConfig;
  readonly clientPool: PortPool;
  readonly upstreamPool: PortPool | null;
  readonly advertiser: Advertiser;
  /** The nftables table for `client.dataPath: kernel` (null: every data channel is relayed). */
  readonly kernelForwarder: KernelForwarder | null;
  readonly log: Logger;
  readonly onClosed: (session: Session) => void;
}

interface TransferContext {
  readonly channel: DataChannel;
  readonly command: ClientCommand;
  readonly direction: TransferDirection;
  readonly startedAt: number;
  /** The client sent ABOR while this transfer ran. */
  aborted: boolean;
}

type Expectation =
  | { readonly kind: 'client'; readonly slot: ReplySlot; readonly transform?: (reply: Reply) => Buffer; readonly transfer?: TransferContext }
  | { readonly kind: 'internal'; readonly resolve: (reply: Reply) => void; readonly reject: (err: Error) => void; timer: NodeJS.Timeout | null };

export type SessionStatus = 'connecting' | 'open' | 'closing' | 'closed';

export class Session {
  readonly id: string;
  readonly client: net.Socket;
  readonly clientIp: string;
  readonly clientPort: number;
  /** The socket's own local address: relay listeners bind here, active dials leave from here. */
  readonly localIp: string;
  /** Address the client dialled (advertise: auto writes it into 227). */
  readonly dialledIp: string;
  readonly controlFamily: Family;
  /** The proxy's own addresses and names as this client may know them (SessionView, HOST). */
  private readonly ownAddresses: readonly string[];
  private readonly ownNames: readonly string[];
  readonly startedAt = Date.now();
  private readonly config: ListenerConfig;
  private readonly deps: SessionDeps;
  private readonly log: Logger;
  private statusValue: SessionStatus = 'connecting';
  private upstream: net.Socket | null = null;
  /** Read once at connect: the server's control address and ours toward it. */
  private upstreamAddresses: SocketAddresses | null = null;
  private upstreamReady: Promise<boolean>;
  private resolveUpstreamReady!: (ok: boolean) => void;
  private readonly clientFramer: LineFramer;
  private readonly upstreamFramer: LineFramer;
  private readonly replyAssembler: ReplyAssembler;
  private readonly replies: ReplyQueue;
  private readonly expectations: Expectation[] = [];
  private readonly commandQueue: Array<{ line: FramedLine }> = [];
  /** Data setups deferred until the running transfer's final reply (prepareUpstreamLeg). */
  private readonly transferReplyWaiters: Array<() => void> = [];
  private processingCommands = false;
  private pendingChannel: DataChannel | null = null;
  private readonly activeTransfers = new Set<DataChannel>();
  private readonly transferContexts = new Set<TransferContext>();
  private epsvAll = false;
  private upstreamLacksEpsv = false;
  private quitRequested = false;
  /** The client half-closed its control connection (FIN without QUIT). */
  private clientEnded = false;
  private serverSaid421 = false;
  private closeAfterFlush = false;
  private clientPaused = false;
  private upstreamPaused = false;
  private idleTimer: NodeJS.Timeout | null = null;
  private abortTimer: NodeJS.Timeout | null = null;
  private graceTimer: NodeJS.Timeout | null = null;
  private user: string | null = null;
  private loggedIn = false;
  private loginTimer: NodeJS.Timeout | null = null;
  private readonly limitsLogged = new Set<RejectionReason>();
  private transfers = 0;
  private closeReason = '';
  private resolveClosed!: () => void;
  /** Settles when teardown has run. */
  readonly closed: Promise<void>;

  constructor(client: net.Socket, deps: SessionDeps) {
    this.id = deps.id;
    this.client = client;
    this.deps = deps;
    this.config = deps.config;
    this.clientIp = deps.endpoints.client.ip;
    this.clientPort = deps.endpoints.client.port;
    this.localIp = deps.endpoints.local.ip;
    this.dialledIp = deps.endpoints.dialled.ip;
    this.controlFamily = familyOf(this.clientIp);
    const { advertise, advertiseFor } = this.config.client;
    this.ownAddresses = Object.freeze([
      this.dialledIp,
      this.localIp,
      ...(advertise.kind === 'ip' ? [advertise.address] : []),
      ...advertiseFor.map((rule) => rule.address),
    ]);
    this.ownNames = Object.freeze(advertise.kind === 'hostname' ? [advertise.hostname] : []);
    this.log = deps.log.child({ session: this.id, client: `${this.clientIp}:${this.clientPort}` });
    this.clientFramer = new LineFramer(this.config.limits.maxLineBytes);
    this.upstreamFramer = new LineFramer(Math.max(this.config.limits.maxLineBytes, 8192));
    this.replyAssembler = new ReplyAssembler(this.config.limits.maxReplyBytes);
    this.replies = new ReplyQueue((bytes) => this.writeClient(bytes), () => this.onRepliesChanged());
    this.upstreamReady = new Promise((resolve) => {
      this.resolveUpstreamReady = resolve;
    });
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
  }

  get status(): SessionStatus {
    return this.statusValue;
  }

  get view(): SessionView {
    return {
      controlFamily: this.controlFamily,
      clientIp: this.clientIp,
      epsvAll: this.epsvAll,
      allowNatFixup: this.config.client.portNatFixup,
      loggedIn: this.loggedIn,
      ownAddresses: this.ownAddresses,
      ownNames: this.ownNames,
    };
  }

  /** Begin: connect upstream, relay the greeting, start reading the client. */
  start(): void {
    this.log.info({ event: 'session-start', listener: this.config.name, local: `${this.localIp}:${this.deps.endpoints.local.port}`, dialled: `${this.dialledIp}:${this.deps.endpoints.dialled.port}` }, 'session start');
    this.deps.metrics.sessionOpened(this.config.name);
    this.loginTimer = setTimeout(() => this.onLoginTimeout(), this.config.timeouts.loginMs);
    this.client.setNoDelay(true);
    this.client.on('data', (chunk: Buffer) => this.onClientData(chunk));
    this.client.on('end', () => this.onClientEnd());
    this.client.on('error', (err) => this.teardown(`client error: ${err.message}`));
    this.client.on('close', () => this.teardown('client closed'));
    this.client.on('drain', () => this.updateUpstreamFlow());
    // The greeting is the reply to "connecting" (RFC 959 §5.4: 120 then 220, or 220, or 421).
    const greeting = this.replies.open();
    this.expectations.push({ kind: 'client', slot: greeting });
    this.armIdleTimer();
    const { upstream } = this.config;
    const connectStarted = process.hrtime.bigint();
    const attempt = dial({
      host: upstream.host,
      port: upstream.port,
      localAddress: upstream.bind,
      timeoutMs: this.config.timeouts.upstreamConnectMs,
      errorCode: 'FTPP_ERR_UPSTREAM_UNREACHABLE',
      allowHalfOpen: false,
    });
    const seconds = (): number => Number(process.hrtime.bigint() - connectStarted) / 1e9;
    const failed = (err: ProxyError): void => {
      if (this.statusValue !== 'connecting') return;
      this.deps.metrics.upstreamConnect(this.config.name, false, seconds());
      if (/timed out/.test(err.message)) this.limitHit('upstream-connect-timeout', { upstream: `${upstream.host}:${upstream.port}` });
      this.log.warn({ event: 'upstream-unreachable', code: err.code, err: err.message }, 'upstream unreachable');
      this.expectations.length = 0;
      this.replies.push(greeting, replyLine(REPLY_FOR_CODE.FTPP_ERR_UPSTREAM_UNREACHABLE));
      this.replies.end(greeting);
      this.resolveUpstreamReady(false);
      this.beginClose('upstream unreachable');
    };
    attempt.connected.then((socket) => {
      // The server's address is what data connections are checked against and dialled: a
      // connection reset before we could read it is a failed connect, not a placeholder.
      const addresses = addressesOf(socket);
      if (!addresses) {
        socket.destroy();
        failed(new ProxyError('FTPP_ERR_UPSTREAM_UNREACHABLE', `connection to ${upstream.host}:${upstream.port} reset right after connect`));
        return;
      }
      this.deps.metrics.upstreamConnect(this.config.name, true, seconds());
      this.onUpstreamConnected(socket, addresses);
    }, failed);
    this.pendingDial = attempt;
    if (this.deps.endpoints.initialData && this.deps.endpoints.initialData.length > 0) {
      this.onClientData(this.deps.endpoints.initialData);
    }
    this.client.resume();
  }

  /**
   * A limit was hit: count it every time, log it once per session with the client
   * (the session's child logger carries the client address).
   */
  private limitHit(reason: RejectionReason, fields: Record<string, unknown> = {}): void {
    this.deps.metrics.limitHit(this.config.name, reason);
    if (this.limitsLogged.has(reason)) return;
    this.limitsLogged.add(reason);
    this.log.warn({ ...fields, event: 'limit', limit: reason }, `limit reached: ${reason}`);
  }

  private onLoginTimeout(): void {
    this.loginTimer = null;
    if (this.loggedIn || this.isFinished()) return;
    this.limitHit('login-timeout', { code: 'FTPP_ERR_LOGIN_TIMEOUT', loginMs: this.config.timeouts.loginMs });
    this.abandon('login timeout', REPLY_FOR_CODE.FTPP_ERR_LOGIN_TIMEOUT);
  }
  private pendingDial: { cancel(): void } | null = null;

  private onUpstreamConnected(socket: net.Socket, addresses: SocketAddresses): void {
    this.pendingDial = null;
    if (this.statusValue === 'closed' || this.statusValue === 'closing') {
      socket.destroy();
      return;
    }
    this.statusValue = 'open';
    this.upstream = socket;
    this.upstreamAddresses = addresses;
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onUpstreamData(chunk));
    socket.on('error', (err) => this.onUpstreamGone(`upstream error: ${err.message}`));
    socket.on('close', () => this.onUpstreamGone('upstream closed'));
    this.log.debug({ event: 'upstream-connected', upstream: `${addresses.remote.ip}:${addresses.remote.port}`, via: addresses.local.ip }, 'upstream connected');
    this.resolveUpstreamReady(true);
  }

  // ---------------------------------------------------------------- client side

  private onClientData(chunk: Buffer): void {
    if (this.statusValue === 'closed') return;
    if (this.abortTimer) {
      clearTimeout(this.abortTimer);
      this.abortTimer = null;
    }
    const framed = this.clientFramer.push(chunk);
    for (const line of framed.lines) {
      for (const text of splitGluedAbort(line.text)) this.enqueueLine({ text, raw: text });
    }
    if (framed.overflow) {
      // RFC 959 §4.2.1 "500 Syntax error, command unrecognized ... command line too long";
      // vsftpd also closes the session here (protocol.md §1.1, §8.18).
      this.limitHit('line-too-long', { code: 'FTPP_ERR_LINE_TOO_LONG', maxBytes: this.config.limits.maxLineBytes });
      this.client.pause();
      this.commandQueue.length = 0;
      this.replies.append(replyLine(REPLY_FOR_CODE.FTPP_ERR_LINE_TOO_LONG));
      this.beginClose('line too long');
      return;
    }
    if (isUnterminatedAbort(this.clientFramer.pending)) {
      // CPython's abort() sends ABOR\r\n as urgent data; Node loses the LF (protocol.md §1.4).
      this.abortTimer = setTimeout(() => {
        this.abortTimer = null;
        const line = this.clientFramer.flushPending();
        if (line) this.enqueueLine(line);
      }, this.config.timeouts.abortIdleMs);
    }
  }

  private enqueueLine(line: FramedLine): void {
    if (this.closeAfterFlush || this.statusValue === 'closed') return;
    // Only a complete command is activity: the bytes of a line that never ends (one every few
    // seconds, under maxLineBytes) must not keep a session past idleSeconds (issue #10).
    this.armIdleTimer();
    if (this.commandQueue.length >= this.config.limits.maxQueuedCommands) {
      this.log.warn({ event: 'queue-overflow', code: 'FTPP_ERR_QUEUE_OVERFLOW' }, 'too many queued commands');
      this.commandQueue.length = 0;
      this.replies.append(replyLine(REPLY_FOR_CODE.FTPP_ERR_QUEUE_OVERFLOW));
      this.beginClose('command queue overflow');
      return;
    }
    this.commandQueue.push({ line });
    this.updateClientFlow();
    void this.processCommands();
  }

  private onClientEnd(): void {
    // The client half-closed its control connection: answer what it asked, then close.
    this.log.debug({ event: 'client-fin' }, 'client closed its side');
    // The server's close that follows is the one the proxy asks for: not a failure, no 421.
    this.clientEnded = true;
    // A server that never answers nor closes must not keep the session forever. A client
    // that hung up without a transfer running has little left to wait for: a short deadline.
    this.armCloseDeadline(this.activeTransfers.size > 0 ? undefined : CLIENT_GONE_DEADLINE_MS);
    void this.upstreamReady.then(() => {
      if (this.statusValue === 'closed') return;
      if (this.upstream && !this.upstream.destroyed) this.upstream.end();
      else this.beginClose('client ended');
    });
  }

  private async processCommands(): Promise<void> {
    if (this.processingCommands) return;
    this.processingCommands = true;
    try {
      const ready = await this.upstreamReady;
      if (!ready) {
        this.commandQueue.length = 0;
        return;
      }
      while (this.commandQueue.length > 0 && !this.isFinished()) {
        const item = this.commandQueue.shift()!;
        this.updateClientFlow();
        await this.executeLine(item.line);
      }
    } catch (err) {
      if (!isProxyError(err, 'FTPP_ERR_SHUTDOWN')) {
        this.log.error({ event: 'session-error', err }, 'unexpected error while processing a command');
        this.replies.append(replyLine('421 Internal proxy error.'));
        this.beginClose('internal error');
      }
    } finally {
      this.processingCommands = false;
    }
  }

  /** A method, not a field read, so TypeScript does not narrow across calls that close. */
  private isClosed(): boolean {
    return this.statusValue === 'closed';
  }

  private isFinished(): boolean {
    return this.statusValue === 'closed' || this.closeAfterFlush;
  }

  private async executeLine(line: FramedLine): Promise<void> {
    const parsed = parseCommandLine(line.text);
    if (!parsed.ok) {
      // CR/LF/NUL inside an argument is a bad parameter (501); anything else is not a command.
      this.replies.append(replyLine(parsed.reason === 'bad-argument' ? '501 Syntax error in parameters or arguments.' : '500 Syntax error, command unrecognized.'));
      return;
    }
    const command = parsed.command;
    this.log.debug({ event: 'command', command: describeCommandForLog(command) }, 'command');
    if (command.verb === 'USER') this.user = command.argument.slice(0, 128);
    if (command.verb === 'QUIT') this.quitRequested = true;
    const decision = decideCommand(command, this.view);
    await this.carryOut(command, decision);
  }

  private async carryOut(command: ClientCommand, decision: CommandDecision): Promise<void> {
    switch (decision.kind) {
      case 'forward':
        this.forward(command);
        return;
      case 'feat':
        this.forward(command, editFeatReply);
        return;
      case 'reply':
        this.log.info({ event: 'command-refused', code: decision.errorCode, command: describeCommandForLog(command), reply: decision.line }, 'command refused');
        this.replies.append(replyLine(decision.line));
        return;
      case 'host-answered':
        // Not a refusal: the client named the proxy (RFC 7151), the server never hears of it.
        this.log.debug({ event: 'host-answered', host: command.argument.slice(0, 256) }, 'HOST names the proxy; answered here');
        this.replies.append(replyLine(decision.line));
        return;
      case 'epsv-all':
        // Answered here: the server must stay free to use PASV/PORT on its own leg (RFC 2428 §3).
        this.epsvAll = true;
        this.releasePendingChannel('EPSV ALL');
        this.replies.append(replyLine('200 EPSV ALL command successful.'));
        return;
      case 'abort':
        this.abortTransfers();
        this.forwardLine(Buffer.from('ABOR'), this.replies.open());
        return;
      case 'passive':
        await this.setupPassive(decision.style);
        return;
      case 'active':
        await this.setupActive(decision.style, decision.target, decision.via);
        return;
      case 'transfer':
        await this.startTransfer(command, decision.direction);
        return;
    }
  }

  private forward(command: ClientCommand, transform?: (reply: Reply) => Buffer): void {
    this.forwardLine(command.line, this.replies.open(), transform);
  }

  private forwardLine(line: Buffer, slot: ReplySlot, transform?: (reply: Reply) => Buffer, transfer?: TransferContext): void {
    this.expectations.push({ kind: 'client', slot, ...(transform ? { transform } : {}), ...(transfer ? { transfer } : {}) });
    this.writeUpstream(line);
  }

  private writeUpstream(line: Buffer): void {
    const upstream = this.upstream;
    if (!upstream || upstream.destroyed || upstream.writableEnded) return;
    upstream.write(Buffer.concat([line, CRLF]));
  }

  /** Send a command of the proxy's own and wait for its reply (not shown to the client). */
  private sendInternal(line: string): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      if (this.isFinished() || !this.upstream) {
        reject(new ProxyError('FTPP_ERR_SHUTDOWN', 'session closing'));
        return;
      }
      const expectation: Expectation = { kind: 'internal', resolve, reject, timer: null };
      expectation.timer = setTimeout(() => {
        expectation.timer = null;
        this.log.warn({ event: 'upstream-timeout', command: line, waitedMs: this.config.timeouts.upstreamReplyMs }, 'server did not answer');
        this.abandon('upstream reply timeout', '421 Service not available: server does not answer.');
      }, this.config.timeouts.upstreamReplyMs);
      this.expectations.push(expectation);
      this.log.debug({ event: 'upstream-command', command: line }, 'proxy command to server');
      this.writeUpstream(Buffer.from(line, 'latin1'));
    });
  }

  // ---------------------------------------------------------------- data channel setup

  /** Refuse a new data channel when the session already runs as many as allowed. */
  private checkDataChannelLimit(): void {
    if (this.activeTransfers.size >= this.config.limits.maxDataChannelsPerSession) {
      this.limitHit('passive-listeners', { code: 'FTPP_ERR_TOO_MANY_DATA_CHANNELS', max: this.config.limits.maxDataChannelsPerSession });
      throw new ProxyError('FTPP_ERR_TOO_MANY_DATA_CHANNELS', `${this.activeTransfers.size} data channels already open`);
    }
  }

  private async setupPassive(style: 'pasv' | 'epsv'): Promise<void> {
    const slot = this.replies.open();
    this.releasePendingChannel(`new ${style.toUpperCase()}`);
    try {
      this.checkDataChannelLimit();
      let advertised: string | null = null;
      if (style === 'pasv') {
        advertised = await this.deps.advertiser.addressFor(this.clientIp, this.dialledIp);
        if (!advertised) throw new ProxyError('FTPP_ERR_ADVERTISE_UNRESOLVED', `no IPv4 address to advertise (${this.deps.advertiser.lastError?.message ?? 'control connection is not IPv4'})`);
      }
      const lease = await this.leaseRelayPort(this.deps.clientPool, this.localIp);
      // Until the 227/229 goes out nobody has a reason to connect here: refuse anyone who does.
      lease.setConnectionHandler((socket) => this.refuseStranger(lease.port, socket, 'early'));
      const upstreamLeg = await this.prepareUpstreamLeg('passive').catch((err: unknown) => {
        lease.release();
        throw err;
      });
      if (this.isFinished()) {
        lease.release();
        if (upstreamLeg.kind === 'active') upstreamLeg.accept.cancel('session closing');
        return;
      }
      const forward = this.tryKernelPath(lease.port, upstreamLeg);
      if (forward) {
        // The kernel carries the connection; one reaching our listener missed the mapping.
        lease.setConnectionHandler((socket) => this.refuseStranger(lease.port, socket, 'unmapped'));
        this.pendingChannel = new DataChannel({ kind: 'forwarded', lease, forward }, upstreamLeg);
      } else {
        this.pendingChannel = new DataChannel({ kind: 'passive', accept: this.passiveAccept(lease) }, upstreamLeg);
      }
      this.log.debug({ event: 'data-passive', port: lease.port, upstream: describeLeg(upstreamLeg), dataPath: forward ? 'kernel' : 'relay' }, 'passive channel ready');
      this.replies.push(slot, replyLine(style === 'pasv' ? formatPasvReply(advertised!, lease.port) : formatEpsvReply(lease.port)));
    } catch (err) {
      this.replies.push(slot, this.failureReply(err, style.toUpperCase()));
    } finally {
      this.replies.end(slot);
    }
  }

  /** A relay port bound on `host`, counted against this client address's share of `pool`. */
  private async leaseRelayPort(pool: PortPool, host: string): Promise<PortLease> {
    try {
      return await pool.lease(host, this.clientIp);
    } catch (err) {
      if (isProxyError(err, 'FTPP_ERR_RELAY_PORTS_PER_IP')) this.limitHit('relay-ports-per-ip', { code: err.code, max: pool.maxPerOwner, range: `${pool.range.first}-${pool.range.last}` });
      throw err;
    }
  }

  /** The one-shot accept of a relayed passive channel: only the control client may connect. */
  private passiveAccept(lease: PortLease): PassiveAccept {
    const pp = this.config.proxyProtocol;
    return new PassiveAccept(lease, {
      expectedIp: this.clientIp,
      timeoutMs: this.config.timeouts.dataAcceptMs,
      ...(pp.dataPorts && pp.accept !== 'off' ? { proxyHeader: { accept: pp.accept, from: pp.from.map((rule) => rule.cidr), timeoutMs: pp.timeoutMs } } : {}),
      onStranger: (address, port) => this.noteStranger(lease.port, `${address}:${port}`),
      onPeerGone: () => this.log.debug({ event: 'data-peer-gone', port: lease.port }, 'data connection reset before it could be checked; dropped'),
    });
  }

  /** A connection on a leased port nobody expected at this point (the kernel path's, or too early). */
  private refuseStranger(port: number, socket: net.Socket, when: 'early' | 'unmapped'): void {
    this.noteStranger(port, describePeer(socket), when);
    resetSocket(socket);
  }

  private noteStranger(port: number, from: string, when?: 'early' | 'unmapped'): void {
    this.deps.metrics.dataStranger(this.config.name);
    this.log.warn({ event: 'data-stranger', port, from, ...(when ? { when } : {}) }, 'refused data connection from another address');
  }

  /**
   * `client.dataPath: kernel`: map the leased port to the server's passive port in nftables
   * (kernel-forward.ts). Null when the relay carries this channel: the path is off, this
   * channel is not one the kernel can carry, or the mapping failed (logged; the relay works).
   */
  private tryKernelPath(port: number, upstreamLeg: UpstreamLeg): KernelForward | null {
    const forwarder = this.deps.kernelForwarder;
    if (this.config.client.dataPath !== 'kernel' || !forwarder || upstreamLeg.kind !== 'passive') return null;
    const mapping: ForwardMapping = {
      clientIp: this.clientIp,
      proxyIp: this.localIp,
      proxyPort: port,
      serverIp: upstreamLeg.target.host,
      serverPort: upstreamLeg.target.port,
      snatIp: this.upstreamAddresses!.local.ip,
    };
    const blocker = kernelPathBlocker({ ...mapping, proxyProtocol: this.config.proxyProtocol.accept !== 'off' });
    if (blocker) {
      this.log.debug({ event: 'kernel-path-skipped', reason: blocker }, 'data channel relayed');
      this.deps.metrics.kernelMapping(this.config.name, 'skipped');
      return null;
    }
    try {
      const forward = forwarder.forward(mapping, this.config.timeouts.dataAcceptMs);
      this.deps.metrics.kernelMapping(this.config.name, 'added');
      return forward;
    } catch (err) {
      this.deps.metrics.kernelMapping(this.config.name, 'failed');
      this.log.warn({ event: 'kernel-path-failed', code: isProxyError(err) ? err.code : 'FTPP_ERR_KERNEL_PATH', err: (err as Error).message }, 'kernel mapping failed; relaying this data channel');
      return null;
    }
  }

  private async setupActive(style: 'port' | 'eprt', target: HostPort, via: ActiveTargetSource): Promise<void> {
    const slot = this.replies.open();
    // PASV then PORT: PORT wins (vsftpd handle_port runs pasv_cleanup; protocol.md §3.5).
    this.releasePendingChannel(`new ${style.toUpperCase()}`);
    if (via === 'nat-fixup') this.log.info({ event: 'port-nat-fixup', target: `${target.host}:${target.port}` }, 'client sent an unroutable address; using its real address');
    if (via === 'unspecified') this.log.debug({ event: 'port-unspecified', target: `${target.host}:${target.port}` }, 'client sent the unspecified address; using its real address');
    try {
      this.checkDataChannelLimit();
      const upstreamLeg = await this.prepareUpstreamLeg('active');
      if (this.isFinished()) {
        if (upstreamLeg.kind === 'active') upstreamLeg.accept.cancel('session closing');
        return;
      }
      this.pendingChannel = new DataChannel({ kind: 'active', target }, upstreamLeg);
      this.log.debug({ event: 'data-active', target: `${target.host}:${target.port}`, upstream: describeLeg(upstreamLeg) }, 'active channel ready');
      // 200 only now that the server side is ready (so REST stays right before the transfer).
      this.replies.push(slot, replyLine(`200 ${style === 'port' ? 'PORT' : 'EPRT'} command successful.`));
    } catch (err) {
      this.replies.push(slot, this.failureReply(err, style.toUpperCase()));
    } finally {
      this.replies.end(slot);
    }
  }

  /**
   * Open the server's side of a data channel now, not at transfer time, so that REST stays
   * immediately before RETR/STOR (RFC 959 §4.1.3; protocol.md §2.4).
   */
  private async prepareUpstreamLeg(clientMode: 'passive' | 'active'): Promise<UpstreamLeg> {
    if (this.awaitsTransferReply()) {
      // vsftpd reads no command while it sends or receives a file: the proxy's own EPSV/PASV/
      // PORT would go unanswered until the transfer's final reply and, after
      // upstreamReplySeconds, kill the session and the transfer with it (issue #10). Do what
      // the server does: set this channel up after that reply (the client's reply slot is
      // already reserved, so replies stay in order).
      this.log.debug({ event: 'data-setup-deferred' }, 'data setup waits for the running transfer\'s final reply');
      await new Promise<void>((resolve) => this.transferReplyWaiters.push(resolve));
      if (this.isFinished()) throw new ProxyError('FTPP_ERR_SHUTDOWN', 'session closing');
    }
    const configured = this.config.upstream.dataMode;
    const mode = configured === 'mirror' ? clientMode : configured;
    const { remote: { ip: serverIp }, local: { ip: localIp } } = this.upstreamAddresses!;
    if (mode === 'passive') {
      let verb: 'EPSV' | 'PASV' = this.upstreamLacksEpsv ? 'PASV' : 'EPSV';
      let reply = await this.sendInternal(verb);
      let result = interpretUpstreamPassiveReply(reply, verb);
      if (!result.ok && result.reason === 'unsupported' && verb === 'EPSV') {
        // Server without EPSV (or refusing it): fall back to PASV for the rest of the session.
        this.upstreamLacksEpsv = true;
        verb = 'PASV';
        reply = await this.sendInternal(verb);
        result = interpretUpstreamPassiveReply(reply, verb);
      }
      if (result.ok) {
        // The 227 address is ignored: connect to the server's control address (protocol.md §2.4).
        return { kind: 'passive', target: { host: serverIp, port: result.port } };
      }
      throw this.upstreamSetupError(reply, verb, result.reason);
    }
    const pool = this.deps.upstreamPool;
    if (!pool) throw new ProxyError('FTPP_ERR_UPSTREAM_DATA_SETUP', 'dataMode needs upstream.activePorts');
    const lease = await this.leaseRelayPort(pool, localIp);
    const accept = new PassiveAccept(lease, {
      expectedIp: serverIp,
      timeoutMs: this.config.timeouts.dataAcceptMs,
      onStranger: (address, port) =>
        this.log.warn({ event: 'data-stranger', port: lease.port, from: `${address}:${port}`, side: 'upstream' }, 'refused data connection that is not from the server'),
    });
    // vsftpd port_promiscuous=NO: the address must be our own upstream-side address (protocol.md §2.4).
    const line = familyOf(localIp) === 4 ? `PORT ${formatPortArgument(localIp, lease.port)}` : `EPRT ${formatEprtArgument(localIp, lease.port)}`;
    let reply: Reply;
    try {
      reply = await this.sendInternal(line);
    } catch (err) {
      accept.cancel('session closing');
      throw err;
    }
    if (reply.code >= 200 && reply.code < 300) return { kind: 'active', accept };
    accept.cancel('server refused PORT');
    throw this.upstreamSetupError(reply, line.slice(0, 4), 'refused');
  }

  private upstreamSetupError(reply: Reply, sent: string, reason: string): Error {
    if (reply.code === 421 || reply.code === 530) {
      // Meaningful to the client as is (not logged in, server going away).
      return new ServerReplyError(reply);
    }
    return new ProxyError('FTPP_ERR_UPSTREAM_DATA_SETUP', `server answered ${sent} with "${reply.lines[0] ?? ''}" (${reason})`);
  }

  private failureReply(err: unknown, what: string): Buffer {
    if (err instanceof ServerReplyError) return err.reply.raw;
    if (isProxyError(err)) {
      if (err.code === 'FTPP_ERR_SHUTDOWN') {
        // The session is closing and says so once, in its own closing reply.
        this.log.debug({ event: 'data-setup-failed', code: err.code, command: what, err: err.message }, 'data channel setup abandoned');
        return Buffer.alloc(0);
      }
      this.log.warn({ event: 'data-setup-failed', code: err.code, command: what, err: err.message }, 'data channel setup failed');
      return replyLine(REPLY_FOR_CODE[err.code]);
    }
    this.log.error({ event: 'data-setup-failed', command: what, err }, 'data channel setup failed');
    return replyLine(REPLY_FOR_CODE.FTPP_ERR_DATA_CONNECT);
  }

  private releasePendingChannel(reason: string): void {
    const channel = this.pendingChannel;
    this.pendingChannel = null;
    channel?.close(reason);
  }

  // ---------------------------------------------------------------- transfers

  private async startTransfer(command: ClientCommand, direction: TransferDirection): Promise<void> {
    const channel = this.pendingChannel;
    this.pendingChannel = null;
    const slot = this.replies.open();
    if (!channel) {
      // No PORT/PASV first: the server answers "425 Use PORT or PASV first." (protocol.md §3.5).
      this.forwardLine(command.line, slot);
      return;
    }
    this.activeTransfers.add(channel);
    const context: TransferContext = { channel, command, direction, startedAt: Date.now(), aborted: false };
    this.transferContexts.add(context);
    channel.onSettled = (result, reason) => this.onChannelSettled(context, result, reason);
    const timeouts = this.config.timeouts;
    // Outbound legs connect before the command goes upstream: if the client's PORT address
    // cannot be reached, the command is never sent (protocol.md §8.14).
    const upstreamDial =
      channel.upstreamLeg.kind === 'passive' && !channel.isForwarded
        ? channel.track(dial({ host: channel.upstreamLeg.target.host, port: channel.upstreamLeg.target.port, localAddress: this.upstreamAddresses!.local.ip, timeoutMs: timeouts.dataConnectMs }))
        : null;
    const clientDial =
      channel.clientLeg.kind === 'active'
        ? channel.track(dial({ host: channel.clientLeg.target.host, port: channel.clientLeg.target.port, localAddress: this.localIp, timeoutMs: timeouts.dataConnectMs }))
        : null;
    let upstreamSocket: net.Socket | null = null;
    let clientSocket: net.Socket | null = null;
    try {
      [upstreamSocket, clientSocket] = await Promise.all([upstreamDial?.connected ?? null, clientDial?.connected ?? null]);
    } catch (err) {
      this.replies.push(slot, this.failureReply(err, command.verb));
      this.replies.end(slot);
      channel.close('data connect failed');
      return;
    }
    if (this.isFinished() || channel.isClosed) {
      this.replies.end(slot);
      channel.close('session closing');
      return;
    }
    this.forwardLine(command.line, slot, undefined, context);
    channel.pair({ clientSocket, upstreamSocket, idleTimeoutMs: this.config.timeouts.dataIdleMs });
  }

  /**
   * Server reply to a transfer command: 1yz passes at once, the final one is held (§3.3)
   * until the relayed data has been delivered. A 2yz for data that was not all delivered (the
   * client's data leg failed, or the hold expired and the proxy cut it) becomes a 426: the
   * client must never see a cut transfer as complete (RFC 959 §3.3; issue #10).
   */
  private onTransferReply(expectation: { slot: ReplySlot; transfer: TransferContext }, reply: Reply): void {
    const { slot, transfer } = expectation;
    const channel = transfer.channel;
    this.transfers += 1;
    if (reply.code < 200 || reply.code >= 300) {
      // A failed transfer must look failed to the client: reset, never FIN (protocol.md §3.3).
      channel.close(`server replied ${reply.code}`);
      this.replies.push(slot, reply.raw);
      this.replies.end(slot);
      this.logTransfer(transfer, reply.code, null);
      return;
    }
    const hold = this.config.timeouts.transferReplyHoldMs;
    let timer: NodeJS.Timeout | null = null;
    const expired = new Promise<'hold-expired'>((resolve) => {
      timer = setTimeout(() => resolve('hold-expired'), hold);
    });
    const delivered = channel.directionDone(transfer.direction).then((done) => (done ? 'delivered' : 'cut'));
    void Promise.race([delivered, expired]).then((outcome) => {
      if (timer) clearTimeout(timer);
      if (outcome === 'delivered') {
        channel.lingerThenClose(this.config.timeouts.dataLingerMs);
        this.replies.push(slot, reply.raw);
        this.logTransfer(transfer, reply.code, null);
      } else {
        if (outcome === 'hold-expired') this.log.warn({ event: 'transfer-hold-timeout', holdMs: hold }, 'data not flushed in time; resetting the data connection');
        channel.close(outcome === 'hold-expired' ? 'final reply hold timed out' : 'data connection failed');
        const line = REPLY_FOR_CODE.FTPP_ERR_TRANSFER_INCOMPLETE;
        this.log.info({ event: 'transfer-incomplete', code: 'FTPP_ERR_TRANSFER_INCOMPLETE', serverReply: reply.code, why: outcome }, 'server reported success for data the client did not fully receive; answering 426');
        this.replies.push(slot, replyLine(line));
        this.logTransfer(transfer, Number.parseInt(line, 10), reply.code);
      }
      this.replies.end(slot);
    });
  }

  /** One `transfer` record and metric, once the reply the client gets is known. */
  private logTransfer(transfer: TransferContext, code: number, serverCode: number | null): void {
    const channel = transfer.channel;
    const bytes = channel.bytes;
    // The kernel path never sees the payload: no byte count rather than a wrong one.
    const moved = channel.isForwarded ? null : transfer.direction === 'download' ? bytes.toClient : bytes.toUpstream;
    const result = code >= 200 && code < 300 ? 'ok' : transfer.aborted ? 'aborted' : 'failed';
    this.deps.metrics.transferFinished(this.config.name, transfer.direction, result, moved ?? Number.NaN, (Date.now() - transfer.startedAt) / 1000);
    this.log.info(
      {
        event: 'transfer',
        command: transfer.command.verb,
        path: transfer.command.argument.slice(0, 512),
        user: this.user,
        direction: transfer.direction,
        bytes: moved,
        result,
        durationMs: Date.now() - transfer.startedAt,
        reply: code,
        ...(serverCode !== null ? { serverReply: serverCode } : {}),
        clientDataPort: channel.clientPort,
        upstreamDataPort: channel.upstreamPort,
        clientMode: channel.clientLeg.kind === 'active' ? 'active' : 'passive',
        dataPath: channel.isForwarded ? 'kernel' : 'relay',
        upstreamMode: channel.upstreamLeg.kind,
      },
      'transfer',
    );
  }

  private onChannelSettled(transfer: TransferContext, result: RelayResult | null, reason: string): void {
    this.activeTransfers.delete(transfer.channel);
    this.transferContexts.delete(transfer);
    if (reason.startsWith('pairing failed') && /accept/.test(reason)) {
      this.limitHit('data-accept-timeout', { code: 'FTPP_ERR_DATA_ACCEPT_TIMEOUT', reason });
    } else if (result?.outcome === 'idle') {
      this.limitHit('data-idle-timeout', { dataIdleMs: this.config.timeouts.dataIdleMs });
    }
    this.log.debug({ event: 'data-closed', reason, outcome: result?.outcome ?? 'not-connected' }, 'data channel closed');
  }

  private abortTransfers(): void {
    // Node cannot send urgent data either, so the proxy aborts the transfer itself: reset both
    // legs, then send a plain ABOR; the server's 426/225/226 pass through in order (§3.4).
    for (const context of this.transferContexts) context.aborted = true;
    for (const channel of this.activeTransfers) channel.close('ABOR');
    this.releasePendingChannel('ABOR');
  }

  // ---------------------------------------------------------------- server side

  private onUpstreamData(chunk: Buffer): void {
    if (this.statusValue === 'closed') return;
    const framed = this.upstreamFramer.push(chunk);
    for (const line of framed.lines) {
      const pushed = this.replyAssembler.push(line);
      if (pushed.kind === 'reply') this.dispatchReply(pushed.reply);
      else if (pushed.kind === 'error') return this.upstreamProtocolError(pushed.reason === 'too-long' ? 'FTPP_ERR_UPSTREAM_REPLY_TOO_LONG' : 'FTPP_ERR_UPSTREAM_PROTOCOL', line.text);
      if (this.isClosed()) return;
    }
    if (framed.overflow) this.upstreamProtocolError('FTPP_ERR_UPSTREAM_REPLY_TOO_LONG', null);
  }

  private upstreamProtocolError(code: ErrorCode, line: Buffer | null): void {
    this.log.warn({ event: 'upstream-protocol-error', code, line: line?.subarray(0, 80).toString('latin1') }, 'server sent something that is not an FTP reply');
    this.upstream?.destroy();
    this.failExpectations();
    this.replies.append(replyLine(REPLY_FOR_CODE[code]));
    this.beginClose('upstream protocol error');
  }

  private dispatchReply(reply: Reply): void {
    if (reply.code === 421) this.serverSaid421 = true;
    const expectation = this.expectations[0];
    if (!expectation) {
      // Unsolicited (e.g. vsftpd's "421 Timeout."): pass it on.
      this.replies.append(reply.raw);
    } else if (expectation.kind === 'internal') {
      this.expectations.shift();
      if (expectation.timer) clearTimeout(expectation.timer);
      expectation.resolve(reply);
    } else if (expectation.transfer) {
      if (!isPreliminary(reply.code)) this.expectations.shift();
      if (isPreliminary(reply.code)) this.replies.push(expectation.slot, reply.raw);
      else this.onTransferReply({ slot: expectation.slot, transfer: expectation.transfer }, reply);
    } else if (isPreliminary(reply.code)) {
      this.replies.push(expectation.slot, reply.raw);
    } else {
      if (reply.code === 230 && !this.loggedIn) {
        this.loggedIn = true;
        if (this.loginTimer) clearTimeout(this.loginTimer);
        this.loginTimer = null;
      }
      this.expectations.shift();
      this.replies.push(expectation.slot, expectation.transform ? expectation.transform(reply) : reply.raw);
      this.replies.end(expectation.slot);
    }
    this.updateClientFlow();
    this.wakeTransferReplyWaiters();
    if (reply.code === 421) {
      // 421 closes the session (RFC 959 §4.2.1): forward it, then close after flushing.
      this.beginClose('server sent 421');
    }
  }

  private onUpstreamGone(reason: string): void {
    if (this.statusValue === 'closed') return;
    const expected = this.quitRequested || this.serverSaid421 || this.closeAfterFlush || this.clientEnded;
    this.failExpectations();
    if (!expected) {
      this.log.warn({ event: 'upstream-closed', code: 'FTPP_ERR_UPSTREAM_CLOSED', reason }, 'server closed the control connection');
      this.replies.append(replyLine(REPLY_FOR_CODE.FTPP_ERR_UPSTREAM_CLOSED));
    }
    this.beginClose(reason);
  }

  /** Nothing more will come from the server: settle whatever waits for it. */
  private failExpectations(): void {
    for (const expectation of this.expectations.splice(0)) {
      if (expectation.kind === 'internal') {
        if (expectation.timer) clearTimeout(expectation.timer);
        expectation.reject(new ProxyError('FTPP_ERR_SHUTDOWN', 'server connection gone'));
      } else {
        expectation.transfer?.channel.close('server connection gone');
        this.replies.end(expectation.slot);
      }
    }
    this.wakeTransferReplyWaiters();
  }

  /** A transfer command sent to the server still waits for its final reply. */
  private awaitsTransferReply(): boolean {
    return this.expectations.some((expectation) => expectation.kind === 'client' && expectation.transfer !== undefined);
  }

  /** Let deferred data setups go on once no transfer reply is outstanding (or nothing will come). */
  private wakeTransferReplyWaiters(): void {
    if (this.transferReplyWaiters.length === 0 || this.awaitsTransferReply()) return;
    for (const wake of this.transferReplyWaiters.splice(0)) wake();
  }

  // ---------------------------------------------------------------- flow control

  private updateClientFlow(): void {
    const busy = this.commandQueue.length >= Math.max(1, this.config.limits.maxQueuedCommands >> 1)
      || this.expectations.length >= this.config.limits.maxQueuedCommands;
    if (busy && !this.clientPaused) {
      this.clientPaused = true;
      this.client.pause();
    } else if (!busy && this.clientPaused && !this.closeAfterFlush) {
      this.clientPaused = false;
      this.client.resume();
    }
  }

  private updateUpstreamFlow(): void {
    const upstream = this.upstream;
    if (!upstream) return;
    const busy = this.replies.bufferedBytes + this.client.writableLength > REPLY_HIGH_WATER_BYTES;
    if (busy && !this.upstreamPaused) {
      this.upstreamPaused = true;
      upstream.pause();
    } else if (!busy && this.upstreamPaused) {
      this.upstreamPaused = false;
      upstream.resume();
    }
  }

  private writeClient(bytes: Buffer): void {
    if (this.client.destroyed || this.client.writableEnded) return;
    this.client.write(bytes);
  }

  private onRepliesChanged(): void {
    this.updateUpstreamFlow();
    if (this.closeAfterFlush && this.replies.isEmpty) this.finishClose();
  }

  // ---------------------------------------------------------------- timers

  private armIdleTimer(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.onIdle(), this.config.timeouts.idleMs);
  }

  private onIdle(): void {
    this.idleTimer = null;
    if (this.isFinished()) return;
    if (this.activeTransfers.size > 0) {
      // A long transfer keeps the control connection quiet; that is not idleness.
      this.armIdleTimer();
      return;
    }
    this.limitHit('idle-timeout', { code: 'FTPP_ERR_IDLE_TIMEOUT', idleMs: this.config.timeouts.idleMs });
    // Abandon, not a graceful close: if the server still owes a reply it is hung, and the
    // 421 must not wait behind that reply.
    this.abandon('idle timeout', REPLY_FOR_CODE.FTPP_ERR_IDLE_TIMEOUT);
  }

  // ---------------------------------------------------------------- closing

  /**
   * Give up on the server (it does not answer, or the proxy must stop now): drop the server
   * connection, settle every reply the client is still owed with nothing, and close with one
   * final `line`. Unlike beginClose, nothing waits for the server any more.
   */
  abandon(reason: string, line: string): void {
    if (this.isClosed()) return;
    const upstream = this.upstream;
    if (upstream && !upstream.destroyed) {
      upstream.on('error', () => {});
      upstream.destroy();
    }
    this.pendingDial?.cancel();
    this.failExpectations();
    this.beginClose(reason, line);
  }

  /** Tear down after a bounded time, whatever is still pending (a hung peer). */
  private armCloseDeadline(ms?: number): void {
    if (this.closeDeadline || this.isClosed()) return;
    const { transferReplyHoldMs, upstreamReplyMs } = this.config.timeouts;
    this.closeDeadline = setTimeout(() => {
      this.log.warn({ event: 'close-deadline' }, 'session did not finish closing in time; tearing down');
      this.teardown(this.closeReason || 'close deadline');
    }, ms ?? Math.max(transferReplyHoldMs, upstreamReplyMs) + CLOSE_GRACE_MS);
  }
  private closeDeadline: NodeJS.Timeout | null = null;

  /**
   * Stop taking commands, write every reply still owed (held ones included), then close.
   * `shutdown` with a reply line is how the server module drains sessions.
   */
  beginClose(reason: string, replyText?: string): void {
    if (this.statusValue === 'closed') return;
    if (replyText) this.replies.append(replyLine(replyText));
    if (this.closeAfterFlush) return;
    this.closeReason ||= reason;
    this.closeAfterFlush = true;
    this.statusValue = 'closing';
    this.armCloseDeadline();
    this.commandQueue.length = 0;
    this.client.pause();
    this.pendingDial?.cancel();
    this.releasePendingChannel('session closing');
    if (this.upstream && !this.upstream.destroyed && !this.quitRequested) this.upstream.end();
    if (this.replies.isEmpty) this.finishClose();
  }

  private finishClose(): void {
    if (this.statusValue === 'closed' || this.graceTimer) return;
    if (!this.client.destroyed) this.client.end();
    // Read (and drop) what the client still sends so its FIN closes the socket at once.
    this.client.resume();
    // Give the client a moment to read the last reply and close; then force it.
    this.graceTimer = setTimeout(() => this.teardown(this.closeReason || 'closed'), CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  /** Release everything. Idempotent; the first reason wins. */
  teardown(reason: string): void {
    if (this.statusValue === 'closed') return;
    this.statusValue = 'closed';
    this.closeReason ||= reason;
    for (const timer of [this.idleTimer, this.abortTimer, this.graceTimer, this.loginTimer, this.closeDeadline]) if (timer) clearTimeout(timer);
    this.idleTimer = this.abortTimer = this.graceTimer = this.loginTimer = this.closeDeadline = null;
    this.pendingDial?.cancel();
    this.resolveUpstreamReady(false);
    this.failExpectations();
    this.replies.clear();
    this.commandQueue.length = 0;
    this.releasePendingChannel('session closed');
    for (const channel of this.activeTransfers) channel.close('session closed');
    this.activeTransfers.clear();
    this.client.on('error', () => {});
    this.client.destroy();
    if (this.upstream) {
      this.upstream.on('error', () => {});
      this.upstream.destroy();
    }
    this.log.info({ event: 'session-end', reason: this.closeReason, durationMs: Date.now() - this.startedAt, transfers: this.transfers, user: this.user }, 'session end');
    this.deps.metrics.sessionClosed(this.config.name);
    this.deps.onClosed(this);
    this.resolveClosed();
  }
}

/** The server's own reply, passed to the client as the answer to PASV/PORT. */
class ServerReplyError extends Error {
  readonly reply: Reply;
  constructor(reply: Reply) {
    super(`server replied ${reply.code}`);
    this.reply = reply;
  }
}

function describeLeg(leg: UpstreamLeg): string {
  return leg.kind === 'passive' ? `passive ${leg.target.host}:${leg.target.port}` : `active port ${leg.accept.port}`;
}
