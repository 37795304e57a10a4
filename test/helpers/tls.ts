/**
 * A throw-away PKI for FTPS tests, made with the `openssl` CLI in a fresh temporary directory:
 * a test CA and a server certificate it signed, plus an unrelated second CA and its own server
 * certificate (same names) for the "certificate from another CA is refused" tests. Nothing is
 * fetched and no key is committed; `cleanup()` removes the directory. Make one PKI per test
 * file (`t.before`) and share it: key generation is the slow part.
 *
 * Key types: the CAs use P-256 (fast to make); the server certificates use RSA 2048 because
 * Debian's vsftpd 3.0.3 with its default `ssl_ciphers` completes no TLS 1.2 handshake with an
 * ECDSA server key (handshake failure alert 40), while RSA works for TLS 1.2 and 1.3.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';

/** subjectAltName entries every server certificate carries: the loopback names tests dial. */
export const DEFAULT_SANS: readonly string[] = ['IP:127.0.0.1', 'IP:::1', 'DNS:localhost'];

/** One file written in PEM form: where it is and what it holds. */
export interface PemFile {
  readonly path: string;
  readonly pem: string;
}

export interface CertificateAuthority {
  readonly cert: PemFile;
  readonly key: PemFile;
}

export interface ServerCertificate {
  readonly cert: PemFile;
  readonly key: PemFile;
  /** The subjectAltName entries, as given to openssl (`IP:…`, `DNS:…`). */
  readonly sans: readonly string[];
}

export interface TestPki {
  readonly dir: string;
  /** The CA clients are told to trust (`curl --cacert`, lftp `ssl:ca-file`, Python `cafile`). */
  readonly ca: CertificateAuthority;
  /** Signed by `ca`; SANs: DEFAULT_SANS plus the extra ones. */
  readonly server: ServerCertificate;
  /** An unrelated CA nobody trusts. */
  readonly otherCa: CertificateAuthority;
  /** Same names as `server`, signed by `otherCa`: a client verifying against `ca` must refuse it. */
  readonly otherServer: ServerCertificate;
  /** Remove the directory (idempotent). */
  cleanup(): void;
}

export interface TestPkiOptions {
  /** Parent of the fresh directory; default the system temp dir. */
  readonly parentDir?: string;
  /** More subjectAltName entries, e.g. 'DNS:ftp.internal.example', 'IP:10.20.0.5'. */
  readonly extraSans?: readonly string[];
  /** Validity of every certificate; default 2 days. */
  readonly days?: number;
}

/** One-line reason to skip a test that needs the PKI, or null. */
export function opensslUnavailable(): string | null {
  const probe = spawnSync('openssl', ['version'], { encoding: 'utf8' });
  return probe.status === 0 ? null : 'the openssl CLI is not installed (apt-get install openssl)';
}

// A SAN is handed to openssl inside a config line: reject anything that could end or extend it.
const SAN_PATTERN = /^(IP:[0-9A-Fa-f:.]+|DNS:[A-Za-z0-9*.-]+)$/;

/** Create the PKI described in the module comment; throws if openssl fails. */
export function makeTestPki(options: TestPkiOptions = {}): TestPki {
  const sans = [...DEFAULT_SANS, ...(options.extraSans ?? [])];
  for (const san of sans) if (!SAN_PATTERN.test(san)) throw new Error(`unsupported subjectAltName entry: ${JSON.stringify(san)}`);
  const days = String(options.days ?? 2);
  const { dir, cleanup } = privateTempDir('ftpnp-pki-', options.parentDir);
  try {
    const extFile = join(dir, 'server-ext.cnf');
    writeFileSync(extFile, [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth',
      `subjectAltName=${sans.join(',')}`,
      '',
    ].join('\n'));
    const makeCa = (name: string, cn: string): CertificateAuthority => {
      const keyPath = join(dir, `${name}.key`);
      const certPath = join(dir, `${name}.pem`);
      openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
        '-keyout', keyPath, '-out', certPath, '-days', days, '-subj', `/CN=${cn}`,
        '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
      return { cert: pemFile(certPath), key: pemFile(keyPath) };
    };
    const makeServer = (name: string, ca: CertificateAuthority): ServerCertificate => {
      const keyPath = join(dir, `${name}.key`);
      const csrPath = join(dir, `${name}.csr`);
      const certPath = join(dir, `${name}.pem`);
      openssl(['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyPath, '-out', csrPath, '-subj', '/CN=localhost']);
      // A random serial: no .srl file, and two runs never issue the same serial.
      openssl(['x509', '-req', '-in', csrPath, '-CA', ca.cert.path, '-CAkey', ca.key.path,
        '-set_serial', `0x${randomBytes(8).toString('hex')}`, '-days', days, '-sha256', '-extfile', extFile, '-out', certPath]);
      rmSync(csrPath);
      return { cert: pemFile(certPath), key: pemFile(keyPath), sans };
    };
    const ca = makeCa('ca', 'ftpnp test CA');
    const otherCa = makeCa('other-ca', 'ftpnp another CA');
    return {
      dir,
      ca,
      server: makeServer('server', ca),
      otherCa,
      otherServer: makeServer('other-server', otherCa),
      cleanup,
    };
  } catch (err) {
    cleanup();
    throw err;
  }
}

/** A fresh temporary directory only we can read (it holds private keys), and its idempotent removal. */
function privateTempDir(prefix: string, parentDir: string = tmpdir()): { readonly dir: string; cleanup(): void } {
  const dir = mkdtempSync(join(parentDir, prefix));
  chmodSync(dir, 0o700);
  let cleaned = false;
  return {
    dir,
    cleanup: () => {
      if (cleaned) return;
      cleaned = true;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function openssl(args: readonly string[]): void {
  try {
    execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim() ?? '';
    throw new Error(`openssl ${args[0]} failed: ${stderr || String(err)}`);
  }
}

function pemFile(path: string): PemFile {
  return { path, pem: readFileSync(path, 'utf8') };
}

/** A self-signed certificate and its key, as PEM buffers. */
export interface SelfSigned {
  readonly cert: Buffer;
  readonly key: Buffer;
  /** Remove the directory (idempotent). */
  cleanup(): void;
}

/**
 * A self-signed RSA 2048 certificate for 127.0.0.1 (CN localhost) in a fresh temporary
 * directory: for socket-level TLS tests that trust the certificate itself (`ca: cert`).
 */
export function makeSelfSigned(prefix = 'ftpnp-tls-'): SelfSigned {
  const { dir, cleanup } = privateTempDir(prefix);
  try {
    const keyPath = join(dir, 'k.pem');
    const certPath = join(dir, 'c.pem');
    openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyPath, '-out', certPath,
      '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1']);
    return { cert: readFileSync(certPath), key: readFileSync(keyPath), cleanup };
  } catch (err) {
    cleanup();
    throw err;
  }
}
