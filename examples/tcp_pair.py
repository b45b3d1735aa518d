#!/usr/bin/env python3
"""A pair of job units that talk over TCP: a server that echoes and a client that checks.

    tcp_pair.py serve --port P            echo every line back
    tcp_pair.py call --port P [--host H]   send numbered lines, verify the echoes, report

The client retries its connect until the server listens (the units start in any order).
"""

import argparse
import os
import socket
import sys
import time


def serve(port: int, host: str, once: bool) -> int:
    srv = socket.create_server((host, port), reuse_port=False)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                f.write(line)
                f.flush()
        if once:
            return 0


def call(port: int, host: str, every: float, rounds: int) -> int:
    name = os.environ.get("GRIDCKPT_UNIT", "client")
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"{name}: no server on {host}:{port}", flush=True)
                return 1
            time.sleep(0.1)
    n = 0
    with sock, sock.makefile("rwb") as f:
        while not rounds or n < rounds:
            n += 1
            f.write(f"msg {n}\n".encode())
            f.flush()
            echo = f.readline().decode().strip()
            if echo != f"msg {n}":
                print(f"{name}: bad echo {echo!r} for msg {n}", flush=True)
                return 3
            print(f"{name} round={n} ok", flush=True)
            time.sleep(every)
    print(f"{name} done rounds={n}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["serve", "call"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=0, help="client: stop after this many rounds (0: never)")
    ap.add_argument("--once", action="store_true", help="server: exit when the first client leaves")
    a = ap.parse_args()
    return serve(a.port, a.host, a.once) if a.role == "serve" else call(a.port, a.host, a.every, a.rounds)


if __name__ == "__main__":
    sys.exit(main())
