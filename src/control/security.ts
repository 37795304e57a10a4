/**
 * The security commands of the client's leg (RFC 2228, RFC 4217, protocol.md §5.1-5.2): what
 * the proxy answers to AUTH, PBSZ, PROT and CCC, and which commands a listener that requires
 * TLS refuses. Pure: the session carries the decisions out (the 234, the handshake).
 *
 * Each leg negotiates on its own (protocol.md §5.3): none of these commands is ever forwarded.
 * The server's leg is secured by the proxy's own AUTH/PBSZ/PROT (session/upstream-tls.ts).
 */
import type { ErrorCode } from '../errors.js';

/** Data protection level (RFC 2228 §3 PROT): Clear or Private; Safe and Confidential are not offered. */
export type ProtectionLevel = 'C' | 'P';

/** What the client's leg has negotiated so far. */
export interface ClientProtection {
  /** The listener offers TLS (`tls` configured) and how. Null: AUTH is refused, as before TLS existed. */
  readonly offer: { readonly mode: 'explicit' | 'implicit'; readonly require: boolean } | null;
  /** The control connection is TLS now (after AUTH's handshake, or implicit from the start). */
  readonly secured: boolean;
  /** PROT for data connections; `C` until the client says otherwise (implicit: `P`, [MS-FTPS] 2.2.2). */
  readonly prot: ProtectionLevel;
}

export type SecurityDecision =
  /** Answer `234`, then hand the connection to TLS; `prot` is the level AUTH implies. */
  | { readonly kind: 'start-tls'; readonly line: string; readonly prot: ProtectionLevel }
  /** Answered here; `prot`, when present, is the new data protection level. */
  | { readonly kind: 'answer'; readonly line: string; readonly prot?: ProtectionLevel }
  /** Refused here (logged as a refusal with `errorCode`). */
  | { readonly kind: 'refuse'; readonly line: string; readonly errorCode: ErrorCode };

/** The initial protection of a client leg. */
export function initialProtection(offer: ClientProtection['offer']): ClientProtection {
  const implicit = offer?.mode === 'implicit';
  return { offer, secured: implicit, prot: implicit ? 'P' : 'C' };
}

/**
 * AUTH mechanisms vsftpd accepts (ssl.c handle_auth): TLS and TLS-C leave data in the clear
 * until PROT P; SSL and TLS-P are the pre-RFC 4217 forms that also protect data. curl 7.88
 * sends `AUTH SSL` first (test-environment facts in test/integration/ftps-baseline.test.ts).
 */
const AUTH_MECHANISMS: ReadonlyMap<string, ProtectionLevel> = new Map([
  ['TLS', 'C'],
  ['TLS-C', 'C'],
  ['SSL', 'P'],
  ['TLS-P', 'P'],
]);

/** Verbs of RFC 2228 the proxy never offers (GSSAPI-style security data). */
const UNOFFERED_SECURITY_VERBS: ReadonlySet<string> = new Set(['ADAT', 'MIC', 'CONF', 'ENC']);

const SECURE_FIRST = 'FTPP_ERR_TLS_SEQUENCE';

/**
 * The decision for a security command, or null when `verb` is not one. Without a TLS offer
 * every security verb keeps its 502 (lftp and others then go on in plain text).
 */
export function decideSecurityCommand(verb: string, argument: string, protection: ClientProtection, loggedIn: boolean): SecurityDecision | null {
  const isSecurityVerb = verb === 'AUTH' || verb === 'PBSZ' || verb === 'PROT' || verb === 'CCC' || UNOFFERED_SECURITY_VERBS.has(verb);
  if (!isSecurityVerb) return null;
  if (protection.offer === null || UNOFFERED_SECURITY_VERBS.has(verb)) {
    return { kind: 'refuse', line: `502 ${verb} not supported by this proxy.`, errorCode: 'FTPP_ERR_NOT_IMPLEMENTED' };
  }
  const arg = argument.trim().toUpperCase();
  switch (verb) {
    case 'AUTH': {
      // RFC 4217 §4: AUTH on an already protected connection is a sequence error.
      if (protection.secured) return { kind: 'refuse', line: '503 Already using TLS.', errorCode: SECURE_FIRST };
      // After login the credentials have already crossed in clear text; vsftpd only takes AUTH before.
      if (loggedIn) return { kind: 'refuse', line: '503 AUTH must come before login.', errorCode: SECURE_FIRST };
      const prot = AUTH_MECHANISMS.get(arg);
      if (prot === undefined) return { kind: 'refuse', line: '504 Unknown AUTH type.', errorCode: 'FTPP_ERR_NOT_IMPLEMENTED' };
      return { kind: 'start-tls', line: '234 Proceed with negotiation.', prot };
    }
    case 'PBSZ':
      if (!protection.secured) return { kind: 'refuse', line: '503 PBSZ needs a secure connection.', errorCode: SECURE_FIRST };
      if (!/^\d{1,10}$/.test(arg)) return { kind: 'refuse', line: '501 PBSZ needs a number.', errorCode: 'FTPP_ERR_BAD_ARGUMENT' };
      // RFC 4217 §9: TLS needs no buffer size; any other value is answered with the one in force.
      return { kind: 'answer', line: arg.replace(/^0+(?=\d)/, '') === '0' ? '200 PBSZ set to 0.' : '200 PBSZ=0' };
    case 'PROT':
      if (!protection.secured) return { kind: 'refuse', line: '503 PROT needs a secure connection.', errorCode: SECURE_FIRST };
      if (arg === 'P') return { kind: 'answer', line: '200 PROT now Private.', prot: 'P' };
      if (arg === 'C') return { kind: 'answer', line: '200 PROT now Clear.', prot: 'C' };
      if (arg === 'S' || arg === 'E') return { kind: 'refuse', line: '536 PROT not supported.', errorCode: 'FTPP_ERR_NOT_IMPLEMENTED' };
      return { kind: 'refuse', line: '504 PROT not recognized.', errorCode: 'FTPP_ERR_BAD_ARGUMENT' };
    default:
      // CCC (RFC 4217 §11) only exists so that NAT ALGs can read the control stream again; the
      // proxy reads it already, so clearing it would only give up protection (protocol.md §5.1).
      return { kind: 'refuse', line: '534 Request denied for policy reasons.', errorCode: 'FTPP_ERR_TLS_POLICY' };
  }
}

/**
 * A command a listener with `require: true` refuses before the connection is protected:
 * USER before AUTH (vsftpd force_local_logins_ssl), and a transfer with data in the clear
 * (force_local_data_ssl). Null: allowed.
 */
export function requiredProtectionRefusal(verb: string, isTransfer: boolean, protection: ClientProtection): SecurityDecision | null {
  if (!protection.offer?.require) return null;
  if (verb === 'USER' && !protection.secured) {
    return { kind: 'refuse', line: '530 Non-anonymous sessions must use encryption.', errorCode: 'FTPP_ERR_TLS_REQUIRED' };
  }
  if (isTransfer && protection.prot !== 'P') {
    return { kind: 'refuse', line: '522 Data connections must be encrypted.', errorCode: 'FTPP_ERR_TLS_REQUIRED' };
  }
  return null;
}
