/**
 * The data layer with TLS legs (RFC 4217 PROT P, protocol.md §5.4), issue #11: a TLSSocket is
 * never spliced (its handle exposes the TCP descriptor, whose bytes are ciphertext), the JS
 * relay carries its plaintext, and resetSocket() resets a TLSSocket's TCP connection so the
 * peer sees ECONNRESET, never the FIN of a complete transfer (§3.3).
 *
 * TLS sockets are built the way the proxy builds them (§5.4): the TLS server role wraps an
 * accepted socket, `new tls.TLSSocket(sock, { isServer: true, secureContext })`; the TLS
 * client role wraps a connected one, `tls.connect({ socket })`. A self-signed certificate is
 * made with openssl in a temporary directory and removed at teardown.
 *
 * Relay topology: clientApp <-> relay.client  [relay]  relay.upstream <-> serverApp
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { createHash, randomBytes } from 'node:crypto';
import { createRelay, relayImplementation, relayKindFor, SpliceRelay } from '../../src/data/splice-relay.js';
import { DataRelay, resetSocket, type Relay } from '../../src/data/relay.js';
import { delay, waitFor, withTimeout } from '../helpers/async.js';
import { readAll, socketPair, type SocketPair } from '../helpers/sockets.js';
import { makeSelfSigned, type SelfSigned } from '../helpers/tls.js';

/** The type of `t` inside a subtest callback. */
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

let ca: Buffer;
let secureContext: tls.SecureContext;
let certificate: SelfSigned | null = null;

t.before(() => {
  certificate = makeSelfSigned('ftpnp-tls-data-');
  ca = certificate.cert;
  secureContext = tls.createSecureContext({ key: certificate.key, cert: ca });
});

const allSockets = new Set<net.Socket>();
t.teardown(() => {
  // Wrappers first (added after the sockets under them): a TLSSocket closes its parent.
  for (const socket of [...allSockets].reverse()) socket.destroy();
  certificate?.cleanup();
});

/** Two connected plain TCP sockets on loopback: `app` dialled, `inner` accepted (closed with allSockets). */
async function tcpPair(): Promise<SocketPair> {
  const pair = await socketPair({ teardown: () => {} });
  allSockets.add(pair.app);
  allSockets.add(pair.inner);
  return pair;
}

function tlsServer(socket: net.Socket): tls.TLSSocket {
  const wrapped = new tls.TLSSocket(socket, { isServer: true, secureContext });
  allSockets.add(wrapped);
  return wrapped;
}

function tlsClient(socket: net.Socket): tls.TLSSocket {
  const wrapped = tls.connect({ socket, host: '127.0.0.1', ca });
  allSockets.add(wrapped);
  return wrapped;
}

function secured(socket: tls.TLSSocket, isServer: boolean): Promise<void> {
  return withTimeout(new Promise<void>((resolve, reject) => {
    socket.once(isServer ? 'secure' : 'secureConnect', () => resolve());
    socket.once('error', reject);
  }), 5000, 'TLS handshake');
}

/** What the relay (or resetSocket) holds: `inner`, over its TCP socket `innerRaw` (null when it dialled itself). */
interface TlsPair {
  readonly app: tls.TLSSocket;
  readonly appRaw: net.Socket;
  readonly inner: tls.TLSSocket;
  readonly innerRaw: net.Socket | null;
}

/**
 * A TLS connection on loopback. `server`: `inner` is the TLS server on an accepted socket
 * (the proxy's client legs); `client`: `inner` is `tls.connect({ socket })` (upstream legs);
 * `direct`: `inner` is `tls.connect({ host, port })`, which owns its TCP handle.
 */
async function tlsPair(innerRole: 'server' | 'client' | 'direct'): Promise<TlsPair> {
  if (innerRole === 'server') {
    const { app: appRaw, inner: innerRaw } = await tcpPair();
    const inner = tlsServer(innerRaw);
    const app = tlsClient(appRaw);
    await Promise.all([secured(inner, true), secured(app, false)]);
    return { app, appRaw, inner, innerRaw };
  }
  if (innerRole === 'client') {
    const { app: innerRaw, inner: appRaw } = await tcpPair();
    const inner = tlsClient(innerRaw);
    const app = tlsServer(appRaw);
    await Promise.all([secured(inner, false), secured(app, true)]);
    return { app, appRaw, inner, innerRaw };
  }
  const server = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as net.AddressInfo).port;
  const appRawP = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const inner = tls.connect({ host: '127.0.0.1', port, ca });
  allSockets.add(inner);
  const appRaw = await appRawP;
  server.close();
  allSockets.add(appRaw);
  const app = tlsServer(appRaw);
  await Promise.all([secured(inner, false), secured(app, true)]);
  return { app, appRaw, inner, innerRaw: null };
}

/**
 * One message each way. Besides proving the session works, this makes the TLS 1.3 server
 * send its session tickets before a test resets anything: a ticket write that meets the
 * peer's RST is swallowed by Node's TLS layer, which then reports the reset as a clean 'end'
 * (seen on Node 20), a quirk of the observer, not of the reset.
 */
async function exchange(a: tls.TLSSocket, b: tls.TLSSocket): Promise<void> {
  const atB = new Promise((resolve) => b.once('data', resolve));
  a.write('ping');
  await withTimeout(atB, 3000, 'ping');
  const atA = new Promise((resolve) => a.once('data', resolve));
  b.write('pong');
  await withTimeout(atA, 3000, 'pong');
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Resolves on the socket's next 'close' (register it before closing the socket). */
function closed(socket: net.Socket): Promise<void> {
  return withTimeout(new Promise<void>((resolve) => socket.once('close', () => resolve())), 3000, 'socket close');
}

const implementation = relayImplementation();
t.comment(`relay implementation here: ${implementation.kind} (${implementation.reason})`);

t.test('relayKindFor: TLS on either leg means the JS relay; plain untouched TCP may be spliced', async (t) => {
  const plainA = await tcpPair();
  const plainB = await tcpPair();
  t.same(relayKindFor(plainA.inner, plainB.inner).kind, 'splice', 'two fresh plain TCP sockets');

  const tlsLeg = await tlsPair('server');
  const client = relayKindFor(tlsLeg.inner, plainB.inner);
  t.equal(client.kind, 'js', 'TLS client leg');
  t.match(client.reason, /client leg is TLS/, client.reason);
  const upstream = relayKindFor(plainA.inner, tlsLeg.inner);
  t.equal(upstream.kind, 'js', 'TLS upstream leg');
  t.match(upstream.reason, /upstream leg is TLS/, upstream.reason);
  const both = await tlsPair('client');
  t.equal(relayKindFor(tlsLeg.inner, both.inner).kind, 'js', 'TLS on both legs');

  // Node's documented marker of a TLS socket counts as much as the class.
  const marked = await tcpPair();
  Object.assign(marked.inner, { encrypted: true });
  t.equal(relayKindFor(marked.inner, plainB.inner).kind, 'js', 'a socket with encrypted === true');

  plainB.inner.unshift(Buffer.from('early'));
  t.match(relayKindFor(plainA.inner, plainB.inner), { kind: 'js', reason: /upstream leg .*buffered/ }, 'bytes buffered in JS');
});

/** Move `down` from serverApp to clientApp and `up` the other way; both ends FIN (TLS: close_notify + FIN). */
async function transferBothWays(t: Tap, clientApp: net.Socket, serverApp: net.Socket, relay: Relay): Promise<void> {
  const down = randomBytes(2_000_000);
  const up = randomBytes(1_234_567);
  const clientRead = readAll(clientApp, 15000);
  const serverRead = readAll(serverApp, 15000);
  serverApp.end(down);
  clientApp.end(up);
  const [c, s] = await Promise.all([clientRead, serverRead]);
  t.equal(c.outcome, 'end', 'client app sees a clean end');
  t.equal(s.outcome, 'end', 'server app sees a clean end');
  t.equal(sha256(c.data), sha256(down), `download arrives as the plaintext sent (${c.data.length} of ${down.length} bytes)`);
  t.equal(sha256(s.data), sha256(up), `upload arrives as the plaintext sent (${s.data.length} of ${up.length} bytes)`);
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'complete');
  t.equal(result.upstreamToClientBytes, down.length, 'plaintext bytes counted down');
  t.equal(result.clientToUpstreamBytes, up.length, 'plaintext bytes counted up');
}

t.test('createRelay never splices a TLS leg: the JS relay carries plaintext (TLS client leg, plain upstream)', async (t) => {
  const c = await tlsPair('server');
  const s = await tcpPair();
  const relay = createRelay(c.inner, s.inner);
  t.equal(relay.kind, 'js', 'relay.kind says js');
  t.ok(relay instanceof DataRelay && !(relay instanceof SpliceRelay), 'the JS relay, even where the splice addon is built');
  await transferBothWays(t, c.app, s.app, relay);
});

t.test('createRelay never splices a TLS leg: the JS relay carries plaintext (plain client leg, TLS upstream)', async (t) => {
  const c = await tcpPair();
  const s = await tlsPair('client');
  const relay = createRelay(c.inner, s.inner);
  t.equal(relay.kind, 'js', 'relay.kind says js');
  t.ok(relay instanceof DataRelay, 'the JS relay');
  await transferBothWays(t, c.app, s.app, relay);
});

t.test('two plain legs still get the kernel relay where it is built (relay.kind)', async (t) => {
  const c = await tcpPair();
  const s = await tcpPair();
  const relay = createRelay(c.inner, s.inner);
  t.equal(relay.kind, implementation.kind, `kind ${relay.kind}`);
  relay.abort();
  await withTimeout(relay.done, 3000, 'relay done');
});

t.test('SpliceRelay refuses a TLS socket before touching it', async (t) => {
  const c = await tlsPair('server');
  const s = await tcpPair();
  const neverStarted = {
    start: () => {
      throw new Error('the addon must not be reached');
    },
    cancel: () => {},
    bytes: () => 0,
    idleMs: () => 0,
  };
  t.throws(() => new SpliceRelay(c.inner, s.inner, {}, neverStarted, 1, 2), /TLS socket cannot be spliced/);
  t.throws(() => new SpliceRelay(s.inner, c.inner, {}, neverStarted, 1, 2), /TLS socket cannot be spliced/);
});

for (const role of ['server', 'client', 'direct'] as const) {
  const how = {
    server: 'new tls.TLSSocket(accepted, { isServer: true })',
    client: 'tls.connect({ socket })',
    direct: 'tls.connect({ host, port })',
  }[role];
  t.test(`resetSocket on a TLS socket (${how}) resets its TCP connection: the peer sees ECONNRESET`, async (t) => {
    const { app, inner, innerRaw } = await tlsPair(role);
    await exchange(app, inner);
    const peer = readAll(app, 5000);
    const innerClosed = closed(inner);
    t.doesNotThrow(() => resetSocket(inner), 'no exception');
    t.doesNotThrow(() => resetSocket(inner), 'a second call is harmless');
    const r = await peer;
    t.equal(r.outcome, 'error', `the peer sees a reset, not a clean end (${r.outcome})`);
    t.equal(r.error?.code, 'ECONNRESET', 'ECONNRESET');
    await innerClosed;
    t.ok(inner.destroyed, 'the TLS socket is destroyed');
    if (innerRaw) t.ok(innerRaw.destroyed, 'and the TCP socket under it');
    t.doesNotThrow(() => resetSocket(inner), 'a socket already gone is tolerated');
  });
}

t.test('resetSocket on a plain socket that is only marked encrypted still resets it', async (t) => {
  const { app, inner } = await tcpPair();
  Object.assign(inner, { encrypted: true });
  const peer = readAll(app, 3000);
  resetSocket(inner);
  t.equal((await peer).error?.code, 'ECONNRESET', 'the peer sees a reset');
});

t.test('resetSocket right after a handshake, repeated, does not crash the process', async (t) => {
  // Destroying the TLSSocket before its TCP handle had finished closing (while the server's
  // TLS 1.3 session tickets were still being written) ended Node 20 with SIGSEGV.
  for (let i = 0; i < 5; i++) {
    const { app, inner, innerRaw } = await tlsPair('server');
    const peer = readAll(app, 5000);
    const innerClosed = closed(inner);
    resetSocket(inner);
    resetSocket(inner);
    setImmediate(() => resetSocket(inner));
    await innerClosed;
    t.ok(inner.destroyed && innerRaw?.destroyed, `round ${i + 1}: both sockets destroyed`);
    t.equal((await peer).error?.code, 'ECONNRESET', `round ${i + 1}: the peer sees a reset`);
  }
});

/** clientApp (TLS client) <-> relay.client (TLS server) [JS relay] relay.upstream <-> serverApp (plain). */
async function tlsClientLegRelay(): Promise<{ c: TlsPair; serverApp: net.Socket; relay: Relay }> {
  const c = await tlsPair('server');
  const s = await tcpPair();
  return { c, serverApp: s.app, relay: createRelay(c.inner, s.inner) };
}

t.test('the TLS leg fails (its peer resets mid-download): the plain leg is reset too', async (t) => {
  const { c, serverApp, relay } = await tlsClientLegRelay();
  const serverRead = readAll(serverApp, 10000);
  c.app.on('error', () => {});
  const gotData = new Promise((resolve) => c.app.once('data', resolve));
  serverApp.write(randomBytes(100_000));
  await withTimeout(gotData, 3000, 'download started');
  c.appRaw.resetAndDestroy();
  const s = await serverRead;
  t.equal(s.outcome, 'error', `the server sees a reset, never a clean end (${s.outcome})`);
  t.equal(s.error?.code, 'ECONNRESET', 'ECONNRESET');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset', 'outcome reset');
});

t.test('the TLS leg fails mid-upload: the plain leg is reset too (a truncated upload stays visible)', async (t) => {
  const { c, serverApp, relay } = await tlsClientLegRelay();
  const serverRead = readAll(serverApp, 10000);
  c.app.on('error', () => {});
  c.app.write(randomBytes(100_000));
  t.ok(await waitFor(() => relay.clientToUpstreamBytes > 0, 3000, 10), 'upload started');
  c.appRaw.resetAndDestroy();
  const s = await serverRead;
  t.equal(s.outcome, 'error', `the server sees a reset, never a clean end (${s.outcome})`);
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset', 'outcome reset');
});

t.test('the plain leg fails: the TLS leg is reset on its TCP connection, not closed with a FIN', async (t) => {
  const { c, serverApp, relay } = await tlsClientLegRelay();
  const clientRead = readAll(c.app, 10000);
  serverApp.write(randomBytes(100_000));
  t.ok(await waitFor(() => relay.upstreamToClientBytes === 100_000, 3000, 10), 'bytes relayed');
  serverApp.resetAndDestroy();
  const r = await clientRead;
  t.equal(r.outcome, 'error', `the TLS client sees a reset, never a clean end (${r.outcome})`);
  t.equal(r.error?.code, 'ECONNRESET', 'ECONNRESET');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset', 'outcome reset');
});

t.test('the plain leg fails with TLS upstream: the TLS server sees a reset', async (t) => {
  const cp = await tcpPair();
  const s = await tlsPair('client');
  const relay = createRelay(cp.inner, s.inner);
  const serverRead = readAll(s.app, 10000);
  cp.app.on('error', () => {});
  cp.app.write(randomBytes(100_000));
  t.ok(await waitFor(() => relay.clientToUpstreamBytes === 100_000, 3000, 10), 'bytes relayed');
  cp.app.resetAndDestroy();
  const r = await serverRead;
  t.equal(r.outcome, 'error', `the TLS server sees a reset, never a clean end (${r.outcome})`);
  t.equal(r.error?.code, 'ECONNRESET', 'ECONNRESET');
  t.equal((await withTimeout(relay.done, 5000, 'relay done')).outcome, 'reset');
});

t.test('abort() resets the TLS leg and the plain leg', async (t) => {
  const { c, serverApp, relay } = await tlsClientLegRelay();
  const clientRead = readAll(c.app, 5000);
  const serverRead = readAll(serverApp, 5000);
  const arrived = new Promise((resolve) => c.app.once('data', resolve));
  serverApp.write('partial');
  await withTimeout(arrived, 3000, 'plaintext relayed');
  relay.abort();
  relay.abort();
  const [r, s] = await Promise.all([clientRead, serverRead]);
  t.equal(r.outcome, 'error', 'TLS client sees a reset');
  t.equal(r.error?.code, 'ECONNRESET');
  t.equal(r.data.toString(), 'partial', 'the plaintext relayed before the abort arrived');
  t.equal(s.outcome, 'error', 'server sees a reset');
  t.equal(s.error?.code, 'ECONNRESET');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'aborted');
  t.ok(c.innerRaw?.destroyed, 'the TCP socket under the TLS leg is closed');
});

t.test('the TLS peer resets while the relay holds the TLS leg back (slow server): the server sees a reset', async (t) => {
  const { c, serverApp, relay } = await tlsClientLegRelay();
  serverApp.pause();
  c.app.on('error', () => {});
  const chunk = Buffer.alloc(1024 * 1024, 1);
  for (let i = 0; i < 32; i++) c.app.write(chunk);
  t.ok(await waitFor(() => relay.client.isPaused(), 5000, 10), 'the relay paused the TLS leg');
  await delay(200);
  c.appRaw.resetAndDestroy();
  await delay(200);
  const s = await readAll(serverApp, 10000);
  t.equal(s.outcome, 'error', `the server sees a reset, not a clean end (${s.outcome} after ${s.data.length} bytes)`);
  t.equal((await withTimeout(relay.done, 5000, 'relay done')).outcome, 'reset', 'outcome reset');
});

t.test('the TLS server resets while the relay holds the TLS upstream leg back (slow client): the client sees a reset', async (t) => {
  const cp = await tcpPair();
  const s = await tlsPair('client');
  const relay = createRelay(cp.inner, s.inner);
  cp.app.pause();
  s.app.on('error', () => {});
  const chunk = Buffer.alloc(1024 * 1024, 2);
  for (let i = 0; i < 32; i++) s.app.write(chunk);
  t.ok(await waitFor(() => relay.upstream.isPaused(), 5000, 10), 'the relay paused the TLS leg');
  await delay(200);
  s.appRaw.resetAndDestroy();
  await delay(200);
  const c = await readAll(cp.app, 10000);
  t.equal(c.outcome, 'error', `the client sees a reset, not a clean end (${c.outcome} after ${c.data.length} bytes)`);
  t.equal((await withTimeout(relay.done, 5000, 'relay done')).outcome, 'reset', 'outcome reset');
});

t.test('TLS on both legs with a reader that keeps up: the relay does not stop reading for every TLS record', async (t) => {
  // Issue #12 (both-legs RETR at 0.52x of direct FTPS): a TLSSocket delivers one 16 KiB
  // record per chunk, which is the sink's whole highWaterMark, so write() returned false for
  // every record and the relay paused and resumed the server's leg once per record.
  const c = await tlsPair('server');
  const s = await tlsPair('client');
  const relay = createRelay(c.inner, s.inner);
  let pauses = 0;
  const pause = s.inner.pause.bind(s.inner);
  s.inner.pause = () => {
    pauses += 1;
    return pause();
  };
  const total = 8 * 1024 * 1024;
  const records = total / (16 * 1024);
  const clientRead = readAll(c.app, 15000);
  s.app.on('data', () => {});
  s.app.end(randomBytes(total));
  c.app.end();
  const r = await clientRead;
  t.equal(r.outcome, 'end', 'clean end');
  t.equal(r.data.length, total, 'every byte arrived');
  t.ok(pauses < records / 8, `the server leg was paused ${pauses} times for ${records} records`);
  t.equal((await withTimeout(relay.done, 5000, 'relay done')).outcome, 'complete');
});
