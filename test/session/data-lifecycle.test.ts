/**
 * Data channel life cycle at the session level: every relay socket and port the proxy takes
 * is given back when the channel is replaced (PASV twice, PASV then PORT), when the upstream
 * leg cannot be opened, and when the session ends; pipelined PASV+RETR; EPSV ALL.
 * protocol.md §2.2, §3.5, §8.14, §8.16, §8.25. Relay ports 27000-27999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { PortBlocks, noLeaks, settleLeaks, startHarness } from '../helpers/fake-server.js';
import { openData, parse227, parse229 } from '../helpers/ftp-client.js';
import { withTimeout } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';

const ports = new PortBlocks(27000);
const FILE = randomBytes(100 * 1024);

/** Resolves with how the proxy ended the socket, or 'still-open' after `ms`. */
function closedByProxy(socket: net.Socket, ms = 3000): Promise<string> {
  return new Promise((resolve) => {
    let code = '';
    let ended = false;
    socket.on('data', () => {});
    socket.on('error', (err: NodeJS.ErrnoException) => {
      code = err.code ?? 'error';
    });
    socket.once('end', () => {
      ended = true;
    });
    const timer = setTimeout(() => resolve(ended ? 'end' : 'still-open'), ms);
    timer.unref();
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(code || (ended ? 'end' : 'closed'));
    });
    socket.resume();
  });
}

t.test('pipelined "PASV\\r\\nRETR": the RETR waits for the PASV setup', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'f.bin': FILE } } });
  const client = await h.login();
  client.sendRaw('PASV\r\nRETR f.bin\r\n');
  const pasv = await client.readReply();
  t.equal(pasv.code, 227, `227: ${pasv.text}`);
  const data = await openData('127.0.0.1', parse227(pasv).port);
  t.teardown(() => data.destroy());
  const download = readAll(data, 10000);
  t.equal((await client.readReply()).code, 150, '150');
  t.equal((await client.readReply(10000)).code, 226, '226');
  t.ok((await download).data.equals(FILE), 'data');
  await noLeaks(t, h, client);
});

t.test('PASV then PORT: the relay listener is closed and the active path is used (§8.25)', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'f.bin': FILE } } });
  const client = await h.login();
  const relayPort = parse227(await client.command('PASV')).port;
  const listener = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
  t.teardown(() => listener.close());
  const lport = (listener.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  t.equal((await client.command(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`)).code, 200, 'PORT ok');
  const refused = await openData('127.0.0.1', relayPort, { timeoutMs: 2000 }).then(
    (s) => {
      s.destroy();
      return 'connected';
    },
    (err: NodeJS.ErrnoException) => err.code ?? String(err),
  );
  t.equal(refused, 'ECONNREFUSED', 'the PASV relay listener is closed');
  client.send('RETR f.bin');
  const socket = await withTimeout(accepted, 5000, 'active connect');
  t.teardown(() => socket.destroy());
  const download = readAll(socket, 10000);
  t.equal((await client.readReply()).code, 150);
  t.equal((await client.readReply(10000)).code, 226);
  t.ok((await download).data.equals(FILE), 'data over the active connection');
  await noLeaks(t, h, client);
});

t.test('EPSV ALL: answered locally, PASV/PORT refused with 501, EPSV still works (§8.16)', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const before = h.fake!.received.length;
  const all = await client.command('EPSV ALL');
  t.equal(all.code, 200, `200: ${all.text}`);
  t.equal((await client.command('PASV')).code, 501, 'PASV refused');
  t.equal((await client.command('PORT 127,0,0,1,100,100')).code, 501, 'PORT refused');
  t.equal((await client.command('EPRT |1|127.0.0.1|25700|')).code, 501, 'EPRT refused');
  const epsv = await client.command('EPSV');
  t.equal(epsv.code, 229, 'EPSV works');
  parse229(epsv);
  t.same(h.fake!.received.slice(before), ['EPSV'], 'only the proxy EPSV for the client EPSV went upstream');
  await noLeaks(t, h, client);
});

t.test('a client data connection accepted but never used is closed when PASV is repeated', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const first = parse227(await client.command('PASV')).port;
  const data = await openData('127.0.0.1', first);
  t.teardown(() => data.destroy());
  const outcome = closedByProxy(data);
  t.equal((await client.command('PASV')).code, 227, 'second PASV');
  t.not(await outcome, 'still-open', 'the proxy closed the orphaned data connection of the first PASV');
  await noLeaks(t, h, client);
});

t.test('a client data connection accepted but never used is closed when the session ends', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const port = parse227(await client.command('PASV')).port;
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const outcome = closedByProxy(data);
  await client.quit();
  t.not(await outcome, 'still-open', 'the proxy closed the data connection with the session');
  t.same(await settleLeaks(h.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

t.test('upstream data port refused: 425, the command is not sent, the client data connection is closed (§8.14)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session) => {
        if (command.verb !== 'EPSV') return false;
        const listener = await session.openPassive();
        listener.close(); // advertises a port nobody listens on any more
        session.pendingData = null;
        session.reply(`229 Entering Extended Passive Mode (|||${listener.port}|)`);
        return true;
      },
    },
  });
  const client = await h.login();
  const port = parse227(await client.command('PASV')).port;
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const outcome = closedByProxy(data);
  const reply = await client.command('RETR f.bin', 8000);
  t.equal(reply.code, 425, `425: ${reply.text}`);
  t.notOk(h.fake!.verbs().includes('RETR'), 'RETR was not sent upstream');
  const how = await outcome;
  t.not(how, 'still-open', `the client data connection was closed (${how})`);
  t.not(how, 'end', 'and not as if a transfer had completed');
  await noLeaks(t, h, client);
});

t.test('server refuses the proxy EPSV with 530: the client sees the 530', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'EPSV' && command.verb !== 'PASV') return false;
        session.reply('530 Please login with USER and PASS.');
        return true;
      },
    },
  });
  const client = await h.connect();
  await client.readReply();
  const reply = await client.command('PASV');
  t.equal(reply.text, '530 Please login with USER and PASS.', 'passed through');
  t.equal(h.proxy.server.poolStats().reduce((n, p) => n + p.leased, 0), 0, 'relay port released');
  await noLeaks(t, h, client);
});
