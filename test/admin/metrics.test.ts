/**
 * createPromMetrics(): each ProxyMetrics call shows up in the Prometheus text exposition with
 * the documented name, type, labels and HELP; pool gauges are read at scrape time; the registry
 * is private (the global default stays empty of ftpnp_*) and carries the default process
 * metrics; bad values are dropped, never thrown. NOOP_METRICS accepts every call.
 */
import t from 'tap';
import { Gauge, register as globalRegistry } from 'prom-client';
import {
  createPromMetrics,
  NOOP_METRICS,
  REJECTION_REASONS,
  TRANSFER_DURATION_BUCKETS_S,
  UPSTREAM_CONNECT_BUCKETS_S,
  type ProxyMetrics,
} from '../../src/metrics.js';

interface Exposition {
  /** Sample value by `name{label="v",...}` with labels sorted by name. */
  readonly samples: Map<string, number>;
  readonly types: Map<string, string>;
  readonly help: Map<string, string>;
}

/** Key for a sample: the metric name and its labels in sorted order, as the parser builds it. */
function key(name: string, labels: Record<string, string> = {}): string {
  const parts = Object.keys(labels)
    .sort()
    .map((label) => `${label}="${labels[label]}"`);
  return parts.length ? `${name}{${parts.join(',')}}` : name;
}

/** A small parser for the Prometheus text format (version 0.0.4), enough for these tests. */
function parseExposition(text: string): Exposition {
  const samples = new Map<string, number>();
  const types = new Map<string, string>();
  const help = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const comment = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
    if (comment) {
      (comment[1] === 'HELP' ? help : types).set(comment[2]!, comment[3]!);
      continue;
    }
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$/.exec(line);
    if (!sample) throw new Error(`unparsable exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const match of (sample[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[match[1]!] = match[2]!;
    }
    const raw = sample[3]!;
    const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw);
    samples.set(key(sample[1]!, labels), value);
  }
  return { samples, types, help };
}

async function scrape(metrics: { registry: { metrics(): Promise<string> } }): Promise<Exposition> {
  return parseExposition(await metrics.registry.metrics());
}

const FTPNP_METRICS: ReadonlyArray<[string, string]> = [
  ['ftpnp_sessions_open', 'gauge'],
  ['ftpnp_sessions_total', 'counter'],
  ['ftpnp_transfers_total', 'counter'],
  ['ftpnp_transfer_bytes_total', 'counter'],
  ['ftpnp_transfer_wire_bytes_total', 'counter'],
  ['ftpnp_transfer_duration_seconds', 'histogram'],
  ['ftpnp_rejections_total', 'counter'],
  ['ftpnp_upstream_connect_failures_total', 'counter'],
  ['ftpnp_upstream_connect_seconds', 'histogram'],
  ['ftpnp_data_strangers_total', 'counter'],
  ['ftpnp_kernel_mappings_total', 'counter'],
  ['ftpnp_kernel_fallbacks_total', 'counter'],
  ['ftpnp_tls_handshakes_total', 'counter'],
  ['ftpnp_upstream_choices_total', 'counter'],
  ['ftpnp_data_ports_leased', 'gauge'],
  ['ftpnp_data_ports_free', 'gauge'],
];

t.test('the text the parser sees is what prom-client writes', async (t) => {
  const metrics = createPromMetrics();
  metrics.sessionOpened('edge');
  const text = await metrics.registry.metrics();
  t.match(text, /^ftpnp_sessions_open\{listener="edge"\} 1$/m, 'literal sample line');
  t.equal(parseExposition(text).samples.get(key('ftpnp_sessions_open', { listener: 'edge' })), 1, 'parsed the same');
});

t.test('every ftpnp_ metric exists with its type and HELP text, and no others', async (t) => {
  const metrics = createPromMetrics();
  const { types, help } = await scrape(metrics);
  for (const [name, type] of FTPNP_METRICS) {
    t.equal(types.get(name), type, `${name} is a ${type}`);
    t.ok((help.get(name) ?? '').length > 10, `${name} has HELP text`);
  }
  const ours = [...types.keys()].filter((name) => name.startsWith('ftpnp_')).sort();
  t.same(ours, FTPNP_METRICS.map(([name]) => name).sort(), 'exactly the documented ftpnp_ metrics');
});

t.test('wire bytes of kernel-carried transfers: their own counter, by toward, never in transfer_bytes', async (t) => {
  const metrics = createPromMetrics();
  metrics.sessionOpened('edge');
  let { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_transfer_wire_bytes_total', { listener: 'edge', toward: 'client' })), 0, 'present at 0 from the start');
  metrics.transferWireBytes('edge', { toClient: 4300000, toServer: 90000 });
  metrics.transferWireBytes('edge', { toClient: 100, toServer: Number.NaN });
  ({ samples } = await scrape(metrics));
  t.equal(samples.get(key('ftpnp_transfer_wire_bytes_total', { listener: 'edge', toward: 'client' })), 4300100);
  t.equal(samples.get(key('ftpnp_transfer_wire_bytes_total', { listener: 'edge', toward: 'server' })), 90000, 'a NaN is dropped');
  t.equal(samples.get(key('ftpnp_transfer_bytes_total', { listener: 'edge', direction: 'download' })), 0, 'payload bytes untouched');
});

t.test('sessions: open gauge goes up and down, total only up, per listener', async (t) => {
  const metrics = createPromMetrics();
  metrics.sessionOpened('edge');
  metrics.sessionOpened('edge');
  metrics.sessionOpened('inside');
  metrics.sessionClosed('edge');
  const { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_sessions_open', { listener: 'edge' })), 1, 'edge: 2 opened, 1 closed');
  t.equal(samples.get(key('ftpnp_sessions_total', { listener: 'edge' })), 2, 'edge: 2 accepted');
  t.equal(samples.get(key('ftpnp_sessions_open', { listener: 'inside' })), 1, 'inside open');
  t.equal(samples.get(key('ftpnp_sessions_total', { listener: 'inside' })), 1, 'inside total');
  metrics.sessionClosed('edge');
  metrics.sessionClosed('inside');
  const after = (await scrape(metrics)).samples;
  t.equal(after.get(key('ftpnp_sessions_open', { listener: 'edge' })), 0, 'edge back to 0');
  t.equal(after.get(key('ftpnp_sessions_open', { listener: 'inside' })), 0, 'inside back to 0');
  t.equal(after.get(key('ftpnp_sessions_total', { listener: 'edge' })), 2, 'total does not go down');
});

t.test('transfers: count by direction and result, bytes by direction, duration histogram', async (t) => {
  const metrics = createPromMetrics();
  metrics.transferFinished('edge', 'download', 'ok', 1000, 0.2);
  metrics.transferFinished('edge', 'download', 'ok', 24, 0.005);
  metrics.transferFinished('edge', 'download', 'aborted', 100, 700);
  metrics.transferFinished('edge', 'upload', 'failed', 500, 3);
  const { samples } = await scrape(metrics);
  const count = (direction: string, result: string): number | undefined =>
    samples.get(key('ftpnp_transfers_total', { listener: 'edge', direction, result }));
  t.equal(count('download', 'ok'), 2, 'download ok');
  t.equal(count('download', 'aborted'), 1, 'download aborted');
  t.equal(count('download', 'failed'), 0, 'download failed present at 0');
  t.equal(count('upload', 'failed'), 1, 'upload failed');
  t.equal(count('upload', 'ok'), 0, 'upload ok present at 0');
  t.equal(samples.get(key('ftpnp_transfer_bytes_total', { listener: 'edge', direction: 'download' })), 1124, 'download bytes, partial included');
  t.equal(samples.get(key('ftpnp_transfer_bytes_total', { listener: 'edge', direction: 'upload' })), 500, 'upload bytes');

  const hist = (suffix: string, direction: string, le?: string): number | undefined =>
    samples.get(key(`ftpnp_transfer_duration_seconds_${suffix}`, le === undefined ? { listener: 'edge', direction } : { listener: 'edge', direction, le }));
  t.equal(hist('count', 'download'), 3, 'download _count');
  t.equal(hist('count', 'upload'), 1, 'upload _count');
  t.ok(Math.abs((hist('sum', 'download') ?? 0) - 700.205) < 1e-9, 'download _sum');
  t.equal(hist('bucket', 'download', '0.01'), 1, '5 ms transfer in the 0.01 bucket');
  t.equal(hist('bucket', 'download', '0.1'), 1, '0.2 s transfer not in 0.1');
  t.equal(hist('bucket', 'download', '0.25'), 2, '0.2 s transfer in 0.25');
  t.equal(hist('bucket', 'download', '600'), 2, '700 s transfer beyond the last bucket');
  t.equal(hist('bucket', 'download', '+Inf'), 3, '+Inf holds all');
  t.equal(hist('bucket', 'upload', '2.5'), 0, '3 s upload not in 2.5');
  t.equal(hist('bucket', 'upload', '5'), 1, '3 s upload in 5');
});

t.test('transfer duration buckets run from 10 ms to 600 s', async (t) => {
  const metrics = createPromMetrics();
  metrics.transferFinished('edge', 'upload', 'ok', 1, 1);
  const { samples } = await scrape(metrics);
  const les = [...samples.keys()]
    .filter((k) => k.startsWith('ftpnp_transfer_duration_seconds_bucket{') && k.includes('direction="upload"'))
    .map((k) => /le="([^"]+)"/.exec(k)![1]!);
  t.same(les, [...TRANSFER_DURATION_BUCKETS_S.map(String), '+Inf'], 'exposed buckets');
  t.equal(TRANSFER_DURATION_BUCKETS_S[0], 0.01);
  t.equal(TRANSFER_DURATION_BUCKETS_S.at(-1), 600);
});

t.test('rejections: one series per reason, each starting at zero once the listener is seen', async (t) => {
  const metrics = createPromMetrics();
  metrics.limitHit('edge', 'sessions-per-ip');
  metrics.limitHit('edge', 'sessions-per-ip');
  metrics.limitHit('edge', 'acl-deny');
  const { samples } = await scrape(metrics);
  const rejected = (reason: string): number | undefined => samples.get(key('ftpnp_rejections_total', { listener: 'edge', reason }));
  t.equal(rejected('sessions-per-ip'), 2);
  t.equal(rejected('acl-deny'), 1);
  t.equal(REJECTION_REASONS.length, 14, 'every reason of the type');
  for (const reason of REJECTION_REASONS) {
    if (reason !== 'sessions-per-ip' && reason !== 'acl-deny') t.equal(rejected(reason), 0, `${reason} present at 0`);
  }
  for (const reason of REJECTION_REASONS) metrics.limitHit('edge', reason);
  const after = (await scrape(metrics)).samples;
  t.ok(
    REJECTION_REASONS.every((reason) => (after.get(key('ftpnp_rejections_total', { listener: 'edge', reason })) ?? 0) >= 1),
    'each reason counted',
  );
});

t.test('upstream choices (forward, transparent): counted by mode and result, no series for other listeners', async (t) => {
  const metrics = createPromMetrics();
  metrics.sessionOpened('fixed');
  metrics.upstreamChoice('fwd', 'forward', 'ok');
  metrics.upstreamChoice('fwd', 'forward', 'ok');
  metrics.upstreamChoice('fwd', 'forward', 'denied');
  metrics.upstreamChoice('tp', 'transparent', 'not-redirected');
  const { samples } = await scrape(metrics);
  const choice = (listener: string, mode: string, result: string): number | undefined => samples.get(key('ftpnp_upstream_choices_total', { listener, mode, result }));
  t.equal(choice('fwd', 'forward', 'ok'), 2);
  t.equal(choice('fwd', 'forward', 'denied'), 1);
  t.equal(choice('tp', 'transparent', 'not-redirected'), 1);
  t.notOk([...samples.keys()].some((k) => k.startsWith('ftpnp_upstream_choices_total') && k.includes('"fixed"')), 'a fixed listener has none');
});

t.test('upstream connect: failures counted, latency observed on success only', async (t) => {
  const metrics = createPromMetrics();
  metrics.upstreamConnect('edge', true, 0.0007);
  metrics.upstreamConnect('edge', true, 0.03);
  metrics.upstreamConnect('edge', false, 5);
  const { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_upstream_connect_failures_total', { listener: 'edge' })), 1, 'one failure');
  t.equal(samples.get(key('ftpnp_upstream_connect_seconds_count', { listener: 'edge' })), 2, 'two successes observed');
  t.ok(Math.abs((samples.get(key('ftpnp_upstream_connect_seconds_sum', { listener: 'edge' })) ?? 0) - 0.0307) < 1e-9, '_sum excludes the failure');
  t.equal(samples.get(key('ftpnp_upstream_connect_seconds_bucket', { listener: 'edge', le: '0.0005' })), 0, '0.7 ms not under 0.5 ms');
  t.equal(samples.get(key('ftpnp_upstream_connect_seconds_bucket', { listener: 'edge', le: '0.001' })), 1, '0.7 ms under 1 ms');
  t.equal(samples.get(key('ftpnp_upstream_connect_seconds_bucket', { listener: 'edge', le: '0.05' })), 2, '30 ms under 50 ms');
  const les = [...samples.keys()]
    .filter((k) => k.startsWith('ftpnp_upstream_connect_seconds_bucket{'))
    .map((k) => /le="([^"]+)"/.exec(k)![1]!);
  t.same(les, [...UPSTREAM_CONNECT_BUCKETS_S.map(String), '+Inf'], 'buckets 0.5 ms .. 5 s');
});

t.test('data strangers counted per listener', async (t) => {
  const metrics = createPromMetrics();
  metrics.dataStranger('edge');
  metrics.dataStranger('edge');
  metrics.sessionOpened('inside');
  const { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_data_strangers_total', { listener: 'edge' })), 2);
  t.equal(samples.get(key('ftpnp_data_strangers_total', { listener: 'inside' })), 0, 'other listener present at 0');
});

t.test('kernel mappings counted per listener and outcome, every outcome from 0', async (t) => {
  const metrics = createPromMetrics();
  metrics.kernelMapping('edge', 'added');
  metrics.kernelMapping('edge', 'added');
  metrics.kernelMapping('edge', 'failed');
  const { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_kernel_mappings_total', { listener: 'edge', outcome: 'added' })), 2);
  t.equal(samples.get(key('ftpnp_kernel_mappings_total', { listener: 'edge', outcome: 'failed' })), 1);
  t.equal(samples.get(key('ftpnp_kernel_mappings_total', { listener: 'edge', outcome: 'skipped' })), 0);
});

t.test('kernel fallbacks counted per listener and reason, every reason from 0 once a listener has one, none elsewhere', async (t) => {
  const metrics = createPromMetrics();
  metrics.kernelFallback('edge', 'both-listen');
  metrics.kernelFallback('edge', 'both-listen');
  metrics.kernelFallback('edge', 'tls');
  metrics.kernelMapping('relay-only', 'added');
  const { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_kernel_fallbacks_total', { listener: 'edge', reason: 'both-listen' })), 2);
  t.equal(samples.get(key('ftpnp_kernel_fallbacks_total', { listener: 'edge', reason: 'tls' })), 1);
  for (const reason of ['proxy-protocol', 'both-connect', 'mixed-family', 'loopback', 'source-port', 'host', 'failed']) {
    t.equal(samples.get(key('ftpnp_kernel_fallbacks_total', { listener: 'edge', reason })), 0, `${reason} present at 0`);
  }
  t.equal(samples.get(key('ftpnp_kernel_fallbacks_total', { listener: 'relay-only', reason: 'tls' })), undefined, 'no series for a listener without fallbacks');
});

t.test('TLS handshakes counted per leg, channel and result, every combination from 0', async (t) => {
  const metrics = createPromMetrics();
  metrics.tlsHandshake('edge', 'client', 'control', 'ok');
  metrics.tlsHandshake('edge', 'client', 'data', 'not-resumed');
  metrics.tlsHandshake('edge', 'client', 'data', 'not-resumed');
  metrics.tlsHandshake('edge', 'server', 'control', 'failed');
  const { samples } = await scrape(metrics);
  const at = (leg: string, channel: string, result: string): number | undefined => samples.get(key('ftpnp_tls_handshakes_total', { listener: 'edge', leg, channel, result }));
  t.equal(at('client', 'control', 'ok'), 1);
  t.equal(at('client', 'data', 'not-resumed'), 2);
  t.equal(at('server', 'control', 'failed'), 1);
  t.equal(at('server', 'data', 'ok'), 0, 'untouched combinations start at 0');
  t.equal(at('client', 'control', 'failed'), 0);
});

t.test('pool gauges are read from the stats callback at scrape time', async (t) => {
  const metrics = createPromMetrics();
  const passive = { size: 100, leased: 3 };
  let activeCalls = 0;
  metrics.registerPool('edge', 'passive', () => passive);
  metrics.registerPool('edge', 'active', () => {
    activeCalls++;
    return { size: 10, leased: 10 };
  });
  t.equal(activeCalls, 0, 'not read at registration');
  let { samples } = await scrape(metrics);
  t.ok(activeCalls >= 1, 'read during the scrape');
  t.equal(samples.get(key('ftpnp_data_ports_leased', { listener: 'edge', pool: 'passive' })), 3);
  t.equal(samples.get(key('ftpnp_data_ports_free', { listener: 'edge', pool: 'passive' })), 97);
  t.equal(samples.get(key('ftpnp_data_ports_leased', { listener: 'edge', pool: 'active' })), 10);
  t.equal(samples.get(key('ftpnp_data_ports_free', { listener: 'edge', pool: 'active' })), 0);

  passive.leased = 42;
  ({ samples } = await scrape(metrics));
  t.equal(samples.get(key('ftpnp_data_ports_leased', { listener: 'edge', pool: 'passive' })), 42, 'current value, not the first one');
  t.equal(samples.get(key('ftpnp_data_ports_free', { listener: 'edge', pool: 'passive' })), 58);

  metrics.registerPool('edge', 'passive', () => ({ size: 5, leased: 1 }));
  ({ samples } = await scrape(metrics));
  t.equal(samples.get(key('ftpnp_data_ports_leased', { listener: 'edge', pool: 'passive' })), 1, 'registering again replaces the callback');
  t.equal(samples.get(key('ftpnp_data_ports_free', { listener: 'edge', pool: 'passive' })), 4);
});

t.test('a throwing pool callback drops its series, not the scrape', async (t) => {
  const metrics = createPromMetrics();
  metrics.registerPool('edge', 'passive', () => {
    throw new Error('pool gone');
  });
  metrics.registerPool('inside', 'passive', () => ({ size: 4, leased: 1 }));
  metrics.sessionOpened('edge');
  const { samples } = await scrape(metrics);
  t.equal(samples.has(key('ftpnp_data_ports_leased', { listener: 'edge', pool: 'passive' })), false, 'no sample for the broken pool');
  t.equal(samples.get(key('ftpnp_data_ports_free', { listener: 'inside', pool: 'passive' })), 3, 'the other pool still reported');
  t.equal(samples.get(key('ftpnp_sessions_open', { listener: 'edge' })), 1, 'the rest of the scrape intact');
});

t.test('values Prometheus cannot hold are dropped, never thrown into the caller', async (t) => {
  const metrics = createPromMetrics();
  t.doesNotThrow(() => {
    metrics.transferFinished('edge', 'download', 'failed', Number.NaN, -1);
    metrics.transferFinished('edge', 'download', 'failed', -5, Number.POSITIVE_INFINITY);
    metrics.upstreamConnect('edge', true, Number.NaN);
  });
  const { samples } = await scrape(metrics);
  t.equal(samples.get(key('ftpnp_transfers_total', { listener: 'edge', direction: 'download', result: 'failed' })), 2, 'transfers still counted');
  t.equal(samples.get(key('ftpnp_transfer_bytes_total', { listener: 'edge', direction: 'download' })), 0, 'no bytes added');
  t.equal(samples.get(key('ftpnp_transfer_duration_seconds_count', { listener: 'edge', direction: 'download' })), 0, 'no duration observed');
  t.equal(samples.get(key('ftpnp_upstream_connect_seconds_count', { listener: 'edge' })), 0, 'no latency observed');
});

t.test('own registry with default process metrics; the global default registry is untouched', async (t) => {
  const a = createPromMetrics();
  const b = createPromMetrics();
  t.not(a.registry, globalRegistry, 'not the default registry');
  t.not(a.registry, b.registry, 'one registry per instance (no duplicate-registration error)');
  a.sessionOpened('edge');
  const { samples, types } = await scrape(a);
  t.equal(types.get('process_cpu_user_seconds_total'), 'counter', 'process CPU from collectDefaultMetrics');
  t.ok(types.has('nodejs_heap_size_used_bytes'), 'heap metrics');
  t.ok(types.has('nodejs_eventloop_lag_seconds'), 'event-loop lag');
  t.equal(samples.get(key('ftpnp_sessions_open', { listener: 'edge' })), 1);
  t.equal((await scrape(b)).samples.has(key('ftpnp_sessions_open', { listener: 'edge' })), false, 'b does not see a');
  t.notMatch(await globalRegistry.metrics(), /ftpnp_/, 'nothing in the global registry');
  t.equal(a.registry.contentType, 'text/plain; version=0.0.4; charset=utf-8', 'Prometheus text format');
});

t.test('a registry that fails to collect is visible to the caller (admin answers 500)', async (t) => {
  // Guards the contract src/admin.ts relies on: registry.metrics() rejects rather than hangs.
  const metrics = createPromMetrics();
  new Gauge({
    name: 'test_broken',
    help: 'broken',
    registers: [metrics.registry],
    collect(): void {
      throw new Error('collector broke');
    },
  });
  await t.rejects(metrics.registry.metrics(), /collector broke/);
});

t.test('NOOP_METRICS accepts every call and records nothing', async (t) => {
  const noop: ProxyMetrics = NOOP_METRICS;
  let read = 0;
  t.doesNotThrow(() => {
    noop.sessionOpened('edge');
    noop.sessionClosed('edge');
    noop.transferFinished('edge', 'download', 'ok', 10, 0.1);
    noop.limitHit('edge', 'idle-timeout');
    noop.upstreamConnect('edge', false, 1);
    noop.dataStranger('edge');
    noop.kernelMapping('edge', 'added');
    noop.kernelFallback('edge', 'both-listen');
    noop.tlsHandshake('edge', 'client', 'data', 'ok');
    noop.registerPool('edge', 'passive', () => {
      read++;
      return { size: 1, leased: 0 };
    });
  });
  t.equal(read, 0, 'pool callback never read');
  t.ok(Object.isFrozen(NOOP_METRICS), 'shared instance cannot be modified');
  t.equal(Object.keys(NOOP_METRICS).length, 12, 'implements all twelve methods');
});
