/**
 * Shutdown drain (README "Reload and shutdown"), through the built CLI: SIGTERM stops accepting
 * at once (ECONNREFUSED), open sessions are served for `shutdown.drainSeconds`, then get
 * `421 Service shutting down.` and the process exits 0; when the last session leaves during the
 * drain the process exits at once.
 * Upstream: the scripted fake server in this process. Relay ports 18000-18999 belong to this file.
 */
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FakeFtpServer, PortBlocks } from '../helpers/fake-server.js';
import { FtpClient } from '../helpers/ftp-client.js';
import { delay, withTimeout } from '../helpers/async.js';
import type { TapTest } from '../helpers/tap.js';
import { freePort } from '../helpers/vsftpd.js';
import { connectResult, opsYaml, spawnCli, type CliProcess } from '../helpers/ops.js';

const ports = new PortBlocks(18000);
let dir: string;
t.before(() => {
  dir = mkdtempSync(join(tmpdir(), 'ftpnp-drain-'));
});
t.teardown(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function startCli(t: TapTest, drainSeconds: number): Promise<{ cli: CliProcess; port: number; fake: FakeFtpServer }> {
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const port = await freePort();
  const path = join(dir, `drain-${port}.yaml`);
  writeFileSync(path, opsYaml({ name: 'drain', listen: `127.0.0.1:${port}`, upstreamPort: fake.port, passivePorts: ports.take(4).text, admin: null, drainSeconds, level: 'info' }));
  const cli = spawnCli(t, path);
  const started = await cli.waitLog((r) => r.event === 'started', 10000);
  if (!started) throw new Error(`CLI did not start: ${cli.stderr().slice(0, 500)}`);
  return { cli, port, fake };
}

async function loggedIn(t: TapTest, port: number): Promise<FtpClient> {
  const client = await FtpClient.connect('127.0.0.1', port);
  t.teardown(() => client.destroy());
  const reply = await client.login();
  if (reply.code !== 230) throw new Error(`login failed: ${reply.text}`);
  return client;
}

t.test('SIGTERM with drainSeconds 2: refuse new connections, serve the open session, then 421 and exit 0', async (t) => {
  const { cli, port } = await startCli(t, 2);
  const client = await loggedIn(t, port);
  const signalled = Date.now();
  process.kill(cli.pid, 'SIGTERM');
  const stopping = await cli.waitLog((r) => r.event === 'stopping', 3000);
  t.ok(stopping, 'stopping logged');
  t.equal(stopping?.sessions, 1, 'with one open session');
  let refused = await connectResult('127.0.0.1', port);
  for (let i = 0; i < 10 && refused !== 'ECONNREFUSED'; i++) {
    await delay(20);
    refused = await connectResult('127.0.0.1', port);
  }
  t.equal(refused, 'ECONNREFUSED', 'new connections are refused');
  t.ok(Date.now() - signalled < 1000, `refused at once (${Date.now() - signalled} ms after SIGTERM)`);
  await delay(300);
  const noop = await client.command('NOOP', 1000);
  t.equal(noop.code, 200, 'the open session still answers during the drain');
  t.ok(Date.now() - signalled < 1800, 'NOOP answered inside the drain window');
  const shutdown = await client.readReply(5000).catch(() => null);
  const at = Date.now() - signalled;
  if (!shutdown) {
    t.fail(`no 421 within ${at} ms of SIGTERM (drain 2 s); CLI events: ${JSON.stringify(cli.logs().map((r) => r.event))}`);
    t.notOk(cli.hasExited(), 'and the process is still running (it would wait for the session forever)');
    return;
  }
  t.equal(shutdown.text, '421 Service shutting down.', 'then 421 Service shutting down.');
  t.ok(at >= 1800 && at <= 3500, `at the end of the drain (${at} ms after SIGTERM)`);
  t.ok(await client.waitEnded(3000), 'the session is closed');
  const exit = await withTimeout(cli.exited, 5000, 'CLI exit');
  t.equal(exit.code, 0, 'exit code 0');
  t.ok(exit.at - signalled < 5000, `exited ${exit.at - signalled} ms after SIGTERM`);
  t.ok(cli.logs().some((r) => r.event === 'drain-expired'), 'drain-expired logged');
  t.ok(cli.logs().some((r) => r.event === 'stopped'), 'stopped logged');
});

t.test('SIGTERM with drainSeconds 10: the only session QUITs, the process exits right away', async (t) => {
  const { cli, port } = await startCli(t, 10);
  const client = await loggedIn(t, port);
  const signalled = Date.now();
  process.kill(cli.pid, 'SIGTERM');
  t.ok(await cli.waitLog((r) => r.event === 'stopping', 3000), 'stopping logged');
  await delay(300);
  t.equal((await client.command('NOOP')).code, 200, 'served during the drain');
  const quitAt = Date.now();
  t.equal((await client.command('QUIT')).code, 221, 'QUIT answered');
  const exit = await withTimeout(cli.exited, 8000, 'CLI exit').catch(() => null);
  t.ok(exit, 'the process exited before drainSeconds');
  t.equal(exit?.code, 0, 'exit code 0');
  if (exit) t.ok(exit.at - quitAt < 1500, `exited ${exit.at - quitAt} ms after QUIT (${exit.at - signalled} ms after SIGTERM; drain was 10 s)`);
  t.notOk(cli.logs().some((r) => r.event === 'drain-expired'), 'the drain did not expire');
});

t.test('a second signal skips the rest of the drain', async (t) => {
  const { cli, port } = await startCli(t, 30);
  const client = await loggedIn(t, port);
  process.kill(cli.pid, 'SIGTERM');
  t.ok(await cli.waitLog((r) => r.event === 'stopping', 3000), 'stopping logged');
  await delay(200);
  const second = Date.now();
  process.kill(cli.pid, 'SIGINT');
  const reply = await client.readReply(3000);
  t.equal(reply.text, '421 Service shutting down.', '421 at the second signal');
  const exit = await withTimeout(cli.exited, 5000, 'CLI exit').catch(() => null);
  t.equal(exit?.code, 0, 'exit 0');
  if (exit) t.ok(exit.at - second < 3000, `exited ${exit.at - second} ms after the second signal`);
});

t.test('SIGTERM without any session: exit 0 at once', async (t) => {
  const { cli } = await startCli(t, 10);
  const signalled = Date.now();
  process.kill(cli.pid, 'SIGTERM');
  const exit = await withTimeout(cli.exited, 5000, 'CLI exit').catch(() => null);
  t.equal(exit?.code, 0, 'exit 0');
  if (exit) t.ok(exit.at - signalled < 1500, `exited ${exit.at - signalled} ms after SIGTERM`);
});

t.test('SIGTERM with drainSeconds 0 and an open session: 421 at once, exit 0', async (t) => {
  const { cli, port } = await startCli(t, 0);
  const client = await loggedIn(t, port);
  const signalled = Date.now();
  process.kill(cli.pid, 'SIGTERM');
  const reply = await client.readReply(3000).catch(() => null);
  t.equal(reply?.text, '421 Service shutting down.', `421 at once (CLI events: ${JSON.stringify(cli.logs().map((r) => r.event))})`);
  const exit = await withTimeout(cli.exited, 3000, 'CLI exit').catch(() => null);
  t.equal(exit?.code, 0, 'exit 0');
  if (exit) t.ok(exit.at - signalled < 2000, `exited ${exit.at - signalled} ms after SIGTERM`);
});

t.test('shutdown.drainSeconds changed by SIGHUP applies to the next SIGTERM (README)', async (t) => {
  const fake = await FakeFtpServer.start();
  t.teardown(() => fake.close());
  const port = await freePort();
  const path = join(dir, `drain-reload-${port}.yaml`);
  const yaml = (drainSeconds: number): string =>
    opsYaml({ name: 'drain', listen: `127.0.0.1:${port}`, upstreamPort: fake.port, passivePorts: ports.take(4).text, admin: null, drainSeconds, level: 'info' });
  writeFileSync(path, yaml(1));
  const cli = spawnCli(t, path);
  t.ok(await cli.waitLog((r) => r.event === 'started', 10000), 'started');
  writeFileSync(path, yaml(7));
  process.kill(cli.pid, 'SIGHUP');
  t.ok(await cli.waitLog((r) => r.event === 'reloaded', 5000), 'reloaded');
  process.kill(cli.pid, 'SIGTERM');
  const stopping = await cli.waitLog((r) => r.event === 'stopping', 3000);
  t.equal(stopping?.drainMs, 7000, `the reloaded drain time is used: 7000 ms (stopping logged drainMs ${String(stopping?.drainMs)})`);
  const exit = await withTimeout(cli.exited, 5000, 'CLI exit').catch(() => null);
  t.equal(exit?.code, 0, 'exit 0');
});
