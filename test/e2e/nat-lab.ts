/**
 * The end-to-end NAT topology, the proxy run as a real process inside it, and drivers for the
 * real FTP clients (tnftp, curl, lftp, CPython ftplib). Used by nat.test.ts and upstream-selection.test.ts.
 *
 *                           "internet" namespace: bridge br0, routes between
 *                           203.0.113.0/24 (.254) and 198.51.100.0/24 (.254)
 *        +--------------+--------------+-----+--------------+--------------+--------------+
 *   pub 198.51.100.7   atk .66   rtr wan 198.51.100.1   edge wan 203.0.113.10   pubsrv .20   third .99
 *   (public client) (attacker)   MASQUERADE, no helper  DNAT :21 -> 10.20.0.5  (vsftpd)   (must see
 *                                 br0 192.168.50.1/24    br0 10.20.0.1/24                 nothing)
 *                                  |           |           |           |
 *                          lanc .10 (client)  lanp .2   srv 10.20.0.5   slan 10.20.0.7
 *                                            (proxy)   (vsftpd, private) (client in the server LAN)
 *
 * The edge host runs two proxies: :2121 relays every data connection, :2122 has
 * `client.dataPath: kernel` and NATs passive ones with nftables (table ip ftpnp_<pid>).
 *
 * FTPS (issue #12): 10.20.0.5 and 203.0.113.20 also run an explicit-FTPS vsftpd on :2021. The edge
 * DNATs 203.0.113.10:2021 to 10.20.0.5:2021 *with* the kernel FTP helper (nf_conntrack_ftp +
 * nf_nat_ftp) attached, so the lab shows it rewriting a plain 227 and blind to an encrypted one.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { findCommand, NetnsLab, nsRun, pythonPath, sha256File, waitForFtpGreeting, type Daemon } from '../helpers/netns.js';
import type { RunResult } from '../helpers/run.js';
import type { Test } from 'tap';
import { TEST_PASSWORD, TEST_USER } from '../helpers/vsftpd.js';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const PROXY_CLI = join(REPO_ROOT, 'dist', 'cli.js');
const CLIENT_SCRIPT = join(REPO_ROOT, 'test', 'e2e', 'ftp_client.py');

/** Documentation ranges only (RFC 5737), RFC 1918 behind the NAT and in the server LAN. */
export const ADDR = {
  internetToServers: '203.0.113.254',
  internetToClients: '198.51.100.254',
  publicClient: '198.51.100.7',
  attacker: '198.51.100.66',
  routerWan: '198.51.100.1',
  routerLan: '192.168.50.1',
  lanClient: '192.168.50.10',
  lanProxy: '192.168.50.2',
  edgePublic: '203.0.113.10',
  edgePrivate: '10.20.0.1',
  privateServer: '10.20.0.5',
  serverLanClient: '10.20.0.7',
  publicServer: '203.0.113.20',
  thirdParty: '203.0.113.99',
} as const;

/** The explicit-FTPS vsftpd on the private and on the public server (beside the plain one on 21). */
export const FTPS_SERVER_PORT = 2021;

export interface NatTopology {
  readonly internet: string;
  readonly publicClient: string;
  readonly attacker: string;
  readonly router: string;
  readonly lanClient: string;
  readonly lanProxy: string;
  readonly edge: string;
  readonly privateServer: string;
  readonly serverLanClient: string;
  readonly publicServer: string;
  readonly thirdParty: string;
}

export function buildNatTopology(lab: NetnsLab): NatTopology {
  const [internet, publicClient, attacker, router, lanClient, lanProxy, edge, privateServer, serverLanClient, publicServer, thirdParty] =
    lab.addNamespaces('inet', 'pub', 'atk', 'rtr', 'lanc', 'lanp', 'edge', 'srv', 'slan', 'psrv', 'third') as [
      string, string, string, string, string, string, string, string, string, string, string,
    ];

  // The "internet": one bridge carrying both documentation ranges, routed by this namespace.
  lab.addBridge(internet, 'br0', [`${ADDR.internetToServers}/24`, `${ADDR.internetToClients}/24`]);
  lab.enableForwarding(internet);
  // Unreachable private addresses must fail at once: the default ICMP rate limit swallows the
  // "network unreachable" a client's retried SYN should get, and curl then waits out its timeout.
  lab.sysctl(internet, 'net.ipv4.icmp_ratelimit=0');
  const onInternet = (fromName: string, toNs: string, toName: string, address: string): void => {
    const clientSide = address.startsWith('198.51.100.');
    lab.link({
      fromNs: internet,
      bridge: 'br0',
      fromName,
      toNs,
      toName,
      cidr: `${address}/24`,
      gateway: clientSide ? ADDR.internetToClients : ADDR.internetToServers,
    });
  };
  onInternet('pub', publicClient, 'eth0', ADDR.publicClient);
  onInternet('atk', attacker, 'eth0', ADDR.attacker);
  onInternet('rtr', router, 'wan', ADDR.routerWan);
  onInternet('edge', edge, 'wan', ADDR.edgePublic);
  onInternet('psrv', publicServer, 'eth0', ADDR.publicServer);
  onInternet('third', thirdParty, 'eth0', ADDR.thirdParty);

  // Client LAN behind a plain MASQUERADE: no FTP conntrack helper, so active FTP breaks.
  lab.addBridge(router, 'br0', [`${ADDR.routerLan}/24`]);
  lab.enableForwarding(router);
  lab.iptables(router, '-t', 'nat', '-A', 'POSTROUTING', '-o', 'wan', '-j', 'MASQUERADE');
  lab.link({ fromNs: router, bridge: 'br0', fromName: 'lanc', toNs: lanClient, toName: 'eth0', cidr: `${ADDR.lanClient}/24`, gateway: ADDR.routerLan });
  lab.link({ fromNs: router, bridge: 'br0', fromName: 'lanp', toNs: lanProxy, toName: 'eth0', cidr: `${ADDR.lanProxy}/24`, gateway: ADDR.routerLan });

  // Server LAN behind the edge host. Forwarding only serves the DNAT baseline ("without the proxy").
  lab.addBridge(edge, 'br0', [`${ADDR.edgePrivate}/24`]);
  lab.enableForwarding(edge);
  lab.link({ fromNs: edge, bridge: 'br0', fromName: 'srv', toNs: privateServer, toName: 'eth0', cidr: `${ADDR.privateServer}/24`, gateway: ADDR.edgePrivate });
  lab.link({ fromNs: edge, bridge: 'br0', fromName: 'slan', toNs: serverLanClient, toName: 'eth0', cidr: `${ADDR.serverLanClient}/24`, gateway: ADDR.edgePrivate });
  lab.iptables(edge, '-t', 'nat', '-A', 'PREROUTING', '-i', 'wan', '-d', ADDR.edgePublic, '-p', 'tcp', '--dport', '21', '-j', 'DNAT', '--to-destination', `${ADDR.privateServer}:21`);
  // The FTPS port: DNAT plus the FTP helper, the best a router can do without a proxy. Modern
  // kernels attach the helper only when a rule asks for it (test-environment.md).
  const ftps = ['-i', 'wan', '-d', ADDR.edgePublic, '-p', 'tcp', '--dport', String(FTPS_SERVER_PORT)];
  lab.iptables(edge, '-t', 'raw', '-A', 'PREROUTING', ...ftps, '-j', 'CT', '--helper', 'ftp');
  lab.iptables(edge, '-t', 'nat', '-A', 'PREROUTING', ...ftps, '-j', 'DNAT', '--to-destination', `${ADDR.privateServer}:${FTPS_SERVER_PORT}`);

  return { internet, publicClient, attacker, router, lanClient, lanProxy, edge, privateServer, serverLanClient, publicServer, thirdParty };
}

// ------------------------------------------------------------------------------ the proxy

/** Build dist/ when it is missing or older than src/ (`npm test` does this in pretest). */
export function ensureProxyBuilt(): string | null {
  const newestSource = newestMtime(join(REPO_ROOT, 'src'));
  if (existsSync(PROXY_CLI) && statSync(PROXY_CLI).mtimeMs >= newestSource) return null;
  const tsc = join(REPO_ROOT, 'node_modules', '.bin', 'tsc');
  const built = spawnSync(tsc, ['-p', join(REPO_ROOT, 'tsconfig.json')], { encoding: 'utf8', timeout: 120000 });
  if (built.status !== 0) return `building the proxy failed: ${built.stdout}${built.stderr}`;
  return existsSync(PROXY_CLI) ? null : `${PROXY_CLI} missing after the build`;
}

function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(path) : statSync(path).mtimeMs);
  }
  return newest;
}

export interface LabProxy {
  readonly daemon: Daemon;
  /** Parsed pino records so far. */
  records(): Array<Record<string, unknown>>;
  /** The last lines of the log, for failure messages. */
  tail(lines?: number): string;
}

export interface ProbeFrom {
  readonly ns: string;
  readonly host: string;
  readonly port: number;
}

/** Run dist/cli.js inside `ns` with this YAML; resolves once `probe` sees its 220. */
export async function startProxyInNs(lab: NetnsLab, ns: string, name: string, yaml: string, probe: ProbeFrom): Promise<LabProxy> {
  const proxy = spawnProxyInNs(lab, ns, name, yaml);
  await waitForFtpGreeting(probe.ns, probe.host, probe.port, 15000, proxyExited(proxy, name));
  return proxy;
}

/**
 * Like startProxyInNs, for listeners that greet nobody with a 220 on a direct connection (a
 * transparent listener answers those 421): resolves once the proxy logs `started` (every
 * listener bound), rejects when it exits first or within 15 s.
 */
export async function startProxyInNsLogged(lab: NetnsLab, ns: string, name: string, yaml: string): Promise<LabProxy> {
  const proxy = spawnProxyInNs(lab, ns, name, yaml);
  const exited = proxyExited(proxy, name);
  const deadline = Date.now() + 15000;
  while (!proxy.records().some((record) => record.event === 'started')) {
    const reason = exited();
    if (reason) throw new Error(reason);
    if (Date.now() > deadline) throw new Error(`proxy ${name} did not log "started" within 15 s: ${proxy.tail()}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return proxy;
}

function spawnProxyInNs(lab: NetnsLab, ns: string, name: string, yaml: string): LabProxy {
  const config = join(lab.dir, `${name}.yaml`);
  writeFileSync(config, yaml);
  const daemon = lab.spawnDaemon(ns, `proxy ${name}`, process.execPath, [PROXY_CLI, '--config', config]);
  return {
    daemon,
    records: () => parseJsonLines(daemon.output()),
    tail: (lines = 40) => daemon.output().trimEnd().split('\n').slice(-lines).join('\n'),
  };
}

function proxyExited(proxy: LabProxy, name: string): () => string | null {
  return () => (proxy.daemon.exitCode() !== null ? `proxy ${name} exited (${proxy.daemon.exitCode()}): ${proxy.tail()}` : null);
}

// ------------------------------------------------------------------------------ nftables (client.dataPath: kernel)

export { nftablesUnavailable } from '../helpers/netns.js';

/** nft(8) inside a lab namespace. */
export function nft(ns: string, args: readonly string[]): Promise<RunResult> {
  return nsRun(ns, findCommand('nft') ?? 'nft', args, { timeoutMs: 10000 });
}

/** Names of the proxies' tables (`ftpnp_<pid>`, family inet; ip from versions before IPv6) in a namespace. */
export async function ftpnpTables(ns: string): Promise<string[]> {
  const out = await nft(ns, ['list', 'tables']);
  if (out.code !== 0) throw new Error(`nft list tables failed (${out.code}): ${out.stderr.trim()}`);
  return [...out.stdout.matchAll(/^table (?:ip|inet) (ftpnp_\d+)\s*$/gm)].map((m) => m[1]!);
}

/** The elements of one map (without their timeouts), or null when the table or map is missing. */
export async function nftMapElements(ns: string, table: string, map: string): Promise<string[] | null> {
  return nftElements(ns, table, 'map', map);
}

/** The elements of one set in the proxy's table (counters and timeouts included as printed). */
export async function nftSetElements(ns: string, table: string, set: string): Promise<string[] | null> {
  return nftElements(ns, table, 'set', set);
}

async function nftElements(ns: string, table: string, kind: 'map' | 'set', name: string): Promise<string[] | null> {
  const out = await nft(ns, ['list', kind, 'inet', table, name]);
  if (out.code !== 0) return null;
  const body = /elements = \{([^}]*)\}/.exec(out.stdout)?.[1];
  if (!body) return [];
  return body
    .split(',')
    .map((element) => element.replace(/\s+/g, ' ').replace(/ timeout \S+| expires \S+/g, '').trim())
    .filter((element) => element !== '');
}

/** The raw `nft list map` text of one map (timeouts included), for messages. */
export async function nftMapText(ns: string, table: string, map: string): Promise<string> {
  const out = await nft(ns, ['list', 'map', 'inet', table, map]);
  return (out.stdout + out.stderr).trim();
}

/**
 * Run the proxy once in the foreground (for configs that must fail to start), optionally
 * behind a wrapper such as setpriv(1). Bounded by a timeout like every client.
 */
export function runProxyOnce(lab: NetnsLab, ns: string, name: string, yaml: string, wrapper: readonly string[] = []): Promise<RunResult> {
  const config = join(lab.dir, `${name}.yaml`);
  writeFileSync(config, yaml);
  const [command, ...args] = [...wrapper, process.execPath, PROXY_CLI, '--config', config];
  return nsRun(ns, command!, args, { timeoutMs: 20000 });
}

// ------------------------------------------------------------------------------ FTP clients

const CLIENT_TIMEOUT_MS = 30000;

/** Clients get a private HOME: no ~/.netrc, ~/.curlrc or lftp bookmarks from the machine. */
function clientEnv(lab: NetnsLab): NodeJS.ProcessEnv {
  return { ...process.env, HOME: lab.dir, LC_ALL: 'C' };
}

export interface Transfer {
  /** Remote name to download and the local file to write. */
  readonly get?: readonly [remote: string, local: string];
  /** Local file to upload and the remote name to write. */
  readonly put?: readonly [local: string, remote: string];
}

export interface TnftpJob extends Transfer {
  readonly host: string;
  readonly port: number;
  readonly passive: boolean;
  /** EPSV/EPRT first (tnftp's default); off gives plain PASV/PORT. */
  readonly epsv4: boolean;
  /** Login name; default the test account (forward mode: `account@server`). */
  readonly user?: string;
}

/** tnftp (Debian's /usr/bin/ftp): refuses a 227 address that differs from the control peer. */
export function tnftp(lab: NetnsLab, ns: string, job: TnftpJob): Promise<RunResult> {
  const script = [
    `user ${job.user ?? TEST_USER} ${TEST_PASSWORD}`,
    'binary',
    `passive ${job.passive ? 'on' : 'off'}`,
    `epsv4 ${job.epsv4 ? 'on' : 'off'}`,
    ...(job.get ? [`get ${job.get[0]} ${job.get[1]}`] : []),
    ...(job.put ? [`put ${job.put[0]} ${job.put[1]}`] : []),
    'bye',
    '',
  ].join('\n');
  return nsRun(ns, 'ftp', ['-n', '-v', job.host, String(job.port)], { input: script, timeoutMs: CLIENT_TIMEOUT_MS, env: clientEnv(lab), cwd: lab.dir });
}

/**
 * curl with the test account (login name `user`, default the test account); `args` carry the
 * mode flags, the URL and -o/-T.
 */
export function curl(lab: NetnsLab, ns: string, args: readonly string[], user: string = TEST_USER): Promise<RunResult> {
  return nsRun(ns, 'curl', ['-q', '-sS', '--max-time', '20', '--connect-timeout', '5', '-u', `${user}:${TEST_PASSWORD}`, ...args], {
    timeoutMs: CLIENT_TIMEOUT_MS,
    env: clientEnv(lab),
  });
}

export interface LftpJob extends Transfer {
  readonly host: string;
  readonly port: number;
  /** `set` commands, e.g. "ftp:fix-pasv-address no". */
  readonly settings: readonly string[];
  /** Login name; default the test account (forward mode: `account@server`). */
  readonly user?: string;
}

/**
 * curl flags for explicit FTPS (ftp:// + AUTH TLS, PBSZ 0, PROT P; fail rather than go on in
 * clear text), verifying the server certificate and the dialled address against `caFile`.
 */
export function curlTlsArgs(caFile: string): string[] {
  return ['--ssl-reqd', '--cacert', caFile];
}

/**
 * lftp settings for explicit FTPS with protected data, verifying the certificate and the host
 * name against `caFile` (they override the wrapper's `ftp:ssl-allow no`).
 */
export function lftpTlsSettings(caFile: string): string[] {
  return [
    'ftp:ssl-allow yes',
    'ftp:ssl-force true',
    'ftp:ssl-protect-data true',
    `ssl:ca-file ${caFile}`,
    'ssl:verify-certificate yes',
    'ssl:check-hostname yes',
  ];
}

export function lftp(lab: NetnsLab, ns: string, job: LftpJob): Promise<RunResult> {
  const commands = [
    // Fail fast instead of lftp's patient reconnecting; no TLS attempt against a plain server.
    // Every command runs even after a failure; the exit code is the last command's.
    'set net:max-retries 1',
    'set net:timeout 8',
    'set net:reconnect-interval-base 1',
    'set ftp:ssl-allow no',
    'set xfer:clobber yes',
    ...job.settings.map((setting) => `set ${setting}`),
    `open -u ${job.user ?? TEST_USER},${TEST_PASSWORD} ftp://${job.host}:${job.port}`,
    ...(job.get ? [`get ${job.get[0]} -o ${job.get[1]}`] : []),
    ...(job.put ? [`put ${job.put[0]} -o ${job.put[1]}`] : []),
  ];
  return nsRun(ns, 'lftp', ['-c', commands.join('; ')], { timeoutMs: CLIENT_TIMEOUT_MS, env: clientEnv(lab), cwd: lab.dir });
}

export type PyOp = readonly [kind: 'get' | 'put' | 'raw' | 'raw-any', ...args: string[]];

export interface PyResult {
  readonly run: RunResult;
  readonly records: Array<Record<string, unknown>>;
  /** Every op and the login succeeded. */
  readonly ok: boolean;
}

/**
 * CPython ftplib via ftp_client.py (`tool: session`), trusting the 227 address by default.
 * `{ tls: 'explicit', cafile }` makes it FTP_TLS with PROT P and data sessions that resume the
 * control session (what vsftpd's require_ssl_reuse demands).
 */
export async function ftplib(lab: NetnsLab, ns: string, job: Record<string, unknown>, timeoutMs: number = CLIENT_TIMEOUT_MS): Promise<PyResult> {
  const full = { tool: 'session', user: TEST_USER, password: TEST_PASSWORD, trust: true, mode: 'pasv', port: 21, ...job };
  const result = await nsRun(ns, pythonPath(), [CLIENT_SCRIPT, JSON.stringify(full)], { timeoutMs, env: clientEnv(lab) });
  const records = parseJsonLines(result.stdout);
  return { run: result, records, ok: result.code === 0 && records.length > 0 && records.every((r) => r.ok !== false) };
}

/** ftp_client.py `tool: probe`: connect and read until the other side closes. */
export async function tcpProbe(lab: NetnsLab, ns: string, host: string, port: number): Promise<Record<string, unknown>> {
  const result = await nsRun(ns, pythonPath(), [CLIENT_SCRIPT, JSON.stringify({ tool: 'probe', host, port, timeout: 5 })], { timeoutMs: 15000, env: clientEnv(lab) });
  return parseJsonLines(result.stdout)[0] ?? { error: `probe printed nothing: ${result.stderr}` };
}

/** ftp_client.py `tool: listen` as a daemon; `accepts()` lists every connection it took. */
export async function startListener(lab: NetnsLab, ns: string, ports: readonly number[]): Promise<{ accepts(): Array<Record<string, unknown>>; daemon: Daemon }> {
  const daemon = lab.spawnDaemon(ns, `listener ${ports.join(',')}`, pythonPath(), ['-u', CLIENT_SCRIPT, JSON.stringify({ tool: 'listen', ports })], clientEnv(lab));
  const deadline = Date.now() + 10000;
  while (!daemon.output().includes('"ready"')) {
    if (daemon.exitCode() !== null || Date.now() > deadline) throw new Error(`listener did not start: ${daemon.output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { daemon, accepts: () => parseJsonLines(daemon.output()).filter((record) => 'accept' in record) };
}

/** One command of a scripted control dialogue and the complete reply to it (every line). */
export interface DialogueStep {
  readonly cmd: string;
  /** Reply lines without CRLF; empty when the connection ended first. */
  readonly lines: readonly string[];
  /** The reply code, or null when the connection ended (or timed out) before a reply. */
  readonly code: string | null;
  /** The connection ended (EOF or reset) before a complete reply. */
  readonly closed: boolean;
}

export interface Dialogue {
  readonly run: RunResult;
  /** The first reply (the greeting), or null. */
  readonly greeting: readonly string[] | null;
  readonly steps: readonly DialogueStep[];
  /** Whether the other side closed the connection after the last reply (when asked to watch). */
  readonly eof: boolean | null;
  /** What arrived unasked after the last reply, before the close (e.g. a 421). */
  readonly trailing: string;
  /** Why the dialogue could not start or stopped early, if it did. */
  readonly error: string | null;
}

/**
 * ftp_client.py `tool: dialogue`: connect, read the greeting, then send each command and read
 * its complete reply (multi-line aware). It stops at the first 421 or when the connection ends;
 * with `watchClose` it then (or after the last command) waits for the other side to close.
 */
export async function ftpDialogue(
  lab: NetnsLab,
  ns: string,
  target: { readonly host: string; readonly port: number },
  commands: readonly string[],
  options: { readonly watchClose?: boolean; readonly timeoutSeconds?: number } = {},
): Promise<Dialogue> {
  const job = { tool: 'dialogue', host: target.host, port: target.port, commands, wait_close: options.watchClose ?? false, timeout: options.timeoutSeconds ?? 10 };
  const run = await nsRun(ns, pythonPath(), [CLIENT_SCRIPT, JSON.stringify(job)], { timeoutMs: 30000, env: clientEnv(lab) });
  const records = parseJsonLines(run.stdout);
  const greeting = records.find((r) => r.op === 'greeting');
  const end = records.find((r) => r.op === 'end');
  const steps = records
    .filter((r) => r.op === 'cmd')
    .map((r) => {
      const lines = (r.lines as string[] | undefined) ?? [];
      return { cmd: String(r.cmd), lines, code: lines.length > 0 && r.complete !== false ? lines[0]!.slice(0, 3) : null, closed: r.closed === true };
    });
  const error = records.find((r) => typeof r.error === 'string')?.error;
  return {
    run,
    greeting: (greeting?.lines as string[] | undefined) ?? null,
    steps,
    eof: typeof end?.eof === 'boolean' ? end.eof : null,
    trailing: typeof end?.extra === 'string' ? end.extra : '',
    error: typeof error === 'string' ? error : records.length === 0 ? `dialogue printed nothing: ${run.stderr.trim()}` : null,
  };
}

export interface Victim {
  /** The PASV (or PORT/EPRT) reply and the data port, once the victim has them. */
  readonly pasv: Promise<Record<string, unknown>>;
  /** Let the victim connect and RETR. */
  go(): void;
  /** Give up instead: SIGTERM (timeout(1) passes it on to python), so its sessions end. */
  abandon(): void;
  /** Exit code and every record. */
  readonly done: Promise<{ code: number | null; records: Array<Record<string, unknown>>; stderr: string }>;
}

/** ftp_client.py `tool: victim`: PASV (`mode: 'port'`: PORT/EPRT), wait for go(), then take the data connection and RETR. */
export function startVictim(lab: NetnsLab, ns: string, job: Record<string, unknown>): Victim {
  const full = { tool: 'victim', user: TEST_USER, password: TEST_PASSWORD, trust: true, port: 21, ...job };
  const child = spawn('ip', ['netns', 'exec', ns, 'timeout', '-s', 'KILL', '30', pythonPath(), '-u', CLIENT_SCRIPT, JSON.stringify(full)], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: clientEnv(lab),
  });
  let stdout = '';
  let stderr = '';
  let resolvePasv!: (record: Record<string, unknown>) => void;
  const pasv = new Promise<Record<string, unknown>>((resolve) => (resolvePasv = resolve));
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    const first = parseJsonLines(stdout).find((record) => record.op === 'pasv' || record.op === 'port');
    if (first) resolvePasv(first);
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  child.stdin.on('error', () => {});
  const killer = setTimeout(() => child.kill('SIGKILL'), 35000);
  const done = new Promise<{ code: number | null; records: Array<Record<string, unknown>>; stderr: string }>((resolve) => {
    child.once('close', (code) => {
      clearTimeout(killer);
      resolvePasv({ error: `victim exited early: ${stderr}` });
      resolve({ code, records: parseJsonLines(stdout), stderr });
    });
  });
  return { pasv, go: () => child.stdin.end('go\n'), abandon: () => child.kill('SIGTERM'), done };
}

function parseJsonLines(text: string): Array<Record<string, unknown>> {
  const records: Array<Record<string, unknown>> = [];
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      records.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      /* a partial line still being written */
    }
  }
  return records;
}

/**
 * Run one NAT-lab suite: the client tools and dist/ must be there (else one failure that says
 * what to install or why the build failed), then `suite` gets a fresh NetnsLab that is torn
 * down however the file ends: normally, on a failure, or when the runner kills it (exit,
 * SIGTERM, SIGINT). An exception from `suite` (setup went wrong) is one failure; scenario
 * failures are reported by their own subtests.
 */
export async function runLabSuite(t: Test, options: { readonly timeoutMs: number; readonly tools: readonly string[]; readonly install: string }, suite: (lab: NetnsLab) => Promise<void>): Promise<void> {
  t.setTimeout(options.timeoutMs);
  const missing = options.tools.filter((tool) => !findCommand(tool));
  if (missing.length > 0) {
    t.fail(`client tools missing: ${missing.join(', ')} (apt-get install ${options.install})`);
    return;
  }
  const buildError = ensureProxyBuilt();
  if (buildError) {
    t.fail(buildError);
    return;
  }
  const lab = new NetnsLab();
  t.teardown(() => lab.cleanup());
  process.once('exit', () => lab.cleanupSync());
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.once(signal, () => {
      lab.cleanupSync();
      process.exit(128 + (signal === 'SIGTERM' ? 15 : 2));
    });
  }
  try {
    await suite(lab);
  } catch (err) {
    t.fail(`suite setup failed: ${(err as Error).stack ?? String(err)}`);
  }
}

// ------------------------------------------------------------------ small helpers the NAT suites share

/** "clientMode/upstreamMode" of every transfer the proxy logged (from record `mark` on). */
export function transferModes(proxy: LabProxy, mark = 0): Set<string> {
  return new Set(proxy.records().slice(mark).filter((r) => r.event === 'transfer').map((r) => `${String(r.clientMode)}/${String(r.upstreamMode)}`));
}

/** With FNP_E2E_LOG_DIR set, keep each log as `<dir>/<prefix><name>.log`. */
export function saveLogs(logs: Record<string, string>, prefix = ''): void {
  const dir = process.env.FNP_E2E_LOG_DIR;
  if (!dir) return;
  mkdirSync(dir, { recursive: true });
  for (const [name, text] of Object.entries(logs)) writeFileSync(join(dir, `${prefix}${name}.log`), text);
}

/** sha256 of a file, or 'missing'. */
export async function shaOf(path: string): Promise<string> {
  return existsSync(path) ? sha256File(path) : 'missing';
}

export function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** The end of a failed client's stderr, for an assertion message; nothing when it exited 0. */
export function failure(run: RunResult): string {
  return run.code === 0 ? '' : ` (exit ${run.code}: ${lastLines(run.stderr, 3)})`;
}

export function clip(text: string, max = 2000): string {
  return text.length > max ? `${text.slice(0, max)}...` : text;
}

export function lastLines(text: string, count: number): string {
  return text.trim().split('\n').slice(-count).join(' | ');
}
