/**
 * Helpers for the server unit tests (test/server/): configurations from small YAML texts, a
 * ProxyMetrics that records every call, a pino logger writing into memory, free loopback
 * ports, and plain TCP connects. Not a test file itself (tap runs only *.test.ts).
 */
import net from 'node:net';
import { validateConfigText } from '../../src/config/load.js';
import type { ListenerConfig, ProxyConfig } from '../../src/config/schema.js';
import type { KernelMappingOutcome, PoolKind, PoolStats, ProxyMetrics, RejectionReason } from '../../src/metrics.js';
import { connectResult as connectOutcome } from './ops.js';

export interface ListenerYaml {
  readonly name: string;
  readonly listen?: string;
  readonly passivePorts: string;
  readonly activePorts?: string;
  readonly bindAllPassivePorts?: boolean;
  readonly advertise?: string;
  /** Extra lines under the listener, indented by 4 spaces (acl:, limits:, proxyProtocol:). */
  readonly lines?: readonly string[];
}

/** A whole configuration with these listeners (the upstream is never dialled by these tests). */
export function configFor(...listeners: ListenerYaml[]): ProxyConfig {
  const yaml = [
    'log: { level: debug }',
    'listeners:',
    ...listeners.flatMap((l) => [
      `  - name: ${l.name}`,
      `    listen: "${l.listen ?? '127.0.0.1:0'}"`,
      '    upstream:',
      '      host: 127.0.0.1',
      '      port: 2121',
      ...(l.activePorts ? [`      activePorts: "${l.activePorts}"`] : []),
      '    client:',
      `      advertise: ${l.advertise ?? 'auto'}`,
      `      passivePorts: "${l.passivePorts}"`,
      ...(l.bindAllPassivePorts ? ['      bindAllPassivePorts: true'] : []),
      ...(l.lines ?? []),
    ]),
    '',
  ].join('\n');
  return validateConfigText(yaml, 'server-unit-test');
}

/** The single listener of `configFor(listener)`. */
export function listenerConfig(listener: ListenerYaml): ListenerConfig {
  return configFor(listener).listeners[0]!;
}

export type LogRecord = Record<string, unknown>;

/** A pino logger (the proxy's own settings) whose records are kept in memory. */
export { memoryLogger } from './logs.js';

/** Every ProxyMetrics call, in order. */
export class RecordingMetrics implements ProxyMetrics {
  readonly limitHits: Array<{ listener: string; reason: RejectionReason }> = [];
  readonly poolRegistrations: Array<{ listener: string; pool: PoolKind }> = [];
  /** The latest stats callback per `listener/pool`, as a scrape would call it. */
  readonly pools = new Map<string, () => PoolStats>();
  sessionsOpened = 0;

  sessionOpened(): void {
    this.sessionsOpened += 1;
  }
  sessionClosed(): void {}
  transferFinished(): void {}
  transferWireBytes(): void {}
  limitHit(listener: string, reason: RejectionReason): void {
    this.limitHits.push({ listener, reason });
  }
  upstreamConnect(): void {}
  dataStranger(): void {}
  kernelMapping(_listener: string, _outcome: KernelMappingOutcome): void {}
  kernelFallback(): void {}
  tlsHandshake(): void {}
  upstreamChoice(): void {}
  registerPool(listener: string, pool: PoolKind, stats: () => PoolStats): void {
    this.poolRegistrations.push({ listener, pool });
    this.pools.set(`${listener}/${pool}`, stats);
  }
}

/** A loopback port nobody listens on right now (the vsftpd helper's). */
export { freePort } from './vsftpd.js';

/** Listen on host:port (the test holds a port the code under test wants); closed by the caller. */
export function occupy(port: number, host = '127.0.0.1'): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const server = net.createServer((socket) => socket.destroy());
    server.once('error', reject);
    server.listen({ host, port, exclusive: true }, () => resolve(server));
  });
}

export function closeServer(server: net.Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/** Connect once: 'connected' or the error code (ECONNREFUSED...). */
/** ops.ts's connectResult with the port first (most calls here name only a port). */
export function connectResult(port: number, host = '127.0.0.1', timeoutMs = 3000): Promise<string> {
  return connectOutcome(host, port, timeoutMs);
}
