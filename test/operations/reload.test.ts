/**
 * Reload (README "Reload and shutdown"), against a real vsftpd:
 * - in-process `server.reload()` while a session is in the middle of a slow 32 MiB download:
 *   new sessions get relay ports from the new passivePorts range, the running transfer
 *   completes with the right sha256 and its session keeps its old settings;
 * - the built CLI on SIGHUP: an invalid file is rejected (`reload-rejected` with every issue)
 *   and the proxy keeps serving; a valid changed file is applied (`reloaded`);
 * - the built CLI on SIGHUP with `tls:` on the listener: a key file rewritten with garbage or
 *   with another certificate's key is rejected, the running config stays, nothing logs the key.
 * Relay ports 39000-39999 belong to this file.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type net from 'node:net';
import { freePort, startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { PortBlocks } from '../helpers/fake-server.js';
import { FtpClient, openData, parse227 } from '../helpers/ftp-client.js';
import { delay, withTimeout } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { sha256, writeRandomFile } from '../helpers/clients.js';
import { inRange, opsYaml, spawnCli, takeFreeRange } from '../helpers/ops.js';
import { startTestProxy } from '../helpers/proxy.js';
import { validateConfigText } from '../../src/config/load.js';
import { makeTestPki, opensslUnavailable } from '../helpers/tls.js';

const ports = new PortBlocks(39000);
const BIG_BYTES = 32 * 1024 * 1024;
const SMALL_BYTES = 100 * 1024 + 3;

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  let bigHash: string;
  let smallHash: string;
  let dir: string;
  t.before(async () => {
    vsftpd = await startVsftpd();
    bigHash = writeRandomFile(join(vsftpd.root, 'big.bin'), BIG_BYTES);
    smallHash = writeRandomFile(join(vsftpd.root, 'small.bin'), SMALL_BYTES);
    dir = mkdtempSync(join(tmpdir(), 'ftpnp-reload-'));
  });
  t.teardown(async () => {
    await vsftpd?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  async function login(t: TapTest, host: string, port: number): Promise<FtpClient> {
    const client = await FtpClient.connect(host, port);
    t.teardown(() => client.destroy());
    const reply = await client.login(vsftpd.user, vsftpd.password);
    if (reply.code !== 230) throw new Error(`login failed: ${reply.text}`);
    if ((await client.command('TYPE I')).code !== 200) throw new Error('TYPE I failed');
    return client;
  }

  /** PASV + RETR small.bin over `client`; returns the relay port used. */
  async function retrSmall(t: TapTest, client: FtpClient): Promise<number> {
    const pasv = await client.command('PASV');
    t.equal(pasv.code, 227, 'PASV');
    const port = parse227(pasv).port;
    const data = await openData('127.0.0.1', port);
    t.teardown(() => data.destroy());
    const download = readAll(data, 10000);
    t.equal((await client.command('RETR small.bin', 10000)).code, 226, 'RETR small.bin: 226');
    const result = await download;
    t.equal(sha256(result.data), smallHash, 'small.bin sha256');
    return port;
  }

  t.test('in-process reload during a slow 32 MiB download: new ports for new sessions, the old transfer is untouched', async (t) => {
    const oldRange = await takeFreeRange(ports);
    const newRange = await takeFreeRange(ports);
    const listenPort = await freePort();
    const yaml = (range: string): string =>
      opsYaml({ name: 'rl', listen: `127.0.0.1:${listenPort}`, upstreamPort: vsftpd.port, passivePorts: range, admin: null });
    const proxy = await startTestProxy(yaml(oldRange), { teardown: t });

    const s1 = await login(t, proxy.host, proxy.port);
    const pasv = await s1.command('PASV');
    t.equal(pasv.code, 227);
    const oldPort = parse227(pasv).port;
    t.ok(inRange(oldPort, oldRange), `first session's relay port ${oldPort} in ${oldRange}`);
    const data: net.Socket = await openData('127.0.0.1', oldPort);
    t.teardown(() => data.destroy());
    const hash = createHash('sha256');
    let received = 0;
    let stalled = false;
    let resolveSome!: () => void;
    const gotSome = new Promise<void>((resolve) => (resolveSome = resolve));
    data.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      received += chunk.length;
      if (received >= 2 * 1024 * 1024 && !stalled) {
        stalled = true;
        data.pause(); // a slow reader: the transfer stalls mid-way
        resolveSome();
      }
    });
    const ended = new Promise<string>((resolve) => {
      data.once('end', () => {
        data.end();
        resolve('end');
      });
      data.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
    });
    s1.send('RETR big.bin');
    t.equal((await s1.readReply(5000)).code, 150, '150: download running');
    await withTimeout(gotSome, 10000, 'first 2 MiB');

    const result = await proxy.server.reload(validateConfigText(yaml(newRange), 'reload'));
    t.same(result, { added: [], removed: [], updated: ['rl'] }, 'listener updated in place');
    await delay(200);
    t.ok(received < BIG_BYTES, `transfer still mid-way after the reload (${received} of ${BIG_BYTES} bytes)`);
    t.same(
      proxy.server.poolStats().map((p) => p.size),
      [4],
      'one passive pool of the new size',
    );

    const s2 = await login(t, proxy.host, proxy.port);
    const newPort = await retrSmall(t, s2);
    t.ok(inRange(newPort, newRange), `new session's relay port ${newPort} in the new range ${newRange}`);
    await s2.quit();

    data.resume();
    t.equal(await withTimeout(ended, 30000, 'big download end'), 'end', 'the old transfer ended cleanly');
    t.equal(received, BIG_BYTES, 'every byte of the old transfer');
    t.equal(hash.digest('hex'), bigHash, 'sha256 of the old transfer matches');
    const done = await s1.readReply(10000);
    t.equal(done.code, 226, `old session: 226 (${done.text})`);
    t.equal((await s1.command('NOOP')).code, 200, 'old session still answers');
    const again = await s1.command('PASV');
    t.equal(again.code, 227);
    t.ok(inRange(parse227(again).port, oldRange), `old session keeps its old settings: PASV port ${parse227(again).port} in ${oldRange}`);
    await s1.quit();
    const transfers = proxy.logs().filter((r) => r.event === 'transfer');
    t.ok(transfers.some((r) => r.bytes === BIG_BYTES && r.result === 'ok'), 'the old transfer logged as ok with every byte');
  });

  t.test('in-process reload of the ACL and limits: new connections see them, open sessions are untouched', async (t) => {
    const range = await takeFreeRange(ports);
    const listenPort = await freePort();
    const base = { name: 'rl-acl', listen: `127.0.0.1:${listenPort}`, upstreamPort: vsftpd.port, passivePorts: range, admin: null } as const;
    const proxy = await startTestProxy(opsYaml(base), { teardown: t });
    const open = await login(t, proxy.host, proxy.port);
    const denyYaml = opsYaml({ ...base, lines: ['    acl:', '      deny: [127.0.0.1/32]', '    timeouts:', '      idleSeconds: 0.5'] });
    await proxy.server.reload(validateConfigText(denyYaml, 'reload'));
    const refused = await FtpClient.connect(proxy.host, proxy.port, { localAddress: '127.0.0.1' });
    t.teardown(() => refused.destroy());
    t.equal((await refused.readReply(3000)).text, '421 Service not available for your address.', 'a new connection from 127.0.0.1 is denied');
    const other = await FtpClient.connect(proxy.host, proxy.port, { localAddress: '127.0.0.2' });
    t.teardown(() => other.destroy());
    t.equal((await other.login(vsftpd.user, vsftpd.password)).code, 230, '127.0.0.2 is still admitted');
    const idle = await other.readReply(3000).catch(() => null);
    t.equal(idle?.text, '421 Timeout.', 'the new session runs with the new idleSeconds 0.5');
    await delay(800);
    t.equal((await open.command('NOOP')).code, 200, 'the session opened before the reload keeps its old ACL and idle timeout');
    const retrPort = await retrSmall(t, open);
    t.ok(inRange(retrPort, range), 'and still transfers');
    await open.quit();
  });

  t.test('CLI: SIGHUP with an invalid file is rejected and the proxy serves on; a valid change is applied', async (t) => {
    const listenPort = await freePort();
    const firstRange = await takeFreeRange(ports);
    const secondRange = await takeFreeRange(ports);
    const path = join(dir, 'proxy.yaml');
    const valid = (range: string): string =>
      opsYaml({ name: 'cli', listen: `127.0.0.1:${listenPort}`, upstreamPort: vsftpd.port, passivePorts: range, admin: null, drainSeconds: 0, level: 'info' });
    writeFileSync(path, valid(firstRange));
    const cli = spawnCli(t, path);
    const started = await cli.waitLog((r) => r.event === 'started', 10000);
    t.ok(started, `CLI started (stderr: ${cli.stderr().slice(0, 300)})`);

    const before = await login(t, '127.0.0.1', listenPort);
    t.pass('serving before the reload');

    writeFileSync(
      path,
      valid(firstRange).replace(`passivePorts: "${firstRange}"`, 'passivePorts: "9-1"').replace('    upstream:', '    bogus: 1\n    upstream:'),
    );
    process.kill(cli.pid, 'SIGHUP');
    const rejected = await cli.waitLog((r) => r.event === 'reload-rejected', 5000);
    t.ok(rejected, 'reload-rejected logged');
    const issues = (rejected?.issues ?? []) as Array<{ path: string; line: number; message: string }>;
    t.same(issues.map((i) => i.path).sort(), ['listeners[0].bogus', 'listeners[0].client.passivePorts'], `every error listed (${JSON.stringify(issues)})`);
    t.ok(issues.every((i) => i.line > 0), 'each with its line');
    t.notOk(cli.hasExited(), 'still running');
    t.equal((await before.command('NOOP')).code, 200, 'the open session is untouched');
    const during = await login(t, '127.0.0.1', listenPort);
    const port1 = await retrSmall(t, during);
    t.ok(inRange(port1, firstRange), `a new session still runs on the old configuration (port ${port1} in ${firstRange})`);
    await during.quit();

    writeFileSync(path, valid(secondRange));
    process.kill(cli.pid, 'SIGHUP');
    const reloaded = await cli.waitLog((r) => r.event === 'reloaded', 5000);
    t.ok(reloaded, 'reloaded logged');
    t.same(reloaded?.updated, ['cli'], 'listener cli updated');
    const after = await login(t, '127.0.0.1', listenPort);
    const port2 = await retrSmall(t, after);
    t.ok(inRange(port2, secondRange), `a new session uses the new range (port ${port2} in ${secondRange})`);
    await after.quit();
    await before.quit();

    process.kill(cli.pid, 'SIGTERM');
    const exit = await withTimeout(cli.exited, 10000, 'CLI exit');
    t.equal(exit.code, 0, 'exit 0 on SIGTERM');
  });

  const noOpenssl = opensslUnavailable();
  t.test('CLI: SIGHUP after the TLS key file is broken is rejected naming the file; the old config keeps serving', noOpenssl === null ? {} : { skip: noOpenssl }, async (t) => {
    const pki = makeTestPki();
    t.teardown(() => pki.cleanup());
    const listenPort = await freePort();
    const range = await takeFreeRange(ports);
    const certPath = join(dir, 'fullchain.pem');
    const keyPath = join(dir, 'privkey.pem');
    copyFileSync(pki.server.cert.path, certPath);
    copyFileSync(pki.server.key.path, keyPath);
    const path = join(dir, 'tls-proxy.yaml');
    // Explicit and not required: plain clients are still served (sessions do not use TLS yet).
    writeFileSync(path, opsYaml({
      name: 'tls', listen: `127.0.0.1:${listenPort}`, upstreamPort: vsftpd.port, passivePorts: range, admin: null, drainSeconds: 0, level: 'info',
      lines: ['    tls:', '      mode: explicit', '      cert: fullchain.pem', '      key: privkey.pem'],
    }));
    const cli = spawnCli(t, path);
    t.ok(await cli.waitLog((r) => r.event === 'started', 10000), `CLI started (stderr: ${cli.stderr().slice(0, 300)})`);
    const open = await login(t, '127.0.0.1', listenPort);

    const rejections = (): Record<string, unknown>[] => cli.logs().filter((r) => r.event === 'reload-rejected');
    const broken: [name: string, key: string, message: RegExp][] = [
      ['garbage', 'this is not a key\n', /privkey\.pem is not a PEM private key$/],
      ["another certificate's key", pki.otherServer.key.pem, /^the key in .*privkey\.pem does not match the certificate in .*fullchain\.pem$/],
    ];
    for (const [n, [name, key, message]] of broken.entries()) {
      writeFileSync(keyPath, key);
      process.kill(cli.pid, 'SIGHUP');
      t.ok(await cli.waitLog(() => rejections().length > n, 5000), `${name}: reload-rejected logged`);
      const issues = (rejections()[n]?.issues ?? []) as Array<{ path: string; line: number; message: string }>;
      t.same(issues.map((i) => [i.path, i.line]), [['listeners[0].tls.key', 15]], `${name}: the key, at its line`);
      t.match(issues[0]?.message, message, `${name}: the message says what is wrong`);
      t.ok(issues[0]?.message.includes(keyPath), `${name}: and names the file (${keyPath})`);
      t.notOk(cli.hasExited(), `${name}: still running`);
      t.equal((await open.command('NOOP')).code, 200, `${name}: the open session is untouched`);
      const fresh = await login(t, '127.0.0.1', listenPort);
      t.ok(inRange(await retrSmall(t, fresh), range), `${name}: new sessions are served on the running config`);
      await fresh.quit();
    }
    t.equal(cli.logs().filter((r) => r.event === 'reloaded').length, 0, 'nothing was applied');

    writeFileSync(keyPath, pki.server.key.pem);
    process.kill(cli.pid, 'SIGHUP');
    const reloaded = await cli.waitLog((r) => r.event === 'reloaded', 5000);
    t.same(reloaded?.updated, ['tls'], 'the repaired key is accepted');
    await open.quit();

    const everything = cli.stdout() + cli.stderr();
    t.notMatch(everything, /PRIVATE KEY/, 'no PEM key header in any log line');
    for (const pem of [pki.server.key.pem, pki.otherServer.key.pem]) {
      t.notOk(everything.includes(pem.split('\n')[1]!), 'no key body in any log line');
    }
    process.kill(cli.pid, 'SIGTERM');
    t.equal((await withTimeout(cli.exited, 10000, 'CLI exit')).code, 0, 'exit 0 on SIGTERM');
  });
}
