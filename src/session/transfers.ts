/**
 * The transfers of one session: one entry per data channel that carries a transfer command,
 * from the command to the channel's end. It holds the server's final reply until the data is
 * delivered (protocol.md §3.3), turns a 226 for data the client did not fully receive into a
 * 426 (issue #10), and writes the one `transfer` record and metric per transfer.
 */
import type { ClientCommand } from '../control/command.js';
import { replyLine, type Reply } from '../control/reply.js';
import type { TransferDirection } from '../control/rewrite.js';
import type { DataChannel, SecureLeg } from '../data/channel.js';
import type { WireBytes } from '../data/kernel-nft.js';
import type tls from 'node:tls';
import type { RelayResult } from '../data/relay.js';
import { REPLY_FOR_CODE, type ErrorCode } from '../errors.js';
import type { Logger } from '../log.js';
import type { RejectionReason } from '../metrics.js';
import type { ReplyQueue, ReplySlot } from '../reply-queue.js';
import type { DataSetup } from './data-setup.js';
import type { SessionDeps } from './types.js';

/** A data connection's TLS, for the transfer record (null: that leg was plain). */
export interface DataTlsInfo {
  readonly tlsVersion: string | null;
  readonly resumed: boolean;
}

export interface TransferContext {
  readonly channel: DataChannel;
  /** Filled in as each leg's TLS handshake completes. */
  readonly tls: { client: DataTlsInfo | null; server: DataTlsInfo | null };
  readonly command: ClientCommand;
  readonly direction: TransferDirection;
  readonly startedAt: number;
  /** The client sent ABOR while this transfer ran. */
  aborted: boolean;
}

export interface TransfersDeps extends Pick<SessionDeps, 'config' | 'metrics'> {
  /** The session's logger. */
  readonly log: Logger;
  readonly replies: ReplyQueue;
  /** The user name the client gave, for the transfer record. */
  readonly user: () => string | null;
  /** The pending data channel (null: no PASV/PORT came first), its outbound legs, and how a failure reads. */
  readonly dataSetup: Pick<DataSetup, 'take' | 'connectOutbound' | 'failureReply'>;
  /** Send the transfer command to the server; its replies go to `slot` (the final one back here). */
  readonly forward: (line: Buffer, slot: ReplySlot, transfer: TransferContext | null) => void;
  readonly isFinished: () => boolean;
  readonly limitHit: (reason: RejectionReason, fields: Record<string, unknown>) => void;
  /** How each leg's data connection is secured now (null: plain), asked at each transfer. */
  readonly dataSecurity: () => { readonly client: SecureLeg | null; readonly server: SecureLeg | null };
}

/** Data-connection failures the client hears of in the proxy's words, not the server's 426 (issue #12). */
const TLS_DATA_FAILURES: ReadonlySet<ErrorCode> = new Set(['FTPP_ERR_TLS_DATA_HANDSHAKE', 'FTPP_ERR_TLS_DATA_NOT_RESUMED']);

function tlsFailureOf(channel: DataChannel): ErrorCode | null {
  const code = channel.failureCode;
  return code !== null && TLS_DATA_FAILURES.has(code) ? code : null;
}

type Delivery = 'delivered' | 'cut' | 'hold-expired';

export class Transfers {
  private readonly deps: TransfersDeps;
  private readonly running = new Map<DataChannel, TransferContext>();
  private finished = 0;

  constructor(deps: TransfersDeps) {
    this.deps = deps;
  }

  /** Data channels carrying a transfer now (until the channel has closed). */
  get count(): number {
    return this.running.size;
  }

  /** Transfers whose final reply has come (for the session-end record). */
  get completed(): number {
    return this.finished;
  }

  /**
   * A transfer command: take the pending channel, dial its outbound legs before the command
   * goes upstream (if the client's PORT address cannot be reached the command is never sent,
   * protocol.md §8.14), then send it and pair the data connections.
   */
  async start(command: ClientCommand, direction: TransferDirection): Promise<void> {
    const { dataSetup, replies } = this.deps;
    const channel = dataSetup.take();
    const slot = replies.open();
    // No PORT/PASV first: the server answers "425 Use PORT or PASV first." (protocol.md §3.5).
    if (!channel) return this.deps.forward(command.line, slot, null);
    const transfer = this.begin(channel, command, direction);
    let sockets: Awaited<ReturnType<DataSetup['connectOutbound']>>;
    try {
      sockets = await dataSetup.connectOutbound(channel);
    } catch (err) {
      replies.push(slot, dataSetup.failureReply(err, command.verb));
      replies.end(slot);
      channel.close('data connect failed');
      return;
    }
    if (this.deps.isFinished() || channel.isClosed) {
      replies.end(slot);
      channel.close('session closing');
      return;
    }
    const security = this.deps.dataSecurity();
    this.deps.forward(command.line, slot, transfer);
    channel.pair({
      ...sockets,
      idleTimeoutMs: this.deps.config.timeouts.dataIdleMs,
      secureClient: noting(security.client, (info) => (transfer.tls.client = info)),
      secureUpstream: noting(security.server, (info) => (transfer.tls.server = info)),
    });
  }

  /** `channel` carries `command`'s data; the entry lives until the channel settles. */
  private begin(channel: DataChannel, command: ClientCommand, direction: TransferDirection): TransferContext {
    const context: TransferContext = { channel, command, direction, startedAt: Date.now(), aborted: false, tls: { client: null, server: null } };
    this.running.set(channel, context);
    channel.onSettled = (result, reason, code) => this.onChannelSettled(context, result, reason, code);
    return context;
  }

  /**
   * The server's final reply to a transfer command. Anything but 2yz resets the data
   * connection at once (a failed transfer must look failed, protocol.md §3.3). A 2yz is held
   * until the relayed data has been delivered; if it was not all delivered (the client's data
   * leg failed, or the hold expired and the proxy cut it) the client gets a 426, never a 226
   * for a cut transfer (RFC 959 §3.3; issue #10).
   */
  finalReply(slot: ReplySlot, transfer: TransferContext, reply: Reply): void {
    const { channel } = transfer;
    const { replies, log } = this.deps;
    const { timeouts } = this.deps.config;
    this.finished += 1;
    if (reply.code < 200 || reply.code >= 300) {
      channel.close(`server replied ${reply.code}`);
      // The server's 426 for a data connection the proxy refused (TLS) says less than ours.
      const ours = tlsFailureOf(channel);
      replies.push(slot, ours ? replyLine(REPLY_FOR_CODE[ours]) : reply.raw);
      replies.end(slot);
      this.record(transfer, ours ? Number.parseInt(REPLY_FOR_CODE[ours], 10) : reply.code, ours ? reply.code : null);
      return;
    }
    let timer: NodeJS.Timeout | null = null;
    const expired = new Promise<Delivery>((resolve) => {
      timer = setTimeout(() => resolve('hold-expired'), timeouts.transferReplyHoldMs);
    });
    const delivered = channel.directionDone(transfer.direction).then((done): Delivery => (done ? 'delivered' : 'cut'));
    void Promise.race([delivered, expired]).then((outcome) => {
      if (timer) clearTimeout(timer);
      if (outcome === 'delivered') {
        // The reply first: the client's 226 need not wait for the channel's teardown (on the
        // kernel path it once waited 2.7 ms for nftables calls, issue #14).
        replies.push(slot, reply.raw);
        channel.lingerThenClose(timeouts.dataLingerMs);
        this.record(transfer, reply.code, null);
      } else {
        if (outcome === 'hold-expired') log.warn({ event: 'transfer-hold-timeout', holdMs: timeouts.transferReplyHoldMs }, 'data not flushed in time; resetting the data connection');
        channel.close(outcome === 'hold-expired' ? 'final reply hold timed out' : 'data connection failed');
        const code: ErrorCode = tlsFailureOf(channel) ?? 'FTPP_ERR_TRANSFER_INCOMPLETE';
        log.info({ event: 'transfer-incomplete', code, serverReply: reply.code, why: outcome }, 'server reported success for data the client did not fully receive; answering 426');
        replies.push(slot, replyLine(REPLY_FOR_CODE[code]));
        this.record(transfer, Number.parseInt(REPLY_FOR_CODE[code], 10), reply.code);
      }
      replies.end(slot);
    });
  }

  /** ABOR: every running transfer is aborted; its legs are reset (the server then answers 426). */
  abortAll(): void {
    for (const context of this.running.values()) context.aborted = true;
    this.closeAll('ABOR');
  }

  /** Reset every running transfer's data connections. */
  closeAll(reason: string): void {
    for (const channel of [...this.running.keys()]) channel.close(reason);
  }

  /**
   * One `transfer` record and metric, once the reply the client gets is known; for a
   * kernel-carried transfer once its counters have been read too (channel.wireBytes).
   */
  private record(transfer: TransferContext, code: number, serverCode: number | null): void {
    const { channel } = transfer;
    const durationMs = Date.now() - transfer.startedAt;
    if (!channel.isForwarded) {
      this.writeRecord(transfer, code, serverCode, durationMs, null);
      return;
    }
    void channel.wireBytes.then((wire) => this.writeRecord(transfer, code, serverCode, durationMs, wire));
  }

  private writeRecord(transfer: TransferContext, code: number, serverCode: number | null, durationMs: number, wire: WireBytes | null): void {
    const { channel } = transfer;
    const { config, metrics, log } = this.deps;
    const bytes = channel.bytes;
    // The kernel path never sees the payload: no payload count rather than a wrong one; its
    // IP bytes (headers included) are `wireBytes`, a different measure under its own name.
    const moved = channel.isForwarded ? null : transfer.direction === 'download' ? bytes.toClient : bytes.toUpstream;
    const result = code >= 200 && code < 300 ? 'ok' : transfer.aborted ? 'aborted' : 'failed';
    metrics.transferFinished(config.name, transfer.direction, result, moved ?? Number.NaN, durationMs / 1000);
    if (wire) metrics.transferWireBytes(config.name, wire);
    log.info(
      {
        event: 'transfer',
        command: transfer.command.verb,
        path: transfer.command.argument.slice(0, 512),
        user: this.deps.user(),
        direction: transfer.direction,
        bytes: moved,
        wireBytes: wire,
        result,
        durationMs,
        reply: code,
        ...(serverCode !== null ? { serverReply: serverCode } : {}),
        clientDataPort: channel.clientPort,
        upstreamDataPort: channel.upstreamPort,
        clientMode: channel.clientLeg.kind === 'active' ? 'active' : 'passive',
        dataPath: channel.isForwarded ? 'kernel' : 'relay',
        relay: channel.carrier,
        upstreamMode: channel.upstreamLeg.kind === 'passive' ? 'passive' : 'active',
        clientTls: transfer.tls.client,
        serverTls: transfer.tls.server,
      },
      'transfer',
    );
  }

  private onChannelSettled(transfer: TransferContext, result: RelayResult | null, reason: string, code: ErrorCode | null): void {
    this.running.delete(transfer.channel);
    if (code === 'FTPP_ERR_DATA_ACCEPT_TIMEOUT') {
      this.deps.limitHit('data-accept-timeout', { code, reason });
    } else if (result?.outcome === 'idle') {
      this.deps.limitHit('data-idle-timeout', { dataIdleMs: this.deps.config.timeouts.dataIdleMs });
    }
    this.deps.log.debug({ event: 'data-closed', reason, outcome: result?.outcome ?? 'not-connected' }, 'data channel closed');
  }
}

/** `leg`, telling `note` the TLS version and resumption of the socket it made. */
function noting(leg: SecureLeg | null, note: (info: DataTlsInfo) => void): SecureLeg | null {
  if (!leg) return null;
  return async (plain, adopt) => {
    const secure = (await leg(plain, adopt)) as tls.TLSSocket;
    note({ tlsVersion: secure.getProtocol?.() ?? null, resumed: secure.isSessionReused?.() ?? false });
    return secure;
  };
}
