/**
 * One data channel of a session: a client leg and an upstream leg, each either a one-shot
 * listener (the peer connects to the proxy) or an outbound dial (the proxy connects), paired
 * into a relay (createRelay: in the kernel when it can, else DataRelay) once both sockets exist.
 * A `forwarded` leg is the kernel data path (kernel-forward.ts): the leg whose peer connects
 * (the client after a 227/229, or the server after our PORT/EPRT) is NATed straight to the
 * other peer's listening port, so the channel has no sockets and no relay; it holds the leased
 * port and the mapping until it closes. At most one leg is forwarded.
 * Single use; one idempotent teardown.
 */
import type net from 'node:net';
import type tls from 'node:tls';
import type { HostPort } from '../control/address.js';
import type { TransferDirection } from '../control/rewrite.js';
import type { PassiveAccept } from './passive.js';
import { isTlsSocket, resetSocket, tlsParentOf, type Relay, type RelayKind, type RelayResult } from './relay.js';
import { clientHandshakeInFlight } from './tls.js';
import { createRelay } from './splice-relay.js';
import { gateOf } from './tls-gate.js';
import type { Dial } from './dial.js';
import type { PortLease } from './port-pool.js';
import type { KernelForward } from './kernel-forward.js';
import type { WireBytes } from './kernel-nft.js';
import { isProxyError, type ErrorCode } from '../errors.js';

/** A leg whose peer's connection to `lease` is NATed by the kernel to the other peer. */
export interface ForwardedLeg {
  readonly kind: 'forwarded';
  readonly lease: PortLease;
  readonly forward: KernelForward;
}

export type ClientLeg =
  | { readonly kind: 'passive'; readonly accept: PassiveAccept }
  | { readonly kind: 'active'; readonly target: HostPort }
  | ForwardedLeg;

export type UpstreamLeg =
  | { readonly kind: 'passive'; readonly target: HostPort }
  | { readonly kind: 'active'; readonly accept: PassiveAccept }
  | ForwardedLeg;

export type ChannelState =
  | { readonly status: 'pending' }
  | { readonly status: 'connecting' }
  | { readonly status: 'relaying'; readonly relay: Relay }
  /** Kernel data path: the kernel carries the bytes; nothing to wait for here. */
  | { readonly status: 'forwarded' }
  | { readonly status: 'closed'; readonly reason: string };

/**
 * Turn a leg's TCP socket into the socket to relay (TLS for PROT P data, RFC 4217); `adopt`
 * is given the new socket at once so the channel can reset it. Rejects with a ProxyError.
 */
export type SecureLeg = (plain: net.Socket, adopt: (secure: net.Socket) => void) => Promise<net.Socket>;

export interface PairOptions {
  /** Already connected client socket (active client leg), else the leg's accept is awaited. */
  readonly clientSocket: net.Socket | null;
  /** Already connected upstream socket (passive upstream leg), else the leg's accept is awaited. */
  readonly upstreamSocket: net.Socket | null;
  readonly idleTimeoutMs: number;
  /** TLS on the client's data connection (the proxy is the TLS server, PASV or PORT alike). */
  readonly secureClient?: SecureLeg | null;
  /** TLS on the server's data connection (the proxy is the TLS client). */
  readonly secureUpstream?: SecureLeg | null;
}

let nextChannelId = 1;

export class DataChannel {
  readonly id = nextChannelId++;
  readonly clientLeg: ClientLeg;
  readonly upstreamLeg: UpstreamLeg;
  private stateValue: ChannelState = { status: 'pending' };
  private readonly dials = new Set<Dial>();
  private readonly looseSockets = new Set<net.Socket>();
  private lingerTimer: NodeJS.Timeout | null = null;
  /** Kept after close so byte counts stay readable. */
  private relay: Relay | null = null;
  private readonly closedWaiters: Array<() => void> = [];
  private readonly relayWaiters: Array<(relay: Relay) => void> = [];
  /**
   * Fires once with the relay result, or null when the channel closed before relaying; `code`
   * classifies a failure (FTPP_ERR_DATA_ACCEPT_TIMEOUT: nobody acceptable connected in time).
   */
  onSettled: ((result: RelayResult | null, reason: string, code: ErrorCode | null) => void) | null = null;
  private closeCode: ErrorCode | null = null;
  /** Kernel path: the idle cut reset the connection (the transfer cannot have completed). */
  private cutIdle = false;
  /** Kernel path: how long a finished transfer's counters may wait for the connection's last packets. */
  private endWaitMs = 0;
  private pairedAt = 0;

  /** The kernel-carried leg, if any (kernel data path). */
  private readonly kernel: ForwardedLeg | null;

  constructor(clientLeg: ClientLeg, upstreamLeg: UpstreamLeg) {
    this.clientLeg = clientLeg;
    this.upstreamLeg = upstreamLeg;
    this.kernel = clientLeg.kind === 'forwarded' ? clientLeg : upstreamLeg.kind === 'forwarded' ? upstreamLeg : null;
    // Own an accepted socket from the moment it is accepted, not only once pair() runs: the
    // client may connect right after the 227 and the channel may then be replaced (PASV
    // again, PORT), fail (upstream dial refused) or close with the session before any
    // transfer command. cancel() cannot reach a socket its accept already handed out, so
    // without this the socket stayed open forever (test/data/channel.test.ts,
    // test/session/data-lifecycle.test.ts).
    const accepts = [
      clientLeg.kind === 'passive' ? clientLeg.accept : null,
      upstreamLeg.kind === 'active' ? upstreamLeg.accept : null,
    ];
    for (const accept of accepts) {
      accept?.accepted.then((socket) => {
        if (this.isClosed) resetSocket(socket);
        else if (this.stateValue.status !== 'relaying') this.looseSockets.add(socket);
      }, () => {});
    }
  }

  get state(): ChannelState {
    return this.stateValue;
  }

  get isClosed(): boolean {
    return this.stateValue.status === 'closed';
  }

  /** Port the client connects to (passive client leg), or the one it listens on (active), for logs. */
  get clientPort(): number | null {
    switch (this.clientLeg.kind) {
      case 'passive':
        return this.clientLeg.accept.port;
      case 'forwarded':
        return this.clientLeg.lease.port;
      case 'active':
        return this.clientLeg.target.port;
    }
  }

  /** What carried (or carries) this channel's bytes: the relay's kind, `kernel`, or null before relaying. */
  get carrier(): RelayKind | 'kernel' | null {
    return this.kernel ? 'kernel' : (this.relay?.kind ?? null);
  }

  get isForwarded(): boolean {
    return this.kernel !== null;
  }

  get upstreamPort(): number | null {
    switch (this.upstreamLeg.kind) {
      case 'passive':
        return this.upstreamLeg.target.port;
      case 'forwarded':
        return this.upstreamLeg.lease.port;
      case 'active':
        return this.upstreamLeg.accept.port;
    }
  }

  /** Register an outbound connect so close() can cancel it. */
  track(dial: Dial): Dial {
    this.dials.add(dial);
    dial.connected.then(
      (socket) => {
        this.dials.delete(dial);
        if (this.isClosed) resetSocket(socket);
        else this.looseSockets.add(socket);
      },
      () => this.dials.delete(dial),
    );
    return dial;
  }

  /**
   * Wait for both sockets (accepting on listener legs), then relay. A leg that fails (accept
   * timeout) closes the channel, which resets the other leg so the server reports 426.
   */
  pair(options: PairOptions): void {
    if (this.stateValue.status !== 'pending') return;
    if (this.kernel) {
      this.stateValue = { status: 'forwarded' };
      this.pairedAt = Date.now();
      if (options.idleTimeoutMs > 0) this.kernel.forward.watchIdle(options.idleTimeoutMs, this.onKernelIdle);
      return;
    }
    this.stateValue = { status: 'connecting' };
    const clientSocket = options.clientSocket
      ? Promise.resolve(options.clientSocket)
      : this.clientLeg.kind === 'passive' ? this.clientLeg.accept.accepted : Promise.reject(new Error('no client socket'));
    const upstreamSocket = options.upstreamSocket
      ? Promise.resolve(options.upstreamSocket)
      : this.upstreamLeg.kind === 'active' ? this.upstreamLeg.accept.accepted : Promise.reject(new Error('no upstream socket'));
    for (const promise of [clientSocket, upstreamSocket]) promise.then(this.adopt, () => {});
    // Each leg's handshake starts as soon as its socket exists (the server's before its 150
    // is answered: protocol.md §5.4) and the relay starts once both are done.
    const clientReady = options.secureClient ? clientSocket.then((socket) => this.secureLeg(socket, options.secureClient!)) : clientSocket;
    const upstreamReady = options.secureUpstream ? upstreamSocket.then((socket) => this.secureLeg(socket, options.secureUpstream!)) : upstreamSocket;
    Promise.all([clientReady, upstreamReady]).then(
      ([client, upstream]) => {
        if (this.isClosed) return;
        this.looseSockets.clear();
        const relay = createRelay(client, upstream, { idleTimeoutMs: options.idleTimeoutMs });
        this.relay = relay;
        this.stateValue = { status: 'relaying', relay };
        for (const waiter of this.relayWaiters.splice(0)) waiter(relay);
        relay.done.then((result) => this.finish(result, result.outcome));
      },
      (err: Error) => this.close(`pairing failed: ${err.message}`, isProxyError(err) ? err.code : null),
    );
  }

  /**
   * Kernel path: no payload moved for idleTimeoutMs; the forwarder has cut the connection.
   * Ends like a relay's idle timeout: closed, settled with outcome `idle`.
   */
  private readonly onKernelIdle = (): void => {
    if (this.stateValue.status !== 'forwarded' || !this.kernel) return;
    this.cutIdle = true;
    this.stateValue = { status: 'closed', reason: 'idle timeout' };
    this.kernel.lease.release();
    for (const waiter of this.closedWaiters.splice(0)) waiter();
    this.settle({ upstreamToClientBytes: 0, clientToUpstreamBytes: 0, outcome: 'idle', durationMs: Date.now() - this.pairedAt }, 'idle timeout');
  };

  /**
   * Kernel path: IP bytes each way, headers included, once the transfer is over (null: the
   * relay carried this channel, or nothing could be read). Settles after close().
   */
  get wireBytes(): Promise<WireBytes | null> {
    return this.kernel ? this.kernel.forward.wireBytes : Promise.resolve(null);
  }

  /** Why the channel failed, when it failed with a code (e.g. a data TLS handshake); null otherwise. */
  get failureCode(): ErrorCode | null {
    return this.closeCode;
  }

  /** A socket of this channel: reset at once if the channel is closed, else owned until the relay takes it. */
  private readonly adopt = (socket: net.Socket): void => {
    if (this.isClosed) resetSocket(socket);
    else this.looseSockets.add(socket);
  };

  private async secureLeg(socket: net.Socket, secure: SecureLeg): Promise<net.Socket> {
    if (this.isClosed) throw new Error('channel closed');
    return secure(socket, this.adopt);
  }

  /**
   * Resolves true when the transfer's own direction has delivered everything and passed the
   * FIN on (protocol.md §3.3: the final reply waits for this), false when the channel or its
   * relay ended first: the data was cut, whatever the server's final reply says (issue #10).
   * The kernel path is one end-to-end TCP connection: nothing of ours in between to flush,
   * and a reset reaches the server itself, which then answers 426 on its own.
   */
  directionDone(direction: TransferDirection): Promise<boolean> {
    const relayDirection = direction === 'download' ? 'toClient' : 'toUpstream';
    if (this.kernel) return Promise.resolve(!this.cutIdle);
    if (this.relay) return this.relay.directionFinished(relayDirection);
    if (this.isClosed) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      this.closedWaiters.push(() => resolve(this.relay ? this.relay.directionFinished(relayDirection) : false));
      this.relayWaiters.push((relay) => resolve(relay.directionFinished(relayDirection)));
    });
  }

  /** Bytes moved so far in each direction. */
  get bytes(): { toClient: number; toUpstream: number } {
    const relay = this.relay;
    return { toClient: relay?.upstreamToClientBytes ?? 0, toUpstream: relay?.clientToUpstreamBytes ?? 0 };
  }

  /** Close the channel gracefully after `ms` unless it closes by itself first. */
  lingerThenClose(ms: number): void {
    if (this.kernel) {
      // The connection already lives in conntrack; the mapping and port are not needed. Its
      // counters are read once its last packets have passed (the server's 226 can come
      // before the tail of its send buffer), within `ms`.
      this.endWaitMs = ms;
      this.close('transfer finished');
      return;
    }
    if (this.isClosed || this.lingerTimer) return;
    this.lingerTimer = setTimeout(() => this.close('linger expired'), ms);
    this.lingerTimer.unref();
  }

  /**
   * Tear everything down: cancel accepts and dials, reset every socket (an abortive close,
   * so nothing half-sent looks complete). Idempotent; the first reason wins.
   */
  close(reason: string, code: ErrorCode | null = null): void {
    if (this.stateValue.status === 'closed') {
      // After a kernel idle cut: the final reply came, the cut `flows` elements can go.
      this.kernel?.forward.remove();
      return;
    }
    this.closeCode = code;
    const relay = this.stateValue.status === 'relaying' ? this.stateValue.relay : null;
    this.stateValue = { status: 'closed', reason };
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    this.lingerTimer = null;
    if (this.clientLeg.kind === 'passive') this.clientLeg.accept.cancel(reason);
    if (this.kernel) {
      this.kernel.forward.remove(this.endWaitMs);
      this.kernel.lease.release();
    }
    if (this.upstreamLeg.kind === 'active') this.upstreamLeg.accept.cancel(reason);
    for (const dial of this.dials) dial.cancel();
    this.dials.clear();
    resetAll(this.looseSockets);
    this.looseSockets.clear();
    for (const waiter of this.closedWaiters.splice(0)) waiter();
    this.relayWaiters.length = 0;
    if (relay) {
      relay.abort();
    } else {
      this.settle(null, reason);
    }
  }

  private finish(result: RelayResult, reason: string): void {
    if (this.stateValue.status !== 'closed') {
      this.stateValue = { status: 'closed', reason };
      if (this.lingerTimer) clearTimeout(this.lingerTimer);
      this.lingerTimer = null;
      for (const waiter of this.closedWaiters.splice(0)) waiter();
    }
    this.settle(result, reason);
  }

  private settled = false;
  private settle(result: RelayResult | null, reason: string): void {
    if (this.settled) return;
    this.settled = true;
    this.onSettled?.(result, reason, this.closeCode);
  }
}

/**
 * Reset every socket, except a TLS client handshake still running toward the server: that one
 * is allowed to finish and then closed with close_notify and FIN (the TCP socket under it goes
 * with it). A reset during vsftpd's data SSL_accept() makes vsftpd end the whole FTP session
 * (ssl.c, ftpdataio.c), and so does one right after our side of the handshake completed (its
 * accept may still be sending session tickets); a TLS close makes it answer an ordinary 426
 * (test/session/ftps-hostile.test.ts, "server 300 ms away").
 */
function resetAll(sockets: Iterable<net.Socket>): void {
  const waiting = new Map<net.Socket, Promise<void>>();
  for (const socket of sockets) {
    const inFlight = clientHandshakeInFlight(socket);
    if (inFlight && isTlsSocket(socket)) waiting.set(socket, inFlight);
  }
  const under = new Set([...waiting.keys()].map((socket) => tlsParentOf(socket as tls.TLSSocket)));
  for (const socket of sockets) {
    if (waiting.has(socket) || under.has(socket)) continue;
    resetSocket(socket);
  }
  for (const [socket, inFlight] of waiting) void inFlight.then(() => closeAfterHandshake(socket));
}

/** How long a TLS close may take before the connection is reset after all. */
const TLS_CLOSE_GRACE_MS = 2000;

function closeAfterHandshake(socket: net.Socket): void {
  if (socket.destroyed) return;
  // Nothing of this connection is wanted any more: read and drop, so the server's writes
  // cannot stall it, and reset it if the close does not complete in time.
  gateOf(socket)?.release();
  socket.on('data', () => {});
  socket.on('error', () => {});
  const timer = setTimeout(() => resetSocket(socket), TLS_CLOSE_GRACE_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
  socket.end();
}
