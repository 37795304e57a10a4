/**
 * The kernel data path (`client.dataPath: kernel`, or `auto` where the host allows it): a data
 * connection is not relayed by the proxy at all. For each transfer the proxy adds one mapping
 * to nftables maps in a table of its own (kernel-nft.ts has the scripts):
 *
 *   dnat_to: (opener IP . proxy IP . leased port)  -> target IP . target port
 *   snat_to: (opener IP . target IP . target port) -> the proxy's address on the target's side
 *
 * The opener is whoever connects: the client after a 227/229 (the target is the server's
 * passive port), or the server after the PORT/EPRT the proxy sent it for a PORT/EPRT client
 * (the target is the address the client named; upstream.dataMode mirror or active). The
 * opener's connection to the leased port is DNATed by the kernel straight to the target and
 * SNATed so the target sees the proxy's address (vsftpd pasv_promiscuous=NO checks it equals
 * the control peer, protocol.md §2.4; a client expects its data from the proxy it talks to).
 * IPv4 and IPv6 mappings live in the same `inet` table, in maps of their own (nftables cannot
 * translate between families, so a mapping is one family). An SNAT element can be shared:
 * vsftpd closes its passive listener once the data connection is accepted, so the same port
 * may be handed to the next PASV while the first transfer still runs (seen at 50 concurrent
 * sessions in test/bench). SNAT elements are therefore reference-counted and carry no
 * timeout; they open nothing by themselves (only flows we DNATed are SNATed). This is
 * OpenBSD ftp-proxy's per-transfer pf rule, with nftables maps instead of anchors. The
 * payload never crosses a second TCP connection: on the bench machine a user-space relay,
 * even splice(2), holds a transfer to about half of direct because every byte is received and
 * re-sent by a second TCP stack (README "Performance").
 *
 * Counting and the idle cut (issue #14). The proxy never sees the payload, so nftables counts
 * for it, with one lookup per packet: the verdict map `flows`, keyed by conntrack direction
 * and the connection's ORIGINAL tuple (opener IP . proxy IP . leased port, read back with
 * `ct original ...` after NAT, like dnat_to's key), has an element per direction whose
 * counter holds the IP bytes that way (`original`: from the opener, `reply`: toward it) and
 * whose verdict is `accept`; a set `ends` counts FIN/RST packets. These are IP bytes, headers
 * included (and one header per GRO/GSO aggregate, retransmissions included): `wireBytes`,
 * never `bytes`. Every quarter of dataIdleSeconds one `list map` reads every mapping's
 * counters: a connection whose counters grew by no more than headers can explain
 * (kernel-nft.ts payloadMoved) for dataIdleSeconds is cut (DNAT removed, its `flows`
 * elements turned into `goto cut_reset`, where `reject with tcp reset` answers the next
 * packet of either side). The counts are read when the transfer is over: at once when it
 * failed, else once both FINs (or a RST) passed or the linger ran out, so bytes still in the
 * sender's buffer when the 226 came are counted.
 *
 * What the relay gives and this path does not, by construction (README "Kernel data path"):
 *  - the proxy does not see the payload: IP bytes, not payload bytes, are counted;
 *  - the idle cut can only answer a packet: an upload whose client sends nothing is silent
 *    both ways, and the server learns of the cut from its own data timeout; and where a side
 *    arrives over a bridge with br_netfilter, nf_send_reset sends the RST out of the bridge
 *    port without NAT and it is lost: conntrack closes the entry 10 s later and the next packet
 *    meets the host's own reset (README "Kernel data path", measured in the NAT lab);
 *  - only one connection can be NATed: a PASV client with an active server leg, or a PORT
 *    client with a passive one, is relayed, and so are TLS data, PROXY headers, mixed families
 *    (kernel-nft.ts kernelPathBlocker, counted by reason).
 * What stays as it is: half-close and resets pass end to end (it is one TCP connection);
 * only the control peer of the opener's side may connect (the map key holds it, like the
 * relay's source check, RFC 2577 port stealing); the mapping expires after dataAcceptSeconds
 * if nobody connects (the element's own timeout, so a crash cannot leave a hole open for
 * long) and is removed when the channel closes. A connection already made lives on in
 * conntrack (until it ends, or the idle cut resets it).
 *
 * This module keeps the table's state; the scripts run through libnftables in the native addon
 * (nft-runner.ts), changes batched off the event loop (nft-batches.ts). Nothing here owns a socket.
 */
import { ProxyError } from '../errors.js';
import { NftChangeQueue } from './nft-batches.js';
import { runEachIfNeeded, type NftBatchRunner, type NftRunner } from './nft-runner.js';
import type { Family } from '../control/ip.js';
import {
  addMappingScript,
  countersOf,
  cutScript,
  dnatKeyText,
  familyOfMapping,
  getCountersScript,
  listCounterScripts,
  parseCounters,
  payloadMoved,
  removeCountersScript,
  removeMappingScripts,
  removeSnatScript,
  snatKeyText,
  staleTables,
  tableName,
  tableScript,
  uncutScript,
  wireOf,
  type CounterSet,
  type ForwardMapping,
  type NftCounter,
  type WireBytes,
} from './kernel-nft.js';

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
   * conntrack) and read the counters at the next poll or, with `awaitEndMs`, once the
   * connection has ended (both FINs, or a RST) or that time has passed. Idempotent; after a
   * cut it takes the cut `flows` elements out early (whoever answered has given the connection up).
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
  /** Why the host cannot forward this family now (e.g. IPv6 forwarding off), or null. */
  readonly familyBlocked?: (family: Family) => string | null;
  /** Adds and removals off the event loop, batched (nft-batches.ts); without it they run at once. */
  readonly runBatch?: NftBatchRunner | null;
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
const END_POLL_MS = 250;
/** Beyond this many finished transfers in one poll, list `flows` and `ends` instead of a `get element` each (0.3 ms each). */
const GET_PER_POLL_MAX = 32;
const NO_COUNT: NftCounter = { packets: 0, bytes: 0 };

/** A quarter of the shortest idle timeout watched, within IDLE_POLL_MIN_MS and IDLE_POLL_MAX_MS. */
function idleCheckInterval(entries: readonly Tracked[]): number {
  let shortest = Number.POSITIVE_INFINITY;
  for (const entry of entries) if (entry.idle) shortest = Math.min(shortest, entry.idle.idleMs);
  return Math.min(IDLE_POLL_MAX_MS, Math.max(IDLE_POLL_MIN_MS, shortest / 4));
}

/** What the forwarder knows of one mapping. */
interface Tracked {
  readonly mapping: ForwardMapping;
  /** The key in dnat_to and the counter and cut sets (the family's own sets: IPv4 and IPv6 texts differ). */
  readonly key: string;
  readonly snatKey: string;
  stage: 'mapped' | 'cut' | 'removed';
  /** The counters at the last idle check that saw payload move (payloadMoved), and when that was. */
  idle: { readonly idleMs: number; readonly onIdle: () => void; last: Pick<Record<CounterSet, NftCounter>, 'original' | 'reply'>; since: number } | null;
  /** remove() with awaitEndMs: counters are read once the connection ends or at the deadline. */
  endDeadline: number | null;
  settled: boolean;
  readonly settle: (wire: WireBytes | null) => void;
}

/** The proxy's nftables table and the mappings in it. One per process. */
export class KernelForwarder {
  readonly table: string;
  /** Synchronous: runs what `changes` still holds first, so calls take effect in the order made. */
  private readonly run: NftRunner;
  private readonly changes: NftChangeQueue;
  private readonly onWarning: (message: string, detail: Record<string, unknown>) => void;
  private readonly now: () => number;
  private readonly autoPoll: boolean;
  private readonly tracked = new Set<Tracked>();
  /** SNAT elements in the table: key -> the address they map to and how many mappings hold them. */
  private readonly snat = new Map<string, { readonly snatIp: string; holders: number }>();
  private pollTimer: NodeJS.Timeout | null = null;
  private pollInterval = Number.POSITIVE_INFINITY;
  private pollFailed = false;
  /** When the idle check (a listing of two sets) is next due. */
  private nextIdleCheck = 0;
  private closed = false;
  /** Why the host cannot forward a family (kernelPathBlocker asks before each mapping). */
  readonly familyBlocked: (family: Family) => string | null;

  /** Remove stale tables, create ours. Throws FTPP_ERR_KERNEL_PATH with nft's words. */
  constructor(run: NftRunner, options: KernelForwarderOptions = {}) {
    const pid = options.pid ?? process.pid;
    this.table = options.table ?? tableName(pid);
    this.changes = new NftChangeQueue(run, options.runBatch ?? null);
    this.run = (script) => {
      this.changes.drain();
      return run(script);
    };
    this.onWarning = options.onWarning ?? (() => {});
    this.now = options.now ?? Date.now;
    this.autoPoll = options.autoPoll ?? true;
    this.familyBlocked = options.familyBlocked ?? (() => null);
    const listing = run('list tables');
    if (!listing.ok) throw new ProxyError('FTPP_ERR_KERNEL_PATH', `cannot list nftables tables: ${listing.error || 'unknown error'} (needs CAP_NET_ADMIN)`);
    for (const stale of staleTables(listing.output, options.isAlive ?? processAlive, pid)) {
      const removed = run(`delete table ${stale.family} ${stale.name}`);
      this.onWarning('removed the nftables table of a proxy that is gone', { table: stale.name, family: stale.family, ok: removed.ok, ...(removed.ok ? {} : { error: removed.error }) });
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

  /** Resolves once every add and removal made so far is in the table (they run off the event loop: nft-batches.ts). */
  changesApplied(): Promise<void> {
    return this.changes.whenIdle();
  }

  /**
   * Install one transfer's mapping; rejects with FTPP_ERR_KERNEL_PATH (the caller relays
   * instead). The add runs off the event loop with the turn's other changes (nft-batches.ts):
   * only this transfer's 227/229 waits for it.
   */
  forward(mapping: ForwardMapping, timeoutMs: number): Promise<KernelForward> {
    if (this.closed) return Promise.reject(new ProxyError('FTPP_ERR_KERNEL_PATH', 'kernel data path closed'));
    const snatKey = snatKeyText(mapping);
    const shared = this.snat.get(snatKey);
    if (shared && shared.snatIp !== mapping.snatIp) {
      return Promise.reject(new ProxyError('FTPP_ERR_KERNEL_PATH', `${snatKey} is already sent from ${shared.snatIp}, not ${mapping.snatIp}`));
    }
    const key = dnatKeyText(mapping);
    this.releaseKey(key);
    // Held from now on, so a mapping made in the same turn shares it and a removal in between
    // keeps it. Every add carries the SNAT element (`add` of an element that exists changes
    // nothing): whichever add of a shared one runs, or fails, the others do not depend on it.
    if (shared) shared.holders += 1;
    else this.snat.set(snatKey, { snatIp: mapping.snatIp, holders: 1 });
    let settle: (wire: WireBytes | null) => void = () => {};
    const wireBytes = new Promise<WireBytes | null>((resolve) => (settle = resolve));
    const entry: Tracked = {
      mapping,
      key,
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
    return new Promise((resolve, reject) => {
      this.changes.submit([addMappingScript(this.table, mapping, timeoutMs)], ([error]) => {
        if (error || this.closed) {
          // Nothing of it took effect (one transaction); a SNAT element nobody else holds goes.
          if (this.releaseSnat(entry) && !this.closed) this.changes.submit([removeSnatScript(this.table, mapping)]);
          reject(new ProxyError('FTPP_ERR_KERNEL_PATH', error === 'closed' || this.closed ? 'kernel data path closed' : `cannot add the data mapping: ${error}`));
          return;
        }
        this.tracked.add(entry);
        resolve({
          mapping,
          wireBytes,
          watchIdle: (idleMs, onIdle) => {
            if (entry.stage !== 'mapped' || entry.idle || this.closed) return;
            entry.idle = { idleMs, onIdle, last: { original: NO_COUNT, reply: NO_COUNT }, since: this.now() };
            this.schedulePoll();
          },
          remove: (awaitEndMs = 0) => this.remove(entry, awaitEndMs),
        });
      });
    });
  }

  /**
   * Settle the finished mappings whose connection has ended (or whose wait ran out), and,
   * when due, cut the idle ones. Runs on its own timer; public for tests (autoPoll: false).
   *
   * Cost, measured with nft 1.0.6 (issue #14): every libnftables call costs 0.3-0.5 ms,
   * `get element` 0.3 ms per element even when batched, and a listing grows with what it
   * lists (`list table` 88 ms at 1,000 mappings, `list set` about 15-25 ms). So a finished
   * transfer reads its own elements (`get element`), while the idle check reads only the
   * `flows` map, and only every quarter of the idle timeout.
   */
  poll(): void {
    if (this.closed) return;
    const now = this.now();
    const ended: Array<[Tracked, WireBytes | null]> = [];
    const ending = [...this.tracked].filter((entry) => entry.endDeadline !== null);
    // A few: each reads its own elements; many (a burst of transfers ending together): one
    // listing of the three sets it needs costs less than a `get` each.
    const listed = ending.length > GET_PER_POLL_MAX ? this.readSets(new Set(ending.map((entry) => familyOfMapping(entry.mapping))), ['original', 'reply', 'ends']) : null;
    for (const entry of ending) {
      let counters: Record<CounterSet, NftCounter> | null = listed ? countersOf(listed, entry.mapping) : null;
      if (!listed) {
        const read = this.run(getCountersScript(this.table, entry.mapping));
        counters = read.ok ? countersOf(parseCounters(read.output), entry.mapping) : null;
      }
      // Settled: both FINs (or a RST) passed, no connection was ever made, or the wait ran out.
      const over = counters ? counters.ends.packets >= 2 || counters.original.packets === 0 : false;
      if (over || now >= entry.endDeadline!) ended.push([entry, counters ? wireOf(counters, entry.mapping.opener) : null]);
    }
    if (ended.length > 0) this.deleteCounters(ended);
    const idling = [...this.tracked].filter((entry) => entry.stage === 'mapped' && entry.idle);
    // On the timer, the idle check has its own cadence; poll() called by hand (tests) checks at once.
    if (idling.length === 0 || (this.autoPoll && now < this.nextIdleCheck)) return;
    this.nextIdleCheck = now + idleCheckInterval(idling);
    const sets = this.readSets(new Set(idling.map((entry) => familyOfMapping(entry.mapping))), ['original', 'reply']);
    if (!sets) return;
    for (const entry of idling) {
      const counters = countersOf(sets, entry.mapping);
      const idle = entry.idle!;
      if (payloadMoved(idle.last, counters, familyOfMapping(entry.mapping))) {
        idle.last = counters;
        idle.since = now;
      } else if (counters.original.packets > 0 && now - idle.since >= idle.idleMs) {
        this.cut(entry, wireOf(counters, entry.mapping.opener));
      }
    }
  }

  /** These counters of these families (one listing per map or set: nft 1.0.6 fails several `list` commands in one script); null when a read failed. */
  private readSets(families: ReadonlySet<Family>, names: readonly CounterSet[]): Map<string, Map<string, NftCounter>> | null {
    const output: string[] = [];
    for (const script of [...families].flatMap((family) => listCounterScripts(this.table, family, names))) {
      const listing = this.run(script);
      if (!listing.ok) {
        // Once per failure streak: the next check tries again.
        if (!this.pollFailed) this.onWarning('could not read the kernel data path counters', { table: this.table, error: listing.error });
        this.pollFailed = true;
        return null;
      }
      output.push(listing.output);
    }
    this.pollFailed = false;
    return parseCounters(output.join('\n'));
  }

  /**
   * A port is leased again while its last transfer's key is still ours: its counters wait for
   * the connection's last packets, or its cut `flows` elements stay until the final reply. Both
   * end now: with one key per (opener, proxy address, port) the new transfer's counts would add
   * to the old ones, the old read would delete the new elements, and the cut ones would reset the new
   * connection (seen with a one-port passive range in the NAT lab). The old record counts what
   * passed until this moment.
   */
  private releaseKey(key: string): void {
    for (const old of this.tracked) {
      if (old.key !== key) continue;
      if (old.stage === 'cut') {
        old.stage = 'removed';
        this.tracked.delete(old);
        this.run(uncutScript(this.table, old.mapping));
      } else if (old.endDeadline !== null) {
        const read = this.run(getCountersScript(this.table, old.mapping));
        this.deleteCounters([[old, read.ok ? wireOf(countersOf(parseCounters(read.output), old.mapping), old.mapping.opener) : null]]);
      }
    }
  }

  private cut(entry: Tracked, wire: WireBytes): void {
    entry.stage = 'cut';
    // Its counters go and its `flows` elements come back as cut ones (kernel-nft.ts cutScript).
    const script = cutScript(this.table, entry.mapping, this.releaseSnat(entry));
    // The DNAT element has usually expired by now (dataAcceptSeconds): then one by one.
    runEachIfNeeded(this.run, script.split('\n'));
    this.finish([entry], wire);
    entry.idle?.onIdle();
  }

  private remove(entry: Tracked, awaitEndMs: number): void {
    if (this.closed || entry.stage === 'removed') return;
    if (entry.stage === 'cut') {
      entry.stage = 'removed';
      this.tracked.delete(entry);
      this.changes.submit([uncutScript(this.table, entry.mapping)]);
      return;
    }
    entry.stage = 'removed';
    const lastHolder = this.releaseSnat(entry);
    // Off the event loop, batched (nft-batches.ts). One transaction as a rule; it fails as a
    // whole when the DNAT element already expired (nobody connected in time, or the
    // connection is made), and then each script goes on its own.
    this.changes.submit(removeMappingScripts(this.table, entry.mapping, lastHolder));
    if (!entry.idle) {
      // No transfer used this mapping: nothing worth a read.
      this.deleteCounters([[entry, null]]);
      return;
    }
    // Read at the next poll, never here: after a change to the table, libnftables reloads a
    // set's every element for a `get element` (73 ms at 1,000 mappings), so one read per
    // finished transfer made the 1,000-transfer bench 18x direct. A poll's reads share one load.
    entry.endDeadline = this.now() + awaitEndMs;
    this.schedulePoll();
  }

  /** Delete the counter elements of these mappings (queued: one batch), then settle them. */
  private deleteCounters(done: Array<[Tracked, WireBytes | null]>): void {
    this.changes.submit(done.map(([entry]) => removeCountersScript(this.table, entry.mapping)));
    for (const [entry, wire] of done) this.finish([entry], wire);
  }

  private finish(entries: Tracked[], wire: WireBytes | null): void {
    for (const entry of entries) {
      entry.endDeadline = null;
      // A cut mapping is no longer polled, but stays known until remove() takes its key out
      // of `flows` (or the port's next mapping does: releaseKey).
      if (entry.stage === 'removed') this.tracked.delete(entry);
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
      else if (entry.stage === 'mapped' && entry.idle) interval = Math.min(interval, idleCheckInterval([entry]));
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
    // Queued removals are moot: the table goes with everything in it (after a batch in flight).
    this.changes.close();
    const result = this.run(`delete table inet ${this.table}`);
    if (!result.ok) this.onWarning('could not delete the nftables table', { table: this.table, error: result.error });
  }
}
