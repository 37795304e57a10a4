/**
 * Transfers through the proxy against the fake server: the 226/data-EOF race (protocol.md
 * §3.3, §8.22), uploads ending with FIN vs RST (§3.2, §8.23), early half-close (§8.24),
 * server-side resets, ABOR (§3.4, §8.21) and an active-mode client.
 * Relay ports 25000-25999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { PortBlocks, readUpload, noLeaks, startHarness, type FakeHandler } from '../helpers/fake-server.js';
import { openData, parse227, type FtpClient } from '../helpers/ftp-client.js';
import { delay, withTimeout } from '../helpers/async.js';
import { readAll } from '../helpers/sockets.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(25000);
const SMALL = randomBytes(64 * 1024);
const FOUR_MIB = randomBytes(4 * 1024 * 1024);

/**
 * Register a test once per relay implementation: the default (kernel splice when the addon is
 * built, see src/data/splice-relay.ts) and the JS relay (FTPNP_RELAY=js), so both keep the
 * FIN/RST and hold rules. Tests run one at a time, so switching the variable is safe.
 */
function relayTest(name: string, fn: (t: TapTest) => Promise<void>): void {
  for (const mode of ['default', 'js'] as const) {
    t.test(`${name} [${mode} relay]`, async (t) => {
      const saved = process.env.FTPNP_RELAY;
      if (mode === 'js') process.env.FTPNP_RELAY = 'js';
      t.teardown(() => {
        if (saved === undefined) delete process.env.FTPNP_RELAY;
        else process.env.FTPNP_RELAY = saved;
      });
      await fn(t);
    });
  }
}

/**
 * A RETR handler that queues the whole file and its FIN and sends the 226 at once, as vsftpd
 * does once the last bytes are in its socket buffer: the proxy must hold the 226 until the
 * data is delivered, and the server cannot know whether the client's leg will fail.
 */
function retrThen226AtOnce(file: Buffer): FakeHandler {
  return async (command, session) => {
    if (command.verb !== 'RETR') return false;
    const data = await session.takeData();
    if (!data) return false;
    session.reply('150 Opening BINARY mode data connection.');
    data.end(file);
    session.reply('226 Transfer complete.');
    return true;
  };
}

async function pasvPort(t: TapTest, client: FtpClient): Promise<number> {
  const reply = await client.command('PASV');
  t.equal(reply.code, 227, `PASV: ${reply.text}`);
  return parse227(reply).port;
}

relayTest('226 race: the 226 is held until the data is flushed; a pipelined NOOP answer comes after it (§8.22)', async (t) => {
  const BIG = Buffer.alloc(32 * 1024 * 1024, 0x5a);
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session) => {
        if (command.verb !== 'RETR') return false;
        const data = await session.takeData();
        if (!data) {
          session.reply('425 Failed to establish connection.');
          return true;
        }
        session.reply('150 Opening BINARY mode data connection for big.bin (33554432 bytes).');
        // Everything queued, FIN queued, and the 226 sent at once: the proxy sees the 226
        // while megabytes are still on their way.
        data.end(BIG);
        session.reply('226 Transfer complete.');
        return true;
      },
    },
  });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  data.pause(); // a slow client: reads nothing for a while
  client.sendRaw('RETR big.bin\r\nNOOP\r\n');
  const prelim = await client.readReply();
  t.equal(prelim.code, 150, `150: ${prelim.text}`);
  await delay(800);
  t.equal(client.queued, 0, `no reply while the client has not read the data (got ${client.received.toString('latin1').split('\r\n').slice(-3).join(' | ')})`);
  let received = 0;
  data.on('data', (chunk: Buffer) => {
    received += chunk.length;
  });
  const download = readAll(data, 30000);
  const final = await client.readReply(30000);
  const receivedAtFinal = received;
  const noop = await client.readReply(5000);
  t.equal(final.text, '226 Transfer complete.', 'the 226 comes first');
  t.equal(noop.text, '200 NOOP ok.', 'the pipelined NOOP reply after it');
  const result = await download;
  t.equal(result.outcome, 'end', 'data ended cleanly');
  t.equal(result.data.length, BIG.length, 'every byte delivered');
  // 'finish' means handed to the kernel: at most the loopback socket buffers can still be in
  // flight when the 226 arrives, never most of the file.
  t.ok(receivedAtFinal >= BIG.length - 12 * 1024 * 1024, `most data already read when the 226 came (${receivedAtFinal} of ${BIG.length})`);
  await noLeaks(t, h, client);
});

relayTest('upload ended with FIN: the server gets every byte and a clean end, 226', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  client.send('STOR up.bin');
  t.equal((await client.readReply()).code, 150, '150');
  data.end(FOUR_MIB);
  const final = await client.readReply(10000);
  t.equal(final.text, '226 Transfer complete.', '226');
  const upload = h.fake!.uploads[0];
  t.equal(upload?.outcome, 'end', 'clean end upstream');
  t.ok(upload?.data.equals(FOUR_MIB), `all bytes (${upload?.data.length})`);
  await noLeaks(t, h, client);
});

relayTest('upload truncated by a client reset: the server sees a reset, not a clean end (§8.23)', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  data.on('error', () => {});
  client.send('STOR cut.bin');
  t.equal((await client.readReply()).code, 150, '150');
  data.write(randomBytes(256 * 1024));
  await delay(150);
  data.resetAndDestroy();
  const final = await client.readReply(10000);
  t.equal(final.code, 426, `the server's 426 reaches the client: ${final.text}`);
  const upload = h.fake!.uploads[0];
  t.equal(upload?.outcome, 'error', `the server's data socket failed (${upload?.outcome} ${upload?.error})`);
  t.not(upload?.outcome, 'end', 'never a clean end');
  t.equal((await client.command('NOOP')).code, 200, 'session goes on');
  await noLeaks(t, h, client);
});

relayTest('download with the client FIN right after connecting still gets every byte (§8.24)', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'four.bin': FOUR_MIB } } });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port, { allowHalfOpen: true });
  t.teardown(() => data.destroy());
  data.end(); // FIN at once, still reading
  const download = readAll(data, 20000);
  client.send('RETR four.bin');
  t.equal((await client.readReply()).code, 150, '150');
  t.equal((await client.readReply(20000)).code, 226, '226');
  const result = await download;
  t.equal(result.outcome, 'end', 'clean end');
  t.equal(result.data.length, FOUR_MIB.length, 'all 4 MiB');
  t.ok(result.data.equals(FOUR_MIB), 'byte for byte');
  await noLeaks(t, h, client);
});

relayTest('server resets the data connection mid-download: the client sees a reset and the 426', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session) => {
        if (command.verb !== 'RETR') return false;
        const data = await session.takeData();
        if (!data) return false;
        session.reply('150 Opening BINARY mode data connection.');
        data.write(randomBytes(512 * 1024));
        await delay(100);
        data.resetAndDestroy();
        session.reply('426 Failure writing network stream.');
        return true;
      },
    },
  });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const download = readAll(data, 10000);
  client.send('RETR x');
  t.equal((await client.readReply()).code, 150, '150');
  const final = await client.readReply(10000);
  t.equal(final.code, 426, `426: ${final.text}`);
  const result = await download;
  t.equal(result.outcome, 'error', `the client data socket was reset, not ended (${result.outcome}, ${result.data.length} bytes)`);
  await noLeaks(t, h, client);
});

relayTest('three transfers in a row on one session', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'small.bin': SMALL } } });
  const client = await h.login();
  for (let i = 0; i < 3; i++) {
    const port = await pasvPort(t, client);
    const download = openData('127.0.0.1', port).then((s) => readAll(s, 10000));
    const final = await client.command('RETR small.bin', 10000);
    t.equal(final.code, 226, `transfer ${i + 1}: 226`);
    const result = await download;
    t.ok(result.data.equals(SMALL), `transfer ${i + 1}: data`);
  }
  await noLeaks(t, h, client);
});

relayTest('RETR of a missing file: 550, and the relay port is given back', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const read = readAll(data, 5000);
  const final = await client.command('RETR nope.bin');
  t.equal(final.code, 550, `550: ${final.text}`);
  const result = await read;
  t.not(result.outcome, 'end', `the client data socket is not closed as if complete (${result.outcome})`);
  await noLeaks(t, h, client);
});

relayTest('ABOR during a download: both data legs reset, 426 then 225 in order (§8.21)', async (t) => {
  let serverDataOutcome = '';
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session) => {
        if (command.verb === 'ABOR') {
          session.reply('225 No transfer to ABOR.');
          return true;
        }
        if (command.verb !== 'RETR') return false;
        const data = await session.takeData();
        if (!data) return false;
        session.reply('150 Opening BINARY mode data connection.');
        const chunk = Buffer.alloc(64 * 1024, 1);
        serverDataOutcome = await new Promise<string>((resolve) => {
          data.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
          data.once('close', () => resolve('close'));
          const pump = (): void => {
            if (data.destroyed) return;
            if (data.write(chunk)) setTimeout(pump, 5);
            else data.once('drain', pump);
          };
          pump();
        });
        session.reply('426 Failure writing network stream.');
        return true;
      },
    },
  });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  const download = readAll(data, 10000);
  client.send('RETR endless.bin');
  t.equal((await client.readReply()).code, 150, '150');
  await delay(200);
  client.send('ABOR');
  const first = await client.readReply(10000);
  const second = await client.readReply(10000);
  t.same([first.code, second.code], [426, 225], `426 then 225: ${first.text} / ${second.text}`);
  const result = await download;
  t.equal(result.outcome, 'error', `client data leg reset (${result.outcome})`);
  t.ok(['ECONNRESET', 'EPIPE'].includes(serverDataOutcome), `server data leg reset (${serverDataOutcome})`);
  t.equal(h.fake!.received.filter((l) => l.includes('ABOR')).at(-1), 'ABOR', 'a clean ABOR went upstream');
  await noLeaks(t, h, client);
});

relayTest('active client (PORT 127,0,0,1): the proxy connects back and relays', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'small.bin': SMALL } } });
  const client = await h.login();
  const listener = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
  t.teardown(() => listener.close());
  const lport = (listener.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const reply = await client.command(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`);
  t.equal(reply.code, 200, `200: ${reply.text}`);
  client.send('RETR small.bin');
  const socket = await withTimeout(accepted, 5000, 'proxy connects to the client');
  t.teardown(() => socket.destroy());
  t.equal(socket.remoteAddress, '127.0.0.1', 'from the address the client dialled');
  const result = readAll(socket, 10000);
  t.equal((await client.readReply()).code, 150, '150');
  t.equal((await client.readReply(10000)).code, 226, '226');
  t.ok((await result).data.equals(SMALL), 'data');
  t.same(h.fake!.verbs().filter((v) => ['EPSV', 'PASV', 'PORT', 'EPRT'].includes(v)), ['EPSV'], 'passive toward the server');
  await noLeaks(t, h, client);
});

relayTest('LIST through the relay', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const download = openData('127.0.0.1', port).then((s) => readAll(s, 10000));
  client.send('LIST');
  t.equal((await client.readReply()).text, '150 Here comes the directory listing.');
  t.equal((await client.readReply(10000)).text, '226 Directory send OK.');
  t.match((await download).data.toString(), /hello\r\n$/, 'listing relayed');
  await noLeaks(t, h, client);
});

relayTest('active client that cannot be reached: 425 and the transfer command is not sent (§8.14)', async (t) => {
  const h = await startHarness(t, { ports, fake: { files: { 'small.bin': SMALL } } });
  const client = await h.login();
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
  const lport = (listener.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => listener.close(() => resolve()));
  t.equal((await client.command(`PORT 127,0,0,1,${lport >> 8},${lport & 255}`)).code, 200, 'PORT accepted');
  const reply = await client.command('RETR small.bin', 8000);
  t.equal(reply.code, 425, `425: ${reply.text}`);
  t.notOk(h.fake!.verbs().includes('RETR'), 'RETR not forwarded');
  t.equal((await client.command('NOOP')).code, 200, 'session goes on');
  await noLeaks(t, h, client);
});

relayTest('a client that never reads: after transferReplyHold the data leg is reset and the client gets 426, not the 226', async (t) => {
  const BIG = Buffer.alloc(32 * 1024 * 1024, 0x33);
  const h = await startHarness(t, {
    ports,
    extraYaml: ['    timeouts:', '      transferReplyHoldSeconds: 1', '      dataConnectSeconds: 2'].join('\n'),
    fake: { handler: retrThen226AtOnce(BIG) },
  });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  data.pause();
  const started = Date.now();
  client.send('RETR big.bin');
  t.equal((await client.readReply()).code, 150, '150');
  const final = await client.readReply(10000);
  t.equal(final.text, '426 Connection closed; transfer aborted.', `426 after the hold, not the server's 226: ${final.text}`);
  t.ok(Date.now() - started >= 900, `held for about transferReplyHoldSeconds (${Date.now() - started} ms)`);
  const result = await readAll(data, 10000);
  t.ok(result.data.length < BIG.length, `cut short, as the hold expired (${result.data.length} of ${BIG.length})`);
  t.equal(result.outcome, 'error', `the client data leg was reset, never ended as if complete (${result.outcome})`);
  await noLeaks(t, h, client);
});

relayTest('a client that resets its data connection mid-download gets 426, never the server\'s 226 (issue #10)', async (t) => {
  const BIG = Buffer.alloc(32 * 1024 * 1024, 0x44);
  const h = await startHarness(t, {
    ports,
    fake: { handler: retrThen226AtOnce(BIG) },
  });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  let received = 0;
  const cut = new Promise<void>((resolve) => {
    data.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (received >= 64 * 1024 && !data.destroyed) {
        data.resetAndDestroy();
        resolve();
      }
    });
  });
  data.on('error', () => {});
  client.send('RETR big.bin');
  t.equal((await client.readReply()).code, 150, '150');
  await withTimeout(cut, 10000, 'client read 64 KiB and reset');
  const final = await client.readReply(10000);
  t.equal(final.text, '426 Connection closed; transfer aborted.', `426, not the server's 226 (${final.text})`);
  const record = await withTimeout(
    (async () => {
      for (;;) {
        const found = h.proxy.logs().find((r) => r.event === 'transfer');
        if (found) return found;
        await delay(20);
      }
    })(),
    5000,
    'transfer log record',
  );
  t.equal(record.result, 'failed', 'logged as failed');
  t.equal(record.reply, 426, 'with the reply the client got');
  t.equal(record.serverReply, 226, 'and the server\'s own');
  t.ok(Number(record.bytes) < BIG.length, `partial byte count (${String(record.bytes)})`);
  t.equal((await client.command('NOOP')).code, 200, 'the session goes on');
  await noLeaks(t, h, client);
});

relayTest('upload reset while the server reads slowly (relay under backpressure): still a reset upstream', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session, server) => {
        if (command.verb !== 'STOR') return false;
        const data = await session.takeData();
        if (!data) return false;
        session.reply('150 Ok to send data.');
        data.pause(); // a slow server: the proxy has to stop reading the client
        await delay(600);
        const upload = readUpload(command.arg, data);
        data.resume();
        const result = await upload;
        server.uploads.push(result);
        session.reply(result.outcome === 'end' ? '226 Transfer complete.' : '426 Failure reading network stream.');
        return true;
      },
    },
  });
  const client = await h.login();
  const port = await pasvPort(t, client);
  const data = await openData('127.0.0.1', port);
  t.teardown(() => data.destroy());
  data.on('error', () => {});
  client.send('STOR slow.bin');
  t.equal((await client.readReply()).code, 150, '150');
  const chunk = Buffer.alloc(64 * 1024, 9);
  for (let i = 0; i < 128; i++) data.write(chunk); // 8 MiB queued
  await delay(250);
  data.resetAndDestroy();
  const final = await client.readReply(10000);
  t.equal(final.code, 426, `never a 226 for a reset upload: ${final.text}`);
  const upload = h.fake!.uploads[0];
  t.equal(upload?.outcome, 'error', `the server's data socket saw a reset (${upload?.outcome}, ${upload?.data.length} bytes)`);
  await noLeaks(t, h, client);
});
