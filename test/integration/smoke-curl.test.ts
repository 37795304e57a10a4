import t from 'tap';
import { writeFileSync } from 'node:fs';
import { startVsftpd, vsftpdUnavailable } from '../helpers/vsftpd.js';
import { startTestProxy } from '../helpers/proxy.js';
import { run } from '../helpers/run.js';

const reason = vsftpdUnavailable();
if (reason) t.plan(0, reason);
else {
  const v = await startVsftpd();
  t.teardown(() => v.stop());
  writeFileSync(`${v.root}/hello.txt`, 'hello world\n');
  const p = await startTestProxy({ upstreamHost: v.host, upstreamPort: v.port });
  t.teardown(() => p.close());
  for (const args of [[], ['--disable-epsv'], ['-P', '127.0.0.1'], ['-P', '127.0.0.1', '--disable-eprt']]) {
    const out = await run('curl', ['-sS', '--max-time', '10', ...args, '-u', `${v.user}:${v.password}`, `ftp://${p.host}:${p.port}/hello.txt`]);
    t.equal(out.stdout, 'hello world\n', `curl ${args.join(' ')} ${out.stderr}`);
  }
  console.error(p.logText().split('\n').slice(0, 60).join('\n'));
}
