/**
 * The servers under test, each a child process on 127.0.0.1 (the kernel section's IPv6 cases
 * also on ::1): one vsftpd, ftp-nat-proxy
 * (`node dist/cli.js --config ...`, as deployed) and ProFTPD mod_proxy in reverse mode, both
 * in front of that same vsftpd. For the FTPS figures, the same three with TLS: a second
 * vsftpd with ssl_enable, the proxy with TLS on its client leg (and on its server leg), and
 * ProFTPD with mod_tls in front of mod_proxy (ProxyTLSEngine on).
 */
import { mkdirSync, writeFileSync, chmodSync, existsSync } from 'node:fs';
import { isIPv6 } from 'node:net';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { prepareSystem, sslSettings, TEST_USER, TEST_PASSWORD, waitForGreeting } from '../helpers/vsftpd.js';
import { startChild, type Child } from './procs.js';
import { inNetns } from './routed-lab.js';
import type { TargetTls } from './load-worker.js';

export const HOST = '127.0.0.1';
/** The IPv6 loopback, for the IPv6 cases of the kernel section. */
export const HOST6 = '::1';

/** host:port as a listen address or URL authority (IPv6 in brackets). */
export function hostPort(host: string, port: number): string {
  return isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * Descriptors for a process that holds thousands of sessions (each is 2-4 sockets): 65536,
 * or the hard limit when that is lower (raising it needs CAP_SYS_RESOURCE, which containers
 * often drop).
 */
export const NOFILE = ((): number => {
  const hard = spawnSync('sh', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).stdout?.trim() ?? '';
  return hard === 'unlimited' ? 65536 : Math.min(65536, Number(hard) || 1024);
})();

export interface Server {
  readonly name: string;
  readonly host: string;
  readonly port: number;
  readonly user: string;
  readonly password: string;
  readonly child: Child;
  /** Set for an FTPS server: clients use AUTH TLS and check its certificate against this CA. */
  readonly tls?: TargetTls;
  /** Clients reach it from this network namespace (the kernel section's routed lab), not from the bench's own. */
  readonly clientNetns?: string;
}

/** A server certificate and its key (PEM files), and the CA file that signed it. */
export interface BenchTlsFiles {
  readonly cert: string;
  readonly key: string;
  readonly ca: string;
}

async function ready(child: Child, host: string, port: number): Promise<void> {
  await waitForGreeting(host, port, 10_000, () => (child.process.exitCode !== null ? `${child.name} exited: ${child.output().slice(-800)}` : null));
}

/** The Server record of a started child (credentials default to the test user). */
function serverOf(
  name: string,
  child: Child,
  host: string,
  port: number,
  extra: { readonly user?: string | undefined; readonly password?: string | undefined; readonly tls?: TargetTls; readonly clientNetns?: string | undefined },
): Server {
  return {
    name,
    host,
    port,
    user: extra.user ?? TEST_USER,
    password: extra.password ?? TEST_PASSWORD,
    child,
    ...(extra.tls ? { tls: extra.tls } : {}),
    ...(extra.clientNetns ? { clientNetns: extra.clientNetns } : {}),
  };
}

/** prlimit raises the descriptor limit of what it runs, then execs it (same PID). */
export function withNofile(command: string, args: readonly string[]): [string, string[]] {
  const probe = spawnSync('prlimit', ['--version'], { encoding: 'utf8' });
  if (probe.status === 0) return ['prlimit', [`--nofile=${NOFILE}:${NOFILE}`, '--', command, ...args]];
  return [command, [...args]];
}

export interface VsftpdBenchOptions {
  readonly port: number;
  readonly work: string;
  /** Directory served (tmpfs, so the disk is not what is measured). */
  readonly root: string;
  readonly pasvMin: number;
  readonly pasvMax: number;
  /** Default `direct`. */
  readonly name?: string;
  /** Address it listens on, default HOST; an IPv6 one means `listen_ipv6` on that address only. */
  readonly host?: string;
  /**
   * Explicit FTPS with vsftpd's defaults for it: force_local_logins_ssl, force_local_data_ssl
   * and require_ssl_reuse all YES (protocol.md §5.5).
   */
  readonly tls?: BenchTlsFiles;
  /** Run it in this network namespace (routed-lab.ts); `host` is then an address there. */
  readonly netns?: string;
  /** Server.clientNetns of the result. */
  readonly clientNetns?: string;
}

export async function startBenchVsftpd(options: VsftpdBenchOptions): Promise<Server> {
  prepareSystem();
  mkdirSync(options.work, { recursive: true });
  const host = options.host ?? HOST;
  // vsftpd listens on one socket: IPv4 (listen) or IPv6 (listen_ipv6), never both at once.
  const family = isIPv6(host) ? { listen: 'NO', listen_ipv6: 'YES', listen_address6: host } : { listen: 'YES', listen_ipv6: 'NO', listen_address: host };
  const settings: Record<string, string> = {
    ...family,
    background: 'NO',
    listen_port: String(options.port),
    anonymous_enable: 'NO',
    local_enable: 'YES',
    write_enable: 'YES',
    local_umask: '022',
    pam_service_name: 'ftpnp-test',
    secure_chroot_dir: '/var/run/ftpnp-empty',
    seccomp_sandbox: 'NO',
    isolate_network: 'NO',
    local_root: options.root,
    chroot_local_user: 'NO',
    pasv_enable: 'YES',
    port_enable: 'YES',
    pasv_min_port: String(options.pasvMin),
    pasv_max_port: String(options.pasvMax),
    connect_from_port_20: 'NO',
    // No per-command or per-transfer logging: it would be part of every figure.
    xferlog_enable: 'NO',
    log_ftp_protocol: 'NO',
    vsftpd_log_file: join(options.work, 'vsftpd.log'),
    max_clients: '0',
    max_per_ip: '0',
    use_localtime: 'NO',
    ftpd_banner: 'ftpnp bench vsftpd',
    ...(options.tls ? sslSettings({ cert: options.tls.cert, key: options.tls.key, forceLogins: true, forceData: true, requireReuse: true }) : {}),
  };
  const conf = join(options.work, 'vsftpd.conf');
  writeFileSync(conf, Object.entries(settings).map(([k, v]) => `${k}=${v}\n`).join(''));
  const name = options.name ?? 'direct';
  const [command, args] = options.netns ? inNetns(options.netns, '/usr/sbin/vsftpd', [conf]) : ['/usr/sbin/vsftpd', [conf]];
  const child = startChild(name === 'direct' ? 'vsftpd' : `vsftpd-${name}`, command, args, { group: true });
  await ready(child, host, options.port);
  return serverOf(name, child, host, options.port, { ...(options.tls ? { tls: { caFile: options.tls.ca, host } } : {}), clientNetns: options.clientNetns });
}

export interface ProxyBenchOptions {
  readonly name: string;
  readonly port: number;
  readonly work: string;
  readonly upstreamPort: number;
  readonly passivePorts: string;
  readonly repoDir: string;
  /** Address it listens on and, unless upstreamHost says otherwise, of its upstream; default HOST. */
  readonly host?: string;
  readonly upstreamHost?: string;
  /** Server.clientNetns of the result. */
  readonly clientNetns?: string;
  /** `upstream.dataMode`, default `passive`; `active` and `mirror` need `activePorts`. */
  readonly upstreamDataMode?: 'passive' | 'active' | 'mirror';
  /** `upstream.activePorts`: where the server connects to for PORT/EPRT toward it. */
  readonly activePorts?: string;
  /** Extra environment (e.g. FTPNP_RELAY to pick the data relay). */
  readonly env?: NodeJS.ProcessEnv;
  /**
   * `client.dataPath`: `relay` (the proxy's own relay; also what leaving it out means),
   * `kernel` (a per-transfer nftables DNAT/SNAT mapping, root and libnftables needed) or
   * `auto` (the kernel path where the host allows it, else the relay).
   */
  readonly dataPath?: 'relay' | 'kernel' | 'auto';
  /** `log.level`; `warn` unless told (per-session info lines would be part of every figure). */
  readonly logLevel?: string;
  readonly nodeArgs?: readonly string[];
  readonly user?: string;
  readonly password?: string;
  /** `listeners[].tls` (explicit FTPS toward clients): the proxy terminates TLS. */
  readonly tls?: BenchTlsFiles;
  /** `upstream.tls` (explicit FTPS toward the server), checked against this CA. */
  readonly upstreamTls?: { readonly ca: string };
  /** Listener name in the config and in every log line, default `bench` (`bench-ftps` with tls). */
  readonly listener?: string;
  /**
   * More plain listeners in the same process, with the same data settings (the kernel section's
   * IPv6 edge beside the IPv4 one: one process, so one nftables table, as deployed).
   */
  readonly moreListeners?: readonly BenchListener[];
}

/** One more listener of a bench proxy: where it listens, its upstream and its port ranges. */
export interface BenchListener {
  readonly name: string;
  /** Server.name of its result. */
  readonly serverName: string;
  readonly host: string;
  readonly port: number;
  readonly upstreamHost: string;
  readonly upstreamPort: number;
  readonly passivePorts: string;
  readonly activePorts?: string;
  readonly clientNetns?: string;
}

/** A YAML double-quoted scalar (JSON's string syntax is a subset of it). */
function yamlString(text: string): string {
  return JSON.stringify(text);
}

export function proxyBenchYaml(options: ProxyBenchOptions): string {
  const host = options.host ?? HOST;
  const first: BenchListener & { readonly tls?: BenchTlsFiles; readonly upstreamTls?: { readonly ca: string } } = {
    name: options.listener ?? (options.tls ? 'bench-ftps' : 'bench'),
    serverName: options.name,
    host,
    port: options.port,
    upstreamHost: options.upstreamHost ?? host,
    upstreamPort: options.upstreamPort,
    passivePorts: options.passivePorts,
    ...(options.activePorts ? { activePorts: options.activePorts } : {}),
    ...(options.tls ? { tls: options.tls } : {}),
    ...(options.upstreamTls ? { upstreamTls: options.upstreamTls } : {}),
  };
  const listener = (l: typeof first): string[] => [
    `  - name: ${l.name}`,
    `    listen: "${hostPort(l.host, l.port)}"`,
    ...(l.tls ? [`    tls: { mode: explicit, cert: ${yamlString(l.tls.cert)}, key: ${yamlString(l.tls.key)} }`] : []),
    '    upstream:',
    `      host: ${yamlString(l.upstreamHost)}`,
    `      port: ${l.upstreamPort}`,
    ...(l.upstreamTls ? [`      tls: { mode: explicit, ca: ${yamlString(l.upstreamTls.ca)}, servername: ${HOST} }`] : []),
    `      dataMode: ${options.upstreamDataMode ?? 'passive'}`,
    ...(l.activePorts ? [`      activePorts: "${l.activePorts}"`] : []),
    '    client:',
    '      advertise: auto',
    `      passivePorts: "${l.passivePorts}"`,
    ...(options.dataPath ? [`      dataPath: ${options.dataPath}`] : []),
    '    limits:',
    // Every bench client comes from 127.0.0.1: no per-address share of sessions or of relay
    // ports (the default, a quarter of the range, refused the 751st of 1,000 concurrent
    // transfers with 425 since issue #10's hardening).
    '      maxSessions: 100000',
    '      maxSessionsPerIp: 100000',
    '      maxRelayPortsPerIp: 65535',
  ];
  return [`log: { level: ${options.logLevel ?? 'warn'} }`, 'listeners:', ...[first, ...(options.moreListeners ?? [])].flatMap(listener), ''].join('\n');
}

export async function startBenchProxy(options: ProxyBenchOptions): Promise<Server> {
  return (await startBenchProxyListeners(options))[0]!;
}

/** A bench proxy with all its listeners: the first from `options` itself, then `moreListeners`, one Server each (one child). */
export async function startBenchProxyListeners(options: ProxyBenchOptions): Promise<Server[]> {
  mkdirSync(options.work, { recursive: true });
  const yaml = join(options.work, `${options.name}.yaml`);
  writeFileSync(yaml, proxyBenchYaml(options));
  const [command, args] = withNofile(process.execPath, [...(options.nodeArgs ?? []), join(options.repoDir, 'dist/cli.js'), '--config', yaml]);
  const child = startChild(options.name, command, args, { env: { ...process.env, ...(options.env ?? {}) } });
  const host = options.host ?? HOST;
  await ready(child, host, options.port);
  const servers = [
    serverOf(options.name, child, host, options.port, {
      user: options.user,
      password: options.password,
      ...(options.tls ? { tls: { caFile: options.tls.ca, host: HOST } } : {}),
      clientNetns: options.clientNetns,
    }),
  ];
  for (const more of options.moreListeners ?? []) {
    await ready(child, more.host, more.port);
    servers.push(serverOf(more.serverName, child, more.host, more.port, { user: options.user, password: options.password, clientNetns: more.clientNetns }));
  }
  return servers;
}

export interface ProftpdBenchOptions {
  readonly root: string;
  readonly libraryPath: string;
  readonly port: number;
  readonly work: string;
  readonly upstreamPort: number;
  readonly passiveMin: number;
  readonly passiveMax: number;
  /** Default `mod_proxy`. */
  readonly name?: string;
  /**
   * FTPS on both legs: mod_tls toward clients (TLSRequired, the session reuse mod_tls
   * requires by default) and ProxyTLSEngine on toward an FTPS server, whose certificate is
   * checked against `ca` (ProxyTLSVerifyServer on).
   */
  readonly tls?: BenchTlsFiles;
  /** Its address (IPv4) and its upstream's, default HOST both. */
  readonly host?: string;
  readonly upstreamHost?: string;
  /** Server.clientNetns of the result. */
  readonly clientNetns?: string;
}

/** mod_tls in front and mod_proxy's own TLS toward the server (mod_proxy.html, "FTPS"). */
function proftpdTlsLines(tls: BenchTlsFiles, work: string): string[] {
  return [
    'TLSEngine on',
    'TLSRequired on',
    'TLSProtocol TLSv1.2 TLSv1.3',
    `TLSRSACertificateFile ${tls.cert}`,
    `TLSRSACertificateKeyFile ${tls.key}`,
    `TLSLog ${join(work, 'tls.log')}`,
    'ProxyTLSEngine on',
    'ProxyTLSProtocol TLSv1.2 TLSv1.3',
    `ProxyTLSCACertificateFile ${tls.ca}`,
    'ProxyTLSVerifyServer on',
    'ProxyTLSTransferProtectionPolicy required',
  ];
}

/**
 * ProFTPD 1.3.8 + mod_proxy 0.9 as a reverse proxy in the foreground. mod_tls is loaded
 * before mod_proxy or mod_proxy.so fails with "undefined symbol: OPENSSL_init_ssl".
 */
export function proftpdConf(options: ProftpdBenchOptions): string {
  const run = join(options.work, 'run');
  const tables = join(options.work, 'tables');
  return [
    'ServerName "ftpnp bench mod_proxy"',
    'ServerType standalone',
    'DefaultServer on',
    `Port ${options.port}`,
    `DefaultAddress ${options.host ?? HOST}`,
    'UseIPv6 off',
    'User nobody',
    'Group nogroup',
    `ScoreboardFile ${join(run, 'proftpd.scoreboard')}`,
    `PidFile ${join(run, 'proftpd.pid')}`,
    'DelayTable none',
    'WtmpLog off',
    'UseReverseDNS off',
    '<IfModule mod_ident.c>',
    '  IdentLookups off',
    '</IfModule>',
    '<IfModule mod_ctrls.c>',
    '  ControlsEngine off',
    '</IfModule>',
    // The defaults (MaxInstances 30) would turn the 50-session test away.
    'MaxInstances 20000',
    'TCPBacklog 255', // its maximum
    'MaxClients none',
    `PassivePorts ${options.passiveMin} ${options.passiveMax}`,
    `SystemLog ${join(options.work, 'proftpd.log')}`,
    `ModulePath ${join(options.root, 'usr/lib/proftpd')}`,
    'LoadModule mod_tls.c',
    'LoadModule mod_proxy.c',
    'ProxyEngine on',
    'ProxyRole reverse',
    // Plain FTP on both sides unless asked. Left at its default, mod_proxy sets up its TLS
    // context (CA bundle, tables) for every session: ~190 ms per login here, which is not
    // what the plain comparison is about.
    ...(options.tls ? proftpdTlsLines(options.tls, options.work) : ['ProxyTLSEngine off']),
    `ProxyTables ${tables}`,
    `ProxyReverseServers ftp://${options.upstreamHost ?? options.host ?? HOST}:${options.upstreamPort}`,
    '',
  ].join('\n');
}

export async function startBenchProftpd(options: ProftpdBenchOptions): Promise<Server> {
  const run = join(options.work, 'run');
  const tables = join(options.work, 'tables');
  mkdirSync(run, { recursive: true });
  mkdirSync(tables, { recursive: true });
  chmodSync(tables, 0o777);
  const conf = join(options.work, 'proftpd.conf');
  writeFileSync(conf, proftpdConf(options));
  const binary = join(options.root, 'usr/sbin/proftpd');
  if (!existsSync(binary)) throw new Error(`${binary} missing`);
  const env = { ...process.env, LD_LIBRARY_PATH: options.libraryPath };
  const check = spawnSync(binary, ['-t', '-c', conf], { encoding: 'utf8', env, timeout: 20_000 });
  if (check.status !== 0) {
    const said = `${check.stdout ?? ''}${check.stderr ?? ''}`.trim().split('\n').filter((l) => !/^Checking syntax/.test(l));
    throw new Error(`config check failed: ${said.slice(-2).join(' ') || `exit ${check.status}`}`);
  }
  const [command, args] = withNofile(binary, ['-n', '-c', conf]);
  const name = options.name ?? 'mod_proxy';
  const child = startChild(name === 'mod_proxy' ? 'proftpd' : `proftpd-${name}`, command, args, { group: true, env });
  const host = options.host ?? HOST;
  await ready(child, host, options.port);
  return serverOf(name, child, host, options.port, { ...(options.tls ? { tls: { caFile: options.tls.ca, host: HOST } } : {}), clientNetns: options.clientNetns });
}
