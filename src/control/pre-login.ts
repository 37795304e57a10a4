/**
 * Forward mode before the server is known (issue #13, upstream-selection.md A7): the proxy has
 * greeted the client itself and waits for `USER name@host[:port]`. What each command gets
 * until then. Pure: a command and the listener's TLS offer in, a decision out.
 *
 * - lftp sends FEAT before USER (upstream-selection.md A2), FileZilla and WinSCP send
 *   SYST/OPTS/CLNT around the login: answered here, with what the proxy itself provides
 *   (the client's EPSV/EPRT, PASV/PORT are the proxy's to answer whatever the server is).
 *   mod_proxy answers FEAT before USER too (test `proxy_forward_login_feat_first`).
 * - AUTH/PBSZ/PROT/CCC and HOST are the client leg's own and keep the answers rewrite.ts
 *   gives them (`own`); a HOST that does not name the proxy is answered 504, since HOST
 *   cannot pick the server (RFC 7151 names a virtual host *on* the server).
 * - Everything else waits for the login: 530 (vsftpd: "Please login with USER and PASS"),
 *   PASS without a USER 503 (RFC 959 §5.4: PASS follows USER).
 */
import type { ClientCommand } from './command.js';
import type { Reply } from './reply.js';
import { parseForwardLogin, type ForwardLoginParse } from './forward-login.js';
import { decideCommand, type CommandDecision, type SessionView } from './rewrite.js';

export type PreLoginDecision =
  /** The client named its server (or tried to): resolve, check, connect. */
  | { readonly kind: 'login'; readonly login: ForwardLoginParse }
  /** Answer with this line; nothing goes anywhere. */
  | { readonly kind: 'reply'; readonly line: string }
  /** QUIT: answer and close. */
  | { readonly kind: 'quit'; readonly line: string }
  /** A command of the client's leg (TLS, HOST naming the proxy): as decideCommand says in any session. */
  | { readonly kind: 'own'; readonly decision: Exclude<CommandDecision, { kind: 'forward' }> };

/** The proxy's own greeting: the server is not known yet. */
export const FORWARD_GREETING = '220 FTP proxy ready: log in as user@host or user@host:port.';

const FEAT_LINES = ['211-Features:', ' EPRT', ' EPSV'];
const FEAT_TLS_LINES = [' AUTH TLS', ' PBSZ', ' PROT'];

/** FEAT before the server is known: what the proxy provides itself (RFC 2389 §3.2 format). */
export function preLoginFeatures(tlsOffered: boolean): string {
  return [...FEAT_LINES, ...(tlsOffered ? FEAT_TLS_LINES : []), '211 End (the server\'s features follow once you are logged in)'].join('\r\n');
}

const LEG_OWN = new Set(['AUTH', 'PBSZ', 'PROT', 'CCC', 'HOST']);

export function decidePreLogin(command: ClientCommand, view: SessionView, tlsOffered: boolean): PreLoginDecision {
  switch (command.verb) {
    case 'USER': {
      // tls.require: no login before AUTH TLS, whichever server it would name.
      const decision = decideCommand(command, view);
      if (decision.kind === 'reply') return { kind: 'own', decision };
      return { kind: 'login', login: parseForwardLogin(command.argument) };
    }
    case 'PASS':
      return { kind: 'reply', line: '503 Log in with USER user@host first.' };
    case 'QUIT':
      return { kind: 'quit', line: '221 Goodbye.' };
    case 'FEAT':
      return { kind: 'reply', line: preLoginFeatures(tlsOffered) };
    case 'SYST':
      // What vsftpd, ProFTPD and most servers say; clients use it to pick a LIST parser.
      return { kind: 'reply', line: '215 UNIX Type: L8' };
    case 'NOOP':
      return { kind: 'reply', line: '200 NOOP ok.' };
    case 'OPTS':
      // RFC 2389 §4: options belong to the server, which is not known yet; 202 = not needed here.
      return { kind: 'reply', line: '202 OPTS is for the server: send it again once logged in.' };
    case 'CLNT':
      return { kind: 'reply', line: '200 Noted.' };
    default: {
      if (!LEG_OWN.has(command.verb)) return { kind: 'reply', line: '530 Please log in with USER user@host first.' };
      const decision = decideCommand(command, view);
      // Only a HOST naming some other host would go to the server, and there is none yet.
      if (decision.kind === 'forward') return { kind: 'reply', line: '504 HOST cannot choose the server here: log in as user@host.' };
      return { kind: 'own', decision };
    }
  }
}

/**
 * The reply to the forwarded `USER name` with the server's greeting in front, as continuation
 * lines of that reply (`331-` ...): the client was greeted by the proxy, and a second bare
 * 220 would be read as the answer to USER (upstream-selection.md A3: the TIS-FWTK style
 * mod_proxy plans; Net::FTP's "dumb firewalls" workaround exists because of that 220).
 * Every banner line is prefixed `ddd-`, so none can end the reply early.
 */
export function withServerBanner(greeting: Reply, reply: Reply): Buffer {
  const prefix = `${String(reply.code).padStart(3, '0')}-`;
  const banner = greeting.lines.map((line) => `${prefix}${line.replace(/^\d{3}[ -]?/, '')}\r\n`).join('');
  return Buffer.concat([Buffer.from(banner, 'latin1'), reply.raw]);
}
