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
import type { Reply } from '../control/reply.js';
import { handshakeDone } from '../data/tls.js';
import { resetSocket } from '../data/relay.js';
import { dataTlsGate } from '../data/splice-relay.js';
import { ProxyError } from '../errors.js';
import type { Logger } from '../log.js';
import type { TlsChannel, TlsHandshakeResult } from '../metrics.js';
import type { SecureDataLeg } from './client-tls.js';
import { ReplyReader, type ReplyReaderLimits } from './reply-reader.js';

export interface UpstreamTlsLimits extends ReplyReaderLimits {
  readonly handshakeMs: number;
}

export interface UpstreamTlsHooks {
  handshake(channel: TlsChannel, result: TlsHandshakeResult): void;
}

/** A secured control connection, and the server's greeting to relay to the client as is. */
export interface SecuredUpstream {
  readonly socket: net.Socket;
  /** The server's greeting (every reply up to its final one: `120` then `220`; `raw` holds them all). */
  readonly greeting: Reply;
}

export class UpstreamTls {
  private readonly config: UpstreamTlsConfig;
  private readonly limits: UpstreamTlsLimits;
  private readonly log: Logger;
  private readonly hooks: UpstreamTlsHooks;
  private session: Buffer | null = null;
  private controlVersion: string | null = null;
  /** The name verified in the server's certificate (config, else the session's destination). */
  private servername: string;

  constructor(config: UpstreamTlsConfig, limits: UpstreamTlsLimits, log: Logger, hooks: UpstreamTlsHooks) {
    this.config = config;
    this.limits = limits;
    this.log = log;
    this.hooks = hooks;
    this.servername = config.servername;
  }

  /**
   * The destination this session dials: with forward/transparent selection and no
   * configured `servername`, the certificate must name it (the host the client gave, or the
   * original destination address).
   */
  target(host: string): void {
    this.servername = this.config.servername || host;
  }

  /** The name verified in the server's certificate. */
  get verifiedName(): string {
    return this.servername;
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
      reader = new ReplyReader(socket, this.limits, 'FTPP_ERR_UPSTREAM_TLS');
      const greeting = await reader.greeting();
      if (greeting.code < 200 || greeting.code >= 300) return { socket: reader.release(), greeting };
      if (this.config.mode === 'explicit') {
        await reader.expect('AUTH TLS', 234);
        reader.release();
        socket = await this.handshake(plain);
        reader = new ReplyReader(socket, this.limits, 'FTPP_ERR_UPSTREAM_TLS');
      }
      // RFC 4217 §9: PBSZ 0 before PROT; PROT P for every data connection (vsftpd forces data TLS for local users).
      await reader.expect('PBSZ 0', 200);
      await reader.expect('PROT P', 200);
      return { socket: reader.release(), greeting };
    } catch (err) {
      reader?.release();
      if (socket !== plain) resetSocket(socket);
      throw err instanceof ProxyError ? err : new ProxyError('FTPP_ERR_UPSTREAM_TLS', (err as Error).message, { cause: err });
    }
  }

  /** Secure the server's data connections (always PROT P toward a TLS server). */
  dataLeg(): SecureDataLeg {
    return async (plain, adopt) => {
      const gate = dataTlsGate(plain, 'client', this.controlVersion);
      const socket = tls.connect({ ...this.identity(), socket: gate ?? plain, ...(this.session ? { session: this.session } : {}) });
      gate?.attach(socket);
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
      await gate?.flushed();
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
    const { verify } = this.config;
    const servername = this.servername;
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
