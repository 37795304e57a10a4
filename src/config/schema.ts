/**
 * The validated, frozen configuration the proxy runs on. Everything here is already checked:
 * addresses parsed, ranges ordered, defaults filled in. See README "Configuration".
 */
import type { Cidr } from '../control/ip.js';

export type DataMode = 'passive' | 'active' | 'mirror';

export interface PortRange {
  readonly first: number;
  readonly last: number;
}

export interface HostAndPort {
  readonly host: string;
  readonly port: number;
}

export type Advertise =
  | { readonly kind: 'auto' }
  | { readonly kind: 'ip'; readonly address: string }
  | { readonly kind: 'hostname'; readonly hostname: string };

export interface AdvertiseRule {
  readonly from: Cidr;
  readonly fromText: string;
  readonly address: string;
}

export interface UpstreamConfig {
  readonly host: string;
  readonly port: number;
  readonly dataMode: DataMode;
  readonly activePorts: PortRange | null;
  readonly bind: string | null;
}

export interface ClientSideConfig {
  readonly advertise: Advertise;
  readonly advertiseFor: readonly AdvertiseRule[];
  readonly passivePorts: PortRange;
  /** Replace an unroutable PORT/EPRT address from a routable peer by the peer's (protocol.md §4.1). */
  readonly portNatFixup: boolean;
}

export interface TimeoutsConfig {
  readonly upstreamConnectMs: number;
  readonly upstreamReplyMs: number;
  readonly dataConnectMs: number;
  readonly dataAcceptMs: number;
  readonly idleMs: number;
  readonly transferReplyHoldMs: number;
  readonly dataLingerMs: number;
  readonly abortIdleMs: number;
}

export interface LimitsConfig {
  readonly maxLineBytes: number;
  readonly maxReplyBytes: number;
  readonly maxQueuedCommands: number;
}

export interface ListenerConfig {
  readonly name: string;
  readonly listen: HostAndPort;
  readonly upstream: UpstreamConfig;
  readonly client: ClientSideConfig;
  readonly timeouts: TimeoutsConfig;
  readonly limits: LimitsConfig;
}

export interface ProxyConfig {
  readonly log: { readonly level: string };
  readonly listeners: readonly ListenerConfig[];
}
