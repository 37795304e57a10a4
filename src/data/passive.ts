/**
 * One-shot accept on a leased port: the first connection whose source IP equals the expected
 * peer is taken and the listener closed; anyone else is closed at once and the listener stays
 * for the real peer (RFC 2577 §8 port stealing; vsftpd "425 Security: Bad IP connecting.").
 * Unused listeners time out.
 */
import type net from 'node:net';
import { ProxyError } from '../errors.js';
import { ipInCidr, sameIp, type Cidr } from '../control/ip.js';
import type { ProxyProtocolVersion } from '../control/proxy-protocol.js';
import type { PortLease } from './port-pool.js';
import { readProxyHeader } from './proxy-header.js';
import { resetSocket } from './relay.js';
import { addressesOf } from './socket-address.js';

/** Data connections arrive through a load balancer that prepends a PROXY header. */
export interface DataProxyHeaderOptions {
  readonly accept: ProxyProtocolVersion;
  /** Senders allowed to send a header (the load balancers). */
  readonly from: readonly Cidr[];
  readonly timeoutMs: number;
}

export interface PassiveAcceptOptions {
  readonly expectedIp: string;
  readonly timeoutMs: number;
  /** Called for every refused stranger (for logs and metrics). */
  readonly onStranger?: (remoteAddress: string, remotePort: number) => void;
  /** Called for a connection reset before its address could be read (dropped unread). */
  readonly onPeerGone?: () => void;
  /** Read a PROXY header first; its source is the address checked against expectedIp. */
  readonly proxyHeader?: DataProxyHeaderOptions;
}

export class PassiveAccept {
  readonly lease: PortLease;
  /** Resolves with the paused, accepted socket; rejects on timeout or cancel. */
  readonly accepted: Promise<net.Socket>;
  private settled = false;
  private timer: NodeJS.Timeout | null = null;
  private resolveAccepted!: (socket: net.Socket) => void;
  private rejectAccepted!: (err: Error) => void;
  private readonly options: PassiveAcceptOptions;
  private readonly onConnection = (socket: net.Socket): void => this.handleConnection(socket);

  constructor(lease: PortLease, options: PassiveAcceptOptions) {
    this.lease = lease;
    this.options = options;
    this.accepted = new Promise<net.Socket>((resolve, reject) => {
      this.resolveAccepted = resolve;
      this.rejectAccepted = reject;
    });
    // A cancelled accept is normal (PASV twice); nobody needs to observe the rejection.
    this.accepted.catch(() => {});
    lease.setConnectionHandler(this.onConnection);
    this.timer = setTimeout(() => {
      this.fail(new ProxyError('FTPP_ERR_DATA_ACCEPT_TIMEOUT', `no data connection on port ${lease.port} within ${options.timeoutMs} ms`));
    }, options.timeoutMs);
  }

  get port(): number {
    return this.lease.port;
  }

  private handleConnection(socket: net.Socket): void {
    socket.on('error', () => {});
    const addresses = addressesOf(socket);
    const viaHeader = this.options.proxyHeader;
    // A peer that reset before we looked cannot be the expected one (nor checked): drop it
    // unread and keep waiting. Not a stranger either: there is no address to report.
    if (this.settled || !addresses) {
      resetSocket(socket);
      if (!this.settled) this.options.onPeerGone?.();
      return;
    }
    const { ip: remote, port: remotePort } = addresses.remote;
    if (!viaHeader) {
      if (!sameIp(remote, this.options.expectedIp)) return this.refuse(socket, remote, remotePort);
      return this.take(socket);
    }
    // Behind a load balancer: only it may connect, and its header names the real peer.
    if (!viaHeader.from.some((cidr) => ipInCidr(remote, cidr))) return this.refuse(socket, remote, remotePort);
    readProxyHeader(socket, viaHeader.accept, viaHeader.timeoutMs).then(
      ({ header, rest }) => {
        if (header.command === 'local') {
          socket.destroy(); // the balancer's health check
          return;
        }
        if (this.settled || !sameIp(header.source.host, this.options.expectedIp)) {
          return this.refuse(socket, header.source.host, header.source.port);
        }
        if (rest.length > 0) socket.unshift(rest);
        this.take(socket);
      },
      () => this.refuse(socket, remote, remotePort),
    );
  }

  private refuse(socket: net.Socket, address: string, port: number): void {
    resetSocket(socket);
    if (!this.settled) this.options.onStranger?.(address, port);
  }

  private take(socket: net.Socket): void {
    this.settled = true;
    this.clear();
    // (An 'error' listener is already attached: until the relay takes the socket over, a
    // reset from the peer must not become an uncaught error.)
    this.resolveAccepted(socket);
  }

  /** Stop waiting and give the port back. Idempotent. */
  cancel(reason = 'cancelled'): void {
    this.fail(new ProxyError('FTPP_ERR_DATA_CONNECT', `accept on port ${this.lease.port} ${reason}`));
  }

  private fail(err: Error): void {
    if (this.settled) {
      this.clear();
      return;
    }
    this.settled = true;
    this.clear();
    this.rejectAccepted(err);
  }

  private clear(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.lease.setConnectionHandler(null);
    this.lease.release();
  }
}
