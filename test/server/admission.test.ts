/**
 * src/server/admission.ts: one accepted connection is admitted or refused, in order: unknown
 * peer (reset unread, peer-gone), shutting down (421), PROXY header (trusted senders only;
 * LOCAL = health check), ACL (reply or close), session limits (total, per IP). Each case
 * checks the decision, what the client received, and the metric and log records (the same
 * ones test/operations/ asserts end to end). Real loopback sockets through a real
 * ListenerRuntime; the unknown peer is a never-connected socket. Also the pure parts: the
 * ACL (server/acl.ts) and the session slots (server/session-slots.ts).
 * Relay ports 15000-15999 belong to this file (never bound: no session is started).
 */
import t from 'tap';
import net from 'node:net';
import { PortBlocks } from '../helpers/fake-server.js';
import type { TapTest } from '../helpers/tap.js';
import { probe, probeClosed, type Probe } from '../helpers/ops.js';
import { listenerConfig, memoryLogger, RecordingMetrics, type LogRecord } from '../helpers/server-unit.js';
import { admitConnection, type AdmissionResult } from '../../src/server/admission.js';
import { ListenerRuntime, prepareListener, type ListenerRuntimeDeps } from '../../src/server/listener-runtime.js';
import { aclAllows } from '../../src/server.js';
import { SessionSlots } from '../../src/server/session-slots.js';
import { encodeProxyHeaderV1, encodeProxyHeaderV2 } from '../../src/control/proxy-protocol.js';
import { REPLY_FOR_CODE } from '../../src/errors.js';

const blocks = new PortBlocks(15000);
const NAME = 'adm';
const ACL_REPLY = `${REPLY_FOR_CODE.FTPP_ERR_ACL_DENIED}\r\n`;
const TOO_MANY = `${REPLY_FOR_CODE.FTPP_ERR_TOO_MANY_SESSIONS}\r\n`;
const SHUTDOWN = `${REPLY_FOR_CODE.FTPP_ERR_SHUTDOWN}\r\n`;
const PP_TRUSTED = ['    proxyProtocol:', '      accept: any', '      from: [127.0.0.1/32]', '      timeoutSeconds: 1'];

interface Rig {
  readonly runtime: ListenerRuntime;
  readonly runtimeDeps: ListenerRuntimeDeps;
  readonly metrics: RecordingMetrics;
  readonly logs: () => LogRecord[];
  readonly host: string;
  readonly port: number;
  setAccepting(accepting: boolean): void;
  /** The next admission decision, in the order connections were accepted. */
  next(): Promise<AdmissionResult>;
  /** The server side of the last accepted connection. */
  lastSocket(): net.Socket;
}

/** A listener (extra YAML `lines`) whose accepted connections go through admitConnection. */
async function rig(t: TapTest, lines: string[] = []): Promise<Rig> {
  const { log, records } = memoryLogger();
  const metrics = new RecordingMetrics();
  let accepting = true;
  const decisions: Array<Promise<AdmissionResult>> = [];
  const sockets: net.Socket[] = [];
  const admissionDeps = { metrics, accepting: () => accepting };
  const runtimeDeps: ListenerRuntimeDeps = {
    log,
    metrics,
    accept: (runtime, socket) => {
      sockets.push(socket);
      decisions.push(admitConnection(socket, runtime, admissionDeps));
    },
  };
  const runtime = await ListenerRuntime.open(listenerConfig({ name: NAME, passivePorts: blocks.take(4).text, lines }), runtimeDeps);
  t.teardown(async () => {
    // Admitted connections have no session here: close them so the listener can close.
    for (const socket of sockets) socket.destroy();
    await runtime.stopAccepting();
  });
  let taken = 0;
  return {
    runtime,
    runtimeDeps,
    metrics,
    logs: records,
    ...runtime.address(),
    setAccepting: (value) => {
      accepting = value;
    },
    next: async () => {
      for (let i = 0; i < 300 && decisions.length <= taken; i++) await new Promise((resolve) => setTimeout(resolve, 10));
      const decision = decisions[taken++];
      if (!decision) throw new Error('no connection was accepted');
      return decision;
    },
    lastSocket: () => sockets.at(-1)!,
  };
}

function rejectedLogs(r: Rig): LogRecord[] {
  return r.logs().filter((record) => record.event === 'rejected');
}

/** Connect (from `localAddress`), optionally send `bytes`, and return the probe with the decision. */
async function connect(
  t: TapTest,
  r: Rig,
  localAddress = '127.0.0.1',
  bytes?: Buffer | string,
): Promise<{ p: Probe; decision: AdmissionResult; client: string }> {
  const p = await probe(t, r.host, r.port, { localAddress });
  const client = `${localAddress}:${p.socket.localPort}`; // read now: gone once the socket closes
  if (bytes !== undefined) p.write(bytes);
  return { p, decision: await r.next(), client };
}

/** The client got exactly `expected` and the connection was closed by the proxy. */
async function expectClosedWith(t: TapTest, p: Probe, expected: string, what: string): Promise<void> {
  const end = await probeClosed(p, 4000);
  t.ok(end, `${what}: closed`);
  t.equal(p.data().toString('latin1'), expected, `${what}: received ${JSON.stringify(expected)}`);
}

t.test('unknown peer (reset before admission): reset unread, counted and logged as peer-gone, nothing else', async (t) => {
  const r = await rig(t);
  const socket = new net.Socket(); // never connected: no remoteAddress, as after a reset
  const decision = await admitConnection(socket, r.runtime, { metrics: r.metrics, accepting: () => true });
  t.same(decision, { kind: 'refused', reason: 'peer-gone', how: 'reset' });
  t.ok(socket.destroyed, 'the socket is gone');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'peer-gone' }], 'counted as peer-gone');
  const logged = rejectedLogs(r);
  t.equal(logged.length, 1);
  t.match(logged[0], { level: 'debug', event: 'rejected', limit: 'peer-gone', listener: NAME });
  t.equal(r.runtime.slots.total, 0, 'no slot taken');
});

t.test('shutting down: 421 shutdown, neither counted nor logged as a rejection', async (t) => {
  const r = await rig(t);
  r.setAccepting(false);
  const { p, decision } = await connect(t, r);
  t.same(decision, { kind: 'refused', reason: 'shutting-down', how: 'reply' });
  await expectClosedWith(t, p, SHUTDOWN, 'shutting down');
  t.same(r.metrics.limitHits, []);
  t.same(rejectedLogs(r), []);
});

t.test('admitted: the socket peer is the client, the local address what it dialled; a slot is taken until released', async (t) => {
  const r = await rig(t);
  const settings = r.runtime.settings;
  const { p, decision, client } = await connect(t, r, '127.0.0.2');
  if (decision.kind !== 'admitted') throw new Error(`refused: ${decision.reason}`);
  t.same(decision.endpoints, {
    client: { ip: '127.0.0.2', port: Number(client.split(':')[1]) },
    dialled: { ip: '127.0.0.1', port: r.port },
    local: { ip: '127.0.0.1', port: r.port },
    initialData: null,
  });
  t.equal(decision.settings, settings, 'with the listener settings in force');
  t.equal(r.runtime.slots.total, 1, 'one slot taken');
  t.equal(r.runtime.slots.heldBy('127.0.0.2'), 1, 'for the client address');
  t.ok(r.lastSocket().isPaused(), 'nothing read from the client (the session reads)');
  t.equal(p.data().length, 0, 'nothing sent to the client');
  decision.release();
  decision.release();
  t.equal(r.runtime.slots.total, 0, 'released once, however often called');
  t.same(r.metrics.limitHits, []);
  t.same(rejectedLogs(r), []);
});

t.test('ACL deny, action reply: the ACL 421, counted and logged with the client', async (t) => {
  const r = await rig(t, ['    acl:', '      deny: [127.0.0.3/32]']);
  const { p, decision, client } = await connect(t, r, '127.0.0.3');
  t.same(decision, { kind: 'refused', reason: 'acl-deny', how: 'reply' });
  await expectClosedWith(t, p, ACL_REPLY, 'denied');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'acl-deny' }]);
  const logged = rejectedLogs(r);
  t.equal(logged.length, 1);
  t.match(logged[0], { level: 'warn', limit: 'acl-deny', listener: NAME, client, msg: 'connection refused: acl-deny' });
  const other = await connect(t, r, '127.0.0.4');
  t.equal(other.decision.kind, 'admitted', 'an address not denied is admitted');
  t.equal(r.runtime.slots.total, 1, 'the refused connection took no slot');
});

t.test('ACL deny, action close: closed without a byte', async (t) => {
  const r = await rig(t, ['    acl:', '      allow: [10.0.0.0/8]', '      action: close']);
  const { p, decision } = await connect(t, r);
  t.same(decision, { kind: 'refused', reason: 'acl-deny', how: 'close' });
  const end = await probeClosed(p, 2000);
  t.ok(end && end.bytes === 0, 'closed, zero bytes');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'acl-deny' }]);
  t.equal(rejectedLogs(r).length, 1);
});

t.test('maxSessions: the connection over the limit gets 421 (sessions-total); a released slot admits again', async (t) => {
  const r = await rig(t, ['    limits:', '      maxSessions: 2']);
  const first = await connect(t, r, '127.0.0.1');
  const second = await connect(t, r, '127.0.0.2');
  t.equal(first.decision.kind, 'admitted');
  t.equal(second.decision.kind, 'admitted');
  const third = await connect(t, r, '127.0.0.3');
  t.same(third.decision, { kind: 'refused', reason: 'sessions-total', how: 'reply' });
  await expectClosedWith(t, third.p, TOO_MANY, 'third');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'sessions-total' }]);
  t.match(rejectedLogs(r), [{ level: 'warn', limit: 'sessions-total', max: 2, client: third.client }]);
  if (first.decision.kind === 'admitted') first.decision.release();
  t.equal((await connect(t, r, '127.0.0.3')).decision.kind, 'admitted', 'admitted once a slot is free');
});

t.test('maxSessionsPerIp: one address over its share gets 421 (sessions-per-ip), others are admitted', async (t) => {
  const r = await rig(t, ['    limits:', '      maxSessionsPerIp: 1']);
  t.equal((await connect(t, r, '127.0.0.1')).decision.kind, 'admitted');
  const again = await connect(t, r, '127.0.0.1');
  t.same(again.decision, { kind: 'refused', reason: 'sessions-per-ip', how: 'reply' });
  await expectClosedWith(t, again.p, TOO_MANY, 'second from 127.0.0.1');
  t.equal((await connect(t, r, '127.0.0.2')).decision.kind, 'admitted', 'another address is admitted');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'sessions-per-ip' }]);
  t.match(rejectedLogs(r), [{ level: 'warn', limit: 'sessions-per-ip', max: 1, client: again.client }]);
});

t.test('PROXY header from an untrusted sender: closed without a byte, counted as proxy-protocol', async (t) => {
  const r = await rig(t, ['    proxyProtocol:', '      accept: v1', '      from: [10.0.0.0/8]']);
  const { p, decision, client } = await connect(t, r, '127.0.0.1', 'PROXY TCP4 198.51.100.7 203.0.113.10 40000 21\r\n');
  t.same(decision, { kind: 'refused', reason: 'proxy-protocol', how: 'close' });
  const end = await probeClosed(p, 2000);
  t.ok(end && end.bytes === 0, 'closed, zero bytes');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'proxy-protocol' }]);
  t.match(rejectedLogs(r), [{ level: 'warn', limit: 'proxy-protocol', from: client, err: 'sender is not a trusted load balancer' }]);
});

t.test('PROXY header that does not parse: closed without a byte, counted with the parser error', async (t) => {
  const r = await rig(t, PP_TRUSTED);
  const { p, decision } = await connect(t, r, '127.0.0.1', 'USER anonymous\r\n');
  t.same(decision, { kind: 'refused', reason: 'proxy-protocol', how: 'close' });
  t.ok(await probeClosed(p, 2000), 'closed');
  t.equal(p.data().length, 0, 'zero bytes');
  t.same(r.metrics.limitHits, [{ listener: NAME, reason: 'proxy-protocol' }]);
  const logged = rejectedLogs(r);
  t.equal(logged.length, 1);
  t.ok(typeof logged[0]?.err === 'string' && logged[0].err.length > 0, `with the reason (${String(logged[0]?.err)})`);
});

t.test('PROXY LOCAL (health check): a quiet FIN, logged at debug, not a rejection', async (t) => {
  const r = await rig(t, PP_TRUSTED);
  for (const [what, header] of [
    ['v2 LOCAL', encodeProxyHeaderV2({ command: 'local' })],
    ['v1 UNKNOWN', encodeProxyHeaderV1({ command: 'local' })],
  ] as const) {
    const { p, decision } = await connect(t, r, '127.0.0.1', header);
    t.same(decision, { kind: 'refused', reason: 'health-check', how: 'end' }, what);
    const end = await probeClosed(p, 3000);
    t.equal(end?.how, 'end', `${what}: ended with a FIN`);
    t.equal(end?.bytes, 0, `${what}: not a byte`);
  }
  t.same(r.metrics.limitHits, [], 'not counted');
  t.same(rejectedLogs(r), [], 'no rejection logged');
  t.match(r.logs().filter((record) => record.event === 'proxy-local'), [{ level: 'debug', listener: NAME }, { level: 'debug', listener: NAME }]);
});

t.test('PROXY header: its source is the client (ACL, limits, endpoints), the bytes behind it are kept', async (t) => {
  const r = await rig(t, [...PP_TRUSTED, '    acl:', '      deny: [198.51.100.0/24]']);
  const denied = await connect(t, r, '127.0.0.1', 'PROXY TCP4 198.51.100.7 203.0.113.10 40000 21\r\n');
  t.same(denied.decision, { kind: 'refused', reason: 'acl-deny', how: 'reply' }, 'the header client is denied, not the balancer');
  await expectClosedWith(t, denied.p, ACL_REPLY, 'denied header client');
  t.match(rejectedLogs(r), [{ limit: 'acl-deny', client: '198.51.100.7:40000' }]);

  const { decision } = await connect(t, r, '127.0.0.1', 'PROXY TCP4 192.0.2.1 203.0.113.10 40001 21\r\nUSER x\r\n');
  if (decision.kind !== 'admitted') throw new Error(`refused: ${decision.reason}`);
  t.same(decision.endpoints.client, { ip: '192.0.2.1', port: 40001 }, 'client from the header source');
  t.same(decision.endpoints.dialled, { ip: '203.0.113.10', port: 21 }, 'dialled from the header destination');
  t.same(decision.endpoints.local, { ip: '127.0.0.1', port: r.port }, 'local is the socket');
  t.equal(decision.endpoints.initialData?.toString('latin1'), 'USER x\r\n', 'the FTP bytes behind the header are kept');
  t.equal(r.runtime.slots.heldBy('192.0.2.1'), 1, 'the slot is the header client\'s');
  t.equal(r.runtime.slots.heldBy('127.0.0.1'), 0, 'not the balancer\'s');
});

t.test('shutdown while the PROXY header was awaited: 421 shutdown once it arrives', async (t) => {
  const r = await rig(t, PP_TRUSTED);
  const p = await probe(t, r.host, r.port);
  const decided = r.next();
  await new Promise((resolve) => setTimeout(resolve, 50));
  r.setAccepting(false);
  p.write('PROXY TCP4 192.0.2.1 203.0.113.10 40001 21\r\n');
  t.same(await decided, { kind: 'refused', reason: 'shutting-down', how: 'reply' });
  await expectClosedWith(t, p, SHUTDOWN, 'late header');
  t.same(r.metrics.limitHits, []);
});

t.test('a reload while the PROXY header is awaited: the connection is judged and built with the settings it arrived under', async (t) => {
  const r = await rig(t, PP_TRUSTED);
  const before = r.runtime.settings;
  const p = await probe(t, r.host, r.port);
  const decided = r.next();
  await new Promise((resolve) => setTimeout(resolve, 50));
  const denyAll = listenerConfig({ name: NAME, passivePorts: blocks.take(4).text, lines: [...PP_TRUSTED, '    acl:', '      deny: [0.0.0.0/0]'] });
  r.runtime.apply(await prepareListener(denyAll, r.runtimeDeps, r.runtime));
  p.write('PROXY TCP4 192.0.2.1 203.0.113.10 40001 21\r\n');
  const decision = await decided;
  t.equal(decision.kind, 'admitted', 'the ACL in force on arrival admitted it');
  if (decision.kind === 'admitted') t.equal(decision.settings, before, 'with the settings of its arrival');
  const late = await connect(t, r, '127.0.0.1', 'PROXY TCP4 192.0.2.1 203.0.113.10 40002 21\r\n');
  t.equal(late.decision.kind, 'refused', 'a connection after the reload sees the new ACL');
});

t.test('aclAllows: deny wins, a non-empty allow list admits only its members', async (t) => {
  const config = (lines: string[]) => listenerConfig({ name: 'acl', passivePorts: '15990-15999', lines: ['    acl:', ...lines.map((line) => `      ${line}`)] });
  t.ok(aclAllows('192.0.2.1', config(['deny: []'])), 'empty lists admit everyone');
  t.notOk(aclAllows('192.0.2.1', config(['deny: [192.0.2.0/24]'])), 'denied');
  t.notOk(aclAllows('192.0.2.1', config(['allow: [192.0.2.0/24]', 'deny: [192.0.2.1/32]'])), 'deny wins over allow');
  t.ok(aclAllows('192.0.2.2', config(['allow: [192.0.2.0/24]', 'deny: [192.0.2.1/32]'])), 'allowed, not denied');
  t.notOk(aclAllows('198.51.100.1', config(['allow: [192.0.2.0/24]'])), 'outside a non-empty allow list');
});

t.test('SessionSlots: counted in total and per address; each release gives back one slot, once', async (t) => {
  const slots = new SessionSlots();
  const a1 = slots.take('192.0.2.1');
  const a2 = slots.take('192.0.2.1');
  const b = slots.take('192.0.2.2');
  t.equal(slots.total, 3);
  t.equal(slots.heldBy('192.0.2.1'), 2);
  a1();
  a1();
  t.equal(slots.total, 2, 'a second release of the same slot is ignored');
  t.equal(slots.heldBy('192.0.2.1'), 1);
  a2();
  b();
  t.equal(slots.total, 0);
  t.equal(slots.heldBy('192.0.2.1'), 0);
});
