/**
 * SessionTimeouts (src/session/timeouts.ts): what each clock does when it runs out, and what
 * keeps it from running out.
 */
import t from 'tap';
import { validateConfigText } from '../../../src/config/load.js';
import { SessionTimeouts, type SessionTimeoutsHooks } from '../../../src/session/timeouts.js';
import { memoryLogger } from '../../helpers/logs.js';
import { proxyYaml } from '../../helpers/proxy.js';

const TIMEOUTS = validateConfigText(proxyYaml({
  upstreamHost: '127.0.0.1',
  upstreamPort: 21,
  extraYaml: ['    timeouts:', '      idleSeconds: 0.4', '      loginSeconds: 0.6', '      upstreamReplySeconds: 0.05', '      transferReplyHoldSeconds: 0.05'].join('\n'),
}), 'test').listeners[0]!.timeouts;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function rig(): { clocks: SessionTimeouts; events: string[]; state: { busy: boolean; finished: boolean } } {
  const events: string[] = [];
  const state = { busy: false, finished: false };
  const hooks: SessionTimeoutsHooks = {
    busy: () => state.busy,
    finished: () => state.finished,
    abandon: (why, reply) => events.push(`abandon:${why}:${reply}`),
    teardown: (why) => events.push(`teardown:${why}`),
    limitHit: (reason) => events.push(`limit:${reason}`),
  };
  return { clocks: new SessionTimeouts(TIMEOUTS, memoryLogger().log, hooks), events, state };
}

t.test('idle: abandoned with 421 Timeout. unless a command arrives; a running transfer keeps the session', async (t) => {
  const r = rig();
  r.clocks.start();
  r.clocks.loggedIn();
  // Generous margins (a loaded machine must not make this fail): a command every 40 ms
  // against a 400 ms clock, then a transfer for twice the clock.
  for (let i = 0; i < 5; i++) {
    await sleep(40);
    r.clocks.activity();
  }
  t.same(r.events, [], 'commands keep the idle clock from running out');
  r.state.busy = true;
  await sleep(900);
  t.same(r.events, [], 'a transfer keeps it too');
  r.state.busy = false;
  await sleep(900);
  t.same(r.events, ['limit:idle-timeout', 'abandon:idle timeout:421 Timeout.']);
  r.clocks.stopAll();
});

t.test('login: abandoned with 421 Login timeout. unless the server said 230', async (t) => {
  const r = rig();
  r.state.busy = true; // the idle clock stays out of the way
  r.clocks.start();
  await sleep(1200);
  t.ok(r.events.includes('abandon:login timeout:421 Login timeout.'), r.events.join(' '));
  r.clocks.stopAll();
  const ok = rig();
  ok.clocks.start();
  ok.clocks.loggedIn();
  ok.state.busy = true;
  await sleep(1200);
  t.same(ok.events, [], 'after a 230 no login timeout');
  ok.clocks.stopAll();
});

t.test('closing: the deadline tears down once; grace starts once; stopAll stops everything', async (t) => {
  const r = rig();
  r.state.finished = true;
  r.clocks.closing(400);
  r.clocks.closing(5);
  t.ok(r.clocks.grace(), 'grace started');
  t.notOk(r.clocks.grace(), 'only once');
  await sleep(20);
  t.same(r.events, [], 'the second, shorter deadline did not replace the first');
  await sleep(800);
  t.same(r.events, ['teardown:close deadline'], 'the first deadline wins; grace (2 s) not yet');
  r.clocks.stopAll();
  await sleep(20);
  const idle = rig();
  idle.clocks.start();
  idle.clocks.stopAll();
  await sleep(900);
  t.same(idle.events, [], 'nothing fires after stopAll');
});
