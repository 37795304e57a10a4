/**
 * TLS toward the server (issue #12, protocol.md §5.4-5.6, `upstream.tls`): securing the control
 * connection before the session uses it, and the server's PROT P data connections.
 *
 * - Explicit: the greeting, `AUTH TLS` -> 234, the handshake, `PBSZ 0` -> 200, `PROT P` -> 200.
 *   Implicit (port 990): the handshake at connect, the greeting over TLS, then PBSZ/PROT
 *   ([MS-FTPS]: implied, but vsftpd and others accept them and some need them). All of it
 *   happens before the session sees the server, so the client's first command (USER) never
 *   crosses in clear text, and a server that will not do TLS costs the client a 421 in place
 *   of the greeting, never a silent plain fallback.
 * - Certificates are verified by default (`verify: false` is a config warning).
 * - Data: vsftpd's require_ssl_reuse=YES (its default) refuses a data connection that does
 *   not resume the control session, at TLS 1.2 and 1.3 alike, so every data connection offers
 *   the newest session the control connection received (Node's 'session' event; under TLS 1.3
 *   it fires after the handshake, maybe several times). The data handshake starts at once and
 *   the transfer command is sent without waiting for it: vsftpd handshakes only after its 150.
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import type { UpstreamTlsConfig } from '../config/schema.js';
import { LineFramer } from '../control/line-framer.js';
import { ReplyAssembler, type Reply } from '../control/reply.js';
import { handshakeDone } from '../data/tls.js';
import { resetSocket } from '../data/relay.js';
import { ProxyError } from '../errors.js';
import type { Logger } from '../log.js';
import type { TlsChannel, TlsHandshakeResult } from '../metrics.js';
import type { SecureDataLeg } from './client-tls.js';

export interface UpstreamTlsLimits {
  readonly handshakeMs: number;
  /** How long each reply of the negotiation may take. */
  readonly replyMs: number;
  readonly maxLineBytes: number;
  readonly maxReplyBytes: number;
}

export interface UpstreamTlsHooks {
  handshake(channel: TlsChannel, result: TlsHandshakeResult): void;
}

/** A secured control connection, and the server's greeting to relay to the client as is. */
export interface SecuredUpstream {
  readonly socket: net.Socket;
  /** The server's greeting (every reply up to its final one: `120` then `220`), raw. */
  readonly greeting: Buffer;
}

export class UpstreamTls {
  private readonly config: UpstreamTlsConfig;
  private readonly limits: UpstreamTlsLimits;
  private readonly log: Logger;
  private readonly hooks: UpstreamTlsHooks;
  private session: Buffer | null = null;
  private controlVersion: string | null = null;

  constructor(config: UpstreamTlsConfig, limits: UpstreamTlsLimits, log: Logger, hooks: UpstreamTlsHooks) {
    this.config = config;
    this.limits = limits;
    this.log = log;
    this.hooks = hooks;
  }

  get version(): string | null {
    return this.controlVersion;
  }

  /**
   * Secure a freshly connected control socket. A greeting that is not 2yz (`421 Too many
   * users`) is handed back on whatever socket there is, for the session to relay; anything
   * else that goes wrong rejects with FTPP_ERR_UPSTREAM_TLS (the caller destroys `plain`).
   */
  async secure(plain: net.Socket): Promise<SecuredUpstream> {
    let socket: net.Socket = plain;
    let reader: ReplyReader | null = null;
    try {
      if (this.config.mode === 'implicit') socket = await this.handshake(plain);
      reader = new ReplyReader(socket, this.limits);
      const greeting = await reader.greeting();
      if (greeting.code < 200 || greeting.code >= 300) return { socket: reader.release(), greeting: greeting.raw };
      if (this.config.mode === 'explicit') {
        await reader.expect('AUTH TLS', 234);
        reader.release();
        socket = await this.handshake(plain);
        reader = new ReplyReader(socket, this.limits);
      }
      // RFC 4217 §9: PBSZ 0 before PROT; PROT P for every data connection (vsftpd forces data TLS for local users).
      await reader.expect('PBSZ 0', 200);
      await reader.expect('PROT P', 200);
      return { socket: reader.release(), greeting: greeting.raw };
    } catch (err) {
      reader?.release();
      if (socket !== plain) resetSocket(socket);
      throw err instanceof ProxyError ? err : new ProxyError('FTPP_ERR_UPSTREAM_TLS', (err as Error).message, { cause: err });
    }
  }

  /** Secure the server's data connections (always PROT P toward a TLS server). */
  dataLeg(): SecureDataLeg {
    return async (plain, adopt) => {
      const socket = tls.connect({ ...this.identity(), socket: plain, ...(this.session ? { session: this.session } : {}) });
      adopt(socket);
      try {
        await handshakeDone(socket, 'client', this.limits.handshakeMs, 'FTPP_ERR_TLS_DATA_HANDSHAKE');
      } catch (err) {
        this.hooks.handshake('data', 'failed');
        this.log.warn({ event: 'tls-data-refused', leg: 'server', code: 'FTPP_ERR_TLS_DATA_HANDSHAKE', err: (err as Error).message }, 'server data connection TLS handshake failed');
        resetSocket(socket);
        throw err;
      }
      this.hooks.handshake('data', 'ok');
      this.log.debug({ event: 'tls-data', leg: 'server', tlsVersion: socket.getProtocol(), resumed: socket.isSessionReused() }, 'server data connection secured');
      return socket;
    };
  }

  private async handshake(plain: net.Socket): Promise<tls.TLSSocket> {
    const socket = tls.connect({ ...this.identity(), socket: plain });
    socket.on('session', (session: Buffer) => {
      this.session = session;
    });
    try {
      await handshakeDone(socket, 'client', this.limits.handshakeMs, 'FTPP_ERR_UPSTREAM_TLS');
    } catch (err) {
      this.hooks.handshake('control', 'failed');
      resetSocket(socket);
      throw err;
    }
    this.controlVersion = socket.getProtocol();
    this.hooks.handshake('control', 'ok');
    this.log.info({ event: 'tls-server', tlsVersion: this.controlVersion, mode: this.config.mode, verified: this.config.verify }, 'server control connection secured');
    return socket;
  }

  /** What the certificate is checked against; SNI only for a name (RFC 6066 §3: never an address). */
  private identity(): tls.ConnectionOptions {
    const { servername, verify } = this.config;
    return {
      ...(net.isIP(servername) ? { host: servername } : { servername }),
      secureContext: trustContextFor(this.config),
      rejectUnauthorized: verify,
    };
  }
}

/**
 * One client SecureContext per `upstream.tls` section (a reload makes a new one): `ca` given to
 * tls.connect would build a context, parsing every CA certificate, on each connection.
 */
const trustContexts = new WeakMap<UpstreamTlsConfig, tls.SecureContext>();

function trustContextFor(config: UpstreamTlsConfig): tls.SecureContext {
  let context = trustContexts.get(config);
  if (!context) {
    context = tls.createSecureContext({ ca: config.caPem ?? systemTrust() });
    trustContexts.set(config, context);
  }
  return context;
}

/** Where distributions keep their CA bundle (Debian/Ubuntu, then RHEL/Fedora). */
const SYSTEM_CA_BUNDLES = ['/etc/ssl/certs/ca-certificates.crt', '/etc/pki/tls/certs/ca-bundle.crt'];
let systemTrustCache: string[] | null = null;

/** No `ca`: Node's bundled roots plus the system bundle, read once per process. */
function systemTrust(): string[] {
  if (systemTrustCache) return systemTrustCache;
  const roots = [...tls.rootCertificates];
  for (const path of SYSTEM_CA_BUNDLES) {
    try {
      roots.push(readFileSync(path, 'utf8'));
      break;
    } catch {
      // not this distribution's layout
    }
  }
  systemTrustCache = roots;
  return roots;
}

/**
 * Reads the server's replies during the negotiation, before the session's own reader takes
 * the connection. Bounded like it (line and reply size), one reply at a time with a deadline.
 */
class ReplyReader {
  private readonly socket: net.Socket;
  private readonly limits: UpstreamTlsLimits;
  private readonly framer: LineFramer;
  private readonly assembler: ReplyAssembler;
  private readonly replies: Reply[] = [];
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(socket: net.Socket, limits: UpstreamTlsLimits) {
    this.socket = socket;
    this.limits = limits;
    this.framer = new LineFramer(limits.maxLineBytes);
    this.assembler = new ReplyAssembler(limits.maxReplyBytes);
    socket.on('data', this.onData);
    socket.on('close', this.onClose);
    socket.on('error', this.onError);
    socket.resume();
  }

  /** Every reply up to the first that is not 1yz (RFC 959 §5.4: `120` then `220`); the raw bytes of all. */
  async greeting(): Promise<Reply> {
    const parts: Buffer[] = [];
    for (;;) {
      const reply = await this.next('the greeting');
      parts.push(reply.raw);
      if (reply.code >= 200) return { ...reply, raw: Buffer.concat(parts) };
    }
  }

  /** Send `command`; anything but `code` is a refusal, told with the server's words. */
  async expect(command: string, code: number): Promise<void> {
    this.socket.write(`${command}\r\n`);
    const reply = await this.next(command);
    if (reply.code !== code) throw new ProxyError('FTPP_ERR_UPSTREAM_TLS', `server answered ${command} with "${(reply.lines[0] ?? '').slice(0, 200)}"`);
    if (this.replies.length > 0 || this.framer.pending.length > 0) {
      // Nothing may follow: after 234 the next bytes must be the server's TLS handshake.
      throw new ProxyError('FTPP_ERR_UPSTREAM_TLS', `server sent more than one reply to ${command}`);
    }
  }

  /** Stop reading; the socket is paused for its next owner. */
  release(): net.Socket {
    this.socket.pause();
    this.socket.removeListener('data', this.onData);
    this.socket.removeListener('close', this.onClose);
    this.socket.removeListener('error', this.onError);
    return this.socket;
  }

  private async next(what: string): Promise<Reply> {
    const deadline = setTimeout(() => this.fail(new ProxyError('FTPP_ERR_UPSTREAM_TLS', `server did not answer ${what} within ${this.limits.replyMs} ms`)), this.limits.replyMs);
    try {
      while (this.replies.length === 0) {
        if (this.failure) throw this.failure;
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
      return this.replies.shift()!;
    } finally {
      clearTimeout(deadline);
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.wake?.();
  }

  private readonly onData = (chunk: Buffer): void => {
    const framed = this.framer.push(chunk);
    if (framed.overflow) return this.fail(new ProxyError('FTPP_ERR_UPSTREAM_TLS', 'server reply line too long'));
    for (const line of framed.lines) {
      const pushed = this.assembler.push(line);
      if (pushed.kind === 'error') return this.fail(new ProxyError('FTPP_ERR_UPSTREAM_TLS', 'server sent something that is not an FTP reply'));
      if (pushed.kind === 'reply') this.replies.push(pushed.reply);
    }
    this.wake?.();
  };

  private readonly onClose = (): void => this.fail(new ProxyError('FTPP_ERR_UPSTREAM_TLS', 'server closed the connection during the TLS negotiation'));

  private readonly onError = (err: Error): void => this.fail(new ProxyError('FTPP_ERR_UPSTREAM_TLS', err.message, { cause: err }));
}
