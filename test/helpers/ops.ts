/**
 * Helpers for the operations tests (test/operations/): the text of a whole configuration file
 * (admin listener, shutdown and per-listener sections included) for startTestProxy
 * (helpers/proxy.ts) or the CLI; raw TCP probes that record every byte and how the connection
 * ended; the built CLI run as a child process with its JSON log lines. Every wait is bounded;
 * everything started here is torn down through `t.teardown`.
 */
import net from 'node:net';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { delay, withTimeout } from './async.js';
import type { LogRecord } from './proxy.js';
import type { TeardownHost } from './tap.js';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const CLI = join(ROOT, 'dist', 'cli.js');

// ------------------------------------------------------------------ configuration text

export interface OpsListenerOptions {
  readonly name?: string;
  readonly listen?: string;
  readonly upstreamHost?: string;
  readonly upstreamPort: number;
  readonly passivePorts: string;
  readonly advertise?: string;
  readonly bindAllPassivePorts?: boolean;
  /** Extra lines under the listener, indented by 4 spaces (acl:, limits:, timeouts:, proxyProtocol:). */
  readonly lines?: readonly string[];
}

export interface OpsConfigOptions extends OpsListenerOptions {
  readonly level?: string;
  /** `admin.listen`; null = no admin listener. Default "127.0.0.1:0". */
  readonly admin?: string | null;
  readonly drainSeconds?: number;
}

/** A whole configuration file with one listener. */
export function opsYaml(options: OpsConfigOptions): string {
  return [
    `log: { level: ${options.level ?? 'debug'} }`,
    ...(options.admin === null ? [] : [`admin: { listen: "${options.admin ?? '127.0.0.1:0'}" }`]),
    ...(options.drainSeconds === undefined ? [] : [`shutdown: { drainSeconds: ${options.drainSeconds} }`]),
    'listeners:',
    `  - name: ${options.name ?? 'ops'}`,
    `    listen: "${options.listen ?? '127.0.0.1:0'}"`,
    '    upstream:',
    `      host: ${options.upstreamHost ?? '127.0.0.1'}`,
    `      port: ${options.upstreamPort}`,
    '    client:',
    `      advertise: ${options.advertise ?? 'auto'}`,
    `      passivePorts: "${options.passivePorts}"`,
    ...(options.bindAllPassivePorts ? ['      bindAllPassivePorts: true'] : []),
    ...(options.lines ?? []),
    '',
  ].join('\n');
}

// ------------------------------------------------------------------ raw TCP probes

export interface Probe {
  readonly socket: net.Socket;
  /** Every byte received. */
  readonly data: () => Buffer;
  /** Resolves once the socket closed: how it ended and when (ms since connect). */
  readonly ended: Promise<ProbeEnd>;
  readonly connectedAt: number;
  write(bytes: Buffer | string): void;
}

export interface ProbeEnd {
  /** 'end' = FIN, 'error' = reset or other error (see `code`), 'close' = closed locally. */
  readonly how: 'end' | 'error' | 'close';
  readonly code: string | null;
  readonly afterMs: number;
  readonly bytes: number;
}

export interface ProbeOptions {
  readonly localAddress?: string;
  readonly timeoutMs?: number;
}

/**
 * Connect to host:port and record everything; rejects when the connection is refused or does
 * not complete in time. The socket is destroyed at teardown.
 */
export async function probe(t: TeardownHost, host: string, port: number, options: ProbeOptions = {}): Promise<Probe> {
  const socket = net.connect({ host, port, allowHalfOpen: false, ...(options.localAddress ? { localAddress: options.localAddress } : {}) });
  t.teardown(() => socket.destroy());
  await withTimeout(
    new Promise<void>((resolve, reject) => {
      socket.once('connect', () => {
        socket.removeListener('error', reject);
        resolve();
      });
      socket.once('error', reject);
    }),
    options.timeoutMs ?? 5000,
    `connect ${host}:${port}`,
  ).catch((err: unknown) => {
    socket.destroy();
    throw err;
  });
  const connectedAt = Date.now();
  const chunks: Buffer[] = [];
  let how: ProbeEnd['how'] = 'close';
  let code: string | null = null;
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  socket.on('end', () => {
    if (how === 'close') how = 'end';
  });
  socket.on('error', (err: NodeJS.ErrnoException) => {
    how = 'error';
    code = err.code ?? err.message;
  });
  const ended = new Promise<ProbeEnd>((resolve) => {
    socket.once('close', () => resolve({ how, code, afterMs: Date.now() - connectedAt, bytes: Buffer.concat(chunks).length }));
  });
  return {
    socket,
    data: () => Buffer.concat(chunks),
    ended,
    connectedAt,
    write: (bytes) => {
      if (!socket.destroyed) socket.write(typeof bytes === 'string' ? Buffer.from(bytes, 'latin1') : bytes);
    },
  };
}

/** Wait for a probe to close; null when it is still open after `timeoutMs`. */
export async function probeClosed(p: Probe, timeoutMs: number): Promise<ProbeEnd | null> {
  return withTimeout(p.ended, timeoutMs, 'probe close').catch(() => null);
}

/** Try to connect; resolves with the error code ('ECONNREFUSED'...) or 'connected'. */
export function connectResult(host: string, port: number, timeoutMs = 3000): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      resolve('timeout');
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.destroy();
      resolve('connected');
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(err.code ?? err.message);
    });
  });
}

// ------------------------------------------------------------------ the CLI as a child process

export interface CliProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Parsed JSON log lines from stdout so far (non-JSON lines are skipped). */
  logs(): LogRecord[];
  stdout(): string;
  stderr(): string;
  waitLog(pred: (r: LogRecord) => boolean, timeoutMs?: number): Promise<LogRecord | null>;
  /** Resolves when the process exited. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>;
  /** Whether it has exited. */
  hasExited(): boolean;
}

/**
 * `node dist/cli.js --config <configPath>`. Killed (SIGKILL, by its own pid) at teardown if
 * still running.
 */
export function spawnCli(t: TeardownHost, configPath: string): CliProcess {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: build first (npx tsc -p tsconfig.json)`);
  const child = spawn(process.execPath, [CLI, '--config', configPath], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString('utf8')));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString('utf8')));
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>((resolve) => {
    child.once('exit', (code, signal) => {
      done = true;
      resolve({ code, signal, at: Date.now() });
    });
  });
  const pid = child.pid!;
  t.teardown(async () => {
    if (!done) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
      await withTimeout(exited, 5000, 'cli exit after SIGKILL').catch(() => {});
    }
  });
  const logs = (): LogRecord[] => {
    const records: LogRecord[] = [];
    for (const line of out.split('\n')) {
      if (!line.startsWith('{')) continue;
      try {
        records.push(JSON.parse(line) as LogRecord);
      } catch {
        /* partial line */
      }
    }
    return records;
  };
  return {
    child,
    pid,
    logs,
    stdout: () => out,
    stderr: () => err,
    exited,
    hasExited: () => done,
    waitLog: async (pred, timeoutMs = 5000) => {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const found = logs().find(pred);
        if (found) return found;
        if (Date.now() >= end || done) return logs().find(pred) ?? null;
        await delay(20);
      }
    },
  };
}

/** Ports [first, last] of "first-last". */
export function rangePorts(text: string): number[] {
  const [first, last] = text.split('-').map(Number) as [number, number];
  const out: number[] = [];
  for (let p = first; p <= last; p++) out.push(p);
  return out;
}

export function inRange(port: number, text: string): boolean {
  const [first, last] = text.split('-').map(Number) as [number, number];
  return port >= first && port <= last;
}

/** Whether every port of `ports` can be bound on `host` right now. */
async function allBindable(ports: readonly number[], host: string): Promise<boolean> {
  const servers: net.Server[] = [];
  try {
    for (const port of ports) {
      const server = net.createServer();
      const ok = await new Promise<boolean>((resolve) => {
        server.once('error', () => resolve(false));
        server.listen({ host, port, exclusive: true }, () => resolve(true));
      });
      if (!ok) return false;
      servers.push(server);
    }
    return true;
  } finally {
    await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  }
}

/**
 * The next block of `size` relay ports that can all be bound on 127.0.0.1 now. The test port
 * blocks lie inside Linux's ephemeral range, so another test's listener (a vsftpd or fake
 * server on a "free" port) may sit on one of them.
 */
export async function takeFreeRange(blocks: { take(size: number): { text: string } }, size = 4): Promise<string> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const { text } = blocks.take(size);
    if (await allBindable(rangePorts(text), '127.0.0.1')) return text;
  }
  throw new Error('no bindable relay port block found');
}
