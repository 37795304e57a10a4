/**
 * Socket helpers for tests: read a socket to its end telling a FIN from a reset, a connected
 * loopback pair, a writer that honours backpressure. Every wait is bounded.
 */
import net from 'node:net';
import { isTlsSocket, tlsParentOf } from '../../src/data/relay.js';
import { DEFAULT_WAIT_MS, withTimeout } from './async.js';
import type { TeardownHost } from './tap.js';

export interface ReadResult {
  readonly data: Buffer;
  /** 'end' = clean FIN, 'error' = reset or other error, 'close' = closed without either. */
  readonly outcome: 'end' | 'error' | 'close';
  readonly error: NodeJS.ErrnoException | null;
}

/**
 * Read a socket until it ends, errors or closes (bounded). A half-open socket is ended from
 * our side when the peer's FIN arrives, unless `endOnEnd` is false (the caller still writes).
 *
 * Tells a reset from a FIN even when libuv reports the RST as EOF (it does when the RST lands
 * while this socket's reading is stopped: POLLHUP after a partial read): on 'end' a
 * zero-length write is sent; it succeeds on a half-closed connection and fails with
 * ECONNRESET/EPIPE on a reset one. For a TLS socket the probe goes to the TCP socket under it:
 * a zero-length write to a TLSSocket stays in Node's TLS layer, and Node takes any EOF for an
 * 'end', so a reset TLS peer looked like a clean end (seen once in test/data).
 */
export function readAll(socket: net.Socket, timeoutMs = DEFAULT_WAIT_MS, endOnEnd = true): Promise<ReadResult> {
  const chunks: Buffer[] = [];
  const result = new Promise<ReadResult>((resolve) => {
    let error: NodeJS.ErrnoException | null = null;
    let ended = false;
    const probe = isTlsSocket(socket) ? tlsParentOf(socket) : socket;
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.once('end', () => {
      const confirm = (): void => {
        ended = true;
        // Half-open sockets stay open until our side ends too.
        if (endOnEnd && !socket.writableEnded) socket.end();
      };
      // Nothing to probe with (our side ended, writes queued, no TCP socket in reach): trust it.
      if (socket.destroyed || socket.writableEnded || socket.writableLength > 0) return confirm();
      if (!probe || probe.destroyed || probe.writableEnded || probe.writableLength > 0) return confirm();
      probe.write(Buffer.alloc(0), (err) => {
        if (err) error ??= err as NodeJS.ErrnoException;
        else confirm();
      });
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      error ??= err;
    });
    if (probe && probe !== socket) probe.on('error', (err: NodeJS.ErrnoException) => (error ??= err));
    socket.once('close', () => {
      resolve({ data: Buffer.concat(chunks), outcome: error ? 'error' : ended ? 'end' : 'close', error });
    });
    socket.resume();
  });
  return withTimeout(result, timeoutMs, 'read data socket to the end');
}

/** One connected socket pair: `app` plays the real client or server, the relay owns `inner`. */
export interface SocketPair {
  /** The outer end (the "real" client or server). */
  readonly app: net.Socket;
  /** The end the relay owns. */
  readonly inner: net.Socket;
}

/**
 * A connected TCP pair on 127.0.0.1, both ends allowHalfOpen, the inner end paused (as a data
 * channel hands it over). Both ends are destroyed at `owner`'s teardown.
 */
export async function socketPair(owner: TeardownHost): Promise<SocketPair> {
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as net.AddressInfo).port;
  const innerP = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const app = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => {
    app.once('connect', () => resolve());
    app.once('error', reject);
  });
  const inner = await innerP;
  server.close();
  owner.teardown(() => {
    app.destroy();
    inner.destroy();
  });
  return { app, inner };
}

/** Write `total` bytes honouring the writer's own backpressure, then FIN. */
export async function writeWithBackpressure(socket: net.Socket, total: number, chunkSize = 64 * 1024): Promise<void> {
  const chunk = Buffer.alloc(chunkSize, 0x61);
  let sent = 0;
  while (sent < total) {
    const n = Math.min(chunkSize, total - sent);
    sent += n;
    if (!socket.write(n === chunkSize ? chunk : chunk.subarray(0, n))) {
      await new Promise<void>((resolve) => socket.once('drain', () => resolve()));
    }
  }
  socket.end();
}
