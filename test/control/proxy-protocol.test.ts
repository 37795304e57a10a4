/**
 * PROXY protocol v1/v2 header decoder (protocol.md §7, §8.30-31; haproxy doc/proxy-protocol.txt).
 * Every fixture is fed whole, split at every offset and byte by byte: all chunkings must give the
 * same verdict, header and `rest`. Fed byte by byte, the verdict must come exactly on the byte
 * that decides it: a complete header on its last byte, a hostile one as soon as it can no longer
 * be valid.
 */
import t, { type Test } from 'tap';
import fc from 'fast-check';
import {
  PROXY_V1_MAX_BYTES,
  PROXY_V2_MAX_LENGTH,
  ProxyHeaderDecoder,
  encodeProxyHeaderV1,
  encodeProxyHeaderV2,
  type ProxyHeader,
  type ProxyHeaderInit,
  type ProxyProtocolVersion,
  type ProxyTlv,
} from '../../src/control/proxy-protocol.js';
import { bytes, bytewise, chunkingMismatches } from '../helpers/split.js';

const RUNS = Number(process.env.FTPP_FUZZ_RUNS ?? 300);
const params = { numRuns: RUNS, ...(process.env.FTPP_FUZZ_SEED ? { seed: Number(process.env.FTPP_FUZZ_SEED) } : {}) };

/** Hex with any whitespace, as the vectors are written in protocol.md §8. */
const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ''), 'hex');
const SIG = '0D0A0D0A000D0A515549540A';

type Outcome =
  | { readonly kind: 'need-more' }
  | { readonly kind: 'header'; readonly header: ProxyHeader; readonly rest: string }
  | { readonly kind: 'error'; readonly reason: string };

/**
 * Feed `chunks` to a fresh decoder as the session would: stop at the first verdict; after a
 * header the remaining chunks are FTP data and are appended to `rest` (latin1).
 */
function decodeChunks(chunks: readonly Buffer[], accept: ProxyProtocolVersion = 'any'): Outcome {
  const decoder = new ProxyHeaderDecoder(accept);
  for (let i = 0; i < chunks.length; i++) {
    const result = decoder.push(chunks[i]!);
    if (result.kind === 'header') {
      return { kind: 'header', header: result.header, rest: Buffer.concat([result.rest, ...chunks.slice(i + 1)]).toString('latin1') };
    }
    if (result.kind === 'error') {
      const again = decoder.push(bytes('USER x\r\n'));
      if (again.kind !== 'error' || again.reason !== result.reason) throw new Error('an error must be sticky');
      return { kind: 'error', reason: result.reason };
    }
  }
  return { kind: 'need-more' };
}

/** Bytes fed (one at a time) when the first non-`need-more` result came; undefined if none. */
function verdictOffset(input: Buffer, accept: ProxyProtocolVersion = 'any'): number | undefined {
  const decoder = new ProxyHeaderDecoder(accept);
  const { chunks } = bytewise(input);
  for (let i = 0; i < chunks.length; i++) {
    if (decoder.push(chunks[i]!).kind !== 'need-more') return i + 1;
  }
  return undefined;
}

function proxy(version: 1 | 2, family: 4 | 6, src: string, sport: number, dst: string, dport: number): ProxyHeader {
  return { command: 'proxy', version, family, source: { host: src, port: sport }, destination: { host: dst, port: dport } };
}
const header = (h: ProxyHeader, rest = ''): Outcome => ({ kind: 'header', header: h, rest });
const error = (reason: string): Outcome => ({ kind: 'error', reason });
const NEED_MORE: Outcome = { kind: 'need-more' };

interface Case {
  readonly name: string;
  readonly input: Buffer;
  readonly accept?: ProxyProtocolVersion;
  readonly expect: Outcome;
  /** Byte count at which the verdict must come when fed byte by byte (default: header end, or input end). */
  readonly at?: number;
}

/** Runs each case over every chunking, checks the verdict and where it came. */
function runCases(t: Test, cases: readonly Case[]): void {
  for (const c of cases) {
    t.test(c.name, async (t) => {
      const { reference, mismatches, chunkings } = chunkingMismatches(c.input, (chunks) => decodeChunks(chunks, c.accept));
      t.same(reference, c.expect, 'whole buffer');
      t.same(mismatches, [], `all ${chunkings} chunkings agree with the whole buffer`);
      t.equal(chunkings, c.input.length + 3, 'whole + every split offset + bytewise were tried');
      const expectedAt =
        c.at ?? (c.expect.kind === 'header' ? c.input.length - c.expect.rest.length : c.expect.kind === 'error' ? c.input.length : undefined);
      t.equal(verdictOffset(c.input, c.accept), expectedAt, 'verdict on the deciding byte');
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

const V30 = bytes('PROXY TCP4 198.51.100.7 203.0.113.10 51515 21\r\n');
const V31 = hex(`${SIG} 21 11 000C C6336407 CB00710A C93B 0015`);
const V31_HEADER = proxy(2, 4, '198.51.100.7', 51515, '203.0.113.10', 21);
const V30_HEADER = proxy(1, 4, '198.51.100.7', 51515, '203.0.113.10', 21);
const LOCAL_V2 = hex(`${SIG} 20 00 0000`);
const V6_SRC = '20010db8000000000000000000000007';
const V6_DST = '20010db800000000000000000000000a';
const V2_TCP6 = hex(`${SIG} 21 21 0024 ${V6_SRC} ${V6_DST} C93B 0015`);
const V2_TCP6_HEADER = proxy(2, 6, '2001:db8::7', 51515, '2001:db8::a', 21);
const VPCE = Buffer.from('vpce-0123456789abcdef0', 'latin1');
const AWS_TLV = `EA ${VPCE.length.toString(16).padStart(4, '0')} ${VPCE.toString('hex')}`;
const V2_AWS = hex(`${SIG} 21 11 ${(12 + 3 + VPCE.length).toString(16).padStart(4, '0')} C6336407 CB00710A C93B 0015 ${AWS_TLV}`);
const UNKNOWN_107 = bytes(
  `PROXY UNKNOWN ${'ffff:'.repeat(7)}ffff ${'ffff:'.repeat(7)}ffff 65535 65535\r\n`,
);
const TCP6_104 = bytes(`PROXY TCP6 ${'ffff:'.repeat(7)}ffff ${'FFFF:'.repeat(7)}FFFF 65535 65535\r\n`);

t.test('fixture sizes', async (t) => {
  t.equal(UNKNOWN_107.length, PROXY_V1_MAX_BYTES, 'worst-case UNKNOWN line is 107 bytes (proxy-protocol.txt §2.1)');
  t.equal(TCP6_104.length, 104, 'longest TCP6 line is 104 bytes');
  t.equal(V31.length, 28);
});

t.test('valid headers', async (t) => {
  runCases(t, [
    { name: '§8.30 PROXY v1 TCP4', input: V30, expect: header(V30_HEADER) },
    { name: '§8.31 PROXY v2 TCP4', input: V31, expect: header(V31_HEADER) },
    { name: '§8.31 v2 LOCAL (health check): use the socket endpoints', input: LOCAL_V2, expect: header({ command: 'local', version: 2 }) },
    {
      name: 'v2 LOCAL with an address block: len honoured, bytes skipped',
      input: Buffer.concat([hex(`${SIG} 20 11 000C C6336407 CB00710A C93B 0015`), bytes('220?')]),
      expect: header({ command: 'local', version: 2 }, '220?'),
    },
    {
      name: 'v2 LOCAL with family UNIX: the family is ignored for LOCAL',
      input: Buffer.concat([hex(`${SIG} 20 31 0000`)]),
      expect: header({ command: 'local', version: 2 }),
    },
    { name: 'v2 PROXY with UNSPEC: address info ignored, treated as local', input: hex(`${SIG} 21 00 0000`), expect: header({ command: 'local', version: 2 }) },
    {
      name: 'v2 PROXY with UNSPEC and a body: skipped',
      input: hex(`${SIG} 21 00 0005 0102030405 AA`),
      expect: header({ command: 'local', version: 2 }, '\xaa'),
    },
    { name: 'v1 PROXY UNKNOWN', input: bytes('PROXY UNKNOWN\r\n'), expect: header({ command: 'local', version: 1 }) },
    {
      name: 'v1 PROXY UNKNOWN with ignored fields',
      input: bytes('PROXY UNKNOWN whatever  the  sender wrote\r\n'),
      expect: header({ command: 'local', version: 1 }),
    },
    { name: 'v1 UNKNOWN worst case, exactly 107 bytes', input: UNKNOWN_107, expect: header({ command: 'local', version: 1 }) },
    {
      name: 'v1 TCP6, normalized text',
      input: bytes('PROXY TCP6 2001:DB8:0:0:0:0:0:7 2001:db8::a 51515 21\r\n'),
      expect: header(proxy(1, 6, '2001:db8::7', 51515, '2001:db8::a', 21)),
    },
    { name: 'v1 TCP6, longest line (104 bytes)', input: TCP6_104, expect: header(proxy(1, 6, 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff', 65535, 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff', 65535)) },
    {
      name: 'v1 TCP6 v4-mapped source is normalized to dotted IPv4',
      input: bytes('PROXY TCP6 ::ffff:198.51.100.7 ::FFFF:CB00:710A 51515 21\r\n'),
      expect: header(proxy(1, 6, '198.51.100.7', 51515, '203.0.113.10', 21)),
    },
    {
      name: 'v1 TCP6 IPv4-compatible ::1.2.3.4 is not mistaken for v4-mapped',
      input: bytes('PROXY TCP6 ::1.2.3.4 ::1 51515 21\r\n'),
      expect: header(proxy(1, 6, '::102:304', 51515, '::1', 21)),
    },
    { name: 'v1 TCP6 unspecified and loopback', input: bytes('PROXY TCP6 :: ::1 0 1\r\n'), expect: header(proxy(1, 6, '::', 0, '::1', 1)) },
    { name: 'v1 ports 0 and 65535', input: bytes('PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n'), expect: header(proxy(1, 4, '0.0.0.0', 0, '255.255.255.255', 65535)) },
    { name: 'v2 TCP6', input: V2_TCP6, expect: header(V2_TCP6_HEADER) },
    {
      name: 'v2 TCP6 v4-mapped normalized',
      input: hex(`${SIG} 21 21 0024 00000000000000000000ffffc6336407 00000000000000000000ffffcb00710a C93B 0015`),
      expect: header(proxy(2, 6, '198.51.100.7', 51515, '203.0.113.10', 21)),
    },
    { name: 'v2 with the AWS 0xEA VPC endpoint TLV', input: V2_AWS, expect: header(V31_HEADER) },
    {
      name: 'v2 with several TLVs (ALPN, NOOP empty, UNIQUE_ID, AWS) then FTP',
      input: Buffer.concat([
        encodeProxyHeaderV2(V31_HEADER, [
          { type: 0x01, value: bytes('ftp') },
          { type: 0x04, value: Buffer.alloc(0) },
          { type: 0x05, value: Buffer.alloc(128, 7) },
          { type: 0xea, value: VPCE },
        ]),
        bytes('USER anonymous\r\n'),
      ]),
      expect: header(V31_HEADER, 'USER anonymous\r\n'),
    },
    {
      name: 'v2 TCP6 with a TLV',
      input: hex(`${SIG} 21 21 0029 ${V6_SRC} ${V6_DST} C93B 0015 02 0002 6869`),
      expect: header(V2_TCP6_HEADER),
    },
    {
      name: 'v2 at the length bound (4096)',
      input: encodeProxyHeaderV2(V31_HEADER, [{ type: 0x04, value: Buffer.alloc(PROXY_V2_MAX_LENGTH - 12 - 3) }]),
      expect: header(V31_HEADER),
    },
  ]);
});

t.test('bytes after the header are returned untouched', async (t) => {
  const spoof = bytes('PROXY TCP4 192.0.2.66 203.0.113.10 1234 21\r\n');
  runCases(t, [
    { name: 'v1 then FTP', input: Buffer.concat([V30, bytes('USER anonymous\r\n')]), expect: header(V30_HEADER, 'USER anonymous\r\n') },
    { name: 'v2 then FTP', input: Buffer.concat([V31, bytes('FEAT\r\n')]), expect: header(V31_HEADER, 'FEAT\r\n') },
    {
      name: 'v2 (NLB) then a client-sent v1 header: exactly one header is parsed (§7)',
      input: Buffer.concat([V31, spoof, bytes('USER x\r\n')]),
      expect: header(V31_HEADER, `${spoof.toString('latin1')}USER x\r\n`),
    },
    { name: 'v1 then a second v1 header', input: Buffer.concat([V30, spoof]), expect: header(V30_HEADER, spoof.toString('latin1')) },
    { name: 'v2 then a second v2 header', input: Buffer.concat([V31, LOCAL_V2]), expect: header(V31_HEADER, LOCAL_V2.toString('latin1')) },
    { name: 'v2 LOCAL then binary junk', input: Buffer.concat([LOCAL_V2, hex('00FF0D0A')]), expect: header({ command: 'local', version: 2 }, '\x00\xff\r\n') },
  ]);
  t.test('rest of the final chunk is the same bytes, not a copy with changes', async (t) => {
    const chunk = Buffer.concat([V31, bytes('NOOP\r\n')]);
    const result = new ProxyHeaderDecoder('any').push(chunk);
    t.equal(result.kind, 'header');
    if (result.kind === 'header') t.same(result.rest, bytes('NOOP\r\n'));
  });
});

t.test('truncated headers: need-more, never a verdict', async (t) => {
  for (const fixture of [V30, V31, LOCAL_V2, V2_TCP6, V2_AWS, UNKNOWN_107, TCP6_104]) {
    let bad = 0;
    for (let end = 0; end < fixture.length; end++) {
      const { reference, mismatches } = chunkingMismatches(fixture.subarray(0, end), (chunks) => decodeChunks(chunks));
      if (reference.kind !== 'need-more' || mismatches.length > 0) bad++;
    }
    t.equal(bad, 0, `every strict prefix of a ${fixture.length}-byte header, every chunking, is need-more`);
  }
  // The largest accepted header: fed byte by byte, nothing before its last byte (the bytewise
  // verdict check of 'v2 at the length bound' covers every chunking of the whole header).
  const largest = encodeProxyHeaderV2(V31_HEADER, [{ type: 0x04, value: Buffer.alloc(PROXY_V2_MAX_LENGTH - 15) }]);
  t.equal(largest.length, 16 + PROXY_V2_MAX_LENGTH);
  t.equal(verdictOffset(largest), largest.length, 'need-more until the last of 4112 bytes');
  runCases(t, [{ name: '§8.31 truncated v2 (address block cut)', input: V31.subarray(0, 27), expect: NEED_MORE }]);
});

t.test('hostile v1', async (t) => {
  const line = (text: string): Buffer => bytes(text);
  const filler = (n: number): string => 'A'.repeat(n);
  runCases(t, [
    { name: '§8.30 no CR: abort', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 21\n'), expect: error('v1-no-crlf') },
    { name: 'lone CR followed by data: rejected on the byte after the CR', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 21\rUSER'), expect: error('v1-no-crlf'), at: V30.length },
    { name: 'CR CR LF', input: line('PROXY UNKNOWN\r\r\n'), expect: error('v1-no-crlf'), at: 15 },
    {
      name: '200 bytes without CRLF: rejected at byte 106, the last one that could still be followed by CRLF',
      input: line(`PROXY ${filler(194)}`),
      expect: error('v1-too-long'),
      at: 106,
    },
    { name: '106 printable bytes then CRLF (108 bytes)', input: line(`PROXY UNKNOWN ${filler(92)}\r\n`), expect: error('v1-too-long'), at: 106 },
    { name: '105 printable bytes, CR, then not LF', input: line(`PROXY UNKNOWN ${filler(91)}\rX`), expect: error('v1-no-crlf'), at: 107 },
    { name: 'double space after PROXY', input: line('PROXY  TCP4 198.51.100.7 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'double space between fields', input: line('PROXY TCP4 198.51.100.7  203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'trailing space', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 21 \r\n'), expect: error('v1-syntax') },
    { name: 'tab separator', input: line('PROXY TCP4\t198.51.100.7 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax'), at: 11 },
    { name: 'missing port', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515\r\n'), expect: error('v1-syntax') },
    { name: 'extra field', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 21 x\r\n'), expect: error('v1-syntax') },
    { name: 'leading zero in source port', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 051515 21\r\n'), expect: error('v1-syntax') },
    { name: 'port 00', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 00\r\n'), expect: error('v1-syntax') },
    { name: 'port 65536', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 65536 21\r\n'), expect: error('v1-syntax') },
    { name: 'port 999999', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 999999 21\r\n'), expect: error('v1-syntax') },
    { name: 'port -1', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 -1 21\r\n'), expect: error('v1-syntax') },
    { name: 'port +21', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 +21\r\n'), expect: error('v1-syntax') },
    { name: 'port in hex', input: line('PROXY TCP4 198.51.100.7 203.0.113.10 51515 0x15\r\n'), expect: error('v1-syntax') },
    { name: 'octet 256', input: line('PROXY TCP4 198.51.100.256 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'three-part IPv4', input: line('PROXY TCP4 198.51.100 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'five-part IPv4', input: line('PROXY TCP4 198.51.100.7.1 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'IPv4 with a leading zero (octal-looking)', input: line('PROXY TCP4 198.051.100.7 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'IPv4 as one integer', input: line('PROXY TCP4 3325256711 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'hostname instead of address', input: line('PROXY TCP4 localhost 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP4 with IPv6 addresses (family mismatch)', input: line('PROXY TCP4 2001:db8::7 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with IPv4 addresses (family mismatch)', input: line('PROXY TCP6 198.51.100.7 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with a zone id', input: line('PROXY TCP6 fe80::1%eth0 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with two ::', input: line('PROXY TCP6 1::2::3 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with a 5-digit group', input: line('PROXY TCP6 12345:: 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with 9 groups', input: line('PROXY TCP6 1:2:3:4:5:6:7:8:9 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with 7 groups and no ::', input: line('PROXY TCP6 1:2:3:4:5:6:7 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with 8 groups and ::', input: line('PROXY TCP6 1:2:3:4::5:6:7:8 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with ::: ', input: line('PROXY TCP6 :::1 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with a leading single colon', input: line('PROXY TCP6 :1:2:3:4:5:6:7 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with a leading zero in the embedded IPv4', input: line('PROXY TCP6 ::ffff:198.51.100.07 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with a hex embedded IPv4', input: line('PROXY TCP6 ::ffff:0xc6.51.100.7 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with the embedded IPv4 not last', input: line('PROXY TCP6 1.2.3.4::1 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with dotted quads on both sides of ::', input: line('PROXY TCP6 1.2.3.4::1.2.3.4 ::1 1 2\r\n'), expect: error('v1-syntax') },
    { name: 'TCP6 with bracketed address', input: line('PROXY TCP6 [2001:db8::7] 2001:db8::a 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'lower-case tcp4', input: line('PROXY tcp4 198.51.100.7 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'UDP4', input: line('PROXY UDP4 198.51.100.7 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax') },
    { name: 'UNKNOWN glued to more text', input: line('PROXY UNKNOWNX\r\n'), expect: error('v1-syntax') },
    { name: 'empty line after PROXY ', input: line('PROXY \r\n'), expect: error('v1-syntax') },
    { name: 'NUL inside the line: rejected at once', input: line('PROXY TCP4 198.51.100.7\x00 203.0.113.10 51515 21\r\n'), expect: error('v1-syntax'), at: 24 },
    { name: '8-bit byte inside the line: rejected at once', input: line('PROXY UNKNOWN \xff\r\n'), expect: error('v1-syntax'), at: 15 },
  ]);
});

t.test('hostile v2', async (t) => {
  const addr4 = 'C6336407 CB00710A C93B 0015';
  runCases(t, [
    { name: '§8.31 version nibble 1', input: hex(`${SIG} 11 11 000C ${addr4}`), expect: error('v2-version'), at: 13 },
    { name: '§8.31 version nibble 3', input: hex(`${SIG} 31 11 000C ${addr4}`), expect: error('v2-version'), at: 13 },
    { name: 'version nibble 0', input: hex(`${SIG} 01 11 000C ${addr4}`), expect: error('v2-version'), at: 13 },
    { name: '§8.31 command 2', input: hex(`${SIG} 22 11 000C ${addr4}`), expect: error('v2-command'), at: 13 },
    { name: 'command 0xF', input: hex(`${SIG} 2F 11 000C ${addr4}`), expect: error('v2-command'), at: 13 },
    { name: 'family 0x31 (UNIX stream) with PROXY', input: hex(`${SIG} 21 31 00D8 ${'00'.repeat(216)}`), expect: error('v2-family'), at: 14 },
    { name: 'family 0x12 (UDP4) with PROXY', input: hex(`${SIG} 21 12 000C ${addr4}`), expect: error('v2-family'), at: 14 },
    { name: 'family 0x22 (UDP6) with PROXY', input: hex(`${SIG} 21 22 0024 ${V6_SRC} ${V6_DST} C93B 0015`), expect: error('v2-family'), at: 14 },
    { name: 'family 0x01 (UNSPEC family, STREAM) is undefined', input: hex(`${SIG} 21 01 0000`), expect: error('v2-family'), at: 14 },
    { name: 'family 0x41 is undefined', input: hex(`${SIG} 21 41 000C ${addr4}`), expect: error('v2-family'), at: 14 },
    { name: 'family 0x13 is undefined', input: hex(`${SIG} 21 13 000C ${addr4}`), expect: error('v2-family'), at: 14 },
    { name: 'LOCAL with an undefined family', input: hex(`${SIG} 20 44 0000`), expect: error('v2-family'), at: 14 },
    { name: 'len 11 for TCP4', input: hex(`${SIG} 21 11 000B C6336407 CB00710A C93B 00`), expect: error('v2-length'), at: 16 },
    { name: 'len 0 for TCP4', input: hex(`${SIG} 21 11 0000`), expect: error('v2-length'), at: 16 },
    { name: 'len 35 for TCP6', input: hex(`${SIG} 21 21 0023 ${V6_SRC} ${V6_DST} C93B 00`), expect: error('v2-length'), at: 16 },
    { name: 'len 12 for TCP6', input: hex(`${SIG} 21 21 000C ${addr4}`), expect: error('v2-length'), at: 16 },
    { name: 'len 4097: rejected before the body arrives', input: hex(`${SIG} 21 11 1001 ${addr4}`), expect: error('v2-length'), at: 16 },
    { name: 'len 65535 on LOCAL', input: hex(`${SIG} 20 00 FFFF`), expect: error('v2-length'), at: 16 },
    { name: 'TLV value overruns the header', input: hex(`${SIG} 21 11 0011 ${addr4} EA 0005 6162`), expect: error('v2-tlv') },
    { name: 'TLV of length 0xFFFF inside a short header', input: hex(`${SIG} 21 11 0010 ${addr4} 01 FFFF 00`), expect: error('v2-tlv') },
    { name: 'one stray byte after the address block', input: hex(`${SIG} 21 11 000D ${addr4} 04`), expect: error('v2-tlv') },
    { name: 'two stray bytes after a valid TLV', input: hex(`${SIG} 21 11 0011 ${addr4} 04 0000 0400`), expect: error('v2-tlv') },
    { name: 'TCP6 TLV overrun', input: hex(`${SIG} 21 21 0027 ${V6_SRC} ${V6_DST} C93B 0015 EA 0001`), expect: error('v2-tlv') },
    { name: 'signature wrong at byte 6', input: hex('0D0A0D0A0A0D0A515549540A 21 11 000C'), expect: error('bad-signature'), at: 5 },
    { name: 'signature wrong at byte 12', input: hex('0D0A0D0A000D0A5155495400 21 11 000C'), expect: error('bad-signature'), at: 12 },
  ]);
});

t.test('not a PROXY header at all', async (t) => {
  runCases(t, [
    { name: 'FTP command', input: bytes('USER anonymous\r\n'), expect: error('bad-signature'), at: 1 },
    { name: 'lower-case proxy', input: bytes('proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n'), expect: error('bad-signature'), at: 1 },
    { name: 'PROXY without the space', input: bytes('PROXYTCP4\r\n'), expect: error('bad-signature'), at: 6 },
    { name: 'PROX then CRLF', input: bytes('PROX\r\n'), expect: error('bad-signature'), at: 5 },
    { name: 'TLS ClientHello', input: hex('160301020001'), expect: error('bad-signature'), at: 1 },
    { name: 'CRLF then text', input: bytes('\r\nUSER x\r\n'), expect: error('bad-signature'), at: 3 },
    { name: 'empty input', input: Buffer.alloc(0), expect: NEED_MORE },
  ]);
});

t.test('accept restricts the version, decided on the first byte', async (t) => {
  runCases(t, [
    { name: "accept 'v1' given v2", input: V31, accept: 'v1', expect: error('wrong-version'), at: 1 },
    { name: "accept 'v2' given v1", input: V30, accept: 'v2', expect: error('wrong-version'), at: 1 },
    { name: "accept 'v1' given v1", input: V30, accept: 'v1', expect: header(V30_HEADER) },
    { name: "accept 'v2' given v2", input: V31, accept: 'v2', expect: header(V31_HEADER) },
    { name: "accept 'v2' given v2 LOCAL", input: LOCAL_V2, accept: 'v2', expect: header({ command: 'local', version: 2 }) },
    { name: "accept 'v1' given garbage", input: bytes('USER x\r\n'), accept: 'v1', expect: error('bad-signature'), at: 1 },
    { name: "accept 'v2' given garbage", input: bytes('USER x\r\n'), accept: 'v2', expect: error('bad-signature'), at: 1 },
  ]);
});

t.test('decoder contract', async (t) => {
  t.test('an empty chunk is need-more', async (t) => {
    const decoder = new ProxyHeaderDecoder('any');
    t.same(decoder.push(Buffer.alloc(0)), { kind: 'need-more' });
    t.same(decoder.push(V31.subarray(0, 3)), { kind: 'need-more' });
    t.same(decoder.push(Buffer.alloc(0)), { kind: 'need-more' });
    t.equal(decoder.push(V31.subarray(3)).kind, 'header');
  });
  t.test('push after the header throws: later bytes belong to the session', async (t) => {
    const decoder = new ProxyHeaderDecoder('any');
    t.equal(decoder.push(V30).kind, 'header');
    t.throws(() => decoder.push(bytes('USER x\r\n')), /already decoded/);
  });
  t.test('an error is sticky', async (t) => {
    const decoder = new ProxyHeaderDecoder('v2');
    const first = decoder.push(V30);
    t.same(first, { kind: 'error', reason: 'wrong-version' });
    t.same(decoder.push(V31), first);
  });
  t.test('constructor rejects an unknown accept value', async (t) => {
    t.throws(() => new ProxyHeaderDecoder('v3' as ProxyProtocolVersion), RangeError);
    t.equal(new ProxyHeaderDecoder('any').accept, 'any');
  });
  t.test('a decoded header does not alias the input', async (t) => {
    const chunk = Buffer.from(V31);
    const result = new ProxyHeaderDecoder('any').push(chunk);
    chunk.fill(0);
    t.same(result.kind === 'header' ? result.header : undefined, V31_HEADER);
  });
});

t.test('encoders', async (t) => {
  t.test('§8.30 and §8.31 re-encode byte for byte', async (t) => {
    t.same(encodeProxyHeaderV1(V30_HEADER), V30);
    t.same(encodeProxyHeaderV2(V31_HEADER), V31);
    t.same(encodeProxyHeaderV2({ command: 'local' }), LOCAL_V2);
    t.same(encodeProxyHeaderV1({ command: 'local' }), bytes('PROXY UNKNOWN\r\n'));
    t.same(encodeProxyHeaderV2(V2_TCP6_HEADER), V2_TCP6);
    t.same(encodeProxyHeaderV2(V31_HEADER, [{ type: 0xea, value: VPCE }]), V2_AWS);
  });
  t.test('family conversions: v4 host under TCP6 is v4-mapped, mapped host under TCP4 is IPv4', async (t) => {
    t.same(
      encodeProxyHeaderV1(proxy(1, 6, '198.51.100.7', 1, '2001:db8::a', 2)),
      bytes('PROXY TCP6 ::ffff:c633:6407 2001:db8::a 1 2\r\n'),
    );
    t.same(encodeProxyHeaderV1(proxy(1, 4, '::ffff:198.51.100.7', 1, '203.0.113.10', 2)), bytes('PROXY TCP4 198.51.100.7 203.0.113.10 1 2\r\n'));
  });
  t.test('invalid input throws RangeError', async (t) => {
    const bad: [string, () => Buffer][] = [
      ['port 65536', () => encodeProxyHeaderV1(proxy(1, 4, '1.2.3.4', 65536, '1.2.3.4', 1))],
      ['port -1', () => encodeProxyHeaderV2(proxy(2, 4, '1.2.3.4', -1, '1.2.3.4', 1))],
      ['port 1.5', () => encodeProxyHeaderV2(proxy(2, 4, '1.2.3.4', 1.5, '1.2.3.4', 1))],
      ['hostname', () => encodeProxyHeaderV1(proxy(1, 4, 'example.com', 1, '1.2.3.4', 1))],
      ['empty host', () => encodeProxyHeaderV1(proxy(1, 6, '', 1, '::1', 1))],
      ['46-character host', () => encodeProxyHeaderV2(proxy(2, 6, `${'ffff:'.repeat(6)}0255.255.255.255`, 1, '::1', 1))],
      ['IPv6 under TCP4', () => encodeProxyHeaderV2(proxy(2, 4, '2001:db8::1', 1, '1.2.3.4', 1))],
      ['TLV type 256', () => encodeProxyHeaderV2(V31_HEADER, [{ type: 256, value: Buffer.alloc(0) }])],
      ['TLV value 65536 bytes', () => encodeProxyHeaderV2(V31_HEADER, [{ type: 4, value: Buffer.alloc(65536) }])],
      ['header over 65535 bytes', () => encodeProxyHeaderV2(V31_HEADER, [{ type: 4, value: Buffer.alloc(65535) }])],
    ];
    for (const [name, run] of bad) t.throws(run, RangeError, name);
  });
});

// ---------------------------------------------------------------------------------------------
// Properties

/** Independent oracle for canonical IPv6 text: the WHATWG URL host serializer (RFC 5952 form). */
function canonicalIpv6(text: string): string {
  const host = new URL(`http://[${text}]/`).hostname.slice(1, -1);
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(host);
  if (!mapped) return host;
  const hi = Number.parseInt(mapped[1]!, 16);
  const lo = Number.parseInt(mapped[2]!, 16);
  return `${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
}

const port = fc.integer({ min: 0, max: 65535 });
const endpoint4 = fc.record({ host: fc.ipV4(), port });
const endpoint6 = fc.record({ host: fc.ipV6(), port });
const init = fc.oneof(
  fc.record({ command: fc.constant('proxy' as const), family: fc.constant(4 as const), source: endpoint4, destination: endpoint4 }),
  fc.record({ command: fc.constant('proxy' as const), family: fc.constant(6 as const), source: endpoint6, destination: endpoint6 }),
  fc.constant({ command: 'local' as const }),
);
const tlv: fc.Arbitrary<ProxyTlv> = fc.record({
  type: fc.integer({ min: 0, max: 255 }),
  value: fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a)),
});
const trailing = fc.uint8Array({ maxLength: 40 }).map((a) => Buffer.from(a));

function expectedHeader(h: ProxyHeaderInit, version: 1 | 2): ProxyHeader {
  if (h.command === 'local') return { command: 'local', version };
  const norm = (host: string): string => (h.family === 4 ? host : canonicalIpv6(host));
  return proxy(version, h.family, norm(h.source.host), h.source.port, norm(h.destination.host), h.destination.port);
}

/** Split points to chunks. */
function chunksAt(input: Buffer, cuts: readonly number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => Math.min(c, input.length)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let last = 0;
  for (const p of points) {
    out.push(input.subarray(last, p));
    last = p;
  }
  out.push(input.subarray(last));
  return out;
}
const cuts = fc.array(fc.nat({ max: 200 }), { maxLength: 6 });

t.test('round trip encode -> decode, v1 and v2, any chunking, any trailing bytes', async (t) => {
  fc.assert(
    fc.property(init, fc.array(tlv, { maxLength: 4 }), trailing, cuts, (h, tlvs, tail, cut) => {
      const v1 = decodeChunks(chunksAt(Buffer.concat([encodeProxyHeaderV1(h), tail]), cut));
      const v2 = decodeChunks(chunksAt(Buffer.concat([encodeProxyHeaderV2(h, tlvs), tail]), cut));
      const rest = tail.toString('latin1');
      return (
        JSON.stringify(v1) === JSON.stringify(header(expectedHeader(h, 1), rest)) &&
        JSON.stringify(v2) === JSON.stringify(header(expectedHeader(h, 2), rest))
      );
    }),
    params,
  );
  t.pass('round trips hold');
});

t.test('decode -> encode -> decode is stable', async (t) => {
  fc.assert(
    fc.property(init, (h) => {
      for (const [encode, version] of [
        [encodeProxyHeaderV1, 1],
        [encodeProxyHeaderV2, 2],
      ] as const) {
        const first = decodeChunks([encode(h)]);
        if (first.kind !== 'header') return false;
        const second = decodeChunks([encode(first.header)]);
        if (JSON.stringify(second) !== JSON.stringify(first) || first.header.version !== version) return false;
      }
      return true;
    }),
    params,
  );
  t.pass('stable');
});

/** Random bytes, often starting like a header so the deeper states get exercised. */
const hostile = fc.oneof(
  fc.uint8Array({ maxLength: 120 }).map((a) => Buffer.from(a)),
  fc.uint8Array({ maxLength: 120 }).map((a) => Buffer.concat([bytes('PROXY '), Buffer.from(a)])),
  fc.uint8Array({ maxLength: 120 }).map((a) => Buffer.concat([hex(SIG), Buffer.from(a)])),
  fc
    .tuple(fc.constantFrom(V30, V31, V2_TCP6, V2_AWS, LOCAL_V2, UNKNOWN_107, TCP6_104), fc.nat(), fc.integer({ min: 0, max: 255 }))
    .map(([fixture, at, value]) => {
      const copy = Buffer.from(fixture);
      copy[at % copy.length] = value;
      return copy;
    }),
  fc
    .tuple(fc.constantFrom('PROXY TCP4 ', 'PROXY TCP6 ', 'PROXY UNKNOWN'), fc.stringMatching(/^[0-9a-fA-F:. \r\n]{0,60}$/))
    .map(([head, body]) => bytes(head + body)),
);

t.test('hostile bytes: never throws, chunking-independent, rest is a suffix of the input', async (t) => {
  fc.assert(
    fc.property(hostile, cuts, fc.constantFrom<ProxyProtocolVersion>('any', 'v1', 'v2'), (input, cut, accept) => {
      const whole = decodeChunks([input], accept);
      const split = decodeChunks(chunksAt(input, cut), accept);
      const bytewiseOutcome = decodeChunks(bytewise(input).chunks, accept);
      if (JSON.stringify(whole) !== JSON.stringify(split) || JSON.stringify(whole) !== JSON.stringify(bytewiseOutcome)) return false;
      if (whole.kind === 'header') {
        const rest = Buffer.from(whole.rest, 'latin1');
        if (!input.subarray(input.length - rest.length).equals(rest)) return false;
        // A header that decodes must re-encode to something that decodes to the same header.
        const again = decodeChunks([whole.header.version === 1 ? encodeProxyHeaderV1(whole.header) : encodeProxyHeaderV2(whole.header)]);
        if (JSON.stringify(again) !== JSON.stringify(header(whole.header))) return false;
      }
      if (whole.kind === 'need-more' && input.length > 16 + PROXY_V2_MAX_LENGTH) return false;
      return true;
    }),
    params,
  );
  t.pass('hostile input handled');
});
