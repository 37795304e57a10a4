/**
 * Security policy for data-connection targets. Pure.
 */
import ipaddr from 'ipaddr.js';
import { isUnroutableIp, sameIp } from './ip.js';
import type { HostPort } from './address.js';

/** Lowest port a client may name in PORT/EPRT (vsftpd sysutil.c vsf_sysutil_is_port_reserved; RFC 2577 §3). */
export const MIN_ACTIVE_PORT = 1024;

export type ActiveTargetDecision =
  | { readonly ok: true; readonly target: HostPort; readonly natFixup: boolean }
  | { readonly ok: false; readonly reason: 'privileged-port' | 'third-party' };

/**
 * Where the proxy may connect for an active (PORT/EPRT) data connection.
 *
 * FTP bounce (CERT CA-97.27, RFC 2577 §3): only the client's own address, never a port
 * below 1024. One exception (protocol.md §4.1): a client behind NAT without an ALG writes
 * its private address; when the named address is unroutable and the control peer is not, the
 * peer's address is used instead, so the connection can only ever go back to the client.
 */
export function decideActiveTarget(
  requested: HostPort,
  clientIp: string,
  allowNatFixup: boolean,
): ActiveTargetDecision {
  if (requested.port < MIN_ACTIVE_PORT) return { ok: false, reason: 'privileged-port' };
  if (sameIp(requested.host, clientIp)) {
    return { ok: true, target: { host: clientIp, port: requested.port }, natFixup: false };
  }
  if (allowNatFixup && isNatInternalIp(requested.host) && !isUnroutableIp(clientIp)) {
    return { ok: true, target: { host: clientIp, port: requested.port }, natFixup: true };
  }
  return { ok: false, reason: 'third-party' };
}

/**
 * An address a host behind NAT writes for itself (RFC 1918, CGNAT, link-local, ULA). Loopback
 * and unspecified are never NAT artefacts: protocol.md §8.15 wants `EPRT |2|::1|50000|` from
 * 2001:db8::7 refused, not rewritten to the peer.
 */
function isNatInternalIp(address: string): boolean {
  if (!isUnroutableIp(address)) return false;
  const range = ipaddr.process(address).range();
  return range !== 'loopback' && range !== 'unspecified';
}
