/**
 * TLS 1.3 facts for the native record relay (src/data/tls-records.ts): record framing at every
 * split point, the key schedule against RFC 8448's published trace, NSS key log lines as
 * Node's `keylog` event gives them, and which suites the relay carries.
 */
import t from 'tap';
import {
  hkdfExpandLabel,
  MAX_RECORD_BODY_BYTES,
  parseTrafficSecret,
  recordCipher,
  recordLength,
  trafficKeys,
} from '../../src/data/tls-records.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

function record(type: number, body: number): Buffer {
  const out = Buffer.alloc(5 + body, 0xab);
  out[0] = type;
  out[1] = 3;
  out[2] = 3;
  out.writeUInt16BE(body, 3);
  return out;
}

t.test('recordLength: a whole record only once all of it is here, at every split point', async (t) => {
  // A handshake flight as a client sees it: ServerHello, ChangeCipherSpec, two protected records.
  const records = [record(22, 90), record(20, 1), record(23, 300), record(23, 17)];
  const stream = Buffer.concat(records);
  for (let cut = 0; cut <= stream.length; cut++) {
    // Take whole records off the front of the first `cut` bytes, as the gate does.
    const seen: number[] = [];
    let offset = 0;
    const prefix = stream.subarray(0, cut);
    for (let length = recordLength(prefix, offset); length > 0; length = recordLength(prefix, offset)) {
      seen.push(length);
      offset += length;
    }
    let expected = 0;
    const whole: number[] = [];
    for (const r of records) {
      if (expected + r.length > cut) break;
      whole.push(r.length);
      expected += r.length;
    }
    if (JSON.stringify(seen) !== JSON.stringify(whole)) {
      t.same(seen, whole, `cut at ${cut}`);
      return;
    }
  }
  t.pass(`${stream.length + 1} split points each gave exactly the records wholly received`);
});

t.test('recordLength: what cannot be a TLS record', async (t) => {
  const cases: Array<[string, Buffer, number]> = [
    ['nothing yet', Buffer.alloc(0), 0],
    ['a lone type byte', Buffer.from([23]), 0],
    ['an HTTP request instead of a ClientHello', Buffer.from('GET / HTTP/1.1\r\n'), -1],
    ['a type below change_cipher_spec', Buffer.from([19, 3, 3, 0, 1, 0]), -1],
    ['a type above application_data', Buffer.from([24, 3, 3, 0, 1, 0]), -1],
    ['a body longer than any TLS version allows', record(23, 0).fill(0xff, 3, 5), -1],
    ['the longest allowed body, complete', record(23, MAX_RECORD_BODY_BYTES), 5 + MAX_RECORD_BODY_BYTES],
    ['an empty body', record(21, 0), 5],
  ];
  for (const [what, bytes, expected] of cases) t.equal(recordLength(bytes), expected, what);
  t.equal(recordLength(Buffer.concat([record(22, 4), record(23, 2)]), 9), 7, 'at an offset');
});

t.test('trafficKeys: RFC 8448 §3 (simple 1-RTT handshake), handshake traffic keys', async (t) => {
  const cipher = recordCipher('TLS_AES_128_GCM_SHA256')!;
  const server = trafficKeys(cipher, hex('b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38'));
  t.equal(server.key.toString('hex'), '3fce516009c21727d0f2e4e86ee403bc', 'server handshake write key');
  t.equal(server.iv.toString('hex'), '5d313eb2671276ee13000b30', 'server handshake write iv');
});

t.test('hkdfExpandLabel: lengths beyond one hash block, and the label/context encoding', async (t) => {
  const secret = Buffer.alloc(48, 7);
  const long = hkdfExpandLabel('sha384', secret, 'key', Buffer.alloc(0), 100);
  t.equal(long.length, 100, 'three SHA-384 blocks, truncated');
  t.same(hkdfExpandLabel('sha384', secret, 'key', Buffer.alloc(0), 32), hkdfExpandLabel('sha384', secret, 'key', Buffer.alloc(0), 32), 'deterministic');
  // The length is part of the label (RFC 8446 §7.1): a shorter key is not a prefix of a longer one.
  t.not(long.subarray(0, 32).toString('hex'), hkdfExpandLabel('sha384', secret, 'key', Buffer.alloc(0), 32).toString('hex'), 'length is bound in');
  t.not(hkdfExpandLabel('sha256', secret, 'iv', Buffer.from([1]), 12).toString('hex'), hkdfExpandLabel('sha256', secret, 'iv', Buffer.alloc(0), 12).toString('hex'), 'context is bound in');
  const keys256 = trafficKeys(recordCipher('TLS_AES_256_GCM_SHA384')!, secret);
  t.equal(keys256.key.length, 32, 'AES-256 key');
  t.equal(keys256.iv.length, 12, '96-bit IV');
});

t.test('recordCipher: the AES-GCM suites only', async (t) => {
  t.same(recordCipher('TLS_AES_128_GCM_SHA256'), { bits: 128, hash: 'sha256' });
  t.same(recordCipher('TLS_AES_256_GCM_SHA384'), { bits: 256, hash: 'sha384' });
  for (const other of ['TLS_CHACHA20_POLY1305_SHA256', 'TLS_AES_128_CCM_SHA256', 'ECDHE-RSA-AES128-GCM-SHA256', '', undefined]) {
    t.equal(recordCipher(other), null, `${other === undefined ? 'undefined' : other || 'empty'}: not carried natively`);
  }
});

t.test('parseTrafficSecret: the first application traffic secrets of an NSS key log', async (t) => {
  const random = 'aa'.repeat(32);
  const secret = '0123456789abcdef'.repeat(4);
  t.same(parseTrafficSecret(Buffer.from(`CLIENT_TRAFFIC_SECRET_0 ${random} ${secret}\n`)), { label: 'CLIENT_TRAFFIC_SECRET_0', secret: Buffer.from(secret, 'hex') }, 'client, as Node emits it (a Buffer with a newline)');
  t.same(parseTrafficSecret(`SERVER_TRAFFIC_SECRET_0 ${random} ${'ff'.repeat(48)}`), { label: 'SERVER_TRAFFIC_SECRET_0', secret: Buffer.alloc(48, 0xff) }, 'server, SHA-384 length');
  const ignored: Array<[string, string]> = [
    ['handshake secrets', `SERVER_HANDSHAKE_TRAFFIC_SECRET ${random} ${secret}`],
    ['a TLS 1.2 master secret', `CLIENT_RANDOM ${random} ${'11'.repeat(48)}`],
    ['a later generation (after a KeyUpdate)', `CLIENT_TRAFFIC_SECRET_1 ${random} ${secret}`],
    ['too few fields', `CLIENT_TRAFFIC_SECRET_0 ${secret}`],
    ['not hex', `CLIENT_TRAFFIC_SECRET_0 ${random} ${'zz'.repeat(32)}`],
    ['an odd number of digits', `CLIENT_TRAFFIC_SECRET_0 ${random} ${secret}0`],
    ['too short a secret', `CLIENT_TRAFFIC_SECRET_0 ${random} ${'00'.repeat(16)}`],
  ];
  for (const [what, line] of ignored) t.equal(parseTrafficSecret(line), null, what);
});
