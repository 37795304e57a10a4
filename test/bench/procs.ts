/**
 * Child processes of the benchmark: every one is registered when started and stopped by its
 * own PID (or, for forking servers started as their own process group, by that group), never
 * by name. Output is kept bounded for error messages.
 */
import { spawn, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { createInterface } from 'node:readline';

const OUTPUT_KEEP_CHARS = 16_384;
const STOP_GRACE_MS = 3000;
/** Clock ticks per second for /proc/<pid>/stat times (proc(5)); 100 on Linux unless told otherwise. */
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout?.trim()) || 100;

export interface Child {
  readonly name: string;
  readonly pid: number;
  readonly process: ChildProcess;
  /** Exit code (or null when killed by a signal) once the process is gone. */
  readonly exited: Promise<number | null>;
  /** Last few KiB of stdout+stderr. */
  output(): string;
  /** Calls `fn` for each stdout line (e.g. READY/RESULT lines of the load worker). */
  onLine(fn: (line: string) => void): void;
  /** SIGTERM, then SIGKILL after a grace period. Idempotent. */
  stop(): Promise<void>;
}

export interface StartOptions {
  /** Start as its own process group and signal the whole group (vsftpd and proftpd fork per session). */
  readonly group?: boolean;
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
  /** Pipe stdin so the caller can write to it. */
  readonly stdin?: boolean;
}

const running = new Set<Child>();

export function startChild(name: string, command: string, args: readonly string[], options: StartOptions = {}): Child {
  const spawnOptions: SpawnOptions = {
    stdio: [options.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    detached: options.group ?? false,
    env: options.env ?? process.env,
    ...(options.cwd ? { cwd: options.cwd } : {}),
  };
  const proc = spawn(command, [...args], spawnOptions);
  let output = '';
  const keep = (d: Buffer): void => {
    output = (output + d.toString('utf8')).slice(-OUTPUT_KEEP_CHARS);
  };
  proc.stderr?.on('data', keep);
  const lineListeners: Array<(line: string) => void> = [];
  if (proc.stdout) {
    proc.stdout.on('data', keep);
    createInterface({ input: proc.stdout }).on('line', (line) => {
      for (const fn of lineListeners) fn(line);
    });
  }
  const exited = new Promise<number | null>((resolve) => {
    proc.once('exit', (code) => resolve(code));
    proc.once('error', (err) => {
      output += `\nspawn error: ${err.message}`;
      resolve(-1);
    });
  });
  const pid = proc.pid ?? -1;
  const group = options.group ?? false;
  let stopping: Promise<void> | null = null;
  const child: Child = {
    name,
    pid,
    process: proc,
    exited,
    output: () => output,
    onLine: (fn) => lineListeners.push(fn),
    stop() {
      stopping ??= (async () => {
        if (pid > 0 && proc.exitCode === null && proc.signalCode === null) {
          signal(pid, group, 'SIGTERM');
          const timer = setTimeout(() => signal(pid, group, 'SIGKILL'), STOP_GRACE_MS);
          await exited;
          clearTimeout(timer);
        }
        // A forking server's session processes may outlive the leader by a moment.
        if (group && pid > 0) signal(pid, true, 'SIGKILL');
        running.delete(child);
      })();
      return stopping;
    },
  };
  running.add(child);
  void exited.then(() => {
    if (!group) running.delete(child);
  });
  return child;
}

function signal(pid: number, group: boolean, sig: NodeJS.Signals): void {
  try {
    process.kill(group ? -pid : pid, sig);
  } catch {
    /* already gone */
  }
}

/** Stop every child still registered (end of run, error, SIGINT). */
export async function stopAllChildren(): Promise<void> {
  await Promise.all([...running].map((child) => child.stop()));
}

/** Resolve with the first stdout line for which `match` returns a value; reject on exit or timeout. */
export function waitForLine<T>(child: Child, match: (line: string) => T | null, timeoutMs: number): Promise<T> {
  return new Promise((resolve, reject) => {
    let done = false;
    const timer = setTimeout(() => finish(new Error(`${child.name}: no expected output within ${timeoutMs} ms; output: ${child.output().slice(-600)}`)), timeoutMs);
    function finish(err: Error | null, value?: T): void {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve(value as T);
    }
    child.onLine((line) => {
      const value = match(line);
      if (value !== null) finish(null, value);
    });
    void child.exited.then((code) => finish(new Error(`${child.name} exited (${code}) early; output: ${child.output().slice(-600)}`)));
  });
}

/** VmRSS of a process in KiB (0 when unreadable). */
export async function readRssKiB(pid: number): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  try {
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** utime + stime of a process in seconds (0 when unreadable). */
export async function readCpuSeconds(pid: number): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Fields after the command: state is index 0, utime index 11, stime index 12 (proc(5)).
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
  } catch {
    return 0;
  }
}

export async function countFds(pid: number): Promise<number> {
  const { readdir } = await import('node:fs/promises');
  try {
    return (await readdir(`/proc/${pid}/fd`)).length;
  } catch {
    return 0;
  }
}

/** Cores busy machine-wide over `ms`, from /proc/stat (everything, not only our processes). */
export async function busyCores(ms: number): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  const read = async (): Promise<{ busy: number; total: number; cpus: number }> => {
    const text = await readFile('/proc/stat', 'utf8');
    const fields = text.split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    const idle = (fields[3] ?? 0) + (fields[4] ?? 0);
    const total = fields.reduce((a, b) => a + b, 0);
    const cpus = text.split('\n').filter((l) => /^cpu\d/.test(l)).length;
    return { busy: total - idle, total, cpus };
  };
  const a = await read();
  await new Promise((resolve) => setTimeout(resolve, ms));
  const b = await read();
  const total = b.total - a.total;
  return total > 0 ? ((b.busy - a.busy) / total) * b.cpus : 0;
}

/**
 * Wait (bounded) until the machine is nearly idle before a measurement, so work of other
 * processes on a shared 2-core box spoils fewer samples. Returns the last busy figure.
 */
export async function waitQuiet(maxWaitMs: number, thresholdCores = 0.3): Promise<{ quiet: boolean; busyCores: number; waitedMs: number }> {
  const started = Date.now();
  let busy = 0;
  for (;;) {
    busy = await busyCores(250);
    if (busy <= thresholdCores) return { quiet: true, busyCores: busy, waitedMs: Date.now() - started };
    if (Date.now() - started >= maxWaitMs) return { quiet: false, busyCores: busy, waitedMs: Date.now() - started };
  }
}
