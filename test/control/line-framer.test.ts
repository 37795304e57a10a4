/**
 * LineFramer: bytes -> lines, LF or CRLF, trailing CRs stripped, bounded tail
 * (protocol.md §1.1, §8.8-10, §8.18). Every fixture is fed whole, split at every offset and
 * byte by byte; all chunkings must agree with the expected outcome.
 */
import t from 'tap';
import { LineFramer } from '../../src/control/line-framer.js';
import { bytes, chunkingMismatches, frameChunks, type FramedOutcome } from '../helpers/split.js';

interface FramerCase {
  readonly name: string;
  readonly input: Buffer;
  readonly max?: number;
  readonly expect: FramedOutcome;
}

const A = (n: number): string => 'A'.repeat(n);

const cases: FramerCase[] = [
  {
    name: '§8.9 two commands in one segment',
    input: bytes('TYPE I\r\nPASV\r\n'),
    expect: { lines: ['TYPE I', 'PASV'], raws: ['TYPE I\r\n', 'PASV\r\n'], overflow: false, pending: '' },
  },
  {
    name: '§8.8 PORT split across segments (all chunkings)',
    input: bytes('PORT 198,51,100,7,195,80\r\n'),
    expect: { lines: ['PORT 198,51,100,7,195,80'], raws: ['PORT 198,51,100,7,195,80\r\n'], overflow: false, pending: '' },
  },
  {
    name: '§8.10 bare LF',
    input: bytes('syst\n'),
    expect: { lines: ['syst'], raws: ['syst\n'], overflow: false, pending: '' },
  },
  {
    name: '§8.10 stray CR: NOOP\\r then \\r\\n is one NOOP',
    input: bytes('NOOP\r\r\n'),
    expect: { lines: ['NOOP'], raws: ['NOOP\r\r\n'], overflow: false, pending: '' },
  },
  {
    name: 'CR inside a line is kept (only trailing CRs are stripped)',
    input: bytes('RETR a\rb\r\n'),
    expect: { lines: ['RETR a\rb'], raws: ['RETR a\rb\r\n'], overflow: false, pending: '' },
  },
  {
    name: 'NUL and 0xFF inside a line are kept',
    input: bytes('RETR a\x00b\xff\xff\r\n'),
    expect: { lines: ['RETR a\x00b\xff\xff'], raws: ['RETR a\x00b\xff\xff\r\n'], overflow: false, pending: '' },
  },
  {
    name: 'empty lines',
    input: bytes('\r\n\n\r\r\n'),
    expect: { lines: ['', '', ''], raws: ['\r\n', '\n', '\r\r\n'], overflow: false, pending: '' },
  },
  {
    name: 'unterminated tail stays pending',
    input: bytes('NOOP\r\nRETR fi'),
    expect: { lines: ['NOOP'], raws: ['NOOP\r\n'], overflow: false, pending: 'RETR fi' },
  },
  {
    name: '§8.20 ABOR\\r without LF stays pending',
    input: bytes('ABOR\r'),
    expect: { lines: [], raws: [], overflow: false, pending: 'ABOR\r' },
  },
  {
    name: 'empty input',
    input: bytes(''),
    expect: { lines: [], raws: [], overflow: false, pending: '' },
  },
  {
    name: 'line of exactly maxLineBytes (16) is accepted',
    max: 16,
    input: bytes(`${A(16)}\r\n`),
    expect: { lines: [A(16)], raws: [`${A(16)}\r\n`], overflow: false, pending: '' },
  },
  {
    name: 'line of maxLineBytes + 1 (17) overflows',
    max: 16,
    input: bytes(`NOOP\r\n${A(17)}\r\nNOOP\r\n`),
    expect: { lines: ['NOOP'], raws: ['NOOP\r\n'], overflow: true, pending: '' },
  },
  {
    name: 'line of maxLineBytes + 1 with bare LF overflows',
    max: 16,
    input: bytes(`${A(17)}\n`),
    expect: { lines: [], raws: [], overflow: true, pending: '' },
  },
  {
    name: 'maxLineBytes of text + CR, LF not yet here: not an overflow',
    max: 16,
    input: bytes(`${A(16)}\r`),
    expect: { lines: [], raws: [], overflow: false, pending: `${A(16)}\r` },
  },
  {
    name: 'regression: maxLineBytes of text + two CRs + LF overflows however it is chunked',
    max: 16,
    input: bytes(`${A(16)}\r\r\n`),
    expect: { lines: [], raws: [], overflow: true, pending: '' },
  },
  {
    name: 'overflow without any LF (unbounded tail is refused)',
    max: 16,
    input: bytes(`PASV\r\n${A(40)}`),
    expect: { lines: ['PASV'], raws: ['PASV\r\n'], overflow: true, pending: '' },
  },
  {
    name: '§8.18 5000 x A with no LF at maxLineBytes 4096',
    max: 4096,
    input: bytes(A(5000)),
    expect: { lines: [], raws: [], overflow: true, pending: '' },
  },
  {
    name: '4096 bytes + CRLF at maxLineBytes 4096 is accepted',
    max: 4096,
    input: bytes(`${A(4096)}\r\nNOOP\r\n`),
    expect: { lines: [A(4096), 'NOOP'], raws: [`${A(4096)}\r\n`, 'NOOP\r\n'], overflow: false, pending: '' },
  },
];

t.test('table: every chunking gives the expected lines', async (t) => {
  for (const c of cases) {
    t.test(c.name, async (t) => {
      const { reference, mismatches, chunkings } = chunkingMismatches(c.input, (chunks) => frameChunks(chunks, c.max ?? 4096));
      t.same(reference, c.expect, 'whole buffer');
      t.same(mismatches, [], `all ${chunkings} chunkings agree with the whole buffer`);
      t.equal(chunkings, c.input.length + 3, 'whole + every split offset + bytewise were tried');
    });
  }
});

t.test('§8.8 the exact segments of the vector', async (t) => {
  const out = frameChunks([bytes('PO'), bytes('RT 198,51,100,7,'), bytes('195,80\r\n')]);
  t.same(out.lines, ['PORT 198,51,100,7,195,80']);
  t.equal(out.overflow, false);
});

t.test('§8.10 NOOP\\r then \\r\\n as two segments', async (t) => {
  const framer = new LineFramer(4096);
  const first = framer.push(bytes('NOOP\r'));
  t.same(first.lines, [], 'nothing before the LF (RFC 959 §5.3: do not act before end-of-line)');
  t.equal(framer.pending.toString('latin1'), 'NOOP\r');
  const second = framer.push(bytes('\r\n'));
  t.same(second.lines.map((l) => l.text.toString('latin1')), ['NOOP']);
  t.equal(framer.pending.length, 0);
});

t.test('§8.18 overflow is reported once and the framer stays stopped', async (t) => {
  const framer = new LineFramer(4096);
  let overflowAt = -1;
  const input = bytes(A(5000));
  for (let i = 0; i < input.length; i += 100) {
    const r = framer.push(input.subarray(i, i + 100));
    if (r.overflow && overflowAt === -1) overflowAt = i + 100;
  }
  t.equal(overflowAt, 4100, 'overflow reported by the chunk that passes 4096 + 1 spare CR byte');
  t.equal(framer.hasOverflowed, true);
  t.equal(framer.pending.length, 0, 'the buffer is released');
  const after = framer.push(bytes('NOOP\r\n'));
  t.same(after, { lines: [], overflow: true }, 'later input produces nothing');
  t.equal(framer.flushPending(), null, 'nothing to flush after overflow');
});

t.test('flushPending takes the unterminated tail (§8.20)', async (t) => {
  const framer = new LineFramer(64);
  t.equal(framer.flushPending(), null, 'nothing pending');
  framer.push(bytes('AB'));
  framer.push(bytes('OR\r'));
  const line = framer.flushPending();
  t.ok(line);
  t.equal(line?.text.toString('latin1'), 'ABOR', 'trailing CR stripped');
  t.equal(line?.raw.toString('latin1'), 'ABOR\r', 'raw kept');
  t.equal(framer.pending.length, 0);
  t.equal(framer.flushPending(), null, 'flushed only once');
  const next = framer.push(bytes('NOOP\r\n'));
  t.same(next.lines.map((l) => l.text.toString('latin1')), ['NOOP'], 'framing continues normally');
});

t.test('flushPending of only CRs gives an empty line', async (t) => {
  const framer = new LineFramer(64);
  framer.push(bytes('\r\r'));
  const line = framer.flushPending();
  t.equal(line?.text.length, 0);
  t.equal(line?.raw.toString('latin1'), '\r\r');
});

t.test('constructor rejects unusable bounds', async (t) => {
  for (const bad of [0, 15, -1, 16.5, Number.NaN, Number.POSITIVE_INFINITY]) {
    t.throws(() => new LineFramer(bad), RangeError, `maxLineBytes ${bad}`);
  }
  t.equal(new LineFramer(16).maxLineBytes, 16);
});

t.test('a line never aliases later input', async (t) => {
  // Lines are relayed later (queued commands); the framer must not hand out views into a
  // pending buffer it reuses.
  const framer = new LineFramer(64);
  framer.push(bytes('RE'));
  const { lines } = framer.push(bytes('TR a\r\nSTOR b'));
  framer.push(bytes('\r\n'));
  t.equal(lines[0]?.raw.toString('latin1'), 'RETR a\r\n');
});
