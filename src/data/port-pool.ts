/**
 * Leases listening sockets from a fixed port range. The pool binds the port itself and hands
 * out the bound listener, so there is no probe-then-bind race (unlike ftp-srv's find-port.js).
 * Ports are chosen at random within the range (RFC 2577 §8: predictable ports help port
 * stealing). Exhaustion fails closed: never a port outside the range.
 *
 * Two modes. On demand (default): a lease binds its port and release() closes it. Always
 * bound (bindAll): every port of the range stays bound for the pool's life so a load
 * balancer can health-check it; a lease only routes that port's connections to its holder,
 * and a connection to a port nobody holds is closed at once.
 */
import net from 'node:net';
import { ProxyError } from '../errors.js';
import type { PortRange } from '../config/schema.js';

/** Random picks tried before the pool falls back to a full shuffle of its free ports. */
const RANDOM_PROBES = 4;

export interface PortLease {
  readonly port: number;
  readonly host: string;
  /** Bound listener; created with allowHalfOpen and pauseOnConnect (shared in always-bound mode). */
  readonly server: net.Server;
  /** Route this port's connections to `handler` (null: stop routing). */
  setConnectionHandler(handler: ((socket: net.Socket) => void) | null): void;
  /** Give the port back (on demand: close the listener). Idempotent. */
  release(): void;
}

export interface PortPoolStats {
  readonly size: number;
  readonly leased: number;
}

/**
 * `limits.maxRelayPortsPerIp: auto`: a quarter of the pool, at least 2. A few client
 * addresses repeating PASV across many sessions could otherwise hold every port (50 sessions
 * from 3 addresses took a whole pool in the hardening run, issue #10), while a client behind
 * a shared NAT still gets a fair share of a narrow range.
 */
export function relayPortsPerIpCap(setting: number | 'auto', poolSize: number): number {
  return setting === 'auto' ? Math.max(2, Math.ceil(poolSize / 4)) : setting;
}

export class PortPool {
  readonly range: PortRange;
  /** Most ports one owner (a client address) may hold at once, unless a lease says otherwise. */
  readonly maxPerOwner: number;
  private readonly leased = new Set<number>();
  private readonly perOwner = new Map<string, number>();
  private readonly random: () => number;
  /** Always-bound mode: port -> its permanent listener. */
  private bound: Map<number, net.Server> | null = null;
  private readonly handlers = new Map<number, (socket: net.Socket) => void>();

  constructor(range: PortRange, random: () => number = Math.random, maxPerOwner = Number.POSITIVE_INFINITY) {
    this.range = range;
    this.random = random;
    this.maxPerOwner = this.shareOf(maxPerOwner);
  }

  /** A share as large as the pool is no share: running out is then exhaustion, and says so. */
  shareOf(maxPerOwner: number): number {
    return maxPerOwner >= this.range.last - this.range.first + 1 ? Number.POSITIVE_INFINITY : maxPerOwner;
  }

  /** Ports `owner` holds now. */
  heldBy(owner: string): number {
    return this.perOwner.get(owner) ?? 0;
  }

  get stats(): PortPoolStats {
    const size = this.bound ? this.bound.size : this.range.last - this.range.first + 1;
    return { size, leased: this.leased.size };
  }

  /**
   * Switch to always-bound mode: bind every port of the range on `host` now. Ports another
   * process holds are left out (returned in `failed`) and never leased.
   */
  async bindAll(host: string): Promise<{ bound: number; failed: number[] }> {
    this.bound ??= new Map();
    const failed: number[] = [];
    for (let port = this.range.first; port <= this.range.last; port++) {
      if (this.bound.has(port)) continue;
      const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
      try {
        await listen(server, host, port);
      } catch {
        failed.push(port);
        continue;
      }
      server.on('connection', (socket: net.Socket) => {
        const handler = this.handlers.get(port);
        if (handler) return handler(socket);
        // Nobody expects a connection here: a health check or a stranger. Close at once.
        socket.on('error', () => {});
        socket.destroy();
      });
      this.bound.set(port, server);
    }
    return { bound: this.bound.size, failed };
  }

  /** Close every permanently bound listener (always-bound mode). Idempotent. */
  async close(): Promise<void> {
    const servers = this.bound ? [...this.bound.values()] : [];
    this.bound?.clear();
    this.handlers.clear();
    await Promise.all(servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
  }

  /**
   * Bind a free port of the range on `host`. Ports another process holds (EADDRINUSE) are
   * skipped. Rejects with FTPP_ERR_POOL_EXHAUSTED when every port is taken.
   *
   * A few random probes first: O(1) per PASV while the pool is mostly free, whatever the
   * range's size (the full shuffle below costs a pass over the range, ~0.1 ms per PASV at
   * 10,000 ports). Only a crowded pool pays for the shuffle, which tries every free port once.
   *
   * `owner` (the client address) may hold at most `maxPerOwner` ports at once (the pool's
   * own share unless the caller's settings say otherwise: a reload changes the share for new
   * sessions without a new pool); one more is refused with FTPP_ERR_RELAY_PORTS_PER_IP before
   * any port is touched. Without an owner nothing is counted.
   */
  async lease(host: string, owner: string | null = null, maxPerOwner: number = this.maxPerOwner): Promise<PortLease> {
    if (owner === null) return this.leaseAnyPort(host);
    const held = this.heldBy(owner);
    const share = this.shareOf(maxPerOwner);
    if (held >= share) {
      throw new ProxyError('FTPP_ERR_RELAY_PORTS_PER_IP', `${owner} already holds ${held} of ${this.range.first}-${this.range.last} (limit ${share})`);
    }
    // Counted before the first await: concurrent leases of one owner cannot overshoot.
    this.perOwner.set(owner, held + 1);
    try {
      const lease = await this.leaseAnyPort(host);
      return this.ownedBy(lease, owner);
    } catch (err) {
      this.giveBack(owner);
      throw err;
    }
  }

  private ownedBy(lease: PortLease, owner: string): PortLease {
    let released = false;
    return {
      port: lease.port,
      host: lease.host,
      server: lease.server,
      setConnectionHandler: (handler) => lease.setConnectionHandler(handler),
      release: () => {
        if (released) return;
        released = true;
        lease.release();
        this.giveBack(owner);
      },
    };
  }

  private giveBack(owner: string): void {
    const left = this.heldBy(owner) - 1;
    if (left > 0) this.perOwner.set(owner, left);
    else this.perOwner.delete(owner);
  }

  private async leaseAnyPort(host: string): Promise<PortLease> {
    const size = this.range.last - this.range.first + 1;
    for (let probe = 0; probe < RANDOM_PROBES; probe++) {
      const port = this.range.first + Math.min(size - 1, Math.floor(this.random() * size));
      const lease = await this.tryLease(port, host);
      if (lease) return lease;
    }
    const candidates: number[] = [];
    for (let port = this.range.first; port <= this.range.last; port++) {
      if (this.isFree(port)) candidates.push(port);
    }
    // Fisher-Yates: try every free port at most once, in random order.
    for (let i = candidates.length - 1; i > 0; i--) {
      const j = Math.floor(this.random() * (i + 1));
      [candidates[i], candidates[j]] = [candidates[j]!, candidates[i]!];
    }
    for (const port of candidates) {
      const lease = await this.tryLease(port, host);
      if (lease) return lease;
    }
    throw new ProxyError(
      'FTPP_ERR_POOL_EXHAUSTED',
      `no free port in ${this.range.first}-${this.range.last} on ${host} (${this.leased.size} leased)`,
    );
  }

  private isFree(port: number): boolean {
    return !this.leased.has(port) && (!this.bound || this.bound.has(port));
  }

  /** Lease `port` if it is free and can be bound; null otherwise (taken meanwhile, in use). */
  private async tryLease(port: number, host: string): Promise<PortLease | null> {
    if (!this.isFree(port)) return null;
    const permanent = this.bound?.get(port);
    if (permanent) {
      this.leased.add(port);
      return this.makeBoundLease(permanent, host, port);
    }
    if (this.bound) return null;
    this.leased.add(port);
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
    try {
      await listen(server, host, port);
    } catch (err) {
      this.leased.delete(port);
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EADDRINUSE' || code === 'EACCES') return null;
      throw err;
    }
    return this.makeLease(server, host, port);
  }

  private makeLease(server: net.Server, host: string, port: number): PortLease {
    let released = false;
    let current: ((socket: net.Socket) => void) | null = null;
    const setConnectionHandler = (handler: ((socket: net.Socket) => void) | null): void => {
      if (current) server.removeListener('connection', current);
      current = handler;
      if (handler) server.on('connection', handler);
    };
    const release = (): void => {
      if (released) return;
      released = true;
      setConnectionHandler(null);
      server.close();
      this.leased.delete(port);
    };
    return { port, host, server, setConnectionHandler, release };
  }

  private makeBoundLease(server: net.Server, host: string, port: number): PortLease {
    let released = false;
    const setConnectionHandler = (handler: ((socket: net.Socket) => void) | null): void => {
      if (released) return;
      if (handler) this.handlers.set(port, handler);
      else this.handlers.delete(port);
    };
    const release = (): void => {
      if (released) return;
      this.handlers.delete(port);
      released = true;
      this.leased.delete(port);
    };
    return { port, host, server, setConnectionHandler, release };
  }
}

function listen(server: net.Server, host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      server.removeListener('listening', onListening);
      reject(err);
    };
    const onListening = (): void => {
      server.removeListener('error', onError);
      resolve();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen({ host, port, exclusive: true, backlog: 8 });
  });
}
