/**
 * The rewrite decision: what the proxy does with each client command and with the server
 * replies it must interpret. Pure: the session module carries the decisions out on sockets.
 */
import {
  parseEprtArgument,
  parseEpsvArgument,
  parseEpsvReply,
  parsePasvReply,
  parsePortArgument,
  type HostPort,
} from './address.js';
import { parseIpLiteral, sameIp, type Family } from './ip.js';
import { decideActiveTarget, type ActiveTargetSource } from './policy.js';
import type { ClientCommand } from './command.js';
import { decideSecurityCommand, requiredProtectionRefusal, type ClientProtection, type ProtectionLevel } from './security.js';
import type { Reply } from './reply.js';
import { REPLY_FOR_CODE, type ErrorCode } from '../errors.js';

/** What the proxy knows about a session when it decides. */
export interface SessionView {
  /** Family of the client's control connection. */
  readonly controlFamily: Family;
  /** The client's real address (normalized). */
  readonly clientIp: string;
  /** EPSV ALL was accepted earlier in this session (RFC 2428 §3). */
  readonly epsvAll: boolean;
  /** Apply the PORT NAT fix-up (protocol.md §4.1). */
  readonly allowNatFixup: boolean;
  /** The server accepted a login (230) in this session. */
  readonly loggedIn: boolean;
  /**
   * The proxy's own addresses as this client may know them: the one it dialled (a PROXY
   * header's destination behind a load balancer), the control socket's local address, and the
   * configured `advertise`/`advertiseFor` addresses. A HOST naming one of them names the proxy.
   */
  readonly ownAddresses: readonly string[];
  /** Host names of the proxy (a hostname `advertise`), compared case-insensitively, trailing dot ignored. */
  readonly ownNames: readonly string[];
  /** What the client's leg offers and has negotiated of TLS (control/security.ts). */
  readonly protection: ClientProtection;
}

export type TransferDirection = 'download' | 'upload';

export type CommandDecision =
  /** Send upstream as is; relay the reply. */
  | { readonly kind: 'forward' }
  /** FEAT: send upstream, edit the 211 reply (editFeatReply). */
  | { readonly kind: 'feat' }
  /** A command that moves data over the pending data channel. */
  | { readonly kind: 'transfer'; readonly direction: TransferDirection }
  /** PASV or EPSV: the client will connect to a relay port. */
  | { readonly kind: 'passive'; readonly style: 'pasv' | 'epsv' }
  /** PORT or EPRT: the proxy will connect to the client. */
  | { readonly kind: 'active'; readonly style: 'port' | 'eprt'; readonly target: HostPort; readonly via: ActiveTargetSource }
  /** EPSV ALL: answered locally, later PASV/PORT/EPRT refused. */
  | { readonly kind: 'epsv-all' }
  /** ABOR: reset the data legs, then forward a clean ABOR. */
  | { readonly kind: 'abort' }
  /** Answered by the proxy; nothing goes upstream. */
  | { readonly kind: 'reply'; readonly line: string; readonly errorCode: ErrorCode }
  /** HOST naming the proxy itself (hostNamesProxy): accepted here, nothing goes upstream. */
  | { readonly kind: 'host-answered'; readonly line: string }
  /** AUTH TLS: answer `line` (234), then the TLS handshake on the same connection (RFC 4217 §4). */
  | { readonly kind: 'start-tls'; readonly line: string; readonly prot: ProtectionLevel }
  /** PBSZ/PROT answered here (each leg negotiates its own protection, protocol.md §5.3). */
  | { readonly kind: 'protection'; readonly line: string; readonly prot?: ProtectionLevel };

const TRANSFER_VERBS: ReadonlyMap<string, TransferDirection> = new Map([
  ['RETR', 'download'],
  ['LIST', 'download'],
  ['NLST', 'download'],
  ['MLSD', 'download'],
  ['STOR', 'upload'],
  ['STOU', 'upload'],
  ['APPE', 'upload'],
]);

function reply(line: string, errorCode: ErrorCode): CommandDecision {
  return { kind: 'reply', line, errorCode };
}

function wrongFamily(family: Family): CommandDecision {
  return reply(`522 Network protocol not supported, use (${family === 4 ? 1 : 2})`, 'FTPP_ERR_WRONG_FAMILY');
}

const SYNTAX_REPLY = REPLY_FOR_CODE.FTPP_ERR_BAD_ADDRESS_SYNTAX;
const EPSV_ALL_REPLY = REPLY_FOR_CODE.FTPP_ERR_EPSV_ALL;
/** RFC 7151: 220 is the success reply to HOST. */
const HOST_ACCEPTED_REPLY = '220 Host accepted.';

export function decideCommand(command: ClientCommand, view: SessionView): CommandDecision {
  const verb = command.verb;
  const direction = TRANSFER_VERBS.get(verb);
  const required = requiredProtectionRefusal(verb, direction !== undefined, view.protection);
  if (required) return reply(required.line, required.kind === 'refuse' ? required.errorCode : 'FTPP_ERR_TLS_REQUIRED');
  if (direction) return { kind: 'transfer', direction };
  // Security commands are never forwarded: passing AUTH through would encrypt the control
  // stream end to end so nothing could be rewritten (protocol.md §5.3).
  const security = decideSecurityCommand(verb, command.argument, view.protection, view.loggedIn);
  if (security) {
    if (security.kind === 'refuse') return reply(security.line, security.errorCode);
    if (security.kind === 'start-tls') return security;
    return security.prot ? { kind: 'protection', line: security.line, prot: security.prot } : { kind: 'protection', line: security.line };
  }
  switch (verb) {
    case 'PASV':
      if (view.epsvAll) return reply(EPSV_ALL_REPLY, 'FTPP_ERR_EPSV_ALL');
      // vsftpd answers 0,0,0,0 here; a trusting client would then dial the local host
      // (protocol.md §2.5, §8.17).
      if (view.controlFamily === 6) return reply(REPLY_FOR_CODE.FTPP_ERR_PASV_ON_IPV6, 'FTPP_ERR_PASV_ON_IPV6');
      return { kind: 'passive', style: 'pasv' };
    case 'EPSV': {
      const arg = parseEpsvArgument(command.argument);
      if (arg.kind === 'all') return { kind: 'epsv-all' };
      if (arg.kind === 'syntax') return reply(SYNTAX_REPLY, 'FTPP_ERR_BAD_ADDRESS_SYNTAX');
      if (arg.kind === 'unsupported-family') return wrongFamily(view.controlFamily);
      if (arg.kind === 'family' && arg.family !== view.controlFamily) return wrongFamily(view.controlFamily);
      return { kind: 'passive', style: 'epsv' };
    }
    case 'PORT': {
      if (view.epsvAll) return reply(EPSV_ALL_REPLY, 'FTPP_ERR_EPSV_ALL');
      const parsed = parsePortArgument(command.argument);
      if (!parsed.ok) return reply(SYNTAX_REPLY, 'FTPP_ERR_BAD_ADDRESS_SYNTAX');
      if (view.controlFamily === 6) return reply('425 Use EPRT on an IPv6 connection.', 'FTPP_ERR_WRONG_FAMILY');
      return activeDecision('port', parsed.value, view);
    }
    case 'EPRT': {
      if (view.epsvAll) return reply(EPSV_ALL_REPLY, 'FTPP_ERR_EPSV_ALL');
      const parsed = parseEprtArgument(command.argument);
      if (!parsed.ok) {
        return parsed.reason === 'family' ? wrongFamily(view.controlFamily) : reply(SYNTAX_REPLY, 'FTPP_ERR_BAD_ADDRESS_SYNTAX');
      }
      if (parsed.family !== view.controlFamily) return wrongFamily(view.controlFamily);
      return activeDecision('eprt', parsed.value, view);
    }
    case 'LPRT':
    case 'LPSV':
      // RFC 2428 §3: after EPSV ALL every data-setup command but EPSV is refused.
      if (view.epsvAll) return reply(EPSV_ALL_REPLY, 'FTPP_ERR_EPSV_ALL');
      // RFC 1639 was superseded by RFC 2428; clients fall back to EPRT/PORT (protocol.md §2.3).
      return reply(REPLY_FOR_CODE.FTPP_ERR_NOT_IMPLEMENTED, 'FTPP_ERR_NOT_IMPLEMENTED');
    case 'REIN':
      // Resetting the session would have to reset the proxy's own state too; vsftpd does not
      // implement it either (protocol.md §3.5).
      return reply('502 REIN not implemented.', 'FTPP_ERR_NOT_IMPLEMENTED');
    case 'ABOR':
      return { kind: 'abort' };
    case 'FEAT':
      return { kind: 'feat' };
    case 'HOST':
      // RFC 7151. A client that dialled the proxy by address sends that address; the server
      // does not know it (ProFTPD: "504 Unknown hostname"), so the proxy accepts it itself and
      // the server sees what a client dialling it directly without a name sends: no HOST.
      // A real name goes through (name-based virtual hosts), and so does any HOST after login:
      // HOST belongs before login, and the server's own 503 is the honest answer (ProFTPD's).
      if (!view.loggedIn && hostNamesProxy(command.argument, view)) return { kind: 'host-answered', line: HOST_ACCEPTED_REPLY };
      return { kind: 'forward' };
    default:
      return { kind: 'forward' };
  }
}

/** Whether a HOST argument names the proxy: one of its addresses, or its advertised name. */
function hostNamesProxy(argument: string, view: SessionView): boolean {
  const host = argument.trim();
  if (host === '') return false;
  const address = parseIpLiteral(host);
  if (address !== null) return view.ownAddresses.some((own) => sameIp(own, address));
  const name = canonicalHostName(host);
  return view.ownNames.some((own) => canonicalHostName(own) === name);
}

/** DNS names compare case-insensitively (RFC 4343); "name." and "name" are the same host. */
function canonicalHostName(name: string): string {
  return (name.endsWith('.') ? name.slice(0, -1) : name).toLowerCase();
}

function activeDecision(style: 'port' | 'eprt', requested: HostPort, view: SessionView): CommandDecision {
  const decision = decideActiveTarget(requested, view.clientIp, view.allowNatFixup);
  if (!decision.ok) {
    return reply(style === 'port' ? '500 Illegal PORT command.' : '500 Illegal EPRT command.', 'FTPP_ERR_BOUNCE_REFUSED');
  }
  return { kind: 'active', style, target: decision.target, via: decision.via };
}

export type UpstreamPassiveResult =
  | { readonly ok: true; readonly port: number }
  /** The server does not know this command: try the other one (EPSV -> PASV). */
  | { readonly ok: false; readonly reason: 'unsupported' }
  /** The server refused for another reason (530 not logged in...): tell the client. */
  | { readonly ok: false; readonly reason: 'refused' }
  /** The server said yes but the address is unreadable or out of range (octet 256...). */
  | { readonly ok: false; readonly reason: 'malformed' };

/**
 * Interpret the server's answer to the proxy's own EPSV or PASV. The 227 address is ignored
 * on purpose: legacy servers advertise a private or stale NAT address (protocol.md §2.4,
 * §8.3); the proxy connects to the server's control address instead.
 */
export function interpretUpstreamPassiveReply(reply: Reply, sent: 'EPSV' | 'PASV'): UpstreamPassiveResult {
  if (sent === 'EPSV') {
    if (reply.code === 229) {
      const parsed = parseEpsvReply(reply.lines);
      return parsed.ok ? { ok: true, port: parsed.port } : { ok: false, reason: 'malformed' };
    }
    // 500/502 unknown command, 501 syntax, 522 family (vsftpd "522 Bad network protocol.").
    if (reply.code === 500 || reply.code === 501 || reply.code === 502 || reply.code === 522) {
      return { ok: false, reason: 'unsupported' };
    }
    return { ok: false, reason: 'refused' };
  }
  if (reply.code === 227) {
    const parsed = parsePasvReply(reply.lines);
    return parsed.ok ? { ok: true, port: parsed.value.port } : { ok: false, reason: 'malformed' };
  }
  return { ok: false, reason: 'refused' };
}

/** Features whose commands the proxy answers itself instead of the server (control/security.ts, LPRT). */
const FEATURES_REMOVED: ReadonlySet<string> = new Set(['AUTH', 'PBSZ', 'PROT', 'CCC', 'ADAT', 'LPRT', 'LPSV']);
/** Features the proxy offers whatever the server does (it translates EPSV/EPRT itself). */
const FEATURES_ADDED: readonly string[] = ['EPRT', 'EPSV'];
/** Added when the listener offers TLS, whatever the server says (RFC 4217 §6: FEAT lists AUTH TLS, PBSZ, PROT). */
const TLS_FEATURES: readonly string[] = ['AUTH TLS', 'PBSZ', 'PROT'];

/**
 * Edit a FEAT reply (RFC 2389) so it lists what the proxy offers: EPRT/EPSV always (the proxy
 * translates them), AUTH TLS/PBSZ/PROT when the listener offers TLS (`tls`), never the
 * server's own security extensions (each leg negotiates its own). Other lines pass unchanged.
 */
export function editFeatReply(reply: Reply, tlsOffered = false): Buffer {
  if (reply.code !== 211) return reply.raw;
  const lines = reply.lines;
  const first = lines.length > 1 ? lines[0]! : '211-Features:';
  const last = lines.length > 1 ? lines[lines.length - 1]! : '211 End';
  const inner = lines.length > 1 ? lines.slice(1, -1) : [];
  const kept = inner.filter((line) => !FEATURES_REMOVED.has(featureName(line)));
  const present = new Set(kept.map(featureName));
  for (const feature of FEATURES_ADDED) {
    if (!present.has(feature)) kept.push(` ${feature}`);
  }
  if (tlsOffered) kept.push(...TLS_FEATURES.map((feature) => ` ${feature}`));
  const text = [first.startsWith('211-') ? first : `211-${first.slice(4)}`, ...kept, last].join('\r\n') + '\r\n';
  return Buffer.from(text, 'latin1');
}

function featureName(line: string): string {
  return line.trim().split(/\s+/, 1)[0]!.toUpperCase();
}
