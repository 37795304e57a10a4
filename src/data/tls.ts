/**
 * TLS mechanics shared by the control and data connections of both legs (protocol.md §5.4-5.6):
 * waiting for a handshake with a deadline, and the per-FTP-session store that lets TLS ≤ 1.2
 * clients without tickets resume by session ID. No FTP here.
 */
import { EventEmitter } from 'node:events';
import type net from 'node:net';
import type tls from 'node:tls';
import { ProxyError, type ErrorCode } from '../errors.js';

/**
 * Resolve once `socket`'s handshake is done (`secure` on the TLS server side, `secureConnect`
 * on the client side); reject with a ProxyError carrying `code` on an error, a close, or after
 * `timeoutMs`. The socket is not destroyed here: its owner does that, once.
 */
export function handshakeDone(socket: tls.TLSSocket, role: 'server' | 'client', timeoutMs: number, code: ErrorCode): Promise<void> {
  const done = handshakeOutcome(socket, role, timeoutMs, code);
  if (role === 'client') {
    const settled = done.then(noop, noop);
    clientHandshakes.set(socket, settled);
    void settled.then(() => clientHandshakes.delete(socket));
  }
  return done;
}

/** TLS client handshakes in progress (the proxy dialled an FTPS server's data port). */
const clientHandshakes = new WeakMap<tls.TLSSocket, Promise<void>>();

/**
 * Settles when `socket`'s client handshake has ended (either way, bounded by its deadline);
 * undefined when none is in progress. Resetting a data connection while the server is still
 * in its SSL_accept() makes vsftpd end the whole FTP session (ssl.c, ftpdataio.c: a failed
 * data handshake is fatal), whereas a reset after it is an ordinary 426; so the proxy lets a
 * running handshake finish before it resets the connection.
 */
export function clientHandshakeInFlight(socket: net.Socket): Promise<void> | undefined {
  return clientHandshakes.get(socket as tls.TLSSocket);
}

function noop(): void {}

function handshakeOutcome(socket: tls.TLSSocket, role: 'server' | 'client', timeoutMs: number, code: ErrorCode): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const event = role === 'server' ? 'secure' : 'secureConnect';
    const done = (err: Error | null): void => {
      clearTimeout(timer);
      socket.removeListener(event, onSecure);
      socket.removeListener('error', onError);
      socket.removeListener('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onSecure = (): void => done(null);
    const onError = (err: Error): void => done(new ProxyError(code, `TLS handshake failed: ${err.message}`, { cause: err }));
    const onClose = (): void => done(new ProxyError(code, 'connection closed during the TLS handshake'));
    const timer = setTimeout(() => done(new ProxyError(code, `TLS handshake did not complete within ${timeoutMs} ms`)), timeoutMs);
    socket.once(event, onSecure);
    socket.once('error', onError);
    socket.once('close', onClose);
  });
}

/** Sessions one FTP session keeps for ID resumption: a control connection and a few data connections' worth. */
const MAX_STORED_SESSIONS = 16;

/**
 * The `server` a server-side TLSSocket reports new sessions to and asks for old ones
 * (Node emits `newSession` / `resumeSession` on it; lib/_tls_wrap.js). One per FTP session, so
 * a session ID can only be resumed by the data connections of the control connection that
 * made it (rclone#7234: a cache shared across control connections resumes the wrong session).
 * Bounded: the oldest entry goes first.
 */
export function sessionIdStore(): EventEmitter {
  const sessions = new Map<string, Buffer>();
  const store = new EventEmitter();
  store.on('newSession', (id: Buffer, data: Buffer, done: () => void) => {
    sessions.set(id.toString('hex'), data);
    if (sessions.size > MAX_STORED_SESSIONS) sessions.delete(sessions.keys().next().value!);
    done();
  });
  store.on('resumeSession', (id: Buffer, done: (err: Error | null, data: Buffer | null) => void) => {
    done(null, sessions.get(id.toString('hex')) ?? null);
  });
  // Node reports a handshake error of a socket with a `server` here as well; the socket's own
  // 'error' handler deals with it.
  store.on('tlsClientError', () => {});
  return store;
}

/** The protocol version of a TLS socket, or null for a plain one (for logs). */
export function tlsVersionOf(socket: { getProtocol?: () => string | null }): string | null {
  return typeof socket.getProtocol === 'function' ? socket.getProtocol() : null;
}
