/**
 * `client.dataPath: kernel` at the session level, without root: a recording nft runner
 * stands in for libnftables, and the test plays the kernel's part (it connects straight to
 * the server's passive port, as the DNAT would). What is checked: the mapping the session
 * asks for, that it asks before the 227 goes out and removes it when the transfer ends, that
 * the proxy neither dials the server's data port nor accepts on its own, that a PORT client
 * with upstream dataMode mirror maps the server's connection to the client, that every other
 * case (PORT with a passive server, PASV with an active one, refused mapping) is relayed and
 * counted by reason, and that nothing is left. The real NAT is in
 * test/e2e/nat.test.ts and the real libnftables in test/data/kernel-forward.test.ts.
 * Relay ports 40000-40999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { FakeFtpServer, PortBlocks, FAST_TIMEOUTS_YAML, settleLeaks, type FakeHandler } from '../helpers/fake-server.js';
import { FtpClient, openData, parse227, parse229 } from '../helpers/ftp-client.js';
import { waitFor } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';
import { proxyYaml, startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { KernelForwarder } from '../../src/data/kernel-forward.js';
import type { NftBatchRunner, NftResult } from '../../src/data/nft-runner.js';
import { isProxyError } from '../../src/errors.js';

const ports = new PortBlocks(40000);
const FILE = randomBytes(200 * 1024);

interface Lab {
  readonly fake: FakeFtpServer;
  readonly proxy: TestProxy;
  readonly scripts: string[];
  readonly client: FtpClient;
}

interface LabOptions {
  readonly answer?: (script: string) => Partial<NftResult>;
  readonly dataPath?: 'kernel' | 'auto';
  readonly dataMode?: 'passive' | 'active' | 'mirror';
  readonly handler?: FakeHandler;
  /** Where nft scripts are recorded (a handler may read them). */
  readonly scripts?: string[];
  /** Changes off the event loop, as the real addon runs them (default: at once). */
  readonly runBatch?: NftBatchRunner;
}

async function startLab(t: TapTest, options: LabOptions = {}): Promise<Lab> {
  const { answer = () => ({}), dataPath = 'kernel', dataMode = 'passive', handler } = options;
  const scripts = options.scripts ?? [];
  const fake = await FakeFtpServer.start({ files: { 'f.bin': FILE }, ...(handler ? { handler } : {}) });
  const proxy = await startTestProxy(
    proxyYaml({
      upstreamHost: '127.0.0.1',
      upstreamPort: fake.port,
      passivePorts: ports.take(10).text,
      dataPath,
      dataMode,
      ...(dataMode === 'passive' ? {} : { activePorts: ports.take(10).text }),
      extraYaml: FAST_TIMEOUTS_YAML,
    }),
    {
      kernelHostBlocker: () => null,
      openKernelForwarder: () =>
        new KernelForwarder(
          (script) => {
            scripts.push(script);
            return { ok: true, output: '', error: '', ...answer(script) };
          },
          { pid: 4242, ...(options.runBatch ? { runBatch: options.runBatch } : {}) },
        ),
    },
  );
  const client = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(async () => {
    client.destroy();
    await proxy.close();
    await fake.close();
  });
  t.equal((await client.login()).code, 230, 'logged in');
  return { fake, proxy, scripts, client };
}

/** The (client . proxy . port -> server . port) of the last mapping created. */
function lastMapping(scripts: readonly string[]): { proxyPort: number; serverPort: number } | null {
  for (const script of [...scripts].reverse()) {
    const match = /create element inet ftpnp_4242 dnat_to \{ 127\.0\.0\.1 \. 127\.0\.0\.1 \. (\d+) timeout 5000ms : 127\.0\.0\.1 \. (\d+) \}/.exec(script);
    if (match) return { proxyPort: Number(match[1]), serverPort: Number(match[2]) };
  }
  return null;
}

function transferRecords(proxy: TestProxy): Array<Record<string, unknown>> {
  return proxy.logs().filter((r) => r.event === 'transfer');
}

async function connectionOutcome(port: number): Promise<string> {
  return openData('127.0.0.1', port, { timeoutMs: 2000 }).then(
    (socket) =>
      new Promise<string>((resolve) => {
        socket.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
        socket.on('data', () => resolve('data'));
        socket.on('end', () => resolve('end'));
        socket.resume();
      }),
    (err: NodeJS.ErrnoException) => err.code ?? String(err),
  );
}

t.test('the table is made at start and deleted at close', async (t) => {
  const { proxy, scripts } = await startLab(t);
  t.same(scripts.slice(0, 1), ['list tables']);
  t.match(scripts[1], /^add table inet ftpnp_4242\n/);
  t.ok(proxy.logs().some((r) => r.event === 'kernel-path' && r.table === 'ftpnp_4242'), 'logged at start');
  await proxy.close();
  t.equal(scripts.at(-1), 'delete table inet ftpnp_4242');
});

for (const style of ['PASV', 'EPSV'] as const) {
  t.test(`${style} + RETR: mapped before the reply, carried by "the kernel", unmapped after 226`, async (t) => {
    const { proxy, scripts, client, fake } = await startLab(t);
    const reply = await client.command(style);
    const advertised = style === 'PASV' ? parse227(reply).port : parse229(reply);
    const mapping = lastMapping(scripts);
    t.ok(mapping, `a mapping was created before the ${reply.code} reply: ${scripts.at(-1)}`);
    t.equal(mapping?.proxyPort, advertised, 'for the advertised port');
    t.match(scripts.at(-1), /add element inet ftpnp_4242 snat_to \{ 127\.0\.0\.1 \. 127\.0\.0\.1 \. \d+ : 127\.0\.0\.1 \}/, 'with its SNAT partner');
    t.equal(await connectionOutcome(advertised), 'ECONNRESET', 'a connection reaching the proxy itself (mapping missed) is reset');
    t.ok(proxy.logs().some((r) => r.event === 'data-stranger' && r.when === 'unmapped' && r.port === advertised), 'and logged');
    // What the DNAT would do: the client's data connection lands on the server's passive port.
    const data = await openData('127.0.0.1', mapping!.serverPort);
    const download = readAll(data, 10000);
    client.send('RETR f.bin');
    t.equal((await client.readReply()).code, 150, '150');
    t.equal((await client.readReply(10000)).code, 226, '226');
    t.ok((await download).data.equals(FILE), 'the bytes arrive, end to end');
    await waitFor(() => transferRecords(proxy).length > 0);
    const [record] = transferRecords(proxy);
    t.match(record, { dataPath: 'kernel', bytes: null, result: 'ok', clientMode: 'passive', clientDataPort: advertised }, 'logged as a kernel transfer without byte count');
    t.ok(
      scripts.includes(`delete element inet ftpnp_4242 dnat_to { 127.0.0.1 . 127.0.0.1 . ${advertised} }\ndelete element inet ftpnp_4242 snat_to { 127.0.0.1 . 127.0.0.1 . ${mapping!.serverPort} }`),
      'both elements removed after the 226',
    );
    const upstream = fake.sessions[0]!;
    t.notOk(upstream.received.some((line) => /^(PORT|EPRT)/.test(line)), 'the server was only asked for passive mode');
    await client.quit();
    t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 }, 'no session or port left');
  });
}

t.test('a refused mapping is relayed instead, and said so', async (t) => {
  const { proxy, client } = await startLab(t, { answer: (script) => (script.includes('create element') ? { ok: false, error: 'Could not process rule: No space left on device' } : {}) });
  const port = parse227(await client.command('PASV')).port;
  const data = await openData('127.0.0.1', port);
  const download = readAll(data, 10000);
  client.send('RETR f.bin');
  t.equal((await client.readReply()).code, 150);
  t.equal((await client.readReply(10000)).code, 226);
  t.ok((await download).data.equals(FILE), 'relayed bytes');
  const failed = proxy.logs().find((r) => r.event === 'kernel-path-failed');
  t.match(failed, { code: 'FTPP_ERR_KERNEL_PATH', err: /No space left on device/ }, 'warned with nft\'s words');
  await waitFor(() => transferRecords(proxy).length > 0);
  t.match(transferRecords(proxy)[0], { dataPath: 'relay', bytes: FILE.length });
  await client.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
});

/** A listener standing in for a PORT client's own; its port, and its next connection. */
async function clientListener(t: TapTest): Promise<{ port: number; accepted: Promise<net.Socket> }> {
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
  t.teardown(() => listener.close());
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  return { port: (listener.address() as net.AddressInfo).port, accepted };
}

function fallbacks(proxy: TestProxy): unknown[] {
  return proxy.logs().filter((r) => r.event === 'kernel-path-skipped').map((r) => r.reason);
}

t.test('PORT with a passive server (dataMode passive) is relayed: both sides listen, reason both-listen', async (t) => {
  const { proxy, scripts, client } = await startLab(t);
  const { port: lport, accepted } = await clientListener(t);
  const before = scripts.length;
  t.equal((await client.command(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`)).code, 200);
  client.send('RETR f.bin');
  const download = readAll(await accepted, 10000);
  t.equal((await client.readReply()).code, 150);
  t.equal((await client.readReply(10000)).code, 226);
  t.ok((await download).data.equals(FILE));
  t.equal(scripts.length, before, 'nft was not asked anything');
  t.same(fallbacks(proxy), ['both-listen'], 'the fallback is logged with its reason');
  await waitFor(() => transferRecords(proxy).length > 0);
  t.match(transferRecords(proxy)[0], { dataPath: 'relay', clientMode: 'active', upstreamMode: 'passive', bytes: FILE.length });
});

/**
 * A fake server that plays vsftpd in active mode and the kernel's part: PORT is recorded,
 * RETR connects to where the proxy's mapping sends the server's connection (the client's
 * PORT address, read from the dnat_to element), as the DNAT would.
 */
function activeServer(scripts: string[], seen: { port: string | null; dialled: number | null }): FakeHandler {
  return async (command, session) => {
    if (command.verb === 'PORT') {
      seen.port = command.arg;
      session.reply('200 PORT command successful. Consider using PASV.');
      return true;
    }
    if (command.verb !== 'RETR') return false;
    const mapped = [...scripts].reverse().map((x) => /create element inet ftpnp_4242 dnat_to \{ 127\.0\.0\.1 \. 127\.0\.0\.1 \. (\d+) timeout \d+ms : 127\.0\.0\.1 \. (\d+) \}/.exec(x)).find(Boolean);
    if (!mapped) {
      session.reply('425 Failed to establish connection.');
      return true;
    }
    seen.dialled = Number(mapped[2]);
    const data = await openData('127.0.0.1', Number(mapped[2]));
    session.reply('150 Opening BINARY mode data connection for f.bin.');
    data.end(FILE);
    await new Promise((resolve) => data.once('close', resolve));
    session.reply('226 Transfer complete.');
    return true;
  };
}

t.test('PORT with upstream dataMode mirror: the server\'s connection to our port is mapped to the client', async (t) => {
  const scripts: string[] = [];
  const seen: { port: string | null; dialled: number | null } = { port: null, dialled: null };
  const lab = await startLab(t, { dataMode: 'mirror', handler: activeServer(scripts, seen), scripts });
  const { port: lport, accepted } = await clientListener(t);
  t.equal((await lab.client.command(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`)).code, 200, 'PORT answered once the server side is ready');
  const ourPort = seen.port ? (([a, b]) => a! * 256 + b!)(seen.port.split(',').slice(4).map(Number)) : null;
  t.match(seen.port, /^127,0,0,1,\d+,\d+$/, `the server was sent our own PORT: ${seen.port}`);
  const created = lab.scripts.find((x) => x.includes('create element'));
  t.match(created, new RegExp(`add element inet ftpnp_4242 snat_to \\{ 127\\.0\\.0\\.1 \\. 127\\.0\\.0\\.1 \\. ${lport} : 127\\.0\\.0\\.1 \\}`), 'SNAT: the client sees the proxy\'s client-side address');
  t.match(created, new RegExp(`create element inet ftpnp_4242 dnat_to \\{ 127\\.0\\.0\\.1 \\. 127\\.0\\.0\\.1 \\. ${ourPort} timeout 5000ms : 127\\.0\\.0\\.1 \\. ${lport} \\}`), 'DNAT: the server\'s connection to the port we sent it goes to the client\'s PORT address');
  t.equal(await connectionOutcome(ourPort!), 'ECONNRESET', 'a connection reaching the proxy\'s own port (mapping missed) is reset');
  t.ok(lab.proxy.logs().some((r) => r.event === 'data-stranger' && r.when === 'unmapped' && r.port === ourPort), 'and logged');
  lab.client.send('RETR f.bin');
  const download = readAll(await accepted, 10000);
  t.equal((await lab.client.readReply()).code, 150, '150');
  t.equal((await lab.client.readReply(10000)).code, 226, '226');
  t.ok((await download).data.equals(FILE), 'the bytes arrive, end to end');
  t.equal(seen.dialled, lport, 'the "kernel" sent the server to the client');
  await waitFor(() => transferRecords(lab.proxy).length > 0);
  t.match(transferRecords(lab.proxy)[0], { dataPath: 'kernel', bytes: null, result: 'ok', clientMode: 'active', upstreamMode: 'active', upstreamDataPort: ourPort }, 'logged as a kernel transfer');
  t.ok(lab.scripts.some((x) => x.startsWith(`delete element inet ftpnp_4242 dnat_to { 127.0.0.1 . 127.0.0.1 . ${ourPort} }`)), 'the mapping is removed after the 226');
  t.same(fallbacks(lab.proxy), [], 'no fallback');
  await lab.client.quit();
  t.same(await settleLeaks(lab.proxy), { sessions: 0, leased: 0 }, 'no session or port left');
});

t.test('PORT with upstream mirror, the server refusing our PORT: the mapping and port go at once', async (t) => {
  const lab = await startLab(t, {
    dataMode: 'mirror',
    handler: (command, session) => (command.verb === 'PORT' ? (session.reply('500 Illegal PORT command.'), true) : false),
  });
  const { port: lport } = await clientListener(t);
  const reply = await lab.client.command(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`);
  t.ok(reply.code >= 400, `the client is refused: ${reply.code} ${reply.text}`);
  const created = lab.scripts.find((x) => x.includes('create element'));
  const ourPort = Number(/dnat_to \{ 127\.0\.0\.1 \. 127\.0\.0\.1 \. (\d+)/.exec(created ?? '')?.[1]);
  t.ok(ourPort > 0, 'a mapping had been made before the PORT went out');
  t.ok(lab.scripts.some((x) => x.startsWith(`delete element inet ftpnp_4242 dnat_to { 127.0.0.1 . 127.0.0.1 . ${ourPort} }`)), 'and was removed');
  await lab.client.quit();
  t.same(await settleLeaks(lab.proxy), { sessions: 0, leased: 0 }, 'the port is free again');
});

t.test('PASV with upstream dataMode active is relayed: both sides connect, reason both-connect', async (t) => {
  const lab = await startLab(t, {
    dataMode: 'active',
    handler: async (command, session) => {
      if (command.verb === 'PORT') {
        const [h1, h2, h3, h4, p1, p2] = command.arg.split(',').map(Number);
        session.reply('200 PORT command successful.');
        (session as unknown as { activeTarget: { host: string; port: number } }).activeTarget = { host: `${h1}.${h2}.${h3}.${h4}`, port: p1! * 256 + p2! };
        return true;
      }
      if (command.verb !== 'RETR') return false;
      const target = (session as unknown as { activeTarget: { host: string; port: number } }).activeTarget;
      const data = await openData(target.host, target.port);
      session.reply('150 Opening BINARY mode data connection.');
      data.end(FILE);
      await new Promise((resolve) => data.once('close', resolve));
      session.reply('226 Transfer complete.');
      return true;
    },
  });
  const before = lab.scripts.length;
  const port = parse227(await lab.client.command('PASV')).port;
  const download = readAll(await openData('127.0.0.1', port), 10000);
  lab.client.send('RETR f.bin');
  t.equal((await lab.client.readReply()).code, 150);
  t.equal((await lab.client.readReply(10000)).code, 226);
  t.ok((await download).data.equals(FILE), 'relayed bytes');
  t.equal(lab.scripts.length, before, 'nft was not asked anything');
  t.same(fallbacks(lab.proxy), ['both-connect'], 'the fallback is logged with its reason');
  await waitFor(() => transferRecords(lab.proxy).length > 0);
  t.match(transferRecords(lab.proxy)[0], { dataPath: 'relay', clientMode: 'passive', upstreamMode: 'active', bytes: FILE.length });
  await lab.client.quit();
  t.same(await settleLeaks(lab.proxy), { sessions: 0, leased: 0 });
});

t.test('a mapping never used goes with PASV again, with the session, and with QUIT', async (t) => {
  const { proxy, scripts, client } = await startLab(t);
  const first = parse227(await client.command('PASV')).port;
  const second = parse227(await client.command('PASV')).port;
  t.ok(scripts.some((x) => x.startsWith(`delete element inet ftpnp_4242 dnat_to { 127.0.0.1 . 127.0.0.1 . ${first} }`)), 'the first mapping is removed when PASV replaces it');
  await client.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
  t.ok(scripts.some((x) => x.startsWith(`delete element inet ftpnp_4242 dnat_to { 127.0.0.1 . 127.0.0.1 . ${second} }`)), 'the second with the session');
});

t.test('a failed transfer removes the mapping at once', async (t) => {
  const { proxy, scripts, client } = await startLab(t);
  const port = parse227(await client.command('PASV')).port;
  const reply = await client.command('RETR missing.bin');
  t.equal(reply.code, 550, `the server's 550 passes: ${reply.text}`);
  t.ok(scripts.some((x) => x.startsWith(`delete element inet ftpnp_4242 dnat_to { 127.0.0.1 . 127.0.0.1 . ${port} }`)));
  await client.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
});

t.test('a kernel path that cannot start fails the start, binds nothing', async (t) => {
  const fake = await FakeFtpServer.start({});
  t.teardown(() => fake.close());
  const range = ports.take(10);
  const err = await startTestProxy(
    proxyYaml({
      upstreamHost: '127.0.0.1',
      upstreamPort: fake.port,
      passivePorts: range.text,
      listen: '127.0.0.1:0',
      dataPath: 'kernel',
    }),
    { openKernelForwarder: () => new KernelForwarder(() => ({ ok: false, output: '', error: 'Operation not permitted' })) },
  ).then(
    () => null,
    (e: unknown) => e,
  );
  t.ok(isProxyError(err, 'FTPP_ERR_KERNEL_PATH'), `FTPP_ERR_KERNEL_PATH: ${(err as Error)?.message}`);
  t.match((err as Error).message, /Operation not permitted \(needs CAP_NET_ADMIN\)/);
  t.equal(await connectionOutcome(range.first), 'ECONNREFUSED', 'no passive port bound');
});

// ------------------------------------------------------------------ client.dataPath: auto (issue #14)

t.test('dataPath auto on a host that allows it: the kernel path, said once at start', async (t) => {
  const lab = await startLab(t, { dataPath: 'auto' });
  const line = lab.proxy.logs().find((r) => r.event === 'data-path');
  t.match(line, { listener: 'test', configured: 'auto', dataPath: 'kernel', reason: 'nftables table ftpnp_4242' }, JSON.stringify(line));
  const pasv = await lab.client.command('PASV');
  t.equal(pasv.code, 227);
  t.same(lastMapping(lab.scripts)?.proxyPort, parse227(pasv).port, 'the passive channel was mapped in nftables');
});

async function autoRelayed(t: TapTest, options: { hostBlocker: string | null; openFails: boolean }): Promise<{ proxy: TestProxy; opened: number }> {
  const fake = await FakeFtpServer.start({ files: { 'f.bin': FILE } });
  let opened = 0;
  const proxy = await startTestProxy(
    proxyYaml({ upstreamHost: '127.0.0.1', upstreamPort: fake.port, passivePorts: ports.take(10).text, dataPath: 'auto', extraYaml: FAST_TIMEOUTS_YAML }),
    {
      kernelHostBlocker: () => options.hostBlocker,
      openKernelForwarder: () => {
        opened += 1;
        return new KernelForwarder(() => (options.openFails ? { ok: false, output: '', error: 'Operation not permitted' } : { ok: true, output: '', error: '' }), { pid: 4242 });
      },
    },
  );
  t.teardown(async () => {
    await proxy.close();
    await fake.close();
  });
  const client = await FtpClient.connect(proxy.host, proxy.port);
  t.teardown(() => client.destroy());
  t.equal((await client.login()).code, 230);
  const epsv = await client.command('EPSV');
  const socket = await openData('127.0.0.1', parse229(epsv));
  const data = readAll(socket);
  t.equal((await client.command('RETR f.bin')).code, 226, 'the transfer completes');
  t.ok((await data).data.equals(FILE), 'relayed by the proxy, intact');
  t.match(transferRecords(proxy)[0], { dataPath: 'relay', bytes: FILE.length }, 'logged as relayed, with its byte count');
  await client.quit();
  t.same(await settleLeaks(proxy), { sessions: 0, leased: 0 });
  return { proxy, opened };
}

t.test('dataPath auto without IPv4 forwarding: the relay, and why; nftables is never touched', async (t) => {
  const { proxy, opened } = await autoRelayed(t, { hostBlocker: 'net.ipv4.ip_forward is 0: the kernel would drop the data connections it NATs to the server', openFails: false });
  t.equal(opened, 0, 'no table opened');
  t.match(proxy.logs().find((r) => r.event === 'data-path'), { dataPath: 'relay', reason: /ip_forward is 0/ });
});

t.test('dataPath auto without CAP_NET_ADMIN: the proxy starts and relays, and says why (kernel would refuse to start)', async (t) => {
  const { proxy, opened } = await autoRelayed(t, { hostBlocker: null, openFails: true });
  t.equal(opened, 1, 'the table was tried');
  t.match(proxy.logs().find((r) => r.event === 'data-path'), { dataPath: 'relay', reason: /Operation not permitted \(needs CAP_NET_ADMIN\)/ });
});

t.test('the session ends while nftables adds its mapping: the mapping and the port go with it', async (t) => {
  const batches: Array<{ scripts: string[]; done: (errors: readonly string[]) => void }> = [];
  const runBatch: NftBatchRunner = (scripts, done) => void batches.push({ scripts: [...scripts], done });
  const { proxy, client } = await startLab(t, { runBatch });
  void client.command('EPSV').catch(() => {});
  t.ok(await waitFor(() => batches.some((b) => b.scripts.some((s) => s.includes('create element'))), 5000), 'the add went to a batch');
  const add = batches.find((b) => b.scripts.some((s) => s.includes('create element')))!;
  const port = Number(/dnat_to \{ 127\.0\.0\.1 \. 127\.0\.0\.1 \. (\d+) /.exec(add.scripts.join('\n'))?.[1]);
  client.destroy();
  t.ok(await waitFor(() => proxy.logs().some((r) => r.event === 'session-end'), 5000), 'the session ended while the add ran');
  add.done(add.scripts.map(() => ''));
  const removal = (): (typeof batches)[number] | undefined => batches.find((b) => b.scripts.some((s) => s.startsWith('delete element inet ftpnp_4242 dnat_to') && s.includes(`. ${port} }`)));
  t.ok(await waitFor(() => removal() !== undefined, 5000), `the mapping of port ${port} is removed once its add is done`);
  removal()!.done(removal()!.scripts.map(() => ''));
  t.equal(await connectionOutcome(port), 'ECONNREFUSED', 'the leased port is closed');
  for (const b of batches.slice(batches.indexOf(removal()!) + 1)) b.done(b.scripts.map(() => ''));
});
