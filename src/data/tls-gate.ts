/**
 * The transport under a data connection's TLSSocket when the native relay may take the
 * connection over after its handshake (issue #12: PROT P on both legs at C speed).
 *
 * Node does the handshake (certificates, resumption, the session binding of tls.ts); the
 * relay thread then needs the connection's exact record-layer state: the traffic keys and
 * each direction's record sequence number, plus every byte already read off the socket
 * that Node has not decrypted. Over a plain net.Socket that state is out of reach: Node
 * reads ahead and decrypts whatever arrived with the peer's last handshake flight. So the
 * TLSSocket is built on this Duplex instead, which hands Node's TLS layer the peer's records
 * one at a time, and only while the handshake runs:
 *
 * - RX: records go in one at a time, each processed before the next (feedRecords), so the
 *   one that completes the handshake (the peer's Finished: `secure`, or `secureConnect` for
 *   the TLS client) is the last one Node sees. TLS 1.3 keeps handshake and application keys in separate records
 *   (RFC 8446 §5.1), so the first application record is still here, unread: read sequence 0.
 *   Whatever arrives afterwards is held (bounded) for the relay.
 * - TX: Node's records pass through to the socket and are counted. Node writes its
 *   NewSessionTickets (server side, application keys) after `secure` in the same turn
 *   (verified, Node 20 / OpenSSL 3): write sequence = the records written since. The TLS
 *   client writes nothing after its Finished: nothing writes to a data connection before the
 *   relay starts, and OpenSSL's client sends no post-handshake message unasked (a KeyUpdate
 *   answers one; the relay refuses a KeyUpdate).
 * - Keys: Node's `keylog` lines carry CLIENT/SERVER_TRAFFIC_SECRET_0; the keys and IVs
 *   follow from them (RFC 8446 §7.3, tls-records.ts).
 *
 * When the connection cannot be handed over (TLS 1.2, a suite other than AES-GCM, the JS
 * relay chosen for another reason), release() opens the gate: held bytes and everything
 * after flow to Node unchanged, and the JS relay reads the TLSSocket as before.
 */
import { Duplex } from 'node:stream';
import type net from 'node:net';
import type tls from 'node:tls';
import { registerTlsTransport } from './relay.js';
import {
  CONTENT_APPLICATION_DATA,
  parseTrafficSecret,
  recordCipher,
  recordLength,
  trafficKeys,
  type TrafficSecretLabel,
} from './tls-records.js';

/**
 * Bytes held for the relay between the handshake and the relay's start (the other leg may
 * still be connecting): reading stops at this bound, so a client that starts its upload at
 * once costs no more memory than this.
 */
export const GATE_HOLD_BYTES = 256 * 1024;

/** What the native relay needs to carry one TLS leg (src/native/splice_relay.c, tls_leg). */
export interface TlsLegState {
  readonly bits: 128 | 256;
  readonly readKey: Buffer;
  readonly readIv: Buffer;
  readonly readSeq: number;
  readonly writeKey: Buffer;
  readonly writeIv: Buffer;
  readonly writeSeq: number;
  /** Ciphertext read from the socket that Node's TLS layer has not seen. */
  readonly pending: Buffer;
}

type GateState =
  /** Records go to Node one at a time. */
  | 'handshake'
  /** Handshake done and the connection can be handed over: bytes are held. */
  | 'holding'
  /** Everything flows to Node (released, or the connection cannot be handed over). */
  | 'open'
  /** The relay owns the socket: the TLSSocket above is left with nothing. */
  | 'handed-off';

const EMPTY = Buffer.alloc(0);

function ignoreError(): void {}

/** Which gate (if any) sits under a TLSSocket. */
const gates = new WeakMap<tls.TLSSocket, TlsHandshakeGate>();

export function gateOf(socket: net.Socket): TlsHandshakeGate | null {
  return gates.get(socket as tls.TLSSocket) ?? null;
}

export class TlsHandshakeGate extends Duplex {
  readonly raw: net.Socket;
  private readonly role: 'server' | 'client';
  private state: GateState = 'handshake';
  /** Bytes read from the socket and not yet given to Node. */
  private held: Buffer = EMPTY;
  private feedScheduled = false;
  private rawEnded = false;
  private secure: tls.TLSSocket | null = null;
  private readonly secrets = new Map<TrafficSecretLabel, Buffer>();
  /** Records Node wrote to the peer since its handshake completed (application keys). */
  private recordsWrittenSince = 0;
  /** Partial record header/body Node has written so far (records are counted as they end). */
  private writeRemainder = 0;
  private writeHeader: number[] = [];

  constructor(raw: net.Socket, role: 'server' | 'client') {
    super({ allowHalfOpen: true });
    this.raw = raw;
    this.role = role;
    raw.on('data', this.onRawData);
    raw.on('end', this.onRawEnd);
    raw.on('error', this.onRawError);
    raw.on('close', this.onRawClose);
    // An accepted data socket is paused until its channel pairs (passive.ts); a 'data'
    // listener does not undo an explicit pause.
    raw.resume();
  }

  /** The TLSSocket built on this gate: its keys and the end of its handshake are watched here. */
  attach(socket: tls.TLSSocket): void {
    this.secure = socket;
    gates.set(socket, this);
    registerTlsTransport(socket, this.raw);
    socket.on('keylog', this.onKeylog);
    socket.once(this.role === 'server' ? 'secure' : 'secureConnect', this.onEstablished);
  }

  /** True once the handshake is done and the connection can be handed to the native relay. */
  get canHandOff(): boolean {
    return this.state === 'holding' && !this.rawEnded && !this.raw.destroyed && this.raw.writableLength === 0;
  }

  /** Resolves once every byte Node wrote (its Finished, session tickets) has left for the kernel. */
  flushed(): Promise<void> {
    if (this.raw.destroyed || this.raw.writableLength === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.raw.write(EMPTY, () => resolve());
    });
  }

  /**
   * Hand the connection to the relay: the state it needs, and from now on the socket is the
   * relay's (this gate no longer reads or writes it). Null when canHandOff is false.
   */
  handOff(): TlsLegState | null {
    if (!this.canHandOff || !this.secure) return null;
    const cipher = recordCipher(this.secure.getCipher()?.standardName);
    const clientSecret = this.secrets.get('CLIENT_TRAFFIC_SECRET_0');
    const serverSecret = this.secrets.get('SERVER_TRAFFIC_SECRET_0');
    if (!cipher || !clientSecret || !serverSecret) return null;
    const [readSecret, writeSecret] = this.role === 'server' ? [clientSecret, serverSecret] : [serverSecret, clientSecret];
    const read = trafficKeys(cipher, readSecret);
    const write = trafficKeys(cipher, writeSecret);
    this.state = 'handed-off';
    this.raw.removeListener('data', this.onRawData);
    this.raw.removeListener('end', this.onRawEnd);
    this.raw.pause();
    // Bytes the socket read into its own buffer once paused at the hold bound. (read() may
    // restart libuv's reading; the relay stops it again in the same turn, before any read.)
    const chunks = [this.held];
    for (let chunk = this.raw.read() as Buffer | null; chunk !== null; chunk = this.raw.read() as Buffer | null) chunks.push(chunk);
    const pending = Buffer.concat(chunks);
    this.held = EMPTY;
    this.secrets.clear();
    // The TLSSocket above is left with nothing to do; it closes when the connection does.
    this.secure.on('error', ignoreError);
    return { bits: cipher.bits, readKey: read.key, readIv: read.iv, readSeq: 0, writeKey: write.key, writeIv: write.iv, writeSeq: this.recordsWrittenSince, pending };
  }

  /** Let everything through to Node from now on (the JS relay reads the TLSSocket). Idempotent. */
  release(): void {
    if (this.state === 'open' || this.state === 'handed-off') return;
    this.state = 'open';
    this.secrets.clear();
    const held = this.held;
    this.held = EMPTY;
    if (held.length > 0) this.push(held);
    if (this.rawEnded) this.push(null);
    else this.raw.resume();
  }

  override _read(): void {
    if (this.state === 'open') {
      this.raw.resume();
      return;
    }
    // Node wants more: feed from outside _read (see feedRecords).
    if (this.state === 'handshake') this.feedLater();
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.state === 'handed-off') {
      callback();
      return;
    }
    // Only the TLS server writes after its handshake (session tickets); the client's last
    // handshake record, its Finished, goes out after secureConnect and is not counted.
    if (this.state === 'holding' && this.role === 'server') this.countWrittenRecords(chunk);
    this.raw.write(chunk, callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (this.state !== 'handed-off' && !this.raw.destroyed) this.raw.end();
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.detach();
    // Node's TLSSocket went away without the relay: the connection goes with it.
    if (this.state !== 'handed-off' && !this.raw.destroyed) this.raw.destroy();
    callback(error);
  }

  private detach(): void {
    this.raw.removeListener('data', this.onRawData);
    this.raw.removeListener('end', this.onRawEnd);
    this.secure?.removeListener('keylog', this.onKeylog);
  }

  /**
   * Give Node the next whole records, one at a time, until its handshake is done. A record is
   * pushed only while the stream flows with nothing buffered, and never from inside _read:
   * then push() emits it at once and Node's TLS layer has processed it when push() returns
   * (JSStreamSocket hands each 'data' chunk to TLSWrap synchronously), so the handshake's
   * end is seen before the next record goes in. Otherwise look again on the next turn.
   */
  private feedRecords(): void {
    while (this.state === 'handshake') {
      const length = recordLength(this.held);
      if (length < 0) {
        // Not TLS as we know it: let Node's TLS layer see it and fail the handshake.
        this.release();
        return;
      }
      if (length === 0) {
        if (this.rawEnded) this.release();
        return;
      }
      if (this.readableFlowing !== true || this.readableLength > 0) {
        this.feedLater();
        return;
      }
      const record = this.held.subarray(0, length);
      this.held = this.held.subarray(length);
      this.push(record);
    }
  }

  private feedLater(): void {
    if (this.feedScheduled) return;
    this.feedScheduled = true;
    setImmediate(() => {
      this.feedScheduled = false;
      this.feedRecords();
    });
  }

  private readonly onRawData = (chunk: Buffer): void => {
    if (this.state === 'open') {
      if (!this.push(chunk)) this.raw.pause();
      return;
    }
    this.held = this.held.length === 0 ? chunk : Buffer.concat([this.held, chunk]);
    if (this.held.length >= GATE_HOLD_BYTES) this.raw.pause();
    this.feedRecords();
  };

  private readonly onRawEnd = (): void => {
    this.rawEnded = true;
    if (this.state === 'open') this.push(null);
    else if (this.state === 'handshake') this.feedRecords();
  };

  private readonly onRawError = (err: Error): void => {
    if (this.state !== 'handed-off') this.destroy(err);
  };

  private readonly onRawClose = (): void => {
    if (!this.destroyed) this.destroy();
    if (this.state === 'handed-off') this.secure?.destroy();
  };

  private readonly onKeylog = (line: Buffer): void => {
    const secret = parseTrafficSecret(line);
    if (secret) this.secrets.set(secret.label, secret.secret);
  };

  private readonly onEstablished = (): void => {
    const socket = this.secure;
    const eligible = socket !== null && socket.getProtocol() === 'TLSv1.3' && recordCipher(socket.getCipher()?.standardName) !== null && this.secrets.size === 2;
    if (!eligible || this.rawEnded) {
      this.release();
      return;
    }
    this.state = 'holding';
  };

  /** Count the records in what Node writes after its handshake (they are application-key records). */
  private countWrittenRecords(chunk: Buffer): void {
    let offset = 0;
    while (offset < chunk.length) {
      if (this.writeRemainder > 0) {
        const take = Math.min(this.writeRemainder, chunk.length - offset);
        this.writeRemainder -= take;
        offset += take;
        continue;
      }
      this.writeHeader.push(chunk[offset++]!);
      if (this.writeHeader.length < 5) continue;
      const [type, , , high, low] = this.writeHeader as [number, number, number, number, number];
      this.writeHeader = [];
      this.writeRemainder = (high << 8) | low;
      if (type === CONTENT_APPLICATION_DATA) this.recordsWrittenSince++;
    }
  }
}
