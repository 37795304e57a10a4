/**
 * Property-based fuzzing of everything that reads bytes from the network: the line framer,
 * command and reply parsers and the address codecs. Random bytes and random splits must never
 * throw, never grow a buffer past its bound, and parse -> format -> parse must be stable for
 * every valid value. `npm test` runs a quick pass; `npm run fuzz` sets FTPP_FUZZ_RUNS high.
 */
import { initialProtection } from '../../src/control/security.js';
import t from 'tap';
import fc from 'fast-check';
import { LineFramer } from '../../src/control/line-framer.js';
import { parseCommandLine, stripTelnet, isUnterminatedAbort } from '../../src/control/command.js';
import { ReplyAssembler } from '../../src/control/reply.js';
import {
  formatEprtArgument,
  formatEpsvReply,
  formatPasvReply,
  formatPortArgument,
  parseEprtArgument,
  parseEpsvArgument,
  parseEpsvReply,
  parsePasvReply,
  parsePortArgument,
} from '../../src/control/address.js';
import { decideCommand, editFeatReply } from '../../src/control/rewrite.js';
import { sameIp } from '../../src/control/ip.js';

const RUNS = Number(process.env.FTPP_FUZZ_RUNS ?? 300);
const params = { numRuns: RUNS, ...(process.env.FTPP_FUZZ_SEED ? { seed: Number(process.env.FTPP_FUZZ_SEED) } : {}) };

/** Bytes biased toward what matters: CR, LF, IAC, digits, commas, pipes. */
const interestingByte = fc.oneof(
  fc.integer({ min: 0, max: 255 }),
  fc.constantFrom(0x0d, 0x0a, 0xff, 0xf4, 0xf2, 0x2c, 0x7c, 0x20, 0x28, 0x29, 0x30, 0x32, 0x35),
);
const bytes = (max: number) => fc.array(interestingByte, { maxLength: max }).map((a) => Buffer.from(a));
const splits = (input: Buffer) => fc.array(fc.integer({ min: 0, max: Math.max(0, input.length) }), { maxLength: 8 });

function chunksOf(input: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts)].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let last = 0;
  for (const p of points) {
    out.push(input.subarray(last, p));
    last = p;
  }
  out.push(input.subarray(last));
  return out;
}

t.test('line framer: any bytes, any split: bounded, lossless, split-invariant', async (t) => {
  fc.assert(
    fc.property(bytes(600).chain((input) => fc.tuple(fc.constant(input), splits(input))), fc.integer({ min: 16, max: 128 }), ([input, cuts], max) => {
      const framer = new LineFramer(max);
      const lines: Buffer[] = [];
      let overflow = false;
      for (const chunk of chunksOf(input, cuts)) {
        const r = framer.push(chunk);
        lines.push(...r.lines.map((l) => l.raw));
        overflow ||= r.overflow;
        if (framer.pending.length > max + 1) return false;
      }
      if (!overflow) {
        // Nothing lost: complete lines + pending tail == input; same as one-chunk framing.
        if (!Buffer.concat([...lines, framer.pending]).equals(input)) return false;
        const whole = new LineFramer(max).push(input);
        if (whole.overflow || whole.lines.length !== lines.length) return false;
      }
      return lines.every((l) => l.indexOf(0x0a) === l.length - 1);
    }),
    params,
  );
  t.pass(`${RUNS} runs`);
});

t.test('command parser and Telnet cleanup never throw; verbs are clean', async (t) => {
  fc.assert(
    fc.property(bytes(300), (input) => {
      const cleaned = stripTelnet(input);
      if (cleaned.length > input.length) return false;
      isUnterminatedAbort(input);
      const parsed = parseCommandLine(input);
      if (!parsed.ok) return true;
      const view = {
        controlFamily: 4 as const,
        clientIp: '198.51.100.7',
        epsvAll: false,
        allowNatFixup: true,
        loggedIn: false,
        ownAddresses: ['203.0.113.10', '10.0.0.2'],
        ownNames: ['ftp.proxy.example'],
        protection: initialProtection(null),
      };
      const decision = decideCommand(parsed.command, view);
      decideCommand(parsed.command, { ...view, controlFamily: 6, clientIp: '2001:db8::7', epsvAll: true });
      if (decision.kind === 'active' && decision.target.port < 1024) return false;
      if (decision.kind === 'active' && decision.target.host !== '198.51.100.7') return false;
      // Over IPv6 too (EPRT |2|::| now means the peer): an active target is only ever the peer.
      const decision6 = decideCommand(parsed.command, { ...view, controlFamily: 6, clientIp: '2001:db8::7' });
      if (decision6.kind === 'active' && (decision6.target.port < 1024 || decision6.target.host !== '2001:db8::7')) return false;
      return /^[A-Z]{1,8}$/.test(parsed.command.verb);
    }),
    params,
  );
  t.pass(`${RUNS} runs`);
});

t.test('HOST with any argument never throws; only the proxy\'s own address or name is answered here', async (t) => {
  const own = ['127.0.0.1', '::1'];
  const view = {
    controlFamily: 4 as const,
    clientIp: '127.0.0.1',
    epsvAll: false,
    allowNatFixup: true,
    loggedIn: false,
    ownAddresses: own,
    ownNames: ['ftp.proxy.example'],
        protection: initialProtection(null),
  };
  const hostChars = fc.constantFrom(...'0123456789abcdefABCDEF:.[]%-xyz '.split(''));
  const argument = fc.oneof(
    fc.string({ maxLength: 60 }),
    fc.array(hostChars, { maxLength: 45 }).map((chars) => chars.join('')),
    fc.constantFrom('127.0.0.1', '[::1]', '::ffff:127.0.0.1', '[fe80::1%eth0]', 'FTP.PROXY.EXAMPLE.'),
  );
  fc.assert(
    fc.property(argument, (arg) => {
      const parsed = parseCommandLine(Buffer.from(`HOST ${arg}`, 'latin1'));
      if (!parsed.ok) return true;
      const decision = decideCommand(parsed.command, view);
      if (decision.kind === 'forward') return true;
      if (decision.kind !== 'host-answered') return false;
      const host = parsed.command.argument.trim().replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '').toLowerCase();
      return host === 'ftp.proxy.example' || own.some((ip) => sameIp(ip, host));
    }),
    params,
  );
  t.pass(`${RUNS} runs`);
});

t.test('reply assembler: random lines never throw, replies bounded', async (t) => {
  const line = fc.oneof(
    bytes(40),
    fc.tuple(fc.constantFrom('211', '227', '229', '150', '226', '421', '999'), fc.constantFrom(' ', '-', ''), fc.string({ maxLength: 30 })).map(([c, s, r]) => Buffer.from(`${c}${s}${r}`)),
  );
  fc.assert(
    fc.property(fc.array(line, { maxLength: 40 }), (lines) => {
      const assembler = new ReplyAssembler(512);
      for (const text of lines) {
        const r = assembler.push({ text, raw: Buffer.concat([text, Buffer.from('\r\n')]) });
        if (r.kind === 'error') return true;
        if (r.kind === 'reply') {
          if (r.reply.raw.length > 512) return false;
          if (r.reply.code < 0 || r.reply.code > 999) return false;
          editFeatReply(r.reply);
          parsePasvReply(r.reply.lines);
          parseEpsvReply(r.reply.lines);
        }
      }
      return true;
    }),
    params,
  );
  t.pass(`${RUNS} runs`);
});

t.test('address parsers never throw on random text; accepted values are in range', async (t) => {
  const text = fc.oneof(fc.string({ maxLength: 60 }), fc.array(fc.constantFrom(...'0123456789,| .:abcdef-'.split('')), { maxLength: 40 }).map((a) => a.join('')));
  fc.assert(
    fc.property(text, (s) => {
      const port = parsePortArgument(s);
      if (port.ok && (port.value.port < 1 || port.value.port > 65535)) return false;
      const eprt = parseEprtArgument(s);
      if (eprt.ok && (eprt.value.port < 1 || eprt.value.port > 65535)) return false;
      parseEpsvArgument(s);
      const pasv = parsePasvReply([`227 ${s}`]);
      if (pasv.ok && pasv.value.host.split('.').some((o) => Number(o) > 255)) return false;
      const epsv = parseEpsvReply([`229 ${s}`]);
      return !epsv.ok || (epsv.port >= 1 && epsv.port <= 65535);
    }),
    params,
  );
  t.pass(`${RUNS} runs`);
});

t.test('parse -> format -> parse is stable for every valid address', async (t) => {
  const ipv4 = fc.ipV4();
  const port = fc.integer({ min: 1, max: 65535 });
  fc.assert(
    fc.property(ipv4, port, (host, p) => {
      const a = parsePortArgument(formatPortArgument(host, p));
      const b = parsePasvReply([formatPasvReply(host, p)]);
      const c = parseEprtArgument(formatEprtArgument(host, p));
      const d = parseEpsvReply([formatEpsvReply(p)]);
      return a.ok && a.value.host === host && a.value.port === p
        && b.ok && b.value.host === host && b.value.port === p
        && c.ok && c.value.host === host && c.value.port === p
        && d.ok && d.port === p
        && formatPortArgument(a.value.host, a.value.port) === formatPortArgument(host, p);
    }),
    params,
  );
  fc.assert(
    fc.property(fc.ipV6(), port, (host, p) => {
      const parsed = parseEprtArgument(formatEprtArgument(host, p));
      if (!parsed.ok) return false;
      return formatEprtArgument(parsed.value.host, parsed.value.port) === formatEprtArgument(host, p);
    }),
    params,
  );
  t.pass(`${RUNS} runs`);
});
