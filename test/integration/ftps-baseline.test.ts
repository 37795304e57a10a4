/**
 * FTPS facts of the test environment, proven directly against a real vsftpd with NO proxy in
 * the path (protocol.md §5, test-environment.md): the ground issue #12 (FTPS in the proxy)
 * stands on. vsftpd runs with ssl_enable=YES, force_local_logins_ssl=YES,
 * force_local_data_ssl=YES, require_ssl_reuse=YES and debug_ssl=YES (its log then names the
 * TLS version of every connection and whether it resumed a session).
 *
 * - curl (EPSV, PASV), lftp (EPSV, PASV, PORT) and CPython ftplib (PASV, PORT) download and
 *   upload a 1 MiB random file intact, explicit (AUTH TLS) and implicit (ftps://, its own
 *   implicit_ssl=YES instance), at TLS 1.3 and capped at TLS 1.2.
 * - Known client quirk, so those cases are not run (CI must not fail by chance, nor skip):
 *   curl 7.88.1 and lftp 4.9.2 (GnuTLS)
 *   uploads over TLS 1.3 fail in roughly one run in five with `426 Failure reading network
 *   stream.` (vsftpd debug_ssl: EPIPE after 114688 bytes). The likely cause: after the data
 *   handshake vsftpd (OpenSSL) sends a NewSessionTicket; a client that only writes and then
 *   closes with that record unread makes the kernel send RST, and vsftpd loses the rest of the
 *   upload. Capped at TLS 1.2 (tickets travel inside the handshake) 0 of 20 failed; ftplib,
 *   whose unwrap() reads until the peer's close_notify, never failed.
 * - curl opens explicit TLS with `AUTH SSL`, lftp and ftplib with `AUTH TLS`.
 * - A plain-text USER gets `530 Non-anonymous sessions must use encryption.`
 * - A client that verifies against another CA refuses the server, and a server certificate
 *   from another CA is refused; no credentials reach the server.
 * - Node `tls.connect`: AUTH TLS then upgrade the control socket; a data connection made with
 *   `tls.connect({ socket, session })` resumes (isSessionReused() true) at TLS 1.2 and 1.3, and
 *   one without the session gets `522 SSL connection failed: session reuse required` after the
 *   150, and vsftpd ends the whole session (protocol.md §5.5). After a TLS download vsftpd sends
 *   close_notify and FIN but holds its 226 until the client closes the data connection too.
 */
import t from 'tap';
import { commandsMissing } from '../helpers/netns.js';
import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import { randomBytes, X509Certificate } from 'node:crypto';
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance, type VsftpdSslOptions } from '../helpers/vsftpd.js';
import { FTPS_CLIENT_MODES, MODE_VERB, sha256, sha256File, transferTls, writeRandomFile, type ClientMode, type FtpsClientName, type FtpsEndpoint, type FtpsStyle } from '../helpers/clients.js';
import { makeTestPki, opensslUnavailable, type TestPki } from '../helpers/tls.js';
import { FtpClient, openData, parse229, type FtpReply } from '../helpers/ftp-client.js';
import { delay, withTimeout } from '../helpers/async.js';
import type { TapTest } from '../helpers/tap.js';

const FILE_BYTES = 1024 * 1024;
const TLS_VERSIONS = ['1.3', '1.2'] as const;
type TlsVersion = (typeof TLS_VERSIONS)[number];
const NODE_VERSION: Readonly<Record<TlsVersion, tls.SecureVersion>> = { '1.3': 'TLSv1.3', '1.2': 'TLSv1.2' };
/**
 * What each client sends to start explicit TLS. curl asks for `AUTH SSL` first and only tries
 * `AUTH TLS` after a refusal (its default CURLFTPAUTH_DEFAULT; the curl tool has no switch for
 * it); vsftpd answers `234` to both.
 */
const AUTH_COMMAND: Readonly<Record<FtpsClientName, string>> = { curl: 'AUTH SSL', lftp: 'AUTH TLS', ftplib: 'AUTH TLS' };

function firstLine(text: string): string {
  return text.trim().split('\n')[0] ?? '';
}


const reason = vsftpdUnavailable() ?? opensslUnavailable() ?? commandsMissing(['curl', 'lftp', 'python3']);
if (reason) {
  t.plan(0, reason);
} else {
  let pki: TestPki;
  let explicit: VsftpdInstance;
  let implicit: VsftpdInstance;
  let localDir: string;
  let localSource: string;
  let sourceHash: string;
  const servers: VsftpdInstance[] = [];
  const sslFor = (p: TestPki, more: Partial<VsftpdSslOptions> = {}): VsftpdSslOptions => ({
    cert: p.server.cert.path,
    key: p.server.key.path,
    forceLogins: true,
    forceData: true,
    requireReuse: true,
    debug: true,
    ...more,
  });
  /** A vsftpd stopped by the file's teardown; pasvAddress null: 227 carries the real address. */
  const startServer = async (ssl: VsftpdSslOptions): Promise<VsftpdInstance> => {
    const server = await startVsftpd({ pasvAddress: null, ssl });
    servers.push(server);
    return server;
  };

  t.before(async () => {
    pki = makeTestPki({ extraSans: ['DNS:ftp.internal.example', 'IP:10.20.0.5'] });
    [explicit, implicit] = await Promise.all([startServer(sslFor(pki)), startServer(sslFor(pki, { implicit: true }))]);
    localDir = mkdtempSync(join(tmpdir(), 'ftpnp-ftps-'));
    chmodSync(localDir, 0o755);
    localSource = join(localDir, 'source.bin');
    sourceHash = writeRandomFile(localSource, FILE_BYTES);
    for (const server of [explicit, implicit]) copyFileSync(localSource, join(server.root, 'source.bin'));
  });
  t.teardown(async () => {
    await Promise.all(servers.map((s) => s.stop()));
    if (localDir) rmSync(localDir, { recursive: true, force: true });
    pki?.cleanup();
  });

  const endpointFor = (server: VsftpdInstance, more: Partial<FtpsEndpoint> = {}): FtpsEndpoint => ({
    host: server.host,
    port: server.port,
    user: server.user,
    password: server.password,
    activeAddress: '127.0.0.1',
    caFile: pki.ca.cert.path,
    timeoutMs: 30000,
    ...more,
  });

  t.test('the test PKI', async (t) => {
    const server = new X509Certificate(pki.server.cert.pem);
    const other = new X509Certificate(pki.otherServer.cert.pem);
    t.equal(server.subjectAltName, 'IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, DNS:localhost, DNS:ftp.internal.example, IP Address:10.20.0.5', 'default and extra SANs');
    t.ok(server.checkIssued(new X509Certificate(pki.ca.cert.pem)), 'server certificate issued by the CA');
    t.ok(server.verify(new X509Certificate(pki.ca.cert.pem).publicKey), 'and signed by its key');
    t.notOk(other.checkIssued(new X509Certificate(pki.ca.cert.pem)), 'the other server certificate is not from the CA');
    t.ok(other.verify(new X509Certificate(pki.otherCa.cert.pem).publicKey), 'it is from the other CA');
    t.equal(other.subjectAltName, server.subjectAltName, 'with the same names (only the issuer differs)');
    t.equal(readFileSync(pki.server.key.path, 'utf8'), pki.server.key.pem, 'paths and PEM contents agree');
  });

  /** One transfer with a real client; asserts the bytes and what vsftpd saw. */
  async function checkTransfer(t: TapTest, server: VsftpdInstance, style: FtpsStyle, client: FtpsClientName, mode: ClientMode, version: TlsVersion, direction: 'get' | 'put'): Promise<void> {
    const tag = `${style}-${client}-${mode}-tls${version}`;
    const logStart = server.protocolLog().length;
    const endpoint = endpointFor(server, { tlsMax: version });
    const local = join(localDir, `${tag}.down`);
    const remote = direction === 'get' ? 'source.bin' : `${tag}.up`;
    const result = await transferTls(client, style, mode, endpoint, direction, remote, direction === 'get' ? local : localSource);
    t.equal(result.code, 0, `${direction} exits 0 (${(result.stderr + result.stdout).trim().slice(0, 300)})`);
    t.equal(sha256File(direction === 'get' ? local : join(server.root, remote)), sourceHash, `${direction === 'get' ? 'downloaded' : 'uploaded'} file intact`);
    const log = server.protocolLog().slice(logStart);
    const commands = [...log.matchAll(/FTP command: Client "[^"]+", "([^"]*)"/g)].map((m) => m[1]!);
    const verbs = commands.map((c) => c.split(' ')[0]!.toUpperCase());
    t.ok(verbs.includes(MODE_VERB[mode]), `client sent ${MODE_VERB[mode]} (saw ${[...new Set(verbs)].join(' ')})`);
    t.ok(commands.includes('PROT P'), 'data protected (PROT P)');
    const auth = commands.filter((c) => /^AUTH /i.test(c));
    t.same(auth, style === 'explicit' ? [AUTH_COMMAND[client]] : [], style === 'explicit' ? `${AUTH_COMMAND[client]} on the plain control connection` : 'no AUTH: TLS from the first byte');
    const handshakes = [...log.matchAll(/"SSL version: (TLSv[\d.]+), SSL cipher: [^,]+, (reused|not reused)/g)].map((m) => ({ version: m[1], reused: m[2] === 'reused' }));
    // One fresh handshake (the control connection: a silent reconnect would show as a second
    // one), then data connections that resumed it (require_ssl_reuse refuses any other).
    t.equal(handshakes.filter((h) => !h.reused).length, 1, 'one control connection, one full handshake');
    t.ok(handshakes.some((h) => h.reused), 'the data connection resumed the control session');
    t.same([...new Set(handshakes.map((h) => h.version))], [`TLSv${version}`], `every connection used TLS ${version}`);
  }

  for (const [style, serverOf] of [['explicit', () => explicit], ['implicit', () => implicit]] as const) {
    t.test(`${style} FTPS with real clients`, async (t) => {
      for (const client of Object.keys(FTPS_CLIENT_MODES) as FtpsClientName[]) {
        for (const mode of FTPS_CLIENT_MODES[client]) {
          for (const version of TLS_VERSIONS) {
            t.test(`${client} ${mode} TLS ${version} download`, (t) => checkTransfer(t, serverOf(), style, client, mode, version, 'get'));
            // Not run: curl/lftp uploads over TLS 1.3, a client quirk that fails by chance (see the header).
            if (client !== 'ftplib' && version === '1.3') continue;
            t.test(`${client} ${mode} TLS ${version} upload`, (t) => checkTransfer(t, serverOf(), style, client, mode, version, 'put'));
          }
        }
      }
    });
  }

  t.test('a plain-text login is refused (force_local_logins_ssl)', async (t) => {
    const control = await FtpClient.connect(explicit.host, explicit.port);
    t.teardown(() => control.destroy());
    t.equal((await control.readReply()).code, 220, 'greeting in clear text (explicit FTPS)');
    const user = await control.command(`USER ${explicit.user}`);
    t.equal(user.text, '530 Non-anonymous sessions must use encryption.', 'USER before AUTH TLS');
    await control.quit();
  });

  t.test('hostile: an unverifiable server certificate is refused before any credential is sent', async (t) => {
    const logStart = explicit.protocolLog().length;
    const untrusting = { caFile: pki.otherCa.cert.path };
    const down = (name: string): string => join(localDir, `refused-${name}.down`);
    const curl = await transferTls('curl', 'explicit', 'epsv', endpointFor(explicit, untrusting), 'get', 'source.bin', down('curl'));
    t.equal(curl.code, 60, `curl: peer certificate cannot be authenticated (${firstLine(curl.stderr)})`);
    const curlImplicit = await transferTls('curl', 'implicit', 'epsv', endpointFor(implicit, untrusting), 'get', 'source.bin', down('curl-implicit'));
    t.equal(curlImplicit.code, 60, `curl ftps:// as well (${firstLine(curlImplicit.stderr)})`);
    const lftp = await transferTls('lftp', 'explicit', 'pasv', endpointFor(explicit, untrusting), 'get', 'source.bin', down('lftp'));
    t.not(lftp.code, 0, 'lftp fails');
    t.match(lftp.stderr + lftp.stdout, /Certificate verification: The certificate is NOT trusted/, 'because of the certificate');
    const ftplib = await transferTls('ftplib', 'explicit', 'pasv', endpointFor(explicit, untrusting), 'get', 'source.bin', down('ftplib'));
    t.not(ftplib.code, 0, 'ftplib fails');
    t.match(ftplib.stderr, /CERTIFICATE_VERIFY_FAILED/, 'because of the certificate');
    const node = await tlsControlError(explicit, pki.otherCa.cert.pem);
    t.equal(node, 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'Node tls.connect with the other CA');
    const log = explicit.protocolLog().slice(logStart);
    t.notMatch(log, /"PASS|OK LOGIN/, 'no password reached vsftpd, no login');

    // The other way round: a server presenting the certificate of another CA.
    const impostor = await startServer(sslFor(pki, { cert: pki.otherServer.cert.path, key: pki.otherServer.key.path }));
    const against = await transferTls('curl', 'explicit', 'epsv', endpointFor(impostor), 'get', 'source.bin', down('impostor'));
    t.equal(against.code, 60, `curl refuses a server certificate from another CA (${firstLine(against.stderr)})`);
    t.equal(await tlsControlError(impostor, pki.ca.cert.pem), 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'so does Node');
    t.notMatch(impostor.protocolLog(), /"PASS|OK LOGIN/, 'no login at the impostor');
  });

  // ---- Node-level: what the proxy will do toward an FTPS vsftpd (protocol.md §5.4–5.6) ----

  interface TlsControl {
    readonly control: FtpClient;
    readonly socket: tls.TLSSocket;
    /** Every session the server gave this control connection, oldest first. */
    readonly sessions: Buffer[];
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
      socket.resume(); // a 'data' listener does not restart a socket the last read paused
    });
    return withTimeout(reply, 5000, 'plain reply').catch((err: unknown) => {
      throw new Error(`${(err as Error).message} (got ${JSON.stringify(text)})`);
    });
  }

  /** Plain connect, greeting, AUTH TLS → 234, then TLS on the same socket (RFC 4217 §4). */
  async function upgradeControl(server: VsftpdInstance, ca: string, version?: tls.SecureVersion): Promise<{ socket: tls.TLSSocket; sessions: Buffer[] }> {
    const raw = net.connect({ host: server.host, port: server.port });
    try {
      const greeting = await readPlainReply(raw);
      if (!greeting.startsWith('220')) throw new Error(`greeting: ${greeting}`);
      raw.write('AUTH TLS\r\n');
      const auth = await readPlainReply(raw);
      if (!auth.startsWith('234 ')) throw new Error(`AUTH TLS: ${auth}`);
    } catch (err) {
      raw.destroy();
      throw err;
    }
    const socket = tls.connect({ socket: raw, host: server.host, ca, ...(version ? { minVersion: version, maxVersion: version } : {}) });
    const sessions: Buffer[] = [];
    socket.on('session', (session: Buffer) => sessions.push(session));
    try {
      await withTimeout(once(socket, 'secureConnect'), 5000, 'control TLS handshake');
    } catch (err) {
      socket.destroy();
      throw err;
    }
    return { socket, sessions };
  }

  /** The error code a control upgrade fails with. */
  async function tlsControlError(server: VsftpdInstance, ca: string, version?: tls.SecureVersion): Promise<string> {
    try {
      const { socket } = await upgradeControl(server, ca, version);
      socket.destroy();
      return 'no error';
    } catch (err) {
      return (err as NodeJS.ErrnoException).code ?? String(err);
    }
  }

  async function openTlsControl(t: TapTest, server: VsftpdInstance, version: tls.SecureVersion): Promise<TlsControl> {
    const { socket, sessions } = await upgradeControl(server, pki.ca.cert.pem, version);
    const control = FtpClient.over(socket);
    t.teardown(() => control.destroy());
    for (const [command, code] of [[`USER ${server.user}`, 331], [`PASS ${server.password}`, 230], ['PBSZ 0', 200], ['PROT P', 200], ['TYPE I', 200]] as const) {
      const reply = await control.command(command);
      if (reply.code !== code) throw new Error(`${command.split(' ')[0]}: ${reply.text}`);
    }
    return { control, socket, sessions };
  }

  interface DataOutcome {
    readonly preliminary: FtpReply;
    readonly final: FtpReply | null;
    readonly reused: boolean | null;
    readonly protocol: string | null;
    readonly received: Buffer;
    /** Download: a reply had arrived before we closed our side of the data connection. */
    readonly repliedBeforeClientClose: boolean | null;
  }

  /** How long a download waits, after vsftpd's end of data, for a 226 that does not come. */
  const HELD_REPLY_WAIT_MS = 300;

  /** One EPSV transfer whose data connection is `tls.connect({ socket, session })`. */
  async function dataTransfer(c: TlsControl, server: VsftpdInstance, version: tls.SecureVersion, command: string, session: Buffer | undefined, upload?: Buffer): Promise<DataOutcome> {
    const port = parse229(await c.control.command('EPSV'));
    const raw = await openData(server.host, port);
    const data = tls.connect({ socket: raw, host: server.host, ca: pki.ca.cert.pem, minVersion: version, maxVersion: version, ...(session ? { session } : {}) });
    const chunks: Buffer[] = [];
    data.on('data', (chunk: Buffer) => chunks.push(chunk));
    data.on('error', () => {}); // the 522 case: vsftpd drops the connection
    const closed = once(data, 'close');
    const ended = new Promise<void>((resolve) => {
      data.once('end', resolve);
      data.once('close', resolve);
    });
    const secured = withTimeout(once(data, 'secureConnect'), 5000, 'data TLS handshake').then(() => true, () => false);
    // vsftpd runs the data handshake only after its 150 (protocol.md §5.4): send the command
    // without waiting for secureConnect, or both sides wait for each other.
    c.control.send(command);
    const preliminary = await c.control.readReply();
    if (preliminary.code !== 150) {
      data.destroy();
      return { preliminary, final: null, reused: null, protocol: null, received: Buffer.alloc(0), repliedBeforeClientClose: null };
    }
    const handshook = await secured;
    const reused = handshook ? data.isSessionReused() : null;
    const protocol = handshook ? data.getProtocol() : null;
    let repliedBeforeClientClose: boolean | null = null;
    if (upload) {
      if (handshook) data.end(upload); // end() sends close_notify (strict_ssl_read_eof)
    } else {
      await withTimeout(ended, 10000, 'end of the download');
      if (!data.destroyed) {
        // vsftpd has sent close_notify + FIN but keeps its 226 until this side closes too: a
        // TLS socket that stays half-open would wait forever (the proxy must end its leg).
        await delay(HELD_REPLY_WAIT_MS);
        repliedBeforeClientClose = c.control.queued > 0;
        data.end();
      }
    }
    await withTimeout(closed, 10000, 'data connection close');
    const final = await c.control.readReply(10000).catch(() => null);
    return { preliminary, final, reused, protocol, received: Buffer.concat(chunks), repliedBeforeClientClose };
  }

  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    t.test(`Node ${version}: data connections that pass the control session are resumed`, async (t) => {
      const c = await openTlsControl(t, explicit, version);
      t.equal(c.socket.getProtocol(), version, `control connection is ${version}`);
      t.ok(c.sessions.length >= 1, `the control connection received a session (${c.sessions.length})`);
      const session = c.sessions.at(-1)!;

      const down = await dataTransfer(c, explicit, version, 'RETR source.bin', session);
      t.equal(down.preliminary.code, 150, '150 before the data handshake');
      t.equal(down.protocol, version, `data connection is ${version}`);
      t.equal(down.reused, true, 'isSessionReused() on the download');
      t.equal(down.final?.code, 226, `226 (${down.final?.text})`);
      t.equal(sha256(down.received), sourceHash, 'download intact');
      t.equal(down.repliedBeforeClientClose, false, `vsftpd held its 226 for ${HELD_REPLY_WAIT_MS} ms until the client closed the data connection`);

      // The same session again: vsftpd accepts a second resumption of one ticket/session.
      const payload = randomBytes(FILE_BYTES);
      const name = `node-${version}.up`;
      const up = await dataTransfer(c, explicit, version, `STOR ${name}`, session, payload);
      t.equal(up.reused, true, 'isSessionReused() on the upload with the same session');
      t.equal(up.final?.code, 226, `226 (${up.final?.text})`);
      t.equal(sha256File(join(explicit.root, name)), sha256(payload), 'upload intact');
      await c.control.quit();
    });

    t.test(`Node ${version}: a data connection without the session gets 522 and the session ends`, async (t) => {
      const c = await openTlsControl(t, explicit, version);
      const outcome = await dataTransfer(c, explicit, version, 'RETR source.bin', undefined);
      t.equal(outcome.preliminary.code, 150, 'vsftpd answers 150 first');
      t.equal(outcome.final?.text, '522 SSL connection failed: session reuse required', 'then 522');
      t.equal(outcome.received.length, 0, 'no file data');
      t.ok(await c.control.waitClosed(5000), 'vsftpd ends the whole session');
    });
  }

  t.test('ssl.tlsv13 = false caps vsftpd at TLS 1.2 (vsftpd 3.0.3 has no ssl_tlsv1_3 option)', async (t) => {
    const capped = await startServer(sslFor(pki, { tlsv13: false }));
    const { socket } = await upgradeControl(capped, pki.ca.cert.pem);
    t.equal(socket.getProtocol(), 'TLSv1.2', 'a client offering TLS 1.3 gets TLS 1.2');
    socket.destroy();
    t.equal(await tlsControlError(capped, pki.ca.cert.pem, 'TLSv1.3'), 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', 'a TLS-1.3-only client is refused');
    const { socket: uncapped } = await upgradeControl(explicit, pki.ca.cert.pem);
    t.equal(uncapped.getProtocol(), 'TLSv1.3', 'while the default instance negotiates TLS 1.3');
    uncapped.destroy();
  });

  t.test('vsftpd refuses to start on an option Debian 3.0.3 does not know', async (t) => {
    await t.rejects(startVsftpd({ extra: { ssl_tlsv1_2: 'YES' } }), /unrecognised variable in config file: ssl_tlsv1_2/, 'ssl_tlsv1_2 is unknown');
  });
}
