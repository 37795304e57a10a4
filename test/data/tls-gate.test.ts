/**
 * TlsHandshakeGate (src/data/tls-gate.ts), issue #12: the Duplex between a data connection's
 * TCP socket and its TLSSocket, which lets Node run the handshake and then hands the record
 * layer to the native relay. Real TLS over loopback, no mocks, and no native code: the state
 * handOff() returns is proved usable by doing the record protection in the test itself with
 * node:crypto (RFC 8446 §5.2 record layout, §5.3 per-record nonce, §7.3 traffic keys):
 * - a record sealed at writeSeq with writeKey/writeIv is accepted by the peer's TLSSocket
 *   (so the server role's writeSeq counts the NewSessionTickets Node wrote, §4.6.1);
 * - what the peer writes opens from readSeq with readKey/readIv, from `pending` on, skipping
 *   post-handshake handshake records (tickets: inner type 22, §4.6);
 * - application data that came with the peer's Finished is in `pending`, not eaten by Node
 *   (TLS 1.3 never mixes handshake and application data in one record, §5.1);
 * - TLS 1.2 and a non-AES-GCM suite cannot be handed off: the gate opens and Node reads on;
 * - garbage or a cut ClientHello fails the handshake and closes the TCP socket (no hang);
 * - the hold bound (GATE_HOLD_BYTES) pauses the TCP socket; everything read is in `pending`;
 * - resetSocket() on a gated TLSSocket resets the TCP connection under the gate.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { GATE_HOLD_BYTES, gateOf, TlsHandshakeGate, type TlsLegState } from '../../src/data/tls-gate.js';
import { resetSocket } from '../../src/data/relay.js';
import { waitFor, withTimeout } from '../helpers/async.js';
import { readAll, socketPair } from '../helpers/sockets.js';
import { makeSelfSigned, type SelfSigned } from '../helpers/tls.js';
import { openRecords, sealRecord } from '../helpers/tls-records.js';
import type { TapTest } from '../helpers/tap.js';

let ca: Buffer;
let key: Buffer;
let secureContext: tls.SecureContext;
let certificate: SelfSigned | null = null;

t.before(() => {
  certificate = makeSelfSigned('ftpnp-tls-gate-');
  ca = certificate.cert;
  key = certificate.key;
  secureContext = tls.createSecureContext({ key, cert: ca });
});

const cleanups: Array<() => void> = [];
t.teardown(() => {
  for (const cleanup of cleanups.reverse()) cleanup();
  certificate?.cleanup();
});
function track<T extends net.Socket | net.Server>(thing: T): T {
  cleanups.push(() => (thing instanceof net.Server ? thing.close() : thing.destroy()));
  return thing;
}

/** The application data in `bytes`, handshake records (session tickets) skipped. */
function appData(state: TlsLegState, bytes: Buffer): Buffer {
  const { records } = openRecords(state.readKey, state.readIv, state.readSeq, bytes);
  return Buffer.concat(records.filter((r) => r.type === 23).map((r) => r.data));
}

// ---- Gated connections built as the proxy builds them ----

interface Gated {
  readonly gate: TlsHandshakeGate;
  readonly secure: tls.TLSSocket;
  /** The Node TLS peer and the TCP socket under it. */
  readonly peer: tls.TLSSocket;
  readonly peerRaw: net.Socket;
}

/** The proxy's client legs (client-tls.ts): the gate under `new tls.TLSSocket(accepted, { isServer })`; the peer is tls.connect. */
async function gatedServer(peerOptions: tls.ConnectionOptions = {}, setup?: (peer: tls.TLSSocket) => void): Promise<Gated> {
  const { app: peerRaw, inner: raw } = await socketPair({ teardown: (fn) => void cleanups.push(fn as () => void) });
  const gate = new TlsHandshakeGate(raw, 'server');
  const emitter = new EventEmitter();
  emitter.on('newSession', (_id: Buffer, _data: Buffer, done: () => void) => done());
  emitter.on('resumeSession', (_id: Buffer, done: (err: Error | null, data: Buffer | null) => void) => done(null, null));
  emitter.on('tlsClientError', () => {});
  const secure = track(new tls.TLSSocket(gate as unknown as net.Socket, { isServer: true, secureContext, server: emitter as unknown as net.Server }));
  gate.attach(secure);
  const peer = track(tls.connect({ socket: peerRaw, host: '127.0.0.1', ca, ...peerOptions }));
  setup?.(peer);
  await withTimeout(Promise.all([once(secure, 'secure'), once(peer, 'secureConnect')]), 5000, 'TLS handshake (gate as server)');
  await gate.flushed();
  return { gate, secure, peer, peerRaw };
}

/** The proxy's upstream legs (upstream-tls.ts): `tls.connect({ socket: gate })` against a tls.createServer. */
async function gatedClient(serverOptions: tls.TlsOptions = {}): Promise<Gated> {
  const server = track(tls.createServer({ key, cert: ca, allowHalfOpen: true, ...serverOptions }));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const peerP = new Promise<tls.TLSSocket>((resolve) => server.once('secureConnection', resolve));
  const rawPeerP = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const raw = track(net.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port }));
  await withTimeout(once(raw, 'connect'), 3000, 'connect');
  const gate = new TlsHandshakeGate(raw, 'client');
  const secure = track(tls.connect({ socket: gate as unknown as net.Socket, host: '127.0.0.1', ca }));
  gate.attach(secure);
  const [, peer, peerRaw] = await withTimeout(Promise.all([once(secure, 'secureConnect'), peerP, rawPeerP]), 5000, 'TLS handshake (gate as client)');
  track(peer);
  server.close();
  await gate.flushed();
  return { gate, secure, peer, peerRaw };
}

/** The next `event`; rejects on an 'error' first unless `failOnError` is false. */
function once(emitter: EventEmitter, event: string, failOnError = true): Promise<void> {
  return new Promise((resolve, reject) => {
    emitter.once(event, () => resolve());
    if (failOnError) emitter.once('error', reject);
  });
}

/** Everything the raw socket reads from now on (after handOff the gate no longer reads it). */
function collect(raw: net.Socket): { bytes: () => Buffer } {
  const chunks: Buffer[] = [];
  raw.on('data', (chunk: Buffer) => chunks.push(chunk));
  raw.resume();
  return { bytes: () => Buffer.concat(chunks) };
}

const SUITES = [['TLS_AES_128_GCM_SHA256', 128], ['TLS_AES_256_GCM_SHA384', 256]] as const;

for (const [suite, bits] of SUITES) {
  t.test(`server role, ${suite}: handOff() state seals records the peer accepts and opens what the peer writes`, async (t) => {
    let tickets = 0;
    const { gate, secure, peer } = await gatedServer({ ciphers: suite }, (p) => p.on('session', () => tickets++));
    t.equal(secure.getCipher().standardName, suite, 'suite negotiated');
    t.ok(gate.canHandOff, 'canHandOff after the handshake');
    t.equal(gateOf(secure), gate, 'gateOf finds the gate');
    const state = gate.handOff();
    if (!state) return t.fail('handOff() returned null');
    t.equal(state.bits, bits, 'bits');
    t.equal(state.readKey.length, bits / 8, 'read key size');
    t.equal(state.writeKey.length, bits / 8, 'write key size');
    t.equal(state.readIv.length, 12, 'read IV size');
    t.equal(state.readSeq, 0, 'readSeq 0: the client wrote nothing after its Finished');
    t.ok(state.writeSeq > 0, `writeSeq ${state.writeSeq} counts the server's NewSessionTickets`);
    t.equal(state.pending.length, 0, 'nothing pending yet');
    t.notOk(gate.canHandOff, 'a second hand-off is refused');
    t.equal(gate.handOff(), null, 'handOff() only once');

    const ping = new Promise<string>((resolve) => peer.once('data', (d: Buffer) => resolve(d.toString())));
    gate.raw.write(sealRecord(state.writeKey, state.writeIv, state.writeSeq, 23, Buffer.from('ping')));
    t.equal(await withTimeout(ping, 3000, 'peer reads ping'), 'ping', 'the peer opens a record sealed at writeSeq');
    t.equal(tickets, state.writeSeq, `writeSeq equals the tickets the peer received (${tickets})`);

    const raw = collect(gate.raw);
    peer.write('pong');
    t.ok(await waitFor(() => appData(state, Buffer.concat([state.pending, raw.bytes()])).toString() === 'pong', 3000), 'pong opens from readSeq');
  });

  t.test(`client role, ${suite}: writeSeq 0, tickets skipped on the read side, both directions work`, async (t) => {
    const { gate, secure, peer } = await gatedClient({ ciphers: suite });
    t.equal(secure.getCipher().standardName, suite, 'suite negotiated');
    t.ok(gate.canHandOff, 'canHandOff');
    const state = gate.handOff();
    if (!state) return t.fail('handOff() returned null');
    t.equal(state.bits, bits, 'bits');
    t.equal(state.readSeq, 0, 'readSeq 0');
    t.equal(state.writeSeq, 0, 'writeSeq 0: a TLS client writes nothing after its Finished');

    const ping = new Promise<string>((resolve) => peer.once('data', (d: Buffer) => resolve(d.toString())));
    gate.raw.write(sealRecord(state.writeKey, state.writeIv, 0, 23, Buffer.from('ping')));
    t.equal(await withTimeout(ping, 3000, 'peer reads ping'), 'ping', 'the server opens a record sealed at seq 0');

    const raw = collect(gate.raw);
    peer.write('pong');
    const all = (): Buffer => Buffer.concat([state.pending, raw.bytes()]);
    t.ok(await waitFor(() => appData(state, all()).toString() === 'pong', 3000), 'pong opens from readSeq');
    const types = openRecords(state.readKey, state.readIv, 0, all()).records.map((r) => r.type);
    t.ok(types.filter((type) => type === 22).length > 0, `session tickets came first as inner handshake records (${types.join(',')})`);
    t.equal(types.at(-1), 23, 'then the application data');
  });
}

t.test('server role: application data sent with the client Finished stays in pending, unread by Node', async (t) => {
  let early = 0;
  const { gate, secure, peerRaw } = await gatedServer({}, (peer) => peer.once('secureConnect', () => peer.write('early bird')));
  secure.on('data', () => early++);
  t.ok(await waitFor(() => gate.raw.bytesRead === peerRaw.bytesWritten, 3000, 5), 'every byte the peer wrote has been read');
  const state = gate.handOff();
  if (!state) return t.fail('handOff() returned null');
  t.ok(state.pending.length > 0, `pending holds ${state.pending.length} bytes`);
  const { records, rest } = openRecords(state.readKey, state.readIv, state.readSeq, state.pending);
  t.same(records.map((r) => [r.type, r.data.toString()]), [[23, 'early bird']], 'pending opens at readSeq 0 to the early data');
  t.equal(rest.length, 0, 'whole records only');
  t.equal(early, 0, 'Node never saw it');
});

t.test('released while holding: held bytes reach the TLSSocket first, in order, then the rest', async (t) => {
  const { gate, secure, peer, peerRaw } = await gatedServer({}, (p) => p.once('secureConnect', () => p.write('first-')));
  t.ok(await waitFor(() => gate.raw.bytesRead === peerRaw.bytesWritten, 3000, 5), 'the early record was read and held');
  const got: Buffer[] = [];
  secure.on('data', (d: Buffer) => got.push(d));
  gate.release();
  gate.release();
  t.notOk(gate.canHandOff, 'no hand-off after release');
  t.equal(gate.handOff(), null, 'handOff() null after release');
  peer.write('second');
  t.ok(await waitFor(() => Buffer.concat(got).toString() === 'first-second', 3000), 'first-second');
  const back = new Promise<string>((resolve) => peer.once('data', (d: Buffer) => resolve(d.toString())));
  secure.write('reply');
  t.equal(await withTimeout(back, 3000, 'reply'), 'reply', 'and the TLSSocket writes as usual');
});

const NOT_HANDED: Array<[string, () => Promise<Gated>]> = [
  ['TLS 1.2, server role', () => gatedServer({ maxVersion: 'TLSv1.2' })],
  ['TLS 1.2, client role', () => gatedClient({ maxVersion: 'TLSv1.2' })],
  ['TLS 1.3 ChaCha20-Poly1305, server role', () => gatedServer({ ciphers: 'TLS_CHACHA20_POLY1305_SHA256' })],
];
for (const [name, make] of NOT_HANDED) {
  t.test(`${name}: cannot be handed off; the gate lets everything through`, async (t) => {
    const { gate, secure, peer } = await make();
    t.notOk(gate.canHandOff, `canHandOff false (${secure.getProtocol()} ${secure.getCipher().standardName})`);
    t.equal(gate.handOff(), null, 'handOff() null');
    gate.release();
    const atSecure = new Promise<string>((resolve) => secure.once('data', (d: Buffer) => resolve(d.toString())));
    peer.write('to-gate');
    t.equal(await withTimeout(atSecure, 3000, 'to-gate'), 'to-gate', 'peer -> gated TLSSocket');
    const atPeer = new Promise<string>((resolve) => peer.once('data', (d: Buffer) => resolve(d.toString())));
    secure.write('to-peer');
    t.equal(await withTimeout(atPeer, 3000, 'to-peer'), 'to-peer', 'gated TLSSocket -> peer');
  });
}

/** A gated TLS server whose peer is a plain socket the test drives; resolves once everything is closed. */
async function failedHandshake(t: TapTest, send: (peer: net.Socket) => void): Promise<void> {
  const { app: peerRaw, inner: raw } = await socketPair(t);
  const gate = new TlsHandshakeGate(raw, 'server');
  const emitter = new EventEmitter();
  const secure = track(new tls.TLSSocket(gate as unknown as net.Socket, { isServer: true, secureContext, server: emitter as unknown as net.Server }));
  gate.attach(secure);
  let failure: Error | null = null;
  secure.on('error', (err: Error) => (failure ??= err));
  emitter.on('tlsClientError', (err: Error) => (failure ??= err));
  let secured = false;
  secure.on('secure', () => (secured = true));
  const closedP = withTimeout(once(secure, 'close', false), 5000, 'TLSSocket closes');
  const peerRead = readAll(peerRaw, 5000);
  send(peerRaw);
  await closedP;
  t.notOk(secured, 'no handshake');
  t.ok(failure, `the handshake failed: ${String((failure as Error | null)?.message)}`);
  t.ok(await waitFor(() => raw.destroyed, 3000), 'the TCP socket under the gate is destroyed');
  t.ok(gate.destroyed, 'the gate is destroyed');
  const r = await peerRead;
  t.ok(r.outcome === 'end' || r.outcome === 'error', `the peer's connection ended too (${r.outcome})`);
}

t.test('garbage instead of a ClientHello: the TLSSocket fails and the TCP socket closes', async (t) => {
  await failedHandshake(t, (peer) => peer.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
});

t.test('a record header announcing a junk handshake: the TLSSocket fails and the TCP socket closes', async (t) => {
  await failedHandshake(t, (peer) => peer.write(Buffer.from([22, 3, 1, 0, 6, 1, 0, 0, 2, 0xde, 0xad])));
});

t.test('a ClientHello cut short by a FIN: the end reaches Node (no hang); a reset then closes the TCP socket', async (t) => {
  // Node's TLS server reports EOF during the handshake as 'end', gated or not, and a half-open
  // socket then waits (the proxy's handshake deadline ends it). The gate must pass the EOF on.
  const { app: peerRaw, inner: raw } = await socketPair(t);
  const gate = new TlsHandshakeGate(raw, 'server');
  const secure = track(new tls.TLSSocket(gate as unknown as net.Socket, { isServer: true, secureContext, server: new EventEmitter() as unknown as net.Server }));
  gate.attach(secure);
  let secured = false;
  secure.on('secure', () => (secured = true));
  secure.on('error', () => {});
  const ended = withTimeout(once(secure, 'end', false), 3000, 'the TLSSocket sees the end');
  const peerRead = readAll(peerRaw, 5000, false);
  peerRaw.end(Buffer.from([22, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3]));
  await ended;
  t.notOk(secured, 'no handshake');
  t.notOk(gate.canHandOff, 'nothing to hand off');
  resetSocket(secure);
  const r = await peerRead;
  t.equal(r.error?.code, 'ECONNRESET', `the peer sees a reset (${r.outcome})`);
  t.ok(await waitFor(() => raw.destroyed && secure.destroyed, 3000), 'the TCP socket and the TLSSocket are destroyed');
});

t.test('the hold bound: a peer that writes at once is paused near GATE_HOLD_BYTES; pending holds all that was read', async (t) => {
  const { gate, peer } = await gatedServer();
  const before = gate.raw.bytesRead;
  const sent = randomBytes(8 * 1024 * 1024);
  peer.on('error', () => {});
  peer.write(sent);
  t.ok(await waitFor(() => gate.raw.isPaused(), 5000, 5), 'the TCP socket is paused');
  // Settle: the socket may finish the read under way and fill its own small buffer.
  let last = -1;
  t.ok(await waitFor(() => {
    const now = gate.raw.bytesRead;
    const stable = now === last;
    last = now;
    return stable;
  }, 5000, 100), 'reading stopped');
  const read = gate.raw.bytesRead - before;
  t.ok(read >= GATE_HOLD_BYTES, `read ${read} bytes, at least the bound ${GATE_HOLD_BYTES}`);
  t.ok(read <= GATE_HOLD_BYTES + 3 * 64 * 1024, `read ${read} bytes: the bound plus what was under way, not the 8 MiB sent`);
  const state = gate.handOff();
  if (!state) return t.fail('handOff() returned null');
  t.equal(state.pending.length, read, 'pending is every byte read after the handshake');
  const { records, rest } = openRecords(state.readKey, state.readIv, state.readSeq, state.pending);
  const plain = Buffer.concat(records.map((r) => r.data));
  t.ok(records.every((r) => r.type === 23), 'all application data');
  t.ok(plain.length > GATE_HOLD_BYTES - 32 * 1024, `${plain.length} plaintext bytes`);
  t.ok(sent.subarray(0, plain.length).equals(plain), 'a prefix of what the peer wrote, in order');
  t.ok(rest.length < 16384 + 256 + 5, `only a partial last record left (${rest.length})`);
});

for (const role of ['server', 'client'] as const) {
  t.test(`resetSocket on a gated TLSSocket (${role} role) resets the TCP connection: the peer sees ECONNRESET`, async (t) => {
    const { gate, secure, peer } = await (role === 'server' ? gatedServer() : gatedClient());
    // One message first (the gate passes writes through while it holds). A Node 20 TLS 1.3
    // peer that meets the RST right after the handshake may report a clean 'end' instead of
    // ECONNRESET, gated or not (checked with the gate taken out): tickets in flight, see
    // tls-data.test.ts. Not what is tested here.
    const hello = new Promise((resolve) => peer.once('data', resolve));
    secure.write('hello');
    await withTimeout(hello, 3000, 'hello');
    const peerRead = readAll(peer, 5000);
    const closedP = withTimeout(once(gate.raw, 'close', false), 3000, 'raw close');
    resetSocket(secure);
    resetSocket(secure);
    const r = await peerRead;
    t.equal(r.outcome, 'error', `the peer sees a reset, not a clean end (${r.outcome})`);
    t.equal(r.error?.code, 'ECONNRESET', 'ECONNRESET');
    await closedP;
    t.ok(gate.raw.destroyed, 'the TCP socket is destroyed');
    t.ok(await waitFor(() => secure.destroyed, 3000), 'and the TLSSocket');
  });
}
