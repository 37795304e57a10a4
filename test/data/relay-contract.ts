/**
 * The relay contract (src/data/relay.ts `Relay`), run against every relay implementation:
 * byte counts, backpressure with a slow reader, half-close (protocol.md §3.2, §8.24), resets
 * passed on as resets (§3.3, §8.23) including while the relay holds a leg back, abort, the
 * idle timeout, `done` and `directionFinished` timing and meaning.
 *
 * Each implementation's test file calls relayContract() with a factory and keeps only what is
 * its own: test/data/relay.test.ts (DataRelay), test/data/splice-relay.test.ts (SpliceRelay,
 * both native modes, and createRelay's choice). A third relay (e.g. TLS on the client leg)
 * gets its own test file that calls relayContract() with its factory and, when its legs are
 * not plain TCP, its own `socketPair` (see RelayContractOptions; the default is helpers/sockets.ts).
 *
 * Topology: clientApp <-> relay.client  [relay]  relay.upstream <-> serverApp
 */
import type net from 'node:net';
import { randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import type { Relay, RelayOptions, RelayResult } from '../../src/data/relay.js';
import { delay, isSettled, waitFor, withTimeout } from '../helpers/async.js';
import { readAll, socketPair, writeWithBackpressure, type SocketPair } from '../helpers/sockets.js';
import type { TapTest, TeardownHost } from '../helpers/tap.js';

/** Builds the relay under test on two freshly paired inner sockets. */
export type MakeRelay = (client: net.Socket, upstream: net.Socket, options: RelayOptions) => Relay;

export interface RelayContractOptions {
  /**
   * The relay moves the bytes through the Node sockets' streams (DataRelay; a TLS relay
   * would too), so the streams show what it does: it pauses a source for backpressure
   * (isPaused, readableLength) and ends a sink through the stream ('finish'). SpliceRelay
   * stops libuv reading for good and shuts the sockets down in the kernel: none of that is
   * visible there, and those assertions are left out.
   */
  readonly nodeStreams: boolean;
  /**
   * The relay can be built on a socket that already died before pairing. SpliceRelay cannot
   * (it needs open descriptors): createRelay gives such a pair to the JS relay, which
   * splice-relay.test.ts checks.
   */
  readonly acceptsClosedSockets: boolean;
  /** Makes one leg's socket pair; default: plain TCP on 127.0.0.1 (see socketPair). */
  readonly socketPair?: (t: TeardownHost) => Promise<SocketPair>;
}

/**
 * Register the contract scenarios as one subtest `name` of `t`, each against a relay that
 * `makeRelay` builds.
 */
export function relayContract(t: TapTest, name: string, makeRelay: MakeRelay, options: RelayContractOptions): void {
  t.test(name, async (t) => runContract(t, makeRelay, options));
}

function runContract(t: TapTest, makeRelay: MakeRelay, options: RelayContractOptions): void {
  const makePair = options.socketPair ?? socketPair;
  // Every socket of every scenario is destroyed once this whole suite is over.
  const cleanups: Array<() => unknown> = [];
  t.teardown(() => {
    for (const cleanup of cleanups) cleanup();
  });
  const suite: TeardownHost = { teardown: (fn) => void cleanups.push(fn) };
  const pairOf = (): Promise<SocketPair> => makePair(suite);

  async function setup(relayOptions: RelayOptions = {}): Promise<{ clientApp: net.Socket; serverApp: net.Socket; relay: Relay }> {
    const c = await pairOf();
    const s = await pairOf();
    const relay = makeRelay(c.inner, s.inner, relayOptions);
    return { clientApp: c.app, serverApp: s.app, relay };
  }

  /**
   * Put 32 MiB into `writer` at once (far more than the loopback buffers take, even
   * autotuned) and let the relay hold `leg` back. A slow trickle does not reproduce the libuv
   * quirk the reset-while-held-back tests are about; a large queued burst does. Where the
   * streams show it (nodeStreams), assert that the relay paused that leg.
   */
  async function fillUntilHeldBack(t: TapTest, writer: net.Socket, relay: Relay, leg: 'client' | 'upstream'): Promise<void> {
    const chunk = Buffer.alloc(1024 * 1024, 1);
    for (let i = 0; i < 32; i++) writer.write(chunk);
    if (!options.nodeStreams) {
      await delay(200); // let the buffers fill up completely
      return;
    }
    const relaySide = relay[leg];
    const paused = await waitFor(() => relaySide.isPaused(), 3000, 10);
    await delay(200); // let the buffers fill up completely
    t.ok(paused && relaySide.isPaused(), `the relay paused the ${leg} leg`);
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
    t.ok(result.durationMs >= 0, 'duration');
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

  t.test('backpressure: a slow reader holds the sender back and memory stays bounded (32 MiB)', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    const total = 32 * 1024 * 1024;
    let received = 0;
    let maxAhead = 0;
    let senderBlocked = false;
    // nodeStreams only: the relay's own socket buffers and whether it paused the source.
    let maxWritable = 0;
    let maxReadable = 0;
    let sawPaused = false;
    const sampleStreams = (): void => {
      maxWritable = Math.max(maxWritable, relay.client.writableLength);
      maxReadable = Math.max(maxReadable, relay.upstream.readableLength);
    };
    const sampler = setInterval(() => {
      maxAhead = Math.max(maxAhead, relay.upstreamToClientBytes - received);
      if (serverApp.writableLength > 0) senderBlocked = true;
      if (options.nodeStreams) {
        sampleStreams();
        if (relay.upstream.isPaused()) sawPaused = true;
      }
    }, 2);
    t.teardown(() => clearInterval(sampler));
    // Also sample right after each chunk the relay reads (a 'data' listener would start a
    // stream the relay does not read through JS, hence nodeStreams only).
    if (options.nodeStreams) relay.upstream.on('data', sampleStreams);
    // Slow reader: one chunk, then a pause.
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
    // Read from the server but not yet delivered: the relay's buffers plus the client socket's.
    t.ok(maxAhead <= 16 * 1024 * 1024, `bounded read-ahead: max ${maxAhead} bytes`);
    if (options.nodeStreams) {
      t.ok(sawPaused, 'the relay paused the upstream socket while the client was slow');
      t.ok(maxWritable <= 1024 * 1024, `client writable buffer bounded: max ${maxWritable} bytes`);
      t.ok(maxReadable <= 1024 * 1024, `upstream readable buffer bounded: max ${maxReadable} bytes`);
    }
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

  t.test('client reset while the relay holds it back (slow server) still reaches the server as a reset', async (t) => {
    // Regression: libuv reports an RST that lands on a socket whose reading is stopped as a
    // plain EOF after the buffered bytes (POLLHUP after a partial read), so a truncated upload
    // under backpressure used to be passed upstream as a clean FIN, and the server said 226.
    const { clientApp, serverApp, relay } = await setup();
    serverApp.pause(); // a slow server: the relay must hold the client back
    clientApp.on('error', () => {});
    await fillUntilHeldBack(t, clientApp, relay, 'client');
    clientApp.resetAndDestroy();
    await delay(200);
    const s = await readAll(serverApp, 10000);
    t.equal(s.outcome, 'error', `the server sees a reset, not a clean end (${s.outcome} after ${s.data.length} bytes)`);
    const result = await withTimeout(relay.done, 5000, 'relay done');
    t.equal(result.outcome, 'reset', 'outcome reset');
  });

  t.test('server reset while the relay holds it back (slow client) reaches the client as a reset', async (t) => {
    const { clientApp, serverApp, relay } = await setup();
    clientApp.pause(); // a slow client: the relay must hold the server back
    serverApp.on('error', () => {});
    await fillUntilHeldBack(t, serverApp, relay, 'upstream');
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
    const c = await readAll(clientApp, 30000);
    await writer;
    t.equal(c.data.length, total, 'all bytes');
    await withTimeout(relay.directionFinished('toClient'), 3000, 'direction finished');
    t.equal(finishedAt, total, 'resolved after every byte passed');
    // The kernel relay shuts the socket down itself: no 'finish' on the JS side to look at.
    if (options.nodeStreams) t.ok(writableFinishedThen, "the client socket had emitted 'finish' when it resolved");
  });

  t.test('directionFinished says whether the direction was delivered: true once its FIN passed on, false when the relay ended first', async (t) => {
    await t.test('both directions delivered', async (t) => {
      const { clientApp, serverApp, relay } = await setup();
      const clientRead = readAll(clientApp, 5000);
      const serverRead = readAll(serverApp, 5000);
      serverApp.end('down');
      clientApp.end('up');
      await Promise.all([clientRead, serverRead]);
      t.equal((await withTimeout(relay.done, 3000, 'relay done')).outcome, 'complete');
      t.equal(await relay.directionFinished('toClient'), true, 'download delivered');
      t.equal(await relay.directionFinished('toUpstream'), true, 'upload delivered');
    });
    await t.test('a delivered direction stays delivered when the other one is reset', async (t) => {
      const { clientApp, serverApp, relay } = await setup();
      const serverRead = readAll(serverApp, 5000);
      const gotEnd = new Promise<void>((resolve) => clientApp.once('end', () => resolve()));
      clientApp.on('data', () => {});
      serverApp.end('done');
      await withTimeout(gotEnd, 3000, 'client got end');
      clientApp.resetAndDestroy();
      await serverRead;
      t.equal((await withTimeout(relay.done, 3000, 'relay done')).outcome, 'reset');
      t.equal(await relay.directionFinished('toClient'), true, 'download delivered before the reset');
      t.equal(await relay.directionFinished('toUpstream'), false, 'upload cut by the reset');
    });
    await t.test('server reset mid-download', async (t) => {
      const { clientApp, serverApp, relay } = await setup();
      const clientRead = readAll(clientApp, 5000);
      serverApp.write(randomBytes(10_000));
      await delay(50);
      serverApp.resetAndDestroy();
      await clientRead;
      t.equal((await withTimeout(relay.done, 3000, 'relay done')).outcome, 'reset');
      t.equal(await relay.directionFinished('toClient'), false, 'download not delivered');
      t.equal(await relay.directionFinished('toUpstream'), false, 'upload not delivered');
    });
    await t.test('abort()', async (t) => {
      const { clientApp, serverApp, relay } = await setup();
      const reads = Promise.all([readAll(clientApp, 5000), readAll(serverApp, 5000)]);
      serverApp.write('partial');
      await delay(50);
      relay.abort();
      await reads;
      t.equal((await withTimeout(relay.done, 3000, 'relay done')).outcome, 'aborted');
      t.equal(await relay.directionFinished('toClient'), false, 'download not delivered');
      t.equal(await relay.directionFinished('toUpstream'), false, 'upload not delivered');
    });
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

  // Only for relays that take sockets as they come: SpliceRelay needs open descriptors, and
  // createRelay gives a closed socket to the JS relay (splice-relay.test.ts checks that).
  if (options.acceptsClosedSockets) t.test('a relay built on an already-closed socket still settles', async (t) => {
    const c = await pairOf();
    const s = await pairOf();
    s.inner.destroy();
    await new Promise<void>((resolve) => (s.inner.closed ? resolve() : s.inner.once('close', () => resolve())));
    const relay = makeRelay(c.inner, s.inner, {});
    const clientRead = readAll(c.app, 3000);
    const result = await withTimeout(relay.done, 3000, 'relay done');
    t.ok(result, 'done resolved');
    const r = await clientRead;
    t.not(r.outcome, 'end', `the client is not told the transfer completed (${r.outcome})`);
  });

  t.test('many relays at once: every byte, every relay settles, no descriptor left', async (t) => {
    const fdsBefore = readdirSync('/proc/self/fd').length;
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
    const fdsAfter = readdirSync('/proc/self/fd').length;
    t.ok(fdsAfter <= fdsBefore + 2, `descriptors back to where they were (${fdsBefore} -> ${fdsAfter})`);
  });
}
