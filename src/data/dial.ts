/**
 * Outbound data or control connection with a timeout and cancellation.
 */
import net from 'node:net';
import { ProxyError, type ErrorCode } from '../errors.js';

export interface DialOptions {
  readonly host: string;
  readonly port: number;
  readonly localAddress?: string | null;
  readonly timeoutMs: number;
  /** Error code used when the connection fails. */
  readonly errorCode?: ErrorCode;
  /** Error code used when it times out (default: errorCode), so callers tell the two apart by code. */
  readonly timeoutCode?: ErrorCode;
  readonly allowHalfOpen?: boolean;
}

export interface Dial {
  readonly connected: Promise<net.Socket>;
  /** Abandon the attempt (the socket, if any, is destroyed). Idempotent. */
  cancel(): void;
}

export function dial(options: DialOptions): Dial {
  const code = options.errorCode ?? 'FTPP_ERR_DATA_CONNECT';
  const socket = net.connect({
    host: options.host,
    port: options.port,
    allowHalfOpen: options.allowHalfOpen ?? true,
    ...(options.localAddress ? { localAddress: options.localAddress } : {}),
  });
  let settled = false;
  let cancel: () => void = () => {};
  const connected = new Promise<net.Socket>((resolve, reject) => {
    const timer = setTimeout(() => finish(new ProxyError(options.timeoutCode ?? code, `connect to ${options.host}:${options.port} timed out after ${options.timeoutMs} ms`)), options.timeoutMs);
    const onError = (err: Error): void => finish(new ProxyError(code, `connect to ${options.host}:${options.port} failed: ${err.message}`, { cause: err }));
    const onConnect = (): void => finish(null);
    function finish(err: ProxyError | null): void {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.removeListener('error', onError);
      socket.removeListener('connect', onConnect);
      // Errors after this point belong to whoever relays the socket; until it is paired an
      // unhandled 'error' (a reset from the peer) must not crash the process.
      socket.on('error', ignoreError);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        resolve(socket);
      }
    }
    cancel = () => finish(new ProxyError(code, `connect to ${options.host}:${options.port} cancelled`));
    socket.once('error', onError);
    socket.once('connect', onConnect);
  });
  connected.catch(() => {});
  return { connected, cancel: () => cancel() };
}

function ignoreError(): void {}
