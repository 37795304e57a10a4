/**
 * Load client, run as its own process by run.ts (so its CPU and file descriptors are its
 * own): `node load-worker.js '<json Job>'`. Prints progress lines `READY {...}` (idle job)
 * and exactly one `RESULT {...}` line. Every loop is bounded by a count and a deadline, and
 * the process exits by itself when the deadline passes.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { FtpControl, withDeadline, type TlsClientOptions } from './ftp-lite.js';
import { SESSION_STEPS } from './stats.js';

export interface Target {
  readonly host: string;
  readonly port: number;
  readonly user: string;
  readonly password: string;
  /** Explicit FTPS: AUTH TLS, PBSZ 0, PROT P before USER, every data connection TLS. */
  readonly tls?: TargetTls;
}

export interface TargetTls {
  /** PEM file with the CA the server's certificate must chain to. */
  readonly caFile: string;
  /** Name checked in the certificate (an IP address is not sent as SNI). */
  readonly host: string;
}

/** connect + login + PASV + RETR + QUIT, as many as `count`, `concurrency` at a time. */
export interface RateJob {
  readonly kind: 'rate';
  readonly target: Target;
  readonly file: string;
  readonly sha256: string;
  readonly concurrency: number;
  readonly count: number;
  /** Sessions finished before this much time has passed are warm-up and not counted. */
  readonly warmupMs: number;
  readonly maxMs: number;
  /** Time each step of each session (plain FTP only; meant for concurrency 1): `steps` in the result, medians in ms. */
  readonly steps?: boolean;
}

export interface ScaleFile {
  readonly name: string;
  readonly sha256: string;
  readonly bytes: number;
}

/** `sessions` logged in together, then every one of them moves data at the same moment. */
export interface ScaleJob {
  readonly kind: 'scale';
  readonly target: Target;
  readonly sessions: number;
  /** Logins in flight at once while ramping up (vsftpd's backlog is 32). */
  readonly rampConcurrency: number;
  readonly downloads: readonly ScaleFile[];
  readonly uploadPrefix: string;
  readonly uploadMinBytes: number;
  readonly uploadMaxBytes: number;
  readonly maxMs: number;
}

/** `sessions` logged in and idle until run.ts writes "close" (or maxMs passes). */
export interface IdleJob {
  readonly kind: 'idle';
  readonly target: Target;
  readonly sessions: number;
  readonly rampConcurrency: number;
  readonly maxMs: number;
}

/** One session, `count` NOOP round trips one after another. */
export interface NoopJob {
  readonly kind: 'noop';
  readonly target: Target;
  readonly warmup: number;
  readonly count: number;
  readonly maxMs: number;
}

/**
 * One session, one big transfer: the time from sending RETR/STOR until both its 226 and
 * the end of the data connection (login and PASV excluded, like curl's time_total minus
 * time_pretransfer). RETR counts and discards the bytes; STOR streams `local`.
 */
export interface TransferJob {
  readonly kind: 'transfer';
  readonly target: Target;
  readonly direction: 'retr' | 'stor';
  readonly remote: string;
  /** STOR only: the file sent. */
  readonly local?: string;
  /** Bytes the transfer must move. */
  readonly bytes: number;
  readonly maxMs: number;
}

export type Job = RateJob | ScaleJob | IdleJob | NoopJob | TransferJob;

const STEP_TIMEOUT_MS = 30_000;
const MAX_ERRORS_KEPT = 10;

class Errors {
  count = 0;
  readonly samples = new Map<string, number>();
  add(err: unknown): void {
    this.count += 1;
    const text = err instanceof Error ? err.message : String(err);
    if (this.samples.has(text) || this.samples.size < MAX_ERRORS_KEPT) this.samples.set(text, (this.samples.get(text) ?? 0) + 1);
  }
  toJSON(): { count: number; samples: Record<string, number> } {
    return { count: this.count, samples: Object.fromEntries(this.samples) };
  }
}

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index]!;
}

function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

/** CA files read once per worker. */
const caCache = new Map<string, string>();

function tlsOptions(t: TargetTls): TlsClientOptions {
  let ca = caCache.get(t.caFile);
  if (ca === undefined) {
    ca = readFileSync(t.caFile, 'utf8');
    caCache.set(t.caFile, ca);
  }
  return { ca, host: t.host };
}

/**
 * Connect and log in; with `t.tls`: connect, AUTH TLS, PBSZ 0, PROT P, then USER/PASS.
 * `onOpen` sees the control connection as soon as it exists (to close it on failure).
 */
async function openSession(t: Target, onOpen: (c: FtpControl) => void): Promise<FtpControl> {
  const c = await FtpControl.open(t.host, t.port, STEP_TIMEOUT_MS);
  onOpen(c);
  if (t.tls) await c.secure(tlsOptions(t.tls), STEP_TIMEOUT_MS);
  await c.login(t.user, t.password);
  return c;
}

/** Run `fn(i)` for i in [0, count) with at most `limit` in flight, stopping new work at `deadline`. */
async function pool(count: number, limit: number, deadline: number, fn: (i: number) => Promise<void>): Promise<number> {
  let next = 0;
  let started = 0;
  const lanes = Array.from({ length: Math.min(limit, count) }, async () => {
    while (next < count && nowMs() < deadline) {
      const i = next++;
      started += 1;
      await fn(i);
    }
  });
  await Promise.all(lanes);
  return started;
}

/**
 * One rate session with a clock on each step (SESSION_STEPS): the same commands as the plain
 * session, spelled out so that each reply is timed where it arrives. `226` may come before
 * the data's end: `data end to 226` is then 0 (it did not wait for it).
 */
async function steppedSession(t: Target, job: RateJob, steps: Map<string, number[]>, onOpen: (c: FtpControl) => void): Promise<void> {
  let last = nowMs();
  const lap = (name: (typeof SESSION_STEPS)[number], at = nowMs()): void => {
    const list = steps.get(name) ?? [];
    list.push(Math.max(0, at - last));
    steps.set(name, list);
    last = at;
  };
  const c = await FtpControl.open(t.host, t.port, STEP_TIMEOUT_MS);
  onOpen(c);
  lap('connect to 220');
  await c.command(`USER ${t.user}`, [331]);
  lap('USER');
  await c.command(`PASS ${t.password}`, [230]);
  lap('PASS');
  const data = await c.pasv(STEP_TIMEOUT_MS);
  lap('PASV + data connect');
  const hash = createHash('sha256');
  let dataEnd = 0;
  const received = new Promise<void>((resolve, reject) => {
    data.on('data', (chunk: Buffer) => hash.update(chunk));
    data.once('end', () => {
      dataEnd = nowMs();
      data.end();
      resolve();
    });
    data.once('error', (err) => reject(new Error(`data: ${err.message}`)));
  });
  c.send(`RETR ${job.file}`);
  c.expect(await c.next(), [125, 150], 'RETR');
  lap('RETR to 150');
  const final = await c.next();
  const finalAt = nowMs();
  await received;
  c.expect(final, [226], 'RETR');
  data.destroy();
  if (hash.digest('hex') !== job.sha256) throw new Error(`RETR ${job.file}: sha256 mismatch`);
  lap('150 to data end', dataEnd);
  lap('data end to 226', Math.max(finalAt, dataEnd));
  await c.quit();
  lap('QUIT');
}

async function runRate(job: RateJob): Promise<Record<string, unknown>> {
  const errors = new Errors();
  const started = nowMs();
  const deadline = started + job.maxMs;
  const finishedAt: number[] = [];
  const latencies: number[] = [];
  const steps = new Map<string, number[]>();
  const t = job.target;
  await pool(job.count, job.concurrency, deadline, async () => {
    const begin = nowMs();
    let control: FtpControl | null = null;
    try {
      await withDeadline(
        (async () => {
          if (job.steps && !t.tls) {
            await steppedSession(t, job, steps, (c) => (control = c));
            return;
          }
          control = await openSession(t, (c) => (control = c));
          const data = await control.pasv(STEP_TIMEOUT_MS);
          const got = await control.retr(data, job.file);
          if (got.sha256 !== job.sha256) throw new Error(`RETR ${job.file}: sha256 mismatch (${got.bytes} bytes)`);
          await control.quit();
        })(),
        STEP_TIMEOUT_MS,
        'session',
      );
      const end = nowMs();
      finishedAt.push(end);
      latencies.push(end - begin);
    } catch (err) {
      errors.add(err);
      (control as FtpControl | null)?.close();
    }
  });
  const ended = nowMs();
  // Sessions/s over the measured window: completions after the warm-up, over its length.
  const windowStart = started + job.warmupMs;
  const counted = finishedAt.filter((t) => t >= windowStart).length;
  const windowMs = ended - windowStart;
  latencies.sort((a, b) => a - b);
  return {
    completed: finishedAt.length,
    counted,
    windowMs,
    sessionsPerSecond: windowMs > 0 ? (counted * 1000) / windowMs : 0,
    latencyMs: { p50: percentile(latencies, 50), p99: percentile(latencies, 99) },
    ...(job.steps ? { steps: Object.fromEntries([...steps].map(([name, list]) => [name, percentile([...list].sort((a, b) => a - b), 50)])) } : {}),
    elapsedMs: ended - started,
    timedOut: ended >= deadline,
    errors: errors.toJSON(),
  };
}

/** A barrier: resolves for everyone once `n` parties arrived (or at once if released). */
class Barrier {
  private arrived = 0;
  private release!: () => void;
  readonly open: Promise<void>;
  constructor(private readonly n: number) {
    this.open = new Promise((resolve) => (this.release = resolve));
    if (n === 0) this.release();
  }
  arrive(): Promise<void> {
    this.arrived += 1;
    if (this.arrived >= this.n) this.release();
    return this.open;
  }
  /** A party dropped out: count it as arrived so the others do not wait forever. */
  leave(): void {
    this.arrive().catch(() => {});
  }
}

async function runScale(job: ScaleJob): Promise<Record<string, unknown>> {
  const errors = new Errors();
  const started = nowMs();
  const deadline = started + job.maxMs;
  const t = job.target;
  const loggedIn = new Barrier(job.sessions);
  const uploads: Array<{ name: string; sha256: string; bytes: number }> = [];
  const downloads: Array<{ name: string; ok: boolean }> = [];
  let inTransfer = 0;
  let maxInTransfer = 0;
  let allLoggedInAt = 0;
  let rampLimit = job.rampConcurrency;
  // Ramp: at most rampConcurrency logins in flight; each session then stays open.
  let next = 0;
  const sessionDone: Array<Promise<void>> = [];
  let inFlight = 0;
  let wake: (() => void) | null = null;
  const session = async (i: number): Promise<void> => {
    let control: FtpControl | null = null;
    try {
      control = await withDeadline(
        openSession(t, (c) => (control = c)),
        STEP_TIMEOUT_MS,
        'login',
      );
    } catch (err) {
      errors.add(err);
      (control as FtpControl | null)?.close();
      inFlight -= 1;
      wake?.();
      loggedIn.leave();
      return;
    }
    inFlight -= 1;
    wake?.();
    const c = control;
    try {
      await withDeadline(loggedIn.arrive(), Math.max(1, deadline - nowMs()), 'waiting for every session to log in');
      if (allLoggedInAt === 0) allLoggedInAt = nowMs();
      await withDeadline(
        (async () => {
          const data = await c.pasv(STEP_TIMEOUT_MS);
          inTransfer += 1;
          maxInTransfer = Math.max(maxInTransfer, inTransfer);
          try {
            if (i % 2 === 0) {
              const file = job.downloads[(i / 2) % job.downloads.length]!;
              const got = await c.retr(data, file.name);
              const ok = got.sha256 === file.sha256 && got.bytes === file.bytes;
              downloads.push({ name: file.name, ok });
              if (!ok) throw new Error(`RETR ${file.name}: sha256 mismatch (${got.bytes}/${file.bytes} bytes)`);
            } else {
              const span = job.uploadMaxBytes - job.uploadMinBytes;
              const body = randomBytes(job.uploadMinBytes + Math.floor(Math.random() * (span + 1)));
              const name = `${job.uploadPrefix}${i}.bin`;
              await c.stor(data, name, body);
              uploads.push({ name, sha256: createHash('sha256').update(body).digest('hex'), bytes: body.length });
            }
          } finally {
            inTransfer -= 1;
          }
          await c.quit();
        })(),
        Math.max(1, Math.min(STEP_TIMEOUT_MS * 2, deadline - nowMs())),
        'transfer',
      );
    } catch (err) {
      errors.add(err);
      c.close();
    }
  };
  while (next < job.sessions && nowMs() < deadline) {
    while (inFlight >= rampLimit) await new Promise<void>((resolve) => (wake = resolve));
    wake = null;
    inFlight += 1;
    sessionDone.push(session(next++));
  }
  // Sessions never started (deadline) must not hold the barrier.
  for (let i = next; i < job.sessions; i++) {
    errors.add(new Error('not started before the deadline'));
    loggedIn.leave();
  }
  rampLimit = 0;
  await Promise.all(sessionDone);
  const ended = nowMs();
  return {
    sessions: job.sessions,
    failed: errors.count,
    loginPhaseMs: allLoggedInAt ? allLoggedInAt - started : null,
    transferPhaseMs: allLoggedInAt ? ended - allLoggedInAt : null,
    maxConcurrentTransfers: maxInTransfer,
    downloadsOk: downloads.filter((d) => d.ok).length,
    downloads: downloads.length,
    uploads,
    elapsedMs: ended - started,
    errors: errors.toJSON(),
  };
}

async function runIdle(job: IdleJob): Promise<Record<string, unknown>> {
  const errors = new Errors();
  const started = nowMs();
  const deadline = started + job.maxMs;
  const t = job.target;
  const open: FtpControl[] = [];
  await pool(job.sessions, job.rampConcurrency, deadline, async () => {
    let control: FtpControl | null = null;
    try {
      control = await withDeadline(
        openSession(t, (c) => (control = c)),
        STEP_TIMEOUT_MS,
        'login',
      );
      open.push(control);
    } catch (err) {
      errors.add(err);
      (control as FtpControl | null)?.close();
    }
  });
  const loginMs = nowMs() - started;
  process.stdout.write(`READY ${JSON.stringify({ open: open.length, failed: errors.count, loginMs })}\n`);
  // Hold until told to close (run.ts measures the proxy meanwhile) or the deadline.
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, Math.max(1, deadline - nowMs()));
    const rl = createInterface({ input: process.stdin });
    rl.on('line', (line) => {
      if (line.trim() === 'close') {
        clearTimeout(timer);
        rl.close();
        resolve();
      }
    });
  });
  // Every idle session must still be alive: one NOOP each, then QUIT.
  let alive = 0;
  await pool(open.length, 200, nowMs() + 60_000, async (i) => {
    const c = open[i]!;
    try {
      await withDeadline(c.command('NOOP', [200]).then(() => c.quit()), STEP_TIMEOUT_MS, 'NOOP after idle');
      alive += 1;
    } catch (err) {
      errors.add(err);
      c.close();
    }
  });
  return { sessions: job.sessions, open: open.length, aliveAfterIdle: alive, failed: errors.count, loginMs, errors: errors.toJSON() };
}

async function runNoop(job: NoopJob): Promise<Record<string, unknown>> {
  const t = job.target;
  const deadline = nowMs() + job.maxMs;
  const control = await withDeadline(openSession(t, () => {}), STEP_TIMEOUT_MS, 'connect and login');
  const rtts: number[] = [];
  for (let i = 0; i < job.warmup + job.count && nowMs() < deadline; i++) {
    const begin = process.hrtime.bigint();
    await withDeadline(control.command('NOOP', [200]), STEP_TIMEOUT_MS, 'NOOP');
    if (i >= job.warmup) rtts.push(Number(process.hrtime.bigint() - begin) / 1e6);
  }
  await control.quit();
  const sorted = [...rtts].sort((a, b) => a - b);
  return {
    count: rtts.length,
    p50Ms: percentile(sorted, 50),
    p90Ms: percentile(sorted, 90),
    p99Ms: percentile(sorted, 99),
    meanMs: rtts.reduce((a, b) => a + b, 0) / Math.max(1, rtts.length),
  };
}

async function runTransfer(job: TransferJob): Promise<Record<string, unknown>> {
  const t = job.target;
  let control: FtpControl | null = null;
  try {
    return await withDeadline(
      (async () => {
        // A target that hangs before the transfer costs one step timeout, not maxMs.
        const [c, data] = await withDeadline(
          (async () => {
            const opened = await openSession(t, (o) => (control = o));
            await opened.command('TYPE I', [200]);
            return [opened, await opened.pasv(STEP_TIMEOUT_MS)] as const;
          })(),
          STEP_TIMEOUT_MS,
          'login and PASV',
        );
        const begin = nowMs();
        let bytes = job.bytes;
        if (job.direction === 'retr') bytes = (await c.retr(data, job.remote, { hash: false })).bytes;
        else {
          if (!job.local) throw new Error('STOR: no local file');
          await c.stor(data, job.remote, createReadStream(job.local, { highWaterMark: 1024 * 1024 }));
        }
        const seconds = (nowMs() - begin) / 1000;
        await c.quit();
        if (bytes !== job.bytes) return { ok: false, seconds, bytes, error: `${job.direction.toUpperCase()} moved ${bytes} of ${job.bytes} bytes` };
        return { ok: true, seconds, bytes };
      })(),
      job.maxMs,
      job.direction.toUpperCase(),
    );
  } catch (err) {
    (control as FtpControl | null)?.close();
    return { ok: false, seconds: Number.NaN, bytes: 0, error: err instanceof Error ? err.message : String(err) };
  }
}

async function main(): Promise<void> {
  const job = JSON.parse(process.argv[2] ?? '{}') as Job;
  // Hard stop: whatever happens, this process ends shortly after its deadline.
  setTimeout(() => {
    process.stdout.write(`RESULT ${JSON.stringify({ error: 'worker deadline exceeded' })}\n`);
    process.exit(3);
  }, job.maxMs + 90_000).unref();
  let result: Record<string, unknown>;
  switch (job.kind) {
    case 'rate':
      result = await runRate(job);
      break;
    case 'scale':
      result = await runScale(job);
      break;
    case 'idle':
      result = await runIdle(job);
      break;
    case 'noop':
      result = await runNoop(job);
      break;
    case 'transfer':
      result = await runTransfer(job);
      break;
  }
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
  process.exit(0);
}

main().catch((err: unknown) => {
  process.stdout.write(`RESULT ${JSON.stringify({ error: err instanceof Error ? err.message : String(err) })}\n`);
  process.exit(2);
});
