#!/usr/bin/env python3
"""Determinant shipping: agent (shipper) -> bus -> orchestrator (determinant log), records/s.

    python bench/bench_shipping.py [--broker amqp://guest:guest@localhost/] [--records 1000000]

A shim log of ``--records`` send records (the shim's own binary format) is written into a
unit's shim directory; the agent's shipper tails it and publishes batches with confirms, the
orchestrator appends them to the job's determinant log.  Measured from the first read to the
moment the log holds every record, over memory:// and amqp:// in the same run, next to the
time it takes merely to decode the same log (the floor any shipper pays).  Target: amqp
>= 200,000 records/s sustained.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from interpose.reader import KIND_HEADER, KIND_SEND, REC_MAGIC, _FMT, read_records  # noqa: E402
from benchenv import bench_broker  # noqa: E402
from nodeagent.shipper import Shipper  # noqa: E402
from orchestrator.bus import open_bus  # noqa: E402
from orchestrator.daemon import Orchestrator  # noqa: E402
from orchestrator.jobs import JobState, UnitState  # noqa: E402
from orchestrator.store import Store  # noqa: E402


def write_log(path: Path, records: int) -> None:
    """A shim log: a header, then ``records`` sends on one connection, 100 bytes each."""
    src, dst = bytes([127, 0, 0, 1]) + bytes(12), bytes([127, 0, 0, 2]) + bytes(12)
    with open(path, "wb") as f:
        f.write(_FMT.pack(REC_MAGIC, 1, KIND_HEADER, 0, 0, os.getpid(), 0, 0, 0, 0, 0,
                          b"bench".ljust(16, b"\0"), bytes(16), 0, 0, 0, 0))
        chunk = []
        for i in range(records):
            chunk.append(_FMT.pack(REC_MAGIC, 1, KIND_SEND, 4, 0, os.getpid(), 0, i * 100, i * 100 + 100, 0,
                                   i, src, dst, 40000, 7000, 0, 0))
            if len(chunk) == 100_000:
                f.write(b"".join(chunk))
                chunk.clear()
        f.write(b"".join(chunk))


async def ship(url: str, store_dir: Path, shim_dir: Path, records: int) -> float:
    """Seconds from the first read of the log until the orchestrator's log holds every record."""
    store = Store(store_dir)
    obus, abus = open_bus(url), open_bus(url)
    await obus.connect()
    await abus.connect()
    orch = Orchestrator(obus, store)
    job = "ship-bench"
    spec = {"name": "ship", "protocol": "independent", "units": [{"name": "u", "command": ["true"]}]}
    orch.jobs[job] = JobState(id=job, spec=spec, units={"u": UnitState(name="u")})
    await orch.start()
    shipper = Shipper(abus, "b", "bench", period=0.01)
    child = None
    try:
        t0 = time.perf_counter()
        if url.startswith("memory://"):
            shipper.watch(job, "u", shim_dir)
            shipper.start()
        else:  # the agent is another process, as on a real node
            child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--agent", url, str(shim_dir))
        sink = orch.determinants
        sink.log_of(job)
        while sum(sink._marks.get(job, {}).values()) < records:
            await asyncio.sleep(0.005)
        return time.perf_counter() - t0
    finally:
        if child is not None:
            child.terminate()
            await child.wait()
        await shipper.stop()
        await orch.stop()
        await abus.close()
        await obus.close()


async def agent_process(url: str, shim_dir: str) -> None:
    """--agent: ship ``shim_dir`` until terminated."""
    bus = open_bus(url)
    await bus.connect()
    shipper = Shipper(bus, "b", "bench", period=0.01)
    shipper.watch("ship-bench", "u", Path(shim_dir))
    shipper.start()
    await asyncio.Event().wait()


async def main_async(args: argparse.Namespace) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ship-") as tmp:
        base = Path(tmp)
        log = base / "template" / "det.1.1.log"
        log.parent.mkdir()
        write_log(log, args.records)
        t = time.perf_counter()
        recs, _ = read_records(log, 0)
        decode = time.perf_counter() - t
        assert len(recs) == args.records
        del recs
        rows.append(("decode only (the floor)", decode))
        for name, url in (("memory://", "memory://ship"), ("amqp://", args.broker)):
            shim = base / name.strip(":/") / "shim"
            shim.mkdir(parents=True)
            os.link(log, shim / log.name)
            rows.append((name, await ship(url, base / name.strip(":/") / "store", shim, args.records)))
    print(f"\nDeterminant shipping of {args.records:,} records (agent -> bus -> orchestrator log, confirms on;"
          " amqp: the agent in its own process)")
    print(f"{'path':<26}{'seconds':>9}{'records/s':>14}{'vs decode':>11}")
    for name, secs in rows:
        print(f"{name:<26}{secs:>9.2f}{args.records / secs:>14,.0f}{secs / decode:>10.1f}x")
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--agent":
        try:
            asyncio.run(agent_process(sys.argv[2], sys.argv[3]))
        except KeyboardInterrupt:
            pass
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=None, help="amqp URL (default: the local broker's gridckpt-bench vhost)")
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args()
    args.broker = bench_broker(args.broker)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
