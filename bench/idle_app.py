#!/usr/bin/env python3
"""A unit for measuring the checkpoint protocol alone: it idles, and answers every app
checkpoint request at once from the client thread (no safe point to wait for), saving a
few bytes of state.  Used by bench_checkpoint.py's scaling table."""

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nodeagent.appclient import AppClient  # noqa: E402

client = AppClient.from_env()


STATE = str(os.getpid()).encode()


@client.on_checkpoint
def save(images_dir: str) -> None:
    # one open/write/close, no text-file objects: the program's own cost per checkpoint
    fd = os.open(os.path.join(images_dir, "state"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, STATE)
    finally:
        os.close(fd)


client.start()
threading.Event().wait()
