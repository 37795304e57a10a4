/**
 * Error codes stay in step with their reply table and their documentation (style.md #6,
 * "fastify + pino": error codes kept in step with their docs by a test).
 */
import t from 'tap';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ERROR_CODES, REPLY_FOR_CODE, ProxyError, isProxyError, type ErrorCode } from '../src/errors.js';

const README = fileURLToPath(new URL('../README.md', import.meta.url));
const CODES = Object.keys(ERROR_CODES) as ErrorCode[];

/** RFC 959 §4.2: first digit 1-5, second digit 0-5 (syntax, information, connections, auth, -, file system). */
const FTP_CODE = /^[1-5][0-5]\d$/;

t.test('ERROR_CODES: every value equals its key and is FTPP_ERR_*', async (t) => {
  t.ok(CODES.length > 0);
  for (const code of CODES) {
    t.equal(ERROR_CODES[code], code, code);
    t.match(code, /^FTPP_ERR_[A-Z0-9_]+$/, `${code} naming`);
  }
});

t.test('REPLY_FOR_CODE: one reply per code, each a valid FTP reply line', async (t) => {
  t.same(Object.keys(REPLY_FOR_CODE).sort(), [...CODES].sort(), 'same key set as ERROR_CODES');
  t.ok(Object.isFrozen(REPLY_FOR_CODE), 'frozen');
  for (const code of CODES) {
    const line = REPLY_FOR_CODE[code];
    t.equal(typeof line, 'string', `${code} has a reply`);
    t.match(line.slice(0, 3), FTP_CODE, `${code}: "${line}" starts with a valid FTP code`);
    t.equal(line[3], ' ', `${code}: single-line reply (code + SP)`);
    t.notOk(/[\r\n\x00\xff]/.test(line), `${code}: no CR/LF/NUL/0xFF in the text`);
    t.ok(line.length > 4, `${code}: has text`);
  }
});

t.test('replies that the protocol fixes word for word', async (t) => {
  // protocol.md §1.1, §1.5, §2.5, §4.1, RFC 2428 §2.
  t.equal(REPLY_FOR_CODE.FTPP_ERR_LINE_TOO_LONG, '500 Command line too long.');
  t.equal(REPLY_FOR_CODE.FTPP_ERR_BAD_ADDRESS_SYNTAX, '501 Syntax error in parameters or arguments.');
  t.equal(REPLY_FOR_CODE.FTPP_ERR_BOUNCE_REFUSED, '500 Illegal PORT command.');
  t.equal(REPLY_FOR_CODE.FTPP_ERR_PASV_ON_IPV6, '425 Use EPSV on an IPv6 connection.');
  t.equal(REPLY_FOR_CODE.FTPP_ERR_IDLE_TIMEOUT, '421 Timeout.');
  t.match(REPLY_FOR_CODE.FTPP_ERR_WRONG_FAMILY, /^522 .*\(\d(,\d)*\)$/, '522 lists the supported families in parentheses');
  t.match(REPLY_FOR_CODE.FTPP_ERR_UPSTREAM_UNREACHABLE, /^421 /, 'backend unreachable at accept -> 421');
});

t.test('ProxyError / isProxyError', async (t) => {
  const cause = new Error('ECONNREFUSED');
  const err = new ProxyError('FTPP_ERR_UPSTREAM_UNREACHABLE', 'session s1: 10.0.0.5:21 refused', { cause });
  t.ok(err instanceof Error);
  t.equal(err.name, 'ProxyError');
  t.equal(err.code, 'FTPP_ERR_UPSTREAM_UNREACHABLE');
  t.equal(err.message, 'session s1: 10.0.0.5:21 refused');
  t.equal(err.cause, cause);
  t.equal(isProxyError(err), true);
  t.equal(isProxyError(err, 'FTPP_ERR_UPSTREAM_UNREACHABLE'), true);
  t.equal(isProxyError(err, 'FTPP_ERR_CONFIG'), false);
  t.equal(isProxyError(new Error('x')), false);
  t.equal(isProxyError({ code: 'FTPP_ERR_CONFIG' }), false, 'duck-typed objects are not ProxyErrors');
  t.equal(isProxyError(undefined), false);
});

/** The "## Error codes" section of README.md, up to the next level-2 heading. */
function errorCodesSection(readme: string): string | null {
  const start = readme.search(/^## Error codes\s*$/m);
  if (start === -1) return null;
  const rest = readme.slice(start + 1);
  const end = rest.search(/^## /m);
  return end === -1 ? rest : rest.slice(0, end);
}

t.test('README.md "## Error codes" has a table row for every code, and no unknown code', async (t) => {
  // README.md is written by the docs owner; until it exists this test fails on purpose.
  t.ok(existsSync(README), 'README.md exists');
  if (!existsSync(README)) return;
  const section = errorCodesSection(readFileSync(README, 'utf8'));
  t.ok(section !== null, 'README.md has a "## Error codes" section');
  if (section === null) return;
  const rows = section.split('\n').filter((line) => line.trimStart().startsWith('|'));
  for (const code of CODES) {
    const row = rows.find((line) => line.includes(`\`${code}\``));
    t.ok(row, `row for \`${code}\``);
    // "client sees" column: when it names an FTP reply code (FTPP_ERR_CONFIG never reaches a
    // client, its row says the process exits), the first one must be REPLY_FOR_CODE's.
    const seen = row?.split('|')[2]?.match(/\b[1-5]\d\d\b/)?.[0];
    const reply = REPLY_FOR_CODE[code].slice(0, 3);
    if (seen !== undefined) t.equal(seen, reply, `row for ${code}: documented reply code matches REPLY_FOR_CODE`);
  }
  const documented = new Set([...section.matchAll(/`(FTPP_ERR_[A-Z0-9_]+)`/g)].map((m) => m[1]!));
  const unknown = [...documented].filter((code) => !(code in ERROR_CODES));
  t.same(unknown, [], 'README documents no code that src/errors.ts does not define');
});
