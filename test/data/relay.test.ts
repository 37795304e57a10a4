/**
 * DataRelay with real sockets: byte counts, backpressure with a slow reader, half-close
 * (protocol.md §3.2, §8.24), resets passed on as resets (§3.3, §8.23), abort, done and
 * directionFinished timing.
 *
 * Topology: clientApp <-> relay.client  [DataRelay]  relay.upstream <-> serverApp
 */
import t from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { DataRelay, resetSocket, type RelayResult } from '../../src/data/relay.js';
import { readAll, withTimeout, delay, waitFor } from '../helpers/ftp-client.js';

interface Pair {
  /** The outer end (the "real" client or server). */
  readonly app: net.Socket;
  /** The end the relay owns. */
  readonly inner: net.Socket;
}

const allSockets = new Set<net.Socket>();
t.teardown(() => {
  for (const socket of allSockets) socket.destroy();
});

async function socketPair(): Promise<Pair> {
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as net.AddressInfo).port;
  const innerP = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const app = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => {
    app.once('connect', () => resolve());
    app.once('error', reject);
  });
  const inner = await innerP;
  server.close();
  allSockets.add(app);
  allSockets.add(inner);
  return { app, inner };
}

async function setup(options: { idleTimeoutMs?: number } = {}): Promise<{ clientApp: net.Socket; serverApp: net.Socket; relay: DataRelay }> {
  const c = await socketPair();
  const s = await socketPair();
  const relay = new DataRelay(c.inner, s.inner, options);
  return { clientApp: c.app, serverApp: s.app, relay };
}

function isSettled(promise: Promise<unknown>): Promise<boolean> {
  let settled = false;
  void promise.then(() => {
    settled = true;
  });
  return new Promise((resolve) => setImmediate(() => resolve(settled)));
}

/** Write `total` bytes honouring the writer's own backpressure, then FIN. */
async function writeWithBackpressure(socket: net.Socket, total: number, chunkSize = 64 * 1024): Promise<void> {
  const chunk = Buffer.alloc(chunkSize, 0x61);
  let sent = 0;
  while (sent < total) {
    const n = Math.min(chunkSize, total - sent);
    sent += n;
    if (!socket.write(n === chunkSize ? chunk : chunk.subarray(0, n))) {
      await new Promise<void>((resolve) => socket.once('drain', () => resolve()));
    }
  }
  socket.end();
}

t.test('bytes both ways, counted, complete outcome', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  const down = randomBytes(300_000);
  const up = randomBytes(123_457);
  const clientRead = readAll(clientApp, 10000);
  const serverRead = readAll(serverApp, 10000);
  serverApp.end(down);
  clientApp.end(up);
  const [c, s] = await Promise.all([clientRead, serverRead]);
  t.equal(c.outcome, 'end', 'client sees a clean end');
  t.equal(s.outcome, 'end', 'server sees a clean end');
  t.ok(c.data.equals(down), 'client got the download byte for byte');
  t.ok(s.data.equals(up), 'server got the upload byte for byte');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'complete');
  t.equal(result.upstreamToClientBytes, down.length, 'download count');
  t.equal(result.clientToUpstreamBytes, up.length, 'upload count');
  t.equal(relay.upstreamToClientBytes, down.length);
  t.equal(relay.clientToUpstreamBytes, up.length);
  t.ok(result.durationMs >= 0, 'duration');
});

t.test('backpressure: a slow reader pauses the sender and memory stays bounded (32 MiB)', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  const total = 32 * 1024 * 1024;
  let maxWritable = 0;
  let maxReadable = 0;
  let sawPaused = false;
  const sampler = setInterval(() => {
    maxWritable = Math.max(maxWritable, relay.client.writableLength);
    maxReadable = Math.max(maxReadable, relay.upstream.readableLength);
    if (relay.upstream.isPaused()) sawPaused = true;
  }, 2);
  t.teardown(() => clearInterval(sampler));
  // Also sample right after each chunk the relay reads.
  relay.upstream.on('data', () => {
    maxWritable = Math.max(maxWritable, relay.client.writableLength);
    maxReadable = Math.max(maxReadable, relay.upstream.readableLength);
  });
  // Slow reader: one chunk, then a pause.
  let received = 0;
  const clientDone = new Promise<string>((resolve) => {
    clientApp.on('data', (chunk: Buffer) => {
      received += chunk.length;
      clientApp.pause();
      setTimeout(() => clientApp.resume(), 1);
    });
    clientApp.once('end', () => {
      clientApp.end();
      resolve('end');
    });
    clientApp.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
  });
  const writer = writeWithBackpressure(serverApp, total);
  t.equal(await withTimeout(clientDone, 60000, '32 MiB through the relay'), 'end', 'clean end');
  await writer;
  clearInterval(sampler);
  t.equal(received, total, 'every byte arrived');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.upstreamToClientBytes, total, 'counted');
  t.ok(sawPaused, 'the relay paused the upstream socket while the client was slow');
  t.ok(maxWritable <= 1024 * 1024, `client writable buffer bounded: max ${maxWritable} bytes`);
  t.ok(maxReadable <= 1024 * 1024, `upstream readable buffer bounded: max ${maxReadable} bytes`);
});

t.test('half-close: client FIN right after connect still gets the whole download (§8.24)', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  const down = randomBytes(4 * 1024 * 1024);
  const clientRead = readAll(clientApp, 20000);
  const serverRead = readAll(serverApp, 20000, false); // the server keeps writing after the FIN
  clientApp.end(); // FIN at once, still reading
  await delay(50);
  serverApp.end(down);
  const [c, s] = await Promise.all([clientRead, serverRead]);
  t.equal(c.outcome, 'end', 'clean end for the client');
  t.equal(c.data.length, down.length, 'all 4 MiB delivered');
  t.ok(c.data.equals(down), 'byte for byte');
  t.equal(s.outcome, 'end', 'server saw the client FIN as a FIN');
  t.equal(s.data.length, 0, 'nothing uploaded');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'complete');
});

t.test('server reset mid-download reaches the client as a reset, never a clean end (§8.23)', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  const clientRead = readAll(clientApp, 10000);
  serverApp.write(randomBytes(100_000));
  await delay(100);
  serverApp.resetAndDestroy();
  const c = await clientRead;
  t.equal(c.outcome, 'error', 'client sees an error, not an end');
  t.equal(c.error?.code, 'ECONNRESET', 'ECONNRESET');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset', 'outcome reset');
});

t.test('client reset mid-upload reaches the server as a reset (truncated upload stays visible)', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  const serverRead = readAll(serverApp, 10000);
  clientApp.write(randomBytes(100_000));
  await delay(100);
  clientApp.resetAndDestroy();
  const s = await serverRead;
  t.equal(s.outcome, 'error', 'server sees an error, not an end');
  t.equal(s.error?.code, 'ECONNRESET', 'ECONNRESET');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset');
});

/**
 * Put 32 MiB into `writer` at once (far more than the loopback buffers take, even
 * autotuned) and wait until the relay has paused `relaySide` for backpressure. A slow trickle
 * does not reproduce the libuv quirk these tests are about; a large queued burst does.
 */
async function fillUntilPaused(writer: net.Socket, relaySide: net.Socket, timeoutMs = 3000): Promise<boolean> {
  const chunk = Buffer.alloc(1024 * 1024, 1);
  for (let i = 0; i < 32; i++) writer.write(chunk);
  const paused = await waitFor(() => relaySide.isPaused(), timeoutMs, 10);
  await delay(200); // let the buffers fill up completely
  return paused && relaySide.isPaused();
}

t.test('client reset while the relay has it paused (backpressure) still reaches the server as a reset', async (t) => {
  // Regression: libuv reports an RST that lands on a socket whose reading is stopped as a
  // plain EOF after the buffered bytes (POLLHUP after a partial read), so a truncated upload
  // under backpressure used to be passed upstream as a clean FIN, and the server said 226.
  const { clientApp, serverApp, relay } = await setup();
  serverApp.pause(); // a slow server: the relay must pause the client
  clientApp.on('error', () => {});
  t.ok(await fillUntilPaused(clientApp, relay.client), 'the relay paused the client leg');
  clientApp.resetAndDestroy();
  await delay(200);
  const serverRead = readAll(serverApp, 10000);
  const s = await serverRead;
  t.equal(s.outcome, 'error', `the server sees a reset, not a clean end (${s.outcome} after ${s.data.length} bytes)`);
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset', 'outcome reset');
});

t.test('server reset while the relay has it paused (slow client) reaches the client as a reset', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  clientApp.pause(); // a slow client: the relay must pause the server leg
  serverApp.on('error', () => {});
  t.ok(await fillUntilPaused(serverApp, relay.upstream), 'the relay paused the upstream leg');
  serverApp.resetAndDestroy();
  await delay(200);
  // Read quickly from now on, so this side's own reading does not hit the same libuv quirk.
  const c = await readAll(clientApp, 10000);
  t.equal(c.outcome, 'error', `the client sees a reset, not a clean end (${c.outcome} after ${c.data.length} bytes)`);
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset', 'outcome reset');
});

t.test('a reset after one direction already ended is still a reset on the other side', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  // Download finished cleanly, the client has not closed yet; then the client resets.
  const serverRead = readAll(serverApp, 10000);
  const gotEnd = new Promise<void>((resolve) => clientApp.once('end', () => resolve()));
  clientApp.on('data', () => {});
  serverApp.end(Buffer.from('done'));
  await withTimeout(gotEnd, 3000, 'client got end');
  clientApp.resetAndDestroy();
  const s = await serverRead;
  t.equal(s.outcome, 'error', `server sees a reset (${s.outcome})`);
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'reset');
});

t.test('abort() resets both legs', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  const clientRead = readAll(clientApp, 5000);
  const serverRead = readAll(serverApp, 5000);
  serverApp.write('partial');
  await delay(50);
  relay.abort();
  relay.abort();
  const [c, s] = await Promise.all([clientRead, serverRead]);
  t.equal(c.outcome, 'error', 'client sees a reset');
  t.equal(c.error?.code, 'ECONNRESET');
  t.equal(s.outcome, 'error', 'server sees a reset');
  t.equal(s.error?.code, 'ECONNRESET');
  const result = await withTimeout(relay.done, 5000, 'relay done');
  t.equal(result.outcome, 'aborted');
  t.ok(relay.client.destroyed && relay.upstream.destroyed, 'both inner sockets destroyed');
});

t.test('done resolves only once both sockets closed', async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  clientApp.on('data', () => {});
  serverApp.on('data', () => {});
  const clientEnded = new Promise<void>((resolve) => clientApp.once('end', () => resolve()));
  serverApp.end('download');
  await withTimeout(clientEnded, 3000, 'client end');
  await delay(100);
  t.notOk(await isSettled(relay.done), 'download finished but the client leg is still open: not done');
  t.ok(await isSettled(relay.directionFinished('toClient')), 'the download direction is finished');
  t.notOk(await isSettled(relay.directionFinished('toUpstream')), 'the upload direction is not');
  clientApp.end();
  const result: RelayResult = await withTimeout(relay.done, 3000, 'relay done');
  t.equal(result.outcome, 'complete');
  t.ok(relay.client.closed && relay.upstream.closed, 'both closed when done resolves');
  t.ok(await isSettled(relay.directionFinished('toUpstream')), 'every direction settled at done');
});

t.test("directionFinished waits for the sink's 'finish', not for the source's end", async (t) => {
  const { clientApp, serverApp, relay } = await setup();
  clientApp.pause(); // slow client: nothing read yet
  const total = 16 * 1024 * 1024; // more than the loopback socket buffers hold
  const writer = writeWithBackpressure(serverApp, total);
  let finishedAt = -1;
  let writableFinishedThen = false;
  void relay.directionFinished('toClient').then(() => {
    finishedAt = relay.upstreamToClientBytes;
    writableFinishedThen = relay.client.writableFinished;
  });
  await delay(300);
  t.equal(finishedAt, -1, 'not finished while the client has not read');
  const clientRead = readAll(clientApp, 30000);
  const c = await clientRead;
  await writer;
  t.equal(c.data.length, total, 'all bytes');
  await withTimeout(relay.directionFinished('toClient'), 3000, 'direction finished');
  t.equal(finishedAt, total, 'resolved after every byte passed');
  t.ok(writableFinishedThen, "the client socket had emitted 'finish' when it resolved");
});

t.test('idle timeout resets both legs', async (t) => {
  const { clientApp, serverApp, relay } = await setup({ idleTimeoutMs: 150 });
  const clientRead = readAll(clientApp, 5000);
  const serverRead = readAll(serverApp, 5000);
  const [c, s] = await Promise.all([clientRead, serverRead]);
  t.equal(c.outcome, 'error', 'client reset');
  t.equal(s.outcome, 'error', 'server reset');
  const result = await withTimeout(relay.done, 3000, 'relay done');
  t.equal(result.outcome, 'idle', 'outcome tells an idle timeout apart');
});

t.test('a relay built on an already-closed socket still settles', async (t) => {
  const c = await socketPair();
  const s = await socketPair();
  s.inner.destroy();
  await new Promise<void>((resolve) => (s.inner.closed ? resolve() : s.inner.once('close', () => resolve())));
  const relay = new DataRelay(c.inner, s.inner);
  const clientRead = readAll(c.app, 3000);
  const result = await withTimeout(relay.done, 3000, 'relay done');
  t.ok(result, 'done resolved');
  const r = await clientRead;
  t.not(r.outcome, 'end', `the client is not told the transfer completed (${r.outcome})`);
});

t.test('resetSocket tolerates destroyed sockets', async (t) => {
  const { app, inner } = await socketPair();
  const read = readAll(app, 3000);
  resetSocket(inner);
  resetSocket(inner);
  const r = await read;
  t.equal(r.outcome, 'error', 'peer sees a reset');
});
