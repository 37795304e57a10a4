/**
 * TLS 1.3 facts the native record relay needs (issue #12): record framing, the traffic keys
 * (RFC 8446 §7.1, §7.3) from the secrets Node reports in its `keylog` lines (NSS key log
 * format), and which cipher suites the relay can carry. Pure: no sockets, no state.
 */
import { createHmac } from 'node:crypto';

/** RFC 8446 §5.1: type(1) legacy_version(2) length(2). */
export const RECORD_HEADER_BYTES = 5;
/** RFC 8446 §5.2: a TLSCiphertext fragment is at most 2^14 + 256 bytes (and TLS 1.2's is 2^14 + 2048). */
export const MAX_RECORD_BODY_BYTES = 16384 + 2048;

export const CONTENT_CHANGE_CIPHER_SPEC = 20;
export const CONTENT_ALERT = 21;
export const CONTENT_HANDSHAKE = 22;
export const CONTENT_APPLICATION_DATA = 23;

/**
 * Length of the first whole record at `offset` in `bytes` (header included): 0 when it has
 * not all arrived yet, -1 when it cannot be a TLS record (unknown type or too long).
 */
export function recordLength(bytes: Uint8Array, offset = 0): number {
  const available = bytes.length - offset;
  if (available < 1) return 0;
  const type = bytes[offset]!;
  if (type < CONTENT_CHANGE_CIPHER_SPEC || type > CONTENT_APPLICATION_DATA) return -1;
  if (available < RECORD_HEADER_BYTES) return 0;
  const body = (bytes[offset + 3]! << 8) | bytes[offset + 4]!;
  if (body > MAX_RECORD_BODY_BYTES) return -1;
  return available < RECORD_HEADER_BYTES + body ? 0 : RECORD_HEADER_BYTES + body;
}

/** The cipher suites whose records the native relay protects (AES-GCM, RFC 8446 §B.4). */
export interface RecordCipher {
  readonly bits: 128 | 256;
  readonly hash: 'sha256' | 'sha384';
}

const RECORD_CIPHERS: Readonly<Record<string, RecordCipher>> = {
  TLS_AES_128_GCM_SHA256: { bits: 128, hash: 'sha256' },
  TLS_AES_256_GCM_SHA384: { bits: 256, hash: 'sha384' },
};

/** The suite by its IANA name (`getCipher().standardName`), or null for one the relay cannot carry. */
export function recordCipher(standardName: string | undefined): RecordCipher | null {
  return (standardName && RECORD_CIPHERS[standardName]) || null;
}

/**
 * HKDF-Expand-Label (RFC 8446 §7.1) = HKDF-Expand (RFC 5869 §2.3) of the HkdfLabel
 * { uint16 length; opaque label<7..255> = "tls13 " + label; opaque context<0..255> }.
 */
export function hkdfExpandLabel(hash: RecordCipher['hash'], secret: Buffer, label: string, context: Buffer, length: number): Buffer {
  const fullLabel = Buffer.from(`tls13 ${label}`, 'ascii');
  const info = Buffer.concat([Buffer.from([length >> 8, length & 0xff, fullLabel.length]), fullLabel, Buffer.from([context.length]), context]);
  const blocks: Buffer[] = [];
  let previous = Buffer.alloc(0);
  for (let counter = 1, produced = 0; produced < length; counter++) {
    previous = createHmac(hash, secret).update(previous).update(info).update(Buffer.from([counter])).digest();
    blocks.push(previous);
    produced += previous.length;
  }
  return Buffer.concat(blocks).subarray(0, length);
}

/** RFC 8446 §7.3: a direction's write key and static IV from its traffic secret. */
export function trafficKeys(cipher: RecordCipher, secret: Buffer): { readonly key: Buffer; readonly iv: Buffer } {
  return {
    key: hkdfExpandLabel(cipher.hash, secret, 'key', Buffer.alloc(0), cipher.bits / 8),
    iv: hkdfExpandLabel(cipher.hash, secret, 'iv', Buffer.alloc(0), 12),
  };
}

/** The two secrets of the first application traffic keys (NSS key log labels). */
export type TrafficSecretLabel = 'CLIENT_TRAFFIC_SECRET_0' | 'SERVER_TRAFFIC_SECRET_0';

/**
 * One NSS key log line (`<label> <client_random hex> <secret hex>`, what Node's `keylog`
 * event gives) when it carries a first application traffic secret; null for any other line.
 */
export function parseTrafficSecret(line: Buffer | string): { readonly label: TrafficSecretLabel; readonly secret: Buffer } | null {
  const fields = line.toString('latin1').trim().split(' ');
  if (fields.length !== 3) return null;
  const [label, , hex] = fields as [string, string, string];
  if (label !== 'CLIENT_TRAFFIC_SECRET_0' && label !== 'SERVER_TRAFFIC_SECRET_0') return null;
  if (!/^(?:[0-9a-fA-F]{2}){32,64}$/.test(hex)) return null;
  return { label, secret: Buffer.from(hex, 'hex') };
}
