/**
 * The kernel relay (SpliceRelay, src/native/) against the relay contract that the JS relay
 * meets too (test/data/relay-contract.ts: byte counts, backpressure, half-close (protocol.md
 * §3.2, §8.24), resets passed on as resets (§3.3, §8.23) including while the relay holds a
 * leg back, abort, done and directionFinished, idle timeout), in both native modes; plus
 * what is its own: createRelay hands sockets that are not clean to the JS relay. Skips when
 * the addon is not built, except in CI (CI=true), where `npm ci` must have built it and a
 * missing addon is a failure.
 * Topology: clientApp <-> relay.client  [SpliceRelay]  relay.upstream <-> serverApp
 */
import t from 'tap';
import type net from 'node:net';
import { createRelay, loadSpliceAddon, relayImplementation, SpliceRelay, type SpliceAddon } from '../../src/data/splice-relay.js';
import { withTimeout } from '../helpers/async.js';
import { readAll, socketPair } from '../helpers/sockets.js';
import { relayContract, type MakeRelay, type RelayContractOptions } from './relay-contract.js';

/** The kernel moves the bytes: no stream state to look at, and it needs open descriptors. */
const SPLICE: RelayContractOptions = { nodeStreams: false, acceptsClosedSockets: false };

const implementation = relayImplementation();
if (implementation.kind !== 'splice' && process.env.CI === 'true' && process.env.FTPNP_RELAY !== 'js') {
  t.fail(`CI must build the splice relay (npm ci runs src/native/install.sh): ${implementation.reason}`);
} else if (implementation.kind !== 'splice') {
  t.plan(0, `splice relay unavailable: ${implementation.reason}`);
} else {
  relayContract(t, 'splice through pipes', spliceRelay(null), SPLICE);
  // The thread's fallback when no pipe can be made (descriptor or pipe-page limits).
  relayContract(t, 'bounce buffer (no pipe)', spliceRelay(-1), SPLICE);
  createRelayTests();
}

/**
 * A SpliceRelay factory. `pipeBytes` null: what a data channel gets (createRelay, which must
 * pick the splice relay for clean sockets); otherwise the addon is told this pipe size (-1:
 * no pipe, the thread's bounce buffer).
 */
function spliceRelay(pipeBytes: number | null): MakeRelay {
  if (pipeBytes === null) {
    return (client, upstream, options) => {
      const relay = createRelay(client, upstream, options);
      if (!(relay instanceof SpliceRelay)) throw new Error('createRelay did not pick the splice relay');
      return relay;
    };
  }
  const real = loadSpliceAddon().addon!;
  // The addon's functions are not enumerable: wrap each one.
  const addon: SpliceAddon = {
    start: (clientFd, upstreamFd, _pipe, onEvent) => real.start(clientFd, upstreamFd, pipeBytes, onEvent),
    cancel: (handle) => real.cancel(handle),
    bytes: (handle, direction) => real.bytes(handle, direction),
    idleMs: (handle) => real.idleMs(handle),
  };
  const fd = (socket: net.Socket): number => (socket as unknown as { _handle: { fd: number } })._handle.fd;
  return (client, upstream, options) => new SpliceRelay(client, upstream, options, addon, fd(client), fd(upstream));
}

/** createRelay's choice: the kernel takes only clean sockets, everything else stays in JS. */
function createRelayTests(): void {
  t.test('bytes already buffered in JS: the JS relay takes the channel (no byte lost or reordered)', async (t) => {
    const c = await socketPair(t);
    const s = await socketPair(t);
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
    const c = await socketPair(t);
    const s = await socketPair(t);
    s.inner.destroy();
    await new Promise<void>((resolve) => (s.inner.closed ? resolve() : s.inner.once('close', () => resolve())));
    const relay = createRelay(c.inner, s.inner);
    t.notOk(relay instanceof SpliceRelay, 'not spliced');
    const clientRead = readAll(c.app, 3000);
    t.ok(await withTimeout(relay.done, 3000, 'relay done'), 'done resolved');
    const r = await clientRead;
    t.not(r.outcome, 'end', `the client is not told the transfer completed (${r.outcome})`);
  });
}
