/**
 * Data-channel setup for one session, on both legs: the client's PASV/EPSV (a leased relay
 * port, or a kernel mapping) or PORT/EPRT (the proxy dials the client), and the server's side
 * opened at once, not at transfer time, so REST stays right before RETR/STOR (RFC 959 §4.1.3,
 * protocol.md §2.4): EPSV (PASV fallback) toward the server, or PORT/EPRT from an activePorts
 * lease. Holds the one pending channel until a transfer command takes it.
 */
import type net from 'node:net';
import { formatEprtArgument, formatEpsvReply, formatPasvReply, formatPortArgument, type HostPort } from '../control/address.js';
import { familyOf } from '../control/ip.js';
import type { ActiveTargetSource } from '../control/policy.js';
import { replyLine, type Reply } from '../control/reply.js';
import { interpretUpstreamPassiveReply } from '../control/rewrite.js';
import { DataChannel, type ForwardedLeg, type UpstreamLeg } from '../data/channel.js';
import { dial, type Dial } from '../data/dial.js';
import type { KernelForward } from '../data/kernel-forward.js';
import { kernelPathBlocker, type ForwardMapping } from '../data/kernel-nft.js';
import { PassiveAccept } from '../data/passive.js';
import { relayPortsPerIpCap, type PortLease, type PortPool } from '../data/port-pool.js';
import type { SessionDeps } from './types.js';
import { resetSocket } from '../data/relay.js';
import { describePeer, type SocketAddresses } from '../data/socket-address.js';
import { ProxyError, REPLY_FOR_CODE, ServerReplyError, isProxyError } from '../errors.js';
import type { Logger } from '../log.js';
import type { RejectionReason } from '../metrics.js';
import type { ReplyQueue } from '../reply-queue.js';

/** What data setup uses of the server's control connection. */
export interface UpstreamForData {
  /** The server's control address (data is dialled there, never to a 227's) and ours toward it. */
  readonly addresses: SocketAddresses;
  /** Send a command of the proxy's own; resolves with the server's final reply. */
  request(command: string): Promise<Reply>;
  /** A transfer command still waits for its final reply (the server reads no command meanwhile). */
  readonly awaitsTransferReply: boolean;
  transferRepliesSettled(): Promise<void>;
}

export interface DataSetupDeps extends Pick<SessionDeps, 'config' | 'metrics' | 'endpoints' | 'clientPool' | 'upstreamPool' | 'advertiser' | 'kernelForwarder'> {
  /** The session's logger. */
  readonly log: Logger;
  readonly replies: ReplyQueue;
  /** The server's control connection, while the session takes work. */
  readonly upstream: () => UpstreamForData | null;
  /** Data channels carrying a transfer now (for maxDataChannelsPerSession). */
  readonly runningTransfers: () => number;
  /** The session stopped taking work: whatever is set up now is thrown away. */
  readonly isFinished: () => boolean;
  readonly limitHit: (reason: RejectionReason, fields: Record<string, unknown>) => void;
  /** Either leg's data connections are TLS now (PROT P): the kernel path cannot carry them. */
  readonly dataProtected: () => boolean;
}

export class DataSetup {
  private readonly deps: DataSetupDeps;
  /** The client's real address; the control socket's local address; what the client dialled. */
  private readonly clientIp: string;
  private readonly localIp: string;
  private readonly dialledIp: string;
  private pending: DataChannel | null = null;
  /** The server's passive port, dialled as soon as its 229/227 came (per pending channel). */
  private readonly earlyDials = new WeakMap<DataChannel, Dial>();
  /** The server refused EPSV once: PASV for the rest of the session. */
  private upstreamLacksEpsv = false;

  constructor(deps: DataSetupDeps) {
    this.deps = deps;
    this.clientIp = deps.endpoints.client.ip;
    this.localIp = deps.endpoints.local.ip;
    this.dialledIp = deps.endpoints.dialled.ip;
  }

  /** PASV or EPSV from the client: lease a relay port, open the server's side, answer 227/229. */
  async passive(style: 'pasv' | 'epsv'): Promise<void> {
    const { replies, advertiser, log } = this.deps;
    const slot = replies.open();
    this.releasePending(`new ${style.toUpperCase()}`);
    try {
      this.checkChannelLimit();
      let advertised: string | null = null;
      if (style === 'pasv') {
        advertised = await advertiser.addressFor(this.clientIp, this.dialledIp);
        if (!advertised) throw new ProxyError('FTPP_ERR_ADVERTISE_UNRESOLVED', `no IPv4 address to advertise (${advertiser.lastError?.message ?? 'control connection is not IPv4'})`);
      }
      const lease = await this.leaseRelayPort(this.deps.clientPool, this.localIp);
      // Until the 227/229 goes out nobody has a reason to connect here: refuse anyone who does.
      lease.setConnectionHandler((socket) => this.refuseStranger(lease.port, socket, 'early'));
      const upstreamLeg = await this.prepareUpstreamLeg('passive').catch((err: unknown) => {
        lease.release();
        throw err;
      });
      if (this.deps.isFinished()) {
        lease.release();
        discardUpstreamLeg(upstreamLeg);
        return;
      }
      const kernel = this.kernelMayCarry('passive', upstreamLeg.kind === 'passive' ? 'passive' : 'active');
      const forward = kernel && upstreamLeg.kind === 'passive'
        ? await this.mapInKernel({
            opener: 'client',
            openerIp: this.clientIp,
            proxyIp: this.localIp,
            proxyPort: lease.port,
            targetIp: upstreamLeg.target.host,
            targetPort: upstreamLeg.target.port,
            snatIp: kernel.proxyServerSideIp,
          })
        : null;
      if (this.deps.isFinished()) {
        // The session ended while nftables added the mapping.
        forward?.remove();
        lease.release();
        discardUpstreamLeg(upstreamLeg);
        return;
      }
      if (forward) {
        // The kernel carries the connection; one reaching our listener missed the mapping.
        lease.setConnectionHandler((socket) => this.refuseStranger(lease.port, socket, 'unmapped'));
        this.pending = new DataChannel({ kind: 'forwarded', lease, forward }, upstreamLeg);
      } else {
        this.pending = new DataChannel({ kind: 'passive', accept: this.passiveAccept(lease) }, upstreamLeg);
        this.dialServerEarly(this.pending);
      }
      log.debug({ event: 'data-passive', port: lease.port, upstream: describeLeg(upstreamLeg), dataPath: forward ? 'kernel' : 'relay' }, 'passive channel ready');
      replies.push(slot, replyLine(style === 'pasv' ? formatPasvReply(advertised!, lease.port) : formatEpsvReply(lease.port)));
    } catch (err) {
      replies.push(slot, this.failureReply(err, style.toUpperCase()));
    } finally {
      replies.end(slot);
    }
  }

  /** PORT or EPRT from the client: open the server's side, answer 200; the client is dialled at transfer time. */
  async active(style: 'port' | 'eprt', target: HostPort, via: ActiveTargetSource): Promise<void> {
    const { replies, log } = this.deps;
    const slot = replies.open();
    // PASV then PORT: PORT wins (vsftpd handle_port runs pasv_cleanup; protocol.md §3.5).
    this.releasePending(`new ${style.toUpperCase()}`);
    const where = `${target.host}:${target.port}`;
    if (via === 'nat-fixup') log.info({ event: 'port-nat-fixup', target: where }, 'client sent an unroutable address; using its real address');
    if (via === 'unspecified') log.debug({ event: 'port-unspecified', target: where }, 'client sent the unspecified address; using its real address');
    try {
      this.checkChannelLimit();
      const upstreamLeg = await this.prepareUpstreamLeg('active', target);
      if (this.deps.isFinished()) {
        discardUpstreamLeg(upstreamLeg);
        return;
      }
      this.pending = new DataChannel({ kind: 'active', target }, upstreamLeg);
      this.dialServerEarly(this.pending);
      log.debug({ event: 'data-active', target: where, upstream: describeLeg(upstreamLeg), dataPath: upstreamLeg.kind === 'forwarded' ? 'kernel' : 'relay' }, 'active channel ready');
      // 200 only now that the server side is ready (so REST stays right before the transfer).
      replies.push(slot, replyLine(`200 ${style === 'port' ? 'PORT' : 'EPRT'} command successful.`));
    } catch (err) {
      replies.push(slot, this.failureReply(err, style.toUpperCase()));
    } finally {
      replies.end(slot);
    }
  }

  /** The pending channel, now the transfer command's (null: no PASV/PORT came first). */
  take(): DataChannel | null {
    const channel = this.pending;
    this.pending = null;
    return channel;
  }

  releasePending(reason: string): void {
    const channel = this.pending;
    this.pending = null;
    channel?.close(reason);
  }

  /**
   * The channel's outbound legs connected (the server's passive port, dialled at PASV/PORT
   * time; the client's PORT address, dialled now) before the transfer command goes upstream:
   * if either cannot be reached, the command is never sent (protocol.md §8.14). Rejects with a
   * ProxyError (FTPP_ERR_DATA_CONNECT).
   */
  async connectOutbound(channel: DataChannel): Promise<{ clientSocket: net.Socket | null; upstreamSocket: net.Socket | null }> {
    const { dataConnectMs } = this.deps.config.timeouts;
    const { clientLeg } = channel;
    const upstreamDial = this.earlyDials.get(channel) ?? null;
    const clientDial = clientLeg.kind === 'active' && !channel.isForwarded
      ? channel.track(dial({
          host: clientLeg.target.host,
          port: clientLeg.target.port,
          localAddress: this.localIp,
          // Firewalls in front of active-mode clients may admit only source port 20 (vsftpd connect_from_port_20).
          localPort: this.deps.config.client.dataSourcePort,
          timeoutMs: dataConnectMs,
        }))
      : null;
    const [upstreamSocket, clientSocket] = await Promise.all([upstreamDial?.connected ?? null, clientDial?.connected ?? null]);
    return { clientSocket, upstreamSocket };
  }

  /**
   * Dial the server's passive port now, not at the transfer command: the connection waits in
   * the server's accept queue (vsftpd accepts it at RETR/STOR, as it would a client's that
   * connects right after the 227), and the transfer does not wait for a TCP handshake to the
   * server (issue #14: ~0.4 ms per transfer through the relay). A TLS data leg still starts its
   * handshake at the transfer (DataChannel.pair): its deadline must not run while the client
   * thinks. A failed dial is reported at the transfer, like a late one.
   */
  private dialServerEarly(channel: DataChannel): void {
    const { upstreamLeg } = channel;
    const upstream = this.deps.upstream();
    if (upstreamLeg.kind !== 'passive' || channel.isForwarded || !upstream) return;
    const { host, port } = upstreamLeg.target;
    this.earlyDials.set(channel, channel.track(dial({ host, port, localAddress: upstream.addresses.local.ip, timeoutMs: this.deps.config.timeouts.dataConnectMs })));
  }

  /** The reply a failed setup or outbound connect gives the client (empty while closing: the session says it once). */
  failureReply(err: unknown, what: string): Buffer {
    const { log } = this.deps;
    if (err instanceof ServerReplyError) return err.raw;
    if (isProxyError(err)) {
      if (err.code === 'FTPP_ERR_SHUTDOWN') {
        log.debug({ event: 'data-setup-failed', code: err.code, command: what, err: err.message }, 'data channel setup abandoned');
        return Buffer.alloc(0);
      }
      log.warn({ event: 'data-setup-failed', code: err.code, command: what, err: err.message }, 'data channel setup failed');
      return replyLine(REPLY_FOR_CODE[err.code]);
    }
    log.error({ event: 'data-setup-failed', command: what, err }, 'data channel setup failed');
    return replyLine(REPLY_FOR_CODE.FTPP_ERR_DATA_CONNECT);
  }

  /** Refuse a new data channel when the session already runs as many as allowed. */
  private checkChannelLimit(): void {
    const running = this.deps.runningTransfers();
    const max = this.deps.config.limits.maxDataChannelsPerSession;
    if (running >= max) {
      this.deps.limitHit('passive-listeners', { code: 'FTPP_ERR_TOO_MANY_DATA_CHANNELS', max });
      throw new ProxyError('FTPP_ERR_TOO_MANY_DATA_CHANNELS', `${running} data channels already open`);
    }
  }

  /** A relay port bound on `host`, counted against this client address's share of `pool`. */
  private async leaseRelayPort(pool: PortPool, host: string): Promise<PortLease> {
    const { first, last } = pool.range;
    const max = relayPortsPerIpCap(this.deps.config.limits.maxRelayPortsPerIp, last - first + 1);
    try {
      return await pool.lease(host, this.clientIp, max);
    } catch (err) {
      if (isProxyError(err, 'FTPP_ERR_RELAY_PORTS_PER_IP')) this.deps.limitHit('relay-ports-per-ip', { code: err.code, max, range: `${first}-${last}` });
      throw err;
    }
  }

  /** The one-shot accept of a relayed passive channel: only the control client may connect. */
  private passiveAccept(lease: PortLease): PassiveAccept {
    const { config, log } = this.deps;
    const pp = config.proxyProtocol;
    return new PassiveAccept(lease, {
      expectedIp: this.clientIp,
      timeoutMs: config.timeouts.dataAcceptMs,
      ...(pp.dataPorts && pp.accept !== 'off' ? { proxyHeader: { accept: pp.accept, from: pp.from.map((rule) => rule.cidr), timeoutMs: pp.timeoutMs } } : {}),
      onStranger: (address, port) => this.noteStranger(lease.port, `${address}:${port}`),
      onPeerGone: () => log.debug({ event: 'data-peer-gone', port: lease.port }, 'data connection reset before it could be checked; dropped'),
    });
  }

  /** A connection on a leased port nobody expected at this point (the kernel path's, or too early). */
  private refuseStranger(port: number, socket: net.Socket, when: 'early' | 'unmapped'): void {
    this.noteStranger(port, describePeer(socket), when);
    resetSocket(socket);
  }

  private noteStranger(port: number, from: string, when?: 'early' | 'unmapped'): void {
    this.deps.metrics.dataStranger(this.deps.config.name);
    // `unmapped`: not necessarily a stranger: the expected peer too, once its mapping expired (dataAcceptSeconds).
    const message = when === 'unmapped' ? 'refused data connection that missed its kernel mapping (another address, or the mapping expired)' : 'refused data connection from another address';
    this.deps.log.warn({ event: 'data-stranger', port, from, ...(when ? { when } : {}) }, message);
  }

  /**
   * `client.dataPath: kernel` (or `auto` where the host allows it): whether the kernel may
   * carry a data channel of these modes (kernel-forward.ts). Null when the relay carries it:
   * the path is off here, or the channel is not one the kernel can carry (a fallback, logged
   * and counted by reason); else the server control connection's addresses it maps between.
   */
  private kernelMayCarry(clientMode: 'passive' | 'active', upstreamMode: 'passive' | 'active'): { readonly proxyServerSideIp: string } | null {
    const { kernelForwarder: forwarder, config, metrics, log } = this.deps;
    const upstream = this.deps.upstream();
    // `auto` without a forwarder: the host could not have the kernel path (logged at start).
    if (config.client.dataPath === 'relay' || !forwarder || !upstream) return null;
    const proxyServerSideIp = upstream.addresses.local.ip;
    const blocker = kernelPathBlocker({
      clientMode,
      upstreamMode,
      clientIp: this.clientIp,
      proxyClientSideIp: this.localIp,
      serverIp: upstream.addresses.remote.ip,
      proxyServerSideIp,
      proxyProtocol: config.proxyProtocol.accept !== 'off',
      tls: this.deps.dataProtected(),
      dataSourcePort: config.client.dataSourcePort,
      familyBlocked: forwarder.familyBlocked,
    });
    if (!blocker) return { proxyServerSideIp };
    log.debug({ event: 'kernel-path-skipped', reason: blocker.reason, detail: blocker.detail }, 'data channel relayed');
    metrics.kernelMapping(config.name, 'skipped');
    metrics.kernelFallback(config.name, blocker.reason);
    return null;
  }

  /** Install a mapping kernelMayCarry allowed; null when nftables refused it (logged and counted; the relay works). */
  private async mapInKernel(mapping: ForwardMapping): Promise<KernelForward | null> {
    const { kernelForwarder: forwarder, config, metrics, log } = this.deps;
    try {
      const forward = await forwarder!.forward(mapping, config.timeouts.dataAcceptMs);
      metrics.kernelMapping(config.name, 'added');
      return forward;
    } catch (err) {
      metrics.kernelMapping(config.name, 'failed');
      metrics.kernelFallback(config.name, 'failed');
      log.warn({ event: 'kernel-path-failed', code: isProxyError(err) ? err.code : 'FTPP_ERR_KERNEL_PATH', err: (err as Error).message }, 'kernel mapping failed; relaying this data channel');
      return null;
    }
  }

  /** Open the server's side of a data channel (EPSV, PASV fallback, or PORT/EPRT from activePorts). */
  private async prepareUpstreamLeg(clientMode: 'passive' | 'active', clientTarget: HostPort | null = null): Promise<UpstreamLeg> {
    const { config, log } = this.deps;
    let upstream = this.deps.upstream();
    if (upstream?.awaitsTransferReply) {
      // vsftpd reads no command while it sends or receives a file: the proxy's own EPSV/PASV/
      // PORT would go unanswered until the transfer's final reply and, after
      // upstreamReplySeconds, kill the session and the transfer with it (issue #10). Do what
      // the server does: set this channel up after that reply (the client's reply slot is
      // already reserved, so replies stay in order).
      log.debug({ event: 'data-setup-deferred' }, 'data setup waits for the running transfer\'s final reply');
      await upstream.transferRepliesSettled();
      upstream = this.deps.upstream();
    }
    if (!upstream || this.deps.isFinished()) throw new ProxyError('FTPP_ERR_SHUTDOWN', 'session closing');
    const mode = config.upstream.dataMode === 'mirror' ? clientMode : config.upstream.dataMode;
    const { remote: { ip: serverIp }, local: { ip: localIp } } = upstream.addresses;
    if (mode === 'passive') {
      let verb: 'EPSV' | 'PASV' = this.upstreamLacksEpsv ? 'PASV' : 'EPSV';
      let reply = await upstream.request(verb);
      let result = interpretUpstreamPassiveReply(reply, verb);
      if (!result.ok && result.reason === 'unsupported' && verb === 'EPSV') {
        // Server without EPSV (or refusing it): fall back to PASV for the rest of the session.
        this.upstreamLacksEpsv = true;
        verb = 'PASV';
        reply = await upstream.request(verb);
        result = interpretUpstreamPassiveReply(reply, verb);
      }
      // The 227 address is ignored: connect to the server's control address (protocol.md §2.4).
      if (!result.ok) throw upstreamSetupError(reply, verb, result.reason);
      // A PORT client with a listening server: only the relay can join them (counted).
      if (clientMode === 'active') this.kernelMayCarry('active', 'passive');
      return { kind: 'passive', target: { host: serverIp, port: result.port } };
    }
    const pool = this.deps.upstreamPool;
    if (!pool) throw new ProxyError('FTPP_ERR_UPSTREAM_DATA_SETUP', 'dataMode needs upstream.activePorts');
    const lease = await this.leaseRelayPort(pool, localIp);
    // Until the PORT/EPRT goes out nobody has a reason to connect here (the mapping may take
    // a few event-loop turns: nftables runs off the loop).
    lease.setConnectionHandler((socket) => this.refuseStranger(lease.port, socket, 'early'));
    // A PORT client: the server's connection to our port can go straight to the client.
    const forward = clientTarget && this.kernelMayCarry('active', 'active')
      ? await this.mapInKernel({
          opener: 'server',
          openerIp: serverIp,
          proxyIp: localIp,
          proxyPort: lease.port,
          targetIp: clientTarget.host,
          targetPort: clientTarget.port,
          snatIp: this.localIp,
        })
      : null;
    if (forward) return this.sendActiveCommand(upstream, { kind: 'forwarded', lease, forward }, localIp);
    const accept = new PassiveAccept(lease, {
      expectedIp: serverIp,
      timeoutMs: config.timeouts.dataAcceptMs,
      onStranger: (address, port) => log.warn({ event: 'data-stranger', port: lease.port, from: `${address}:${port}`, side: 'upstream' }, 'refused data connection that is not from the server'),
    });
    return this.sendActiveCommand(upstream, { kind: 'active', accept }, localIp);
  }

  /** PORT/EPRT toward the server naming the leg's leased port; the leg is discarded when that fails. */
  private async sendActiveCommand(upstream: UpstreamForData, leg: Extract<UpstreamLeg, { kind: 'active' | 'forwarded' }>, localIp: string): Promise<UpstreamLeg> {
    const port = leg.kind === 'active' ? leg.accept.port : leg.lease.port;
    // The kernel carries the server's connection; one reaching our listener missed the mapping.
    if (leg.kind === 'forwarded') leg.lease.setConnectionHandler((socket) => this.refuseStranger(port, socket, 'unmapped'));
    // vsftpd port_promiscuous=NO: the address must be our own upstream-side address (protocol.md §2.4).
    const line = familyOf(localIp) === 4 ? `PORT ${formatPortArgument(localIp, port)}` : `EPRT ${formatEprtArgument(localIp, port)}`;
    let reply: Reply;
    try {
      reply = await upstream.request(line);
    } catch (err) {
      discardUpstreamLeg(leg, 'session closing');
      throw err;
    }
    if (reply.code >= 200 && reply.code < 300) return leg;
    discardUpstreamLeg(leg, 'server refused PORT');
    throw upstreamSetupError(reply, line.slice(0, 4), 'refused');
  }
}

function upstreamSetupError(reply: Reply, sent: string, reason: string): Error {
  // Meaningful to the client as is (not logged in, server going away).
  if (reply.code === 421 || reply.code === 530) return new ServerReplyError(reply.code, reply.raw);
  return new ProxyError('FTPP_ERR_UPSTREAM_DATA_SETUP', `server answered ${sent} with "${reply.lines[0] ?? ''}" (${reason})`);
}

function describeLeg(leg: UpstreamLeg): string {
  switch (leg.kind) {
    case 'passive':
      return `passive ${leg.target.host}:${leg.target.port}`;
    case 'active':
      return `active port ${leg.accept.port}`;
    case 'forwarded':
      return `active port ${leg.lease.port} (kernel)`;
  }
}

/** Give up a server leg no channel took: its accept, or its kernel mapping and port. */
function discardUpstreamLeg(leg: UpstreamLeg, reason = 'session closing'): void {
  if (leg.kind === 'active') leg.accept.cancel(reason);
  if (leg.kind === 'forwarded') discardForwarded(leg);
}

function discardForwarded(leg: ForwardedLeg): void {
  leg.forward.remove();
  leg.lease.release();
}
