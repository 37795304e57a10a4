/**
 * Real FTP clients driven from tests: curl, lftp, tnftp (/usr/bin/ftp on Debian 12) and
 * CPython ftplib. Each call downloads or uploads one file and returns the process result.
 * Every client is told to *trust* the proxy's 227 address where it has a switch for it
 * (test-environment.md): a test that passes then proves the 227 is right.
 * `prefix` runs the client through another command (e.g. `ip netns exec NS`).
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { run, type RunResult } from './run.js';

export type ClientMode = 'epsv' | 'pasv' | 'eprt' | 'port';
export type ClientName = 'curl' | 'lftp' | 'tnftp' | 'ftplib';

export interface Endpoint {
  readonly host: string;
  readonly port: number;
  readonly user: string;
  readonly password: string;
  /** Command prefix, e.g. ['ip', 'netns', 'exec', 'ns1']. */
  readonly prefix?: readonly string[];
  /** Address a client listens on in active mode. */
  readonly activeAddress?: string;
  readonly timeoutMs?: number;
}

/** Which modes each client can be forced into. */
export const CLIENT_MODES: Readonly<Record<ClientName, readonly ClientMode[]>> = {
  curl: ['epsv', 'pasv', 'eprt', 'port'],
  // lftp sends EPRT only on IPv6 control connections.
  lftp: ['epsv', 'pasv', 'port'],
  tnftp: ['epsv', 'pasv', 'eprt', 'port'],
  ftplib: ['pasv', 'port'],
};

/** The data-setup verb a client in `mode` sends. */
export const MODE_VERB: Readonly<Record<ClientMode, string>> = { epsv: 'EPSV', pasv: 'PASV', eprt: 'EPRT', port: 'PORT' };

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export function sha256File(path: string): string {
  return sha256(readFileSync(path));
}

export function writeRandomFile(path: string, bytes: number): string {
  const data = randomBytes(bytes);
  writeFileSync(path, data);
  return sha256(data);
}

function exec(endpoint: Endpoint, command: string, args: string[], input?: string): Promise<RunResult> {
  const prefix = endpoint.prefix ?? [];
  const [cmd, ...rest] = [...prefix, command, ...args];
  return run(cmd!, rest, { timeoutMs: endpoint.timeoutMs ?? 60000, ...(input !== undefined ? { input } : {}) });
}

function hostForUrl(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

/** Download `remote` into `local`, or upload `local` to `remote`. */
export function transfer(client: ClientName, mode: ClientMode, endpoint: Endpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  switch (client) {
    case 'curl':
      return curl(mode, endpoint, direction, remote, local);
    case 'lftp':
      return lftp(mode, endpoint, direction, remote, local);
    case 'tnftp':
      return tnftp(mode, endpoint, direction, remote, local);
    case 'ftplib':
      return ftplib(mode, endpoint, direction, remote, local);
  }
}

function curl(mode: ClientMode, e: Endpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  const active = e.activeAddress ?? '-';
  const modeArgs: Record<ClientMode, string[]> = {
    epsv: [],
    // curl ignores the 227 address by default since 7.74: make it trust the proxy's answer.
    pasv: ['--disable-epsv', '--no-ftp-skip-pasv-ip'],
    eprt: ['-P', active],
    port: ['-P', active, '--disable-eprt'],
  };
  const url = `ftp://${hostForUrl(e.host)}:${e.port}/${remote}`;
  const io = direction === 'get' ? ['-o', local] : ['-T', local];
  return exec(e, 'curl', ['-sS', '--max-time', '50', ...modeArgs[mode], '-u', `${e.user}:${e.password}`, ...io, url]);
}

function lftp(mode: ClientMode, e: Endpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  const settings = [
    'set ftp:ssl-allow no',
    'set net:max-retries 1',
    'set net:timeout 20',
    'set net:reconnect-interval-base 1',
    'set ftp:fix-pasv-address no',
    `set ftp:passive-mode ${mode === 'epsv' || mode === 'pasv' ? 'yes' : 'no'}`,
    `set ftp:prefer-epsv ${mode === 'epsv' ? 'yes' : 'no'}`,
  ];
  const action = direction === 'get' ? `get ${remote} -o ${local}` : `put ${local} -o ${remote}`;
  const script = [...settings, `open -u ${e.user},${e.password} -p ${e.port} ${e.host}`, action, 'bye'].join('; ');
  return exec(e, 'lftp', ['-c', script]);
}

function tnftp(mode: ClientMode, e: Endpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  // tnftp tries EPSV/EPRT first unless epsv4 is off (test-environment.md).
  const lines = [
    `open ${e.host} ${e.port}`,
    `user ${e.user} ${e.password}`,
    'binary',
    mode === 'epsv' || mode === 'pasv' ? 'passive on' : 'passive off',
    mode === 'pasv' || mode === 'port' ? 'epsv4 off' : 'epsv4 on',
    direction === 'get' ? `get ${remote} ${local}` : `put ${local} ${remote}`,
    'bye',
  ];
  return exec(e, 'tnftp', ['-n', '-v'], `${lines.join('\n')}\n`);
}

/** The transfer part of the ftplib scripts (plain and TLS): mode, one RETR or STOR, QUIT. */
const FTPLIB_TRANSFER = `f.set_pasv(mode == 'pasv')
if direction == 'get':
    with open(local, 'wb') as out:
        f.retrbinary('RETR ' + remote, out.write)
else:
    with open(local, 'rb') as src:
        f.storbinary('STOR ' + remote, src)
f.quit()
`;

const FTPLIB_SCRIPT = `
import ftplib, sys
host, port, user, pw, mode, direction, remote, local = sys.argv[1:9]
f = ftplib.FTP()
f.trust_server_pasv_ipv4_address = True
f.connect(host, int(port), timeout=30)
f.login(user, pw)
${FTPLIB_TRANSFER}`;

function ftplib(mode: ClientMode, e: Endpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  return exec(e, 'python3', ['-c', FTPLIB_SCRIPT, e.host, String(e.port), e.user, e.password, mode, direction, remote, local]);
}

// ---------------------------------------------------------------------------------------------
// FTPS (protocol.md §5): the same three clients that speak TLS, always verifying the server's
// certificate against `caFile`, always with protected data (PROT P). Explicit = `AUTH TLS` on
// the ordinary port (RFC 4217); implicit = TLS from the first byte (`ftps://`, port-990 style).

export type FtpsClientName = 'curl' | 'lftp' | 'ftplib';
export type FtpsStyle = 'explicit' | 'implicit';

export interface FtpsEndpoint extends Endpoint {
  /** PEM CA file the client verifies the server certificate (and its IP/DNS name) against. */
  readonly caFile: string;
  /**
   * Highest TLS version the client offers; default its own highest (TLS 1.3 for all three
   * here). curl `--tls-max 1.2`, lftp `ssl:priority NORMAL:-VERS-TLS1.3`, Python
   * `context.maximum_version`.
   */
  readonly tlsMax?: '1.2' | '1.3';
}

/**
 * Which modes each client can do over TLS. curl 7.88.1 cannot do active-mode FTPS: it never
 * starts TLS on the data connection it accepted, and hangs until --max-time
 * (test-environment.md). lftp sends EPRT only on IPv6 control connections; ftplib uses
 * EPSV/EPRT only on IPv6.
 */
export const FTPS_CLIENT_MODES: Readonly<Record<FtpsClientName, readonly ClientMode[]>> = {
  curl: ['epsv', 'pasv'],
  lftp: ['epsv', 'pasv', 'port'],
  ftplib: ['pasv', 'port'],
};

/** Download `remote` into `local`, or upload `local` to `remote`, over FTPS. */
export function transferTls(
  client: FtpsClientName,
  style: FtpsStyle,
  mode: ClientMode,
  endpoint: FtpsEndpoint,
  direction: 'get' | 'put',
  remote: string,
  local: string,
): Promise<RunResult> {
  if (!FTPS_CLIENT_MODES[client].includes(mode)) throw new Error(`${client} cannot do ${mode} over TLS (FTPS_CLIENT_MODES)`);
  switch (client) {
    case 'curl':
      return curlTls(style, mode, endpoint, direction, remote, local);
    case 'lftp':
      return lftpTls(style, mode, endpoint, direction, remote, local);
    case 'ftplib':
      return ftplibTls(style, mode, endpoint, direction, remote, local);
  }
}

function curlTls(style: FtpsStyle, mode: ClientMode, e: FtpsEndpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  const modeArgs: string[] = mode === 'pasv' ? ['--disable-epsv', '--no-ftp-skip-pasv-ip'] : [];
  // ftps:// is implicit TLS in curl; explicit is ftp:// + --ssl-reqd (AUTH TLS, PBSZ 0, PROT P,
  // and fail rather than continue in clear text).
  const tlsArgs = [...(style === 'explicit' ? ['--ssl-reqd'] : []), '--cacert', e.caFile, ...(e.tlsMax === '1.2' ? ['--tls-max', '1.2'] : [])];
  const url = `${style === 'implicit' ? 'ftps' : 'ftp'}://${hostForUrl(e.host)}:${e.port}/${remote}`;
  const io = direction === 'get' ? ['-o', local] : ['-T', local];
  return exec(e, 'curl', ['-sS', '--max-time', '50', ...tlsArgs, ...modeArgs, '-u', `${e.user}:${e.password}`, ...io, url]);
}

function lftpTls(style: FtpsStyle, mode: ClientMode, e: FtpsEndpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  const settings = [
    // Explicit: AUTH TLS is mandatory, data protected; ftps:// is implicit and always TLS.
    'set ftp:ssl-force true',
    'set ftp:ssl-protect-data true',
    `set ssl:ca-file ${e.caFile}`,
    'set ssl:verify-certificate yes',
    'set ssl:check-hostname yes',
    // lftp is built with GnuTLS on Debian: a priority string caps the version.
    ...(e.tlsMax === '1.2' ? ['set ssl:priority NORMAL:-VERS-TLS1.3'] : []),
    'set net:max-retries 1',
    'set net:timeout 20',
    'set net:reconnect-interval-base 1',
    'set ftp:fix-pasv-address no',
    `set ftp:passive-mode ${mode === 'epsv' || mode === 'pasv' ? 'yes' : 'no'}`,
    `set ftp:prefer-epsv ${mode === 'epsv' ? 'yes' : 'no'}`,
  ];
  const open = style === 'implicit'
    ? `open -u ${e.user},${e.password} ftps://${hostForUrl(e.host)}:${e.port}`
    : `open -u ${e.user},${e.password} -p ${e.port} ${e.host}`;
  const action = direction === 'get' ? `get ${remote} -o ${local}` : `put ${local} -o ${remote}`;
  return exec(e, 'lftp', ['-c', [...settings, open, action, 'bye'].join('; ')]);
}

/*
 * CPython's FTP_TLS wraps each data socket without the control connection's TLS session, so
 * vsftpd's default require_ssl_reuse=YES refuses every transfer with `522 SSL connection
 * failed: session reuse required` (CPython issue bpo-19500): the subclass passes
 * `session=self.sock.session`. Python 3.11 has no implicit mode: the second subclass wraps the
 * control socket right after connect, before the 220 is read (FTP_TLS.login then skips AUTH
 * because the socket is already an SSLSocket); PBSZ 0 / PROT P are still sent and vsftpd
 * answers 200 (protocol.md §5.2).
 */
const FTPLIB_TLS_SCRIPT = `
import ftplib, socket, ssl, sys
host, port, user, pw, mode, direction, remote, local, style, cafile, tlsmax = sys.argv[1:12]

class ReusingFTP_TLS(ftplib.FTP_TLS):
    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size

class ImplicitFTP_TLS(ReusingFTP_TLS):
    def connect(self, host='', port=0, timeout=-999, source_address=None):
        if host:
            self.host = host
        if port > 0:
            self.port = port
        if timeout != -999:
            self.timeout = timeout
        if source_address is not None:
            self.source_address = source_address
        raw = socket.create_connection((self.host, self.port), self.timeout, source_address=self.source_address)
        self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
        self.af = self.sock.family
        self.file = self.sock.makefile('r', encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome

context = ssl.create_default_context(cafile=cafile)
if tlsmax == '1.2':
    context.maximum_version = ssl.TLSVersion.TLSv1_2
f = (ImplicitFTP_TLS if style == 'implicit' else ReusingFTP_TLS)(context=context, timeout=30)
f.trust_server_pasv_ipv4_address = True
f.connect(host, int(port))
f.login(user, pw)
f.prot_p()
${FTPLIB_TRANSFER}`;

function ftplibTls(style: FtpsStyle, mode: ClientMode, e: FtpsEndpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  const args = [e.host, String(e.port), e.user, e.password, mode, direction, remote, local, style, e.caFile, e.tlsMax ?? 'default'];
  return exec(e, 'python3', ['-c', FTPLIB_TLS_SCRIPT, ...args]);
}
