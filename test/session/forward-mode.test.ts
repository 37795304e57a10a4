/**
 * Forward mode (issue #13, upstream-selection.md A): the client names the server in its login,
 * `USER name@host[:port]`. The proxy greets first, answers the pre-login commands itself,
 * checks the destination against `upstream.forward`, dials exactly the checked address, logs in
 * with `USER name`, and shows the server's banner as continuation lines of the reply to USER.
 * Fake servers on 127.0.0.1 (different ports stand for different servers; `allow` names
 * 127.0.0.1/32 explicitly, which is what unlocks loopback and the proxy's own address).
 * The NAT lab (test/e2e/upstream-selection.test.ts) runs the same with real clients and vsftpd.
 * Relay ports 7000-7999 belong to this file.
 */
import t from 'tap';
import { FAST_TIMEOUTS_YAML, FakeFtpServer, PortBlocks, closedPort, downloadFrom, settleLeaks } from '../helpers/fake-server.js';
import { FtpClient, parse229 } from '../helpers/ftp-client.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(7000);

interface ForwardOptions {
  readonly allow?: readonly string[];
  readonly deny?: readonly string[];
  readonly portsAllowed?: string;
  readonly maxLoginAttempts?: number;
  readonly extra?: readonly string[];
}

async function forwardProxy(t: TapTest, options: ForwardOptions = {}): Promise<TestProxy> {
  const list = (items: readonly string[]): string => `[${items.map((item) => JSON.stringify(item)).join(', ')}]`;
  const yaml = [
    'log: { level: debug }',
    'listeners:',
    '  - name: fwd',
    '    listen: "127.0.0.1:0"',
    '    upstream:',
    '      forward:',
    `        allow: ${list(options.allow ?? ['127.0.0.1/32'])}`,
    `        deny: ${list(options.deny ?? [])}`,
    `        ports: "${options.portsAllowed ?? '1024-65535'}"`,
    '    client:',
    '      advertise: auto',
    `      passivePorts: "${ports.take(10).text}"`,
    `    limits: { maxLoginAttempts: ${options.maxLoginAttempts ?? 3} }`,
    '    acl: { allow: [127.0.0.0/8] }',
    FAST_TIMEOUTS_YAML,
    ...(options.extra ?? []),
  ].join('\n');
  return startTestProxy(yaml, { teardown: t });
}

async function fake(t: TapTest, name: string, files: Record<string, string> = {}): Promise<FakeFtpServer> {
  const server = await FakeFtpServer.start({ greeting: `220-Welcome to ${name}\r\n220 ${name} ready`, files });
  t.teardown(() => server.close());
  return server;
}

async function client(t: TapTest, proxy: TestProxy): Promise<FtpClient> {
  const c = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(() => c.destroy());
  return c;
}

async function noLeaks(t: TapTest, proxy: TestProxy, clients: FtpClient[]): Promise<void> {
  for (const c of clients) if (!c.isClosed) await c.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
}

t.test('the proxy greets and answers the pre-login commands itself; no server is dialled', async (t) => {
  const server = await fake(t, 'alpha');
  const proxy = await forwardProxy(t);
  const c = await client(t, proxy);
  const greeting = await c.readReply();
  t.equal(greeting.code, 220);
  t.match(greeting.text, /user@host/, `the greeting says how to log in (${greeting.text})`);
  const feat = await c.command('FEAT');
  t.equal(feat.code, 211, 'FEAT (lftp sends it first)');
  t.ok(feat.lines.includes(' EPSV') && feat.lines.includes(' EPRT'), 'the proxy\'s own features');
  t.notOk(feat.lines.some((l) => /AUTH/.test(l)), 'no AUTH TLS without listener tls');
  t.equal((await c.command('SYST')).text, '215 UNIX Type: L8');
  t.equal((await c.command('NOOP')).code, 200);
  t.equal((await c.command('OPTS UTF8 ON')).code, 202, 'OPTS: for the server, later');
  t.equal((await c.command('CLNT lftp 4.9')).code, 200);
  t.equal((await c.command('HOST 127.0.0.1')).code, 220, 'HOST naming the proxy: accepted');
  t.equal((await c.command('HOST ftp.example.com')).code, 504, 'HOST naming anything else cannot choose the server');
  t.equal((await c.command('PASS secret')).code, 503, 'PASS before USER');
  t.equal((await c.command('LIST')).code, 530, 'anything else waits for the login');
  t.equal((await c.command('AUTH TLS')).code, 502, 'AUTH without listener tls: as in any session');
  t.equal(server.sessions.length, 0, 'no server was dialled');
  const quit = await c.command('QUIT');
  t.equal(quit.code, 221);
  t.ok(await c.waitClosed(), 'QUIT closes');
  await noLeaks(t, proxy, []);
});

t.test('USER name@host:port reaches that server with USER name; the banner comes as 331- lines; data is relayed', async (t) => {
  const alpha = await fake(t, 'alpha', { 'a.txt': 'from alpha\n' });
  const beta = await fake(t, 'beta', { 'a.txt': 'from beta\n' });
  const proxy = await forwardProxy(t);
  for (const [server, other, name] of [[alpha, beta, 'alpha'], [beta, alpha, 'beta']] as const) {
    const c = await client(t, proxy);
    await c.readReply();
    const before = other.received.length;
    const user = await c.command(`USER test@127.0.0.1:${server.port}`);
    t.equal(user.code, 331, `${name}: the server's 331`);
    t.same(user.lines.slice(0, 2), [`331-Welcome to ${name}`, `331-${name} ready`], `${name}: the server's banner as 331- lines, never a second bare 220`);
    t.notOk(user.lines.some((l) => /^220/.test(l)), 'no 220 line at all');
    t.equal(server.received.at(-1), 'USER test', `${name}: the server got USER test, without the destination`);
    t.equal(other.received.length, before, 'the other server got nothing');
    t.equal((await c.command('PASS secret')).code, 230, 'logged in');
    const epsv = await c.command('EPSV');
    t.equal(epsv.code, 229);
    const download = downloadFrom(parse229(epsv));
    t.equal((await c.command('RETR a.txt')).code, 226, 'RETR: 226');
    t.equal((await download).data.toString(), `from ${name}\n`, `${name}: the file of the server named in USER`);
    await noLeaks(t, proxy, [c]);
  }
  const chosen = proxy.logs().filter((r) => r.event === 'upstream-chosen');
  t.same(chosen.map((r) => r.upstream), [`127.0.0.1:${alpha.port}`, `127.0.0.1:${beta.port}`], 'upstream-chosen logged per session');
  const ends = proxy.logs().filter((r) => r.event === 'session-end');
  t.same(ends.map((r) => r.upstream), [`127.0.0.1:${alpha.port}`, `127.0.0.1:${beta.port}`], 'session-end names the chosen server');
  t.same(ends.map((r) => r.user), ['test', 'test'], 'and the user without the destination');
});

t.test('an e-mail user name: split at the last @', async (t) => {
  const server = await fake(t, 'alpha');
  const proxy = await forwardProxy(t);
  const c = await client(t, proxy);
  await c.readReply();
  t.equal((await c.command(`USER alice@example.org@127.0.0.1:${server.port}`)).code, 331);
  t.equal(server.received.at(-1), 'USER alice@example.org', 'the server got the whole e-mail address as user');
  await noLeaks(t, proxy, [c]);
});

t.test('refusals are 530 with the reason and leave the session usable; the attempt limit closes with 421', async (t) => {
  const server = await fake(t, 'alpha');
  const closed = await closedPort();
  const proxy = await forwardProxy(t, { maxLoginAttempts: 5, deny: ['127.0.0.2/32'], portsAllowed: `${server.port},${closed}` });
  const c = await client(t, proxy);
  await c.readReply();
  const cases: Array<[string, RegExp]> = [
    ['USER bob', /user@host/],
    ['USER bob@', /empty/],
    [`USER bob@127.0.0.2:${server.port}`, /127\.0\.0\.2 is in a denied range/],
    [`USER bob@192.0.2.1:${server.port}`, /192\.0\.2\.1 is not allowed/],
  ];
  for (const [line, why] of cases) {
    const reply = await c.command(line);
    t.equal(reply.code, 530, `${line}: 530`);
    t.match(reply.text, why, `${line}: says why (${reply.text})`);
  }
  const good = await c.command(`USER test@127.0.0.1:${server.port}`);
  t.equal(good.code, 331, 'after four refusals a valid destination still works (limit 5)');
  t.equal((await c.command('PASS secret')).code, 230);
  await noLeaks(t, proxy, [c]);

  const d = await client(t, proxy);
  await d.readReply();
  const unreachable = await d.command(`USER bob@127.0.0.1:${closed}`);
  t.equal(unreachable.code, 530, 'a server that cannot be reached: 530');
  t.match(unreachable.text, /Cannot connect to 127\.0\.0\.1:\d+: .*ECONNREFUSED/, unreachable.text);
  const port = await d.command('USER bob@127.0.0.1:21');
  t.equal(port.code, 530, 'a port outside upstream.forward.ports: 530');
  t.match(port.text, /port 21 is not allowed/, port.text);
  for (let i = 0; i < 2; i++) t.equal((await d.command(`USER bob@192.0.2.1:${server.port}`)).code, 530);
  const last = await d.command(`USER bob@192.0.2.1:${server.port}`);
  t.equal(last.code, 530, 'the fifth refusal is answered');
  const bye = await d.readReply();
  t.equal(bye.text, '421 Too many refused logins, closing.', 'then 421');
  t.ok(await d.waitClosed(), 'and the session closes');
  const metrics = proxy.logs().filter((r) => r.event === 'upstream-refused').map((r) => r.result);
  t.same(metrics, ['bad-login', 'bad-login', 'denied', 'not-allowed', 'unreachable', 'port-not-allowed', 'not-allowed', 'not-allowed', 'not-allowed'], 'each refusal logged with its result');
  t.ok(proxy.logs().some((r) => r.event === 'limit' && r.limit === 'login-attempts'), 'the limit is logged');
  t.equal(server.sessions.length, 1, 'only the valid login reached a server');
  await noLeaks(t, proxy, []);
});

t.test('a name is checked by every address it resolves to (localhost into a denied range)', async (t) => {
  const server = await fake(t, 'alpha');
  const proxy = await forwardProxy(t, { allow: ['localhost', '127.0.0.0/8', '::1/128'], deny: ['127.0.0.0/8'] });
  const c = await client(t, proxy);
  await c.readReply();
  const reply = await c.command(`USER bob@localhost:${server.port}`);
  t.equal(reply.code, 530);
  t.match(reply.text, /localhost \(127\.0\.0\.1\) is in a denied range/, reply.text);
  t.equal(server.sessions.length, 0, 'never dialled');
  const unresolved = await c.command('USER bob@no-such-host.invalid');
  t.equal(unresolved.code, 530, 'a name that does not resolve: 530');
  t.match(unresolved.text, /Cannot resolve no-such-host\.invalid/, unresolved.text);
  await noLeaks(t, proxy, [c]);
});

t.test('another USER after the login: the same destination is stripped, another is refused', async (t) => {
  const server = await fake(t, 'alpha');
  const proxy = await forwardProxy(t);
  const c = await client(t, proxy);
  await c.readReply();
  t.equal((await c.command(`USER test@127.0.0.1:${server.port}`)).code, 331);
  t.equal((await c.command(`USER other@127.0.0.1:${server.port}`)).code, 331, 'same server: forwarded');
  t.equal(server.received.at(-1), 'USER other', 'as USER other');
  const elsewhere = await c.command('USER other@127.0.0.1:2');
  t.equal(elsewhere.code, 530, 'another server: refused here');
  t.match(elsewhere.text, /connected to 127\.0\.0\.1:\d+/);
  t.equal(server.received.at(-1), 'USER other', 'nothing more reached the server');
  await noLeaks(t, proxy, [c]);
});

t.test('the client hangs up before naming a server, or while the server is dialled: nothing is left', async (t) => {
  const server = await FakeFtpServer.start({ greeting: null });
  t.teardown(() => server.close());
  const proxy = await forwardProxy(t);
  const a = await client(t, proxy);
  await a.readReply();
  a.socket.end();
  t.ok(await a.waitClosed(), 'FIN before USER: closed');
  const b = await client(t, proxy);
  await b.readReply();
  b.send(`USER test@127.0.0.1:${server.port}`);
  await server.waitForSessions(1);
  b.destroy();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 }, 'a server that never greets does not keep the session');
});

t.test('a server that greets with 421 is a refusal, not a relayed 421', async (t) => {
  const server = await FakeFtpServer.start({ greeting: '421 Too many users' });
  t.teardown(() => server.close());
  const proxy = await forwardProxy(t);
  const c = await client(t, proxy);
  await c.readReply();
  const reply = await c.command(`USER test@127.0.0.1:${server.port}`);
  t.equal(reply.code, 530);
  t.match(reply.text, /421 Too many users/, 'the server\'s words in the reason');
  t.equal((await c.command('NOOP')).code, 200, 'the session goes on');
  await noLeaks(t, proxy, [c]);
});
