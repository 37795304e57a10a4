/**
 * UpstreamExchange (src/session/upstream-exchange.ts) without sockets: replies go to the
 * command that is owed one, in order; 1yz passes; FEAT-style transforms; transfer final
 * replies go to their hook; the proxy's own requests resolve, time out, and are rejected when
 * the server is gone; deferred data setups wait for running transfers' final replies.
 */
import t from 'tap';
import { replyLine, type Reply } from '../../../src/control/reply.js';
import { isProxyError } from '../../../src/errors.js';
import { ReplyQueue, type ReplySlot } from '../../../src/reply-queue.js';
import { UpstreamExchange, type UpstreamExchangeHooks } from '../../../src/session/upstream-exchange.js';

function reply(text: string): Reply {
  const lines = text.split('\r\n');
  return { code: Number(text.slice(0, 3)), lines, raw: Buffer.from(`${text}\r\n`, 'latin1') };
}

interface Setup {
  exchange: UpstreamExchange<string>;
  replies: ReplyQueue;
  written: () => string;
  sent: string[];
  transfers: Array<{ slot: ReplySlot; transfer: string; code: number }>;
  clientReplies: number[];
  timeouts: string[];
}

function setup(timeoutMs = 1000): Setup {
  let out = '';
  const replies = new ReplyQueue((bytes) => { out += bytes.toString('latin1'); }, () => {});
  const sent: string[] = [];
  const transfers: Setup['transfers'] = [];
  const clientReplies: number[] = [];
  const timeouts: string[] = [];
  const hooks: UpstreamExchangeHooks<string> = {
    send: (line) => sent.push(line.toString('latin1')),
    transferReply: (slot, transfer, r) => transfers.push({ slot, transfer, code: r.code }),
    clientReply: (r) => clientReplies.push(r.code),
    timeout: (command) => timeouts.push(command),
  };
  return { exchange: new UpstreamExchange<string>(replies, timeoutMs, hooks), replies, written: () => out, sent, transfers, clientReplies, timeouts };
}

t.test('replies go to their commands in order; a 1yz passes; unsolicited replies are passed on', async (t) => {
  const s = setup();
  s.exchange.expect(s.replies.open());
  s.exchange.forward(Buffer.from('USER a'), s.replies.open());
  s.exchange.forward(Buffer.from('FEAT'), s.replies.open(), { transform: () => replyLine('211 edited') });
  t.same(s.sent, ['USER a', 'FEAT']);
  t.equal(s.exchange.outstanding, 3);
  s.exchange.dispatch(reply('220 hi'));
  s.exchange.dispatch(reply('331 pass?'));
  s.exchange.dispatch(reply('211-Features:\r\n EPSV\r\n211 End'));
  s.exchange.dispatch(reply('421 Timeout.'));
  t.equal(s.written(), '220 hi\r\n331 pass?\r\n211 edited\r\n421 Timeout.\r\n', 'in order, transformed, unsolicited at the end');
  t.same(s.clientReplies, [220, 331, 211], 'final replies to client commands reported');
  t.equal(s.exchange.outstanding, 0);
});

t.test('a transfer: 1yz to the client at once, the final reply to the transfer hook', async (t) => {
  const s = setup();
  const slot = s.replies.open();
  s.exchange.forward(Buffer.from('RETR f'), slot, { transfer: 'T1' });
  t.ok(s.exchange.awaitsTransferReply);
  let settled = false;
  const waiting = s.exchange.transferRepliesSettled().then(() => { settled = true; });
  s.exchange.dispatch(reply('150 here it comes'));
  await Promise.resolve();
  t.notOk(settled, 'a deferred data setup still waits after the 150');
  t.equal(s.written(), '150 here it comes\r\n');
  s.exchange.dispatch(reply('226 done'));
  await waiting;
  t.ok(settled, 'and goes on after the final reply');
  t.same(s.transfers.map((x) => [x.transfer, x.code]), [['T1', 226]], 'final reply handed to the transfer hook');
  t.equal(s.written(), '150 here it comes\r\n', 'the hook owns the slot: nothing written for it here');
  t.notOk(s.exchange.awaitsTransferReply);
});

t.test("the proxy's own request: resolved by its final reply, never shown to the client", async (t) => {
  const s = setup();
  const pending = s.exchange.request('EPSV');
  t.same(s.sent, ['EPSV']);
  s.exchange.dispatch(reply('150 odd preliminary'));
  s.exchange.dispatch(reply('229 Entering Extended Passive Mode (|||40001|)'));
  t.equal((await pending).code, 229, 'resolved with the final reply (a 1yz is not the answer)');
  t.equal(s.written(), '', 'the client saw nothing');
});

t.test('a request nobody answers reports a timeout', async (t) => {
  const s = setup(30);
  void s.exchange.request('PASV').catch(() => {});
  await new Promise((resolve) => setTimeout(resolve, 80));
  t.same(s.timeouts, ['PASV']);
});

t.test('failAll: slots ended as they are, requests rejected, orphaned transfers returned, waiters woken', async (t) => {
  const s = setup();
  s.exchange.forward(Buffer.from('NOOP'), s.replies.open());
  s.exchange.forward(Buffer.from('RETR f'), s.replies.open(), { transfer: 'T2' });
  const request = s.exchange.request('EPSV');
  const waiter = s.exchange.transferRepliesSettled();
  const orphans = s.exchange.failAll();
  t.same(orphans, ['T2']);
  const err = await request.then(() => null, (e: unknown) => e);
  t.ok(isProxyError(err, 'FTPP_ERR_SHUTDOWN'), 'request rejected with FTPP_ERR_SHUTDOWN');
  await waiter;
  t.pass('transfer waiter woken');
  t.ok(s.replies.isEmpty, 'every slot ended');
  const late = await s.exchange.request('PASV').then(() => null, (e: unknown) => e);
  t.ok(isProxyError(late, 'FTPP_ERR_SHUTDOWN'), 'and later requests are refused at once');
});

t.test('answerInstead: the greeting gets the proxy\'s own 421 when the server cannot be reached', async (t) => {
  const s = setup();
  s.exchange.expect(s.replies.open());
  s.exchange.answerInstead(replyLine('421 Service not available.'));
  t.equal(s.written(), '421 Service not available.\r\n');
  t.equal(s.exchange.outstanding, 0);
});
