"""Python test program for the shim: TCP echo server and client that check their own data
and print their own per-connection byte counts as JSON lines (like tcpprog.c).

  pyprog.py server [--family 4|6] [--conns N] [--fork]   prints "PORT n", serves N connections
  pyprog.py client --port P [--family 4|6] [--conns N] [--bytes B] [--sendfile]
                   [--exec-after X --exec-prog PATH]
      --exec-after: send and check the first X bytes, then exec PATH (client-fd) with an
      EMPTY environment on the same socket to do the rest (the shim must survive it).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading

_lock = threading.Lock()


def pattern(start: int, n: int) -> bytes:
    return bytes(((i * 7 + i // 251 + 3) & 0xFF) for i in range(start, start + n))


def names(sock: socket.socket) -> tuple[str, str]:
    def fmt(a) -> str:
        return f"[{a[0]}]:{a[1]}" if sock.family == socket.AF_INET6 else f"{a[0]}:{a[1]}"
    return fmt(sock.getsockname()), fmt(sock.getpeername())


def report(local: str, peer: str, sent: int, recv: int) -> None:
    with _lock:
        print(json.dumps({"local": local, "peer": peer, "sent": sent, "recv": recv, "pid": os.getpid()}),
              flush=True)


def serve(conn: socket.socket) -> None:
    local, peer = names(conn)
    got = sent = 0
    buf = bytearray(70000)
    view = memoryview(buf)
    k = 0
    while True:
        k += 1
        if k % 3 == 0:
            data = os.read(conn.fileno(), 4096)
            n = len(data)
            view[:n] = data
        elif k % 3 == 1:
            n = conn.recv_into(buf, 1 + (k * 131) % 65536)
        else:
            data, _anc, _fl, _addr = conn.recvmsg(8192)
            n = len(data)
            view[:n] = data
        if n == 0:
            break
        if bytes(view[:n]) != pattern(got, n):
            sys.exit("pyprog: server data mismatch")
        got += n
        off = 0
        while off < n:  # echo with several iovecs; sendmsg may move only part of them
            third = max(1, (n - off) // 3)
            parts = [view[off:off + third], view[off + third:off + 2 * third], view[off + 2 * third:n]]
            off += conn.sendmsg([p for p in parts if len(p)])
        sent += n
    report(local, peer, sent, got)
    conn.close()


def server(args) -> int:
    fam = socket.AF_INET6 if args.family == 6 else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::1" if args.family == 6 else "127.0.0.1", 0))
    ls.listen(64)
    print(f"PORT {ls.getsockname()[1]}", flush=True)
    threads, children = [], []
    for _ in range(args.conns):
        conn, _ = ls.accept()
        if args.fork:
            pid = os.fork()
            if pid == 0:
                ls.close()
                serve(conn)
                os._exit(0)
            children.append(pid)
            conn.close()
        else:
            t = threading.Thread(target=serve, args=(conn,))
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    rc = 0
    for pid in children:
        if os.waitpid(pid, 0)[1] != 0:
            rc = 1
    return rc


def read_echo(sock: socket.socket, start: int, end: int) -> int:
    got = start
    k = 0
    while got < end:
        k += 1
        want = min(end - got, 1 + (k * 977) % 30000)
        if k % 4 == 0:
            buf = bytearray(want)
            n = os.readv(sock.fileno(), [buf])
            data = bytes(buf[:n])
        elif k % 4 == 1:
            data = sock.recv(want)
        elif k % 4 == 2:
            data, _ = sock.recvfrom(want)
        else:
            data = os.read(sock.fileno(), want)
        if not data:
            sys.exit("pyprog: short echo")
        if data != pattern(got, len(data)):
            sys.exit("pyprog: client echo mismatch")
        got += len(data)
    return got - start


def client_one(args) -> None:
    host = "::1" if args.family == 6 else "127.0.0.1"
    sock = socket.create_connection((host, args.port), timeout=20)
    sock.settimeout(None)
    local, peer = names(sock)
    total = args.bytes
    upto = args.exec_after if args.exec_after is not None else total
    data = pattern(0, upto)
    result = {}

    def writer() -> None:
        if args.sendfile:
            with tempfile.TemporaryFile() as f:
                f.write(data)
                f.flush()
                off = 0
                while off < upto:
                    off += os.sendfile(sock.fileno(), f.fileno(), off, upto - off)
        else:
            off, k = 0, 0
            while off < upto:
                k += 1
                n = min(upto - off, 1 + (k * 7919) % 50000)
                chunk = memoryview(data)[off:off + n]
                if k % 3 == 0:
                    a = n // 3
                    off += sock.sendmsg([chunk[:a], chunk[a:2 * a], chunk[2 * a:]])
                elif k % 3 == 1:
                    off += sock.send(chunk)
                else:
                    off += os.write(sock.fileno(), chunk)
        result["sent"] = upto

    t = threading.Thread(target=writer)
    t.start()
    got = read_echo(sock, 0, upto)
    t.join()
    report(local, peer, result["sent"], got)
    if args.exec_after is not None:
        fd = sock.detach()
        os.set_inheritable(fd, True)
        sys.stdout.flush()
        os.execve(args.exec_prog, [args.exec_prog, "client-fd", "--fd", str(fd), "--bytes", str(total),
                                   "--offset", str(upto)], {})
    sock.shutdown(socket.SHUT_WR)
    if sock.recv(1) != b"":
        sys.exit("pyprog: expected EOF")
    sock.close()


def client(args) -> int:
    for _ in range(args.conns):
        client_one(args)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--family", type=int, default=4)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--port", type=int)
    ap.add_argument("--bytes", type=int, default=100000)
    ap.add_argument("--fork", action="store_true")
    ap.add_argument("--sendfile", action="store_true")
    ap.add_argument("--exec-after", type=int)
    ap.add_argument("--exec-prog")
    args = ap.parse_args()
    return server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
