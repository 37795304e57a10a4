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

const FTPLIB_SCRIPT = `
import ftplib, sys
host, port, user, pw, mode, direction, remote, local = sys.argv[1:9]
f = ftplib.FTP()
f.trust_server_pasv_ipv4_address = True
f.connect(host, int(port), timeout=30)
f.login(user, pw)
f.set_pasv(mode == 'pasv')
if direction == 'get':
    with open(local, 'wb') as out:
        f.retrbinary('RETR ' + remote, out.write)
else:
    with open(local, 'rb') as src:
        f.storbinary('STOR ' + remote, src)
f.quit()
`;

function ftplib(mode: ClientMode, e: Endpoint, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
  return exec(e, 'python3', ['-c', FTPLIB_SCRIPT, e.host, String(e.port), e.user, e.password, mode, direction, remote, local]);
}
