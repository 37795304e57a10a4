/**
 * The server goes away early: closes right after the greeting, mid-session, is not
 * listening at all, or says 421 (RFC 959 §4.2.1; protocol.md §1.5). The client must get a
 * 421 line and then see the proxy close the control connection; nothing leaks.
 * Relay ports 24000-24999 belong to this file.
 */
import t from 'tap';
import { PortBlocks, closedPort, noLeaks, settleLeaks, startHarness, type Harness } from '../helpers/fake-server.js';
import { type FtpClient } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(24000);
const UPSTREAM_CLOSED = '421 Service not available: server closed the connection.';

/** Read every remaining reply until the proxy closes; fails the test when it does not close. */
async function repliesUntilClose(t: TapTest, client: FtpClient, timeoutMs = 5000): Promise<string[]> {
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

t.test('server closes right after the greeting: 220, then a 421 line, then close', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { onConnection: (session) => setTimeout(() => session.end(), 50) },
  });
  const client = await h.connect();
  const texts = await repliesUntilClose(t, client);
  t.equal(texts[0]?.slice(0, 3), '220', `greeting relayed first: ${JSON.stringify(texts)}`);
  t.equal(texts[1], UPSTREAM_CLOSED, '421 line');
  t.equal(texts.length, 2, 'nothing else');
  const warn = h.proxy.logs().find((r) => r.event === 'upstream-closed');
  t.equal(warn?.code, 'FTPP_ERR_UPSTREAM_CLOSED', 'logged with its code');
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('server closes before any greeting: the client gets a 421 instead of 220', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { greeting: null, onConnection: (session) => setTimeout(() => session.end(), 50) },
  });
  const client = await h.connect();
  const texts = await repliesUntilClose(t, client);
  t.same(texts, [UPSTREAM_CLOSED], `one 421 line: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('server resets right after the greeting', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { onConnection: (session) => setTimeout(() => session.reset(), 50) },
  });
  const client = await h.connect();
  const texts = await repliesUntilClose(t, client);
  t.equal(texts[texts.length - 1]?.slice(0, 4), '421 ', `ends with a 421 line: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});

for (const how of ['end', 'reset'] as const) {
  t.test(`server ${how === 'end' ? 'closes (FIN)' : 'resets'} mid-session while a command waits: 421, then close`, async (t) => {
    const h = await startHarness(t, {
      ports,
      fake: {
        handler: (command, session) => {
          if (command.verb !== 'SYST') return false;
          if (how === 'end') session.end();
          else session.reset();
          return true;
        },
      },
    });
    const client = await h.login();
    t.equal((await client.command('NOOP')).code, 200, 'session works before');
    client.send('SYST');
    const texts = await repliesUntilClose(t, client);
    t.same(texts, [UPSTREAM_CLOSED], `one 421 line for the waiting command: ${JSON.stringify(texts)}`);
    await noLeaks(t, h, client, { close: 'destroy' });
  });
}

t.test('server closes mid-session while idle: 421, then close', async (t) => {
  let close: (() => void) | null = null;
  const h = await startHarness(t, { ports, fake: { onConnection: (session) => (close = () => session.end()) } });
  const client = await h.login();
  close!();
  const texts = await repliesUntilClose(t, client);
  t.same(texts, [UPSTREAM_CLOSED], `one 421 line: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('server not listening: "421 Service not available." then close', async (t) => {
  const port = await closedPort();
  const h = await startHarness(t, { ports, upstreamPort: port });
  const client = await h.connect();
  const texts = await repliesUntilClose(t, client);
  t.same(texts, ['421 Service not available.'], `exact line: ${JSON.stringify(texts)}`);
  t.equal(client.received.toString('latin1'), '421 Service not available.\r\n', 'nothing else on the wire');
  const warn = h.proxy.logs().find((r) => r.event === 'upstream-unreachable');
  t.equal(warn?.code, 'FTPP_ERR_UPSTREAM_UNREACHABLE', 'logged with its code');
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('server not listening: commands sent early get nothing but the 421', async (t) => {
  const port = await closedPort();
  const h = await startHarness(t, { ports, upstreamPort: port });
  const client = await h.connect();
  client.sendRaw('USER a\r\nPASS b\r\n');
  const texts = await repliesUntilClose(t, client);
  t.same(texts, ['421 Service not available.'], `only the 421: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('server answers 421: forwarded byte for byte, then the proxy closes (server keeps its socket open)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'NOOP') return false;
        session.reply('421 Timeout.');
        return true; // and keep the control connection open
      },
    },
  });
  const client = await h.login();
  client.send('NOOP');
  const texts = await repliesUntilClose(t, client);
  t.same(texts, ['421 Timeout.'], `the server's 421 only: ${JSON.stringify(texts)}`);
  t.ok(client.received.toString('latin1').endsWith('421 Timeout.\r\n'), 'bytes unchanged');
  await noLeaks(t, h, client, { close: 'destroy' });
  t.ok(await waitServerSideClosed(h), "the proxy closed the server's control connection too");
});

t.test('unsolicited 421 from the server (idle timeout) is forwarded, then close', async (t) => {
  let say: (() => void) | null = null;
  const h = await startHarness(t, {
    ports,
    fake: {
      onConnection: (session) => {
        say = () => {
          session.reply('421 Timeout.');
          session.end();
        };
      },
    },
  });
  const client = await h.login();
  say!();
  const texts = await repliesUntilClose(t, client);
  t.same(texts, ['421 Timeout.'], `forwarded once, no second 421 of the proxy's own: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('QUIT: 221, then close, no 421', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  client.send('QUIT');
  const texts = await repliesUntilClose(t, client);
  t.same(texts, ['221 Goodbye.'], `only the 221: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});

t.test('client vanishes mid-session: the server connection is closed and nothing leaks', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  t.equal((await client.command('PASV')).code, 227, 'a relay port is leased');
  client.socket.resetAndDestroy();
  t.same(await settleLeaks(h.proxy), { sessions: 0, leased: 0 }, 'session and relay port released');
  t.ok(await waitServerSideClosed(h), "the server's control connection is closed");
});

async function waitServerSideClosed(h: Harness): Promise<boolean> {
  const session = h.fake!.sessions[0]!;
  for (let i = 0; i < 100; i++) {
    if (session.socket.closed || session.socket.readableEnded) return true;
    await delay(30);
  }
  return false;
}

t.test('server answers the proxy EPSV with 421: the client gets it for its PASV, then close', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'EPSV' && command.verb !== 'PASV') return false;
        session.reply('421 Timeout.');
        session.end();
        return true;
      },
    },
  });
  const client = await h.login();
  client.send('PASV');
  const texts = await repliesUntilClose(t, client);
  t.same(texts, ['421 Timeout.'], `the server's 421 once: ${JSON.stringify(texts)}`);
  await noLeaks(t, h, client, { close: 'destroy' });
});
