/**
 * Listeners and the session registry. One net.Server per configured listener; each accepted
 * client becomes a Session. close() stops accepting, tells open sessions the service is
 * going away (421) and waits for every one of them to release its resources.
 */
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import type { ListenerConfig, ProxyConfig } from './config/schema.js';
import { PortPool } from './data/port-pool.js';
import { Advertiser, type HostnameResolver } from './advertise.js';
import { Session } from './session.js';
import type { Logger } from './log.js';
import { REPLY_FOR_CODE } from './errors.js';

export interface BoundListener {
  readonly name: string;
  readonly host: string;
  readonly port: number;
}

export interface ServerDeps {
  readonly log: Logger;
  readonly resolver?: HostnameResolver;
}

interface ListenerRuntime {
  readonly config: ListenerConfig;
  readonly server: net.Server;
  readonly clientPool: PortPool;
  readonly upstreamPool: PortPool | null;
  readonly advertiser: Advertiser;
  readonly log: Logger;
}

export type ServerStatus = 'idle' | 'running' | 'closing' | 'closed';

export class ProxyServer {
  readonly config: ProxyConfig;
  private readonly deps: ServerDeps;
  private readonly runtimes: ListenerRuntime[] = [];
  private readonly sessions = new Set<Session>();
  private statusValue: ServerStatus = 'idle';
  private closing: Promise<void> | null = null;

  constructor(config: ProxyConfig, deps: ServerDeps) {
    this.config = config;
    this.deps = deps;
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
    for (const runtime of this.runtimes) {
      out.push({ listener: runtime.config.name, pool: 'passive', ...runtime.clientPool.stats });
      if (runtime.upstreamPool) out.push({ listener: runtime.config.name, pool: 'active', ...runtime.upstreamPool.stats });
    }
    return out;
  }

  /** Bind every listener; rejects (and unbinds what was bound) if any fails. */
  async start(): Promise<BoundListener[]> {
    if (this.statusValue !== 'idle') throw new Error('server already started');
    this.statusValue = 'running';
    try {
      for (const config of this.config.listeners) this.runtimes.push(await this.bind(config));
    } catch (err) {
      await this.close();
      throw err;
    }
    return this.addresses();
  }

  addresses(): BoundListener[] {
    return this.runtimes.map((runtime) => {
      const address = runtime.server.address() as net.AddressInfo;
      return { name: runtime.config.name, host: address.address, port: address.port };
    });
  }

  private async bind(config: ListenerConfig): Promise<ListenerRuntime> {
    const log = this.deps.log.child({ listener: config.name });
    const server = net.createServer({ allowHalfOpen: true });
    const runtime: ListenerRuntime = {
      config,
      server,
      clientPool: new PortPool(config.client.passivePorts),
      upstreamPool: config.upstream.activePorts ? new PortPool(config.upstream.activePorts) : null,
      advertiser: new Advertiser(config.client, this.deps.resolver),
      log,
    };
    server.on('connection', (socket) => this.accept(runtime, socket));
    server.on('error', (err) => log.error({ event: 'listener-error', err }, 'listener error'));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: config.listen.host, port: config.listen.port, backlog: 511 }, () => {
        server.removeListener('error', reject);
        resolve();
      });
    });
    const address = server.address() as net.AddressInfo;
    log.info(
      {
        event: 'listening',
        listen: `${address.address}:${address.port}`,
        upstream: `${config.upstream.host}:${config.upstream.port}`,
        dataMode: config.upstream.dataMode,
        passivePorts: `${config.client.passivePorts.first}-${config.client.passivePorts.last}`,
      },
      'listening',
    );
    return runtime;
  }

  private accept(runtime: ListenerRuntime, socket: net.Socket): void {
    if (this.statusValue !== 'running') {
      socket.end(`${REPLY_FOR_CODE.FTPP_ERR_SHUTDOWN}\r\n`);
      return;
    }
    const session = new Session(socket, {
      id: randomBytes(6).toString('hex'),
      config: runtime.config,
      clientPool: runtime.clientPool,
      upstreamPool: runtime.upstreamPool,
      advertiser: runtime.advertiser,
      log: runtime.log,
      onClosed: (closed) => this.sessions.delete(closed),
    });
    this.sessions.add(session);
    session.start();
  }

  /**
   * Stop accepting, send `421` to every open session and wait until all have torn down.
   * Idempotent.
   */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    this.statusValue = 'closing';
    const stopped = this.runtimes.map((runtime) => new Promise<void>((resolve) => runtime.server.close(() => resolve())));
    const sessions = [...this.sessions];
    for (const session of sessions) session.beginClose('shutdown', REPLY_FOR_CODE.FTPP_ERR_SHUTDOWN);
    await Promise.all([...stopped, ...sessions.map((session) => session.closed)]);
    this.statusValue = 'closed';
  }
}
