/**
 * Reply assembly (RFC 959 §4.2; protocol.md §1.2, §8.1-7, §8.32): server bytes go through
 * LineFramer + ReplyAssembler whole, at every split offset and byte by byte.
 */
import t from 'tap';
import { formatReply, isPreliminary, replyCodeOf, replyLine, ReplyAssembler } from '../../src/control/reply.js';
import { bytes, chunkingMismatches, assembleChunks, type ReplyEvent } from '../helpers/split.js';

function reply(code: number, raw: string): ReplyEvent {
  const lines = raw.split('\n').filter((l, i, all) => i < all.length - 1 || l !== '').map((l) => l.replace(/\r+$/, ''));
  return { kind: 'reply', code, lines, raw };
}

interface AssemblyCase {
  readonly name: string;
  readonly input: string;
  readonly maxReplyBytes?: number;
  readonly expect: ReplyEvent[];
}

const FEAT_VSFTPD_TLS =
  '211-Features:\r\n AUTH TLS\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n PBSZ\r\n PROT\r\n REST STREAM\r\n SIZE\r\n TVFS\r\n UTF8\r\n211 End\r\n';

const cases: AssemblyCase[] = [
  {
    name: '§8.1 single-line 227',
    input: '227 Entering Passive Mode (10,0,0,5,156,64).\r\n',
    expect: [reply(227, '227 Entering Passive Mode (10,0,0,5,156,64).\r\n')],
  },
  {
    name: '§8.2 227 without parentheses',
    input: '227 Entering passive mode. 10,0,0,5,4,1\r\n',
    expect: [reply(227, '227 Entering passive mode. 10,0,0,5,4,1\r\n')],
  },
  {
    name: '§8.4 229',
    input: '229 Entering Extended Passive Mode (|||40006|)\r\n',
    expect: [reply(229, '229 Entering Extended Passive Mode (|||40006|)\r\n')],
  },
  {
    name: '§8.5 multi-line 211 with a 227-looking inner line: one 211, byte for byte, never a 227',
    input: '211-Status\r\n227 Entering Passive Mode (10,0,0,5,1,2)\r\n 226 x\r\n211 End\r\n',
    expect: [reply(211, '211-Status\r\n227 Entering Passive Mode (10,0,0,5,1,2)\r\n 226 x\r\n211 End\r\n')],
  },
  {
    name: '§8.6 multi-line 227',
    input: '227-Entering Passive Mode\r\n227 (10,0,0,5,156,64)\r\n',
    expect: [reply(227, '227-Entering Passive Mode\r\n227 (10,0,0,5,156,64)\r\n')],
  },
  {
    name: '§8.7 split 227 (all chunkings cover the vector segments)',
    input: '227 Entering Passive Mode (10,0,0,5,156,64).\r\n',
    expect: [reply(227, '227 Entering Passive Mode (10,0,0,5,156,64).\r\n')],
  },
  {
    name: '§8.32 FEAT is one reply, never cut at the EPSV line',
    input: FEAT_VSFTPD_TLS,
    expect: [reply(211, FEAT_VSFTPD_TLS)],
  },
  {
    name: 'RFC 959 §4.2 example: inner lines starting with digits',
    input: '123-First line\r\nSecond line\r\n 234 A line beginning with numbers\r\n123 The last line\r\n',
    expect: [reply(123, '123-First line\r\nSecond line\r\n 234 A line beginning with numbers\r\n123 The last line\r\n')],
  },
  {
    name: 'inner `ddd-` with the same code does not end the reply',
    input: '211-a\r\n211-b\r\n211 c\r\n',
    expect: [reply(211, '211-a\r\n211-b\r\n211 c\r\n')],
  },
  {
    name: 'bare code ends a multi-line reply (CPython rule)',
    input: '211-a\r\n211\r\n',
    expect: [reply(211, '211-a\r\n211\r\n')],
  },
  {
    name: 'multi-line replies do not nest: another code inside is text',
    input: '211-a\r\n212-b\r\n212 c\r\n211 d\r\n',
    expect: [reply(211, '211-a\r\n212-b\r\n212 c\r\n211 d\r\n')],
  },
  {
    name: 'several replies in one segment, bare LF terminators kept in raw',
    input: '120 wait\r\n220 ready\n421 Timeout.\r\n',
    expect: [reply(120, '120 wait\r\n'), reply(220, '220 ready\n'), reply(421, '421 Timeout.\r\n')],
  },
  {
    name: 'code alone is a single-line reply',
    input: '200\r\n',
    expect: [reply(200, '200\r\n')],
  },
  {
    name: 'vsftpd 0xFF escape and NUL in text are relayed unchanged',
    input: '257 "/a\xff\xffb\x00c" created\r\n',
    expect: [reply(257, '257 "/a\xff\xffb\x00c" created\r\n')],
  },
  {
    name: 'unfinished multi-line reply yields nothing yet',
    input: '211-Features:\r\n EPSV\r\n',
    expect: [],
  },
  {
    name: 'unterminated single line yields nothing yet',
    input: '227 Entering Passive Mode (10,0,0,5,156,',
    expect: [],
  },
  { name: 'not a reply: text', input: 'hello\r\n', expect: [{ kind: 'error', reason: 'not-a-reply' }] },
  { name: 'not a reply: two digits', input: '22 x\r\n', expect: [{ kind: 'error', reason: 'not-a-reply' }] },
  { name: 'not a reply: four digits', input: '2200 x\r\n', expect: [{ kind: 'error', reason: 'not-a-reply' }] },
  { name: 'not a reply: letter after code', input: '220x\r\n', expect: [{ kind: 'error', reason: 'not-a-reply' }] },
  { name: 'not a reply: leading space', input: ' 220 x\r\n', expect: [{ kind: 'error', reason: 'not-a-reply' }] },
  { name: 'not a reply: empty line', input: '\r\n', expect: [{ kind: 'error', reason: 'not-a-reply' }] },
  {
    name: 'good reply, then garbage',
    input: '200 ok\r\nSSH-2.0-OpenSSH\r\n',
    expect: [reply(200, '200 ok\r\n'), { kind: 'error', reason: 'not-a-reply' }],
  },
  {
    name: 'too-long: multi-line reply over maxReplyBytes',
    maxReplyBytes: 64,
    input: `211-Status\r\n${' filler line of text\r\n'.repeat(4)}211 End\r\n`,
    expect: [{ kind: 'error', reason: 'too-long' }],
  },
  {
    name: 'too-long: single line over maxReplyBytes',
    maxReplyBytes: 32,
    input: `200 ${'x'.repeat(40)}\r\n`,
    expect: [{ kind: 'error', reason: 'too-long' }],
  },
  {
    name: 'too-long: first line of a multi-line reply alone is over the bound',
    maxReplyBytes: 32,
    input: `211-${'x'.repeat(40)}\r\n`,
    expect: [{ kind: 'error', reason: 'too-long' }],
  },
  {
    name: 'exactly maxReplyBytes is accepted',
    maxReplyBytes: 16,
    input: '211-abc\r\n211 e\r\n',
    expect: [reply(211, '211-abc\r\n211 e\r\n')],
  },
  {
    name: 'one byte over maxReplyBytes is refused',
    maxReplyBytes: 16,
    input: '211-abcd\r\n211 e\r\n',
    expect: [{ kind: 'error', reason: 'too-long' }],
  },
];

t.test('assembly table: every chunking gives the expected replies', async (t) => {
  for (const c of cases) {
    const { reference, mismatches, chunkings } = chunkingMismatches(bytes(c.input), (chunks) =>
      assembleChunks(chunks, c.maxReplyBytes ?? 1024 * 1024),
    );
    t.same(reference, c.expect, `${c.name}: whole buffer`);
    t.same(mismatches, [], `${c.name}: all ${chunkings} chunkings agree`);
  }
});

t.test('§8.7 the exact segments of the vector: nothing before the CRLF', async (t) => {
  const segments = ['227 Entering Pas', 'sive Mode (10,0,0,5,156,', '64).\r\n'];
  const seen: number[] = [];
  for (let i = 1; i <= segments.length; i++) {
    seen.push(assembleChunks(segments.slice(0, i).map(bytes)).length);
  }
  t.same(seen, [0, 0, 1]);
});

t.test('§8.5 no assembled reply in the stream ever has code 227', async (t) => {
  const input = bytes('211-Status\r\n227 Entering Passive Mode (10,0,0,5,1,2)\r\n 226 x\r\n211 End\r\n');
  const { reference } = chunkingMismatches(input, (chunks) => assembleChunks(chunks));
  const codes = reference.map((e) => (e.kind === 'reply' ? e.code : -1));
  t.same(codes, [211]);
  t.equal(reference[0]?.kind === 'reply' ? reference[0].raw : '', input.toString('latin1'), 'relayed byte for byte');
});

t.test('inMultiline tracks an open reply', async (t) => {
  const assembler = new ReplyAssembler(1024);
  const line = (s: string) => ({ text: bytes(s), raw: bytes(`${s}\r\n`) });
  t.equal(assembler.inMultiline, false);
  t.same(assembler.push(line('211-a')), { kind: 'none' });
  t.equal(assembler.inMultiline, true);
  t.same(assembler.push(line('211-b')), { kind: 'none' });
  const done = assembler.push(line('211 c'));
  t.equal(done.kind, 'reply');
  t.equal(assembler.inMultiline, false);
  const next = assembler.push(line('200 ok'));
  t.equal(next.kind === 'reply' ? next.reply.code : -1, 200, 'state reset after a multi-line reply');
});

t.test('replyCodeOf table', async (t) => {
  const table: [string, number][] = [
    ['220 ready', 220],
    ['211-Features:', 211],
    ['211', 211],
    ['599 x', 599],
    ['22', -1],
    ['', -1],
    ['2200 x', -1],
    ['22a x', -1],
    ['220x', -1],
    ['220\tx', -1],
    [' 220 x', -1],
    ['\xff\xf4220 x', -1],
  ];
  for (const [text, code] of table) t.equal(replyCodeOf(bytes(text)), code, JSON.stringify(text));
});

t.test('formatReply / replyLine', async (t) => {
  t.equal(formatReply(200, 'PORT command successful.').toString('latin1'), '200 PORT command successful.\r\n');
  t.equal(formatReply(550, '/a\xffb: no such file').toString('latin1'), '550 /a\xff\xffb: no such file\r\n', '0xFF doubled (RFC 1123 §3.2.6)');
  t.equal(replyLine("425 Can't open data connection.").toString('latin1'), "425 Can't open data connection.\r\n");
  t.equal(replyLine('257 "\xff\xff"').toString('latin1'), '257 "\xff\xff\xff\xff"\r\n', 'every 0xFF doubled');
  // What the proxy formats must itself assemble back into the same reply.
  const formatted = formatReply(227, 'Entering Passive Mode (203,0,113,10,195,92).');
  t.same(assembleChunks([formatted]), [reply(227, formatted.toString('latin1'))], 'formatted reply parses back');
});

t.test('isPreliminary', async (t) => {
  const table: [number, boolean][] = [[99, false], [100, true], [125, true], [150, true], [199, true], [200, false], [226, false], [550, false]];
  for (const [code, expected] of table) t.equal(isPreliminary(code), expected, String(code));
});
