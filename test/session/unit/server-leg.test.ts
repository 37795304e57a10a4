/**
 * ServerLeg (src/session/server-leg.ts) against loopback servers: the dial, the server's
 * addresses, replies dispatched in order, a protocol error, and a dial given up by a closing
 * session that must not look like an unreachable server.
 */
import t from 'tap';
import net from 'node:net';
import { validateConfigText } from '../../../src/config/load.js';
import { memoryLogger } from '../../helpers/logs.js';
import { NOOP_METRICS, type ProxyMetrics } from '../../../src/metrics.js';
import { ReplyQueue } from '../../../src/reply-queue.js';
import { ServerLeg, type ServerLegHooks } from '../../../src/session/server-leg.js';
import type { UpstreamControl } from '../../../src/session/state.js';
import { proxyYaml } from '../../helpers/proxy.js';
import { waitFor } from '../../helpers/async.js';
import type { TapTest } from '../../helpers/tap.js';

interface Rig {
  port: number;
  leg: ServerLeg<string>;
  replies: ReplyQueue;
  written: () => string;
  events: string[];
  connects: boolean[];
  records: () => Array<Record<string, unknown>>;
  connected: UpstreamControl | null;
}

async function server(t: TapTest, onConnection: (socket: net.Socket) => void): Promise<number> {
  const srv = net.createServer(onConnection);
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', () => resolve()));
  t.teardown(() => new Promise<void>((resolve) => srv.close(() => resolve())));
  return (srv.address() as net.AddressInfo).port;
}

function rig(port: number): Rig {
  const { log, records } = memoryLogger();
  const config = validateConfigText(proxyYaml({ upstreamHost: '127.0.0.1', upstreamPort: port }), 'test').listeners[0]!;
  let out = '';
  const replies = new ReplyQueue((bytes) => { out += bytes.toString('latin1'); }, () => {});
  const r: Rig = { port, leg: null as unknown as ServerLeg<string>, replies, written: () => out, events: [], connects: [], records, connected: null };
  const metrics: ProxyMetrics = { ...NOOP_METRICS, upstreamConnect: (_l, ok) => { r.connects.push(ok); } };
  const hooks: ServerLegHooks<string> = {
    connected: (upstream) => { r.connected = upstream; r.events.push('connected'); upstream.connection.start(); },
    unreachable: (err) => r.events.push(`unreachable:${err.code}`),
    replied: (reply) => r.events.push(`replied:${reply.code}`),
    lost: (reason, code) => r.events.push(`lost:${code ?? reason}`),
    transferReply: () => {},
    clientReply: () => {},
    timeout: () => {},
    limitHit: () => {},
  };
  r.leg = new ServerLeg<string>(config, metrics, log, replies, hooks);
  return r;
}

t.test('connect: addresses read once, replies dispatched in order into their slots', async (t) => {
  const port = await server(t, (socket) => socket.write('220-hello\r\n220 ready\r\n'));
  const r = rig(port);
  r.leg.exchange.expect(r.replies.open());
  r.leg.connect({ address: '127.0.0.1', port: r.port, host: '127.0.0.1' });
  t.ok(await waitFor(() => r.events.includes('replied:220')), r.events.join(' '));
  t.equal(r.written(), '220-hello\r\n220 ready\r\n', 'the multi-line greeting, whole, into the greeting slot');
  t.equal(r.connected?.addresses.remote.port, port, 'the server address');
  t.equal(r.connected?.addresses.remote.ip, '127.0.0.1');
  t.same(r.connects, [true], 'one successful connect counted');
  r.leg.abandon();
});

t.test('a reply that is not FTP: logged, the connection dropped, the session told with the code', async (t) => {
  const port = await server(t, (socket) => socket.write('HTTP/1.1 400 Bad Request\r\n'));
  const r = rig(port);
  r.leg.connect({ address: '127.0.0.1', port: r.port, host: '127.0.0.1' });
  t.ok(await waitFor(() => r.events.some((e) => e.startsWith('lost:'))), r.events.join(' '));
  t.ok(r.events.includes('lost:FTPP_ERR_UPSTREAM_PROTOCOL'));
  t.ok(r.records().some((rec) => rec.event === 'upstream-protocol-error'));
});

t.test('an unreachable server is reported and counted', async (t) => {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', () => resolve()));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  const r = rig(port);
  r.leg.connect({ address: '127.0.0.1', port: r.port, host: '127.0.0.1' });
  t.ok(await waitFor(() => r.events.some((e) => e.startsWith('unreachable'))), r.events.join(' '));
  t.same(r.connects, [false]);
  t.ok(r.records().some((rec) => rec.event === 'upstream-unreachable'));
});

t.test('regression: a dial the session gives up is not an unreachable server', async (t) => {
  const port = await server(t, () => {});
  const r = rig(port);
  r.leg.connect({ address: '127.0.0.1', port: r.port, host: '127.0.0.1' });
  r.leg.cancel();
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.same(r.events, [], 'neither connected nor unreachable');
  t.same(r.connects, [], 'no connect counted either way');
  t.notOk(r.records().some((rec) => rec.event === 'upstream-unreachable'), 'no upstream-unreachable warning');
});
