/**
 * A connection whose peer reset it before the proxy looked at it (issue #10, defect 1).
 * `socket.remoteAddress` is then undefined while the bytes the client sent are still
 * readable; the proxy used to stand in `0.0.0.0` for the address, which no ACL denies and
 * which has its own per-IP budget, so a denied client that sent `USER`, `PASS`, `MKD` and
 * reset at once got a session to the server and its commands forwarded.
 *
 * The reset is made deterministic: the test process (which runs the proxy) blocks in
 * spawnSync while a Python client connects, sends its commands and resets with SO_LINGER 0;
 * only then does the proxy's event loop accept the already-reset connection.
 *
 * Upstream: the scripted fake server. Relay ports 11000-11999 belong to this file.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { encodeProxyHeaderV1 } from '../../src/control/proxy-protocol.js';
import { FakeFtpServer, PortBlocks } from '../helpers/fake-server.js';
import { FtpClient, openData, parse227 } from '../helpers/ftp-client.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { opsYaml } from '../helpers/ops.js';
import { startTestProxy, type LogRecord, type TestProxy } from '../helpers/proxy.js';

const ports = new PortBlocks(11000);
const PIPELINED = 'USER x\\r\\nPASS y\\r\\nMKD z\\r\\n';

/**
 * Connect `count` times to host:port, send `payload` (a Python bytes literal body) and reset
 * each connection, all while this process is blocked: none of them is accepted before it is
 * reset.
 */
function resetWhileBlocked(host: string, port: number, count: number, payload: string): void {
  const script = [
    'import socket, struct',
    `for _ in range(${count}):`,
    `    s = socket.create_connection(('${host}', ${port}))`,
    `    s.sendall(b'${payload}')`,
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))",
    '    s.close()',
  ].join('\n');
  const result = spawnSync('python3', ['-c', script], { encoding: 'utf8', timeout: 20000 });
  if (result.status !== 0) throw new Error(`reset client failed: ${result.stderr}`);
}

async function setup(t: TapTest, lines: string[]): Promise<{ fake: FakeFtpServer; proxy: TestProxy }> {
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const proxy = await startTestProxy(opsYaml({ name: 'edge', upstreamPort: fake.port, passivePorts: ports.take(4).text, lines }), { teardown: t });
  return { fake, proxy };
}

async function waitCount(proxy: TestProxy, pred: (r: LogRecord) => boolean, count: number): Promise<number> {
  await proxy.waitLog(() => proxy.logs().filter(pred).length >= count, 10000);
  return proxy.logs().filter(pred).length;
}

const peerGone = (r: LogRecord): boolean => r.event === 'rejected' && r.limit === 'peer-gone';

t.test('a denied client that resets right after connecting gets no session and nothing reaches the server', async (t) => {
  const { fake, proxy } = await setup(t, ['    acl:', '      deny: [127.0.0.0/8]']);
  resetWhileBlocked('127.0.0.1', proxy.port, 20, PIPELINED);
  t.equal(await waitCount(proxy, peerGone, 20), 20, 'each reset connection was closed at admission (peer-gone)');
  t.equal(fake.sessions.length, 0, 'the server saw no connection');
  t.same(fake.received, [], 'no command reached the server');
  t.equal(proxy.logs().filter((r) => r.event === 'session-start').length, 0, 'no session was started');
  t.equal(proxy.server.sessionCount, 0, 'no session is open');
  const m = await proxy.scrape();
  t.equal(m.get('ftpnp_rejections_total', { listener: 'edge', reason: 'peer-gone' }), 20, 'counted as peer-gone');
  t.equal(m.get('ftpnp_rejections_total', { listener: 'edge', reason: 'sessions-per-ip' }), 0, 'no false sessions-per-ip rejection');
  t.equal(m.get('ftpnp_sessions_total', { listener: 'edge' }), 0, 'no session counted');
});

t.test('a client over its per-IP limit cannot slip past it by resetting at once', async (t) => {
  const { fake, proxy } = await setup(t, ['    limits:', '      maxSessionsPerIp: 1']);
  const holder = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(() => holder.destroy());
  t.equal((await holder.readReply(5000)).code, 220, 'the first session is served');
  await fake.waitForSessions(1);
  resetWhileBlocked('127.0.0.1', proxy.port, 5, PIPELINED);
  t.equal(await waitCount(proxy, peerGone, 5), 5, 'each reset connection was closed at admission');
  t.equal(fake.sessions.length, 1, 'the server saw only the first session');
  t.notOk(fake.received.includes('MKD z'), 'the pipelined MKD never reached the server');
  t.equal(proxy.server.sessionCount, 1, 'only the first session is open');
  t.equal((await holder.command('NOOP')).code, 200, 'the first session still works');
});

t.test('a data connection reset before it is checked is dropped; the client behind a PROXY header still gets its data', async (t) => {
  const FILE = Buffer.alloc(64 * 1024, 7);
  const fake = await FakeFtpServer.start({ files: { 'f.bin': FILE } });
  t.teardown(() => fake.close());
  const proxy = await startTestProxy(
    opsYaml({
      name: 'nlb',
      upstreamPort: fake.port,
      passivePorts: ports.take(4).text,
      lines: ['    proxyProtocol:', '      accept: v1', '      from: [127.0.0.1/32]', '      timeoutSeconds: 2', '      dataPorts: true'],
    }),
    { teardown: t },
  );
  const header = (port: number): Buffer =>
    encodeProxyHeaderV1({ command: 'proxy', family: 4, source: { host: '198.51.100.7', port }, destination: { host: '203.0.113.10', port: 21 } });
  const client = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(() => client.destroy());
  client.sendRaw(header(40001));
  t.equal((await client.readReply(5000)).code, 220);
  t.equal((await client.command('USER u')).code, 331);
  t.equal((await client.command('PASS p')).code, 230);
  const port = parse227(await client.command('PASV')).port;
  resetWhileBlocked('127.0.0.1', port, 3, 'PROXY TCP4 198.51.100.7 203.0.113.10 40002 21\\r\\n');
  const dropped = await waitCount(proxy, (r) => r.event === 'data-peer-gone', 3);
  t.equal(dropped, 3, 'each reset data connection was dropped unread (and the proxy is still alive)');
  t.equal(proxy.logs().filter((r) => r.event === 'data-stranger').length, 0, 'not reported as strangers with a made-up address');
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  data.write(header(40003));
  const download = readAll(data, 10000);
  t.equal((await client.command('RETR f.bin', 10000)).code, 226, 'the transfer completes');
  t.ok((await download).data.equals(FILE), 'the real client got the file');
});
