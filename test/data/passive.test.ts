/**
 * PassiveAccept on a real leased port: only the expected peer is accepted (RFC 2577 §8 port
 * stealing, protocol.md §4.2, §8.26), strangers are closed while the listener stays, the
 * listener closes after the accept, and timeouts/cancel give the port back.
 * Ports 21000-21999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { PortPool } from '../../src/data/port-pool.js';
import { PassiveAccept } from '../../src/data/passive.js';
import { isProxyError } from '../../src/errors.js';
import { withTimeout, waitFor } from '../helpers/async.js';

const HOST = '127.0.0.1';
let nextBase = 21000 + Math.floor(Math.random() * 40) * 10;
function pool(): PortPool {
  const first = nextBase;
  nextBase += 10;
  if (nextBase > 21999) nextBase = 21000;
  return new PortPool({ first, last: first + 9 });
}

interface Attempt {
  readonly socket: net.Socket;
  /** How it ended: 'connect-then-closed' | 'reset' | 'refused' | ... */
  readonly outcome: Promise<string>;
  readonly connected: Promise<boolean>;
}

function connectFrom(port: number, localAddress: string): Attempt {
  const socket = net.connect({ host: HOST, port, localAddress });
  let connected = false;
  let error: NodeJS.ErrnoException | null = null;
  const connectedP = new Promise<boolean>((resolve) => {
    socket.once('connect', () => {
      connected = true;
      resolve(true);
    });
    socket.once('close', () => resolve(false));
  });
  socket.on('error', (err: NodeJS.ErrnoException) => {
    error = err;
  });
  socket.on('data', () => {});
  const outcome = new Promise<string>((resolve) => {
    socket.once('close', () => resolve(error ? (error.code ?? 'error') : connected ? 'closed' : 'not-connected'));
  });
  return { socket, outcome, connected: connectedP };
}

function refused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: HOST, port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(false);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'));
  });
}

t.test('a stranger (127.0.0.2) is closed, the real peer (127.0.0.1) is accepted, then the listener closes', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  const strangers: string[] = [];
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000, onStranger: (address) => strangers.push(address) });
  t.teardown(() => accept.cancel('test end'));

  const stranger = connectFrom(lease.port, '127.0.0.2');
  t.teardown(() => stranger.socket.destroy());
  const strangerOutcome = await withTimeout(stranger.outcome, 3000, 'stranger closed');
  t.ok(['ECONNRESET', 'closed'].includes(strangerOutcome), `stranger closed by the proxy (${strangerOutcome})`);
  t.same(strangers, ['127.0.0.2'], 'onStranger reported it');
  t.ok(lease.server.listening, 'listener still open for the real client');
  t.same(p.stats.leased, 1, 'port still leased');

  const real = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => real.socket.destroy());
  t.ok(await withTimeout(real.connected, 3000, 'real client connect'), 'real client connects');
  const socket = await withTimeout(accept.accepted, 3000, 'accepted');
  t.teardown(() => socket.destroy());
  t.equal(socket.remoteAddress, '127.0.0.1', 'accepted socket is the real client');
  t.equal(socket.remotePort, real.socket.localPort, 'the same connection');

  t.ok(await waitFor(() => !lease.server.listening, 2000), 'listener closed after the accept');
  t.same(p.stats.leased, 0, 'port returned to the pool');
  t.ok(await refused(lease.port), 'a later connect is refused');

  // The accepted socket works (it was paused on connect; resuming delivers the bytes).
  const got = new Promise<string>((resolve) => socket.once('data', (d: Buffer) => resolve(d.toString())));
  socket.resume();
  real.socket.write('ping');
  t.equal(await withTimeout(got, 2000, 'data on accepted socket'), 'ping', 'accepted socket carries data');
  t.same(strangers, ['127.0.0.2'], 'the real client was not reported as a stranger');
});

t.test('several strangers before the real peer', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  let strangerCount = 0;
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000, onStranger: () => strangerCount++ });
  t.teardown(() => accept.cancel('test end'));
  for (const address of ['127.0.0.2', '127.0.0.3', '127.0.0.2']) {
    const stranger = connectFrom(lease.port, address);
    t.teardown(() => stranger.socket.destroy());
    await withTimeout(stranger.outcome, 3000, `stranger ${address} closed`);
  }
  t.equal(strangerCount, 3, 'three strangers reported');
  t.ok(lease.server.listening, 'still listening');
  const real = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => real.socket.destroy());
  const socket = await withTimeout(accept.accepted, 3000, 'accepted');
  t.teardown(() => socket.destroy());
  t.equal(socket.remoteAddress, '127.0.0.1');
});

t.test('expectedIp in ::ffff: form still matches an IPv4 peer', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  const accept = new PassiveAccept(lease, { expectedIp: '::ffff:127.0.0.1', timeoutMs: 5000 });
  t.teardown(() => accept.cancel('test end'));
  const real = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => real.socket.destroy());
  const socket = await withTimeout(accept.accepted, 3000, 'accepted');
  t.teardown(() => socket.destroy());
  t.equal(socket.remoteAddress, '127.0.0.1');
});

t.test('timeout rejects with FTPP_ERR_DATA_ACCEPT_TIMEOUT and releases the port', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  const started = Date.now();
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 150 });
  t.teardown(() => accept.cancel('test end'));
  const err = await withTimeout(accept.accepted.then(() => null, (e: unknown) => e), 3000, 'accept timeout');
  t.ok(isProxyError(err, 'FTPP_ERR_DATA_ACCEPT_TIMEOUT'), `coded timeout error (${String(err)})`);
  t.ok(Date.now() - started >= 140, 'not before the timeout');
  t.same(p.stats.leased, 0, 'port released');
  t.notOk(lease.server.listening, 'listener closed');
  t.ok(await refused(lease.port), 'connect refused');
  // A late cancel is harmless.
  accept.cancel('late');
  t.same(p.stats.leased, 0);
});

t.test('cancel rejects, releases the port, and is idempotent', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000 });
  accept.cancel('PASV again');
  accept.cancel('twice');
  const err = await withTimeout(accept.accepted.then(() => null, (e: unknown) => e), 1000, 'cancelled');
  t.ok(isProxyError(err, 'FTPP_ERR_DATA_CONNECT'), `coded error (${String(err)})`);
  t.match((err as Error).message, 'PASV again', 'first reason wins');
  t.same(p.stats.leased, 0, 'port released');
  t.ok(await refused(lease.port), 'connect refused');
});

t.test('cancel after the accept keeps the accepted socket', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000 });
  const real = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => real.socket.destroy());
  const socket = await withTimeout(accept.accepted, 3000, 'accepted');
  t.teardown(() => socket.destroy());
  accept.cancel('late');
  t.notOk(socket.destroyed, 'accepted socket untouched');
  t.same(p.stats.leased, 0);
});

t.test('the accept timer does not fire after a successful accept', async (t) => {
  const p = pool();
  const lease = await p.lease(HOST);
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 100 });
  const real = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => real.socket.destroy());
  const socket = await withTimeout(accept.accepted, 3000, 'accepted');
  t.teardown(() => socket.destroy());
  await new Promise((resolve) => setTimeout(resolve, 200));
  t.notOk(socket.destroyed, 'still open after the accept timeout elapsed');
  t.same(p.stats.leased, 0);
});

t.test('always-bound pool: stranger closed, real peer accepted, later connections closed, port stays bound', async (t) => {
  const p = pool();
  await p.bindAll(HOST);
  t.teardown(() => p.close());
  const lease = await p.lease(HOST);
  const strangers: string[] = [];
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000, onStranger: (a) => strangers.push(a) });
  t.teardown(() => accept.cancel('test end'));
  const stranger = connectFrom(lease.port, '127.0.0.2');
  t.teardown(() => stranger.socket.destroy());
  await withTimeout(stranger.outcome, 3000, 'stranger closed');
  t.same(strangers, ['127.0.0.2'], 'stranger refused and reported');
  const real = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => real.socket.destroy());
  const socket = await withTimeout(accept.accepted, 3000, 'accepted');
  t.teardown(() => socket.destroy());
  t.equal(socket.remotePort, real.socket.localPort, 'the real client');
  t.equal(p.stats.leased, 0, 'lease returned after the accept');
  const late = connectFrom(lease.port, '127.0.0.1');
  t.teardown(() => late.socket.destroy());
  const lateOutcome = await withTimeout(late.outcome, 3000, 'late connection closed');
  t.ok(['ECONNRESET', 'closed'].includes(lateOutcome), `a later connection is closed (${lateOutcome})`);
  t.same(strangers, ['127.0.0.2'], 'connections after the accept are not reported as strangers of this accept');
});

t.test('always-bound pool: accept timeout returns the lease', async (t) => {
  const p = pool();
  await p.bindAll(HOST);
  t.teardown(() => p.close());
  const lease = await p.lease(HOST);
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 100 });
  const err = await withTimeout(accept.accepted.then(() => null, (e: unknown) => e), 3000, 'timeout');
  t.ok(isProxyError(err, 'FTPP_ERR_DATA_ACCEPT_TIMEOUT'), String(err));
  t.equal(p.stats.leased, 0, 'lease returned');
});
