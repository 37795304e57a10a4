/**
 * One client session: the only module that knows both the FTP protocol and the sockets, and
 * the glue between the parts under session/ (like websocket.js in ws):
 *
 *   client ControlConnection -> CommandPipeline -> decideCommand (control/rewrite.ts)
 *     -> carryOut(): UpstreamExchange (forward, the proxy's own requests), DataSetup
 *        (PASV/EPSV/PORT/EPRT), Transfers (RETR/STOR...: hold, 426, records)
 *   server ControlConnection -> ReplyAssembler -> UpstreamExchange.dispatch -> ReplyQueue
 *     -> client (replies strictly in command order)
 *
 * The lifecycle is one state union (session/state.ts); every socket, timer and port is given
 * back by teardown(), which runs exactly once whatever the path.
 */
import type net from 'node:net';
import { describeCommandForLog, parseCommandLine, type ClientCommand } from './control/command.js';
import type { FramedLine } from './control/line-framer.js';
import { replyLine, type Reply } from './control/reply.js';
import { decideCommand, editFeatReply, type CommandDecision, type SessionView } from './control/rewrite.js';
import { familyOf, type Family } from './control/ip.js';
import { REPLY_FOR_CODE, type ErrorCode } from './errors.js';
import type { ListenerConfig } from './config/schema.js';
import { ReplyQueue } from './reply-queue.js';
import type { Logger } from './log.js';
import { ClientLeg } from './session/client-leg.js';
import { DataSetup } from './session/data-setup.js';
import { Transfers, type TransferContext } from './session/transfers.js';
import { SessionLifecycle, type ExpectedServerClose, type SessionState, type UpstreamControl } from './session/state.js';
import { ServerLeg, fixedTarget, type UpstreamTarget } from './session/server-leg.js';
import { ForwardGate, interfaceAddresses } from './session/forward-gate.js';
import { ForwardLogin } from './session/forward-login.js';
import { chooseTransparentTarget } from './session/transparent.js';
import { FORWARD_GREETING } from './control/pre-login.js';
import type { RejectionReason } from './metrics.js';
import { SessionTimeouts } from './session/timeouts.js';
import { ClientTls } from './session/client-tls.js';
import { isProxyError, type ProxyError } from './errors.js';

/** Pause reading the server while this much reply text waits for the client. */
const REPLY_HIGH_WATER_BYTES = 256 * 1024;
/** After a client FIN with no transfer running: how long pending server replies may take. */
const CLIENT_GONE_DEADLINE_MS = 4000;

import { limitReporter, proxyIdentity, type ProxyIdentity, type SessionDeps } from './session/types.js';

export type { SessionDeps, SessionEndpoints } from './session/types.js';

export class Session {
  readonly id: string;
  readonly clientIp: string;
  readonly controlFamily: Family;
  readonly startedAt = Date.now();
  /** Settles when teardown has run. */
  readonly closed: Promise<void>;
  private readonly deps: SessionDeps;
  private readonly config: ListenerConfig;
  private readonly log: Logger;
  private readonly lifecycle: SessionLifecycle;
  private readonly client: ClientLeg;
  private readonly replies: ReplyQueue;
  private readonly server: ServerLeg<TransferContext>;
  private readonly dataSetup: DataSetup;
  private readonly transfers: Transfers;
  /** The proxy's own addresses and names as this client may know them (SessionView, HOST). */
  private readonly own: ProxyIdentity;
  private epsvAll = false;
  private user: string | null = null;
  private readonly limitHit: (reason: RejectionReason, fields?: Record<string, unknown>) => void;
  private readonly timeouts: SessionTimeouts;
  /** TLS toward the client: what its leg negotiated, its control and data handshakes. */
  private readonly clientTls: ClientTls;
  /** Waiting for every reply owed to be written (AUTH: the 234 must be the last plain-text bytes). */
  private readonly flushWaiters: Array<() => void> = [];
  /** Forward mode: the login that chooses the server (null: fixed or transparent). */
  private readonly forward: ForwardLogin | null;
  /** The server this session dials or dialled (logs); null until known. */
  private upstreamLabel: string | null = null;
  private closeReason = '';
  private resolveClosed!: () => void;

  constructor(socket: net.Socket, deps: SessionDeps) {
    const { endpoints, config } = deps;
    this.id = deps.id;
    this.deps = deps;
    this.config = config;
    this.clientIp = endpoints.client.ip;
    this.controlFamily = familyOf(this.clientIp);
    this.own = proxyIdentity(endpoints, config);
    this.log = deps.log.child({ session: this.id, client: `${this.clientIp}:${endpoints.client.port}` });
    this.lifecycle = new SessionLifecycle(this.log);
    this.limitHit = limitReporter(deps.metrics, config.name, this.log);
    this.clientTls = new ClientTls(config.tls, config.timeouts.tlsHandshakeMs, this.log, {
      handshake: (channel, result) => deps.metrics.tlsHandshake(config.name, 'client', channel, result),
    });
    this.timeouts = new SessionTimeouts(config.timeouts, this.log, {
      busy: () => this.transfers.count > 0,
      finished: () => this.lifecycle.isFinished,
      abandon: (why, replyText) => this.abandon(why, replyText),
      teardown: (why) => this.teardown(why),
      limitHit: this.limitHit,
    });
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.client = new ClientLeg(socket, config, this.log, {
      execute: this.executeLine,
      activity: () => this.timeouts.activity(),
      close: (why, replyText) => this.beginClose(why, replyText),
      fin: this.onClientFin,
      gone: (why) => this.teardown(why),
      drained: this.updateUpstreamFlow,
      outstanding: () => this.server.exchange.outstanding,
      limitHit: this.limitHit,
    });
    this.replies = new ReplyQueue(this.writeClient, this.onRepliesChanged);
    this.server = new ServerLeg<TransferContext>(config, deps.metrics, this.log, this.replies, {
      connected: this.onServerConnected,
      unreachable: this.onServerUnreachable,
      replied: this.onServerReplied,
      lost: this.onServerLost,
      transferReply: (slot, transfer, reply) => this.transfers.finalReply(slot, transfer, reply),
      clientReply: this.onClientReply,
      timeout: this.onUpstreamTimeout,
      limitHit: this.limitHit,
    });
    const { selection } = config.upstream;
    this.forward = selection.kind === 'forward'
      ? new ForwardLogin({
        config,
        metrics: deps.metrics,
        log: this.log,
        replies: this.replies,
        server: this.server,
        gate: new ForwardGate({ policy: selection.policy, sessionAddresses: this.own.addresses, maxAttempts: config.limits.maxLoginAttempts, resolveMs: config.timeouts.upstreamConnectMs }),
      }, {
        view: () => this.view,
        carryOut: (command, decision) => this.carryOut(command, decision),
        finished: () => this.lifecycle.isFinished,
        open: () => this.lifecycle.state.kind === 'open',
        close: (why, replyText) => this.beginClose(why, replyText),
        limitHit: this.limitHit,
        chosen: (server, user) => {
          this.user = user.slice(0, 128);
          if (server) this.upstreamLabel = `${server.host}:${server.port}`;
        },
      })
      : null;
    // Deps are named field by field: on Node 20 an object literal that adds keys after a spread
    // (`{ ...deps, log, ... }`) takes V8's slow path, about 17 µs for each of these two.
    const { metrics, clientPool, upstreamPool, advertiser, kernelForwarder } = deps;
    this.dataSetup = new DataSetup({
      config,
      metrics,
      endpoints,
      clientPool,
      upstreamPool,
      advertiser,
      kernelForwarder,
      log: this.log,
      replies: this.replies,
      upstream: () => this.server.forData(() => this.lifecycle.isFinished),
      runningTransfers: () => this.transfers.count,
      isFinished: () => this.lifecycle.isFinished,
      limitHit: this.limitHit,
      dataProtected: () => this.clientTls.protectsData || this.server.tls !== null,
    });
    this.transfers = new Transfers({
      config,
      metrics,
      log: this.log,
      replies: this.replies,
      dataSetup: this.dataSetup,
      user: () => this.user,
      forward: (line, slot, transfer) => this.server.exchange.forward(line, slot, transfer ? { transfer } : {}),
      isFinished: () => this.lifecycle.isFinished,
      limitHit: this.limitHit,
      dataSecurity: () => ({ client: this.clientTls.dataLeg(), server: this.server.dataLeg() }),
    });
  }

  get state(): SessionState {
    return this.lifecycle.state;
  }

  get view(): SessionView {
    const state = this.lifecycle.state;
    return {
      controlFamily: this.controlFamily,
      clientIp: this.clientIp,
      epsvAll: this.epsvAll,
      allowNatFixup: this.config.client.portNatFixup,
      loggedIn: state.kind === 'open' && state.loggedIn,
      ownAddresses: this.own.addresses,
      ownNames: this.own.names,
      protection: this.clientTls.protection,
    };
  }

  /** Begin: connect upstream (or greet, in forward mode), start reading the client. */
  start(): void {
    const { endpoints } = this.deps;
    this.log.info({ event: 'session-start', listener: this.config.name, local: `${endpoints.local.ip}:${endpoints.local.port}`, dialled: `${endpoints.dialled.ip}:${endpoints.dialled.port}` }, 'session start');
    this.deps.metrics.sessionOpened(this.config.name);
    // The greeting is the reply to "connecting" (RFC 959 §5.4: 120 then 220, or 220, or 421);
    // in forward mode it is the proxy's own (begin()), the server's comes with the reply to USER.
    if (!this.forward) this.server.exchange.expect(this.replies.open());
    this.timeouts.start();
    if (this.clientTls.isImplicit) {
      void this.startImplicitTls();
      return;
    }
    this.begin();
    if (endpoints.initialData) this.client.connection.feed(endpoints.initialData);
    this.client.connection.start();
  }

  /** Dial the server (fixed, or the original destination), or wait for the client to name it (forward). */
  private begin(): void {
    if (this.forward) {
      // After the implicit handshake, if any: nothing goes out in clear text on port 990.
      this.replies.append(replyLine(FORWARD_GREETING));
      this.client.pipeline.start();
      return;
    }
    const target = this.initialTarget();
    if (!target) return;
    this.upstreamLabel = `${target.host}:${target.port}`;
    this.server.connect(target);
  }

  /** The configured server, or under interception the original destination if the policy allows it (else 421 and close). */
  private initialTarget(): UpstreamTarget | null {
    const { selection } = this.config.upstream;
    if (selection.kind !== 'transparent') return fixedTarget(this.config);
    const original = this.deps.endpoints.original ?? { kind: 'unavailable', reason: 'no original destination was read' };
    const choice = chooseTransparentTarget(original, selection.policy, [...this.own.addresses, ...interfaceAddresses()]);
    if (choice.ok) {
      this.deps.metrics.upstreamChoice(this.config.name, 'transparent', 'ok');
      this.log.info({ event: 'upstream-chosen', mode: 'transparent', upstream: `${choice.target.address}:${choice.target.port}` }, 'intercepted connection: server chosen');
      return choice.target;
    }
    this.deps.metrics.upstreamChoice(this.config.name, 'transparent', choice.result);
    this.log.warn({ event: 'upstream-refused', mode: 'transparent', code: choice.code, result: choice.result, reason: choice.reason, ...(original.kind === 'redirected' ? { original: `${original.ip}:${original.port}` } : {}) }, 'intercepted connection refused');
    this.server.exchange.answerInstead(replyLine(REPLY_FOR_CODE[choice.code]));
    this.beginClose('destination refused');
    return null;
  }

  /**
   * Implicit FTPS (port 990, protocol.md §5.2): the handshake comes first (after a PROXY
   * header, whose trailing bytes are the ClientHello's start), the server is dialled only
   * once the client has proven it speaks TLS, and its 220 then goes out encrypted.
   */
  private async startImplicitTls(): Promise<void> {
    if (!(await this.secureClientControl(this.deps.endpoints.initialData))) return;
    this.begin();
  }

  /** The client's control TLS handshake; on failure the session is over (no reply can reach it). */
  private async secureClientControl(alreadyRead: Buffer | null): Promise<boolean> {
    try {
      await this.clientTls.secureControl(this.client.connection, alreadyRead);
    } catch (err) {
      const code = isProxyError(err) ? err.code : 'FTPP_ERR_TLS_HANDSHAKE';
      this.log.warn({ event: 'tls-handshake-failed', code, leg: 'client', err: (err as Error).message }, 'client TLS handshake failed');
      this.teardown('client TLS handshake failed');
      return false;
    }
    return !this.lifecycle.isFinished;
  }

  /**
   * AUTH TLS (RFC 4217 §4): every reply owed goes out first, then the 234 as the last
   * plain-text bytes, then the handshake on the same socket. Lines the client pipelined
   * behind AUTH are dropped: nothing sent in clear after AUTH may run once it is protected.
   */
  private async startTls(line: string, prot: 'C' | 'P'): Promise<void> {
    await this.repliesFlushed();
    if (this.lifecycle.isFinished) return;
    this.replies.append(replyLine(line));
    const dropped = this.client.pipeline.dropQueued();
    if (dropped > 0) this.log.info({ event: 'auth-pipelined-dropped', lines: dropped }, 'commands sent after AUTH before the handshake were dropped');
    if (await this.secureClientControl(null)) this.clientTls.setProt(prot);
  }

  private repliesFlushed(): Promise<void> {
    if (this.replies.isEmpty) return Promise.resolve();
    return new Promise((resolve) => this.flushWaiters.push(resolve));
  }

  // ---------------------------------------------------------------- the client's side

  /** The client half-closed its control connection: answer what it asked, then close. */
  private readonly onClientFin = (): void => {
    this.log.debug({ event: 'client-fin' }, 'client closed its side');
    // A server that never answers nor closes must not keep the session forever. A client
    // that hung up without a transfer running has little left to wait for: a short deadline.
    this.timeouts.closing(this.transfers.count > 0 ? undefined : CLIENT_GONE_DEADLINE_MS);
    const state = this.lifecycle.state;
    if (state.kind === 'connecting' && this.forward) {
      // Forward mode, no server yet: answer what was asked (a login in flight is given up).
      this.beginClose('client ended');
    } else if (state.kind === 'connecting') {
      this.lifecycle.transition({ kind: 'connecting', clientFin: true });
    } else if (state.kind === 'open') {
      // The server's close that follows is the one the proxy asks for: not a failure, no 421.
      this.expectServerClose('client-fin');
      if (state.upstream.connection.isClosed) this.beginClose('client ended');
      else state.upstream.connection.end();
    }
  };

  private readonly executeLine = async (line: FramedLine): Promise<void> => {
    const parsed = parseCommandLine(line.text);
    if (!parsed.ok) {
      // CR/LF/NUL inside an argument is a bad parameter (501); anything else is not a command.
      this.replies.append(replyLine(REPLY_FOR_CODE[parsed.reason === 'bad-argument' ? 'FTPP_ERR_BAD_ARGUMENT' : 'FTPP_ERR_BAD_COMMAND']));
      return;
    }
    const command = parsed.command;
    this.log.debug({ event: 'command', command: describeCommandForLog(command) }, 'command');
    // Forward mode: everything until the server is chosen, and every USER (user@host).
    if (this.forward && (!this.forward.chosen || command.verb === 'USER')) return this.forward.execute(command);
    if (command.verb === 'USER') this.user = command.argument.slice(0, 128);
    if (command.verb === 'QUIT') this.expectServerClose('quit');
    await this.carryOut(command, decideCommand(command, this.view));
  };

  /** The one switch that carries out what control/rewrite.ts decided. */
  private async carryOut(command: ClientCommand, decision: CommandDecision): Promise<void> {
    switch (decision.kind) {
      case 'forward':
        this.server.exchange.forward(command.line, this.replies.open());
        return;
      case 'feat': {
        const tlsOffered = this.config.tls !== null;
        this.server.exchange.forward(command.line, this.replies.open(), { transform: (reply) => editFeatReply(reply, tlsOffered) });
        return;
      }
      case 'start-tls':
        await this.startTls(decision.line, decision.prot);
        return;
      case 'protection':
        // PBSZ/PROT are this leg's own (protocol.md §5.3); the server's leg has its own.
        if (decision.prot) this.clientTls.setProt(decision.prot);
        this.replies.append(replyLine(decision.line));
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
        this.dataSetup.releasePending('EPSV ALL');
        this.replies.append(replyLine('200 EPSV ALL command successful.'));
        return;
      case 'abort':
        // Node cannot send urgent data either, so the proxy aborts the transfer itself: reset
        // both legs, then send a plain ABOR; the server's 426/225/226 pass through in order (§3.4).
        this.transfers.abortAll();
        this.dataSetup.releasePending('ABOR');
        this.server.exchange.forward(Buffer.from('ABOR'), this.replies.open());
        return;
      case 'passive':
        await this.dataSetup.passive(decision.style);
        return;
      case 'active':
        await this.dataSetup.active(decision.style, decision.target, decision.via);
        return;
      case 'transfer':
        await this.transfers.start(command, decision.direction);
        return;
    }
  }

  // ---------------------------------------------------------------- the server's side

  private readonly onServerConnected = (upstream: UpstreamControl): void => {
    const state = this.lifecycle.state;
    if (state.kind !== 'connecting') {
      upstream.connection.abort();
      return;
    }
    this.lifecycle.transition({ kind: 'open', upstream, loggedIn: false, serverCloseExpected: state.clientFin ? 'client-fin' : null });
    upstream.connection.start();
    this.client.pipeline.start();
    // The client hung up while we dialled: what it sent goes out first, then our FIN.
    if (state.clientFin) void Promise.resolve().then(() => upstream.connection.end());
  };

  private readonly onServerUnreachable = (err: ProxyError): void => {
    if (this.lifecycle.state.kind !== 'connecting') return;
    // The greeting is the reply owed first: the 421 answers "connecting" (RFC 959 §5.4).
    this.server.exchange.answerInstead(replyLine(REPLY_FOR_CODE[err.code]));
    this.beginClose(err.code === 'FTPP_ERR_UPSTREAM_TLS' ? 'upstream TLS failed' : 'upstream unreachable');
  };

  private readonly onServerReplied = (reply: Reply): void => {
    this.client.updateFlow();
    if (reply.code !== 421) return;
    // 421 closes the session (RFC 959 §4.2.1): forward it, then close after flushing.
    this.expectServerClose('server-421');
    this.beginClose('server sent 421');
  };

  private readonly onClientReply = (reply: Reply): void => {
    const state = this.lifecycle.state;
    if (reply.code !== 230 || state.kind !== 'open' || state.loggedIn) return;
    this.lifecycle.transition({ ...state, loggedIn: true });
    this.timeouts.loggedIn();
  };

  private readonly onUpstreamTimeout = (command: string, waitedMs: number): void => {
    this.log.warn({ event: 'upstream-timeout', code: 'FTPP_ERR_UPSTREAM_TIMEOUT', command, waitedMs }, 'server did not answer');
    this.abandon('upstream reply timeout', REPLY_FOR_CODE.FTPP_ERR_UPSTREAM_TIMEOUT);
  };

  private readonly onServerLost = (reason: string, code: ErrorCode | null, orphans: TransferContext[]): void => {
    const state = this.lifecycle.state;
    if (state.kind === 'closed') return;
    for (const transfer of orphans) transfer.channel.close('server connection gone');
    if (code) return this.beginClose(reason, REPLY_FOR_CODE[code]);
    const expected = state.kind === 'closing' || (state.kind === 'open' && state.serverCloseExpected !== null);
    if (!expected) this.log.warn({ event: 'upstream-closed', code: 'FTPP_ERR_UPSTREAM_CLOSED', reason }, 'server closed the control connection');
    this.beginClose(reason, expected ? undefined : REPLY_FOR_CODE.FTPP_ERR_UPSTREAM_CLOSED);
  };

  /** The server's close, when it comes, is one the session asked for (QUIT, our FIN) or was told of (421). */
  private expectServerClose(why: ExpectedServerClose): void {
    const state = this.lifecycle.state;
    if (state.kind === 'open' && state.serverCloseExpected === null) this.lifecycle.transition({ ...state, serverCloseExpected: why });
  }

  /** Nothing more will come from the server: settle whatever waits for it. */
  private failExpectations(): void {
    for (const transfer of this.server.failAll()) transfer.channel.close('server connection gone');
  }

  // ---------------------------------------------------------------- flow control

  private readonly updateUpstreamFlow = (): void => {
    this.lifecycle.upstream?.connection.holdWhile('backlog', this.replies.bufferedBytes + this.client.connection.writableLength > REPLY_HIGH_WATER_BYTES);
  };

  private readonly writeClient = (bytes: Buffer): void => {
    this.client.connection.write(bytes);
  };

  private readonly onRepliesChanged = (): void => {
    this.updateUpstreamFlow();
    if (this.replies.isEmpty) for (const resolve of this.flushWaiters.splice(0)) resolve();
    if (this.lifecycle.state.kind === 'closing' && this.replies.isEmpty) this.finishClose();
  };

  // ---------------------------------------------------------------- closing

  /**
   * Give up on the server (it does not answer, or the proxy must stop now): drop the server
   * connection, settle every reply the client is still owed with nothing, and close with one
   * final `line`. Unlike beginClose, nothing waits for the server any more.
   */
  abandon(reason: string, line: string): void {
    if (this.lifecycle.isClosed) return;
    this.server.abandon();
    this.failExpectations();
    this.beginClose(reason, line);
  }

  /**
   * Stop taking commands, write every reply still owed (held ones included), then close.
   * `shutdown` with a reply line is how the server module drains sessions.
   */
  beginClose(reason: string, replyText?: string): void {
    const state = this.lifecycle.state;
    if (state.kind === 'closed') return;
    if (replyText) this.replies.append(replyLine(replyText));
    if (state.kind === 'closing') return;
    this.closeReason ||= reason;
    const upstream = this.lifecycle.upstream;
    const quitSent = state.kind === 'open' && state.serverCloseExpected === 'quit';
    this.lifecycle.transition({ kind: 'closing', upstream, why: this.closeReason });
    this.timeouts.closing();
    this.client.stop();
    this.server.cancel();
    this.dataSetup.releasePending('session closing');
    // After QUIT the server closes by itself once its 221 is out.
    if (upstream && !quitSent) upstream.connection.end();
    if (this.replies.isEmpty) this.finishClose();
  }

  private finishClose(): void {
    // Give the client a moment to read the last reply and close; then force it.
    if (this.lifecycle.isClosed || !this.timeouts.grace()) return;
    this.client.connection.end();
    // Read (and drop) what the client still sends so its FIN closes the socket at once.
    this.client.connection.discardInput();
  }

  /** Release everything. Idempotent; the first reason wins. */
  teardown(reason: string): void {
    this.closeReason ||= reason;
    if (!this.lifecycle.transition({ kind: 'closed', why: this.closeReason })) return;
    this.timeouts.stopAll();
    this.server.abandon();
    this.client.pipeline.stop();
    this.failExpectations();
    this.replies.clear();
    this.dataSetup.releasePending('session closed');
    this.transfers.closeAll('session closed');
    this.client.connection.abort();
    for (const resolve of this.flushWaiters.splice(0)) resolve();
    this.log.info({ event: 'session-end', reason: this.closeReason, durationMs: Date.now() - this.startedAt, upstream: this.upstreamLabel, transfers: this.transfers.completed, user: this.user, clientTls: this.clientTls.version, serverTls: this.server.tls?.version ?? null }, 'session end');
    this.deps.metrics.sessionClosed(this.config.name);
    this.deps.onClosed(this);
    this.resolveClosed();
  }
}
