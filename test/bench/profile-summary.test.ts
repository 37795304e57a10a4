/**
 * The bench's profile summary (test/bench/profile-summary.ts) on a hand-made V8 profile: the
 * parts a frame belongs to, self time from samples and time deltas, idle left out.
 */
import t from 'tap';
import { partOf, summarize, summaryLines } from './profile-summary.js';

t.test('partOf: the part of the process a frame belongs to', async (t) => {
  const cases: Array<[string, string, string]> = [
    ['', '(garbage collector)', 'garbage collection'],
    ['', '(program)', 'native, unattributed (syscalls, libuv, V8)'],
    ['', '(root)', '(root)'],
    ['node:net', 'writeGeneric', 'node:net'],
    ['node:internal/stream_base_commons', 'writeBuffer', 'node:internal/stream_base_commons'],
    ['file:///opt/ftpnp/node_modules/pino/lib/proto.js', 'write', 'pino (logging)'],
    ['file:///opt/ftpnp/node_modules/sonic-boom/index.js', 'write', 'pino (logging)'],
    ['file:///opt/ftpnp/dist/session/command-pipeline.js', 'run', 'proxy: session/command-pipeline.js'],
    ['', 'writev', 'native: writev'],
    ['file:///opt/other.js', 'f', '/opt/other.js'],
  ];
  for (const [url, name, part] of cases) t.equal(partOf(url, name), part, `${url || '(no url)'} ${name}`);
});

t.test('summarize: self time per function and part, idle excluded', async (t) => {
  const frame = (functionName: string, url = '', lineNumber = 0): { functionName: string; url: string; lineNumber: number } => ({ functionName, url, lineNumber });
  const profile = {
    nodes: [
      { id: 1, callFrame: frame('(root)') },
      { id: 2, callFrame: frame('(idle)') },
      { id: 3, callFrame: frame('writeBuffer', 'node:internal/stream_base_commons', 40) },
      { id: 4, callFrame: frame('execute', 'file:///x/dist/session/command-pipeline.js', 9) },
      { id: 5, callFrame: frame('(garbage collector)') },
    ],
    startTime: 0,
    endTime: 10_000,
    // Sample i's time is the delta to the next sample (µs): idle 5 ms, writeBuffer 3, execute 1.5, GC 0.5.
    samples: [2, 3, 4, 5, 2],
    timeDeltas: [0, 5000, 3000, 1500, 500],
  };
  const summary = summarize(profile);
  t.equal(summary.busyMs, 5, 'busy: everything but idle, ms');
  t.same(summary.parts.map((p) => [p.part, p.ms]), [['node:internal/stream_base_commons', 3], ['proxy: session/command-pipeline.js', 1.5], ['garbage collection', 0.5]]);
  t.same(summary.functions.map((f) => [f.name, f.where, f.share]), [['writeBuffer', 'node:internal/stream_base_commons:41', 0.6], ['execute', 'session/command-pipeline.js:10', 0.3], ['(garbage collector)', '', 0.1]]);
  const lines = summaryLines('proxy', summary);
  t.equal(lines[0], 'proxy: 5 ms busy');
  t.ok(lines.includes('     60.0%  writeBuffer  node:internal/stream_base_commons:41'), 'printed as shares of busy time');
  const fromHits = summarize({ nodes: [{ id: 1, callFrame: frame('f', 'node:net'), hitCount: 3 }, { id: 2, callFrame: frame('(idle)'), hitCount: 1 }], startTime: 0, endTime: 4000 });
  t.equal(fromHits.busyMs, 3, 'without samples: hit counts over the profile\'s span');
});
