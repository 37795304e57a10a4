/**
 * Codecs for the addresses carried inside the control stream:
 * PORT / 227 (RFC 959 §4.1.2, §4.2.1), EPRT / EPSV / 229 (RFC 2428). Parse leniently where real
 * peers are lenient (spaces, leading zeros: vsftpd accepts both), check strictly (exactly six
 * fields, each 0..255, port 1..65535, known families), and always format the canonical form.
 * Pure: no I/O.
 */
import ipaddr from 'ipaddr.js';
import type { Family } from './ip.js';

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export type AddressParse =
  | { readonly ok: true; readonly value: HostPort; readonly family: Family }
  | { readonly ok: false; readonly reason: 'syntax' }
  | { readonly ok: false; readonly reason: 'family'; readonly family: string };

const SYNTAX: AddressParse = { ok: false, reason: 'syntax' };
const NUMBER = /^\d{1,5}$/;

/**
 * Strip SP only. String#trim() also strips TAB, CR, LF, NBSP (latin1 0xA0)..., which let
 * `PORT 198,51,100,7,195\r,80` through; vsftpd's leniency is spaces only (protocol.md §2.1),
 * and CR/LF/NUL inside arguments are rejected, not repaired (style.md #3).
 */
function trimSpaces(text: string): string {
  return text.replace(/^ +| +$/g, '');
}

/** `h1,h2,h3,h4,p1,p2` -> host and port; spaces around numbers and leading zeros allowed. */
export function parseHostPortFields(text: string): AddressParse {
  const fields = text.split(',');
  if (fields.length !== 6) return SYNTAX;
  const values: number[] = [];
  for (const field of fields) {
    const trimmed = trimSpaces(field);
    if (!NUMBER.test(trimmed)) return SYNTAX;
    const value = Number(trimmed);
    if (value > 255) return SYNTAX;
    values.push(value);
  }
  const port = values[4]! * 256 + values[5]!;
  if (port === 0) return SYNTAX;
  return { ok: true, value: { host: values.slice(0, 4).join('.'), port }, family: 4 };
}

/** Argument of PORT (RFC 959 §4.1.2). */
export function parsePortArgument(argument: string): AddressParse {
  return parseHostPortFields(argument);
}

/** `a,b,c,d,p1,p2` for an IPv4 host (PORT argument and the 227 group). */
export function formatHostPortFields(host: string, port: number): string {
  const ip = ipaddr.IPv4.parse(host);
  return `${ip.octets.join(',')},${port >> 8},${port & 0xff}`;
}

export function formatPortArgument(host: string, port: number): string {
  return formatHostPortFields(host, port);
}

/**
 * 227 reply text -> host and port. RFC 1123 §4.1.2.6: scan for the first six-number group;
 * parentheses are not guaranteed. The code prefix of each line is skipped so that a
 * multi-line 227 (protocol.md §8.6) is read by its text. Any number > 255 rejects the reply
 * (unlike basic-ftp, which masks it).
 */
export function parsePasvReply(lines: readonly string[]): AddressParse {
  const text = lines.map((line) => line.slice(4)).join('\n');
  const match = /(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)/.exec(text);
  if (!match) return SYNTAX;
  return parseHostPortFields(match.slice(1, 7).join(','));
}

export function formatPasvReply(host: string, port: number): string {
  return `227 Entering Passive Mode (${formatHostPortFields(host, port)}).`;
}

/** 229 reply text -> port. Any delimiter 33..126 is accepted upstream (RFC 2428 §3, protocol.md §8.4). */
export function parseEpsvReply(lines: readonly string[]): { ok: true; port: number } | { ok: false } {
  const text = lines.map((line) => line.slice(4)).join('\n');
  const match = /\(([\x21-\x7e])\1\1(\d{1,5})\1\)/.exec(text);
  if (!match) return { ok: false };
  const port = Number(match[2]);
  if (port < 1 || port > 65535) return { ok: false };
  return { ok: true, port };
}

export function formatEpsvReply(port: number): string {
  return `229 Entering Extended Passive Mode (|||${port}|)`;
}

/**
 * EPRT argument `<d>af<d>addr<d>port<d>` (RFC 2428 §2). The delimiter is any ASCII 33..126.
 * af 1 = dotted IPv4 (strictly four decimal parts), 2 = IPv6 text; any other number is a
 * family the proxy does not speak (-> 522), anything else is syntax (-> 501).
 */
export function parseEprtArgument(argument: string): AddressParse {
  const text = trimSpaces(argument);
  if (text.length < 7) return SYNTAX;
  const delimiter = text[0]!;
  const code = delimiter.charCodeAt(0);
  if (code < 33 || code > 126 || /[0-9a-fA-F.:]/.test(delimiter)) return SYNTAX;
  const parts = text.split(delimiter);
  if (parts.length !== 5 || parts[0] !== '' || parts[4] !== '') return SYNTAX;
  const [, af, addr, portText] = parts as [string, string, string, string, string];
  if (!/^\d{1,3}$/.test(af)) return SYNTAX;
  if (!/^\d{1,5}$/.test(portText)) return SYNTAX;
  const port = Number(portText);
  if (port < 1 || port > 65535) return SYNTAX;
  if (af === '1') {
    if (!ipaddr.IPv4.isValidFourPartDecimal(addr)) return SYNTAX;
    return { ok: true, value: { host: ipaddr.IPv4.parse(addr).toString(), port }, family: 4 };
  }
  if (af === '2') {
    if (addr.includes('%') || !ipaddr.IPv6.isValid(addr)) return SYNTAX;
    return { ok: true, value: { host: ipaddr.IPv6.parse(addr).toString(), port }, family: 6 };
  }
  return { ok: false, reason: 'family', family: af };
}

export function formatEprtArgument(host: string, port: number): string {
  const ip = ipaddr.parse(host);
  return ip.kind() === 'ipv4' ? `|1|${ip.toString()}|${port}|` : `|2|${ip.toString()}|${port}|`;
}

export type EpsvArgument =
  | { readonly kind: 'any' }
  | { readonly kind: 'all' }
  | { readonly kind: 'family'; readonly family: Family }
  | { readonly kind: 'unsupported-family' }
  | { readonly kind: 'syntax' };

/** EPSV argument: none, `ALL`, or a network protocol number (RFC 2428 §3). */
export function parseEpsvArgument(argument: string): EpsvArgument {
  const text = argument.trim();
  if (text === '') return { kind: 'any' };
  if (text.toUpperCase() === 'ALL') return { kind: 'all' };
  if (text === '1') return { kind: 'family', family: 4 };
  if (text === '2') return { kind: 'family', family: 6 };
  if (/^\d{1,3}$/.test(text)) return { kind: 'unsupported-family' };
  return { kind: 'syntax' };
}
