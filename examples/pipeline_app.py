#!/usr/bin/env python3
"""A three-stage TCP pipeline of app-level units: source -> relay -> sink.

    pipeline_app.py source --to HOST:PORT          sends numbered 12-byte messages
    pipeline_app.py relay --listen PORT --to HOST:PORT   forwards what it reads
    pipeline_app.py sink --listen PORT             counts what arrives

Each stage saves its counters through the app checkpoint protocol (``nodeagent.appclient``)
and reloads them when restarted with GRIDCKPT_RESTORE; a peer that goes away is reconnected
(or accepted again).  Run under the shim (``interpose = true`` or an independent job), its
traffic becomes the determinants of the recovery-line tests and examples.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

try:
    from nodeagent.appclient import AppClient
except ImportError:  # run from a source tree without installing gridckpt
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from nodeagent.appclient import AppClient

MSG = 12  # b"m 000000001\n"
STATE_FILE = "pipeline.json"


def connect(addr: str, client: AppClient) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    while True:
        client.safe_point()
        try:
            s = socket.create_connection((host, int(port)), timeout=1)
            s.settimeout(0.1)
            return s
        except OSError:
            time.sleep(0.05)


def accept(srv: socket.socket, client: AppClient) -> socket.socket:
    while True:
        client.safe_point()
        try:
            conn, _ = srv.accept()
            conn.settimeout(0.1)
            return conn
        except socket.timeout:
            continue


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["source", "relay", "sink"])
    ap.add_argument("--listen", type=int, default=0)
    ap.add_argument("--to", default="")
    ap.add_argument("--every", type=float, default=0.01)
    args = ap.parse_args()
    name = os.environ.get("GRIDCKPT_UNIT", args.role)
    client = AppClient.from_env(safe_points=True)
    state = {"sent": 0, "received": 0}
    if client.restore_path():
        with open(os.path.join(client.restore_path(), STATE_FILE)) as f:
            state.update(json.load(f))
        print(f"{name} restored {state}", flush=True)

    @client.on_checkpoint
    def save(images_dir: str) -> None:
        with open(os.path.join(images_dir, STATE_FILE), "w") as f:
            json.dump(state, f)
        print(f"{name} checkpoint {state}", flush=True)

    client.start()
    srv = None
    if args.listen:
        srv = socket.create_server(("127.0.0.1", args.listen))
        srv.settimeout(0.1)
    up = accept(srv, client) if srv else None
    down = connect(args.to, client) if args.to else None
    buf = b""
    last_report = 0.0
    while True:
        client.safe_point()
        try:
            if args.role == "source":
                down.sendall(b"m %09d\n" % (state["sent"] + 1))
                state["sent"] += 1
                time.sleep(args.every)
            else:
                try:
                    data = up.recv(65536)
                except socket.timeout:
                    continue
                if not data:  # the upstream peer went away: take the next one
                    up.close()
                    up = accept(srv, client)
                    buf = b""
                    continue
                buf += data
                whole = len(buf) - len(buf) % MSG
                chunk, buf = buf[:whole], buf[whole:]
                state["received"] += whole // MSG
                if down is not None and chunk:
                    down.sendall(chunk)
                    state["sent"] += whole // MSG
        except (BrokenPipeError, ConnectionResetError):
            if down is not None:
                down.close()
                down = connect(args.to, client)
        if time.monotonic() - last_report > 0.5:
            last_report = time.monotonic()
            print(f"{name} sent={state['sent']} received={state['received']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
