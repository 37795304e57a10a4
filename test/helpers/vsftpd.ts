/**
 * Start a real vsftpd for a test: own config, port, temp root and logs. vsftpd needs root;
 * `vsftpdUnavailable()` gives the one-line reason a test skips elsewhere.
 * Facts behind the settings: ../shared/test-environment.md.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, writeFileSync, readFileSync, chmodSync, rmSync, openSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import tls from 'node:tls';

export const TEST_USER = 'ftpnptest';
export const TEST_PASSWORD = 'ftpnp-Pass-1';
const PAM_SERVICE = 'ftpnp-test';
const EMPTY_DIR = '/var/run/ftpnp-empty';

export function vsftpdUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (vsftpd and a local test user); CI runs as root';
  if (!findVsftpd()) return 'vsftpd is not installed (apt-get install vsftpd)';
  return null;
}

function findVsftpd(): string | null {
  for (const path of ['/usr/sbin/vsftpd', '/usr/bin/vsftpd']) if (existsSync(path)) return path;
  return null;
}

let prepared = false;
/** Local user with a cheap password hash, a PAM service of our own, the empty chroot dir. */
export function prepareSystem(): void {
  if (prepared) return;
  const exists = spawnSync('id', ['-u', TEST_USER]).status === 0;
  if (!exists) {
    // vsftpd changes into the home directory before local_root: it must exist.
    const add = spawnSync('useradd', ['-M', '-d', '/', '-s', '/usr/sbin/nologin', TEST_USER], { encoding: 'utf8' });
    if (add.status !== 0 && !/already exists/.test(add.stderr)) throw new Error(`useradd: ${add.stderr}`);
  } else {
    spawnSync('usermod', ['-d', '/', TEST_USER]);
  }
  // A low-cost hash: the default yescrypt makes each vsftpd login take ~45 ms.
  const pw = spawnSync('chpasswd', ['-c', 'SHA512', '-s', '1000'], { input: `${TEST_USER}:${TEST_PASSWORD}\n`, encoding: 'utf8' });
  if (pw.status !== 0) throw new Error(`chpasswd: ${pw.stderr}`);
  writeFileSync(`/etc/pam.d/${PAM_SERVICE}`, 'auth required pam_unix.so\naccount required pam_permit.so\nsession required pam_permit.so\n');
  mkdirSync(EMPTY_DIR, { recursive: true });
  chmodSync(EMPTY_DIR, 0o755);
  prepared = true;
}

export interface VsftpdOptions {
  readonly listenAddress?: string;
  readonly port?: number;
  /** Address vsftpd writes into 227; a loopback alias nobody listens on makes the 227 "wrong". */
  readonly pasvAddress?: string | null;
  readonly pasvMinPort?: number;
  readonly pasvMaxPort?: number;
  /** Extra vsftpd.conf lines (key -> value). */
  readonly extra?: Readonly<Record<string, string>>;
  /** Run inside this network namespace (`ip netns exec`). */
  readonly netns?: string;
  /** Directory to serve; default a fresh temp dir. */
  readonly root?: string;
  /** Serve FTPS (protocol.md §5); absent: plain FTP as before. */
  readonly ssl?: VsftpdSslOptions;
}

/**
 * FTPS settings, mapped onto vsftpd.conf. Facts about Debian 12's vsftpd 3.0.3 behind them
 * (checked against the binary, which refuses to start on an unknown option with
 * `500 OOPS: unrecognised variable in config file: …`):
 * - it knows `ssl_sslv2`, `ssl_sslv3`, `ssl_tlsv1` but NOT `ssl_tlsv1_1`, `ssl_tlsv1_2` or
 *   `ssl_tlsv1_3`; it uses OpenSSL 3's TLS_server_method, so TLS 1.2 and TLS 1.3 are both on
 *   and no vsftpd option turns TLS 1.3 off. `tlsv13: false` therefore caps the server through
 *   OpenSSL itself: an OPENSSL_CONF file with `MaxProtocol = TLSv1.2` in its environment.
 * - with the default `ssl_ciphers`, TLS 1.2 needs an RSA server key (helpers/tls.ts makes one).
 */
export interface VsftpdSslOptions {
  /** PEM certificate (chain) file: `rsa_cert_file`. */
  readonly cert: string;
  /** PEM private key file: `rsa_private_key_file`. */
  readonly key: string;
  /** `implicit_ssl=YES`: TLS from the first byte (port-990 style); plain clients cannot talk to it. */
  readonly implicit?: boolean;
  /** `force_local_logins_ssl`; default true (vsftpd's default). */
  readonly forceLogins?: boolean;
  /** `force_local_data_ssl`; default true (vsftpd's default). */
  readonly forceData?: boolean;
  /** `require_ssl_reuse`; default true (vsftpd's default): data TLS must resume the control session. */
  readonly requireReuse?: boolean;
  /** Offer TLS 1.3; default true. false caps the server at TLS 1.2 (see above). */
  readonly tlsv13?: boolean;
  /** `ssl_ciphers` (TLS ≤ 1.2 cipher list); default vsftpd's. */
  readonly ciphers?: string;
  /** `debug_ssl=YES`: the protocol log then names each connection's TLS version and "reused". */
  readonly debug?: boolean;
}

/** The vsftpd.conf lines for `ssl` (anonymous FTPS stays off: the tests log in as a local user). */
export function sslSettings(ssl: VsftpdSslOptions): Record<string, string> {
  const yesNo = (value: boolean): string => (value ? 'YES' : 'NO');
  return {
    ssl_enable: 'YES',
    rsa_cert_file: ssl.cert,
    rsa_private_key_file: ssl.key,
    allow_anon_ssl: 'NO',
    force_local_logins_ssl: yesNo(ssl.forceLogins ?? true),
    force_local_data_ssl: yesNo(ssl.forceData ?? true),
    require_ssl_reuse: yesNo(ssl.requireReuse ?? true),
    implicit_ssl: yesNo(ssl.implicit ?? false),
    debug_ssl: yesNo(ssl.debug ?? false),
    ...(ssl.ciphers !== undefined ? { ssl_ciphers: ssl.ciphers } : {}),
  };
}

/** OpenSSL config that caps every TLS context in the process at TLS 1.2. */
const OPENSSL_TLS12_ONLY = [
  'openssl_conf = openssl_init',
  '[openssl_init]',
  'ssl_conf = ssl_section',
  '[ssl_section]',
  'system_default = system_default_section',
  '[system_default_section]',
  'MaxProtocol = TLSv1.2',
  '',
].join('\n');

export interface VsftpdInstance {
  readonly host: string;
  readonly port: number;
  readonly root: string;
  readonly user: string;
  readonly password: string;
  readonly pid: number;
  /** vsftpd's protocol log (what the proxy sent upstream). */
  protocolLog(): string;
  stop(): Promise<void>;
}

export async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

export async function startVsftpd(options: VsftpdOptions = {}): Promise<VsftpdInstance> {
  prepareSystem();
  const binary = findVsftpd();
  if (!binary) throw new Error('vsftpd not installed');
  const host = options.listenAddress ?? '127.0.0.1';
  const port = options.port ?? (await freePort(options.netns ? '127.0.0.1' : host));
  const work = mkdtempSync(join(tmpdir(), 'ftpnp-vsftpd-'));
  chmodSync(work, 0o755);
  const root = options.root ?? join(work, 'root');
  mkdirSync(root, { recursive: true });
  spawnSync('chown', [`${TEST_USER}:`, root]);
  const logFile = join(work, 'vsftpd.log');
  const pasvMin = options.pasvMinPort ?? 41000 + Math.floor(Math.random() * 2000) * 10;
  const pasvMax = options.pasvMaxPort ?? pasvMin + 9;
  const settings: Record<string, string> = {
    listen: 'YES',
    listen_ipv6: 'NO',
    background: 'NO',
    listen_address: host,
    listen_port: String(port),
    anonymous_enable: 'NO',
    local_enable: 'YES',
    write_enable: 'YES',
    local_umask: '022',
    pam_service_name: PAM_SERVICE,
    secure_chroot_dir: EMPTY_DIR,
    seccomp_sandbox: 'NO',
    isolate_network: 'NO',
    local_root: root,
    chroot_local_user: 'NO',
    pasv_enable: 'YES',
    port_enable: 'YES',
    pasv_min_port: String(pasvMin),
    pasv_max_port: String(pasvMax),
    connect_from_port_20: 'NO',
    xferlog_enable: 'YES',
    xferlog_std_format: 'NO',
    log_ftp_protocol: 'YES',
    vsftpd_log_file: logFile,
    max_clients: '0',
    max_per_ip: '0',
    use_localtime: 'NO',
    ftpd_banner: 'ftpnp test vsftpd',
    ...(options.ssl ? sslSettings(options.ssl) : {}),
    ...(options.extra ?? {}),
  };
  if (host.includes(':')) {
    // An IPv6-only server: vsftpd takes IPv6 addresses only through listen_ipv6/listen_address6.
    settings.listen = 'NO';
    settings.listen_ipv6 = 'YES';
    delete settings.listen_address;
    settings.listen_address6 = host;
  }
  if (options.pasvAddress !== null && !host.includes(':')) settings.pasv_address = options.pasvAddress ?? '127.0.0.9';
  const confPath = join(work, 'vsftpd.conf');
  writeFileSync(confPath, Object.entries(settings).map(([k, v]) => `${k}=${v}\n`).join(''));
  let env: NodeJS.ProcessEnv = process.env;
  if (options.ssl?.tlsv13 === false) {
    const opensslConf = join(work, 'openssl-tls12.cnf');
    writeFileSync(opensslConf, OPENSSL_TLS12_ONLY);
    env = { ...process.env, OPENSSL_CONF: opensslConf };
  }
  const [cmd, args] = options.netns ? ['ip', ['netns', 'exec', options.netns, binary, confPath]] : [binary, [confPath]];
  // vsftpd writes a startup failure ("500 OOPS: …") to fd 0, not to stderr: give it a file there.
  const oopsPath = join(work, 'stdin-oops.txt');
  const oopsFd = openSync(oopsPath, 'w+');
  const child: ChildProcess = spawn(cmd, args as string[], { stdio: [oopsFd, 'ignore', 'pipe'], detached: true, env });
  closeSync(oopsFd);
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const startFailure = (): string | null =>
    child.exitCode !== null ? `vsftpd exited: ${[stderr, readFileSync(oopsPath, 'utf8')].join(' ').trim()}` : null;
  if (!options.netns) {
    try {
      await waitForGreeting(host, port, 5000, startFailure, { implicitTls: options.ssl?.implicit ?? false });
    } catch (err) {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
      rmSync(work, { recursive: true, force: true });
      throw err;
    }
  }
  const pid = child.pid!;
  return {
    host,
    port,
    root,
    user: TEST_USER,
    password: TEST_PASSWORD,
    pid,
    protocolLog: () => (existsSync(logFile) ? readFileSync(logFile, 'utf8') : ''),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        try {
          process.kill(-pid, 'SIGTERM'); // the process group we started (vsftpd forks per session)
        } catch {
          /* already gone */
        }
        const timer = setTimeout(() => {
          try {
            process.kill(-pid, 'SIGKILL');
          } catch {
            /* gone */
          }
        }, 2000);
        await exited;
        clearTimeout(timer);
      }
      // vsftpd's per-session processes call setsid(), so they leave the process group we
      // started; find them by our own config path and end them by PID.
      const stray = spawnSync('pgrep', ['-f', `vsftpd ${confPath}$`], { encoding: 'utf8' });
      for (const pid of stray.stdout.split('\n').filter(Boolean).map(Number)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
      rmSync(work, { recursive: true, force: true });
    },
  };
}

/** Poll until something on host:port sends a 220 greeting (inside TLS for an implicit FTPS server). */
export async function waitForGreeting(
  host: string,
  port: number,
  timeoutMs: number,
  failed: () => string | null = () => null,
  options: { readonly implicitTls?: boolean } = {},
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const reason = failed();
    if (reason) throw new Error(reason);
    const ok = await new Promise<boolean>((resolve) => {
      // Readiness only: the certificate is the tests' business, not the poll's.
      const socket = options.implicitTls ? tls.connect({ host, port, rejectUnauthorized: false }) : net.connect({ host, port });
      let data = '';
      const done = (result: boolean): void => {
        socket.destroy();
        resolve(result);
      };
      socket.setTimeout(1000, () => done(false));
      socket.on('data', (d) => {
        data += d.toString();
        if (data.includes('\n')) done(data.startsWith('220'));
      });
      socket.on('error', () => done(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`no FTP greeting on ${host}:${port} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
