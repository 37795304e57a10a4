/**
 * Forward mode login parsing (issue #13, upstream-selection.md A1 #1 and A4): `USER
 * name@host[:port]`, split at the last `@`, every host form the issue lists, and a stable
 * refusal for everything else.
 */
import t from 'tap';
import {
  FORWARD_LOGIN_REFUSAL_TEXT,
  MAX_FORWARD_USER_LENGTH,
  formatForwardDestination,
  parseForwardDestination,
  parseForwardLogin,
  parseHostName,
  type ForwardHost,
  type ForwardLoginParse,
  type ForwardLoginRefusal,
} from '../../src/control/forward-login.js';

const name = (n: string): ForwardHost => ({ kind: 'name', name: n });
const ip = (address: string): ForwardHost => ({ kind: 'ip', address });
const ok = (user: string, host: ForwardHost, port: number | null): ForwardLoginParse => ({ ok: true, user, host, port });
const no = (code: ForwardLoginRefusal): ForwardLoginParse => ({ ok: false, code, reason: FORWARD_LOGIN_REFUSAL_TEXT[code] });

t.test('parseForwardLogin table', async (t) => {
  const table: [argument: string, expected: ForwardLoginParse][] = [
    // A4 row by row
    ['bob@ftp.x.org', ok('bob', name('ftp.x.org'), null)],
    ['a@b.com@ftp.x.org', ok('a@b.com', name('ftp.x.org'), null)],
    ['alice@example.org@ftp.example.net:2121', ok('alice@example.org', name('ftp.example.net'), 2121)],
    ['bob@ftp.x.org:2121', ok('bob', name('ftp.x.org'), 2121)],
    ['bob@[2001:db8::1]:21', ok('bob', ip('2001:db8::1'), 21)],
    ['bob@[2001:db8::1]', ok('bob', ip('2001:db8::1'), null)],
    ['bob@2001:db8::1', ok('bob', ip('2001:db8::1'), null)],
    ['bob@host,21', no('bad-host')],
    ['bob@host 21', no('space-in-host')],
    ['bob', no('no-destination')],
    // IPv4
    ['bob@192.0.2.7', ok('bob', ip('192.0.2.7'), null)],
    ['bob@192.0.2.7:990', ok('bob', ip('192.0.2.7'), 990)],
    ['bob@010.0.0.1', no('bad-host')],
    ['bob@127.1', no('bad-host')],
    ['bob@203.0.113.300', no('bad-host')],
    ['bob@[192.0.2.7]', no('bad-host')],
    // IPv6 forms
    ['bob@[2001:DB8:0:0:0:0:0:1]:2121', ok('bob', ip('2001:db8::1'), 2121)],
    ['bob@::1', ok('bob', ip('::1'), null)],
    ['bob@[::1]:21', ok('bob', ip('::1'), 21)],
    ['bob@2001:db8::1:2121', ok('bob', ip('2001:db8::1:2121'), null)],
    ['bob@[::ffff:127.0.0.1]:2121', ok('bob', ip('127.0.0.1'), 2121)],
    ['bob@::ffff:192.0.2.7', ok('bob', ip('192.0.2.7'), null)],
    ['bob@[::ffff:010.0.0.1]', no('bad-host')],
    ['bob@[fe80::1%eth0]', no('bad-host')],
    ['bob@fe80::1%eth0', no('bad-host')],
    ['bob@[fe80::1%25eth0]:21', no('bad-host')],
    ['bob@2001:db8::1::2', no('bad-host')],
    ['bob@host:21:22', no('bad-host')],
    ['bob@[2001:db8::1', no('bad-host')],
    ['bob@2001:db8::1]', no('bad-host')],
    ['bob@[2001:db8::1]x', no('bad-host')],
    ['bob@[2001:db8::1]:', no('bad-port')],
    ['bob@[]', no('bad-host')],
    ['bob@[]:21', no('bad-host')],
    // ports
    ['bob@h.example:1', ok('bob', name('h.example'), 1)],
    ['bob@h.example:65535', ok('bob', name('h.example'), 65535)],
    ['bob@h.example:021', ok('bob', name('h.example'), 21)],
    ['bob@h.example:0', no('bad-port')],
    ['bob@h.example:00000', no('bad-port')],
    ['bob@h.example:65536', no('bad-port')],
    ['bob@h.example:99999', no('bad-port')],
    ['bob@h.example:000021', no('bad-port')],
    ['bob@h.example:', no('bad-port')],
    ['bob@h.example:+21', no('bad-port')],
    ['bob@h.example:-1', no('bad-port')],
    ['bob@h.example:21a', no('bad-port')],
    ['bob@h.example:0x15', no('bad-port')],
    ['bob@:21', no('empty-host')],
    // names
    ['bob@FTP.Example.NET', ok('bob', name('ftp.example.net'), null)],
    ['bob@ftp.example.net.', ok('bob', name('ftp.example.net'), null)],
    ['bob@ftp.example.net.:21', ok('bob', name('ftp.example.net'), 21)],
    ['bob@localhost', ok('bob', name('localhost'), null)],
    ['bob@ftp', ok('bob', name('ftp'), null)],
    ['bob@0x7f000001', no('bad-host')],
    ['bob@0177.0.0.1', no('bad-host')],
    ['bob@ftp..example', no('bad-host')],
    ['bob@.example', no('bad-host')],
    ['bob@-ftp.example', no('bad-host')],
    ['bob@ftp-.example', no('bad-host')],
    ['bob@ftp_x.example', no('bad-host')],
    ['bob@ftp/x.example', no('bad-host')],
    ['bob@ftp.ex\u00e4mple', no('bad-host')],
    ['bob@*.example', no('bad-host')],
    [`bob@${'a'.repeat(63)}.example`, ok('bob', name(`${'a'.repeat(63)}.example`), null)],
    [`bob@${'a'.repeat(64)}.example`, no('bad-host')],
    // user part
    ['@ftp.x.org', no('empty-user')],
    ['  @ftp.x.org', no('empty-user')],
    ['bob@', no('empty-host')],
    ['@', no('empty-user')],
    ['bob smith@ftp.x.org', ok('bob smith', name('ftp.x.org'), null)],
    ['dom\\bob@ftp.x.org', ok('dom\\bob', name('ftp.x.org'), null)],
    ['bob:x@ftp.x.org', ok('bob:x', name('ftp.x.org'), null)],
    ['b\u00e9b@ftp.x.org', ok('b\u00e9b', name('ftp.x.org'), null)],
    // A1 #6 joined: indistinguishable from an e-mail user name, read as one
    ['bob@proxyuser@ftp.x.org', ok('bob@proxyuser', name('ftp.x.org'), null)],
    // A1 #7 joined-acct: proxy logins are not supported
    ['bob@ftp.x.org proxyuser', no('space-in-host')],
    ['bob@ftp.x.org\t', no('control-character')],
    // control characters anywhere
    ['bob\r\n@ftp.x.org', no('control-character')],
    ['bob@ftp.x.org\r\nDELE x', no('control-character')],
    ['bob\x00@ftp.x.org', no('control-character')],
    ['bob@ftp\x7f.x.org', no('control-character')],
    // lengths
    [`${'u'.repeat(MAX_FORWARD_USER_LENGTH)}@h.example`, ok('u'.repeat(MAX_FORWARD_USER_LENGTH), name('h.example'), null)],
    [`${'u'.repeat(MAX_FORWARD_USER_LENGTH + 1)}@h.example`, no('too-long')],
    [`bob@${'a.'.repeat(200)}example`, no('too-long')],
  ];
  for (const [argument, expected] of table) t.same(parseForwardLogin(argument), expected, JSON.stringify(argument));
});

t.test('a 253-character name is the longest accepted', async (t) => {
  const label = 'a'.repeat(63);
  const longest = `${label}.${label}.${label}.${'b'.repeat(61)}`;
  t.equal(longest.length, 253);
  t.same(parseForwardLogin(`u@${longest}:21`), ok('u', name(longest), 21));
  t.same(parseForwardLogin(`u@${longest}.`), ok('u', name(longest), null), 'plus the trailing dot');
  t.same(parseForwardLogin(`u@x${longest}`), no('bad-host'), '254 characters');
});

t.test('refusal texts: fixed, one per code, fit a single 530 line', async (t) => {
  for (const [code, text] of Object.entries(FORWARD_LOGIN_REFUSAL_TEXT)) {
    t.notOk(/[\r\n\x00]/.test(text), `${code}: no CR/LF/NUL`);
    t.ok(text.length > 0 && text.length < 120, `${code}: short text`);
  }
  t.ok(Object.isFrozen(FORWARD_LOGIN_REFUSAL_TEXT));
  const refused = parseForwardLogin('bob@evil\r\n530 fake');
  t.same(refused, no('control-character'), 'the client text never reaches the reason');
});

t.test('parseForwardDestination: the host[:port] of SITE/OPEN (A1 #4/#5)', async (t) => {
  t.same(parseForwardDestination('ftp.x.org:2121'), { ok: true, host: name('ftp.x.org'), port: 2121 });
  t.same(parseForwardDestination('[2001:db8::1]'), { ok: true, host: ip('2001:db8::1'), port: null });
  t.same(parseForwardDestination(''), { ok: false, code: 'empty-host', reason: FORWARD_LOGIN_REFUSAL_TEXT['empty-host'] });
  t.same(parseForwardDestination('a@b'), { ok: false, code: 'bad-host', reason: FORWARD_LOGIN_REFUSAL_TEXT['bad-host'] }, 'no @ in a destination');
});

t.test('parseHostName table', async (t) => {
  const table: [text: string, expected: string | null][] = [
    ['ftp.example.com', 'ftp.example.com'],
    ['FTP.Example.COM.', 'ftp.example.com'],
    ['xn--bcher-kva.example', 'xn--bcher-kva.example'],
    ['a', 'a'],
    ['1a.example', '1a.example'],
    ['example.1a', 'example.1a'],
    ['a.b.c.d.e.f', 'a.b.c.d.e.f'],
    ['cafe', 'cafe'],
    ['0xcafe', null],
    ['1.2.3.0x4', null],
    ['0x7f.1', null],
    ['1.2.3.4.5.0x6', '1.2.3.4.5.0x6'], // five or more parts: not an inet_aton address
    ['', null],
    ['.', null],
    ['..', null],
    ['example..com', null],
    ['a.example.com..', null],
    ['203.0.113.1', null],
    ['example.123', null],
    ['ex ample.com', null],
    ['ex/ample.com', null],
    ['*.example.com', null],
  ];
  for (const [text, expected] of table) t.equal(parseHostName(text), expected, JSON.stringify(text));
});

t.test('formatForwardDestination', async (t) => {
  t.equal(formatForwardDestination(name('ftp.x.org'), null), 'ftp.x.org');
  t.equal(formatForwardDestination(name('ftp.x.org'), 2121), 'ftp.x.org:2121');
  t.equal(formatForwardDestination(ip('192.0.2.7'), 21), '192.0.2.7:21');
  t.equal(formatForwardDestination(ip('2001:db8::1'), 21), '[2001:db8::1]:21');
  t.equal(formatForwardDestination(ip('2001:db8::1'), null), '[2001:db8::1]');
});

t.test('every parsed destination formats back to text that parses to the same destination', async (t) => {
  for (const argument of ['u@ftp.x.org', 'u@ftp.x.org:2121', 'u@[2001:db8::1]:21', 'u@2001:db8::1', 'u@192.0.2.7:990', 'u@[::ffff:192.0.2.7]']) {
    const parsed = parseForwardLogin(argument);
    if (!parsed.ok) {
      t.fail(argument);
      continue;
    }
    t.same(parseForwardDestination(formatForwardDestination(parsed.host, parsed.port)), { ok: true, host: parsed.host, port: parsed.port }, argument);
  }
});
