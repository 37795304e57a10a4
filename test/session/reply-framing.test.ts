/**
 * Control-stream framing through the proxy: whole replies, byte for byte, whatever the TCP
 * segmentation; pipelined commands; FEAT editing. protocol.md §1.1, §1.2, §8.5, §8.7, §8.9,
 * §8.10, §8.19, §8.32. Relay ports 23000-23999 belong to this file.
 */
import t from 'tap';
import { PortBlocks, noLeaks, startHarness } from '../helpers/fake-server.js';
import { parse227, type FtpClient } from '../helpers/ftp-client.js';
import { delay } from '../helpers/async.js';

const ports = new PortBlocks(23000);

t.test('multi-line reply with a 227-looking inner line is relayed byte for byte (§8.5)', async (t) => {
  const STATUS = '211-Status\r\n227 Entering Passive Mode (10,0,0,5,1,2)\r\n 226 x\r\n211-not the end\r\n2110 neither\r\n211 End\r\n';
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'STAT') return false;
        session.write(STATUS);
        return true;
      },
    },
  });
  const client = await h.login();
  const reply = await client.command('STAT');
  t.equal(reply.raw.toString('latin1'), STATUS, 'identical bytes');
  t.equal(h.proxy.server.poolStats().reduce((n, p) => n + p.leased, 0), 0, 'no relay listener opened for the inner 227');
  const noop = await client.command('NOOP');
  t.equal(noop.code, 200, 'the next reply is matched to the next command');
  t.equal(client.queued, 0, 'no stray replies');
  await noLeaks(t, h, client);
});

t.test('a reply split into three segments reaches the client as one reply, only when complete (§8.7)', async (t) => {
  let client: FtpClient | null = null;
  let receivedBeforeLast = -1;
  let receivedBeforeCommand = -1;
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session) => {
        if (command.verb !== 'NOOP') return false;
        session.write('200 NO');
        await delay(60);
        session.write('OP o');
        await delay(150);
        receivedBeforeLast = client?.received.length ?? -2;
        session.write('k.\r\n');
        return true;
      },
    },
  });
  client = await h.login();
  receivedBeforeCommand = client.received.length;
  const reply = await client.command('NOOP');
  t.equal(reply.raw.toString('latin1'), '200 NOOP ok.\r\n', 'one reply, reassembled');
  t.equal(receivedBeforeLast, receivedBeforeCommand, 'nothing was passed on before the CRLF');
  await noLeaks(t, h, client);
});

t.test('a multi-line FEAT split inside a feature line is not cut (§8.32)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: async (command, session) => {
        if (command.verb !== 'FEAT') return false;
        session.write('211-Features:\r\n EP');
        await delay(50);
        session.write('SV\r\n MDTM\r\n');
        await delay(50);
        session.write(' SIZE\r\n211 End\r\n');
        return true;
      },
    },
  });
  const client = await h.login();
  const reply = await client.command('FEAT');
  t.equal(reply.code, 211);
  t.equal(reply.lines[0], '211-Features:');
  t.equal(reply.lines[reply.lines.length - 1], '211 End');
  t.ok(reply.lines.includes(' EPSV') && reply.lines.includes(' MDTM') && reply.lines.includes(' SIZE'), `features kept: ${JSON.stringify(reply.lines)}`);
  t.equal(client.queued, 0, 'exactly one reply');
  await noLeaks(t, h, client);
});

t.test('two commands in one segment get two replies in order (§8.9)', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  client.sendRaw('TYPE I\r\nPASV\r\n');
  const first = await client.readReply();
  const second = await client.readReply();
  t.equal(first.code, 200, `TYPE first: ${first.text}`);
  t.equal(second.code, 227, `PASV second: ${second.text}`);
  parse227(second);
  const after = h.fake!.received.slice(2);
  t.same(after, ['TYPE I', 'EPSV'], 'upstream saw TYPE I, then the proxy EPSV');
  client.sendRaw('SYST\r\nNOOP\r\nTYPE A\r\n');
  const codes = [(await client.readReply()).code, (await client.readReply()).code, (await client.readReply()).code];
  t.same(codes, [215, 200, 200], 'three replies in order');
  await noLeaks(t, h, client);
});

t.test('two server replies in one segment are matched to their commands', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb === 'NOOP') return true; // answered together with SYST
        if (command.verb === 'SYST') {
          session.write('200 NOOP ok.\r\n215 UNIX Type: L8\r\n');
          return true;
        }
        return false;
      },
    },
  });
  const client = await h.login();
  client.sendRaw('NOOP\r\nSYST\r\n');
  const a = await client.readReply();
  const b = await client.readReply();
  t.same([a.text, b.text], ['200 NOOP ok.', '215 UNIX Type: L8']);
  await noLeaks(t, h, client);
});

t.test('bare LF and a stray CR (§8.10): one command each, CRLF upstream', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.login();
  client.sendRaw('syst\n');
  t.equal((await client.readReply()).code, 215, 'bare LF works');
  client.sendRaw('NOOP\r');
  await delay(50);
  client.sendRaw('\r\n');
  t.equal((await client.readReply()).code, 200, 'NOOP\\r + \\r\\n is one NOOP');
  await delay(100);
  t.equal(client.queued, 0, 'no second reply');
  const raw = h.fake!.raw.toString('latin1');
  t.notOk(/[^\r]\n/.test(raw), `every line upstream ends in CRLF: ${JSON.stringify(raw)}`);
  t.equal(h.fake!.verbs().filter((v) => v === 'NOOP').length, 1, 'one NOOP upstream');
  t.equal(h.fake!.verbs().filter((v) => v === 'SYST').length, 1, 'one SYST upstream');
  await noLeaks(t, h, client);
});

t.test('FEAT is edited: security features removed, EPRT/EPSV listed, the rest kept (§4.3, §8.32)', async (t) => {
  const FEAT = ['211-Features:', ' AUTH TLS', ' MDTM', ' PASV', ' PBSZ', ' PROT', ' REST STREAM', ' SIZE', ' UTF8', '211 End'];
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'FEAT') return false;
        session.write(FEAT.join('\r\n') + '\r\n');
        return true;
      },
    },
  });
  const client = await h.login();
  const reply = await client.command('FEAT');
  t.equal(reply.code, 211);
  t.equal(reply.lines[0], '211-Features:', 'first line');
  t.equal(reply.lines[reply.lines.length - 1], '211 End', 'last line');
  const features = reply.lines.slice(1, -1).map((line) => line.trim().split(' ')[0]);
  for (const kept of ['MDTM', 'PASV', 'REST', 'SIZE', 'UTF8', 'EPRT', 'EPSV']) t.ok(features.includes(kept), `lists ${kept}`);
  for (const removed of ['AUTH', 'PBSZ', 'PROT']) t.notOk(features.includes(removed), `does not list ${removed}`);
  t.ok(reply.lines.slice(1, -1).every((line) => line.startsWith(' ')), 'feature lines start with one SP (RFC 2389)');
  t.ok(h.fake!.verbs().includes('FEAT'), 'FEAT went upstream');
  await noLeaks(t, h, client);
});

t.test('FEAT refused by the server passes through unchanged', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'FEAT') return false;
        session.reply('500 Unknown command.');
        return true;
      },
    },
  });
  const client = await h.login();
  const reply = await client.command('FEAT');
  t.equal(reply.raw.toString('latin1'), '500 Unknown command.\r\n');
  await noLeaks(t, h, client);
});

t.test('Telnet noise before ABOR is stripped (§8.19)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'ABOR') return false;
        session.reply('225 No transfer to ABOR.');
        return true;
      },
    },
  });
  const client = await h.login();
  for (const noise of ['\xff\xf4\xf2ABOR\r\n', '\xff\xf4\xffABOR\r\n', '\xff\xf4\xff\xf2ABOR\r\n']) {
    client.sendRaw(noise);
    t.equal((await client.readReply()).code, 225, `answered: ${JSON.stringify(noise)}`);
  }
  const abors = h.fake!.received.filter((line) => line.includes('ABOR'));
  t.same(abors, ['ABOR', 'ABOR', 'ABOR'], 'clean ABOR upstream each time');
  await noLeaks(t, h, client);
});

t.test('CPython-style urgent ABOR (ABOR\\r, no LF) is not a deadlock (§8.20)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'ABOR') return false;
        session.reply('225 No transfer to ABOR.');
        return true;
      },
    },
  });
  const client = await h.login();
  client.sendRaw('ABOR\r');
  t.equal((await client.readReply(3000)).code, 225, 'answered after the idle wait');
  await noLeaks(t, h, client);
});

t.test('commands sent before the greeting are answered after it, in order', async (t) => {
  const h = await startHarness(t, { ports });
  const client = await h.connect();
  client.sendRaw('USER a\r\nPASS b\r\nSYST\r\n');
  const codes: number[] = [];
  for (let i = 0; i < 4; i++) codes.push((await client.readReply()).code);
  t.same(codes, [220, 331, 230, 215], 'greeting first, then the three replies');
  await noLeaks(t, h, client);
});

t.test('multi-line greeting and a 120 before the 220 are relayed byte for byte (RFC 959 §5.4)', async (t) => {
  const GREETING = '220-Welcome\r\n220-second line\r\n 220 not the end\r\n220 ready';
  const h1 = await startHarness(t, { ports, fake: { greeting: GREETING } });
  const c1 = await h1.connect();
  const g1 = await c1.readReply();
  t.equal(g1.raw.toString('latin1'), `${GREETING}\r\n`, 'multi-line greeting unchanged');
  t.equal((await c1.command('USER a')).code, 331, 'next reply matched to USER');
  await noLeaks(t, h1, c1);

  const h2 = await startHarness(t, {
    ports,
    fake: {
      greeting: '120 Service ready in 1 minute.',
      onConnection: (session) => setTimeout(() => session.reply('220 ready now'), 100),
    },
  });
  const c2 = await h2.connect();
  const first = await c2.readReply();
  const second = await c2.readReply();
  t.same([first.text, second.text], ['120 Service ready in 1 minute.', '220 ready now'], '120 then 220');
  t.equal((await c2.command('USER a')).code, 331, 'next reply matched to USER');
  await noLeaks(t, h2, c2);
});

t.test('an endless reply line from the server: 421, then close (bounded buffer)', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'NOOP') return false;
        session.write('200 ' + 'x'.repeat(64 * 1024));
        return true;
      },
    },
  });
  const client = await h.login();
  client.send('NOOP');
  const reply = await client.readReply(5000);
  t.equal(reply.code, 421, `421: ${reply.text}`);
  t.ok(reply.raw.length < 200, 'the over-long text is not relayed');
  t.ok(await client.waitEnded(5000), 'closed');
  const warn = h.proxy.logs().find((r) => r.event === 'upstream-protocol-error');
  t.equal(warn?.code, 'FTPP_ERR_UPSTREAM_REPLY_TOO_LONG', 'logged with its code');
  await noLeaks(t, h, client);
});

t.test('a line that is not an FTP reply: 421 protocol error, then close', async (t) => {
  const h = await startHarness(t, {
    ports,
    fake: {
      handler: (command, session) => {
        if (command.verb !== 'NOOP') return false;
        session.write('HTTP/1.1 400 Bad Request\r\n');
        return true;
      },
    },
  });
  const client = await h.login();
  client.send('NOOP');
  const reply = await client.readReply(5000);
  t.equal(reply.text, '421 Service not available: server protocol error.', reply.text);
  t.ok(await client.waitEnded(5000), 'closed');
  await noLeaks(t, h, client);
});
