/**
 * The validated, frozen configuration the proxy runs on. Everything here is already checked:
 * addresses parsed, ranges ordered, defaults filled in. See README "Configuration".
 */
import type { Cidr } from '../control/ip.js';
import type { UpstreamPolicy } from '../control/upstream-policy.js';

export type DataMode = 'passive' | 'active' | 'mirror';

/**
 * How passive data connections are carried: `relay` (the proxy accepts and relays them,
 * splice(2) when it can), `kernel` (a per-transfer nftables DNAT/SNAT mapping; the proxy
 * never touches the payload; src/data/kernel-forward.ts; the proxy does not start without
 * it), or `auto` (the kernel path where the host allows it, the relay otherwise; decided at
 * start and logged, server/data-path.ts).
 */
export type DataPath = 'relay' | 'kernel' | 'auto';

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

/** How TLS starts on a control connection: after `AUTH TLS` (RFC 4217) or at connect (port 990). */
export type TlsMode = 'explicit' | 'implicit';

export type TlsVersion = 'TLSv1.2' | 'TLSv1.3';

/**
 * TLS toward clients (`listeners[].tls`, issue #12, protocol.md §5). The PEM text is read
 * and checked (parses, key matches certificate) when the file is loaded, so a reload with a
 * broken key is rejected like any invalid config and the running material stays. Never logged.
 */
export interface ClientTlsConfig {
  readonly mode: TlsMode;
  readonly certFile: string;
  readonly keyFile: string;
  /** The certificate chain (leaf first), PEM. */
  readonly certPem: string;
  /** The private key, PEM. */
  readonly keyPem: string;
  /** Explicit only: refuse USER before AUTH (530) and PROT C transfers (522), vsftpd's force_local_*_ssl. */
  readonly require: boolean;
  /** `required`: a PROT P data connection must resume this control connection's TLS session. */
  readonly dataSessionReuse: 'required' | 'off';
  readonly minVersion: TlsVersion;
}

/** TLS toward the server (`upstream.tls`; mode off = null). */
export interface UpstreamTlsConfig {
  readonly mode: TlsMode;
  /** File named by `ca` (null: the system trust store). */
  readonly caFile: string | null;
  /** Trusted CA certificates, PEM; null = Node's bundled roots plus the system bundle. */
  readonly caPem: string | null;
  /**
   * Name verified in the certificate and sent as SNI (not sent when it is an IP address);
   * default upstream.host. With `forward`/`transparent` and no `servername` it is '': the
   * session's own destination is meant (forward: the name the client gave; transparent: the
   * original destination address).
   */
  readonly servername: string;
  /** false only for labs (a config warning). */
  readonly verify: boolean;
}

/**
 * How a session's server is chosen (issue #13): exactly one of `upstream.host` (`fixed`),
 * `upstream.forward` (the client names it: `USER name@host[:port]`) or `upstream.transparent`
 * (the address the client dialled before the router redirected it): session/forward-gate.ts
 * and session/transparent.ts choose per session.
 */
export type UpstreamSelection =
  | { readonly kind: 'fixed'; readonly host: string; readonly port: number }
  | { readonly kind: 'forward'; readonly policy: UpstreamPolicy }
  | { readonly kind: 'transparent'; readonly policy: UpstreamPolicy };

export interface UpstreamConfig {
  /**
   * The server: meaningful only when `selection.kind` is `fixed` (then equal to
   * `selection.host`); '' otherwise. Kept so the code written for a fixed server reads it as before.
   */
  readonly host: string;
  /** Control port: meaningful only for `fixed` (= `selection.port`); 0 otherwise, so it cannot be dialled by mistake. */
  readonly port: number;
  readonly selection: UpstreamSelection;
  readonly dataMode: DataMode;
  readonly activePorts: PortRange | null;
  readonly bind: string | null;
  /** null: plain FTP toward the server. */
  readonly tls: UpstreamTlsConfig | null;
}

export interface ClientSideConfig {
  readonly advertise: Advertise;
  readonly advertiseFor: readonly AdvertiseRule[];
  readonly passivePorts: PortRange;
  /** Replace an unroutable PORT/EPRT address from a routable peer by the peer's (protocol.md §4.1). */
  readonly portNatFixup: boolean;
  /**
   * Keep every passive port bound for the life of the listener (so a load balancer can
   * health-check them) and hand connections to the session expecting them, instead of binding
   * a port per PASV.
   */
  readonly bindAllPassivePorts: boolean;
  readonly dataPath: DataPath;
  /**
   * Source port of the proxy's data connections to PORT/EPRT clients (firewalls that admit
   * active data only from port 20, vsftpd's connect_from_port_20); null: any port. Bound with
   * the control connection's local address; below 1024 it needs CAP_NET_BIND_SERVICE.
   */
  readonly dataSourcePort: number | null;
}

export interface CidrRule {
  readonly cidr: Cidr;
  readonly text: string;
}

export interface AclConfig {
  /** Empty: everyone not denied may connect. */
  readonly allow: readonly CidrRule[];
  readonly deny: readonly CidrRule[];
  /** What a refused client gets: a `421` line, or a plain close. */
  readonly action: 'reply' | 'close';
}

export type ProxyProtocolAccept = 'off' | 'v1' | 'v2' | 'any';

export interface ProxyProtocolConfig {
  readonly accept: ProxyProtocolAccept;
  /** Load balancers allowed to send a header (haproxy proxy-protocol.txt: trusted senders only). */
  readonly from: readonly CidrRule[];
  readonly timeoutMs: number;
  /** Data connections to the passive ports carry a header too (NLB listeners on the data ports). */
  readonly dataPorts: boolean;
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
  readonly loginMs: number;
  readonly dataIdleMs: number;
  /** A TLS handshake (control or data, either leg) that takes longer fails (`timeouts.tlsHandshakeSeconds`). */
  readonly tlsHandshakeMs: number;
}

export interface LimitsConfig {
  readonly maxLineBytes: number;
  readonly maxReplyBytes: number;
  readonly maxQueuedCommands: number;
  readonly maxSessions: number;
  readonly maxSessionsPerIp: number;
  readonly maxDataChannelsPerSession: number;
  /**
   * Relay ports (of each pool) one client address may hold at once; `auto` = a quarter of
   * the pool, at least 2 (relayPortsPerIpCap). Keeps a few addresses from holding the whole
   * pool by repeating PASV across many sessions.
   */
  readonly maxRelayPortsPerIp: number | 'auto';
  /** Forward mode: refused destinations (`USER name@host`) one session may try before it is closed with 421. */
  readonly maxLoginAttempts: number;
}

export interface ListenerConfig {
  readonly name: string;
  readonly listen: HostAndPort;
  readonly upstream: UpstreamConfig;
  readonly client: ClientSideConfig;
  readonly timeouts: TimeoutsConfig;
  readonly limits: LimitsConfig;
  readonly acl: AclConfig;
  readonly proxyProtocol: ProxyProtocolConfig;
  /** null: no TLS offered to clients (AUTH refused, not in FEAT). */
  readonly tls: ClientTlsConfig | null;
}

export interface AdminConfig {
  readonly listen: HostAndPort;
}

/** One problem (error or warning) in a configuration file. */
export interface ConfigIssue {
  /** Key path, e.g. `listeners[0].upstream.port`. */
  readonly path: string;
  /** 1-based line in the file, 0 when the key is missing. */
  readonly line: number;
  readonly message: string;
}

export interface ProxyConfig {
  readonly log: { readonly level: string };
  readonly listeners: readonly ListenerConfig[];
  /** Off (null) unless configured. */
  readonly admin: AdminConfig | null;
  readonly shutdown: { readonly drainMs: number };
  /**
   * Non-fatal findings: a key that is ignored or overridden (the config above already reflects
   * that). Logged as `config-warning` at start and on every reload; printed by `--check`.
   */
  readonly warnings: readonly ConfigIssue[];
}
