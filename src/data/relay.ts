/**
 * Two data sockets spliced together: backpressure both ways, a FIN ends only its own
 * direction (allowHalfOpen, protocol.md §3.2), and an abortive close is passed on as an
 * abortive close: a truncated upload must reach the server as a reset so it answers 426,
 * never 226 (RFC 959 §3.3: stream mode cannot tell a complete file from a truncated one).
 */
import net from 'node:net';
import tls from 'node:tls';

/** Zero-length probe write that tells a FIN from an RST reported as EOF (see pump()). */
const EMPTY = Buffer.alloc(0);

/**
 * How far one direction may run ahead of its receiver: the relay stops reading the sender
 * once this many bytes wait in the receiving socket, and reads again at its 'drain'.
 * `write() === false` alone is no signal here: Node's writable highWaterMark is 16 KiB, one
 * TLS record, so every chunk a TLSSocket delivers (16 KiB) or a TCP read brings (up to
 * 64 KiB) makes write() return false, and a TLS write completes only on the next event-loop
 * turn (Node 20's TLSWrap defers it even when the kernel took it all). Pausing there
 * stopped and restarted reading (two epoll_ctl) and waited a loop turn for every record
 * (issue #12: PROT P on both legs). Queued chunks also go out as one writev, one TLS write
 * for several records. Memory stays bounded: at most this plus one chunk per direction in
 * the sink, plus the source's own highWaterMark.
 */
export const RELAY_QUEUE_BYTES = 512 * 1024;

/** complete: both sides ended cleanly; reset: a side failed; aborted: abort() was called; idle: no byte moved for idleTimeoutMs. */
export type RelayOutcome = 'complete' | 'reset' | 'aborted' | 'idle';

export interface RelayResult {
  readonly upstreamToClientBytes: number;
  readonly clientToUpstreamBytes: number;
  readonly outcome: RelayOutcome;
  readonly durationMs: number;
}

export interface RelayOptions {
  /** Reset both legs when neither moves a byte for this long (0 = never). */
  readonly idleTimeoutMs?: number;
  readonly now?: () => number;
}

type Direction = 'toClient' | 'toUpstream';

export type RelayKind = 'splice' | 'native-tls' | 'js';

/**
 * What a data channel needs from a relay. DataRelay (this file) moves the bytes through the
 * event loop; SpliceRelay (splice-relay.ts) moves them in the kernel with the same contract.
 */
export interface Relay {
  /**
   * Which implementation moves the bytes (for tests and logs): `splice` the native thread
   * with plain legs (splice(2)), `native-tls` the native thread opening and sealing TLS
   * records of a PROT P leg (splice-relay.ts), `js` the event loop.
   */
  readonly kind: RelayKind;
  readonly client: net.Socket;
  readonly upstream: net.Socket;
  /** Settles once both sockets are closed. Never rejects. */
  readonly done: Promise<RelayResult>;
  readonly upstreamToClientBytes: number;
  readonly clientToUpstreamBytes: number;
  /**
   * Settles once per direction: true when every byte of it was handed to the receiving
   * socket and the FIN passed on, false when the relay ended (reset, abort, idle) first.
   */
  directionFinished(direction: Direction): Promise<boolean>;
  /** Reset both legs now. Idempotent. */
  abort(): void;
}

export class DataRelay implements Relay {
  readonly kind = 'js';
  readonly client: net.Socket;
  readonly upstream: net.Socket;
  /** Settles once both sockets are closed. Never rejects. */
  readonly done: Promise<RelayResult>;
  private readonly finished: Record<Direction, Promise<boolean>>;
  private readonly finishResolvers = {} as Record<Direction, (delivered: boolean) => void>;
  private bytes: Record<Direction, number> = { toClient: 0, toUpstream: 0 };
  private outcome: RelayOutcome = 'complete';
  private readonly closedSockets = new Set<net.Socket>();
  private resolveDone!: (result: RelayResult) => void;
  private readonly startedAt: number;
  private readonly now: () => number;

  constructor(client: net.Socket, upstream: net.Socket, options: RelayOptions = {}) {
    this.client = client;
    this.upstream = upstream;
    this.now = options.now ?? Date.now;
    this.startedAt = this.now();
    this.done = new Promise((resolve) => {
      this.resolveDone = resolve;
    });
    this.finished = {
      toClient: new Promise<boolean>((resolve) => { this.finishResolvers.toClient = resolve; }),
      toUpstream: new Promise<boolean>((resolve) => { this.finishResolvers.toUpstream = resolve; }),
    };
    this.pump(upstream, client, 'toClient');
    this.pump(client, upstream, 'toUpstream');
    for (const socket of [client, upstream]) {
      socket.on('error', this.onError);
      // A socket that died before pairing was never ended by us (allowHalfOpen), so it did
      // not finish cleanly: treat it as a reset so the other leg cannot look complete.
      if (socket.destroyed) this.handleClose(socket, true);
      else socket.once('close', (hadError: boolean) => this.handleClose(socket, hadError));
      if (options.idleTimeoutMs && options.idleTimeoutMs > 0) {
        socket.setTimeout(options.idleTimeoutMs, this.onIdle);
      }
    }
  }

  get upstreamToClientBytes(): number {
    return this.bytes.toClient;
  }

  get clientToUpstreamBytes(): number {
    return this.bytes.toUpstream;
  }

  /**
   * Resolves true when every byte of one direction has been handed to the receiving socket's
   * kernel buffer after the sender's FIN ('finish'), false when the relay ends for any reason
   * first. The session holds the server's final transfer reply on this (protocol.md §3.3) and
   * turns a 226 into a 426 when it is false (issue #10: a cut download is never a 226).
   */
  directionFinished(direction: Direction): Promise<boolean> {
    return this.finished[direction];
  }

  /** Reset both legs now (ABOR, failed transfer, shutdown). Idempotent. */
  abort(): void {
    if (this.closedSockets.size === 2) return;
    if (this.outcome === 'complete') this.outcome = 'aborted';
    resetSocket(this.client);
    resetSocket(this.upstream);
  }

  private pump(source: net.Socket, sink: net.Socket, direction: Direction): void {
    source.on('data', (chunk: Buffer) => {
      this.bytes[direction] += chunk.length;
      if (!sink.write(chunk) && sink.writableLength >= RELAY_QUEUE_BYTES) source.pause();
    });
    // 'drain' also follows writes that returned false below the bound, with the source
    // still flowing: only a source this relay paused is resumed.
    sink.on('drain', () => {
      if (!source.destroyed && source.isPaused()) source.resume();
    });
    const onEnd = (): void => {
      // Half-close: pass the FIN on and keep the other direction open. But check it was a
      // FIN: libuv reports an RST that lands while reading is stopped (this relay paused the
      // source for backpressure) as a plain EOF after the buffered bytes (POLLHUP after a
      // partial read), and passing that on as a FIN turns a reset upload into a 226
      // (protocol.md §3.2, §8.23; test/data/relay.test.ts "...paused (backpressure)...").
      // A zero-length write still reaches the kernel: it succeeds on a half-closed
      // connection and fails (ECONNRESET/EPIPE) on a reset one, which onError handles.
      // On a TLSSocket it stays inside Node's TLS layer, so probe the TCP socket under it.
      // Nothing to probe with when our side is already ended or has writes queued: trust it.
      const probe = tcpSocketOf(source);
      if (source.destroyed || source.writableEnded || source.writableLength > 0 || !probe || probe.destroyed || probe.writableLength > 0) {
        if (!sink.destroyed) sink.end();
        return;
      }
      probe.write(EMPTY, (err) => {
        if (err) this.onError();
        else if (!sink.destroyed) sink.end();
      });
    };
    // A TLS leg joins the relay only after its handshake, and by then the other side may have
    // ended already (an empty file: vsftpd closes right after its 150, a client uploading
    // nothing right after connecting); its 'end' will not come again.
    if (source.readableEnded) queueMicrotask(onEnd);
    else source.on('end', onEnd);
    sink.on('finish', () => this.finishResolvers[direction](true));
    source.resume();
  }

  private readonly onError = (): void => {
    // One leg failed or was reset: the other must see a reset too, never a clean FIN.
    if (this.outcome === 'complete') this.outcome = 'reset';
    resetSocket(this.client);
    resetSocket(this.upstream);
  };

  private readonly onIdle = (): void => {
    if (this.outcome === 'complete') this.outcome = 'idle';
    resetSocket(this.client);
    resetSocket(this.upstream);
  };

  private handleClose(socket: net.Socket, hadError: boolean): void {
    if (this.closedSockets.has(socket)) return;
    this.closedSockets.add(socket);
    if (hadError) this.onError();
    if (this.closedSockets.size === 2) {
      this.finishResolvers.toClient(false);
      this.finishResolvers.toUpstream(false);
      this.resolveDone({
        upstreamToClientBytes: this.bytes.toClient,
        clientToUpstreamBytes: this.bytes.toUpstream,
        outcome: this.outcome,
        durationMs: this.now() - this.startedAt,
      });
    }
  }
}

/**
 * True for a socket that carries TLS (RFC 4217 PROT P, or any tls upgrade): its `_handle`
 * is a TLSWrap over the TCP handle, and its plaintext exists only above Node's TLS layer.
 * `instanceof tls.TLSSocket` is the real test (every socket Node's tls module makes, and the
 * type the reset below needs); `encrypted === true`, Node's documented marker of a TLS
 * socket, is accepted too because the two mistakes are not alike: a plain socket taken for
 * TLS only loses the kernel relay, a TLS socket taken for plain would be spliced as
 * ciphertext.
 */
export function isTlsSocket(socket: net.Socket): socket is tls.TLSSocket {
  return socket instanceof tls.TLSSocket || (socket as { encrypted?: unknown }).encrypted === true;
}

/** Ignore late errors from a socket this module is resetting (the peer may reset it too). */
function ignoreError(): void {}

/**
 * Abortive close (RST) that tolerates sockets already gone. The peer sees ECONNRESET, never
 * a clean end: a failed transfer must not look complete (RFC 959 §3.3, protocol.md §3.3).
 * A TLS socket is reset on its TCP connection (resetTlsSocket).
 */
export function resetSocket(socket: net.Socket): void {
  if (socket.destroyed) return;
  socket.on('error', ignoreError);
  if (isTlsSocket(socket)) {
    resetTlsSocket(socket);
    return;
  }
  try {
    socket.resetAndDestroy();
  } catch {
    socket.destroy();
  }
}

/** Node 20 internals of a TLSSocket (lib/_tls_wrap.js) that resetTlsSocket and the probe use. */
interface TlsInternals {
  /** The net.Socket it was built on: `new tls.TLSSocket(socket)`, `tls.connect({ socket })`. */
  _parent?: unknown;
  /** The TLSWrap; its `_parent` is the TCP handle under it. */
  _handle?: { _parent?: { reset?: unknown; close?: unknown } | null } | null;
}

/**
 * TLS sockets built on a stream that is not the TCP socket itself (the handshake gate of
 * tls-gate.ts), with the TCP socket under that stream.
 */
const tlsTransports = new WeakMap<tls.TLSSocket, net.Socket>();

/** Record the TCP socket under a TLS socket built on some other stream (see tlsParentOf). */
export function registerTlsTransport(socket: tls.TLSSocket, tcp: net.Socket): void {
  tlsTransports.set(socket, tcp);
}

/** The net.Socket a TLS socket was built on, or null. */
export function tlsParentOf(socket: tls.TLSSocket): net.Socket | null {
  const registered = tlsTransports.get(socket);
  if (registered) return registered;
  const parent = (socket as unknown as TlsInternals)._parent;
  return parent instanceof net.Socket ? parent : null;
}

/**
 * The socket whose writes reach the TCP connection: the socket itself, or for a TLS socket
 * the one under it; null for a TLS socket that owns its TCP handle (`tls.connect({ host })`).
 */
function tcpSocketOf(socket: net.Socket): net.Socket | null {
  if (!isTlsSocket(socket)) return socket;
  const parent = tlsParentOf(socket);
  return parent ? tcpSocketOf(parent) : null;
}

/** TLS sockets whose reset has started: a later call must not destroy them early. */
const resettingTls = new WeakSet<tls.TLSSocket>();

/**
 * Reset the TCP connection under a TLS socket and destroy both. `resetAndDestroy()` throws
 * ERR_INVALID_HANDLE_TYPE on a TLSSocket (its handle is a TLSWrap, not a TCP handle) and
 * `destroy()` closes the TCP connection gracefully: a FIN, which the peer takes for a
 * complete transfer. Node 20 internals (lib/_tls_wrap.js), checked by
 * test/data/tls-data.test.ts:
 * - Built on a net.Socket (how the proxy upgrades a connection, TLS server and client role
 *   alike, protocol.md §5.4): that socket is `_parent` and still owns the TCP handle. Reset
 *   it; Node destroys the TLSSocket once its parent has closed (`wrap.on('close', ...)`),
 *   and so does the listener here. Not sooner: destroying the TLSSocket while its parent's
 *   handle was still closing crashed Node 20 (SIGSEGV) when the server's TLS 1.3 session
 *   tickets were still being written, right after a handshake.
 * - `tls.connect({ host, port })`: the TLSSocket owns its TCP handle, `_handle._parent`, and
 *   TLSWrap's close() closes it with `_parent.close(done)`. That handle's own `reset` has the
 *   same callback contract (TCPWrap::Reset: SO_LINGER 0, then close): put it in close's place.
 * Without these internals a TLS socket is destroyed: a FIN, as before.
 */
function resetTlsSocket(socket: tls.TLSSocket): void {
  if (resettingTls.has(socket)) return;
  resettingTls.add(socket);
  const parent = tlsParentOf(socket);
  if (parent) {
    // A parent destroyed by someone else still emits 'close', which destroys this socket.
    parent.once('close', () => socket.destroy());
    resetSocket(parent);
    return;
  }
  const tcp = (socket as unknown as TlsInternals)._handle?._parent;
  if (tcp && typeof tcp.reset === 'function') {
    tcp.close = tcp.reset;
    socket.destroy();
    return;
  }
  // Not laid out like a Node 20 TLSSocket (or only marked `encrypted`): try a plain reset.
  try {
    socket.resetAndDestroy();
  } catch {
    socket.destroy();
  }
}
