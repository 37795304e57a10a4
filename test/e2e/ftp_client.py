"""Small FTP/TCP tools the end-to-end tests run inside network namespaces.

Usage: python3 ftp_client.py '<json job>'; job["tool"] picks one of the modes below. Results
are JSON objects, one per line on stdout, so the test never parses free text. Modes:

  session   log in, run every op in `ops` in order (exit 1 if any failed); with
            "tls": "explicit" and "cafile", over FTPS (AUTH TLS, PBSZ 0, PROT P)
  victim    log in, PASV, print the port, wait for a line on stdin, then take that data
            connection and RETR (the port-stealing scenario, protocol.md section 4.2); with
            "mode": "port", PORT/EPRT instead, then RETR and accept the server's connection
  stall     log in, PASV, connect the data connection with a small receive buffer, RETR, and
            read nothing: report the final reply, how long it took, and what the data
            connection then does (an idle data connection the proxy must notice); with
            "mode": "port", PORT/EPRT and accept the server's data connection instead
  probe     connect to host:port, read until EOF/reset/timeout, report the bytes received
  listen    accept on every port in `ports`, print one line per accepted connection
  dialogue  read the greeting, send each of `commands` and read its complete reply; stop at
            the first 421 or when the connection ends; with `wait_close`, then report
            whether the other side closes the connection
"""
import errno
import ftplib
import json
import select
import socket
import ssl
import sys
import time


def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class ReusingFTP_TLS(ftplib.FTP_TLS):
    """FTP_TLS whose data connections resume the control connection's TLS session.

    Stock FTP_TLS wraps each data socket in a fresh session, which vsftpd's default
    require_ssl_reuse=YES refuses with 522 (bpo-19500; protocol.md section 5.5).
    """

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def login(job):
    timeout = job.get("timeout", 15)
    tls = job.get("tls")
    if tls not in (None, "explicit"):
        raise ValueError("unsupported tls mode %r" % tls)
    if tls:
        # Verifies the certificate and the address we dialled against the test CA.
        context = ssl.create_default_context(cafile=job["cafile"])
        ftp = ReusingFTP_TLS(context=context, timeout=timeout)
    else:
        ftp = ftplib.FTP(timeout=timeout)
    # The point of these tests is the 227 address: use it as BSD clients do (bpo-43285).
    ftp.trust_server_pasv_ipv4_address = bool(job.get("trust", True))
    ftp.connect(job["host"], job.get("port", 21))
    ftp.login(job["user"], job["password"])  # FTP_TLS sends AUTH TLS first
    if tls:
        ftp.prot_p()
    ftp.set_pasv(job.get("mode", "pasv") == "pasv")
    return ftp


def run_op(ftp, op):
    kind = op[0]
    if kind == "get":
        with open(op[2], "wb") as out:
            reply = ftp.retrbinary("RETR " + op[1], out.write)
        return reply
    if kind == "put":
        with open(op[1], "rb") as src:
            reply = ftp.storbinary("STOR " + op[2], src)
        return reply
    if kind == "raw":
        return ftp.sendcmd(op[1])
    if kind == "raw-any":
        # A command whose failure is the expected outcome: report the reply, never raise.
        try:
            return ftp.sendcmd(op[1])
        except ftplib.all_errors as err:
            return str(err)
    raise ValueError("unknown op " + kind)


def session(job):
    try:
        ftp = login(job)
    except Exception as err:  # noqa: BLE001 - report everything as data
        emit(op="login", ok=False, error="%s: %s" % (type(err).__name__, err))
        return 1
    emit(op="login", ok=True, tls=ftp.sock.version() if isinstance(ftp.sock, ssl.SSLSocket) else None)
    status = 0
    for op in job.get("ops", []):
        try:
            reply = run_op(ftp, op)
            emit(op=op[0], arg=op[1], ok=True, reply=reply)
        except Exception as err:  # noqa: BLE001
            emit(op=op[0], arg=op[1], ok=False, error="%s: %s" % (type(err).__name__, err))
            status = 1
    try:
        ftp.quit()
    except Exception:  # noqa: BLE001
        ftp.close()
    return status


class RawReplies:
    """FTP replies read straight off the control socket, one recv at a time, so nothing is
    buffered where select() cannot see it. Only what a reply needs is consumed."""

    def __init__(self, sock):
        self.sock = sock
        self.pending = b""

    def next_reply(self, seconds):
        """The last line of the next complete reply (multiline replies end at "NNN "), or None
        when none completes within `seconds` (0: only what can be read without waiting)."""
        deadline = time.monotonic() + seconds
        while True:
            while b"\r\n" in self.pending:
                line, self.pending = self.pending.split(b"\r\n", 1)
                text = line.decode("utf-8", "replace")
                if len(text) >= 4 and text[:3].isdigit() and text[3] == " ":
                    return text
            left = deadline - time.monotonic()
            if not select.select([self.sock], [], [], max(0, left))[0]:
                return None
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            self.pending += chunk


def listen_for_data(ftp, rcvbuf=None):
    """A listener on the control connection's local address for PORT/EPRT (optional SO_RCVBUF)."""
    server = socket.socket(ftp.sock.family, socket.SOCK_STREAM)
    if rcvbuf:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    server.bind((ftp.sock.getsockname()[0], 0))
    server.listen(1)
    server.settimeout(10)
    return server


def victim(job):
    ftp = login(job)
    if job.get("mode", "pasv") == "port":
        server = listen_for_data(ftp)
        host, port = server.getsockname()[:2]
        reply = ftp.sendport(host, port) if ftp.sock.family == socket.AF_INET else ftp.sendeprt(host, port)
        emit(op="port", reply=reply, host=host, port=port)
        sys.stdin.readline()
        # The control replies are read off the socket here, not through ftplib's buffered
        # file: a final reply that arrives in the same segment as the 150 would sit in that
        # buffer, where select() cannot see it (and QUIT would then read it as its reply).
        ftp.putcmd("RETR " + job["remote"])
        control = RawReplies(ftp.sock)
        first = control.next_reply(10)
        if first is None or not first.startswith("1"):
            # The server could not connect (e.g. 425): report it, never hang.
            emit(op="retr", first=first, final=None, bytes=0, accepted=False)
            ftp.quit()
            return 0
        # The server's connection, or a final reply without one (then nothing will come).
        final, connected = None, False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            final = control.next_reply(0)
            if final is not None:
                break
            ready = select.select([server, ftp.sock], [], [], max(0, deadline - time.monotonic()))[0]
            if server in ready:
                connected = True
                break
        if not connected:
            emit(op="retr", first=first, final=final, bytes=0, accepted=False)
            ftp.quit()
            return 0
        data = server.accept()[0]
        server.close()
    else:
        reply = ftp.sendcmd("PASV")
        host, port = ftplib.parse227(reply)
        emit(op="pasv", reply=reply, host=host, port=port)
        sys.stdin.readline()  # the attacker has had its go
        data = socket.create_connection((host, port), timeout=10)
        first = ftp.sendcmd("RETR " + job["remote"])
        control = None
    received = 0
    with open(job["local"], "wb") as out:
        while True:
            chunk = data.recv(65536)
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
    data.close()
    # PORT: the control socket is read directly from the RETR on (see above).
    final = control.next_reply(30) if control else ftp.voidresp()
    emit(op="retr", first=first, final=final, bytes=received)
    ftp.quit()
    return 0


def stall(job):
    ftp = login(job)
    if job.get("mode", "pasv") == "port":
        # Active: PORT (IPv4) or EPRT (IPv6) naming a listener whose accepted socket inherits
        # the small receive buffer (the window is settled in the handshake).
        server = listen_for_data(ftp, rcvbuf=4096)
        host, port = server.getsockname()[:2]
        if ftp.sock.family == socket.AF_INET:
            ftp.sendport(host, port)
        else:
            ftp.sendeprt(host, port)
        first = ftp.sendcmd("RETR " + job["remote"])
        data = server.accept()[0]
        server.close()
    else:
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        data = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small window: the server's send buffer fills and the transfer stalls for good.
        data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        data.settimeout(10)
        data.connect((host, port))
        first = ftp.sendcmd("RETR " + job["remote"])
    started = time.monotonic()
    ftp.sock.settimeout(job.get("wait", 30))
    try:
        final = ftp.getresp()
    except ftplib.Error as err:
        final = str(err)
    except socket.timeout:
        final = None
    seconds = round(time.monotonic() - started, 2)
    # The cut resets the client's side at its next packet: reading opens the window and sends one.
    data.settimeout(5)
    end = "eof"
    try:
        while data.recv(65536):
            pass
    except ConnectionResetError:
        end = "reset"
    except socket.timeout:
        end = "timeout"
    data.close()
    emit(op="stall", first=first, final=final, seconds=seconds, data_end=end)
    try:
        ftp.quit()
    except Exception:  # noqa: BLE001
        ftp.close()
    return 0


def probe(job):
    started = time.monotonic()
    received = 0
    try:
        # With a timeout, connect() is non-blocking + poll + SO_ERROR: a reset that arrives
        # right after the handshake surfaces here as ECONNRESET rather than on recv().
        sock = socket.create_connection((job["host"], job["port"]), timeout=job.get("timeout", 5))
    except OSError as err:
        emit(connected=False, errno=errno.errorcode.get(err.errno or 0, str(err)), bytes=0,
             seconds=round(time.monotonic() - started, 3))
        return 0
    local = "%s:%d" % sock.getsockname()[:2]
    end = "eof"
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += len(chunk)
    except socket.timeout:
        end = "timeout"
    except ConnectionResetError:
        end = "reset"
    sock.close()
    emit(connected=True, local=local, bytes=received, end=end, seconds=round(time.monotonic() - started, 3))
    return 0


def listen(job):
    import selectors

    selector = selectors.DefaultSelector()
    for port in job["ports"]:
        server = socket.create_server((job.get("host", "0.0.0.0"), port), backlog=16)
        server.setblocking(False)
        selector.register(server, selectors.EVENT_READ)
    emit(ready=True)
    while True:
        for key, _ in selector.select():
            conn, peer = key.fileobj.accept()
            emit(accept="%s:%d" % peer, port=key.fileobj.getsockname()[1])
            conn.close()


def read_reply(stream):
    """One complete reply (RFC 959 section 4.2, multi-line aware): (lines, complete)."""
    lines = []
    code = None
    while True:
        raw = stream.readline()
        if not raw:
            return lines, False
        line = raw.decode("latin-1").rstrip("\r\n")
        lines.append(line)
        if code is None:
            if len(line) >= 4 and line[:3].isdigit() and line[3] == "-":
                code = line[:3]
                continue
            return lines, True
        if line[:3] == code and line[3:4] == " ":
            return lines, True


def wait_for_eof(stream):
    """True when the other side closes (EOF or reset), False on timeout; extra bytes are kept."""
    try:
        extra = stream.read()
        return True, extra.decode("latin-1")
    except socket.timeout:
        return False, ""
    except ConnectionResetError:
        return True, ""


def dialogue(job):
    try:
        sock = socket.create_connection((job["host"], job["port"]), timeout=job.get("timeout", 10))
    except OSError as err:
        emit(op="connect", error="%s: %s" % (type(err).__name__, err))
        return 0
    stream = sock.makefile("rb")

    def exchange(command):
        """(lines, state): state is "reply", "closed" or "timeout"."""
        try:
            if command is not None:
                sock.sendall(command.encode("latin-1") + b"\r\n")
            lines, complete = read_reply(stream)
            return lines, "reply" if complete else "closed"
        except (BrokenPipeError, ConnectionResetError):
            return [], "closed"
        except socket.timeout:
            return [], "timeout"

    lines, state = exchange(None)
    emit(op="greeting", lines=lines, complete=state == "reply", state=state)
    last = lines
    if state == "reply" and not lines[0].startswith("421"):
        for command in job.get("commands", []):
            lines, state = exchange(command)
            emit(op="cmd", cmd=command, lines=lines, complete=state == "reply", closed=state == "closed", state=state)
            last = lines
            if state != "reply" or lines[0].startswith("421"):
                break
    eof, extra = None, ""
    if state == "closed":
        eof = True
    elif state == "reply" and (job.get("wait_close") or last[:1] and last[0].startswith("421")):
        eof, extra = wait_for_eof(stream)
    emit(op="end", eof=eof, extra=extra, error="timed out waiting for a reply" if state == "timeout" else None)
    sock.close()
    return 0


def main():
    job = json.loads(sys.argv[1])
    tool = job.get("tool", "session")
    tools = {"session": session, "victim": victim, "probe": probe, "listen": listen, "dialogue": dialogue, "stall": stall}
    return tools[tool](job)


if __name__ == "__main__":
    sys.exit(main())
