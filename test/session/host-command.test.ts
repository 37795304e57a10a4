/**
 * RFC 7151 HOST through the proxy (issue #10 item 7). A client that dialled the proxy by
 * address sends `HOST <that address>`; the server behind the proxy does not know it (ProFTPD:
 * 504), so the proxy accepts it itself and the server sees no HOST, as if dialled directly
 * without a name. A real name still reaches the server (name-based virtual hosts).
 * Relay ports 13000-13999 belong to this file.
 */
import t from 'tap';
import { PortBlocks, noLeaks, startHarness, type FakeHandler, type Harness } from '../helpers/fake-server.js';
import type { FtpClient } from '../helpers/ftp-client.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(13000);

/** The name the fake server hosts; ProFTPD with `<VirtualHost>`/ServerAlias ftp.example.com. */
const VIRTUAL_HOST = 'ftp.example.com';

/** HOST as ProFTPD answers it: 503 after login, 220 for a name it hosts, 504 for anything else. */
const proftpdHost: FakeHandler = (command, session) => {
  if (command.verb !== 'HOST') return false;
  if (session.received.some((line) => /^PASS /i.test(line))) session.reply('503 Bad sequence of commands');
  else if (command.arg === VIRTUAL_HOST) session.reply('220 HOST command successful');
  else session.reply(`504 ${command.arg}: Unknown hostname provided`);
  return true;
};

function hostLines(h: Harness): string[] {
  return h.fake!.received.filter((line) => /^HOST\b/i.test(line));
}

async function login(t: TapTest, client: FtpClient): Promise<void> {
  t.equal((await client.command('USER test')).code, 331, 'USER');
  t.equal((await client.command('PASS secret')).code, 230, 'PASS: logged in');
}

t.test('HOST naming the address the client dialled is answered by the proxy, never reaches the server', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: proftpdHost } });
  const client = await h.connect();
  t.equal((await client.readReply()).code, 220, 'greeting');
  t.equal(h.proxy.host, '127.0.0.1', 'the client dialled 127.0.0.1');
  const reply = await client.command('HOST 127.0.0.1');
  t.equal(reply.text, '220 Host accepted.', 'accepted by the proxy, not "504 Unknown hostname"');
  t.same(hostLines(h), [], 'the server received no HOST');
  const log = h.proxy.logs().find((r) => r.event === 'host-answered');
  t.equal(log?.host, '127.0.0.1', `logged with its argument (${JSON.stringify(log)})`);
  t.equal(log?.level, 'debug', 'at debug level');
  t.notOk(h.proxy.logs().some((r) => r.event === 'command-refused'), 'not logged as a refusal');
  await login(t, client);
  await noLeaks(t, h, client);
});

t.test('HOST with a real name reaches the server, which answers it (name-based virtual hosts)', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: proftpdHost } });
  const client = await h.connect();
  await client.readReply();
  const reply = await client.command(`HOST ${VIRTUAL_HOST}`);
  t.equal(reply.text, '220 HOST command successful', "the server's own 220");
  t.same(hostLines(h), [`HOST ${VIRTUAL_HOST}`], 'the server received the HOST unchanged');
  await login(t, client);
  await noLeaks(t, h, client);
});

t.test('HOST naming an address that is not the proxy\'s reaches the server', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: proftpdHost } });
  const client = await h.connect();
  await client.readReply();
  const reply = await client.command('HOST 127.0.0.2');
  t.equal(reply.text, '504 127.0.0.2: Unknown hostname provided', "the server's answer");
  t.same(hostLines(h), ['HOST 127.0.0.2'], 'forwarded unchanged');
  await login(t, client);
  await noLeaks(t, h, client);
});

t.test('HOST after login goes to the server, whose 503 the client sees', async (t) => {
  const h = await startHarness(t, { ports, fake: { handler: proftpdHost } });
  const client = await h.connect();
  await client.readReply();
  await login(t, client);
  const reply = await client.command('HOST 127.0.0.1');
  t.equal(reply.text, '503 Bad sequence of commands', 'not a 220 for a HOST the server would refuse');
  t.same(hostLines(h), ['HOST 127.0.0.1'], 'forwarded unchanged');
  await noLeaks(t, h, client);
});

t.test('HOST naming the advertised hostname (other case, trailing dot) is answered by the proxy', async (t) => {
  // Only HOST is exercised: the advertised name is resolved for PASV replies alone, never here,
  // so a name that does not resolve does not matter.
  const h = await startHarness(t, { ports, advertise: 'ftp.proxy.example', fake: { handler: proftpdHost } });
  const client = await h.connect();
  t.equal((await client.readReply()).code, 220, 'greeting');
  const reply = await client.command('HOST FTP.PROXY.EXAMPLE.');
  t.equal(reply.text, '220 Host accepted.', 'accepted by the proxy');
  t.same(hostLines(h), [], 'the server received no HOST');
  t.equal(h.proxy.logs().find((r) => r.event === 'host-answered')?.host, 'FTP.PROXY.EXAMPLE.', 'logged as sent');
  const real = await client.command(`HOST ${VIRTUAL_HOST}`);
  t.equal(real.text, '220 HOST command successful', 'a real name still reaches the server');
  await login(t, client);
  await noLeaks(t, h, client);
});
