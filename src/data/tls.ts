/**
 * TLS mechanics shared by the control and data connections of both legs (protocol.md §5.4-5.6):
 * waiting for a handshake with a deadline, and the per-FTP-session store that lets TLS ≤ 1.2
 * clients without tickets resume by session ID. No FTP here.
 */
import { createHash } from 'node:crypto';
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
/** Sessions (tickets included) one FTP session may resume from; more are forgotten oldest first. */
const MAX_ISSUED_SESSIONS = 64;

/**
 * The TLS sessions of one FTP session, server side: the `server` its TLSSockets report new
 * sessions to and ask for old ones (Node emits `newSession` / `resumeSession` on it;
 * lib/_tls_wrap.js), and the fingerprints of every session issued to it, so that a data
 * connection can be checked to resume one of them (protocol.md §5.5; rclone#7234: a cache
 * shared across control connections resumes the wrong session).
 *
 * The listener's SecureContext (certificate, key, ticket keys) is shared by all FTP sessions;
 * the binding is here, with one scope per TLS socket (socketScope). A resumed session carries the master secret of the session it resumes
 * (TLS 1.2: the full handshake's; TLS 1.3: the ticket's resumption PSK), so a data connection
 * is bound when the fingerprint of its session's master key is one this FTP session was
 * issued: its control connection's own session (TLS 1.2 tickets never reach `newSession`), and
 * every session Node reported through `newSession` (each TLS 1.3 ticket, TLS 1.2 session IDs),
 * data connections' own tickets included. Verified against Node 20 / OpenSSL 3 for TLS 1.3
 * tickets, TLS 1.2 tickets and TLS 1.2 session IDs; a session from another FTP session is
 * never bound.
 */
export class TlsSessionBinding {
  private readonly stored = new Map<string, Buffer>();
  private readonly issued = new Set<string>();

  /**
   * The `server` for one TLSSocket (`new tls.TLSSocket(…, { isServer: true, server })`). What
   * it reports is held until `admit()` (the control connection; a bound data connection) and
   * dropped by `refuse()`: a data connection that is refused must not leave a session behind
   * that a second connection could then resume (that would be a way around the binding).
   */
  socketScope(): { readonly emitter: EventEmitter; admit(socket: tls.TLSSocket): void; refuse(): void } {
    const emitter = new EventEmitter();
    let pending: Array<[string, Buffer]> | null = [];
    let admitted = false;
    emitter.on('newSession', (id: Buffer, data: Buffer, done: () => void) => {
      if (admitted) this.store(id.toString('hex'), data);
      else pending?.push([id.toString('hex'), data]);
      done();
    });
    emitter.on('resumeSession', (id: Buffer, done: (err: Error | null, data: Buffer | null) => void) => {
      done(null, this.stored.get(id.toString('hex')) ?? null);
    });
    // Node reports a handshake error of a socket with a `server` here as well; the socket's own
    // 'error' handler deals with it.
    emitter.on('tlsClientError', () => {});
    return {
      emitter,
      admit: (socket) => {
        admitted = true;
        for (const [id, data] of pending ?? []) this.store(id, data);
        pending = null;
        // TLS 1.2 tickets never reach newSession: the handshake's own session is the one resumed.
        this.remember(socket.getSession());
      },
      refuse: () => {
        pending = null;
      },
    };
  }

  /** True when `socket` resumed a session this FTP session was issued. */
  resumesOwnSession(socket: tls.TLSSocket): boolean {
    if (!socket.isSessionReused()) return false;
    const fingerprint = masterKeyFingerprint(socket.getSession());
    return fingerprint !== null && this.issued.has(fingerprint);
  }

  private store(id: string, data: Buffer): void {
    this.stored.set(id, data);
    if (this.stored.size > MAX_STORED_SESSIONS) this.stored.delete(this.stored.keys().next().value!);
    this.remember(data);
  }

  private remember(session: Buffer | undefined): void {
    const fingerprint = masterKeyFingerprint(session);
    if (fingerprint === null) return;
    this.issued.add(fingerprint);
    if (this.issued.size > MAX_ISSUED_SESSIONS) this.issued.delete(this.issued.values().next().value!);
  }
}

/**
 * SHA-256 of the master key in a DER SSL_SESSION (OpenSSL ssl_asn1.c: SEQUENCE { version,
 * ssl_version, cipher, session_id, master_key, … }); null when there is none or the bytes do
 * not parse. Only the fingerprint is kept.
 */
export function masterKeyFingerprint(der: Buffer | undefined): string | null {
  if (!der) return null;
  let offset = 0;
  const header = (): { tag: number; length: number } | null => {
    if (offset + 2 > der.length) return null;
    const tag = der[offset++]!;
    let length = der[offset++]!;
    if (length & 0x80) {
      const bytes = length & 0x7f;
      if (bytes === 0 || bytes > 3 || offset + bytes > der.length) return null;
      length = 0;
      for (let k = 0; k < bytes; k++) length = length * 256 + der[offset++]!;
    }
    return { tag, length };
  };
  const sequence = header();
  if (!sequence || sequence.tag !== 0x30) return null;
  for (const expected of [0x02, 0x02, 0x04, 0x04]) {
    const field = header();
    if (!field || field.tag !== expected || offset + field.length > der.length) return null;
    offset += field.length;
  }
  const masterKey = header();
  if (!masterKey || masterKey.tag !== 0x04 || masterKey.length === 0 || offset + masterKey.length > der.length) return null;
  return createHash('sha256').update(der.subarray(offset, offset + masterKey.length)).digest('hex');
}
