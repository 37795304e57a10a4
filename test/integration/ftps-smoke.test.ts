import t from 'tap';
import { chmodSync, copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, type VsftpdInstance } from '../helpers/vsftpd.js';
import { sha256File, transferTls, writeRandomFile, type ClientMode, type FtpsClientName, type FtpsStyle } from '../helpers/clients.js';
import { makeTestPki, type TestPki } from '../helpers/tls.js';
import { proxyYaml, startTestProxy } from '../helpers/proxy.js';

let pki: TestPki; let plain: VsftpdInstance; let ftps: VsftpdInstance; let dir: string; let src: string; let hash: string;
t.before(async () => {
  pki = makeTestPki();
  plain = await startVsftpd({ pasvAddress: null });
  ftps = await startVsftpd({ pasvAddress: null, ssl: { cert: pki.server.cert.path, key: pki.server.key.path, debug: true } });
  dir = mkdtempSync(join(tmpdir(), 'ftpnp-smoke-')); chmodSync(dir, 0o755);
  src = join(dir, 'src.bin'); hash = writeRandomFile(src, 1 << 20);
  copyFileSync(src, join(plain.root, 'src.bin')); copyFileSync(src, join(ftps.root, 'src.bin'));
});
t.teardown(async () => { await plain?.stop(); await ftps?.stop(); pki?.cleanup(); rmSync(dir, { recursive: true, force: true }); });

const cases: Array<[FtpsStyle, FtpsClientName, ClientMode, boolean]> = [
  ['explicit', 'curl', 'epsv', false], ['explicit', 'lftp', 'pasv', false], ['explicit', 'ftplib', 'port', false], ['implicit', 'curl', 'epsv', false],
  ['explicit', 'curl', 'epsv', true], ['explicit', 'ftplib', 'pasv', true], ['explicit', 'lftp', 'port', true],
];
for (const [style, client, mode, tlsUp] of cases) {
  t.test(`${style} ${client} ${mode} upstream ${tlsUp ? 'tls' : 'plain'}`, async (t) => {
    const server = tlsUp ? ftps : plain;
    const proxy = await startTestProxy(proxyYaml({ upstreamHost: server.host, upstreamPort: server.port, extraYaml: [
      '    tls:', `      mode: ${style}`, `      cert: ${pki.server.cert.path}`, `      key: ${pki.server.key.path}`,
    ].join('\n') }).replace('      dataMode: passive', tlsUp ? `      dataMode: passive\n      tls: { mode: explicit, ca: ${pki.ca.cert.path} }` : '      dataMode: passive'), { teardown: t });
    const ep = { host: '127.0.0.1', port: proxy.port, user: server.user, password: server.password, activeAddress: '127.0.0.1', caFile: pki.ca.cert.path, timeoutMs: 30000 };
    const local = join(dir, `${style}-${client}-${mode}-${tlsUp}.down`);
    const r = await transferTls(client, style, mode, ep, 'get', 'src.bin', local);
    t.equal(r.code, 0, (r.stderr + r.stdout).slice(0, 500));
    t.equal(r.code === 0 ? sha256File(local) : '', hash);
    const r2 = await transferTls(client, style, mode, ep, 'put', `${style}-${client}-${mode}-${tlsUp}.up`, src);
    t.equal(r2.code, 0, (r2.stderr + r2.stdout).slice(0, 500));
    if (r.code !== 0 || r2.code !== 0) console.error(proxy.logs().slice(-30).map((l) => JSON.stringify(l)).join('\n'));
  });
}
