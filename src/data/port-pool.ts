/**
 * Leases listening sockets from a fixed port range. The pool binds the port itself and hands
 * out the bound listener, so there is no probe-then-bind race (unlike ftp-srv's find-port.js).
 * Ports are chosen at random within the range (RFC 2577 §8: predictable ports help port
 * stealing). Exhaustion fails closed: never a port outside the range.
 */
import net from 'node:net';
import { ProxyError } from '../errors.js';
import type { PortRange } from '../config/schema.js';

export interface PortLease {
  readonly port: number;
  readonly host: string;
  /** Bound listener; created with allowHalfOpen and pauseOnConnect. */
  readonly server: net.Server;
  /** Close the listener and return the port. Idempotent. */
  release(): void;
}

export interface PortPoolStats {
  readonly size: number;
  readonly leased: number;
}

export class PortPool {
  readonly range: PortRange;
  private readonly leased = new Set<number>();
  private readonly random: () => number;

  constructor(range: PortRange, random: () => number = Math.random) {
    this.range = range;
    this.random = random;
  }

  get stats(): PortPoolStats {
    return { size: this.range.last - this.range.first + 1, leased: this.leased.size };
  }

  /**
   * Bind a free port of the range on `host`. Ports another process holds (EADDRINUSE) are
   * skipped. Rejects with FTPP_ERR_POOL_EXHAUSTED when every port is taken.
   */
  async lease(host: string): Promise<PortLease> {
    const candidates: number[] = [];
    for (let port = this.range.first; port <= this.range.last; port++) {
      if (!this.leased.has(port)) candidates.push(port);
    }
    // Fisher-Yates: try every free port at most once, in random order.
    for (let i = candidates.length - 1; i > 0; i--) {
      const j = Math.floor(this.random() * (i + 1));
      [candidates[i], candidates[j]] = [candidates[j]!, candidates[i]!];
    }
    for (const port of candidates) {
      if (this.leased.has(port)) continue; // taken by a concurrent lease meanwhile
      this.leased.add(port);
      const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
      try {
        await listen(server, host, port);
      } catch (err) {
        this.leased.delete(port);
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EADDRINUSE' || code === 'EACCES') continue;
        throw err;
      }
      return this.makeLease(server, host, port);
    }
    throw new ProxyError(
      'FTPP_ERR_POOL_EXHAUSTED',
      `no free port in ${this.range.first}-${this.range.last} on ${host} (${this.leased.size} leased)`,
    );
  }

  private makeLease(server: net.Server, host: string, port: number): PortLease {
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      server.close();
      this.leased.delete(port);
    };
    return { port, host, server, release };
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
