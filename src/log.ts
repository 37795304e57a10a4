/**
 * One pino root logger; a child per listener and per session. Passwords never reach a log:
 * commands are logged through describeCommandForLog (PASS, ACCT and password-setting SITE
 * subcommands masked), and the redact list catches any field that might carry one.
 */
import pino, { type Logger, type DestinationStream } from 'pino';

export type { Logger };

/** Passwords, and TLS private keys (ListenerConfig.tls.keyPem) should a config ever be logged. */
export const REDACTED_PATHS = ['password', 'pass', '*.password', '*.pass', 'keyPem', '*.keyPem', '*.tls.keyPem'];

export function createLogger(level: string, destination?: DestinationStream): Logger {
  const options = {
    level,
    base: { service: 'ftp-nat-proxy' },
    timestamp: pino.stdTimeFunctions.isoTime,
    redact: { paths: REDACTED_PATHS, censor: '****' },
    formatters: { level: (label: string) => ({ level: label }) },
  };
  return destination ? pino(options, destination) : pino(options);
}
