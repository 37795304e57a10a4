/**
 * What the benchmark needs on the machine, installed the way the tests do it (as root,
 * `apt-get install -y` when missing), and a private, unpacked ProFTPD with mod_proxy for the
 * comparison. Debian's proftpd-core conflicts with vsftpd, so it is never installed: the
 * packages are downloaded and unpacked with `dpkg -x` into the bench's own folder
 * (test-environment.md), together with the few libraries it needs that the machine lacks.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { libnftablesMissing } from '../helpers/netns.js';

const APT_TIMEOUT_MS = 10 * 60_000;

export function isRoot(): boolean {
  return process.getuid?.() === 0;
}

function sh(command: string, args: readonly string[], options: { cwd?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): { ok: boolean; out: string } {
  const result = spawnSync(command, [...args], {
    encoding: 'utf8',
    timeout: options.timeoutMs ?? 60_000,
    ...(options.cwd ? { cwd: options.cwd } : {}),
    env: options.env ?? { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
  });
  return { ok: result.status === 0, out: `${result.stdout ?? ''}${result.stderr ?? ''}${result.error ? String(result.error) : ''}` };
}

function have(binary: string): boolean {
  return ['/usr/sbin', '/usr/bin', '/sbin', '/bin'].some((dir) => existsSync(join(dir, binary)));
}

let aptUpdated = false;
function aptUpdate(): void {
  if (aptUpdated) return;
  aptUpdated = true;
  sh('apt-get', ['update', '-qq'], { timeoutMs: APT_TIMEOUT_MS });
}

/**
 * libnftables.so.1 (Debian package nftables, via libnftables1), which the proxy's
 * `client.dataPath: kernel` loads through its native addon.
 */
/**
 * Install vsftpd, curl, iproute2, util-linux (for prlimit) and nftables (libnftables, for
 * the kernel data path variant) when missing; returns notes.
 */
export function ensurePackages(): string[] {
  const notes: string[] = [];
  const need = (
    [
      [() => have('vsftpd'), 'vsftpd'],
      [() => have('curl'), 'curl'],
      [() => have('ip'), 'iproute2'],
      [() => have('prlimit'), 'util-linux'],
      [() => libnftablesMissing() === null, 'nftables'],
    ] as const
  )
    .filter(([present]) => !present())
    .map(([, pkg]) => pkg);
  if (need.length === 0) return notes;
  if (!isRoot()) {
    notes.push(`missing ${need.join(' ')} and not root: the parts that need them are skipped`);
    return notes;
  }
  process.stderr.write(`bench: installing ${need.join(' ')}\n`);
  aptUpdate();
  const install = sh('apt-get', ['install', '-y', '-qq', ...need], { timeoutMs: APT_TIMEOUT_MS });
  if (!install.ok) notes.push(`apt-get install ${need.join(' ')} failed: ${install.out.trim().split('\n').slice(-2).join(' ')}`);
  return notes;
}

export type ProftpdSetup = { readonly ok: true; readonly root: string; readonly libraryPath: string } | { readonly ok: false; readonly reason: string };

const PROFTPD_PACKAGES = ['proftpd-core', 'proftpd-mod-proxy', 'proftpd-mod-crypto'];

function libraryDirs(root: string): string[] {
  const dirs: string[] = [];
  for (const base of [join(root, 'usr/lib'), join(root, 'lib')]) {
    if (!existsSync(base)) continue;
    for (const entry of readdirSync(base)) if (/-linux-gnu$/.test(entry)) dirs.push(join(base, entry));
    dirs.push(base);
  }
  return dirs;
}

function missingLibraries(root: string, libraryPath: string): string[] {
  const missing = new Set<string>();
  for (const file of [join(root, 'usr/sbin/proftpd'), join(root, 'usr/lib/proftpd/mod_proxy.so'), join(root, 'usr/lib/proftpd/mod_tls.so')]) {
    const ldd = sh('ldd', [file], { env: { ...process.env, LD_LIBRARY_PATH: libraryPath } });
    for (const m of ldd.out.matchAll(/^\s*(\S+) => not found/gm)) missing.add(m[1]!);
  }
  return [...missing];
}

/** Library packages the three ProFTPD packages depend on (two levels) that are not installed. */
function uninstalledDependencies(): string[] {
  const seen = new Set<string>(PROFTPD_PACKAGES);
  let frontier = [...PROFTPD_PACKAGES];
  const wanted: string[] = [];
  for (let depth = 0; depth < 2 && frontier.length > 0; depth++) {
    const deps = sh('apt-cache', ['depends', '--no-recommends', '--no-suggests', '--no-conflicts', '--no-breaks', '--no-replaces', '--no-enhances', ...frontier]);
    frontier = [];
    for (const m of deps.out.matchAll(/^\s+(?:Pre)?Depends: ([a-z0-9][a-z0-9.+-]+)$/gm)) {
      const pkg = m[1]!;
      if (seen.has(pkg) || !pkg.startsWith('lib')) continue;
      seen.add(pkg);
      const status = sh('dpkg-query', ['-W', '-f=${Status}', pkg]);
      if (status.ok && status.out.includes('install ok installed')) continue;
      wanted.push(pkg);
      frontier.push(pkg);
    }
  }
  return wanted;
}

/**
 * Download and unpack ProFTPD + mod_proxy into `cacheDir` once (reused afterwards).
 * Never throws: a failure is returned as the reason the comparison is unavailable.
 */
export function prepareProftpd(cacheDir: string): ProftpdSetup {
  const root = join(cacheDir, 'root');
  const ready = (): ProftpdSetup | null => {
    if (!existsSync(join(root, 'usr/sbin/proftpd')) || !existsSync(join(root, 'usr/lib/proftpd/mod_proxy.so'))) return null;
    const libraryPath = libraryDirs(root).join(':');
    const missing = missingLibraries(root, libraryPath);
    if (missing.length > 0) return { ok: false, reason: `libraries not found: ${missing.join(' ')}` };
    return { ok: true, root, libraryPath };
  };
  const cached = ready();
  if (cached?.ok) return cached;
  if (!isRoot()) return { ok: false, reason: 'needs root to download packages' };
  if (!have('apt-get') || !have('dpkg')) return { ok: false, reason: 'apt-get/dpkg not available' };
  process.stderr.write('bench: fetching ProFTPD + mod_proxy (apt-get download, dpkg -x; never installed)\n');
  const download = mkdtempSync(join(tmpdir(), 'ftpnp-bench-debs-'));
  // apt's sandbox user must be able to write the downloaded files here.
  chmodSync(download, 0o777);
  try {
    const fetch = (pkgs: readonly string[]): boolean => {
      if (pkgs.length === 0) return true;
      let result = sh('apt-get', ['download', ...pkgs], { cwd: download, timeoutMs: APT_TIMEOUT_MS });
      if (!result.ok) {
        aptUpdate();
        result = sh('apt-get', ['download', ...pkgs], { cwd: download, timeoutMs: APT_TIMEOUT_MS });
      }
      return result.ok;
    };
    if (!fetch(PROFTPD_PACKAGES)) return { ok: false, reason: `apt-get download ${PROFTPD_PACKAGES.join(' ')} failed` };
    if (!fetch(uninstalledDependencies())) return { ok: false, reason: 'apt-get download of its libraries failed' };
    rmSync(root, { recursive: true, force: true });
    mkdirSync(root, { recursive: true });
    for (const deb of readdirSync(download).filter((f) => f.endsWith('.deb'))) {
      const x = sh('dpkg', ['-x', join(download, deb), root]);
      if (!x.ok) return { ok: false, reason: `dpkg -x ${deb} failed: ${x.out.trim()}` };
    }
  } finally {
    rmSync(download, { recursive: true, force: true });
  }
  return ready() ?? { ok: false, reason: 'unpacked packages lack usr/sbin/proftpd or mod_proxy.so' };
}
