/**
 * Commands beyond plain RETR/STOR against a real vsftpd, and IPv6 clients bridged to an
 * IPv4-only vsftpd (RFC 6384-style EPSV/EPRT translation, protocol.md §2.5).
 */
import t from 'tap';
import net from 'node:net';
import { mkdtempSync, rmSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { proxyYaml, startTestProxy, nextPortRange, type TestProxy } from '../helpers/proxy.js';
import { sha256, sha256File, transfer, writeRandomFile } from '../helpers/clients.js';
import { run } from '../helpers/run.js';

const FTPLIB_COMMANDS = `
import ftplib, sys, io
host, port, user, pw = sys.argv[1:5]
f = ftplib.FTP()
f.connect(host, int(port), timeout=20)
f.login(user, pw)
print('FEAT', '|'.join(l.strip() for l in f.sendcmd('FEAT').split('\\n')[1:-1]))
names = f.nlst()
print('NLST', ','.join(sorted(names)))
lines = []
f.retrlines('LIST', lines.append)
print('LIST', len(lines))
try:
    f.retrlines('MLSD', lines.append)
    print('MLSD ok')
except ftplib.error_perm as e:
    print('MLSD', str(e)[:3])
print('NOOP', f.voidcmd('NOOP')[:3])
data = b'stou-data' * 1000
r = f.storbinary('STOU', io.BytesIO(data))
print('STOU', r[:3])
try:
    f.retrbinary('RETR does-not-exist', lambda b: None)
except ftplib.error_perm as e:
    print('MISSING', str(e)[:3])
print('LIST-AFTER', len([l for l in (lambda a: (f.retrlines('LIST', a.append), a)[1])([])]))
print('PASV-PASV', f.sendcmd('PASV')[:3], f.sendcmd('PASV')[:3])
print('EPSVALL', f.sendcmd('EPSV ALL')[:3])
try:
    f.sendcmd('PASV')
except ftplib.error_perm as e:
    print('PASV-AFTER-ALL', str(e)[:3])
print('EPSV-AFTER-ALL', f.sendcmd('EPSV')[:3])
for verb in ('LPSV', 'REIN', 'AUTH TLS'):
    try:
        f.sendcmd(verb)
    except ftplib.error_perm as e:
        print(verb.split()[0], str(e)[:3])
f.quit()
`;

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  let dir: string;
  let fileHash: string;
  t.before(async () => {
    vsftpd = await startVsftpd();
    fileHash = writeRandomFile(join(vsftpd.root, 'file.bin'), 1024 * 1024 + 5);
    dir = mkdtempSync(join(tmpdir(), 'ftpnp-cmd-'));
  });
  t.teardown(async () => {
    await vsftpd?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  t.test('LIST, NLST, MLSD, STOU, FEAT, 550 release, PASV twice, EPSV ALL, 502s', async (t) => {
    const proxy: TestProxy = await startTestProxy(proxyYaml({ upstreamHost: vsftpd.host, upstreamPort: vsftpd.port }), { teardown: t });
    const r = await run('python3', ['-c', FTPLIB_COMMANDS, proxy.host, String(proxy.port), vsftpd.user, vsftpd.password], { timeoutMs: 30000 });
    t.equal(r.code, 0, r.stderr.slice(-500));
    const out = r.stdout;
    t.match(out, /FEAT .*EPRT/, 'FEAT lists EPRT');
    t.match(out, /FEAT .*EPSV/, 'FEAT lists EPSV');
    t.match(out, /NLST .*file\.bin/, 'NLST over the relay');
    t.match(out, /LIST [1-9]/, 'LIST over the relay');
    t.match(out, /MLSD 500/, 'MLSD refused by vsftpd 3.0.3, passed through');
    t.match(out, /NOOP 200/, 'session in step after a refused transfer command');
    t.match(out, /STOU 226/, 'STOU completes');
    t.ok(readdirSync(vsftpd.root).some((name) => name.startsWith('STOU') || name.startsWith('stdin')), 'STOU created a file');
    t.match(out, /MISSING 550/, 'RETR of a missing file: 550');
    t.match(out, /LIST-AFTER [1-9]/, 'data channel works after a 550');
    t.match(out, /PASV-PASV 227 227/, 'two PASV in a row');
    t.match(out, /EPSVALL 200/, 'EPSV ALL accepted');
    t.match(out, /PASV-AFTER-ALL 501/, 'PASV after EPSV ALL: 501');
    t.match(out, /EPSV-AFTER-ALL 229/, 'EPSV after EPSV ALL still works');
    t.match(out, /LPSV 501/, 'LPSV after EPSV ALL: 501 (RFC 2428 §3)');
    t.match(out, /REIN 502/, 'REIN: 502');
    t.match(out, /AUTH 502/, 'AUTH: 502');
    t.notMatch(vsftpd.protocolLog(), /"(EPSV ALL|LPSV|REIN|AUTH TLS)"/, 'locally answered commands never reached vsftpd');
    for (let i = 0; i < 50 && proxy.server.sessionCount > 0; i++) await new Promise((res) => setTimeout(res, 100));
    t.equal(proxy.server.poolStats()[0]!.leased, 0, 'every relay port released (two PASV, a 550, EPSV ALL)');
  });

  t.test('IPv6 client, IPv4-only vsftpd: EPSV and EPRT |2| bridged', async (t) => {
    const proxy: TestProxy = await startTestProxy(proxyYaml({ upstreamHost: vsftpd.host, upstreamPort: vsftpd.port, listen: '[::1]:0' }), { teardown: t });
    const endpoint = { host: '::1', port: proxy.port, user: vsftpd.user, password: vsftpd.password, activeAddress: '::1' };
    for (const mode of ['epsv', 'eprt'] as const) {
      const local = join(dir, `v6-${mode}.bin`);
      const got = await transfer('curl', mode, endpoint, 'get', 'file.bin', local);
      t.equal(got.code, 0, `curl ${mode} over IPv6 ${got.stderr}`);
      t.equal(sha256File(local), fileHash, `${mode} download intact`);
      const put = await transfer('curl', mode, endpoint, 'put', `v6-${mode}.up`, local);
      t.equal(put.code, 0, `curl ${mode} upload over IPv6 ${put.stderr}`);
      t.equal(sha256(readFileSync(join(vsftpd.root, `v6-${mode}.up`))), fileHash, `${mode} upload intact`);
    }
    const pasv = await run('python3', ['-c', `
import ftplib, sys
f = ftplib.FTP(); f.connect('::1', ${proxy.port}, timeout=10); f.login('${vsftpd.user}', '${vsftpd.password}')
for cmd in ('PASV', 'EPSV 1', 'EPRT |1|127.0.0.1|5000|', 'PORT 127,0,0,1,20,0'):
    try:
        print(cmd.split()[0], f.sendcmd(cmd))
    except ftplib.Error as e:
        print(cmd.split()[0], str(e))
f.quit()
`], { timeoutMs: 20000 });
    t.match(pasv.stdout, /PASV 425 Use EPSV on an IPv6 connection\./, 'PASV on IPv6: 425, never 0,0,0,0');
    t.match(pasv.stdout, /EPSV 522 Network protocol not supported, use \(2\)/, 'EPSV 1 on IPv6: 522 use (2)');
    t.match(pasv.stdout, /EPRT 522 Network protocol not supported, use \(2\)/, 'EPRT |1| on IPv6: 522 use (2)');
    t.match(pasv.stdout, /PORT 425/, 'PORT on IPv6 refused');
  });

  t.test('IPv4 client, IPv6-only vsftpd: PASV/PORT bridged to EPSV/EPRT |2| upstream', async (t) => {
    const v6 = await startVsftpd({ listenAddress: '::1' });
    t.teardown(() => v6.stop());
    const hash = writeRandomFile(join(v6.root, 'v6.bin'), 512 * 1024 + 9);
    for (const dataMode of ['passive', 'active'] as const) {
      const proxy: TestProxy = await startTestProxy(proxyYaml({ upstreamHost: '::1', upstreamPort: v6.port, dataMode, ...(dataMode === 'active' ? { activePorts: nextPortRange(5) } : {}) }), { teardown: t });
      const endpoint = { host: proxy.host, port: proxy.port, user: v6.user, password: v6.password, activeAddress: '127.0.0.1' };
      for (const mode of ['pasv', 'port'] as const) {
        const local = join(dir, `v4to6-${dataMode}-${mode}.bin`);
        const got = await transfer('curl', mode, endpoint, 'get', 'v6.bin', local);
        t.equal(got.code, 0, `${dataMode}/${mode}: curl exits 0 ${got.stderr}`);
        t.equal(sha256File(local), hash, `${dataMode}/${mode}: download intact`);
      }
    }
    const log = v6.protocolLog();
    t.match(log, /"EPSV"/, 'EPSV toward the IPv6 server');
    t.match(log, /"EPRT \|2\|::1\|\d+\|"/, 'EPRT |2| toward the IPv6 server in active mode');
  });

  t.test('client closes without QUIT (FIN): no stray 421, no warning', async (t) => {
    const proxy: TestProxy = await startTestProxy(proxyYaml({ upstreamHost: vsftpd.host, upstreamPort: vsftpd.port }), { teardown: t });
    const socket = net.connect({ host: proxy.host, port: proxy.port });
    let received = '';
    socket.on('data', (d) => {
      received += d.toString('latin1');
      const lines = received.split('\r\n').filter(Boolean).length;
      if (lines === 1) socket.write(`USER ${vsftpd.user}\r\n`);
      if (lines === 2) socket.write(`PASS ${vsftpd.password}\r\n`);
      if (lines === 3) socket.end('NOOP\r\n');
    });
    await new Promise<void>((resolve, reject) => {
      socket.on('close', () => resolve());
      socket.on('error', reject);
      setTimeout(() => reject(new Error(`no close; got ${received}`)), 10000);
    });
    t.match(received, /200 NOOP ok\.\r\n$/, 'the last thing the client read is the NOOP reply');
    t.notMatch(received, /421/, 'no 421 after the client itself closed');
    t.notOk(proxy.logs().some((r) => r.event === 'upstream-closed'), 'no upstream-closed warning');
  });
}
