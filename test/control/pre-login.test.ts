/**
 * Forward mode before the server is known (control/pre-login.ts): what each command gets, and
 * the server's banner shown as continuation lines of the reply to USER.
 */
import t from 'tap';
import { decidePreLogin, preLoginFeatures, withServerBanner, type PreLoginDecision } from '../../src/control/pre-login.js';
import { parseCommandLine } from '../../src/control/command.js';
import { initialProtection } from '../../src/control/security.js';
import type { SessionView } from '../../src/control/rewrite.js';
import type { Reply } from '../../src/control/reply.js';

const VIEW: SessionView = {
  controlFamily: 4,
  clientIp: '192.168.50.10',
  epsvAll: false,
  allowNatFixup: true,
  loggedIn: false,
  ownAddresses: ['192.168.50.1'],
  ownNames: [],
  protection: initialProtection(null),
};
const TLS_VIEW: SessionView = { ...VIEW, protection: initialProtection({ mode: 'explicit', require: false }) };

function decide(line: string, view = VIEW): PreLoginDecision {
  const parsed = parseCommandLine(Buffer.from(line, 'latin1'));
  if (!parsed.ok) throw new Error(`does not parse: ${line}`);
  return decidePreLogin(parsed.command, view, view !== VIEW);
}

const replyOf = (decision: PreLoginDecision): string => (decision.kind === 'reply' || decision.kind === 'quit' ? decision.line.split('\r\n')[0]! : decision.kind);

t.test('each pre-login command and its answer', async (t) => {
  const table: Array<[string, string]> = [
    ['SYST', '215 UNIX Type: L8'],
    ['NOOP', '200 NOOP ok.'],
    ['noop', '200 NOOP ok.'],
    ['OPTS UTF8 ON', '202 OPTS is for the server: send it again once logged in.'],
    ['CLNT FileZilla', '200 Noted.'],
    ['PASS secret', '503 Log in with USER user@host first.'],
    ['QUIT', '221 Goodbye.'],
    ['FEAT', '211-Features:'],
    ['LIST', '530 Please log in with USER user@host first.'],
    ['PASV', '530 Please log in with USER user@host first.'],
    ['PORT 192,168,50,10,4,1', '530 Please log in with USER user@host first.'],
    ['SITE ftp.example.com', '530 Please log in with USER user@host first.'],
    ['HOST ftp.example.com', '504 HOST cannot choose the server here: log in as user@host.'],
  ];
  for (const [line, expected] of table) t.equal(replyOf(decide(line)), expected, line);
  t.equal(decide('QUIT').kind, 'quit', 'QUIT closes');
});

t.test('USER is parsed as a forward login; AUTH/PBSZ/PROT/CCC and HOST naming the proxy keep the client leg\'s answers', async (t) => {
  const user = decide('USER alice@example.org@ftp.example.net:2121');
  t.same(user, { kind: 'login', login: { ok: true, user: 'alice@example.org', host: { kind: 'name', name: 'ftp.example.net' }, port: 2121 } });
  const bad = decide('USER alice');
  t.equal(bad.kind === 'login' && !bad.login.ok && bad.login.code, 'no-destination');
  t.same(decide('HOST 192.168.50.1'), { kind: 'own', decision: { kind: 'host-answered', line: '220 Host accepted.' } }, 'HOST naming the proxy');
  t.same(decide('AUTH TLS'), { kind: 'own', decision: { kind: 'reply', line: '502 AUTH not supported by this proxy.', errorCode: 'FTPP_ERR_NOT_IMPLEMENTED' } }, 'AUTH without a TLS offer');
  t.same(decide('AUTH TLS', TLS_VIEW), { kind: 'own', decision: { kind: 'start-tls', line: '234 Proceed with negotiation.', prot: 'C' } }, 'AUTH with a TLS offer: the handshake');
  t.equal(decide('PBSZ 0', TLS_VIEW).kind, 'own');
  t.equal(decide('CCC', TLS_VIEW).kind, 'own');
  const requireView: SessionView = { ...VIEW, protection: initialProtection({ mode: 'explicit', require: true }) };
  t.same(decide('USER alice@ftp.example.net', requireView), { kind: 'own', decision: { kind: 'reply', line: '530 Non-anonymous sessions must use encryption.', errorCode: 'FTPP_ERR_TLS_REQUIRED' } }, 'tls.require: no forward login before AUTH TLS');
  t.equal(decide('USER alice@ftp.example.net', { ...requireView, protection: { ...requireView.protection, secured: true } }).kind, 'login', 'and after it, the login');
});

t.test('FEAT before login lists what the proxy provides itself', async (t) => {
  t.same(preLoginFeatures(false).split('\r\n'), ['211-Features:', ' EPRT', ' EPSV', "211 End (the server's features follow once you are logged in)"]);
  t.same(preLoginFeatures(true).split('\r\n').slice(1, -1), [' EPRT', ' EPSV', ' AUTH TLS', ' PBSZ', ' PROT']);
  const feat = decide('FEAT', TLS_VIEW);
  t.ok(feat.kind === 'reply' && feat.line.includes(' AUTH TLS'), 'AUTH TLS offered when the listener has tls');
});

const reply = (text: string): Reply => {
  const lines = text.split('\r\n');
  return { code: Number(text.slice(0, 3)), lines, raw: Buffer.from(`${text}\r\n`, 'latin1') };
};

t.test('the server banner becomes continuation lines of the reply to USER', async (t) => {
  const banner = reply('220-Welcome\r\n second line\r\n220 ftp.example.net ready');
  t.equal(withServerBanner(banner, reply('331 Please specify the password.')).toString('latin1'), '331-Welcome\r\n331- second line\r\n331-ftp.example.net ready\r\n331 Please specify the password.\r\n');
  t.equal(withServerBanner(reply('220 hi'), reply('230-a\r\n230 b')).toString('latin1'), '230-hi\r\n230-a\r\n230 b\r\n', 'a multi-line reply keeps its own lines');
  // A banner line that looks like the end of the reply must not end it.
  t.equal(withServerBanner(reply('220 331 trick'), reply('331 ok')).toString('latin1'), '331-331 trick\r\n331 ok\r\n');
  t.equal(withServerBanner(reply('120 wait\r\n220 ready'.split('\r\n')[0]!), reply('530 no')).toString('latin1'), '530-wait\r\n530 no\r\n');
});
