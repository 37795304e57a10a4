/**
 * Client command parsing: Telnet cleanup, verb + argument split (RFC 959 §5.3; protocol.md
 * §1.1, §1.4, §8.8-10, §8.19-20). Client byte fixtures go through LineFramer at every chunking.
 */
import t from 'tap';
import {
  describeCommandForLog,
  isUnterminatedAbort,
  parseCommandLine,
  splitGluedAbort,
  stripTelnet,
  type CommandParse,
} from '../../src/control/command.js';
import { LineFramer } from '../../src/control/line-framer.js';
import { bytes, chunkingMismatches, chunkingsOf } from '../helpers/split.js';

type Parsed =
  | { ok: true; verb: string; argument: string; line: string }
  | { ok: false; reason: string };

function simplify(p: CommandParse): Parsed {
  if (!p.ok) return { ok: false, reason: p.reason };
  const c = p.command;
  return { ok: true, verb: c.verb, argument: c.argumentBytes.toString('latin1'), line: c.line.toString('latin1') };
}

function ok(verb: string, argument: string, line: string): Parsed {
  return { ok: true, verb, argument, line };
}

const lineCases: [name: string, text: string, expected: Parsed][] = [
  ['plain verb + argument', 'RETR file.txt', ok('RETR', 'file.txt', 'RETR file.txt')],
  ['lower-case verb is upper-cased, argument untouched', 'retr File.TXT', ok('RETR', 'File.TXT', 'retr File.TXT')],
  ['mixed case verb', 'ReTr x', ok('RETR', 'x', 'ReTr x')],
  ['verb without argument', 'PASV', ok('PASV', '', 'PASV')],
  ['lower-case verb without argument (§8.10 syst)', 'syst', ok('SYST', '', 'syst')],
  ['trailing SP gives an empty argument', 'PORT ', ok('PORT', '', 'PORT ')],
  ['split at the first SP only: leading space of a path survives', 'CWD  dir with spaces ', ok('CWD', ' dir with spaces ', 'CWD  dir with spaces ')],
  ['argument keeps further spaces', 'TYPE A N', ok('TYPE', 'A N', 'TYPE A N')],
  ['8-letter verb is still a verb', 'ABCDEFGH x', ok('ABCDEFGH', 'x', 'ABCDEFGH x')],
  ['§8.19 BSD: IAC IP, DM (second IAC lost)', '\xff\xf4\xf2ABOR', ok('ABOR', '', 'ABOR')],
  ['§8.19 lftp: IAC IP IAC (DM lost)', '\xff\xf4\xffABOR', ok('ABOR', '', 'ABOR')],
  ['§8.19 full Synch: IAC IP IAC DM', '\xff\xf4\xff\xf2ABOR', ok('ABOR', '', 'ABOR')],
  ['lftp puts the same prefix before STAT', '\xff\xf4\xffSTAT', ok('STAT', '', 'STAT')],
  ['option negotiation is dropped', '\xff\xfb\x01\xff\xfd\x03NOOP', ok('NOOP', '', 'NOOP')],
  ['subnegotiation is dropped', '\xff\xfa\x18\x01xterm\xff\xf0NOOP', ok('NOOP', '', 'NOOP')],
  ['IAC IAC in a path name stays escaped (literal 0xFF)', 'RETR a\xff\xffb', ok('RETR', 'a\xff\xffb', 'RETR a\xff\xffb')],
  ['IAC NOP inside the argument is dropped', 'RETR a\xff\xf1b', ok('RETR', 'ab', 'RETR ab')],
  ['high bytes after the verb are data (UTF-8 path)', 'RETR \xc3\xa9t\xc3\xa9', ok('RETR', '\xc3\xa9t\xc3\xa9', 'RETR \xc3\xa9t\xc3\xa9')],
  ['empty line', '', { ok: false, reason: 'empty' }],
  ['only Telnet noise', '\xff\xf4\xff\xf2', { ok: false, reason: 'empty' }],
  ['leading SP: empty verb', ' NOOP', { ok: false, reason: 'bad-verb' }],
  ['digit in verb', 'RE1R x', { ok: false, reason: 'bad-verb' }],
  ['9-letter verb', 'ABCDEFGHI', { ok: false, reason: 'bad-verb' }],
  ['a PORT-looking number is not a verb', '227 Entering Passive Mode (1,2,3,4,5,6)', { ok: false, reason: 'bad-verb' }],
  ['NUL in verb', 'NO\x00OP', { ok: false, reason: 'bad-verb' }],
  ['CR in verb', 'NO\rOP', { ok: false, reason: 'bad-verb' }],
  ['tab instead of SP', 'RETR\tx', { ok: false, reason: 'bad-verb' }],
  // Reject, don't repair (style.md #3): a server that ends lines at CR would otherwise run a
  // second, unchecked command smuggled behind the first ("NOOP\rPORT ...").
  ['CR inside the argument is refused', 'RETR a\rPORT 1,2,3,4,0,21', { ok: false, reason: 'bad-argument' }],
  ['NUL inside the argument is refused', 'RETR a\x00b', { ok: false, reason: 'bad-argument' }],
  ['LF inside the argument is refused', 'RETR a\nDELE b', { ok: false, reason: 'bad-argument' }],
];

t.test('parseCommandLine table', async (t) => {
  for (const [name, text, expected] of lineCases) {
    t.same(simplify(parseCommandLine(bytes(text))), expected, name);
  }
});

t.test('argument and argumentBytes agree (latin1)', async (t) => {
  const parsed = parseCommandLine(bytes('STOR \xe9\xff\xff'));
  t.ok(parsed.ok);
  if (parsed.ok) {
    t.equal(parsed.command.argument, '\xe9\xff\xff');
    t.same([...parsed.command.argumentBytes], [0xe9, 0xff, 0xff]);
  }
});

t.test('stripTelnet', async (t) => {
  const table: [string, string, string][] = [
    ['no IAC: unchanged', 'NOOP', 'NOOP'],
    ['trailing lone IAC dropped', 'NOOP\xff', 'NOOP'],
    ['IAC x with x < 0xF0 is a lone IAC followed by data', '\xffABOR', 'ABOR'],
    ['stray DM before the verb', '\xf2ABOR', 'ABOR'],
    ['unterminated subnegotiation swallows the rest', '\xff\xfa\x18abc', ''],
    ['truncated option negotiation', '\xff\xfb', ''],
    ['empty', '', ''],
  ];
  for (const [name, input, expected] of table) {
    t.equal(stripTelnet(bytes(input)).toString('latin1'), expected, name);
  }
});

/** Client bytes -> LineFramer -> parseCommandLine, for every chunking. */
function commandsOf(chunks: readonly Buffer[]): Parsed[] {
  const framer = new LineFramer(4096);
  const out: Parsed[] = [];
  for (const chunk of chunks) {
    for (const line of framer.push(chunk).lines) out.push(simplify(parseCommandLine(line.text)));
  }
  return out;
}

const streamCases: [name: string, input: string, expected: Parsed[]][] = [
  ['§8.8 PORT split across segments', 'PORT 198,51,100,7,195,80\r\n', [ok('PORT', '198,51,100,7,195,80', 'PORT 198,51,100,7,195,80')]],
  ['§8.9 two commands in one segment', 'TYPE I\r\nPASV\r\n', [ok('TYPE', 'I', 'TYPE I'), ok('PASV', '', 'PASV')]],
  ['§8.10 bare LF', 'syst\n', [ok('SYST', '', 'syst')]],
  ['§8.10 stray CR', 'NOOP\r\r\n', [ok('NOOP', '', 'NOOP')]],
  ['§8.19 BSD ABOR', '\xff\xf4\xf2ABOR\r\n', [ok('ABOR', '', 'ABOR')]],
  ['§8.19 lftp ABOR', '\xff\xf4\xffABOR\r\n', [ok('ABOR', '', 'ABOR')]],
  ['§8.19 OOBINLINE ABOR', '\xff\xf4\xff\xf2ABOR\r\n', [ok('ABOR', '', 'ABOR')]],
  ['CR in an argument through the framer', 'RETR a\rb\r\nNOOP\r\n', [{ ok: false, reason: 'bad-argument' }, ok('NOOP', '', 'NOOP')]],
  [
    'pipelined session start',
    'USER anonymous\r\nPASS x@y\r\nTYPE I\r\nEPSV\r\nRETR /pub/f\r\n',
    [
      ok('USER', 'anonymous', 'USER anonymous'),
      ok('PASS', 'x@y', 'PASS x@y'),
      ok('TYPE', 'I', 'TYPE I'),
      ok('EPSV', '', 'EPSV'),
      ok('RETR', '/pub/f', 'RETR /pub/f'),
    ],
  ],
];

t.test('framer + parseCommandLine at every chunking', async (t) => {
  for (const [name, input, expected] of streamCases) {
    const { reference, mismatches, chunkings } = chunkingMismatches(bytes(input), commandsOf);
    t.same(reference, expected, `${name}: whole buffer`);
    t.same(mismatches, [], `${name}: all ${chunkings} chunkings agree`);
  }
});

t.test('isUnterminatedAbort table (§8.20)', async (t) => {
  const table: [string, boolean][] = [
    ['ABOR\r', true],
    ['abor\r', true],
    ['AbOr\r', true],
    ['ABOR\r\r', true],
    ['\xff\xf4\xff\xf2ABOR\r', true],
    ['\xff\xf4\xffABOR\r', true],
    ['ABOR', false],
    ['ABOR\n', false],
    ['ABORT\r', false],
    ['ABOR x\r', false],
    ['NOOP\r', false],
    ['AB\rOR\r', false],
    ['\r', false],
    ['', false],
  ];
  for (const [input, expected] of table) {
    t.equal(isUnterminatedAbort(bytes(input)), expected, JSON.stringify(input));
  }
});

t.test('§8.20 ABOR\\r at every chunking: pending, recognised, flushed as ABOR', async (t) => {
  let checked = 0;
  const failures: string[] = [];
  for (const { label, chunks } of chunkingsOf(bytes('ABOR\r'))) {
    const framer = new LineFramer(4096);
    let lines = 0;
    for (const chunk of chunks) lines += framer.push(chunk).lines.length;
    const recognised = isUnterminatedAbort(framer.pending);
    const flushed = framer.flushPending();
    const parsed = flushed ? simplify(parseCommandLine(flushed.text)) : null;
    if (lines !== 0 || !recognised || JSON.stringify(parsed) !== JSON.stringify(ok('ABOR', '', 'ABOR'))) failures.push(label);
    checked++;
  }
  t.equal(checked, 8, 'whole + 6 splits + bytewise');
  t.same(failures, []);
});

t.test('describeCommandForLog', async (t) => {
  const describe = (text: string): string => {
    const parsed = parseCommandLine(bytes(text));
    if (!parsed.ok) throw new Error(`fixture does not parse: ${text}`);
    return describeCommandForLog(parsed.command);
  };
  t.equal(describe('PASS secret'), 'PASS ****', 'password never shown');
  t.equal(describe('pass secret'), 'PASS ****', 'lower-case pass too');
  t.equal(describe('ACCT billing-secret'), 'ACCT ****', 'account information never shown');
  t.equal(describe('RETR /a'), 'RETR /a');
  t.equal(describe('NOOP'), 'NOOP');
  t.equal(describe(`STOR ${'x'.repeat(300)}`), `STOR ${'x'.repeat(200)}...`, 'long arguments truncated');
});

t.test('describeCommandForLog: password-setting SITE commands are masked (issue #10 defect 5)', async (t) => {
  const describe = (text: string): string => {
    const parsed = parseCommandLine(bytes(text));
    if (!parsed.ok) throw new Error(`fixture does not parse: ${text}`);
    return describeCommandForLog(parsed.command);
  };
  const table: [input: string, expected: string][] = [
    // Serv-U, Wing FTP: SITE PSWD <old> <new>
    ['SITE PSWD oldpw newpw', 'SITE PSWD ****'],
    ['SITE PSWD "old pw" "new pw"', 'SITE PSWD ****'],
    ['site pswd oldpw newpw', 'SITE PSWD ****'],
    ['SITE pSwD oldpw newpw', 'SITE PSWD ****'],
    ['SITE  PSWD   oldpw  newpw', 'SITE PSWD ****'],
    ['SITE PSWD\toldpw newpw', 'SITE PSWD ****'],
    ['SITE PSWD', 'SITE PSWD ****'],
    // wzdftpd, glftpd: SITE CHPASS [<user>] <password>
    ['SITE CHPASS alice newpw', 'SITE CHPASS ****'],
    ['SITE CHPASS newpw', 'SITE CHPASS ****'],
    // glftpd, FTP4ALL: SITE PASSWD <new>
    ['SITE PASSWD newpw', 'SITE PASSWD ****'],
    // Axway SecureTransport: SITE CHPWD <account> <old> <new> (base64 is no secrecy)
    ['SITE CHPWD dGVzdA== U0VDUkVU U0VDUkVUMTIz', 'SITE CHPWD ****'],
    // wu-ftpd: SITE GPASS <group password>
    ['SITE GPASS grouppw', 'SITE GPASS ****'],
    // wzdftpd, FTP4ALL: SITE ADDUSER <user> <password> ...
    ['SITE ADDUSER bob mypassword group1', 'SITE ADDUSER ****'],
    // wzdftpd: SITE CHANGE <user> pass <password>
    ['SITE CHANGE bob pass newpw', 'SITE CHANGE ****'],
    // other SITE commands are shown as before
    ['SITE CHMOD 0644 /pub/a', 'SITE CHMOD 0644 /pub/a'],
    ['SITE HELP', 'SITE HELP'],
    ['SITE', 'SITE'],
    ['SITE PSWDX a b', 'SITE PSWDX a b'],
    ['SITEPSWD a b', 'SITEPSWD a b'],
  ];
  for (const [input, expected] of table) {
    t.equal(describe(input), expected, JSON.stringify(input));
  }
});

t.test('splitGluedAbort: CPython urgent ABOR with the next command glued on (LF lost)', async (t) => {
  const cases: [name: string, input: string, expected: string[]][] = [
    ['ABOR then NOOP', 'ABOR\rNOOP', ['ABOR', 'NOOP']],
    ['lower case, several CRs', 'abor\r\rTYPE I', ['abor', 'TYPE I']],
    ['Telnet noise before ABOR', '\xff\xf4\xffABOR\rPASV', ['\xff\xf4\xffABOR', 'PASV']],
    ['ABOR with trailing CR only', 'ABOR\r', ['ABOR']],
    ['plain ABOR', 'ABOR', ['ABOR']],
    ['other verb with CR inside stays one (rejected later)', 'NOOP\rPORT 1,2,3,4,5,6', ['NOOP\rPORT 1,2,3,4,5,6']],
    ['ABORT is not ABOR', 'ABORT\rNOOP', ['ABORT\rNOOP']],
    ['no CR', 'RETR x', ['RETR x']],
  ];
  for (const [name, input, expected] of cases) {
    const got = splitGluedAbort(Buffer.from(input, 'latin1')).map((b) => b.toString('latin1'));
    t.same(got, expected, name);
    for (const piece of got.slice(0, 1)) {
      if (expected.length === 2) t.equal(simplify(parseCommandLine(Buffer.from(piece, 'latin1'))).ok && (parseCommandLine(Buffer.from(piece, 'latin1')) as { command: { verb: string } }).command.verb, 'ABOR', `${name}: first piece parses as ABOR`);
    }
  }
});
