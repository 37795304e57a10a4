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
 * Counting and the idle cut (issue #14). The proxy never sees the payload, so nftables counts
 * for it: three sets with a counter per element, keyed like dnat_to by the connection's
 * ORIGINAL tuple (client IP . proxy IP . leased port, read back with `ct original ...` after
 * NAT), hold the IP bytes each way (`to_server`: ct direction original, `to_client`: reply)
 * and the packets that carry payload (`moving`, via `@ih`: a pure ACK or a zero-window probe
 * has no inner header); `ends` counts FIN/RST packets. These are IP bytes, headers included
 * (and one header per GRO/GSO aggregate, retransmissions included): `wireBytes`, never
 * `bytes`. One `list set` call per poll reads every mapping's counters: a connection whose
 * `moving` counter stood still for dataIdleSeconds is cut (DNAT removed, its key put in `cut`,
 * where `reject with tcp reset` answers the next packet of either side). The counts are read
 * when the transfer is over: at once when it failed, else once both FINs (or a RST) passed or
 * the linger ran out, so bytes still in the server's send buffer when its 226 came are counted.
 *
 * What the relay gives and this path does not, by construction (README "Kernel data path"):
 *  - the proxy does not see the payload: IP bytes, not payload bytes, are counted;
 *  - the idle cut can only answer a packet: an upload whose client sends nothing is silent
 *    both ways, and the server learns of the cut from its own data timeout; and where a side
 *    arrives over a bridge with br_netfilter, nf_send_reset sends the RST out of the bridge
 *    port without NAT and it is lost: conntrack closes the entry 10 s later and the next packet
 *    meets the host's own reset (README "Kernel data path", measured in the NAT lab);
 *  - only client-passive to server-passive, IPv4 to IPv4, without PROXY headers.
 * What stays as it is: half-close and resets pass end to end (it is one TCP connection);
 * only the control client's address may connect (the map key holds it, like the relay's
 * source check, RFC 2577 port stealing); the mapping expires after dataAcceptSeconds if
 * nobody connects (the element's own timeout, so a crash cannot leave a hole open for long)
 * and is removed when the channel closes. A connection already made lives on in conntrack
 * (until it ends, or the idle cut resets it).
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
    ...COUNTER_SETS.map((set) => `  set ${set} { type ${KEY_TYPE}; counter; }`),
    `  set ${CUT_SET} { type ${KEY_TYPE}; flags timeout; }`,
    // After NAT the packet's own addresses are the server's; the ORIGINAL tuple is the key.
    '  chain count {',
    // Not a RST: the reset this rule sends belongs to the connection too and passes the
    // output hook (a client or server on this host; and the reset itself) on its way.
    `    meta l4proto tcp tcp flags & rst == 0 ${CT_KEY} @${CUT_SET} reject with tcp reset`,
    `    meta l4proto tcp ct direction original ${CT_KEY} @to_server`,
    `    meta l4proto tcp ct direction reply ${CT_KEY} @to_client`,
    // @ih loads the first payload byte: no payload (ACK, SYN, zero-window probe), no match.
    `    meta l4proto tcp @ih,0,8 & 0x0 == 0x0 ${CT_KEY} @moving`,
    `    meta l4proto tcp tcp flags & (fin | rst) != 0 ${CT_KEY} @ends`,
    '  }',
    // Each packet once: remote client and server (forward); a client or server on this host
    // (output; input only from outside: a packet over lo was already seen in output).
    '  chain forward { type filter hook forward priority filter; policy accept; ct status dnat jump count; }',
    '  chain filter_output { type filter hook output priority filter; policy accept; ct status dnat jump count; }',
    '  chain filter_input { type filter hook input priority filter; policy accept; ct status dnat iif != "lo" jump count; }',
    '}',
  ].join('\n');
}

/** The sets with a counter per mapping (see the file comment). */
export const COUNTER_SETS = ['to_server', 'to_client', 'moving', 'ends'] as const;
export type CounterSet = (typeof COUNTER_SETS)[number];
const CUT_SET = 'cut';
const KEY_TYPE = 'ipv4_addr . ipv4_addr . inet_service';
const CT_KEY = 'ct original ip saddr . ct original ip daddr . ct original proto-dst';

/**
 * How long a cut connection's key stays in `cut`: the reset can only answer a packet, and a
 * sender facing a zero window probes at most every 120 s (Linux TCP_RTO_MAX).
 */
export const CUT_HOLD_MS = 130_000;

/** IP bytes of one kernel-carried data connection, each way, headers included. */
export interface WireBytes {
  readonly toClient: number;
  readonly toServer: number;
}

/** One element's counter. */
export interface NftCounter {
  readonly packets: number;
  readonly bytes: number;
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
    // `add`: the counters of a key we failed to delete go on; the transaction is what matters.
    ...COUNTER_SETS.map((set) => `add element ip ${table} ${set} { ${dnatKeyText(m)} }`),
  ].join('\n');
}

/** Delete one mapping's counter elements (the caller read them first). */
export function removeCountersScript(table: string, m: ForwardMapping): string {
  return COUNTER_SETS.map((set) => `delete element ip ${table} ${set} { ${dnatKeyText(m)} }`).join('\n');
}

/**
 * The idle cut: no new connection (DNAT element gone), and the next packet of the existing
 * one, either way, is answered with a TCP reset. The `cut` element expires by itself.
 */
export function cutScript(table: string, m: ForwardMapping, withSnat = true, holdMs: number = CUT_HOLD_MS): string {
  return [
    `add element ip ${table} ${CUT_SET} { ${dnatKeyText(m)} timeout ${nftTimeout(holdMs)} }`,
    ...removeMappingScripts(table, m, withSnat),
  ].join('\n');
}

/**
 * The script that reads every mapping's counters: one call per poll, whatever their number.
 * The whole table: nft 1.0.6 fails a script of several `list set` commands ("No such file or
 * directory" for the first set: each one's cache filter drops the others).
 */
export function listCountersScript(table: string): string {
  return `list table ip ${table}`;
}

/** Read one mapping's counters (`get element`, when the transfer ended between polls). */
export function getCountersScript(table: string, m: ForwardMapping): string {
  return COUNTER_SETS.map((set) => `get element ip ${table} ${set} { ${dnatKeyText(m)} }`).join('\n');
}

/** The key text of a mapping in the counter sets, as nft(8) prints it. */
export function counterKey(m: Pick<ForwardMapping, 'clientIp' | 'proxyIp' | 'proxyPort'>): string {
  return dnatKeyText(m);
}

/** One element with its counter: after `{` or `,` (or at a continuation line's start), up to `,` or `}`. */
const ELEMENT_COUNTER = /(?:^|[{,])\s*(\d{1,3}(?:\.\d{1,3}){3}) \. (\d{1,3}(?:\.\d{1,3}){3}) \. (\d{1,5}) counter packets (\d+) bytes (\d+)\s*(?=[,}])/g;

/**
 * The counters in `list set` / `get element` output (one or several sets, one table block
 * each): set name -> element key -> counter. Elements come one per line or several on one,
 * comma-separated; the set header may or may not repeat `counter`; an element without a
 * counter, or a set that is not ours, is skipped.
 */
export function parseCounters(output: string): Map<CounterSet, Map<string, NftCounter>> {
  const sets = new Map<CounterSet, Map<string, NftCounter>>();
  let current: Map<string, NftCounter> | null = null;
  for (const line of output.split('\n')) {
    const header = /^\s*set (\S+) \{/.exec(line);
    if (header) {
      const name = header[1] as CounterSet;
      current = (COUNTER_SETS as readonly string[]).includes(name) ? (sets.get(name) ?? new Map<string, NftCounter>()) : null;
      if (current) sets.set(name, current);
      continue;
    }
    if (!current) continue;
    for (const match of line.matchAll(ELEMENT_COUNTER)) {
      current.set(`${match[1]} . ${match[2]} . ${match[3]}`, { packets: Number(match[4]), bytes: Number(match[5]) });
    }
  }
  return sets;
}

/** One mapping's counters out of a parsed listing (zero when its element is not there). */
function countersOf(sets: Map<CounterSet, Map<string, NftCounter>>, key: string): Record<CounterSet, NftCounter> {
  const zero: NftCounter = { packets: 0, bytes: 0 };
  return {
    to_server: sets.get('to_server')?.get(key) ?? zero,
    to_client: sets.get('to_client')?.get(key) ?? zero,
    moving: sets.get('moving')?.get(key) ?? zero,
    ends: sets.get('ends')?.get(key) ?? zero,
  };
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

function dnatKeyText(m: Pick<ForwardMapping, 'clientIp' | 'proxyIp' | 'proxyPort'>): string {
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
  /**
   * The transfer command went out: start the idle clock. Once the connection exists and no
   * payload moved either way for `idleMs`, the connection is cut (mapping removed, the next
   * packet either way reset) and `onIdle` is called once. Later calls change nothing.
   */
  watchIdle(idleMs: number, onIdle: () => void): void;
  /**
   * The transfer is over: delete the mapping (an established connection lives on in
   * conntrack) and read the counters, at once or, with `awaitEndMs`, once the connection has
   * ended (both FINs, or a RST) or that time has passed. Idempotent; after a cut it takes the
   * `cut` element out early (whoever answered has given the connection up).
   */
  remove(awaitEndMs?: number): void;
  /** The connection's IP bytes, once read (null: no transfer used the mapping, or the table went first). */
  readonly wireBytes: Promise<WireBytes | null>;
}

export interface KernelForwarderOptions {
  readonly table?: string;
  readonly pid?: number;
  readonly isAlive?: (pid: number) => boolean;
  /** Told about stale tables removed and mappings that would not go. */
  readonly onWarning?: (message: string, detail: Record<string, unknown>) => void;
  /** Clock for the idle cut (tests). */
  readonly now?: () => number;
  /** Poll the counters on a timer (default); false: only when poll() is called (tests). */
  readonly autoPoll?: boolean;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Poll at a quarter of the shortest idle timeout watched, within these bounds. */
const IDLE_POLL_MIN_MS = 250;
const IDLE_POLL_MAX_MS = 5000;
/** While a finished transfer waits for its connection's last packets. */
const END_POLL_MS = 100;

/** What the forwarder knows of one mapping. */
interface Tracked {
  readonly mapping: ForwardMapping;
  readonly key: string;
  readonly snatKey: string;
  stage: 'mapped' | 'cut' | 'removed';
  idle: { readonly idleMs: number; readonly onIdle: () => void; lastMoving: number; since: number } | null;
  /** remove() with awaitEndMs: counters are read once the connection ends or at the deadline. */
  endDeadline: number | null;
  settled: boolean;
  readonly settle: (wire: WireBytes | null) => void;
}

/** The proxy's nftables table and the mappings in it. One per process. */
export class KernelForwarder {
  readonly table: string;
  private readonly run: NftRunner;
  private readonly onWarning: (message: string, detail: Record<string, unknown>) => void;
  private readonly now: () => number;
  private readonly autoPoll: boolean;
  private readonly tracked = new Set<Tracked>();
  /** SNAT elements in the table: key -> the address they map to and how many mappings hold them. */
  private readonly snat = new Map<string, { readonly snatIp: string; holders: number }>();
  private pollTimer: NodeJS.Timeout | null = null;
  private pollInterval = Number.POSITIVE_INFINITY;
  private pollFailed = false;
  private closed = false;

  /** Remove stale tables, create ours. Throws FTPP_ERR_KERNEL_PATH with nft's words. */
  constructor(run: NftRunner, options: KernelForwarderOptions = {}) {
    const pid = options.pid ?? process.pid;
    this.table = options.table ?? tableName(pid);
    this.run = run;
    this.onWarning = options.onWarning ?? (() => {});
    this.now = options.now ?? Date.now;
    this.autoPoll = options.autoPoll ?? true;
    const listing = run('list tables ip');
    if (!listing.ok) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `cannot list nftables tables: ${listing.error || 'unknown error'} (needs CAP_NET_ADMIN)`);
    for (const stale of staleTables(listing.output, options.isAlive ?? processAlive, pid)) {
      const removed = run(`delete table ip ${stale}`);
      this.onWarning('removed the nftables table of a proxy that is gone', { table: stale, ok: removed.ok, ...(removed.ok ? {} : { error: removed.error }) });
    }
    const created = run(tableScript(this.table));
    if (!created.ok) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `cannot create nftables table ${this.table}: ${created.error || 'unknown error'}`);
  }

  /** Mappings installed and not yet removed or cut. */
  get active(): number {
    let count = 0;
    for (const entry of this.tracked) if (entry.stage === 'mapped') count += 1;
    return count;
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
    let settle: (wire: WireBytes | null) => void = () => {};
    const wireBytes = new Promise<WireBytes | null>((resolve) => (settle = resolve));
    const entry: Tracked = {
      mapping,
      key: dnatKeyText(mapping),
      snatKey,
      stage: 'mapped',
      idle: null,
      endDeadline: null,
      settled: false,
      settle: (wire) => {
        if (entry.settled) return;
        entry.settled = true;
        settle(wire);
      },
    };
    this.tracked.add(entry);
    return {
      mapping,
      wireBytes,
      watchIdle: (idleMs, onIdle) => {
        if (entry.stage !== 'mapped' || entry.idle || this.closed) return;
        entry.idle = { idleMs, onIdle, lastMoving: 0, since: this.now() };
        this.schedulePoll();
      },
      remove: (awaitEndMs = 0) => this.remove(entry, awaitEndMs),
    };
  }

  /**
   * Read every watched mapping's counters with one nft call: cut the idle ones, settle the
   * finished ones. Runs on its own timer; public for tests (autoPoll: false).
   */
  poll(): void {
    const now = this.now();
    const watched = [...this.tracked].filter((entry) => entry.endDeadline !== null || (entry.stage === 'mapped' && entry.idle));
    if (this.closed || watched.length === 0) return;
    const listing = this.run(listCountersScript(this.table));
    if (!listing.ok) {
      // Once per failure streak: the next poll tries again; a deadline still settles (null).
      if (!this.pollFailed) this.onWarning('could not read the kernel data path counters', { table: this.table, error: listing.error });
      this.pollFailed = true;
      for (const entry of watched) if (entry.endDeadline !== null && now >= entry.endDeadline) this.finish([entry], null);
      return;
    }
    this.pollFailed = false;
    const sets = parseCounters(listing.output);
    const ended: Array<[Tracked, WireBytes]> = [];
    for (const entry of watched) {
      const counters = countersOf(sets, entry.key);
      if (entry.endDeadline !== null) {
        if (counters.ends.packets >= 2 || now >= entry.endDeadline) ended.push([entry, wireOf(counters)]);
        continue;
      }
      const idle = entry.idle!;
      if (counters.moving.packets !== idle.lastMoving) {
        idle.lastMoving = counters.moving.packets;
        idle.since = now;
      } else if (counters.to_server.packets > 0 && now - idle.since >= idle.idleMs) {
        this.cut(entry, wireOf(counters));
      }
    }
    if (ended.length > 0) this.deleteCounters(ended);
  }

  private cut(entry: Tracked, wire: WireBytes): void {
    entry.stage = 'cut';
    const script = cutScript(this.table, entry.mapping, this.releaseSnat(entry));
    // The DNAT element has usually expired by now (dataAcceptSeconds): then one by one.
    if (!this.run(script).ok) for (const line of script.split('\n')) this.run(line);
    this.deleteCounters([[entry, wire]]);
    entry.idle?.onIdle();
  }

  private remove(entry: Tracked, awaitEndMs: number): void {
    if (this.closed || entry.stage === 'removed') return;
    if (entry.stage === 'cut') {
      entry.stage = 'removed';
      this.tracked.delete(entry);
      this.run(`delete element ip ${this.table} ${CUT_SET} { ${entry.key} }`);
      return;
    }
    entry.stage = 'removed';
    const lastHolder = this.releaseSnat(entry);
    const scripts = removeMappingScripts(this.table, entry.mapping, lastHolder);
    // One transaction as a rule. It fails as a whole when the DNAT element already
    // expired (nobody connected in time, or the connection is made); then each goes on its own.
    if (!this.run(scripts.join('\n')).ok) for (const script of scripts) this.run(script);
    if (!entry.idle) {
      // No transfer used this mapping: nothing worth a read.
      this.deleteCounters([[entry, null]]);
      return;
    }
    const read = this.run(getCountersScript(this.table, entry.mapping));
    const counters = read.ok ? countersOf(parseCounters(read.output), entry.key) : null;
    if (counters && awaitEndMs > 0 && counters.ends.packets < 2 && counters.to_server.packets > 0) {
      entry.endDeadline = this.now() + awaitEndMs;
      this.schedulePoll();
      return;
    }
    this.deleteCounters([[entry, counters ? wireOf(counters) : null]]);
  }

  /** Delete the counter elements of these mappings in one call, then settle them. */
  private deleteCounters(done: Array<[Tracked, WireBytes | null]>): void {
    const script = done.map(([entry]) => removeCountersScript(this.table, entry.mapping)).join('\n');
    if (!this.run(script).ok) for (const [entry] of done) this.run(removeCountersScript(this.table, entry.mapping));
    for (const [entry, wire] of done) this.finish([entry], wire);
  }

  private finish(entries: Tracked[], wire: WireBytes | null): void {
    for (const entry of entries) {
      entry.endDeadline = null;
      // A cut mapping is no longer polled; its remove() only needs the key.
      if (entry.stage !== 'mapped') this.tracked.delete(entry);
      entry.settle(wire);
    }
  }

  /** One holder fewer for this mapping's SNAT element; true when it was the last. */
  private releaseSnat(entry: Tracked): boolean {
    const held = this.snat.get(entry.snatKey);
    const lastHolder = !held || held.holders <= 1;
    if (held && lastHolder) this.snat.delete(entry.snatKey);
    else if (held) held.holders -= 1;
    return lastHolder;
  }

  private schedulePoll(): void {
    if (!this.autoPoll || this.closed) return;
    let interval = Number.POSITIVE_INFINITY;
    for (const entry of this.tracked) {
      if (entry.endDeadline !== null) interval = Math.min(interval, END_POLL_MS);
      else if (entry.stage === 'mapped' && entry.idle) interval = Math.min(interval, Math.min(IDLE_POLL_MAX_MS, Math.max(IDLE_POLL_MIN_MS, entry.idle.idleMs / 4)));
    }
    if (!Number.isFinite(interval)) return;
    if (this.pollTimer && this.pollInterval <= interval) return;
    if (this.pollTimer) clearTimeout(this.pollTimer);
    this.pollInterval = interval;
    this.pollTimer = setTimeout(() => {
      this.pollTimer = null;
      this.poll();
      this.schedulePoll();
    }, interval);
    this.pollTimer.unref();
  }

  /** Delete the table with every mapping left in it. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.pollTimer) clearTimeout(this.pollTimer);
    this.pollTimer = null;
    for (const entry of this.tracked) entry.settle(null);
    this.tracked.clear();
    this.snat.clear();
    const result = this.run(`delete table ip ${this.table}`);
    if (!result.ok) this.onWarning('could not delete the nftables table', { table: this.table, error: result.error });
  }
}

function wireOf(counters: Record<CounterSet, NftCounter>): WireBytes {
  return { toClient: counters.to_client.bytes, toServer: counters.to_server.bytes };
}
