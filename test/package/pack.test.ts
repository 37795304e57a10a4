/**
 * The published package (issue #10 item 8): what `npm pack` ships must be enough to build the
 * native addon and run the CLI. package.json `files` once listed splice_relay.c but not
 * nftables.c, which binding.gyp also compiles, so `npm install ftp-nat-proxy` silently fell
 * back to the JS relay (install.sh never fails the install).
 *
 * Packs the repo (`--ignore-scripts`: dist/ must already be built, which `npm test` does in
 * pretest), extracts the tarball, then from the extracted copy only:
 *  - every source binding.gyp names, binding.gyp, install.sh, `main`, `bin` are in it;
 *  - `sh src/native/install.sh` builds src/native/build/Release/splice_relay.node, with
 *    npm's bundled node-gyp (node_modules folders are taken off PATH, as for an installed
 *    package) and the local Node headers (no download; skipped without a toolchain);
 *  - the addon exports what src/data/splice-relay.ts and src/data/kernel-forward.ts call,
 *    and dist/ finds it by its runtime path;
 *  - `node dist/cli.js --version` prints package.json's version (dependencies through a
 *    node_modules symlink to the repo's: no npm install, no network).
 */
import t from 'tap';
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join, sep } from 'node:path';
import { run } from '../helpers/run.js';
import { ROOT } from '../helpers/ops.js';

interface PackageJson {
  readonly version: string;
  readonly main: string;
  readonly bin: Record<string, string>;
  readonly scripts: Record<string, string>;
}

const PKG = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as PackageJson;
const ADDON = join('src', 'native', 'build', 'Release', 'splice_relay.node');
/** What src/data/splice-relay.ts (SpliceAddon), src/data/kernel-forward.ts (NftAddon) and src/server/original-destination.ts call. */
const ADDON_EXPORTS = ['start', 'cancel', 'bytes', 'idleMs', 'nftOpen', 'nftRun', 'nftRunBatch', 'originalDestination'];

/** Every `sources` list anywhere in binding.gyp (targets and their per-OS conditions). */
function gypSources(node: unknown, out: string[] = []): string[] {
  if (Array.isArray(node)) for (const item of node) gypSources(item, out);
  else if (node && typeof node === 'object') {
    for (const [key, value] of Object.entries(node)) {
      if (key === 'sources' && Array.isArray(value)) out.push(...value.filter((v): v is string => typeof v === 'string'));
      else gypSources(value, out);
    }
  }
  return out;
}

/** All files under `dir`, relative, with '/' separators (as npm lists them). */
function listFiles(dir: string, prefix = ''): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? listFiles(join(dir, e.name), `${prefix}${e.name}/`) : [`${prefix}${e.name}`],
  );
}

/** PATH as for an installed package's install hook run by hand: no node_modules folders (the
 *  repo's .bin, npm's own node-gyp-bin), so install.sh falls back to npm's bundled node-gyp;
 *  the Node running this test first (its headers are the ones install.sh builds against). */
function buildPath(): string {
  const entries = (process.env.PATH ?? '').split(delimiter).filter((p) => p && !p.split(sep).includes('node_modules'));
  return [dirname(process.execPath), ...entries].join(delimiter);
}

/** The first `cmd` on `path` that is an executable file, or null. */
function which(cmd: string, path: string): string | null {
  for (const dir of path.split(delimiter)) {
    const file = join(dir, cmd);
    try {
      accessSync(file, constants.X_OK);
      if (statSync(file).isFile()) return file;
    } catch {
      // not here
    }
  }
  return null;
}

/** Why the addon cannot be built here without a network, or false when it can. */
function toolchainMissing(path: string): string | false {
  if (process.platform !== 'linux') return `the splice(2) addon is Linux-only (platform ${process.platform})`;
  const absent = ['python3', 'make', 'cc', 'g++'].filter((cmd) => !which(cmd, path));
  if (absent.length) return `no ${absent.join(', ')} on PATH to build the native addon`;
  const prefix = dirname(dirname(process.execPath));
  if (!process.env.npm_config_nodedir && !existsSync(join(prefix, 'include', 'node', 'node_api.h'))) {
    return `no Node headers under ${join(prefix, 'include', 'node')} (node-gyp would download them)`;
  }
  return false;
}

const work = mkdtempSync(join(tmpdir(), 'ftpnp-pack-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));
const pkgDir = join(work, 'package');

let shipped = new Set<string>();

t.before(async () => {
  const packed = await run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', work], { cwd: ROOT, timeoutMs: 60_000 });
  if (packed.code !== 0) throw new Error(`npm pack failed (${packed.code}): ${packed.stderr}`);
  const tarball = (JSON.parse(packed.stdout) as { filename: string }[])[0]?.filename;
  if (!tarball) throw new Error(`npm pack named no tarball: ${packed.stdout}`);
  const untar = await run('tar', ['-xzf', join(work, tarball), '-C', work], { timeoutMs: 30_000 });
  if (untar.code !== 0) throw new Error(`tar -xzf ${tarball} failed (${untar.code}): ${untar.stderr}`);
  shipped = new Set(listFiles(pkgDir));
});

t.test('the package holds what the addon build and the CLI need', async (t) => {
  const gyp = JSON.parse(readFileSync(join(ROOT, 'src', 'native', 'binding.gyp'), 'utf8')) as unknown;
  const sources = gypSources(gyp).map((s) => `src/native/${s}`);
  t.ok(sources.includes('src/native/nftables.c'), 'binding.gyp compiles nftables.c (sanity)');
  const needed = [
    ...sources,
    'src/native/binding.gyp',
    'src/native/install.sh',
    'package.json',
    PKG.main,
    ...Object.values(PKG.bin),
    // The install hook's script ("sh src/native/install.sh").
    ...(PKG.scripts.install?.match(/\S+\.sh\b/g) ?? []),
  ].map((p) => p.replace(/^\.\//, ''));
  for (const file of new Set(needed)) {
    const hint = file.startsWith('dist/') && !existsSync(join(ROOT, file)) ? ' (dist/ not built: npx tsc -p tsconfig.json)' : '';
    t.ok(shipped.has(file), `${file} is in the package${hint}`);
  }
});

const PATH = buildPath();
t.test('the addon builds from the extracted package and exports what the proxy calls', { skip: toolchainMissing(PATH) }, async (t) => {
  const env: NodeJS.ProcessEnv = { ...process.env, PATH };
  const built = await run('sh', [join('src', 'native', 'install.sh')], { cwd: pkgDir, env, timeoutMs: 120_000 });
  t.equal(built.code, 0, 'install.sh exits 0');
  const addonPath = join(pkgDir, ADDON);
  const log = join(pkgDir, 'src', 'native', 'build.log');
  if (!t.ok(existsSync(addonPath), `${ADDON} built`)) {
    t.comment(`install.sh: ${built.stdout}${built.stderr}`);
    if (existsSync(log)) t.comment(`build.log (end):\n${readFileSync(log, 'utf8').slice(-3000)}`);
    return;
  }
  const addon = createRequire(import.meta.url)(addonPath) as Record<string, unknown>;
  for (const name of ADDON_EXPORTS) t.equal(typeof addon[name], 'function', `addon exports ${name}()`);

  // The built code finds it where it looks at runtime (dist/data -> ../../src/native/build).
  const probe = await run(
    process.execPath,
    ['--input-type=module', '-e', "const m = await import('./dist/data/splice-relay.js'); console.log(JSON.stringify(m.relayImplementation()));"],
    { cwd: pkgDir, env: { ...process.env, FTPNP_RELAY: '' }, timeoutMs: 20_000 },
  );
  t.equal(probe.code, 0, `dist/data/splice-relay.js loads\n${probe.stderr}`);
  const impl = JSON.parse(probe.stdout.trim() || '{}') as { kind?: string; reason?: string };
  t.equal(impl.kind, 'splice', `dist picks the splice relay (${impl.reason})`);
  t.ok(impl.reason?.includes(pkgDir), 'from the addon inside the extracted package');
});

// After the build on purpose: with this link in place install.sh would use the repo's
// node_modules/.bin/node-gyp instead of the one an installed package gets.
t.test('the CLI runs from the extracted package', async (t) => {
  symlinkSync(join(ROOT, 'node_modules'), join(pkgDir, 'node_modules'), 'dir');
  const res = await run(process.execPath, [join('dist', 'cli.js'), '--version'], { cwd: pkgDir, timeoutMs: 20_000 });
  t.equal(res.code, 0, `exits 0\n${res.stderr}`);
  t.equal(res.stdout, `ftp-nat-proxy ${PKG.version}\n`, `prints package.json's version ${PKG.version}`);
});
