/**
 * `client.dataSourcePort` (issue #13, "Active data from port 20"): the proxy's data connections
 * to PORT/EPRT clients leave from that port, like vsftpd's connect_from_port_20, for firewalls
 * in front of legacy active-mode clients that admit nothing else.
 *
 * - Against a real vsftpd: each client's data listener sees the connection come from
 *   127.0.0.1:<dataSourcePort>; two sessions hold data connections from that port at once
 *   (libuv binds with SO_REUSEADDR: only the 4-tuple must be unique).
 * - The same client address and port twice while the first connection is open: the kernel
 *   refuses the 4-tuple (EADDRNOTAVAIL); the client gets a clear 425, the log says why, and
 *   the session stays usable.
 * - Without CAP_NET_BIND_SERVICE (the built CLI under `setpriv --bounding-set
 *   -net_bind_service`): a warning at start naming the capability, and a 425 per transfer.
 *
 * As root (CI) the port is the real 20; elsewhere a free high port and the fake server, so the
 * wiring is exercised everywhere. Network safety: loopback only.
 * Relay ports 9000-9999 belong to this file (below the ephemeral range and the test vsftpd's default passive ports, 41000+).
 */
import t from 'tap';
import net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FAST_TIMEOUTS_YAML, FakeFtpServer, PortBlocks, settleLeaks } from '../helpers/fake-server.js';
import { FtpClient } from '../helpers/ftp-client.js';
import { waitFor, withTimeout } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { proxyYaml, startTestProxy, type LogRecord, type TestProxy } from '../helpers/proxy.js';
import { startVsftpd, vsftpdUnavailable, freePort, type VsftpdInstance } from '../helpers/vsftpd.js';
import { sourcePortBindProblem } from '../../src/data/source-port.js';

const ports = new PortBlocks(9000);
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CLI = join(ROOT, 'dist', 'cli.js');
/** Bigger than loopback socket buffers: a data connection stays open until the client reads. */
const FILE = randomBytes(8 * 1024 * 1024);
const FILE_SHA = sha256(FILE);
const IS_ROOT = process.getuid?.() === 0;

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

interface Upstream {
  readonly port: number;
  readonly user: string;
  readonly password: string;
  readonly kind: string;
}

/** A real vsftpd when it can run (root), else the fake server; serving f.bin = FILE. */
async function startUpstream(t: TapTest): Promise<Upstream> {
  if (!vsftpdUnavailable()) {
    const vsftpd: VsftpdInstance = await startVsftpd();
    t.teardown(() => vsftpd.stop());
    writeFileSync(join(vsftpd.root, 'f.bin'), FILE);
    return { port: vsftpd.port, user: vsftpd.user, password: vsftpd.password, kind: 'vsftpd' };
  }
  const fake = await FakeFtpServer.start({ files: { 'f.bin': FILE } });
  t.teardown(() => fake.close());
  return { port: fake.port, user: 'test', password: 'secret', kind: 'fake server' };
}

/** Port 20 as root (the real thing), else a free unprivileged port outside the relay blocks. */
async function sourcePort(): Promise<number> {
  return IS_ROOT ? 20 : freePort();
}

async function startProxyWith(t: TapTest, upstream: Upstream, dataSourcePort: number): Promise<TestProxy> {
  return startTestProxy(
    proxyYaml({
      upstreamHost: '127.0.0.1',
      upstreamPort: upstream.port,
      passivePorts: ports.take(10).text,
      // proxyYaml ends with the client section: this line belongs to it.
      extraYaml: [`      dataSourcePort: ${dataSourcePort}`, FAST_TIMEOUTS_YAML].join('\n'),
    }),
    { teardown: t },
  );
}

async function loggedIn(t: TapTest, proxy: { host: string; port: number }, upstream: Upstream): Promise<FtpClient> {
  const client = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(() => client.destroy());
  const reply = await client.login(upstream.user, upstream.password);
  t.equal(reply.code, 230, `login (${upstream.kind}): ${reply.text}`);
  t.equal((await client.command('TYPE I')).code, 200);
  return client;
}

/** The client's data listener: every connection it accepts, in order. */
async function dataListener(t: TapTest): Promise<{ port: number; next: () => Promise<net.Socket> }> {
  const accepted: net.Socket[] = [];
  const waiting: Array<(socket: net.Socket) => void> = [];
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
    socket.on('error', () => {});
    t.teardown(() => socket.destroy());
    const waiter = waiting.shift();
    if (waiter) waiter(socket);
    else accepted.push(socket);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  t.teardown(() => server.close());
  const next = (): Promise<net.Socket> => {
    const ready = accepted.shift();
    return withTimeout(ready ? Promise.resolve(ready) : new Promise<net.Socket>((resolve) => waiting.push(resolve)), 5000, 'the proxy dials the client');
  };
  return { port: (server.address() as net.AddressInfo).port, next };
}

function portCommand(port: number): string {
  return `PORT 127,0,0,1,${port >> 8},${port & 255}`;
}

function records(proxy: TestProxy, event: string): LogRecord[] {
  return proxy.logs().filter((r) => r.event === event);
}

t.test('PORT and EPRT clients: data connections come from dataSourcePort, two sessions at once', async (t) => {
  const upstream = await startUpstream(t);
  const source = await sourcePort();
  const proxy = await startProxyWith(t, upstream, source);
  t.equal(records(proxy, 'config-warning').length, 0, 'no config warning: the key is in use');
  const a = await loggedIn(t, proxy, upstream);
  const b = await loggedIn(t, proxy, upstream);
  const la = await dataListener(t);
  const lb = await dataListener(t);
  t.equal((await a.command(portCommand(la.port))).code, 200, 'PORT');
  t.equal((await b.command(`EPRT |1|127.0.0.1|${lb.port}|`)).code, 200, 'EPRT');
  a.send('RETR f.bin');
  const sa = await la.next();
  b.send('RETR f.bin');
  const sb = await lb.next();
  // Neither side has read a byte: the first connection is still open when the second arrives.
  t.notOk(sa.destroyed || sb.destroyed, 'both data connections open at once');
  t.equal(`${sa.remoteAddress}:${sa.remotePort}`, `127.0.0.1:${source}`, `session A: from 127.0.0.1:${source}`);
  t.equal(`${sb.remoteAddress}:${sb.remotePort}`, `127.0.0.1:${source}`, `session B: from 127.0.0.1:${source}`);
  const [da, db] = await Promise.all([readAll(sa, 15000), readAll(sb, 15000)]);
  t.equal(sha256(da.data), FILE_SHA, `A: the whole file (${da.data.length} bytes)`);
  t.equal(sha256(db.data), FILE_SHA, `B: the whole file (${db.data.length} bytes)`);
  t.same([(await a.readReply()).code, (await a.readReply(15000)).code], [150, 226], 'A: 150, 226');
  t.same([(await b.readReply()).code, (await b.readReply(15000)).code], [150, 226], 'B: 150, 226');

  // The same client, another port, after the first transfers: still from the source port.
  const again = await dataListener(t);
  t.equal((await a.command(portCommand(again.port))).code, 200);
  a.send('RETR f.bin');
  const sc = await again.next();
  t.equal(sc.remotePort, source, 'a later transfer of the same session: same source port');
  t.equal(sha256((await readAll(sc, 15000)).data), FILE_SHA);
  t.same([(await a.readReply()).code, (await a.readReply(15000)).code], [150, 226]);
  await a.quit();
  await b.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 }, 'nothing left behind');
});

t.test('the same client address and port while it is still connected from dataSourcePort: 425, logged, session usable', async (t) => {
  const upstream = await startUpstream(t);
  const source = await sourcePort();
  const proxy = await startProxyWith(t, upstream, source);
  const a = await loggedIn(t, proxy, upstream);
  const b = await loggedIn(t, proxy, upstream);
  const shared = await dataListener(t);
  t.equal((await a.command(portCommand(shared.port))).code, 200);
  a.send('RETR f.bin');
  const first = await shared.next();
  t.equal(first.remotePort, source);
  // B names the very same client address and port: the 4-tuple is taken.
  t.equal((await b.command(portCommand(shared.port))).code, 200);
  const refused = await b.command('RETR f.bin', 10000);
  t.equal(refused.text, "425 Can't open data connection: source port unavailable.", `B: ${refused.text}`);
  const failed = records(proxy, 'data-setup-failed').find((r) => r.code === 'FTPP_ERR_DATA_SOURCE_PORT');
  t.ok(failed, 'a data-setup-failed record with FTPP_ERR_DATA_SOURCE_PORT');
  t.equal(failed?.level, 'warn', 'logged as a warning');
  t.match(String(failed?.err), new RegExp(`source port 127\\.0\\.0\\.1:${source}.*already connected to 127\\.0\\.0\\.1:${shared.port}.*EADDRNOTAVAIL`), 'the reason is spelled out');
  // A's transfer is untouched; B goes on with a port of its own.
  t.equal(sha256((await readAll(first, 15000)).data), FILE_SHA, 'A: the whole file');
  t.same([(await a.readReply()).code, (await a.readReply(15000)).code], [150, 226]);
  const own = await dataListener(t);
  t.equal((await b.command(portCommand(own.port))).code, 200);
  b.send('RETR f.bin');
  const sb = await own.next();
  t.equal(sb.remotePort, source);
  t.equal(sha256((await readAll(sb, 15000)).data), FILE_SHA, 'B: the whole file on its own port');
  t.same([(await b.readReply()).code, (await b.readReply(15000)).code], [150, 226]);
  await a.quit();
  await b.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 }, 'nothing left behind');
});

t.test('sourcePortBindProblem: reads the capability and the unprivileged port start', async (t) => {
  const proc = (capEff: string, start = '1024') => (path: string): string | null =>
    path.endsWith('ip_unprivileged_port_start') ? `${start}\n` : path === '/proc/self/status' ? `Name:\tnode\nCapEff:\t${capEff}\n` : null;
  t.equal(sourcePortBindProblem(20, proc('000001ffffffffff')), null, 'full capabilities');
  t.equal(sourcePortBindProblem(20, proc('0000000000000400')), null, 'CAP_NET_BIND_SERVICE alone');
  t.match(sourcePortBindProblem(20, proc('000001fffefffbff')) ?? '', /lacks CAP_NET_BIND_SERVICE/, 'every capability but that one');
  t.equal(sourcePortBindProblem(2020, proc('0000000000000000')), null, 'an unprivileged port needs none');
  t.equal(sourcePortBindProblem(20, proc('0000000000000000', '0')), null, 'ip_unprivileged_port_start 0');
  t.equal(sourcePortBindProblem(20, () => null), null, 'no /proc: no guess');
});

const noSetpriv = !IS_ROOT ? 'needs root to drop CAP_NET_BIND_SERVICE with setpriv; CI runs as root'
  : !existsSync('/usr/bin/setpriv') ? 'setpriv is not installed (util-linux)'
  : !existsSync(CLI) ? `${CLI} is missing: build first (npx tsc -p tsconfig.json)`
  : null;
t.test('without CAP_NET_BIND_SERVICE: a warning at start naming it, and a clear 425', { skip: noSetpriv ?? false }, async (t) => {
  const fake = await FakeFtpServer.start({ files: { 'f.bin': FILE } });
  t.teardown(() => fake.close());
  const dir = mkdtempSync(join(tmpdir(), 'ftpnp-srcport-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const config = join(dir, 'proxy.yaml');
  writeFileSync(config, proxyYaml({
    upstreamHost: '127.0.0.1',
    upstreamPort: fake.port,
    passivePorts: ports.take(10).text,
    level: 'info',
    extraYaml: ['      dataSourcePort: 20', FAST_TIMEOUTS_YAML].join('\n'),
  }));
  // Root without the capability: what a unit without AmbientCapabilities=CAP_NET_BIND_SERVICE gets.
  const child = spawn('/usr/bin/setpriv', ['--bounding-set=-net_bind_service', '--', process.execPath, CLI, '--config', config], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString('utf8')));
  child.stderr.on('data', (d: Buffer) => (out += d.toString('utf8')));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const pid = child.pid!;
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) process.kill(pid, 'SIGKILL');
    await withTimeout(exited, 5000, 'proxy exit').catch(() => {});
  });
  const logs = (): LogRecord[] => out.split('\n').filter((l) => l.startsWith('{')).flatMap((l) => {
    try {
      return [JSON.parse(l) as LogRecord];
    } catch {
      return [];
    }
  });
  t.ok(await waitFor(() => logs().some((r) => r.event === 'listening'), 10000), `the proxy starts (${out.slice(0, 300)})`);
  const warning = logs().find((r) => r.event === 'data-source-port-unprivileged');
  t.ok(warning, 'a startup warning');
  t.equal(warning?.missing, 'CAP_NET_BIND_SERVICE', 'naming the capability');
  const listen = String(logs().find((r) => r.event === 'listening')?.listen);
  const [host, port] = [listen.slice(0, listen.lastIndexOf(':')), Number(listen.slice(listen.lastIndexOf(':') + 1))];
  const client = await loggedIn(t, { host, port }, { port: fake.port, user: 'test', password: 'secret', kind: 'fake server' });
  const data = await dataListener(t);
  t.equal((await client.command(portCommand(data.port))).code, 200);
  const refused = await client.command('RETR f.bin', 10000);
  t.equal(refused.text, "425 Can't open data connection: source port unavailable.", refused.text);
  t.ok(await waitFor(() => logs().some((r) => r.event === 'data-setup-failed' && r.code === 'FTPP_ERR_DATA_SOURCE_PORT'), 3000), 'logged');
  const failed = logs().find((r) => r.event === 'data-setup-failed');
  t.match(String(failed?.err), /CAP_NET_BIND_SERVICE.*EACCES/, 'the log names the missing capability');
  t.equal(failed?.level, 'warn', 'as a warning');
  t.equal((await client.command('NOOP')).code, 200, 'the session goes on');
  await client.quit();
});
