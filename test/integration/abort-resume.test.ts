/**
 * ABOR in the middle of a download and REST/APPE resume, against a real vsftpd with
 * async_abor_enable NO and YES (protocol.md §3.4, §8.19-21), driven by real clients:
 * CPython ftplib (whose abort() sends ABOR as urgent data: the proxy sees "ABOR\r" with no
 * LF), raw BSD/lftp-style Telnet noise, and curl for resume.
 */
import t from 'tap';
import net from 'node:net';
import { mkdtempSync, rmSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { proxyYaml, startTestProxy, type TestProxy } from '../helpers/proxy.js';
import { sha256, sha256File, writeRandomFile } from '../helpers/clients.js';
import { run } from '../helpers/run.js';

const BIG = 48 * 1024 * 1024;
const SMALL = 2 * 1024 * 1024 + 3;

const FTPLIB_ABORT = `
import ftplib, sys, hashlib
host, port, user, pw = sys.argv[1:5]
f = ftplib.FTP()
f.connect(host, int(port), timeout=20)
f.login(user, pw)
f.voidcmd('TYPE I')
conn = f.transfercmd('RETR big.bin')
got = conn.recv(65536)
assert len(got) > 0
reply = f.abort()
print('ABORT-REPLY', reply.split()[0])
conn.close()
# vsftpd answers ABOR with a second reply (225/226) after the 426: drain to the NOOP's 200.
codes = []
f.putcmd('NOOP')
while True:
    line = f.getresp() if False else f.getmultiline()
    codes.append(line[:3])
    if line[:3] == '200':
        break
print('AFTER', ' '.join(codes))
h = hashlib.sha256()
f.retrbinary('RETR small.bin', h.update)
print('SMALL', h.hexdigest())
f.quit()
`;

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  for (const asyncAbor of ['NO', 'YES'] as const) {
    t.test(`vsftpd async_abor_enable=${asyncAbor}`, async (t) => {
      const vsftpd: VsftpdInstance = await startVsftpd({ extra: { async_abor_enable: asyncAbor } });
      t.teardown(() => vsftpd.stop());
      writeRandomFile(join(vsftpd.root, 'big.bin'), BIG);
      const smallHash = writeRandomFile(join(vsftpd.root, 'small.bin'), SMALL);
      const proxy: TestProxy = await startTestProxy(proxyYaml({ upstreamHost: vsftpd.host, upstreamPort: vsftpd.port, level: 'debug' }), { teardown: t });

      t.test('ftplib abort() mid-download (urgent ABOR, LF lost)', async (t) => {
        const result = await run('python3', ['-c', FTPLIB_ABORT, proxy.host, String(proxy.port), vsftpd.user, vsftpd.password], { timeoutMs: 30000 });
        t.equal(result.code, 0, `ftplib script exits 0 ${result.stderr.slice(-400)}`);
        t.match(result.stdout, /ABORT-REPLY (426|225|226)/, 'abort() got a 426/225/226 first');
        t.match(result.stdout, /AFTER (2\d\d )*200/, 'session still in step: NOOP answered');
        t.match(result.stdout, new RegExp(`SMALL ${smallHash}`), 'a full download after the abort is intact');
        t.match(vsftpd.protocolLog(), /"ABOR"/, 'a clean ABOR reached vsftpd');
      });

      for (const [name, prefix] of [
        ['BSD/tnftp (IAC IP, DM)', Buffer.from([0xff, 0xf4, 0xf2])],
        ['lftp (IAC IP IAC)', Buffer.from([0xff, 0xf4, 0xff])],
        ['full Synch (IAC IP IAC DM)', Buffer.from([0xff, 0xf4, 0xff, 0xf2])],
      ] as const) {
        t.test(`raw ABOR with ${name} noise`, async (t) => {
          const replies = await rawAbortSession(proxy, vsftpd, prefix);
          t.ok(replies.abortReplies.every((code) => ['426', '225', '226'].includes(code)), `ABOR replies ${replies.abortReplies.join(',')}`);
          t.equal(replies.abortReplies.length, 2, 'transfer reply and ABOR reply both passed through');
          t.equal(replies.noop, '200', 'NOOP after ABOR answered 200');
        });
      }

      t.test('REST + RETR resume (curl -C)', async (t) => {
        const dir = mkdtempSync(join(tmpdir(), 'ftpnp-rest-'));
        t.teardown(() => rmSync(dir, { recursive: true, force: true }));
        const partial = join(dir, 'small.part');
        const offset = 1_000_003;
        writeFileSync(partial, readFileSync(join(vsftpd.root, 'small.bin')).subarray(0, offset));
        const got = await run('curl', ['-sS', '--max-time', '20', '-C', String(offset), '-u', `${vsftpd.user}:${vsftpd.password}`, '-o', partial, `ftp://${proxy.host}:${proxy.port}/small.bin`]);
        t.equal(got.code, 0, got.stderr);
        t.equal(sha256File(partial), smallHash, 'resumed download intact');
        const commands = vsftpd.protocolLog().split('\n').filter((line) => line.includes('FTP command:'));
        const rest = commands.findIndex((line) => line.includes(`"REST ${offset}"`));
        t.ok(rest >= 0, 'REST reached vsftpd');
        t.match(commands[rest + 1] ?? '', /"RETR small\.bin"/, 'the very next command vsftpd saw was RETR');
      });

      t.test('REST + STOR resume upload (ftplib storbinary rest=)', async (t) => {
        const name = `rest-stor-${asyncAbor}.bin`;
        const full = readFileSync(join(vsftpd.root, 'small.bin'));
        const offset = 654_321;
        const remote = join(vsftpd.root, name);
        writeFileSync(remote, full.subarray(0, offset));
        await run('chown', [`${vsftpd.user}:`, remote]);
        const script = [
          'import ftplib, sys, io',
          'f = ftplib.FTP(); f.connect(sys.argv[1], int(sys.argv[2]), timeout=20); f.login(sys.argv[3], sys.argv[4])',
          'data = open(sys.argv[5], "rb").read()',
          'f.voidcmd("TYPE I")',
          `print(f.storbinary("STOR ${name}", io.BytesIO(data[${offset}:]), rest=${offset})[:3])`,
          'f.quit()',
        ].join('\n');
        const r = await run('python3', ['-c', script, proxy.host, String(proxy.port), vsftpd.user, vsftpd.password, join(vsftpd.root, 'small.bin')], { timeoutMs: 20000 });
        t.equal(r.stdout.trim(), '226', `STOR after REST completes ${r.stderr.slice(-300)}`);
        t.equal(sha256(readFileSync(remote)), smallHash, 'the resumed upload completes the file');
        const commands = vsftpd.protocolLog().split('\n').filter((line) => line.includes('FTP command:'));
        const rest = commands.findIndex((line) => line.includes(`"REST ${offset}"`));
        t.ok(rest >= 0, 'REST reached vsftpd');
        t.match(commands[rest + 1] ?? '', new RegExp(`"STOR ${name}"`), 'the very next command vsftpd saw was STOR');
      });

      t.test('APPE resume upload (curl -C - -T)', async (t) => {
        const dir = mkdtempSync(join(tmpdir(), 'ftpnp-appe-'));
        t.teardown(() => rmSync(dir, { recursive: true, force: true }));
        const full = readFileSync(join(vsftpd.root, 'small.bin'));
        const partialRemote = join(vsftpd.root, `appe-${asyncAbor}.bin`);
        writeFileSync(partialRemote, full.subarray(0, 777_777));
        await run('chown', [`${vsftpd.user}:`, partialRemote]); // vsftpd appends as the test user
        const source = join(dir, 'full.bin');
        writeFileSync(source, full);
        const put = await run('curl', ['-sS', '--max-time', '20', '-C', '-', '-T', source, '-u', `${vsftpd.user}:${vsftpd.password}`, `ftp://${proxy.host}:${proxy.port}/appe-${asyncAbor}.bin`]);
        t.equal(put.code, 0, put.stderr);
        t.equal(sha256(readFileSync(join(vsftpd.root, `appe-${asyncAbor}.bin`))), smallHash, 'appended upload completes the file');
      });

      t.test('no leaks', async (t) => {
        for (let i = 0; i < 50 && proxy.server.sessionCount > 0; i++) await new Promise((r) => setTimeout(r, 100));
        t.equal(proxy.server.sessionCount, 0, 'sessions closed');
        t.equal(proxy.server.poolStats()[0]!.leased, 0, 'relay ports released');
      });
    });
  }
}

/** Raw control client: PASV, RETR big.bin, read some data, send `<noise>ABOR\r\n`, NOOP. */
async function rawAbortSession(proxy: TestProxy, vsftpd: VsftpdInstance, noise: Buffer): Promise<{ abortReplies: string[]; noop: string }> {
  const control = net.connect({ host: proxy.host, port: proxy.port });
  control.setTimeout(20000, () => control.destroy(new Error('raw session timed out')));
  let buffered = '';
  const waiters: Array<() => void> = [];
  control.on('data', (d) => {
    buffered += d.toString('latin1');
    for (const w of waiters.splice(0)) w();
  });
  const nextReply = async (): Promise<string> => {
    for (;;) {
      const match = /^(\d{3}) [^\n]*\n/m.exec(buffered);
      if (match) {
        buffered = buffered.slice(match.index + match[0].length);
        return match[0].trim();
      }
      await new Promise<void>((resolve, reject) => {
        waiters.push(resolve);
        control.once('close', () => reject(new Error(`control closed; buffered: ${buffered}`)));
      });
    }
  };
  const send = (line: string | Buffer): void => {
    control.write(Buffer.isBuffer(line) ? line : `${line}\r\n`);
  };
  try {
    await nextReply();
    send(`USER ${vsftpd.user}`);
    await nextReply();
    send(`PASS ${vsftpd.password}`);
    await nextReply();
    send('TYPE I');
    await nextReply();
    send('PASV');
    const pasv = await nextReply();
    const m = /\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)/.exec(pasv)!;
    const data = net.connect({ host: `${m[1]}.${m[2]}.${m[3]}.${m[4]}`, port: Number(m[5]) * 256 + Number(m[6]) });
    data.on('error', () => {});
    await new Promise((resolve) => data.once('connect', resolve));
    send('RETR big.bin');
    const preliminary = await nextReply();
    if (!preliminary.startsWith('150')) throw new Error(`RETR: ${preliminary}`);
    await new Promise<void>((resolve) => data.once('data', () => resolve()));
    data.pause(); // keep the transfer in flight
    send(Buffer.concat([noise, Buffer.from('ABOR\r\n')]));
    const first = (await nextReply()).slice(0, 3);
    const second = (await nextReply()).slice(0, 3);
    data.destroy();
    send('NOOP');
    const noop = (await nextReply()).slice(0, 3);
    send('QUIT');
    await nextReply().catch(() => '');
    return { abortReplies: [first, second], noop };
  } finally {
    control.destroy();
  }
}
