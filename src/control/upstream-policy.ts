/**
 * Where forward-mode and transparent sessions may go (issue #13, upstream-selection.md A5):
 * the `allow`/`deny`/`ports` policy of `upstream.forward` and `upstream.transparent`, and the
 * decision for one destination. Pure: the caller resolves names and passes every address in;
 * the answer names the one address to connect to, so there is no second lookup (no DNS
 * rebinding window between check and connect).
 *
 * Rules of the decision (decideUpstream):
 * 1. `deny` first: a name matching a deny name or `*.suffix`, or any address in a deny CIDR,
 *    is refused whatever `allow` says.
 * 2. The port must be in `ports`.
 * 3. EVERY address must pass (a name resolving to one good and one bad address is refused:
 *    the resolver's order, or a rebinding attacker, decides which one a client would get).
 *    An address passes when the name matched an allow name or `*.suffix`, or the address is
 *    in an allow CIDR. An empty `allow` lets nothing pass.
 * 4. Loopback, 0.0.0.0/8, link-local, multicast, reserved 240/4 (with broadcast), their IPv6
 *    counterparts and unspecified `::`, and the proxy's own addresses are refused even then,
 *    unless an allow CIDR *inside* that range names them (`127.0.0.1`, `127.0.0.0/8`,
 *    `fe80::/10`; for an own address, exactly that address). A name match never unlocks
 *    them, and neither does a wide CIDR such as `0.0.0.0/0` (issue #13 "unless a CIDR in
 *    `allow` names them explicitly"). IPv4-mapped IPv6 addresses are their IPv4 address
 *    throughout, in destinations and in rules.
 */
import ipaddr from 'ipaddr.js';
import { ipInCidr, normalizeIp, type Cidr } from './ip.js';
import { parseHostName } from './forward-login.js';

export interface PortRange {
  readonly first: number;
  readonly last: number;
}

/** One `allow`/`deny` entry; `text` is what the configuration said (for messages). */
export type UpstreamRule =
  | { readonly kind: 'cidr'; readonly cidr: Cidr; readonly text: string }
  /** An exact name, lower case, no trailing dot. */
  | { readonly kind: 'name'; readonly name: string; readonly text: string }
  /** `*.suffix`: names ending in `.suffix` (any depth), never `suffix` itself. */
  | { readonly kind: 'suffix'; readonly suffix: string; readonly text: string };

export interface UpstreamPolicy {
  readonly allow: readonly UpstreamRule[];
  readonly deny: readonly UpstreamRule[];
  /** Destination ports allowed; never empty. */
  readonly ports: readonly PortRange[];
}

/** The port meant when the client names none (RFC 959 §3.2 / IANA: ftp control is 21). */
export const DEFAULT_FTP_PORT = 21;

/** `ports` when the configuration gives none (issue #13). */
export const DEFAULT_UPSTREAM_PORTS = '21';

/** What the policy is asked about: an address (transparent, or an IP literal) or a name with every address it resolved to. */
export type UpstreamDestination =
  | { readonly kind: 'ip'; readonly address: string }
  | { readonly kind: 'name'; readonly name: string; readonly addresses: readonly string[] };

export type UpstreamRefusal =
  /** A deny rule matched the name or one of the addresses. */
  | 'denied'
  /** No allow rule covers the name or one of the addresses (always, with an empty allow). */
  | 'not-allowed'
  | 'port-not-allowed'
  /** Loopback, 0.0.0.0/8, link-local, multicast, reserved, unspecified: not unlocked by an allow CIDR. */
  | 'special-address'
  /** One of the proxy's own addresses (a loop): not unlocked by an allow entry for exactly it. */
  | 'own-address'
  /** The name resolved to no address. */
  | 'unresolved'
  /** An address passed in is not an IP address (a resolver fault). */
  | 'bad-address';

export type UpstreamDecision =
  | { readonly ok: true; readonly address: string; readonly port: number }
  | {
      readonly ok: false;
      /** Stable machine code. */
      readonly code: UpstreamRefusal;
      /** Human text for the reply (`530` in forward mode) and the log: the destination and why. */
      readonly reason: string;
    };

interface SpecialRange {
  readonly cidr: Cidr;
  readonly label: string;
}

function range(text: string, label: string): SpecialRange {
  return { cidr: ipaddr.parseCIDR(text) as Cidr, label };
}

/**
 * Refused unless unlocked (rule 4). RFC 6890 special-purpose registry entries that are not a
 * remote FTP server by definition. RFC 1918, CGNAT and ULA are not here: reaching private
 * servers is a legitimate use of the client-side proxy; `deny` them where it is not.
 */
const SPECIAL_RANGES: readonly SpecialRange[] = [
  range('0.0.0.0/8', '"this network" (0.0.0.0/8)'),
  range('127.0.0.0/8', 'loopback'),
  range('169.254.0.0/16', 'link-local'),
  range('224.0.0.0/4', 'multicast'),
  range('240.0.0.0/4', 'reserved (240.0.0.0/4, broadcast)'),
  range('::/128', 'unspecified'),
  range('::1/128', 'loopback'),
  range('fe80::/10', 'link-local'),
  range('ff00::/8', 'multicast'),
];

/**
 * Parse one `allow`/`deny` entry: a CIDR (`203.0.113.0/24`, `2001:db8::/32`), an address
 * (as /32 or /128), an exact name (`ftp.partner.example`) or `*.suffix`
 * (`*.partner.example`). Addresses must be dotted quads or IPv6 without zone; an
 * IPv4-mapped CIDR (`::ffff:10.0.0.0/104`) is stored as its IPv4 CIDR. Names follow
 * forward-login.ts parseHostName (lower case, trailing dot dropped). A `*` anywhere but as
 * the whole first label is an error, and so is a bare `*`: names never match by substring
 * (mod_proxy #179: an unanchored `^ftp\.example\.com` also allowed `ftp.example.com.evil.tld`).
 */
export function parseUpstreamRule(text: string): { readonly ok: true; readonly rule: UpstreamRule } | { readonly ok: false; readonly reason: string } {
  const slash = text.indexOf('/');
  const addressText = slash === -1 ? text : text.slice(0, slash);
  const isV4 = ipaddr.IPv4.isValidFourPartDecimal(addressText);
  const isV6 = !addressText.includes('%') && ipaddr.IPv6.isValid(addressText) && (!addressText.includes('.') || ipaddr.IPv4.isValidFourPartDecimal(addressText.slice(addressText.lastIndexOf(':') + 1)));
  if (isV4 || isV6) {
    const prefixText = slash === -1 ? (isV4 ? '32' : '128') : text.slice(slash + 1);
    const max = isV4 ? 32 : 128;
    if (!/^(?:0|[1-9]\d{0,2})$/.test(prefixText) || Number(prefixText) > max) return { ok: false, reason: `the prefix length after / must be 0 to ${max}` };
    return { ok: true, rule: { kind: 'cidr', cidr: unmapCidr([ipaddr.parse(addressText), Number(prefixText)]), text } };
  }
  if (slash !== -1) return { ok: false, reason: 'is not a CIDR such as 203.0.113.0/24 or 2001:db8::/32' };
  if (text.startsWith('*.')) {
    const suffix = parseHostName(text.slice(2));
    if (suffix === null) return { ok: false, reason: 'is not *. followed by a host name, such as *.partner.example' };
    return { ok: true, rule: { kind: 'suffix', suffix, text } };
  }
  if (text.includes('*')) return { ok: false, reason: 'a wildcard is allowed only as a whole first label: *.partner.example (a bare * would match every name: use CIDRs)' };
  const name = parseHostName(text);
  if (name === null) return { ok: false, reason: 'is neither a CIDR, an IP address, a host name nor *.suffix' };
  return { ok: true, rule: { kind: 'name', name, text } };
}

/** `::ffff:a.b.c.d/n` (n >= 96) is the IPv4 CIDR `a.b.c.d/(n-96)`: destinations are unmapped too. */
function unmapCidr(cidr: Cidr): Cidr {
  const [address, bits] = cidr;
  if (address.kind() === 'ipv6' && bits >= 96 && (address as ipaddr.IPv6).isIPv4MappedAddress()) {
    return [(address as ipaddr.IPv6).toIPv4Address(), bits - 96];
  }
  return cidr;
}

/**
 * Parse a port list: `21`, `21,990`, `2100-2199`, `21, 990, 2100-2199`. Each port 1-65535,
 * each range first <= last; null when any part is not. An empty list is not a list.
 */
export function parsePortList(text: string): PortRange[] | null {
  const out: PortRange[] = [];
  for (const part of text.split(',')) {
    const match = /^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$/.exec(part);
    if (!match) return null;
    const first = Number(match[1]);
    const last = match[2] === undefined ? first : Number(match[2]);
    if (first < 1 || last > 65535 || first > last) return null;
    out.push({ first, last });
  }
  return out;
}

export function portInRanges(ports: readonly PortRange[], port: number): boolean {
  return ports.some((r) => port >= r.first && port <= r.last);
}

/** Whether a name or suffix rule matches `name` (lower case, no trailing dot): exactly, or as a subdomain of the suffix. */
export function ruleMatchesName(rule: UpstreamRule, name: string): boolean {
  if (rule.kind === 'name') return rule.name === name;
  if (rule.kind === 'suffix') return name.endsWith(`.${rule.suffix}`);
  return false;
}

function ruleMatchesAddress(rule: UpstreamRule, address: string): boolean {
  return rule.kind === 'cidr' && ipInCidr(address, rule.cidr);
}

/** The special range `address` (normalized) lies in, if any (rule 4). */
export function specialRangeOf(address: string): { readonly label: string; readonly cidr: Cidr } | null {
  return SPECIAL_RANGES.find((r) => ipInCidr(address, r.cidr)) ?? null;
}

/** An allow CIDR that contains `address` and lies inside `within` (at least as long a prefix). */
function unlockedBy(allow: readonly UpstreamRule[], address: string, withinBits: number): boolean {
  return allow.some((rule) => rule.kind === 'cidr' && rule.cidr[1] >= withinBits && ipInCidr(address, rule.cidr));
}

/**
 * May a session go to `destination` on `port` (null: 21)? `ownAddresses` are the proxy's
 * own addresses (every interface address, the listener's; any form, they are normalized).
 * On success, `address` is the exact address to connect to: the first of the destination's
 * addresses (every one passed the checks, so the caller's order decides). Pure; never throws.
 */
export function decideUpstream(
  policy: UpstreamPolicy,
  destination: UpstreamDestination,
  port: number | null,
  ownAddresses: readonly string[],
): UpstreamDecision {
  const wanted = port ?? DEFAULT_FTP_PORT;
  const label = destination.kind === 'name' ? destination.name : destination.address;
  const refuse = (code: UpstreamRefusal, why: string): UpstreamDecision => ({ ok: false, code, reason: `${label}${why}` });

  const rawAddresses = destination.kind === 'name' ? destination.addresses : [destination.address];
  const addresses: string[] = [];
  for (const raw of rawAddresses) {
    const address = tryNormalize(raw);
    if (address === null) return refuse('bad-address', ': the resolver returned something that is not an IP address');
    addresses.push(address);
  }
  if (addresses.length === 0) return refuse('unresolved', ' does not resolve to any address');
  const at = (address: string): string => (destination.kind === 'name' ? ` (${address})` : '');
  // Interface addresses may carry a zone (fe80::1%eth0); the zone does not make another address.
  const own = new Set(ownAddresses.map((a) => tryNormalize(a.split('%')[0]!)).filter((a): a is string => a !== null));

  if (destination.kind === 'name' && policy.deny.some((rule) => ruleMatchesName(rule, destination.name))) {
    return refuse('denied', ' is denied');
  }
  for (const address of addresses) {
    if (policy.deny.some((rule) => ruleMatchesAddress(rule, address))) return refuse('denied', `${at(address)} is in a denied range`);
  }
  if (!portInRanges(policy.ports, wanted)) return refuse('port-not-allowed', `: port ${wanted} is not allowed`);
  if (policy.allow.length === 0) return refuse('not-allowed', ': no destination is allowed');

  const nameAllowed = destination.kind === 'name' && policy.allow.some((rule) => ruleMatchesName(rule, destination.name));
  for (const address of addresses) {
    const special = specialRangeOf(address);
    if (special && !unlockedBy(policy.allow, address, special.cidr[1])) {
      return refuse('special-address', `${at(address)} is ${special.label}`);
    }
    if (own.has(address) && !unlockedBy(policy.allow, address, address.includes(':') ? 128 : 32)) {
      return refuse('own-address', `${at(address)} is an address of this proxy`);
    }
    if (!nameAllowed && !policy.allow.some((rule) => ruleMatchesAddress(rule, address))) {
      return refuse('not-allowed', `${at(address)} is not allowed`);
    }
  }
  return { ok: true, address: addresses[0]!, port: wanted };
}

function tryNormalize(address: string): string | null {
  // ipaddr.js would also take "127.1" or a zone id: a resolver never returns those.
  if (address.includes('%') || !(ipaddr.IPv4.isValidFourPartDecimal(address) || ipaddr.IPv6.isValid(address))) return null;
  return normalizeIp(address);
}
