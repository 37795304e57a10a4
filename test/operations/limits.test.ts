/**
 * Session limits and timeouts (README "Limits, ACLs, timeouts", "Error codes"):
 * maxSessionsPerIp, maxSessions, timeouts.loginSeconds, timeouts.idleSeconds,
 * limits.maxDataChannelsPerSession. Each hit gets its documented reply, is logged with the
 * client (`event: rejected` at admission, `event: limit` inside a session) and counted in
 * ftpnp_rejections_total{listener,reason}.
 * Upstream: the scripted fake server. Relay ports 36000-36999 belong to this file.
 */
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { FakeFtpServer, PortBlocks } from '../helpers/fake-server.js';
import { FtpClient, openData, parse227 } from '../helpers/ftp-client.js';
import { delay, waitFor } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { sha256 } from '../helpers/clients.js';
import { opsYaml, probe, probeClosed } from '../helpers/ops.js';
import { startTestProxy, type LogRecord, type TestProxy } from '../helpers/proxy.js';
import { validateConfigText } from '../../src/config/load.js';

const ports = new PortBlocks(36000);
const TOO_MANY = '421 Too many connections, try again later.\r\n';

async function setup(t: TapTest, lines: string[], files: Record<string, Buffer> = {}): Promise<{ fake: FakeFtpServer; proxy: TestProxy }> {
  const fake = await FakeFtpServer.start({
    files,
    handler: (command, session) => {
      if (command.verb === 'PASS' && command.arg === 'wrong') {
        session.reply('530 Login incorrect.');
        return true;
      }
      return false;
    },
  });
  t.teardown(() => fake.close());
  const proxy = await startTestProxy(opsYaml({ name: 'lim', upstreamPort: fake.port, passivePorts: ports.take(4).text, lines }), { teardown: t });
  return { fake, proxy };
}

async function connect(t: TapTest, proxy: TestProxy, localAddress: string): Promise<FtpClient> {
  const client = await FtpClient.connect(proxy.host, proxy.port, { localAddress });
  t.teardown(() => client.destroy());
  return client;
}

async function loggedIn(t: TapTest, proxy: TestProxy, localAddress: string): Promise<FtpClient> {
  const client = await connect(t, proxy, localAddress);
  const reply = await client.login();
  if (reply.code !== 230) throw new Error(`login from ${localAddress} failed: ${reply.text}`);
  return client;
}

async function expectTooMany(t: TapTest, proxy: TestProxy, localAddress: string): Promise<void> {
  const p = await probe(t, proxy.host, proxy.port, { localAddress });
  const end = await probeClosed(p, 4000);
  t.ok(end, `connection from ${localAddress} closed`);
  t.equal(p.data().toString('latin1'), TOO_MANY, `${localAddress} got exactly "421 Too many connections"`);
}

async function rejections(proxy: TestProxy, reason: string): Promise<number | undefined> {
  return (await proxy.scrape()).get('ftpnp_rejections_total', { listener: 'lim', reason });
}

function eventLogs(proxy: TestProxy, event: string, limit: string): LogRecord[] {
  return proxy.logs().filter((r) => r.event === event && r.limit === limit);
}

t.test('maxSessionsPerIp 2: the third from one address gets 421; after one quits a new one is admitted', async (t) => {
  const { fake, proxy } = await setup(t, ['    limits:', '      maxSessionsPerIp: 2']);
  const c1 = await loggedIn(t, proxy, '127.0.0.1');
  const c2 = await loggedIn(t, proxy, '127.0.0.1');
  await expectTooMany(t, proxy, '127.0.0.1');
  t.equal(fake.sessions.length, 2, 'the refused session never reached the upstream');
  const other = await loggedIn(t, proxy, '127.0.0.2');
  t.pass('another address is still admitted');
  const logged = proxy.logs().filter((r) => r.event === 'rejected');
  t.equal(logged.length, 1, 'logged once (event rejected)');
  t.match(String(logged[0]?.client), /^127\.0\.0\.1:\d+$/, 'with the client');
  t.equal(logged[0]?.limit, 'sessions-per-ip', 'log field limit names the reason');
  t.equal(await rejections(proxy, 'sessions-per-ip'), 1, 'counted as sessions-per-ip');
  await c1.quit();
  t.ok(await waitFor(() => proxy.server.sessionCount === 2, 3000), 'the quit session is gone');
  const c4 = await loggedIn(t, proxy, '127.0.0.1');
  t.pass('after one quit, a new session from 127.0.0.1 is admitted');
  t.equal(fake.sessions.length, 4, 'upstream saw c1, c2, other, c4');
  for (const c of [c2, other, c4]) await c.quit();
});

t.test('maxSessions 2: the third (any address) gets 421; after one quits a new one is admitted', async (t) => {
  const { fake, proxy } = await setup(t, ['    limits:', '      maxSessions: 2']);
  const c1 = await loggedIn(t, proxy, '127.0.0.1');
  const c2 = await loggedIn(t, proxy, '127.0.0.2');
  await expectTooMany(t, proxy, '127.0.0.3');
  t.equal(fake.sessions.length, 2, 'the refused session never reached the upstream');
  const logged = proxy.logs().filter((r) => r.event === 'rejected');
  t.equal(logged.length, 1, 'logged once (event rejected)');
  t.match(String(logged[0]?.client), /^127\.0\.0\.3:\d+$/, 'with the client');
  t.equal(logged[0]?.limit, 'sessions-total', 'log field limit names the reason');
  t.equal(await rejections(proxy, 'sessions-total'), 1, 'counted as sessions-total');
  await c1.quit();
  t.ok(await waitFor(() => proxy.server.sessionCount === 1, 3000), 'the quit session is gone');
  const c3 = await loggedIn(t, proxy, '127.0.0.3');
  t.pass('a new session is admitted');
  await c2.quit();
  await c3.quit();
});

t.test('loginSeconds 0.5: 421 Login timeout without a login, never after one', async (t) => {
  const { proxy } = await setup(t, ['    timeouts:', '      loginSeconds: 0.5', '      idleSeconds: 60']);
  const silent = await connect(t, proxy, '127.0.0.1');
  const started = Date.now();
  t.equal((await silent.readReply()).code, 220, 'greeting');
  const userOnly = await connect(t, proxy, '127.0.0.2');
  t.equal((await userOnly.readReply()).code, 220);
  t.equal((await userOnly.command('USER x')).code, 331, 'USER alone is not a login');
  const failed = await connect(t, proxy, '127.0.0.3');
  t.equal((await failed.readReply()).code, 220);
  t.equal((await failed.command('USER x')).code, 331);
  t.equal((await failed.command('PASS wrong')).code, 530, 'a failed login is not a login');
  const good = await loggedIn(t, proxy, '127.0.0.4');

  for (const [what, client] of [['silent', silent], ['USER only', userOnly], ['530', failed]] as const) {
    const reply = await client.readReply(3000);
    t.equal(reply.text, '421 Login timeout.', `${what}: 421 Login timeout.`);
    t.ok(await client.waitEnded(3000), `${what}: closed after the 421`);
  }
  const elapsed = Date.now() - started;
  t.ok(elapsed >= 400, `not before loginSeconds (${elapsed} ms)`);
  await delay(700);
  t.equal((await good.command('NOOP')).code, 200, 'the logged-in session is still served after 1.2 s');
  t.notOk(good.ended, 'and not closed');
  const logged = eventLogs(proxy, 'limit', 'login-timeout');
  t.equal(logged.length, 3, 'each timeout logged');
  t.same(logged.map((r) => String(r.client).split(':')[0]).sort(), ['127.0.0.1', '127.0.0.2', '127.0.0.3'], 'with each client');
  t.equal(await rejections(proxy, 'login-timeout'), 3, 'counted as login-timeout');
  await good.quit();
});

t.test('idleSeconds 0.5: 421 Timeout. for a silent session; a chatty one stays', async (t) => {
  const { proxy } = await setup(t, ['    timeouts:', '      idleSeconds: 0.5']);
  const idle = await loggedIn(t, proxy, '127.0.0.1');
  const chatty = await loggedIn(t, proxy, '127.0.0.2');
  const started = Date.now();
  const idleReply = idle.readReply(4000);
  for (let i = 0; i < 6; i++) {
    await delay(200);
    t.equal((await chatty.command('NOOP')).code, 200, `chatty NOOP ${i + 1}`);
  }
  const reply = await idleReply;
  t.equal(reply.text, '421 Timeout.', 'the idle session got 421 Timeout.');
  t.ok(Date.now() - started >= 400, 'not before idleSeconds');
  t.ok(await idle.waitEnded(3000), 'and was closed');
  t.notOk(chatty.ended, 'the session that kept sending commands is open');
  const logged = eventLogs(proxy, 'limit', 'idle-timeout');
  t.equal(logged.length, 1, 'logged');
  t.match(String(logged[0]?.client), /^127\.0\.0\.1:\d+$/, 'with the client');
  t.equal(await rejections(proxy, 'idle-timeout'), 1, 'counted as idle-timeout');
  await chatty.quit();
});

t.test('idleSeconds 0.5: the bytes of a line that never ends are not activity (slowloris, issue #10)', async (t) => {
  const { fake, proxy } = await setup(t, ['    timeouts:', '      idleSeconds: 0.5']);
  const trickler = await loggedIn(t, proxy, '127.0.0.1');
  const started = Date.now();
  const reply = trickler.readReply(5000);
  // One byte of an unfinished command every 100 ms: far under maxLineBytes, far more often
  // than idleSeconds. Stops by itself after 4 s or once the session is closed.
  let sent = 0;
  const trickle = setInterval(() => {
    if (trickler.ended || Date.now() - started > 4000) return clearInterval(trickle);
    trickler.sendRaw(sent++ === 0 ? 'STOR ' : 'a');
  }, 100);
  t.teardown(() => clearInterval(trickle));
  const got = await reply;
  clearInterval(trickle);
  const elapsed = Date.now() - started;
  t.equal(got.text, '421 Timeout.', 'the trickling session got 421 Timeout.');
  t.ok(elapsed >= 400 && elapsed < 3000, `about idleSeconds after its last complete command (${elapsed} ms, ${sent} bytes trickled)`);
  t.ok(await trickler.waitEnded(3000), 'and was closed');
  t.notOk(fake.received.some((line) => line.startsWith('STOR')), 'the unfinished line never reached the server');
  t.equal(eventLogs(proxy, 'limit', 'idle-timeout').length, 1, 'logged as idle-timeout');
});

t.test('maxDataChannelsPerSession 1: a second channel during a transfer gets 425, the transfer completes', async (t) => {
  const big = randomBytes(24 * 1024 * 1024);
  const { proxy } = await setup(t, ['    limits:', '      maxDataChannelsPerSession: 1'], { 'big.bin': big });
  const client = await loggedIn(t, proxy, '127.0.0.1');
  const pasv = await client.command('PASV');
  t.equal(pasv.code, 227);
  const data = await openData('127.0.0.1', parse227(pasv).port);
  t.teardown(() => data.destroy());
  data.pause(); // do not read: the transfer stays in progress
  client.send('RETR big.bin');
  const prelim = await client.readReply(5000);
  t.equal(prelim.code, 150, '150: transfer running');
  client.send('PASV');
  const limit = await proxy.waitLog((r) => r.event === 'limit' && r.code === 'FTPP_ERR_TOO_MANY_DATA_CHANNELS', 3000);
  t.ok(limit, 'limit logged while the transfer runs');
  t.match(String(limit?.client), /^127\.0\.0\.1:\d+$/, 'with the client');
  t.equal(limit?.limit, 'passive-listeners', 'log field limit names the reason');
  const download = readAll(data, 20000);
  const result = await download;
  t.equal(result.outcome, 'end', 'data ended cleanly');
  t.equal(sha256(result.data), sha256(big), 'the running transfer delivered the whole file');
  t.equal((await client.readReply(10000)).code, 226, '226 for the transfer');
  const refused = await client.readReply(5000);
  t.equal(refused.text, "425 Can't open data connection: too many data connections.", 'the second PASV got 425');
  t.equal(await rejections(proxy, 'passive-listeners'), 1, 'counted (reason passive-listeners)');
  let again = await client.command('PASV');
  for (let i = 0; i < 10 && again.code === 425; i++) {
    await delay(100);
    again = await client.command('PASV');
  }
  t.equal(again.code, 227, 'once the transfer is over a new channel is allowed');
  await client.quit();
});

t.test('maxRelayPortsPerIp (auto: a quarter of the pool, at least 2): sessions from one address cannot hold the whole pool (issue #10)', async (t) => {
  // An 8-port pool: auto allows 2 per client address.
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const proxy = await startTestProxy(opsYaml({ name: 'lim', upstreamPort: fake.port, passivePorts: ports.take(8).text }), { teardown: t });
  const hog = [await loggedIn(t, proxy, '127.0.0.1'), await loggedIn(t, proxy, '127.0.0.1'), await loggedIn(t, proxy, '127.0.0.1')];
  t.equal((await hog[0]!.command('PASV')).code, 227, 'first session of 127.0.0.1: 227');
  t.equal((await hog[1]!.command('EPSV')).code, 229, 'second session of 127.0.0.1: 229');
  const refused = await hog[2]!.command('PASV');
  t.equal(refused.text, "425 Can't open data connection: too many data connections from your address.", 'third: 425');
  t.equal((await hog[0]!.command('PASV')).code, 227, 'PASV again in a session that holds a port swaps it (still 2)');
  const other = await loggedIn(t, proxy, '127.0.0.2');
  t.equal((await other.command('PASV')).code, 227, 'another address still gets a port');
  const limit = eventLogs(proxy, 'limit', 'relay-ports-per-ip');
  t.equal(limit.length, 1, 'logged once');
  t.match(String(limit[0]?.client), /^127\.0\.0\.1:\d+$/, 'with the client');
  t.equal(limit[0]?.max, 2, 'and the cap');
  t.equal(await rejections(proxy, 'relay-ports-per-ip'), 1, 'counted (reason relay-ports-per-ip)');
  await hog[1]!.quit();
  t.ok(await waitFor(() => proxy.server.sessionCount === 3, 3000), 'the session that quit is gone');
  t.equal((await hog[2]!.command('PASV')).code, 227, 'its port was given back to 127.0.0.1');
  for (const client of [hog[0]!, hog[2]!, other]) await client.quit();
  t.ok(await waitFor(() => proxy.server.poolStats().every((p) => p.leased === 0), 3000), 'every port released');
});

t.test('maxRelayPortsPerIp: 1 allows one port per address', async (t) => {
  const { proxy } = await setup(t, ['    limits:', '      maxRelayPortsPerIp: 1']);
  const a = await loggedIn(t, proxy, '127.0.0.1');
  const b = await loggedIn(t, proxy, '127.0.0.1');
  t.equal((await a.command('PASV')).code, 227);
  t.equal((await b.command('PASV')).code, 425, 'the second port for the same address is refused');
  await a.quit();
  await b.quit();
});

t.test('maxRelayPortsPerIp changed by a reload applies to new sessions at once, open ones keep theirs', async (t) => {
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const range = ports.take(8).text;
  const yaml = (cap: number): string => opsYaml({ name: 'lim', upstreamPort: fake.port, passivePorts: range, lines: ['    limits:', `      maxRelayPortsPerIp: ${cap}`] });
  const proxy = await startTestProxy(yaml(1), { teardown: t });
  const before = [await loggedIn(t, proxy, '127.0.0.1'), await loggedIn(t, proxy, '127.0.0.1')];
  t.equal((await before[0]!.command('PASV')).code, 227);
  t.equal((await before[1]!.command('PASV')).code, 425, 'cap 1: the second port is refused');
  await proxy.server.reload(validateConfigText(yaml(3), 'reload'));
  const after = await loggedIn(t, proxy, '127.0.0.1');
  t.equal((await after.command('PASV')).code, 227, 'cap 3 after the reload: a new session gets a second port (same range, same pool)');
  t.equal((await before[1]!.command('PASV')).code, 425, 'an open session keeps the settings it started with');
  for (const client of [...before, after]) await client.quit();
});

t.test('behind a PROXY-protocol balancer maxSessionsPerIp counts the header source', async (t) => {
  const { fake, proxy } = await setup(t, [
    '    limits:',
    '      maxSessionsPerIp: 1',
    '    proxyProtocol:',
    '      accept: v1',
    '      from: [127.0.0.1/32]',
  ]);
  const viaLb = async (source: string, port: number): Promise<FtpClient> => {
    const client = await connect(t, proxy, '127.0.0.1');
    client.sendRaw(`PROXY TCP4 ${source} 203.0.113.10 ${port} 21\r\n`);
    return client;
  };
  const a = await viaLb('198.51.100.7', 40001);
  t.equal((await a.login()).code, 230, 'first header client admitted');
  const b = await viaLb('198.51.100.8', 40002);
  t.equal((await b.login()).code, 230, 'a second header client through the same balancer admitted');
  const c = await viaLb('198.51.100.7', 40003);
  t.equal((await c.readReply(3000)).text, '421 Too many connections, try again later.', 'a second session of 198.51.100.7 is refused');
  t.ok(await c.waitEnded(3000), 'and closed');
  t.equal(fake.sessions.length, 2, 'the upstream saw two sessions');
  const logged = proxy.logs().filter((r) => r.event === 'rejected');
  t.equal(logged.length, 1, 'logged once');
  t.equal(logged[0]?.client, '198.51.100.7:40003', 'with the header client');
  t.equal(await rejections(proxy, 'sessions-per-ip'), 1, 'counted as sessions-per-ip');
  await a.quit();
  await b.quit();
});

t.test('idleSeconds 0.5 does not cut a session whose transfer runs longer', async (t) => {
  const big = randomBytes(16 * 1024 * 1024);
  const { proxy } = await setup(t, ['    timeouts:', '      idleSeconds: 0.5'], { 'big.bin': big });
  const client = await loggedIn(t, proxy, '127.0.0.1');
  const pasv = await client.command('PASV');
  t.equal(pasv.code, 227);
  const data = await openData('127.0.0.1', parse227(pasv).port);
  t.teardown(() => data.destroy());
  data.pause();
  client.send('RETR big.bin');
  t.equal((await client.readReply(5000)).code, 150, 'transfer started');
  await delay(1500); // three idle periods with a stalled transfer and a silent control connection
  t.notOk(client.ended, 'control connection still open');
  t.equal(client.queued, 0, 'no 421 Timeout. during the transfer');
  const result = await readAll(data, 20000);
  t.equal(sha256(result.data), sha256(big), 'the transfer completes');
  t.equal((await client.readReply(5000)).code, 226, '226');
  t.equal(proxy.logs().filter((r) => r.event === 'limit').length, 0, 'no limit logged');
  const reply = await client.readReply(3000);
  t.equal(reply.text, '421 Timeout.', 'idle again after the transfer: 421 Timeout.');
});
