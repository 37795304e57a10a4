/**
 * TlsSessionBinding (src/data/tls.ts): which resumed TLS sessions count as this FTP session's
 * own (protocol.md §5.5-5.6), with real Node TLS sockets on loopback, one shared server
 * SecureContext (as the proxy's listener has), TLS 1.3 tickets, TLS 1.2 tickets and TLS 1.2
 * session IDs:
 * - a session issued on an admitted socket (the control connection) resumes as bound;
 * - the same ticket offered to another FTP session's binding is not bound;
 * - a session issued on a socket that was refused (a data connection that did not resume) is
 *   never bound, so a second connection cannot get around the check by resuming it.
 * A certificate is made with openssl in a temporary directory.
 */
import t from 'tap';
import net from 'node:net';
import tls from 'node:tls';
import { constants } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { masterKeyFingerprint, TlsSessionBinding } from '../../src/data/tls.js';
import { withTimeout } from '../helpers/async.js';

const dir = mkdtempSync(join(tmpdir(), 'ftpnp-tls-binding-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'k.pem'), '-out', join(dir, 'c.pem'), '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
const cert = readFileSync(join(dir, 'c.pem'));
const context = tls.createSecureContext({ key: readFileSync(join(dir, 'k.pem')), cert });

type Verdict = 'admit' | 'refuse';
interface Outcome {
  readonly bound: boolean;
  readonly reused: boolean;
  /** The newest session the client was handed on this connection. */
  readonly session: Buffer | null;
}

/** One TLS connection to a server whose socket reports to `binding`; the verdict is applied once it is secure. */
async function connection(binding: TlsSessionBinding, verdict: Verdict, client: tls.ConnectionOptions): Promise<Outcome> {
  let bound = false;
  let reused = false;
  const server = net.createServer((plain) => {
    const scope = binding.socketScope();
    const socket = new tls.TLSSocket(plain, { isServer: true, secureContext: context, server: scope.emitter as unknown as net.Server });
    socket.on('error', () => {});
    socket.once('secure', () => {
      bound = binding.resumesOwnSession(socket);
      reused = socket.isSessionReused();
      if (verdict === 'admit') scope.admit(socket);
      else scope.refuse();
      // Let TLS 1.3 tickets reach the client before closing (a refused socket may still have sent some).
      setTimeout(() => socket.end(), 30);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => server.close());
  const { port } = server.address() as net.AddressInfo;
  let session: Buffer | null = null;
  await withTimeout(new Promise<void>((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, ca: cert, ...client });
    socket.on('session', (s: Buffer) => (session = s));
    socket.on('data', () => {});
    socket.once('end', () => {
      socket.end();
      resolve();
    });
    socket.once('error', reject);
  }), 5000, 'TLS connection');
  return { bound, reused, session };
}

const VARIANTS: Array<[string, tls.ConnectionOptions]> = [
  ['TLS 1.3 ticket', { maxVersion: 'TLSv1.3' }],
  ['TLS 1.2 ticket', { maxVersion: 'TLSv1.2' }],
  ['TLS 1.2 session ID', { maxVersion: 'TLSv1.2', secureOptions: constants.SSL_OP_NO_TICKET }],
];

for (const [name, options] of VARIANTS) {
  t.test(`${name}: own sessions bound, another FTP session's and a refused socket's not`, async (t) => {
    const own = new TlsSessionBinding();
    const other = new TlsSessionBinding();
    const control = await connection(own, 'admit', options);
    t.equal(control.reused, false, 'the control connection is a full handshake');
    t.ok(control.session, 'the client was handed a session');
    const data = await connection(own, 'admit', { ...options, session: control.session! });
    t.equal(data.reused, true, 'a data connection resumes it');
    t.equal(data.bound, true, 'and is bound to its own FTP session');
    const foreign = await connection(other, 'admit', { ...options, session: control.session! });
    t.equal(foreign.bound, false, 'the same session offered to another FTP session is not bound');

    // A data connection that is refused (a fresh handshake) must leave nothing behind to resume.
    const refused = await connection(own, 'refuse', options);
    t.equal(refused.bound, false, 'a fresh handshake is not bound');
    t.ok(refused.session, 'the refused connection still handed the client a session');
    const replay = await connection(own, 'admit', { ...options, session: refused.session! });
    t.equal(replay.bound, false, 'resuming the refused connection\'s session is not bound');
    // The same sequence with the fresh connection admitted shows the check is what refuses it.
    const admitted = await connection(own, 'admit', options);
    const replayAdmitted = await connection(own, 'admit', { ...options, session: admitted.session! });
    t.equal(replayAdmitted.bound, true, 'had that connection been admitted, its session would be bound');
  });
}

t.test('masterKeyFingerprint: null for nothing, for garbage and for a session without a master key', async (t) => {
  t.equal(masterKeyFingerprint(undefined), null);
  t.equal(masterKeyFingerprint(Buffer.from('not DER at all')), null);
  t.equal(masterKeyFingerprint(Buffer.from([0x30, 0x03, 0x02, 0x01, 0x01])), null, 'truncated SEQUENCE');
  // version 1, ssl_version, cipher, empty session id, empty master key
  t.equal(masterKeyFingerprint(Buffer.from([0x30, 0x0c, 0x02, 0x01, 0x01, 0x02, 0x02, 0x03, 0x04, 0x04, 0x02, 0x13, 0x01, 0x04, 0x00, 0x04, 0x00])), null, 'empty master key');
  const withKey = Buffer.from([0x30, 0x0f, 0x02, 0x01, 0x01, 0x02, 0x02, 0x03, 0x04, 0x04, 0x02, 0x13, 0x01, 0x04, 0x00, 0x04, 0x03, 0xaa, 0xbb, 0xcc]);
  t.match(masterKeyFingerprint(withKey), /^[0-9a-f]{64}$/, 'a master key gives a SHA-256 fingerprint');
});
