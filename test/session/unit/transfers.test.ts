/**
 * Transfers (src/session/transfers.ts) with a hand-written DataChannel: the pending channel
 * is dialled before the command goes upstream, a failed dial never forwards it, the server's
 * final reply is held until the data is delivered (226 after the data, 426 when it was cut or
 * the hold expired, issue #10), replies stay in slot order, ABOR marks transfers aborted, and
 * a channel's end is counted (accept and idle timeouts) and removes its entry.
 */
import t from 'tap';
import { parseCommandLine, type ClientCommand } from '../../../src/control/command.js';
import { replyLine, type Reply } from '../../../src/control/reply.js';
import type { TransferDirection } from '../../../src/control/rewrite.js';
import { validateConfigText } from '../../../src/config/load.js';
import type { ListenerConfig } from '../../../src/config/schema.js';
import type { DataChannel, PairOptions } from '../../../src/data/channel.js';
import type { RelayResult } from '../../../src/data/relay.js';
import type { WireBytes } from '../../../src/data/kernel-nft.js';
import { ProxyError, type ErrorCode } from '../../../src/errors.js';
import { NOOP_METRICS, type ProxyMetrics, type RejectionReason, type TransferResult } from '../../../src/metrics.js';
import { ReplyQueue, type ReplySlot } from '../../../src/reply-queue.js';
import { Transfers, type TransferContext, type TransfersDeps } from '../../../src/session/transfers.js';
import { proxyYaml } from '../../helpers/proxy.js';
import { memoryLogger } from '../../helpers/logs.js';

const HOLD_MS = 200;
const LINGER_MS = 1500;
const DATA_IDLE_MS = 7000;

const CONFIG: ListenerConfig = validateConfigText(proxyYaml({
  upstreamHost: '127.0.0.1',
  upstreamPort: 2121,
  extraYaml: [
    '    timeouts:',
    `      transferReplyHoldSeconds: ${HOLD_MS / 1000}`,
    `      dataLingerSeconds: ${LINGER_MS / 1000}`,
    `      dataIdleSeconds: ${DATA_IDLE_MS / 1000}`,
  ].join('\n'),
}), 'test').listeners[0]!;


function command(text: string): ClientCommand {
  const parsed = parseCommandLine(Buffer.from(text, 'latin1'));
  if (!parsed.ok) throw new Error(`not a command: ${text}`);
  return parsed.command;
}

function reply(text: string): Reply {
  return { code: Number(text.slice(0, 3)), lines: [text], raw: Buffer.from(`${text}\r\n`, 'latin1') };
}

const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * What Transfers touches of a DataChannel. Like the real one, close() is idempotent (the first
 * reason wins) and settles the channel (onSettled with no relay result and the close's code).
 */
class FakeChannel {
  onSettled: DataChannel['onSettled'] = null;
  bytes = { toClient: 0, toUpstream: 0 };
  isForwarded = false;
  /** Kernel path: what the forwarder's counters said (settled when the test says so). */
  wireBytes: Promise<WireBytes | null> = Promise.resolve(null);
  clientPort: number | null = 40001;
  upstreamPort: number | null = 50001;
  clientLeg: { kind: 'passive' | 'active' | 'forwarded' } = { kind: 'passive' };
  upstreamLeg: { kind: 'passive' | 'active' } = { kind: 'passive' };
  readonly closes: string[] = [];
  readonly lingers: number[] = [];
  readonly pairs: PairOptions[] = [];
  readonly asked: TransferDirection[] = [];
  private settled = false;
  private resolveDone!: (done: boolean) => void;
  private readonly done = new Promise<boolean>((resolve) => { this.resolveDone = resolve; });

  get isClosed(): boolean {
    return this.closes.length > 0;
  }

  directionDone(direction: TransferDirection): Promise<boolean> {
    this.asked.push(direction);
    return this.done;
  }

  /** The transfer's direction delivered everything (true) or was cut (false). */
  deliver(done: boolean): void {
    this.resolveDone(done);
  }

  close(reason: string, code: ErrorCode | null = null): void {
    if (this.isClosed) return;
    this.closes.push(reason);
    this.settle(null, reason, code);
  }

  lingerThenClose(ms: number): void {
    this.lingers.push(ms);
  }

  pair(options: PairOptions): void {
    this.pairs.push(options);
  }

  /** The relay ended by itself with `result`. */
  finish(result: RelayResult): void {
    this.closes.push(result.outcome);
    this.settle(result, result.outcome, null);
  }

  private settle(result: RelayResult | null, reason: string, code: ErrorCode | null): void {
    if (this.settled) return;
    this.settled = true;
    this.onSettled?.(result, reason, code);
  }

  get asChannel(): DataChannel {
    return this as unknown as DataChannel;
  }
}

interface Forwarded {
  line: string;
  slot: ReplySlot;
  transfer: TransferContext | null;
}

interface Setup {
  transfers: Transfers;
  replies: ReplyQueue;
  written: () => string;
  /** take / dial / forward, in the order Transfers did them. */
  steps: string[];
  forwarded: Forwarded[];
  failures: Array<{ err: unknown; what: string }>;
  finished: Array<{ listener: string; direction: string; result: TransferResult; bytes: number; seconds: number }>;
  limits: Array<{ reason: RejectionReason; fields: Record<string, unknown> }>;
  /** transferWireBytes calls. */
  wired: WireBytes[];
  records: () => Array<Record<string, unknown>>;
  /** The channel take() hands out next (null: no PASV/PORT came first). */
  pending: FakeChannel | null;
  /** What connectOutbound does with a channel (default: resolves with no sockets). */
  dial: (channel: DataChannel) => Promise<{ clientSocket: null; upstreamSocket: null }>;
  finishedSession: boolean;
}

function setup(): Setup {
  let out = '';
  const replies = new ReplyQueue((bytes) => { out += bytes.toString('latin1'); }, () => {});
  const { log, records } = memoryLogger();
  const s: Setup = {
    transfers: null as unknown as Transfers,
    replies,
    written: () => out,
    steps: [],
    forwarded: [],
    failures: [],
    finished: [],
    limits: [],
    wired: [],
    records,
    pending: null,
    dial: async () => ({ clientSocket: null, upstreamSocket: null }),
    finishedSession: false,
  };
  const metrics: ProxyMetrics = {
    ...NOOP_METRICS,
    transferFinished: (listener, direction, result, bytes, seconds) => s.finished.push({ listener, direction, result, bytes, seconds }),
    transferWireBytes: (_listener, wire) => s.wired.push(wire),
  };
  const deps: TransfersDeps = {
    dataSecurity: () => ({ client: null, server: null }),
    config: CONFIG,
    metrics,
    log,
    replies,
    user: () => 'alice',
    dataSetup: {
      take: () => {
        s.steps.push('take');
        const channel = s.pending;
        s.pending = null;
        return channel?.asChannel ?? null;
      },
      connectOutbound: (channel) => {
        s.steps.push('dial');
        return s.dial(channel);
      },
      failureReply: (err, what) => {
        s.failures.push({ err, what });
        return replyLine(`425 fake failure for ${what}`);
      },
    },
    forward: (line, slot, transfer) => {
      s.steps.push('forward');
      s.forwarded.push({ line: line.toString('latin1'), slot, transfer });
    },
    isFinished: () => s.finishedSession,
    limitHit: (reason, fields) => s.limits.push({ reason, fields }),
  };
  s.transfers = new Transfers(deps);
  return s;
}

/** start() a transfer on a fresh fake channel; returns the channel and what was forwarded. */
async function started(s: Setup, line = 'RETR f.bin', direction: TransferDirection = 'download'): Promise<{ channel: FakeChannel; sent: Forwarded }> {
  const channel = new FakeChannel();
  s.pending = channel;
  await s.transfers.start(command(line), direction);
  const sent = s.forwarded.at(-1);
  if (!sent?.transfer) throw new Error('the transfer was not forwarded');
  return { channel, sent };
}

function transferRecords(s: Setup): Array<Record<string, unknown>> {
  return s.records().filter((r) => r.event === 'transfer');
}

t.test('start() with no pending channel forwards the command with transfer null', async (t) => {
  const s = setup();
  await s.transfers.start(command('RETR nothing'), 'download');
  t.same(s.steps, ['take', 'forward'], 'nothing to dial');
  t.equal(s.forwarded.length, 1);
  t.equal(s.forwarded[0]!.line, 'RETR nothing');
  t.equal(s.forwarded[0]!.transfer, null, 'the server answers 425 itself');
  t.equal(s.transfers.count, 0, 'no transfer entry');
  s.replies.push(s.forwarded[0]!.slot, replyLine('425 Use PORT or PASV first.'));
  s.replies.end(s.forwarded[0]!.slot);
  t.equal(s.written(), '425 Use PORT or PASV first.\r\n', 'the slot given to forward is the one the client reads');
});

t.test('start() dials the outbound legs before the command goes upstream, then pairs', async (t) => {
  const s = setup();
  const channel = new FakeChannel();
  s.pending = channel;
  let connected!: (sockets: { clientSocket: null; upstreamSocket: null }) => void;
  s.dial = () => new Promise((resolve) => { connected = resolve; });
  const starting = s.transfers.start(command('STOR up.bin'), 'upload');
  await tick();
  t.same(s.steps, ['take', 'dial'], 'dialling');
  t.equal(s.forwarded.length, 0, 'not forwarded while the dial runs');
  t.equal(s.transfers.count, 1, 'the transfer is running from the take');
  t.equal(channel.pairs.length, 0, 'not paired yet');
  connected({ clientSocket: null, upstreamSocket: null });
  await starting;
  t.same(s.steps, ['take', 'dial', 'forward']);
  const transfer = s.forwarded[0]!.transfer;
  t.equal(s.forwarded[0]!.line, 'STOR up.bin');
  t.equal(transfer?.channel, channel.asChannel, 'forwarded with its transfer context');
  t.equal(transfer?.direction, 'upload');
  t.equal(transfer?.command.verb, 'STOR');
  t.equal(transfer?.aborted, false);
  t.same(channel.pairs, [{ clientSocket: null, upstreamSocket: null, idleTimeoutMs: DATA_IDLE_MS, secureClient: null, secureUpstream: null }], 'paired with the dialled sockets, the idle timeout, and no TLS on either leg');
  t.same(channel.closes, [], 'still open');
});

t.test('a failed dial answers the failure reply and never forwards the command', async (t) => {
  const s = setup();
  const channel = new FakeChannel();
  s.pending = channel;
  const err = new ProxyError('FTPP_ERR_DATA_CONNECT', 'connect ECONNREFUSED 127.0.0.1:9');
  s.dial = async () => { throw err; };
  await s.transfers.start(command('RETR f'), 'download');
  t.same(s.steps, ['take', 'dial'], 'no forward');
  t.equal(s.forwarded.length, 0);
  t.equal(s.failures.length, 1);
  t.equal(s.failures[0]!.err, err, 'failureReply got the dial error');
  t.equal(s.failures[0]!.what, 'RETR', 'and the verb');
  t.equal(s.written(), '425 fake failure for RETR\r\n', 'the client gets the failure reply');
  t.ok(s.replies.isEmpty, 'its slot is ended');
  t.same(channel.closes, ['data connect failed']);
  t.same(channel.pairs, [], 'never paired');
  t.equal(s.transfers.count, 0, 'the entry went with the channel');
});

t.test('the session finishing during the dial: nothing forwarded, the slot ends empty', async (t) => {
  const s = setup();
  const channel = new FakeChannel();
  s.pending = channel;
  s.dial = async () => {
    s.finishedSession = true;
    return { clientSocket: null, upstreamSocket: null };
  };
  await s.transfers.start(command('RETR f'), 'download');
  t.equal(s.forwarded.length, 0);
  t.same(channel.closes, ['session closing']);
  t.equal(s.written(), '');
  t.ok(s.replies.isEmpty);
});

t.test('a non-2xx final reply closes the channel at once, passes the reply, records failed', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s);
  channel.bytes = { toClient: 321, toUpstream: 5 };
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('550 Failed to open file.'));
  t.same(channel.closes, ['server replied 550'], 'closed without waiting for the data');
  t.same(channel.asked, [], 'delivery not even asked');
  t.same(channel.lingers, []);
  t.equal(s.written(), '550 Failed to open file.\r\n');
  t.ok(s.replies.isEmpty, 'slot ended');
  const records = transferRecords(s);
  t.equal(records.length, 1);
  t.match(records[0], { command: 'RETR', path: 'f.bin', user: 'alice', direction: 'download', bytes: 321, result: 'failed', reply: 550, clientDataPort: 40001, upstreamDataPort: 50001, clientMode: 'passive', dataPath: 'relay', upstreamMode: 'passive' });
  t.notOk('serverReply' in records[0]!, 'no serverReply when the client got the server\'s reply');
  t.equal(s.finished.length, 1);
  t.match(s.finished[0], { listener: CONFIG.name, direction: 'download', result: 'failed', bytes: 321 });
  t.equal(s.transfers.completed, 1);
});

t.test('2xx and the data delivered: the reply after the data, linger, record ok', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s, 'STOR up.bin', 'upload');
  channel.bytes = { toClient: 3, toUpstream: 4096 };
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('226 Transfer complete.'));
  await tick();
  t.same(channel.asked, ['upload'], 'waits for the transfer\'s own direction');
  t.equal(s.written(), '', 'held until the data is delivered');
  t.equal(transferRecords(s).length, 0, 'not recorded yet');
  channel.deliver(true);
  await tick();
  t.equal(s.written(), '226 Transfer complete.\r\n', 'passed once delivered');
  t.ok(s.replies.isEmpty, 'slot ended');
  t.same(channel.lingers, [LINGER_MS], 'the channel lingers (the client may still read)');
  t.same(channel.closes, [], 'not reset');
  const records = transferRecords(s);
  t.equal(records.length, 1);
  t.match(records[0], { command: 'STOR', direction: 'upload', bytes: 4096, result: 'ok', reply: 226 });
  t.match(s.finished, [{ direction: 'upload', result: 'ok', bytes: 4096 }]);
  t.equal(s.records().filter((r) => r.event === 'transfer-incomplete').length, 0);
});

t.test('2xx but the data was cut: the channel is reset and the client gets 426, not 226', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s);
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('226 Transfer complete.'));
  channel.deliver(false);
  await tick();
  t.equal(s.written(), '426 Connection closed; transfer aborted.\r\n');
  t.ok(s.replies.isEmpty);
  t.same(channel.closes, ['data connection failed']);
  t.same(channel.lingers, []);
  t.match(transferRecords(s), [{ result: 'failed', reply: 426, serverReply: 226 }]);
  t.match(s.finished, [{ result: 'failed' }]);
  const incomplete = s.records().filter((r) => r.event === 'transfer-incomplete');
  t.match(incomplete, [{ code: 'FTPP_ERR_TRANSFER_INCOMPLETE', serverReply: 226, why: 'cut' }]);
  t.equal(s.records().filter((r) => r.event === 'transfer-hold-timeout').length, 0, 'not a hold timeout');
});

t.test('2xx and the hold expires: 426, transfer-hold-timeout logged', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s);
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('226 Transfer complete.'));
  await sleep(HOLD_MS / 2);
  t.equal(s.written(), '', 'still held halfway through the hold');
  await sleep(HOLD_MS);
  t.equal(s.written(), '426 Connection closed; transfer aborted.\r\n');
  t.same(channel.closes, ['final reply hold timed out']);
  t.match(s.records().filter((r) => r.event === 'transfer-hold-timeout'), [{ level: 'warn', holdMs: HOLD_MS }]);
  t.match(s.records().filter((r) => r.event === 'transfer-incomplete'), [{ why: 'hold-expired', serverReply: 226 }]);
  t.match(transferRecords(s), [{ result: 'failed', reply: 426, serverReply: 226 }]);
  channel.deliver(true);
  await tick();
  t.equal(s.written(), '426 Connection closed; transfer aborted.\r\n', 'a late delivery changes nothing');
  t.same(channel.lingers, []);
  t.equal(transferRecords(s).length, 1, 'recorded once');
});

t.test('replies stay in slot order: a later reply waits behind a held final reply', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s);
  s.replies.append(replyLine('200 NOOP ok.'));
  t.equal(s.written(), '', 'the later reply waits for the transfer\'s slot');
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('226 Transfer complete.'));
  await tick();
  t.equal(s.written(), '', 'still waiting while the final reply is held');
  channel.deliver(true);
  await tick();
  t.equal(s.written(), '226 Transfer complete.\r\n200 NOOP ok.\r\n', 'both, in order');
});

t.test('abortAll() marks every transfer aborted and closes every channel', async (t) => {
  const s = setup();
  const first = await started(s, 'RETR a');
  const second = await started(s, 'RETR b');
  t.equal(s.transfers.count, 2);
  s.transfers.abortAll();
  t.same(first.channel.closes, ['ABOR']);
  t.same(second.channel.closes, ['ABOR']);
  t.ok(first.sent.transfer!.aborted && second.sent.transfer!.aborted, 'both marked aborted');
  t.equal(s.transfers.count, 0, 'closed channels leave the map');
  s.transfers.finalReply(first.sent.slot, first.sent.transfer!, reply('426 Failure writing network stream.'));
  s.transfers.finalReply(second.sent.slot, second.sent.transfer!, reply('226 Transfer complete.'));
  second.channel.deliver(false);
  await tick();
  t.equal(s.written(), '426 Failure writing network stream.\r\n426 Connection closed; transfer aborted.\r\n');
  t.match(transferRecords(s), [{ path: 'a', result: 'aborted', reply: 426 }, { path: 'b', result: 'aborted', reply: 426, serverReply: 226 }]);
  t.match(s.finished, [{ result: 'aborted' }, { result: 'aborted' }]);
});

t.test('a transfer that was not aborted and fails is failed, not aborted', async (t) => {
  const s = setup();
  const aborted = await started(s, 'RETR a');
  s.transfers.abortAll();
  const later = await started(s, 'RETR b');
  s.transfers.finalReply(later.sent.slot, later.sent.transfer!, reply('451 Local error.'));
  t.equal(later.sent.transfer!.aborted, false, 'abortAll() touched only the transfers running then');
  t.match(transferRecords(s), [{ path: 'b', result: 'failed' }]);
  t.same(aborted.channel.closes, ['ABOR']);
});

t.test('closeAll() resets every running channel without marking them aborted', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s);
  s.transfers.closeAll('session closing');
  t.same(channel.closes, ['session closing']);
  t.equal(sent.transfer!.aborted, false);
  t.equal(s.transfers.count, 0);
});

t.test('a channel closed by the accept timeout counts data-accept-timeout and leaves the map', async (t) => {
  const s = setup();
  const { channel } = await started(s);
  t.equal(s.transfers.count, 1);
  channel.close('no data connection within 30000 ms', 'FTPP_ERR_DATA_ACCEPT_TIMEOUT');
  t.equal(s.transfers.count, 0);
  t.same(s.limits, [{ reason: 'data-accept-timeout', fields: { code: 'FTPP_ERR_DATA_ACCEPT_TIMEOUT', reason: 'no data connection within 30000 ms' } }]);
  t.match(s.records().filter((r) => r.event === 'data-closed'), [{ reason: 'no data connection within 30000 ms', outcome: 'not-connected' }]);
});

t.test('an idle relay counts data-idle-timeout; a complete one counts nothing', async (t) => {
  const s = setup();
  const idle = await started(s, 'RETR idle');
  const done = await started(s, 'RETR done');
  t.equal(s.transfers.count, 2);
  idle.channel.finish({ upstreamToClientBytes: 10, clientToUpstreamBytes: 0, outcome: 'idle', durationMs: DATA_IDLE_MS });
  t.equal(s.transfers.count, 1);
  t.same(s.limits, [{ reason: 'data-idle-timeout', fields: { dataIdleMs: DATA_IDLE_MS } }]);
  done.channel.finish({ upstreamToClientBytes: 10, clientToUpstreamBytes: 0, outcome: 'complete', durationMs: 5 });
  t.equal(s.transfers.count, 0);
  t.equal(s.limits.length, 1, 'a complete relay is no limit');
  t.match(s.records().filter((r) => r.event === 'data-closed').map((r) => r.outcome), ['idle', 'complete']);
});

t.test('completed counts final replies, whatever they say', async (t) => {
  const s = setup();
  t.equal(s.transfers.completed, 0);
  const a = await started(s, 'RETR a');
  const b = await started(s, 'RETR b');
  s.transfers.finalReply(a.sent.slot, a.sent.transfer!, reply('226 Transfer complete.'));
  t.equal(s.transfers.completed, 1, 'counted when the reply comes, not when it is passed');
  s.transfers.finalReply(b.sent.slot, b.sent.transfer!, reply('550 No such file.'));
  t.equal(s.transfers.completed, 2);
  a.channel.deliver(true);
  await tick();
  t.equal(s.transfers.completed, 2, 'delivery does not count again');
});

t.test('the kernel path records no payload count but its wire bytes, once the counters are read', async (t) => {
  const s = setup();
  const channel = new FakeChannel();
  channel.isForwarded = true;
  channel.clientLeg = { kind: 'forwarded' };
  channel.bytes = { toClient: 0, toUpstream: 0 };
  let read!: (wire: WireBytes | null) => void;
  channel.wireBytes = new Promise((resolve) => (read = resolve));
  s.pending = channel;
  await s.transfers.start(command('RETR k'), 'download');
  const sent = s.forwarded[0]!;
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('226 Transfer complete.'));
  channel.deliver(true);
  await tick();
  t.same(transferRecords(s), [], 'the record waits for the counters');
  t.equal(s.written(), '226 Transfer complete.\r\n', 'the reply does not');
  read({ toClient: 4200000, toServer: 70000 });
  await tick();
  t.match(transferRecords(s), [{ bytes: null, wireBytes: { toClient: 4200000, toServer: 70000 }, dataPath: 'kernel', clientMode: 'passive', result: 'ok' }]);
  t.ok(Number.isNaN(s.finished[0]!.bytes), 'metric bytes NaN (dropped by the metrics), not 0');
  t.same(s.wired, [{ toClient: 4200000, toServer: 70000 }], 'the wire bytes metric');
});

t.test('a relayed transfer has wireBytes null', async (t) => {
  const s = setup();
  const { channel, sent } = await started(s);
  channel.bytes = { toClient: 10, toUpstream: 0 };
  s.transfers.finalReply(sent.slot, sent.transfer!, reply('226 Transfer complete.'));
  channel.deliver(true);
  await tick();
  t.match(transferRecords(s), [{ bytes: 10, wireBytes: null, dataPath: 'relay' }]);
});
