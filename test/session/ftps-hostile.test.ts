/**
 * FTPS through a running proxy (issue #12, protocol.md §5) against hostile and odd peers:
 * - data-session binding under `dataSessionReuse: required` (fresh sessions, sessions and
 *   tickets of ANOTHER control connection, TLS 1.2 / 1.3 / 1.2 session-ID-only resumption)
 *   and `off` (§5.5, §5.6);
 * - the server's leg: a certificate from another CA, a servername mismatch, `verify: false`,
 *   a server that refuses AUTH TLS or says 234 and then misbehaves (a 421, never a plain
 *   fallback; no USER reaches it);
 * - client handshakes that never complete, half a ClientHello, garbage instead of one, a FIN;
 * - commands pipelined behind AUTH TLS; security commands never forwarded; `require: true`;
 *   a data handshake that never comes (PASV and PORT);
 * - no password and no key material in any log; a certificate reload; both legs TLS.
 * Upstream: the fake server (plain) for the client-leg cases, real vsftpd with FTPS for the
 * server leg. Relay ports 10000-10999 belong to this file (vsftpd's passive ports too): below the ephemeral range (32768+) and the test vsftpd's default passive ports (41000+), which other files running at the same time use.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { constants as cryptoConstants, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { validateConfigText } from '../../src/config/load.js';
import { FakeFtpServer, PortBlocks, settleLeaks, type FakeServerOptions, type FakeSession } from '../helpers/fake-server.js';
import { FtpClient, openData, parse227, type FtpReply } from '../helpers/ftp-client.js';
import { waitFor, withTimeout } from '../helpers/async.js';
import { startTestProxy, type LogRecord, type TestProxy } from '../helpers/proxy.js';
import { makeTestPki, opensslUnavailable, type TestPki } from '../helpers/tls.js';
import { TEST_PASSWORD, freePort, startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import type { TapTest } from '../helpers/tap.js';

const ports = new PortBlocks(10000);
const FILE = randomBytes(96 * 1024 + 7);
/** A password nobody else uses, to look for in the logs. */
const FAKE_PASSWORD = 'Hostile-Pa55-9f3e2d';
const FAKE_USER = 'hostile-user';
/** Results of ftpnp_tls_handshakes_total. */
const TLS_RESULTS = ['ok', 'failed', 'not-resumed'] as const;

const opensslMissing = opensslUnavailable();
const vsftpdMissing = vsftpdUnavailable();

let pki: TestPki;
/** Every proxy of this file, for the log checks at the end. */
const proxies: TestProxy[] = [];

t.before(() => {
  if (opensslMissing) throw new Error(opensslMissing);
  pki = makeTestPki();
});
t.teardown(() => pki?.cleanup());

// ------------------------------------------------------------------ the proxy under test

interface Setup {
  readonly proxy: TestProxy;
  readonly fake: FakeFtpServer | null;
  readonly range: { first: number; last: number; text: string };
  /** Register a socket or client destroyed at the test's teardown. */
  track<T extends { destroy(): unknown }>(thing: T): T;
}

interface SetupOptions {
  /** `listeners[].tls` beyond cert and key; null = no TLS offered. */
  readonly tls?: Record<string, string | boolean> | null;
  readonly cert?: string;
  readonly key?: string;
  /** `upstream.tls`; absent = plain FTP toward the server. */
  readonly upstreamTls?: Record<string, string | boolean>;
  /** Upstream port instead of a fake. */
  readonly upstreamPort?: number;
  readonly fake?: FakeServerOptions;
  readonly handshakeSeconds?: number;
  readonly listen?: string;
}

function flow(map: Record<string, string | boolean | number>): string {
  return `{ ${Object.entries(map).map(([k, v]) => `${k}: ${typeof v === 'string' ? JSON.stringify(v) : String(v)}`).join(', ')} }`;
}

function configText(o: SetupOptions, upstreamPort: number, range: string): string {
  const tlsLine = o.tls === null ? [] : [`    tls: ${flow({ mode: 'explicit', cert: o.cert ?? pki.server.cert.path, key: o.key ?? pki.server.key.path, ...(o.tls ?? {}) })}`];
  return [
    'log: { level: debug }',
    'admin: { listen: "127.0.0.1:0" }',
    'listeners:',
    '  - name: test',
    `    listen: "${o.listen ?? '127.0.0.1:0'}"`,
    ...tlsLine,
    '    timeouts:',
    '      dataConnectSeconds: 2',
    '      dataAcceptSeconds: 5',
    '      upstreamConnectSeconds: 2',
    '      upstreamReplySeconds: 5',
    '      transferReplyHoldSeconds: 10',
    `      tlsHandshakeSeconds: ${o.handshakeSeconds ?? 5}`,
    '    upstream:',
    '      host: 127.0.0.1',
    `      port: ${upstreamPort}`,
    '      dataMode: passive',
    ...(o.upstreamTls ? [`      tls: ${flow(o.upstreamTls)}`] : []),
    '    client:',
    '      advertise: auto',
    `      passivePorts: "${range}"`,
    '',
  ].join('\n');
}

async function setup(t: TapTest, o: SetupOptions = {}): Promise<Setup> {
  const tracked: Array<{ destroy(): unknown }> = [];
  let fake: FakeFtpServer | null = null;
  let proxy: TestProxy | null = null;
  t.teardown(async () => {
    for (const thing of tracked) thing.destroy();
    if (fake) await withTimeout(fake.close(), 5000, 'fake server close').catch(() => {});
    if (proxy) await withTimeout(proxy.close(), 5000, 'proxy close').catch(() => {});
  });
  if (o.upstreamPort === undefined) fake = await FakeFtpServer.start({ files: { 'f.bin': FILE }, ...(o.fake ?? {}) });
  const range = ports.take(10);
  proxy = await startTestProxy(configText(o, o.upstreamPort ?? fake!.port, range.text));
  proxies.push(proxy);
  return {
    proxy,
    fake,
    range,
    track: (thing) => {
      tracked.push(thing);
      return thing;
    },
  };
}

async function tlsMetric(proxy: TestProxy, leg: 'client' | 'server', channel: 'control' | 'data', result: (typeof TLS_RESULTS)[number]): Promise<number | undefined> {
  return (await proxy.scrape()).get('ftpnp_tls_handshakes_total', { listener: 'test', leg, channel, result });
}

const logsOf = (proxy: TestProxy, event: string): LogRecord[] => proxy.logs().filter((r) => r.event === event);

// ------------------------------------------------------------------ a client, by hand

interface ClientTlsOptions {
  readonly version?: tls.SecureVersion;
  /** TLS <= 1.2 resumption by session ID only (no tickets). */
  readonly noTicket?: boolean;
  /** CA(s) the client trusts; default the test CA. */
  readonly ca?: string | string[];
  readonly session?: Buffer;
}

function clientTlsOptions(o: ClientTlsOptions): tls.ConnectionOptions {
  return {
    host: '127.0.0.1',
    ca: o.ca ?? pki.ca.cert.pem,
    ...(o.version ? { minVersion: o.version, maxVersion: o.version } : {}),
    ...(o.noTicket ? { secureOptions: cryptoConstants.SSL_OP_NO_TICKET } : {}),
    ...(o.session ? { session: o.session } : {}),
  };
}

/** Read one single-line reply from a plain socket, leaving later bytes unread. */
function readPlainReply(socket: net.Socket): Promise<string> {
  let text = '';
  const reply = new Promise<string>((resolve, reject) => {
    const onData = (chunk: Buffer): void => {
      text += chunk.toString('latin1');
      if (/(^|\n)\d{3} [^\n]*\n/.test(text)) {
        socket.pause();
        socket.off('data', onData);
        socket.off('error', reject);
        resolve(text);
      }
    };
    socket.on('data', onData);
    socket.once('error', reject);
    socket.resume();
  });
  return withTimeout(reply, 5000, 'plain reply').catch((err: unknown) => {
    throw new Error(`${(err as Error).message} (got ${JSON.stringify(text)})`);
  });
}

async function plainConnect(s: Setup): Promise<net.Socket> {
  const raw = s.track(net.connect({ host: '127.0.0.1', port: s.proxy.port }));
  raw.on('error', () => {});
  await withTimeout(once(raw, 'connect'), 5000, 'connect to the proxy');
  return raw;
}

/** Plain connect, greeting, AUTH TLS -> 234: the raw socket, ready for the ClientHello. */
async function explicitUntil234(s: Setup, authLine = 'AUTH TLS\r\n'): Promise<net.Socket> {
  const raw = await plainConnect(s);
  const greeting = await readPlainReply(raw);
  if (!greeting.startsWith('220')) throw new Error(`greeting: ${greeting}`);
  raw.write(authLine);
  const auth = await readPlainReply(raw);
  if (!auth.startsWith('234 ')) throw new Error(`AUTH TLS: ${auth}`);
  return raw;
}

interface TlsControl {
  readonly client: FtpClient;
  readonly socket: tls.TLSSocket;
  /** Sessions the proxy gave this control connection, oldest first. */
  readonly sessions: Buffer[];
  readonly options: ClientTlsOptions;
}

/** A secured control connection: explicit (AUTH TLS) or implicit (TLS from the first byte, then the 220). */
async function secureControl(s: Setup, o: ClientTlsOptions & { implicit?: boolean } = {}): Promise<TlsControl> {
  const socket = o.implicit
    ? s.track(tls.connect({ port: s.proxy.port, ...clientTlsOptions(o) }))
    : s.track(tls.connect({ socket: await explicitUntil234(s), ...clientTlsOptions(o) }));
  const sessions: Buffer[] = [];
  socket.on('session', (session: Buffer) => sessions.push(session));
  await withTimeout(once(socket, 'secureConnect'), 5000, 'control TLS handshake');
  const client = s.track(FtpClient.over(socket));
  if (o.implicit) {
    const greeting = await client.readReply();
    if (greeting.code !== 220) throw new Error(`implicit greeting: ${greeting.text}`);
  }
  return { client, socket, sessions, options: o };
}

/** USER/PASS (the fake accepts any), PBSZ 0, PROT P, TYPE I; then a session to resume exists. */
async function loginProtected(c: TlsControl, user = FAKE_USER, password = FAKE_PASSWORD): Promise<void> {
  for (const [line, code] of [[`USER ${user}`, 331], [`PASS ${password}`, 230], ['PBSZ 0', 200], ['PROT P', 200], ['TYPE I', 200]] as const) {
    const reply = await c.client.command(line);
    if (reply.code !== code) throw new Error(`${line.split(' ')[0]}: ${reply.text}`);
  }
  // TLS 1.3 tickets come after the handshake; by the 230 they have arrived.
  if (!(await waitFor(() => c.sessions.length > 0, 3000))) throw new Error('the control connection received no TLS session');
}

interface DataOutcome {
  readonly replies: FtpReply[];
  readonly final: FtpReply;
  /** The client finished its data handshake. */
  readonly handshook: boolean;
  readonly reused: boolean | null;
  readonly protocol: string | null;
  readonly received: Buffer;
  readonly error: string | null;
  readonly sentAt: number;
  readonly finalAt: number;
  /** Sessions the data connection itself handed the client (its 'session' events). */
  readonly dataSessions: Buffer[];
}

interface TransferOptions extends ClientTlsOptions {
  readonly upload?: Buffer;
  /** Open the data connection but never handshake. */
  readonly silent?: boolean;
  /** PORT: the proxy dials the client and is still the TLS server on it (protocol.md §5.4). */
  readonly active?: boolean;
}

/** Where the client's data connection comes from: connected before the command (PASV) or accepted after it (PORT). */
async function dataSocketFor(s: Setup, c: TlsControl, active: boolean): Promise<{ readonly socket: Promise<net.Socket> }> {
  if (!active) {
    const pasv = await c.client.command('PASV');
    if (pasv.code !== 227) throw new Error(`PASV: ${pasv.text}`);
    return { socket: Promise.resolve(s.track(await openData('127.0.0.1', parse227(pasv).port))) };
  }
  const listener = net.createServer({ allowHalfOpen: true });
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', () => resolve()));
  s.track({ destroy: () => listener.close() });
  const port = (listener.address() as net.AddressInfo).port;
  const reply = await c.client.command(`PORT 127,0,0,1,${port >> 8},${port & 255}`);
  if (reply.code !== 200) throw new Error(`PORT: ${reply.text}`);
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', (socket) => {
    listener.close();
    resolve(s.track(socket));
  }));
  return { socket: withTimeout(accepted, 10000, 'the proxy dials the client\'s PORT address') };
}

/**
 * PASV (or PORT), a data connection made with `tls.connect` (or left plain and silent), then
 * `command`: every reply up to the final one, and what the data connection did.
 */
async function transfer(s: Setup, c: TlsControl, command: string, o: TransferOptions = {}): Promise<DataOutcome> {
  const raw = (await dataSocketFor(s, c, o.active ?? false)).socket;
  const chunks: Buffer[] = [];
  let error: string | null = null;
  let handshook = false;
  let reused: boolean | null = null;
  let protocol: string | null = null;
  const dataSessions: Buffer[] = [];
  const dataDone = raw.then((plain) => {
    const data: net.Socket = o.silent ? plain : s.track(tls.connect({ socket: plain, ...clientTlsOptions(o) }));
    data.on('session', (session: Buffer) => dataSessions.push(session));
    data.on('data', (chunk: Buffer) => chunks.push(chunk));
    data.on('error', (err: NodeJS.ErrnoException) => {
      error ??= err.code ?? err.message;
    });
    // A download ends with the proxy's close_notify + FIN: close our side too.
    data.once('end', () => data.end());
    if (!o.silent) {
      data.once('secureConnect', () => {
        handshook = true;
        // TLS 1.2 hands the session over inside the handshake: keep it even if the proxy resets next.
        const session = (data as tls.TLSSocket).getSession();
        if (session) dataSessions.push(session);
        // Read now: a closed TLS socket no longer knows its session.
        reused = (data as tls.TLSSocket).isSessionReused();
        protocol = (data as tls.TLSSocket).getProtocol();
        if (o.upload) data.end(o.upload); // end() sends close_notify
      });
    }
    return new Promise<void>((resolve) => data.once('close', () => resolve()));
  });
  // vsftpd-style: the command goes out without waiting for the data handshake (protocol.md §5.4).
  const sentAt = Date.now();
  c.client.send(command);
  const replies: FtpReply[] = [];
  for (;;) {
    const reply = await c.client.readReply(15000);
    replies.push(reply);
    if (reply.code >= 200) break;
  }
  const finalAt = Date.now();
  await withTimeout(dataDone, 10000, 'data connection close');
  return { replies, final: replies.at(-1)!, handshook, reused, protocol, received: Buffer.concat(chunks), error, sentAt, finalAt, dataSessions };
}

/** A proper transfer with the control connection's newest session: 226, the file, resumed. */
async function checkResumedDownload(t: TapTest, s: Setup, c: TlsControl, what: string): Promise<void> {
  const ok = await transfer(s, c, 'RETR f.bin', { ...c.options, session: c.sessions.at(-1)! });
  t.equal(ok.final.code, 226, `${what}: 226 (${ok.final.text})`);
  t.ok(ok.received.equals(FILE), `${what}: the file arrived intact (${ok.received.length} bytes)`);
  t.equal(ok.reused, true, `${what}: isSessionReused() on the client's data connection`);
}

// ------------------------------------------------------------------ 1. data sessions bound to their control connection

const NOT_RESUMED = '522 TLS session of data connection not resumed.';

for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
  for (const dataMode of ['PASV', 'PORT'] as const) {
    t.test(`required, ${version}, ${dataMode}: a data connection with a fresh TLS session gets 522, is logged and counted; the session goes on`, async (t) => {
      const s = await setup(t, { tls: { dataSessionReuse: 'required' } });
      const c = await secureControl(s, { version });
      await loginProtected(c);
      t.equal(c.socket.getProtocol(), version, `control connection is ${version}`);
      const active = dataMode === 'PORT';
      const fresh = await transfer(s, c, 'RETR f.bin', { version, active });
      t.equal(fresh.final.text, NOT_RESUMED, `the transfer is answered ${JSON.stringify(NOT_RESUMED)} (replies ${JSON.stringify(fresh.replies.map((r) => r.text))})`);
      t.equal(fresh.received.length, 0, 'no file data reached the client');
      t.equal(fresh.reused, fresh.handshook ? false : null, 'the client did not resume (it offered no session)');
      t.equal(s.fake!.received.filter((l) => l.startsWith('RETR')).length, 1, 'the RETR went upstream once (the refusal is the proxy\'s)');
      const record = logsOf(s.proxy, 'transfer').at(-1);
      t.equal(record?.reply, 522, `transfer record with reply 522 (${JSON.stringify(record)})`);
      t.equal(record?.result, 'failed', 'and result failed');
      t.ok(logsOf(s.proxy, 'data-closed').some((r) => /did not resume/.test(String(r.reason))), 'the data connection\'s end is logged with the reason');
      t.equal(await tlsMetric(s.proxy, 'client', 'data', 'not-resumed'), 1, 'ftpnp_tls_handshakes_total{leg=client,channel=data,result=not-resumed} 1');
      t.equal(await tlsMetric(s.proxy, 'client', 'data', 'ok'), 0, 'no data handshake counted ok');
      t.ok(await waitFor(() => s.proxy.server.poolStats().every((p) => p.leased === 0)), 'no relay port held after the refusal');
      t.equal((await c.client.command('NOOP')).code, 200, 'the control connection still works');
      const ok = await transfer(s, c, 'RETR f.bin', { version, active, session: c.sessions.at(-1)! });
      t.equal(ok.final.code, 226, `then with the control session: 226 (${ok.final.text})`);
      t.ok(ok.received.equals(FILE), 'the file arrived intact');
      t.equal(ok.reused, true, 'isSessionReused() on the client\'s data connection');
      t.equal(await tlsMetric(s.proxy, 'client', 'data', 'ok'), 1, 'that data handshake counted ok');
      await c.client.quit();
      t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
    });
  }
}

t.test('required: sessions and tickets of ANOTHER control connection to the same listener are refused', async (t) => {
  const s = await setup(t, { tls: { dataSessionReuse: 'required' } });
  const cases: Array<[string, ClientTlsOptions]> = [
    ['TLS 1.3 ticket', { version: 'TLSv1.3' }],
    ['TLS 1.2 session (ticket)', { version: 'TLSv1.2' }],
    ['TLS 1.2 session ID only (SSL_OP_NO_TICKET)', { version: 'TLSv1.2', noTicket: true }],
  ];
  let refusals = 0;
  for (const [name, options] of cases) {
    const victim = await secureControl(s, options);
    await loginProtected(victim);
    const other = await secureControl(s, options);
    await loginProtected(other);
    const foreign = other.sessions.at(-1)!;
    t.not(foreign.toString('hex'), victim.sessions.at(-1)!.toString('hex'), `${name}: the two connections hold different sessions`);
    const stolen = await transfer(s, victim, 'RETR f.bin', { ...options, session: foreign });
    refusals += 1;
    t.equal(stolen.final.text, NOT_RESUMED, `${name}: another connection's session gets 522 (${JSON.stringify(stolen.replies.map((r) => r.text))})`);
    t.equal(stolen.received.length, 0, `${name}: no data`);
    // The TLS layer may resume it (one ticket key per listener): the proxy's binding refuses it.
    t.equal(await tlsMetric(s.proxy, 'client', 'data', 'not-resumed'), refusals, `${name}: counted not-resumed`);
    // The same client, with its own session: resumed, works.
    await checkResumedDownload(t, s, victim, `${name}, own session`);
    // And the other connection's session still works on the other connection.
    await checkResumedDownload(t, s, other, `${name}, on the connection that owns it`);
    await victim.client.quit();
    await other.client.quit();
  }
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

t.test('required: the client\'s own session resumes at TLS 1.2 (ticket), TLS 1.2 (session ID only) and TLS 1.3, explicit and implicit', async (t) => {
  const explicit = await setup(t, { tls: { dataSessionReuse: 'required' } });
  const implicit = await setup(t, { tls: { mode: 'implicit', dataSessionReuse: 'required' } });
  const cases: Array<[string, ClientTlsOptions]> = [
    ['TLS 1.2 ticket', { version: 'TLSv1.2' }],
    ['TLS 1.2 session ID only', { version: 'TLSv1.2', noTicket: true }],
    ['TLS 1.3', { version: 'TLSv1.3' }],
  ];
  for (const [front, s] of [['explicit', explicit], ['implicit', implicit]] as const) {
    for (const [name, options] of cases) {
      const c = await secureControl(s, { ...options, implicit: front === 'implicit' });
      if (front === 'implicit') {
        // PROT P is implied on implicit FTPS ([MS-FTPS]): no PBSZ/PROT needed.
        t.equal((await c.client.command(`USER ${FAKE_USER}`)).code, 331);
        t.equal((await c.client.command(`PASS ${FAKE_PASSWORD}`)).code, 230);
        t.ok(await waitFor(() => c.sessions.length > 0, 3000), 'a session arrived');
      } else {
        await loginProtected(c);
      }
      for (const round of [1, 2]) {
        const down = await transfer(s, c, 'RETR f.bin', { ...options, session: c.sessions.at(-1)! });
        t.equal(down.final.code, 226, `${front} ${name} #${round}: 226 (${down.final.text})`);
        t.equal(down.protocol, options.version, `${front} ${name} #${round}: data connection is ${options.version}`);
        t.equal(down.reused, true, `${front} ${name} #${round}: isSessionReused()`);
        t.ok(down.received.equals(FILE), `${front} ${name} #${round}: file intact`);
      }
      const payload = randomBytes(50 * 1024);
      const up = await transfer(s, c, `STOR ${front}-${name.replace(/\W+/g, '-')}.up`, { ...options, session: c.sessions.at(-1)!, upload: payload });
      t.equal(up.final.code, 226, `${front} ${name} upload: 226 (${up.final.text})`);
      t.equal(up.reused, true, `${front} ${name} upload: resumed`);
      t.ok(s.fake!.files.get(`${front}-${name.replace(/\W+/g, '-')}.up`)?.equals(payload), `${front} ${name} upload intact`);
      await c.client.quit();
    }
    t.equal(await tlsMetric(s.proxy, 'client', 'data', 'not-resumed'), 0, `${front}: nothing refused`);
    t.equal(await tlsMetric(s.proxy, 'client', 'data', 'ok'), cases.length * 3, `${front}: every data handshake counted ok`);
    t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, `${front}: no session or relay port left behind`);
  }
});

t.test('dataSessionReuse: off accepts a fresh data session (and one of another control connection)', async (t) => {
  const s = await setup(t, { tls: { dataSessionReuse: 'off' } });
  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    const c = await secureControl(s, { version });
    await loginProtected(c);
    const fresh = await transfer(s, c, 'RETR f.bin', { version });
    t.equal(fresh.final.code, 226, `${version} fresh session: 226 (${fresh.final.text})`);
    t.equal(fresh.reused, false, `${version}: really not resumed`);
    t.ok(fresh.received.equals(FILE), `${version}: file intact`);
    const other = await secureControl(s, { version });
    await loginProtected(other);
    const foreign = await transfer(s, c, 'RETR f.bin', { version, session: other.sessions.at(-1)! });
    t.equal(foreign.final.code, 226, `${version} another connection's session: 226 (${foreign.final.text})`);
    t.ok(foreign.received.equals(FILE), `${version}: another connection's session, file intact`);
    await c.client.quit();
    await other.client.quit();
  }
  t.equal(await tlsMetric(s.proxy, 'client', 'data', 'not-resumed'), 0, 'nothing refused');
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

// ------------------------------------------------------------------ 2. the server's certificate and AUTH

const UPSTREAM_TLS_FAILED = '421 Service not available: secure connection to the server failed.';

t.test('the server leg (vsftpd FTPS): wrong CA, wrong name, verify: false', { skip: vsftpdMissing ?? false }, async (t) => {
  const passive = ports.take(10);
  const servers: VsftpdInstance[] = [];
  t.teardown(() => Promise.all(servers.map((v) => v.stop())));
  const vsftpdWith = async (cert: TestPki['server'], pasv: number): Promise<VsftpdInstance> => {
    const v = await startVsftpd({ pasvAddress: null, pasvMinPort: pasv, pasvMaxPort: pasv + 4, ssl: { cert: cert.cert.path, key: cert.key.path } });
    servers.push(v);
    return v;
  };
  const [impostor, genuine] = await Promise.all([vsftpdWith(pki.otherServer, passive.first), vsftpdWith(pki.server, passive.first + 5)]);

  /** A plain client that pipelines USER/PASS right away: the proxy must hold them until the server leg is secured. */
  async function refusedClient(s: Setup): Promise<{ first: FtpReply; closed: boolean }> {
    const client = s.track(await FtpClient.connect('127.0.0.1', s.proxy.port));
    client.send(`USER ${genuine.user}`);
    client.send(`PASS ${genuine.password}`);
    const first = await client.readReply(8000);
    return { first, closed: await client.waitClosed(5000) };
  }

  await t.test('a server certificate from another CA: 421 instead of the greeting, no USER reaches it', async (t) => {
    const s = await setup(t, { tls: null, upstreamPort: impostor.port, upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path } });
    const { first, closed } = await refusedClient(s);
    t.equal(first.text, UPSTREAM_TLS_FAILED, 'the client gets the 421 as its first reply');
    t.ok(closed, 'and the connection closes');
    const failed = await s.proxy.waitLog((r) => r.event === 'upstream-tls-failed');
    t.equal(failed?.code, 'FTPP_ERR_UPSTREAM_TLS', `logged upstream-tls-failed (${JSON.stringify(failed)})`);
    t.match(String(failed?.err), /certificate|verify/i, 'with the reason');
    t.ok(await waitFor(() => /"AUTH TLS"/.test(impostor.protocolLog())), 'the proxy did ask the server for AUTH TLS');
    t.notMatch(impostor.protocolLog(), /"USER|"PASS|OK LOGIN/, 'no USER, no PASS, no login at the server');
    t.equal(await tlsMetric(s.proxy, 'server', 'control', 'failed'), 1, 'counted as a failed server control handshake');
    t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session left');
  });

  await t.test('the same server with verify: false connects', async (t) => {
    const s = await setup(t, { tls: null, upstreamPort: impostor.port, upstreamTls: { mode: 'explicit', verify: false } });
    const client = s.track(await FtpClient.connect('127.0.0.1', s.proxy.port));
    t.equal((await client.login(impostor.user, impostor.password)).code, 230, 'greeting, then login through the secured server leg');
    t.equal((await client.command('PWD')).code, 257, 'commands work');
    await client.quit();
    t.match(impostor.protocolLog(), /"USER ftpnptest"/, 'the USER reached the server, over TLS (force_local_logins_ssl)');
    t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session left');
  });

  await t.test('a servername the certificate does not name is refused', async (t) => {
    const s = await setup(t, { tls: null, upstreamPort: genuine.port, upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path, servername: 'wrong.example' } });
    const { first, closed } = await refusedClient(s);
    t.equal(first.text, UPSTREAM_TLS_FAILED, 'the client gets the 421');
    t.ok(closed, 'and the connection closes');
    const failed = await s.proxy.waitLog((r) => r.event === 'upstream-tls-failed');
    t.match(String(failed?.err), /wrong\.example|altname|does not match/i, `logged with the reason (${JSON.stringify(failed?.err)})`);
    t.equal(failed?.servername, 'wrong.example', 'and the servername');
    t.notMatch(genuine.protocolLog(), /"USER|"PASS/, 'no USER reached the server');
    // The control: the right name (the default, the upstream host) works against the same server.
    const good = await setup(t, { tls: null, upstreamPort: genuine.port, upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path } });
    const client = good.track(await FtpClient.connect('127.0.0.1', good.proxy.port));
    t.equal((await client.login(genuine.user, genuine.password)).code, 230, 'with the servername the certificate names, the login works');
    await client.quit();
  });
});

t.test('a server that refuses AUTH TLS, says 234 but never handshakes, or pipes a reply behind its 234: 421, never a plain fallback', async (t) => {
  const cases: Array<[string, (session: FakeSession) => void, RegExp]> = [
    ['500 to AUTH TLS', (session) => session.reply('500 Unknown command.'), /server answered AUTH TLS with "500 Unknown command\."/],
    ['234, then silence', (session) => session.reply('234 Proceed with negotiation.'), /TLS handshake did not complete within 500 ms/],
    ['234 and a second reply in the same packet', (session) => session.write('234 Proceed with negotiation.\r\n200 sneaky\r\n'), /more than one reply/],
    ['234, then plain text instead of a ServerHello', (session) => {
      session.reply('234 Proceed with negotiation.');
      session.write('230 you are in\r\n');
    }, /TLS handshake failed|wrong version|packet length|record/i],
  ];
  for (const [name, answer, reason] of cases) {
    const secured = new Set<FakeSession>();
    const s = await setup(t, {
      tls: null,
      handshakeSeconds: HANDSHAKE_SECONDS,
      upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path },
      fake: {
        handler: (command, session) => {
          // After AUTH the proxy's ClientHello arrives; this server reads it as junk lines and stays mute.
          if (secured.has(session)) return true;
          if (command.verb !== 'AUTH') return false;
          secured.add(session);
          answer(session);
          return true;
        },
      },
    });
    const client = s.track(await FtpClient.connect('127.0.0.1', s.proxy.port));
    client.send(`USER ${FAKE_USER}`);
    const since = Date.now();
    const first = await client.readReply(8000);
    t.equal(first.text, UPSTREAM_TLS_FAILED, `${name}: the client gets the 421 (${Date.now() - since} ms)`);
    t.ok(await client.waitClosed(5000), `${name}: and the connection closes`);
    const failed = await s.proxy.waitLog((r) => r.event === 'upstream-tls-failed');
    t.match(String(failed?.err), reason, `${name}: logged with the reason (${JSON.stringify(failed?.err)})`);
    const upstream = s.fake!.sessions[0];
    t.ok(upstream && (await waitFor(() => upstream.socket.destroyed)), `${name}: the server connection is closed`);
    t.equal(s.fake!.received[0], 'AUTH TLS', `${name}: the server saw AUTH TLS first`);
    t.same(s.fake!.received.filter((l) => /^(USER|PASS)\b/i.test(l)), [], `${name}: and never a USER or PASS`);
    t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, `${name}: no session left`);
  }
});

// ------------------------------------------------------------------ 3./4. client handshakes that never complete or are garbage

/** The first bytes a Node TLS client sends: a whole ClientHello record. */
async function captureClientHello(): Promise<Buffer> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  try {
    const got = new Promise<Buffer>((resolve) => server.once('connection', (socket) => socket.once('data', (d: Buffer) => {
      resolve(d);
      socket.destroy();
    })));
    const client = tls.connect({ host: '127.0.0.1', port: (server.address() as net.AddressInfo).port, rejectUnauthorized: false });
    client.on('error', () => {});
    const hello = await withTimeout(got, 5000, 'ClientHello');
    client.destroy();
    return hello;
  } finally {
    server.close();
  }
}

interface CloseSeen {
  readonly afterMs: number;
  readonly received: Buffer;
}

/** Wait until the proxy closes `socket`; how long it took since `since`. */
async function waitClose(socket: net.Socket, since: number, timeoutMs = 8000): Promise<CloseSeen> {
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  socket.resume();
  if (!socket.destroyed) await withTimeout(once(socket, 'close'), timeoutMs, 'the proxy closes the connection');
  return { afterMs: Date.now() - since, received: Buffer.concat(chunks) };
}

/** After a failed client handshake: logged, counted, session gone, server connection gone, the proxy still serves. */
async function checkHandshakeFailure(t: TapTest, s: Setup, explicit: boolean, errPattern: RegExp | null): Promise<void> {
  const failed = await s.proxy.waitLog((r) => r.event === 'tls-handshake-failed');
  t.equal(failed?.code, 'FTPP_ERR_TLS_HANDSHAKE', `logged tls-handshake-failed with FTPP_ERR_TLS_HANDSHAKE (${JSON.stringify(failed)})`);
  if (errPattern) t.match(String(failed?.err), errPattern, 'with the reason');
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'the session is gone');
  t.equal((await s.proxy.scrape()).get('ftpnp_sessions_open', { listener: 'test' }), 0, 'ftpnp_sessions_open 0');
  t.equal(await tlsMetric(s.proxy, 'client', 'control', 'failed'), 1, 'counted as a failed client control handshake');
  if (explicit) {
    // Explicit FTPS dials the server at connect (its 220 is the greeting): that connection must go too.
    const upstream = s.fake!.sessions[0];
    t.ok(upstream && (await waitFor(() => upstream.socket.destroyed)), 'the server connection was closed');
  } else {
    t.equal(s.fake!.sessions.length, 0, 'implicit: the server was never dialled for a client that never spoke TLS');
  }
  // The proxy keeps serving.
  const c = await secureControl(s, { implicit: !explicit });
  await loginProtected(c);
  t.equal((await c.client.command('NOOP')).code, 200, 'the next client is served');
  await c.client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'and leaves nothing behind');
}

const HANDSHAKE_SECONDS = 0.5;

t.test('explicit: AUTH TLS, then silence: closed after tlsHandshakeSeconds, everything released', async (t) => {
  const s = await setup(t, { handshakeSeconds: HANDSHAKE_SECONDS });
  const raw = await explicitUntil234(s);
  const since = Date.now();
  const seen = await waitClose(raw, since);
  t.ok(seen.afterMs >= HANDSHAKE_SECONDS * 1000 - 50, `not before the timeout (${seen.afterMs} ms)`);
  t.ok(seen.afterMs < 4000, `but at tlsHandshakeSeconds, not a later timeout (${seen.afterMs} ms)`);
  await checkHandshakeFailure(t, s, true, /within 500 ms|did not complete/);
});

t.test('implicit: connect and send nothing: closed after tlsHandshakeSeconds, the server never dialled', async (t) => {
  const s = await setup(t, { tls: { mode: 'implicit' }, handshakeSeconds: HANDSHAKE_SECONDS });
  const raw = await plainConnect(s);
  const seen = await waitClose(raw, Date.now());
  t.ok(seen.afterMs >= HANDSHAKE_SECONDS * 1000 - 50 && seen.afterMs < 4000, `closed at the timeout (${seen.afterMs} ms)`);
  t.equal(seen.received.length, 0, 'nothing was sent to a client that never spoke TLS (no plain 220)');
  await checkHandshakeFailure(t, s, false, /within 500 ms|did not complete/);
});

for (const mode of ['explicit', 'implicit'] as const) {
  t.test(`${mode}: half a ClientHello, then silence: closed after tlsHandshakeSeconds`, async (t) => {
    const hello = await captureClientHello();
    t.equal(hello[0], 0x16, 'the capture is a TLS handshake record');
    const s = await setup(t, { tls: { mode }, handshakeSeconds: HANDSHAKE_SECONDS });
    const raw = mode === 'explicit' ? await explicitUntil234(s) : await plainConnect(s);
    raw.write(hello.subarray(0, Math.floor(hello.length / 2)));
    const seen = await waitClose(raw, Date.now());
    t.ok(seen.afterMs >= HANDSHAKE_SECONDS * 1000 - 50 && seen.afterMs < 4000, `closed at the timeout (${seen.afterMs} ms)`);
    await checkHandshakeFailure(t, s, mode === 'explicit', /within 500 ms|did not complete/);
  });
}

for (const mode of ['explicit', 'implicit'] as const) {
  t.test(`${mode}: a client that half-closes instead of a ClientHello is released long before tlsHandshakeSeconds`, async (t) => {
    const s = await setup(t, { tls: { mode }, handshakeSeconds: 20 });
    const raw = mode === 'explicit' ? await explicitUntil234(s) : await plainConnect(s);
    const since = Date.now();
    raw.end();
    const seen = await waitClose(raw, since, 10000);
    t.ok(seen.afterMs < 10000, `the proxy closed its side too (${seen.afterMs} ms)`);
    t.same(await settleLeaks(s.proxy, 10000), { sessions: 0, leased: 0 }, `the session is gone (${Date.now() - since} ms)`);
    if (mode === 'explicit') {
      const upstream = s.fake!.sessions[0];
      t.ok(upstream && (await waitFor(() => upstream.socket.destroyed)), 'the server connection was closed');
    } else {
      t.equal(s.fake!.sessions.length, 0, 'the server was never dialled');
    }
  });
}

/**
 * Random bytes that are not by chance the start of a record a TLS server must wait for: a
 * first byte with the high bit set and a third byte of 1 is an SSLv2-style ClientHello header
 * (OpenSSL then waits for up to 32 KiB), and 0x14-0x17 a TLS record type. About one run in
 * 500 drew such bytes and waited out the handshake timeout instead of closing at once.
 */
function noise(length: number): Buffer {
  const bytes = randomBytes(length);
  bytes[0] = 0x42;
  return bytes;
}

const GARBAGE: Array<[string, Buffer]> = [
  ['an HTTP request', Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')],
  ['FTP commands in clear text', Buffer.from('USER sneaky\r\nPASS sneaky\r\n')],
  ['random bytes', noise(600)],
  ['a handshake record header with an absurd length', Buffer.from([0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb, 0x99])],
];

for (const mode of ['explicit', 'implicit'] as const) {
  for (const [name, bytes] of GARBAGE) {
    t.test(`${mode}: ${name} instead of a ClientHello: a prompt close, logged, the proxy serves on`, async (t) => {
      // A long handshake timeout: the close must come from the garbage, not from the timer.
      const s = await setup(t, { tls: { mode }, handshakeSeconds: 20 });
      const raw = mode === 'explicit' ? await explicitUntil234(s) : await plainConnect(s);
      const since = Date.now();
      raw.write(bytes);
      const seen = await waitClose(raw, since, 8000);
      t.ok(seen.afterMs < 8000, `closed promptly (${seen.afterMs} ms)`);
      t.notMatch(seen.received.toString('latin1'), /^2\d\d |\r\n2\d\d /m, 'no FTP reply in clear text');
      if (name.startsWith('FTP commands')) t.notOk(s.fake!.received.includes('USER sneaky'), 'the clear-text USER never reached the server');
      await checkHandshakeFailure(t, s, mode === 'explicit', null);
    });
  }
}

// ------------------------------------------------------------------ 5. commands pipelined behind AUTH TLS

t.test('commands pipelined in the AUTH TLS packet are dropped, never executed (RFC 4217 §4)', async (t) => {
  const s = await setup(t);
  const raw = await explicitUntil234(s, 'AUTH TLS\r\nUSER pipelined-x\r\nDELE precious\r\n');
  const socket = s.track(tls.connect({ socket: raw, ...clientTlsOptions({}) }));
  await withTimeout(once(socket, 'secureConnect'), 5000, 'handshake after the pipelined AUTH');
  const c: TlsControl = { client: s.track(FtpClient.over(socket)), socket, sessions: [], options: {} };
  socket.on('session', (session: Buffer) => c.sessions.push(session));
  // The first reply on the secured connection is the one to our NOOP: nothing answered the dropped lines.
  const noop = await c.client.command('NOOP');
  t.equal(noop.text, '200 NOOP ok.', `the first reply after the handshake answers NOOP (${noop.text})`);
  t.equal(c.client.queued, 0, 'no other reply is waiting');
  await loginProtected(c);
  t.notOk(s.fake!.received.some((l) => /pipelined-x|DELE/i.test(l)), `the server never saw USER pipelined-x nor DELE (${JSON.stringify(s.fake!.received)})`);
  const dropped = logsOf(s.proxy, 'auth-pipelined-dropped');
  t.equal(dropped.length, 1, 'logged auth-pipelined-dropped');
  t.equal(dropped[0]?.lines, 2, 'naming two dropped lines');
  await checkResumedDownload(t, s, c, 'the session works');
  await c.client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

t.test('a plain-text command sent after the 234 but before the ClientHello breaks the handshake, not the proxy', async (t) => {
  const s = await setup(t, { handshakeSeconds: 20 });
  const raw = await explicitUntil234(s);
  const since = Date.now();
  raw.write('USER late-x\r\n');
  const seen = await waitClose(raw, since);
  t.ok(seen.afterMs < 8000, `closed (${seen.afterMs} ms)`);
  t.notOk(s.fake!.received.some((l) => /late-x/.test(l)), 'the late USER never reached the server');
  await checkHandshakeFailure(t, s, true, null);
});

t.test('AUTH TLS behind a command the server is slow to answer: its reply comes first in clear text, then 234, then TLS', async (t) => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  const s = await setup(t, {
    fake: {
      handler: async (command, session) => {
        if (command.verb !== 'SYST') return false;
        await gate;
        session.reply('215 UNIX Type: L8');
        return true;
      },
    },
  });
  const raw = await plainConnect(s);
  t.match(await readPlainReply(raw), /^220 /, 'greeting');
  raw.write('SYST\r\nAUTH TLS\r\n');
  t.ok(await waitFor(() => s.fake!.received.includes('SYST')), 'SYST reached the server, which holds its answer');
  release();
  let text = '';
  while (!/(^|\n)234 /.test(text)) text += await readPlainReply(raw);
  t.same(text.split('\r\n').filter(Boolean).map((line) => line.slice(0, 3)), ['215', '234'], `the 215 first, then the 234 (${JSON.stringify(text)})`);
  const socket = s.track(tls.connect({ socket: raw, ...clientTlsOptions({}) }));
  await withTimeout(once(socket, 'secureConnect'), 5000, 'handshake');
  const client = s.track(FtpClient.over(socket));
  t.equal((await client.command('NOOP')).text, '200 NOOP ok.', 'the secured connection works; nothing else was pending');
  t.notOk(s.fake!.received.some((l) => /^AUTH/i.test(l)), 'AUTH never reached the server');
  await client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session left');
});

t.test('AUTH TLS sent before the server\'s greeting arrived: 220 first in clear text, then 234, then TLS', async (t) => {
  const greeted: FakeSession[] = [];
  const s = await setup(t, { fake: { greeting: null, onConnection: (session) => greeted.push(session) } });
  const raw = await plainConnect(s);
  raw.write('AUTH TLS\r\n');
  t.ok(await waitFor(() => greeted.length === 1), 'the proxy dialled the server, which has not greeted yet');
  greeted[0]!.reply('220 late greeting');
  let text = '';
  while (!/(^|\n)234 /.test(text)) text += await readPlainReply(raw);
  t.same(text.split('\r\n').filter(Boolean), ['220 late greeting', '234 Proceed with negotiation.'], `greeting, then 234 (${JSON.stringify(text)})`);
  const socket = s.track(tls.connect({ socket: raw, ...clientTlsOptions({}) }));
  await withTimeout(once(socket, 'secureConnect'), 5000, 'handshake');
  const client = s.track(FtpClient.over(socket));
  t.equal((await client.command('NOOP')).text, '200 NOOP ok.', 'the secured connection works');
  await client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session left');
});

t.test('security commands on the secured connection: answered by the proxy, never forwarded; CCC and a second AUTH refused, TLS stays', async (t) => {
  const s = await setup(t);
  const c = await secureControl(s);
  const expected: Array<[string, string]> = [
    ['AUTH TLS', '503 Already using TLS.'],
    ['AUTH SSL', '503 Already using TLS.'],
    ['PBSZ 0', '200 PBSZ set to 0.'],
    ['PBSZ 4096', '200 PBSZ=0'],
    ['PROT S', '536 PROT not supported.'],
    ['PROT Q', '504 PROT not recognized.'],
    ['PROT P', '200 PROT now Private.'],
    ['CCC', '534 Request denied for policy reasons.'],
    ['ADAT Zm9v', '502 ADAT not supported by this proxy.'],
  ];
  for (const [line, reply] of expected) t.equal((await c.client.command(line)).text, reply, line);
  const feat = await c.client.command('FEAT');
  t.equal(feat.code, 211, 'FEAT');
  const features = feat.lines.slice(1, -1).map((l) => l.trim());
  t.same(features.filter((f) => /^(AUTH|PBSZ|PROT|CCC)\b/.test(f)), ['AUTH TLS', 'PBSZ', 'PROT'], `FEAT offers AUTH TLS, PBSZ, PROT (${JSON.stringify(features)})`);
  t.equal(c.socket.getProtocol() !== null && !c.socket.destroyed, true, 'the control connection is still TLS after CCC');
  await loginProtected(c);
  await checkResumedDownload(t, s, c, 'after the refusals');
  t.same(s.fake!.received.filter((l) => /^(AUTH|PBSZ|PROT|CCC|ADAT)/i.test(l)), [], 'none of them reached the server');
  await c.client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

t.test('the server goes away while the client is in its TLS handshake: the session ends, nothing leaks, the proxy serves on', async (t) => {
  const s = await setup(t, { handshakeSeconds: 20 });
  const raw = await explicitUntil234(s);
  const since = Date.now();
  s.fake!.sessions[0]!.end();
  const socket = s.track(tls.connect({ socket: raw, ...clientTlsOptions({}) }));
  socket.on('error', () => {});
  const client = FtpClient.over(socket);
  t.ok(await client.waitClosed(10000), `the client's connection is closed (${Date.now() - since} ms)`);
  const got = client.received.toString('latin1');
  t.ok(got === '' || /^421 /.test(got), `nothing, or a 421 (${JSON.stringify(got)})`);
  t.same(await settleLeaks(s.proxy, 10000), { sessions: 0, leased: 0 }, 'the session is gone');
  const next = await secureControl(s);
  await loginProtected(next);
  await next.client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'the next client was served and left nothing');
});

// ------------------------------------------------------------------ 6. require: true

t.test('require: USER before AUTH 530, RETR under PROT C 522 (never upstream), PROT P works', async (t) => {
  const s = await setup(t, { tls: { require: true } });
  const plain = s.track(await FtpClient.connect('127.0.0.1', s.proxy.port));
  t.equal((await plain.readReply()).code, 220, 'greeting in clear text');
  t.equal((await plain.command(`USER ${FAKE_USER}`)).text, '530 Non-anonymous sessions must use encryption.', 'USER before AUTH');
  t.equal((await plain.command('RETR f.bin')).text, '522 Data connections must be encrypted.', 'RETR before AUTH');
  t.equal((await plain.command('PBSZ 0')).text, '503 PBSZ needs a secure connection.', 'PBSZ before AUTH');
  t.notOk(s.fake!.received.some((l) => /^(USER|RETR)/i.test(l)), `nothing reached the server (${JSON.stringify(s.fake!.received)})`);
  const refused = logsOf(s.proxy, 'command-refused').filter((r) => r.code === 'FTPP_ERR_TLS_REQUIRED');
  t.equal(refused.length, 2, 'both refusals logged with FTPP_ERR_TLS_REQUIRED');
  await plain.quit();

  const c = await secureControl(s);
  t.equal((await c.client.command(`USER ${FAKE_USER}`)).code, 331, 'USER after AUTH');
  t.equal((await c.client.command(`PASS ${FAKE_PASSWORD}`)).code, 230, 'PASS');
  t.equal((await c.client.command('TYPE I')).code, 200);
  t.equal((await c.client.command('PASV')).code, 227, 'PASV under PROT C is allowed');
  for (const command of ['RETR f.bin', 'LIST', 'STOR x.up']) {
    t.equal((await c.client.command(command)).text, '522 Data connections must be encrypted.', `${command} under PROT C`);
  }
  t.notOk(s.fake!.received.some((l) => /^(RETR|LIST|STOR)/i.test(l)), 'no transfer command reached the server');
  t.equal((await c.client.command('PBSZ 0')).code, 200, 'PBSZ 0');
  t.equal((await c.client.command('PROT P')).code, 200, 'PROT P');
  t.ok(await waitFor(() => c.sessions.length > 0, 3000), 'a session to resume');
  await checkResumedDownload(t, s, c, 'after AUTH + PROT P');
  t.equal(s.fake!.received.filter((l) => /^RETR/i.test(l)).length, 1, 'exactly one RETR reached the server');
  t.equal((await c.client.command('PROT C')).code, 200, 'PROT C again');
  t.equal((await c.client.command('RETR f.bin')).text, '522 Data connections must be encrypted.', 'and transfers are refused again');
  await c.client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

// ------------------------------------------------------------------ 7. a data handshake that never comes

for (const dataMode of ['PASV', 'PORT'] as const) {
  t.test(`${dataMode}: a PROT P data connection that never handshakes: 425 after tlsHandshakeSeconds, port released, session usable`, async (t) => {
    const s = await setup(t, { handshakeSeconds: HANDSHAKE_SECONDS });
    const c = await secureControl(s);
    await loginProtected(c);
    const active = dataMode === 'PORT';
    const silent = await transfer(s, c, 'RETR f.bin', { silent: true, active });
    t.equal(silent.final.text, "425 Can't open data connection: TLS negotiation failed.", `the transfer is answered 425 (${JSON.stringify(silent.replies.map((r) => r.text))})`);
    const waited = silent.finalAt - silent.sentAt;
    t.ok(waited >= HANDSHAKE_SECONDS * 1000 - 50 && waited < 4000, `after tlsHandshakeSeconds (${waited} ms)`);
    t.equal(silent.received.length, 0, 'no data in clear text on the unsecured connection');
    t.equal(await tlsMetric(s.proxy, 'client', 'data', 'failed'), 1, 'counted as a failed client data handshake');
    t.ok(logsOf(s.proxy, 'data-closed').some((r) => /TLS handshake did not complete within 500 ms/.test(String(r.reason))), 'logged with the reason');
    t.equal(logsOf(s.proxy, 'transfer').at(-1)?.reply, 425, 'transfer record with reply 425');
    t.ok(await waitFor(() => s.proxy.server.poolStats().every((p) => p.leased === 0)), `relay port released while the session lives (${JSON.stringify(s.proxy.server.poolStats())})`);
    t.equal(s.proxy.server.sessionCount, 1, 'the session is still open');
    t.equal((await c.client.command('NOOP')).code, 200, 'NOOP works');
    const ok = await transfer(s, c, 'RETR f.bin', { session: c.sessions.at(-1)!, active });
    t.equal(ok.final.code, 226, `the next transfer: 226 (${ok.final.text})`);
    t.ok(ok.received.equals(FILE) && ok.reused === true, 'intact and resumed');
    await c.client.quit();
    t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
  });
}

t.test('the client drops its control connection while its data handshake is pending: everything released at once', async (t) => {
  // A long handshake timeout: the release must come from the session's end, not from the timer.
  const s = await setup(t, { handshakeSeconds: 20 });
  const c = await secureControl(s);
  await loginProtected(c);
  const pasv = await c.client.command('PASV');
  const raw = s.track(await openData('127.0.0.1', parse227(pasv).port));
  raw.on('error', () => {});
  c.client.send('RETR f.bin');
  t.equal((await c.client.readReply()).code, 150, 'the transfer started (150), the data handshake is pending');
  const since = Date.now();
  c.client.destroy();
  const released = await settleLeaks(s.proxy, 8000);
  t.same(released, { sessions: 0, leased: 0 }, 'session and relay port released');
  t.ok(Date.now() - since < 8000, `well before tlsHandshakeSeconds (${Date.now() - since} ms)`);
  const seen = await waitClose(raw, since);
  t.ok(seen.afterMs < 8000, `the silent data connection was closed too (${seen.afterMs} ms)`);
  const upstream = s.fake!.sessions[0];
  t.ok(upstream && (await waitFor(() => upstream.socket.destroyed)), 'the server connection was closed');
});

// ------------------------------------------------------------------ 9. reloading the certificate

t.test('reload with a new certificate: new sessions get it, an open TLS session keeps working', async (t) => {
  const listen = `127.0.0.1:${await freePort()}`;
  const s = await setup(t, { listen });
  const bothCas = [pki.ca.cert.pem, pki.otherCa.cert.pem];
  const issuerOf = (c: TlsControl): string => String(c.socket.getPeerCertificate().issuer.CN);
  const before = await secureControl(s, { ca: bothCas });
  await loginProtected(before);
  t.equal(issuerOf(before), 'ftpnp test CA', 'before the reload: the first certificate');

  const next = configText({ listen, cert: pki.otherServer.cert.path, key: pki.otherServer.key.path }, s.fake!.port, s.range.text);
  const result = await s.proxy.server.reload(validateConfigText(next, 'reload'));
  t.same(result, { added: [], removed: [], updated: ['test'] }, 'the listener is updated in place');

  const after = await secureControl(s, { ca: bothCas });
  await loginProtected(after);
  t.equal(issuerOf(after), 'ftpnp another CA', 'a new session gets the new certificate');
  t.equal(s.proxy.port, Number(listen.split(':')[1]), 'on the same port');
  await checkResumedDownload(t, s, after, 'the new session');

  t.equal((await before.client.command('NOOP')).code, 200, 'the open session\'s control connection still works');
  const old = await transfer(s, before, 'RETR f.bin', { ca: bothCas, session: before.sessions.at(-1)! });
  t.equal(old.final.code, 226, `the open session still resumes its own data sessions (${old.final.text})`);
  t.equal(old.reused, true, 'resumed');
  t.ok(old.received.equals(FILE), 'file intact');
  // A client that trusts only the old CA now refuses the proxy: the certificate really changed.
  const refusal = await secureControl(s, { ca: pki.ca.cert.pem }).then(() => 'accepted', (err: NodeJS.ErrnoException) => err.code ?? err.message);
  t.equal(refusal, 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'a client trusting only the old CA refuses the new certificate');
  await before.client.quit();
  await after.client.quit();
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

// ------------------------------------------------------------------ both legs TLS, real vsftpd

t.test('both legs TLS against a real FTPS vsftpd: login and transfers work, data resumed on both legs', { skip: vsftpdMissing ?? false }, async (t) => {
  const passive = ports.take(10);
  const vsftpd = await startVsftpd({ pasvAddress: null, pasvMinPort: passive.first, pasvMaxPort: passive.last, ssl: { cert: pki.server.cert.path, key: pki.server.key.path, debug: true } });
  t.teardown(() => vsftpd.stop());
  writeFileSync(join(vsftpd.root, 'f.bin'), FILE);
  const s = await setup(t, { upstreamPort: vsftpd.port, upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path } });
  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    const c = await secureControl(s, { version });
    await loginProtected(c, vsftpd.user, vsftpd.password);
    await checkResumedDownload(t, s, c, `${version} download`);
    const payload = randomBytes(64 * 1024);
    const up = await transfer(s, c, `STOR up-${version}.bin`, { version, session: c.sessions.at(-1)!, upload: payload });
    t.equal(up.final.code, 226, `${version} upload: 226 (${up.final.text})`);
    await c.client.quit();
  }
  t.match(vsftpd.protocolLog(), /SSL cipher: [^,]+, reused/, 'vsftpd saw resumed data sessions from the proxy');
  t.equal(await tlsMetric(s.proxy, 'server', 'data', 'failed'), 0, 'no failed server data handshake');
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

t.test('both legs TLS: a client data connection that never handshakes leaves the vsftpd session usable', { skip: vsftpdMissing ?? false }, async (t) => {
  const passive = ports.take(10);
  const vsftpd = await startVsftpd({ pasvAddress: null, pasvMinPort: passive.first, pasvMaxPort: passive.last, ssl: { cert: pki.server.cert.path, key: pki.server.key.path, debug: true } });
  t.teardown(() => vsftpd.stop());
  writeFileSync(join(vsftpd.root, 'f.bin'), FILE);
  const s = await setup(t, { upstreamPort: vsftpd.port, upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path }, handshakeSeconds: HANDSHAKE_SECONDS });
  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    const c = await secureControl(s, { version });
    await loginProtected(c, vsftpd.user, vsftpd.password);
    const refused = await transfer(s, c, 'RETR f.bin', { silent: true });
    t.equal(refused.final.text, "425 Can't open data connection: TLS negotiation failed.", `${version}: 425 (${JSON.stringify(refused.replies.map((r) => r.text))})`);
    const noop = await c.client.command('NOOP').catch((err: Error) => ({ code: 0, text: err.message }));
    t.equal(noop.code, 200, `${version}: the session is still usable (${noop.text})`);
    if (noop.code === 200) await checkResumedDownload(t, s, c, `${version}: the next transfer`);
    await c.client.quit();
  }
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

/**
 * A server far away: TCP forwarders on 127.0.0.1 (the control port, and each of the server's
 * passive ports) to vsftpd on 127.0.0.2, delaying everything the server sends by `delayMs`
 * (order kept), as a WAN link would. A reset from the proxy is passed on as a reset.
 */
async function farAway(t: TapTest, target: string, controlPort: number, dataPorts: readonly number[], delayMs: number): Promise<number> {
  const servers: net.Server[] = [];
  const sockets = new Set<net.Socket>();
  t.teardown(() => {
    for (const socket of sockets) socket.destroy();
    for (const server of servers) server.close();
  });
  const forward = (listenPort: number, targetPort: number): Promise<number> => new Promise((resolve, reject) => {
    const server = net.createServer({ allowHalfOpen: true }, (near) => {
      const far = net.connect({ host: target, port: targetPort, allowHalfOpen: true });
      for (const socket of [near, far]) {
        sockets.add(socket);
        socket.once('close', () => sockets.delete(socket));
      }
      near.on('error', () => far.resetAndDestroy());
      far.on('error', () => near.resetAndDestroy());
      near.once('close', () => far.destroy());
      near.pipe(far);
      let due = 0;
      const later = (fn: () => void): void => {
        due = Math.max(Date.now() + delayMs, due);
        setTimeout(fn, due - Date.now());
      };
      far.on('data', (chunk: Buffer) => later(() => near.write(chunk)));
      far.once('end', () => later(() => near.end()));
      far.once('close', () => later(() => near.destroy()));
    });
    servers.push(server);
    server.once('error', reject);
    server.listen(listenPort, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port));
  });
  await Promise.all(dataPorts.map((port) => forward(port, port)));
  return forward(0, controlPort);
}

// With the server near, the proxy's data handshake with vsftpd usually ends before the client's
// leg is refused; with a real WAN distance it does not, and the refusal must not cut vsftpd's
// SSL_accept short: vsftpd ends the WHOLE session on a failed data SSL_accept (protocol.md §5.5).
t.test('both legs TLS, server 300 ms away: a client data connection refused for a fresh session leaves the vsftpd session usable', { skip: vsftpdMissing ?? false }, async (t) => {
  const passive = ports.take(10);
  const vsftpd = await startVsftpd({ listenAddress: '127.0.0.2', pasvAddress: null, pasvMinPort: passive.first, pasvMaxPort: passive.last, ssl: { cert: pki.server.cert.path, key: pki.server.key.path, debug: true } });
  t.teardown(() => vsftpd.stop());
  writeFileSync(join(vsftpd.root, 'f.bin'), FILE);
  const dataPorts = Array.from({ length: passive.last - passive.first + 1 }, (_, i) => passive.first + i);
  const controlPort = await farAway(t, '127.0.0.2', vsftpd.port, dataPorts, 300);
  const s = await setup(t, { upstreamPort: controlPort, upstreamTls: { mode: 'explicit', ca: pki.ca.cert.path } });
  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    const logStart = vsftpd.protocolLog().length;
    const c = await secureControl(s, { version });
    await loginProtected(c, vsftpd.user, vsftpd.password);
    const refused = await transfer(s, c, 'RETR f.bin', { version });
    t.equal(refused.final.text, NOT_RESUMED, `${version}: ${JSON.stringify(NOT_RESUMED)} (${JSON.stringify(refused.replies.map((r) => r.text))})`);
    t.equal(refused.received.length, 0, `${version}: no data`);
    const noop = await c.client.command('NOOP', 8000).catch((err: Error) => ({ code: 0, text: err.message }));
    t.equal(noop.code, 200, `${version}: the session is still usable (${noop.text})`);
    t.notMatch(vsftpd.protocolLog().slice(logStart), /SSL_accept failed/, `${version}: vsftpd saw no failed data handshake (it ends the whole session on one)`);
    if (noop.code === 200) await checkResumedDownload(t, s, c, `${version}: the next transfer`);
    await c.client.quit();
  }
  t.same(await settleLeaks(s.proxy), { sessions: 0, leased: 0 }, 'no session or relay port left behind');
});

// ------------------------------------------------------------------ 8. logs: no password, no key material

t.test('no log line of any proxy in this file carries a password or key material', async (t) => {
  t.ok(proxies.length >= 10, `looked at ${proxies.length} proxies' logs`);
  const keyLines = [pki.server.key.pem, pki.otherServer.key.pem, pki.ca.key.pem]
    .flatMap((pem) => pem.split('\n'))
    .filter((line) => line.length >= 16 && !line.startsWith('-----'));
  t.ok(keyLines.length > 20, 'key lines to look for');
  let checkedBytes = 0;
  for (const [i, proxy] of proxies.entries()) {
    const text = proxy.logText();
    checkedBytes += text.length;
    t.notOk(text.includes(FAKE_PASSWORD), `proxy ${i}: the fake server's password is not logged`);
    t.notOk(text.includes(TEST_PASSWORD), `proxy ${i}: vsftpd's password is not logged`);
    t.notMatch(text, /PRIVATE KEY|BEGIN CERTIFICATE/, `proxy ${i}: no PEM block`);
    const leaked = keyLines.filter((line) => text.includes(line));
    t.same(leaked, [], `proxy ${i}: no line of a private key`);
  }
  t.ok(checkedBytes > 10000, `${checkedBytes} bytes of logs checked`);
  const passLogged = proxies.flatMap((p) => p.logs()).filter((r) => r.event === 'command' && /^PASS/.test(String(r.command)));
  t.ok(passLogged.length > 0 && passLogged.every((r) => r.command === 'PASS ****'), `PASS logged masked (${passLogged.length} times)`);
});
