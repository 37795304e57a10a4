/**
 * PROXY protocol header decoder and encoders, v1 (text) and v2 (binary), after haproxy
 * doc/proxy-protocol.txt (protocol.md §7).
 *
 * An L4 load balancer prepends exactly one header to the TCP stream; the decoder consumes
 * exactly that header and hands every byte after it back untouched as `rest`, even when it is
 * another `PROXY ...` line: the AWS NLB prepends its own header without removing one a client
 * may have sent (protocol.md §7), so a second header is FTP data from an untrusted peer.
 *
 * Resumable: any chunking of the input gives the same result (style.md #1), and the verdict is
 * reached at the earliest byte that decides it, so a peer that is not a PROXY sender is dropped
 * at once ("abort the connection as soon as possible", proxy-protocol.txt §2.1). Bounded: at
 * most 107 bytes are held for v1 and 16 + {@link PROXY_V2_MAX_LENGTH} for v2 (style.md #2).
 * Strict: anything that does not exactly match the protocol is an error, never repaired
 * (style.md #3; "any sequence which does not exactly match the protocol must be discarded").
 *
 * Pure: no sockets, no timers. Timing out a header that never completes is the caller's job
 * (protocol.md §7: "apply a short timeout (≥ 3 s)").
 */
import ipaddr from 'ipaddr.js';

/** Which header versions a listener accepts; chosen by configuration only, never guessed (§5 of the spec). */
export type ProxyProtocolVersion = 'v1' | 'v2' | 'any';

/** One transport endpoint from a header. `host` is canonical text; v4-mapped IPv6 becomes dotted IPv4. */
export interface ProxyEndpoint {
  readonly host: string;
  readonly port: number;
}

/**
 * A decoded header.
 *
 * - `proxy`: the connection was relayed; `source` is the real client. `family` is the family the
 *   header declared (TCP4 / 0x11 → 4, TCP6 / 0x21 → 6). Hosts are normalized like
 *   `normalizeIp` in ip.ts, so a TCP6 header carrying `::ffff:198.51.100.7` reports family 6 with
 *   host `198.51.100.7`; derive a per-address family from the host text where it matters.
 * - `local`: v2 LOCAL, v2 PROXY with family UNSPEC, or v1 `PROXY UNKNOWN`. The connection carries
 *   no client information (LB health checks): use the socket's own endpoints.
 */
export type ProxyHeader =
  | {
      readonly command: 'proxy';
      readonly version: 1 | 2;
      readonly family: 4 | 6;
      readonly source: ProxyEndpoint;
      readonly destination: ProxyEndpoint;
    }
  | { readonly command: 'local'; readonly version: 1 | 2 };

/**
 * Stable reasons for a rejected header. Every one means "abort the connection" (proxy-protocol.txt
 * §2.1, §2.2); they only differ in what gets logged.
 */
export type ProxyHeaderErrorReason =
  /** The first bytes match neither `PROXY ` nor the v2 signature. */
  | 'bad-signature'
  /** The bytes can only be a header of a version this listener does not accept. */
  | 'wrong-version'
  /** v1: no CRLF within the first 107 bytes. */
  | 'v1-too-long'
  /** v1: a CR not followed by LF, or an LF not preceded by CR. */
  | 'v1-no-crlf'
  /** v1: anything else (protocol, spacing, address, port, family mismatch, non-printable byte). */
  | 'v1-syntax'
  /** v2: version nibble other than 2. */
  | 'v2-version'
  /** v2: command other than 0 LOCAL / 1 PROXY. */
  | 'v2-command'
  /** v2: undefined family/transport byte, or one this TCP proxy cannot use (UDP, UNIX) with PROXY. */
  | 'v2-family'
  /** v2: length above {@link PROXY_V2_MAX_LENGTH}, or too short for the address block. */
  | 'v2-length'
  /** v2: the TLVs after the address block do not add up to the header length. */
  | 'v2-tlv';

export type ProxyHeaderPush =
  | { readonly kind: 'need-more' }
  /** `rest`: the bytes of the last chunk after the header (FTP data), possibly empty; a view into that chunk. */
  | { readonly kind: 'header'; readonly header: ProxyHeader; readonly rest: Buffer }
  | { readonly kind: 'error'; readonly reason: ProxyHeaderErrorReason };

/** Longest v1 header including CRLF: `PROXY UNKNOWN` + two full IPv6 + two ports (proxy-protocol.txt §2.1). */
export const PROXY_V1_MAX_BYTES = 107;
/**
 * Largest v2 `len` accepted. The wire allows 65535; real senders need 12 or 36 bytes plus a few
 * TLVs (AWS NLB: the 0xEA VPC endpoint id), so a smaller bound keeps the buffer small.
 */
export const PROXY_V2_MAX_LENGTH = 4096;

/** `PROXY ` (proxy-protocol.txt §2.1: the five letters and a single space). */
const V1_PREFIX = Buffer.from('PROXY ', 'latin1');
/** `\r\n\r\n\0\r\nQUIT\n` (proxy-protocol.txt §2.2). */
const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
/** Signature, version/command, family/transport, 16-bit length. */
const V2_FIXED_BYTES = 16;
const V2_ADDRESS_BYTES_INET = 12;
const V2_ADDRESS_BYTES_INET6 = 36;
/** Family/transport bytes the spec defines (proxy-protocol.txt §2.2 "In practice..."). */
const V2_DEFINED_FAMILIES: ReadonlySet<number> = new Set([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]);

const CR = 0x0d;
const LF = 0x0a;

type State =
  | { readonly kind: 'detect'; maybeV1: boolean; maybeV2: boolean }
  | { readonly kind: 'v1' }
  | { readonly kind: 'v2-fixed' }
  | { readonly kind: 'v2-body'; readonly header: Buffer; filled: number }
  | { readonly kind: 'done' }
  | { readonly kind: 'failed'; readonly result: ProxyHeaderPush };

const NEED_MORE: ProxyHeaderPush = { kind: 'need-more' };

/**
 * Decodes exactly one PROXY protocol header from a connection's first bytes.
 *
 * Feed every chunk to {@link push} until it returns `header` or `error`:
 * - `need-more`: every byte so far is a valid header prefix; keep reading (under a timeout).
 * - `header`: done; `rest` is the first FTP data. Do not push again (it throws): later chunks
 *   are FTP data and belong to the session.
 * - `error`: abort the connection. Further pushes return the same error.
 */
export class ProxyHeaderDecoder {
  readonly accept: ProxyProtocolVersion;
  private state: State = { kind: 'detect', maybeV1: true, maybeV2: true };
  /** Signature, the v1 line, or the v2 fixed part; never more than 107 bytes. */
  private readonly head = Buffer.alloc(PROXY_V1_MAX_BYTES);
  private headLength = 0;

  constructor(accept: ProxyProtocolVersion) {
    if (accept !== 'v1' && accept !== 'v2' && accept !== 'any') {
      throw new RangeError(`accept must be 'v1', 'v2' or 'any', got ${String(accept)}`);
    }
    this.accept = accept;
  }

  /** Feed the next chunk of the connection. */
  push(chunk: Buffer): ProxyHeaderPush {
    let offset = 0;
    while (true) {
      const state = this.state;
      switch (state.kind) {
        case 'failed':
          return state.result;
        case 'done':
          throw new Error('ProxyHeaderDecoder: the header is already decoded; later bytes are FTP data');
        case 'detect': {
          if (offset >= chunk.length) return NEED_MORE;
          const result = this.detect(state, chunk[offset]!);
          offset++;
          if (result !== undefined) return result;
          break;
        }
        case 'v1': {
          if (offset >= chunk.length) return NEED_MORE;
          const result = this.v1Byte(chunk[offset]!);
          offset++;
          if (result !== undefined) return result.kind === 'header' ? { ...result, rest: chunk.subarray(offset) } : result;
          break;
        }
        case 'v2-fixed': {
          if (offset >= chunk.length) return NEED_MORE;
          const result = this.v2FixedByte(chunk[offset]!);
          offset++;
          if (result !== undefined) return result.kind === 'header' ? { ...result, rest: chunk.subarray(offset) } : result;
          break;
        }
        case 'v2-body': {
          // The spec forbids parsing any address before the whole block is in (§2.2), so copy
          // until 16 + len bytes are held, then decode once.
          const take = Math.min(state.header.length - state.filled, chunk.length - offset);
          chunk.copy(state.header, state.filled, offset, offset + take);
          state.filled += take;
          offset += take;
          if (state.filled < state.header.length) return NEED_MORE;
          const result = this.finishV2(state.header);
          return result.kind === 'header' ? { ...result, rest: chunk.subarray(offset) } : result;
        }
      }
    }
  }

  /** One signature byte; returns a verdict once the version is known to be impossible or unacceptable. */
  private detect(state: Extract<State, { kind: 'detect' }>, byte: number): ProxyHeaderPush | undefined {
    const index = this.headLength;
    this.head[this.headLength++] = byte;
    state.maybeV1 &&= index < V1_PREFIX.length && V1_PREFIX[index] === byte;
    state.maybeV2 &&= index < V2_SIGNATURE.length && V2_SIGNATURE[index] === byte;
    if (!state.maybeV1 && !state.maybeV2) return this.fail('bad-signature');
    // 'P' and CR differ at the first byte, so from here on only one version is possible; if the
    // listener does not take it the header can no longer be acceptable: reject now.
    if ((state.maybeV1 && this.accept === 'v2') || (state.maybeV2 && this.accept === 'v1')) {
      return this.fail('wrong-version');
    }
    if (state.maybeV1 && this.headLength === V1_PREFIX.length) this.state = { kind: 'v1' };
    else if (state.maybeV2 && this.headLength === V2_SIGNATURE.length) this.state = { kind: 'v2-fixed' };
    return undefined;
  }

  /**
   * One byte of the v1 line after `PROXY `. The line must end with CRLF within 107 bytes and a
   * lone CR or LF is invalid (proxy-protocol.txt §2.1), so each of those is decided on the byte
   * that breaks it: a printable byte at position 106 leaves no room for CRLF.
   */
  private v1Byte(byte: number): ProxyHeaderPush | undefined {
    const previous = this.head[this.headLength - 1];
    this.head[this.headLength++] = byte;
    if (byte === LF) {
      if (previous !== CR) return this.fail('v1-no-crlf');
      this.state = { kind: 'done' };
      const line = this.head.toString('latin1', 0, this.headLength - 2);
      const parsed = parseV1Line(line);
      if (typeof parsed === 'string') return this.fail(parsed);
      return { kind: 'header', header: parsed, rest: EMPTY };
    }
    if (previous === CR) return this.fail('v1-no-crlf');
    if (byte === CR) return undefined;
    // The line is US-ASCII text; control bytes and 8-bit bytes cannot be part of it.
    if (byte < 0x20 || byte > 0x7e) return this.fail('v1-syntax');
    if (this.headLength >= PROXY_V1_MAX_BYTES - 1) return this.fail('v1-too-long');
    return undefined;
  }

  /** Bytes 13-16 of a v2 header: each is checked as soon as it arrives. */
  private v2FixedByte(byte: number): ProxyHeaderPush | undefined {
    const index = this.headLength;
    this.head[this.headLength++] = byte;
    if (index === 12) {
      // High nibble: version, "must always be sent as \x2 and the receiver must only accept this
      // value"; low nibble: 0 LOCAL, 1 PROXY, "receivers must drop connections presenting
      // unexpected values" (proxy-protocol.txt §2.2).
      if (byte >> 4 !== 2) return this.fail('v2-version');
      if ((byte & 0x0f) > 1) return this.fail('v2-command');
      return undefined;
    }
    if (index === 13) {
      if (!V2_DEFINED_FAMILIES.has(byte)) return this.fail('v2-family');
      // LOCAL "discard[s] the protocol block including the family", so any defined family goes.
      // With PROXY only TCP makes sense for an FTP control or data connection; UNSPEC is
      // accepted and its addresses ignored ("The receiver should ignore address information").
      if (this.isProxyCommand() && byte !== 0x00 && byte !== 0x11 && byte !== 0x21) return this.fail('v2-family');
      return undefined;
    }
    if (index < V2_FIXED_BYTES - 1) return undefined;
    const length = this.head.readUInt16BE(14);
    if (length > PROXY_V2_MAX_LENGTH) return this.fail('v2-length');
    const family = this.head[13];
    if (this.isProxyCommand()) {
      if (family === 0x11 && length < V2_ADDRESS_BYTES_INET) return this.fail('v2-length');
      if (family === 0x21 && length < V2_ADDRESS_BYTES_INET6) return this.fail('v2-length');
    }
    const header = Buffer.alloc(V2_FIXED_BYTES + length);
    this.head.copy(header, 0, 0, V2_FIXED_BYTES);
    if (length === 0) return this.finishV2(header);
    this.state = { kind: 'v2-body', header, filled: V2_FIXED_BYTES };
    return undefined;
  }

  private isProxyCommand(): boolean {
    return (this.head[12]! & 0x0f) === 1;
  }

  /** Decode a complete v2 header (fixed part already validated). */
  private finishV2(header: Buffer): ProxyHeaderPush {
    this.state = { kind: 'done' };
    const family = header[13]!;
    // LOCAL (health checks) or UNSPEC: "must use the real connection endpoints"; `len` still
    // tells how many bytes to skip ("must not assume zero is presented for LOCAL connections").
    if (!this.isProxyCommand() || family === 0x00) return { kind: 'header', header: LOCAL_V2, rest: EMPTY };
    const body = header.subarray(V2_FIXED_BYTES);
    let header4or6: ProxyHeader;
    let addressBytes: number;
    if (family === 0x11) {
      addressBytes = V2_ADDRESS_BYTES_INET;
      header4or6 = {
        command: 'proxy',
        version: 2,
        family: 4,
        source: { host: formatIpv4(body.subarray(0, 4)), port: body.readUInt16BE(8) },
        destination: { host: formatIpv4(body.subarray(4, 8)), port: body.readUInt16BE(10) },
      };
    } else {
      addressBytes = V2_ADDRESS_BYTES_INET6;
      header4or6 = {
        command: 'proxy',
        version: 2,
        family: 6,
        source: { host: formatIpv6(body.subarray(0, 16)), port: body.readUInt16BE(32) },
        destination: { host: formatIpv6(body.subarray(16, 32)), port: body.readUInt16BE(34) },
      };
    }
    if (!tlvsFit(body.subarray(addressBytes))) return this.fail('v2-tlv');
    return { kind: 'header', header: header4or6, rest: EMPTY };
  }

  private fail(reason: ProxyHeaderErrorReason): ProxyHeaderPush {
    const result: ProxyHeaderPush = { kind: 'error', reason };
    this.state = { kind: 'failed', result };
    return result;
  }
}

const EMPTY = Buffer.alloc(0);
const LOCAL_V1: ProxyHeader = Object.freeze({ command: 'local', version: 1 });
const LOCAL_V2: ProxyHeader = Object.freeze({ command: 'local', version: 2 });

/**
 * TLVs after the address block (type 1 byte, length 2 bytes BE, value) must tile the rest of the
 * header exactly. Their content is not interpreted: "a receiver may choose to skip over and ignore
 * the TLVs" (proxy-protocol.txt §2.2), which also covers CRC32C (verified only "if the checksum
 * functionality is supported by the receiver").
 */
function tlvsFit(tlvs: Buffer): boolean {
  let offset = 0;
  while (offset < tlvs.length) {
    if (tlvs.length - offset < 3) return false;
    offset += 3 + tlvs.readUInt16BE(offset + 1);
  }
  return offset === tlvs.length;
}

/** Dotted decimal, 0..255, no leading zeros: an octal-looking `010` is rejected, not guessed. */
const IPV4_TEXT = /^(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
/** 0..65535 in decimal without leading zeros (proxy-protocol.txt §2.1). */
const PORT_TEXT = /^(?:0|[1-9]\d{0,4})$/;
const HEX_GROUP = /^[0-9A-Fa-f]{1,4}$/;

/**
 * `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>` or `PROXY UNKNOWN[ <anything>]`, CRLF removed,
 * already known to be printable ASCII. Fields are separated by exactly one space.
 */
function parseV1Line(line: string): ProxyHeader | ProxyHeaderErrorReason {
  const fields = line.split(' ');
  // "PROXY UNKNOWN": the rest of the line up to CRLF is ignored (proxy-protocol.txt §2.1).
  if (fields[1] === 'UNKNOWN') return LOCAL_V1;
  if (fields.length !== 6) return 'v1-syntax';
  const [, protocol, sourceText, destinationText, sourcePortText, destinationPortText] = fields as [
    string,
    string,
    string,
    string,
    string,
    string,
  ];
  let family: 4 | 6;
  let source: string | undefined;
  let destination: string | undefined;
  if (protocol === 'TCP4') {
    family = 4;
    source = IPV4_TEXT.test(sourceText) ? sourceText : undefined;
    destination = IPV4_TEXT.test(destinationText) ? destinationText : undefined;
  } else if (protocol === 'TCP6') {
    family = 6;
    const sourceBytes = parseIpv6Text(sourceText);
    const destinationBytes = parseIpv6Text(destinationText);
    source = sourceBytes && formatIpv6(sourceBytes);
    destination = destinationBytes && formatIpv6(destinationBytes);
  } else {
    return 'v1-syntax';
  }
  if (source === undefined || destination === undefined) return 'v1-syntax';
  const sourcePort = parsePortText(sourcePortText);
  const destinationPort = parsePortText(destinationPortText);
  if (sourcePort === undefined || destinationPort === undefined) return 'v1-syntax';
  return {
    command: 'proxy',
    version: 1,
    family,
    source: { host: source, port: sourcePort },
    destination: { host: destination, port: destinationPort },
  };
}

function parsePortText(text: string): number | undefined {
  if (!PORT_TEXT.test(text)) return undefined;
  const port = Number(text);
  return port <= 0xffff ? port : undefined;
}

/**
 * RFC 4291 §2.2 text form to 16 bytes, strictly: hex groups of 1-4 digits, at most one `::`,
 * an optional dotted-quad tail (no leading zeros), no zone id. Written out rather than left to
 * ipaddr.js, whose parser reads `::1.2.3.4` as `::ffff:1.2.3.4` and takes `::01.2.3.4` and
 * `::ffff:0x1.2.3.4`, which would turn a malformed header into a different client address.
 */
function parseIpv6Text(text: string): Uint8Array | undefined {
  if (text.length === 0 || text.length > 45) return undefined;
  const halves = text.split('::');
  if (halves.length > 2) return undefined;
  const groups: number[][] = [];
  for (let h = 0; h < halves.length; h++) {
    const half = halves[h]!;
    const words: number[] = [];
    if (half !== '') {
      const parts = half.split(':');
      for (let i = 0; i < parts.length; i++) {
        const part = parts[i]!;
        if (HEX_GROUP.test(part)) {
          words.push(Number.parseInt(part, 16));
        } else if (i === parts.length - 1 && h === halves.length - 1 && IPV4_TEXT.test(part)) {
          // A dotted quad may only be the last 32 bits (RFC 4291 §2.2 item 3).
          const octets = part.split('.').map(Number) as [number, number, number, number];
          words.push((octets[0] << 8) | octets[1], (octets[2] << 8) | octets[3]);
        } else {
          return undefined;
        }
      }
    }
    groups.push(words);
  }
  const head = groups[0]!;
  const tail = groups[1];
  let words: number[];
  if (tail === undefined) {
    if (head.length !== 8) return undefined;
    words = head;
  } else {
    // `::` stands for one or more zero groups (RFC 4291 §2.2 item 2).
    if (head.length + tail.length > 7) return undefined;
    words = [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
  }
  const bytes = new Uint8Array(16);
  words.forEach((word, i) => {
    bytes[2 * i] = word >> 8;
    bytes[2 * i + 1] = word & 0xff;
  });
  return bytes;
}

function formatIpv4(bytes: Uint8Array): string {
  return `${bytes[0]}.${bytes[1]}.${bytes[2]}.${bytes[3]}`;
}

/** Canonical text (RFC 5952 via ipaddr.js); v4-mapped becomes dotted IPv4, as normalizeIp in ip.ts does. */
function formatIpv6(bytes: Uint8Array): string {
  const address = ipaddr.fromByteArray(Array.from(bytes)) as ipaddr.IPv6;
  return address.isIPv4MappedAddress() ? address.toIPv4Address().toString() : address.toString();
}

// ---------------------------------------------------------------------------------------------
// Encoders: for tests, and for a future client side (`send-proxy` towards a backend).

/** What an encoder needs; a decoded {@link ProxyHeader} fits as is. */
export type ProxyHeaderInit =
  | {
      readonly command: 'proxy';
      readonly family: 4 | 6;
      readonly source: ProxyEndpoint;
      readonly destination: ProxyEndpoint;
    }
  | { readonly command: 'local' };

/** A v2 TLV (proxy-protocol.txt §2.2): e.g. `{ type: 0xea, value }` for the AWS VPC endpoint id. */
export interface ProxyTlv {
  readonly type: number;
  readonly value: Uint8Array;
}

/**
 * Host text as bytes of the requested family. An IPv4 host under family 6 becomes v4-mapped and
 * a v4-mapped host under family 4 becomes IPv4, so a decoded header re-encodes to its own kind.
 */
function hostBytes(host: string, family: 4 | 6): Uint8Array {
  if (IPV4_TEXT.test(host)) {
    const octets = Uint8Array.from(host.split('.').map(Number));
    if (family === 4) return octets;
    const mapped = new Uint8Array(16);
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped.set(octets, 12);
    return mapped;
  }
  const bytes = parseIpv6Text(host);
  if (bytes === undefined) throw new RangeError(`not an IP address: ${JSON.stringify(host)}`);
  if (family === 6) return bytes;
  const address = ipaddr.fromByteArray(Array.from(bytes)) as ipaddr.IPv6;
  if (!address.isIPv4MappedAddress()) throw new RangeError(`not an IPv4 address: ${host}`);
  return bytes.subarray(12);
}

function checkPort(port: number): number {
  if (!Number.isInteger(port) || port < 0 || port > 0xffff) throw new RangeError(`port out of range: ${port}`);
  return port;
}

/** `PROXY TCP4|TCP6 src dst sport dport\r\n`, or `PROXY UNKNOWN\r\n` for LOCAL. Throws RangeError on bad input. */
export function encodeProxyHeaderV1(h: ProxyHeaderInit): Buffer {
  if (h.command === 'local') return Buffer.from('PROXY UNKNOWN\r\n', 'latin1');
  const text = (bytes: Uint8Array): string => (h.family === 4 ? formatIpv4(bytes) : ipv6Text(bytes));
  const source = text(hostBytes(h.source.host, h.family));
  const destination = text(hostBytes(h.destination.host, h.family));
  const line = `PROXY TCP${h.family} ${source} ${destination} ${checkPort(h.source.port)} ${checkPort(h.destination.port)}\r\n`;
  return Buffer.from(line, 'latin1');
}

/** RFC 5952 text without the v4-mapped shortcut of {@link formatIpv6}: TCP6 needs IPv6 text. */
function ipv6Text(bytes: Uint8Array): string {
  return (ipaddr.fromByteArray(Array.from(bytes)) as ipaddr.IPv6).toString();
}

/**
 * Binary header: PROXY with TCP over IPv4 (0x11) or IPv6 (0x21), or LOCAL with UNSPEC (0x00),
 * followed by `tlvs` in order. Throws RangeError on bad input or a length above 65535; note that
 * {@link ProxyHeaderDecoder} itself accepts at most {@link PROXY_V2_MAX_LENGTH}.
 */
export function encodeProxyHeaderV2(h: ProxyHeaderInit, tlvs: readonly ProxyTlv[] = []): Buffer {
  const parts: Buffer[] = [];
  let command: number;
  let family: number;
  if (h.command === 'local') {
    command = 0x20;
    family = 0x00;
  } else {
    command = 0x21;
    family = h.family === 4 ? 0x11 : 0x21;
    const ports = Buffer.alloc(4);
    ports.writeUInt16BE(checkPort(h.source.port), 0);
    ports.writeUInt16BE(checkPort(h.destination.port), 2);
    parts.push(Buffer.from(hostBytes(h.source.host, h.family)), Buffer.from(hostBytes(h.destination.host, h.family)), ports);
  }
  for (const tlv of tlvs) {
    if (!Number.isInteger(tlv.type) || tlv.type < 0 || tlv.type > 0xff) throw new RangeError(`TLV type out of range: ${tlv.type}`);
    if (tlv.value.length > 0xffff) throw new RangeError(`TLV value too long: ${tlv.value.length}`);
    const tl = Buffer.alloc(3);
    tl[0] = tlv.type;
    tl.writeUInt16BE(tlv.value.length, 1);
    parts.push(tl, Buffer.from(tlv.value));
  }
  const body = Buffer.concat(parts);
  if (body.length > 0xffff) throw new RangeError(`PROXY v2 header too long: ${body.length}`);
  const fixed = Buffer.alloc(V2_FIXED_BYTES);
  V2_SIGNATURE.copy(fixed, 0);
  fixed[12] = command;
  fixed[13] = family;
  fixed.writeUInt16BE(body.length, 14);
  return Buffer.concat([fixed, body]);
}
