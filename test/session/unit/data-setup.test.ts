/**
 * DataSetup (src/session/data-setup.ts) with a real PortPool on 127.0.0.1 and a scripted
 * server side: 227/229 with the advertised address and a leased port, the pending channel,
 * EPSV -> PASV fallback for the rest of the session, the server's 421/530 passed on, a
 * malformed 229, the data-channel and per-address port limits, a new PASV releasing the old
 * channel, setups deferred behind a running transfer's final reply (issue #10), PORT, and a
 * stranger on a leased port before the 227. Every test gives its ports back.
 */
import t from 'tap';
import net from 'node:net';
import type { Advertiser } from '../../../src/advertise.js';
import { validateConfigText } from '../../../src/config/load.js';
import type { ListenerConfig } from '../../../src/config/schema.js';
import type { Reply } from '../../../src/control/reply.js';
import { PortPool } from '../../../src/data/port-pool.js';
import { NOOP_METRICS, type ProxyMetrics, type RejectionReason } from '../../../src/metrics.js';
import { ReplyQueue } from '../../../src/reply-queue.js';
import { DataSetup, type UpstreamForData } from '../../../src/session/data-setup.js';
import { PortBlocks } from '../../helpers/fake-server.js';
import type { TapTest } from '../../helpers/tap.js';
import { proxyYaml } from '../../helpers/proxy.js';
import { memoryLogger } from '../../helpers/logs.js';

const PORTS = new PortBlocks(16000);
const MAX_DATA_CHANNELS = 2;
/** What the advertiser says: not the control address, so a 227 built from the wrong one shows. */
const ADVERTISED = '203.0.113.9';
/** The server's control address: data is dialled there, never to a 227's address. */
const SERVER_IP = '127.0.0.5';
/** The server's passive ports in the scripted 229 and 227 (this file's port block; real listeners below). */
const SERVER_EPSV_PORT = 16990;
const SERVER_PASV_PORT = 16991;

/** The server's passive listeners: data setup dials them as soon as the 229/227 came (issue #14). */
const serverDataConnections: Array<{ port: number; socket: net.Socket }> = [];
const serverListeners = await Promise.all([SERVER_EPSV_PORT, SERVER_PASV_PORT].map((port) => new Promise<net.Server>((resolve, reject) => {
  const server = net.createServer((socket) => {
    socket.on('error', () => {});
    serverDataConnections.push({ port, socket });
  });
  server.once('error', reject);
  server.listen(port, SERVER_IP, () => resolve(server));
})));
t.teardown(() => {
  for (const { socket } of serverDataConnections) socket.destroy();
  for (const server of serverListeners) server.close();
});

const CONFIG: ListenerConfig = validateConfigText(proxyYaml({
  upstreamHost: SERVER_IP,
  upstreamPort: 21,
  passivePorts: '16000-16999',
  extraYaml: [
    '    timeouts:',
    '      dataAcceptSeconds: 5',
    '    limits:',
    `      maxDataChannelsPerSession: ${MAX_DATA_CHANNELS}`,
  ].join('\n'),
}), 'test').listeners[0]!;


function reply(text: string): Reply {
  return { code: Number(text.slice(0, 3)), lines: [text], raw: Buffer.from(`${text}\r\n`, 'latin1') };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

async function until(what: string, check: () => boolean, ms = 2000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

function deferred<T>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => { resolve = r; });
  return { promise, resolve };
}

/** The server's control connection as data setup sees it: answers scripted per command. */
class ScriptedUpstream implements UpstreamForData {
  readonly addresses = { remote: { ip: SERVER_IP, port: 21 }, local: { ip: '127.0.0.1', port: 40000 } };
  readonly sent: string[] = [];
  awaitsTransferReply = false;
  private settled = deferred<void>();
  /** Reply text per command verb; a promise holds the answer until it resolves. */
  answers: Record<string, string | Promise<string>> = {
    EPSV: `229 Entering Extended Passive Mode (|||${SERVER_EPSV_PORT}|)`,
    PASV: `227 Entering Passive Mode (10,0,0,5,${SERVER_PASV_PORT >> 8},${SERVER_PASV_PORT & 255}).`,
    PORT: '200 PORT command successful. Consider using PASV.',
  };

  async request(command: string): Promise<Reply> {
    this.sent.push(command);
    const answer = this.answers[command.split(' ')[0]!];
    if (answer === undefined) throw new Error(`no answer scripted for ${command}`);
    return reply(await answer);
  }

  transferRepliesSettled(): Promise<void> {
    return this.settled.promise;
  }

  /** The running transfer's final reply came. */
  settleTransfers(): void {
    this.awaitsTransferReply = false;
    this.settled.resolve();
    this.settled = deferred<void>();
  }
}

interface Setup {
  dataSetup: DataSetup;
  pool: PortPool;
  range: { first: number; last: number };
  upstream: ScriptedUpstream;
  written: () => string;
  records: () => Array<Record<string, unknown>>;
  limits: Array<{ reason: RejectionReason; fields: Record<string, unknown> }>;
  strangers: number;
  advertiserCalls: Array<[string, string]>;
  running: number;
  finished: boolean;
}

/** CONFIG with limits.maxRelayPortsPerIp set (the share DataSetup asks of the pool per lease). */
function withRelayPortsPerIp(max: number): ListenerConfig {
  return { ...CONFIG, limits: { ...CONFIG.limits, maxRelayPortsPerIp: max } };
}

function setup(t: TapTest, options: { ports?: number; maxPerOwner?: number } = {}): Setup {
  let out = '';
  const replies = new ReplyQueue((bytes) => { out += bytes.toString('latin1'); }, () => {});
  const { log, records } = memoryLogger();
  const range = PORTS.take(options.ports ?? 10);
  const pool = new PortPool(range);
  const s: Setup = {
    dataSetup: null as unknown as DataSetup,
    pool,
    range,
    upstream: new ScriptedUpstream(),
    written: () => out,
    records,
    limits: [],
    strangers: 0,
    advertiserCalls: [],
    running: 0,
    finished: false,
  };
  const metrics: ProxyMetrics = { ...NOOP_METRICS, dataStranger: () => { s.strangers += 1; } };
  const advertiser = {
    addressFor: async (clientIp: string, localIp: string) => {
      s.advertiserCalls.push([clientIp, localIp]);
      return ADVERTISED;
    },
    lastError: null,
  } as unknown as Advertiser;
  s.dataSetup = new DataSetup({
    dataProtected: () => false,
    config: options.maxPerOwner === undefined ? CONFIG : withRelayPortsPerIp(options.maxPerOwner),
    metrics,
    endpoints: {
      client: { ip: '127.0.0.1', port: 50000 },
      dialled: { ip: '127.0.0.3', port: 2100 },
      local: { ip: '127.0.0.1', port: 2100 },
      initialData: null,
    },
    clientPool: pool,
    upstreamPool: null,
    advertiser,
    kernelForwarder: null,
    log,
    replies,
    upstream: () => s.upstream,
    runningTransfers: () => s.running,
    isFinished: () => s.finished,
    limitHit: (reason, fields) => s.limits.push({ reason, fields }),
  });
  // A failing test must not leave a port bound (or an accept timer running).
  t.teardown(() => s.dataSetup.releasePending('test over'));
  return s;
}

/** The port of a 227 or 229 the client got. */
function portOf(written: string): number {
  const pasv = /^227 Entering Passive Mode \((?:\d+,){4}(\d+),(\d+)\)\.\r\n$/.exec(written);
  if (pasv) return Number(pasv[1]) * 256 + Number(pasv[2]);
  const epsv = /^229 Entering Extended Passive Mode \(\|\|\|(\d+)\|\)\r\n$/.exec(written);
  if (epsv) return Number(epsv[1]);
  throw new Error(`not a 227/229: ${JSON.stringify(written)}`);
}

/** Connect to a local port; resolves when the connection has closed, with the error that closed it. */
function connectAndWait(port: number): Promise<{ error: string | null }> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let error: string | null = null;
    socket.on('error', (err: NodeJS.ErrnoException) => { error = err.code ?? err.message; });
    socket.on('close', () => resolve({ error }));
  });
}

t.test("passive('pasv'): a 227 with the advertised address and a leased port; take() hands the channel out once", async (t) => {
  const s = setup(t);
  await s.dataSetup.passive('pasv');
  t.match(s.written(), /^227 Entering Passive Mode \(203,0,113,9,\d+,\d+\)\.\r\n$/, 'the advertised address');
  const port = portOf(s.written());
  t.ok(port >= s.range.first && port <= s.range.last, `port ${port} inside ${s.range.first}-${s.range.last}`);
  t.same(s.advertiserCalls, [['127.0.0.1', '127.0.0.3']], 'asked for the client address and what it dialled');
  t.same(s.upstream.sent, ['EPSV'], 'the server side is opened at once');
  t.equal(s.pool.stats.leased, 1);
  const channel = s.dataSetup.take();
  t.ok(channel, 'a pending channel');
  t.equal(channel?.clientLeg.kind, 'passive');
  t.equal(channel?.clientPort, port, 'on the port of the 227');
  t.same(channel?.upstreamLeg, { kind: 'passive', target: { host: SERVER_IP, port: SERVER_EPSV_PORT } }, 'the server\'s data port at its control address');
  t.equal(s.dataSetup.take(), null, 'taken once');
  t.match(s.records().filter((r) => r.event === 'data-passive'), [{ port, dataPath: 'relay', upstream: `passive ${SERVER_IP}:${SERVER_EPSV_PORT}` }]);
  channel?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test("passive('epsv'): a 229 with the leased port; no address to advertise", async (t) => {
  const s = setup(t);
  await s.dataSetup.passive('epsv');
  const port = portOf(s.written());
  t.match(s.written(), /^229 /);
  t.ok(port >= s.range.first && port <= s.range.last, `port ${port} inside the range`);
  t.same(s.advertiserCalls, [], 'EPSV carries no address');
  const channel = s.dataSetup.take();
  t.equal(channel?.clientPort, port);
  channel?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('after the 229 the client\'s connection is the channel\'s', async (t) => {
  const s = setup(t);
  await s.dataSetup.passive('epsv');
  const port = portOf(s.written());
  const channel = s.dataSetup.take()!;
  const client = net.connect({ host: '127.0.0.1', port });
  client.on('error', () => {});
  t.teardown(() => client.destroy());
  await new Promise<void>((resolve) => client.once('connect', () => resolve()));
  if (channel.clientLeg.kind !== 'passive') throw new Error('not a passive client leg');
  const accepted = await channel.clientLeg.accept.accepted;
  t.equal(accepted.remotePort, client.localPort, 'the accepted socket is ours');
  t.equal(s.strangers, 0, 'not a stranger');
  channel.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('the server\'s passive port is dialled as soon as its 229 came, before any transfer command; connectOutbound hands that connection out', async (t) => {
  const s = setup(t);
  const before = serverDataConnections.length;
  await s.dataSetup.passive('epsv');
  await until('the server\'s data connection', () => serverDataConnections.length > before);
  const arrived = serverDataConnections.slice(before);
  t.same(arrived.map((c) => c.port), [SERVER_EPSV_PORT], 'one connection, to the port of the server\'s 229, at its control address');
  t.equal(arrived[0]!.socket.remoteAddress, '127.0.0.1', 'from the proxy\'s upstream-side address');
  const channel = s.dataSetup.take()!;
  const { upstreamSocket, clientSocket } = await s.dataSetup.connectOutbound(channel);
  t.equal(clientSocket, null, 'a passive client leg is not dialled');
  t.equal(upstreamSocket?.localPort, arrived[0]!.socket.remotePort, 'the transfer gets the connection made at EPSV time');
  t.equal(serverDataConnections.length, before + 1, 'no second connection');
  channel.close('test over');
  await until('the early connection reset', () => arrived[0]!.socket.destroyed || arrived[0]!.socket.readableEnded);
  t.equal(s.pool.stats.leased, 0);
});

t.test('a channel replaced before its transfer resets its early server connection', async (t) => {
  const s = setup(t);
  const before = serverDataConnections.length;
  await s.dataSetup.passive('epsv');
  await until('the first data connection', () => serverDataConnections.length > before);
  const first = serverDataConnections[before]!.socket;
  const closed = new Promise<void>((resolve) => first.once('close', () => resolve()));
  await s.dataSetup.passive('epsv');
  await closed;
  t.pass('the replaced channel\'s connection to the server is closed');
  s.dataSetup.take()?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('EPSV refused with 500: PASV instead, and PASV for every later setup', async (t) => {
  const s = setup(t);
  s.upstream.answers.EPSV = '500 Unknown command.';
  await s.dataSetup.passive('epsv');
  t.same(s.upstream.sent, ['EPSV', 'PASV']);
  t.match(s.written(), /^229 /, 'the client still gets its 229');
  const first = s.dataSetup.take();
  t.same(first?.upstreamLeg, { kind: 'passive', target: { host: SERVER_IP, port: SERVER_PASV_PORT } }, 'the 227\'s port at the control address (not 10.0.0.5)');
  first?.close('test over');
  await s.dataSetup.passive('pasv');
  t.same(s.upstream.sent, ['EPSV', 'PASV', 'PASV'], 'EPSV is not tried again (upstreamLacksEpsv)');
  s.dataSetup.take()?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

for (const answer of ['421 Timeout.', '530 Please login with USER and PASS.']) {
  t.test(`the server's ${answer.slice(0, 3)} to EPSV is passed to the client as is`, async (t) => {
    const s = setup(t);
    s.upstream.answers.EPSV = answer;
    await s.dataSetup.passive('pasv');
    t.equal(s.written(), `${answer}\r\n`);
    t.same(s.upstream.sent, ['EPSV'], 'no PASV fallback for a refusal');
    t.equal(s.dataSetup.take(), null, 'no channel');
    t.equal(s.pool.stats.leased, 0, 'the relay port is given back');
  });
}

t.test("a malformed 229 gives \"425 Can't open data connection.\"", async (t) => {
  const s = setup(t);
  s.upstream.answers.EPSV = '229 Entering Extended Passive Mode (|||99999|)';
  await s.dataSetup.passive('epsv');
  t.equal(s.written(), "425 Can't open data connection.\r\n");
  t.match(s.records().filter((r) => r.event === 'data-setup-failed'), [{ level: 'warn', code: 'FTPP_ERR_UPSTREAM_DATA_SETUP', command: 'EPSV' }]);
  t.equal(s.dataSetup.take(), null);
  t.equal(s.pool.stats.leased, 0);
});

t.test('maxDataChannelsPerSession: one below is fine, at the limit 425 and passive-listeners', async (t) => {
  const s = setup(t);
  s.running = MAX_DATA_CHANNELS - 1;
  await s.dataSetup.passive('epsv');
  t.match(s.written(), /^229 /, 'below the limit');
  s.dataSetup.take()?.close('test over');
  s.running = MAX_DATA_CHANNELS;
  await s.dataSetup.passive('epsv');
  t.equal(s.written().split('\r\n')[1], "425 Can't open data connection: too many data connections.");
  t.same(s.limits, [{ reason: 'passive-listeners', fields: { code: 'FTPP_ERR_TOO_MANY_DATA_CHANNELS', max: MAX_DATA_CHANNELS } }]);
  t.same(s.upstream.sent, ['EPSV'], 'no request for the refused setup');
  t.equal(s.dataSetup.take(), null);
  t.equal(s.pool.stats.leased, 0);
});

t.test('the relay-port cap per client address: 425 from-your-address and relay-ports-per-ip', async (t) => {
  const s = setup(t, { ports: 10, maxPerOwner: 1 });
  await s.dataSetup.passive('pasv');
  const held = s.dataSetup.take();
  t.ok(held, 'the first port');
  await s.dataSetup.passive('pasv');
  t.equal(s.written().split('\r\n')[1], "425 Can't open data connection: too many data connections from your address.");
  t.same(s.limits, [{ reason: 'relay-ports-per-ip', fields: { code: 'FTPP_ERR_RELAY_PORTS_PER_IP', max: 1, range: `${s.range.first}-${s.range.last}` } }]);
  t.same(s.upstream.sent, ['EPSV'], 'the server side is not opened for the refused setup');
  t.equal(s.pool.stats.leased, 1, 'only the held port');
  held?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('a new PASV releases the previous pending channel and its port', async (t) => {
  const s = setup(t);
  await s.dataSetup.passive('pasv');
  t.equal(s.pool.stats.leased, 1);
  await s.dataSetup.passive('pasv');
  t.equal(s.pool.stats.leased, 1, 'the first port went back');
  const [first, second] = s.written().split('\r\n').filter(Boolean).map((line) => portOf(`${line}\r\n`));
  const channel = s.dataSetup.take();
  t.equal(channel?.clientPort, second, 'the pending channel is the new one');
  if (first !== second) {
    const late = await connectAndWait(first!);
    t.equal(late.error, 'ECONNREFUSED', 'nobody listens on the first port any more');
  }
  channel?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('a setup while a transfer awaits its final reply waits for it before asking the server (issue #10)', async (t) => {
  const s = setup(t);
  s.upstream.awaitsTransferReply = true;
  t.teardown(() => s.upstream.settleTransfers());
  const setting = s.dataSetup.passive('epsv');
  await until('the deferral', () => s.records().some((r) => r.event === 'data-setup-deferred'));
  await tick();
  t.same(s.upstream.sent, [], 'nothing sent to a server busy with a transfer');
  t.equal(s.written(), '', 'no reply yet');
  t.equal(s.pool.stats.leased, 1, 'the relay port is already leased');
  s.upstream.settleTransfers();
  await setting;
  t.same(s.upstream.sent, ['EPSV'], 'asked once the final reply came');
  t.match(s.written(), /^229 /);
  s.dataSetup.take()?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('the session finishing during the deferral: nothing answered, nothing sent, port released', async (t) => {
  const s = setup(t);
  s.upstream.awaitsTransferReply = true;
  t.teardown(() => s.upstream.settleTransfers());
  const setting = s.dataSetup.passive('pasv');
  await until('the deferral', () => s.records().some((r) => r.event === 'data-setup-deferred'));
  s.finished = true;
  s.upstream.settleTransfers();
  await setting;
  t.equal(s.written(), '', 'empty: the session says its own goodbye');
  t.same(s.upstream.sent, []);
  t.match(s.records().filter((r) => r.event === 'data-setup-failed'), [{ level: 'debug', code: 'FTPP_ERR_SHUTDOWN' }]);
  t.equal(s.dataSetup.take(), null);
  t.equal(s.pool.stats.leased, 0);
});

t.test("active('port', target, 'named'): 200 once the server side is ready; logs data-active", async (t) => {
  const s = setup(t);
  const target = { host: '127.0.0.1', port: 40123 };
  await s.dataSetup.active('port', target, 'named');
  t.equal(s.written(), '200 PORT command successful.\r\n');
  t.same(s.upstream.sent, ['EPSV'], 'dataMode passive: EPSV toward the server');
  t.equal(s.pool.stats.leased, 0, 'no relay port for an active client');
  t.match(s.records().filter((r) => r.event === 'data-active'), [{ target: '127.0.0.1:40123', upstream: `passive ${SERVER_IP}:${SERVER_EPSV_PORT}` }]);
  t.equal(s.records().filter((r) => r.event === 'port-nat-fixup').length, 0, 'a named address is no NAT fixup');
  const channel = s.dataSetup.take();
  t.same(channel?.clientLeg, { kind: 'active', target });
  channel?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('a stranger connecting to the leased port before the 227 is reset and logged (when: early)', async (t) => {
  const s = setup(t, { ports: 1 });
  const answer = deferred<string>();
  s.upstream.answers.EPSV = answer.promise;
  // If an assertion below fails, the setup must still end and give its port back.
  t.teardown(() => answer.resolve('421 test over'));
  const setting = s.dataSetup.passive('pasv');
  await until('the EPSV request', () => s.upstream.sent.length === 1);
  t.equal(s.pool.stats.leased, 1);
  const early = await connectAndWait(s.range.first);
  t.equal(early.error, 'ECONNRESET', 'the port was listening (no ECONNREFUSED) and reset the connection');
  await until('the stranger record', () => s.records().some((r) => r.event === 'data-stranger'));
  const stranger = s.records().find((r) => r.event === 'data-stranger');
  t.match(stranger, { level: 'warn', when: 'early', port: s.range.first, from: /^127\.0\.0\.1:\d+$/ });
  t.equal(s.strangers, 1, 'counted');
  answer.resolve(`229 Entering Extended Passive Mode (|||${SERVER_EPSV_PORT}|)`);
  await setting;
  t.equal(portOf(s.written()), s.range.first, 'the 227 still goes out, for the same port');
  const channel = s.dataSetup.take();
  t.ok(channel);
  channel?.close('test over');
  t.equal(s.pool.stats.leased, 0);
});

t.test('releasePending() closes the pending channel and releases its port', async (t) => {
  const s = setup(t);
  await s.dataSetup.passive('epsv');
  t.equal(s.pool.stats.leased, 1);
  s.dataSetup.releasePending('REIN');
  t.equal(s.pool.stats.leased, 0);
  t.equal(s.dataSetup.take(), null, 'nothing pending any more');
  s.dataSetup.releasePending('again');
  t.equal(s.pool.stats.leased, 0, 'idempotent');
});

