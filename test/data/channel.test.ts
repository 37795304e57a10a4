/**
 * DataChannel with real sockets: one owner for every socket from the moment it exists, one
 * idempotent close that resets everything, pairing into a relay, and directionDone.
 * Relay ports 29000-29499 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { PortPool } from '../../src/data/port-pool.js';
import { PassiveAccept } from '../../src/data/passive.js';
import { DataChannel } from '../../src/data/channel.js';
import { dial } from '../../src/data/dial.js';
import type { RelayResult } from '../../src/data/relay.js';
import { openData } from '../helpers/ftp-client.js';
import { withTimeout, waitFor } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';

// Its own block, away from the other data test files (port-pool 20000-20999, passive 21000-21999).
let nextBase = 29000 + Math.floor(Math.random() * 40) * 10;
function pool(): PortPool {
  const first = nextBase;
  nextBase += 10;
  if (nextBase > 29499) nextBase = 29000;
  return new PortPool({ first, last: first + 9 });
}

async function upstreamServer(t: { teardown(fn: () => unknown): void }): Promise<{ port: number; accepted: Promise<net.Socket> }> {
  const sockets: net.Socket[] = [];
  const server = net.createServer({ allowHalfOpen: true });
  const accepted = new Promise<net.Socket>((resolve) =>
    server.on('connection', (socket) => {
      sockets.push(socket);
      resolve(socket);
    }),
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  t.teardown(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  return { port: (server.address() as net.AddressInfo).port, accepted };
}

t.test('a client socket accepted before pair() is reset when the channel closes', async (t) => {
  const p = pool();
  const lease = await p.lease('127.0.0.1');
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000 });
  const channel = new DataChannel({ kind: 'passive', accept }, { kind: 'passive', target: { host: '127.0.0.1', port: 1 } });
  let settled: [RelayResult | null, string] | null = null;
  channel.onSettled = (result, reason) => {
    settled = [result, reason];
  };
  const client = await openData('127.0.0.1', lease.port);
  t.teardown(() => client.destroy());
  const read = readAll(client, 3000);
  await withTimeout(accept.accepted, 2000, 'accepted');
  channel.close('PASV again');
  channel.close('twice');
  const result = await read;
  t.equal(result.outcome, 'error', `the client sees a reset (${result.outcome})`);
  t.same(settled, [null, 'PASV again'], 'settled once, first reason, no relay');
  t.same(channel.state, { status: 'closed', reason: 'PASV again' });
  t.equal(p.stats.leased, 0, 'port released');
});

t.test('pair(): client and upstream relayed, directionDone after the download is flushed', async (t) => {
  const p = pool();
  const lease = await p.lease('127.0.0.1');
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000 });
  const up = await upstreamServer(t);
  const channel = new DataChannel({ kind: 'passive', accept }, { kind: 'passive', target: { host: '127.0.0.1', port: up.port } });
  const settled = new Promise<[RelayResult | null, string]>((resolve) => {
    channel.onSettled = (result, reason) => resolve([result, reason]);
  });
  const client = await openData('127.0.0.1', lease.port);
  t.teardown(() => client.destroy());
  const upstreamSocket = await withTimeout(channel.track(dial({ host: '127.0.0.1', port: up.port, timeoutMs: 2000 })).connected, 3000, 'dial');
  channel.pair({ clientSocket: null, upstreamSocket, idleTimeoutMs: 0 });
  const server = await up.accepted;
  const read = readAll(client, 5000);
  const done = channel.directionDone('download');
  server.end(Buffer.alloc(100_000, 7));
  await withTimeout(done, 3000, 'directionDone');
  const result = await read;
  t.equal(result.data.length, 100_000, 'all bytes');
  t.equal(result.outcome, 'end', 'clean end');
  t.equal(channel.bytes.toClient, 100_000, 'counted');
  server.on('data', () => {});
  const [relayResult, reason] = await withTimeout(settled, 3000, 'settled');
  t.equal(relayResult?.outcome, 'complete');
  t.equal(reason, 'complete');
  t.ok(channel.isClosed);
});

t.test('an accept timeout closes the channel and resets the upstream leg', async (t) => {
  const p = pool();
  const lease = await p.lease('127.0.0.1');
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 150 });
  const up = await upstreamServer(t);
  const channel = new DataChannel({ kind: 'passive', accept }, { kind: 'passive', target: { host: '127.0.0.1', port: up.port } });
  const settled = new Promise<string>((resolve) => {
    channel.onSettled = (_result, reason) => resolve(reason);
  });
  const upstreamSocket = await withTimeout(channel.track(dial({ host: '127.0.0.1', port: up.port, timeoutMs: 2000 })).connected, 3000, 'dial');
  channel.pair({ clientSocket: null, upstreamSocket, idleTimeoutMs: 0 });
  const server = await up.accepted;
  const serverRead = readAll(server, 3000);
  const reason = await withTimeout(settled, 3000, 'settled');
  t.match(reason, /pairing failed/, `reason: ${reason}`);
  const r = await serverRead;
  t.equal(r.outcome, 'error', 'the server sees a reset, so it reports a failed transfer');
  t.equal(p.stats.leased, 0, 'port released');
});

t.test('close() cancels a dial in progress and resolves directionDone', async (t) => {
  const p = pool();
  const lease = await p.lease('127.0.0.1');
  const accept = new PassiveAccept(lease, { expectedIp: '127.0.0.1', timeoutMs: 5000 });
  const up = await upstreamServer(t);
  const channel = new DataChannel({ kind: 'passive', accept }, { kind: 'passive', target: { host: '127.0.0.1', port: up.port } });
  const attempt = channel.track(dial({ host: '127.0.0.1', port: up.port, timeoutMs: 2000 }));
  const done = channel.directionDone('upload');
  channel.close('session closed');
  await withTimeout(done, 1000, 'directionDone resolves on close');
  const outcome = await attempt.connected.then((s) => (s.destroyed ? 'destroyed' : 'open'), () => 'rejected');
  t.ok(outcome === 'rejected' || outcome === 'destroyed', `dial cancelled (${outcome})`);
  t.ok(await waitFor(() => p.stats.leased === 0, 1000), 'port released');
});
