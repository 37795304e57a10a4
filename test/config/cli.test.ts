/**
 * CLI contract (src/cli.ts): `--check` exits 0 on a good file (printing its warnings) and 2 with
 * every error printed on a bad one; a running proxy logs each warning at start and on SIGHUP;
 * `--version` prints package.json's version. Runs the built dist/cli.js (`npm test` builds it
 * first through the pretest script; by hand: `npx tsc -p tsconfig.json`).
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ConfigError, formatIssue, validateConfigText } from '../../src/config/load.js';
import { spawnCli } from '../helpers/ops.js';
import { makeTestPki, opensslUnavailable } from '../helpers/tls.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CLI = join(ROOT, 'dist', 'cli.js');
const SHIPPED = join(ROOT, 'conf', 'ftp-nat-proxy.yaml');
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
  readonly timedOut: boolean;
}

/** Run the CLI without blocking the event loop; killed (by its own pid) after `timeoutMs`. */
function runCli(args: readonly string[], timeoutMs = 20_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, timedOut });
    });
  });
}

/** The issues the validator reports for `text` (the CLI must print every one). */
function expectedIssues(text: string, source: string): string[] {
  try {
    validateConfigText(text, source);
  } catch (err) {
    if (err instanceof ConfigError) return err.issues.map(formatIssue);
    throw err;
  }
  throw new Error('fixture unexpectedly valid');
}

const BAD = `log:
  level: loud
listeners:
  - name: "bad name!"
    listen: "0.0.0.0:99999"
    upstream:
      port: 0
      dataMode: sideways
    client:
      passivePorts: "9-1"
extra: 1
`;

t.test('dist/cli.js is built', async (t) => {
  t.ok(existsSync(CLI), `${CLI} exists (run: npx tsc -p tsconfig.json)`);
});

t.test('--version prints the package.json version', async (t) => {
  const r = await runCli(['--version']);
  t.equal(r.timedOut, false);
  t.equal(r.code, 0);
  t.equal(r.stdout, `ftp-nat-proxy ${VERSION}\n`);
  t.equal(r.stderr, '');
});

t.test('--check on the shipped config exits 0', async (t) => {
  const r = await runCli(['--config', SHIPPED, '--check']);
  t.equal(r.timedOut, false);
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, `${SHIPPED}: OK (1 listener(s))\n`);
});

t.test('--config=FILE form', async (t) => {
  const r = await runCli([`--config=${SHIPPED}`, '--check']);
  t.equal(r.code, 0, r.stderr);
});

t.test('--check on a bad config exits 2 and prints every error', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'bad.yaml');
  writeFileSync(file, BAD);
  const issues = expectedIssues(BAD, file);
  t.ok(issues.length >= 7, `fixture has many errors (${issues.length})`);
  const r = await runCli(['--config', file, '--check']);
  t.equal(r.timedOut, false);
  t.equal(r.code, 2);
  t.equal(r.stdout, '', 'nothing on stdout');
  t.ok(r.stderr.startsWith(`ftp-nat-proxy: invalid configuration ${file}:\n`), 'header');
  const missing = issues.filter((line) => !r.stderr.includes(`${line}\n`));
  t.same(missing, [], 'every issue line is printed');
  t.match(r.stderr, /log\.level \(line 2\)/, 'key path and line number shown');
});

/** An IPv6 advertise on an IPv6 listener: valid, with one warning (issue #10 item 9). */
const WARNED = `log: { level: info }
listeners:
  - name: v6
    listen: "[::1]:0"
    upstream: { host: 127.0.0.1, port: 21 }
    client: { advertise: "2001:db8::10" }
`;
const WARNING_LINE = /^ {2}listeners\[0\]\.client\.advertise \(line 6\): ignored, the listener uses "auto": /m;

t.test('--check with a warning exits 0 and prints the warning on stderr', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'warned.yaml');
  writeFileSync(file, WARNED);
  const r = await runCli(['--config', file, '--check']);
  t.equal(r.timedOut, false);
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, `${file}: OK (1 listener(s))\n`);
  t.ok(r.stderr.startsWith(`ftp-nat-proxy: warnings in ${file}:\n`), 'header');
  t.match(r.stderr, WARNING_LINE, 'key path, line and message');
  t.equal(r.stderr.trimEnd().split('\n').length, 2, 'header and one warning');
});

t.test('a running proxy logs each warning at start and again on every SIGHUP reload', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'warned.yaml');
  writeFileSync(file, WARNED);
  const cli = spawnCli(t, file);
  const warningsLogged = (): Record<string, unknown>[] => cli.logs().filter((r) => r.event === 'config-warning');
  const started = await cli.waitLog((r) => r.event === 'started', 10_000);
  t.ok(started, `started (stderr: ${cli.stderr()})`);
  t.equal(warningsLogged().length, 1, 'one config-warning at start');
  t.match(warningsLogged()[0], { level: 'warn', key: 'listeners[0].client.advertise', line: 6, msg: /^ignored, the listener uses "auto"/ });
  for (const reload of [1, 2]) {
    process.kill(cli.pid, 'SIGHUP');
    const reloads = (): number => cli.logs().filter((r) => r.event === 'reloaded').length;
    const applied = await cli.waitLog(() => reloads() >= reload, 5000);
    t.ok(applied, `reload ${reload} applied`);
    t.equal(warningsLogged().length, 1 + reload, `logged again on reload ${reload}`);
  }
  process.kill(cli.pid, 'SIGTERM');
  const exit = await cli.exited;
  t.equal(exit.code, 0, 'clean stop');
});

const NO_OPENSSL = opensslUnavailable();

t.test('--check with TLS: relative PEM files beside the config, warnings printed, the key never', NO_OPENSSL === null ? {} : { skip: NO_OPENSSL }, async (t) => {
  const pki = makeTestPki();
  t.teardown(() => pki.cleanup());
  // The config and its PEM files in one directory, named relatively: the CLI runs from ROOT,
  // so this passes only if they resolve against the config file's directory.
  const dir = t.testdir({});
  copyFileSync(pki.server.cert.path, join(dir, 'fullchain.pem'));
  copyFileSync(pki.server.key.path, join(dir, 'privkey.pem'));
  copyFileSync(pki.otherServer.key.path, join(dir, 'other.key'));
  copyFileSync(pki.ca.cert.path, join(dir, 'backend-ca.pem'));
  const keyBody = pki.server.key.pem.split('\n')[1]!;
  const yaml = (cert: string, key: string): string => `listeners:
  - name: edge-ftps
    listen: "127.0.0.1:0"
    tls: { mode: implicit, cert: ${cert}, key: ${key}, require: true }
    upstream:
      host: 127.0.0.1
      tls: { mode: explicit, ca: backend-ca.pem, verify: false }
`;
  const noKey = (name: string, r: CliResult): void => {
    t.notMatch(r.stdout + r.stderr, /PRIVATE KEY/, `${name}: no PEM key header printed`);
    t.notOk((r.stdout + r.stderr).includes(keyBody), `${name}: no key body printed`);
  };

  const good = join(dir, 'good.yaml');
  writeFileSync(good, yaml('fullchain.pem', 'privkey.pem'));
  const ok = await runCli(['--config', good, '--check']);
  t.equal(ok.code, 0, ok.stderr);
  t.equal(ok.stdout, `${good}: OK (1 listener(s))\n`);
  t.match(ok.stderr, /^ {2}listeners\[0\]\.upstream\.tls\.verify \(line 7\): .*not verified/m, 'verify: false warning');
  t.match(ok.stderr, /^ {2}listeners\[0\]\.tls\.require \(line 4\): require has no effect with implicit TLS$/m, 'implicit + require warning');
  noKey('valid', ok);

  const bad: [name: string, cert: string, key: string, message: RegExp][] = [
    ['the key of another certificate', 'fullchain.pem', 'other.key', /tls\.key \(line 4\): the key in .*other\.key does not match the certificate/],
    ['the key given as the certificate', 'privkey.pem', 'privkey.pem', /tls\.cert \(line 4\): .*privkey\.pem holds no PEM certificate/],
    ['the certificate given as the key', 'fullchain.pem', 'fullchain.pem', /tls\.key \(line 4\): .*fullchain\.pem is not a PEM private key/],
    ['a missing key', 'fullchain.pem', 'missing.pem', /tls\.key \(line 4\): cannot read .*missing\.pem: no such file or directory \(ENOENT\)/],
  ];
  for (const [name, cert, key, message] of bad) {
    const file = join(dir, 'bad.yaml');
    writeFileSync(file, yaml(cert, key));
    const r = await runCli(['--config', file, '--check']);
    t.equal(r.code, 2, `${name}: exit 2`);
    t.match(r.stderr, message, name);
    noKey(name, r);
  }
});

t.test('--check on a YAML syntax error exits 2 with its line', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'syntax.yaml');
  writeFileSync(file, 'listeners:\n  - listen: "0.0.0.0:21"\n\tupstream: x\n');
  const r = await runCli(['--config', file, '--check']);
  t.equal(r.code, 2);
  t.match(r.stderr, /\(line 3\): YAML: /);
});

t.test('--check on a missing file exits 2', async (t) => {
  const dir = t.testdir({});
  const r = await runCli(['--config', join(dir, 'nope.yaml'), '--check']);
  t.equal(r.code, 2);
  t.match(r.stderr, /cannot read file/);
});

t.test('usage errors exit 2', async (t) => {
  const none = await runCli([]);
  t.equal(none.code, 2, 'no --config');
  t.match(none.stderr, /--config is required/);
  const unknown = await runCli(['--bogus']);
  t.equal(unknown.code, 2, 'unknown argument');
  t.match(unknown.stderr, /unknown argument: --bogus/);
  const dangling = await runCli(['--config']);
  t.equal(dangling.code, 2, '--config without a file');
});
