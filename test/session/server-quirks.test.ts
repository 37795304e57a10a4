/**
 * Servers that do not behave like vsftpd around a transfer (protocol.md §3.1, §3.3): no 1yz
 * at all, 125 instead of 150, the data connection closed long before or after the 226, a 226
 * with no data connection ever made, a final 451 after partial data. The client must always
 * get every byte that was sent, the replies in order, and a failed transfer must look failed.
 * Relay ports 17000-17999 belong to this file.
 */
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { PortBlocks, noLeaks, startHarness, type FakeHandler } from '../helpers/fake-server.js';
import { openData, parse227, type FtpClient } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(17000);
const DATA = randomBytes(2 * 1024 * 1024 + 11);

/** A RETR handler that sends `DATA` in the given style. */
function retr(style: (session: Parameters<FakeHandler>[1], data: import('node:net').Socket) => Promise<void>): FakeHandler {
  return async (command, session) => {
    if (command.verb !== 'RETR') return false;
    const data = await session.takeData();
    if (!data) {
      session.reply('425 Failed to establish connection.');
      return true;
    }
    await style(session, data);
    return true;
  };
}

async function download(t: TapTest, client: FtpClient): Promise<{ final: string; prelim: string[]; bytes: Buffer; outcome: string }> {
  const pasv = await client.command('PASV');
  t.equal(pasv.code, 227, pasv.text);
  const data = await openData('127.0.0.1', parse227(pasv).port);
  t.teardown(() => data.destroy());
  const reading = readAll(data, 15000);
  client.send('RETR file.bin');
  const prelim: string[] = [];
  let reply = await client.readReply(15000);
  while (reply.code < 200) {
    prelim.push(reply.text);
    reply = await client.readReply(15000);
  }
  const result = await reading;
  return { final: reply.text, prelim, bytes: result.data, outcome: result.outcome };
}

/** The session still answers in step; then QUIT and nothing is left behind. */
async function inStepNoLeaks(t: TapTest, h: Awaited<ReturnType<typeof startHarness>>, client: FtpClient): Promise<void> {
  t.equal((await client.command('NOOP')).code, 200, 'session still in step');
  await noLeaks(t, h, client, { message: 'nothing left behind' });
}

t.test('server omits the 1yz reply: data, then 226 only', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: retr(async (session, data) => {
    data.end(DATA);
    await new Promise((r) => data.once('close', r));
    session.reply('226 Transfer complete.');
  }) } });
  const client = await h.login();
  const got = await download(t, client);
  t.same(got.prelim, [], 'no preliminary reply invented');
  t.equal(got.final, '226 Transfer complete.');
  t.ok(got.bytes.equals(DATA), 'every byte');
  await inStepNoLeaks(t, h, client);
});

t.test('server sends 125 instead of 150', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: retr(async (session, data) => {
    session.reply('125 Data connection already open; transfer starting.');
    data.end(DATA);
    await new Promise((r) => data.once('close', r));
    session.reply('226 Closing data connection.');
  }) } });
  const client = await h.login();
  const got = await download(t, client);
  t.same(got.prelim, ['125 Data connection already open; transfer starting.'], '125 passed through');
  t.ok(got.bytes.equals(DATA), 'every byte');
  await inStepNoLeaks(t, h, client);
});

t.test('server closes the data connection long before its 226', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: retr(async (session, data) => {
    session.reply('150 Here it comes.');
    data.end(DATA);
    await new Promise((r) => data.once('close', r));
    await delay(700);
    session.reply('226 Transfer complete.');
  }) } });
  const client = await h.login();
  const got = await download(t, client);
  t.equal(got.final, '226 Transfer complete.');
  t.equal(got.outcome, 'end', 'clean end');
  t.ok(got.bytes.equals(DATA), 'every byte');
  await inStepNoLeaks(t, h, client);
});

t.test('server sends 226 first and closes the data connection later', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: retr(async (session, data) => {
    session.reply('150 Here it comes.');
    data.write(DATA);
    session.reply('226 Transfer complete.');
    await delay(500);
    data.end();
  }) } });
  const client = await h.login();
  const got = await download(t, client);
  t.equal(got.final, '226 Transfer complete.', '226 delivered (after the data)');
  t.equal(got.outcome, 'end', 'clean end');
  t.ok(got.bytes.equals(DATA), 'every byte, none cut by the early 226');
  await inStepNoLeaks(t, h, client);
});

t.test('server fails mid-transfer with 451 after partial data: the client sees a reset and 451', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: retr(async (session, data) => {
    session.reply('150 Here it comes.');
    data.write(DATA.subarray(0, 100_000));
    await delay(200);
    session.reply('451 Failure reading local file.');
  }) } });
  const client = await h.login();
  const got = await download(t, client);
  t.equal(got.final, '451 Failure reading local file.');
  t.not(got.outcome, 'end', `a failed transfer must not end cleanly (${got.outcome})`);
  t.ok(got.bytes.length <= 100_000, 'no more than was sent');
  await inStepNoLeaks(t, h, client);
});

t.test('a 226 for a transfer whose data connection the client never opened is not held forever: 426 after the hold', async (t) => {
  const h = await startHarness(t, {
    ports,
    extraYaml: ['    timeouts:', '      transferReplyHoldSeconds: 1', '      dataAcceptSeconds: 5'].join('\n'),
    fake: { handler: retr(async (session, data) => {
      session.reply('150 Here it comes.');
      data.end();
      session.reply('226 Transfer complete.');
    }) },
  });
  const client = await h.login();
  const pasv = await client.command('PASV');
  t.equal(pasv.code, 227);
  client.send('RETR file.bin');
  t.equal((await client.readReply(5000)).code, 150, '150');
  const started = Date.now();
  const final = await client.readReply(5000);
  t.equal(final.code, 426, `not held forever, and not a 226 for data the client never got (${final.text})`);
  t.ok(Date.now() - started < 4000, 'released by the hold timeout');
  await inStepNoLeaks(t, h, client);
});

t.test('MLSD (RFC 3659) is relayed like any listing', async (t) => {
  const listing = 'type=file;size=5; a.txt\r\ntype=dir; sub\r\n';
  const h = await startHarness(t, { ports, fake: { handler: async (command, session) => {
    if (command.verb !== 'MLSD') return false;
    const data = await session.takeData();
    if (!data) return session.reply('425 Failed to establish connection.'), true;
    session.reply('150 Here comes the listing.');
    data.end(listing);
    await new Promise((r) => data.once('close', r));
    session.reply('226 Listing sent.');
    return true;
  } } });
  const client = await h.login();
  const epsv = await client.command('EPSV');
  t.equal(epsv.code, 229, epsv.text);
  const port = Number(/\|\|\|(\d+)\|/.exec(epsv.text)![1]);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const reading = readAll(data, 10000);
  client.send('MLSD');
  t.equal((await client.readReply()).code, 150, '150');
  t.equal((await client.readReply(10000)).code, 226, '226');
  t.equal((await reading).data.toString('latin1'), listing, 'listing intact');
  await inStepNoLeaks(t, h, client);
});
