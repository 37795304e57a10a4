/**
 * A light FTP server for the idle-session measurement: it greets and answers USER, PASS,
 * NOOP and QUIT, nothing else, so the proxy's memory per idle session can be measured
 * without thousands of vsftpd processes. Run as its own process by run.ts:
 * `node fake-upstream.js <host> <port> <maxMs>`; prints `LISTENING` when bound and exits by
 * itself after maxMs.
 */
import net from 'node:net';

function serve(socket: net.Socket): void {
  socket.setNoDelay(true);
  socket.setEncoding('latin1');
  socket.on('error', () => {});
  let pending = '';
  socket.write('220 bench fake upstream\r\n');
  socket.on('data', (text: string) => {
    pending += text;
    if (pending.length > 8192) {
      socket.destroy();
      return;
    }
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl).replace(/\r$/, '');
      pending = pending.slice(nl + 1);
      const verb = line.split(' ')[0]!.toUpperCase();
      switch (verb) {
        case 'USER':
          socket.write('331 Please specify the password.\r\n');
          break;
        case 'PASS':
          socket.write('230 Login successful.\r\n');
          break;
        case 'NOOP':
          socket.write('200 NOOP ok.\r\n');
          break;
        case 'QUIT':
          socket.end('221 Goodbye.\r\n');
          return;
        default:
          socket.write('502 Command not implemented.\r\n');
      }
    }
  });
}

const [host = '127.0.0.1', portText = '0', maxMsText = '600000'] = process.argv.slice(2);
const server = net.createServer({ noDelay: true }, serve);
server.listen({ host, port: Number(portText), backlog: 4096 }, () => {
  process.stdout.write(`LISTENING ${(server.address() as net.AddressInfo).port}\n`);
});
setTimeout(() => process.exit(0), Number(maxMsText)).unref();
// Keep running until the deadline even when no one is connected.
setInterval(() => {}, 60_000);
