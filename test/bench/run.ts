/**
 * `npm run bench`: throughput, session rate, scale, idle memory and control latency of
 * ftp-nat-proxy against the same vsftpd reached directly and through ProFTPD mod_proxy.
 * Prints a table and writes bench-results/latest.json (git-ignored). Not part of `npm test`.
 *
 * As root, the whole run happens inside a network namespace created for it (its own
 * loopback, `net.ipv4.tcp_syncookies=0` there so vsftpd's listen backlog of 32 does not
 * drop bursts; the host's sysctls are never touched) and removed afterwards. Without root,
 * it runs on the host's loopback and skips what needs vsftpd.
 *
 * Options: --quick (small sizes, few repetitions), --cpu-prof (V8 profiles of the proxies in
 * bench-results/profiles/), --size-mib=N, --reps=N (every section;
 * default 9 for throughput and kernel, whose single figures swing most, 5 elsewhere),
 * --kernel-targets=direct-again,edge,relay,mod_proxy (the kernel section's targets besides
 * direct; default all: fewer make the many repetitions a pooled comparison needs affordable),
 * --only=throughput,rate,noop,scale,idle,ftps,kernel, --variants=auto,js,splice,kernel (proxy variants
 * to run; the first is the headline). `auto`, `js` and `splice` are `client.dataPath: relay`
 * with FTPNP_RELAY unset, `js` or `splice`; `kernel` is `client.dataPath: kernel` (nftables
 * DNAT/SNAT per transfer, root and libnftables needed, only ever inside the bench's own
 * namespace). Default: `auto,kernel` when that is possible, else `auto`.
 *
 * `kernel` measures the shipped edge setup (conf/edge.yaml: `client.dataPath: auto`,
 * `upstream.dataMode: mirror` with `upstream.activePorts`) per client data mode and address
 * family: RETR and STOR with PASV, EPSV, PORT and EPRT over IPv4 and EPSV and EPRT over IPv6,
 * each against vsftpd reached directly in the same mode (a second vsftpd on ::1 for IPv6),
 * the same setup with `client.dataPath: relay` (the fallback) and, over IPv4, mod_proxy. Its
 * proxies log at info, so every measured transfer's `transfer` line tells which data path
 * carried it. The namespace has `net.ipv4.ip_forward=1` and `net.ipv6.conf.all.forwarding=1`,
 * which `auto` wants before it takes the kernel path.
 *
 * `ftps` (ftps.ts) measures throughput, session rate and idle memory again with explicit FTPS
 * against direct FTPS to a second vsftpd; its proxies run with the default data path whatever
 * --variants says (a TLS leg is relayed by the proxy itself).
 */
import { spawn } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import { chmodSync, createReadStream, existsSync, mkdirSync, mkdtempSync, openSync, closeSync, writeSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, freemem, loadavg, totalmem, release, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { spawnSync } from 'node:child_process';
import { run } from '../helpers/run.js';
import { TEST_USER, vsftpdUnavailable } from '../helpers/vsftpd.js';
import { nftablesUnavailable } from '../helpers/netns.js';
import { countFds, readCpuSeconds, readRssKiB, startChild, stopAllChildren, waitForLine, waitQuiet, type Child } from './procs.js';
import { ensurePackages, isRoot, prepareProftpd, type ProftpdSetup } from './setup.js';
import { inNetns, routedLabPlan, routedLabSteps, type RoutedLab } from './routed-lab.js';
import { HOST, HOST6, hostPort, NOFILE, withNofile, startBenchProftpd, startBenchProxy, startBenchProxyListeners, startBenchVsftpd, type Server } from './servers.js';
import { SESSION_STEPS, fmt, median, num, ratio, ratioOfGeometricMeans, rotate, table, type RatioInterval, type Verdict } from './stats.js';
import { summarizeFile } from './profile-summary.js';
import type { IdleJob, Job, NoopJob, RateJob, ScaleFile, ScaleJob, Target, TransferJob } from './load-worker.js';
import { FTPS_LABELS, FTPS_NAMES, FTPS_PORTS, FTPS_PROXY_VARIANTS, ftpsDiagnosticLines, makeBenchPki, reportFtps, startFtpsTargets, type FtpsTargets } from './ftps.js';
import type { BenchTlsFiles } from './servers.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const MiB = 1024 * 1024;
/** The whole inner run is killed after this, whatever happens. */
const RUN_HARD_LIMIT_MS = 90 * 60_000;

// Ports inside the bench namespace (or on the host loopback without root).
const PORTS = {
  vsftpd: 2100,
  vsftpdPasv: [14000, 19999] as const,
  proxyBase: 2121,
  proxyPassive: (i: number): string => `${20000 + i * 3000}-${20000 + i * 3000 + 2999}`,
  proftpd: 2200,
  proftpdPassive: [8000, 12999] as const,
  fakeUpstream: 2300,
  idleProxy: 2301,
  idlePassive: '13000-13099',
  kernelProbe: 2150,
  kernelProbePassive: '13100-13199',
  // The kernel section (below the ephemeral range, apart from the FTPS ports).
  vsftpd6: 2103,
  vsftpd6Pasv: [7600, 7999] as const,
  edge4: 2160,
  edge4Passive: '32000-32099',
  edge4Active: '32100-32199',
  relay4: 2161,
  relay4Passive: '32200-32299',
  relay4Active: '32300-32399',
  edge6: 2162,
  edge6Passive: '32400-32499',
  edge6Active: '32500-32599',
  relay6: 2163,
  relay6Passive: '32600-32679',
  relay6Active: '32680-32759',
  // mod_proxy on the routed lab's edge (the vsftpds there listen in the server namespace, on
  // the same ports as their loopback twins).
  proftpdRouted: 2201,
  proftpdRoutedPassive: [13200, 13999] as const,
};

// ------------------------------------------------------------------------------- options

interface Options {
  readonly quick: boolean;
  readonly sizeMiB: number;
  /** Repetitions of every section, or null for each section's default. */
  readonly reps: number | null;
  readonly only: ReadonlySet<string>;
  /** As given with --variants=, or null for the default (resolved by `resolveVariants`). */
  readonly variants: readonly string[] | null;
  readonly inside: boolean;
  /** Write a V8 CPU profile of every measured proxy to bench-results/profiles/ (--cpu-prof). */
  readonly cpuProf: boolean;
  /** The kernel section's targets besides direct (--kernel-targets=), or null for all of them. */
  readonly kernelTargets: ReadonlySet<string> | null;
}

const SECTIONS = ['throughput', 'rate', 'noop', 'scale', 'idle', 'ftps', 'kernel'];
/** The sections measured through the plain proxies and mod_proxy. */
const PLAIN_VSFTPD_SECTIONS = ['throughput', 'rate', 'noop', 'scale', 'kernel'];
/** Proxy variants: the relay picked by FTPNP_RELAY (auto = unset), or the kernel data path. */
const VARIANTS = ['auto', 'js', 'splice', 'kernel'];

function parseOptions(argv: readonly string[]): Options {
  const get = (name: string): string | undefined => argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
  const quick = argv.includes('--quick');
  return {
    quick,
    sizeMiB: Number(get('size-mib') ?? (quick ? 32 : 256)),
    reps: get('reps') !== undefined ? Number(get('reps')) : quick ? 2 : null,
    only: new Set((get('only') ?? SECTIONS.join(',')).split(',')),
    variants: get('variants')?.split(',').filter(Boolean) ?? null,
    inside: argv.includes('--inside'),
    cpuProf: argv.includes('--cpu-prof'),
    kernelTargets: get('kernel-targets') !== undefined ? new Set(get('kernel-targets')!.split(',').filter(Boolean)) : null,
  };
}

function repoDir(): string {
  let dir = HERE;
  for (let i = 0; i < 8; i++) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'ftp-nat-proxy') return dir;
    dir = dirname(dir);
  }
  return process.cwd();
}

// ------------------------------------------------------------------------------- outer

interface SetupInfo {
  readonly notes: string[];
  readonly proftpd: ProftpdSetup;
  readonly netns: string | null;
  /** The kernel section's routed lab around the bench namespace (routed-lab.ts), or null: loopback. */
  readonly lab: RoutedLab | null;
  /** Proxy variants to run, in order (the first is the headline). */
  readonly variants: readonly string[];
}

/**
 * Why the kernel data path cannot be measured here, or null. It installs nftables rules, so
 * it only ever runs inside the private namespace (never in the host's ruleset).
 */
function kernelPathUnavailable(netns: string | null): string | null {
  if (!isRoot()) return 'not root (the kernel data path needs CAP_NET_ADMIN)';
  if (!netns) return 'no private network namespace (its nftables rules never go into the host\'s ruleset)';
  const nftables = nftablesUnavailable();
  if (nftables) return nftables;
  return null;
}

/** The variants to run: as asked (kernel dropped with a note when impossible), or the default. */
function resolveVariants(asked: readonly string[] | null, netns: string | null, notes: string[]): string[] {
  const whyNot = kernelPathUnavailable(netns);
  if (asked === null) {
    if (whyNot) notes.push(`kernel data path variant skipped: ${whyNot}`);
    return whyNot ? ['auto'] : ['auto', 'kernel'];
  }
  if (whyNot && asked.includes('kernel')) {
    notes.push(`kernel data path variant skipped: ${whyNot}`);
    return asked.filter((v) => v !== 'kernel');
  }
  return [...asked];
}

function sh(command: string, args: readonly string[]): { ok: boolean; out: string } {
  const r = spawnSync(command, [...args], { encoding: 'utf8', timeout: 30_000 });
  return { ok: r.status === 0, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

function createNetns(name: string): string | null {
  if (!sh('ip', ['netns', 'add', name]).ok) return `ip netns add ${name} failed`;
  const steps: Array<readonly string[]> = [
    ['ip', 'link', 'set', 'lo', 'up'],
    // Only inside this namespace: vsftpd's backlog of 32 drops bursts of connects otherwise
    // (test-environment.md). The host's sysctls stay as they are.
    ['sysctl', '-qw', 'net.ipv4.tcp_syncookies=0'],
    // What `client.dataPath: auto` checks before taking the kernel path (kernel section).
    ['sysctl', '-qw', 'net.ipv4.ip_forward=1'],
  ];
  // Without IPv6 in the kernel the IPv6 cases are skipped, not the run.
  sh('ip', ['netns', 'exec', name, 'sysctl', '-qw', 'net.ipv6.conf.all.forwarding=1']);
  for (const step of steps) {
    const r = sh('ip', ['netns', 'exec', name, ...step]);
    if (!r.ok) {
      deleteNetns(name);
      return `${step.join(' ')} in the namespace failed: ${r.out.trim()}`;
    }
  }
  return null;
}

/** The kernel section's routed lab (routed-lab.ts), or null with a note: the section then runs on loopback. */
function createRoutedLab(edgeNs: string, notes: string[]): RoutedLab | null {
  const lab = routedLabPlan(edgeNs, process.pid);
  for (const step of routedLabSteps(lab)) {
    const r = sh(step[0]!, step.slice(1));
    if (!r.ok) {
      notes.push(`no routed lab for the kernel section (${step.join(' ')}: ${r.out.trim()}); it runs on the loopback instead`);
      deleteRoutedLab(lab);
      return null;
    }
  }
  return lab;
}

function deleteRoutedLab(lab: RoutedLab): void {
  for (const side of [lab.client, lab.server]) if (sh('ip', ['netns', 'list']).out.split('\n').some((l) => l.split(' ')[0] === side.ns)) deleteNetns(side.ns);
}

function deleteNetns(name: string): void {
  // Anything still running in it was started by this benchmark: stop it by PID.
  const pids = sh('ip', ['netns', 'pids', name]).out.split(/\s+/).filter(Boolean).map(Number);
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
  sh('ip', ['netns', 'del', name]);
}

async function outer(options: Options, argv: readonly string[]): Promise<number> {
  const repo = repoDir();
  const unknown = (options.variants ?? []).filter((v) => !VARIANTS.includes(v));
  if (unknown.length > 0 || options.variants?.length === 0 || new Set(options.variants).size !== (options.variants ?? []).length) {
    process.stderr.write(`bench: --variants= takes distinct values out of ${VARIANTS.join(', ')}${unknown.length ? ` (unknown: ${unknown.join(', ')})` : ''}\n`);
    return 2;
  }
  if (!existsSync(join(repo, 'dist/cli.js'))) {
    process.stderr.write('bench: dist/cli.js missing: run `npx tsc -p tsconfig.json` first (npm run bench does)\n');
    return 2;
  }
  const notes = ensurePackages();
  const proftpd: ProftpdSetup = [...PLAIN_VSFTPD_SECTIONS, 'ftps'].some((s) => options.only.has(s))
    ? prepareProftpd(join(repo, 'bench-results/.proftpd'))
    : { ok: false, reason: 'not needed for the selected sections' };
  let netns: string | null = null;
  if (isRoot()) {
    const name = `ftpnpbench${process.pid}`;
    const failed = createNetns(name);
    if (failed) notes.push(`no private network namespace (${failed}); running on the host loopback`);
    else netns = name;
  } else {
    notes.push('not root: running on the host loopback; vsftpd-based parts are skipped');
  }
  const variants = resolveVariants(options.variants, netns, notes);
  if (variants.length === 0) {
    process.stderr.write(`bench: no proxy variant left to run (${notes[notes.length - 1] ?? ''})\n`);
    if (netns) deleteNetns(netns);
    return 2;
  }
  const lab = netns && options.only.has('kernel') ? createRoutedLab(netns, notes) : null;
  const setup: SetupInfo = { notes, proftpd, netns, lab, variants };
  const started = Date.now();
  if (!netns) return printProfiles(options, repo, started, await inner(options, setup));
  const nodeArgs = [fileURLToPath(import.meta.url), ...argv, '--inside'];
  const child = spawn('ip', ['netns', 'exec', netns, 'prlimit', `--nofile=${NOFILE}:${NOFILE}`, '--', process.execPath, ...nodeArgs], {
    stdio: 'inherit',
    env: { ...process.env, FTPNP_BENCH_SETUP: JSON.stringify(setup) },
  });
  const onSignal = (sig: NodeJS.Signals): void => {
    if (child.pid) process.kill(child.pid, sig);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const hardLimit = setTimeout(() => {
    process.stderr.write('bench: hard time limit reached, stopping\n');
    if (child.pid) process.kill(child.pid, 'SIGKILL');
  }, RUN_HARD_LIMIT_MS);
  const code = await new Promise<number>((resolve) => child.once('exit', (c) => resolve(c ?? 1)));
  clearTimeout(hardLimit);
  if (lab) deleteRoutedLab(lab);
  deleteNetns(netns);
  return printProfiles(options, repo, started, code);
}

/** --cpu-prof: where each proxy's CPU went (profile-summary.ts), from the profiles this run wrote. */
function printProfiles(options: Options, repo: string, since: number, code: number): number {
  if (!options.cpuProf) return code;
  const dir = join(repo, 'bench-results', 'profiles');
  const files = existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.cpuprofile')).map((f) => join(dir, f)).filter((f) => statSync(f).mtimeMs >= since) : [];
  const lines = files.flatMap((file) => {
    try {
      return ['', ...summarizeFile(file)];
    } catch (err) {
      return ['', `${file}: unreadable profile (${oneLine(err)})`];
    }
  });
  process.stdout.write(`\nCPU profiles (${dir}):${files.length ? '' : ' none written'}\n${lines.join('\n')}\n`);
  return code;
}

// ------------------------------------------------------------------------------- inner

interface Machine {
  nproc: number;
  cpuModel: string;
  memTotal: string;
  memFree: string;
  freeH: string;
  node: string;
  kernel: string;
  loadavgStart: number[];
  loadavgEnd?: number[];
  netns: string | null;
  nofile: number;
  proxyRelay: Record<string, string>;
  /** What the kernel data path probe saw (kernel variant only). */
  kernelProbe?: KernelProbe;
}

function machineInfo(netns: string | null): Machine {
  const free = spawnSync('free', ['-h'], { encoding: 'utf8' });
  return {
    nproc: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memTotal: `${(totalmem() / 1024 ** 3).toFixed(1)} GiB`,
    memFree: `${(freemem() / 1024 ** 3).toFixed(1)} GiB`,
    freeH: (free.stdout ?? '').trim(),
    node: process.version,
    kernel: release(),
    loadavgStart: loadavg().map((v) => Number(v.toFixed(2))),
    netns,
    nofile: NOFILE,
    proxyRelay: {},
  };
}

/**
 * What moves the data of a proxy started as `variant` (same node, same dist/): for the relay
 * variants, the relay FTPNP_RELAY=`variant` picks (auto: unset).
 */
async function describeRelay(repo: string, variant: string): Promise<{ kind: string; text: string }> {
  if (variant === 'kernel') return { kind: 'kernel', text: 'kernel (nftables DNAT per transfer)' };
  if (variant === 'js') return { kind: 'js', text: 'js (FTPNP_RELAY=js)' };
  try {
    const mod = (await import(pathToFileURL(join(repo, 'dist/data/splice-relay.js')).href)) as { relayImplementation(): { kind: string; reason: string } };
    const saved = process.env.FTPNP_RELAY;
    if (variant === 'auto') delete process.env.FTPNP_RELAY;
    else process.env.FTPNP_RELAY = variant;
    const impl = mod.relayImplementation();
    if (saved === undefined) delete process.env.FTPNP_RELAY;
    else process.env.FTPNP_RELAY = saved;
    return { kind: impl.kind, text: `${impl.kind} (${impl.reason})` };
  } catch (err) {
    return { kind: 'js', text: `js (no splice relay in dist/: ${err instanceof Error ? err.message : String(err)})` };
  }
}

/** How a variant is named in the table: which proxy process, and what moves its data. */
function variantLabel(name: string, variant: string, kind: string, headline: boolean): string {
  const what = variant === 'kernel' ? 'dataPath=kernel, nft DNAT' : `relay=${kind}`;
  return `${name} (${what}${headline && variant === 'auto' ? ', default' : ''})`;
}

/** V8 profile flags for a proxy process when --cpu-prof is on. */
function cpuProfArgs(options: Options, repo: string, name: string): string[] {
  return options.cpuProf ? ['--cpu-prof', `--cpu-prof-dir=${join(repo, 'bench-results', 'profiles')}`, `--cpu-prof-name=${name}.cpuprofile`] : [];
}

function writeRandomFile(path: string, bytes: number): string {
  const hash = createHash('sha256');
  const fd = openSync(path, 'w', 0o644);
  const chunk = Buffer.allocUnsafe(Math.min(bytes, 4 * MiB));
  let left = bytes;
  while (left > 0) {
    const n = Math.min(left, chunk.length);
    randomFillSync(chunk, 0, n);
    hash.update(chunk.subarray(0, n));
    writeSync(fd, chunk, 0, n);
    left -= n;
  }
  closeSync(fd);
  return hash.digest('hex');
}

function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path)
      .on('data', (d) => hash.update(d))
      .on('end', () => resolve(hash.digest('hex')))
      .on('error', reject);
  });
}

function targetOf(server: Server): Target {
  return { host: server.host, port: server.port, user: server.user, password: server.password, ...(server.tls ? { tls: server.tls } : {}) };
}

/** Run one load-worker job in its own process; resolves with its RESULT object. */
async function runJob(job: Job, onReady?: (ready: Record<string, unknown>, worker: Child) => Promise<void>): Promise<Record<string, unknown>> {
  const worker = startChild(`load-${job.kind}`, process.execPath, [join(HERE, 'load-worker.js'), JSON.stringify(job)], { stdin: true });
  try {
    const result = waitForLine(worker, (line) => (line.startsWith('RESULT ') ? (JSON.parse(line.slice(7)) as Record<string, unknown>) : null), job.maxMs + 150_000);
    if (onReady) {
      const ready = await waitForLine(worker, (line) => (line.startsWith('READY ') ? (JSON.parse(line.slice(6)) as Record<string, unknown>) : null), job.maxMs + 60_000);
      await onReady(ready, worker);
    }
    return await result;
  } finally {
    await worker.stop();
  }
}

interface TransferResult {
  readonly ok: boolean;
  readonly mibPerSec: number;
  readonly seconds: number;
  readonly bytes: number;
  readonly error?: string;
}

/** How the client sets up the data connection: it dials (PASV, EPSV) or the server does (PORT, EPRT). */
type DataMode = 'pasv' | 'epsv' | 'port' | 'eprt';

/**
 * curl's options for exactly `mode`. Left alone, curl tries EPSV then PASV, and with -P
 * EPRT then PORT: the kernel section checks the command curl sent in its -v trace, so a
 * fallback shows up as an error instead of a figure for the wrong mode.
 */
function curlModeArgs(mode: DataMode): string[] {
  switch (mode) {
    case 'pasv':
      return ['--disable-epsv'];
    case 'epsv':
      return ['--ftp-pasv'];
    case 'port':
      return ['--ftp-port', '-', '--disable-eprt'];
    case 'eprt':
      return ['--ftp-port', '-'];
  }
}

/** Null when curl's -v trace shows exactly `mode`'s command, accepted; else what it shows. */
function curlModeProblem(trace: string, mode: DataMode): string | null {
  const sent = [...trace.matchAll(/^> (PASV|EPSV|PORT|EPRT)\b.*$/gm)].map((m) => m[1]!);
  const want = mode.toUpperCase();
  if (sent.length !== 1 || sent[0] !== want) return `curl sent ${sent.join(', ') || 'no PASV/EPSV/PORT/EPRT'} instead of ${want} alone`;
  const accepted = new RegExp(`^> ${want}\\b.*\\r?\\n(?:\\*.*\\r?\\n)*< ${mode === 'pasv' ? 227 : mode === 'epsv' ? 229 : 200} `, 'm');
  return accepted.test(trace) ? null : `${want} was not accepted`;
}

/**
 * One big transfer by curl, timed from the transfer's start to its end (time_total minus
 * time_pretransfer: login and the data connection's setup excluded). With `mode`, curl
 * uses exactly that data mode (-v trace checked).
 */
async function curlTransfer(server: Server, direction: 'get' | 'put', remote: string, local: string, expectBytes: number, mode?: DataMode): Promise<TransferResult> {
  // -g: an IPv6 address in brackets is not a curl glob.
  const url = `ftp://${hostPort(server.host, server.port)}/${remote}`;
  const io = direction === 'get' ? ['-o', '/dev/null'] : ['-T', local];
  const modeArgs = mode ? ['-v', ...curlModeArgs(mode)] : [];
  const curlArgs = ['-sS', '-g', '--max-time', '300', ...modeArgs, '-u', `${server.user}:${server.password}`, ...io, '-w', '%{time_pretransfer} %{time_total} %{size_download} %{size_upload}', url];
  const [command, args] = server.clientNetns ? inNetns(server.clientNetns, 'curl', curlArgs) : ['curl', curlArgs];
  const r = await run(command, args, { timeoutMs: 320_000 });
  const [pre, total, down, up] = r.stdout.trim().split(' ').map(Number);
  const bytes = direction === 'get' ? down! : up!;
  const seconds = total! - pre!;
  const errorLines = (): string => (mode ? r.stderr.split('\n').filter((l) => !/^[<>*{}] /.test(l)).join(' ') : r.stderr).trim().slice(0, 200);
  if (r.code !== 0 || bytes !== expectBytes) {
    return { ok: false, mibPerSec: Number.NaN, seconds, bytes, error: `curl exit ${r.code}: ${errorLines()} (${bytes}/${expectBytes} bytes)` };
  }
  const wrongMode = mode ? curlModeProblem(r.stderr, mode) : null;
  if (wrongMode) return { ok: false, mibPerSec: Number.NaN, seconds, bytes, error: wrongMode };
  return { ok: true, mibPerSec: bytes / MiB / seconds, seconds, bytes };
}

/**
 * One big transfer through an FTPS server by the load worker (AUTH TLS, PBSZ 0, PROT P: the
 * way the proxy's TLS listener is configured; curl would try AUTH SSL first), timed like
 * curlTransfer: from the transfer command to its end, login and PASV excluded.
 */
async function ftpsTransfer(server: Server, direction: 'get' | 'put', remote: string, local: string, expectBytes: number): Promise<TransferResult> {
  const job: TransferJob = { kind: 'transfer', target: targetOf(server), direction: direction === 'get' ? 'retr' : 'stor', remote, ...(direction === 'put' ? { local } : {}), bytes: expectBytes, maxMs: 300_000 };
  const r = (await runJob(job)) as { ok?: boolean; seconds?: number; bytes?: number; error?: string };
  const seconds = r.seconds ?? Number.NaN;
  const bytes = r.bytes ?? 0;
  if (!r.ok) return { ok: false, mibPerSec: Number.NaN, seconds, bytes, error: r.error ?? 'no result' };
  return { ok: true, mibPerSec: bytes / MiB / seconds, seconds, bytes };
}

/** curl for plain FTP, the load worker for FTPS. */
function transfer(server: Server, direction: 'get' | 'put', remote: string, local: string, expectBytes: number): Promise<TransferResult> {
  return (server.tls ? ftpsTransfer : curlTransfer)(server, direction, remote, local, expectBytes);
}

interface Context {
  readonly options: Options;
  readonly repo: string;
  readonly work: string;
  readonly root: string;
  readonly direct: Server;
  /** ftp-nat-proxy variants (first one is the headline figure). */
  readonly proxies: Server[];
  readonly modProxy: Server | null;
  /** The kernel section's routed lab, or null (that section then runs on the loopback). */
  readonly lab: RoutedLab | null;
  readonly proftpd: ProftpdSetup;
  readonly files: { big: string; bigSha: string; upload: string; uploadSha: string; small: string; smallSha: string; scale: ScaleFile[] };
}

function allTargets(ctx: Context): Server[] {
  return [ctx.direct, ...ctx.proxies, ...(ctx.modProxy ? [ctx.modProxy] : [])];
}

function log(text: string): void {
  process.stderr.write(`bench: ${text}\n`);
}

/** How often the machine was busy with other work right before a measurement. */
const quietness = { samples: 0, notQuiet: 0, maxBusyCores: 0 };
const QUIET_WAIT_MS = 15_000;

/** Before each measurement: wait (bounded) for other processes to leave the CPUs alone. */
async function settle(): Promise<void> {
  const q = await waitQuiet(QUIET_WAIT_MS);
  quietness.samples += 1;
  if (!q.quiet) quietness.notQuiet += 1;
  quietness.maxBusyCores = Math.max(quietness.maxBusyCores, Number(q.busyCores.toFixed(2)));
}

function oneLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).replace(/\s+/g, ' ').trim().slice(0, 1200);
}

/** `nft list tables` where this process runs (inside the bench namespace), or null. */
function nftTables(): string[] | null {
  const r = spawnSync('nft', ['list', 'tables'], { encoding: 'utf8', timeout: 10_000 });
  return r.status === 0 ? r.stdout.split('\n').map((l) => l.trim()).filter(Boolean) : null;
}

interface KernelProbe {
  /** null when the transfer went through and was logged with dataPath kernel. */
  readonly problem: string | null;
  /** The proxy's `"event":"transfer"` log line, when there was one. */
  readonly transfer: Record<string, unknown> | null;
}

/**
 * Before measuring the kernel variant: one RETR (4 KiB) through a short-lived proxy with
 * `client.dataPath: kernel` logging at info, whose transfer line must say `dataPath: kernel`
 * (the measured proxies log at warn, so they cannot tell).
 */
async function probeKernelPath(repo: string, work: string): Promise<KernelProbe> {
  let probe: Server;
  try {
    probe = await startBenchProxy({ name: 'proxy-kernel-probe', port: PORTS.kernelProbe, work, upstreamPort: PORTS.vsftpd, passivePorts: PORTS.kernelProbePassive, repoDir: repo, dataPath: 'kernel', logLevel: 'info' });
  } catch (err) {
    return { problem: `did not start: ${oneLine(err)}`, transfer: null };
  }
  try {
    const logged = waitForLine(
      probe.child,
      (line) => {
        try {
          const entry = JSON.parse(line) as Record<string, unknown>;
          return entry.event === 'transfer' ? entry : null;
        } catch {
          return null;
        }
      },
      10_000,
    );
    logged.catch(() => undefined);
    const get = await curlTransfer(probe, 'get', 'small.bin', '', 4096);
    if (!get.ok) return { problem: `RETR failed: ${get.error}; proxy output: ${probe.child.output().trim().slice(-800)}`, transfer: null };
    const transfer = await logged;
    if (transfer.dataPath !== 'kernel') return { problem: `transfer logged with dataPath=${String(transfer.dataPath)}: ${JSON.stringify(transfer)}`, transfer };
    return { problem: null, transfer };
  } catch (err) {
    return { problem: oneLine(err), transfer: null };
  } finally {
    await probe.child.stop();
  }
}

// ---- throughput

async function benchThroughput(ctx: Context): Promise<Record<string, unknown>> {
  const { sizeMiB } = ctx.options;
  const reps = ctx.options.reps ?? 9;
  const bytes = sizeMiB * MiB;
  const targets = allTargets(ctx);
  const per: Record<string, { retr: number[]; stor: number[]; retrRatio: number[]; storRatio: number[]; cpuSecPerGiB: number[]; errors: string[] }> = {};
  for (const t of targets) per[t.name] = { retr: [], stor: [], retrRatio: [], storRatio: [], cpuSecPerGiB: [], errors: [] };
  const verified = new Set<string>();
  for (let rep = 0; rep < reps; rep++) {
    const thisRep: Record<string, { retr: number; stor: number }> = {};
    for (const t of rotate(targets, rep)) {
      const slot = per[t.name]!;
      const isProxy = ctx.proxies.includes(t);
      await settle();
      const cpu0 = isProxy ? await readCpuSeconds(t.child.pid) : 0;
      const get = await transfer(t, 'get', 'big.bin', '', bytes);
      const remote = `up-${t.name}-${rep}.bin`;
      const put = await transfer(t, 'put', remote, ctx.files.upload, bytes);
      if (isProxy) slot.cpuSecPerGiB.push(((await readCpuSeconds(t.child.pid)) - cpu0) / ((2 * bytes) / 1024 ** 3));
      const stored = join(ctx.root, remote);
      if (put.ok) {
        const size = existsSync(stored) ? statSync(stored).size : -1;
        if (size !== bytes) slot.errors.push(`STOR stored ${size} bytes, expected ${bytes}`);
        else if (!verified.has(t.name)) {
          verified.add(t.name);
          if ((await sha256File(stored)) !== ctx.files.uploadSha) slot.errors.push('STOR sha256 mismatch');
        }
      }
      rmSync(stored, { force: true });
      if (!get.ok) slot.errors.push(`RETR: ${get.error}`);
      if (!put.ok) slot.errors.push(`STOR: ${put.error}`);
      slot.retr.push(get.mibPerSec);
      slot.stor.push(put.mibPerSec);
      thisRep[t.name] = { retr: get.mibPerSec, stor: put.mibPerSec };
      log(`throughput rep ${rep + 1}/${reps} ${t.name}: RETR ${fmt(get.mibPerSec)} MiB/s, STOR ${fmt(put.mibPerSec)} MiB/s`);
    }
    const d = thisRep[ctx.direct.name]!;
    for (const t of targets) {
      per[t.name]!.retrRatio.push(thisRep[t.name]!.retr / d.retr);
      per[t.name]!.storRatio.push(thisRep[t.name]!.stor / d.stor);
    }
  }
  const out: Record<string, unknown> = { sizeMiB, reps };
  for (const t of targets) {
    const s = per[t.name]!;
    out[t.name] = {
      retrMiBps: median(s.retr),
      storMiBps: median(s.stor),
      retrRatio: median(s.retrRatio),
      storRatio: median(s.storRatio),
      ...(s.cpuSecPerGiB.length ? { proxyCpuSecondsPerGiB: median(s.cpuSecPerGiB) } : {}),
      runs: { retr: s.retr, stor: s.stor, retrRatio: s.retrRatio, storRatio: s.storRatio },
      errors: s.errors,
    };
  }
  return out;
}

// ---- session rate

async function benchRate(ctx: Context, concurrency: number): Promise<Record<string, unknown>> {
  const reps = ctx.options.reps ?? 5;
  const count = ctx.options.quick ? (concurrency === 1 ? 100 : 500) : concurrency === 1 ? 400 : 3000;
  const targets = allTargets(ctx);
  const per: Record<string, { rate: number[]; ratio: number[]; p99: number[]; cpuMsPerSession: number[]; errors: number; samples: Record<string, number>; steps: Record<string, number[]> }> = {};
  for (const t of targets) per[t.name] = { rate: [], ratio: [], p99: [], cpuMsPerSession: [], errors: 0, samples: {}, steps: {} };
  for (let rep = 0; rep < reps; rep++) {
    const thisRep: Record<string, number> = {};
    for (const t of rotate(targets, rep)) {
      // At concurrency 1 each step of each session is timed too (where the time goes).
      const job: RateJob = { kind: 'rate', target: targetOf(t), file: 'small.bin', sha256: ctx.files.smallSha, concurrency, count, warmupMs: 300, maxMs: concurrency === 1 ? 15_000 : 25_000, steps: concurrency === 1 };
      await settle();
      const isProxy = ctx.proxies.includes(t);
      const cpu0 = isProxy ? await readCpuSeconds(t.child.pid) : 0;
      const r = (await runJob(job)) as { sessionsPerSecond: number; completed: number; latencyMs: { p99: number }; errors: { count: number; samples: Record<string, number> }; steps?: Record<string, number>; error?: string };
      const slot = per[t.name]!;
      if (isProxy && r.completed > 0) slot.cpuMsPerSession.push((((await readCpuSeconds(t.child.pid)) - cpu0) * 1000) / r.completed);
      if (r.error) {
        slot.errors += 1;
        slot.samples[r.error] = (slot.samples[r.error] ?? 0) + 1;
        thisRep[t.name] = Number.NaN;
        continue;
      }
      slot.rate.push(r.sessionsPerSecond);
      slot.p99.push(r.latencyMs.p99);
      for (const [step, ms] of Object.entries(r.steps ?? {})) (slot.steps[step] ??= []).push(ms);
      slot.errors += r.errors.count;
      for (const [k, v] of Object.entries(r.errors.samples)) slot.samples[k] = (slot.samples[k] ?? 0) + v;
      thisRep[t.name] = r.sessionsPerSecond;
      log(`rate c=${concurrency} rep ${rep + 1}/${reps} ${t.name}: ${fmt(r.sessionsPerSecond)} sessions/s (${r.errors.count} failed)`);
    }
    for (const t of targets) per[t.name]!.ratio.push(thisRep[t.name]! / thisRep[ctx.direct.name]!);
  }
  const out: Record<string, unknown> = { concurrency, sessionsPerRun: count, reps };
  for (const t of targets) {
    const s = per[t.name]!;
    out[t.name] = {
      sessionsPerSecond: median(s.rate),
      ratio: median(s.ratio),
      latencyP99Ms: median(s.p99),
      ...(s.cpuMsPerSession.length ? { proxyCpuMsPerSession: median(s.cpuMsPerSession) } : {}),
      failed: s.errors,
      errorSamples: s.samples,
      ...(Object.keys(s.steps).length ? { stepsMs: Object.fromEntries(Object.entries(s.steps).map(([step, list]) => [step, median(list)])) } : {}),
      runs: { rate: s.rate, ratio: s.ratio },
    };
  }
  return out;
}

/**
 * Per-step medians at concurrency 1 (ms; the median over repetitions of each repetition's
 * median), each target against direct: where a small session's time goes through a proxy.
 */
function reportSteps(r: Record<string, unknown>, names: readonly string[]): string[][] {
  const rows: string[][] = [['step of one session (c=1), median ms', ...names.map((name) => (name === 'direct' ? 'direct' : `${name} (+ over direct)`))]];
  const at = (name: string, step: string): number => num(r, name, 'stepsMs', step);
  let totals = names.map(() => 0);
  for (const step of SESSION_STEPS) {
    const direct = at('direct', step);
    rows.push([step, ...names.map((name) => {
      const ms = at(name, step);
      return name === 'direct' || !Number.isFinite(ms) ? fmt(ms, 3) : `${fmt(ms, 3)} (${ms - direct >= 0 ? '+' : ''}${fmt(ms - direct, 3)})`;
    })]);
    totals = totals.map((sum, i) => sum + at(names[i]!, step));
  }
  const directTotal = totals[names.indexOf('direct')] ?? Number.NaN;
  rows.push(['sum of the steps', ...totals.map((total, i) => (names[i] === 'direct' ? fmt(total, 3) : `${fmt(total, 3)} (+${fmt(total - directTotal, 3)})`))]);
  return rows;
}

// ---- NOOP latency

/** The direct target measured a second time in each repetition: the A/A noise floor of a ratio or a difference. */
const DIRECT_AGAIN = 'direct-again';

async function benchNoop(ctx: Context): Promise<Record<string, unknown>> {
  const reps = ctx.options.reps ?? 5;
  // The same vsftpd twice: how far p99 moves between two runs with no proxy at all.
  const targets = [...allTargets(ctx), { ...ctx.direct, name: DIRECT_AGAIN }];
  const per: Record<string, { p50: number[]; p99: number[]; over50: number[]; over99: number[] }> = {};
  for (const t of targets) per[t.name] = { p50: [], p99: [], over50: [], over99: [] };
  for (let rep = 0; rep < reps; rep++) {
    const thisRep: Record<string, { p50Ms: number; p99Ms: number }> = {};
    for (const t of rotate(targets, rep)) {
      const job: NoopJob = { kind: 'noop', target: targetOf(t), warmup: 300, count: ctx.options.quick ? 1000 : 3000, maxMs: 30_000 };
      await settle();
      const r = (await runJob(job)) as { p50Ms: number; p99Ms: number; error?: string };
      thisRep[t.name] = r.error ? { p50Ms: Number.NaN, p99Ms: Number.NaN } : r;
      per[t.name]!.p50.push(thisRep[t.name]!.p50Ms);
      per[t.name]!.p99.push(thisRep[t.name]!.p99Ms);
    }
    const d = thisRep[ctx.direct.name]!;
    for (const t of targets) {
      per[t.name]!.over50.push(thisRep[t.name]!.p50Ms - d.p50Ms);
      per[t.name]!.over99.push(thisRep[t.name]!.p99Ms - d.p99Ms);
    }
    log(`noop rep ${rep + 1}/${reps}: ${targets.map((t) => `${t.name} p50 ${fmt(thisRep[t.name]!.p50Ms, 3)} p99 ${fmt(thisRep[t.name]!.p99Ms, 3)} ms`).join(', ')}`);
  }
  const out: Record<string, unknown> = { reps };
  for (const t of targets) {
    const s = per[t.name]!;
    out[t.name] = { p50Ms: median(s.p50), p99Ms: median(s.p99), overheadP50Ms: median(s.over50), overheadP99Ms: median(s.over99), runs: s };
  }
  return out;
}

// ---- 1,000 concurrent sessions

async function benchScale(ctx: Context): Promise<Record<string, unknown>> {
  const sessions = ctx.options.quick ? 200 : 1000;
  // Every proxy variant: the kernel data path is a per-transfer nftables mapping, so 1,000
  // transfers at once are exactly what it has to survive.
  const targets = allTargets(ctx);
  const out: Record<string, unknown> = { sessions };
  for (const t of targets) {
    const prefix = `scale-${t.name}-`;
    const job: ScaleJob = {
      kind: 'scale',
      target: targetOf(t),
      sessions,
      rampConcurrency: 32,
      downloads: ctx.files.scale,
      uploadPrefix: prefix,
      uploadMinBytes: 1024,
      uploadMaxBytes: 256 * 1024,
      maxMs: 240_000,
    };
    await settle();
    const peakFds = { value: 0 };
    const sampler = ctx.proxies.includes(t)
      ? setInterval(() => void countFds(t.child.pid).then((n) => (peakFds.value = Math.max(peakFds.value, n))), 200)
      : null;
    const r = (await runJob(job)) as {
      failed: number;
      uploads: Array<{ name: string; sha256: string; bytes: number }>;
      downloads: number;
      downloadsOk: number;
      maxConcurrentTransfers: number;
      loginPhaseMs: number | null;
      transferPhaseMs: number | null;
      errors: { count: number; samples: Record<string, number> };
      error?: string;
    };
    if (sampler) clearInterval(sampler);
    if (r.error) {
      out[t.name] = { failed: sessions, error: r.error };
      continue;
    }
    let badUploads = 0;
    for (const up of r.uploads) {
      const path = join(ctx.root, up.name);
      const ok = existsSync(path) && statSync(path).size === up.bytes && (await sha256File(path)) === up.sha256;
      if (!ok) badUploads += 1;
      rmSync(path, { force: true });
    }
    const failures = r.failed + badUploads;
    out[t.name] = {
      failed: failures,
      sessionFailures: r.failed,
      uploadsVerified: r.uploads.length - badUploads,
      uploads: r.uploads.length,
      downloadsVerified: r.downloadsOk,
      downloads: r.downloads,
      maxConcurrentTransfers: r.maxConcurrentTransfers,
      loginPhaseMs: r.loginPhaseMs,
      transferPhaseMs: r.transferPhaseMs,
      ...(sampler ? { proxyPeakFds: peakFds.value } : {}),
      errorSamples: r.errors.samples,
    };
    log(`scale ${t.name}: ${sessions} sessions, ${failures} failures, ${r.maxConcurrentTransfers} transfers at once`);
  }
  return out;
}

// ---- idle sessions: RSS per session

/** Which proxy holds the idle sessions: plain, or with TLS on its client leg (FTPS). */
interface IdleSetup {
  readonly name: string;
  readonly port: number;
  readonly passivePorts: string;
  readonly fakeUpstreamPort: number;
  /** `listeners[].tls`: every idle session is AUTH TLS + PBSZ 0 + PROT P, then logged in. */
  readonly tls?: BenchTlsFiles;
}

const PLAIN_IDLE: IdleSetup = { name: 'proxy-idle', port: PORTS.idleProxy, passivePorts: PORTS.idlePassive, fakeUpstreamPort: PORTS.fakeUpstream };

async function benchIdle(options: Options, repo: string, work: string, setup: IdleSetup = PLAIN_IDLE): Promise<Record<string, unknown>> {
  const sessions = options.quick ? 1000 : 5000;
  const [fakeCommand, fakeArgs] = withNofile(process.execPath, [join(HERE, 'fake-upstream.js'), HOST, String(setup.fakeUpstreamPort), '900000']);
  const fake = startChild('fake-upstream', fakeCommand, fakeArgs);
  try {
    await waitForLine(fake, (line) => (line.startsWith('LISTENING') ? true : null), 10_000);
    const proxy = await startBenchProxy({
      name: setup.name,
      port: setup.port,
      work,
      upstreamPort: setup.fakeUpstreamPort,
      passivePorts: setup.passivePorts,
      repoDir: repo,
      user: 'idle',
      password: 'idle',
      ...(setup.tls ? { tls: setup.tls } : {}),
    });
    const target = targetOf(proxy);
    const pid = proxy.child.pid;
    const rssStart = await readRssKiB(pid);
    // Warm-up: the first sessions load code and grow the heap once; not per-session cost.
    await runJob({ kind: 'idle', target, sessions: 200, rampConcurrency: 50, maxMs: 2000 } satisfies IdleJob);
    await new Promise((r) => setTimeout(r, 1500));
    const rssBefore = await readRssKiB(pid);
    const fdsBefore = await countFds(pid);
    let rssAfter = 0;
    let fdsAfter = 0;
    let ready: Record<string, unknown> = {};
    const result = await runJob({ kind: 'idle', target, sessions, rampConcurrency: 100, maxMs: 120_000 } satisfies IdleJob, async (r, worker) => {
      ready = r;
      // Let the sessions sit idle, then sample.
      const samples: number[] = [];
      for (let i = 0; i < 5; i++) {
        await new Promise((res) => setTimeout(res, 600));
        samples.push(await readRssKiB(pid));
      }
      rssAfter = median(samples);
      fdsAfter = await countFds(pid);
      worker.process.stdin?.write('close\n');
    });
    const open = Number(ready.open ?? 0);
    await proxy.child.stop();
    const perSessionKiB = open > 0 ? (rssAfter - rssBefore) / open : Number.NaN;
    log(`idle${setup.tls ? ' TLS' : ''}: ${open} sessions, RSS ${rssBefore} -> ${rssAfter} KiB: ${fmt(perSessionKiB, 1)} KiB per session`);
    return {
      sessions,
      open,
      aliveAfterIdle: result.aliveAfterIdle,
      failed: result.failed,
      loginMs: ready.loginMs,
      rssStartKiB: rssStart,
      rssBeforeKiB: rssBefore,
      rssAfterKiB: rssAfter,
      perSessionKiB,
      fdsBefore,
      fdsAfter,
      errorSamples: (result.errors as { samples?: unknown } | undefined)?.samples ?? {},
    };
  } finally {
    await fake.stop();
  }
}

// ---- FTPS (ftps.ts): the same throughput and rate code, through the FTPS targets

async function benchFtps(ctx: Context, proftpd: ProftpdSetup): Promise<Record<string, unknown>> {
  let targets: FtpsTargets;
  try {
    targets = await startFtpsTargets({ work: join(ctx.work, 'ftps'), root: ctx.root, repoDir: ctx.repo, plainUpstreamPort: ctx.direct.port, proftpd, nodeArgs: (name) => cpuProfArgs(ctx.options, ctx.repo, name) });
  } catch (err) {
    log(`ftps: direct FTPS did not start: ${oneLine(err)}`);
    return { error: `direct FTPS did not start: ${oneLine(err)}` };
  }
  for (const [name, why] of Object.entries(targets.startErrors)) log(`ftps: ${name}: ${why}`);
  try {
    const ftpsCtx: Context = { ...ctx, direct: targets.direct, proxies: targets.proxies, modProxy: targets.modProxy };
    return {
      startErrors: targets.startErrors,
      throughput: await benchThroughput(ftpsCtx),
      rate_c1: await benchRate(ftpsCtx, 1),
      rate_c50: await benchRate(ftpsCtx, 50),
    };
  } finally {
    await targets.stop();
  }
}

/** Idle sessions with TLS on the client leg (AUTH TLS, PBSZ 0, PROT P, login); never throws. */
async function benchFtpsIdle(options: Options, repo: string, work: string): Promise<Record<string, unknown>> {
  const sessions = options.quick ? 1000 : 5000;
  mkdirSync(work, { recursive: true });
  const made = makeBenchPki(work);
  if ('error' in made) return { sessions, error: `no certificates: ${made.error}` };
  try {
    return await benchIdle(options, repo, work, { name: FTPS_NAMES.idle, port: FTPS_PORTS.idleProxy, passivePorts: FTPS_PORTS.idlePassive, fakeUpstreamPort: FTPS_PORTS.fakeUpstream, tls: made.files });
  } catch (err) {
    log(`ftps idle: ${oneLine(err)}`);
    return { sessions, error: oneLine(err) };
  } finally {
    made.pki.cleanup();
  }
}

// ---- kernel: the shipped edge setup per client data mode and address family

/** The client data modes measured per family: PASV and PORT exist in IPv4 only. */
const KERNEL_CASES: ReadonlyArray<{ readonly family: 4 | 6; readonly mode: DataMode }> = [
  { family: 4, mode: 'pasv' },
  { family: 4, mode: 'epsv' },
  { family: 4, mode: 'port' },
  { family: 4, mode: 'eprt' },
  { family: 6, mode: 'epsv' },
  { family: 6, mode: 'eprt' },
];

/**
 * What each target of the kernel section is, in latest.json and the table. `direct-again` is
 * the direct target measured a second time in the same repetition (an A/A comparison): its
 * ratio to direct is what the measurement itself swings by on this machine, the floor under
 * which no difference between direct and the edge can be told apart.
 */
type KernelRole = 'direct' | 'direct-again' | 'edge' | 'relay' | 'mod_proxy';
const KERNEL_ROLES: readonly KernelRole[] = ['direct', 'direct-again', 'edge', 'relay', 'mod_proxy'];

/** One measured proxy's `transfer` log line, as far as the proof needs it. */
interface TransferLine {
  readonly command?: string;
  readonly path?: string;
  readonly dataPath?: string;
  readonly clientMode?: string;
  readonly upstreamMode?: string;
  readonly result?: string;
  readonly wireBytes?: unknown;
  readonly bytes?: unknown;
}

/** A section proxy with the `transfer` lines it logged since the last `take`. */
interface LoggingProxy {
  readonly server: Server;
  /** What its start log said about `dataPath: auto` (the `data-path` line), or null. */
  readonly startLine: Record<string, unknown> | null;
  /** Wait (bounded) for the transfer line of `command path`; null when none came. */
  take(command: string, path: string, timeoutMs: number): Promise<TransferLine | null>;
}

/** The transfer lines of one listener (a process may have one per family). */
function logTransfers(server: Server, listener: string): LoggingProxy {
  const lines: TransferLine[] = [];
  server.child.onLine((line) => {
    if (!line.includes('"transfer"')) return;
    try {
      const entry = JSON.parse(line) as Record<string, unknown>;
      if (entry.event === 'transfer' && entry.listener === listener) lines.push(entry as TransferLine);
    } catch {
      /* not a log line */
    }
  });
  let startLine: Record<string, unknown> | null = null;
  for (const line of server.child.output().split('\n')) {
    try {
      const entry = JSON.parse(line) as Record<string, unknown>;
      if (entry.event === 'data-path' && entry.listener === listener) startLine = entry;
    } catch {
      /* not a log line */
    }
  }
  return {
    server,
    startLine,
    async take(command, path, timeoutMs) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const i = lines.findIndex((l) => l.command === command && l.path === path);
        if (i >= 0) {
          const found = lines[i]!;
          lines.splice(0, i + 1);
          return found;
        }
        if (Date.now() >= deadline) return null;
        await new Promise((r) => setTimeout(r, 50));
      }
    },
  };
}

interface KernelTargets {
  /** Per family, the targets by role (mod_proxy over IPv4 only, when it runs). */
  readonly byFamily: Record<4 | 6, Partial<Record<KernelRole, Server>>>;
  readonly logging: Map<Server, LoggingProxy>;
  readonly startErrors: Record<string, string>;
  stop(): Promise<void>;
}

/**
 * The section's own targets: the edge setup and its relay twin per family. In the routed lab
 * (routed-lab.ts) a vsftpd per family runs in the server namespace and a mod_proxy of its own
 * on the edge, and curl runs in the client namespace; without the lab everything is on one
 * loopback (a vsftpd on ::1, and the IPv4 vsftpd and mod_proxy every plain section uses). A
 * target that does not start is left out (its cells say n/a) with the reason in startErrors.
 */
async function startKernelTargets(ctx: Context): Promise<KernelTargets> {
  const started: Server[] = [];
  const startErrors: Record<string, string> = {};
  const logging = new Map<Server, LoggingProxy>();
  const { lab } = ctx;
  const byFamily: KernelTargets['byFamily'] = lab ? { 4: {}, 6: {} } : { 4: { direct: ctx.direct, 'direct-again': ctx.direct, ...(ctx.modProxy ? { mod_proxy: ctx.modProxy } : {}) }, 6: {} };
  // Where clients, proxies and servers sit: the routed lab (clients and servers in namespaces
  // of their own, everything else on the edge between them) or one loopback.
  const place = (family: 4 | 6): { listen: string; upstream: string; clientNetns?: string } =>
    lab ? { listen: lab.client.edgeAddr[family], upstream: lab.server.addr[family], clientNetns: lab.client.ns } : { listen: family === 6 ? HOST6 : HOST, upstream: family === 6 ? HOST6 : HOST };
  const directs = lab
    ? ([
        { family: 4, name: 'direct4', port: PORTS.vsftpd, pasv: PORTS.vsftpdPasv },
        { family: 6, name: 'direct6', port: PORTS.vsftpd6, pasv: PORTS.vsftpd6Pasv },
      ] as const)
    : ([{ family: 6, name: 'direct6', port: PORTS.vsftpd6, pasv: PORTS.vsftpd6Pasv }] as const);
  for (const d of directs) {
    try {
      const server = await startBenchVsftpd({
        name: d.name,
        host: lab ? lab.server.addr[d.family] : HOST6,
        port: d.port,
        work: join(ctx.work, `vsftpd-kernel-${d.name}`),
        root: ctx.root,
        pasvMin: d.pasv[0],
        pasvMax: d.pasv[1],
        ...(lab ? { netns: lab.server.ns, clientNetns: lab.client.ns } : {}),
      });
      started.push(server);
      byFamily[d.family].direct = server;
      byFamily[d.family]['direct-again'] = server;
    } catch (err) {
      startErrors[d.name] = oneLine(err);
    }
  }
  if (lab && ctx.proftpd.ok && byFamily[4].direct) {
    try {
      const server = await startBenchProftpd({
        name: 'mod_proxy-routed',
        root: ctx.proftpd.root,
        libraryPath: ctx.proftpd.libraryPath,
        port: PORTS.proftpdRouted,
        work: join(ctx.work, 'proftpd-routed'),
        upstreamPort: PORTS.vsftpd,
        passiveMin: PORTS.proftpdRoutedPassive[0],
        passiveMax: PORTS.proftpdRoutedPassive[1],
        host: place(4).listen,
        upstreamHost: place(4).upstream,
        clientNetns: lab.client.ns,
      });
      started.push(server);
      byFamily[4].mod_proxy = server;
    } catch (err) {
      startErrors['mod_proxy-routed'] = oneLine(err);
    }
  }
  // One process per role holds both families' listeners, as an operator runs it: every
  // kernel-path process has an nftables table of its own whose forward chain sees every
  // forwarded packet, so a second edge process (or the other sections' kernel variant, stopped
  // before this section) would make each packet pay for tables that are not the edge's.
  const specs = [
    { role: 'edge', names: { 4: 'edge', 6: 'edge6' }, ports: { 4: [PORTS.edge4, PORTS.edge4Passive, PORTS.edge4Active], 6: [PORTS.edge6, PORTS.edge6Passive, PORTS.edge6Active] } },
    { role: 'relay', names: { 4: 'relay', 6: 'relay6' }, ports: { 4: [PORTS.relay4, PORTS.relay4Passive, PORTS.relay4Active], 6: [PORTS.relay6, PORTS.relay6Passive, PORTS.relay6Active] } },
  ] as const;
  const upstreamPorts = { 4: PORTS.vsftpd, 6: PORTS.vsftpd6 } as const;
  for (const spec of specs) {
    const families = ([4, 6] as const).filter((family) => byFamily[family].direct);
    if (families.length === 0) continue;
    const listeners = families.map((family) => {
      const where = place(family);
      const [port, passivePorts, activePorts] = spec.ports[family];
      return {
        family,
        name: family === 4 ? 'bench' : 'bench6',
        serverName: spec.names[family],
        host: where.listen,
        port,
        upstreamHost: where.upstream,
        upstreamPort: upstreamPorts[family],
        passivePorts,
        activePorts,
        ...(where.clientNetns ? { clientNetns: where.clientNetns } : {}),
      };
    });
    const [first, ...more] = listeners;
    const name = listeners.map((l) => l.serverName).join('+');
    try {
      const servers = await startBenchProxyListeners({
        name: first!.serverName,
        listener: first!.name,
        host: first!.host,
        upstreamHost: first!.upstreamHost,
        ...(first!.clientNetns ? { clientNetns: first!.clientNetns } : {}),
        port: first!.port,
        work: join(ctx.work, 'proxy-kernel-section'),
        upstreamPort: first!.upstreamPort,
        passivePorts: first!.passivePorts,
        moreListeners: more,
        // conf/edge.yaml's data settings; the relay twin differs in dataPath only.
        dataPath: spec.role === 'edge' ? 'auto' : 'relay',
        upstreamDataMode: 'mirror',
        activePorts: first!.activePorts,
        repoDir: ctx.repo,
        // Info: every transfer line says which path carried it (a few lines per 256 MiB).
        logLevel: 'info',
        nodeArgs: cpuProfArgs(ctx.options, ctx.repo, first!.serverName),
      });
      started.push(servers[0]!);
      servers.forEach((server, i) => {
        byFamily[listeners[i]!.family][spec.role] = server;
        logging.set(server, logTransfers(server, listeners[i]!.name));
      });
    } catch (err) {
      startErrors[name] = oneLine(err);
    }
  }
  for (const [name, why] of Object.entries(startErrors)) log(`kernel section: ${name} did not start: ${why}`);
  return {
    byFamily,
    logging,
    startErrors,
    async stop() {
      for (const s of started.reverse()) await s.child.stop();
    },
  };
}

function caseName(family: 4 | 6, mode: DataMode): string {
  return `IPv${family} ${mode.toUpperCase()}`;
}

interface KernelSlot {
  retr: number[];
  stor: number[];
  retrRatio: number[];
  storRatio: number[];
  errors: string[];
  /** Edge and relay: the data path each measured transfer was logged with (`none`: no line). */
  paths: { retr: Record<string, number>; stor: Record<string, number> };
  /** The last transfer line per direction (client and upstream modes, wire bytes). */
  sample: { retr?: TransferLine; stor?: TransferLine };
}

async function benchKernel(ctx: Context): Promise<Record<string, unknown>> {
  const { sizeMiB } = ctx.options;
  const reps = ctx.options.reps ?? 9;
  const bytes = sizeMiB * MiB;
  const targets = await startKernelTargets(ctx);
  try {
    const per: Record<string, Partial<Record<KernelRole, KernelSlot>>> = {};
    const cases = KERNEL_CASES.filter((c) => targets.byFamily[c.family].direct);
    for (const c of cases) {
      const slots: Partial<Record<KernelRole, KernelSlot>> = {};
      for (const role of KERNEL_ROLES) {
        const wanted = role === 'direct' || !ctx.options.kernelTargets || ctx.options.kernelTargets.has(role);
        if (wanted && targets.byFamily[c.family][role]) slots[role] = { retr: [], stor: [], retrRatio: [], storRatio: [], errors: [], paths: { retr: {}, stor: {} }, sample: {} };
      }
      per[caseName(c.family, c.mode)] = slots;
    }
    const verified = new Set<string>();
    for (let rep = 0; rep < reps; rep++) {
      for (const c of cases) {
        const name = caseName(c.family, c.mode);
        const slots = per[name]!;
        const roles = KERNEL_ROLES.filter((r) => slots[r]);
        const thisRep: Partial<Record<KernelRole, { retr: number; stor: number }>> = {};
        for (const role of rotate(roles, rep)) {
          const t = targets.byFamily[c.family][role]!;
          const slot = slots[role]!;
          const logging = targets.logging.get(t);
          await settle();
          const remote = `kernel-${role}-${t.name}-${c.mode}-${rep}.bin`;
          const get = await curlTransfer(t, 'get', ctx.files.big, '', bytes, c.mode);
          const getLine = logging ? await logging.take('RETR', ctx.files.big, 5000) : null;
          const put = await curlTransfer(t, 'put', remote, ctx.files.upload, bytes, c.mode);
          const putLine = logging ? await logging.take('STOR', remote, 5000) : null;
          if (logging) {
            for (const [dir, line] of [['retr', getLine], ['stor', putLine]] as const) {
              const path = line?.dataPath ?? 'none';
              slot.paths[dir][path] = (slot.paths[dir][path] ?? 0) + 1;
              if (line) slot.sample[dir] = line;
            }
          }
          const stored = join(ctx.root, remote);
          if (put.ok) {
            const size = existsSync(stored) ? statSync(stored).size : -1;
            if (size !== bytes) slot.errors.push(`STOR stored ${size} bytes, expected ${bytes}`);
            else if (!verified.has(`${name} ${role}`)) {
              verified.add(`${name} ${role}`);
              if ((await sha256File(stored)) !== ctx.files.uploadSha) slot.errors.push('STOR sha256 mismatch');
            }
          }
          rmSync(stored, { force: true });
          if (!get.ok) slot.errors.push(`RETR: ${get.error}`);
          if (!put.ok) slot.errors.push(`STOR: ${put.error}`);
          slot.retr.push(get.mibPerSec);
          slot.stor.push(put.mibPerSec);
          thisRep[role] = { retr: get.mibPerSec, stor: put.mibPerSec };
          const via = logging ? ` (dataPath ${getLine?.dataPath ?? 'not logged'} / ${putLine?.dataPath ?? 'not logged'})` : '';
          log(`kernel rep ${rep + 1}/${reps} ${name} ${role === 'direct-again' ? `${t.name} (again)` : t.name}: RETR ${fmt(get.mibPerSec)} MiB/s, STOR ${fmt(put.mibPerSec)} MiB/s${via}`);
        }
        const d = thisRep.direct!;
        for (const role of roles) {
          slots[role]!.retrRatio.push(thisRep[role]!.retr / d.retr);
          slots[role]!.storRatio.push(thisRep[role]!.stor / d.stor);
        }
      }
    }
    const edgeStart = targets.byFamily[4].edge ?? targets.byFamily[6].edge;
    const out: Record<string, unknown> = {
      sizeMiB,
      reps,
      setup: {
        edge: 'client.dataPath auto, upstream.dataMode mirror, upstream.activePorts (conf/edge.yaml)',
        relay: 'the same with client.dataPath relay',
        topology: ctx.lab
          ? `routed: clients in ${ctx.lab.client.ns} (${ctx.lab.client.addr[4]}, ${ctx.lab.client.addr[6]}), servers in ${ctx.lab.server.ns} (${ctx.lab.server.addr[4]}, ${ctx.lab.server.addr[6]}), proxies and mod_proxy on the edge between them; direct = routed through that edge`
          : 'loopback: clients, proxies and servers on one loopback (no routed lab); direct = straight to the server',
        edgeStart: edgeStart ? targets.logging.get(edgeStart)?.startLine ?? null : null,
      },
      startErrors: targets.startErrors,
      cases: {} as Record<string, unknown>,
    };
    const outCases = out.cases as Record<string, unknown>;
    for (const c of cases) {
      const name = caseName(c.family, c.mode);
      const caseOut: Record<string, unknown> = { family: c.family, mode: c.mode.toUpperCase() };
      for (const [role, s] of Object.entries(per[name]!) as Array<[KernelRole, KernelSlot]>) {
        caseOut[role] = {
          name: targets.byFamily[c.family][role]!.name,
          retrMiBps: median(s.retr),
          storMiBps: median(s.stor),
          retrRatio: median(s.retrRatio),
          storRatio: median(s.storRatio),
          ...(role === 'edge' || role === 'relay' ? { dataPaths: s.paths, lastTransferLines: s.sample } : {}),
          runs: { retr: s.retr, stor: s.stor, retrRatio: s.retrRatio, storRatio: s.storRatio },
          errors: s.errors,
        };
      }
      outCases[name] = caseOut;
    }
    return out;
  } finally {
    await targets.stop();
  }
}

/** `kernel 9/9` or `relay 9/9`, or every path seen with its count. */
function pathsText(paths: Record<string, number> | undefined): string {
  const entries = Object.entries(paths ?? {});
  const total = entries.reduce((a, [, n]) => a + n, 0);
  if (total === 0) return 'n/a';
  return entries.map(([p, n]) => `${p === 'none' ? 'not logged' : p} ${n}/${total}`).join(', ');
}

/** The kernel section's table (one row per family, client mode and direction) and its verdicts. */
function reportKernel(k: Record<string, unknown>, verdicts: Verdict[]): string[][] {
  const rows: string[][] = [
    [`edge setup (${String((k.setup as { topology?: string } | undefined)?.topology ?? '').split(':')[0] || 'loopback'}), ${k.sizeMiB} MiB, MiB/s (median of ${k.reps})`, 'op', 'direct', 'direct again (A/A)', 'edge (ratio)', 'edge data path', 'relay (ratio)', 'mod_proxy (ratio)', 'edge >= 0.95x', 'relay > mod_proxy'],
  ];
  const passText = (pass: boolean | null): string => (pass === null ? 'n/a' : pass ? 'PASS' : 'FAIL');
  const cases = (k.cases ?? {}) as Record<string, Record<string, unknown>>;
  for (const [name, c] of Object.entries(cases)) {
    const kernelCounts: string[] = [];
    let allKernel: boolean | null = null;
    for (const [op, key, rkey, dir] of [['RETR', 'retrMiBps', 'retrRatio', 'retr'], ['STOR', 'storMiBps', 'storRatio', 'stor']] as const) {
      const errorsOf = (role: string): number => ((c[role] as { errors?: string[] } | undefined)?.errors ?? []).length;
      const cell = (role: string, withFigure: boolean): string => {
        if (!c[role]) return 'n/a';
        const errors = errorsOf(role);
        return `${withFigure ? `${fmt(num(c, role, key))} ` : ''}(${ratio(num(c, role, rkey))})${errors ? `, ${errors} errors` : ''}`;
      };
      const er = num(c, 'edge', rkey);
      const edgeErrors = errorsOf('edge');
      const edgePass = Number.isFinite(er) ? er >= 0.95 && edgeErrors === 0 : null;
      const paths = (c.edge as { dataPaths?: Record<string, Record<string, number>> } | undefined)?.dataPaths?.[dir];
      const aa = num(c, 'direct-again', rkey);
      verdicts.push({ name: `edge setup ${name} ${op} >= 0.95 of direct`, variant: 'edge', pass: edgePass, detail: `${ratio(er)}${edgeErrors ? `, ${edgeErrors} transfer errors` : ''} (direct against itself: ${ratio(aa)}); data path: ${pathsText(paths)}` });
      const total = Object.values(paths ?? {}).reduce((a, n) => a + n, 0);
      if (total > 0) {
        const kernel = paths?.kernel ?? 0;
        allKernel = (allKernel ?? true) && kernel === total;
        kernelCounts.push(`${op} ${kernel}/${total}`);
      }
      const rr = num(c, 'relay', rkey);
      const mr = num(c, 'mod_proxy', rkey);
      const relayPass = c.mod_proxy && Number.isFinite(rr) && Number.isFinite(mr) ? rr > mr && errorsOf('relay') === 0 : null;
      if (c.mod_proxy) verdicts.push({ name: `relay fallback ${name} ${op} above mod_proxy`, variant: 'relay', pass: relayPass, detail: `${ratio(rr)} vs mod_proxy ${ratio(mr)}` });
      rows.push([op === 'RETR' ? name : '', op, fmt(num(c, 'direct', key)), cell('direct-again', true), cell('edge', true), pathsText(paths), cell('relay', true), cell('mod_proxy', true), passText(edgePass), c.mod_proxy ? passText(relayPass) : 'n/a']);
    }
    verdicts.push({ name: `edge setup ${name}: every measured transfer logged with dataPath=kernel`, variant: 'edge', pass: allKernel, detail: kernelCounts.length ? `kernel in ${kernelCounts.join(', ')}` : 'no transfer lines' });
  }
  return rows;
}

/**
 * The section's noise floor: the direct target against itself (A/A) per row and per single
 * repetition, beside the edge's rows. A row's edge ratio is only told apart from direct's
 * when it lies further from 1 than the A/A rows do.
 */
function againstNoiseText(r: RatioInterval | null): string {
  return r ? `edge against A/A ${ratio(r.ratio, 3)} (95% interval ${ratio(r.low, 3)}-${ratio(r.high, 3)})` : 'edge against A/A: n/a';
}

function kernelNoiseLine(k: Record<string, unknown>): string | null {
  const rowMedians: Record<'aa' | 'edge', number[]> = { aa: [], edge: [] };
  const single: number[] = [];
  const edgeSingle: number[] = [];
  const runsOf = (c: Record<string, unknown>, role: KernelRole, rkey: 'retrRatio' | 'storRatio'): number[] =>
    ((c[role] as { runs?: Record<string, number[]> } | undefined)?.runs?.[rkey] ?? []).filter((r) => Number.isFinite(r));
  for (const c of Object.values((k.cases ?? {}) as Record<string, Record<string, unknown>>)) {
    for (const rkey of ['retrRatio', 'storRatio'] as const) {
      rowMedians.aa.push(num(c, 'direct-again', rkey));
      rowMedians.edge.push(num(c, 'edge', rkey));
      single.push(...runsOf(c, 'direct-again', rkey));
      edgeSingle.push(...runsOf(c, 'edge', rkey));
    }
  }
  const span = (values: number[]): string => {
    const finite = values.filter((v) => Number.isFinite(v));
    return finite.length ? `${ratio(Math.min(...finite))}-${ratio(Math.max(...finite))}` : 'n/a';
  };
  if (!single.length) return null;
  single.sort((a, b) => a - b);
  const quartile = (q: number): number => single[Math.min(single.length - 1, Math.floor(q * single.length))]!;
  return `noise floor: direct against itself (A/A), median per row ${span(rowMedians.aa)}, single repetitions ${span(single)} (middle half ${ratio(quartile(0.25))}-${ratio(quartile(0.75))}); edge per row ${span(rowMedians.edge)}; every row's repetitions pooled: A/A ${ratio(median(single))}, edge ${ratio(median(edgeSingle))} (${edgeSingle.length} ratios); ${againstNoiseText(ratioOfGeometricMeans(edgeSingle, single))}`;
}

/**
 * One proof line per edge case: how its transfers were logged (data path, the client's and
 * the upstream leg's modes, the kernel path's wire bytes); also the edge's start line.
 */
function kernelProofLines(k: Record<string, unknown>): string[] {
  const lines: string[] = [];
  const setup = k.setup as { edgeStart?: Record<string, unknown> | null } | undefined;
  const start = setup?.edgeStart;
  lines.push(`edge start: ${start ? `dataPath auto -> ${String(start.dataPath)} (${String(start.reason ?? '')})` : 'no data-path line logged'}`);
  const noise = kernelNoiseLine(k);
  if (noise) lines.push(noise);
  for (const [name, c] of Object.entries((k.cases ?? {}) as Record<string, Record<string, unknown>>)) {
    const edge = c.edge as { name?: string; dataPaths?: Record<string, Record<string, number>>; lastTransferLines?: Record<string, TransferLine> } | undefined;
    if (!edge) continue;
    for (const dir of ['retr', 'stor'] as const) {
      const line = edge.lastTransferLines?.[dir];
      const paths = edge.dataPaths?.[dir] ?? {};
      const total = Object.values(paths).reduce((a, n) => a + n, 0);
      const kernel = paths.kernel ?? 0;
      const verdict = total === 0 ? 'NOT PROVEN (no transfer lines)' : kernel === total ? 'kernel path' : kernel === 0 ? 'NOT the kernel path' : 'partly the kernel path';
      const detail = line ? `; last line: clientMode ${String(line.clientMode)}, upstreamMode ${String(line.upstreamMode)}, result ${String(line.result)}, wireBytes ${JSON.stringify(line.wireBytes ?? null)}` : '';
      lines.push(`proof ${edge.name ?? 'edge'} ${name} ${dir.toUpperCase()}: ${verdict}: ${pathsText(paths)}${detail}`);
    }
  }
  for (const [name, why] of Object.entries((k.startErrors ?? {}) as Record<string, string>)) lines.push(`kernel section: ${name} did not start: ${why}`);
  return lines;
}

// ---- report

interface ReportNames {
  /** ftp-nat-proxy variants by process name, the headline first. */
  readonly variants: readonly string[];
  readonly modProxy: string | null;
  /** What the table calls each of them (which variant, what moves its data). */
  readonly labels: Readonly<Record<string, string>>;
}

/**
 * One block of rows per measure: the direct figure and the target once, then one row per
 * proxy variant (figure, ratio to direct, verdict) and one for mod_proxy (no verdict).
 */
function report(results: Record<string, unknown>, names: ReportNames): { text: string; verdicts: Verdict[] } {
  const rows: string[][] = [['measure', 'direct', 'through', 'figure (ratio to direct)', 'target', 'result']];
  const verdicts: Verdict[] = [];
  const m = names.modProxy;
  const label = (name: string): string => names.labels[name] ?? name;
  const passText = (pass: boolean | null): string => (pass === null ? 'n/a' : pass ? 'PASS' : 'FAIL');
  const block = (title: string, direct: string, target: string, variant: (name: string) => { cell: string; pass: boolean | null }, modCell: ((name: string) => string) | null): void => {
    if (rows.length > 1) rows.push([]);
    names.variants.forEach((name, i) => {
      const { cell, pass } = variant(name);
      rows.push([i === 0 ? title : '', i === 0 ? direct : '', label(name), cell, i === 0 ? target : '', passText(pass)]);
    });
    if (m && modCell) rows.push(['', '', label(m), modCell(m), '', '-']);
  };
  const tp = results.throughput as Record<string, unknown> | undefined;
  if (tp) {
    for (const [op, key, rkey] of [['RETR', 'retrMiBps', 'retrRatio'], ['STOR', 'storMiBps', 'storRatio']] as const) {
      const mr = m ? num(tp, m, rkey) : Number.NaN;
      block(
        `${op} ${tp.sizeMiB} MiB, MiB/s (median of ${tp.reps})`,
        fmt(num(tp, 'direct', key)),
        '>= 0.95x, > mod_proxy',
        (name) => {
          const pr = num(tp, name, rkey);
          const errors = ((tp[name] as { errors?: string[] } | undefined)?.errors ?? []).length;
          const pass = Number.isFinite(pr) ? pr >= 0.95 && (!m || !Number.isFinite(mr) || pr > mr) && errors === 0 : null;
          verdicts.push({ name: `${op} >= 0.95 of direct and above mod_proxy`, variant: name, pass, detail: `${ratio(pr)} vs mod_proxy ${ratio(mr)}${errors ? `, ${errors} transfer errors` : ''}` });
          return { cell: `${fmt(num(tp, name, key))} (${ratio(pr)})${errors ? `, ${errors} errors` : ''}`, pass };
        },
        (name) => `${fmt(num(tp, name, key))} (${ratio(mr)})`,
      );
    }
  }
  for (const c of [1, 50]) {
    const r = results[`rate_c${c}`] as Record<string, unknown> | undefined;
    if (!r) continue;
    const failedText = (name: string): string => (num(r, name, 'failed') ? `, ${num(r, name, 'failed')} failed` : '');
    block(
      `sessions/s, c=${c} (connect+login+PASV+RETR 4 KiB+QUIT)`,
      fmt(num(r, 'direct', 'sessionsPerSecond')),
      '>= 0.90x',
      (name) => {
        const pr = num(r, name, 'ratio');
        const failed = num(r, name, 'failed');
        const pass = Number.isFinite(pr) ? pr >= 0.9 && failed === 0 : null;
        verdicts.push({ name: `sessions/s at concurrency ${c} >= 0.9 of direct`, variant: name, pass, detail: `${ratio(pr)}, ${failed} failed` });
        return { cell: `${fmt(num(r, name, 'sessionsPerSecond'))} (${ratio(pr)})${failedText(name)}`, pass };
      },
      (name) => `${fmt(num(r, name, 'sessionsPerSecond'))} (${ratio(num(r, name, 'ratio'))})${failedText(name)}`,
    );
  }
  const sc = results.scale as Record<string, unknown> | undefined;
  if (sc) {
    const directMs = num(sc, 'direct', 'transferPhaseMs');
    // One run per target, so the time ratio is indicative only; the verdict is about failures.
    const cell = (name: string): string => {
      const ms = num(sc, name, 'transferPhaseMs');
      const time = Number.isFinite(ms) ? `, ${fmt(ms)} ms${name !== 'direct' && Number.isFinite(directMs) && directMs > 0 ? ` (${ratio(ms / directMs)} the time)` : ''}` : '';
      return `${num(sc, name, 'failed')} failed, ${num(sc, name, 'maxConcurrentTransfers')} at once${time}`;
    };
    block(
      `${sc.sessions} concurrent sessions (mixed RETR/STOR, sha256; ms: transfer phase)`,
      cell('direct'),
      '0 failures',
      (name) => {
        const failed = num(sc, name, 'failed');
        const pass = Number.isFinite(failed) ? failed === 0 : null;
        verdicts.push({ name: `${sc.sessions} concurrent sessions: 0 failures, every sha256 right`, variant: name, pass, detail: `${failed} failures` });
        return { cell: cell(name), pass };
      },
      cell,
    );
  }
  const idle = results.idle as Record<string, unknown> | undefined;
  if (idle) {
    // Control connections only (a fake upstream, no data): the same for every variant.
    const per = num(idle, 'perSessionKiB');
    const alive = num(idle, 'aliveAfterIdle');
    const pass = Number.isFinite(per) ? per <= 20 && alive === num(idle, 'sessions') : null;
    verdicts.push({ name: `RSS per idle session <= 20 KiB (${idle.sessions} sessions)`, variant: null, pass, detail: `${fmt(per, 1)} KiB, ${alive} alive after idling` });
    if (rows.length > 1) rows.push([]);
    rows.push([`RSS per idle session (${idle.sessions} idle, logged in)`, '-', 'proxy-idle (control only)', `${fmt(per, 1)} KiB`, '<= 20 KiB', passText(pass)]);
  }
  const noop = results.noop as Record<string, unknown> | undefined;
  if (noop) {
    const cell = (name: string): string => `${fmt(num(noop, name, 'p50Ms'), 3)} / ${fmt(num(noop, name, 'p99Ms'), 3)}`;
    const over = (name: string): string => `${cell(name)} (+${fmt(num(noop, name, 'overheadP50Ms'), 3)} / +${fmt(num(noop, name, 'overheadP99Ms'), 3)})`;
    block(
      'NOOP round trip p50 / p99, ms',
      cell('direct'),
      'p99 overhead < 0.5 ms',
      (name) => {
        const o99 = num(noop, name, 'overheadP99Ms');
        const pass = Number.isFinite(o99) ? o99 < 0.5 : null;
        verdicts.push({ name: 'NOOP p99 overhead < 0.5 ms', variant: name, pass, detail: `p50 +${fmt(num(noop, name, 'overheadP50Ms'), 3)} ms, p99 +${fmt(o99, 3)} ms` });
        return { cell: over(name), pass };
      },
      over,
    );
  }
  const tables = rows.length > 1 ? [table(rows)] : [];
  const rate1 = results.rate_c1 as Record<string, unknown> | undefined;
  const stepNames = rate1 ? Object.keys(rate1).filter((name) => Number.isFinite(num(rate1, name, 'stepsMs', SESSION_STEPS[0]))) : [];
  if (rate1 && stepNames.includes('direct')) tables.push(table(reportSteps(rate1, ['direct', ...stepNames.filter((name) => name !== 'direct')])));
  if (results.kernel) tables.push(table(reportKernel(results.kernel as Record<string, unknown>, verdicts)));
  if (results.ftps) tables.push(table(reportFtps(results.ftps as Record<string, unknown>, verdicts)));
  return { text: tables.join('\n\n'), verdicts };
}

/** Verdict lines grouped by variant (headline first), then those about no variant. */
function verdictLines(verdicts: readonly Verdict[], variants: readonly string[]): string[] {
  const order = (v: Verdict): number => (v.variant === null ? variants.length : Math.max(0, variants.indexOf(v.variant)));
  return [...verdicts]
    .map((v, i) => ({ v, i }))
    .sort((a, b) => order(a.v) - order(b.v) || a.i - b.i)
    .map(({ v }) => `${v.pass === null ? 'n/a ' : v.pass ? 'PASS' : 'FAIL'}  ${v.name}${v.variant ? ` [${v.variant}]` : ''}: ${v.detail}`);
}

/** Figures that explain the verdicts: proxy CPU per GiB and per session, idle descriptors. */
function diagnosticLines(results: Record<string, unknown>, variants: readonly string[]): string[] {
  const lines: string[] = [];
  const tp = results.throughput as Record<string, unknown> | undefined;
  for (const v of variants) {
    const parts: string[] = [];
    if (tp) parts.push(`${fmt(num(tp, v, 'proxyCpuSecondsPerGiB'), 2)} CPU s per GiB transferred`);
    for (const c of [1, 50]) {
      const r = results[`rate_c${c}`] as Record<string, unknown> | undefined;
      if (r) parts.push(`${fmt(num(r, v, 'proxyCpuMsPerSession'), 2)} CPU ms per session at c=${c}`);
    }
    const events = (results.proxyLogEvents as Record<string, Record<string, number>> | undefined)?.[v] ?? {};
    if (Object.keys(events).length) parts.push(`logged ${Object.entries(events).map(([e, n]) => `${e} x${n}`).join(', ')}`);
    if (parts.length) lines.push(`${v}: ${parts.join(', ')}`);
  }
  const noop = results.noop as Record<string, unknown> | undefined;
  if (noop?.[DIRECT_AGAIN]) {
    const over99 = ((noop[DIRECT_AGAIN] as { runs?: { over99?: number[] } }).runs?.over99 ?? []).filter((v) => Number.isFinite(v));
    const signed = (v: number): string => `${v >= 0 ? '+' : ''}${fmt(v, 3)}`;
    lines.push(
      `noise floor: NOOP direct against itself (A/A), p50 ${signed(num(noop, DIRECT_AGAIN, 'overheadP50Ms'))} ms, p99 ${signed(num(noop, DIRECT_AGAIN, 'overheadP99Ms'))} ms (median), single repetitions p99 ${over99.length ? `${signed(Math.min(...over99))} to ${signed(Math.max(...over99))}` : 'n/a'} ms`,
    );
  }
  if (results.kernel) lines.push(...kernelProofLines(results.kernel as Record<string, unknown>));
  if (results.ftps) lines.push(...ftpsDiagnosticLines(results.ftps as Record<string, unknown>));
  const idle = results.idle as Record<string, unknown> | undefined;
  if (idle) lines.push(`idle: ${idle.open} sessions open, ${idle.aliveAfterIdle} answered NOOP after idling, proxy descriptors ${idle.fdsBefore} -> ${idle.fdsAfter}, RSS ${idle.rssBeforeKiB} -> ${idle.rssAfterKiB} KiB`);
  return lines;
}

async function inner(options: Options, setup: SetupInfo): Promise<number> {
  const repo = repoDir();
  const machine = machineInfo(setup.netns);
  const results: Record<string, unknown> = {};
  const notes = [...setup.notes];
  const shm = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const work = mkdtempSync(join(shm, 'ftpnp-bench-'));
  chmodSync(work, 0o755);
  const stop = async (): Promise<void> => {
    await stopAllChildren();
    rmSync(work, { recursive: true, force: true });
  };
  process.on('SIGINT', () => void stop().then(() => process.exit(130)));
  process.on('SIGTERM', () => void stop().then(() => process.exit(143)));
  const started = Date.now();
  let modProxyReason: string | null = setup.proftpd.ok ? null : setup.proftpd.reason;
  const names = { modProxy: null as string | null, variants: [] as string[], labels: {} as Record<string, string> };
  const variants = setup.variants ?? options.variants ?? ['auto'];
  try {
    const vsftpdMissing = vsftpdUnavailable();
    const plainSections = PLAIN_VSFTPD_SECTIONS.some((s) => options.only.has(s));
    // FTPS needs the plain vsftpd too: it is the upstream of the client-leg-only TLS proxy.
    const needsVsftpd = plainSections || options.only.has('ftps');
    if (needsVsftpd && vsftpdMissing) notes.push(`vsftpd sections skipped: ${vsftpdMissing}`);
    if (needsVsftpd && !vsftpdMissing) {
      const root = join(work, 'root');
      mkdirSync(root);
      log(`writing test files (${options.sizeMiB} MiB x2) to ${work}`);
      const bigSha = writeRandomFile(join(root, 'big.bin'), options.sizeMiB * MiB);
      const uploadSha = writeRandomFile(join(work, 'upload.bin'), options.sizeMiB * MiB);
      const smallSha = writeRandomFile(join(root, 'small.bin'), 4096);
      const scale: ScaleFile[] = [];
      for (let i = 0; i < 8; i++) {
        const bytes = 1024 + Math.floor(Math.random() * 255 * 1024);
        scale.push({ name: `scale-src-${i}.bin`, sha256: writeRandomFile(join(root, `scale-src-${i}.bin`), bytes), bytes });
      }
      spawnSync('chown', ['-R', `${TEST_USER}:`, root]);
      const direct = await startBenchVsftpd({ port: PORTS.vsftpd, work: join(work, 'vsftpd'), root, pasvMin: PORTS.vsftpdPasv[0], pasvMax: PORTS.vsftpdPasv[1] });
      const proxies: Server[] = [];
      /** The kernel variant's proxies: each has an nftables table of its own. */
      const tableOwners = new Set<Server>();
      for (const [i, variant] of (plainSections ? variants : []).entries()) {
        const name = i === 0 ? 'proxy' : `proxy-${variant}`;
        const kernel = variant === 'kernel';
        // The kernel variant: client.dataPath kernel and no FTPNP_RELAY override.
        const env: NodeJS.ProcessEnv = variant === 'auto' || kernel ? {} : { FTPNP_RELAY: variant };
        const described = await describeRelay(repo, variant);
        let text = described.text;
        if (kernel) {
          const probe = await probeKernelPath(repo, join(work, 'proxy'));
          machine.kernelProbe = probe;
          text += probe.problem ? `; probe: ${probe.problem}` : '; probe: transfer logged with dataPath=kernel';
          if (probe.problem) notes.push(`kernel data path probe (one RETR through a proxy logging at info): ${probe.problem}`);
        }
        try {
          proxies.push(
            await startBenchProxy({ name, port: PORTS.proxyBase + i, work: join(work, 'proxy'), upstreamPort: PORTS.vsftpd, passivePorts: PORTS.proxyPassive(i), repoDir: repo, env, ...(kernel ? { dataPath: 'kernel' as const } : {}), nodeArgs: cpuProfArgs(options, repo, name) }),
          );
          if (kernel) tableOwners.add(proxies[proxies.length - 1]!);
        } catch (err) {
          // Without the kernel variant the rest of the run still means something.
          if (!kernel) throw err;
          notes.push(`kernel data path variant not measured, ${name} did not start: ${oneLine(err)}`);
          log(`${name}: did not start: ${oneLine(err)}`);
          continue;
        }
        machine.proxyRelay[name] = text;
        names.labels[name] = variantLabel(name, variant, described.kind, i === 0);
      }
      if (plainSections && proxies.length === 0) throw new Error(`no proxy variant started (${notes[notes.length - 1] ?? ''})`);
      names.variants = proxies.map((p) => p.name);
      // What the proxies log at warn and above, by event: a kernel-path proxy that fell back to
      // its relay for some transfers says so here (kernel-path-failed).
      const logEvents: Record<string, Record<string, number>> = {};
      results.proxyLogEvents = logEvents;
      for (const p of proxies) {
        const counts: Record<string, number> = (logEvents[p.name] = {});
        p.child.onLine((line) => {
          if (!line.includes('"event"')) return;
          try {
            const event = (JSON.parse(line) as { event?: unknown }).event;
            if (typeof event === 'string') counts[event] = (counts[event] ?? 0) + 1;
          } catch {
            /* not a log line */
          }
        });
      }
      let modProxy: Server | null = null;
      if (setup.proftpd.ok && plainSections) {
        try {
          modProxy = await startBenchProftpd({
            root: setup.proftpd.root,
            libraryPath: setup.proftpd.libraryPath,
            port: PORTS.proftpd,
            work: join(work, 'proftpd'),
            upstreamPort: PORTS.vsftpd,
            passiveMin: PORTS.proftpdPassive[0],
            passiveMax: PORTS.proftpdPassive[1],
          });
          names.modProxy = modProxy.name;
          names.labels[modProxy.name] = 'mod_proxy (ProFTPD 1.3.8)';
        } catch (err) {
          modProxyReason = err instanceof Error ? err.message : String(err);
        }
      }
      if (modProxyReason) log(`mod_proxy: unavailable (${modProxyReason})`);
      const ctx: Context = {
        options,
        repo,
        work,
        root,
        direct,
        proxies,
        modProxy,
        lab: setup.lab ?? null,
        proftpd: setup.proftpd,
        files: { big: 'big.bin', bigSha, upload: join(work, 'upload.bin'), uploadSha, small: 'small.bin', smallSha, scale },
      };
      if (options.only.has('throughput')) results.throughput = await benchThroughput(ctx);
      if (options.only.has('rate')) {
        results.rate_c1 = await benchRate(ctx, 1);
        results.rate_c50 = await benchRate(ctx, 50);
      }
      if (options.only.has('noop')) results.noop = await benchNoop(ctx);
      if (options.only.has('scale')) results.scale = await benchScale(ctx);
      if (options.only.has('kernel')) {
        // Their tables' forward chains would see the edge's packets too (startKernelTargets);
        // the sections that use them are done.
        for (const p of tableOwners) await p.child.stop();
        results.kernel = await benchKernel(ctx);
      }
      if (options.only.has('ftps')) results.ftps = await benchFtps(ctx, setup.proftpd);
      for (const p of proxies) await p.child.stop();
      if (modProxy) await modProxy.child.stop();
      await direct.child.stop();
      // A kernel-path proxy removes its own nftables table when it stops (only looked at in
      // the bench's own namespace, which is removed afterwards anyway).
      for (const [name, counts] of Object.entries(logEvents)) {
        if (counts['kernel-path-failed']) notes.push(`${name}: ${counts['kernel-path-failed']} data channels fell back to the relay (kernel-path-failed logged)`);
      }
      if (setup.netns && variants.includes('kernel')) {
        const left = nftTables()?.filter((t) => /\bftpnp_/.test(t)) ?? [];
        if (left.length > 0) notes.push(`nftables tables left behind after the proxies stopped: ${left.join(', ')}`);
      }
    }
    if (options.only.has('idle')) results.idle = await benchIdle(options, repo, join(work, 'idle'));
    if (options.only.has('ftps')) {
      const ftps = (results.ftps ??= { error: `needs vsftpd: ${vsftpdMissing ?? 'not started'}` }) as Record<string, unknown>;
      ftps.idle = await benchFtpsIdle(options, repo, join(work, 'idle-ftps'));
    }
  } finally {
    await stop();
  }
  machine.loadavgEnd = loadavg().map((v) => Number(v.toFixed(2)));
  const { text, verdicts } = report(results, names);
  const ftpsRan = results.ftps !== undefined;
  const header = [
    `ftp-nat-proxy benchmark, ${new Date().toISOString()}, ${((Date.now() - started) / 1000).toFixed(0)} s`,
    `machine: nproc ${machine.nproc} (${machine.cpuModel}), memory ${machine.memTotal}, node ${machine.node}, kernel ${machine.kernel}, load ${machine.loadavgStart.join(' ')}`,
    `network: ${setup.netns ? `private namespace ${setup.netns} (loopback, tcp_syncookies=0, ip_forward=1)` : 'host loopback'}; proxy variants: ${Object.entries(machine.proxyRelay).map(([k, v]) => `${k}=${v}`).join(', ') || 'n/a'}`,
    `mod_proxy: ${modProxyReason ? `unavailable (${modProxyReason})` : 'ProFTPD 1.3.8 + mod_proxy (reverse), unpacked privately'}`,
    ...(ftpsRan
      ? [
          `ftps: explicit (AUTH TLS, PBSZ 0, PROT P, data TLS resuming the control session) from the load worker; vsftpd ssl_enable with force_local_logins_ssl, force_local_data_ssl, require_ssl_reuse; RSA 2048 certificate from a CA made for this run; proxies with their default data path; mod_proxy: ${(results.ftps as { startErrors?: Record<string, string> }).startErrors?.[FTPS_NAMES.modProxy] ? 'unavailable' : 'mod_tls in front, ProxyTLSEngine on toward the FTPS vsftpd'}`,
        ]
      : []),
    `quiet check: ${quietness.samples - quietness.notQuiet}/${quietness.samples} measurements started with the machine idle (other work up to ${quietness.maxBusyCores} cores)`,
    ...notes.map((n) => `note: ${n}`),
  ].join('\n');
  const verdictOrder = [...names.variants, ...(results.kernel ? ['edge', 'relay'] : []), ...(ftpsRan ? FTPS_PROXY_VARIANTS.map((v) => v.name) : [])];
  const summary = verdictLines(verdicts, verdictOrder).join('\n');
  const diagnostics = diagnosticLines(results, names.variants);
  process.stdout.write(`\n${header}\n\n${text}\n\n${summary}\n${diagnostics.length ? `\n${diagnostics.join('\n')}\n` : ''}`);
  const outDir = join(repo, 'bench-results');
  mkdirSync(outDir, { recursive: true });
  const json = JSON.stringify({ machine, quietness, options: { ...options, only: [...options.only], variants }, variantLabels: ftpsRan ? { ...names.labels, ...FTPS_LABELS } : names.labels, modProxy: modProxyReason ? { available: false, reason: modProxyReason } : { available: true }, notes, results, verdicts }, null, 2);
  writeFileSync(join(outDir, 'latest.json'), `${json}\n`);
  writeFileSync(join(outDir, `bench-${new Date().toISOString().replace(/[:.]/g, '-')}.json`), `${json}\n`);
  process.stdout.write(`\nwritten: ${join(outDir, 'latest.json')}\n`);
  return 0;
}

// ------------------------------------------------------------------------------- main

const argv = process.argv.slice(2);
const options = parseOptions(argv);
const main = options.inside
  ? inner(options, JSON.parse(process.env.FTPNP_BENCH_SETUP ?? '{"notes":[],"proftpd":{"ok":false,"reason":"no setup"},"netns":null}') as SetupInfo)
  : outer(options, argv.filter((a) => a !== '--inside'));
main.then(
  (code) => process.exit(code),
  async (err: unknown) => {
    process.stderr.write(`bench: failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
    await stopAllChildren();
    process.exit(1);
  },
);
