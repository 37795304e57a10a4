/**
 * Security behaviour at the session level: port stealing (RFC 2577 §8, protocol.md §4.2,
 * §8.26), FTP bounce (§4.1, §8.13), malformed PORT (§8.11), over-long lines (§8.18), relay
 * pool exhaustion and recovery, and passwords (PASS, password-changing SITE commands) never
 * reaching a log.
 * Relay ports 26000-26999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { PortBlocks, noLeaks, startHarness, type Harness } from '../helpers/fake-server.js';
import { openData, parse227 } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';

const ports = new PortBlocks(26000);
const FILE = randomBytes(200 * 1024);

function connectOutcome(port: number, localAddress: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port, localAddress });
    let connected = false;
    let code = '';
    socket.on('connect', () => {
      connected = true;
    });
    socket.on('data', () => {});
    socket.on('error', (err: NodeJS.ErrnoException) => {
      code = err.code ?? 'error';
    });
    socket.on('close', () => resolve(code || (connected ? 'closed' : 'not-connected')));
    setTimeout(() => {
      if (!socket.destroyed) {
        socket.destroy();
        resolve('still-open');
      }
    }, 3000).unref();
  });
}

function leased(h: Harness): number {
  return h.proxy.server.poolStats().reduce((n, p) => n + p.leased, 0);
}

t.test('port stealing: a connection from 127.0.0.2 is closed, the real client still gets its data (§8.26)', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'f.bin': FILE } } });
  const client = await h.login();
  const reply = await client.command('PASV');
  t.equal(reply.code, 227);
  const port = parse227(reply).port;
  const stranger = await connectOutcome(port, '127.0.0.2');
  t.ok(['ECONNRESET', 'closed'].includes(stranger), `stranger closed at once (${stranger})`);
  const warn = h.proxy.logs().find((r) => r.event === 'data-stranger');
  t.ok(warn && String(warn.from).startsWith('127.0.0.2:'), `logged the stranger (${JSON.stringify(warn)})`);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const download = readAll(data, 10000);
  t.equal((await client.command('RETR f.bin', 10000)).code, 226, '226');
  t.ok((await download).data.equals(FILE), 'the real client got the file');
  t.equal(await connectOutcome(port, '127.0.0.1'), 'ECONNREFUSED', 'listener closed after the real client connected');
  t.same(h.fake!.dataRemotes, ['127.0.0.1'], 'one upstream data connection only');
  await noLeaks(t, h, client);
});

t.test('PORT naming a third address: "500 Illegal PORT command." and nothing upstream (§8.13)', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const before = h.fake!.received.length;
  const cases = [
    ['PORT 127,0,0,2,117,48', '500 Illegal PORT command.'],
    ['PORT 192,0,2,55,195,80', '500 Illegal PORT command.'],
    ['PORT 169,254,169,254,0,80', '500 Illegal PORT command.'],
    ['PORT 127,0,0,1,3,255', '500 Illegal PORT command.'], // port 1023
    ['EPRT |1|127.0.0.2|30000|', '500 Illegal EPRT command.'],
  ] as const;
  for (const [line, expected] of cases) {
    const reply = await client.command(line);
    t.equal(reply.text, expected, `${line} -> ${reply.text}`);
  }
  t.same(h.fake!.received.slice(before), [], `nothing reached the server (${JSON.stringify(h.fake!.received.slice(before))})`);
  t.equal(leased(h), 0, 'no relay port leased');
  const log = h.proxy.logs().find((r) => r.event === 'command-refused');
  t.equal(log?.code, 'FTPP_ERR_BOUNCE_REFUSED', 'refusal logged with its code');
  await noLeaks(t, h, client);
});

t.test('malformed PORT: 501 and nothing upstream (§8.11)', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const before = h.fake!.received.length;
  const lines = [
    'PORT 127,0,0,1,195',
    'PORT 127,0,0,1,256,1',
    'PORT 127,0,0,1,-1,1',
    'PORT 127.0.0.1,195,80',
    'PORT 127,0,0,1,195,80,9',
    'PORT',
    'PORT 127,0,0,1,0,0',
    'EPRT |1|127.0.0.1|65536|',
    'EPRT |1|127.0.0|5000|',
  ];
  for (const line of lines) {
    const reply = await client.command(line);
    t.equal(reply.text, '501 Syntax error in parameters or arguments.', `${line} -> ${reply.text}`);
  }
  t.same(h.fake!.received.slice(before), [], 'nothing reached the server');
  t.equal((await client.command('NOOP')).code, 200, 'session goes on');
  await noLeaks(t, h, client);
});

t.test('over-long line: "500 Command line too long.", then close; the server sees none of it (§8.18)', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const before = h.fake!.raw.length;
  client.sendRaw('A'.repeat(5000));
  const reply = await client.readReply(5000);
  t.equal(reply.raw.toString('latin1'), '500 Command line too long.\r\n', 'exact reply');
  t.ok(await client.waitEnded(5000), 'then the proxy closes');
  await delay(100);
  const after = h.fake!.raw.subarray(before).toString('latin1');
  t.notOk(after.includes('AAAA'), `the server got nothing of the line (${JSON.stringify(after.slice(0, 40))})`);
  await noLeaks(t, h, client);
});

t.test('over-long line with commands pipelined behind it: none of them runs', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const before = h.fake!.received.length;
  client.sendRaw(`${'B'.repeat(4500)}\r\nDELE important\r\n`);
  const reply = await client.readReply(5000);
  t.equal(reply.text, '500 Command line too long.');
  t.ok(await client.waitEnded(5000), 'closed');
  await delay(100);
  t.same(h.fake!.received.slice(before).filter((l) => !/^QUIT/i.test(l)), [], `nothing upstream (${JSON.stringify(h.fake!.received.slice(before))})`);
  await noLeaks(t, h, client);
});

t.test('pool exhaustion: the third PASV gets 425 and a coded warning; the pool recovers after a QUIT', async (t) => {
  const h = await startHarness(t, { ports, portCount: 2 });
  const a = await h.login();
  const b = await h.login();
  const c = await h.login();
  const ra = await a.command('PASV');
  const rb = await b.command('PASV');
  t.equal(ra.code, 227, 'first PASV');
  t.equal(rb.code, 227, 'second PASV');
  const pa = parse227(ra).port;
  const pb = parse227(rb).port;
  t.not(pa, pb, 'distinct ports');
  for (const p of [pa, pb]) t.ok(p >= h.range.first && p <= h.range.last, `${p} in ${h.range.text}`);
  const upstreamBefore = h.fake!.sessions[2]!.received.length;
  const rc = await c.command('PASV');
  t.equal(rc.text, "425 Can't open data connection: no free relay port.", `third PASV: ${rc.text}`);
  t.equal(h.fake!.sessions[2]!.received.length, upstreamBefore, 'no EPSV sent upstream for it');
  const warn = h.proxy.logs().find((r) => r.code === 'FTPP_ERR_POOL_EXHAUSTED');
  t.equal(warn?.level, 'warn', `warn log with code FTPP_ERR_POOL_EXHAUSTED (${JSON.stringify(warn)})`);
  const epsv = await c.command('EPSV');
  t.equal(epsv.code, 425, 'EPSV too');
  await a.quit();
  t.ok(await (async () => {
    for (let i = 0; i < 100 && leased(h) > 1; i++) await delay(20);
    return leased(h) === 1;
  })(), 'the quitting session gave its port back');
  const again = await c.command('PASV');
  t.equal(again.code, 227, `recovered: ${again.text}`);
  t.equal(parse227(again).port, pa, 'the freed port');
  await noLeaks(t, h, [b, c]);
});

t.test('PASS never reaches the logs', async (t) => {
  const SECRET = 'S3cr3t-pw-' + randomBytes(4).toString('hex');
  const h = await startHarness(t, { ports, fake: { files: { 'f.bin': FILE } } });
  const client = await h.connect();
  await client.readReply();
  t.equal((await client.command('USER alice')).code, 331);
  t.equal((await client.command(`PASS ${SECRET}`)).code, 230);
  client.sendRaw(`pass ${SECRET}\r\n`);
  await client.readReply();
  await noLeaks(t, h, client);
  t.ok(h.fake!.received.includes(`PASS ${SECRET}`), 'the password did go upstream');
  t.ok(h.proxy.logText().length > 0, 'there are logs');
  t.notOk(h.proxy.logText().includes(SECRET), 'but never into a log line');
});

t.test('password-changing SITE commands never reach the logs at debug level (issue #10 defect 5)', async (t) => {
  const tag = randomBytes(4).toString('hex');
  const [A, B, C] = [`secretA-${tag}`, `secretB-${tag}`, `secretC-${tag}`];
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const lines = [`SITE PSWD ${A} ${B}`, `site  chpass   ${C}`];
  for (const line of lines) await client.command(line);
  await noLeaks(t, h, client);
  for (const line of lines) t.ok(h.fake!.received.includes(line), `${line.split(' ', 1)[0]} went upstream unchanged`);
  const debug = h.proxy.logs().filter((r) => r.event === 'command' && /^SITE /.test(String(r.command)));
  t.same(debug.map((r) => r.command), ['SITE PSWD ****', 'SITE CHPASS ****'], 'debug records name the subcommand, masked');
  for (const secret of [A, B, C]) t.notOk(h.proxy.logText().includes(secret), `${secret.split('-')[0]} in no log line`);
});

t.test('a PASV listener nobody connects to times out and frees its port', async (t) => {
  const h = await startHarness(t, {
    ports,
    extraYaml: ['    timeouts:', '      dataAcceptSeconds: 0.3', '      dataConnectSeconds: 2'].join('\n'),
  });
  const client = await h.login();
  const reply = await client.command('PASV');
  t.equal(reply.code, 227);
  t.equal(leased(h), 1, 'leased');
  let freed = false;
  for (let i = 0; i < 100 && !freed; i++) {
    await delay(20);
    freed = leased(h) === 0;
  }
  t.ok(freed, 'port released after the accept timeout');
  t.equal(await connectOutcome(parse227(reply).port, '127.0.0.1'), 'ECONNREFUSED', 'listener closed');
  await noLeaks(t, h, client);
});

t.test('a relay port is only ever inside passivePorts (many PASV)', async (t) => {
  const h = await startHarness(t, { ports, portCount: 5 });
  const client = await h.login();
  const seen = new Set<number>();
  for (let i = 0; i < 15; i++) {
    const reply = await client.command(i % 2 ? 'EPSV' : 'PASV');
    const port = reply.code === 227 ? parse227(reply).port : Number(/\|\|\|(\d+)\|/.exec(reply.text)?.[1]);
    seen.add(port);
  }
  t.ok([...seen].every((p) => p >= h.range.first && p <= h.range.last), `all inside ${h.range.text}: ${[...seen].join(',')}`);
  t.ok(seen.size > 1, 'not always the same port');
  t.equal(leased(h), 1, 'only the last one is held');
  await noLeaks(t, h, client);
});

