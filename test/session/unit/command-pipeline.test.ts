/**
 * CommandPipeline (src/session/command-pipeline.ts) without sockets: order, one command at a
 * time, start gating, the overflow bound, CPython's urgent ABOR (glued and unterminated),
 * stop and dropQueued, and a throwing command.
 */
import t from 'tap';
import type { FramedLine } from '../../../src/control/line-framer.js';
import { LineFramer } from '../../../src/control/line-framer.js';
import { CommandPipeline, type CommandPipelineHooks } from '../../../src/session/command-pipeline.js';

function line(text: string): FramedLine {
  const bytes = Buffer.from(text, 'latin1');
  return { text: bytes, raw: Buffer.concat([bytes, Buffer.from('\r\n')]) };
}

interface Recorder {
  readonly executed: string[];
  readonly events: string[];
  hooks: CommandPipelineHooks;
  /** Make the next executions wait until release() (one at a time). */
  hold(): void;
  release(): void;
}

function recorder(): Recorder {
  const executed: string[] = [];
  const events: string[] = [];
  let gate: Promise<void> | null = null;
  let open: (() => void) | null = null;
  return {
    executed,
    events,
    hold() {
      gate = new Promise<void>((resolve) => { open = resolve; });
    },
    release() {
      open?.();
      gate = null;
    },
    hooks: {
      async execute(l) {
        executed.push(l.text.toString('latin1'));
        if (gate) await gate;
      },
      activity: () => events.push('activity'),
      overflow: () => events.push('overflow'),
      changed: () => events.push('changed'),
      failed: (err) => events.push(`failed:${(err as Error).message}`),
    },
  };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

t.test('nothing runs before start(); then every line in order, one at a time', async (t) => {
  const r = recorder();
  const p = new CommandPipeline({ maxQueued: 10, abortIdleMs: 50 }, r.hooks);
  p.accept([line('USER a'), line('PASS b')], new LineFramer(512));
  await tick();
  t.same(r.executed, [], 'not started');
  t.equal(p.length, 2);
  r.hold();
  p.start();
  await tick();
  t.same(r.executed, ['USER a'], 'the first runs and the second waits for it');
  t.ok(p.isRunning);
  p.push(line('NOOP'));
  r.release();
  await tick();
  await tick();
  t.same(r.executed, ['USER a', 'PASS b', 'NOOP'], 'then the rest, in order');
  t.equal(p.length, 0);
  t.equal(r.events.filter((e) => e === 'activity').length, 3, 'each complete command is activity');
});

t.test('one line more than maxQueued is an overflow: queue emptied, nothing more taken', async (t) => {
  const r = recorder();
  const p = new CommandPipeline({ maxQueued: 3, abortIdleMs: 50 }, r.hooks);
  for (const text of ['A', 'B', 'C']) p.push(line(text));
  t.equal(p.length, 3);
  t.notOk(r.events.includes('overflow'));
  p.push(line('D'));
  t.ok(r.events.includes('overflow'), 'overflow reported');
  t.equal(p.length, 0, 'queue emptied');
  p.push(line('E'));
  p.start();
  await tick();
  t.same(r.executed, [], 'nothing runs after an overflow');
});

t.test("CPython's urgent ABOR: glued lines are split; an unterminated ABOR\\r becomes a line after abortIdleMs", async (t) => {
  const r = recorder();
  const p = new CommandPipeline({ maxQueued: 10, abortIdleMs: 30 }, r.hooks);
  p.start();
  const framer = new LineFramer(512);
  p.accept(framer.push(Buffer.from('ABOR\rNOOP\r\n')).lines, framer);
  await tick();
  await tick();
  t.same(r.executed, ['ABOR', 'NOOP'], 'ABOR\\rNOOP split into two commands');
  p.accept(framer.push(Buffer.from('\xff\xf4\xffABOR\r', 'latin1')).lines, framer);
  await tick();
  t.equal(r.executed.length, 2, 'the unterminated ABOR waits');
  await new Promise((resolve) => setTimeout(resolve, 80));
  t.equal(r.executed.length, 3, 'then runs as a line of its own');
  t.match(r.executed[2], /ABOR$/);
  p.accept(framer.push(Buffer.from('ABOR\r')).lines, framer);
  p.accept(framer.push(Buffer.from('\nNOOP\r\n')).lines, framer);
  await new Promise((resolve) => setTimeout(resolve, 80));
  t.same(r.executed.slice(3), ['ABOR', 'NOOP'], 'an ABOR\\r whose LF does arrive is not taken twice');
});

t.test('stop() drops the queue and takes nothing more; dropQueued() drops but keeps taking', async (t) => {
  const r = recorder();
  const p = new CommandPipeline({ maxQueued: 10, abortIdleMs: 50 }, r.hooks);
  p.push(line('A'));
  p.push(line('B'));
  t.equal(p.dropQueued(), 2, 'two dropped (lines pipelined behind AUTH TLS)');
  p.push(line('C'));
  p.start();
  await tick();
  t.same(r.executed, ['C'], 'still taking commands');
  r.hold();
  p.push(line('D'));
  p.push(line('E'));
  t.equal(p.length, 1, 'D runs, E waits');
  p.stop();
  t.equal(p.length, 0, 'stop dropped E');
  p.push(line('F'));
  r.release();
  await tick();
  t.same(r.executed, ['C', 'D'], 'stopped: E dropped, F refused');
  p.stop();
  t.pass('stop is idempotent');
});

t.test('a command that throws stops the pipeline and is reported once', async (t) => {
  const r = recorder();
  const hooks: CommandPipelineHooks = { ...r.hooks, execute: async (l) => { if (l.text.toString() === 'BAD') throw new Error('boom'); r.executed.push(l.text.toString()); } };
  const p = new CommandPipeline({ maxQueued: 10, abortIdleMs: 50 }, hooks);
  p.start();
  p.push(line('OK'));
  p.push(line('BAD'));
  p.push(line('AFTER'));
  await tick();
  await tick();
  t.same(r.executed, ['OK']);
  t.same(r.events.filter((e) => e.startsWith('failed')), ['failed:boom']);
});
