/**
 * PROXY protocol admission on the control port (README "Behind an L4 load balancer"), against a
 * real vsftpd: the header is read before the 220, its source is the client (logs, the PORT
 * bounce check), its destination is what `advertise: auto` puts into 227. LOCAL headers are
 * closed quietly; hostile or missing headers are closed and counted (reason proxy-protocol).
 *
 * Network safety: the header names 198.51.100.7 (TEST-NET-2) as the client. `PORT` to that
 * address is only answered (200); no transfer command ever follows it, so the proxy never
 * dials a non-loopback address. PASV is sent afterwards to drop the pending active channel.
 * Relay ports 37000-37999 belong to this file.
 */
import t from 'tap';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { PortBlocks } from '../helpers/fake-server.js';
import { FtpClient, parse227 } from '../helpers/ftp-client.js';
import { delay, waitFor } from '../helpers/async.js';
import type { TapTest } from '../helpers/tap.js';
import { inRange, opsYaml, probe, probeClosed, takeFreeRange } from '../helpers/ops.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { encodeProxyHeaderV1, encodeProxyHeaderV2 } from '../../src/control/proxy-protocol.js';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { Duplex } from 'node:stream';
import { makeTestPki } from '../helpers/tls.js';

const ports = new PortBlocks(37000);
const CLIENT = '198.51.100.7';
const DIALLED = '203.0.113.10';
const V1_HEADER = `PROXY TCP4 ${CLIENT} ${DIALLED} 51515 21\r\n`;

function ppLines(accept: string, from: string, timeoutSeconds = 0.5): string[] {
  return ['    proxyProtocol:', `      accept: ${accept}`, `      from: [${from}]`, `      timeoutSeconds: ${timeoutSeconds}`];
}

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  t.before(async () => {
    vsftpd = await startVsftpd();
  });
  t.teardown(async () => {
    await vsftpd?.stop();
  });

  /** CONNECT lines in vsftpd's protocol log: control connections that reached the server. */
  const upstreamConnects = (): number => (vsftpd.protocolLog().match(/CONNECT: Client/g) ?? []).length;

  async function ppProxy(t: TapTest, accept: string, from: string, name = 'pp'): Promise<{ proxy: TestProxy; range: string }> {
    const range = await takeFreeRange(ports);
    const proxy = await startTestProxy(opsYaml({ name, upstreamPort: vsftpd.port, passivePorts: range, lines: ppLines(accept, from) }), { teardown: t });
    return { proxy, range };
  }

  /**
   * Send `header` in two pieces with a pause, check that nothing arrives before it is complete,
   * then that the 220 does; log in; PASV, PORT checks. `clientPort` is the header's source port.
   */
  async function fullSession(t: TapTest, proxy: TestProxy, range: string, header: Buffer, clientPort: number): Promise<void> {
    const connectsBefore = upstreamConnects();
    const client = await FtpClient.connect(proxy.host, proxy.port);
    t.teardown(() => client.destroy());
    const cut = Math.floor(header.length / 2);
    client.sendRaw(header.subarray(0, cut));
    await delay(250);
    t.equal(client.received.length, 0, 'no byte before the header is complete');
    t.notOk(proxy.logs().some((r) => r.event === 'session-start'), 'no session before the header is complete');
    t.equal(upstreamConnects(), connectsBefore, 'nothing reached the server before the header is complete');
    client.sendRaw(header.subarray(cut));
    const greeting = await client.readReply(5000);
    t.equal(greeting.code, 220, `220 after the header (${greeting.text})`);
    t.equal((await client.command(`USER ${vsftpd.user}`)).code, 331);
    t.equal((await client.command(`PASS ${vsftpd.password}`)).code, 230, 'logged in to vsftpd through the header');
    t.equal(upstreamConnects(), connectsBefore + 1, 'vsftpd logged exactly one CONNECT (the probe for "nothing reached the server" works)');
    t.notMatch(vsftpd.protocolLog(), new RegExp(CLIENT.replace(/\./g, '\\.')), 'vsftpd sees the proxy, never the header client');

    const start = proxy.logs().find((r) => r.event === 'session-start');
    t.equal(start?.client, `${CLIENT}:${clientPort}`, 'session logs name the header source as the client');
    t.equal(start?.dialled, `${DIALLED}:21`, 'and the header destination as dialled');

    const pasv = await client.command('PASV');
    t.equal(pasv.code, 227, 'PASV answered');
    const target = parse227(pasv);
    t.equal(target.host, DIALLED, `227 carries 203,0,113,10 (advertise auto = header destination): ${pasv.text}`);
    t.ok(inRange(target.port, range), `227 port ${target.port} within passivePorts ${range}`);

    const loopbackPort = await client.command('PORT 127,0,0,1,4,0');
    t.equal(loopbackPort.text, '500 Illegal PORT command.', 'PORT naming the LB side (127.0.0.1), not the client, is a bounce');
    const clientPortCmd = await client.command(`PORT ${CLIENT.split('.').join(',')},4,0`);
    t.equal(clientPortCmd.code, 200, `PORT naming the header's client is accepted (${clientPortCmd.text})`);
    // Never a transfer after that PORT: drop the pending active channel with PASV and leave.
    t.equal((await client.command('PASV')).code, 227, 'PASV replaces the pending active channel');
    t.equal((await client.command('QUIT')).code, 221, 'QUIT');
    t.ok(await waitFor(() => proxy.logs().some((r) => r.event === 'session-end'), 3000), 'session ended');
    const end = proxy.logs().find((r) => r.event === 'session-end');
    t.equal(end?.client, `${CLIENT}:${clientPort}`, 'session-end names the header client too');
    t.equal(proxy.logs().filter((r) => r.event === 'transfer').length, 0, 'no transfer happened');
    const m = await proxy.scrape();
    t.equal(m.get('ftpnp_rejections_total', { listener: proxy.name, reason: 'proxy-protocol' }), 0, 'nothing counted as rejected');
  }

  t.test('v1 header: 220 only after the header; client, 227 and PORT checks use the header', async (t) => {
    const { proxy, range } = await ppProxy(t, 'any', '127.0.0.1/32');
    await fullSession(t, proxy, range, Buffer.from(V1_HEADER, 'latin1'), 51515);
  });

  t.test('v2 header: the same', async (t) => {
    const { proxy, range } = await ppProxy(t, 'any', '127.0.0.1/32');
    const header = encodeProxyHeaderV2({ command: 'proxy', family: 4, source: { host: CLIENT, port: 51516 }, destination: { host: DIALLED, port: 21 } });
    await fullSession(t, proxy, range, header, 51516);
  });

  t.test('v2 header with accept v2 and a TLV (AWS VPC endpoint id)', async (t) => {
    const { proxy, range } = await ppProxy(t, 'v2', '127.0.0.1/32');
    const header = encodeProxyHeaderV2(
      { command: 'proxy', family: 4, source: { host: CLIENT, port: 51517 }, destination: { host: DIALLED, port: 21 } },
      [{ type: 0xea, value: Buffer.from('\x01vpce-0123456789abcdef0', 'latin1') }],
    );
    await fullSession(t, proxy, range, header, 51517);
  });

  t.test('commands in the same segment as the header are FTP: served after the 220', async (t) => {
    const { proxy } = await ppProxy(t, 'any', '127.0.0.1/32');
    const client = await FtpClient.connect(proxy.host, proxy.port);
    t.teardown(() => client.destroy());
    client.sendRaw(`${V1_HEADER}USER ${vsftpd.user}\r\nPASS ${vsftpd.password}\r\n`);
    t.equal((await client.readReply(5000)).code, 220, '220 first');
    t.equal((await client.readReply(5000)).code, 331, 'then the USER sent with the header');
    t.equal((await client.readReply(5000)).code, 230, 'then the PASS');
    t.equal((await client.command('QUIT')).code, 221);
  });

  t.test('implicit FTPS: the ClientHello in the same segment as the header; the handshake follows the header, the 220 the handshake', async (t) => {
    const pki = makeTestPki();
    t.teardown(() => pki.cleanup());
    const range = await takeFreeRange(ports);
    const lines = [...ppLines('v1', '127.0.0.1/32'), '    tls:', '      mode: implicit', `      cert: ${pki.server.cert.path}`, `      key: ${pki.server.key.path}`];
    const proxy = await startTestProxy(opsYaml({ name: 'ppimplicit', upstreamPort: vsftpd.port, passivePorts: range, lines }), { teardown: t });
    const connectsBefore = upstreamConnects();
    const tcp = net.connect(proxy.port, proxy.host);
    t.teardown(() => tcp.destroy());
    await once(tcp, 'connect');
    tcp.setNoDelay(true);
    // The TLS layer writes through this bridge: its first write (the ClientHello) goes out in
    // one write with the header, the way a load balancer forwards a client's first segment.
    let first = true;
    const bridge = new Duplex({
      write(chunk: Buffer, _encoding, done) {
        tcp.write(first ? Buffer.concat([Buffer.from(V1_HEADER), chunk]) : chunk, done);
        first = false;
      },
      read() {},
      final(done) {
        tcp.end();
        done();
      },
    });
    tcp.on('data', (chunk: Buffer) => bridge.push(chunk));
    tcp.on('end', () => bridge.push(null));
    const secure = tls.connect({ socket: bridge, host: '127.0.0.1', ca: pki.ca.cert.pem });
    t.teardown(() => secure.destroy());
    await Promise.race([once(secure, 'secureConnect'), once(secure, 'error').then(([err]) => Promise.reject(err as Error))]);
    t.ok(secure.authorized, 'the proxy\'s certificate verifies');
    const client = FtpClient.over(secure as unknown as net.Socket);
    t.equal((await client.readReply(5000)).code, 220, 'the greeting comes over TLS');
    t.equal(upstreamConnects(), connectsBefore + 1, 'the server was dialled once the handshake was done');
    t.equal((await client.command(`USER ${vsftpd.user}`)).code, 331);
    t.equal((await client.command(`PASS ${vsftpd.password}`)).code, 230);
    t.equal((await client.command('PBSZ 0')).code, 200, 'PBSZ answered on an implicit session');
    t.equal((await client.command('PROT P')).code, 200);
    const start = proxy.logs().find((r) => r.event === 'session-start' && r.listener === 'ppimplicit');
    t.match(String(proxy.logs().find((r) => r.event === 'tls-client')?.tlsVersion), /^TLSv1\.[23]$/, 'tls-client logged with its version');
    t.ok(start, 'session-start logged');
    t.equal((await client.command('QUIT')).code, 221);
    const end = await proxy.waitLog((r) => r.event === 'session-end');
    t.equal(end?.client, `${CLIENT}:51515`, 'the session is the header\'s client');
    t.match(String(end?.clientTls), /^TLSv1\.[23]$/, 'session-end says the client leg was TLS');
  });

  t.test('LOCAL headers (v2 LOCAL, v1 UNKNOWN) are closed quietly, nothing reaches the server', async (t) => {
    const { proxy } = await ppProxy(t, 'any', '127.0.0.1/32');
    const before = upstreamConnects();
    for (const [what, header] of [
      ['v2 LOCAL', encodeProxyHeaderV2({ command: 'local' })],
      ['v1 UNKNOWN', encodeProxyHeaderV1({ command: 'local' })],
    ] as const) {
      const p = await probe(t, proxy.host, proxy.port);
      p.write(header);
      const end = await probeClosed(p, 3000);
      t.ok(end, `${what}: closed`);
      t.equal(p.data().length, 0, `${what}: not a byte (no 220, no 421)`);
    }
    await delay(200);
    t.equal(upstreamConnects(), before, 'vsftpd saw no connection');
    t.equal(proxy.logs().filter((r) => r.event === 'session-start').length, 0, 'no session started');
    const m = await proxy.scrape();
    t.equal(m.get('ftpnp_sessions_total', { listener: 'pp' }), 0, 'no session counted');
    t.equal(m.get('ftpnp_rejections_total', { listener: 'pp', reason: 'proxy-protocol' }), 0, 'health checks are not rejections');
  });

  t.test('hostile headers are closed without a byte and counted as proxy-protocol', async (t) => {
    const { proxy } = await ppProxy(t, 'any', '127.0.0.1/32');
    const { proxy: untrusted } = await ppProxy(t, 'any', '10.0.0.0/8', 'pp-untrusted');
    const { proxy: v1only } = await ppProxy(t, 'v1', '127.0.0.1/32', 'pp-v1');
    const before = upstreamConnects();
    const v2 = encodeProxyHeaderV2({ command: 'proxy', family: 4, source: { host: CLIENT, port: 1 }, destination: { host: DIALLED, port: 21 } });
    const cases: Array<{ what: string; target: TestProxy; bytes: Buffer | null; minMs?: number }> = [
      { what: 'header from an untrusted sender', target: untrusted, bytes: Buffer.from(V1_HEADER, 'latin1') },
      { what: 'malformed (octet 999)', target: proxy, bytes: Buffer.from(`PROXY TCP4 198.51.100.999 ${DIALLED} 51515 21\r\n`, 'latin1') },
      { what: 'v1 without CR', target: proxy, bytes: Buffer.from(`PROXY TCP4 ${CLIENT} ${DIALLED} 51515 21\n`, 'latin1') },
      { what: 'truncated, then silence', target: proxy, bytes: Buffer.from(`PROXY TCP4 ${CLIENT} `, 'latin1'), minMs: 400 },
      { what: 'no header at all (plain USER)', target: proxy, bytes: Buffer.from('USER x\r\n', 'latin1') },
      { what: 'nothing at all', target: proxy, bytes: null, minMs: 400 },
      { what: 'v2 header on an accept: v1 listener', target: v1only, bytes: v2 },
    ];
    for (const c of cases) {
      const p = await probe(t, c.target.host, c.target.port);
      if (c.bytes) p.write(c.bytes);
      const end = await probeClosed(p, 3000);
      t.ok(end, `${c.what}: closed`);
      t.equal(p.data().length, 0, `${c.what}: not a byte received`);
      if (c.minMs !== undefined && end) t.ok(end.afterMs >= c.minMs, `${c.what}: closed at the header timeout, not before (${end.afterMs} ms)`);
      if (c.minMs === undefined && end) t.ok(end.afterMs < 1000, `${c.what}: closed at once (${end.afterMs} ms)`);
    }
    await delay(200);
    t.equal(upstreamConnects(), before, 'vsftpd saw no connection');
    for (const p of [proxy, untrusted, v1only]) {
      t.equal(p.logs().filter((r) => r.event === 'session-start').length, 0, `${p.name}: no session started`);
    }
    const counts = await Promise.all([proxy, untrusted, v1only].map(async (p) => (await p.scrape()).get('ftpnp_rejections_total', { listener: p.name, reason: 'proxy-protocol' })));
    t.same(counts, [5, 1, 1], 'each counted as proxy-protocol on its listener');
    const rejected = proxy.logs().filter((r) => r.event === 'rejected');
    t.equal(rejected.length, 5, 'each logged as rejected');
    t.ok(rejected.every((r) => r.limit === 'proxy-protocol' && /^127\.0\.0\.1:\d+$/.test(String(r.from))), 'with limit proxy-protocol and the sender');
    const untrustedLog = untrusted.logs().find((r) => r.event === 'rejected');
    t.match(String(untrustedLog?.err), /trusted/, `untrusted sender logged as such (${String(untrustedLog?.err)})`);
  });
}
