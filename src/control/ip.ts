/**
 * Address helpers shared by the codecs and the policy. Pure: ipaddr.js only.
 */
import ipaddr from 'ipaddr.js';

export type Family = 4 | 6;

/** Canonical text form; `::ffff:a.b.c.d` becomes `a.b.c.d` (protocol.md §2.4: Node reports v4 peers that way on `::`). */
export function normalizeIp(address: string): string {
  const zoneless = address.includes('%') ? address.slice(0, address.indexOf('%')) : address;
  return ipaddr.process(zoneless).toString();
}

export function familyOf(address: string): Family {
  return ipaddr.process(address).kind() === 'ipv4' ? 4 : 6;
}

export function isIp(text: string): boolean {
  return ipaddr.isValid(text);
}

/**
 * The address an IP literal in a host-name field names (RFC 7151 §3, after RFC 3986 §3.2.2):
 * dotted-quad IPv4, IPv6, or IPv6 in brackets; normalized. Null for anything else, including
 * the shorthands ipaddr.js would take for IPv4 ("127.1", "2130706433"): in a host field
 * those are names, not addresses.
 */
export function parseIpLiteral(text: string): string | null {
  const bracketed = text.startsWith('[') && text.endsWith(']');
  const inner = bracketed ? text.slice(1, -1) : text;
  const valid = ipaddr.IPv6.isValid(inner) || (!bracketed && ipaddr.IPv4.isValidFourPartDecimal(inner));
  return valid ? normalizeIp(inner) : null;
}

export function sameIp(a: string, b: string): boolean {
  try {
    return normalizeIp(a) === normalizeIp(b);
  } catch {
    return false;
  }
}

const UNROUTABLE_RANGES: ReadonlySet<string> = new Set([
  'private', // RFC 1918
  'carrierGradeNat', // RFC 6598 100.64/10
  'loopback',
  'unspecified',
  'linkLocal', // 169.254/16, fe80::/10
  'uniqueLocal', // RFC 4193 fc00::/7
]);

/**
 * True for addresses a host behind NAT would see for itself but nobody outside can reach:
 * RFC 1918, CGNAT, loopback, link-local, ULA, unspecified. Used by the PORT NAT fix-up
 * (protocol.md §4.1): such an address from a peer that is *not* unroutable means the client
 * sits behind NAT without an ALG. Documentation ranges (RFC 5737) count as routable so the
 * network-namespace tests can play "internet" with them.
 */
export function isUnroutableIp(address: string): boolean {
  return UNROUTABLE_RANGES.has(ipaddr.process(address).range());
}

/** 127.0.0.0/8, ::1 (and ::ffff:127.x). */
export function isLoopbackIp(address: string): boolean {
  return ipaddr.process(address).range() === 'loopback';
}

/** Whether `address` lies in CIDR `cidr` (families must match). */
export function ipInCidr(address: string, cidr: readonly [ipaddr.IPv4 | ipaddr.IPv6, number]): boolean {
  const ip = ipaddr.process(address);
  const [net] = cidr;
  if (ip.kind() !== net.kind()) return false;
  return ip.match(cidr as [ipaddr.IPv4 | ipaddr.IPv6, number]);
}

export type Cidr = [ipaddr.IPv4 | ipaddr.IPv6, number];

/** Parse "10.0.0.0/8" or a bare address (as /32 or /128); throws on bad input. */
export function parseCidr(text: string): Cidr {
  if (text.includes('/')) return ipaddr.parseCIDR(text) as Cidr;
  const ip = ipaddr.parse(text);
  return [ip, ip.kind() === 'ipv4' ? 32 : 128];
}

/** `host:port` for logs and messages, an IPv6 address in brackets (RFC 3986 §3.2.2). */
export function formatEndpoint(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}
