/**
 * PASV, EPSV or PORT sent while a transfer runs (issue #10, defect 2), against a real vsftpd.
 * vsftpd reads no command during a transfer; straight to it a client gets the transfer's
 * 226 and then the 227. The proxy used to send its own EPSV toward vsftpd at once, got no
 * answer, and after upstreamReplySeconds told the client "421 ... server does not answer",
 * killing the running download. Here upstreamReplySeconds is 2 and the client holds the
 * download for 4 s before reading it, so the old behaviour fails every time (with room for a
 * loaded machine: the proxy's own EPSV after the 226 must still be answered within 2 s).
 */
import t from 'tap';
import net from 'node:net';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { proxyYaml, startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { sha256, writeRandomFile } from '../helpers/clients.js';
import { FtpClient, openData, parse227, parse229 } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';

const FILE_BYTES = 64 * 1024 * 1024;
const HOLD_MS = 4000;

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  let fileHash: string;
  t.before(async () => {
    vsftpd = await startVsftpd();
    fileHash = writeRandomFile(join(vsftpd.root, 'big.bin'), FILE_BYTES);
  });
  t.teardown(async () => {
    await vsftpd?.stop();
  });

  async function session(t: TapTest): Promise<{ proxy: TestProxy; client: FtpClient }> {
    const proxy = await startTestProxy(proxyYaml({
      upstreamHost: vsftpd.host,
      upstreamPort: vsftpd.port,
      extraYaml: ['    timeouts:', '      upstreamReplySeconds: 2'].join('\n'),
    }), { teardown: t });
    const client = await FtpClient.connect(proxy.host, proxy.port);
    t.teardown(() => client.destroy());
    t.equal((await client.readReply()).code, 220);
    t.equal((await client.command(`USER ${vsftpd.user}`)).code, 331);
    t.equal((await client.command(`PASS ${vsftpd.password}`)).code, 230);
    t.equal((await client.command('TYPE I')).code, 200);
    return { proxy, client };
  }

  /** Start RETR big.bin over PASV and leave the data unread; returns the data socket. */
  async function startDownload(t: TapTest, client: FtpClient): Promise<net.Socket> {
    const data = await openData('127.0.0.1', parse227(await client.command('PASV')).port);
    t.teardown(() => data.destroy());
    data.pause();
    client.send('RETR big.bin');
    t.equal((await client.readReply(5000)).code, 150, '150: the download runs');
    return data;
  }

  /** Hold the download, then read it all: the transfer must be whole and end with 226. */
  async function finishDownload(t: TapTest, client: FtpClient, data: net.Socket): Promise<void> {
    await delay(HOLD_MS);
    const result = await readAll(data, 30000);
    t.equal(result.outcome, 'end', 'the data connection ended cleanly');
    t.equal(result.data.length, FILE_BYTES, 'every byte arrived');
    t.equal(sha256(result.data), fileHash, 'sha256 matches');
    t.equal((await client.readReply(10000)).code, 226, 'then the 226 for the transfer');
  }

  for (const verb of ['PASV', 'EPSV'] as const) {
    t.test(`${verb} during a 64 MiB download: 226 first, then the ${verb === 'PASV' ? 227 : 229}, and the new channel works`, async (t) => {
      const { proxy, client } = await session(t);
      const data = await startDownload(t, client);
      client.send(verb);
      await finishDownload(t, client, data);
      const reply = await client.readReply(10000);
      t.equal(reply.code, verb === 'PASV' ? 227 : 229, `then the ${verb} reply (${reply.text})`);
      const port = verb === 'PASV' ? parse227(reply).port : parse229(reply);
      const second = await openData('127.0.0.1', port);
      t.teardown(() => second.destroy());
      const listing = readAll(second, 10000);
      t.equal((await client.command('NLST', 10000)).code, 226, 'a listing over the new channel');
      t.match((await listing).data.toString(), /big\.bin/, 'the listing arrived');
      t.notOk(proxy.logs().some((r) => r.event === 'upstream-timeout'), 'the proxy never gave up on the server');
      t.equal((await client.command('QUIT')).code, 221);
    });
  }

  t.test('PORT during a 64 MiB download: 226 first, then 200, and the proxy connects back for the next transfer', async (t) => {
    const { proxy, client } = await session(t);
    const listener = net.createServer();
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
    t.teardown(() => listener.close());
    const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
    const lport = (listener.address() as net.AddressInfo).port;
    const data = await startDownload(t, client);
    client.send(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`);
    await finishDownload(t, client, data);
    t.equal((await client.readReply(10000)).code, 200, 'then 200 for PORT');
    client.send('NLST');
    const back = await accepted;
    t.teardown(() => back.destroy());
    const listing = readAll(back, 10000);
    t.equal((await client.readReply(10000)).code, 150);
    t.equal((await client.readReply(10000)).code, 226);
    t.match((await listing).data.toString(), /big\.bin/, 'the listing arrived over the active channel');
    t.notOk(proxy.logs().some((r) => r.event === 'upstream-timeout'), 'the proxy never gave up on the server');
    t.equal((await client.command('QUIT')).code, 221);
  });
}
