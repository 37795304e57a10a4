/**
 * Resumable byte-to-line framer for one direction of an FTP control connection.
 *
 * TCP read boundaries carry no meaning (RFC 1123 §4.1.2.10): a chunk may hold half a line
 * or several. Lines end at LF; any CRs before the LF are stripped from `text` (vsftpd
 * ftpcmdio.c does the same, so `syst\n` and `NOOP\r\r\n` are accepted). The partial tail is
 * bounded by `maxLineBytes`; going over it is reported once and the framer stops.
 * Pure: no sockets, no timers.
 */
export interface FramedLine {
  /** Line content without the terminator and without trailing CRs. */
  readonly text: Buffer;
  /** Line exactly as received, terminator included (replies are relayed byte for byte). */
  readonly raw: Buffer;
}

export interface FrameResult {
  readonly lines: FramedLine[];
  /** True once a line exceeded the bound; no further lines are produced after it. */
  readonly overflow: boolean;
}

const LF = 0x0a;
const CR = 0x0d;

export class LineFramer {
  readonly maxLineBytes: number;
  private pendingChunks: Buffer[] = [];
  private pendingBytes = 0;
  private overflowed = false;

  constructor(maxLineBytes: number) {
    if (!Number.isInteger(maxLineBytes) || maxLineBytes < 16) {
      throw new RangeError(`maxLineBytes must be an integer >= 16, got ${maxLineBytes}`);
    }
    this.maxLineBytes = maxLineBytes;
  }

  /** Bytes received after the last LF. */
  get pending(): Buffer {
    if (this.pendingChunks.length > 1) {
      this.pendingChunks = [Buffer.concat(this.pendingChunks, this.pendingBytes)];
    }
    return this.pendingChunks[0] ?? Buffer.alloc(0);
  }

  get hasOverflowed(): boolean {
    return this.overflowed;
  }

  /** Feed one chunk; returns every line it completed. */
  push(chunk: Buffer): FrameResult {
    if (this.overflowed) return { lines: [], overflow: true };
    const lines: FramedLine[] = [];
    let start = 0;
    while (start < chunk.length) {
      const lf = chunk.indexOf(LF, start);
      if (lf === -1) {
        const rest = chunk.subarray(start);
        this.pendingChunks.push(rest);
        this.pendingBytes += rest.length;
        // One spare byte for the CR of a CRLF whose LF has not arrived yet.
        if (this.pendingBytes > this.maxLineBytes + 1) return this.overflow(lines);
        break;
      }
      const piece = chunk.subarray(start, lf + 1);
      let raw: Buffer;
      if (this.pendingBytes > 0) {
        this.pendingChunks.push(piece);
        raw = Buffer.concat(this.pendingChunks, this.pendingBytes + piece.length);
        this.pendingChunks = [];
        this.pendingBytes = 0;
      } else {
        raw = piece;
      }
      let end = raw.length - 1;
      while (end > 0 && raw[end - 1] === CR) end--;
      // Same bound as for a pending tail (text + one spare CR, the LF excluded), so the result
      // does not depend on where TCP cut the line (RFC 1123 §4.1.2.10): `A*max + "\r\r\n"` used
      // to pass in one chunk but overflow when the LF came in a later chunk.
      if (end > this.maxLineBytes || raw.length - 1 > this.maxLineBytes + 1) return this.overflow(lines);
      lines.push({ text: raw.subarray(0, end), raw });
      start = lf + 1;
    }
    return { lines, overflow: false };
  }

  /**
   * Take the unterminated tail as a line of its own. Used for CPython's urgent ABOR, whose
   * LF is lost as TCP urgent data (protocol.md §1.4 rule 2), after a short idle wait.
   */
  flushPending(): FramedLine | null {
    if (this.pendingBytes === 0 || this.overflowed) return null;
    const raw = this.pending;
    this.pendingChunks = [];
    this.pendingBytes = 0;
    let end = raw.length;
    while (end > 0 && raw[end - 1] === CR) end--;
    return { text: raw.subarray(0, end), raw };
  }

  private overflow(lines: FramedLine[]): FrameResult {
    this.overflowed = true;
    this.pendingChunks = [];
    this.pendingBytes = 0;
    return { lines, overflow: true };
  }
}
