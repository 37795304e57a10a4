/**
 * Forward mode with TLS (issue #13 on top of #12): the client asks for AUTH TLS before it
 * names its server (the proxy answers it, the server is not known yet), then logs in as
 * `user@127.0.0.1:<port>`; the proxy speaks FTPS to a real vsftpd that requires it, and
 * verifies the server's certificate against the destination the client gave (no
 * `upstream.tls.servername` configured). Also a plain client through the same kind of proxy
 * to the FTPS-only server, and a certificate that does not name the destination.
 * Real lftp and Python ftplib (curl's `-u` cannot carry `user@host:port`).
 * Relay ports 6000-6999 belong to this file.
 */
import t from 'tap';
import { commandsMissing } from '../helpers/netns.js';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { sha256File, transfer, transferTls, writeRandomFile, type FtpsEndpoint } from '../helpers/clients.js';
import { makeTestPki, opensslUnavailable, type TestPki } from '../helpers/tls.js';
import { startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { PortBlocks, settleLeaks } from '../helpers/fake-server.js';
import { takeFreeRange } from '../helpers/ops.js';
import { run } from '../helpers/run.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(6000);
const FILE_BYTES = 300 * 1024;


const reason = vsftpdUnavailable() ?? opensslUnavailable() ?? commandsMissing(['lftp', 'python3']);
if (reason) {
  t.plan(0, reason);
} else {
  let pki: TestPki;
  let otherPki: TestPki;
  let ftps: VsftpdInstance;
  let localDir: string;
  let source: string;
  let sourceSha: string;

  t.before(async () => {
    pki = makeTestPki();
    otherPki = makeTestPki();
    ftps = await startVsftpd({ pasvAddress: null, ssl: { cert: pki.server.cert.path, key: pki.server.key.path, forceLogins: true, forceData: true, requireReuse: true } });
    localDir = mkdtempSync(join(tmpdir(), 'ftpnp-fwdtls-'));
    chmodSync(localDir, 0o755);
    source = join(localDir, 'source.bin');
    sourceSha = writeRandomFile(source, FILE_BYTES);
    spawnSync('cp', [source, join(ftps.root, 'remote.bin')]);
    spawnSync('chown', [`${ftps.user}:`, join(ftps.root, 'remote.bin')]);
  });
  t.teardown(async () => {
    await ftps?.stop();
    if (localDir) rmSync(localDir, { recursive: true, force: true });
    pki?.cleanup();
    otherPki?.cleanup();
  });

  async function forwardProxy(t: TapTest, clientTls: boolean | 'implicit', ca: string): Promise<TestProxy> {
    return startTestProxy([
      'log: { level: debug }',
      'listeners:',
      '  - name: fwdtls',
      '    listen: "127.0.0.1:0"',
      ...(clientTls ? [`    tls: { mode: ${clientTls === 'implicit' ? 'implicit' : 'explicit'}, cert: ${pki.server.cert.path}, key: ${pki.server.key.path} }`] : []),
      '    upstream:',
      '      forward: { allow: [127.0.0.1/32], ports: "1024-65535" }',
      `      tls: { mode: explicit, ca: ${ca} }`,
      '    client:',
      `      passivePorts: "${await takeFreeRange(ports, 10)}"`,
      '    acl: { allow: [127.0.0.0/8] }',
      '',
    ].join('\n'), { teardown: t });
  }

  const endpointFor = (proxy: TestProxy): FtpsEndpoint => ({
    host: proxy.host,
    port: proxy.port,
    user: `${ftps.user}@127.0.0.1:${ftps.port}`,
    password: ftps.password,
    activeAddress: '127.0.0.1',
    caFile: pki.ca.cert.path,
    timeoutMs: 30000,
  });

  const failure = (r: { code: number | null; timedOut: boolean; stdout: string; stderr: string }): string => (r.code === 0 ? '' : ` (${r.timedOut ? 'timed out' : `code ${r.code}`}: ${(r.stderr + r.stdout).trim().slice(-300)})`);

  t.test('AUTH TLS before USER user@host:port, then FTPS to the server verified by the address the client named', async (t) => {
    const proxy = await forwardProxy(t, true, pki.ca.cert.path);
    const e = endpointFor(proxy);
    for (const [client, mode] of [['lftp', 'pasv'], ['lftp', 'port'], ['ftplib', 'pasv'], ['ftplib', 'port']] as const) {
      const label = `${client}-${mode}`;
      const local = join(localDir, `${label}.down`);
      const get = await transferTls(client, 'explicit', mode, e, 'get', 'remote.bin', local);
      t.equal(get.code, 0, `${label}: download exits 0${failure(get)}`);
      t.equal(sha256File(local), sourceSha, `${label}: download intact`);
      const put = await transferTls(client, 'explicit', mode, e, 'put', `${label}.up`, source);
      t.equal(put.code, 0, `${label}: upload exits 0${failure(put)}`);
      t.equal(sha256File(join(ftps.root, `${label}.up`)), sourceSha, `${label}: upload intact`);
    }
    const tlsServer = proxy.logs().filter((r) => r.event === 'tls-server');
    t.ok(tlsServer.length >= 8, `the server leg was TLS every time (${tlsServer.length})`);
    const ends = proxy.logs().filter((r) => r.event === 'session-end');
    t.ok(ends.length > 0 && ends.every((r) => r.clientTls !== null && r.serverTls !== null && r.upstream === `127.0.0.1:${ftps.port}`), 'every session: TLS on both legs, the chosen server named');
    t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
  });

  t.test('implicit FTPS front: the proxy\'s own 220 goes out only after the handshake, then the forward login', async (t) => {
    const proxy = await forwardProxy(t, 'implicit', pki.ca.cert.path);
    const e = endpointFor(proxy);
    for (const [client, mode] of [['lftp', 'pasv'], ['ftplib', 'port']] as const) {
      const label = `implicit-${client}-${mode}`;
      const local = join(localDir, `${label}.down`);
      const get = await transferTls(client, 'implicit', mode, e, 'get', 'remote.bin', local);
      t.equal(get.code, 0, `${label}: download exits 0${failure(get)}`);
      t.equal(sha256File(local), sourceSha, `${label}: download intact`);
    }
    t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
  });

  t.test('a plain client through forward mode to the FTPS-only server', async (t) => {
    const proxy = await forwardProxy(t, false, pki.ca.cert.path);
    const e = endpointFor(proxy);
    for (const [client, mode] of [['lftp', 'port'], ['ftplib', 'port'], ['ftplib', 'pasv']] as const) {
      const label = `plain-${client}-${mode}`;
      const local = join(localDir, `${label}.down`);
      const get = await transfer(client, mode, e, 'get', 'remote.bin', local);
      t.equal(get.code, 0, `${label}: download exits 0${failure(get)}`);
      t.equal(sha256File(local), sourceSha, `${label}: download intact`);
    }
    t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
  });

  t.test('a server certificate from another CA: the login is refused with 530 and the reason, the session stays usable', async (t) => {
    const proxy = await forwardProxy(t, false, otherPki.ca.cert.path);
    const script = [
      'import ftplib, sys',
      `f = ftplib.FTP(); f.connect('127.0.0.1', ${proxy.port}, timeout=20); print(f.getwelcome())`,
      'try:',
      `    f.sendcmd('USER ${ftps.user}@127.0.0.1:${ftps.port}')`,
      'except ftplib.error_perm as e:',
      '    print("REFUSED", e)',
      'print(f.sendcmd("NOOP"))',
      'f.quit()',
    ].join('\n');
    // Asynchronously: the proxy runs in this process.
    const result = await run('python3', ['-c', script], { timeoutMs: 30000 });
    t.equal(result.code, 0, `the client ends cleanly${result.stderr ? `: ${result.stderr.slice(-300)}` : ''}`);
    t.match(result.stdout, /REFUSED 530 Cannot connect to 127\.0\.0\.1:\d+: .*certificate/i, result.stdout);
    t.match(result.stdout, /200 NOOP ok\./, 'the session goes on');
    t.ok(proxy.logs().some((r) => r.event === 'upstream-tls-failed'), 'logged upstream-tls-failed');
    t.notMatch(ftps.protocolLog(), new RegExp(`USER ${ftps.user}@`), 'the server never saw the destination in USER');
    t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
  });
}
