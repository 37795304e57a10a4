/**
 * Operator metrics behind an interface. The proxy calls ProxyMetrics at the points that matter
 * to whoever runs it (sessions, transfers, refusals, upstream reachability, relay ports);
 * createPromMetrics() turns those calls into Prometheus series in a registry of its own, and
 * NOOP_METRICS lets tests and embedders run without any. Every series is named `ftpnp_*`;
 * the README "Metrics" table lists them.
 *
 * Calls come from hot paths (session teardown, relay end), so no method throws: values that
 * Prometheus cannot represent (negative or non-finite byte counts or durations) are dropped
 * rather than raised into the session.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { KERNEL_FALLBACK_REASONS, type KernelFallbackReason } from './data/kernel-nft.js';

/** How a data transfer ended: completed, failed (error on either leg), or aborted (ABOR, session close). */
export type TransferResult = 'ok' | 'failed' | 'aborted';

/** Why the proxy refused or ended something because a limit or policy said so. */
export type RejectionReason =
  | 'sessions-total'
  | 'sessions-per-ip'
  | 'passive-listeners'
  /** A client address already held limits.maxRelayPortsPerIp ports of a pool. */
  | 'relay-ports-per-ip'
  | 'login-timeout'
  | 'idle-timeout'
  | 'data-accept-timeout'
  | 'data-idle-timeout'
  | 'upstream-connect-timeout'
  | 'line-too-long'
  | 'acl-deny'
  | 'proxy-protocol'
  /** The peer reset its connection before admission: no address to check, closed unread. */
  | 'peer-gone'
  /** Forward mode: limits.maxLoginAttempts destinations refused in one session. */
  | 'login-attempts';

/**
 * Direction of a data transfer, seen from the client (RETR/LIST = download, STOR/APPE = upload);
 * the same values as control/rewrite.ts's TransferDirection, spelled out to keep this module
 * free of protocol imports.
 */
type Direction = 'download' | 'upload';

/** Which relay port range a pool serves: client-facing passive ports, or server-facing active ports. */
export type PoolKind = 'passive' | 'active';

export type KernelMappingOutcome = 'added' | 'skipped' | 'failed';

/** Which leg a TLS handshake was on: toward the client (proxy is TLS server) or the server (proxy is TLS client). */
export type TlsLeg = 'client' | 'server';
/** The connection a TLS handshake protected. */
export type TlsChannel = 'control' | 'data';
/** ok; failed (error, timeout, certificate); not-resumed (a data connection refused under dataSessionReuse: required). */
export type TlsHandshakeResult = 'ok' | 'failed' | 'not-resumed';
const TLS_LEGS: readonly TlsLeg[] = ['client', 'server'];
const TLS_CHANNELS: readonly TlsChannel[] = ['control', 'data'];
const TLS_RESULTS: readonly TlsHandshakeResult[] = ['ok', 'failed', 'not-resumed'];
const KERNEL_MAPPING_OUTCOMES: readonly KernelMappingOutcome[] = ['added', 'skipped', 'failed'];

/** How a forward or transparent session's server was chosen (issue #13). */
export type UpstreamChoiceMode = 'forward' | 'transparent';
/**
 * ok, or why not: the USER argument did not parse (`bad-login`), the policy refused
 * (control/upstream-policy.ts's codes), the name did not resolve, the server could not be
 * reached, the connection was not redirected (transparent), the interception lookup failed.
 */
export type UpstreamChoiceResult =
  | 'ok'
  | 'bad-login'
  | 'denied'
  | 'not-allowed'
  | 'port-not-allowed'
  | 'special-address'
  | 'own-address'
  | 'unresolved'
  | 'bad-address'
  | 'unreachable'
  | 'not-redirected'
  | 'lookup-failed';

/** A port pool's occupancy, read at scrape time. */
export interface PoolStats {
  readonly size: number;
  readonly leased: number;
}

/** What the proxy reports. `listener` is the configured listener name. */
export interface ProxyMetrics {
  /** A client connection was accepted and became a session. */
  sessionOpened(listener: string): void;
  /** A session finished its teardown. Call exactly once per sessionOpened. */
  sessionClosed(listener: string): void;
  /** A data transfer ended; `bytes` relayed (partial for failed/aborted), `seconds` from start to end. */
  transferFinished(listener: string, direction: Direction, result: TransferResult, bytes: number, seconds: number): void;
  /**
   * A kernel-carried transfer ended (client.dataPath: kernel): IP bytes each way as nftables
   * counted them, headers included; not payload, so not in transferFinished's bytes.
   */
  transferWireBytes(listener: string, wire: { readonly toClient: number; readonly toServer: number }): void;
  /** A limit or policy refused or ended something. */
  limitHit(listener: string, reason: RejectionReason): void;
  /** An upstream control connection attempt finished; `seconds` is only recorded on success. */
  upstreamConnect(listener: string, ok: boolean, seconds: number): void;
  /** Someone other than the expected peer dialled a relay port (and was turned away). */
  dataStranger(listener: string): void;
  /**
   * `client.dataPath: kernel` decided a passive channel: `added` (the kernel carries it),
   * `skipped` (not a channel the kernel can carry: relayed), `failed` (mapping refused: relayed).
   */
  kernelMapping(listener: string, outcome: KernelMappingOutcome): void;
  /** A data channel the kernel path did not carry (relayed instead), by why (kernel-nft.ts kernelPathBlocker, or `failed`). */
  kernelFallback(listener: string, reason: KernelFallbackReason): void;
  /** A TLS handshake finished (issue #12): on which leg, for which connection, and how. */
  tlsHandshake(listener: string, leg: TlsLeg, channel: TlsChannel, result: TlsHandshakeResult): void;
  /** A forward or transparent session's server was chosen, or refused and why (issue #13). */
  upstreamChoice(listener: string, mode: UpstreamChoiceMode, result: UpstreamChoiceResult): void;
  /**
   * Report a port pool's occupancy. `stats` is called on every scrape, so it must be cheap
   * and must not block; registering the same (listener, pool) again replaces the callback.
   */
  registerPool(listener: string, pool: PoolKind, stats: () => PoolStats): void;
}

/** Every RejectionReason, so each listener's series can start at zero (see ensureListener). */
export const REJECTION_REASONS: readonly RejectionReason[] = Object.freeze([
  'sessions-total',
  'sessions-per-ip',
  'passive-listeners',
  'relay-ports-per-ip',
  'login-timeout',
  'idle-timeout',
  'data-accept-timeout',
  'data-idle-timeout',
  'upstream-connect-timeout',
  'line-too-long',
  'acl-deny',
  'proxy-protocol',
  'peer-gone',
  'login-attempts',
]);

const TRANSFER_RESULTS: readonly TransferResult[] = ['ok', 'failed', 'aborted'];
const TRANSFER_DIRECTIONS: readonly Direction[] = ['download', 'upload'];

/**
 * Upstream connect latency buckets, seconds. The server usually sits on the same LAN
 * (sub-millisecond) but may be a WAN hop away; 5 s is beyond any sane connect timeout.
 */
export const UPSTREAM_CONNECT_BUCKETS_S: readonly number[] = Object.freeze([
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
]);

/** Transfer duration buckets, seconds: a directory listing (10 ms) up to a large file (10 min). */
export const TRANSFER_DURATION_BUCKETS_S: readonly number[] = Object.freeze([
  0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
]);

/** A metrics implementation that records nothing. */
export const NOOP_METRICS: ProxyMetrics = Object.freeze({
  sessionOpened(): void {},
  sessionClosed(): void {},
  transferFinished(): void {},
  transferWireBytes(): void {},
  limitHit(): void {},
  upstreamConnect(): void {},
  dataStranger(): void {},
  kernelMapping(): void {},
  kernelFallback(): void {},
  tlsHandshake(): void {},
  upstreamChoice(): void {},
  registerPool(): void {},
});

/** prom-client refuses these (counters cannot go down, NaN/Infinity are not samples). */
function isSample(value: number): boolean {
  return Number.isFinite(value) && value >= 0;
}

/** Read one pool's stats; a throwing or nonsensical callback yields no sample, not a failed scrape. */
function readPool(stats: () => PoolStats): PoolStats | null {
  try {
    const value = stats();
    return isSample(value.size) && isSample(value.leased) ? value : null;
  } catch {
    return null;
  }
}

/**
 * Prometheus metrics in a registry of their own (never prom-client's global default, so two
 * proxies in one process, or tests, do not collide), with prom-client's default process
 * metrics (CPU, memory, event-loop lag, file descriptors, GC) in the same registry.
 */
export function createPromMetrics(): ProxyMetrics & { registry: Registry } {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const registers = [registry];

  const sessionsOpen = new Gauge({
    name: 'ftpnp_sessions_open',
    help: 'Client sessions currently open.',
    labelNames: ['listener'] as const,
    registers,
  });
  const sessionsTotal = new Counter({
    name: 'ftpnp_sessions_total',
    help: 'Client sessions accepted since start.',
    labelNames: ['listener'] as const,
    registers,
  });
  const transfersTotal = new Counter({
    name: 'ftpnp_transfers_total',
    help: 'Data transfers finished, by direction (seen from the client) and result (ok, failed, aborted).',
    labelNames: ['listener', 'direction', 'result'] as const,
    registers,
  });
  const transferBytes = new Counter({
    name: 'ftpnp_transfer_bytes_total',
    help: 'Bytes relayed on data connections, by direction (seen from the client); includes partial transfers.',
    labelNames: ['listener', 'direction'] as const,
    registers,
  });
  const transferWireBytes = new Counter({
    name: 'ftpnp_transfer_wire_bytes_total',
    help: 'IP bytes of kernel-carried data connections (client.dataPath: kernel) as nftables counted them, headers included, by toward (client, server).',
    labelNames: ['listener', 'toward'] as const,
    registers,
  });
  const transferDuration = new Histogram({
    name: 'ftpnp_transfer_duration_seconds',
    help: 'Duration of data transfers, whatever their result.',
    labelNames: ['listener', 'direction'] as const,
    buckets: [...TRANSFER_DURATION_BUCKETS_S],
    registers,
  });
  const rejections = new Counter({
    name: 'ftpnp_rejections_total',
    help: 'Connections, commands or transfers refused or ended by a limit or policy, by reason.',
    labelNames: ['listener', 'reason'] as const,
    registers,
  });
  const upstreamFailures = new Counter({
    name: 'ftpnp_upstream_connect_failures_total',
    help: 'Upstream control connections that could not be opened (refused, unreachable, timed out).',
    labelNames: ['listener'] as const,
    registers,
  });
  const upstreamSeconds = new Histogram({
    name: 'ftpnp_upstream_connect_seconds',
    help: 'Time to open an upstream control connection, successful attempts only.',
    labelNames: ['listener'] as const,
    buckets: [...UPSTREAM_CONNECT_BUCKETS_S],
    registers,
  });
  const strangers = new Counter({
    name: 'ftpnp_data_strangers_total',
    help: 'Connections to a relay data port from a peer other than the expected one (turned away).',
    labelNames: ['listener'] as const,
    registers,
  });

  const kernelMappings = new Counter({
    name: 'ftpnp_kernel_mappings_total',
    help: 'Passive data channels under client.dataPath: kernel, by outcome: added (NATed by the kernel, no byte counts), skipped or failed (relayed).',
    labelNames: ['listener', 'outcome'] as const,
    registers,
  });

  // A listener's series appear with its first fallback (every reason at zero then).
  const kernelFallbacks = new Counter({
    name: 'ftpnp_kernel_fallbacks_total',
    help: `Data channels of a kernel-path listener (dataPath kernel or auto) relayed instead, by reason: ${KERNEL_FALLBACK_REASONS.join(', ')}.`,
    labelNames: ['listener', 'reason'] as const,
    registers,
  });
  const kernelListeners = new Set<string>();

  const tlsHandshakes = new Counter({
    name: 'ftpnp_tls_handshakes_total',
    help: 'TLS handshakes by leg (client: the proxy is TLS server; server: the proxy is TLS client), channel (control, data) and result (ok, failed, not-resumed: a data connection that did not resume its control session under dataSessionReuse: required).',
    labelNames: ['listener', 'leg', 'channel', 'result'] as const,
    registers,
  });

  // Only listeners that choose their server per session have these series (no zeros elsewhere).
  const upstreamChoices = new Counter({
    name: 'ftpnp_upstream_choices_total',
    help: 'Forward and transparent sessions choosing their server, by mode and result: ok, or why not (bad-login, denied, not-allowed, port-not-allowed, special-address, own-address, unresolved, bad-address, unreachable, not-redirected, lookup-failed).',
    labelNames: ['listener', 'mode', 'result'] as const,
    registers,
  });

  // Pools are read at scrape time: the proxy never has to push occupancy, and a scrape always
  // sees the current value. The gauges are rebuilt on each collect so a replaced callback
  // leaves no stale series behind.
  const pools = new Map<string, { listener: string; pool: PoolKind; stats: () => PoolStats }>();
  new Gauge({
    name: 'ftpnp_data_ports_leased',
    help: 'Relay data ports currently leased, per port pool (passive = client side, active = server side).',
    labelNames: ['listener', 'pool'] as const,
    registers,
    collect(): void {
      this.reset();
      for (const entry of pools.values()) {
        const stats = readPool(entry.stats);
        if (stats) this.set({ listener: entry.listener, pool: entry.pool }, stats.leased);
      }
    },
  });
  new Gauge({
    name: 'ftpnp_data_ports_free',
    help: 'Relay data ports not leased, per port pool (some may still be held by other processes).',
    labelNames: ['listener', 'pool'] as const,
    registers,
    collect(): void {
      this.reset();
      for (const entry of pools.values()) {
        const stats = readPool(entry.stats);
        if (stats) this.set({ listener: entry.listener, pool: entry.pool }, Math.max(0, stats.size - stats.leased));
      }
    },
  });

  // Series for a listener start at zero the first time it is seen, so rate() and absence
  // alerts work from the first scrape instead of from the first event of each kind.
  const knownListeners = new Set<string>();
  function ensureListener(listener: string): void {
    if (knownListeners.has(listener)) return;
    knownListeners.add(listener);
    sessionsOpen.inc({ listener }, 0);
    sessionsTotal.inc({ listener }, 0);
    upstreamFailures.inc({ listener }, 0);
    strangers.inc({ listener }, 0);
    for (const outcome of KERNEL_MAPPING_OUTCOMES) kernelMappings.inc({ listener, outcome }, 0);
    for (const leg of TLS_LEGS) {
      for (const channel of TLS_CHANNELS) {
        for (const result of TLS_RESULTS) tlsHandshakes.inc({ listener, leg, channel, result }, 0);
      }
    }
    upstreamSeconds.zero({ listener });
    for (const reason of REJECTION_REASONS) rejections.inc({ listener, reason }, 0);
    for (const toward of ['client', 'server']) transferWireBytes.inc({ listener, toward }, 0);
    for (const direction of TRANSFER_DIRECTIONS) {
      transferBytes.inc({ listener, direction }, 0);
      transferDuration.zero({ listener, direction });
      for (const result of TRANSFER_RESULTS) transfersTotal.inc({ listener, direction, result }, 0);
    }
  }

  return {
    registry,
    sessionOpened(listener: string): void {
      ensureListener(listener);
      sessionsOpen.inc({ listener });
      sessionsTotal.inc({ listener });
    },
    sessionClosed(listener: string): void {
      ensureListener(listener);
      sessionsOpen.dec({ listener });
    },
    transferFinished(listener: string, direction: Direction, result: TransferResult, bytes: number, seconds: number): void {
      ensureListener(listener);
      transfersTotal.inc({ listener, direction, result });
      if (isSample(bytes)) transferBytes.inc({ listener, direction }, bytes);
      if (isSample(seconds)) transferDuration.observe({ listener, direction }, seconds);
    },
    transferWireBytes(listener: string, wire: { readonly toClient: number; readonly toServer: number }): void {
      ensureListener(listener);
      if (isSample(wire.toClient)) transferWireBytes.inc({ listener, toward: 'client' }, wire.toClient);
      if (isSample(wire.toServer)) transferWireBytes.inc({ listener, toward: 'server' }, wire.toServer);
    },
    limitHit(listener: string, reason: RejectionReason): void {
      ensureListener(listener);
      rejections.inc({ listener, reason });
    },
    upstreamConnect(listener: string, ok: boolean, seconds: number): void {
      ensureListener(listener);
      if (!ok) upstreamFailures.inc({ listener });
      else if (isSample(seconds)) upstreamSeconds.observe({ listener }, seconds);
    },
    dataStranger(listener: string): void {
      ensureListener(listener);
      strangers.inc({ listener });
    },
    kernelMapping(listener: string, outcome: KernelMappingOutcome): void {
      ensureListener(listener);
      kernelMappings.inc({ listener, outcome });
    },
    kernelFallback(listener: string, reason: KernelFallbackReason): void {
      if (!kernelListeners.has(listener)) {
        kernelListeners.add(listener);
        for (const each of KERNEL_FALLBACK_REASONS) kernelFallbacks.inc({ listener, reason: each }, 0);
      }
      kernelFallbacks.inc({ listener, reason });
    },
    tlsHandshake(listener: string, leg: TlsLeg, channel: TlsChannel, result: TlsHandshakeResult): void {
      ensureListener(listener);
      tlsHandshakes.inc({ listener, leg, channel, result });
    },
    upstreamChoice(listener: string, mode: UpstreamChoiceMode, result: UpstreamChoiceResult): void {
      ensureListener(listener);
      upstreamChoices.inc({ listener, mode, result });
    },
    registerPool(listener: string, pool: PoolKind, stats: () => PoolStats): void {
      ensureListener(listener);
      pools.set(`${listener}\u0000${pool}`, { listener, pool, stats });
    },
  };
}
