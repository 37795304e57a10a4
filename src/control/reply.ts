/**
 * Server reply assembly (RFC 959 §4.2): single-line `ddd text` and multi-line
 * `ddd-text ... ddd text` replies become one unit before any rewrite or policy decision, so a
 * 227-looking line inside a 211 reply is never mistaken for a reply (protocol.md §1.2, §8.5).
 * Pure: no I/O.
 */
import type { FramedLine } from './line-framer.js';

export interface Reply {
  /** Three-digit reply code. */
  readonly code: number;
  /** Text of every line (latin1), terminators removed, code prefixes kept. */
  readonly lines: readonly string[];
  /** The reply exactly as received, every terminator included. */
  readonly raw: Buffer;
}

export type ReplyPush =
  | { readonly kind: 'none' }
  | { readonly kind: 'reply'; readonly reply: Reply }
  | { readonly kind: 'error'; readonly reason: 'not-a-reply' | 'too-long' };

const NONE: ReplyPush = { kind: 'none' };

function isDigit(b: number | undefined): boolean {
  return b !== undefined && b >= 0x30 && b <= 0x39;
}

/** Code of a line that starts a reply (`ddd`, `ddd `, `ddd-`), or -1. */
export function replyCodeOf(text: Buffer): number {
  if (!isDigit(text[0]) || !isDigit(text[1]) || !isDigit(text[2])) return -1;
  const fourth = text[3];
  if (fourth !== undefined && fourth !== 0x20 && fourth !== 0x2d) return -1;
  return (text[0]! - 0x30) * 100 + (text[1]! - 0x30) * 10 + (text[2]! - 0x30);
}

/** Groups framed lines into replies; bounded by `maxReplyBytes` per reply. */
export class ReplyAssembler {
  readonly maxReplyBytes: number;
  private openCode = -1;
  private openLines: FramedLine[] = [];
  private openBytes = 0;

  constructor(maxReplyBytes: number) {
    this.maxReplyBytes = maxReplyBytes;
  }

  /** True while a multi-line reply has started and not ended. */
  get inMultiline(): boolean {
    return this.openCode !== -1;
  }

  push(line: FramedLine): ReplyPush {
    if (this.openCode === -1) {
      const code = replyCodeOf(line.text);
      if (code === -1) return { kind: 'error', reason: 'not-a-reply' };
      if (line.text[3] === 0x2d) {
        this.openCode = code;
        this.openLines = [line];
        this.openBytes = line.raw.length;
        return this.openBytes > this.maxReplyBytes ? { kind: 'error', reason: 'too-long' } : NONE;
      }
      if (line.raw.length > this.maxReplyBytes) return { kind: 'error', reason: 'too-long' };
      return { kind: 'reply', reply: { code, lines: [line.text.toString('latin1')], raw: line.raw } };
    }
    this.openLines.push(line);
    this.openBytes += line.raw.length;
    if (this.openBytes > this.maxReplyBytes) return { kind: 'error', reason: 'too-long' };
    // The reply ends at the first line with the same code followed by SP or end of line
    // (RFC 959 §4.2); lines with other digits, or `ddd-`, are inner text.
    if (replyCodeOf(line.text) === this.openCode && line.text[3] !== 0x2d) {
      const lines = this.openLines;
      const reply: Reply = {
        code: this.openCode,
        lines: lines.map((l) => l.text.toString('latin1')),
        raw: Buffer.concat(lines.map((l) => l.raw), this.openBytes),
      };
      this.openCode = -1;
      this.openLines = [];
      this.openBytes = 0;
      return { kind: 'reply', reply };
    }
    return NONE;
  }
}

/** Format a single-line reply the proxy writes itself (0xFF doubled, RFC 1123 §3.2.6 / vsftpd). */
export function formatReply(code: number, text: string): Buffer {
  const body = Buffer.from(`${code} ${text}`, 'latin1');
  return Buffer.concat([escapeIac(body), CRLF]);
}

/** A ready-made reply line ("425 Can't open data connection.") as bytes with CRLF. */
export function replyLine(line: string): Buffer {
  return Buffer.concat([escapeIac(Buffer.from(line, 'latin1')), CRLF]);
}

const CRLF = Buffer.from('\r\n');

function escapeIac(bytes: Buffer): Buffer {
  if (bytes.indexOf(0xff) === -1) return bytes;
  const out: number[] = [];
  for (const b of bytes) {
    out.push(b);
    if (b === 0xff) out.push(0xff);
  }
  return Buffer.from(out);
}

export function isPreliminary(code: number): boolean {
  return code >= 100 && code < 200;
}
