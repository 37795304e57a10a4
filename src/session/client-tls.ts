/**
 * TLS toward the client (issue #12, protocol.md §5): what the client's leg has negotiated
 * (control/security.ts decides, this carries it out), the control connection's handshake
 * (after `234`, or at connect for implicit FTPS), and the client's PROT P data connections.
 *
 * - The proxy is the TLS server on every client data connection, PASV or PORT alike
 *   (protocol.md §5.4: vsftpd ssl_accept()s in both modes).
 * - Binding data sessions to their control session (protocol.md §5.5, §5.6): one SecureContext
 *   per listener configuration (certificate, key, ticket keys: parsing them costs 1.7 ms and
 *   25 KiB, too much per session), and per FTP session a TlsSessionBinding (data/tls.ts) that
 *   knows every session issued to it and stores its session IDs. A data connection must resume
 *   one of those: a fresh handshake, or a ticket or session ID from another control
 *   connection, is not bound. With `dataSessionReuse: required` it is refused, as vsftpd
 *   (require_ssl_reuse) and FileZilla Server do.
 */
import type net from 'node:net';
import tls from 'node:tls';
import type { ClientTlsConfig } from '../config/schema.js';
import { initialProtection, type ClientProtection, type ProtectionLevel } from '../control/security.js';
import { handshakeDone, TlsSessionBinding } from '../data/tls.js';
import { resetSocket } from '../data/relay.js';
import { dataTlsGate } from '../data/splice-relay.js';
import { ProxyError } from '../errors.js';
import type { Logger } from '../log.js';
import type { TlsChannel, TlsHandshakeResult } from '../metrics.js';
import type { ControlConnection } from './control-connection.js';

/** Wrap one data socket in TLS; `adopt` is told the TLS socket at once, so its owner can reset it. */
export type SecureDataLeg = (plain: net.Socket, adopt: (secure: net.Socket) => void) => Promise<net.Socket>;

export interface ClientTlsHooks {
  handshake(channel: TlsChannel, result: TlsHandshakeResult): void;
}

export class ClientTls {
  private readonly config: ClientTlsConfig | null;
  private readonly handshakeMs: number;
  private readonly log: Logger;
  private readonly hooks: ClientTlsHooks;
  private state: ClientProtection;
  private binding: TlsSessionBinding | null = null;
  private controlVersion: string | null = null;

  constructor(config: ClientTlsConfig | null, handshakeMs: number, log: Logger, hooks: ClientTlsHooks) {
    this.config = config;
    this.handshakeMs = handshakeMs;
    this.log = log;
    this.hooks = hooks;
    this.state = initialProtection(config ? { mode: config.mode, require: config.require } : null);
  }

  get protection(): ClientProtection {
    return this.state;
  }

  get isImplicit(): boolean {
    return this.config?.mode === 'implicit';
  }

  /** The control connection's TLS version, null while it is plain (for logs). */
  get version(): string | null {
    return this.controlVersion;
  }

  setProt(prot: ProtectionLevel): void {
    this.state = { ...this.state, prot };
  }

  /**
   * Turn the control connection into TLS and wait for the handshake. `alreadyRead` is what
   * arrived before (behind a PROXY header, implicit FTPS). Rejects with FTPP_ERR_TLS_HANDSHAKE;
   * the caller closes the connection.
   */
  async secureControl(connection: ControlConnection, alreadyRead: Buffer | null = null): Promise<void> {
    const { context, binding } = this.ensureContext();
    const scope = binding.socketScope();
    const socket = connection.upgrade((plain) => new tls.TLSSocket(plain, { isServer: true, secureContext: context, server: scope.emitter as unknown as net.Server }), alreadyRead);
    // Reading starts only now: resumed before the upgrade, the plain socket would hand
    // bytes put back for the TLS layer (alreadyRead) to a reader that is gone.
    connection.start();
    try {
      await handshakeDone(socket, 'server', this.handshakeMs, 'FTPP_ERR_TLS_HANDSHAKE');
    } catch (err) {
      this.hooks.handshake('control', 'failed');
      throw err;
    }
    scope.admit(socket);
    this.controlVersion = socket.getProtocol();
    this.state = { ...this.state, secured: true };
    this.hooks.handshake('control', 'ok');
    this.log.info({ event: 'tls-client', tlsVersion: this.controlVersion, cipher: socket.getCipher().name, mode: this.config?.mode }, 'client control connection secured');
  }

  /** The client's data connections are TLS now (PROT P on a secured control connection). */
  get protectsData(): boolean {
    return this.state.secured && this.state.prot === 'P' && this.binding !== null;
  }

  /** How to secure the client's data connections now: null while data is in the clear (PROT C, plain control). */
  dataLeg(): SecureDataLeg | null {
    if (!this.protectsData) return null;
    const { context, binding } = this.ensureContext();
    const required = this.config?.dataSessionReuse === 'required';
    return async (plain, adopt) => {
      const scope = binding.socketScope();
      const gate = dataTlsGate(plain, 'server', this.controlVersion);
      const socket = new tls.TLSSocket(gate ?? plain, { isServer: true, secureContext: context, server: scope.emitter as unknown as net.Server });
      gate?.attach(socket);
      adopt(socket);
      try {
        await handshakeDone(socket, 'server', this.handshakeMs, 'FTPP_ERR_TLS_DATA_HANDSHAKE');
      } catch (err) {
        scope.refuse();
        this.hooks.handshake('data', 'failed');
        this.log.warn({ event: 'tls-data-refused', leg: 'client', code: 'FTPP_ERR_TLS_DATA_HANDSHAKE', err: (err as Error).message }, 'client data connection TLS handshake failed');
        resetSocket(socket);
        throw err;
      }
      const resumed = binding.resumesOwnSession(socket);
      if (!resumed && required) {
        scope.refuse();
        this.hooks.handshake('data', 'not-resumed');
        this.log.warn({ event: 'tls-data-refused', leg: 'client', code: 'FTPP_ERR_TLS_DATA_NOT_RESUMED', tlsVersion: socket.getProtocol() }, 'client data connection did not resume its control connection\'s TLS session; refused');
        resetSocket(socket);
        throw new ProxyError('FTPP_ERR_TLS_DATA_NOT_RESUMED', 'the data connection did not resume the control connection\'s TLS session');
      }
      scope.admit(socket);
      this.hooks.handshake('data', 'ok');
      this.log.debug({ event: 'tls-data', leg: 'client', tlsVersion: socket.getProtocol(), resumed }, 'client data connection secured');
      await gate?.flushed();
      return socket;
    };
  }

  private ensureContext(): { context: tls.SecureContext; binding: TlsSessionBinding } {
    const config = this.config;
    if (!config) throw new ProxyError('FTPP_ERR_INTERNAL', 'TLS used on a listener without tls');
    this.binding ??= new TlsSessionBinding();
    return { context: listenerContext(config), binding: this.binding };
  }
}

/** One server SecureContext per `tls` section (a reload makes a new section, so a new context and new ticket keys). */
const listenerContexts = new WeakMap<ClientTlsConfig, tls.SecureContext>();

function listenerContext(config: ClientTlsConfig): tls.SecureContext {
  let context = listenerContexts.get(config);
  if (!context) {
    context = tls.createSecureContext({ cert: config.certPem, key: config.keyPem, minVersion: config.minVersion });
    listenerContexts.set(config, context);
  }
  return context;
}
