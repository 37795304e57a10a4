/**
 * Rewrite decisions (protocol.md §2.4, §8.1-6, §8.8, §8.11-17, §8.19, §8.32). Client fixtures
 * are raw bytes fed through LineFramer -> parseCommandLine -> decideCommand at every chunking;
 * server fixtures through LineFramer -> ReplyAssembler.
 */
import t from 'tap';
import {
  decideCommand,
  editFeatReply,
  interpretUpstreamPassiveReply,
  type CommandDecision,
  type SessionView,
  type UpstreamPassiveResult,
} from '../../src/control/rewrite.js';
import { parseCommandLine } from '../../src/control/command.js';
import { initialProtection } from '../../src/control/security.js';
import { LineFramer } from '../../src/control/line-framer.js';
import type { Reply } from '../../src/control/reply.js';
import type { ActiveTargetSource } from '../../src/control/policy.js';
import type { ErrorCode } from '../../src/errors.js';
import { assembleChunks, bytes, chunkingMismatches } from '../helpers/split.js';

const V4: SessionView = {
  controlFamily: 4,
  clientIp: '198.51.100.7',
  epsvAll: false,
  allowNatFixup: true,
  loggedIn: false,
  // Dialled (a PROXY header's destination), then the control socket's own local address.
  ownAddresses: ['203.0.113.10', '10.0.0.2'],
  ownNames: [],
  protection: initialProtection(null),
};
const V4_NO_FIXUP: SessionView = { ...V4, allowNatFixup: false };
const V4_ALL: SessionView = { ...V4, epsvAll: true };
const V6: SessionView = { ...V4, controlFamily: 6, clientIp: '2001:db8::7', ownAddresses: ['2001:db8::10'] };
const V6_ALL: SessionView = { ...V6, epsvAll: true };

const reply = (line: string, errorCode: ErrorCode): CommandDecision => ({ kind: 'reply', line, errorCode });
const SYNTAX = reply('501 Syntax error in parameters or arguments.', 'FTPP_ERR_BAD_ADDRESS_SYNTAX');
const ILLEGAL_PORT = reply('500 Illegal PORT command.', 'FTPP_ERR_BOUNCE_REFUSED');
const ILLEGAL_EPRT = reply('500 Illegal EPRT command.', 'FTPP_ERR_BOUNCE_REFUSED');
const USE_1 = reply('522 Network protocol not supported, use (1)', 'FTPP_ERR_WRONG_FAMILY');
const USE_2 = reply('522 Network protocol not supported, use (2)', 'FTPP_ERR_WRONG_FAMILY');
const EPSV_ONLY = reply('501 Only EPSV is allowed after EPSV ALL.', 'FTPP_ERR_EPSV_ALL');
const PASV_V6 = reply('425 Use EPSV on an IPv6 connection.', 'FTPP_ERR_PASV_ON_IPV6');
const active = (style: 'port' | 'eprt', host: string, port: number, via: ActiveTargetSource = 'named'): CommandDecision => ({
  kind: 'active',
  style,
  target: { host, port },
  via,
});
const PASSIVE_EPSV: CommandDecision = { kind: 'passive', style: 'epsv' };
const PASSIVE_PASV: CommandDecision = { kind: 'passive', style: 'pasv' };
// RFC 7151 HOST: sessions whose client dialled the proxy at a loopback address.
const LOOPBACK: SessionView = { ...V4, clientIp: '127.0.0.1', ownAddresses: ['127.0.0.1', '127.0.0.1'] };
const LOOPBACK_V6: SessionView = { ...V6, clientIp: '::1', ownAddresses: ['::1', '::1'] };
/** A dual-stack (`::`) listener reports an IPv4 control connection's addresses IPv4-mapped. */
const DUAL_STACK: SessionView = { ...LOOPBACK, ownAddresses: ['::ffff:127.0.0.1', '::ffff:127.0.0.1'] };
const NAMED: SessionView = { ...V4, ownAddresses: [...V4.ownAddresses, '198.18.0.1'], ownNames: ['ftp.proxy.example'] };
const NAMED_DOT: SessionView = { ...V4, ownNames: ['Ftp.Proxy.Example.'] };
const LOOPBACK_LOGGED_IN: SessionView = { ...LOOPBACK, loggedIn: true };
const HOST_ANSWERED: CommandDecision = { kind: 'host-answered', line: '220 Host accepted.' };
const FORWARD: CommandDecision = { kind: 'forward' };

/** Client bytes -> decisions (or the parse failure), for one chunking. */
function decisionsOf(chunks: readonly Buffer[], view: SessionView): (CommandDecision | string)[] {
  const framer = new LineFramer(4096);
  const out: (CommandDecision | string)[] = [];
  for (const chunk of chunks) {
    for (const line of framer.push(chunk).lines) {
      const parsed = parseCommandLine(line.text);
      out.push(parsed.ok ? decideCommand(parsed.command, view) : `unparsed:${parsed.reason}`);
    }
  }
  return out;
}

const decisionCases: [name: string, wire: string, view: SessionView, expected: CommandDecision][] = [
  // §8.8 / §8.12 accepted PORT
  ['§8.8 PORT', 'PORT 198,51,100,7,195,80\r\n', V4, active('port', '198.51.100.7', 50000)],
  ['§8.12 lower-case port', 'port 198,51,100,7,195,80\r\n', V4, active('port', '198.51.100.7', 50000)],
  ['§8.12 space after comma', 'PORT 198, 51,100,7,195,80\r\n', V4, active('port', '198.51.100.7', 50000)],
  ['§8.12 leading zeros + trailing space', 'PORT 198,051,100,007,195,80 \r\n', V4, active('port', '198.51.100.7', 50000)],
  ['double space after the verb (vsftpd accepts it)', 'PORT  198,51,100,7,195,80\r\n', V4, active('port', '198.51.100.7', 50000)],
  // §8.11 malformed PORT -> 501
  ['§8.11 5 fields', 'PORT 198,51,100,7,195\r\n', V4, SYNTAX],
  ['§8.11 256', 'PORT 198,51,100,7,256,1\r\n', V4, SYNTAX],
  ['§8.11 -1', 'PORT 198,51,100,7,-1,1\r\n', V4, SYNTAX],
  ['§8.11 dots', 'PORT 198.51.100.7,195,80\r\n', V4, SYNTAX],
  ['§8.11 7 fields', 'PORT 198,51,100,7,195,80,9\r\n', V4, SYNTAX],
  ['§8.11 no argument', 'PORT\r\n', V4, SYNTAX],
  ['§8.11 port 0', 'PORT 198,51,100,7,0,0\r\n', V4, SYNTAX],
  ['huge number', 'PORT 99999999999,51,100,7,195,80\r\n', V4, SYNTAX],
  ['empty fields', 'PORT ,,,,,\r\n', V4, SYNTAX],
  // §8.13 bounce
  ['§8.13 public third party', 'PORT 192,0,2,55,195,80\r\n', V4, ILLEGAL_PORT],
  ['§8.13 metadata service via EPRT', 'EPRT |1|169.254.169.254|80|\r\n', V4, ILLEGAL_EPRT],
  ['§8.13 port 1023 refused', 'PORT 198,51,100,7,3,255\r\n', V4, ILLEGAL_PORT],
  ['§8.13 port 1024 accepted', 'PORT 198,51,100,7,4,0\r\n', V4, active('port', '198.51.100.7', 1024)],
  ['SSRF PORT 169,254,169,254,0,80', 'PORT 169,254,169,254,0,80\r\n', V4, ILLEGAL_PORT],
  // §8.14 NAT fix-up
  ['§8.14 private PORT from public peer', 'PORT 192,168,1,10,195,80\r\n', V4, active('port', '198.51.100.7', 50000, 'nat-fixup')],
  ['§8.14 fix-up disabled', 'PORT 192,168,1,10,195,80\r\n', V4_NO_FIXUP, ILLEGAL_PORT],
  ['§8.14 EPRT fix-up', 'EPRT |1|10.1.2.3|50000|\r\n', V4, active('eprt', '198.51.100.7', 50000, 'nat-fixup')],
  // §8.15 EPRT families
  ['§8.15 EPRT |2| on IPv4 control', 'EPRT |2|::1|50000|\r\n', V4, USE_1],
  ['§8.15 EPRT |2|::1| on IPv6 control: refused', 'EPRT |2|::1|50000|\r\n', V6, ILLEGAL_EPRT],
  ['§8.15 EPRT own IPv6 address', 'EPRT |2|2001:db8::7|50000|\r\n', V6, active('eprt', '2001:db8::7', 50000)],
  ['§8.15 EPRT family 3 on IPv4', 'EPRT |3|x|1|\r\n', V4, USE_1],
  ['§8.15 EPRT family 3 on IPv6', 'EPRT |3|x|1|\r\n', V6, USE_2],
  ['§8.15 EPRT port 65536', 'EPRT |1|198.51.100.7|65536|\r\n', V4, SYNTAX],
  ['EPRT |1| on IPv6 control', 'EPRT |1|198.51.100.7|50000|\r\n', V6, USE_2],
  ['EPRT own IPv4 address', 'EPRT |1|198.51.100.7|50000|\r\n', V4, active('eprt', '198.51.100.7', 50000)],
  ['EPRT other delimiter', 'EPRT !1!198.51.100.7!50000!\r\n', V4, active('eprt', '198.51.100.7', 50000)],
  ['EPRT bad delimiters', 'EPRT |1!198.51.100.7|50000|\r\n', V4, SYNTAX],
  ['EPRT IPv6 with zone id', 'EPRT |2|fe80::1%eth0|50000|\r\n', V6, SYNTAX],
  ['EPRT no argument', 'EPRT\r\n', V4, SYNTAX],
  // Issue #10 defect 6: the unspecified address means the control peer (lftp over IPv6 sends
  // EPRT |2|::|p| when its data socket is bound to no address). It used to get 500.
  ['PORT 0,0,0,0 means the peer', 'PORT 0,0,0,0,195,80\r\n', V4, active('port', '198.51.100.7', 50000, 'unspecified')],
  ['PORT 0,0,0,0 means the peer, fix-up off', 'PORT 0,0,0,0,195,80\r\n', V4_NO_FIXUP, active('port', '198.51.100.7', 50000, 'unspecified')],
  ['PORT 0,0,0,0 port 1023 refused', 'PORT 0,0,0,0,3,255\r\n', V4, ILLEGAL_PORT],
  ['EPRT |1|0.0.0.0| means the peer', 'EPRT |1|0.0.0.0|50000|\r\n', V4, active('eprt', '198.51.100.7', 50000, 'unspecified')],
  ['EPRT |2|::| on IPv6 means the peer', 'EPRT |2|::|50000|\r\n', V6, active('eprt', '2001:db8::7', 50000, 'unspecified')],
  ['EPRT |2|0:0:0:0:0:0:0:0| on IPv6 means the peer', 'EPRT |2|0:0:0:0:0:0:0:0|50000|\r\n', V6, active('eprt', '2001:db8::7', 50000, 'unspecified')],
  ['EPRT |2|::| port 1023 refused', 'EPRT |2|::|1023|\r\n', V6, ILLEGAL_EPRT],
  ['EPRT |2|::| on IPv4 control: wrong family, as before', 'EPRT |2|::|50000|\r\n', V4, USE_1],
  ['EPRT |1|0.0.0.0| on IPv6 control: wrong family', 'EPRT |1|0.0.0.0|50000|\r\n', V6, USE_2],
  ['PORT 0,0,0,0 on IPv6 control', 'PORT 0,0,0,0,195,80\r\n', V6, reply('425 Use EPRT on an IPv6 connection.', 'FTPP_ERR_WRONG_FAMILY')],
  ['EPRT |2|::ffff:0.0.0.0| is not unspecified', 'EPRT |2|::ffff:0.0.0.0|50000|\r\n', V6, ILLEGAL_EPRT],
  // §8.16 EPSV
  ['§8.16 EPSV on IPv4', 'EPSV\r\n', V4, PASSIVE_EPSV],
  ['§8.16 EPSV 1 on IPv4', 'EPSV 1\r\n', V4, PASSIVE_EPSV],
  ['§8.16 EPSV 2 on IPv4', 'EPSV 2\r\n', V4, USE_1],
  ['EPSV 2 on IPv6', 'EPSV 2\r\n', V6, PASSIVE_EPSV],
  ['EPSV 1 on IPv6', 'EPSV 1\r\n', V6, USE_2],
  ['EPSV 3', 'EPSV 3\r\n', V4, USE_1],
  ['EPSV garbage', 'EPSV x\r\n', V4, SYNTAX],
  ['§8.16 EPSV ALL', 'EPSV ALL\r\n', V4, { kind: 'epsv-all' }],
  ['EPSV all (case-insensitive keyword)', 'epsv all\r\n', V4, { kind: 'epsv-all' }],
  ['§8.16 PASV after EPSV ALL', 'PASV\r\n', V4_ALL, EPSV_ONLY],
  ['§8.16 PORT after EPSV ALL', 'PORT 198,51,100,7,195,80\r\n', V4_ALL, EPSV_ONLY],
  ['EPRT after EPSV ALL', 'EPRT |1|198.51.100.7|50000|\r\n', V4_ALL, EPSV_ONLY],
  ['EPRT after EPSV ALL on IPv6', 'EPRT |2|2001:db8::7|50000|\r\n', V6_ALL, EPSV_ONLY],
  ['LPRT after EPSV ALL (RFC 2428 §3)', 'LPRT 4,4,132,235,1,2,2,24,131\r\n', V4_ALL, EPSV_ONLY],
  ['LPSV after EPSV ALL (RFC 2428 §3)', 'LPSV\r\n', V4_ALL, EPSV_ONLY],
  ['§8.16 EPSV still works after EPSV ALL', 'EPSV\r\n', V4_ALL, PASSIVE_EPSV],
  // §8.17 PASV
  ['PASV on IPv4', 'PASV\r\n', V4, PASSIVE_PASV],
  ['§8.17 PASV on IPv6', 'PASV\r\n', V6, PASV_V6],
  ['PORT on IPv6', 'PORT 198,51,100,7,195,80\r\n', V6, reply('425 Use EPRT on an IPv6 connection.', 'FTPP_ERR_WRONG_FAMILY')],
  // §2.3, §3.5, §5.3
  ['LPRT', 'LPRT 4,4,132,235,1,2,2,24,131\r\n', V4, reply('502 Command not implemented.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  ['LPSV', 'LPSV\r\n', V4, reply('502 Command not implemented.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  ['REIN', 'REIN\r\n', V4, reply('502 REIN not implemented.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  ['AUTH TLS without tls on the listener: 502, not forwarded (with tls: test/control/security.test.ts)', 'AUTH TLS\r\n', V4, reply('502 AUTH not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  ['PBSZ without tls on the listener', 'PBSZ 0\r\n', V4, reply('502 PBSZ not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  ['PROT without tls on the listener', 'prot p\r\n', V4, reply('502 PROT not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  ['CCC without tls on the listener', 'CCC\r\n', V4, reply('502 CCC not supported by this proxy.', 'FTPP_ERR_NOT_IMPLEMENTED')],
  // §8.19 ABOR through Telnet noise
  ['§8.19 BSD ABOR', '\xff\xf4\xf2ABOR\r\n', V4, { kind: 'abort' }],
  ['§8.19 lftp ABOR', '\xff\xf4\xffABOR\r\n', V4, { kind: 'abort' }],
  ['§8.19 OOBINLINE ABOR', '\xff\xf4\xff\xf2ABOR\r\n', V4, { kind: 'abort' }],
  ['FEAT', 'FEAT\r\n', V4, { kind: 'feat' }],
  // transfers
  ['RETR', 'RETR /pub/big.bin\r\n', V4, { kind: 'transfer', direction: 'download' }],
  ['LIST', 'LIST\r\n', V4, { kind: 'transfer', direction: 'download' }],
  ['NLST', 'nlst\r\n', V4, { kind: 'transfer', direction: 'download' }],
  ['MLSD', 'MLSD\r\n', V4, { kind: 'transfer', direction: 'download' }],
  ['STOR', 'STOR up.bin\r\n', V4, { kind: 'transfer', direction: 'upload' }],
  ['STOU', 'STOU\r\n', V4, { kind: 'transfer', direction: 'upload' }],
  ['APPE', 'APPE log\r\n', V4, { kind: 'transfer', direction: 'upload' }],
  // RFC 7151 HOST naming the proxy: answered here (issue #10 item 7)
  ['HOST the dialled IPv4 address', 'HOST 127.0.0.1\r\n', LOOPBACK, HOST_ANSWERED],
  ['HOST [::1] (RFC 7151 bracketed IPv6)', 'HOST [::1]\r\n', LOOPBACK_V6, HOST_ANSWERED],
  ['HOST ::1 without brackets', 'HOST ::1\r\n', LOOPBACK_V6, HOST_ANSWERED],
  ['HOST ::ffff:127.0.0.1 (IPv4-mapped)', 'HOST ::ffff:127.0.0.1\r\n', LOOPBACK, HOST_ANSWERED],
  ['HOST [::ffff:127.0.0.1]', 'HOST [::ffff:127.0.0.1]\r\n', LOOPBACK, HOST_ANSWERED],
  ['HOST 127.0.0.1 on a dual-stack listener', 'HOST 127.0.0.1\r\n', DUAL_STACK, HOST_ANSWERED],
  ['HOST the PROXY header destination', 'HOST 203.0.113.10\r\n', V4, HOST_ANSWERED],
  ['HOST the control socket local address', 'host 10.0.0.2\r\n', V4, HOST_ANSWERED],
  ['HOST the advertise IP', 'HOST 198.18.0.1\r\n', NAMED, HOST_ANSWERED],
  ['HOST own IPv6 in another spelling', 'HOST [2001:DB8:0::10]\r\n', V6, HOST_ANSWERED],
  ['HOST the advertise name, other case, trailing dot', 'HOST FTP.PROXY.EXAMPLE.\r\n', NAMED, HOST_ANSWERED],
  ['HOST the advertise name configured with a dot', 'HOST ftp.proxy.example\r\n', NAMED_DOT, HOST_ANSWERED],
  ['HOST with a trailing space', 'HOST 127.0.0.1 \r\n', LOOPBACK, HOST_ANSWERED],
  // HOST naming anything else goes upstream (name-based virtual hosts)
  ['HOST a real name', 'HOST ftp.example.com\r\n', NAMED, FORWARD],
  ['HOST a real name, no advertise name', 'HOST ftp.example.com\r\n', LOOPBACK, FORWARD],
  ['HOST another IPv4 address', 'HOST 127.0.0.2\r\n', LOOPBACK, FORWARD],
  ['HOST another IPv6 address', 'HOST [2001:db8::11]\r\n', V6, FORWARD],
  ['HOST ::1 on an IPv4 loopback session', 'HOST [::1]\r\n', LOOPBACK, FORWARD],
  ['HOST without argument (the server answers 501)', 'HOST\r\n', LOOPBACK, FORWARD],
  ['HOST with a blank argument', 'HOST \r\n', LOOPBACK, FORWARD],
  ['HOST 127.1 is a name, not an address', 'HOST 127.1\r\n', LOOPBACK, FORWARD],
  ['HOST [127.0.0.1]: brackets hold IPv6 only', 'HOST [127.0.0.1]\r\n', LOOPBACK, FORWARD],
  ['HOST [::1 unclosed', 'HOST [::1\r\n', LOOPBACK_V6, FORWARD],
  ['HOST a name under the advertise name', 'HOST a.ftp.proxy.example\r\n', NAMED, FORWARD],
  ['HOST a suffix of the advertise name', 'HOST proxy.example\r\n', NAMED, FORWARD],
  ['HOST own address after login (the server answers 503)', 'HOST 127.0.0.1\r\n', LOOPBACK_LOGGED_IN, FORWARD],
  // everything else goes upstream
  ['NOOP', 'NOOP\r\n', V4, { kind: 'forward' }],
  ['TYPE I', 'TYPE I\r\n', V4, { kind: 'forward' }],
  ['REST', 'REST 100\r\n', V4, { kind: 'forward' }],
  ['STAT through lftp prefix', '\xff\xf4\xffSTAT\r\n', V4, { kind: 'forward' }],
  ['unknown verb', 'XYZZY\r\n', V4, { kind: 'forward' }],
];

t.test('decideCommand table (all chunkings of the client bytes)', async (t) => {
  for (const [name, wire, view, expected] of decisionCases) {
    const { reference, mismatches, chunkings } = chunkingMismatches(bytes(wire), (chunks) => decisionsOf(chunks, view));
    t.same(reference, [expected], name);
    t.same(mismatches, [], `${name}: all ${chunkings} chunkings agree`);
  }
});

t.test('§8.9 two commands in one segment: two decisions in order', async (t) => {
  const { reference, mismatches } = chunkingMismatches(bytes('TYPE I\r\nPASV\r\n'), (chunks) => decisionsOf(chunks, V4));
  t.same(reference, [{ kind: 'forward' }, PASSIVE_PASV]);
  t.same(mismatches, []);
});

t.test('CR smuggled inside a PORT line never reaches decideCommand', async (t) => {
  const { reference } = chunkingMismatches(bytes('PORT 198,51,100,7,195\r,80\r\n'), (chunks) => decisionsOf(chunks, V4));
  t.same(reference, ['unparsed:bad-argument']);
});

t.test('every line the proxy answers with itself is a well-formed single-line reply', async (t) => {
  const bad: string[] = [];
  for (const [name, wire, view] of decisionCases) {
    for (const d of decisionsOf([bytes(wire)], view)) {
      if (typeof d === 'string' || (d.kind !== 'reply' && d.kind !== 'host-answered')) continue;
      if (!/^[1-5][0-5]\d [\x20-\x7e]+$/.test(d.line)) bad.push(name);
    }
  }
  t.same(bad, []);
});

/** Server bytes -> the one Reply they assemble into (every chunking must agree). */
function replyFromWire(wire: string): { reply: Reply | null; mismatches: unknown[] } {
  const { reference, mismatches } = chunkingMismatches(bytes(wire), (chunks) => assembleChunks(chunks));
  const event = reference.length === 1 ? reference[0] : undefined;
  if (event?.kind !== 'reply') return { reply: null, mismatches };
  return { reply: { code: event.code, lines: event.lines, raw: bytes(event.raw) }, mismatches };
}

t.test('interpretUpstreamPassiveReply table', async (t) => {
  const table: [name: string, wire: string, sent: 'EPSV' | 'PASV', expected: UpstreamPassiveResult][] = [
    ['§8.1 227: the IP is ignored, the port is used', '227 Entering Passive Mode (10,0,0,5,156,64).\r\n', 'PASV', { ok: true, port: 40000 }],
    ['§8.2 227 without parentheses', '227 Entering passive mode. 10,0,0,5,4,1\r\n', 'PASV', { ok: true, port: 1025 }],
    ['§8.3 227 with a public pasv_address', '227 Entering Passive Mode (198,18,5,9,156,70).\r\n', 'PASV', { ok: true, port: 40006 }],
    ['§8.6 multi-line 227', '227-Entering Passive Mode\r\n227 (10,0,0,5,156,64)\r\n', 'PASV', { ok: true, port: 40000 }],
    ['227 octet 256: malformed, not masked', '227 Entering Passive Mode (10,0,0,256,156,64).\r\n', 'PASV', { ok: false, reason: 'malformed' }],
    ['227 port 0: malformed', '227 Entering Passive Mode (10,0,0,5,0,0).\r\n', 'PASV', { ok: false, reason: 'malformed' }],
    ['227 without numbers: malformed', '227 Entering Passive Mode.\r\n', 'PASV', { ok: false, reason: 'malformed' }],
    ['§8.5 211 with a 227-looking inner line is not a 227', '211-Status\r\n227 Entering Passive Mode (10,0,0,5,1,2)\r\n 226 x\r\n211 End\r\n', 'PASV', { ok: false, reason: 'refused' }],
    ['530 to PASV', '530 Please login with USER and PASS.\r\n', 'PASV', { ok: false, reason: 'refused' }],
    ['500 to PASV (no fallback left)', '500 Unknown command.\r\n', 'PASV', { ok: false, reason: 'refused' }],
    ['§8.4 229', '229 Entering Extended Passive Mode (|||40006|)\r\n', 'EPSV', { ok: true, port: 40006 }],
    ['§8.4 229 with another delimiter', '229 Entering Extended Passive Mode (!!!40006!)\r\n', 'EPSV', { ok: true, port: 40006 }],
    ['229 port 0: malformed', '229 Entering Extended Passive Mode (|||0|)\r\n', 'EPSV', { ok: false, reason: 'malformed' }],
    ['229 port 65536: malformed', '229 Entering Extended Passive Mode (|||65536|)\r\n', 'EPSV', { ok: false, reason: 'malformed' }],
    ['229 bad delimiters: malformed', '229 Entering Extended Passive Mode (|||40006!)\r\n', 'EPSV', { ok: false, reason: 'malformed' }],
    ['500 to EPSV: try PASV', '500 Unknown command.\r\n', 'EPSV', { ok: false, reason: 'unsupported' }],
    ['501 to EPSV: try PASV', '501 Bad EPSV.\r\n', 'EPSV', { ok: false, reason: 'unsupported' }],
    ['502 to EPSV: try PASV', '502 Not implemented.\r\n', 'EPSV', { ok: false, reason: 'unsupported' }],
    ['vsftpd 522 to EPSV: try PASV', '522 Bad network protocol.\r\n', 'EPSV', { ok: false, reason: 'unsupported' }],
    ['530 to EPSV', '530 Please login with USER and PASS.\r\n', 'EPSV', { ok: false, reason: 'refused' }],
    ['227 in answer to EPSV is not accepted', '227 Entering Passive Mode (10,0,0,5,156,64).\r\n', 'EPSV', { ok: false, reason: 'refused' }],
    ['229 in answer to PASV is not accepted', '229 Entering Extended Passive Mode (|||40006|)\r\n', 'PASV', { ok: false, reason: 'refused' }],
    ['421 to EPSV', '421 Timeout.\r\n', 'EPSV', { ok: false, reason: 'refused' }],
  ];
  for (const [name, wire, sent, expected] of table) {
    const { reply, mismatches } = replyFromWire(wire);
    t.same(mismatches, [], `${name}: chunkings agree`);
    t.ok(reply, `${name}: one reply assembled`);
    if (reply) t.same(interpretUpstreamPassiveReply(reply, sent), expected, name);
  }
});

function feat(wire: string): string {
  const { reply } = replyFromWire(wire);
  if (!reply) throw new Error(`fixture is not one reply: ${JSON.stringify(wire)}`);
  return editFeatReply(reply).toString('latin1');
}

t.test('editFeatReply (§4.3, §8.32)', async (t) => {
  t.equal(
    feat('211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n211 End\r\n'),
    '211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n211 End\r\n',
    '§8.32 vsftpd FEAT passes unchanged, never cut at the EPSV line',
  );
  t.equal(
    feat('211-Features:\r\n AUTH TLS\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n PBSZ\r\n PROT\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n211 End\r\n'),
    '211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n211 End\r\n',
    'AUTH/PBSZ/PROT removed, everything else kept in order',
  );
  t.equal(
    feat('211-Extensions supported:\r\n MDTM\r\n SIZE\r\n LPRT\r\n CCC\r\n211 END\r\n'),
    '211-Extensions supported:\r\n MDTM\r\n SIZE\r\n EPRT\r\n EPSV\r\n211 END\r\n',
    'EPRT/EPSV added when missing; LPRT/CCC removed; first and last line kept',
  );
  t.equal(
    feat('211-Features:\r\n auth tls\r\n epsv\r\n MLST type*;size*;modify*;\r\n211 End\r\n'),
    '211-Features:\r\n epsv\r\n MLST type*;size*;modify*;\r\n EPRT\r\n211 End\r\n',
    'feature names are case-insensitive; parameters kept',
  );
  t.equal(feat('211 No features\r\n'), '211-Features:\r\n EPRT\r\n EPSV\r\n211 End\r\n', 'single-line 211 becomes a feature list');
  t.equal(feat('211-Features:\r\n211 End\r\n'), '211-Features:\r\n EPRT\r\n EPSV\r\n211 End\r\n', 'empty list');
  t.equal(feat('500 Unknown command.\r\n'), '500 Unknown command.\r\n', 'non-211 relayed byte for byte');
  t.equal(feat('530 Login first.\n'), '530 Login first.\n', 'non-211 keeps even a bare LF');
  t.equal(feat('211-Features:\r\n UTF8\r\n SITE \xff\xff\r\n211 End\r\n'), '211-Features:\r\n UTF8\r\n SITE \xff\xff\r\n EPRT\r\n EPSV\r\n211 End\r\n', '0xFF bytes survive');
});

t.test('editFeatReply output is itself one well-formed 211 reply', async (t) => {
  const edited = bytes(feat('211-Features:\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n'));
  const { reference, mismatches } = chunkingMismatches(edited, (chunks) => assembleChunks(chunks));
  t.same(mismatches, []);
  t.same(
    reference.map((e) => (e.kind === 'reply' ? e.code : e.reason)),
    [211],
  );
});
