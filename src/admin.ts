/**
 * The operator's HTTP listener: Prometheus scrapes, liveness and readiness probes. node:http
 * only, GET only, small fixed routes. Meant for a loopback or management address: it has no
 * authentication, so do not expose it where FTP clients can reach it.
 *
 *   GET /metrics  200, Prometheus text exposition from the registry
 *   GET /healthz  200 "ok\n" while the process runs (liveness: never depends on the upstream)
 *   GET /readyz   200 JSON {ready:true,checks} or 503 JSON {ready:false,checks[,error]}
 *   other paths   404; a known path with another method 405
 *
 * Nothing a request does can take the process down: a throwing, rejecting or hanging ready
 * callback is a 503, a failing scrape a 500. Slow or stalled clients are cut by Node's request
 * and header timeouts.
 */
import http from 'node:http';
import type net from 'node:net';
import type { Registry } from 'prom-client';
import type { Logger } from './log.js';

/** Whole-request deadline (headers and body) for a client of the admin listener. */
export const ADMIN_REQUEST_TIMEOUT_MS = 5000;
/** How long /readyz waits for the ready callback before answering 503. */
export const ADMIN_READY_TIMEOUT_MS = 2000;

/** What the ready callback returns; `checks` is echoed in the /readyz body. */
export interface ReadyReport {
  readonly ready: boolean;
  readonly checks: Record<string, boolean | string>;
}

export interface AdminServerOptions {
  readonly listen: { readonly host: string; readonly port: number };
  readonly registry: Registry;
  /** Decides readiness (e.g. listeners bound, upstream reachable). May throw or reject: that is "not ready". */
  readonly ready: () => Promise<ReadyReport>;
  readonly log: Logger;
  /** Overrides ADMIN_READY_TIMEOUT_MS (tests). */
  readonly readyTimeoutMs?: number;
  /** Overrides ADMIN_REQUEST_TIMEOUT_MS (tests). */
  readonly requestTimeoutMs?: number;
}

export interface AdminServer {
  /** The bound address (the real port when `listen.port` was 0). */
  readonly address: { readonly host: string; readonly port: number };
  /** Stop listening and drop every connection, idle or not. Idempotent. */
  close(): Promise<void>;
}

const ROUTES = new Set(['/metrics', '/healthz', '/readyz']);
const JSON_TYPE = 'application/json; charset=utf-8';
const TEXT_TYPE = 'text/plain; charset=utf-8';

/** Bind the admin listener; rejects with the listen error (e.g. EADDRINUSE) if it cannot bind. */
export async function startAdminServer(options: AdminServerOptions): Promise<AdminServer> {
  const log = options.log.child({ component: 'admin' });
  const requestTimeoutMs = options.requestTimeoutMs ?? ADMIN_REQUEST_TIMEOUT_MS;
  const server = http.createServer({
    requestTimeout: requestTimeoutMs,
    // Node rejects headersTimeout > requestTimeout; equal is fine.
    headersTimeout: requestTimeoutMs,
    keepAliveTimeout: 5000,
    // Node only enforces the two timeouts above when it sweeps connections (default every
    // 30 s); sweep often enough that the deadline means what it says.
    connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(requestTimeoutMs / 4))),
  });
  server.on('request', (req, res) => {
    handleRequest(req, res, options, log).catch((err: unknown) => {
      log.error({ event: 'admin-request-error', err }, 'admin request failed');
      if (!res.headersSent) send(res, 500, TEXT_TYPE, 'internal error\n');
      else res.destroy();
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: options.listen.host, port: options.listen.port }, () => {
      server.removeListener('error', reject);
      resolve();
    });
  });
  // After bind, errors (EMFILE on accept...) are logged; the listener keeps going.
  server.on('error', (err) => log.error({ event: 'admin-listener-error', err }, 'admin listener error'));

  const bound = server.address() as net.AddressInfo;
  const address = Object.freeze({ host: bound.address, port: bound.port });
  log.info({ event: 'admin-listening', listen: `${address.host}:${address.port}` }, 'admin listening');

  let closing: Promise<void> | null = null;
  function doClose(): Promise<void> {
    return new Promise<void>((resolve) => {
      // close() stops accepting and waits for connections, and it also stops the sweep that
      // enforces requestTimeout, so a half-sent request would hold it open for good.
      // closeAllConnections() ends them now, keep-alive and in-flight alike.
      server.close(() => resolve());
      server.closeAllConnections();
    }).then(() => {
      log.info({ event: 'admin-closed' }, 'admin listener closed');
    });
  }
  return {
    address,
    close(): Promise<void> {
      closing ??= doClose();
      return closing;
    },
  };
}

async function handleRequest(req: http.IncomingMessage, res: http.ServerResponse, options: AdminServerOptions, log: Logger): Promise<void> {
  // A response to a client that already went away must not raise (and nothing listens for it).
  res.on('error', ignoreError);
  const path = pathOf(req.url);
  if (!ROUTES.has(path)) {
    send(res, 404, TEXT_TYPE, 'not found\n');
    return;
  }
  if (req.method !== 'GET') {
    send(res, 405, TEXT_TYPE, 'method not allowed\n', { Allow: 'GET' });
    return;
  }
  switch (path) {
    case '/healthz':
      send(res, 200, TEXT_TYPE, 'ok\n');
      return;
    case '/metrics':
      await serveMetrics(res, options.registry, log);
      return;
    default:
      await serveReady(res, options, log);
  }
}

async function serveMetrics(res: http.ServerResponse, registry: Registry, log: Logger): Promise<void> {
  let body: string;
  try {
    body = await registry.metrics();
  } catch (err) {
    log.warn({ event: 'admin-metrics-error', err }, 'metrics collection failed');
    send(res, 500, TEXT_TYPE, `metrics collection failed: ${messageOf(err)}\n`);
    return;
  }
  send(res, 200, registry.contentType, body);
}

async function serveReady(res: http.ServerResponse, options: AdminServerOptions, log: Logger): Promise<void> {
  let report: ReadyReport;
  try {
    report = await withTimeout(options.ready, options.readyTimeoutMs ?? ADMIN_READY_TIMEOUT_MS);
    if (typeof report !== 'object' || report === null || typeof report.ready !== 'boolean') {
      throw new Error('ready check returned no {ready, checks} report');
    }
  } catch (err) {
    const error = messageOf(err);
    log.warn({ event: 'admin-ready-error', error }, 'ready check failed');
    send(res, 503, JSON_TYPE, `${JSON.stringify({ ready: false, checks: {}, error })}\n`);
    return;
  }
  const body = { ready: report.ready, checks: report.checks ?? {} };
  send(res, report.ready ? 200 : 503, JSON_TYPE, `${JSON.stringify(body)}\n`);
}

/** Run `fn` (sync throws become rejections) and give up after `ms`. */
function withTimeout<T>(fn: () => Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`ready check timed out after ${ms} ms`)), ms);
  });
  return Promise.race([Promise.resolve().then(fn), timeout]).finally(() => clearTimeout(timer));
}

/** The path part of a request target, without query or fragment. */
function pathOf(url: string | undefined): string {
  const target = url ?? '/';
  const end = target.search(/[?#]/);
  return end === -1 ? target : target.slice(0, end);
}

function send(res: http.ServerResponse, status: number, contentType: string, body: string, headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) return;
  res.writeHead(status, {
    'Content-Type': contentType,
    'Content-Length': Buffer.byteLength(body),
    'Cache-Control': 'no-store',
    ...headers,
  });
  res.end(body);
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function ignoreError(): void {}
