/**
 * One-shot accept on a leased port: the first connection whose source IP equals the expected
 * peer is taken and the listener closed; anyone else is closed at once and the listener stays
 * for the real peer (RFC 2577 §8 port stealing; vsftpd "425 Security: Bad IP connecting.").
 * Unused listeners time out.
 */
import type net from 'node:net';
import { ProxyError } from '../errors.js';
import { sameIp } from '../control/ip.js';
import type { PortLease } from './port-pool.js';

export interface PassiveAcceptOptions {
  readonly expectedIp: string;
  readonly timeoutMs: number;
  /** Called for every refused stranger (for logs and metrics). */
  readonly onStranger?: (remoteAddress: string, remotePort: number) => void;
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
    lease.server.on('connection', this.onConnection);
    this.timer = setTimeout(() => {
      this.fail(new ProxyError('FTPP_ERR_DATA_ACCEPT_TIMEOUT', `no data connection on port ${lease.port} within ${options.timeoutMs} ms`));
    }, options.timeoutMs);
  }

  get port(): number {
    return this.lease.port;
  }

  private handleConnection(socket: net.Socket): void {
    const remote = socket.remoteAddress ?? '';
    if (this.settled || !sameIp(remote, this.options.expectedIp)) {
      socket.on('error', () => {});
      socket.resetAndDestroy();
      if (!this.settled) this.options.onStranger?.(remote, socket.remotePort ?? 0);
      return;
    }
    this.settled = true;
    this.clear();
    // Until the relay takes it over, a reset from the peer must not become an uncaught error.
    socket.on('error', () => {});
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
    this.lease.server.removeListener('connection', this.onConnection);
    this.lease.release();
  }
}
