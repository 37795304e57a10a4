/**
 * Read exactly one PROXY protocol header (haproxy proxy-protocol.txt) from a fresh socket,
 * before anything else happens on it (for FTP: before the 220; protocol.md §7). The bytes
 * after the header belong to the application and are handed back. Malformed, truncated,
 * wrong-version or late headers reject with FTPP_ERR_PROXY_PROTOCOL; the caller closes.
 */
import type net from 'node:net';
import { ProxyError } from '../errors.js';
import { ProxyHeaderDecoder, type ProxyHeader, type ProxyProtocolVersion } from '../control/proxy-protocol.js';
import { describePeer } from './socket-address.js';

export interface ProxyHeaderResult {
  readonly header: ProxyHeader;
  /** Bytes that followed the header in the same reads (FTP data). */
  readonly rest: Buffer;
}

export function readProxyHeader(socket: net.Socket, accept: ProxyProtocolVersion, timeoutMs: number): Promise<ProxyHeaderResult> {
  return new Promise((resolve, reject) => {
    const decoder = new ProxyHeaderDecoder(accept);
    const peer = describePeer(socket);
    const finish = (err: ProxyError | null, result?: ProxyHeaderResult): void => {
      clearTimeout(timer);
      socket.removeListener('data', onData);
      socket.removeListener('end', onEnd);
      socket.removeListener('error', onError);
      socket.pause();
      if (err) reject(err);
      else resolve(result!);
    };
    const onData = (chunk: Buffer): void => {
      const pushed = decoder.push(chunk);
      if (pushed.kind === 'header') finish(null, { header: pushed.header, rest: pushed.rest });
      else if (pushed.kind === 'error') finish(new ProxyError('FTPP_ERR_PROXY_PROTOCOL', `bad PROXY header from ${peer}: ${pushed.reason}`));
    };
    const onEnd = (): void => finish(new ProxyError('FTPP_ERR_PROXY_PROTOCOL', `connection from ${peer} ended before a complete PROXY header`));
    const onError = (err: Error): void => finish(new ProxyError('FTPP_ERR_PROXY_PROTOCOL', `connection from ${peer} failed before a PROXY header: ${err.message}`));
    const timer = setTimeout(() => finish(new ProxyError('FTPP_ERR_PROXY_PROTOCOL', `no complete PROXY header from ${peer} within ${timeoutMs} ms`)), timeoutMs);
    socket.on('data', onData);
    socket.once('end', onEnd);
    socket.once('error', onError);
    socket.resume();
  });
}
