/**
 * DataRelay (the JS relay) against the relay contract (test/data/relay-contract.ts: byte
 * counts, backpressure, half-close, resets passed on as resets, abort, idle timeout, done and
 * directionFinished), plus what is its own: resetSocket.
 *
 * Topology: clientApp <-> relay.client  [DataRelay]  relay.upstream <-> serverApp
 */
import t from 'tap';
import { DataRelay, resetSocket } from '../../src/data/relay.js';
import { readAll, socketPair } from '../helpers/sockets.js';
import { relayContract } from './relay-contract.js';

relayContract(t, 'DataRelay', (client, upstream, options) => new DataRelay(client, upstream, options), {
  nodeStreams: true,
  acceptsClosedSockets: true,
});

t.test('resetSocket tolerates destroyed sockets', async (t) => {
  const { app, inner } = await socketPair(t);
  const read = readAll(app, 3000);
  resetSocket(inner);
  resetSocket(inner);
  const r = await read;
  t.equal(r.outcome, 'error', 'peer sees a reset');
});
