/**
 * Listeners and the session registry. One ListenerRuntime per configured listener
 * (server/listener-runtime.ts builds it, for start and reload alike); each accepted
 * connection goes through admission (server/admission.ts: PROXY header, ACL, session
 * limits) and becomes a Session. reload() swaps settings for new sessions without touching
 * open ones; close() stops accepting, lets sessions finish for a drain time, then tells the
 * rest "421" and waits until every one has released its resources.
 */
import type net from 'node:net';
import { randomBytes } from 'node:crypto';
import type { ProxyConfig } from './config/schema.js';
import { dial } from './data/dial.js';
import type { HostnameResolver } from './advertise.js';
import { Session } from './session.js';
import type { Logger } from './log.js';
import { ProxyError, REPLY_FOR_CODE } from './errors.js';
import { NOOP_METRICS, type ProxyMetrics } from './metrics.js';
import { KernelForwarder } from './data/kernel-forward.js';
import { loadNftRunner } from './data/nft-runner.js';
import { forwardingBlocker, kernelPathHostBlocker } from './server/data-path.js';
import { admitConnection, refuseConnection, type AdmissionDeps } from './server/admission.js';
import { ListenerRuntime, discardPrepared, prepareListener, type ListenerRuntimeDeps, type PreparedListener } from './server/listener-runtime.js';

export { aclAllows } from './server/acl.js';

export interface BoundListener {
  readonly name: string;
  readonly host: string;
  readonly port: number;
}

export interface ServerDeps {
  readonly log: Logger;
  readonly resolver?: HostnameResolver;
  readonly metrics?: ProxyMetrics;
  /** Opens the nftables table for `client.dataPath: kernel` (tests inject a fake). */
  readonly openKernelForwarder?: () => KernelForwarder;
  /** `dataPath: auto`: why this host cannot have the kernel path (tests replace the ip_forward check). */
  readonly kernelHostBlocker?: () => string | null;
}

export type ServerStatus = 'idle' | 'running' | 'draining' | 'closed';

export interface ReloadResult {
  readonly added: string[];
  readonly removed: string[];
  readonly updated: string[];
}

const READY_CHECK_TIMEOUT_MS = 2000;

export class ProxyServer {
  private configValue: ProxyConfig;
  private readonly deps: ServerDeps;
  private readonly metrics: ProxyMetrics;
  private readonly runtimes = new Map<string, ListenerRuntime>();
  private readonly sessions = new Set<Session>();
  private statusValue: ServerStatus = 'idle';
  private closing: Promise<void> | null = null;
  private kernelForwarder: KernelForwarder | null = null;
  /** Why `dataPath: auto` relays (the last attempt to open the kernel path failed). */
  private kernelPathUnavailable: string | null = null;
  private readonly runtimeDeps: ListenerRuntimeDeps;
  private readonly admissionDeps: AdmissionDeps;

  constructor(config: ProxyConfig, deps: ServerDeps) {
    this.configValue = config;
    this.deps = deps;
    this.metrics = deps.metrics ?? NOOP_METRICS;
    this.runtimeDeps = {
      log: deps.log,
      metrics: this.metrics,
      resolver: deps.resolver,
      accept: (runtime, socket) => void this.accept(runtime, socket),
    };
    this.admissionDeps = { metrics: this.metrics, accepting: () => this.statusValue === 'running' };
  }

  get config(): ProxyConfig {
    return this.configValue;
  }

  get status(): ServerStatus {
    return this.statusValue;
  }

  get sessionCount(): number {
    return this.sessions.size;
  }

  /** Port pool statistics per listener (leased / size), for tests and metrics. */
  poolStats(): Array<{ listener: string; pool: 'passive' | 'active'; size: number; leased: number }> {
    const out: Array<{ listener: string; pool: 'passive' | 'active'; size: number; leased: number }> = [];
    for (const runtime of this.runtimes.values()) {
      const { clientPool, upstreamPool } = runtime.settings;
      out.push({ listener: runtime.name, pool: 'passive', ...clientPool.stats });
      if (upstreamPool) out.push({ listener: runtime.name, pool: 'active', ...upstreamPool.stats });
    }
    return out;
  }

  /** Bind every listener; rejects (and unbinds what was bound) if any fails. */
  async start(): Promise<BoundListener[]> {
    if (this.statusValue !== 'idle') throw new Error('server already started');
    this.statusValue = 'running';
    this.logConfigWarnings(this.configValue);
    try {
      this.ensureKernelPath(this.configValue);
      for (const config of this.configValue.listeners) this.runtimes.set(config.name, await ListenerRuntime.open(config, this.runtimeDeps));
    } catch (err) {
      await this.close(0);
      throw err;
    }
    return this.addresses();
  }

  /**
   * Open the nftables table once some listener asks for `client.dataPath: kernel` or `auto`.
   * An operator who asked for `kernel` gets a startup (or reload) error, not a silent relay;
   * `auto` falls back to the relay, and each such listener says which path it got and why.
   */
  private ensureKernelPath(config: ProxyConfig): void {
    const auto = config.listeners.filter((l) => l.client.dataPath === 'auto');
    if (!this.kernelForwarder && config.listeners.some((l) => l.client.dataPath !== 'relay')) {
      const open = this.deps.openKernelForwarder ?? (() => defaultKernelForwarder(this.deps.log));
      if (config.listeners.some((l) => l.client.dataPath === 'kernel')) {
        this.kernelForwarder = open();
      } else {
        const blocker = (this.deps.kernelHostBlocker ?? kernelPathHostBlocker)();
        this.kernelPathUnavailable = blocker;
        if (!blocker) {
          try {
            this.kernelForwarder = open();
          } catch (err) {
            this.kernelPathUnavailable = (err as Error).message;
          }
        }
      }
      if (this.kernelForwarder) this.deps.log.info({ event: 'kernel-path', table: this.kernelForwarder.table }, 'kernel data path ready (nftables)');
    }
    for (const listener of auto) {
      const kernel = this.kernelForwarder !== null;
      this.deps.log.info(
        { event: 'data-path', listener: listener.name, configured: 'auto', dataPath: kernel ? 'kernel' : 'relay', reason: kernel ? `nftables table ${this.kernelForwarder!.table}` : this.kernelPathUnavailable },
        kernel ? 'dataPath auto: data on the kernel path where a transfer allows it' : 'dataPath auto: relaying data, the kernel path is not available here',
      );
    }
  }

  addresses(): BoundListener[] {
    return [...this.runtimes.values()].map((runtime) => ({ name: runtime.name, ...runtime.address() }));
  }

  /**
   * A connection a listener accepted: admission (server/admission.ts) decides, and refuses
   * on its own; an admitted one becomes a session built from the settings it was admitted under.
   */
  private async accept(runtime: ListenerRuntime, socket: net.Socket): Promise<void> {
    const admission = await admitConnection(socket, runtime, this.admissionDeps);
    if (admission.kind === 'refused') return;
    if (this.statusValue !== 'running') {
      // close() began between admission's decision and this continuation (one microtask):
      // the drain has already counted its sessions, so this one must not start.
      admission.release();
      refuseConnection(socket, 'FTPP_ERR_SHUTDOWN', 'reply');
      return;
    }
    const { endpoints, settings, release } = admission;
    const session = new Session(socket, {
      id: randomBytes(6).toString('hex'),
      endpoints,
      metrics: this.metrics,
      config: settings.config,
      clientPool: settings.clientPool,
      upstreamPool: settings.upstreamPool,
      advertiser: settings.advertiser,
      kernelForwarder: this.kernelForwarder,
      log: runtime.log,
      onClosed: (closed) => {
        this.sessions.delete(closed);
        release();
      },
    });
    this.sessions.add(session);
    session.start();
  }

  /**
   * Apply a new, already validated configuration. Listeners are matched by name: the same
   * listen address keeps its socket and only new sessions see the new settings; a changed
   * address is bound anew (the old socket stops accepting, its sessions continue); listeners
   * that disappeared stop accepting. On any bind failure nothing changes.
   */
  async reload(next: ProxyConfig): Promise<ReloadResult> {
    if (this.statusValue !== 'running') throw new Error(`cannot reload while ${this.statusValue}`);
    this.ensureKernelPath(next);
    // Bind whatever the new configuration needs before anything changes: on a failure the
    // running listeners are exactly as they were.
    const plans: Array<{ current: ListenerRuntime | null; prepared: PreparedListener }> = [];
    try {
      for (const config of next.listeners) {
        const current = this.runtimes.get(config.name) ?? null;
        plans.push({ current, prepared: await prepareListener(config, this.runtimeDeps, current) });
      }
    } catch (err) {
      await Promise.all(plans.map(({ current, prepared }) => discardPrepared(prepared, current)));
      throw err;
    }
    const result: ReloadResult = { added: [], removed: [], updated: [] };
    for (const [name, runtime] of this.runtimes) {
      if (!next.listeners.some((l) => l.name === name)) {
        runtime.retire();
        this.runtimes.delete(name);
        result.removed.push(name);
      }
    }
    for (const { current, prepared } of plans) {
      if (current) {
        current.apply(prepared);
        result.updated.push(current.name);
      } else {
        const added = new ListenerRuntime(prepared, this.runtimeDeps);
        this.runtimes.set(added.name, added);
        result.added.push(added.name);
      }
    }
    this.deps.log.level = next.log.level;
    this.configValue = next;
    this.logConfigWarnings(next);
    return result;
  }

  /** Once per configuration put in force (start, each reload): what it ignores or overrides. */
  private logConfigWarnings(config: ProxyConfig): void {
    for (const issue of config.warnings) {
      this.deps.log.warn({ event: 'config-warning', key: issue.path, line: issue.line }, issue.message);
    }
  }

  /**
   * Readiness for a load balancer: every listener is bound and its server answers a TCP
   * connect within a short time.
   */
  async readiness(): Promise<{ ready: boolean; checks: Record<string, boolean | string> }> {
    const checks: Record<string, boolean | string> = {};
    let ready = this.statusValue === 'running';
    checks.running = this.statusValue === 'running' || this.statusValue;
    await Promise.all(
      [...this.runtimes.values()].map(async (runtime) => {
        const name = runtime.name;
        const bound = runtime.listening;
        checks[`${name}.listening`] = bound;
        const { selection, bind } = runtime.config.upstream;
        if (selection.kind !== 'fixed') {
          // No one server to check: each session chooses its own (forward, transparent).
          checks[`${name}.upstream`] = `${selection.kind}: chosen per session`;
          if (!bound) ready = false;
          return;
        }
        const reachable = await tcpReachable(selection.host, selection.port, bind);
        checks[`${name}.upstream`] = reachable === true ? true : reachable;
        if (!bound || reachable !== true) ready = false;
      }),
    );
    return { ready, checks };
  }

  /**
   * Stop accepting; let open sessions finish for up to `drainMs`; then send `421` to the rest
   * and wait until all have torn down. Idempotent (the first drain time wins).
   */
  close(drainMs = 0): Promise<void> {
    this.closing ??= this.doClose(drainMs);
    return this.closing;
  }

  /** Skip what is left of the drain time: close every session now. */
  closeNow(): void {
    for (const session of [...this.sessions]) session.abandon('shutdown', REPLY_FOR_CODE.FTPP_ERR_SHUTDOWN);
  }

  private async doClose(drainMs: number): Promise<void> {
    this.statusValue = 'draining';
    // Stop accepting now. server.close()'s callback only runs once every connection it
    // accepted has ended, i.e. after the drain: wait for it at the very end, not here.
    const stopped = [...this.runtimes.values()].map((runtime) => runtime.stopAccepting());
    if (this.sessions.size > 0 && drainMs > 0) {
      this.deps.log.info({ event: 'draining', sessions: this.sessions.size, drainMs }, 'waiting for open sessions to finish');
      let timer: NodeJS.Timeout | null = null;
      await Promise.race([
        Promise.all([...this.sessions].map((session) => session.closed)),
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, drainMs);
        }),
      ]);
      if (timer) clearTimeout(timer);
    }
    const sessions = [...this.sessions];
    if (sessions.length > 0) this.deps.log.info({ event: 'drain-expired', sessions: sessions.length }, 'closing remaining sessions');
    // Drain time is over: nothing waits for a server any more (a hung one included).
    for (const session of sessions) session.abandon('shutdown', REPLY_FOR_CODE.FTPP_ERR_SHUTDOWN);
    await Promise.all(sessions.map((session) => session.closed));
    await Promise.all([...this.runtimes.values()].map((runtime) => runtime.closePorts()));
    // Every session has closed its channels (and their mappings); the table goes last.
    this.kernelForwarder?.close();
    await Promise.all(stopped);
    this.statusValue = 'closed';
  }
}

function defaultKernelForwarder(log: Logger): KernelForwarder {
  const { run, runBatch, reason } = loadNftRunner();
  if (!run) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `the kernel data path needs the native addon and libnftables: ${reason}`);
  const forwarder = new KernelForwarder(run, { runBatch, onWarning: (message, detail) => log.warn({ event: 'kernel-path', ...detail }, message), familyBlocked: (family) => forwardingBlocker(family) });
  // However the process ends short of close() (an uncaught exception), the table goes with
  // it; only SIGKILL leaves it, for the next start to remove (staleTables).
  process.once('exit', () => forwarder.close());
  return forwarder;
}

async function tcpReachable(host: string, port: number, localAddress: string | null): Promise<true | string> {
  const attempt = dial({ host, port, localAddress, timeoutMs: READY_CHECK_TIMEOUT_MS, allowHalfOpen: false });
  try {
    (await attempt.connected).destroy();
    return true;
  } catch (err) {
    return (err as Error).message;
  }
}
