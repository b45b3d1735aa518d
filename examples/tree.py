"""tree: a small Python process tree for checkpoint/restart.

    python3 tree.py [OUTFILE [INTERVAL_S]]

The parent forks a child and keeps a pipe to it.  Every INTERVAL_S (default 0.1) the parent
increments its counter N, prints "parent N", sends N through the pipe and appends "N" to
OUTFILE (default tree.out); the child prints "child got N" for every number it reads, and
checks they arrive in order.  Each process also runs a thread with its own counter
("parent-thread K", "child-thread K").  After a restart from a checkpoint the printed
counters continue from the checkpointed values.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def ticker(label: str, interval: float) -> None:
    k = 0
    while True:
        k += 1
        print(f"{label} {k}\n", end="", flush=True)
        time.sleep(interval)


def child(rfd: int, interval: float) -> None:
    threading.Thread(target=ticker, args=("child-thread", interval), daemon=True).start()
    expected = 1
    with os.fdopen(rfd, "r") as pipe:
        for line in pipe:
            n = int(line)
            if n != expected:
                print(f"child error: got {n}, expected {expected}\n", end="", flush=True)
                os._exit(3)
            print(f"child got {n}\n", end="", flush=True)
            expected = n + 1
    os._exit(0)


def main() -> None:
    outfile = sys.argv[1] if len(sys.argv) > 1 else "tree.out"
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(wfd)
        child(rfd, interval)
    os.close(rfd)
    print(f"parent pid {os.getpid()} child pid {pid}", flush=True)
    threading.Thread(target=ticker, args=("parent-thread", interval), daemon=True).start()
    out = open(outfile, "a", buffering=1)
    with os.fdopen(wfd, "w", buffering=1) as pipe:
        n = 0
        while True:
            n += 1
            print(f"parent {n}\n", end="", flush=True)
            pipe.write(f"{n}\n")
            out.write(f"{n}\n")
            time.sleep(interval)


if __name__ == "__main__":
    main()
