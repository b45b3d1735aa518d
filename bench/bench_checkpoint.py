#!/usr/bin/env python3
"""Coordinated checkpoint and restart cost, against raw CRIU measured in the same run.

    python bench/bench_checkpoint.py [--broker amqp://guest:guest@localhost/] [--runs 30] [--rounds 3]
                                     [--units 1,4,16,64] [--skip-scaling | --scaling-only]

Table 1: one single-process C program with 5 MiB of touched memory (examples/counter.c),
(a) raw ``criu dump`` / ``criu restore`` on the command line, (b) a gridckpt coordinated
checkpoint and restart with the orchestrator (in this process) and the agent (its own
``gridckpt agent`` daemon, as deployed) talking over amqp://, (c) the same over memory://
(both in this process), (d) over amqp:// with the agent's criu started on the spot
(GRIDCKPT_CRIU_AHEAD=0: what the stages add to CRIU, without the start-up they take off its
path); per stage, like the 2009 table (590 ms to checkpoint, 1,665 ms to restart).  The
baseline (a) is a twin of the unit that raw CRIU takes through the same cycle (frozen,
dumped, thawed; killed; restored and running again: bench_criu_raw.RawTwin), one cycle next
to each gridckpt run, in alternating order: both see the same moment of the machine, and
``SETTLE`` seconds of quiet precede every timed operation.  Medians of ``--runs`` runs per column (the twin: twice as many), taken in
``--rounds`` rounds that each measure every column, so a drift of the machine's speed weighs
on all alike; single times on this VM vary by +-20 %, which is why there are that many.
``backend alone``: the CRIU backend's own stages without the daemons (bench_criu_raw.compare).
``total`` is the time until every unit runs again (what a raw ``criu dump`` gives: images
written, not yet hashed nor synced); ``committed`` the time until the checkpoint is sealed
(sha256 manifests, one syncfs) and listed.  Table 2: the coordinated checkpoint of 1, 4, 16
and 64 units with the app backend (idle programs that answer at once and save a few bytes of
state: bench/idle_app.py through nodeagent.appclient, and bench/idle_app.c, whose own share is
next to nothing): the protocol's cost, with the store on disk (``--disk-dir``, /var/tmp) and
in memory (/dev/shm), since every program writes its state file into the store and on a VM
disk creating that file alone took 10 to 300 us.  ``--scaling-only`` runs Table 2 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from bench_criu_raw import RawTwin, compare  # noqa: E402
from bench_raw_fanout import raw_rounds  # noqa: E402
from nodeagent.checkpointers.criu_cli import find_criu  # noqa: E402

from benchenv import bench_broker  # noqa: E402
from nodeagent.daemon import NodeAgent  # noqa: E402
from nodeagent.freezer import Freezer  # noqa: E402
from orchestrator.bus import open_bus  # noqa: E402
from orchestrator.daemon import Orchestrator  # noqa: E402
from orchestrator.jobspec import parse_job  # noqa: E402
from orchestrator.store import Store  # noqa: E402


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Embedded:
    """An orchestrator in this process and one agent: in this process too (memory://, which
    has no other way), or as its own ``gridckpt agent`` daemon (amqp://, as deployed: the
    two daemons then do not share one Python interpreter's CPU time)."""

    def __init__(self, url: str, store: Path, agent_env: dict[str, str] | None = None) -> None:
        self.url = url
        self.store = Store(store)
        self.agent_env = agent_env or {}
        self.agent: NodeAgent | None = None
        self.agent_proc: subprocess.Popen | None = None

    async def __aenter__(self) -> "Embedded":
        self.obus = open_bus(self.url)
        await self.obus.connect()
        self.orch = Orchestrator(self.obus, self.store, heartbeat_interval=0.5)
        await self.orch.start()
        if self.url.startswith("memory:"):
            self.abus = open_bus(self.url)
            await self.abus.connect()
            self.agent = NodeAgent(self.abus, self.store, "bench", "b", heartbeat_interval=0.5)
            await self.agent.start()
        else:
            self.agent_proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "agent", "--broker", self.url, "--store",
                 str(self.store.root), "--node", "bench", "--site", "b", "--heartbeat", "0.5"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **self.agent_env})
        deadline = time.monotonic() + 30
        while not self.orch.live_agents():
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not register")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.agent is not None:
            await self.agent.stop(kill_units=True)
            await self.abus.close()
        for job in list(self.orch.jobs):
            try:
                await self.orch.control("cancel", {"job": job})
            except Exception:
                pass
        if self.agent_proc is not None:
            self.agent_proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.agent_proc.wait, 30)
        await self.orch.stop()
        await self.obus.close()

    def kill_unit(self, job: str, unit: str) -> None:
        """kill -9 every process of the unit (its freezer cgroup lists them)."""
        for pid in Freezer(job, unit, list).cgroup_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def submit(self, spec: dict[str, Any]) -> str:
        job = (await self.orch.control("submit", {"spec": spec}))["job"]
        deadline = time.monotonic() + 60
        while not all(u.state == "running" for u in self.orch.jobs[job].units.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("units did not start")
            await asyncio.sleep(0.02)
        return job


SETTLE = 0.3   # s of quiet before every timed operation (see gridckpt_runs)


async def gridckpt_runs(url: str, binary: Path, work: Path, runs: int, twin: RawTwin,
                        agent_env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Checkpoint and restart of the 5 MiB counter through gridckpt, per stage; next to each,
    the same with raw CRIU on ``twin`` (keys ``raw dump``, ``raw restore``), in alternating
    order.  ``SETTLE`` seconds of quiet come before every timed operation, raw or not, so
    that none runs beside the aftermath of another: gridckpt's agent starts the next criu
    ahead once a checkpoint or restart is over (a criu start-up: 20-40 ms of kernel probing
    on this VM, which the twin's criu beside it would share), a restored tree is moved into
    its cgroup, the twin is thawed.  A job checkpointed every few seconds or minutes has that
    quiet too.  Keys ``ahead checkpoint`` / ``ahead restart``: 1 when the agent's criu was
    started ahead, else 0."""
    spec = parse_job({"name": "bench", "stage_timeout": "30s", "units": [{
        "name": "counter", "checkpointer": "criu",
        "command": ["sh", "-c", f'exec {binary} 5 "$GRIDCKPT_UNIT_DIR/out" 20']}]}, "bench").to_dict()
    out: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    store = work / f"store-{url.split(':', 1)[0]}{'-spot' if agent_env else ''}"
    async with Embedded(url, store, agent_env) as e:
        job = await e.submit(spec)
        await asyncio.sleep(0.3)
        for i in range(runs):
            raw_first = i % 2 == 1
            if raw_first:
                await asyncio.sleep(SETTLE)
                add("raw dump", await asyncio.to_thread(twin.dump))
            await asyncio.sleep(SETTLE)
            ck = await e.orch.control("checkpoint", {"job": job})
            add("checkpoint total", ck["total_ms"])
            add("checkpoint committed", ck["committed_ms"])
            add("ahead checkpoint", float(bool(ck["units"][0].get("started_ahead"))))
            for stage, ms in ck["stages_ms"].items():
                add(f"checkpoint {stage}", ms)
            if not raw_first:
                await asyncio.sleep(SETTLE)
                add("raw dump", await asyncio.to_thread(twin.dump))
            await asyncio.to_thread(twin.kill)
            e.kill_unit(job, "counter")
            while e.orch.jobs[job].units["counter"].state != "failed":
                await asyncio.sleep(0.005)
            if raw_first:
                await asyncio.sleep(SETTLE)
                add("raw restore", await asyncio.to_thread(twin.restore))
            await asyncio.sleep(SETTLE)
            rs = await e.orch.control("restart", {"job": job, "checkpoint": ck["checkpoint"]})
            add("restart total", rs["total_ms"])
            add("ahead restart", float(bool(rs["units"][0].get("started_ahead"))))
            for stage, ms in rs["stages_ms"].items():
                add(f"restart {stage}", ms)
            if not raw_first:
                await asyncio.sleep(SETTLE)
                add("raw restore", await asyncio.to_thread(twin.restore))
    return out


async def scaling(url: str, counts: list[int], work: Path, command: list[str], runs: int = 5) -> dict[int, list[float]]:
    """Coordinated checkpoint times (``runs`` each) of jobs of N app-level units running ``command``.

    One agent holds a job of each size at once.  Each job is checkpointed ``runs`` times in a
    row, back to back, as a job checkpointed often is: a checkpoint's background work (the
    units' states reported, their spare images dirs made) falls on the next checkpoint of the
    same job, never on another size's (with the sizes taking turns checkpoint by checkpoint,
    one unit's time was mostly measured right after 64 units' and carried their aftermath).
    One more checkpoint before each series, not counted, settles it.  The order of the sizes
    rotates from call to call (``bench`` calls this in rounds)."""
    jobs: dict[int, str] = {}
    times: dict[int, list[float]] = {n: [] for n in counts}
    async with Embedded(url, work / f"store-scale-{Path(command[-1]).name}-{url.split(':', 1)[0]}") as e:
        for n in counts:
            spec = parse_job({"name": f"scale{n}", "stage_timeout": "60s", "units": [
                {"name": f"u{i}", "checkpointer": "app", "command": command}
                for i in range(n)]}, "scale").to_dict()
            jobs[n] = await e.submit(spec)
        await asyncio.sleep(1.0 + sum(counts) * 0.02)  # every program has said HELLO
        for n in counts:
            await e.orch.control("checkpoint", {"job": jobs[n]})  # warm-up
            for _ in range(runs):
                times[n].append((await e.orch.control("checkpoint", {"job": jobs[n]}))["total_ms"])
        for job in jobs.values():
            await e.orch.control("cancel", {"job": job})
    return times


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _extend(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    for key, values in more.items():
        into.setdefault(key, []).extend(values)


async def main_async(args: argparse.Namespace) -> int:
    if not args.scaling_only:
        await table1(args)
    if not args.skip_scaling:
        await table2(args)
    return 0


def fs_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point above it)."""
    best, kind = "", "?"
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


async def table2(args: argparse.Namespace) -> None:
    """The scaling table: Python and C idle programs, with the store on disk and in memory."""
    counts = [int(x) for x in args.units.split(",")]
    stores = [("disk", Path(args.disk_dir))]
    if fs_type(Path("/dev/shm")) == "tmpfs":
        stores.append(("tmpfs", Path("/dev/shm")))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        idle_c = Path(tmp) / "idle_app"
        subprocess.run(["gcc", "-O2", "-o", str(idle_c), str(HERE / "idle_app.c")], check=True)
        programs = [("Python", [sys.executable, str(HERE / "idle_app.py")]), ("C", [str(idle_c)])]
        samples: dict[tuple[str, str], dict[int, list[float]]] = {}
        # in rounds, each measuring every column with an agent of its own: one agent process
        # measured 3.6 ms for one unit where the next measured 4.8, and the ratio moved with it
        for r in range(args.scaling_rounds):
            n = args.scaling_runs // args.scaling_rounds + (1 if r < args.scaling_runs % args.scaling_rounds else 0)
            for where, parent in stores:
                with tempfile.TemporaryDirectory(prefix="bench-scale-store-", dir=parent) as store:
                    for prog, command in programs:
                        turn = counts[r % len(counts):] + counts[:r % len(counts)]
                        measured = await scaling(args.broker, turn, Path(store), command, runs=n)
                        for size, times in measured.items():
                            samples.setdefault((prog, where), {}).setdefault(size, []).extend(times)
            # the baseline, in each round too: one bare CHECKPOINT/DONE round with N C programs
            with tempfile.TemporaryDirectory(prefix="bench-fanout-", dir="/dev/shm") as shm:
                for size, times in (await raw_rounds(idle_c, counts, 20 * n, Path(shm))).items():
                    samples.setdefault(("raw", "round"), {}).setdefault(size, []).extend(times)
    got = {key: {size: med(times) for size, times in by_size.items()} for key, by_size in samples.items()}
    header = ["units (app backend, amqp)"]
    columns = [(prog, where) for where, _ in stores for prog, _ in programs] + [("raw", "round")]
    for prog, where in columns:
        header += [f"{prog}, {where} ms" if prog != "raw" else "bare round (C) ms", "vs 1 unit"]
    rows = [header]
    for n in counts:
        row = [str(n)]
        for key in columns:
            t = got[key]
            row += [f"{t[n]:.2f}" if key[0] == "raw" else f"{t[n]:.1f}", f"{t[n] / t[counts[0]]:.2f}x"]
        rows.append(row)
    print(f"\nTable 2: coordinated checkpoint time by number of units (median of {args.scaling_runs}: each job "
          f"checkpointed in series, back to back, in {args.scaling_rounds} rounds whose order of sizes rotates), idle "
          "programs answering through appclient (idle_app.py) or in C (idle_app.c)")
    print(table(rows))
    print("stores: " + ", ".join(f"{where} = {parent} ({fs_type(parent)})" for where, parent in stores)
          + ".  Each program writes its state file into the store: on disk that file's creation "
          "(10-300 us on a VM disk) is the program's own cost; in memory what is left is the protocol's.")
    print("bare round: no gridckpt, one asyncio loop sends CHECKPOINT to N idle_app.c programs over their "
          "Unix sockets and waits for every DONE (bench_raw_fanout.py; 20 rounds per checkpoint above): "
          "what this machine takes to wake N processes and hear back, once.")


async def table1(args: argparse.Namespace) -> None:
    """Raw CRIU, the backend alone, gridckpt over amqp:// and memory:// with criu started ahead
    (the default), and over amqp:// with criu started on the spot (GRIDCKPT_CRIU_AHEAD=0: what
    the stages themselves add to CRIU)."""
    raw: dict[str, list[float]] = {}
    raw_alone: dict[str, list[float]] = {}
    backend: dict[str, list[float]] = {}
    cols: dict[str, dict[str, list[float]]] = {"amqp": {}, "memory": {}, "amqp, spot": {}}
    runs_of = {"amqp": (args.broker, None), "memory": ("memory://bench", None),
               "amqp, spot": (args.broker, {"GRIDCKPT_CRIU_AHEAD": "0"})}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        work = Path(tmp)
        binary = work / "counter"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "examples" / "counter.c")], check=True)
        twin = RawTwin(find_criu(), binary, work / "twin")
        try:
            # In rounds, each measuring every column: a machine whose speed drifts during the run
            # (a shared VM host) then weighs on the baseline and on gridckpt alike.
            for r in range(args.rounds):
                n = args.runs // args.rounds + (1 if r < args.runs % args.rounds else 0)
                (work / f"r{r}").mkdir()
                alone = await compare(max(2, n // 2), 5)    # the backend alone, and raw CRIU beside it
                _extend(backend, alone["backend"])
                _extend(raw_alone, alone["raw criu"])
                for name, (url, env) in runs_of.items():
                    got = await gridckpt_runs(url, binary, work / f"r{r}", n, twin, env)
                    _extend(raw, {"dump": got.pop("raw dump"), "restore": got.pop("raw restore")})
                    _extend(cols[name], got)
        finally:
            twin.close()
        rdump, rrest = med(raw["dump"]), med(raw["restore"])
        alone = {"checkpoint checkpoint": backend["checkpoint"], "restart rebuild": backend["rebuild"],
                 "restart resume_rst": backend["resume_rst"]}
        names = list(cols)
        rows = [["median ms (5 MiB C program)", "raw criu", "backend alone"] + [f"gridckpt {c}" for c in names]
                + [f"{c} / raw" for c in names]]
        for key in ["checkpoint prepare", "checkpoint stop", "checkpoint checkpoint", "checkpoint resume_cp",
                    "checkpoint total", "checkpoint seal", "checkpoint committed",
                    "restart rebuild", "restart resume_rst", "restart total"]:
            base = rdump if key in ("checkpoint total", "checkpoint committed") else rrest if key == "restart total" else None
            rows.append([key, f"{base:.1f}" if base is not None else "-",
                         f"{med(alone[key]):.1f}" if key in alone else "-"]
                        + [f"{med(cols[c][key]):.1f}" for c in names]
                        + [f"{med(cols[c][key]) / base:.2f}x" if base else "-" for c in names])
        cache = "with" if KDAT.exists() else "without"
        print(f"\nTable 1: checkpoint and restart, {args.runs} runs each in {args.rounds} rounds, {cache} CRIU's kdat cache "
              "(2009: 590 ms / 1,665 ms)")
        print(table(rows))
        print(f"raw criu: {len(raw['dump'])} dumps and restores of the twin, one next to each gridckpt run; "
              f"{SETTLE:g} s of quiet before every timed operation")
        print("criu started ahead by the agent: " + "; ".join(
            f"{c}: {int(sum(cols[c]['ahead checkpoint']))}/{len(cols[c]['ahead checkpoint'])} checkpoints, "
            f"{int(sum(cols[c]['ahead restart']))}/{len(cols[c]['ahead restart'])} restarts" for c in names))
        print(f"raw criu alone in a loop of its own (bench_criu_raw.compare): dump {med(raw_alone['dump']):.1f} ms, "
              f"restore {med(raw_alone['restore']):.1f} ms; the backend alone starts criu on the spot")


KDAT = Path("/run/criu.kdat")


def install_kdat_cache() -> bool:
    """Give CRIU its kernel-feature cache, as on a host whose /run is a tmpfs (systemd).

    CRIU saves /run/criu.kdat only on a tmpfs (so that a reboot drops it), and probes the
    kernel (about 20 ms) on every run without it.  Made here by ``criu check`` in a private
    mount namespace with a tmpfs on /run, then copied to the real /run for the run's
    duration: raw CRIU and gridckpt both load it.  False if one was there already."""
    if KDAT.exists():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "criu.kdat"
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs tmpfs /run && criu check >/dev/null 2>&1; cp /run/criu.kdat {out}"],
                       check=True)
        KDAT.write_bytes(out.read_bytes())
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=None, help="amqp URL (default: the local broker's gridckpt-bench vhost)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3,
                    help="split the runs into this many rounds, each measuring raw CRIU, amqp:// and memory://")
    ap.add_argument("--units", default="1,4,16,64")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-only", action="store_true", help="Table 2 only")
    ap.add_argument("--scaling-runs", type=int, default=24, help="checkpoints per job size in Table 2")
    ap.add_argument("--scaling-rounds", type=int, default=6, help="Table 2's runs split into rounds")
    ap.add_argument("--disk-dir", default="/var/tmp",
                    help="where Table 2's on-disk store goes (default /var/tmp, on disk on Debian)")
    ap.add_argument("--kdat-cache", action="store_true",
                    help="run with CRIU's kernel-feature cache in /run, as a systemd host has it")
    args = ap.parse_args()
    if not 1 <= args.rounds <= args.runs:
        ap.error("--rounds must be between 1 and --runs")
    if not 1 <= args.scaling_rounds <= args.scaling_runs:
        ap.error("--scaling-rounds must be between 1 and --scaling-runs")
    args.broker = bench_broker(args.broker)
    made = install_kdat_cache() if args.kdat_cache else False
    try:
        return asyncio.run(main_async(args))
    finally:
        if made:
            KDAT.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
