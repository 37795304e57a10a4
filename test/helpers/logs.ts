/**
 * An in-memory pino logger for tests that assert structured logs (pino's own test/helper.js
 * does the same): every record parsed, in order.
 */
import { Writable } from 'node:stream';
import { createLogger, type Logger } from '../../src/log.js';
import type { LogRecord } from './proxy.js';

export function memoryLogger(level = 'debug'): { log: Logger; records: () => LogRecord[] } {
  let text = '';
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      text += chunk.toString();
      cb();
    },
  });
  return {
    log: createLogger(level, sink),
    records: () => text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as LogRecord),
  };
}
