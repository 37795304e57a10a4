#!/usr/bin/env node
/**
 * ftp-nat-proxy command line: argv -> load config -> logger -> start; signals; exit codes.
 *   0  normal exit (or --check passed)
 *   1  runtime failure (a listener could not bind...)
 *   2  usage or configuration error
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { loadConfigFile, ConfigError, formatIssue } from './config/load.js';
import { startProxy } from './index.js';
import { createLogger } from './log.js';

const USAGE = `Usage: ftp-nat-proxy --config FILE [--check]
       ftp-nat-proxy --version

  --config FILE  YAML configuration (see conf/ftp-nat-proxy.yaml)
  --check        validate the configuration, print every error and warning, exit 0 or 2
  --version      print the version and exit
`;

function version(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  const pkg = JSON.parse(readFileSync(join(here, '..', 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

interface Args {
  config: string | null;
  check: boolean;
  version: boolean;
  help: boolean;
}

function parseArgs(argv: string[]): Args | string {
  const args: Args = { config: null, check: false, version: false, help: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--config' || arg === '-c') {
      const value = argv[++i];
      if (!value) return '--config needs a file';
      args.config = value;
    } else if (arg.startsWith('--config=')) args.config = arg.slice('--config='.length);
    else if (arg === '--check') args.check = true;
    else if (arg === '--version' || arg === '-V') args.version = true;
    else if (arg === '--help' || arg === '-h') args.help = true;
    else return `unknown argument: ${arg}`;
  }
  return args;
}

async function main(): Promise<number> {
  const args = parseArgs(process.argv.slice(2));
  if (typeof args === 'string') {
    process.stderr.write(`ftp-nat-proxy: ${args}\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.version) {
    process.stdout.write(`ftp-nat-proxy ${version()}\n`);
    return 0;
  }
  if (!args.config) {
    process.stderr.write(`ftp-nat-proxy: --config is required\n${USAGE}`);
    return 2;
  }
  let config;
  try {
    config = await loadConfigFile(args.config);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`ftp-nat-proxy: invalid configuration ${args.config}:\n${err.issues.map(formatIssue).join('\n')}\n`);
      return 2;
    }
    throw err;
  }
  if (args.check) {
    if (config.warnings.length > 0) {
      process.stderr.write(`ftp-nat-proxy: warnings in ${args.config}:\n${config.warnings.map(formatIssue).join('\n')}\n`);
    }
    process.stdout.write(`${args.config}: OK (${config.listeners.length} listener(s))\n`);
    return 0;
  }
  const log = createLogger(config.log.level);
  let proxy;
  try {
    proxy = await startProxy(config, { logger: log });
  } catch (err) {
    log.fatal({ event: 'start-failed', err }, 'could not start');
    return 1;
  }
  log.info({ event: 'started', version: version(), pid: process.pid }, 'ftp-nat-proxy started');
  const configPath = args.config;
  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (signal: string): void => {
      if (stopping) {
        // A second signal: do not wait for the drain any longer.
        log.warn({ event: 'stop-now', signal }, 'second signal: closing every session now');
        proxy.server.closeNow();
        return;
      }
      stopping = true;
      const drainMs = proxy.server.config.shutdown.drainMs;
      log.info({ event: 'stopping', signal, drainMs, sessions: proxy.server.sessionCount }, 'stopping: no new sessions, draining open ones');
      void proxy.close(drainMs).then(() => {
        log.info({ event: 'stopped' }, 'stopped');
        resolve(0);
      });
    };
    const reload = async (): Promise<void> => {
      try {
        const next = await loadConfigFile(configPath);
        const result = await proxy.server.reload(next);
        log.info({ event: 'reloaded', ...result }, 'configuration reloaded; open sessions keep their settings');
      } catch (err) {
        if (err instanceof ConfigError) {
          log.error({ event: 'reload-rejected', issues: err.issues }, 'new configuration is invalid; keeping the running one');
        } else {
          log.error({ event: 'reload-failed', err }, 'reload failed; keeping the running configuration');
        }
      }
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGHUP', () => void reload());
  });
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`ftp-nat-proxy: ${(err as Error).stack ?? String(err)}\n`);
    process.exitCode = 1;
  },
);
