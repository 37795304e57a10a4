/**
 * src/server/listener-runtime.ts: one builder (prepareListener) for the first bind and for
 * every reload. A kept listen address keeps its socket; changed relay port ranges get new
 * pools, except with bindAllPassivePorts on either side (kept, warned at apply); the
 * advertiser is always new; the settings are swapped in one step for new sessions only.
 * Preparing changes nothing, so a reload that cannot bind leaves every listener as it was.
 * Real sockets on 127.0.0.1. Relay ports 14000-14999 belong to this file.
 */
import t from 'tap';
import type net from 'node:net';
import netModule from 'node:net';
import { PortBlocks } from '../helpers/fake-server.js';
import type { TapTest } from '../helpers/tap.js';
import { withTimeout } from '../helpers/async.js';
import type { ListenerConfig } from '../../src/config/schema.js';
import { takeFreeRange, rangePorts } from '../helpers/ops.js';
import { originalDestinationUnavailable } from '../../src/server/original-destination.js';
import { ListenerRuntime, discardPrepared, prepareListener, type ListenerRuntimeDeps } from '../../src/server/listener-runtime.js';
import { ProxyServer } from '../../src/server.js';
import { validateConfigText } from '../../src/config/load.js';
import {
  closeServer,
  configFor,
  connectResult,
  freePort,
  listenerConfig,
  memoryLogger,
  occupy,
  RecordingMetrics,
  type LogRecord,
} from '../helpers/server-unit.js';

const blocks = new PortBlocks(14000);

interface Rig {
  readonly deps: ListenerRuntimeDeps;
  readonly metrics: RecordingMetrics;
  readonly logs: () => LogRecord[];
  /** Which runtime each accepted connection was handed to, in order. */
  readonly accepted: ListenerRuntime[];
}

function rig(): Rig {
  const { log, records } = memoryLogger();
  const metrics = new RecordingMetrics();
  const accepted: ListenerRuntime[] = [];
  const deps: ListenerRuntimeDeps = {
    log,
    metrics,
    accept: (runtime: ListenerRuntime, socket: net.Socket) => {
      accepted.push(runtime);
      socket.destroy();
    },
  };
  return { deps, metrics, logs: records, accepted };
}

async function open(t: TapTest, rt: Rig, config: ListenerConfig): Promise<ListenerRuntime> {
  const runtime = await ListenerRuntime.open(config, rt.deps);
  t.teardown(async () => {
    await runtime.closePorts();
    await runtime.stopAccepting();
  });
  return runtime;
}

/** Wait until `count` connections were accepted (bounded). */
async function acceptedCount(rt: Rig, count: number): Promise<number> {
  for (let i = 0; i < 100 && rt.accepted.length < count; i++) await new Promise((resolve) => setTimeout(resolve, 10));
  return rt.accepted.length;
}

t.test('open: binds the listen address, logs "listening", registers its pools, hands connections to accept', async (t) => {
  const rt = rig();
  const passive = blocks.take(4).text;
  const active = blocks.take(4).text;
  const config = listenerConfig({ name: 'rt', passivePorts: passive, activePorts: active });
  const runtime = await open(t, rt, config);
  const { host, port } = runtime.address();
  t.equal(host, '127.0.0.1');
  t.ok(port > 0, `bound to a port (${port})`);
  t.ok(runtime.listening, 'listening');
  t.equal(runtime.name, 'rt');
  t.equal(runtime.config, config, 'settings built from the configuration given');
  t.same(runtime.settings.clientPool.range, config.client.passivePorts, 'passive pool over passivePorts');
  t.same(runtime.settings.upstreamPool?.range, config.upstream.activePorts, 'active pool over activePorts');
  t.equal(runtime.slots.total, 0, 'no session counted');

  const listening = rt.logs().filter((r) => r.event === 'listening');
  t.equal(listening.length, 1, 'logged once');
  t.match(listening[0], { level: 'info', listener: 'rt', listen: `127.0.0.1:${port}`, upstream: '127.0.0.1:2121', passivePorts: passive, proxyProtocol: 'off' });
  t.same(rt.metrics.poolRegistrations, [{ listener: 'rt', pool: 'passive' }, { listener: 'rt', pool: 'active' }], 'both pools registered');
  t.same(rt.metrics.pools.get('rt/passive')?.(), { size: 4, leased: 0 }, 'passive stats callback');

  t.equal(await connectResult(port), 'connected');
  t.equal(await acceptedCount(rt, 1), 1, 'the connection reached accept');
  t.equal(rt.accepted[0], runtime, 'with its runtime');
});

t.test('reload, same address and ranges: same socket and pools, a new advertiser, settings swapped only by apply', async (t) => {
  const rt = rig();
  const passive = blocks.take(4).text;
  const first = listenerConfig({ name: 'same', passivePorts: passive });
  const runtime = await open(t, rt, first);
  const before = runtime.settings;
  const server = runtime.boundServer;
  const next = listenerConfig({ name: 'same', passivePorts: passive, advertise: '192.0.2.1', lines: ['    limits:', '      maxSessions: 3'] });

  const prepared = await prepareListener(next, rt.deps, runtime);
  t.equal(prepared.server, server, 'the listen socket is reused');
  t.equal(prepared.settings.clientPool, before.clientPool, 'the passive pool is kept');
  t.equal(prepared.settings.upstreamPool, null);
  t.not(prepared.settings.advertiser, before.advertiser, 'a new advertiser');
  t.equal(prepared.portsKept, false);
  t.equal(runtime.settings, before, 'preparing changed nothing');

  runtime.apply(prepared);
  t.equal(runtime.settings, prepared.settings, 'apply swaps the settings');
  t.equal(runtime.config.limits.maxSessions, 3, 'new sessions see the new configuration');
  t.equal(before.config, first, 'the old settings object is untouched (open sessions keep it)');
  t.equal(runtime.boundServer, server);
  t.equal(rt.metrics.poolRegistrations.length, 1, 'kept pools are not registered again');
  t.equal(rt.logs().filter((r) => r.event === 'reload-ports-skipped').length, 0, 'nothing to warn about');
  t.equal(await connectResult(runtime.address().port), 'connected', 'still accepting on the same port');
});

t.test('reload, changed ranges without bindAllPassivePorts: new pools for new sessions, the old ones keep their leases', async (t) => {
  const rt = rig();
  const first = listenerConfig({ name: 'ranges', passivePorts: await takeFreeRange(blocks) });
  const runtime = await open(t, rt, first);
  const old = runtime.settings;
  const lease = await old.clientPool.lease('127.0.0.1');
  t.teardown(() => lease.release());
  const nextRange = blocks.take(6).text;
  const active = blocks.take(4).text;
  const prepared = await prepareListener(listenerConfig({ name: 'ranges', passivePorts: nextRange, activePorts: active }), rt.deps, runtime);
  t.not(prepared.settings.clientPool, old.clientPool, 'a new passive pool');
  t.same(prepared.settings.clientPool.range, { first: rangePorts(nextRange)[0], last: rangePorts(nextRange)[5] });
  t.ok(prepared.settings.upstreamPool, 'a new active pool');
  runtime.apply(prepared);
  t.same(
    rt.metrics.poolRegistrations,
    [{ listener: 'ranges', pool: 'passive' }, { listener: 'ranges', pool: 'passive' }, { listener: 'ranges', pool: 'active' }],
    'the new pools are registered',
  );
  t.same(rt.metrics.pools.get('ranges/passive')?.(), { size: 6, leased: 0 }, 'metrics report the new pool');
  t.same(old.clientPool.stats, { size: 4, leased: 1 }, 'the old pool still holds its lease');
  t.equal(await connectResult(lease.port), 'connected', 'and the leased port is still bound');
});

t.test('reload, changed ranges with bindAllPassivePorts on either side: pools kept, warned at apply only', async (t) => {
  const rt = rig();
  const range = await takeFreeRange(blocks);
  const runtime = await open(t, rt, listenerConfig({ name: 'nlb', passivePorts: range, bindAllPassivePorts: true }));
  const pool = runtime.settings.clientPool;
  t.same(pool.stats, { size: 4, leased: 0 }, 'every port bound at open');
  for (const port of rangePorts(range)) t.equal(await connectResult(port), 'connected', `port ${port} bound from the start`);

  const changes = [
    { name: 'nlb', passivePorts: blocks.take(4).text, bindAllPassivePorts: true },
    { name: 'nlb', passivePorts: blocks.take(4).text },
    { name: 'nlb', passivePorts: range },
  ];
  for (const next of changes) {
    const prepared = await prepareListener(listenerConfig(next), rt.deps, runtime);
    t.equal(prepared.settings.clientPool, pool, `${JSON.stringify(next)}: the bound pool is kept`);
    t.equal(prepared.portsKept, true, 'and reported as kept');
    await discardPrepared(prepared, runtime);
    t.same(pool.stats, { size: 4, leased: 0 }, 'discarding the prepared reload leaves the kept pool bound');
  }
  t.equal(rt.logs().filter((r) => r.event === 'reload-ports-skipped').length, 0, 'no warning before apply');
  const prepared = await prepareListener(listenerConfig(changes[0]!), rt.deps, runtime);
  runtime.apply(prepared);
  const warned = rt.logs().filter((r) => r.event === 'reload-ports-skipped');
  t.equal(warned.length, 1, 'warned once at apply');
  t.match(warned[0], { level: 'warn', listener: 'nlb' });
  t.equal(runtime.settings.clientPool, pool, 'new sessions lease from the kept pool');
  t.equal(runtime.config, prepared.settings.config, 'while the rest of the configuration is in force');
  t.equal(rt.metrics.poolRegistrations.length, 1, 'nothing registered again');
  for (const port of rangePorts(range)) t.equal(await connectResult(port), 'connected', `port ${port} still bound`);
});

t.test('regression: after a reload kept the bound pools, the next reload still compares with what is bound', async (t) => {
  const rt = rig();
  const range = await takeFreeRange(blocks);
  const runtime = await open(t, rt, listenerConfig({ name: 'nlb2', passivePorts: range, bindAllPassivePorts: true }));
  const pool = runtime.settings.clientPool;
  // First reload turns bindAllPassivePorts off: the bound pool is kept (needs a restart).
  runtime.apply(await prepareListener(listenerConfig({ name: 'nlb2', passivePorts: range }), rt.deps, runtime));
  t.equal(runtime.settings.clientPool, pool, 'kept by the first reload');
  // Second reload changes the range: comparing with the configuration in force (bindAll off)
  // used to build a new pool over a range while the old one stayed bound for good.
  const prepared = await prepareListener(listenerConfig({ name: 'nlb2', passivePorts: await takeFreeRange(blocks) }), rt.deps, runtime);
  t.equal(prepared.settings.clientPool, pool, 'still the bound pool: ports are only handed over by a restart');
  t.equal(prepared.portsKept, true, 'and reported as kept');
  runtime.apply(prepared);
  for (const port of rangePorts(range)) t.equal(await connectResult(port), 'connected', `port ${port} still bound, by the pool sessions lease from`);
});

t.test('a removed listener unbinds its bindAllPassivePorts ports once its last session is gone', async (t) => {
  const rt = rig();
  const range = await takeFreeRange(blocks);
  const runtime = await open(t, rt, listenerConfig({ name: 'gone', passivePorts: range, bindAllPassivePorts: true }));
  const release = runtime.slots.take('198.51.100.7');
  runtime.retire();
  for (const port of rangePorts(range)) t.equal(await connectResult(port), 'connected', `port ${port} still bound while a session may hold it`);
  release();
  const refused = async (): Promise<boolean> => (await Promise.all(rangePorts(range).map((port) => connectResult(port)))).every((r) => r === 'ECONNREFUSED');
  let done = await refused();
  for (let i = 0; i < 50 && !done; i++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    done = await refused();
  }
  t.ok(done, 'every port unbound after the last session');
});

t.test('bindAllPassivePorts at open: a taken port is left out and warned about; all taken rejects and unbinds the listener', async (t) => {
  const rt = rig();
  const range = await takeFreeRange(blocks);
  const ports = rangePorts(range);
  const taken = await occupy(ports[1]!);
  t.teardown(() => closeServer(taken));
  const runtime = await open(t, rt, listenerConfig({ name: 'some', passivePorts: range, bindAllPassivePorts: true }));
  t.same(runtime.settings.clientPool.stats, { size: 3, leased: 0 }, 'three of four ports bound');
  const warned = rt.logs().filter((r) => r.event === 'passive-ports-unavailable');
  t.equal(warned.length, 1);
  t.same(warned[0]?.ports, [ports[1]], 'naming the taken port');

  const full = await takeFreeRange(blocks);
  const holders = await Promise.all(rangePorts(full).map((port) => occupy(port)));
  t.teardown(() => Promise.all(holders.map(closeServer)));
  const listenPort = await freePort();
  await t.rejects(
    ListenerRuntime.open(listenerConfig({ name: 'none', listen: `127.0.0.1:${listenPort}`, passivePorts: full, bindAllPassivePorts: true }), rt.deps),
    /listener none: none of passivePorts .* could be bound/,
  );
  t.equal(await connectResult(listenPort), 'ECONNREFUSED', 'the listen socket was closed again');
});

t.test('reload, changed listen address: bound at prepare, swapped at apply, the same runtime accepts', async (t) => {
  const rt = rig();
  const passive = blocks.take(4).text;
  const runtime = await open(t, rt, listenerConfig({ name: 'moved', passivePorts: passive }));
  const oldPort = runtime.address().port;
  const newPort = await freePort();
  const prepared = await prepareListener(listenerConfig({ name: 'moved', listen: `127.0.0.1:${newPort}`, passivePorts: passive }), rt.deps, runtime);
  t.not(prepared.server, runtime.boundServer, 'a new socket');
  t.equal(prepared.settings.clientPool, runtime.settings.clientPool, 'ranges unchanged: pools kept');
  t.equal(await connectResult(oldPort), 'connected', 'the old address accepts until apply');
  runtime.apply(prepared);
  t.equal(runtime.address().port, newPort);
  await new Promise((resolve) => setImmediate(resolve));
  t.equal(await connectResult(oldPort), 'ECONNREFUSED', 'the old address stopped accepting');
  t.equal(await connectResult(newPort), 'connected', 'the new address accepts');
  t.equal(await acceptedCount(rt, 2), 2);
  t.equal(rt.accepted[1], runtime, 'through the same runtime (its sessions and slots)');
});

t.test('regression: a connection to a newly bound address before the reload applies is handled once it does (or closed if it fails)', async (t) => {
  const rt = rig();
  const passive = blocks.take(4).text;
  const runtime = await open(t, rt, listenerConfig({ name: 'early', passivePorts: passive }));
  const newPort = await freePort();
  const prepared = await prepareListener(listenerConfig({ name: 'early', listen: `127.0.0.1:${newPort}`, passivePorts: passive }), rt.deps, runtime);
  const early = netModule.connect({ host: '127.0.0.1', port: newPort });
  early.on('error', () => {});
  const earlyClosed = new Promise<void>((resolve) => early.once('close', () => resolve()));
  await new Promise<void>((resolve) => early.once('connect', () => resolve()));
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.equal(rt.accepted.length, 0, 'not handled before apply');
  runtime.apply(prepared);
  t.equal(await acceptedCount(rt, 1), 1, 'handed to admission when the reload applies');
  t.equal(rt.accepted[0], runtime);
  await withTimeout(earlyClosed, 5000, 'the early connection handled and closed');
  t.pass('and not left hanging');

  const otherPort = await freePort();
  const failed = await prepareListener(listenerConfig({ name: 'early', listen: `127.0.0.1:${otherPort}`, passivePorts: passive }), rt.deps, runtime);
  const stranded = netModule.connect({ host: '127.0.0.1', port: otherPort });
  stranded.on('error', () => {});
  await new Promise<void>((resolve) => stranded.once('connect', () => resolve()));
  await new Promise((resolve) => setTimeout(resolve, 50));
  const strandedClosed = new Promise<void>((resolve) => (stranded.destroyed ? resolve() : stranded.once('close', () => resolve())));
  await discardPrepared(failed, runtime);
  await withTimeout(strandedClosed, 5000, 'the stranded connection closed');
  t.pass('a reload that failed closes what its socket accepted');
  t.equal(rt.accepted.length, 1, 'and hands nothing to admission');
});

t.test('discardPrepared releases what preparing bound, never what the running listener has', async (t) => {
  const rt = rig();
  const passive = blocks.take(4).text;
  const runtime = await open(t, rt, listenerConfig({ name: 'kept', passivePorts: passive }));
  const newPort = await freePort();
  const moved = await prepareListener(listenerConfig({ name: 'kept', listen: `127.0.0.1:${newPort}`, passivePorts: passive }), rt.deps, runtime);
  await discardPrepared(moved, runtime);
  t.equal(await connectResult(newPort), 'ECONNREFUSED', 'the new socket is closed');
  t.equal(await connectResult(runtime.address().port), 'connected', 'the running one is not');

  const range = await takeFreeRange(blocks);
  const fresh = await prepareListener(listenerConfig({ name: 'fresh', passivePorts: range, bindAllPassivePorts: true }), rt.deps, null);
  t.equal(await connectResult(rangePorts(range)[0]!), 'connected', 'a new listener binds its relay ports at prepare');
  await discardPrepared(fresh, null);
  for (const port of rangePorts(range)) t.equal(await connectResult(port), 'ECONNREFUSED', `port ${port} released`);
  t.equal(await connectResult((fresh.server.address() as net.AddressInfo | null)?.port ?? 1), 'ECONNREFUSED', 'its listen socket closed');
});

t.test('ProxyServer.reload: a listener that cannot be bound leaves every running listener as it was', async (t) => {
  const { log, records } = memoryLogger();
  const metrics = new RecordingMetrics();
  const keepRange = blocks.take(4).text;
  const server = new ProxyServer(configFor({ name: 'a', passivePorts: blocks.take(4).text }, { name: 'b', passivePorts: keepRange }), { log, metrics });
  t.teardown(() => server.close(0));
  const bound = await server.start();
  const full = await takeFreeRange(blocks);
  const holders = await Promise.all(rangePorts(full).map((port) => occupy(port)));
  t.teardown(() => Promise.all(holders.map(closeServer)));
  // a is dropped, b changes its range, c is new but none of its relay ports can be bound.
  const next = configFor({ name: 'b', passivePorts: blocks.take(6).text }, { name: 'c', passivePorts: full, bindAllPassivePorts: true });
  await t.rejects(server.reload(next), /listener c: none of passivePorts/);
  t.same(server.addresses(), bound, 'a and b still listen where they did');
  for (const listener of bound) t.equal(await connectResult(listener.port), 'connected', `${listener.name} still accepts`);
  t.same(server.poolStats().map((p) => [p.listener, p.size]), [['a', 4], ['b', 4]], 'b keeps its pool');
  t.equal(server.config.listeners.length, 2, 'the running configuration is kept');
  t.equal(records().filter((r) => r.event === 'listener-removed').length, 0, 'nothing removed');

  const ok = configFor({ name: 'b', passivePorts: blocks.take(6).text }, { name: 'c', passivePorts: await takeFreeRange(blocks), bindAllPassivePorts: true });
  t.same(await server.reload(ok), { added: ['c'], removed: ['a'], updated: ['b'] });
  t.same(server.poolStats().map((p) => [p.listener, p.size]), [['b', 6], ['c', 4]], 'b has its new pool, c every port of its range bound');
  t.equal(records().filter((r) => r.event === 'listener-removed' && r.listener === 'a').length, 1, 'a removed and logged');
});

t.test('issue #13: forward and transparent listeners start (transparent only where original destinations can be read); readiness does not dial a server', async (t) => {
  const chooser = (kind: 'forward' | 'transparent', listenPort: number): ListenerConfig =>
    validateConfigText(
      [
        'listeners:',
        '  - name: chooser',
        `    listen: "127.0.0.1:${listenPort}"`,
        '    upstream:',
        `      ${kind}: { allow: [198.51.100.0/24] }`,
        '    client:',
        `      passivePorts: "${blocks.take(4).text}"`,
        '    acl: { allow: [127.0.0.0/8] }',
        '',
      ].join('\n'),
    ).listeners[0]!;
  const unavailable = originalDestinationUnavailable();
  for (const kind of ['forward', 'transparent'] as const) {
    const rt = rig();
    const port = blocks.take(1).first;
    if (kind === 'transparent' && unavailable) {
      // Only without the native addon (never in CI, which builds it).
      await t.rejects(ListenerRuntime.open(chooser(kind, port), rt.deps), { code: 'FTPP_ERR_CONFIG', message: /upstream\.transparent cannot read where redirected clients were going/ }, 'transparent: start refused, and why');
      t.equal(await connectResult(port), 'ECONNREFUSED', 'nothing bound');
      continue;
    }
    await open(t, rt, chooser(kind, port));
    t.equal(await connectResult(port), 'connected', `${kind}: listening`);
    const listening = rt.logs().find((r) => r.event === 'listening');
    t.equal(listening?.upstream, `${kind} (chosen per session)`, `${kind}: the listening line says how the server is chosen`);
  }

  const { log } = memoryLogger();
  const server = new ProxyServer(configFor({ name: 'a', passivePorts: blocks.take(4).text }), { log, metrics: new RecordingMetrics() });
  t.teardown(() => server.close(0));
  await server.start();
  await server.reload({ ...server.config, listeners: [chooser('forward', blocks.take(1).first)] });
  const readiness = await server.readiness();
  t.equal(readiness.checks['chooser.upstream'], 'forward: chosen per session', 'no one server to check');
  t.equal(readiness.ready, true, 'ready once listening');
});
