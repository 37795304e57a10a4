/**
 * The queue of nftables changes that run off the event loop (src/data/nft-batches.ts), with
 * recording runners: what runs when, together or alone, and in which order against the
 * synchronous calls. The real addon's batches are exercised in kernel-forward.test.ts.
 */
import t from 'tap';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { NftChangeQueue } from '../../src/data/nft-batches.js';
import { runEachIfNeeded, type NftBatchRunner, type NftResult, type NftRunner } from '../../src/data/nft-runner.js';

/** Records every synchronous script; `fails` says which fail. */
function syncRunner(fails: (script: string) => boolean = () => false): { run: NftRunner; ran: string[] } {
  const ran: string[] = [];
  const run: NftRunner = (script): NftResult => {
    ran.push(script);
    return fails(script) ? { ok: false, output: '', error: 'No such file or directory' } : { ok: true, output: '', error: '' };
  };
  return { run, ran };
}

/** Records every batch and finishes it only when the test says so. */
function heldBatches(): { runBatch: NftBatchRunner; batches: string[][]; finish: (i: number, errors?: string[]) => void } {
  const batches: string[][] = [];
  const done: Array<(errors: readonly string[]) => void> = [];
  const runBatch: NftBatchRunner = (scripts, callback) => {
    batches.push([...scripts]);
    done.push(callback);
  };
  return { runBatch, batches, finish: (i, errors) => done[i]!(errors ?? batches[i]!.map(() => '')) };
}

t.test('runEachIfNeeded: one transaction, each alone only when it fails', async (t) => {
  const cases: Array<{ name: string; scripts: string[]; failing: string[]; ran: string[]; ok: boolean[] }> = [
    { name: 'nothing', scripts: [], failing: [], ran: [], ok: [] },
    { name: 'one that works', scripts: ['a'], failing: [], ran: ['a'], ok: [true] },
    { name: 'one that fails: not run twice', scripts: ['a'], failing: ['a'], ran: ['a'], ok: [false] },
    { name: 'three that work: one call', scripts: ['a', 'b', 'c'], failing: [], ran: ['a\nb\nc'], ok: [true, true, true] },
    { name: 'one of three fails: then each alone, in order', scripts: ['a', 'b', 'c'], failing: ['a\nb\nc', 'b'], ran: ['a\nb\nc', 'a', 'b', 'c'], ok: [true, false, true] },
  ];
  for (const c of cases) {
    const { run, ran } = syncRunner((s) => c.failing.includes(s));
    const results = runEachIfNeeded(run, c.scripts);
    t.same(ran, c.ran, `${c.name}: calls`);
    t.same(results.map((r) => r.ok), c.ok, `${c.name}: outcome per script`);
  }
});

t.test('without a batch runner a change runs at once', async (t) => {
  const { run, ran } = syncRunner();
  const queue = new NftChangeQueue(run, null);
  queue.submit(['delete a', 'delete b']);
  t.same(ran, ['delete a\ndelete b'], 'ran in the call, one transaction');
  t.ok(queue.idle, 'nothing waits');
  await queue.whenIdle();
  queue.submit([]);
  t.same(ran.length, 1, 'an empty change runs nothing');
});

t.test('changes of one event-loop turn go in one batch, off the loop', async (t) => {
  const { run, ran } = syncRunner();
  const { runBatch, batches, finish } = heldBatches();
  const queue = new NftChangeQueue(run, runBatch);
  queue.submit(['delete a1', 'delete a2']);
  queue.submit(['delete b']);
  t.same(batches, [], 'nothing sent within the turn that queued it');
  t.notOk(queue.idle, 'changes wait');
  await nextTurn();
  t.same(batches, [['delete a1', 'delete a2', 'delete b']], 'one batch for the turn, in order');
  queue.submit(['delete c']);
  queue.submit(['delete d']);
  await nextTurn();
  t.equal(batches.length, 1, 'while a batch runs, the next changes wait for it');
  let idle = false;
  void queue.whenIdle().then(() => (idle = true));
  finish(0);
  await nextTurn();
  await nextTurn();
  t.same(batches[1], ['delete c', 'delete d'], 'what queued meanwhile goes together in the next batch');
  t.notOk(idle, 'not idle while the second batch runs');
  finish(1, ['', 'No such file or directory']);
  await nextTurn();
  t.ok(idle, 'idle once every batch has finished (a failed removal changes nothing: the batch tried it alone)');
  t.same(ran, [], 'no synchronous call was needed');
});

t.test('a synchronous call first runs what is still queued', async (t) => {
  const { run, ran } = syncRunner();
  const { runBatch, batches, finish } = heldBatches();
  const queue = new NftChangeQueue(run, runBatch);
  queue.submit(['delete old mapping']);
  queue.drain();
  t.same(ran, ['delete old mapping'], 'drained in the caller, before its own call');
  t.ok(queue.idle, 'nothing left');
  await nextTurn();
  t.same(batches, [], 'and not sent again');
  queue.submit(['delete x']);
  await nextTurn();
  queue.submit(['delete y']);
  queue.drain();
  t.same(ran, ['delete old mapping', 'delete y'], 'with a batch in flight, the queued one runs now (the addon makes it wait for that batch)');
  let idle = false;
  void queue.whenIdle().then(() => (idle = true));
  await nextTurn();
  t.notOk(idle, 'still waiting for the batch in flight');
  finish(0);
  await nextTurn();
  t.ok(idle, 'idle after it');
});

t.test('close drops what is queued and wakes the waiters', async (t) => {
  const { run, ran } = syncRunner();
  const { runBatch, batches } = heldBatches();
  const queue = new NftChangeQueue(run, runBatch);
  queue.submit(['delete a']);
  const waited = queue.whenIdle();
  queue.close();
  queue.close();
  await waited;
  await nextTurn();
  t.same(batches, [], 'nothing sent: the table goes with everything in it');
  queue.submit(['delete b']);
  queue.drain();
  await nextTurn();
  t.same([ran, batches], [[], []], 'nothing runs after close');
  await queue.whenIdle();
  t.pass('whenIdle after close resolves');
});

t.test('each change hears how its own scripts went', async (t) => {
  const { run } = syncRunner((s) => s === 'create x' || s.includes('\n'));
  const { runBatch, finish } = heldBatches();
  const queue = new NftChangeQueue(run, runBatch);
  const heard: Array<[string, readonly string[]]> = [];
  queue.submit(['delete a', 'delete b'], (errors) => heard.push(['removal', errors]));
  queue.submit(['create x'], (errors) => heard.push(['add', errors]));
  await nextTurn();
  finish(0, ['', 'No such file or directory', 'File exists']);
  t.same(heard, [['removal', ['', 'No such file or directory']], ['add', ['File exists']]], 'the batch\'s outcomes, split per change in order');
  heard.length = 0;
  queue.submit(['delete c'], (errors) => heard.push(['queued', errors]));
  queue.submit(['create x'], (errors) => heard.push(['queued add', errors]));
  queue.drain();
  t.same(heard, [['queued', ['']], ['queued add', ['No such file or directory']]], 'drained changes hear it too (the one that failed alone, with its words)');
  heard.length = 0;
  queue.submit(['delete d'], (errors) => heard.push(['dropped', errors]));
  queue.close();
  queue.submit(['delete e'], (errors) => heard.push(['late', errors]));
  t.same(heard, [['dropped', ['closed']], ['late', ['closed']]], 'close: queued and later changes hear "closed", never nothing');
  const direct = new NftChangeQueue(run, null);
  direct.submit(['create x'], (errors) => heard.push(['at once', errors]));
  t.same(heard.at(-1), ['at once', ['No such file or directory']], 'without a batch runner, told within the call');
});
