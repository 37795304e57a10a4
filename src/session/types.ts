/**
 * What a session is given by the listener that admitted it, and small things derived from it.
 */
import type { ListenerConfig } from '../config/schema.js';
import type { PortPool } from '../data/port-pool.js';
import type { KernelForwarder } from '../data/kernel-forward.js';
import type { Advertiser } from '../advertise.js';
import type { Logger } from '../log.js';
import type { ProxyMetrics, RejectionReason } from '../metrics.js';
import type { Session } from '../session.js';
import type { OriginalDestination } from '../server/original-destination.js';

/** Where the session really comes from and what it dialled (a PROXY header may say). */
export interface SessionEndpoints {
  /** The real client: PROXY header source, else the socket peer. */
  readonly client: { readonly ip: string; readonly port: number };
  /** What the client dialled: PROXY header destination, else the socket's local address. */
  readonly dialled: { readonly ip: string; readonly port: number };
  /** The control socket's own local address (relay listeners bind here, active dials leave from here). */
  readonly local: { readonly ip: string; readonly port: number };
  /** Bytes that arrived behind a PROXY header (already FTP). */
  readonly initialData: Buffer | null;
  /** `upstream.transparent`: where the client was going before the router redirected it (absent otherwise). */
  readonly original?: OriginalDestination;
}

export interface SessionDeps {
  readonly id: string;
  readonly endpoints: SessionEndpoints;
  readonly metrics: ProxyMetrics;
  readonly config: ListenerConfig;
  readonly clientPool: PortPool;
  readonly upstreamPool: PortPool | null;
  readonly advertiser: Advertiser;
  /** The nftables table for `client.dataPath: kernel` (null: every data channel is relayed). */
  readonly kernelForwarder: KernelForwarder | null;
  readonly log: Logger;
  readonly onClosed: (session: Session) => void;
}


/** The proxy's own addresses and names as one client may know them (HOST, RFC 7151). */
export interface ProxyIdentity {
  readonly addresses: readonly string[];
  readonly names: readonly string[];
}

/** What the client dialled, our end of its connection, and what `advertise` tells clients. */
export function proxyIdentity(endpoints: SessionEndpoints, config: ListenerConfig): ProxyIdentity {
  const { advertise, advertiseFor } = config.client;
  return Object.freeze({
    addresses: Object.freeze([endpoints.dialled.ip, endpoints.local.ip, ...(advertise.kind === 'ip' ? [advertise.address] : []), ...advertiseFor.map((rule) => rule.address)]),
    names: Object.freeze(advertise.kind === 'hostname' ? [advertise.hostname] : []),
  });
}

/**
 * A session's limit reports: counted every time, logged once per session and limit (the
 * session's child logger carries the client address).
 */
export function limitReporter(metrics: ProxyMetrics, listener: string, log: Logger): (reason: RejectionReason, fields?: Record<string, unknown>) => void {
  const logged = new Set<RejectionReason>();
  return (reason, fields = {}) => {
    metrics.limitHit(listener, reason);
    if (logged.has(reason)) return;
    logged.add(reason);
    log.warn({ ...fields, event: 'limit', limit: reason }, `limit reached: ${reason}`);
  };
}
