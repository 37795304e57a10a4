/**
 * A lab of Linux network namespaces for end-to-end tests: namespaces, bridges, veth pairs,
 * forwarding and iptables inside them, daemons started in them, and one cleanup that removes
 * every trace even when a test fails.
 *
 * Safety rules this module keeps (the machine has no network but loopback):
 * - nothing is created in the root namespace: veth pairs are created *inside* a lab namespace
 *   with their peer placed directly in another lab namespace (`ip -n A link add ... peer name
 *   ... netns B`), so no interface, address or route ever appears in the root namespace;
 * - forwarding and iptables are only ever set inside lab namespaces;
 * - every process runs via `ip netns exec`, clients bounded by `timeout`; daemons are stopped by
 *   their PID (process group), and at cleanup whatever still runs inside a lab namespace is
 *   killed by PID; namespaces are deleted by the lab's unique name prefix only.
 * Facts behind the setup: ../shared/test-environment.md.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmdirSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { createRequire } from 'node:module';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, type RunResult } from './run.js';

/** Linux limits interface names to 15 bytes; the prefix leaves room for a short suffix. */
const IFNAMSIZ = 15;
const STOP_GRACE_MS = 3000;
/** `ip netns exec NS` bind-mounts every file in /etc/netns/NS over the one of that name in /etc. */
const NETNS_ETC = '/etc/netns';
const MAX_DAEMON_OUTPUT_BYTES = 8 * 1024 * 1024;

/** Unique per test process: `fnp<pid % 10000>-`. */
export function labPrefix(pid: number = process.pid): string {
  return `fnp${pid % 10000}-`;
}

/** Null when every command is on PATH, else the first missing one and the Debian package that has it. */
export function commandsMissing(commands: ReadonlyArray<string | readonly [command: string, pkg: string]>): string | null {
  for (const entry of commands) {
    const [command, pkg] = typeof entry === 'string' ? [entry, entry] : entry;
    if (!findCommand(command)) return `${command} is not installed (apt-get install ${pkg})`;
  }
  return null;
}

/** Absolute path of a command on PATH (plus the sbin folders root normally has), or null. */
export function findCommand(command: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/local/sbin', '/usr/sbin', '/sbin'];
  for (const dir of dirs) {
    if (dir && existsSync(join(dir, command))) return join(dir, command);
  }
  return null;
}

/** The system python3: pyenv shims depend on $HOME, which the tests point elsewhere. */
export function pythonPath(): string {
  return existsSync('/usr/bin/python3') ? '/usr/bin/python3' : (findCommand('python3') ?? 'python3');
}

/** One line saying why namespace tests cannot run here, or null. */
/** The addon of this checkout: found upwards, since the bench runs this file compiled under bench-results/.build/. */
const NATIVE_ADDON = ((): string => {
  const relative = join('src', 'native', 'build', 'Release', 'splice_relay.node');
  for (let dir = dirname(fileURLToPath(import.meta.url)), i = 0; i < 8; dir = dirname(dir), i++) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'src', 'native'))) return join(dir, relative);
  }
  return join(dirname(fileURLToPath(import.meta.url)), '..', '..', relative);
})();
const LIBNFTABLES = 'libnftables.so.1';

/** Why nft(8) or libnftables.so.1 (Debian package nftables) is missing, or null. */
export function libnftablesMissing(): string | null {
  if (!findCommand('nft')) return 'nft is not installed (apt-get install nftables)';
  const ldconfig = findCommand('ldconfig');
  const cache = ldconfig ? (spawnSync(ldconfig, ['-p'], { encoding: 'utf8' }).stdout ?? '') : '';
  const libDirs = ['/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64', '/usr/lib', '/lib'];
  if (!cache.includes(LIBNFTABLES) && !libDirs.some((dir) => existsSync(join(dir, LIBNFTABLES)))) {
    return `${LIBNFTABLES} is missing (apt-get install nftables)`;
  }
  return null;
}

/**
 * One line saying why the kernel data path (client.dataPath: kernel) cannot run here, or
 * null. It needs nft(8) (tests read the proxy's table with it), libnftables.so.1 (the proxy
 * dlopen()s it) and the native addon with its nftables entry points.
 */
export function nftablesUnavailable(): string | null {
  const missing = libnftablesMissing();
  if (missing) return missing;
  if (!existsSync(NATIVE_ADDON)) return `the native addon is not built (${NATIVE_ADDON}; npm install builds it)`;
  try {
    const addon = createRequire(import.meta.url)(NATIVE_ADDON) as { nftOpen?: unknown };
    if (typeof addon.nftOpen !== 'function') return 'the native addon predates the kernel data path (rebuild: npm install)';
  } catch (err) {
    return `the native addon does not load: ${(err as Error).message.split('\n')[0]}`;
  }
  return null;
}

export function netnsUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (network namespaces, iptables, vsftpd); CI runs as root';
  for (const tool of ['ip', 'iptables']) {
    if (!findCommand(tool)) return `${tool} is not installed (apt-get install iproute2 iptables)`;
  }
  if (spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).status !== 0) return '`ip netns` does not work on this machine';
  return null;
}

export interface NsRunOptions {
  /** Hard limit; the command is killed (inside the namespace, by `timeout -s KILL`) after it. */
  readonly timeoutMs?: number;
  readonly input?: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
}

/** Run a command inside a namespace, always bounded by a timeout. */
export function nsRun(ns: string, command: string, args: readonly string[], options: NsRunOptions = {}): Promise<RunResult> {
  const timeoutMs = options.timeoutMs ?? 30000;
  const seconds = Math.max(1, Math.ceil(timeoutMs / 1000));
  return run('ip', ['netns', 'exec', ns, 'timeout', '-s', 'KILL', String(seconds), command, ...args], {
    timeoutMs: timeoutMs + 3000,
    ...(options.input !== undefined ? { input: options.input } : {}),
    ...(options.env ? { env: options.env } : {}),
    ...(options.cwd ? { cwd: options.cwd } : {}),
  });
}

const GREETING_PROBE = [
  'import socket, sys',
  's = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)',
  's.settimeout(2)',
  'data = b""',
  'while b"\\n" not in data:',
  '    chunk = s.recv(512)',
  '    if not chunk: break',
  '    data += chunk',
  'sys.exit(0 if data.startswith(b"220") else 1)',
].join('\n');

/** Poll from inside `ns` until host:port sends a 220 greeting. */
export async function waitForFtpGreeting(ns: string, host: string, port: number, timeoutMs: number, failed: () => string | null = () => null): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    const reason = failed();
    if (reason) throw new Error(reason);
    const probe = await nsRun(ns, pythonPath(), ['-c', GREETING_PROBE, host, String(port)], { timeoutMs: 4000 });
    if (probe.code === 0) return;
    last = probe.stderr.trim().split('\n').pop() ?? '';
    if (Date.now() > deadline) throw new Error(`no FTP greeting on ${host}:${port} (from ${ns}) within ${timeoutMs} ms: ${last}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** A file of random bytes; returns its sha256. */
export function makeRandomFile(path: string, bytes: number): string {
  const data = randomBytes(bytes);
  writeFileSync(path, data);
  return createHash('sha256').update(data).digest('hex');
}

/** A process the lab started (or adopted) and must stop before its namespace goes. */
export interface LabProcess {
  readonly name: string;
  readonly pid: number;
  stop(): Promise<void>;
  /** What stop() would also remove (files), for cleanupSync when stop() cannot run. */
  removeSync?(): void;
}

export interface Daemon extends LabProcess {
  readonly ns: string;
  /** stdout + stderr so far (capped). */
  output(): string;
  /** Settles when the process has exited. */
  readonly exited: Promise<void>;
  exitCode(): number | null;
}

export interface VethLink {
  /** Namespace holding the bridge (or the other end). */
  readonly fromNs: string;
  /** Bridge in fromNs to enslave the veth end to; null for a plain point-to-point link. */
  readonly bridge: string | null;
  /** Suffix of the veth end in fromNs (the lab prefix is added). */
  readonly fromName: string;
  readonly toNs: string;
  /** Interface name inside toNs. */
  readonly toName: string;
  /** Address with prefix length for the toNs end, e.g. 198.51.100.7/24. */
  readonly cidr: string;
  readonly gateway?: string;
}

export interface Leftovers {
  readonly namespaces: string[];
  readonly links: string[];
  readonly processes: string[];
  /** /etc/netns/<ns> folders of lab namespaces. */
  readonly etcFolders: string[];
}

export class NetnsLab {
  readonly prefix: string;
  /** Scratch directory for configs and client files; removed by cleanup(). */
  readonly dir: string;
  private readonly processes = new Set<LabProcess>();
  private readonly everStarted: Array<{ name: string; pid: number }> = [];
  private cleanup_: Promise<void> | null = null;
  /** PIDs found inside lab namespaces at cleanup, to check they are gone. */
  private readonly killed: number[] = [];
  /** Whether this lab created /etc/netns itself (then it removes it again once empty). */
  private createdEtcRoot = false;

  constructor(prefix: string = labPrefix()) {
    if (prefix.length > 9) throw new Error(`lab prefix "${prefix}" is too long for interface names`);
    this.prefix = prefix;
    const clash = this.listNamespaces();
    if (clash.length > 0) {
      // Never delete what another run might own; a leftover from a crashed run needs a human.
      throw new Error(`namespaces with prefix ${prefix} already exist (${clash.join(', ')}); remove them with "ip netns del"`);
    }
    this.dir = mkdtempSync(join(tmpdir(), `${prefix}lab-`));
    chmodSync(this.dir, 0o755);
  }

  name(short: string): string {
    return `${this.prefix}${short}`;
  }

  /** Create namespaces (by suffix) with their loopback up; returns the full names. */
  addNamespaces(...shorts: string[]): string[] {
    return shorts.map((short) => {
      const ns = this.name(short);
      this.sh('ip', ['netns', 'add', ns]);
      this.ip(ns, 'link', 'set', 'lo', 'up');
      return ns;
    });
  }

  /** `ip -n <ns> ...` */
  ip(ns: string, ...args: string[]): string {
    this.assertOwned(ns);
    return this.sh('ip', ['-n', ns, ...args]);
  }

  /** A command inside a lab namespace (setup only: iptables, sysctl). */
  exec(ns: string, command: string, ...args: string[]): string {
    this.assertOwned(ns);
    return this.sh('ip', ['netns', 'exec', ns, 'timeout', '-s', 'KILL', '20', command, ...args]);
  }

  addBridge(ns: string, bridge: string, cidrs: readonly string[]): void {
    this.ip(ns, 'link', 'add', bridge, 'type', 'bridge');
    for (const cidr of cidrs) this.ip(ns, 'addr', 'add', cidr, 'dev', bridge);
    this.ip(ns, 'link', 'set', bridge, 'up');
  }

  /** A veth pair between two lab namespaces; never touches the root namespace. */
  link(spec: VethLink): void {
    const fromName = this.name(spec.fromName);
    if (fromName.length > IFNAMSIZ || spec.toName.length > IFNAMSIZ) throw new Error(`interface name too long: ${fromName} / ${spec.toName}`);
    this.assertOwned(spec.toNs);
    this.ip(spec.fromNs, 'link', 'add', fromName, 'type', 'veth', 'peer', 'name', spec.toName, 'netns', spec.toNs);
    if (spec.bridge) this.ip(spec.fromNs, 'link', 'set', fromName, 'master', spec.bridge);
    this.ip(spec.fromNs, 'link', 'set', fromName, 'up');
    this.ip(spec.toNs, 'addr', 'add', spec.cidr, 'dev', spec.toName);
    this.ip(spec.toNs, 'link', 'set', spec.toName, 'up');
    if (spec.gateway) this.ip(spec.toNs, 'route', 'add', 'default', 'via', spec.gateway);
  }

  /**
   * Files `ip netns exec` shows in place of /etc/<name> inside `ns` (e.g. `hosts`,
   * `resolv.conf`): /etc/netns/<ns>/<name>. Every command the lab runs in a namespace goes
   * through `ip netns exec`, so they all see them (nsenter(1) would not). Removed by cleanup.
   */
  setEtcFiles(ns: string, files: Readonly<Record<string, string>>): void {
    this.assertOwned(ns);
    if (!existsSync(NETNS_ETC)) {
      mkdirSync(NETNS_ETC, { mode: 0o755 });
      this.createdEtcRoot = true;
    }
    const dir = join(NETNS_ETC, ns);
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    for (const [name, text] of Object.entries(files)) {
      if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new Error(`not a file name for /etc: ${name}`);
      writeFileSync(join(dir, name), text, { mode: 0o644 });
    }
  }

  /** Make a lab namespace a router. Only ever inside the lab: never the host's sysctl. */
  enableForwarding(ns: string): void {
    this.sysctl(ns, 'net.ipv4.ip_forward=1');
  }

  /** A namespaced sysctl (`key=value`) inside a lab namespace. */
  sysctl(ns: string, setting: string): void {
    this.exec(ns, 'sysctl', '-q', '-w', setting);
  }

  iptables(ns: string, ...args: string[]): void {
    this.exec(ns, 'iptables', '-w', '5', ...args);
  }

  /** Start a long-running process inside a namespace, as its own process group. */
  spawnDaemon(ns: string, name: string, command: string, args: readonly string[], env: NodeJS.ProcessEnv = process.env): Daemon {
    this.assertOwned(ns);
    const child: ChildProcess = spawn('ip', ['netns', 'exec', ns, command, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
      env,
    });
    let output = '';
    const collect = (chunk: Buffer): void => {
      if (output.length < MAX_DAEMON_OUTPUT_BYTES) output += chunk.toString('utf8');
    };
    child.stdout?.on('data', collect);
    child.stderr?.on('data', collect);
    const exited = new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) resolve();
      else child.once('exit', () => resolve());
    });
    child.once('error', (err) => {
      output += `spawn error: ${err.message}\n`;
    });
    const pid = child.pid;
    if (pid === undefined) throw new Error(`could not start ${name} in ${ns}`);
    const daemon: Daemon = {
      name,
      ns,
      pid,
      exited,
      output: () => output,
      exitCode: () => child.exitCode,
      stop: async () => {
        if (child.exitCode === null && child.signalCode === null) {
          signalGroup(pid, 'SIGTERM');
          const timer = setTimeout(() => signalGroup(pid, 'SIGKILL'), STOP_GRACE_MS);
          await exited;
          clearTimeout(timer);
        }
        // Children left in the group (none expected) go too.
        if (groupMembers(pid).length > 0) signalGroup(pid, 'SIGKILL');
        this.processes.delete(daemon);
      },
    };
    this.track(daemon);
    return daemon;
  }

  /** Stop this process (by its own stop()) at cleanup, and check it is gone afterwards. */
  adopt(member: LabProcess): void {
    this.track(member);
  }

  private track(member: LabProcess): void {
    this.processes.add(member);
    this.everStarted.push({ name: member.name, pid: member.pid });
  }

  /**
   * Stop every process, then delete every namespace with the prefix. Idempotent.
   * Daemons get a graceful stop first (the proxy drains on SIGTERM). Then every process still
   * inside a lab namespace goes, by PID: clients still running, vsftpd session processes (they
   * call setsid(), so stopping vsftpd's process group misses them). Only the lab puts processes
   * into its namespaces, so each of those is one this suite started.
   */
  cleanup(): Promise<void> {
    this.cleanup_ ??= (async () => {
      const stopping = [...this.processes].map(async (member) => {
        try {
          await member.stop();
        } catch {
          signalGroup(member.pid, 'SIGKILL');
        }
      });
      await Promise.all(stopping);
      this.processes.clear();
      const pids = this.namespacePids();
      this.killed.push(...pids);
      for (const pid of pids) signalPid(pid, 'SIGTERM');
      const deadline = Date.now() + STOP_GRACE_MS;
      while (pids.some(isAlive) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
      for (const pid of pids.filter(isAlive)) signalPid(pid, 'SIGKILL');
      this.deleteNamespaces();
      this.removeEtcFolders();
      rmSync(this.dir, { recursive: true, force: true });
    })();
    return this.cleanup_;
  }

  /** Last resort from a process 'exit' or signal handler: no awaiting possible. */
  cleanupSync(): void {
    // Only processes not yet seen to stop: a PID that has exited may belong to someone else now.
    for (const member of this.processes) {
      if (groupMembers(member.pid).length > 0) signalGroup(member.pid, 'SIGKILL');
      member.removeSync?.();
    }
    this.processes.clear();
    for (const pid of this.namespacePids()) signalPid(pid, 'SIGKILL');
    this.deleteNamespaces();
    this.removeEtcFolders();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** What would be left behind: namespaces, root-namespace links with the prefix, live processes. */
  leftovers(): Leftovers {
    const links = spawnSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' })
      .stdout.split('\n')
      .map((line) => /^\d+:\s+([^:@\s]+)/.exec(line)?.[1] ?? '')
      .filter((name) => name.startsWith(this.prefix));
    const processes = [
      ...this.everStarted
        .filter(({ pid }) => groupMembers(pid).length > 0)
        .map(({ name, pid }) => `${name} (pgid ${pid}: ${groupMembers(pid).join(', ')})`),
      ...this.killed.filter(isAlive).map((pid) => `pid ${pid} (was inside a lab namespace)`),
      ...this.namespacePids().map((pid) => `pid ${pid} (inside a lab namespace)`),
    ];
    return { namespaces: this.listNamespaces(), links, processes, etcFolders: this.listEtcFolders() };
  }

  /** /etc/netns/<ns> folders named with the lab prefix. */
  private listEtcFolders(): string[] {
    if (!existsSync(NETNS_ETC)) return [];
    return readdirSync(NETNS_ETC)
      .filter((name) => name.startsWith(this.prefix))
      .map((name) => join(NETNS_ETC, name));
  }

  /** Our /etc/netns/<ns> folders; /etc/netns too when this lab made it and it is empty now. */
  private removeEtcFolders(): void {
    for (const dir of this.listEtcFolders()) rmSync(dir, { recursive: true, force: true });
    if (this.createdEtcRoot) {
      try {
        rmdirSync(NETNS_ETC); // fails (and stays) when someone else put a folder there meanwhile
      } catch {
        /* not empty or gone */
      }
    }
  }

  /** PIDs of every process inside any lab namespace (`ip netns pids`). */
  private namespacePids(): number[] {
    const pids = new Set<number>();
    for (const ns of this.listNamespaces()) {
      const out = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' }).stdout ?? '';
      for (const word of out.split(/\s+/)) if (/^\d+$/.test(word) && Number(word) !== process.pid) pids.add(Number(word));
    }
    return [...pids];
  }

  private listNamespaces(): string[] {
    const out = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout ?? '';
    return out
      .split('\n')
      .map((line) => line.trim().split(/\s+/)[0] ?? '')
      .filter((name) => name.startsWith(this.prefix));
  }

  private deleteNamespaces(): void {
    for (const ns of this.listNamespaces()) spawnSync('ip', ['netns', 'del', ns]);
  }

  private assertOwned(ns: string): void {
    if (!ns.startsWith(this.prefix)) throw new Error(`refusing to touch namespace "${ns}": not part of lab ${this.prefix}`);
  }

  private sh(command: string, args: readonly string[]): string {
    const result = spawnSync(command, args, { encoding: 'utf8', timeout: 30000 });
    if (result.status !== 0) {
      throw new Error(`${command} ${args.join(' ')} failed (${result.status ?? result.signal}): ${(result.stderr || result.error?.message || '').trim()}`);
    }
    return result.stdout;
  }
}

function signalPid(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    /* gone */
  }
}

/** Running (not a zombie). */
function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

function signalGroup(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch {
    /* the group is gone */
  }
}

/** Live (non-zombie) processes whose process group is pgid, as "pid:comm". */
export function groupMembers(pgid: number): string[] {
  const members: string[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue; // exited while we looked
    }
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    const close = stat.lastIndexOf(')');
    const comm = stat.slice(stat.indexOf('(') + 1, close);
    const fields = stat.slice(close + 2).split(' ');
    if (fields[0] !== 'Z' && Number(fields[2]) === pgid) members.push(`${entry}:${comm}`);
  }
  return members;
}
