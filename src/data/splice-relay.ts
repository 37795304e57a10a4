/**
 * A data relay that moves the bytes in the kernel (Linux splice(2), src/native/): once a
 * data channel is paired, both sockets' descriptors go to a native thread that splices
 * socket -> pipe -> socket; the event loop hears only "direction finished" and "ended".
 * On a 2-core machine the JS relay spends a core copying (read into a Buffer, write it out),
 * which is what held downloads to ~0.2x of a direct transfer (test/bench, README).
 *
 * Same contract as DataRelay (relay.ts): byte counts per direction, a FIN ends only its own
 * direction (protocol.md §3.2), an error or reset on either side resets both (§3.3), abort()
 * and the idle timeout reset both, `done` settles once both sockets are closed and never
 * rejects. createRelay() picks this relay when the addon is built and loads and both
 * sockets are plain TCP and clean (relayKindFor: not TLS, nothing buffered in JS, no FIN
 * seen); otherwise, or with FTPNP_RELAY=js, it returns the JS relay.
 */
import type net from 'node:net';
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DataRelay, isTlsSocket, resetSocket, type Relay, type RelayKind, type RelayOptions, type RelayOutcome, type RelayResult } from './relay.js';
import { gateOf, TlsHandshakeGate, type TlsLegState } from './tls-gate.js';

/** The native module's surface (src/native/splice_relay.c). */
export interface SpliceAddon {
  start(
    clientFd: number,
    upstreamFd: number,
    pipeBytes: number,
    onEvent: (kind: number, a: number, b: number, c: number) => void,
    clientTls?: TlsLegState | null,
    upstreamTls?: TlsLegState | null,
    clientPending?: Buffer | null,
    upstreamPending?: Buffer | null,
  ): object;
  cancel(handle: object): void;
  bytes(handle: object, direction: 0 | 1): number;
  idleMs(handle: object): number;
}

/** Environment switch: `js` forces the JS relay (e.g. to compare, or to rule the addon out). */
export const RELAY_ENV = 'FTPNP_RELAY';
/**
 * Pipe capacity per direction; 0 keeps the kernel default (64 KiB). Larger pipes measured
 * no faster on loopback (test/bench) and count against fs.pipe-user-pages-soft, which
 * thousands of concurrent transfers would exhaust.
 */
const PIPE_BYTES = 0;

const EVENT_FINISHED = 0;
const END_COMPLETE = 0;
const END_ERROR = 1;

type Direction = 'toClient' | 'toUpstream';

let loaded: { readonly addon: SpliceAddon | null; readonly reason: string } | null = null;

/** Load the addon once; the reason says why it is not used when it is not. */
export function loadSpliceAddon(): { readonly addon: SpliceAddon | null; readonly reason: string } {
  if (loaded) return loaded;
  if (process.platform !== 'linux') return (loaded = { addon: null, reason: `splice(2) is Linux-only (platform ${process.platform})` });
  const here = dirname(fileURLToPath(import.meta.url));
  // src/data -> src/native (tests run the TS sources); dist/data -> src/native (built code).
  const candidates = [join(here, '../native/build/Release/splice_relay.node'), join(here, '../../src/native/build/Release/splice_relay.node')];
  const path = candidates.find((p) => existsSync(p));
  if (!path) return (loaded = { addon: null, reason: 'native addon not built (npm install runs node-gyp in src/native)' });
  try {
    const addon = createRequire(import.meta.url)(path) as SpliceAddon;
    return (loaded = { addon, reason: `native addon ${path}` });
  } catch (err) {
    return (loaded = { addon: null, reason: `native addon failed to load: ${(err as Error).message}` });
  }
}

/** Which relay new data channels get, and why (for logs and the benchmark). */
export function relayImplementation(): { readonly kind: 'splice' | 'js'; readonly reason: string } {
  if (process.env[RELAY_ENV] === 'js') return { kind: 'js', reason: `${RELAY_ENV}=js` };
  const { addon, reason } = loadSpliceAddon();
  return { kind: addon ? 'splice' : 'js', reason };
}

/**
 * The stream a PROT P data connection's TLSSocket is built on: a handshake gate over the TCP
 * socket when the native thread could take the connection over once it is established
 * (tls-gate.ts), null (build it on the socket itself) otherwise: when new channels get the
 * JS relay, or when the control connection is not TLS 1.3. Data connections resume the
 * control connection's session and so speak its version, and for TLS 1.2 the gate would only
 * add a JS stream hop in front of Node's TLS.
 */
export function dataTlsGate(plain: net.Socket, role: 'server' | 'client', controlVersion: string | null): TlsHandshakeGate | null {
  return controlVersion === 'TLSv1.3' && relayImplementation().kind === 'splice' ? new TlsHandshakeGate(plain, role) : null;
}

interface HandleInternals {
  fd?: number;
  reading?: boolean;
  readStop?: () => number;
}

function handleOf(socket: net.Socket): HandleInternals | undefined {
  return (socket as unknown as { _handle?: HandleInternals })._handle;
}

/**
 * The kernel descriptor behind a socket (libuv's TCPWrap/TLSWrap `fd`), or null when it has
 * none: not yet connected, destroyed (the handle is gone), or not backed by a descriptor.
 * Node has no public API for it; the addon needs it for splice(2) and getsockopt(2).
 */
export function socketDescriptor(socket: net.Socket): number | null {
  const fd = handleOf(socket)?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/**
 * The descriptor of a socket the kernel can take over: open, connected, nothing read into
 * JS buffers or queued for writing, no FIN seen. Otherwise null (the JS relay handles it,
 * e.g. bytes that arrived behind a PROXY header and were unshifted). Says nothing about
 * TLS: a TLSSocket's handle (TLSWrap) exposes the TCP descriptor too, whose bytes are
 * ciphertext. relayKindFor() rules TLS out first.
 */
function spliceableFd(socket: net.Socket): number | null {
  if (socket.destroyed || socket.connecting || !socket.readable || !socket.writable) return null;
  if (socket.readableLength > 0 || socket.writableLength > 0 || socket.writableEnded) return null;
  if ((socket as unknown as { _readableState?: { ended?: boolean } })._readableState?.ended) return null;
  return socketDescriptor(socket);
}

/** The relay a pair of sockets can take, and why (tests and logs). */
export interface RelayChoice {
  readonly kind: 'splice' | 'js';
  readonly reason: string;
}

/**
 * Which relay these two sockets can take, judged by the sockets alone (whether the addon
 * loads, and FTPNP_RELAY, are relayImplementation()'s part). A TLS leg (RFC 4217 PROT P data)
 * is never spliced as it is: splice(2) would move ciphertext from one leg to a peer that
 * expects other keys or plaintext. It goes to the native thread only through its handshake
 * gate (tls-gate.ts), once TLS 1.3 with AES-GCM is established: the thread then opens and
 * seals its records itself (src/native/tls_record.c). Any other TLS leg (TLS 1.2, another
 * suite, built without the gate) takes the JS relay, which reads and writes the TLSSocket.
 */
export function relayKindFor(client: net.Socket, upstream: net.Socket): RelayChoice {
  const legs = [['client', client], ['upstream', upstream]] as const;
  for (const [leg, socket] of legs) {
    if (isTlsSocket(socket) && !gateOf(socket)?.canHandOff) return { kind: 'js', reason: `${leg} leg is TLS that the native relay cannot take over (not TLS 1.3 AES-GCM behind a handshake gate)` };
  }
  const tls = legs.filter(([, socket]) => isTlsSocket(socket)).map(([leg]) => leg);
  for (const [leg, socket] of legs) {
    if (takeoverFd(socket, tls.length > 0) === null) return { kind: 'js', reason: `${leg} leg is closed, ended or has bytes buffered in JS` };
  }
  return tls.length > 0
    ? { kind: 'splice', reason: `TLS 1.3 records of the ${tls.join(' and ')} leg${tls.length > 1 ? 's' : ''} opened and sealed natively` }
    : { kind: 'splice', reason: 'both legs are plain TCP with nothing buffered in JS' };
}

/** The TCP socket that carries a leg: the socket, or the one under its handshake gate. */
function transportOf(socket: net.Socket): net.Socket {
  return isTlsSocket(socket) ? (gateOf(socket)?.raw ?? socket) : socket;
}

/**
 * The descriptor the native thread would take for a leg: a gated TLS leg's TCP socket's if
 * its gate can hand over (bytes that socket buffered in JS go with the TLS state:
 * TlsHandshakeGate.handOff); a plain leg's if spliceable, or, beside a TLS leg, if it is
 * open for writing: what it already read into JS (a server that started sending before the
 * client's data handshake was done, the usual order for a download) goes first to the
 * thread (readAhead), and a FIN it saw is still there for the thread to read.
 */
function takeoverFd(socket: net.Socket, besideTls: boolean): number | null {
  if (isTlsSocket(socket)) {
    const gate = gateOf(socket);
    return gate?.canHandOff ? socketDescriptor(gate.raw) : null;
  }
  if (!besideTls) return spliceableFd(socket);
  if (socket.destroyed || socket.connecting || !socket.writable || socket.writableLength > 0 || socket.writableEnded) return null;
  return socketDescriptor(socket);
}

/** Take what a plain socket read into JS and nobody consumed (reading stays stopped after). */
function readAhead(socket: net.Socket): Buffer | null {
  socket.pause();
  const chunks: Buffer[] = [];
  // read() may restart libuv's reading; SpliceRelay stops it in the same turn, before any read.
  for (let chunk = socket.read() as Buffer | null; chunk !== null; chunk = socket.read() as Buffer | null) chunks.push(chunk);
  return chunks.length > 0 ? Buffer.concat(chunks) : null;
}

/** Stop libuv reading: from now on only the native thread reads this socket. */
function stopReading(socket: net.Socket): void {
  socket.pause();
  const handle = handleOf(socket);
  if (handle?.reading) {
    handle.reading = false;
    handle.readStop?.();
  }
}

/** The relay for a freshly paired data channel: the native thread when possible, else JS. */
export function createRelay(client: net.Socket, upstream: net.Socket, options: RelayOptions = {}): Relay {
  if (process.env[RELAY_ENV] !== 'js') {
    const { addon } = loadSpliceAddon();
    // startNative takes the legs relayKindFor calls `splice` (takeoverFd decides both).
    const relay = addon ? startNative(addon, client, upstream, options) : null;
    if (relay) return relay;
  }
  // The JS relay reads the TLSSockets: their gates let everything through from now on.
  for (const socket of [client, upstream]) if (isTlsSocket(socket)) gateOf(socket)?.release();
  return new DataRelay(client, upstream, options);
}

function startNative(addon: SpliceAddon, client: net.Socket, upstream: net.Socket, options: RelayOptions): Relay | null {
  const clientTcp = transportOf(client);
  const upstreamTcp = transportOf(upstream);
  const besideTls = isTlsSocket(client) || isTlsSocket(upstream);
  const clientFd = takeoverFd(client, besideTls);
  const upstreamFd = takeoverFd(upstream, besideTls);
  if (clientFd === null || upstreamFd === null) return null;
  // Checked by takeoverFd: a TLS leg here has a gate that can hand over (canHandOff implies
  // a TLS 1.3 AES-GCM connection with both traffic secrets, so handOff() gives its state).
  const clientTls = isTlsSocket(client) ? gateOf(client)!.handOff() : null;
  const upstreamTls = isTlsSocket(upstream) ? gateOf(upstream)!.handOff() : null;
  const handedOff = clientTls !== null || upstreamTls !== null;
  const complete = (clientTls !== null || !isTlsSocket(client)) && (upstreamTls !== null || !isTlsSocket(upstream));
  try {
    if (!complete) throw new Error('a TLS leg could not be handed over');
    const clientPending = besideTls && !isTlsSocket(client) ? readAhead(client) : null;
    const upstreamPending = besideTls && !isTlsSocket(upstream) ? readAhead(upstream) : null;
    return new SpliceRelay(clientTcp, upstreamTcp, options, addon, clientFd, upstreamFd, clientTls, upstreamTls, clientPending, upstreamPending);
  } catch {
    // Out of descriptors or threads. Plain legs: the JS relay still works (it resumes
    // reading). A TLS leg handed over is nobody's now: end both with a reset (a 426).
    if (!handedOff) return null;
    resetSocket(clientTcp);
    resetSocket(upstreamTcp);
    return new DataRelay(clientTcp, upstreamTcp, options);
  }
}

export class SpliceRelay implements Relay {
  readonly kind: RelayKind;
  readonly client: net.Socket;
  readonly upstream: net.Socket;
  /** Settles once both sockets are closed and the native thread has ended. Never rejects. */
  readonly done: Promise<RelayResult>;
  private readonly addon: SpliceAddon;
  private readonly handle: object;
  private readonly finished: Record<Direction, Promise<boolean>>;
  private readonly finishResolvers = {} as Record<Direction, (delivered: boolean) => void>;
  private resolveDone!: (result: RelayResult) => void;
  private outcome: RelayOutcome = 'complete';
  private readonly closedSockets = new Set<net.Socket>();
  private nativeEnded = false;
  private cancelRequested = false;
  private settled = false;
  private finalBytes: { toClient: number; toUpstream: number } | null = null;
  private idleTimer: NodeJS.Timeout | null = null;
  private readonly idleTimeoutMs: number;
  private readonly startedAt: number;
  private readonly now: () => number;

  /** Throws (before touching either socket) when the native side cannot start, or for a TLS socket. */
  constructor(
    client: net.Socket,
    upstream: net.Socket,
    options: RelayOptions,
    addon: SpliceAddon,
    clientFd: number,
    upstreamFd: number,
    clientTls: TlsLegState | null = null,
    upstreamTls: TlsLegState | null = null,
    clientPending: Buffer | null = null,
    upstreamPending: Buffer | null = null,
  ) {
    if (isTlsSocket(client) || isTlsSocket(upstream)) throw new Error('a TLS socket cannot be spliced (see relayKindFor)');
    this.kind = clientTls || upstreamTls ? 'native-tls' : 'splice';
    this.client = client;
    this.upstream = upstream;
    this.addon = addon;
    this.now = options.now ?? Date.now;
    this.startedAt = this.now();
    this.idleTimeoutMs = options.idleTimeoutMs ?? 0;
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
    this.finished = {
      toClient: new Promise<boolean>((resolve) => { this.finishResolvers.toClient = resolve; }),
      toUpstream: new Promise<boolean>((resolve) => { this.finishResolvers.toUpstream = resolve; }),
    };
    // The thread may start moving bytes at once; libuv cannot read in between, since the
    // event loop does not run until this constructor has returned.
    this.handle = addon.start(clientFd, upstreamFd, PIPE_BYTES, this.onNativeEvent, clientTls, upstreamTls, clientPending, upstreamPending);
    for (const socket of [client, upstream]) {
      stopReading(socket);
      socket.on('error', this.onSocketError);
      socket.once('close', (hadError: boolean) => this.handleClose(socket, hadError));
    }
    if (this.idleTimeoutMs > 0) this.armIdleTimer(this.idleTimeoutMs);
  }

  get upstreamToClientBytes(): number {
    return this.finalBytes?.toClient ?? this.addon.bytes(this.handle, 0);
  }

  get clientToUpstreamBytes(): number {
    return this.finalBytes?.toUpstream ?? this.addon.bytes(this.handle, 1);
  }

  /**
   * Resolves true when every byte of one direction has been written to the receiving socket
   * and the FIN passed on (shutdown(SHUT_WR)), false when the relay ends for any reason first.
   */
  directionFinished(direction: Direction): Promise<boolean> {
    return this.finished[direction];
  }

  /** Reset both legs now (ABOR, failed transfer, shutdown). Idempotent. */
  abort(): void {
    if (this.closedSockets.size === 2) return;
    if (this.outcome === 'complete') this.outcome = 'aborted';
    this.resetBoth();
  }

  private resetBoth(): void {
    this.stopNative();
    resetSocket(this.client);
    resetSocket(this.upstream);
  }

  private stopNative(): void {
    if (this.nativeEnded || this.cancelRequested) return;
    this.cancelRequested = true;
    this.clearIdleTimer();
    this.addon.cancel(this.handle);
  }

  /**
   * Events from the native thread (src/native/splice_relay.c). An exception here would be
   * swallowed by N-API with only a warning, leaving the relay unsettled: never let one out.
   */
  private readonly onNativeEvent = (kind: number, a: number): void => {
    try {
      this.handleNativeEvent(kind, a);
    } catch {
      this.nativeEnded = true;
      if (this.outcome === 'complete') this.outcome = 'reset';
      resetSocket(this.client);
      resetSocket(this.upstream);
      this.maybeSettle();
    }
  };

  private handleNativeEvent(kind: number, a: number): void {
    if (kind === EVENT_FINISHED) {
      this.finishResolvers[a === 0 ? 'toClient' : 'toUpstream'](true);
      return;
    }
    this.nativeEnded = true;
    this.clearIdleTimer();
    this.finalBytes = { toClient: this.addon.bytes(this.handle, 0), toUpstream: this.addon.bytes(this.handle, 1) };
    if (a === END_COMPLETE) {
      // Both FINs passed on and both read to their end: an orderly close of our descriptors.
      this.client.destroy();
      this.upstream.destroy();
    } else {
      // One leg failed or was reset (END_ERROR), or we cancelled: the other sees a reset too.
      if (a === END_ERROR && this.outcome === 'complete') this.outcome = 'reset';
      resetSocket(this.client);
      resetSocket(this.upstream);
    }
    this.maybeSettle();
  }

  private readonly onSocketError = (): void => {
    if (this.outcome === 'complete') this.outcome = 'reset';
    this.resetBoth();
  };

  private handleClose(socket: net.Socket, hadError: boolean): void {
    if (this.closedSockets.has(socket)) return;
    this.closedSockets.add(socket);
    if (hadError) this.onSocketError();
    else if (!this.nativeEnded && !this.cancelRequested) {
      // Closed under the relay by someone else: nothing more can be delivered there, and
      // the other side must not see a clean end (relay.ts does the same on its next write).
      this.onSocketError();
    }
    this.maybeSettle();
  }

  private maybeSettle(): void {
    if (this.settled || !this.nativeEnded || this.closedSockets.size < 2) return;
    this.settled = true;
    this.finishResolvers.toClient(false);
    this.finishResolvers.toUpstream(false);
    this.resolveDone({
      upstreamToClientBytes: this.upstreamToClientBytes,
      clientToUpstreamBytes: this.clientToUpstreamBytes,
      outcome: this.outcome,
      durationMs: this.now() - this.startedAt,
    });
  }

  private armIdleTimer(ms: number): void {
    this.idleTimer = setTimeout(this.checkIdle, Math.max(1, ms));
    this.idleTimer.unref();
  }

  private clearIdleTimer(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
  }

  /** Reset both legs once no byte has moved either way for idleTimeoutMs (native clock). */
  private readonly checkIdle = (): void => {
    this.idleTimer = null;
    if (this.nativeEnded || this.cancelRequested) return;
    const idle = this.addon.idleMs(this.handle);
    if (idle < this.idleTimeoutMs) {
      this.armIdleTimer(this.idleTimeoutMs - idle);
      return;
    }
    if (this.outcome === 'complete') this.outcome = 'idle';
    this.resetBoth();
  };
}
