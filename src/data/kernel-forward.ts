/**
 * The kernel data path (`client.dataPath: kernel`): a passive data connection is not relayed
 * by the proxy at all. For each PASV/EPSV the proxy adds one mapping to nftables maps in a
 * table of its own:
 *
 *   dnat_to: (client IP . proxy IP . leased port)  -> server IP . server passive port
 *   snat_to: (client IP . server IP . server port) -> the proxy's upstream-side address
 *
 * The client's connection to the leased port is then DNATed by the kernel straight to the
 * server's passive port, and SNATed so the server sees the proxy's address (vsftpd
 * pasv_promiscuous=NO checks it equals the control peer; protocol.md §2.4). An SNAT element
 * can be shared: vsftpd closes its passive listener once the data connection is accepted, so
 * the same port may be handed to the next PASV while the first transfer still runs (seen at
 * 50 concurrent sessions in test/bench). SNAT elements are therefore reference-counted and
 * carry no timeout; they open nothing by themselves (only flows we DNATed are SNATed). This is OpenBSD
 * ftp-proxy's per-transfer pf rule, with nftables maps instead of anchors. The payload never
 * crosses a second TCP connection: on the bench machine a user-space relay, even splice(2),
 * holds a transfer to about half of direct because every byte is received and re-sent by a
 * second TCP stack (README "Performance").
 *
 * What the relay gives and this path does not, by construction (README "Kernel data path"):
 *  - the proxy does not see the payload: transfers carry no byte counts;
 *  - the data idle timeout is the server's and conntrack's, not dataIdleSeconds;
 *  - only client-passive to server-passive, IPv4 to IPv4, without PROXY headers.
 * What stays as it is: half-close and resets pass end to end (it is one TCP connection);
 * only the control client's address may connect (the map key holds it, like the relay's
 * source check, RFC 2577 port stealing); the mapping expires after dataAcceptSeconds if
 * nobody connects (the element's own timeout, so a crash cannot leave a hole open for long)
 * and is removed when the channel closes. A connection already made lives on in conntrack.
 *
 * Code here builds nft(8) scripts (pure, table-tested) and runs them through libnftables in
 * the native addon (src/native/nftables.c); nothing here owns a socket.
 */
import { ProxyError } from '../errors.js';
import { familyOf, isLoopbackIp } from '../control/ip.js';
import { loadSpliceAddon } from './splice-relay.js';

/** Outcome of one nft(8) script run as one transaction. */
export interface NftResult {
  readonly ok: boolean;
  readonly output: string;
  readonly error: string;
}

export type NftRunner = (script: string) => NftResult;

interface NftAddon {
  nftOpen(): object;
  nftRun(handle: object, script: string): [number, string, string];
}

/** libnftables through the native addon, or why it cannot be had. */
export function loadNftRunner(): { readonly run: NftRunner | null; readonly reason: string } {
  const { addon, reason } = loadSpliceAddon();
  const nft = addon as unknown as Partial<NftAddon> | null;
  if (!nft || typeof nft.nftOpen !== 'function' || typeof nft.nftRun !== 'function') {
    return { run: null, reason: addon ? 'native addon predates the kernel data path (rebuild: npm install)' : reason };
  }
  let handle: object;
  try {
    handle = nft.nftOpen();
  } catch (err) {
    return { run: null, reason: (err as Error).message };
  }
  const nftRun = nft.nftRun.bind(nft);
  return {
    run: (script) => {
      const [rc, output, error] = nftRun(handle, script);
      return { ok: rc === 0, output, error: error.trim() };
    },
    reason: 'libnftables',
  };
}

// ------------------------------------------------------------------------------ pure parts

/** One transfer's mapping. All addresses IPv4 (kernelPathBlocker says so first). */
export interface ForwardMapping {
  /** Source address of the client's data connection: the control connection's peer. */
  readonly clientIp: string;
  /** The proxy's own address the client's packets arrive at: the control connection's local address. */
  readonly proxyIp: string;
  /** The leased port the 227/229 advertises. */
  readonly proxyPort: number;
  readonly serverIp: string;
  readonly serverPort: number;
  /** Source address the server sees: the proxy's address on its control connection to the server. */
  readonly snatIp: string;
}

export const TABLE_PREFIX = 'ftpnp_';

export function tableName(pid: number): string {
  return `${TABLE_PREFIX}${pid}`;
}

/**
 * The table, created in one transaction. A table left by an earlier process with the same
 * PID (a crash, then PID reuse) is replaced: "add" then "delete" then create, so the script
 * never fails on a missing table. Priorities: dstnat (-100) and srcnat (100), the standard
 * NAT hooks; a map miss leaves the packet alone, so the rules touch nothing but our mappings.
 */
export function tableScript(table: string): string {
  return [
    `add table ip ${table}`,
    `delete table ip ${table}`,
    `table ip ${table} {`,
    '  map dnat_to { type ipv4_addr . ipv4_addr . inet_service : ipv4_addr . inet_service; flags timeout; }',
    '  map snat_to { type ipv4_addr . ipv4_addr . inet_service : ipv4_addr; }',
    // Remote clients arrive through prerouting; clients on this host through output.
    '  chain prerouting { type nat hook prerouting priority dstnat; policy accept; dnat ip to ip saddr . ip daddr . tcp dport map @dnat_to; }',
    '  chain output { type nat hook output priority -100; policy accept; dnat ip to ip saddr . ip daddr . tcp dport map @dnat_to; }',
    '  chain postrouting { type nat hook postrouting priority srcnat; policy accept; ct status dnat snat ip to ip saddr . ip daddr . tcp dport map @snat_to; }',
    '}',
  ].join('\n');
}

/** nft(8) time: whole milliseconds, at least one second (shorter would race the 227). */
function nftTimeout(ms: number): string {
  return `${Math.max(1000, Math.ceil(ms))}ms`;
}

/**
 * The DNAT element with `create`, not `add`: `add` silently accepts an element that is already
 * there, and a key already mapped means a mapping we failed to remove; that transfer is relayed
 * instead. The SNAT element only when no other mapping holds it yet (`withSnat`).
 */
export function addMappingScript(table: string, m: ForwardMapping, timeoutMs: number, withSnat = true): string {
  return [
    ...(withSnat ? [`add element ip ${table} snat_to { ${snatKeyText(m)} : ${m.snatIp} }`] : []),
    `create element ip ${table} dnat_to { ${dnatKeyText(m)} timeout ${nftTimeout(timeoutMs)} : ${m.serverIp} . ${m.serverPort} }`,
  ].join('\n');
}

/**
 * One command per element, so that a DNAT element that already expired cannot stop the SNAT
 * element's removal. The SNAT element only when this was its last holder (`withSnat`).
 */
export function removeMappingScripts(table: string, m: ForwardMapping, withSnat = true): string[] {
  return [
    `delete element ip ${table} dnat_to { ${dnatKeyText(m)} }`,
    ...(withSnat ? [`delete element ip ${table} snat_to { ${snatKeyText(m)} }`] : []),
  ];
}

function dnatKeyText(m: ForwardMapping): string {
  return `${m.clientIp} . ${m.proxyIp} . ${m.proxyPort}`;
}

function snatKeyText(m: ForwardMapping): string {
  return `${m.clientIp} . ${m.serverIp} . ${m.serverPort}`;
}

/**
 * Tables of ours (from `list tables`) whose process is gone: a proxy killed with SIGKILL
 * cannot delete its table, and its mappings only expire one by one.
 */
export function staleTables(listing: string, isAlive: (pid: number) => boolean, ownPid: number): string[] {
  const stale: string[] = [];
  for (const line of listing.split('\n')) {
    const match = /^table ip (ftpnp_(\d+))\s*$/.exec(line.trim());
    if (!match) continue;
    const pid = Number(match[2]);
    if (pid !== ownPid && !isAlive(pid)) stale.push(match[1]!);
  }
  return stale;
}

/** What the session knows when it decides how to carry a passive data connection. */
export interface KernelPathFacts {
  readonly clientIp: string;
  readonly proxyIp: string;
  readonly serverIp: string;
  readonly snatIp: string;
  /** The listener reads PROXY headers: the data connection's source is then a load balancer. */
  readonly proxyProtocol: boolean;
  /** Either leg's data is TLS (PROT P): the proxy must decrypt and re-encrypt it (RFC 4217). */
  readonly tls?: boolean;
}

/** Null when the kernel can carry this data connection, else why not (the relay does). */
export function kernelPathBlocker(f: KernelPathFacts): string | null {
  if (f.proxyProtocol) return 'PROXY protocol: data connections come from the load balancer';
  if (f.tls) return 'TLS data (PROT P): the proxy terminates TLS on each leg';
  for (const [what, ip] of [['client', f.clientIp], ['proxy', f.proxyIp], ['server', f.serverIp], ['upstream-side', f.snatIp]] as const) {
    if (familyOf(ip) !== 4) return `${what} address ${ip} is not IPv4 (the kernel path maps IPv4 only)`;
  }
  // A packet from another host DNATed to 127.0.0.0/8 is dropped as a martian unless
  // route_localnet is set; the relay reaches a loopback server without that.
  if (isLoopbackIp(f.serverIp) && !isLoopbackIp(f.clientIp)) return 'server is on loopback and the client is not';
  return null;
}

// ------------------------------------------------------------------------------ runtime

export interface KernelForward {
  readonly mapping: ForwardMapping;
  /** Delete the mapping (an established connection lives on in conntrack). Idempotent. */
  remove(): void;
}

export interface KernelForwarderOptions {
  readonly table?: string;
  readonly pid?: number;
  readonly isAlive?: (pid: number) => boolean;
  /** Told about stale tables removed and mappings that would not go. */
  readonly onWarning?: (message: string, detail: Record<string, unknown>) => void;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The proxy's nftables table and the mappings in it. One per process. */
export class KernelForwarder {
  readonly table: string;
  private readonly run: NftRunner;
  private readonly onWarning: (message: string, detail: Record<string, unknown>) => void;
  private readonly forwards = new Set<KernelForward>();
  /** SNAT elements in the table: key -> the address they map to and how many mappings hold them. */
  private readonly snat = new Map<string, { readonly snatIp: string; holders: number }>();
  private closed = false;

  /** Remove stale tables, create ours. Throws FTPP_ERR_KERNEL_PATH with nft's words. */
  constructor(run: NftRunner, options: KernelForwarderOptions = {}) {
    const pid = options.pid ?? process.pid;
    this.table = options.table ?? tableName(pid);
    this.run = run;
    this.onWarning = options.onWarning ?? (() => {});
    const listing = run('list tables ip');
    if (!listing.ok) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `cannot list nftables tables: ${listing.error || 'unknown error'} (needs CAP_NET_ADMIN)`);
    for (const stale of staleTables(listing.output, options.isAlive ?? processAlive, pid)) {
      const removed = run(`delete table ip ${stale}`);
      this.onWarning('removed the nftables table of a proxy that is gone', { table: stale, ok: removed.ok, ...(removed.ok ? {} : { error: removed.error }) });
    }
    const created = run(tableScript(this.table));
    if (!created.ok) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `cannot create nftables table ${this.table}: ${created.error || 'unknown error'}`);
  }

  get active(): number {
    return this.forwards.size;
  }

  /** Install one transfer's mapping. Throws FTPP_ERR_KERNEL_PATH (the caller relays instead). */
  forward(mapping: ForwardMapping, timeoutMs: number): KernelForward {
    if (this.closed) throw new ProxyError('FTPP_ERR_KERNEL_PATH', 'kernel data path closed');
    const snatKey = snatKeyText(mapping);
    const shared = this.snat.get(snatKey);
    if (shared && shared.snatIp !== mapping.snatIp) {
      throw new ProxyError('FTPP_ERR_KERNEL_PATH', `${snatKey} is already sent from ${shared.snatIp}, not ${mapping.snatIp}`);
    }
    const added = this.run(addMappingScript(this.table, mapping, timeoutMs, !shared));
    if (!added.ok) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `cannot add the data mapping: ${added.error || 'unknown error'}`);
    if (shared) shared.holders += 1;
    else this.snat.set(snatKey, { snatIp: mapping.snatIp, holders: 1 });
    let removed = false;
    const forward: KernelForward = {
      mapping,
      remove: () => {
        if (removed) return;
        removed = true;
        this.forwards.delete(forward);
        if (this.closed) return;
        const entry = this.snat.get(snatKey);
        const lastHolder = !entry || entry.holders <= 1;
        if (entry && lastHolder) this.snat.delete(snatKey);
        else if (entry) entry.holders -= 1;
        const scripts = removeMappingScripts(this.table, mapping, lastHolder);
        // One transaction as a rule. It fails as a whole when the DNAT element already
        // expired (nobody connected in time); then each goes on its own.
        if (!this.run(scripts.join('\n')).ok) for (const script of scripts) this.run(script);
      },
    };
    this.forwards.add(forward);
    return forward;
  }

  /** Delete the table with every mapping left in it. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.forwards.clear();
    this.snat.clear();
    const result = this.run(`delete table ip ${this.table}`);
    if (!result.ok) this.onWarning('could not delete the nftables table', { table: this.table, error: result.error });
  }
}
