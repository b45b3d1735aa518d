"""What it costs this machine to ask N programs to save their state, with no gridckpt at all.

    python bench/bench_raw_fanout.py [--units 1,4,16,64] [--runs 200]

The baseline of the scaling table (bench_checkpoint.py, Table 2): N copies of bench/idle_app.c
connect to Unix sockets served by one asyncio loop in this process, which sends each a
``CHECKPOINT`` line naming a directory in /dev/shm (each program writes its state file there
and answers ``DONE``) and waits for every answer: one request round of the app protocol,
bare.  gridckpt's prepare stage does this round among others (freeze, checks, manifests, the
bus); the rest of a coordinated checkpoint's per-unit cost is gridckpt's own.  Median ms of
``--runs`` rounds per N, the Ns taking turns round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class _Program(asyncio.Protocol):
    """One program's connection: its HELLO is welcomed, its answers complete ``pending``."""

    def __init__(self, joined: asyncio.Queue) -> None:
        self.joined = joined
        self.transport: asyncio.Transport | None = None
        self.pending: asyncio.Future | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            if line.startswith(b"HELLO "):
                self.transport.write(b"WELCOME 1\n")      # type: ignore[union-attr]
                self.joined.put_nowait(self)
            elif self.pending is not None and not self.pending.done():
                self.pending.set_result(line)


async def raw_rounds(program: Path, counts: list[int], runs: int, work: Path) -> dict[int, list[float]]:
    """ms of one CHECKPOINT/DONE round with each of ``counts`` programs, ``runs`` times each."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Queue = asyncio.Queue()
    servers, procs, groups = [], [], {}
    try:
        for n in counts:
            group = []
            for i in range(n):
                path = str(work / f"s{n}-{i}.sock")
                servers.append(await loop.create_unix_server(lambda: _Program(joined), path))
                procs.append(subprocess.Popen([str(program)], env={**os.environ, "GRIDCKPT_APP_SOCKET": path},
                                              stdin=subprocess.DEVNULL))
                state_dir = work / f"d{n}-{i}"
                state_dir.mkdir()
                group.append((await asyncio.wait_for(joined.get(), 10), f"CHECKPOINT r {state_dir}\n".encode()))
            groups[n] = group
        times: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(runs):
            for n in counts[r % len(counts):] + counts[:r % len(counts)]:
                await asyncio.sleep(0.001)
                t = time.perf_counter()
                futs = []
                for prog, line in groups[n]:
                    prog.pending = loop.create_future()
                    futs.append(prog.pending)
                    prog.transport.write(line)
                answers = await asyncio.gather(*futs)
                times[n].append((time.perf_counter() - t) * 1000)
                if any(a != b"DONE" for a in answers):
                    raise RuntimeError(f"a program answered {answers}")
        return times
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for s in servers:
            s.close()


def build(into: Path) -> Path:
    """bench/idle_app.c compiled into ``into``."""
    binary = into / "idle_app"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "idle_app.c")], check=True)
    return binary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", default="1,4,16,64")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    counts = [int(x) for x in args.units.split(",")]
    if not counts or min(counts) < 1 or args.runs < 1:
        ap.error("--units must name positive counts and --runs be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench-fanout-", dir="/dev/shm") as shm:
        times = asyncio.run(raw_rounds(build(Path(tmp)), counts, args.runs, Path(shm)))
    base = statistics.median(times[counts[0]])
    for n in counts:
        m = statistics.median(times[n])
        print(f"{n:4d} programs: {m:6.2f} ms  ({m / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
