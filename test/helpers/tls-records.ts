/**
 * TLS 1.3 record protection done by hand in tests (RFC 8446 §5.2 record layout, §5.3
 * per-record nonce), with node:crypto AES-GCM: what the native record relay and the handshake
 * gate are checked against (test/data/tls-gate.test.ts, native-tls-relay.test.ts).
 */
import { createCipheriv, createDecipheriv, type CipherGCM, type DecipherGCM } from 'node:crypto';

/** The per-record nonce: the static IV XOR the 64-bit sequence number, left-padded (§5.3). */
function nonce(iv: Buffer, seq: number): Buffer {
  const n = Buffer.from(iv);
  const s = Buffer.alloc(8);
  s.writeBigUInt64BE(BigInt(seq));
  for (let i = 0; i < 8; i++) n[4 + i]! ^= s[i]!;
  return n;
}

/** One protected record of inner type `type`: outer type 23, legacy version 0x0303, header as AAD. */
export function sealRecord(key: Buffer, iv: Buffer, seq: number, type: number, data: Buffer): Buffer {
  const header = Buffer.from([23, 3, 3, 0, 0]);
  header.writeUInt16BE(data.length + 1 + 16, 3);
  const cipher = createCipheriv(`aes-${key.length * 8}-gcm`, key, nonce(iv, seq)) as CipherGCM;
  cipher.setAAD(header);
  const body = Buffer.concat([cipher.update(Buffer.concat([data, Buffer.from([type])])), cipher.final(), cipher.getAuthTag()]);
  return Buffer.concat([header, body]);
}

export interface OpenedRecord {
  readonly type: number;
  readonly data: Buffer;
}

/** Open every whole record of `bytes` from sequence `seq` on; throws if one does not authenticate. */
export function openRecords(key: Buffer, iv: Buffer, seq: number, bytes: Buffer): { records: OpenedRecord[]; rest: Buffer } {
  const records: OpenedRecord[] = [];
  let off = 0;
  while (bytes.length - off >= 5) {
    const len = bytes.readUInt16BE(off + 3);
    if (bytes.length - off < 5 + len) break;
    if (bytes[off] !== 23) throw new Error(`outer record type ${bytes[off]} after the handshake`);
    const body = bytes.subarray(off + 5, off + 5 + len);
    const decipher = createDecipheriv(`aes-${key.length * 8}-gcm`, key, nonce(iv, seq++)) as DecipherGCM;
    decipher.setAAD(bytes.subarray(off, off + 5));
    decipher.setAuthTag(body.subarray(len - 16));
    const inner = Buffer.concat([decipher.update(body.subarray(0, len - 16)), decipher.final()]);
    let end = inner.length;
    while (end > 0 && inner[end - 1] === 0) end--;
    records.push({ type: inner[end - 1]!, data: inner.subarray(0, end - 1) });
    off += 5 + len;
  }
  return { records, rest: bytes.subarray(off) };
}
