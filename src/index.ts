/**
 * Programmatic surface: what the CLI uses, and what tests use to run a proxy in-process.
 */
import { ProxyServer, type BoundListener } from './server.js';
import { createLogger, type Logger } from './log.js';
import type { ProxyConfig } from './config/schema.js';
import type { HostnameResolver } from './advertise.js';

export { ProxyServer, type BoundListener } from './server.js';
export { loadConfigFile, validateConfigText, ConfigError, type ConfigIssue } from './config/load.js';
export type { ProxyConfig, ListenerConfig } from './config/schema.js';
export { ERROR_CODES, REPLY_FOR_CODE, ProxyError } from './errors.js';
export { createLogger } from './log.js';

export interface StartOptions {
  readonly logger?: Logger;
  readonly resolver?: HostnameResolver;
}

export interface RunningProxy {
  readonly server: ProxyServer;
  readonly listeners: BoundListener[];
  close(): Promise<void>;
}

/** Bind every listener of `config` and start serving. */
export async function startProxy(config: ProxyConfig, options: StartOptions = {}): Promise<RunningProxy> {
  const log = options.logger ?? createLogger(config.log.level);
  const server = new ProxyServer(config, { log, ...(options.resolver ? { resolver: options.resolver } : {}) });
  const listeners = await server.start();
  return { server, listeners, close: () => server.close() };
}
