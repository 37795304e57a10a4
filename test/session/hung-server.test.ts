/**
 * A server that stops answering (and may even ignore the proxy's FIN): every wait of the
 * session must be bounded, the client must get a 421 and the session must end; nothing may
 * keep a relay port or a session forever (style.md "one idempotent teardown... promises
 * settled"). Relay ports 28000-28999 belong to this file.
 */
import t from 'tap';
import { PortBlocks, settleLeaks, startHarness, type FakeHandler } from '../helpers/fake-server.js';
import { type FtpClient } from '../helpers/ftp-client.js';
import { delay, withTimeout } from '../helpers/async.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(28000);

/** Swallow these verbs: no reply, ever. */
function swallow(...verbs: string[]): FakeHandler {
  return (command) => verbs.includes(command.verb);
}

async function repliesUntilClose(t: TapTest, client: FtpClient, timeoutMs: number): Promise<string[]> {
  const texts: string[] = [];
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    try {
      texts.push((await client.readReply(Math.max(1, end - Date.now()))).text);
    } catch {
      break;
    }
  }
  t.ok(await client.waitEnded(Math.max(1, end - Date.now())), 'the proxy closed the control connection');
  return texts;
}

const SHORT_REPLY_TIMEOUT = ['    timeouts:', '      upstreamReplySeconds: 1', '      dataConnectSeconds: 2'].join('\n');

t.test('the server never answers the proxy EPSV and ignores FIN: 421, then the session ends', async (t) => {
  const h = await startHarness(t, { ports, extraYaml: SHORT_REPLY_TIMEOUT, fake: { halfOpen: true, handler: swallow('EPSV', 'PASV') } });
  const client = await h.login();
  const started = Date.now();
  client.send('PASV');
  const texts = await repliesUntilClose(t, client, 6000);
  t.ok(texts.length >= 1 && texts.every((x) => x.startsWith('421')), `a 421 reply: ${JSON.stringify(texts)}`);
  t.ok(Date.now() - started < 5000, `within a few seconds of upstreamReplySeconds=1 (${Date.now() - started} ms)`);
  client.destroy();
  t.same(await settleLeaks(h.proxy, 4000), { sessions: 0, leased: 0 }, 'session and relay port released');
});

t.test('the server never answers the proxy EPSV, then closes on FIN: exactly one reply for the PASV', async (t) => {
  const h = await startHarness(t, { ports, extraYaml: SHORT_REPLY_TIMEOUT, fake: { handler: swallow('EPSV', 'PASV') } });
  const client = await h.login();
  client.send('PASV');
  const texts = await repliesUntilClose(t, client, 6000);
  t.equal(texts.length, 1, `one command, one reply: ${JSON.stringify(texts)}`);
  t.ok(texts[0]?.startsWith('421'), '421');
  client.destroy();
  t.same(await settleLeaks(h.proxy, 4000), { sessions: 0, leased: 0 }, 'session and relay port released');
});

t.test('a forwarded command the hung server never answers: the idle timeout still ends the session', async (t) => {
  const h = await startHarness(t, {
    ports,
    extraYaml: ['    timeouts:', '      idleSeconds: 1', '      upstreamReplySeconds: 1'].join('\n'),
    fake: { halfOpen: true, handler: swallow('NOOP') },
  });
  const client = await h.login();
  client.send('NOOP');
  const texts = await repliesUntilClose(t, client, 6000);
  t.ok(texts.length >= 1 && texts.every((x) => x.startsWith('421')), `a 421 reply: ${JSON.stringify(texts)}`);
  client.destroy();
  t.same(await settleLeaks(h.proxy, 4000), { sessions: 0, leased: 0 }, 'session released');
});

t.test('the client leaves while the hung server owes a reply: the session ends', async (t) => {
  const h = await startHarness(t, { ports, fake: { halfOpen: true, handler: swallow('NOOP') } });
  const client = await h.login();
  client.send('NOOP');
  await delay(100);
  client.destroy(); // FIN from the client, then gone
  const state = await settleLeaks(h.proxy, 6000);
  t.same(state, { sessions: 0, leased: 0 }, 'session released within 6 s of the client leaving');
  const upstream = h.fake!.sessions[0]!.socket;
  t.ok(upstream.readableEnded || upstream.closed, "the proxy at least closed its side toward the server");
});

t.test('proxy.close() finishes while a session waits on a hung server', async (t) => {
  const h = await startHarness(t, { ports, fake: { halfOpen: true, handler: swallow('NOOP') } });
  const client = await h.login();
  client.send('NOOP');
  await delay(100);
  const started = Date.now();
  const closed = await withTimeout(h.proxy.close(), 8000, 'proxy.close()').then(() => true, () => false);
  t.ok(closed, `proxy.close() settled (${Date.now() - started} ms)`);
  const texts = await repliesUntilClose(t, client, 1000);
  t.ok(texts.some((x) => x.startsWith('421')), `the client was told (${JSON.stringify(texts)})`);
});
