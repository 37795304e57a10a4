/**
 * Real clients (curl, lftp, tnftp, ftplib) through the proxy to a real vsftpd on loopback,
 * in every client mode and every upstream dataMode, both directions, sha256 compared.
 * vsftpd advertises 127.0.0.9 (pasv_address) where nobody listens, so a client that used the
 * server's 227 address unchanged would fail: the proxy's rewrite is what makes these pass.
 */
import t from 'tap';
import { mkdtempSync, rmSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { proxyYaml, startTestProxy, nextPortRange, type TestProxy } from '../helpers/proxy.js';
import { CLIENT_MODES, MODE_VERB, sha256File, transfer, writeRandomFile, type ClientName } from '../helpers/clients.js';

const FILE_BYTES = 3 * 1024 * 1024 + 17;
const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  let localDir: string;
  let sourceHash: string;
  t.before(async () => {
    vsftpd = await startVsftpd({ pasvAddress: '127.0.0.9' });
    sourceHash = writeRandomFile(join(vsftpd.root, 'source.bin'), FILE_BYTES);
    localDir = mkdtempSync(join(tmpdir(), 'ftpnp-clients-'));
    chmodSync(localDir, 0o755);
  });
  t.teardown(async () => {
    await vsftpd?.stop();
    if (localDir) rmSync(localDir, { recursive: true, force: true });
  });

  for (const dataMode of ['passive', 'active', 'mirror'] as const) {
    t.test(`upstream dataMode ${dataMode}`, async (t) => {
      const proxy: TestProxy = await startTestProxy(proxyYaml({
        upstreamHost: vsftpd.host,
        upstreamPort: vsftpd.port,
        dataMode,
        level: 'debug',
        ...(dataMode === 'passive' ? {} : { activePorts: nextPortRange(10) }),
      }), { teardown: t });
      const serverLogStart = vsftpd.protocolLog().length;
      const endpoint = { host: proxy.host, port: proxy.port, user: vsftpd.user, password: vsftpd.password, activeAddress: '127.0.0.1' };
      for (const client of Object.keys(CLIENT_MODES) as ClientName[]) {
        for (const mode of CLIENT_MODES[client]) {
          t.test(`${client} ${mode}`, async (t) => {
            const tag = `${dataMode}-${client}-${mode}`;
            const logsBefore = proxy.logs().length;
            const downloaded = join(localDir, `${tag}.down`);
            const got = await transfer(client, mode, endpoint, 'get', 'source.bin', downloaded);
            t.equal(got.code, 0, `download exits 0 (${got.stderr.trim().slice(0, 300)})`);
            t.equal(sha256File(downloaded), sourceHash, 'downloaded file intact');

            const uploadName = `${tag}.up`;
            const put = await transfer(client, mode, endpoint, 'put', uploadName, downloaded);
            t.equal(put.code, 0, `upload exits 0 (${put.stderr.trim().slice(0, 300)})`);
            t.equal(sha256File(join(vsftpd.root, uploadName)), sourceHash, 'uploaded file intact');
            // The client really used the mode under test (a silent fallback would hide a bug).
            const verbs = proxy.logs().slice(logsBefore).filter((r) => r.event === 'command').map((r) => String(r.command).split(' ')[0]);
            t.ok(verbs.includes(MODE_VERB[mode]), `client sent ${MODE_VERB[mode]} (saw ${[...new Set(verbs)].join(' ')})`);
          });
        }
      }
      t.test('what the proxy sent upstream matches the dataMode', async (t) => {
        const log = vsftpd.protocolLog().slice(serverLogStart);
        const sentPort = /FTP command: Client "127\.0\.0\.1", "PORT 127,0,0,1,\d+,\d+"/.test(log);
        const sentEpsv = /FTP command: Client "127\.0\.0\.1", "EPSV"/.test(log);
        const sentEprtOrPasv = /FTP command: Client "127\.0\.0\.1", "(EPRT|PASV)/.test(log);
        t.notOk(sentEprtOrPasv, 'never PASV (server has EPSV) nor EPRT (IPv4 upstream)');
        t.equal(sentPort, dataMode !== 'passive', 'PORT toward vsftpd iff dataMode is active or mirror');
        t.equal(sentEpsv, dataMode !== 'active', 'EPSV toward vsftpd iff dataMode is passive or mirror');
      });
      t.test('transfer log lines and no password in logs', async (t) => {
        const transfers = proxy.logs().filter((r) => r.event === 'transfer');
        t.ok(transfers.length >= 2 * 13, `one log record per transfer (${transfers.length})`);
        t.ok(transfers.some((r) => r.direction === 'download' && r.bytes === FILE_BYTES), 'download bytes logged');
        t.ok(transfers.some((r) => r.direction === 'upload' && r.bytes === FILE_BYTES), 'upload bytes logged');
        t.notOk(proxy.logText().includes(vsftpd.password), 'password never logged');
      });
      t.test('no leaked sessions or ports', async (t) => {
        for (let i = 0; i < 50 && proxy.server.sessionCount > 0; i++) await new Promise((r) => setTimeout(r, 100));
        t.equal(proxy.server.sessionCount, 0, 'all sessions closed');
        t.same(proxy.server.poolStats().map((s) => s.leased), proxy.server.poolStats().map(() => 0), 'all ports released');
      });
    });
  }
}
