/**
 * Listeners and the session registry. One net.Server per configured listener; each accepted
 * connection is admitted (PROXY header, ACL, session limits) and becomes a Session.
 * reload() swaps settings for new sessions without touching open ones; close() stops
 * accepting, lets sessions finish for a drain time, then tells the rest "421" and waits
 * until every one has released its resources.
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import type { ListenerConfig, PortRange, ProxyConfig } from './config/schema.js';
import { PortPool, relayPortsPerIpCap } from './data/port-pool.js';
import { readProxyHeader } from './data/proxy-header.js';
import { dial } from './data/dial.js';
import { addressesOf } from './data/socket-address.js';
import { resetSocket } from './data/relay.js';
import { Advertiser, type HostnameResolver } from './advertise.js';
import { Session, type SessionEndpoints } from './session.js';
import type { Logger } from './log.js';
import { ProxyError, REPLY_FOR_CODE, type ErrorCode } from './errors.js';
import { normalizeIp } from './control/ip.js';
import { aclAllows, inAnyCidr } from './server/acl.js';
import { NOOP_METRICS, type ProxyMetrics, type RejectionReason } from './metrics.js';
import { KernelForwarder, loadNftRunner } from './data/kernel-forward.js';

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
}

/** Mutable on reload: new sessions read the current values, open ones keep theirs. */
interface ListenerRuntime {
  config: ListenerConfig;
  server: net.Server;
  clientPool: PortPool;
  upstreamPool: PortPool | null;
  advertiser: Advertiser;
  readonly log: Logger;
  readonly sessions: Set<Session>;
  readonly perIp: Map<string, number>;
}

export type ServerStatus = 'idle' | 'running' | 'draining' | 'closed';

export interface ReloadResult {
  readonly added: string[];
  readonly removed: string[];
  readonly updated: string[];
}

/** How long a refused connection may linger after its 421 before it is destroyed. */
const REFUSAL_LINGER_MS = 2000;
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

  constructor(config: ProxyConfig, deps: ServerDeps) {
    this.configValue = config;
    this.deps = deps;
    this.metrics = deps.metrics ?? NOOP_METRICS;
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
      out.push({ listener: runtime.config.name, pool: 'passive', ...runtime.clientPool.stats });
      if (runtime.upstreamPool) out.push({ listener: runtime.config.name, pool: 'active', ...runtime.upstreamPool.stats });
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
      for (const config of this.configValue.listeners) this.runtimes.set(config.name, await this.bind(config));
    } catch (err) {
      await this.close(0);
      throw err;
    }
    return this.addresses();
  }

  /**
   * Open the nftables table once some listener asks for `client.dataPath: kernel`. An
   * operator who asked for it gets a startup (or reload) error, not a silent relay.
   */
  private ensureKernelPath(config: ProxyConfig): void {
    if (this.kernelForwarder || !config.listeners.some((l) => l.client.dataPath === 'kernel')) return;
    const open = this.deps.openKernelForwarder ?? (() => defaultKernelForwarder(this.deps.log));
    this.kernelForwarder = open();
    this.deps.log.info({ event: 'kernel-path', table: this.kernelForwarder.table }, 'kernel data path ready (nftables)');
  }

  addresses(): BoundListener[] {
    return [...this.runtimes.values()].map((runtime) => {
      const address = runtime.server.address() as net.AddressInfo;
      return { name: runtime.config.name, host: address.address, port: address.port };
    });
  }

  private makePools(config: ListenerConfig): { clientPool: PortPool; upstreamPool: PortPool | null } {
    const pool = (range: PortRange): PortPool =>
      new PortPool(range, Math.random, relayPortsPerIpCap(config.limits.maxRelayPortsPerIp, range.last - range.first + 1));
    return {
      clientPool: pool(config.client.passivePorts),
      upstreamPool: config.upstream.activePorts ? pool(config.upstream.activePorts) : null,
    };
  }

  /** Pools for a listener; with bindAllPassivePorts every relay port is bound now. */
  private async preparePools(config: ListenerConfig, log: Logger): Promise<{ clientPool: PortPool; upstreamPool: PortPool | null }> {
    const pools = this.makePools(config);
    if (config.client.bindAllPassivePorts) {
      const { bound, failed } = await pools.clientPool.bindAll(config.listen.host);
      if (failed.length > 0) log.warn({ event: 'passive-ports-unavailable', ports: failed }, 'some passive ports are in use by another process and will not be used');
      if (bound === 0) {
        await pools.clientPool.close();
        throw new Error(`listener ${config.name}: none of passivePorts ${config.client.passivePorts.first}-${config.client.passivePorts.last} could be bound`);
      }
    }
    return pools;
  }

  private async bind(config: ListenerConfig): Promise<ListenerRuntime> {
    const log = this.deps.log.child({ listener: config.name });
    const server = await listen(config);
    let pools;
    try {
      pools = await this.preparePools(config, log);
    } catch (err) {
      server.close();
      throw err;
    }
    const runtime: ListenerRuntime = {
      config,
      server,
      ...pools,
      advertiser: new Advertiser(config.client, this.deps.resolver),
      log,
      sessions: new Set(),
      perIp: new Map(),
    };
    this.attach(runtime);
    this.registerPools(runtime);
    const address = server.address() as net.AddressInfo;
    log.info(
      {
        event: 'listening',
        listen: `${address.address}:${address.port}`,
        upstream: `${config.upstream.host}:${config.upstream.port}`,
        dataMode: config.upstream.dataMode,
        passivePorts: `${config.client.passivePorts.first}-${config.client.passivePorts.last}`,
        proxyProtocol: config.proxyProtocol.accept,
      },
      'listening',
    );
    return runtime;
  }

  private attach(runtime: ListenerRuntime): void {
    runtime.server.on('connection', (socket) => void this.admit(runtime, socket));
    runtime.server.on('error', (err) => runtime.log.error({ event: 'listener-error', err }, 'listener error'));
  }

  private registerPools(runtime: ListenerRuntime): void {
    const name = runtime.config.name;
    this.metrics.registerPool(name, 'passive', () => runtime.clientPool.stats);
    if (runtime.upstreamPool) {
      this.metrics.registerPool(name, 'active', () => runtime.upstreamPool?.stats ?? { size: 0, leased: 0 });
    }
  }

  /**
   * Admission: the PROXY header (when configured) says who the client really is; the ACL and
   * the session limits are checked on that address, before anything reaches the server.
   */
  private async admit(runtime: ListenerRuntime, socket: net.Socket): Promise<void> {
    socket.on('error', () => {}); // a reset during admission must not crash the process
    const config = runtime.config;
    const log = runtime.log;
    // Before anything else: a peer that reset the connection before we looked has no address
    // to check against the ACL or the limits, so it gets nothing (issue #10; socket-address.ts).
    const addresses = addressesOf(socket);
    if (!addresses) {
      this.metrics.limitHit(config.name, 'peer-gone');
      log.debug({ event: 'rejected', limit: 'peer-gone' }, 'connection reset before admission; closed unread');
      resetSocket(socket);
      return;
    }
    const peer = addresses.remote;
    const peerIp = peer.ip;
    if (this.statusValue !== 'running') {
      refuse(socket, 'FTPP_ERR_SHUTDOWN', 'reply');
      return;
    }
    let endpoints: SessionEndpoints = {
      client: peer,
      dialled: addresses.local,
      local: addresses.local,
      initialData: null,
    };
    const pp = config.proxyProtocol;
    if (pp.accept !== 'off') {
      if (!inAnyCidr(peerIp, pp.from)) {
        this.rejected(runtime, 'proxy-protocol', { from: `${peerIp}:${peer.port}`, err: 'sender is not a trusted load balancer' });
        socket.destroy();
        return;
      }
      try {
        const { header, rest } = await readProxyHeader(socket, pp.accept, pp.timeoutMs);
        if (header.command === 'local') {
          // Load-balancer health check (v2 LOCAL / v1 UNKNOWN): nothing to proxy.
          log.debug({ event: 'proxy-local', from: `${peerIp}:${peer.port}` }, 'PROXY LOCAL connection closed');
          socket.end();
          socket.setTimeout(REFUSAL_LINGER_MS, () => socket.destroy());
          return;
        }
        endpoints = {
          client: { ip: normalizeIp(header.source.host), port: header.source.port },
          dialled: { ip: normalizeIp(header.destination.host), port: header.destination.port },
          local: addresses.local,
          initialData: rest,
        };
      } catch (err) {
        this.rejected(runtime, 'proxy-protocol', { from: `${peerIp}:${peer.port}`, err: (err as Error).message });
        socket.destroy();
        return;
      }
      if (this.statusValue !== 'running' || socket.destroyed) {
        refuse(socket, 'FTPP_ERR_SHUTDOWN', 'reply');
        return;
      }
    }
    const clientIp = endpoints.client.ip;
    const clientText = `${clientIp}:${endpoints.client.port}`;
    if (!aclAllows(clientIp, config)) {
      this.rejected(runtime, 'acl-deny', { client: clientText });
      refuse(socket, 'FTPP_ERR_ACL_DENIED', config.acl.action);
      return;
    }
    if (runtime.sessions.size >= config.limits.maxSessions) {
      this.rejected(runtime, 'sessions-total', { client: clientText, max: config.limits.maxSessions });
      refuse(socket, 'FTPP_ERR_TOO_MANY_SESSIONS', 'reply');
      return;
    }
    if ((runtime.perIp.get(clientIp) ?? 0) >= config.limits.maxSessionsPerIp) {
      this.rejected(runtime, 'sessions-per-ip', { client: clientText, max: config.limits.maxSessionsPerIp });
      refuse(socket, 'FTPP_ERR_TOO_MANY_SESSIONS', 'reply');
      return;
    }
    const session = new Session(socket, {
      id: randomBytes(6).toString('hex'),
      endpoints,
      metrics: this.metrics,
      config,
      clientPool: runtime.clientPool,
      upstreamPool: runtime.upstreamPool,
      advertiser: runtime.advertiser,
      kernelForwarder: this.kernelForwarder,
      log,
      onClosed: (closed) => {
        this.sessions.delete(closed);
        runtime.sessions.delete(closed);
        const left = (runtime.perIp.get(clientIp) ?? 1) - 1;
        if (left > 0) runtime.perIp.set(clientIp, left);
        else runtime.perIp.delete(clientIp);
      },
    });
    this.sessions.add(session);
    runtime.sessions.add(session);
    runtime.perIp.set(clientIp, (runtime.perIp.get(clientIp) ?? 0) + 1);
    session.start();
  }

  private rejected(runtime: ListenerRuntime, reason: RejectionReason, fields: Record<string, unknown>): void {
    this.metrics.limitHit(runtime.config.name, reason);
    runtime.log.warn({ ...fields, event: 'rejected', limit: reason }, `connection refused: ${reason}`);
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
    const fresh = new Map<string, net.Server>();
    try {
      for (const config of next.listeners) {
        const current = this.runtimes.get(config.name);
        if (!current || !sameListen(current.config, config)) fresh.set(config.name, await listen(config));
      }
    } catch (err) {
      for (const server of fresh.values()) server.close();
      throw err;
    }
    const result: ReloadResult = { added: [], removed: [], updated: [] };
    for (const [name, runtime] of this.runtimes) {
      if (!next.listeners.some((l) => l.name === name)) {
        runtime.server.close();
        this.runtimes.delete(name);
        result.removed.push(name);
        runtime.log.info({ event: 'listener-removed' }, 'listener removed; open sessions continue');
      }
    }
    for (const config of next.listeners) {
      const runtime = this.runtimes.get(config.name);
      const server = fresh.get(config.name);
      if (!runtime) {
        const log = this.deps.log.child({ listener: config.name });
        const added: ListenerRuntime = {
          config,
          server: server!,
          ...(await this.preparePools(config, log)),
          advertiser: new Advertiser(config.client, this.deps.resolver),
          log,
          sessions: new Set(),
          perIp: new Map(),
        };
        this.attach(added);
        this.registerPools(added);
        this.runtimes.set(config.name, added);
        result.added.push(config.name);
        continue;
      }
      if (server) {
        runtime.server.close();
        runtime.server = server;
        this.attach(runtime);
      }
      const old = runtime.config;
      if (!samePorts(old, config)) {
        if (old.client.bindAllPassivePorts || config.client.bindAllPassivePorts) {
          // Permanently bound ports cannot be handed over while open sessions hold leases.
          runtime.log.warn({ event: 'reload-ports-skipped' }, 'passivePorts/activePorts changes with bindAllPassivePorts need a restart; keeping the current ports');
        } else {
          Object.assign(runtime, this.makePools(config));
          this.registerPools(runtime);
        }
      }
      runtime.advertiser = new Advertiser(config.client, this.deps.resolver);
      runtime.config = config;
      result.updated.push(config.name);
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
        const name = runtime.config.name;
        const bound = runtime.server.listening;
        checks[`${name}.listening`] = bound;
        const reachable = await tcpReachable(runtime.config.upstream.host, runtime.config.upstream.port, runtime.config.upstream.bind);
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
    const stopped = [...this.runtimes.values()].map((runtime) => new Promise<void>((resolve) => runtime.server.close(() => resolve())));
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
    await Promise.all([...this.runtimes.values()].map((runtime) => runtime.clientPool.close()));
    // Every session has closed its channels (and their mappings); the table goes last.
    this.kernelForwarder?.close();
    await Promise.all(stopped);
    this.statusValue = 'closed';
  }
}

function defaultKernelForwarder(log: Logger): KernelForwarder {
  const { run, reason } = loadNftRunner();
  if (!run) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `client.dataPath: kernel needs the native addon and libnftables: ${reason}`);
  const forwarder = new KernelForwarder(run, { onWarning: (message, detail) => log.warn({ event: 'kernel-path', ...detail }, message) });
  // However the process ends short of close() (an uncaught exception), the table goes with
  // it; only SIGKILL leaves it, for the next start to remove (staleTables).
  process.once('exit', () => forwarder.close());
  return forwarder;
}

function listen(config: ListenerConfig): Promise<net.Server> {
  // pauseOnConnect: nothing is read until admission is done and the session is listening.
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
  return new Promise<net.Server>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: config.listen.host, port: config.listen.port, backlog: 511 }, () => {
      server.removeListener('error', reject);
      resolve(server);
    });
  });
}

function sameListen(a: ListenerConfig, b: ListenerConfig): boolean {
  return a.listen.host === b.listen.host && a.listen.port === b.listen.port;
}

function samePorts(a: ListenerConfig, b: ListenerConfig): boolean {
  const range = (r: { first: number; last: number } | null): string => (r ? `${r.first}-${r.last}` : '');
  return range(a.client.passivePorts) === range(b.client.passivePorts)
    && range(a.upstream.activePorts) === range(b.upstream.activePorts)
    && a.client.bindAllPassivePorts === b.client.bindAllPassivePorts;
}

function refuse(socket: net.Socket, code: ErrorCode, action: 'reply' | 'close'): void {
  if (action === 'close') {
    socket.destroy();
    return;
  }
  socket.end(`${REPLY_FOR_CODE[code]}\r\n`);
  // Read (and drop) what the client still sends so its FIN is seen and the socket closes as
  // soon as the client does; the timer only bounds a client that never closes.
  socket.resume();
  socket.once('end', () => socket.destroy());
  socket.setTimeout(REFUSAL_LINGER_MS, () => socket.destroy());
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
