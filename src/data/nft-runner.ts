/**
 * libnftables through the native addon (src/native/nftables.c): a script run synchronously as
 * one transaction, or a batch of scripts on a libuv pool thread. The library's context is not
 * thread-safe; the addon's lock serializes the two, in the order they were made.
 */
import { loadSpliceAddon } from './splice-relay.js';

/** Outcome of one nft(8) script run as one transaction. */
export interface NftResult {
  readonly ok: boolean;
  readonly output: string;
  readonly error: string;
}

export type NftRunner = (script: string) => NftResult;

/**
 * Run these scripts in one transaction off the event loop; when that fails, each on its own
 * (in order). `errors[i]` is '' when script i took effect, else libnftables' words.
 */
export type NftBatchRunner = (scripts: readonly string[], done: (errors: readonly string[]) => void) => void;

/** One transaction, or each script on its own when that fails: the synchronous twin of a batch. */
export function runEachIfNeeded(run: NftRunner, scripts: readonly string[]): NftResult[] {
  if (scripts.length === 0) return [];
  const together = run(scripts.join('\n'));
  if (together.ok) return scripts.map(() => together);
  return scripts.length === 1 ? [together] : scripts.map((script) => run(script));
}

interface NftAddon {
  nftOpen(): object;
  nftRun(handle: object, script: string): [number, string, string];
  /** Since the batched removals; an older build lacks it (removals then run at once). */
  nftRunBatch?(handle: object, scripts: readonly string[], done: (errors: string[]) => void): void;
}

/** libnftables through the native addon (synchronous, and batches off the event loop), or why it cannot be had. */
export function loadNftRunner(): { readonly run: NftRunner | null; readonly runBatch: NftBatchRunner | null; readonly reason: string } {
  const { addon, reason } = loadSpliceAddon();
  const nft = addon as unknown as Partial<NftAddon> | null;
  if (!nft || typeof nft.nftOpen !== 'function' || typeof nft.nftRun !== 'function') {
    return { run: null, runBatch: null, reason: addon ? 'native addon predates the kernel data path (rebuild: npm install)' : reason };
  }
  let handle: object;
  try {
    handle = nft.nftOpen();
  } catch (err) {
    return { run: null, runBatch: null, reason: (err as Error).message };
  }
  const nftRun = nft.nftRun.bind(nft);
  const nftRunBatch = typeof nft.nftRunBatch === 'function' ? nft.nftRunBatch.bind(nft) : null;
  return {
    run: (script) => {
      const [rc, output, error] = nftRun(handle, script);
      return { ok: rc === 0, output, error: error.trim() };
    },
    runBatch: nftRunBatch ? (scripts, done) => nftRunBatch(handle, scripts, done) : null,
    reason: 'libnftables',
  };
}

