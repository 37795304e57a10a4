/**
 * ClientLeg (src/session/client-leg.ts) on loopback sockets: commands reach execute() in
 * order, the two bounds (line length, queued commands) close with their replies, flow control
 * stops reading while the queue is long, FIN and close are reported.
 */
import t from 'tap';
import { validateConfigText } from '../../../src/config/load.js';
import type { FramedLine } from '../../../src/control/line-framer.js';
import { ClientLeg, type ClientLegHooks } from '../../../src/session/client-leg.js';
import { memoryLogger } from '../../helpers/logs.js';
import { proxyYaml } from '../../helpers/proxy.js';
import { socketPair } from '../../helpers/sockets.js';
import { waitFor } from '../../helpers/async.js';
import type { TapTest } from '../../helpers/tap.js';

const CONFIG = validateConfigText(proxyYaml({
  upstreamHost: '127.0.0.1',
  upstreamPort: 21,
  extraYaml: ['    limits:', '      maxLineBytes: 512', '      maxQueuedCommands: 4'].join('\n'),
}), 'test').listeners[0]!;

interface Rig {
  leg: ClientLeg;
  peer: import('node:net').Socket;
  executed: string[];
  events: string[];
  /** Commands block in execute() until released. */
  release: () => void;
}

async function rig(t: TapTest, options: { block?: boolean } = {}): Promise<Rig> {
  const { app, inner } = await socketPair(t);
  let open: (() => void) | null = null;
  const gate = options.block ? new Promise<void>((resolve) => { open = resolve; }) : null;
  const executed: string[] = [];
  const events: string[] = [];
  const hooks: ClientLegHooks = {
    execute: async (line: FramedLine) => {
      executed.push(line.text.toString('latin1'));
      if (gate) await gate;
    },
    activity: () => events.push('activity'),
    close: (why, reply) => events.push(`close:${why}:${reply}`),
    fin: () => events.push('fin'),
    gone: (why) => events.push(`gone:${why}`),
    drained: () => {},
    outstanding: () => 0,
    limitHit: (reason) => events.push(`limit:${reason}`),
  };
  const leg = new ClientLeg(inner, CONFIG, memoryLogger().log, hooks);
  leg.connection.start();
  leg.pipeline.start();
  return { leg, peer: app, executed, events, release: () => open?.() };
}

t.test('commands reach execute() in order, each one activity; FIN and close are reported', async (t) => {
  const r = await rig(t);
  r.peer.write('USER a\r\nPASS b\r\nNOOP\r\n');
  t.ok(await waitFor(() => r.executed.length === 3), r.executed.join('|'));
  t.same(r.executed, ['USER a', 'PASS b', 'NOOP']);
  t.equal(r.events.filter((e) => e === 'activity').length, 3);
  r.peer.end();
  t.ok(await waitFor(() => r.events.includes('fin')), 'FIN reported');
  r.leg.connection.end();
  t.ok(await waitFor(() => r.events.some((e) => e.startsWith('gone:'))), 'close reported');
  t.ok(r.events.includes('gone:client closed'));
});

t.test('a line over maxLineBytes: counted, closed with 500 Command line too long.', async (t) => {
  const r = await rig(t);
  r.peer.write(`STOR ${'x'.repeat(600)}\r\n`);
  t.ok(await waitFor(() => r.events.some((e) => e.startsWith('close:'))));
  t.ok(r.events.includes('limit:line-too-long'));
  t.ok(r.events.includes('close:line too long:500 Command line too long.'));
  t.same(r.executed, []);
});

t.test('while a command runs, the queue fills: reading stops at half of maxQueuedCommands, one more than the bound closes with 421', async (t) => {
  const r = await rig(t, { block: true });
  r.peer.write('NOOP\r\nA\r\nB\r\n');
  t.ok(await waitFor(() => r.leg.pipeline.length === 2), 'one running, two queued');
  t.ok(r.leg.connection.isPausedFor('backlog'), 'reading paused at half the bound');
  r.leg.stop();
  t.ok(r.leg.connection.isPausedFor('closing'), 'stop() pauses for closing');
  t.equal(r.leg.pipeline.length, 0, 'and drops the queue');
  r.release();
  const r2 = await rig(t, { block: true });
  r2.leg.pipeline.push({ text: Buffer.from('NOOP'), raw: Buffer.from('NOOP\r\n') });
  for (const text of ['A', 'B', 'C', 'D', 'E']) r2.leg.pipeline.push({ text: Buffer.from(text), raw: Buffer.from(`${text}\r\n`) });
  t.ok(r2.events.includes('close:command queue overflow:421 Too many pending commands.'), r2.events.join(' '));
  r2.release();
});
