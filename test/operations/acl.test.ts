/**
 * Listener ACLs (README "Limits, ACLs, timeouts"): deny wins, a non-empty allow admits only its
 * members, `action: reply` answers `421 Service not available for your address.`, `action:
 * close` closes without a byte; nothing reaches the server; every refusal is logged (`event:
 * rejected`, `limit: acl-deny`, with the client) and counted in
 * ftpnp_rejections_total{reason="acl-deny"}.
 * Upstream: the scripted fake server, which counts control connections.
 * Relay ports 35000-35999 belong to this file (never bound here: no data channel is opened).
 */
import t from 'tap';
import { FakeFtpServer, PortBlocks } from '../helpers/fake-server.js';
import { FtpClient } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';
import type { TapTest } from '../helpers/tap.js';
import { opsYaml, probe, probeClosed } from '../helpers/ops.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';

const ports = new PortBlocks(35000);
const ACL_REPLY = '421 Service not available for your address.\r\n';

async function setup(t: TapTest, aclLines: string[], name = 'acl-edge'): Promise<{ fake: FakeFtpServer; proxy: TestProxy }> {
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const proxy = await startTestProxy(
    opsYaml({ name, upstreamPort: fake.port, passivePorts: ports.take(4).text, lines: ['    acl:', ...aclLines.map((l) => `      ${l}`)] }),
    { teardown: t },
  );
  return { fake, proxy };
}

/** A refused client: connect from `localAddress`, expect `expected` bytes exactly, then the close. */
async function expectRefused(t: TapTest, proxy: TestProxy, localAddress: string, expected: string): Promise<void> {
  const p = await probe(t, proxy.host, proxy.port, { localAddress });
  const end = await probeClosed(p, 4000);
  t.ok(end, `connection from ${localAddress} closed by the proxy`);
  t.equal(p.data().toString('latin1'), expected, `client from ${localAddress} got ${JSON.stringify(expected)}`);
}

async function rejections(proxy: TestProxy, reason: string): Promise<number | undefined> {
  return (await proxy.scrape()).get('ftpnp_rejections_total', { listener: proxy.name, reason });
}

function aclLogs(proxy: TestProxy): Array<Record<string, unknown>> {
  return proxy.logs().filter((r) => r.event === 'rejected' && r.limit === 'acl-deny');
}

t.test('deny 127.0.0.0/8 (action reply): 421, closed, nothing reaches the server, logged and counted', async (t) => {
  const { fake, proxy } = await setup(t, ['deny: [127.0.0.0/8]']);
  await expectRefused(t, proxy, '127.0.0.1', ACL_REPLY);
  await expectRefused(t, proxy, '127.0.0.3', ACL_REPLY);
  await delay(200);
  t.equal(fake.sessions.length, 0, 'the upstream saw no connection');
  const logged = aclLogs(proxy);
  t.equal(logged.length, 2, 'each refusal logged once');
  t.match(String(logged[0]?.client), /^127\.0\.0\.1:\d+$/, 'log names the client address and port');
  t.match(String(logged[1]?.client), /^127\.0\.0\.3:\d+$/, 'log names the second client');
  t.equal(logged[0]?.listener, 'acl-edge', 'log carries the listener');
  t.equal(logged[0]?.level, 'warn');
  t.equal(proxy.logs().filter((r) => r.event === 'session-start').length, 0, 'no session was started');
  const m = await proxy.scrape();
  t.equal(m.get('ftpnp_rejections_total', { listener: 'acl-edge', reason: 'acl-deny' }), 2, 'counted: acl-deny 2');
  t.equal(m.get('ftpnp_sessions_total', { listener: 'acl-edge' }), 0, 'no session counted');
});

t.test('deny with action close: closed without a single byte', async (t) => {
  const { fake, proxy } = await setup(t, ['deny: [127.0.0.0/8]', 'action: close']);
  const p = await probe(t, proxy.host, proxy.port);
  const end = await probeClosed(p, 3000);
  t.ok(end, 'closed by the proxy');
  t.equal(end?.bytes, 0, 'zero bytes received');
  t.ok(end && end.afterMs < 1000, `closed at once (${end?.afterMs} ms)`);
  await delay(200);
  t.equal(fake.sessions.length, 0, 'the upstream saw no connection');
  t.equal(aclLogs(proxy).length, 1, 'logged');
  t.equal(await rejections(proxy, 'acl-deny'), 1, 'counted');
});

t.test('allow [10.0.0.0/8] only: a loopback client is refused', async (t) => {
  const { fake, proxy } = await setup(t, ['allow: [10.0.0.0/8]']);
  await expectRefused(t, proxy, '127.0.0.1', ACL_REPLY);
  await delay(200);
  t.equal(fake.sessions.length, 0, 'the upstream saw no connection');
  t.equal(aclLogs(proxy).length, 1, 'logged');
  t.equal(await rejections(proxy, 'acl-deny'), 1, 'counted');
});

t.test('allow containing 127.0.0.1/32: that client is admitted, 127.0.0.2 is not', async (t) => {
  const { fake, proxy } = await setup(t, ['allow: [10.0.0.0/8, 127.0.0.1/32]']);
  const client = await FtpClient.connect(proxy.host, proxy.port, { localAddress: '127.0.0.1' });
  t.teardown(() => client.destroy());
  const login = await client.login();
  t.equal(login.code, 230, 'admitted and logged in through the proxy');
  t.equal(fake.sessions.length, 1, 'the upstream saw exactly this connection');
  await expectRefused(t, proxy, '127.0.0.2', ACL_REPLY);
  t.equal(fake.sessions.length, 1, 'the refused client never reached the upstream');
  t.equal(aclLogs(proxy).length, 1, 'one refusal logged');
  t.equal(await rejections(proxy, 'acl-deny'), 1, 'one refusal counted');
  t.equal((await client.command('NOOP')).code, 200, 'the admitted session keeps working');
  await client.quit();
});

t.test('deny wins over allow', async (t) => {
  const { fake, proxy } = await setup(t, ['allow: [127.0.0.0/8]', 'deny: [127.0.0.2/32]']);
  await expectRefused(t, proxy, '127.0.0.2', ACL_REPLY);
  const client = await FtpClient.connect(proxy.host, proxy.port, { localAddress: '127.0.0.1' });
  t.teardown(() => client.destroy());
  t.equal((await client.login()).code, 230, '127.0.0.1 (allowed, not denied) admitted');
  t.equal(fake.sessions.length, 1, 'only the admitted client reached the upstream');
  t.equal(await rejections(proxy, 'acl-deny'), 1, 'counted');
  await client.quit();
});

t.test('behind a PROXY-protocol load balancer the ACL applies to the header source, not the balancer', async (t) => {
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const proxy = await startTestProxy(
    opsYaml({
      name: 'acl-lb',
      upstreamPort: fake.port,
      passivePorts: ports.take(4).text,
      lines: ['    acl:', '      deny: [198.51.100.0/24]', '    proxyProtocol:', '      accept: v1', '      from: [127.0.0.1/32]'],
    }),
    { teardown: t },
  );
  const denied = await probe(t, proxy.host, proxy.port);
  denied.write('PROXY TCP4 198.51.100.7 203.0.113.10 40000 21\r\n');
  t.ok(await probeClosed(denied, 4000), 'denied header client closed');
  t.equal(denied.data().toString('latin1'), ACL_REPLY, 'header client in the deny list gets the ACL 421');
  const allowed = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(() => allowed.destroy());
  allowed.sendRaw('PROXY TCP4 192.0.2.1 203.0.113.10 40001 21\r\n');
  t.equal((await allowed.login()).code, 230, 'another header client through the same balancer is admitted');
  t.equal(fake.sessions.length, 1, 'only the admitted one reached the upstream');
  const logged = aclLogs(proxy);
  t.equal(logged.length, 1, 'one refusal logged');
  t.equal(logged[0]?.client, '198.51.100.7:40000', 'logged with the header client, not the balancer');
  t.equal(await rejections(proxy, 'acl-deny'), 1, 'counted');
  await allowed.quit();
});
