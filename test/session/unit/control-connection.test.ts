/**
 * ControlConnection (src/session/control-connection.ts) on real loopback sockets: lines
 * framed across any chunking, flow control by reason, the three endings, and upgrade() to
 * TLS in place without losing bytes read before it. The TLS test makes its own self-signed
 * certificate with openssl in a temp dir.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ControlConnection, type ControlConnectionHandlers } from '../../../src/session/control-connection.js';
import { findCommand } from '../../helpers/netns.js';
import type { TapTest } from '../../helpers/tap.js';

interface Pair {
  readonly server: net.Socket;
  readonly client: net.Socket;
}

async function socketPair(t: TapTest): Promise<Pair> {
  const listener = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect({ host: '127.0.0.1', port: (listener.address() as net.AddressInfo).port, allowHalfOpen: true });
  const server = await accepted;
  await new Promise<void>((resolve) => (client.readyState === 'open' ? resolve() : client.once('connect', () => resolve())));
  listener.close();
  for (const s of [server, client]) s.on('error', () => {});
  t.teardown(() => {
    server.destroy();
    client.destroy();
  });
  return { server, client };
}

interface Events {
  lines: string[];
  ends: number;
  closes: Array<Error | null>;
  overflows: number;
  handlers: ControlConnectionHandlers;
}

function events(): Events {
  const e: Events = {
    lines: [],
    ends: 0,
    closes: [],
    overflows: 0,
    handlers: {
      lines: (lines) => e.lines.push(...lines.map((l) => l.text.toString('latin1'))),
      overflow: () => { e.overflows += 1; },
      end: () => { e.ends += 1; },
      close: (err) => e.closes.push(err),
    },
  };
  return e;
}

async function until(check: () => boolean, ms = 3000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!check() && Date.now() < end) await new Promise((resolve) => setTimeout(resolve, 10));
  return check();
}

t.test('lines across chunks, a FIN, then close once', async (t) => {
  const { server, client } = await socketPair(t);
  const e = events();
  const conn = new ControlConnection(server, 512, e.handlers);
  conn.start();
  client.write('US');
  client.write('ER a\r\nPASS b\r');
  client.write('\nNOOP\r\n');
  t.ok(await until(() => e.lines.length === 3), 'three lines');
  t.same(e.lines, ['USER a', 'PASS b', 'NOOP']);
  t.ok(conn.writeLine(Buffer.from('331 ok')), 'writeLine adds CRLF');
  const got = new Promise<string>((resolve) => client.once('data', (d: Buffer) => resolve(d.toString())));
  t.equal(await got, '331 ok\r\n');
  client.end();
  t.ok(await until(() => e.ends === 1), 'FIN reported');
  conn.end();
  t.ok(await until(() => e.closes.length === 1), 'close reported');
  t.same(e.closes, [null], 'without an error');
  t.ok(conn.isClosed);
  t.notOk(conn.write(Buffer.from('x')), 'nothing written after close');
});

t.test('a line over maxLineBytes is an overflow', async (t) => {
  const { server, client } = await socketPair(t);
  const e = events();
  new ControlConnection(server, 64, e.handlers).start();
  client.write(`${'A'.repeat(100)}\r\n`);
  t.ok(await until(() => e.overflows === 1));
  t.same(e.lines, []);
});

t.test('flow control: paused while any reason holds; discardInput reads and drops', async (t) => {
  const { server, client } = await socketPair(t);
  const e = events();
  const conn = new ControlConnection(server, 512, e.handlers);
  conn.start();
  conn.holdWhile('backlog', true);
  conn.pause('closing');
  client.write('ONE\r\n');
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.same(e.lines, [], 'nothing read while paused');
  conn.holdWhile('backlog', false);
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.same(e.lines, [], "still paused for 'closing'");
  t.ok(conn.isPausedFor('closing'));
  t.notOk(conn.isPausedFor('backlog'));
  conn.discardInput();
  client.end('TWO\r\n');
  t.ok(await until(() => e.ends === 1), 'the FIN is seen');
  t.same(e.lines, [], 'what came was dropped, not framed');
});

t.test('reset(): the peer sees ECONNRESET; abort(): the connection is gone at once', async (t) => {
  const a = await socketPair(t);
  const conn = new ControlConnection(a.server, 512, events().handlers);
  const peerError = new Promise<string>((resolve) => a.client.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? '')));
  a.client.resume();
  conn.reset();
  t.equal(await peerError, 'ECONNRESET');
  const b = await socketPair(t);
  const e = events();
  const conn2 = new ControlConnection(b.server, 512, e.handlers);
  conn2.abort();
  t.ok(await until(() => e.closes.length === 1), 'closed');
  t.ok(b.server.destroyed);
});

const openssl = findCommand('openssl');

function selfSigned(t: TapTest): { key: Buffer; cert: Buffer } {
  const dir = mkdtempSync(join(tmpdir(), 'ftpnp-cc-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  execFileSync(openssl!, ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
  return { key: readFileSync(join(dir, 'key.pem')), cert: readFileSync(join(dir, 'cert.pem')) };
}

function handshake(secure: tls.TLSSocket): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', () => resolve());
    secure.once('error', reject);
  });
}

t.test('upgrade() after AUTH TLS: TLS in place, lines go on over it, writes are encrypted', { skip: openssl ? false : 'openssl not installed' }, async (t) => {
  const { key, cert } = selfSigned(t);
  const { server, client } = await socketPair(t);
  const e = events();
  const conn: ControlConnection = new ControlConnection(server, 512, {
    ...e.handlers,
    lines: (lines, framer) => {
      e.handlers.lines(lines, framer);
      if (!lines.some((l) => l.text.toString() === 'AUTH TLS')) return;
      conn.write(Buffer.from('234 Proceed with negotiation.\r\n'));
      conn.upgrade((plain) => new tls.TLSSocket(plain, { isServer: true, secureContext: tls.createSecureContext({ key, cert }) }));
    },
  });
  conn.start();
  const proceed = new Promise<string>((resolve) => client.once('data', (d: Buffer) => resolve(d.toString())));
  client.write('AUTH TLS\r\n');
  t.equal(await proceed, '234 Proceed with negotiation.\r\n', '234 in plain text');
  const secure = tls.connect({ socket: client, ca: cert, host: '127.0.0.1' });
  secure.on('error', () => {});
  await handshake(secure);
  t.pass('handshake completed over the upgraded connection');
  secure.write('PBSZ 0\r\nPROT P\r\n');
  t.ok(await until(() => e.lines.length === 3), 'lines framed from the TLS stream');
  t.same(e.lines, ['AUTH TLS', 'PBSZ 0', 'PROT P']);
  t.ok(conn.socket instanceof tls.TLSSocket, 'the connection now owns the TLS socket');
  const answer = new Promise<string>((resolve) => secure.once('data', (d: Buffer) => resolve(d.toString())));
  conn.writeLine(Buffer.from('200 PROT now P'));
  t.equal(await answer, '200 PROT now P\r\n', 'writes go through TLS');
  secure.end();
  t.ok(await until(() => e.ends === 1), 'the TLS peer FIN is reported once');
  t.same(e.closes, [], 'not closed by the upgrade');
});

t.test('upgrade() with bytes already read (implicit TLS behind a PROXY header): the ClientHello is not lost', { skip: openssl ? false : 'openssl not installed' }, async (t) => {
  const { key, cert } = selfSigned(t);
  const { server, client } = await socketPair(t);
  // Whoever read the PROXY header also read the start of the ClientHello behind it.
  const firstRead = new Promise<Buffer>((resolve) => server.once('data', (d: Buffer) => { server.pause(); resolve(d); }));
  server.resume();
  const secure = tls.connect({ socket: client, ca: cert, host: '127.0.0.1' });
  secure.on('error', () => {});
  const alreadyRead = await firstRead;
  t.ok(alreadyRead.length > 0 && alreadyRead[0] === 0x16, 'the first read is a TLS handshake record');
  const e = events();
  const conn = new ControlConnection(server, 512, e.handlers);
  conn.upgrade((plain) => new tls.TLSSocket(plain, { isServer: true, secureContext: tls.createSecureContext({ key, cert }) }), alreadyRead);
  conn.start();
  await handshake(secure);
  t.pass('handshake completed with the bytes put back');
  secure.write('USER a\r\n');
  t.ok(await until(() => e.lines.length === 1));
  t.same(e.lines, ['USER a']);
});
