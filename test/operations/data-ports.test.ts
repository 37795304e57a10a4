/**
 * PROXY headers on the data ports (`proxyProtocol.dataPorts: true`) with every relay port kept
 * bound (`client.bindAllPassivePorts: true`), against a real vsftpd (README "Behind an L4 load
 * balancer"): ports are bound from the start and a connection nobody expects is closed at once
 * (LB health check); on a leased port the header's source, not the socket peer, is checked
 * against the session's client; a LOCAL header or no header is refused; the right header gets
 * the data of a full RETR.
 *
 * Network safety: the session's client is 198.51.100.7 only in PROXY headers; every socket is
 * between loopback addresses and the proxy never dials the client (passive mode only).
 * Relay ports 38000-38999 belong to this file.
 */
import t from 'tap';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { PortBlocks } from '../helpers/fake-server.js';
import { FtpClient, openData, parse227 } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { sha256, writeRandomFile } from '../helpers/clients.js';
import { inRange, opsYaml, probe, probeClosed, rangePorts, takeFreeRange } from '../helpers/ops.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { encodeProxyHeaderV1, encodeProxyHeaderV2 } from '../../src/control/proxy-protocol.js';

const ports = new PortBlocks(38000);
const CLIENT = '198.51.100.7';
const OTHER = '198.51.100.9';
const DIALLED = '203.0.113.10';
const FILE_BYTES = 3 * 1024 * 1024 + 17;

function header(version: 1 | 2, source: string, sourcePort: number, destinationPort: number): Buffer {
  const init = { command: 'proxy', family: 4, source: { host: source, port: sourcePort }, destination: { host: DIALLED, port: destinationPort } } as const;
  return version === 1 ? encodeProxyHeaderV1(init) : encodeProxyHeaderV2(init);
}

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  let fileHash: string;
  t.before(async () => {
    vsftpd = await startVsftpd();
    fileHash = writeRandomFile(join(vsftpd.root, 'file.bin'), FILE_BYTES);
  });
  t.teardown(async () => {
    await vsftpd?.stop();
  });

  async function lbProxy(t: TapTest): Promise<{ proxy: TestProxy; range: string }> {
    const range = await takeFreeRange(ports);
    const proxy = await startTestProxy(
      opsYaml({
        name: 'nlb',
        upstreamPort: vsftpd.port,
        passivePorts: range,
        bindAllPassivePorts: true,
        lines: ['    proxyProtocol:', '      accept: any', '      from: [127.0.0.1/32]', '      timeoutSeconds: 1', '      dataPorts: true'],
      }),
      { teardown: t },
    );
    return { proxy, range };
  }

  /** Connect to a relay port, optionally send bytes, expect a close without a byte. */
  async function expectClosed(t: TapTest, port: number, bytes: Buffer | null, what: string, withinMs: number, localAddress = '127.0.0.1'): Promise<void> {
    let p;
    try {
      p = await probe(t, '127.0.0.1', port, { localAddress });
    } catch (err) {
      // The proxy may reset before Node reports the connect (an untrusted sender is reset at once).
      t.match((err as NodeJS.ErrnoException).code, 'ECONNRESET', `${what}: reset at once`);
      return;
    }
    t.pass(`${what}: connect to ${port} succeeds`);
    if (bytes) p.write(bytes);
    const end = await probeClosed(p, withinMs + 2000);
    t.ok(end, `${what}: closed`);
    if (!end) {
      t.comment(spawnSync('ss', ['-tanp'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => l.includes(`:${port}`)).join('\n'));
    }
    t.ok(end && end.afterMs <= withinMs, `${what}: closed within ${withinMs} ms (${end?.afterMs} ms)`);
    t.equal(p.data().length, 0, `${what}: no data`);
  }

  t.test('all relay ports are bound from the start; unleased ports close at once (health checks)', async (t) => {
    const { proxy, range } = await lbProxy(t);
    for (const port of rangePorts(range)) await expectClosed(t, port, null, `unleased port ${port}`, 500);
    const [port] = rangePorts(range);
    await expectClosed(t, port!, encodeProxyHeaderV2({ command: 'local' }), 'v2 LOCAL on an unleased port', 500);
    t.same(proxy.server.poolStats(), [{ listener: 'nlb', pool: 'passive', size: 4, leased: 0 }], 'nothing leased by the probes');
    t.equal(proxy.logs().filter((r) => r.event === 'passive-ports-unavailable').length, 0, 'every port bound');
  });

  t.test('leased port: strangers by header, LOCAL and header-less connections are refused; the client by header gets a full RETR', async (t) => {
    const { proxy, range } = await lbProxy(t);
    const client = await FtpClient.connect(proxy.host, proxy.port);
    t.teardown(() => client.destroy());
    client.sendRaw(header(1, CLIENT, 40001, 21));
    t.equal((await client.readReply(5000)).code, 220, 'greeting after the control header');
    t.equal((await client.command(`USER ${vsftpd.user}`)).code, 331);
    t.equal((await client.command(`PASS ${vsftpd.password}`)).code, 230);
    t.equal((await client.command('TYPE I')).code, 200);
    const pasv = await client.command('PASV');
    t.equal(pasv.code, 227);
    const target = parse227(pasv);
    t.equal(target.host, DIALLED, '227 advertises the header destination');
    t.ok(inRange(target.port, range), `relay port ${target.port} in ${range}`);
    const leased = target.port;

    // Other ports stay health-check-only while this one is leased.
    for (const port of rangePorts(range).filter((p) => p !== leased)) await expectClosed(t, port, null, `unleased port ${port}`, 500);

    await expectClosed(t, leased, header(1, OTHER, 40002, leased), `v1 header naming ${OTHER}`, 500);
    await expectClosed(t, leased, header(2, OTHER, 40003, leased), `v2 header naming ${OTHER}`, 500);
    await expectClosed(t, leased, encodeProxyHeaderV2({ command: 'local' }), 'v2 LOCAL on the leased port', 500);
    await expectClosed(t, leased, Buffer.from('hello', 'latin1'), 'no header, data at once', 500);
    await expectClosed(t, leased, null, 'no header, silence (header timeout 1 s)', 1600);
    await expectClosed(t, leased, header(2, CLIENT, 40005, leased), 'the right header from a sender outside proxyProtocol.from (127.0.0.2)', 500, '127.0.0.2');
    const strangers = proxy.logs().filter((r) => r.event === 'data-stranger');
    t.ok(strangers.some((r) => String(r.from).startsWith(`${OTHER}:`)), `the stranger by header is logged with its header address (${JSON.stringify(strangers.map((r) => r.from))})`);

    const data = await openData('127.0.0.1', leased);
    t.teardown(() => data.destroy());
    data.write(header(2, CLIENT, 40004, leased));
    const download = readAll(data, 20000);
    await delay(100);
    const retr = await client.command('RETR file.bin', 20000);
    t.equal(retr.code, 226, `226 (${retr.text})`);
    const result = await download;
    t.equal(result.outcome, 'end', 'data ended with a clean FIN');
    t.equal(result.data.length, FILE_BYTES, 'every byte');
    t.equal(sha256(result.data), fileHash, 'sha256 matches the file on vsftpd');
    const transfer = proxy.logs().find((r) => r.event === 'transfer');
    t.equal(transfer?.bytes, FILE_BYTES, 'transfer logged with the byte count');
    t.equal(transfer?.client, `${CLIENT}:40001`, 'transfer logged for the header client');
    await client.quit();
    const m = await proxy.scrape();
    t.ok((m.get('ftpnp_data_strangers_total', { listener: 'nlb' }) ?? 0) >= 2, 'strangers counted');
    t.equal(m.get('ftpnp_transfers_total', { listener: 'nlb', direction: 'download', result: 'ok' }), 1, 'the transfer counted as ok');
  });

  t.test('upload: header and the first data bytes in one segment, the server gets every byte', async (t) => {
    const { proxy } = await lbProxy(t);
    const client = await FtpClient.connect(proxy.host, proxy.port);
    t.teardown(() => client.destroy());
    client.sendRaw(header(2, CLIENT, 40011, 21));
    t.equal((await client.readReply(5000)).code, 220);
    t.equal((await client.command(`USER ${vsftpd.user}`)).code, 331);
    t.equal((await client.command(`PASS ${vsftpd.password}`)).code, 230);
    t.equal((await client.command('TYPE I')).code, 200);
    const pasv = await client.command('PASV');
    t.equal(pasv.code, 227);
    const port = parse227(pasv).port;
    const payload = randomBytes(1024 * 1024 + 11);
    const data = await openData('127.0.0.1', port);
    t.teardown(() => data.destroy());
    data.write(Buffer.concat([header(1, CLIENT, 40012, port), payload.subarray(0, 1000)]));
    const closed = readAll(data, 20000);
    client.send('STOR up.bin');
    t.equal((await client.readReply(5000)).code, 150, '150');
    data.end(payload.subarray(1000));
    t.equal((await client.readReply(20000)).code, 226, '226');
    await closed;
    t.equal(sha256(readFileSync(join(vsftpd.root, 'up.bin'))), sha256(payload), 'vsftpd stored exactly the payload (no header byte, nothing lost)');
    await client.quit();
  });
}
