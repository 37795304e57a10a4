/**
 * The FTPS part of the benchmark (`--only=ftps`, issue #12): explicit FTPS (AUTH TLS, PBSZ 0,
 * PROT P, every data connection TLS and resumed from the control session) through four
 * targets, measured by the same code as the plain figures (run.ts) and reported as ratios to
 * the first of them, measured in the same repetition:
 *
 * - `direct-ftps`: a second vsftpd with ssl_enable, force_local_logins_ssl,
 *   force_local_data_ssl and require_ssl_reuse (protocol.md §5.5), same files as the plain one;
 * - `proxy-ftps-client`: ftp-nat-proxy terminating TLS on its client leg, the plain vsftpd
 *   behind it (protocol.md §5.6 topology a);
 * - `proxy-ftps-both`: ftp-nat-proxy with TLS on both legs, `direct-ftps` behind it (topology b);
 * - `mod_proxy-ftps`: ProFTPD mod_tls in front of mod_proxy with ProxyTLSEngine on toward
 *   `direct-ftps`.
 *
 * The certificates come from a throw-away PKI made with openssl in the bench's work folder
 * (helpers/tls.ts: an RSA server key, which vsftpd 3.0.3 needs for TLS 1.2). A target that
 * does not start is an error row, never the end of the run.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { makeTestPki, opensslUnavailable, type TestPki } from '../helpers/tls.js';
import { startBenchProftpd, startBenchProxy, startBenchVsftpd, type BenchTlsFiles, type Server } from './servers.js';
import type { ProftpdSetup } from './setup.js';
import { fmt, num, ratio, type Verdict } from './stats.js';

/** Ports of the FTPS targets, apart from the plain ones and below the ephemeral range. */
export const FTPS_PORTS = {
  vsftpd: 2102,
  vsftpdPasv: [3000, 5499] as const,
  proxyClientLeg: 2131,
  proxyClientLegPassive: '5500-6499',
  proxyBothLegs: 2132,
  proxyBothLegsPassive: '6500-7499',
  proftpd: 2201,
  proftpdPassive: [13200, 13999] as const,
  fakeUpstream: 2303,
  idleProxy: 2302,
  idlePassive: '7500-7599',
};

/** Target names, as they appear in latest.json. */
export const FTPS_NAMES = {
  direct: 'direct-ftps',
  clientLeg: 'proxy-ftps-client',
  bothLegs: 'proxy-ftps-both',
  modProxy: 'mod_proxy-ftps',
  idle: 'proxy-idle-ftps',
} as const;

/** The ftp-nat-proxy variants, headline first, and what each must reach on transfers. */
export const FTPS_PROXY_VARIANTS = [
  { name: FTPS_NAMES.clientLeg, transferTarget: 0.8 },
  { name: FTPS_NAMES.bothLegs, transferTarget: 0.6 },
] as const;

export const FTPS_LABELS: Readonly<Record<string, string>> = {
  [FTPS_NAMES.direct]: 'direct FTPS (vsftpd ssl_enable)',
  [FTPS_NAMES.clientLeg]: `${FTPS_NAMES.clientLeg} (TLS client leg, plain vsftpd behind)`,
  [FTPS_NAMES.bothLegs]: `${FTPS_NAMES.bothLegs} (TLS on both legs)`,
  [FTPS_NAMES.modProxy]: 'mod_proxy (mod_tls + ProxyTLSEngine on)',
  [FTPS_NAMES.idle]: `${FTPS_NAMES.idle} (TLS client leg, control only)`,
};

/** Idle TLS sessions must each cost at most this much proxy RSS. */
export const FTPS_IDLE_TARGET_KIB = 64;

export interface FtpsTargets {
  readonly pki: TestPki;
  readonly tlsFiles: BenchTlsFiles;
  readonly direct: Server;
  /** The proxy variants that started, in FTPS_PROXY_VARIANTS order. */
  readonly proxies: Server[];
  readonly modProxy: Server | null;
  /** Why a target did not start, by name (mod_proxy included). */
  readonly startErrors: Record<string, string>;
  /** Stop every target started here and remove the PKI. */
  stop(): Promise<void>;
}

function message(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).replace(/\s+/g, ' ').trim().slice(0, 600);
}

/** The PKI for the FTPS targets, or why it cannot be made. */
export function makeBenchPki(work: string): { pki: TestPki; files: BenchTlsFiles } | { error: string } {
  const missing = opensslUnavailable();
  if (missing) return { error: missing };
  try {
    const pki = makeTestPki({ parentDir: work });
    return { pki, files: { cert: pki.server.cert.path, key: pki.server.key.path, ca: pki.ca.cert.path } };
  } catch (err) {
    return { error: message(err) };
  }
}

export interface FtpsStartOptions {
  readonly work: string;
  /** Folder vsftpd serves (the plain vsftpd serves it too). */
  readonly root: string;
  readonly repoDir: string;
  /** Port of the plain vsftpd, the upstream of the client-leg-only variant. */
  readonly plainUpstreamPort: number;
  readonly proftpd: ProftpdSetup;
  readonly nodeArgs: (name: string) => readonly string[];
}

/**
 * Start the four FTPS targets. Throws only when direct FTPS (the baseline of every ratio)
 * does not start; a proxy or mod_proxy that does not start is recorded in `startErrors`.
 */
export async function startFtpsTargets(options: FtpsStartOptions): Promise<FtpsTargets> {
  mkdirSync(options.work, { recursive: true });
  const made = makeBenchPki(options.work);
  if ('error' in made) throw new Error(`no certificates for FTPS: ${made.error}`);
  const { pki, files } = made;
  const started: Server[] = [];
  const stop = async (): Promise<void> => {
    for (const server of started.reverse()) await server.child.stop();
    pki.cleanup();
  };
  try {
    const direct = await startBenchVsftpd({
      name: FTPS_NAMES.direct,
      port: FTPS_PORTS.vsftpd,
      work: join(options.work, 'vsftpd-ftps'),
      root: options.root,
      pasvMin: FTPS_PORTS.vsftpdPasv[0],
      pasvMax: FTPS_PORTS.vsftpdPasv[1],
      tls: files,
    });
    started.push(direct);
    const startErrors: Record<string, string> = {};
    const proxies: Server[] = [];
    const proxySpecs = [
      { name: FTPS_NAMES.clientLeg, port: FTPS_PORTS.proxyClientLeg, passivePorts: FTPS_PORTS.proxyClientLegPassive, upstreamPort: options.plainUpstreamPort, upstreamTls: false },
      { name: FTPS_NAMES.bothLegs, port: FTPS_PORTS.proxyBothLegs, passivePorts: FTPS_PORTS.proxyBothLegsPassive, upstreamPort: FTPS_PORTS.vsftpd, upstreamTls: true },
    ];
    for (const spec of proxySpecs) {
      try {
        const proxy = await startBenchProxy({
          name: spec.name,
          port: spec.port,
          work: join(options.work, 'proxy-ftps'),
          upstreamPort: spec.upstreamPort,
          passivePorts: spec.passivePorts,
          repoDir: options.repoDir,
          tls: files,
          ...(spec.upstreamTls ? { upstreamTls: { ca: files.ca } } : {}),
          nodeArgs: options.nodeArgs(spec.name),
        });
        started.push(proxy);
        proxies.push(proxy);
      } catch (err) {
        startErrors[spec.name] = `did not start: ${message(err)}`;
      }
    }
    let modProxy: Server | null = null;
    if (!options.proftpd.ok) startErrors[FTPS_NAMES.modProxy] = options.proftpd.reason;
    else {
      try {
        modProxy = await startBenchProftpd({
          name: FTPS_NAMES.modProxy,
          root: options.proftpd.root,
          libraryPath: options.proftpd.libraryPath,
          port: FTPS_PORTS.proftpd,
          work: join(options.work, 'proftpd-ftps'),
          upstreamPort: FTPS_PORTS.vsftpd,
          passiveMin: FTPS_PORTS.proftpdPassive[0],
          passiveMax: FTPS_PORTS.proftpdPassive[1],
          tls: files,
        });
        started.push(modProxy);
      } catch (err) {
        startErrors[FTPS_NAMES.modProxy] = message(err);
      }
    }
    return { pki, tlsFiles: files, direct, proxies, modProxy, startErrors, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

// ------------------------------------------------------------------------------- report

/**
 * The FTPS table: one block per measure, direct FTPS once, a row per proxy variant with its
 * verdict (an error row when it did not run) and one for mod_proxy (no verdict).
 */
export function reportFtps(ftps: Record<string, unknown>, verdicts: Verdict[]): string[][] {
  const rows: string[][] = [['FTPS measure', 'direct FTPS', 'through', 'figure (ratio to direct FTPS)', 'target', 'result']];
  if (typeof ftps.error === 'string') {
    // Nothing to compare with: transfers and session rates were not measured at all.
    rows.push(['transfers and sessions/s', '-', '-', `error: ${ftps.error.slice(0, 100)}`, '-', 'ERROR']);
    for (const { name } of FTPS_PROXY_VARIANTS) verdicts.push({ name: 'FTPS transfers and sessions/s', variant: name, pass: false, detail: `not measured: ${ftps.error}` });
  }
  const startErrors = (ftps.startErrors ?? {}) as Record<string, string>;
  const m = FTPS_NAMES.modProxy;
  const label = (name: string): string => FTPS_LABELS[name] ?? name;
  const passText = (pass: boolean | null): string => (pass === null ? 'n/a' : pass ? 'PASS' : 'FAIL');
  // The full reason is in latest.json and in the verdict line.
  const errorCell = (name: string): string => `error: ${(startErrors[name] ?? 'not measured').slice(0, 100)}`;
  const block = (
    title: string,
    direct: string,
    target: (transferTarget: number) => string,
    variant: (name: string, transferTarget: number) => { cell: string; pass: boolean | null },
    modCell: (name: string) => string,
    verdictName: (transferTarget: number) => string,
  ): void => {
    rows.push([]);
    FTPS_PROXY_VARIANTS.forEach(({ name, transferTarget }, i) => {
      if (startErrors[name]) {
        verdicts.push({ name: verdictName(transferTarget), variant: name, pass: false, detail: `error: ${startErrors[name]}` });
        rows.push([i === 0 ? title : '', i === 0 ? direct : '', label(name), errorCell(name), target(transferTarget), 'ERROR']);
        return;
      }
      const { cell, pass } = variant(name, transferTarget);
      rows.push([i === 0 ? title : '', i === 0 ? direct : '', label(name), cell, target(transferTarget), passText(pass)]);
    });
    rows.push(['', '', label(m), startErrors[m] ? `unavailable: ${startErrors[m].slice(0, 100)}` : modCell(m), '', '-']);
  };
  const tp = ftps.throughput as Record<string, unknown> | undefined;
  if (tp) {
    for (const [op, key, rkey] of [['RETR', 'retrMiBps', 'retrRatio'], ['STOR', 'storMiBps', 'storRatio']] as const) {
      const mr = num(tp, m, rkey);
      // Errors of this operation only (run.ts prefixes each with RETR or STOR).
      const errors = (name: string): string[] => ((tp[name] as { errors?: string[] } | undefined)?.errors ?? []).filter((e) => e.startsWith(op));
      const errorsText = (name: string): string => (errors(name).length ? `, ${errors(name).length} errors` : '');
      block(
        `${op} ${tp.sizeMiB} MiB, MiB/s (median of ${tp.reps})`,
        fmt(num(tp, FTPS_NAMES.direct, key)),
        (t) => `>= ${t.toFixed(2)}x, > mod_proxy`,
        (name, t) => {
          const pr = num(tp, name, rkey);
          const n = errors(name).length;
          const pass = Number.isFinite(pr) ? pr >= t && (!Number.isFinite(mr) || pr > mr) && n === 0 : n > 0 ? false : null;
          verdicts.push({ name: `FTPS ${op} >= ${t} of direct FTPS and above mod_proxy`, variant: name, pass, detail: `${ratio(pr)} vs mod_proxy ${ratio(mr)}${n ? `, ${n} transfer errors, first: ${errors(name)[0]}` : ''}` });
          return { cell: `${fmt(num(tp, name, key))} (${ratio(pr)})${errorsText(name)}`, pass };
        },
        (name) => {
          // Every run failed: say how, since there is no figure.
          const first = errors(name)[0];
          if (!Number.isFinite(num(tp, name, key)) && first) return `failed ${errors(name).length}/${String(tp.reps)}: ${first.slice(0, 80)}`;
          return `${fmt(num(tp, name, key))} (${ratio(mr)})${errorsText(name)}`;
        },
        (t) => `FTPS ${op} >= ${t} of direct FTPS and above mod_proxy`,
      );
    }
  }
  for (const c of [1, 50]) {
    const r = ftps[`rate_c${c}`] as Record<string, unknown> | undefined;
    if (!r) continue;
    const failedText = (name: string): string => (num(r, name, 'failed') ? `, ${num(r, name, 'failed')} failed` : '');
    const mr = num(r, m, 'ratio');
    const verdictName = `FTPS sessions/s at concurrency ${c} above mod_proxy, 0 failed`;
    block(
      `sessions/s, c=${c} (connect+AUTH TLS+PBSZ+PROT+login+PASV+RETR 4 KiB+QUIT)`,
      fmt(num(r, FTPS_NAMES.direct, 'sessionsPerSecond')),
      () => '> mod_proxy, 0 failed',
      (name) => {
        const pr = num(r, name, 'ratio');
        const failed = num(r, name, 'failed');
        const pass = Number.isFinite(pr) ? (!Number.isFinite(mr) || pr > mr) && failed === 0 : failed > 0 ? false : null;
        const sample = Object.keys(((r[name] as { errorSamples?: Record<string, number> } | undefined)?.errorSamples) ?? {})[0];
        verdicts.push({ name: verdictName, variant: name, pass, detail: `${ratio(pr)} vs mod_proxy ${ratio(mr)}, ${failed} failed${sample ? ` (e.g. ${sample})` : ''}` });
        return { cell: `${fmt(num(r, name, 'sessionsPerSecond'))} (${ratio(pr)})${failedText(name)}`, pass };
      },
      (name) => `${fmt(num(r, name, 'sessionsPerSecond'))} (${ratio(mr)})${failedText(name)}`,
      () => verdictName,
    );
  }
  const idle = ftps.idle as Record<string, unknown> | undefined;
  if (idle) {
    const verdictName = `RSS per idle TLS session <= ${FTPS_IDLE_TARGET_KIB} KiB (${String(idle.sessions)} sessions)`;
    rows.push([]);
    if (typeof idle.error === 'string') {
      verdicts.push({ name: verdictName, variant: FTPS_NAMES.clientLeg, pass: false, detail: `error: ${idle.error}` });
      rows.push([`RSS per idle TLS session (${String(idle.sessions)} idle, logged in)`, '-', label(FTPS_NAMES.idle), `error: ${idle.error.slice(0, 100)}`, `<= ${FTPS_IDLE_TARGET_KIB} KiB`, 'ERROR']);
    } else {
      const per = num(idle, 'perSessionKiB');
      const alive = num(idle, 'aliveAfterIdle');
      const pass = Number.isFinite(per) ? per <= FTPS_IDLE_TARGET_KIB && alive === num(idle, 'sessions') : null;
      verdicts.push({ name: verdictName, variant: FTPS_NAMES.clientLeg, pass, detail: `${fmt(per, 1)} KiB, ${alive} alive after idling` });
      rows.push([`RSS per idle TLS session (${String(idle.sessions)} idle, logged in)`, '-', label(FTPS_NAMES.idle), `${fmt(per, 1)} KiB`, `<= ${FTPS_IDLE_TARGET_KIB} KiB`, passText(pass)]);
    }
  }
  return rows;
}

/** Proxy CPU per GiB and per session, and what failed, for the FTPS targets. */
export function ftpsDiagnosticLines(ftps: Record<string, unknown>): string[] {
  const lines: string[] = [];
  const tp = ftps.throughput as Record<string, unknown> | undefined;
  for (const { name } of FTPS_PROXY_VARIANTS) {
    const parts: string[] = [];
    if (tp && Number.isFinite(num(tp, name, 'proxyCpuSecondsPerGiB'))) parts.push(`${fmt(num(tp, name, 'proxyCpuSecondsPerGiB'), 2)} CPU s per GiB transferred`);
    for (const c of [1, 50]) {
      const r = ftps[`rate_c${c}`] as Record<string, unknown> | undefined;
      if (r && Number.isFinite(num(r, name, 'proxyCpuMsPerSession'))) parts.push(`${fmt(num(r, name, 'proxyCpuMsPerSession'), 2)} CPU ms per session at c=${c}`);
    }
    if (parts.length) lines.push(`${name}: ${parts.join(', ')}`);
  }
  for (const name of [FTPS_NAMES.direct, FTPS_NAMES.modProxy]) {
    const errors = (tp?.[name] as { errors?: string[] } | undefined)?.errors ?? [];
    if (errors.length) lines.push(`${name}: ${errors.length} transfer errors, first: ${errors[0]}`);
    for (const c of [1, 50]) {
      const r = ftps[`rate_c${c}`] as Record<string, unknown> | undefined;
      const samples = (r?.[name] as { errorSamples?: Record<string, number> } | undefined)?.errorSamples ?? {};
      const first = Object.entries(samples)[0];
      if (first) lines.push(`${name}: c=${c}: ${num(r, name, 'failed')} sessions failed, e.g. ${first[1]}x "${first[0]}"`);
    }
  }
  const idle = ftps.idle as Record<string, unknown> | undefined;
  if (idle && typeof idle.error !== 'string') {
    lines.push(`idle TLS: ${String(idle.open)} sessions open, ${String(idle.aliveAfterIdle)} answered NOOP after idling, proxy descriptors ${String(idle.fdsBefore)} -> ${String(idle.fdsAfter)}, RSS ${String(idle.rssBeforeKiB)} -> ${String(idle.rssAfterKiB)} KiB`);
  }
  return lines;
}
