/**
 * The client leg's security commands (control/security.ts; RFC 2228, RFC 4217, protocol.md
 * §5.1-5.3) as tables: every security verb in every protection state, `require` refusals, and
 * how decideCommand (control/rewrite.ts) routes them (never `forward`: each leg negotiates its
 * own protection) and how FEAT is edited when the listener offers TLS.
 */
import t from 'tap';
import {
  decideSecurityCommand,
  initialProtection,
  requiredProtectionRefusal,
  type ClientProtection,
  type SecurityDecision,
} from '../../src/control/security.js';
import { decideCommand, editFeatReply, type CommandDecision, type SessionView } from '../../src/control/rewrite.js';
import { parseCommandLine } from '../../src/control/command.js';
import type { Reply } from '../../src/control/reply.js';
import type { ErrorCode } from '../../src/errors.js';
import { assembleChunks, bytes } from '../helpers/split.js';

// ------------------------------------------------------------------ protection states

const NO_OFFER = initialProtection(null);
/** Explicit listener, before AUTH. */
const PLAIN = initialProtection({ mode: 'explicit', require: false });
/** After AUTH TLS's handshake: secured, data still clear. */
const SECURED: ClientProtection = { ...PLAIN, secured: true };
/** After AUTH TLS + PROT P. */
const SECURED_P: ClientProtection = { ...SECURED, prot: 'P' };
/** Implicit listener: secured from the first byte with PROT P implied ([MS-FTPS]). */
const IMPLICIT = initialProtection({ mode: 'implicit', require: false });
const REQUIRE_PLAIN = initialProtection({ mode: 'explicit', require: true });
const REQUIRE_SECURED: ClientProtection = { ...REQUIRE_PLAIN, secured: true };
const REQUIRE_SECURED_P: ClientProtection = { ...REQUIRE_SECURED, prot: 'P' };
/** The pure code does not know config.ts drops `require` for implicit listeners: it must still let a secured PROT P session through. */
const REQUIRE_IMPLICIT = initialProtection({ mode: 'implicit', require: true });

const refuse = (line: string, errorCode: ErrorCode): SecurityDecision => ({ kind: 'refuse', line, errorCode });
const answer = (line: string, prot?: 'C' | 'P'): SecurityDecision => (prot ? { kind: 'answer', line, prot } : { kind: 'answer', line });
const startTls = (prot: 'C' | 'P'): SecurityDecision => ({ kind: 'start-tls', line: '234 Proceed with negotiation.', prot });

const notSupported = (verb: string): SecurityDecision => refuse(`502 ${verb} not supported by this proxy.`, 'FTPP_ERR_NOT_IMPLEMENTED');
const ALREADY = refuse('503 Already using TLS.', 'FTPP_ERR_TLS_SEQUENCE');
const AFTER_LOGIN = refuse('503 AUTH must come before login.', 'FTPP_ERR_TLS_SEQUENCE');
const UNKNOWN_AUTH = refuse('504 Unknown AUTH type.', 'FTPP_ERR_NOT_IMPLEMENTED');
const PBSZ_FIRST = refuse('503 PBSZ needs a secure connection.', 'FTPP_ERR_TLS_SEQUENCE');
const PROT_FIRST = refuse('503 PROT needs a secure connection.', 'FTPP_ERR_TLS_SEQUENCE');
const PBSZ_NAN = refuse('501 PBSZ needs a number.', 'FTPP_ERR_BAD_ARGUMENT');
const PBSZ_0 = answer('200 PBSZ set to 0.');
const PBSZ_OTHER = answer('200 PBSZ=0');
const PROT_P = answer('200 PROT now Private.', 'P');
const PROT_C = answer('200 PROT now Clear.', 'C');
const PROT_536 = refuse('536 PROT not supported.', 'FTPP_ERR_NOT_IMPLEMENTED');
const PROT_504 = refuse('504 PROT not recognized.', 'FTPP_ERR_BAD_ARGUMENT');
const CCC_534 = refuse('534 Request denied for policy reasons.', 'FTPP_ERR_TLS_POLICY');

t.test('initialProtection', async (t) => {
  t.strictSame(NO_OFFER, { offer: null, secured: false, prot: 'C' }, 'no TLS offered: plain, PROT C');
  t.strictSame(PLAIN, { offer: { mode: 'explicit', require: false }, secured: false, prot: 'C' }, 'explicit: plain until AUTH');
  t.strictSame(IMPLICIT, { offer: { mode: 'implicit', require: false }, secured: true, prot: 'P' }, 'implicit: secured with PROT P implied ([MS-FTPS] 2.2.2)');
});

// ------------------------------------------------------------------ decideSecurityCommand

type Row = [name: string, verb: string, argument: string, protection: ClientProtection, loggedIn: boolean, expected: SecurityDecision | null];

const rows: Row[] = [
  // No TLS offered: every security verb keeps its 502, whatever the argument (lftp then goes on in clear text).
  ...(['AUTH', 'PBSZ', 'PROT', 'CCC', 'ADAT', 'MIC', 'CONF', 'ENC'] as const).map(
    (verb): Row => [`no offer: ${verb}`, verb, verb === 'AUTH' ? 'TLS' : verb === 'PBSZ' ? '0' : verb === 'PROT' ? 'P' : '', NO_OFFER, false, notSupported(verb)],
  ),
  ['no offer: AUTH after login', 'AUTH', 'TLS', NO_OFFER, true, notSupported('AUTH')],
  ['no offer: AUTH unknown mechanism is still 502, not 504', 'AUTH', 'KERBEROS_V4', NO_OFFER, false, notSupported('AUTH')],
  // RFC 2228 verbs the proxy never offers, even on a TLS listener and a secured connection.
  ...(['ADAT', 'MIC', 'CONF', 'ENC'] as const).flatMap((verb): Row[] => [
    [`offer, plain: ${verb}`, verb, 'AAAA', PLAIN, false, notSupported(verb)],
    [`offer, secured: ${verb}`, verb, 'AAAA', SECURED_P, true, notSupported(verb)],
  ]),
  // AUTH mechanisms (vsftpd ssl.c handle_auth): TLS/TLS-C keep data clear, SSL/TLS-P protect it.
  ['AUTH TLS', 'AUTH', 'TLS', PLAIN, false, startTls('C')],
  ['AUTH TLS-C', 'AUTH', 'TLS-C', PLAIN, false, startTls('C')],
  ['AUTH SSL (curl asks this first)', 'AUTH', 'SSL', PLAIN, false, startTls('P')],
  ['AUTH TLS-P', 'AUTH', 'TLS-P', PLAIN, false, startTls('P')],
  ['AUTH tls: mechanism case-insensitive', 'AUTH', 'tls', PLAIN, false, startTls('C')],
  ['AUTH Ssl', 'AUTH', 'Ssl', PLAIN, false, startTls('P')],
  ['AUTH tls-p', 'AUTH', 'tls-p', PLAIN, false, startTls('P')],
  ['AUTH " TLS " (surrounding blanks)', 'AUTH', ' TLS ', PLAIN, false, startTls('C')],
  ['AUTH TLS under require', 'AUTH', 'TLS', REQUIRE_PLAIN, false, startTls('C')],
  ['AUTH unknown mechanism', 'AUTH', 'GSSAPI', PLAIN, false, UNKNOWN_AUTH],
  ['AUTH KERBEROS_V4', 'AUTH', 'KERBEROS_V4', PLAIN, false, UNKNOWN_AUTH],
  ['AUTH without argument', 'AUTH', '', PLAIN, false, UNKNOWN_AUTH],
  ['AUTH TLS with trailing words', 'AUTH', 'TLS X', PLAIN, false, UNKNOWN_AUTH],
  ['AUTH TLS1.2 is not a mechanism', 'AUTH', 'TLS1.2', PLAIN, false, UNKNOWN_AUTH],
  ['AUTH TLS twice (RFC 4217 §4)', 'AUTH', 'TLS', SECURED, false, ALREADY],
  ['AUTH TLS twice after PROT P', 'AUTH', 'TLS', SECURED_P, true, ALREADY],
  ['AUTH SSL on a secured connection', 'AUTH', 'SSL', SECURED, false, ALREADY],
  ['AUTH unknown on a secured connection: sequence first', 'AUTH', 'BOGUS', SECURED, false, ALREADY],
  ['AUTH TLS on implicit FTPS', 'AUTH', 'TLS', IMPLICIT, false, ALREADY],
  ['AUTH TLS after login (credentials already crossed in clear)', 'AUTH', 'TLS', PLAIN, true, AFTER_LOGIN],
  ['AUTH SSL after login', 'AUTH', 'SSL', PLAIN, true, AFTER_LOGIN],
  ['AUTH unknown after login: login first', 'AUTH', 'BOGUS', PLAIN, true, AFTER_LOGIN],
  // PBSZ (RFC 4217 §9: TLS needs no buffer; any value is answered with the one in force).
  ['PBSZ 0 before AUTH', 'PBSZ', '0', PLAIN, false, PBSZ_FIRST],
  ['PBSZ garbage before AUTH: sequence first', 'PBSZ', 'x', PLAIN, false, PBSZ_FIRST],
  ['PBSZ before AUTH under require', 'PBSZ', '0', REQUIRE_PLAIN, false, PBSZ_FIRST],
  ['PBSZ 0', 'PBSZ', '0', SECURED, false, PBSZ_0],
  ['PBSZ 0 after login', 'PBSZ', '0', SECURED, true, PBSZ_0],
  ['PBSZ 0 on implicit (clients still send it: 200)', 'PBSZ', '0', IMPLICIT, false, PBSZ_0],
  ['PBSZ 000', 'PBSZ', '000', SECURED, false, PBSZ_0],
  ['PBSZ " 0 "', 'PBSZ', ' 0 ', SECURED, false, PBSZ_0],
  ['PBSZ 1024', 'PBSZ', '1024', SECURED, false, PBSZ_OTHER],
  ['PBSZ 1', 'PBSZ', '1', SECURED, false, PBSZ_OTHER],
  ['PBSZ 0010', 'PBSZ', '0010', SECURED, false, PBSZ_OTHER],
  ['PBSZ 4294967295 (ten digits)', 'PBSZ', '4294967295', SECURED, false, PBSZ_OTHER],
  ['PBSZ eleven digits', 'PBSZ', '42949672950', SECURED, false, PBSZ_NAN],
  ['PBSZ without argument', 'PBSZ', '', SECURED, false, PBSZ_NAN],
  ['PBSZ -1', 'PBSZ', '-1', SECURED, false, PBSZ_NAN],
  ['PBSZ +1', 'PBSZ', '+1', SECURED, false, PBSZ_NAN],
  ['PBSZ 0x10', 'PBSZ', '0x10', SECURED, false, PBSZ_NAN],
  ['PBSZ 1.5', 'PBSZ', '1.5', SECURED, false, PBSZ_NAN],
  ['PBSZ abc', 'PBSZ', 'abc', SECURED, false, PBSZ_NAN],
  ['PBSZ "0 0"', 'PBSZ', '0 0', SECURED, false, PBSZ_NAN],
  ['PBSZ full-width digit', 'PBSZ', '\uff10', SECURED, false, PBSZ_NAN],
  // PROT (RFC 2228 §3; vsftpd's replies).
  ...(['C', 'P', 'S', 'E', 'X', ''] as const).flatMap((level): Row[] => [
    [`PROT ${level || '(none)'} before AUTH`, 'PROT', level, PLAIN, false, PROT_FIRST],
    [`PROT ${level || '(none)'} before AUTH under require`, 'PROT', level, REQUIRE_PLAIN, false, PROT_FIRST],
  ]),
  ['PROT P', 'PROT', 'P', SECURED, false, PROT_P],
  ['PROT C', 'PROT', 'C', SECURED, false, PROT_C],
  ['PROT C after PROT P', 'PROT', 'C', SECURED_P, true, PROT_C],
  ['PROT P again', 'PROT', 'P', SECURED_P, true, PROT_P],
  ['PROT p (level case-insensitive)', 'PROT', 'p', SECURED, false, PROT_P],
  ['PROT c', 'PROT', 'c', SECURED_P, false, PROT_C],
  ['PROT " P "', 'PROT', ' P ', SECURED, false, PROT_P],
  ['PROT S', 'PROT', 'S', SECURED, false, PROT_536],
  ['PROT E', 'PROT', 'E', SECURED, false, PROT_536],
  ['PROT s', 'PROT', 's', SECURED, false, PROT_536],
  ['PROT X', 'PROT', 'X', SECURED, false, PROT_504],
  ['PROT without argument', 'PROT', '', SECURED, false, PROT_504],
  ['PROT PP', 'PROT', 'PP', SECURED, false, PROT_504],
  ['PROT P C', 'PROT', 'P C', SECURED, false, PROT_504],
  ['PROT Private (the word, not the letter)', 'PROT', 'Private', SECURED, false, PROT_504],
  ['PROT P on implicit', 'PROT', 'P', IMPLICIT, false, PROT_P],
  ['PROT C on implicit', 'PROT', 'C', IMPLICIT, false, PROT_C],
  ['PROT C under require (allowed; the transfer is refused later)', 'PROT', 'C', REQUIRE_SECURED_P, true, PROT_C],
  // CCC (RFC 4217 §11): the proxy reads the control stream already, clearing it only gives up protection.
  ['CCC before AUTH', 'CCC', '', PLAIN, false, CCC_534],
  ['CCC secured', 'CCC', '', SECURED, false, CCC_534],
  ['CCC after PROT P and login', 'CCC', '', SECURED_P, true, CCC_534],
  ['CCC on implicit', 'CCC', '', IMPLICIT, false, CCC_534],
  ['CCC with an argument', 'CCC', 'now', SECURED, false, CCC_534],
  // Not security verbs: null, whatever the state.
  ['USER', 'USER', 'x', PLAIN, false, null],
  ['RETR', 'RETR', 'f', SECURED_P, true, null],
  ['FEAT', 'FEAT', '', NO_OFFER, false, null],
  ['AUTHX is not AUTH', 'AUTHX', 'TLS', PLAIN, false, null],
  ['PRO is not PROT', 'PRO', 'P', SECURED, false, null],
  ['XCCC is not CCC', 'XCCC', '', SECURED, false, null],
];

t.test('decideSecurityCommand: every verb in every state', async (t) => {
  for (const [name, verb, argument, protection, loggedIn, expected] of rows) {
    t.strictSame(decideSecurityCommand(verb, argument, protection, loggedIn), expected, `${name}: ${verb} ${JSON.stringify(argument)}`);
  }
});

t.test('decideSecurityCommand: replies are single well-formed lines of the class their kind implies', async (t) => {
  const states = [NO_OFFER, PLAIN, SECURED, SECURED_P, IMPLICIT, REQUIRE_PLAIN, REQUIRE_SECURED];
  const args = ['', 'TLS', 'SSL', 'P', 'C', 'S', '0', '1', 'x', '\r', ' '];
  let checked = 0;
  for (const verb of ['AUTH', 'PBSZ', 'PROT', 'CCC', 'ADAT', 'MIC', 'CONF', 'ENC']) {
    for (const protection of states) {
      for (const arg of args) {
        for (const loggedIn of [false, true]) {
          const d = decideSecurityCommand(verb, arg, protection, loggedIn);
          checked++;
          if (!d) {
            t.fail(`${verb} ${JSON.stringify(arg)}: a security verb got no decision`);
            continue;
          }
          const ok = /^\d{3} [ -~]+$/.test(d.line) &&
            (d.kind === 'start-tls' ? d.line.startsWith('234 ') : d.kind === 'answer' ? d.line.startsWith('200 ') : /^[45]\d\d /.test(d.line));
          if (!ok) t.fail(`${verb} ${JSON.stringify(arg)} -> ${JSON.stringify(d)}`);
          // Nothing but AUTH can start TLS; a plain connection cannot change PROT.
          if (d.kind === 'start-tls' && verb !== 'AUTH') t.fail(`${verb} started TLS`);
          if (d.kind === 'answer' && d.prot && !protection.secured) t.fail(`${verb} changed PROT on a plain connection`);
          if (protection.offer === null && d.kind !== 'refuse') t.fail(`${verb} accepted without a TLS offer`);
        }
      }
    }
  }
  t.equal(checked, 8 * states.length * args.length * 2, `${checked} combinations`);
});

// ------------------------------------------------------------------ requiredProtectionRefusal

const USER_530 = refuse('530 Non-anonymous sessions must use encryption.', 'FTPP_ERR_TLS_REQUIRED');
const DATA_522 = refuse('522 Data connections must be encrypted.', 'FTPP_ERR_TLS_REQUIRED');

t.test('requiredProtectionRefusal: what `require: true` refuses', async (t) => {
  const table: [name: string, verb: string, isTransfer: boolean, protection: ClientProtection, expected: SecurityDecision | null][] = [
    ['USER before AUTH (vsftpd force_local_logins_ssl)', 'USER', false, REQUIRE_PLAIN, USER_530],
    ['USER after AUTH', 'USER', false, REQUIRE_SECURED, null],
    ['USER after AUTH + PROT P', 'USER', false, REQUIRE_SECURED_P, null],
    ['PASS before AUTH (USER was refused; the server answers)', 'PASS', false, REQUIRE_PLAIN, null],
    ['transfer before AUTH (PROT C)', 'RETR', true, REQUIRE_PLAIN, DATA_522],
    ['transfer after AUTH, PROT C (force_local_data_ssl)', 'RETR', true, REQUIRE_SECURED, DATA_522],
    ['LIST after AUTH, PROT C', 'LIST', true, REQUIRE_SECURED, DATA_522],
    ['STOR after AUTH, PROT C', 'STOR', true, REQUIRE_SECURED, DATA_522],
    ['transfer after AUTH + PROT P', 'RETR', true, REQUIRE_SECURED_P, null],
    ['PROT C again after PROT P: transfers refused again', 'RETR', true, { ...REQUIRE_SECURED_P, prot: 'C' }, DATA_522],
    ['implicit starts secured with PROT P: USER allowed', 'USER', false, REQUIRE_IMPLICIT, null],
    ['implicit starts secured with PROT P: transfer allowed', 'RETR', true, REQUIRE_IMPLICIT, null],
    ['implicit after PROT C: transfer refused', 'RETR', true, { ...REQUIRE_IMPLICIT, prot: 'C' }, DATA_522],
    ['PASV before AUTH: not refused here', 'PASV', false, REQUIRE_PLAIN, null],
    ['FEAT before AUTH', 'FEAT', false, REQUIRE_PLAIN, null],
    ['AUTH before AUTH', 'AUTH', false, REQUIRE_PLAIN, null],
    ['without require: USER before AUTH', 'USER', false, PLAIN, null],
    ['without require: transfer under PROT C', 'RETR', true, SECURED, null],
    ['no offer at all', 'USER', false, NO_OFFER, null],
    ['no offer at all: transfer', 'STOR', true, NO_OFFER, null],
  ];
  for (const [name, verb, isTransfer, protection, expected] of table) {
    t.strictSame(requiredProtectionRefusal(verb, isTransfer, protection), expected, name);
  }
});

// ------------------------------------------------------------------ decideCommand routing

const BASE: SessionView = {
  controlFamily: 4,
  clientIp: '198.51.100.7',
  epsvAll: false,
  allowNatFixup: true,
  loggedIn: false,
  ownAddresses: ['203.0.113.10'],
  ownNames: [],
  protection: NO_OFFER,
};
const view = (protection: ClientProtection, loggedIn = false): SessionView => ({ ...BASE, protection, loggedIn });
const reply = (line: string, errorCode: ErrorCode): CommandDecision => ({ kind: 'reply', line, errorCode });
const START_TLS = (prot: 'C' | 'P'): CommandDecision => ({ kind: 'start-tls', line: '234 Proceed with negotiation.', prot });
const protection = (line: string, prot?: 'C' | 'P'): CommandDecision => (prot ? { kind: 'protection', line, prot } : { kind: 'protection', line });

function decide(wire: string, v: SessionView): CommandDecision | string {
  const parsed = parseCommandLine(bytes(wire));
  return parsed.ok ? decideCommand(parsed.command, v) : `unparsed:${parsed.reason}`;
}

t.test('decideCommand routes security commands: answered here, never forwarded (§5.3)', async (t) => {
  const table: [name: string, wire: string, v: SessionView, expected: CommandDecision][] = [
    ['no offer: AUTH TLS 502', 'AUTH TLS', view(NO_OFFER), reply('502 AUTH not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['no offer: auth tls (lower case) 502', 'auth tls', view(NO_OFFER), reply('502 AUTH not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['no offer: PBSZ 502', 'PBSZ 0', view(NO_OFFER), reply('502 PBSZ not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['no offer: PROT 502', 'PROT P', view(NO_OFFER), reply('502 PROT not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['no offer: CCC 502', 'CCC', view(NO_OFFER), reply('502 CCC not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['no offer: ADAT 502', 'ADAT YWJj', view(NO_OFFER), reply('502 ADAT not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['offer: ADAT 502', 'ADAT YWJj', view(PLAIN), reply('502 ADAT not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['offer: MIC 502', 'MIC YWJj', view(SECURED), reply('502 MIC not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['AUTH TLS', 'AUTH TLS', view(PLAIN), START_TLS('C')],
    ['auth tls: verb and mechanism case-insensitive', 'auth tls', view(PLAIN), START_TLS('C')],
    ['Auth Ssl', 'Auth Ssl', view(PLAIN), START_TLS('P')],
    ['AUTH TLS-P', 'AUTH TLS-P', view(PLAIN), START_TLS('P')],
    ['AUTH TLS-C', 'AUTH TLS-C', view(PLAIN), START_TLS('C')],
    ['AUTH TLS behind Telnet IAC noise', '\xff\xf4AUTH TLS', view(PLAIN), START_TLS('C')],
    ['AUTH BOGUS 504', 'AUTH BOGUS', view(PLAIN), reply('504 Unknown AUTH type.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['AUTH TLS twice 503', 'AUTH TLS', view(SECURED), reply('503 Already using TLS.', 'FTPP_ERR_TLS_SEQUENCE')],
    ['AUTH TLS after login 503', 'AUTH TLS', view(PLAIN, true), reply('503 AUTH must come before login.', 'FTPP_ERR_TLS_SEQUENCE')],
    ['AUTH TLS on implicit 503', 'AUTH TLS', view(IMPLICIT), reply('503 Already using TLS.', 'FTPP_ERR_TLS_SEQUENCE')],
    ['PBSZ 0 before AUTH 503', 'PBSZ 0', view(PLAIN), reply('503 PBSZ needs a secure connection.', 'FTPP_ERR_TLS_SEQUENCE')],
    ['pbsz 0', 'pbsz 0', view(SECURED), protection('200 PBSZ set to 0.')],
    ['PBSZ 512', 'PBSZ 512', view(SECURED), protection('200 PBSZ=0')],
    ['PBSZ garbage 501', 'PBSZ zero', view(SECURED), reply('501 PBSZ needs a number.', 'FTPP_ERR_BAD_ARGUMENT')],
    ['PROT P before AUTH 503', 'PROT P', view(PLAIN), reply('503 PROT needs a secure connection.', 'FTPP_ERR_TLS_SEQUENCE')],
    ['prot p', 'prot p', view(SECURED), protection('200 PROT now Private.', 'P')],
    ['PROT C', 'PROT C', view(SECURED_P), protection('200 PROT now Clear.', 'C')],
    ['PROT E 536', 'PROT E', view(SECURED), reply('536 PROT not supported.', 'FTPP_ERR_NOT_IMPLEMENTED')],
    ['PROT X 504', 'PROT X', view(SECURED), reply('504 PROT not recognized.', 'FTPP_ERR_BAD_ARGUMENT')],
    ['CCC 534', 'CCC', view(SECURED_P, true), reply('534 Request denied for policy reasons.', 'FTPP_ERR_TLS_POLICY')],
    ['ccc 534', 'ccc', view(PLAIN), reply('534 Request denied for policy reasons.', 'FTPP_ERR_TLS_POLICY')],
    // require: refusals come before anything reaches the server.
    ['require: USER before AUTH 530', 'USER alice', view(REQUIRE_PLAIN), reply('530 Non-anonymous sessions must use encryption.', 'FTPP_ERR_TLS_REQUIRED')],
    ['require: user (lower case) before AUTH 530', 'user alice', view(REQUIRE_PLAIN), reply('530 Non-anonymous sessions must use encryption.', 'FTPP_ERR_TLS_REQUIRED')],
    ['require: USER after AUTH forwarded', 'USER alice', view(REQUIRE_SECURED), { kind: 'forward' }],
    ['require: AUTH TLS starts TLS', 'AUTH TLS', view(REQUIRE_PLAIN), START_TLS('C')],
    ['require: RETR under PROT C 522', 'RETR f', view(REQUIRE_SECURED, true), reply('522 Data connections must be encrypted.', 'FTPP_ERR_TLS_REQUIRED')],
    ['require: STOR under PROT C 522', 'STOR f', view(REQUIRE_SECURED, true), reply('522 Data connections must be encrypted.', 'FTPP_ERR_TLS_REQUIRED')],
    ['require: nlst under PROT C 522', 'nlst', view(REQUIRE_SECURED, true), reply('522 Data connections must be encrypted.', 'FTPP_ERR_TLS_REQUIRED')],
    ['require: RETR before AUTH 522', 'RETR f', view(REQUIRE_PLAIN), reply('522 Data connections must be encrypted.', 'FTPP_ERR_TLS_REQUIRED')],
    ['require: RETR under PROT P is a transfer', 'RETR f', view(REQUIRE_SECURED_P, true), { kind: 'transfer', direction: 'download' }],
    ['require: implicit RETR is a transfer', 'RETR f', view(REQUIRE_IMPLICIT, true), { kind: 'transfer', direction: 'download' }],
    ['require: PASV under PROT C still a passive setup', 'PASV', view(REQUIRE_SECURED, true), { kind: 'passive', style: 'pasv' }],
    ['no require: RETR under PROT C is a transfer', 'RETR f', view(SECURED, true), { kind: 'transfer', direction: 'download' }],
    ['no require: USER before AUTH forwarded', 'USER alice', view(PLAIN), { kind: 'forward' }],
  ];
  for (const [name, wire, v, expected] of table) t.strictSame(decide(wire, v), expected, `${name}: ${JSON.stringify(wire)}`);
});

t.test('decideCommand: no state forwards a security verb to the server', async (t) => {
  const states = [NO_OFFER, PLAIN, SECURED, SECURED_P, IMPLICIT, REQUIRE_PLAIN, REQUIRE_SECURED, REQUIRE_SECURED_P];
  const lines = ['AUTH TLS', 'AUTH SSL', 'AUTH', 'AUTH X', 'PBSZ 0', 'PBSZ', 'PROT P', 'PROT C', 'PROT S', 'PROT', 'CCC', 'ADAT x', 'MIC x', 'CONF x', 'ENC x'];
  const forwarded: string[] = [];
  for (const protection of states) {
    for (const loggedIn of [false, true]) {
      for (const line of lines) {
        for (const wire of [line, line.toLowerCase()]) {
          const d = decide(wire, view(protection, loggedIn));
          if (typeof d === 'string' || !['reply', 'start-tls', 'protection'].includes(d.kind)) forwarded.push(`${wire} (${JSON.stringify(protection)}, loggedIn ${loggedIn}) -> ${JSON.stringify(d)}`);
        }
      }
    }
  }
  t.same(forwarded, [], 'every security command answered by the proxy');
});

// ------------------------------------------------------------------ FEAT with TLS offered

function replyOf(wire: string): Reply {
  const events = assembleChunks([bytes(wire)]);
  const event = events[0];
  if (events.length !== 1 || event?.kind !== 'reply') throw new Error(`fixture is not one reply: ${JSON.stringify(wire)}`);
  return { code: event.code, lines: event.lines, raw: bytes(event.raw) };
}

const featOf = (wire: string, tlsOffered: boolean): string => editFeatReply(replyOf(wire), tlsOffered).toString('latin1');
const featureLines = (text: string): string[] => text.split('\r\n').slice(1, -2).map((line) => line.trim());

t.test('editFeatReply with TLS offered: AUTH TLS, PBSZ, PROT listed once; the server\'s own dropped (RFC 4217 §6)', async (t) => {
  const VSFTPD_FTPS = '211-Features:\r\n AUTH SSL\r\n AUTH TLS\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n PBSZ\r\n PROT\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n211 End\r\n';
  t.equal(
    featOf(VSFTPD_FTPS, true),
    '211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n',
    'an FTPS vsftpd: its AUTH SSL/AUTH TLS/PBSZ/PROT replaced by the proxy\'s own',
  );
  t.equal(
    featOf('211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n SIZE\r\n211 End\r\n', true),
    '211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n SIZE\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n',
    'a plain server: the proxy adds AUTH TLS, PBSZ, PROT',
  );
  t.equal(
    featOf('211-Features:\r\n auth tls\r\n Auth Ssl\r\n pbsz\r\n prot\r\n ccc\r\n ADAT\r\n MDTM\r\n211 End\r\n', true),
    '211-Features:\r\n MDTM\r\n EPRT\r\n EPSV\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n',
    'the server\'s security features dropped whatever their case; CCC and ADAT never offered',
  );
  t.equal(featOf('211 No features\r\n', true), '211-Features:\r\n EPRT\r\n EPSV\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n', 'single-line 211');
  t.equal(featOf('500 FEAT not understood.\r\n', true), '500 FEAT not understood.\r\n', 'a refusal passes unchanged: no features invented');
  t.equal(featOf(VSFTPD_FTPS, false), '211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n211 End\r\n', 'without TLS offered: no AUTH/PBSZ/PROT at all');
  for (const wire of [VSFTPD_FTPS, '211-Features:\r\n AUTH TLS\r\n AUTH TLS\r\n PBSZ\r\n211 End\r\n']) {
    const features = featureLines(featOf(wire, true));
    t.same(features.filter((f) => /^AUTH\b/i.test(f)), ['AUTH TLS'], `exactly one AUTH line (${JSON.stringify(features)})`);
    t.equal(features.filter((f) => f === 'PBSZ').length, 1, 'one PBSZ');
    t.equal(features.filter((f) => f === 'PROT').length, 1, 'one PROT');
    t.same(assembleChunks([bytes(featOf(wire, true))]).map((e) => (e.kind === 'reply' ? e.code : e.reason)), [211], 'still one well-formed 211 reply');
  }
});

t.test('decideCommand: FEAT is edited, not answered, in every TLS state', async (t) => {
  for (const protection of [NO_OFFER, PLAIN, SECURED, IMPLICIT, REQUIRE_PLAIN]) {
    t.strictSame(decide('FEAT', view(protection)), { kind: 'feat' }, JSON.stringify(protection));
  }
});
