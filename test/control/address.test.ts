/**
 * PORT / 227 / EPRT / EPSV / 229 codecs (RFC 959 §4.1.2, §4.2.1; RFC 1123 §4.1.2.6; RFC 2428;
 * protocol.md §2.1-2.2, §8.1-4, §8.11-12, §8.15). Lenient parse, strict check, canonical format.
 * Reply fixtures are also fed as server bytes through LineFramer + ReplyAssembler at every chunking.
 */
import t from 'tap';
import {
  formatEprtArgument,
  formatEpsvReply,
  formatHostPortFields,
  formatPasvReply,
  formatPortArgument,
  parseEprtArgument,
  parseEpsvArgument,
  parseEpsvReply,
  parseHostPortFields,
  parsePasvReply,
  parsePortArgument,
  type AddressParse,
  type EpsvArgument,
} from '../../src/control/address.js';
import { assembleChunks, bytes, chunkingMismatches } from '../helpers/split.js';

const SYNTAX: AddressParse = { ok: false, reason: 'syntax' };
const v4 = (host: string, port: number): AddressParse => ({ ok: true, value: { host, port }, family: 4 });
const v6 = (host: string, port: number): AddressParse => ({ ok: true, value: { host, port }, family: 6 });

t.test('parsePortArgument: accepted (lenient like vsftpd, §8.12)', async (t) => {
  const table: [string, AddressParse][] = [
    ['198,51,100,7,195,80', v4('198.51.100.7', 50000)],
    ['198, 51,100,7,195,80', v4('198.51.100.7', 50000)],
    ['198,051,100,007,195,80 ', v4('198.51.100.7', 50000)],
    [' 198,51,100,7,195,80', v4('198.51.100.7', 50000)], // "PORT  198,..." (double space after the verb)
    ['127, 0,0,1,200,10', v4('127.0.0.1', 51210)],
    ['0127,0,0,1,200,10', v4('127.0.0.1', 51210)],
    ['0,0,0,0,0,1', v4('0.0.0.0', 1)], // syntax only; the policy refuses port 1 later (0.0.0.0 itself means the peer)
    ['255,255,255,255,255,255', v4('255.255.255.255', 65535)],
    ['198,51,100,7,3,255', v4('198.51.100.7', 1023)], // syntax ok; policy refuses < 1024 (§8.13)
    ['198,51,100,7,4,0', v4('198.51.100.7', 1024)],
    ['198,51,100,7,0,1', v4('198.51.100.7', 1)],
    ['00000,0,0,1,0,1', v4('0.0.0.1', 1)],
  ];
  for (const [arg, expected] of table) t.same(parsePortArgument(arg), expected, JSON.stringify(arg));
});

t.test('parsePortArgument: rejected (§8.11 and hostile input)', async (t) => {
  const table: [string, string][] = [
    ['198,51,100,7,195', '5 fields'],
    ['198,51,100,7,256,1', 'octet 256 in p1'],
    ['198,51,100,256,195,80', 'octet 256 in the address (must not be masked to 0)'],
    ['198,51,100,7,195,256', 'octet 256 in p2'],
    ['198,51,100,7,-1,1', 'negative'],
    ['198.51.100.7,195,80', 'dotted quad'],
    ['198,51,100,7,195,80,9', '7 fields'],
    ['', 'no argument'],
    [' ', 'only a space'],
    ['198,51,100,7,0,0', 'port 0'],
    [',,,,,', 'empty fields'],
    ['198,51,,7,195,80', 'one empty field'],
    ['99999999999,51,100,7,195,80', 'huge number'],
    ['198,51,100,7,195,99999999999', 'huge port byte'],
    ['100000,51,100,7,195,80', 'six digits'],
    ['198,51,100,7,195,80,', 'trailing comma'],
    ['+198,51,100,7,195,80', 'sign'],
    ['1e2,51,100,7,195,80', 'exponent'],
    ['0x10,51,100,7,195,80', 'hex'],
    ['198,51,100,7,195.5,80', 'fraction'],
    ['198,51,100,7,195,80\r', 'trailing CR'],
    ['198,51,100,7,195\r,80', 'CR inside a field'],
    ['198,51,100,7,195\n,80', 'LF inside a field'],
    ['198,51,100,7,195\x00,80', 'NUL inside a field'],
    ['198,51,100,7,\x00195,80', 'leading NUL'],
    ['198,\t51,100,7,195,80', 'TAB (vsftpd leniency is spaces only)'],
    ['198,\xa051,100,7,195,80', 'NBSP (latin1 0xA0)'],
    ['198,51,100,7,195,\uff18\uff10', 'full-width digits'],
    ['198,51,100,7,195,\u0668\u0660', 'Arabic-Indic digits'],
    ['198 51 100 7 195 80', 'spaces instead of commas'],
    ['(198,51,100,7,195,80)', 'parentheses'],
  ];
  for (const [arg, why] of table) t.same(parsePortArgument(arg), SYNTAX, why);
});

t.test('parseHostPortFields is what PORT uses', async (t) => {
  t.same(parseHostPortFields('10,0,0,5,156,64'), v4('10.0.0.5', 40000));
  t.same(parseHostPortFields('10,0,0,5,156'), SYNTAX);
});

t.test('formatPortArgument / formatHostPortFields: canonical', async (t) => {
  t.equal(formatPortArgument('198.51.100.7', 50000), '198,51,100,7,195,80');
  t.equal(formatHostPortFields('10.0.0.5', 40000), '10,0,0,5,156,64');
  t.equal(formatHostPortFields('0.0.0.0', 65535), '0,0,0,0,255,255');
  t.equal(formatHostPortFields('203.0.113.10', 1), '203,0,113,10,0,1');
  t.throws(() => formatHostPortFields('::1', 21), 'no IPv6 in PORT/227');
});

/** A modest deterministic set of hosts and ports, boundaries included. */
function* sampleEndpoints(): Generator<[string, number]> {
  const hosts = ['0.0.0.0', '10.0.0.5', '198.51.100.7', '203.0.113.10', '255.255.255.255', '1.2.3.4', '100.64.0.1'];
  const ports = [1, 2, 255, 256, 257, 1023, 1024, 20000, 40000, 50012, 65280, 65534, 65535];
  for (const host of hosts) for (const port of ports) yield [host, port];
  let seed = 12345;
  const next = (): number => (seed = (seed * 1103515245 + 12345) % 2147483648);
  for (let i = 0; i < 200; i++) {
    const host = [next() % 256, next() % 256, next() % 256, next() % 256].join('.');
    yield [host, 1 + (next() % 65535)];
  }
}

t.test('round trip PORT: format -> parse -> format', async (t) => {
  const failures: string[] = [];
  let n = 0;
  for (const [host, port] of sampleEndpoints()) {
    n++;
    const text = formatPortArgument(host, port);
    const parsed = parsePortArgument(text);
    if (!parsed.ok || parsed.value.host !== host || parsed.value.port !== port || formatPortArgument(parsed.value.host, parsed.value.port) !== text) {
      failures.push(`${host}:${port}`);
    }
  }
  t.ok(n > 250, `${n} endpoints tried`);
  t.same(failures, []);
});

t.test('round trip 227: format -> server bytes at every chunking -> parse', async (t) => {
  const failures: string[] = [];
  let n = 0;
  for (const [host, port] of sampleEndpoints()) {
    if (n++ % 10 !== 0) continue; // every chunking of ~50 bytes each: keep it modest
    const line = formatPasvReply(host, port);
    const { reference, mismatches } = chunkingMismatches(bytes(`${line}\r\n`), (chunks) => assembleChunks(chunks));
    const event = reference[0];
    const parsed = event?.kind === 'reply' ? parsePasvReply(event.lines) : SYNTAX;
    if (mismatches.length > 0 || !parsed.ok || parsed.value.host !== host || parsed.value.port !== port) failures.push(`${host}:${port}`);
    else if (formatPasvReply(parsed.value.host, parsed.value.port) !== line) failures.push(`${host}:${port} reformat`);
  }
  t.same(failures, []);
});

/** Server bytes through framer + assembler at every chunking, then parsePasvReply. */
function pasvFromWire(wire: string): { parsed: AddressParse; replies: number; mismatches: unknown[] } {
  const { reference, mismatches } = chunkingMismatches(bytes(wire), (chunks) => assembleChunks(chunks));
  const event = reference[0];
  const parsed: AddressParse = event?.kind === 'reply' ? parsePasvReply(event.lines) : SYNTAX;
  return { parsed, replies: reference.length, mismatches };
}

t.test('parsePasvReply from the wire', async (t) => {
  const table: [string, string, AddressParse][] = [
    ['§8.1 canonical', '227 Entering Passive Mode (10,0,0,5,156,64).\r\n', v4('10.0.0.5', 40000)],
    ['§8.2 no parentheses', '227 Entering passive mode. 10,0,0,5,4,1\r\n', v4('10.0.0.5', 1025)],
    ['§8.3 pasv_address public NAT IP (parsed; ignored later)', '227 Entering Passive Mode (198,18,5,9,156,70).\r\n', v4('198.18.5.9', 40006)],
    ['§8.6 multi-line 227', '227-Entering Passive Mode\r\n227 (10,0,0,5,156,64)\r\n', v4('10.0.0.5', 40000)],
    ['RFC 959 Figure 3 style `=`', '227 =10,0,0,5,4,1\r\n', v4('10.0.0.5', 1025)],
    ['spaces inside the group', '227 Entering Passive Mode (10, 0, 0, 5, 156, 64)\r\n', v4('10.0.0.5', 40000)],
    ['leading zeros', '227 Entering Passive Mode (010,000,000,005,156,064).\r\n', v4('10.0.0.5', 40000)],
    ['number in text before the group', '227 Mode 2 entered (10,0,0,5,156,64)\r\n', v4('10.0.0.5', 40000)],
    ['seven numbers: first six taken (as curl sscanf does)', '227 Entering Passive Mode (10,0,0,5,156,64,7).\r\n', v4('10.0.0.5', 40000)],
    ['code digits are not part of the group', '227 Entering Passive Mode (0,0,0,0,0,1)\r\n', v4('0.0.0.0', 1)],
    ['octet 256 rejected, not masked', '227 Entering Passive Mode (10,0,0,256,156,64).\r\n', SYNTAX],
    ['p1 256 rejected', '227 Entering Passive Mode (10,0,0,5,256,64).\r\n', SYNTAX],
    ['p2 1000 rejected', '227 Entering Passive Mode (10,0,0,5,156,1000).\r\n', SYNTAX],
    ['first octet 1234 rejected', '227 Entering Passive Mode (1234,0,0,5,156,64).\r\n', SYNTAX],
    ['huge number rejected', '227 Entering Passive Mode (99999999999,0,0,5,156,64).\r\n', SYNTAX],
    ['port 0 rejected', '227 Entering Passive Mode (10,0,0,5,0,0).\r\n', SYNTAX],
    ['five numbers', '227 Entering Passive Mode (10,0,0,5,156).\r\n', SYNTAX],
    ['no numbers', '227 Entering Passive Mode.\r\n', SYNTAX],
    ['dotted address', '227 Entering Passive Mode (10.0.0.5:40000).\r\n', SYNTAX],
    ['negative', '227 Entering Passive Mode (10,0,0,5,-1,64).\r\n', SYNTAX],
  ];
  for (const [name, wire, expected] of table) {
    const { parsed, replies, mismatches } = pasvFromWire(wire);
    t.same(mismatches, [], `${name}: all chunkings agree`);
    t.equal(replies, 1, `${name}: exactly one reply`);
    t.same(parsed, expected, name);
  }
});

t.test('formatPasvReply: canonical form with parentheses (§1.3, §8.1)', async (t) => {
  t.equal(formatPasvReply('203.0.113.10', 50012), '227 Entering Passive Mode (203,0,113,10,195,92).');
  t.equal(formatPasvReply('203.0.113.10', 1025), '227 Entering Passive Mode (203,0,113,10,4,1).');
});

t.test('parseEpsvReply from the wire', async (t) => {
  const table: [string, string, { ok: true; port: number } | { ok: false }][] = [
    ['§8.4 vsftpd form', '229 Entering Extended Passive Mode (|||40006|)\r\n', { ok: true, port: 40006 }],
    ['§8.4 other delimiter', '229 Entering Extended Passive Mode (!!!40006!)\r\n', { ok: true, port: 40006 }],
    ['delimiter #', '229 ok (###1#)\r\n', { ok: true, port: 1 }],
    ['max port', '229 ok (|||65535|)\r\n', { ok: true, port: 65535 }],
    ['multi-line 229', '229-Entering Extended Passive Mode\r\n229 (|||40006|)\r\n', { ok: true, port: 40006 }],
    ['port 0', '229 Entering Extended Passive Mode (|||0|)\r\n', { ok: false }],
    ['port 65536', '229 Entering Extended Passive Mode (|||65536|)\r\n', { ok: false }],
    ['huge port', '229 Entering Extended Passive Mode (|||99999999999|)\r\n', { ok: false }],
    ['six digits', '229 Entering Extended Passive Mode (|||040006|)\r\n', { ok: false }],
    ['mixed delimiters', '229 Entering Extended Passive Mode (|||40006!)\r\n', { ok: false }],
    ['two leading delimiters', '229 Entering Extended Passive Mode (||40006|)\r\n', { ok: false }],
    ['address field filled', '229 Entering Extended Passive Mode (|1|10.0.0.5|40006|)\r\n', { ok: false }],
    ['no parentheses', '229 Entering Extended Passive Mode |||40006|\r\n', { ok: false }],
    ['space delimiter (not 33..126)', '229 Entering Extended Passive Mode (   40006 )\r\n', { ok: false }],
    ['negative', '229 Entering Extended Passive Mode (|||-1|)\r\n', { ok: false }],
    ['empty port', '229 Entering Extended Passive Mode (||||)\r\n', { ok: false }],
  ];
  for (const [name, wire, expected] of table) {
    const { reference, mismatches } = chunkingMismatches(bytes(wire), (chunks) => assembleChunks(chunks));
    t.same(mismatches, [], `${name}: chunkings agree`);
    const event = reference[0];
    t.same(event?.kind === 'reply' ? parseEpsvReply(event.lines) : null, expected, name);
  }
});

t.test('formatEpsvReply emits | (§2.2, §8.4)', async (t) => {
  t.equal(formatEpsvReply(50013), '229 Entering Extended Passive Mode (|||50013|)');
  const failures: number[] = [];
  for (const port of [1, 1023, 1024, 40006, 50013, 65535]) {
    const line = formatEpsvReply(port);
    const events = assembleChunks([bytes(`${line}\r\n`)]);
    const parsed = events[0]?.kind === 'reply' ? parseEpsvReply(events[0].lines) : { ok: false as const };
    if (!parsed.ok || parsed.port !== port) failures.push(port);
  }
  t.same(failures, [], 'round trip');
});

t.test('parseEprtArgument: accepted', async (t) => {
  const table: [string, AddressParse][] = [
    ['|1|132.235.1.2|6275|', v4('132.235.1.2', 6275)], // RFC 2428 §2 example
    ['|2|1080::8:800:200C:417A|5282|', v6('1080::8:800:200c:417a', 5282)], // RFC 2428 §2 example, normalized
    ['|1|198.51.100.7|50000|', v4('198.51.100.7', 50000)],
    ['!1!198.51.100.7!50000!', v4('198.51.100.7', 50000)],
    ['~2~2001:db8::7~50000~', v6('2001:db8::7', 50000)],
    ['|2|2001:0db8:0000:0000:0000:0000:0000:0007|50000|', v6('2001:db8::7', 50000)],
    ['|2|::1|50000|', v6('::1', 50000)],
    ['|1|198.51.100.7|65535|', v4('198.51.100.7', 65535)],
    ['|1|198.51.100.7|1|', v4('198.51.100.7', 1)],
    ['|1|198.51.100.7|05000|', v4('198.51.100.7', 5000)],
    ['  |1|198.51.100.7|50000|  ', v4('198.51.100.7', 50000)],
  ];
  for (const [arg, expected] of table) t.same(parseEprtArgument(arg), expected, JSON.stringify(arg));
});

t.test('parseEprtArgument: unknown families -> family (522, §8.15)', async (t) => {
  t.same(parseEprtArgument('|3|x|1|'), { ok: false, reason: 'family', family: '3' });
  t.same(parseEprtArgument('|0|1.2.3.4|5000|'), { ok: false, reason: 'family', family: '0' });
  t.same(parseEprtArgument('|99|1.2.3.4|5000|'), { ok: false, reason: 'family', family: '99' });
});

t.test('parseEprtArgument: rejected as syntax', async (t) => {
  const table: [string, string][] = [
    ['|1|198.51.100.7|65536|', '§8.15 port 65536'],
    ['|1|198.51.100.7|0|', 'port 0'],
    ['|1|198.51.100.7|99999999999|', 'huge port'],
    ['|1|198.51.100.7|-1|', 'negative port'],
    ['|1|198.51.100.7||', 'empty port'],
    ['|1|198.51.100.7|050000|', 'six-digit port'],
    ['|1|256.51.100.7|50000|', 'octet 256'],
    ['|1|198.51.100|50000|', 'three parts'],
    ['|1|01.51.100.7|50000|', 'leading zero (octal ambiguity)'],
    ['|1|0x7f.0.0.1|50000|', 'hex part'],
    ['|1|3325256711|50000|', 'single 32-bit number'],
    ['|1|::1|50000|', 'IPv6 under family 1'],
    ['|2|198.51.100.7|50000|', 'IPv4 under family 2'],
    ['|2|fe80::1%eth0|50000|', 'IPv6 with zone id'],
    ['|2|fe80::1%25eth0|50000|', 'IPv6 with URL-encoded zone id'],
    ['|2|[2001:db8::7]|50000|', 'IPv6 in brackets'],
    ['|2|2001:db8:::7|50000|', 'bad IPv6'],
    ['|1|198.51.100.7|50000', 'missing final delimiter'],
    ['1|198.51.100.7|50000|', 'missing first delimiter'],
    ['|1|198.51.100.7|50000|x|', 'extra field'],
    ['|1!198.51.100.7!50000!', 'mixed delimiters'],
    ['|1|198.51.100.7!50000|', 'mixed delimiters inside'],
    ['1198.51.100.7150000 1', 'digit as delimiter'],
    ['.1.198.51.100.7.50000.', "'.' as delimiter"],
    [':2:::1:50000:', "':' as delimiter"],
    ['a1a198.51.100.7a50000a', "hex letter as delimiter"],
    ['\x7f1\x7f198.51.100.7\x7f50000\x7f', 'DEL (127) as delimiter'],
    ['\xa61\xa6198.51.100.7\xa650000\xa6', 'non-ASCII delimiter'],
    ['\t|1|198.51.100.7|50000|', 'leading TAB'],
    ['|1|198.51.100.7|50000|\r', 'trailing CR'],
    ['|1|198.51.100.7\r|50000|', 'CR inside'],
    ['|1|198.51.100.7\x00|50000|', 'NUL inside'],
    ['|1|198.51.100.7|50\n000|', 'LF inside'],
    ['|x|198.51.100.7|50000|', 'non-numeric family'],
    ['|1111|198.51.100.7|50000|', 'four-digit family'],
    ['||198.51.100.7|50000|', 'empty family'],
    ['', 'empty'],
    ['||||', 'only delimiters'],
    ['|1||50000|', 'empty address'],
  ];
  for (const [arg, why] of table) t.same(parseEprtArgument(arg), SYNTAX, why);
});

t.test('round trip EPRT: format -> parse -> format', async (t) => {
  const hosts = ['198.51.100.7', '0.0.0.0', '255.255.255.255', '2001:db8::7', '::1', '::', 'fe80::1', '1:2:3:4:5:6:7:8', '2001:db8:0:0:1::1'];
  const ports = [1, 1024, 50000, 65535];
  const failures: string[] = [];
  for (const host of hosts) {
    for (const port of ports) {
      const text = formatEprtArgument(host, port);
      const parsed = parseEprtArgument(text);
      if (!parsed.ok || parsed.value.port !== port || formatEprtArgument(parsed.value.host, parsed.value.port) !== text) failures.push(`${host} ${port}`);
    }
  }
  t.same(failures, []);
  t.equal(formatEprtArgument('198.51.100.7', 50000), '|1|198.51.100.7|50000|');
  t.equal(formatEprtArgument('2001:0db8::0007', 50000), '|2|2001:db8::7|50000|');
});

t.test('parseEpsvArgument (§8.16)', async (t) => {
  const table: [string, EpsvArgument][] = [
    ['', { kind: 'any' }],
    [' ', { kind: 'any' }],
    ['1', { kind: 'family', family: 4 }],
    ['2', { kind: 'family', family: 6 }],
    ['ALL', { kind: 'all' }],
    ['all', { kind: 'all' }],
    ['All', { kind: 'all' }],
    ['3', { kind: 'unsupported-family' }],
    ['0', { kind: 'unsupported-family' }],
    ['999', { kind: 'unsupported-family' }],
    ['1000', { kind: 'syntax' }],
    ['-1', { kind: 'syntax' }],
    ['ALLX', { kind: 'syntax' }],
    ['1 2', { kind: 'syntax' }],
    ['|||1|', { kind: 'syntax' }],
    ['99999999999', { kind: 'syntax' }],
  ];
  for (const [arg, expected] of table) t.same(parseEpsvArgument(arg), expected, JSON.stringify(arg));
});
