/**
 * tap runs two test files at once: two files that bind the same relay port block fail by
 * timing (EADDRINUSE, or one file's proxy handing out a port the other is using). Every file
 * that uses PortBlocks must own its block of 1000 ports; this guard keeps it that way.
 */
import t from 'tap';
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const TEST_DIR = fileURLToPath(new URL('.', import.meta.url));

function testFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return testFiles(path);
    return entry.name.endsWith('.test.ts') ? [path] : [];
  });
}

t.test('every PortBlocks base belongs to one test file only', async (t) => {
  const owners = new Map<number, string[]>();
  for (const file of testFiles(TEST_DIR)) {
    for (const match of readFileSync(file, 'utf8').matchAll(/new PortBlocks\((\d+)\)/g)) {
      const base = Number(match[1]);
      owners.set(base, [...(owners.get(base) ?? []), relative(TEST_DIR, file)]);
    }
  }
  t.ok(owners.size >= 10, `found the blocks (${owners.size})`);
  for (const [base, files] of owners) t.same(files.length, 1, `block ${base}-${base + 999}: ${files.join(', ')}`);
  const bases = [...owners.keys()].sort((a, b) => a - b);
  for (let i = 1; i < bases.length; i++) t.ok(bases[i]! - bases[i - 1]! >= 1000, `blocks ${bases[i - 1]} and ${bases[i]} do not overlap`);
});
