/**
 * How the proxy reads the server's 227/229 and what the client gets back. The fake server
 * produces the odd forms vsftpd never writes (protocol.md §1.3, §8.1-§8.4, §8.6): the 227
 * address is always ignored (the proxy dials the server's control IP at the given port), and
 * the client always gets the canonical 227/229 with a relay port from passivePorts.
 * Relay ports 22000-22999 belong to this file.
 */
import t from 'tap';
import {
  FakeFtpServer,
  PortBlocks,
  noLeaks,
  startHarness,
  downloadFrom,
  type FakeHandler,
  type Harness,
} from '../helpers/fake-server.js';
import { parse227, parse229, type FtpClient } from '../helpers/ftp-client.js';
import { withTimeout } from '../helpers/async.js';
import type { TapTest as Tap } from '../helpers/tap.js';

const ports = new PortBlocks(22000);
const FILE = Buffer.from('hello from the fake server\n'.repeat(1000));
const CANONICAL_227 = /^227 Entering Passive Mode \(127,0,0,1,(\d{1,3}),(\d{1,3})\)\.$/;
const CANONICAL_229 = /^229 Entering Extended Passive Mode \(\|\|\|(\d{1,5})\|\)$/;

function p1p2(port: number): string {
  return `${port >> 8},${port & 255}`;
}

/** Answer the proxy's EPSV/PASV with custom text (the fake still opens a real listener). */
function passiveHandler(options: { epsv?: 'refuse' | ((port: number) => string); pasv?: (port: number) => string }): FakeHandler {
  return async (command, session) => {
    if (command.verb === 'EPSV' && options.epsv) {
      if (options.epsv === 'refuse') {
        session.reply('500 Unknown command.');
        return true;
      }
      const listener = await session.openPassive();
      session.write(options.epsv(listener.port));
      return true;
    }
    if (command.verb === 'PASV' && options.pasv) {
      const listener = await session.openPassive();
      session.write(options.pasv(listener.port));
      return true;
    }
    return false;
  };
}

/** PASV (or EPSV) through the proxy, then RETR; checks the canonical reply and the bytes. */
async function passiveRetr(t: Tap, h: Harness, client: FtpClient, style: 'PASV' | 'EPSV'): Promise<void> {
  const reply = await client.command(style);
  let port: number;
  if (style === 'PASV') {
    t.match(reply.text, CANONICAL_227, `canonical 227: ${reply.text}`);
    t.equal(reply.raw.toString('latin1'), `${reply.text}\r\n`, 'single line, CRLF');
    if (reply.code !== 227) return;
    const parsed = parse227(reply);
    t.equal(parsed.host, '127.0.0.1', 'advertise auto = the address the client dialled');
    port = parsed.port;
  } else {
    t.match(reply.text, CANONICAL_229, `canonical 229: ${reply.text}`);
    if (reply.code !== 229) return;
    port = parse229(reply);
  }
  t.ok(port >= h.range.first && port <= h.range.last, `relay port ${port} inside ${h.range.text}`);
  const download = downloadFrom(port);
  client.send('RETR hello.txt');
  const prelim = await client.readReply();
  t.equal(prelim.code, 150, `150 first: ${prelim.text}`);
  const final = await client.readReply(10000);
  t.equal(final.code, 226, `226 after: ${final.text}`);
  const data = await download;
  t.equal(data.outcome, 'end', 'data ended cleanly');
  t.ok(data.data.equals(FILE), `file relayed (${data.data.length} of ${FILE.length} bytes)`);
}

function dataFromControlIp(t: Tap, fake: FakeFtpServer | null): void {
  t.ok(fake && fake.dataRemotes.length > 0 && fake.dataRemotes.every((a) => a === '127.0.0.1'), `upstream data came from 127.0.0.1 (${fake?.dataRemotes.join(',')})`);
}

t.test('default: EPSV upstream, canonical 227 and 229 to the client', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'hello.txt': FILE } } });
  const client = await h.login();
  await passiveRetr(t, h, client, 'PASV');
  await passiveRetr(t, h, client, 'EPSV');
  t.same(h.fake!.verbs().filter((v) => v === 'EPSV' || v === 'PASV'), ['EPSV', 'EPSV'], 'the proxy used EPSV upstream both times');
  dataFromControlIp(t, h.fake);
  await noLeaks(t, h, client);
});

const ODD_227: Array<[string, (port: number) => string]> = [
  ['without parentheses (§8.2)', (port) => `227 Entering passive mode. 10,0,0,5,${p1p2(port)}\r\n`],
  ['"=h1,...,p2" form', (port) => `227 =10,0,0,5,${p1p2(port)}\r\n`],
  ['private address (§8.1)', (port) => `227 Entering Passive Mode (10,0,0,5,${p1p2(port)}).\r\n`],
  ['public NAT address from pasv_address (§8.3)', (port) => `227 Entering Passive Mode (198,18,5,9,${p1p2(port)}).\r\n`],
  ['multi-line 227 (§8.6)', (port) => `227-Entering Passive Mode\r\n227 (10,0,0,5,${p1p2(port)})\r\n`],
  ['spaces inside the group', (port) => `227 Entering Passive Mode (10, 0, 0, 5, ${port >> 8}, ${port & 255})\r\n`],
];

for (const [name, form] of ODD_227) {
  t.test(`upstream 227 ${name}: address ignored, canonical reply to the client`, async (t) => {
    const h = await startHarness(t, {
      ports,
      fake: { files: { 'hello.txt': FILE }, handler: passiveHandler({ epsv: 'refuse', pasv: form }) },
    });
    const client = await h.login();
    await passiveRetr(t, h, client, 'PASV');
    await passiveRetr(t, h, client, 'EPSV');
    dataFromControlIp(t, h.fake);
    await noLeaks(t, h, client);
  });
}

t.test("229 with a '!' delimiter (§8.4)", async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { files: { 'hello.txt': FILE }, handler: passiveHandler({ epsv: (port) => `229 Entering Extended Passive Mode (!!!${port}!)\r\n` }) },
  });
  const client = await h.login();
  await passiveRetr(t, h, client, 'EPSV');
  await passiveRetr(t, h, client, 'PASV');
  t.notOk(h.fake!.verbs().includes('PASV'), 'no PASV fallback was needed');
  await noLeaks(t, h, client);
});

t.test('EPSV refused with 500: falls back to PASV and remembers it for the session', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { files: { 'hello.txt': FILE }, handler: passiveHandler({ epsv: 'refuse' }) },
  });
  const client = await h.login();
  await passiveRetr(t, h, client, 'PASV');
  await passiveRetr(t, h, client, 'PASV');
  await passiveRetr(t, h, client, 'EPSV');
  const verbs = h.fake!.verbs().filter((v) => v === 'EPSV' || v === 'PASV');
  t.same(verbs, ['EPSV', 'PASV', 'PASV', 'PASV'], `EPSV tried once, then PASV only (${verbs.join(' ')})`);
  await noLeaks(t, h, client);
});

t.test('227 with an octet of 256: the client gets 425 and nothing hangs', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { files: { 'hello.txt': FILE }, handler: passiveHandler({ epsv: 'refuse', pasv: (port) => `227 Entering Passive Mode (127,0,0,1,256,${port & 255}).\r\n` }) },
  });
  const client = await h.login();
  const reply = await client.command('PASV');
  t.equal(reply.code, 425, `425: ${reply.text}`);
  const epsv = await client.command('EPSV');
  t.equal(epsv.code, 425, `EPSV too: ${epsv.text}`);
  const noop = await client.command('NOOP');
  t.equal(noop.code, 200, 'session still answers');
  t.equal(h.proxy.server.poolStats().reduce((n, p) => n + p.leased, 0), 0, 'no relay port held after the failure');
  const warn = h.proxy.logs().find((r) => r.event === 'data-setup-failed');
  t.equal(warn?.code, 'FTPP_ERR_UPSTREAM_DATA_SETUP', 'logged with its code');
  await noLeaks(t, h, client);
});

t.test('229 with a port out of range (70000): 425', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: { handler: passiveHandler({ epsv: () => '229 Entering Extended Passive Mode (|||70000|)\r\n' }) },
  });
  const client = await h.login();
  const reply = await client.command('EPSV');
  t.equal(reply.code, 425, `425: ${reply.text}`);
  t.equal((await client.command('NOOP')).code, 200, 'session still answers');
  await noLeaks(t, h, client);
});

t.test('upstream 227 split into three segments (§8.7)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      files: { 'hello.txt': FILE },
      handler: async (command, session) => {
        if (command.verb === 'EPSV') {
          session.reply('502 EPSV not implemented.');
          return true;
        }
        if (command.verb !== 'PASV') return false;
        const listener = await session.openPassive();
        const text = `227 Entering Passive Mode (10,0,0,5,${p1p2(listener.port)}).\r\n`;
        session.write(text.slice(0, 16));
        await new Promise((r) => setTimeout(r, 60));
        session.write(text.slice(16, text.length - 4));
        await new Promise((r) => setTimeout(r, 60));
        session.write(text.slice(text.length - 4));
        return true;
      },
    },
  });
  const client = await h.login();
  await passiveRetr(t, h, client, 'PASV');
  await noLeaks(t, h, client);
});

t.test('PASV twice: only the second relay port is used (§8.25)', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'hello.txt': FILE } } });
  const client = await h.login();
  // The pool picks at random and may hand back the port it just released (the old listener
  // is closed first); repeat until the second PASV lands on another port, so that "the first
  // listener is closed" can be observed.
  let first = parse227(await client.command('PASV'));
  let second = await client.command('PASV');
  for (let i = 0; i < 20 && parse227(second).port === first.port; i++) {
    first = parse227(second);
    second = await client.command('PASV');
  }
  t.match(second.text, CANONICAL_227);
  const secondPort = parse227(second).port;
  t.not(secondPort, first.port, 'a new port');
  const refused = await downloadFrom(first.port, '127.0.0.1', 3000).then(
    () => 'connected',
    (err: NodeJS.ErrnoException) => err.code ?? String(err),
  );
  t.equal(refused, 'ECONNREFUSED', 'the first relay listener is closed');
  const download = downloadFrom(secondPort);
  t.equal((await client.command('RETR hello.txt', 10000)).code, 226, 'transfer on the second');
  t.ok((await withTimeout(download, 10000, 'download')).data.equals(FILE), 'data');
  await noLeaks(t, h, client);
});
