/**
 * The kernel relay (SpliceRelay, src/native/) against the same behaviours as the JS relay's
 * test/data/relay.test.ts: byte counts, backpressure, half-close (protocol.md §3.2, §8.24),
 * resets passed on as resets (§3.3, §8.23) including while the relay is not reading, abort,
 * done and directionFinished timing, idle timeout. Skips when the addon is not built, except
 * in CI (CI=true), where `npm ci` must have built it and a missing addon is a failure.
 * Topology: clientApp <-> relay.client  [SpliceRelay]  relay.upstream <-> serverApp
 */
import t, { type TAP } from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { createRelay, loadSpliceAddon, relayImplementation, SpliceRelay, type SpliceAddon } from '../../src/data/splice-relay.js';
import type { Relay, RelayResult } from '../../src/data/relay.js';
import { delay, readAll, withTimeout } from '../helpers/ftp-client.js';

const implementation = relayImplementation();
if (implementation.kind !== 'splice' && process.env.CI === 'true' && process.env.FTPNP_RELAY !== 'js') {
  t.fail(`CI must build the splice relay (npm ci runs src/native/install.sh): ${implementation.reason}`);
} else if (implementation.kind !== 'splice') {
  t.plan(0, `splice relay unavailable: ${implementation.reason}`);
} else {
  t.test('splice through pipes', async (t) => run(t, null));
  // The thread's fallback when no pipe can be made (descriptor or pipe-page limits).
  t.test('bounce buffer (no pipe)', async (t) => run(t, -1));
}

/** The type of `t` inside a subtest callback. */
type Tap = Parameters<Parameters<TAP['test']>[0]>[0];

function run(t: Tap, pipeBytes: number | null): void {
  const real = loadSpliceAddon().addon!;
  // The addon's functions are not enumerable: wrap each one.
  const addon: SpliceAddon = {
    start: (clientFd, upstreamFd, pipe, onEvent) => real.start(clientFd, upstreamFd, pipeBytes ?? pipe, onEvent),
    cancel: (handle) => real.cancel(handle),
    bytes: (handle, direction) => real.bytes(handle, direction),
    idleMs: (handle) => real.idleMs(handle),
  };
  const allSockets = new Set<net.Socket>();
  t.teardown(() => {
    for (const socket of allSockets) socket.destroy();
  });

  async function socketPair(): Promise<{ app: net.Socket; inner: net.Socket }> {
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

  async function setup(options: { idleTimeoutMs?: number } = {}): Promise<{ clientApp: net.Socket; serverApp: net.Socket; relay: Relay }> {
    const c = await socketPair();
    const s = await socketPair();
    const fd = (socket: net.Socket): number => (socket as unknown as { _handle: { fd: number } })._handle.fd;
    const relay = pipeBytes === null ? createRelay(c.inner, s.inner, options) : new SpliceRelay(c.inner, s.inner, options, addon, fd(c.inner), fd(s.inner));
    if (!(relay instanceof SpliceRelay)) throw new Error('createRelay did not pick the splice relay');
    return { clientApp: c.app, serverApp: s.app, relay };
  }

  function isSettled(promise: Promise<unknown>): Promise<boolean> {
    let settled = false;
    void promise.then(() => {
      settled = true;
    });
    return new Promise((resolve) => setImmediate(() => resolve(settled)));
  }

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
    const down = randomBytes(3_000_000);
    const up = randomBytes(1_234_567);
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
    t.ok(relay.client.destroyed && relay.upstream.destroyed, 'both inner sockets closed');
  });

  t.test('empty transfer: FIN both ways, zero bytes, complete', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    const clientRead = readAll(clientApp, 5000);
    const serverRead = readAll(serverApp, 5000);
    serverApp.end();
    clientApp.end();
    const [c, s] = await Promise.all([clientRead, serverRead]);
    t.equal(c.outcome, 'end');
    t.equal(s.outcome, 'end');
    const result = await withTimeout(relay.done, 5000, 'relay done');
    t.same([result.outcome, result.upstreamToClientBytes, result.clientToUpstreamBytes], ['complete', 0, 0]);
  });

  t.test('backpressure: a slow reader holds the sender back; the relay buffers a bounded amount (32 MiB)', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    const total = 32 * 1024 * 1024;
    let received = 0;
    let maxAhead = 0;
    let senderBlocked = false;
    const sampler = setInterval(() => {
      maxAhead = Math.max(maxAhead, relay.upstreamToClientBytes - received);
      if (serverApp.writableLength > 0) senderBlocked = true;
    }, 2);
    t.teardown(() => clearInterval(sampler));
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
    t.ok(senderBlocked, 'the sender saw backpressure');
    // Read from the server but not yet delivered: the pipe plus the client socket's buffers.
    t.ok(maxAhead <= 16 * 1024 * 1024, `bounded read-ahead: max ${maxAhead} bytes`);
  });

  t.test('half-close: client FIN right after connect still gets the whole download (§8.24)', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    const down = randomBytes(4 * 1024 * 1024);
    const clientRead = readAll(clientApp, 20000);
    const serverRead = readAll(serverApp, 20000, false);
    clientApp.end();
    await delay(50);
    serverApp.end(down);
    const [c, s] = await Promise.all([clientRead, serverRead]);
    t.equal(c.outcome, 'end', 'clean end for the client');
    t.ok(c.data.equals(down), 'all 4 MiB, byte for byte');
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
    t.equal(c.data.length, 100_000, 'the bytes before the reset arrived');
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

  t.test('client reset while the relay is held back (slow server) still reaches the server as a reset', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    serverApp.pause();
    clientApp.on('error', () => {});
    const chunk = Buffer.alloc(64 * 1024, 1);
    for (let i = 0; i < 64; i++) clientApp.write(chunk);
    await delay(200);
    clientApp.resetAndDestroy();
    await delay(200);
    const s = await readAll(serverApp, 10000);
    t.equal(s.outcome, 'error', `the server sees a reset, not a clean end (${s.outcome} after ${s.data.length} bytes)`);
    const result = await withTimeout(relay.done, 5000, 'relay done');
    t.equal(result.outcome, 'reset', 'outcome reset');
  });

  t.test('server reset while the relay is held back (slow client) reaches the client as a reset', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    clientApp.pause();
    serverApp.on('error', () => {});
    const chunk = Buffer.alloc(64 * 1024, 2);
    for (let i = 0; i < 64; i++) serverApp.write(chunk);
    await delay(200);
    serverApp.resetAndDestroy();
    await delay(200);
    const c = await readAll(clientApp, 10000);
    t.equal(c.outcome, 'error', `the client sees a reset, not a clean end (${c.outcome} after ${c.data.length} bytes)`);
    const result = await withTimeout(relay.done, 5000, 'relay done');
    t.equal(result.outcome, 'reset', 'outcome reset');
  });

  t.test('a reset after one direction already ended is still a reset on the other side', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
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
    t.equal(c.data.toString(), 'partial', 'what was relayed before the abort arrived');
    t.equal(s.outcome, 'error', 'server sees a reset');
    t.equal(s.error?.code, 'ECONNRESET');
    const result = await withTimeout(relay.done, 5000, 'relay done');
    t.equal(result.outcome, 'aborted');
    t.equal(result.upstreamToClientBytes, 7, 'count kept after the abort');
    t.ok(relay.client.destroyed && relay.upstream.destroyed, 'both inner sockets destroyed');
  });

  t.test('abort() during a fast transfer stops it at once', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    const clientRead = readAll(clientApp, 10000);
    serverApp.on('error', () => {});
    // The writer's last 'drain' never comes once its socket is reset: not awaited.
    void writeWithBackpressure(serverApp, 512 * 1024 * 1024).catch(() => {});
    await delay(100);
    const before = relay.upstreamToClientBytes;
    relay.abort();
    const c = await clientRead;
    t.ok(before > 0, `bytes were moving (${before})`);
    t.equal(c.outcome, 'error', 'client sees a reset');
    const result = await withTimeout(relay.done, 5000, 'relay done');
    t.equal(result.outcome, 'aborted');
    serverApp.destroy();
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

  t.test('directionFinished waits until every byte is written, not for the source end', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    clientApp.pause();
    const total = 16 * 1024 * 1024;
    const writer = writeWithBackpressure(serverApp, total);
    let finishedAt = -1;
    void relay.directionFinished('toClient').then(() => {
      finishedAt = relay.upstreamToClientBytes;
    });
    await delay(300);
    t.equal(finishedAt, -1, 'not finished while the client has not read');
    const c = await readAll(clientApp, 30000);
    await writer;
    t.equal(c.data.length, total, 'all bytes');
    await withTimeout(relay.directionFinished('toClient'), 3000, 'direction finished');
    t.equal(finishedAt, total, 'resolved after every byte passed');
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

  t.test('idle timeout does not fire while bytes keep moving', async (t) => {
    const { clientApp, serverApp, relay } = await setup({ idleTimeoutMs: 200 });
    const clientRead = readAll(clientApp, 5000);
    for (let i = 0; i < 8; i++) {
      serverApp.write(Buffer.alloc(1000, 3));
      await delay(100);
    }
    serverApp.end();
    clientApp.end();
    const c = await clientRead;
    t.equal(c.outcome, 'end', 'a slow but steady transfer completes');
    t.equal(c.data.length, 8000);
    const result = await withTimeout(relay.done, 3000, 'relay done');
    t.equal(result.outcome, 'complete');
  });

  t.test('bytes already buffered in JS: the JS relay takes the channel (no byte lost or reordered)', async (t) => {
    const c = await socketPair();
    const s = await socketPair();
    s.inner.unshift(Buffer.from('early-'));
    const relay = createRelay(c.inner, s.inner);
    t.notOk(relay instanceof SpliceRelay, 'not spliced');
    const clientRead = readAll(c.app, 5000);
    s.app.end('late');
    c.app.end();
    const r = await clientRead;
    t.equal(r.data.toString(), 'early-late');
    t.equal((await withTimeout(relay.done, 3000, 'relay done')).outcome, 'complete');
  });

  t.test('a relay built on an already-closed socket still settles (JS relay)', async (t) => {
    const c = await socketPair();
    const s = await socketPair();
    s.inner.destroy();
    await new Promise<void>((resolve) => (s.inner.closed ? resolve() : s.inner.once('close', () => resolve())));
    const relay = createRelay(c.inner, s.inner);
    t.notOk(relay instanceof SpliceRelay, 'not spliced');
    const clientRead = readAll(c.app, 3000);
    t.ok(await withTimeout(relay.done, 3000, 'relay done'), 'done resolved');
    const r = await clientRead;
    t.not(r.outcome, 'end', `the client is not told the transfer completed (${r.outcome})`);
  });

  t.test('many relays at once: every byte, every relay settles, no descriptor left', async (t) => {
    const fdsBefore = (await import('node:fs')).readdirSync('/proc/self/fd').length;
    const n = 50;
    const runs = Array.from({ length: n }, async (_, i) => {
      const { clientApp, serverApp, relay } = await setup();
      const down = randomBytes(10_000 + i * 1000);
      const clientRead = readAll(clientApp, 10000);
      const serverRead = readAll(serverApp, 10000);
      serverApp.end(down);
      clientApp.end();
      const [c] = await Promise.all([clientRead, serverRead]);
      const result = await withTimeout(relay.done, 5000, 'relay done');
      return c.data.equals(down) && result.outcome === 'complete' && result.upstreamToClientBytes === down.length;
    });
    const ok = await Promise.all(runs);
    t.equal(ok.filter(Boolean).length, n, 'all intact and complete');
    await delay(100);
    const fdsAfter = (await import('node:fs')).readdirSync('/proc/self/fd').length;
    t.ok(fdsAfter <= fdsBefore + 2, `descriptors back to where they were (${fdsBefore} -> ${fdsAfter})`);
  });
}
