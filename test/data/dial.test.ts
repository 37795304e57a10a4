/**
 * dial(): outbound connect with timeout and cancel, on 127.0.0.1.
 */
import t from 'tap';
import net from 'node:net';
import { dial } from '../../src/data/dial.js';
import { isProxyError } from '../../src/errors.js';
import { closedPort } from '../helpers/fake-server.js';
import { withTimeout, waitFor } from '../helpers/async.js';
import type { TeardownHost } from '../helpers/tap.js';

async function listener(t: TeardownHost): Promise<{ server: net.Server; port: number; connections: () => number }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  t.teardown(() => {
    for (const socket of sockets) socket.destroy();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { server, port: (server.address() as net.AddressInfo).port, connections: () => sockets.size };
}

t.test('connects, with allowHalfOpen by default and the given local address', async (t) => {
  const { port } = await listener(t);
  const d = dial({ host: '127.0.0.1', port, localAddress: '127.0.0.2', timeoutMs: 3000 });
  const socket = await withTimeout(d.connected, 3000, 'dial');
  t.teardown(() => socket.destroy());
  t.equal(socket.remotePort, port);
  t.equal(socket.localAddress, '127.0.0.2', 'bound to the local address');
  t.equal(socket.allowHalfOpen, true, 'half-open allowed (protocol.md §3.2)');
  d.cancel();
  t.notOk(socket.destroyed, 'cancel after connect leaves the socket alone');
});

t.test('connection refused rejects with FTPP_ERR_DATA_CONNECT, or the given code', async (t) => {
  const port = await closedPort();
  const err = await withTimeout(dial({ host: '127.0.0.1', port, timeoutMs: 3000 }).connected.then(() => null, (e: unknown) => e), 3000, 'refused');
  t.ok(isProxyError(err, 'FTPP_ERR_DATA_CONNECT'), `coded error (${String(err)})`);
  t.match((err as Error).message, `127.0.0.1:${port}`, 'message names host:port');
  t.equal(((err as Error).cause as NodeJS.ErrnoException | undefined)?.code, 'ECONNREFUSED', 'cause kept');
  const err2 = await dial({ host: '127.0.0.1', port, timeoutMs: 3000, errorCode: 'FTPP_ERR_UPSTREAM_UNREACHABLE' }).connected.then(() => null, (e: unknown) => e);
  t.ok(isProxyError(err2, 'FTPP_ERR_UPSTREAM_UNREACHABLE'), 'custom code');
});

t.test('timeout: with 1 ms either connects or fails with FTPP_ERR_DATA_CONNECT, and leaks nothing', async (t) => {
  const { port, connections } = await listener(t);
  let timedOut = 0;
  let connected = 0;
  for (let i = 0; i < 30; i++) {
    const result = await withTimeout(
      dial({ host: '127.0.0.1', port, timeoutMs: 1 }).connected.then((socket) => socket, (e: unknown) => e),
      3000,
      'dial with 1 ms timeout settles',
    );
    if (result instanceof net.Socket) {
      connected++;
      result.destroy();
    } else {
      timedOut++;
      t.ok(isProxyError(result, 'FTPP_ERR_DATA_CONNECT'), `coded error (${String(result)})`);
      t.match((result as Error).message, 'timed out', 'says it timed out');
    }
  }
  t.equal(connected + timedOut, 30, `every attempt settled (connected ${connected}, timed out ${timedOut})`);
  t.ok(await waitFor(() => connections() === 0, 3000), 'no connection left open at the server');
});

t.test('cancel before connect rejects and destroys the socket; idempotent', async (t) => {
  const { port, connections } = await listener(t);
  const d = dial({ host: '127.0.0.1', port, timeoutMs: 3000 });
  d.cancel();
  d.cancel();
  const err = await withTimeout(d.connected.then(() => null, (e: unknown) => e), 2000, 'cancelled');
  t.ok(isProxyError(err, 'FTPP_ERR_DATA_CONNECT'), `coded error (${String(err)})`);
  t.match((err as Error).message, 'cancelled');
  t.ok(await waitFor(() => connections() === 0, 2000), 'nothing left at the server');
});

t.test('a timer does not fire after a successful connect', async (t) => {
  const { port } = await listener(t);
  const d = dial({ host: '127.0.0.1', port, timeoutMs: 50 });
  const socket = await withTimeout(d.connected, 3000, 'dial');
  t.teardown(() => socket.destroy());
  await new Promise((resolve) => setTimeout(resolve, 120));
  t.notOk(socket.destroyed, 'socket still open after the timeout elapsed');
});
