/**
 * Security policy for data-connection targets. Pure.
 */
import ipaddr from 'ipaddr.js';
import { familyOf, isUnroutableIp, sameIp } from './ip.js';
import type { HostPort } from './address.js';

/** Lowest port a client may name in PORT/EPRT (vsftpd sysutil.c vsf_sysutil_is_port_reserved; RFC 2577 §3). */
export const MIN_ACTIVE_PORT = 1024;

/**
 * How an accepted target came about; the target is the control peer in every case.
 * `named`: the client named its own address. `nat-fixup`: it named an unroutable address
 * from behind NAT (protocol.md §4.1). `unspecified`: it named `0.0.0.0` or `::`.
 */
export type ActiveTargetSource = 'named' | 'nat-fixup' | 'unspecified';

export type ActiveTargetDecision =
  | { readonly ok: true; readonly target: HostPort; readonly via: ActiveTargetSource }
  | { readonly ok: false; readonly reason: 'privileged-port' | 'third-party' };

/**
 * Where the proxy may connect for an active (PORT/EPRT) data connection.
 *
 * FTP bounce (CERT CA-97.27, RFC 2577 §3): only the client's own address, never a port
 * below 1024. The control peer's address is used where the named one cannot mean anybody
 * else, so the connection can only ever go back to the client:
 * - the unspecified address (`0.0.0.0`, `::`; RFC 1122 §3.2.1.3, RFC 4291 §2.5.2) names no
 *   host. lftp over IPv6 sends `EPRT |2|::|p|` when its data socket is bound to no address
 *   (issue #10 defect 6); only the same family as the control connection means the peer;
 * - a client behind NAT without an ALG writes its private address (protocol.md §4.1): when
 *   the named address is unroutable and the control peer is not, the peer is meant.
 */
export function decideActiveTarget(
  requested: HostPort,
  clientIp: string,
  allowNatFixup: boolean,
): ActiveTargetDecision {
  if (requested.port < MIN_ACTIVE_PORT) return { ok: false, reason: 'privileged-port' };
  const peer = { host: clientIp, port: requested.port };
  if (sameIp(requested.host, clientIp)) return { ok: true, target: peer, via: 'named' };
  if (isUnspecifiedIp(requested.host)) {
    if (familyOf(requested.host) !== familyOf(clientIp)) return { ok: false, reason: 'third-party' };
    return { ok: true, target: peer, via: 'unspecified' };
  }
  if (allowNatFixup && isNatInternalIp(requested.host) && !isUnroutableIp(clientIp)) {
    return { ok: true, target: peer, via: 'nat-fixup' };
  }
  return { ok: false, reason: 'third-party' };
}

/** Exactly `0.0.0.0` or `::` (any spelling); `::ffff:0.0.0.0` is a mapped address, not this. */
function isUnspecifiedIp(address: string): boolean {
  return ipaddr.parse(address).range() === 'unspecified';
}

/**
 * An address a host behind NAT writes for itself (RFC 1918, CGNAT, link-local, ULA). Loopback
 * is never a NAT artefact: protocol.md §8.15 wants `EPRT |2|::1|50000|` from 2001:db8::7
 * refused, not rewritten to the peer. (The unspecified address does mean the peer, but
 * decideActiveTarget has taken it before this is asked; `::ffff:0.0.0.0` stays refused.)
 */
function isNatInternalIp(address: string): boolean {
  if (!isUnroutableIp(address)) return false;
  const range = ipaddr.process(address).range();
  return range !== 'loopback' && range !== 'unspecified';
}
