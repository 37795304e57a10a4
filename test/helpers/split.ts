/**
 * Chunkings of a fixture for the resumable-parser rule (style.md "What all of them do" #1):
 * TCP read boundaries carry no meaning (RFC 1123 §4.1.2.10), so every parser fed through
 * LineFramer must give the same result for the whole buffer, for every two-piece split and
 * byte by byte. Also small drivers that run chunks through LineFramer (+ ReplyAssembler).
 */
import { LineFramer } from '../../src/control/line-framer.js';
import { ReplyAssembler } from '../../src/control/reply.js';

export interface Chunking {
  /** Human label for failure messages: "whole", "split@17", "bytewise". */
  readonly label: string;
  readonly chunks: readonly Buffer[];
}

/** Every two-piece split `[buf[0..i), buf[i..)]` for i = 0..length (empty pieces included on purpose). */
export function* splitsOf(buf: Buffer): Generator<Chunking> {
  for (let i = 0; i <= buf.length; i++) {
    yield { label: `split@${i}`, chunks: [buf.subarray(0, i), buf.subarray(i)] };
  }
}

/** One chunk per byte. */
export function bytewise(buf: Buffer): Chunking {
  const chunks: Buffer[] = [];
  for (let i = 0; i < buf.length; i++) chunks.push(buf.subarray(i, i + 1));
  return { label: 'bytewise', chunks };
}

/** The whole buffer, every two-piece split, and byte by byte. */
export function* chunkingsOf(buf: Buffer): Generator<Chunking> {
  yield { label: 'whole', chunks: [buf] };
  yield* splitsOf(buf);
  yield bytewise(buf);
}

/** Latin1 text to bytes: fixtures are written with `\r\n` and `\xff` escapes, byte for byte. */
export function bytes(text: string): Buffer {
  return Buffer.from(text, 'latin1');
}

export interface FramedOutcome {
  /** Line texts (terminator and trailing CRs removed), latin1. */
  readonly lines: string[];
  /** Lines exactly as received, latin1. */
  readonly raws: string[];
  readonly overflow: boolean;
  /** Unterminated tail after the last chunk, latin1. */
  readonly pending: string;
}

/** Feed `chunks` to a fresh LineFramer; once it overflows, it must stay overflowed. */
export function frameChunks(chunks: readonly Buffer[], maxLineBytes = 4096): FramedOutcome {
  const framer = new LineFramer(maxLineBytes);
  const lines: string[] = [];
  const raws: string[] = [];
  let overflow = false;
  for (const chunk of chunks) {
    const result = framer.push(chunk);
    if (overflow && (result.lines.length > 0 || !result.overflow)) {
      throw new Error('LineFramer produced output after it overflowed');
    }
    for (const line of result.lines) {
      lines.push(line.text.toString('latin1'));
      raws.push(line.raw.toString('latin1'));
    }
    overflow ||= result.overflow;
  }
  return { lines, raws, overflow, pending: framer.pending.toString('latin1') };
}

export type ReplyEvent =
  | { readonly kind: 'reply'; readonly code: number; readonly lines: readonly string[]; readonly raw: string }
  | { readonly kind: 'error'; readonly reason: string };

/**
 * Server bytes -> LineFramer -> ReplyAssembler. Stops at the first error, as the session does.
 * `maxLineBytes` / `maxReplyBytes` default to the config defaults (load.ts LIMIT_DEFAULTS).
 */
export function assembleChunks(
  chunks: readonly Buffer[],
  maxReplyBytes = 1024 * 1024,
  maxLineBytes = 4096,
): ReplyEvent[] {
  const framer = new LineFramer(maxLineBytes);
  const assembler = new ReplyAssembler(maxReplyBytes);
  const events: ReplyEvent[] = [];
  for (const chunk of chunks) {
    const framed = framer.push(chunk);
    for (const line of framed.lines) {
      const pushed = assembler.push(line);
      if (pushed.kind === 'reply') {
        events.push({ kind: 'reply', code: pushed.reply.code, lines: [...pushed.reply.lines], raw: pushed.reply.raw.toString('latin1') });
      } else if (pushed.kind === 'error') {
        events.push({ kind: 'error', reason: pushed.reason });
        return events;
      }
    }
    if (framed.overflow) {
      events.push({ kind: 'error', reason: 'line-overflow' });
      return events;
    }
  }
  return events;
}

/**
 * Run `run` over every chunking of `input` and return the labels (with results) that differ
 * from the whole-buffer result. An empty list means the parser is chunking-independent.
 */
export function chunkingMismatches<T>(
  input: Buffer,
  run: (chunks: readonly Buffer[]) => T,
  same: (a: T, b: T) => boolean = (a, b) => JSON.stringify(a) === JSON.stringify(b),
): { reference: T; mismatches: { label: string; got: T }[]; chunkings: number } {
  let reference: T | undefined;
  let haveReference = false;
  const mismatches: { label: string; got: T }[] = [];
  let chunkings = 0;
  for (const chunking of chunkingsOf(input)) {
    chunkings++;
    const got = run(chunking.chunks);
    if (!haveReference) {
      reference = got;
      haveReference = true;
      continue;
    }
    if (!same(reference as T, got) && mismatches.length < 5) mismatches.push({ label: chunking.label, got });
  }
  return { reference: reference as T, mismatches, chunkings };
}
