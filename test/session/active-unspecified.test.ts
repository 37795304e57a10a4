/**
 * PORT/EPRT naming the unspecified address (issue #10 defect 6). lftp over IPv6 sends
 * `EPRT |2|::|p|` when its data socket is bound to no address; the proxy answered
 * `500 Illegal EPRT command.`. An unspecified address names no host, so it means the control
 * peer: that can never be a bounce (protocol.md §4.1), and ports < 1024 stay refused.
 *
 * Linux connects a socket aimed at 0.0.0.0 or :: to the local host, so on loopback a
 * connection arriving at our listener does not prove where the proxy aimed: the
 * `data-active` log record does.
 * Relay ports 12000-12999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { FAST_TIMEOUTS_YAML, FakeFtpServer, PortBlocks, settleLeaks, startHarness } from '../helpers/fake-server.js';
import { FtpClient } from '../helpers/ftp-client.js';
import { withTimeout } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { proxyYaml, startTestProxy, type TestProxy } from '../helpers/proxy.js';

const ports = new PortBlocks(12000);
const FILE = randomBytes(64 * 1024);

/** A one-shot "client data socket" listener on `host`, closed at teardown. */
async function listenOnce(t: TapTest, host: string): Promise<{ port: number; accepted: Promise<net.Socket> }> {
  const listener = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject);
    listener.listen(0, host, () => resolve());
  });
  t.teardown(() => listener.close());
  const accepted = new Promise<net.Socket>((resolve) =>
    listener.once('connection', (socket) => {
      t.teardown(() => socket.destroy());
      resolve(socket);
    }),
  );
  return { port: (listener.address() as net.AddressInfo).port, accepted };
}

/** RETR over the pending active channel: the proxy must dial `accepted`; returns the bytes. */
async function retrOverActive(client: FtpClient, accepted: Promise<net.Socket>): Promise<{ codes: number[]; data: Buffer }> {
  client.send('RETR f.bin');
  const socket = await withTimeout(accepted, 5000, 'the proxy dials the client');
  const download = readAll(socket, 10000);
  const codes = [(await client.readReply()).code, (await client.readReply(10000)).code];
  return { codes, data: (await download).data };
}

function records(proxy: TestProxy, event: string): Array<Record<string, unknown>> {
  return proxy.logs().filter((r) => r.event === event);
}

/** Whether this machine can listen and connect on ::1 (containers without IPv6 cannot). */
async function ipv6LoopbackMissing(): Promise<string | false> {
  const server = net.createServer();
  return new Promise((resolve) => {
    server.once('error', (err: NodeJS.ErrnoException) => resolve(`no IPv6 loopback here (${err.code ?? err.message})`));
    server.listen(0, '::1', () => server.close(() => resolve(false)));
  });
}

t.test('IPv4: PORT 0,0,0,0,p1,p2 and EPRT |1|0.0.0.0|p| mean the client itself', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'f.bin': FILE } } });
  const client = await h.login();
  const forms = [
    ['PORT', (p: number) => `PORT 0,0,0,0,${p >> 8},${p & 255}`, '200 PORT command successful.'],
    ['EPRT', (p: number) => `EPRT |1|0.0.0.0|${p}|`, '200 EPRT command successful.'],
  ] as const;
  for (const [verb, line, expected] of forms) {
    const { port, accepted } = await listenOnce(t, '127.0.0.1');
    const reply = await client.command(line(port));
    t.equal(reply.text, expected, `${line(port)} -> ${reply.text}`);
    const { codes, data } = await retrOverActive(client, accepted);
    t.same(codes, [150, 226], `${verb}: 150, 226`);
    t.ok(data.equals(FILE), `${verb}: the file arrived intact (${data.length} bytes)`);
    const aimed = records(h.proxy, 'data-active').at(-1)?.target;
    t.equal(aimed, `127.0.0.1:${port}`, `${verb}: the proxy aimed at the control peer, not 0.0.0.0`);
  }
  t.same(
    records(h.proxy, 'port-unspecified').map((r) => r.target),
    records(h.proxy, 'data-active').map((r) => r.target),
    'a port-unspecified debug record for each',
  );
  t.same(records(h.proxy, 'port-nat-fixup'), [], 'not logged as a NAT fix-up');
  t.notOk(h.fake!.received.some((l) => /^(PORT|EPRT) .*(0,0,0,0|0\.0\.0\.0)/.test(l)), 'the server never saw the unspecified address');

  // Still refused: a privileged port, and another family's unspecified address.
  t.equal((await client.command('PORT 0,0,0,0,3,255')).text, '500 Illegal PORT command.', 'PORT 0,0,0,0 port 1023 refused');
  t.equal((await client.command('EPRT |1|0.0.0.0|80|')).text, '500 Illegal EPRT command.', 'EPRT 0.0.0.0 port 80 refused');
  t.equal((await client.command('EPRT |2|::|50000|')).text, '522 Network protocol not supported, use (1)', 'EPRT |2|::| on IPv4 control: 522');
  await client.quit();
  t.same(await settleLeaks(h.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

t.test('IPv6: EPRT |2|::|p| (lftp) means the client itself', { skip: await ipv6LoopbackMissing() }, async (t) => {
  const fake = await FakeFtpServer.start({ files: { 'f.bin': FILE } });
  let proxy: TestProxy | null = null;
  let client: FtpClient | null = null;
  t.teardown(async () => {
    client?.destroy();
    await withTimeout(fake.close(), 5000, 'fake server close').catch(() => {});
    if (proxy) await withTimeout(proxy.close(), 5000, 'proxy close').catch(() => {});
  });
  proxy = await startTestProxy(proxyYaml({
    upstreamHost: fake.host,
    upstreamPort: fake.port,
    listen: '[::1]:0',
    passivePorts: ports.take().text,
    extraYaml: FAST_TIMEOUTS_YAML,
  }));
  client = await FtpClient.connect('::1', proxy.port);
  t.equal((await client.login()).code, 230, 'logged in over IPv6');
  const { port, accepted } = await listenOnce(t, '::1');
  const reply = await client.command(`EPRT |2|::|${port}|`);
  t.equal(reply.text, '200 EPRT command successful.', `EPRT |2|::|${port}| -> ${reply.text}`);
  const { codes, data } = await retrOverActive(client, accepted);
  t.same(codes, [150, 226], '150, 226');
  t.ok(data.equals(FILE), `the file arrived intact (${data.length} bytes)`);
  t.equal(records(proxy, 'data-active').at(-1)?.target, `::1:${port}`, 'the proxy aimed at the control peer ::1');
  t.equal(records(proxy, 'port-unspecified').length, 1, 'a port-unspecified debug record');
  t.same(records(proxy, 'port-nat-fixup'), [], 'not logged as a NAT fix-up');
  t.equal((await client.command('EPRT |2|::|1023|')).text, '500 Illegal EPRT command.', 'EPRT |2|::| port 1023 refused');
  await client.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});
