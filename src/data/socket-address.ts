/**
 * A socket's two addresses, read once and checked. There is no placeholder address: a
 * connection the peer reset between the kernel's accept and our first look at it has no
 * peer any more (getpeername(2) fails with ENOTCONN and Node reports `remoteAddress`
 * undefined), yet Node still hands it over and even lets us read what it sent. Standing in
 * `0.0.0.0` for such a peer once let a denied client past the ACL and the per-IP limits
 * with its pipelined commands (issue #10): whoever cannot be identified is not served.
 */
import type net from 'node:net';
import { normalizeIp } from '../control/ip.js';

export interface Endpoint {
  /** Normalized (IPv4-mapped IPv6 as IPv4, no zone). */
  readonly ip: string;
  readonly port: number;
}

export interface SocketAddresses {
  readonly remote: Endpoint;
  readonly local: Endpoint;
}

/**
 * Both ends of a connected socket, or null when the kernel no longer knows either (the
 * connection was reset or closed before we asked). Node caches the answer, so a socket that
 * passed this check keeps its addresses even after a later reset.
 */
export function addressesOf(socket: net.Socket): SocketAddresses | null {
  const { remoteAddress, remotePort, localAddress, localPort } = socket;
  if (!remoteAddress || !remotePort || !localAddress || !localPort) return null;
  try {
    return { remote: { ip: normalizeIp(remoteAddress), port: remotePort }, local: { ip: normalizeIp(localAddress), port: localPort } };
  } catch {
    return null;
  }
}

/** `ip:port` of the peer for logs; `unknown` when the peer is gone. Never used to decide. */
export function describePeer(socket: net.Socket): string {
  const addresses = addressesOf(socket);
  return addresses ? `${addresses.remote.ip}:${addresses.remote.port}` : 'unknown';
}
