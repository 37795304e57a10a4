/**
 * Admission: what happens to one accepted connection before it may become a session. In
 * order: the peer must still be known (a connection reset before we looked has no address to
 * check and is reset unread); a server that is shutting down answers 421; a PROXY header
 * (only from trusted senders) says who the client really is, and a LOCAL header is a load
 * balancer's health check; the ACL and the session limits are checked on that client.
 * Refusals are carried out here, logged and counted; the caller gets a discriminated result.
 *
 * Two steps will join: the original destination (transparent mode, after the PROXY header)
 * and implicit TLS (after the limits, before the session is built).
 */
import type net from 'node:net';
import { readProxyHeader } from '../data/proxy-header.js';
import { addressesOf, type SocketAddresses } from '../data/socket-address.js';
import { resetSocket } from '../data/relay.js';
import { normalizeIp } from '../control/ip.js';
import type { ProxyProtocolVersion } from '../control/proxy-protocol.js';
import { REPLY_FOR_CODE, type ErrorCode } from '../errors.js';
import type { Logger } from '../log.js';
import type { ProxyMetrics, RejectionReason } from '../metrics.js';
import { originalDestinationOf } from './original-destination.js';
import type { SessionEndpoints } from '../session.js';
import { aclAllows, inAnyCidr } from './acl.js';
import type { ListenerSettings } from './listener-runtime.js';
import type { SessionSlots } from './session-slots.js';

/** How long a refused connection may linger after its 421 before it is destroyed. */
export const REFUSAL_LINGER_MS = 2000;

/** Why a connection did not become a session. */
export type RefusalReason =
  | Extract<RejectionReason, 'peer-gone' | 'proxy-protocol' | 'acl-deny' | 'sessions-total' | 'sessions-per-ip'>
  /** The server is draining or closed. */
  | 'shutting-down'
  /** A PROXY LOCAL header: the load balancer checking that we are there. */
  | 'health-check';

/**
 * What the connection got: `reset` (RST, unread), `close` (closed without a byte), `end`
 * (a quiet FIN), `reply` (a 421 line, then closed once the client closes or after a linger).
 */
export type RefusalAction = 'reset' | 'close' | 'end' | 'reply';

export type AdmissionResult =
  | {
      readonly kind: 'admitted';
      readonly endpoints: SessionEndpoints;
      /** The listener settings in force when the connection arrived: build the session from these. */
      readonly settings: ListenerSettings;
      /** Give back the session slot admission took (call once the session has closed). */
      readonly release: () => void;
    }
  | { readonly kind: 'refused'; readonly reason: RefusalReason; readonly how: RefusalAction };

type Refused = Extract<AdmissionResult, { kind: 'refused' }>;

/** The listener as admission sees it (a ListenerRuntime). */
export interface AdmissionListener {
  readonly name: string;
  readonly settings: ListenerSettings;
  readonly log: Logger;
  readonly slots: SessionSlots;
}

export interface AdmissionDeps {
  readonly metrics: ProxyMetrics;
  /** False once the server drains; asked on arrival and again after the PROXY header. */
  readonly accepting: () => boolean;
}

/** Admit or refuse one connection `listener` accepted (still paused: pauseOnConnect). */
export async function admitConnection(socket: net.Socket, listener: AdmissionListener, deps: AdmissionDeps): Promise<AdmissionResult> {
  socket.on('error', ignoreError); // a reset during admission must not crash the process
  const settings = listener.settings;
  // Before anything else: a peer that reset the connection before we looked has no address
  // to check against the ACL or the limits, so it gets nothing (issue #10; socket-address.ts).
  const addresses = addressesOf(socket);
  if (!addresses) {
    deps.metrics.limitHit(listener.name, 'peer-gone');
    listener.log.debug({ event: 'rejected', limit: 'peer-gone' }, 'connection reset before admission; closed unread');
    resetSocket(socket);
    return refused('peer-gone', 'reset');
  }
  if (!deps.accepting()) return refuseShutdown(socket);
  let endpoints: SessionEndpoints = { client: addresses.remote, dialled: addresses.local, local: addresses.local, initialData: null };
  // Interception: read where the client was going at once; the conntrack entry behind it can
  // go (client reset) or be reused by a new flow (upstream-selection.md B4) if we wait.
  if (settings.config.upstream.selection.kind === 'transparent') endpoints = { ...endpoints, original: originalDestinationOf(socket) };
  const { accept } = settings.config.proxyProtocol;
  if (accept !== 'off') {
    const fromHeader = await readClientFromHeader(socket, listener, settings, accept, addresses, deps);
    if (fromHeader.kind === 'refused') return fromHeader;
    endpoints = fromHeader.endpoints;
    if (!deps.accepting() || socket.destroyed) return refuseShutdown(socket);
  }
  return checkPolicy(socket, listener, settings, endpoints, deps);
}

/**
 * The PROXY header (HAProxy's PROXY protocol v1/v2) from a trusted load balancer: its source
 * is the client, its destination what the client dialled; bytes behind it are already FTP.
 */
async function readClientFromHeader(
  socket: net.Socket,
  listener: AdmissionListener,
  settings: ListenerSettings,
  accept: ProxyProtocolVersion,
  addresses: SocketAddresses,
  deps: AdmissionDeps,
): Promise<{ readonly kind: 'header'; readonly endpoints: SessionEndpoints } | Refused> {
  const pp = settings.config.proxyProtocol;
  const peer = addresses.remote;
  if (!inAnyCidr(peer.ip, pp.from)) {
    rejected(listener, deps, 'proxy-protocol', { from: `${peer.ip}:${peer.port}`, err: 'sender is not a trusted load balancer' });
    socket.destroy();
    return refused('proxy-protocol', 'close');
  }
  try {
    const { header, rest } = await readProxyHeader(socket, accept, pp.timeoutMs);
    if (header.command === 'local') {
      // Load-balancer health check (v2 LOCAL / v1 UNKNOWN): nothing to proxy.
      listener.log.debug({ event: 'proxy-local', from: `${peer.ip}:${peer.port}` }, 'PROXY LOCAL connection closed');
      socket.end();
      socket.setTimeout(REFUSAL_LINGER_MS, () => socket.destroy());
      return refused('health-check', 'end');
    }
    return {
      kind: 'header',
      endpoints: {
        client: { ip: normalizeIp(header.source.host), port: header.source.port },
        dialled: { ip: normalizeIp(header.destination.host), port: header.destination.port },
        local: addresses.local,
        initialData: rest,
      },
    };
  } catch (err) {
    rejected(listener, deps, 'proxy-protocol', { from: `${peer.ip}:${peer.port}`, err: (err as Error).message });
    socket.destroy();
    return refused('proxy-protocol', 'close');
  }
}

/**
 * ACL and session limits on the real client. Synchronous from the limit check to taking the
 * slot, so no other connection can take the same last slot in between.
 */
function checkPolicy(
  socket: net.Socket,
  listener: AdmissionListener,
  settings: ListenerSettings,
  endpoints: SessionEndpoints,
  deps: AdmissionDeps,
): AdmissionResult {
  const { acl, limits } = settings.config;
  const clientIp = endpoints.client.ip;
  const client = `${clientIp}:${endpoints.client.port}`;
  if (!aclAllows(clientIp, settings.config)) {
    rejected(listener, deps, 'acl-deny', { client });
    refuseConnection(socket, 'FTPP_ERR_ACL_DENIED', acl.action);
    return refused('acl-deny', acl.action);
  }
  if (listener.slots.total >= limits.maxSessions) {
    rejected(listener, deps, 'sessions-total', { client, max: limits.maxSessions });
    refuseConnection(socket, 'FTPP_ERR_TOO_MANY_SESSIONS', 'reply');
    return refused('sessions-total', 'reply');
  }
  if (listener.slots.heldBy(clientIp) >= limits.maxSessionsPerIp) {
    rejected(listener, deps, 'sessions-per-ip', { client, max: limits.maxSessionsPerIp });
    refuseConnection(socket, 'FTPP_ERR_TOO_MANY_SESSIONS', 'reply');
    return refused('sessions-per-ip', 'reply');
  }
  return { kind: 'admitted', endpoints, settings, release: listener.slots.take(clientIp) };
}

/**
 * Refuse a connection: `close` destroys it without a byte; `reply` sends the code's 421 line,
 * then closes once the client does (bounded by REFUSAL_LINGER_MS).
 */
export function refuseConnection(socket: net.Socket, code: ErrorCode, action: 'reply' | 'close'): void {
  if (action === 'close') {
    socket.destroy();
    return;
  }
  socket.end(`${REPLY_FOR_CODE[code]}\r\n`);
  // Read (and drop) what the client still sends so its FIN is seen and the socket closes as
  // soon as the client does; the timer only bounds a client that never closes.
  socket.resume();
  socket.once('end', () => socket.destroy());
  socket.setTimeout(REFUSAL_LINGER_MS, () => socket.destroy());
}

function refuseShutdown(socket: net.Socket): Refused {
  refuseConnection(socket, 'FTPP_ERR_SHUTDOWN', 'reply');
  return refused('shutting-down', 'reply');
}

function rejected(listener: AdmissionListener, deps: AdmissionDeps, reason: RejectionReason, fields: Record<string, unknown>): void {
  deps.metrics.limitHit(listener.name, reason);
  listener.log.warn({ ...fields, event: 'rejected', limit: reason }, `connection refused: ${reason}`);
}

function refused(reason: RefusalReason, how: RefusalAction): Refused {
  return { kind: 'refused', reason, how };
}

function ignoreError(): void {}
