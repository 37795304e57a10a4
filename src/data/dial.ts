/**
 * Outbound data or control connection with a timeout and cancellation.
 */
import net from 'node:net';
import { ProxyError, type ErrorCode } from '../errors.js';

export interface DialOptions {
  readonly host: string;
  readonly port: number;
  readonly localAddress?: string | null;
  /**
   * Source port (client.dataSourcePort, e.g. 20). libuv binds with SO_REUSEADDR (uv__tcp_bind),
   * so several connections to different peers share it; only the same peer address and port
   * again while the last one is open or in TIME_WAIT fails (EADDRNOTAVAIL at connect).
   */
  readonly localPort?: number | null;
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
    ...(options.localPort ? { localPort: options.localPort } : {}),
  });
  let settled = false;
  let cancel: () => void = () => {};
  const connected = new Promise<net.Socket>((resolve, reject) => {
    const timer = setTimeout(() => finish(new ProxyError(options.timeoutCode ?? code, `connect to ${options.host}:${options.port} timed out after ${options.timeoutMs} ms`)), options.timeoutMs);
    const onError = (err: Error): void => finish(sourcePortError(options, err) ?? new ProxyError(code, `connect to ${options.host}:${options.port} failed: ${err.message}`, { cause: err }));
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

/** A failure that is the fixed source port's, not the peer's: FTPP_ERR_DATA_SOURCE_PORT with the reason spelled out. */
function sourcePortError(options: DialOptions, err: NodeJS.ErrnoException): ProxyError | null {
  const port = options.localPort;
  if (!port) return null;
  const from = `${options.localAddress ?? '*'}:${port}`;
  const to = `${options.host}:${options.port}`;
  const reason =
    err.code === 'EACCES' ? `permission denied: ports below 1024 need CAP_NET_BIND_SERVICE (see the systemd unit)`
    : err.code === 'EADDRNOTAVAIL' ? `already connected to ${to}, or in TIME_WAIT with it: the client reused its data port`
    : err.code === 'EADDRINUSE' ? 'in use: another socket listens on it'
    : null;
  if (!reason) return null;
  return new ProxyError('FTPP_ERR_DATA_SOURCE_PORT', `connect to ${to} from source port ${from} failed: ${reason} (${err.code})`, { cause: err });
}
