/**
 * The session lifecycle (src/session/state.ts): the transition table, what each state owns,
 * and that every change of kind is logged.
 */
import t from 'tap';
import net from 'node:net';
import { canTransition, SessionLifecycle, type SessionStateKind, type UpstreamControl } from '../../../src/session/state.js';
import { ControlConnection } from '../../../src/session/control-connection.js';
import { memoryLogger } from '../../helpers/logs.js';


/** An UpstreamControl around an unconnected socket: the lifecycle only carries it. */
function fakeUpstream(): UpstreamControl {
  const connection = new ControlConnection(new net.Socket(), 512, { lines() {}, overflow() {}, end() {}, close() {} });
  return { connection, addresses: { remote: { ip: '192.0.2.5', port: 21 }, local: { ip: '192.0.2.1', port: 40000 } } };
}

t.test('transition table', async (t) => {
  const kinds: SessionStateKind[] = ['connecting', 'open', 'closing', 'closed'];
  const allowed = new Set(['connecting>connecting', 'connecting>open', 'connecting>closing', 'connecting>closed', 'open>open', 'open>closing', 'open>closed', 'closing>closed']);
  for (const from of kinds) {
    for (const to of kinds) t.equal(canTransition(from, to), allowed.has(`${from}>${to}`), `${from} -> ${to}`);
  }
});

t.test('a session goes connecting -> open -> closing -> closed; each change of kind is logged once', async (t) => {
  const { log, records } = memoryLogger();
  const life = new SessionLifecycle(log);
  t.equal(life.state.kind, 'connecting');
  t.equal(life.upstream, null, 'no server connection while connecting');
  t.notOk(life.isFinished);
  const upstream = fakeUpstream();
  t.ok(life.transition({ kind: 'open', upstream, loggedIn: false, serverCloseExpected: null }));
  t.equal(life.upstream, upstream, 'open carries the server connection');
  t.ok(life.transition({ kind: 'open', upstream, loggedIn: true, serverCloseExpected: null }), 'open -> open (login)');
  t.ok(life.transition({ kind: 'closing', upstream, why: 'QUIT' }));
  t.ok(life.isFinished, 'closing takes no new work');
  t.notOk(life.isClosed);
  t.equal(life.upstream, upstream, 'closing still reads the server');
  t.notOk(life.transition({ kind: 'open', upstream, loggedIn: true, serverCloseExpected: null }), 'no way back from closing');
  t.ok(life.transition({ kind: 'closed', why: 'QUIT' }));
  t.ok(life.isClosed);
  t.equal(life.upstream, null, 'closed owns nothing');
  t.notOk(life.transition({ kind: 'closed', why: 'again' }), 'closed is final: teardown needs no guard of its own');
  const changes = records().filter((r) => r.event === 'session-state').map((r) => `${String(r.from)}>${String(r.to)}`);
  t.same(changes, ['connecting>open', 'open>closing', 'closing>closed'], 'logged per change of kind, not for open -> open');
  t.equal(records().find((r) => r.to === 'closing')?.why, 'QUIT', 'with the reason');
});

t.test('teardown from connecting (client gone while dialling)', async (t) => {
  const life = new SessionLifecycle(memoryLogger().log);
  t.ok(life.transition({ kind: 'connecting', clientFin: true }), 'the client FIN while dialling is remembered in the state');
  t.equal(life.state.kind === 'connecting' && life.state.clientFin, true);
  t.ok(life.transition({ kind: 'closed', why: 'client closed' }));
});
