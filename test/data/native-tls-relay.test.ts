/**
 * The native relay with TLS legs (issue #12, PROT P at C speed): createRelay() hands legs
 * secured behind a TlsHandshakeGate (tls-gate.ts) to the native thread, which opens and seals
 * the TLS 1.3 records itself (src/native/tls_record.c, splice_relay.c tls_pump). Real Node TLS
 * peers on loopback, built the way the proxy builds its legs:
 *
 *   clientApp (tls.connect) <-> [gate, TLS server: client-tls.ts] relay.client
 *   relay.upstream [gate, TLS client: upstream-tls.ts] <-> serverApp (TLSSocket, isServer)
 *
 * Cases: downloads and uploads with both legs TLS (AES-128-GCM and AES-256-GCM) and with one
 * leg plain, an empty transfer; the ends of a TLS stream (RFC 8446 §6.1): close_notify passed on
 * as close_notify + FIN, a FIN without close_notify is a truncation (both legs reset); records
 * the thread must refuse (a bad tag, a non-application_data outer type §5.2, a KeyUpdate §4.6.3,
 * a fatal alert §6.2) or tolerate (a NewSessionTicket §4.6.1, user_canceled); abort(), the idle
 * timeout, and no socket left open. Injected records are sealed in the test with the keys of
 * the client app's own traffic secret (its 'keylog' event, §7.3): a TLS client writes nothing
 * after its Finished, so its next record number is 0 as long as the test never writes on it.
 * Needs the native addon; skips (one line) without it.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { EventEmitter } from 'node:events';
import { createHash, randomBytes } from 'node:crypto';
import { createRelay, dataTlsGate, relayImplementation, relayKindFor } from '../../src/data/splice-relay.js';
import type { Relay, RelayOptions, RelayResult } from '../../src/data/relay.js';
import type { TlsHandshakeGate } from '../../src/data/tls-gate.js';
import { parseTrafficSecret, recordCipher, trafficKeys } from '../../src/data/tls-records.js';
import { waitFor, withTimeout } from '../helpers/async.js';
import { readAll, socketPair, type ReadResult } from '../helpers/sockets.js';
import { makeSelfSigned, type SelfSigned } from '../helpers/tls.js';
import { sealRecord } from '../helpers/tls-records.js';
import type { TapTest } from '../helpers/tap.js';

let ca: Buffer;
let key: Buffer;
let certificate: SelfSigned | null = null;
const cleanups: Array<() => void> = [];

function suite(): void {
  t.before(() => {
    certificate = makeSelfSigned('ftpnp-native-tls-');
    ca = certificate.cert;
    key = certificate.key;
  });
  t.teardown(() => {
    for (const cleanup of cleanups.reverse()) cleanup();
    certificate?.cleanup();
  });
  cases();
}

function track<T extends net.Socket>(socket: T): T {
  cleanups.push(() => socket.destroy());
  return socket;
}
const owner = { teardown: (fn: () => unknown) => void cleanups.push(() => void fn()) };

function once(emitter: EventEmitter, event: string): Promise<void> {
  return new Promise((resolve, reject) => {
    emitter.once(event, () => resolve());
    emitter.once('error', reject);
  });
}

/** One side of the relay: what the relay is given, the app at the far end, the TCP socket under the app. */
interface Leg {
  readonly relaySide: net.Socket;
  readonly app: net.Socket;
  readonly appRaw: net.Socket;
  readonly gate: TlsHandshakeGate | null;
  /** The app's own traffic secrets (its 'keylog' lines), TLS legs only. */
  readonly secrets: Map<string, Buffer>;
}

/** The client leg: plain, or TLS with the gate under the proxy's TLS server socket (client-tls.ts). */
async function clientLeg(secure: boolean, ciphers?: string): Promise<Leg> {
  const { app: appRaw, inner } = await socketPair(owner);
  if (!secure) return { relaySide: inner, app: appRaw, appRaw, gate: null, secrets: new Map() };
  const gate = dataTlsGate(inner, 'server', 'TLSv1.3')!;
  const emitter = new EventEmitter();
  emitter.on('newSession', (_id: Buffer, _data: Buffer, done: () => void) => done());
  emitter.on('resumeSession', (_id: Buffer, done: (err: Error | null, data: Buffer | null) => void) => done(null, null));
  emitter.on('tlsClientError', () => {});
  const context = tls.createSecureContext({ key, cert: ca });
  const relaySide = track(new tls.TLSSocket(gate as unknown as net.Socket, { isServer: true, secureContext: context, server: emitter as unknown as net.Server }));
  gate.attach(relaySide);
  const app = track(tls.connect({ socket: appRaw, host: '127.0.0.1', ca, ...(ciphers ? { ciphers } : {}) }));
  const secrets = new Map<string, Buffer>();
  app.on('keylog', (line: Buffer) => {
    const s = parseTrafficSecret(line);
    if (s) secrets.set(s.label, s.secret);
  });
  await withTimeout(Promise.all([once(relaySide, 'secure'), once(app, 'secureConnect')]), 5000, 'client leg handshake');
  await gate.flushed();
  return { relaySide, app, appRaw, gate, secrets };
}

/** The upstream leg: plain, or TLS with the gate under the proxy's tls.connect (upstream-tls.ts). */
async function upstreamLeg(secure: boolean, ciphers?: string): Promise<Leg> {
  const { app: dialled, inner: accepted } = await socketPair(owner);
  if (!secure) return { relaySide: accepted, app: dialled, appRaw: dialled, gate: null, secrets: new Map() };
  const gate = dataTlsGate(dialled, 'client', 'TLSv1.3')!;
  const relaySide = track(tls.connect({ socket: gate as unknown as net.Socket, host: '127.0.0.1', ca }));
  gate.attach(relaySide);
  const context = tls.createSecureContext({ key, cert: ca, ...(ciphers ? { ciphers } : {}) });
  const app = track(new tls.TLSSocket(accepted, { isServer: true, secureContext: context }));
  await withTimeout(Promise.all([once(relaySide, 'secureConnect'), once(app, 'secure')]), 5000, 'upstream leg handshake');
  await gate.flushed();
  return { relaySide, app, appRaw: accepted, gate, secrets: new Map() };
}

interface Channel {
  readonly c: Leg;
  readonly s: Leg;
  readonly relay: Relay;
}

async function channel(t: TapTest, clientTls: boolean, upstreamTls: boolean, options: RelayOptions = {}, ciphers?: string): Promise<Channel> {
  const c = await clientLeg(clientTls, ciphers);
  const s = await upstreamLeg(upstreamTls, ciphers);
  t.match(relayKindFor(c.relaySide, s.relaySide), { kind: 'splice', reason: /TLS 1\.3 records/ }, 'relayKindFor: the native thread');
  const relay = createRelay(c.relaySide, s.relaySide, options);
  t.equal(relay.kind, 'native-tls', 'relay.kind native-tls');
  if (c.gate) t.equal(relay.client, c.gate.raw, 'relay.client is the TCP socket under the client gate');
  if (s.gate) t.equal(relay.upstream, s.gate.raw, 'relay.upstream is the TCP socket under the upstream gate');
  return { c, s, relay };
}

/** The relay settles with `outcome`, and nothing is left open (TCP sockets, gated TLSSockets). */
async function settles(t: TapTest, { c, s, relay }: Channel, outcome: RelayResult['outcome']): Promise<RelayResult> {
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, outcome, `outcome ${outcome}`);
  t.ok(relay.client.destroyed && relay.upstream.destroyed, 'both TCP sockets the relay held are destroyed');
  t.ok(await waitFor(() => c.relaySide.destroyed && s.relaySide.destroyed, 3000), 'and the TLSSockets above them');
  return result;
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function resetSeen(r: ReadResult): boolean {
  return r.outcome === 'error' && ['ECONNRESET', 'EPIPE'].includes(r.error?.code ?? '');
}

/** Seals records as the client app would send them next (its write direction, from record 0). */
function clientAppSealer(leg: Leg): (type: number, data: Buffer) => Buffer {
  const cipher = recordCipher((leg.app as tls.TLSSocket).getCipher().standardName);
  const secret = leg.secrets.get('CLIENT_TRAFFIC_SECRET_0');
  if (!cipher || !secret) throw new Error('no client traffic secret from keylog');
  const { key: k, iv } = trafficKeys(cipher, secret);
  let seq = 0;
  return (type, data) => sealRecord(k, iv, seq++, type, data);
}

function cases(): void {
  for (const suiteName of ['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384']) {
    t.test(`download, both legs TLS (${suiteName}): 8 MiB arrive intact, counted, close_notify passed on`, async (t) => {
      const ch = await channel(t, true, true, {}, suiteName);
      t.equal((ch.c.app as tls.TLSSocket).getCipher().standardName, suiteName, 'client leg suite');
      t.equal((ch.s.app as tls.TLSSocket).getCipher().standardName, suiteName, 'upstream leg suite');
      const data = randomBytes(8 * 1024 * 1024);
      const clientRead = readAll(ch.c.app, 20000);
      const serverRead = readAll(ch.s.app, 20000);
      ch.s.app.end(data);
      const r = await clientRead;
      t.equal(r.outcome, 'end', 'the client app sees a clean end (close_notify)');
      t.equal(r.data.length, data.length, 'every byte');
      t.equal(sha256(r.data), sha256(data), 'sha256 equal');
      t.equal(await withTimeout(ch.relay.directionFinished('toClient'), 3000, 'toClient finished'), true, 'directionFinished(toClient)');
      const s = await serverRead;
      t.equal(s.outcome, 'end', "the client's close_notify reaches the server as a clean end");
      t.equal(s.data.length, 0, 'nothing uploaded');
      const result = await settles(t, ch, 'complete');
      t.equal(result.upstreamToClientBytes, data.length, 'plaintext bytes counted down');
      t.equal(ch.relay.upstreamToClientBytes, data.length, 'relay.upstreamToClientBytes too');
      t.equal(result.clientToUpstreamBytes, 0, 'none up');
    });
  }

  t.test('upload, both legs TLS: the server gets every byte, then a clean end (close_notify)', async (t) => {
    const ch = await channel(t, true, true);
    const data = randomBytes(3 * 1024 * 1024 + 17);
    const serverRead = readAll(ch.s.app, 20000);
    const clientRead = readAll(ch.c.app, 20000);
    ch.c.app.end(data);
    const s = await serverRead;
    t.equal(s.outcome, 'end', "a Node TLS server sees 'end': the relay sent close_notify");
    t.equal(sha256(s.data), sha256(data), `sha256 equal (${s.data.length} bytes)`);
    t.equal(await withTimeout(ch.relay.directionFinished('toUpstream'), 3000, 'toUpstream finished'), true, 'directionFinished(toUpstream)');
    t.equal((await clientRead).outcome, 'end', 'the server end reaches the client');
    const result = await settles(t, ch, 'complete');
    t.equal(result.clientToUpstreamBytes, data.length, 'plaintext bytes counted up');
  });

  for (const [clientTls, upstreamTls] of [[true, false], [false, true]] as const) {
    t.test(`${clientTls ? 'TLS' : 'plain'} client leg, ${upstreamTls ? 'TLS' : 'plain'} upstream leg: both directions at once`, async (t) => {
      const ch = await channel(t, clientTls, upstreamTls);
      const down = randomBytes(2_000_000);
      const up = randomBytes(1_234_567);
      const clientRead = readAll(ch.c.app, 20000);
      const serverRead = readAll(ch.s.app, 20000);
      ch.s.app.end(down);
      ch.c.app.end(up);
      const [c, s] = await Promise.all([clientRead, serverRead]);
      t.equal(c.outcome, 'end', 'client app: clean end');
      t.equal(s.outcome, 'end', 'server app: clean end');
      t.equal(sha256(c.data), sha256(down), `download intact (${c.data.length} bytes)`);
      t.equal(sha256(s.data), sha256(up), `upload intact (${s.data.length} bytes)`);
      const result = await settles(t, ch, 'complete');
      t.equal(result.upstreamToClientBytes, down.length, 'down counted');
      t.equal(result.clientToUpstreamBytes, up.length, 'up counted');
    });
  }

  for (const [size, what] of [[1000, 'all of it and the FIN'], [300 * 1024, 'the first part']] as const) {
    t.test(`plain server leg that read ${what} into JS before the relay (${size} bytes): nothing lost, sealed for the TLS client`, async (t) => {
      // A download's usual order: the server sends at once, the client's data handshake ends later.
      const c = await clientLeg(true);
      const s = await upstreamLeg(false);
      const data = randomBytes(size);
      s.app.end(data);
      // As after a dial: Node reads a connected socket into its buffer before anyone asks.
      s.relaySide.read(0);
      t.ok(await waitFor(() => s.relaySide.readableLength > 0, 3000), `the plain socket holds ${s.relaySide.readableLength} bytes in JS`);
      if (size < 16384) t.ok(await waitFor(() => (s.relaySide as unknown as { _readableState: { ended: boolean } })._readableState.ended, 3000), 'and has seen the FIN');
      const relay = createRelay(c.relaySide, s.relaySide, {});
      t.equal(relay.kind, 'native-tls', 'still the native thread');
      const ch = { c, s, relay };
      const clientRead = readAll(c.app, 10000);
      const r = await clientRead;
      t.equal(r.outcome, 'end', 'clean end (close_notify)');
      t.equal(sha256(r.data), sha256(data), `every byte, in order (${r.data.length})`);
      c.app.end();
      const result = await settles(t, ch, 'complete');
      t.equal(result.upstreamToClientBytes, size, 'counted, the bytes read ahead included');
    });
  }

  t.test('empty transfer: the server ends at once; the client sees a clean end and no data', async (t) => {
    const ch = await channel(t, true, true);
    const clientRead = readAll(ch.c.app, 5000);
    const serverRead = readAll(ch.s.app, 5000);
    ch.s.app.end();
    const [c, s] = await Promise.all([clientRead, serverRead]);
    t.equal(c.outcome, 'end', 'client: clean end');
    t.equal(c.data.length, 0, 'no data');
    t.equal(s.outcome, 'end', 'server: clean end');
    const result = await settles(t, ch, 'complete');
    t.same([result.upstreamToClientBytes, result.clientToUpstreamBytes], [0, 0], 'nothing counted');
  });

  t.test('truncated download: the server TCP connection FINs without close_notify: both legs reset', async (t) => {
    const ch = await channel(t, true, true);
    const clientRead = readAll(ch.c.app, 10000);
    const serverRead = readAll(ch.s.app, 10000);
    const started = new Promise((resolve) => ch.c.app.once('data', resolve));
    ch.s.app.write(randomBytes(1024 * 1024));
    await withTimeout(started, 3000, 'download started');
    ch.s.appRaw.end();
    const c = await clientRead;
    t.ok(resetSeen(c), `the client sees a reset, never a clean end (${c.outcome} ${c.error?.code} after ${c.data.length} bytes)`);
    t.equal((await serverRead).outcome, 'error', 'the server side is reset too');
    await settles(t, ch, 'reset');
  });

  t.test('a download whose client closes its unused direction with a bare FIN (no close_notify): still complete', async (t) => {
    const ch = await channel(t, true, true);
    const data = randomBytes(512 * 1024);
    const clientRead = readAll(ch.c.app, 10000);
    const serverRead = readAll(ch.s.app, 10000);
    // The client's upload direction carried nothing: its FIN without close_notify truncates
    // nothing (RFC 8446 §6.1 asks for close_notify, but many clients close this way).
    ch.c.appRaw.end();
    ch.s.app.end(data);
    const c = await clientRead;
    t.equal(c.outcome, 'end', 'the client gets a clean end');
    t.equal(sha256(c.data), sha256(data), 'every byte');
    const s = await serverRead;
    t.equal(s.outcome, 'end', 'the server sees the client leg end as close_notify and FIN, not a reset');
    const result = await settles(t, ch, 'complete');
    t.equal(result.upstreamToClientBytes, data.length, 'counted');
  });

  t.test('truncated upload: the client TCP connection FINs without close_notify: the server sees a reset', async (t) => {
    const ch = await channel(t, true, true);
    const serverRead = readAll(ch.s.app, 10000);
    ch.c.app.on('error', () => {});
    ch.c.app.write(randomBytes(256 * 1024));
    t.ok(await waitFor(() => ch.relay.clientToUpstreamBytes > 0, 3000, 5), 'upload started');
    ch.c.appRaw.end();
    const s = await serverRead;
    t.ok(resetSeen(s), `the server sees a reset, never a clean end (${s.outcome} ${s.error?.code})`);
    await settles(t, ch, 'reset');
  });

  const BAD: Array<[string, Buffer]> = [
    ['a record that does not authenticate (type 23, garbage body)', Buffer.concat([Buffer.from([23, 3, 3, 0, 64]), randomBytes(64)])],
    ['an outer handshake record after the handshake', Buffer.from([22, 3, 3, 0, 4, 1, 2, 3, 4])],
  ];
  for (const [name, bytes] of BAD) {
    t.test(`injected on the server's TCP connection: ${name}: both legs reset`, async (t) => {
      const ch = await channel(t, true, true);
      const clientRead = readAll(ch.c.app, 10000);
      const serverRead = readAll(ch.s.app, 10000);
      const before = new Promise((resolve) => ch.c.app.once('data', resolve));
      ch.s.app.write('before');
      await withTimeout(before, 3000, 'a real record first');
      ch.s.appRaw.write(bytes);
      const c = await clientRead;
      t.ok(resetSeen(c), `the client sees a reset (${c.outcome} ${c.error?.code})`);
      t.equal(c.data.toString(), 'before', 'what came before arrived');
      t.equal((await serverRead).outcome, 'error', 'the server is reset too');
      await settles(t, ch, 'reset');
    });
  }

  const REFUSED: Array<[string, number, Buffer]> = [
    ['a KeyUpdate (handshake type 24)', 22, Buffer.from([24, 0, 0, 1, 0])],
    ['a fatal alert (handshake_failure)', 21, Buffer.from([2, 40])],
    ['an unknown inner content type', 24, Buffer.from('heartbeat?')],
  ];
  for (const [name, type, body] of REFUSED) {
    t.test(`sealed with the client's keys: ${name} is refused: both legs reset`, async (t) => {
      const ch = await channel(t, true, true);
      const sealNext = clientAppSealer(ch.c);
      const serverRead = readAll(ch.s.app, 10000);
      ch.c.app.on('error', () => {});
      ch.c.appRaw.write(sealNext(23, Buffer.from('hello ')));
      t.ok(await waitFor(() => ch.relay.clientToUpstreamBytes === 6, 3000, 5), 'a record sealed by the test is relayed (keys and sequence right)');
      ch.c.appRaw.write(sealNext(type, body));
      const s = await serverRead;
      t.ok(resetSeen(s), `the server sees a reset (${s.outcome} ${s.error?.code})`);
      t.equal(s.data.toString(), 'hello ', 'what came before arrived');
      await settles(t, ch, 'reset');
    });
  }

  t.test("sealed with the client's keys: a NewSessionTicket is dropped and user_canceled tolerated; the transfer completes", async (t) => {
    const ch = await channel(t, true, true);
    const sealNext = clientAppSealer(ch.c);
    const serverRead = readAll(ch.s.app, 10000);
    const clientEnd = withTimeout(once(ch.c.app, 'end'), 5000, 'client app end');
    const ticket = Buffer.concat([Buffer.from([4, 0, 0, 12]), randomBytes(12)]);
    ch.c.appRaw.write(Buffer.concat([
      sealNext(23, Buffer.from('before-')),
      sealNext(22, ticket),
      sealNext(23, Buffer.from('after')),
      sealNext(21, Buffer.from([1, 90])), // user_canceled, a warning before the close_notify
      sealNext(21, Buffer.from([1, 0])), // close_notify
    ]));
    ch.c.appRaw.end();
    const s = await serverRead;
    t.equal(s.outcome, 'end', 'the server sees a clean end');
    t.equal(s.data.toString(), 'before-after', 'the ticket is not passed on as data');
    await clientEnd;
    const result = await settles(t, ch, 'complete');
    t.equal(result.clientToUpstreamBytes, 'before-after'.length, 'application data counted, the ticket not');
  });

  t.test('abort(): both TLS peers see a reset; done settles aborted', async (t) => {
    const ch = await channel(t, true, true);
    const clientRead = readAll(ch.c.app, 5000);
    const serverRead = readAll(ch.s.app, 5000);
    const arrived = new Promise((resolve) => ch.c.app.once('data', resolve));
    ch.s.app.write('partial');
    await withTimeout(arrived, 3000, 'relayed');
    ch.relay.abort();
    ch.relay.abort();
    const [c, s] = await Promise.all([clientRead, serverRead]);
    t.equal(c.error?.code, 'ECONNRESET', `client: ECONNRESET (${c.outcome})`);
    t.equal(c.data.toString(), 'partial', 'what was relayed before arrived');
    t.equal(s.error?.code, 'ECONNRESET', `server: ECONNRESET (${s.outcome})`);
    await settles(t, ch, 'aborted');
  });

  t.test('idle timeout: nothing moves for idleTimeoutMs: both legs reset, outcome idle', async (t) => {
    const ch = await channel(t, true, true, { idleTimeoutMs: 300 });
    const clientRead = readAll(ch.c.app, 5000);
    const serverRead = readAll(ch.s.app, 5000);
    const started = Date.now();
    const [c, s] = await Promise.all([clientRead, serverRead]);
    t.ok(Date.now() - started >= 250, `not before the timeout (${Date.now() - started} ms)`);
    t.equal(c.error?.code, 'ECONNRESET', `client: ECONNRESET (${c.outcome})`);
    t.equal(s.error?.code, 'ECONNRESET', `server: ECONNRESET (${s.outcome})`);
    await settles(t, ch, 'idle');
  });
}

const implementation = relayImplementation();
if (implementation.kind !== 'splice') t.plan(0, `native relay unavailable: ${implementation.reason}`);
else suite();
