/**
 * Forward mode (issue #13): the client names the server in its login, `USER name@host[:port]`
 * (upstream-selection.md A1 convention #1, "USER with no logon"). Pure: text in, a parsed
 * destination or a stable refusal out. Resolving the name and deciding whether the proxy may
 * go there is upstream-policy.ts's job.
 *
 * Only convention #1 is parsed here; A1's others, and why:
 * - #4/#5 `SITE host[:port]` / `OPEN host[:port]` carry the same `host[:port]` text:
 *   parseForwardDestination() is exported for them, the session decides whether to offer them.
 * - #2/#3/#6/#7 and #8 need proxy credentials; there is no user store, so they are not
 *   recognised. #6 `u@pu@h` cannot be told apart from an e-mail user name and is read as user
 *   `u@pu` (the server then refuses it); #7 `u@h pu` is refused (`space-in-host`).
 * - `host port` or `host,port` (A4): no client in the survey sends it, so a space or comma in
 *   the destination is an error, never a port.
 */
import ipaddr from 'ipaddr.js';
import { formatEndpoint, normalizeIp } from './ip.js';

/** A destination host as the client wrote it: an IP literal (normalized) or a DNS name (lower case, no trailing dot). */
export type ForwardHost =
  | { readonly kind: 'ip'; readonly address: string }
  | { readonly kind: 'name'; readonly name: string };

/** Why a forward login or destination was refused; each has a fixed text (FORWARD_LOGIN_REFUSAL_TEXT). */
export type ForwardLoginRefusal =
  | 'no-destination'
  | 'empty-user'
  | 'empty-host'
  | 'bad-host'
  | 'bad-port'
  | 'space-in-host'
  | 'control-character'
  | 'too-long';

export interface ForwardRefused {
  readonly ok: false;
  /** Stable machine code (logs, metrics labels, tests). */
  readonly code: ForwardLoginRefusal;
  /** Fixed human text for the `530` line; never echoes the client's input. */
  readonly reason: string;
}

export type ForwardDestinationParse =
  | { readonly ok: true; readonly host: ForwardHost; readonly port: number | null }
  | ForwardRefused;

export type ForwardLoginParse =
  | {
      readonly ok: true;
      /** The user name to log in to the server with, in the argument's own (latin1) text. */
      readonly user: string;
      readonly host: ForwardHost;
      /** null: not given (the FTP port, 21, is meant). */
      readonly port: number | null;
    }
  | ForwardRefused;

export const FORWARD_LOGIN_REFUSAL_TEXT: Readonly<Record<ForwardLoginRefusal, string>> = Object.freeze({
  'no-destination': 'Log in as user@host or user@host:port to name the server.',
  'empty-user': 'The user name before the last @ is empty.',
  'empty-host': 'The server after the last @ is empty.',
  'bad-host': 'The server after the last @ is neither a host name nor an IP address.',
  'bad-port': 'The port after the server must be a number from 1 to 65535.',
  'space-in-host': 'The server must be host or host:port without spaces (proxy logins are not supported).',
  'control-character': 'Control characters are not allowed in USER.',
  'too-long': 'The user name or the server name is too long.',
});

/**
 * Longest user name passed on. An e-mail address as user name is at most 256 octets
 * (RFC 5321 §4.5.3.1.3, path); nothing longer is a user name a server would accept.
 */
export const MAX_FORWARD_USER_LENGTH = 256;

/** Longest `host[:port]` text: a 253-character name (RFC 1035 §2.3.4) plus `:65535`. */
export const MAX_FORWARD_DESTINATION_LENGTH = 253 + 6;

// C0 controls and DEL: CR/LF/NUL would end or split the line we send upstream (style.md rule 3).
const CONTROL_CHARACTER = /[\x00-\x1f\x7f]/;
const PORT_TEXT = /^\d{1,5}$/;
const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
// What inet_aton(3) reads as a number in one part: decimal, octal (leading 0) or 0x hex.
const INET_ATON_PART = /^(?:0x[0-9a-f]*|\d+)$/;

function refuse(code: ForwardLoginRefusal): ForwardRefused {
  return { ok: false, code, reason: FORWARD_LOGIN_REFUSAL_TEXT[code] };
}

/**
 * Parse the argument of `USER` in forward mode (upstream-selection.md A4).
 *
 * The user is everything before the **last** `@`, so e-mail user names work
 * (`alice@example.org@ftp.example.net`; mod_proxy, frox ("scans the username from right to
 * left"), SuSE ftp-proxy and Squid all split there). The rest is parsed by
 * parseForwardDestination(). `argument` is the latin1 text of the argument bytes
 * (ClientCommand.argument): the user comes back in the same text, so
 * `Buffer.from(user, 'latin1')` gives the client's bytes unchanged.
 */
export function parseForwardLogin(argument: string): ForwardLoginParse {
  if (CONTROL_CHARACTER.test(argument)) return refuse('control-character');
  const at = argument.lastIndexOf('@');
  if (at === -1) return refuse('no-destination');
  const user = argument.slice(0, at);
  if (user.trim() === '') return refuse('empty-user');
  if (user.length > MAX_FORWARD_USER_LENGTH) return refuse('too-long');
  const destination = parseForwardDestination(argument.slice(at + 1));
  if (!destination.ok) return destination;
  return { ok: true, user, host: destination.host, port: destination.port };
}

/**
 * Parse `host[:port]` naming the server: `ftp.example.net`, `ftp.example.net:2121`,
 * `192.0.2.7[:2121]`, `[2001:db8::1]`, `[2001:db8::1]:2121`, or a bare IPv6 literal.
 *
 * - Brackets follow RFC 3986 §3.2.2: only IPv6 inside, an optional `:port` after. FileZilla
 *   brackets IPv6 (A2); mod_proxy cannot parse `[v6]` without a port (A3), we can.
 * - More than one colon without brackets: the whole text must be an IPv6 address, and then
 *   it has no port (A4 "accept iff whole host parses as IPv6"). WinSCP and lftp write IPv6
 *   unbracketed and append `:port` when it is not 21 (A2), which is ambiguous
 *   (`2001:db8::1:2121` is itself an address): read as the address, the policy then decides.
 * - Port: 1 to 5 decimal digits, 1..65535; leading zeros read as decimal like the anchors'
 *   strtol/atoi (`021` is 21). No sign, no spaces, not 0.
 * - IPv4: dotted quad only, no leading zeros in an octet (inet_aton would read `010` as octal
 *   8, others as decimal 10: ambiguous, so refused). Zone ids (`%eth0`) are refused.
 * - Names: parseHostName().
 */
export function parseForwardDestination(text: string): ForwardDestinationParse {
  if (text === '') return refuse('empty-host');
  if (CONTROL_CHARACTER.test(text)) return refuse('control-character');
  if (/\s/.test(text)) return refuse('space-in-host');
  if (text.length > MAX_FORWARD_DESTINATION_LENGTH) return refuse('too-long');

  let hostText: string;
  let portText: string | null = null;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close === -1) return refuse('bad-host');
    const rest = text.slice(close + 1);
    if (rest !== '' && !rest.startsWith(':')) return refuse('bad-host');
    if (rest !== '') portText = rest.slice(1);
    const address = parseStrictIpv6(text.slice(1, close));
    if (address === null) return refuse('bad-host');
    return withPort({ kind: 'ip', address }, portText);
  }
  const colons = text.split(':').length - 1;
  if (colons > 1) {
    const address = parseStrictIpv6(text);
    return address === null ? refuse('bad-host') : { ok: true, host: { kind: 'ip', address }, port: null };
  }
  if (colons === 1) {
    const colon = text.indexOf(':');
    hostText = text.slice(0, colon);
    portText = text.slice(colon + 1);
  } else {
    hostText = text;
  }
  if (hostText === '') return refuse('empty-host');
  if (ipaddr.IPv4.isValidFourPartDecimal(hostText)) return withPort({ kind: 'ip', address: normalizeIp(hostText) }, portText);
  const name = parseHostName(hostText);
  if (name === null) return refuse('bad-host');
  return withPort({ kind: 'name', name }, portText);
}

function withPort(host: ForwardHost, portText: string | null): ForwardDestinationParse {
  if (portText === null) return { ok: true, host, port: null };
  if (!PORT_TEXT.test(portText)) return refuse('bad-port');
  const port = Number(portText);
  if (port < 1 || port > 65535) return refuse('bad-port');
  return { ok: true, host, port };
}

/**
 * An IPv6 literal, normalized (an IPv4-mapped one becomes its IPv4 address, ip.ts
 * normalizeIp), or null. Stricter than ipaddr.js: no zone id, and an embedded IPv4 part
 * must be a dotted quad without leading zeros.
 */
function parseStrictIpv6(text: string): string | null {
  if (text.includes('%') || !ipaddr.IPv6.isValid(text)) return null;
  if (text.includes('.') && !ipaddr.IPv4.isValidFourPartDecimal(text.slice(text.lastIndexOf(':') + 1))) return null;
  return normalizeIp(text);
}

/**
 * A DNS host name in the form names are compared in: lower case (DNS names are
 * case-insensitive, RFC 4343), one trailing dot removed; null when it is not a host name.
 * Rules: RFC 1123 §2.1 labels (letters, digits, inner hyphens; 1-63 characters), at most 253
 * characters, and
 * - the last label is not all digits (RFC 1123 §2.1: `203.0.113.300` is a mistyped address);
 * - not something inet_aton(3) would read as an IPv4 address (`0x7f000001`, `127.1`,
 *   `0177.0.0.1`): getaddrinfo() turns those into addresses without asking DNS, so a "name"
 *   could smuggle in a loopback address. (The resolved addresses are checked anyway,
 *   upstream-policy.ts; this keeps such text from ever reading as a name.)
 * Used for destinations and for the names and `*.suffix` entries of `allow`/`deny`.
 */
export function parseHostName(text: string): string | null {
  const name = (text.endsWith('.') ? text.slice(0, -1) : text).toLowerCase();
  if (name.length === 0 || name.length > 253) return null;
  const labels = name.split('.');
  if (!labels.every((label) => LABEL.test(label))) return null;
  if (/^\d+$/.test(labels[labels.length - 1]!)) return null;
  if (labels.length <= 4 && labels.every((label) => INET_ATON_PART.test(label))) return null;
  return name;
}

/** The host as one string: the name, or the address (no brackets). */
export function forwardHostText(host: ForwardHost): string {
  return host.kind === 'name' ? host.name : host.address;
}

/** `host`, `host:port`, `[v6]` or `[v6]:port` for logs and messages. */
export function formatForwardDestination(host: ForwardHost, port: number | null): string {
  if (port !== null) return formatEndpoint(forwardHostText(host), port);
  return host.kind === 'ip' && host.address.includes(':') ? `[${host.address}]` : forwardHostText(host);
}
