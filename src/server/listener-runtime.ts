/**
 * One listener at run time: its listening socket, the settings new sessions are built from
 * (configuration, relay port pools, 227 advertiser), its logger and its session slots.
 *
 * prepareListener() is the one place that builds a listener from its ListenerConfig, for the
 * first bind and for every reload alike:
 * - the listen address is bound only when it is new or changed (a kept address keeps its
 *   socket and never stops accepting);
 * - relay port pools are built only when their ranges changed, and with bindAllPassivePorts
 *   every port is bound at once; when either side of a change has bindAllPassivePorts the
 *   current pools stay (permanently bound ports cannot be handed over while open sessions
 *   hold leases), which apply() reports;
 * - the advertiser is always new (a changed `advertise`, a fresh DNS cache).
 * Preparing binds everything that can fail and changes nothing; apply() then swaps the
 * settings in one step. Open sessions keep the settings object they were built from.
 */
import net from 'node:net';
import type { ListenerConfig, PortRange } from '../config/schema.js';
import { PortPool, relayPortsPerIpCap } from '../data/port-pool.js';
import { Advertiser, type HostnameResolver } from '../advertise.js';
import type { Logger } from '../log.js';
import type { ProxyMetrics } from '../metrics.js';
import { SessionSlots } from './session-slots.js';
import { originalDestinationUnavailable } from './original-destination.js';
import { ProxyError } from '../errors.js';
import { sourcePortBindProblem } from '../data/source-port.js';

/**
 * What a session of this listener is built from; replaced whole on reload, never changed.
 * (TLS contexts and the upstream selector belong here once they exist.)
 */
export interface ListenerSettings {
  readonly config: ListenerConfig;
  /**
   * The configuration the pools were built from: with bindAllPassivePorts a reload may keep
   * the pools while `config` moves on, and the next reload must compare with what is bound.
   */
  readonly poolsConfig: ListenerConfig;
  readonly clientPool: PortPool;
  readonly upstreamPool: PortPool | null;
  readonly advertiser: Advertiser;
}

export interface ListenerRuntimeDeps {
  /** The root logger; each listener logs through a child with `listener: <name>`. */
  readonly log: Logger;
  readonly metrics: ProxyMetrics;
  readonly resolver?: HostnameResolver | undefined;
  /** Every connection a listener accepts (paused: pauseOnConnect) goes here. */
  readonly accept: (runtime: ListenerRuntime, socket: net.Socket) => void;
}

/** A listener built from a configuration but not yet in force (see apply()). */
export interface PreparedListener {
  readonly log: Logger;
  readonly server: net.Server;
  readonly settings: ListenerSettings;
  /** The relay port ranges changed but the current pools were kept (bindAllPassivePorts). */
  readonly portsKept: boolean;
}

/**
 * Build the listener `config` describes, reusing what `current` (the running listener of the
 * same name, if any) already has. Rejects, having released what it bound, when the listen
 * address or (bindAllPassivePorts) every relay port cannot be bound.
 */
export async function prepareListener(config: ListenerConfig, deps: ListenerRuntimeDeps, current: ListenerRuntime | null): Promise<PreparedListener> {
  refuseWithoutInterception(config);
  const log = current?.log ?? deps.log.child({ listener: config.name });
  const previous = current?.settings ?? null;
  const server = current && previous && sameListen(previous.config, config) ? current.boundServer : await listen(config);
  try {
    const { pools, portsKept } = await preparePools(config, log, previous);
    warnSourcePortPrivilege(config, log);
    return { log, server, settings: { config, ...pools, advertiser: new Advertiser(config.client, deps.resolver) }, portsKept };
  } catch (err) {
    if (server !== current?.boundServer) server.close();
    throw err;
  }
}

/**
 * `upstream.transparent` needs the kernel's original destination of every accepted
 * connection (SO_ORIGINAL_DST through the native addon): without it every session would be
 * refused, so the listener does not start (and a reload to it is rejected) and says why.
 */
function refuseWithoutInterception(config: ListenerConfig): void {
  if (config.upstream.selection.kind !== 'transparent') return;
  const unavailable = originalDestinationUnavailable();
  if (unavailable) throw new ProxyError('FTPP_ERR_CONFIG', `listener ${config.name}: upstream.transparent cannot read where redirected clients were going: ${unavailable}`);
}

/** client.dataSourcePort < 1024 without CAP_NET_BIND_SERVICE: say so at start, not at the first PORT client's 425. */
function warnSourcePortPrivilege(config: ListenerConfig, log: Logger): void {
  const port = config.client.dataSourcePort;
  const problem = port === null ? null : sourcePortBindProblem(port);
  if (problem) log.warn({ event: 'data-source-port-unprivileged', dataSourcePort: port, missing: 'CAP_NET_BIND_SERVICE' }, problem);
}

/** What the `listening` line says about the server: the fixed one, or how each session chooses it. */
function upstreamDescription(config: ListenerConfig): string {
  const { selection } = config.upstream;
  return selection.kind === 'fixed' ? `${selection.host}:${selection.port}` : `${selection.kind} (chosen per session)`;
}

/** Release what `prepared` bound beyond what `current` already had (a reload that failed). */
export async function discardPrepared(prepared: PreparedListener, current: ListenerRuntime | null): Promise<void> {
  if (prepared.server !== current?.boundServer) {
    prepared.server.close();
    for (const socket of unpark(prepared.server)) socket.destroy();
  }
  if (prepared.settings.clientPool !== current?.settings.clientPool) await prepared.settings.clientPool.close();
}

export class ListenerRuntime {
  readonly name: string;
  readonly log: Logger;
  /** Open sessions, counted for limits.maxSessions and limits.maxSessionsPerIp. */
  readonly slots = new SessionSlots();
  private readonly deps: ListenerRuntimeDeps;
  private server: net.Server;
  private current: ListenerSettings;

  constructor(prepared: PreparedListener, deps: ListenerRuntimeDeps) {
    this.name = prepared.settings.config.name;
    this.log = prepared.log;
    this.deps = deps;
    this.current = prepared.settings;
    this.server = prepared.server;
    this.attach(prepared.server);
    this.registerPools();
  }

  /** Bind a listener at start and log where it listens. */
  static async open(config: ListenerConfig, deps: ListenerRuntimeDeps): Promise<ListenerRuntime> {
    const runtime = new ListenerRuntime(await prepareListener(config, deps, null), deps);
    const { host, port } = runtime.address();
    runtime.log.info(
      {
        event: 'listening',
        listen: `${host}:${port}`,
        upstream: upstreamDescription(config),
        dataMode: config.upstream.dataMode,
        passivePorts: `${config.client.passivePorts.first}-${config.client.passivePorts.last}`,
        proxyProtocol: config.proxyProtocol.accept,
      },
      'listening',
    );
    return runtime;
  }

  /** The settings a session admitted now is built from. */
  get settings(): ListenerSettings {
    return this.current;
  }

  get config(): ListenerConfig {
    return this.current.config;
  }

  /** The listening socket (prepareListener reuses it when the listen address is kept). */
  get boundServer(): net.Server {
    return this.server;
  }

  get listening(): boolean {
    return this.server.listening;
  }

  address(): { host: string; port: number } {
    const address = this.server.address() as net.AddressInfo;
    return { host: address.address, port: address.port };
  }

  /** Put a prepared reload of this listener in force; sessions already open are untouched. */
  apply(prepared: PreparedListener): void {
    if (prepared.server !== this.server) {
      // A changed listen address: the old socket stops accepting, its sessions continue.
      this.server.close();
      this.server = prepared.server;
      this.attach(prepared.server);
    }
    if (prepared.portsKept) {
      this.log.warn({ event: 'reload-ports-skipped' }, 'passivePorts/activePorts changes with bindAllPassivePorts need a restart; keeping the current ports');
    }
    const poolsReplaced = prepared.settings.clientPool !== this.current.clientPool;
    this.current = prepared.settings;
    if (poolsReplaced) this.registerPools();
  }

  /** The listener left the configuration: stop accepting; open sessions continue. */
  retire(): void {
    this.server.close();
    this.log.info({ event: 'listener-removed' }, 'listener removed; open sessions continue');
    // Ports bound for the listener's life (bindAllPassivePorts) go once its last session has.
    this.slots.whenEmpty(() => void this.closePorts());
  }

  /**
   * Stop accepting now. Resolves only once every connection this socket accepted has ended
   * (net.Server.close()), i.e. after the sessions are gone.
   */
  stopAccepting(): Promise<void> {
    return new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** Unbind the relay ports held for the listener's life (bindAllPassivePorts). */
  closePorts(): Promise<void> {
    return this.current.clientPool.close();
  }

  private attach(server: net.Server): void {
    const early = unpark(server);
    server.on('connection', (socket: net.Socket) => this.deps.accept(this, socket));
    server.on('error', (err) => this.log.error({ event: 'listener-error', err }, 'listener error'));
    for (const socket of early) this.deps.accept(this, socket);
  }

  /** Pool occupancy for the metrics; the callbacks read the settings in force at scrape time. */
  private registerPools(): void {
    this.deps.metrics.registerPool(this.name, 'passive', () => this.current.clientPool.stats);
    if (this.current.upstreamPool) {
      this.deps.metrics.registerPool(this.name, 'active', () => this.current.upstreamPool?.stats ?? { size: 0, leased: 0 });
    }
  }
}

/** Pools for `config`: the previous ones when the ranges are unchanged or cannot change now. */
async function preparePools(
  config: ListenerConfig,
  log: Logger,
  previous: ListenerSettings | null,
): Promise<{ pools: Pick<ListenerSettings, 'clientPool' | 'upstreamPool' | 'poolsConfig'>; portsKept: boolean }> {
  if (previous) {
    const kept = { clientPool: previous.clientPool, upstreamPool: previous.upstreamPool, poolsConfig: previous.poolsConfig };
    if (samePorts(previous.poolsConfig, config)) return { pools: kept, portsKept: false };
    // Permanently bound ports cannot be handed over while open sessions hold leases.
    if (previous.poolsConfig.client.bindAllPassivePorts || config.client.bindAllPassivePorts) return { pools: kept, portsKept: true };
  }
  const pool = (range: PortRange): PortPool =>
    new PortPool(range, Math.random, relayPortsPerIpCap(config.limits.maxRelayPortsPerIp, range.last - range.first + 1));
  const pools = {
    clientPool: pool(config.client.passivePorts),
    upstreamPool: config.upstream.activePorts ? pool(config.upstream.activePorts) : null,
    poolsConfig: config,
  };
  if (config.client.bindAllPassivePorts) {
    const { bound, failed } = await pools.clientPool.bindAll(config.listen.host);
    if (failed.length > 0) log.warn({ event: 'passive-ports-unavailable', ports: failed }, 'some passive ports are in use by another process and will not be used');
    if (bound === 0) {
      await pools.clientPool.close();
      throw new Error(`listener ${config.name}: none of passivePorts ${config.client.passivePorts.first}-${config.client.passivePorts.last} could be bound`);
    }
  }
  return { pools, portsKept: false };
}

/**
 * Connections a freshly bound socket accepted before its listener was put in force (a reload
 * binds first and applies later): held, paused, until attach() hands them to admission or a
 * failed reload closes them. Without this they were accepted and never handled.
 */
const parked = new WeakMap<net.Server, { sockets: net.Socket[]; park: (socket: net.Socket) => void }>();

function unpark(server: net.Server): net.Socket[] {
  const held = parked.get(server);
  if (!held) return [];
  parked.delete(server);
  server.removeListener('connection', held.park);
  return held.sockets.filter((socket) => !socket.destroyed);
}

function listen(config: ListenerConfig): Promise<net.Server> {
  // pauseOnConnect: nothing is read until admission is done and the session is listening.
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
  const held = { sockets: [] as net.Socket[], park: (socket: net.Socket): void => {
    socket.on('error', () => {});
    held.sockets.push(socket);
  } };
  parked.set(server, held);
  server.on('connection', held.park);
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
  const range = (r: PortRange | null): string => (r ? `${r.first}-${r.last}` : '');
  return range(a.client.passivePorts) === range(b.client.passivePorts)
    && range(a.upstream.activePorts) === range(b.upstream.activePorts)
    && a.client.bindAllPassivePorts === b.client.bindAllPassivePorts;
}
