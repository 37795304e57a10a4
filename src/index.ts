/**
 * Programmatic surface: what the CLI uses, and what tests use to run a proxy in-process.
 */
import { ProxyServer, type BoundListener } from './server.js';
import { createLogger, type Logger } from './log.js';
import type { ProxyConfig } from './config/schema.js';
import type { HostnameResolver } from './advertise.js';
import { createPromMetrics } from './metrics.js';
import { startAdminServer, type AdminServer } from './admin.js';
import type { KernelForwarder } from './data/kernel-forward.js';

export { ProxyServer, type BoundListener, type ReloadResult } from './server.js';
export { loadConfigFile, validateConfigText, ConfigError, type ConfigIssue } from './config/load.js';
export type { ProxyConfig, ListenerConfig } from './config/schema.js';
export { ERROR_CODES, REPLY_FOR_CODE, ProxyError } from './errors.js';
export { createLogger } from './log.js';

export interface StartOptions {
  readonly logger?: Logger;
  readonly resolver?: HostnameResolver;
  /** Replaces the nftables table for `client.dataPath: kernel` (tests). */
  readonly openKernelForwarder?: () => KernelForwarder;
  /** Replaces the host check of `client.dataPath: auto` (tests). */
  readonly kernelHostBlocker?: () => string | null;
}

export interface RunningProxy {
  readonly server: ProxyServer;
  readonly listeners: BoundListener[];
  /** The admin HTTP listener, when `admin.listen` is configured. */
  readonly admin: AdminServer | null;
  /** Stop: drain open sessions for up to `drainMs` (default: none), then close. */
  close(drainMs?: number): Promise<void>;
}

/** Bind every listener of `config` (and the admin listener) and start serving. */
export async function startProxy(config: ProxyConfig, options: StartOptions = {}): Promise<RunningProxy> {
  const log = options.logger ?? createLogger(config.log.level);
  const metrics = createPromMetrics();
  const server = new ProxyServer(config, {
    log,
    metrics,
    ...(options.resolver ? { resolver: options.resolver } : {}),
    ...(options.openKernelForwarder ? { openKernelForwarder: options.openKernelForwarder } : {}),
    ...(options.kernelHostBlocker ? { kernelHostBlocker: options.kernelHostBlocker } : {}),
  });
  const listeners = await server.start();
  let admin: AdminServer | null = null;
  if (config.admin) {
    try {
      admin = await startAdminServer({ listen: config.admin.listen, registry: metrics.registry, ready: () => server.readiness(), log });
    } catch (err) {
      await server.close(0);
      throw err;
    }
  }
  let closing: Promise<void> | null = null;
  return {
    server,
    listeners,
    admin,
    close(drainMs = 0) {
      closing ??= (async () => {
        await server.close(drainMs);
        await admin?.close();
      })();
      return closing;
    },
  };
}
