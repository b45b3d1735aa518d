"""Raw CRIU vs the CRIU backend: checkpoint and restart of one C process with 5 MB of memory.

    python bench/bench_criu_raw.py [--runs 10] [--megabytes 5]

(a) raw ``criu dump`` / ``criu restore`` on the command line (the baseline) and (b) the same
through CriuCheckpointer (its checkpoint stage; rebuild + resume_rst), median of ``--runs``.
Both dump the same program (examples/counter.c) started as the backend starts units (its own
PID namespace) and frozen in a cgroup v1 freezer first, as the agent's stop stage does; both
restore with ``--restore-sibling`` so the restored tree outlives criu, and both leave cgroups
to the caller (``--manage-cgroups=ignore``: a restored tree must not land in a frozen cgroup).  Times are wall clock
around the whole call, criu's fork/exec included.

Raw and backend runs alternate on the same process so that both see the same machine load.
Each dump has a freeze cycle of its own (freeze, dump, thaw), as each checkpoint has in use,
and which of the two goes first alternates run by run, restores too: a second dump of a tree
that stays frozen is 2-3 ms faster than the first (measured), and an earlier version that
always dumped raw second flattered the baseline by that much.
Importable: ``compare(runs, megabytes)`` returns {column: {stage: [ms per run]}}; the single
measurements (``raw_dump``, ``raw_restore``, ``backend_checkpoint``, ``backend_restart``), the
``BenchUnit`` launcher and ``table(results)`` can be reused to add columns.  Needs root,
CRIU 4.x and gcc.
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodeagent.checkpointers.criu import CriuCheckpointer  # noqa: E402
from nodeagent.checkpointers.criu_cli import find_criu  # noqa: E402
from nodeagent.checkpointers.criu_inspect import ns_pids, tree_pids  # noqa: E402

FREEZER = Path("/sys/fs/cgroup/freezer")


@dataclass
class BenchUnit:
    """The bits of a unit the backend needs (base.UnitProcess), plus start/freeze/kill."""

    job: str
    name: str
    unit_dir: Path
    spec: dict[str, Any] = field(default_factory=dict)
    root_pid: int | None = None
    freezer_path: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def pids(self) -> list[int]:
        return tree_pids(self.root_pid) if self.root_pid else []

    def start(self, argv: list[str]) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        with open(self.unit_dir / "stdout", "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=self.unit_dir,
                                         start_new_session=True)
        self.root_pid = self.proc.pid
        deadline = time.monotonic() + 5
        while len(self.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)

    def init_pid(self) -> int:
        return next(p for p in self.pids() if ns_pids(p)[-1] == 1)

    def freeze(self) -> None:
        path = FREEZER / f"gridckpt-bench-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        self.freezer_path = str(path)
        for pid in self.pids():
            (path / "cgroup.procs").write_text(str(pid))
        (path / "freezer.state").write_text("FROZEN")
        while (path / "freezer.state").read_text().strip() != "FROZEN":
            time.sleep(0.001)

    def thaw(self) -> None:
        if self.freezer_path:
            path = Path(self.freezer_path)
            (path / "freezer.state").write_text("THAWED")
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    (FREEZER / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            path.rmdir()
            self.freezer_path = None

    def kill_launched(self) -> None:
        self.thaw()
        os.kill(self.init_pid(), signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(5)
        self.proc = None


def build_counter(workdir: Path) -> Path:
    binary = workdir / "counter"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "examples" / "counter.c")], check=True)
    return binary


def _wait_output(unit: BenchUnit) -> None:
    deadline = time.monotonic() + 5
    while (unit.unit_dir / "stdout").read_text().count("count ") < 3:
        if time.monotonic() > deadline:
            raise RuntimeError("the counter does not run")
        time.sleep(0.01)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def run_criu(argv: list[str]) -> float:
    """Run criu as the baseline does: posix_spawn and wait, the leanest launch there is (the
    backend launches it the same way; subprocess.run costs more); ms, fork to exit."""
    t = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    ms = _ms(t)
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), argv)
    return ms


def raw_dump(criu: str, unit: BenchUnit, images: Path, work: Path) -> tuple[float, dict[Path, int]]:
    """One raw ``criu dump`` of the frozen unit; (ms, sizes of its output files)."""
    images.mkdir()
    sizes = {p: p.stat().st_size for p in (unit.unit_dir / "stdout", unit.unit_dir / "out")}
    ms = run_criu([criu, "dump", "-t", str(unit.init_pid()), "-D", str(images), "--leave-running",
                   "--freeze-cgroup", str(unit.freezer_path), "--manage-cgroups=ignore",
                   "-W", str(work), "-o", "dump.log"])
    return ms, sizes


def raw_restore(criu: str, images: Path, sizes: dict[Path, int], work: Path) -> float:
    """One raw ``criu restore`` (output files cut back first, untimed); the tree is then killed."""
    for path, size in sizes.items():
        os.truncate(path, size)
    pidfile = work / "restored.pid"
    ms = run_criu([criu, "restore", "-D", str(images), "--restore-detached", "--restore-sibling",
                   "--manage-cgroups=ignore", "--pidfile", str(pidfile), "-W", str(work),
                   "-o", "restore.log"])
    pid = int(pidfile.read_text())
    pidfile.unlink()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return ms


async def backend_checkpoint(ckpt: CriuCheckpointer, unit: BenchUnit, images: Path) -> float:
    """The backend's checkpoint stage on the frozen unit, in ms."""
    t = time.perf_counter()
    await ckpt.checkpoint(unit, images)
    return _ms(t)


async def backend_restart(ckpt: CriuCheckpointer, unit: BenchUnit, images: Path) -> tuple[float, float]:
    """rebuild and resume_rst (ms each); the restored tree is then killed."""
    t = time.perf_counter()
    await ckpt.rebuild(unit, images)
    t1 = time.perf_counter()
    await ckpt.resume_rst(unit)
    t2 = time.perf_counter()
    pid = unit.root_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await ckpt.wait_exit(pid)
    return (t1 - t) * 1000, (t2 - t1) * 1000


class RawTwin:
    """Raw CRIU doing what a gridckpt checkpoint and restart do, on a twin of the unit: a
    counter of its own in a freezer cgroup of its own (kept, as a unit's is), frozen, dumped
    (timed) and thawed; killed; restored from that dump (timed: ``criu restore``, the tree
    running again, as after resume_rst) and moved back into its cgroup (untimed), and so on.
    bench_checkpoint.py runs one cycle of it next to each gridckpt cycle, in alternating order,
    so that the baseline sees the same moment of the machine and the same history (a tree that
    was restored before, files that grew since the dump, a kill just before)."""

    def __init__(self, criu: str, binary: Path, work: Path, megabytes: int = 5) -> None:
        self.criu, self.work = criu, work
        self.unit = BenchUnit("bench", "twin", work / "twin")
        launch = CriuCheckpointer(work_dir=work / "twin-criu").plan_launch(
            self.unit, [str(binary), str(megabytes), str(self.unit.unit_dir / "out"), "20"])
        self.unit.start(launch.argv)
        _wait_output(self.unit)
        self.root = self.unit.init_pid()    # what is dumped: the PID namespace's init
        self.restored = False               # then it is our child (--restore-sibling)
        self.cgroup = FREEZER / f"gridckpt-bench-twin-{uuid.uuid4().hex[:8]}"
        self.cgroup.mkdir()
        self.unit.freezer_path = str(self.cgroup)
        self._move_in()
        self.n = 0
        self.images: Path | None = None
        self.sizes: dict[Path, int] = {}

    def _move_in(self) -> None:
        self.unit.root_pid = self.root
        for pid in self.unit.pids():
            (self.cgroup / "cgroup.procs").write_text(str(pid))

    def _state(self, state: str) -> None:
        (self.cgroup / "freezer.state").write_text(state)
        while (self.cgroup / "freezer.state").read_text().strip() != state:
            time.sleep(0.001)

    def dump(self) -> float:
        """Freeze (untimed, as the stop stage), ``criu dump`` (timed), thaw; ms."""
        self.n += 1
        self._state("FROZEN")
        self.unit.root_pid = self.root
        ms, self.sizes = raw_dump(self.criu, self.unit, self.work / f"twin-{self.n}", self.work)
        self.images = self.work / f"twin-{self.n}"
        self._state("THAWED")
        return ms

    def kill(self) -> None:
        """kill -9, and wait until the tree is gone."""
        os.kill(self.root, signal.SIGKILL)
        if self.restored:
            os.waitpid(self.root, 0)
        else:
            assert self.unit.proc is not None
            self.unit.proc.wait(5)

    def restore(self) -> float:
        """``criu restore`` of the last dump (timed), the tree running again; ms."""
        assert self.images is not None, "dump first"
        for path, size in self.sizes.items():
            os.truncate(path, size)
        pidfile = self.work / "twin.pid"
        pidfile.unlink(missing_ok=True)
        ms = run_criu([self.criu, "restore", "-D", str(self.images), "--restore-detached", "--restore-sibling",
                       "--manage-cgroups=ignore", "--pidfile", str(pidfile), "-W", str(self.work),
                       "-o", "twin-restore.log"])
        self.root, self.restored = int(pidfile.read_text()), True
        self._move_in()
        return ms

    def close(self) -> None:
        try:
            self.kill()
        except (ProcessLookupError, ChildProcessError):
            pass
        for _ in range(100):
            try:
                self.cgroup.rmdir()
                return
            except OSError:
                time.sleep(0.01)


async def compare(runs: int = 10, megabytes: int = 5) -> dict[str, dict[str, list[float]]]:
    """Raw CLI and backend, interleaved run by run on one process (same load for both)."""
    criu = find_criu()
    raw: dict[str, list[float]] = {"dump": [], "restore": []}
    ours: dict[str, list[float]] = {"checkpoint": [], "rebuild": [], "resume_rst": [], "restart": []}
    with tempfile.TemporaryDirectory(prefix="bench-criu-") as tmp:
        work = Path(tmp)
        binary = build_counter(work)
        ckpt = CriuCheckpointer(work_dir=work / "criu")
        unit = BenchUnit("bench", "counter", work / "unit")
        unit.start(ckpt.plan_launch(unit, [str(binary), str(megabytes), str(unit.unit_dir / "out"), "20"]).argv)
        try:
            _wait_output(unit)
            await ckpt.prepare(unit, work / "unused")     # the prepare stage: CPU description
            for i in range(runs):
                for raw_turn in ((False, True) if i % 2 == 0 else (True, False)):
                    unit.freeze()
                    if raw_turn:
                        ms, sizes = raw_dump(criu, unit, work / f"raw{i}", work)
                        raw["dump"].append(ms)
                    else:
                        ours["checkpoint"].append(await backend_checkpoint(ckpt, unit, work / f"ours{i}"))
                    unit.thaw()
                    await asyncio.sleep(0.03)
            # The images restored below: the backend's first, then raw's, so that each
            # restore's cut-back (raw: to its sizes, growing a shorter file back; backend: to
            # its own, older sizes) leaves the files as the other expects.
            for raw_turn in (False, True):
                unit.freeze()
                if raw_turn:
                    _, sizes = raw_dump(criu, unit, work / "raw-restored", work)
                else:
                    await backend_checkpoint(ckpt, unit, work / "ours-restored")
                unit.thaw()
        finally:
            unit.kill_launched()
        for i in range(runs):
            if i % 2 == 0:
                raw["restore"].append(raw_restore(criu, work / "raw-restored", sizes, work))
            rebuild, resume = await backend_restart(ckpt, unit, work / "ours-restored")
            if i % 2 == 1:
                raw["restore"].append(raw_restore(criu, work / "raw-restored", sizes, work))
            ours["rebuild"].append(rebuild)
            ours["resume_rst"].append(resume)
            ours["restart"].append(rebuild + resume)
    return {"raw criu": raw, "backend": ours}


def table(results: dict[str, dict[str, list[float]]]) -> str:
    """Median / min / max per (column, stage), one row each."""
    rows = [f"{'what':<10} {'stage':<12} {'median ms':>10} {'min':>8} {'max':>8} {'runs':>5}"]
    for what, stages in results.items():
        for stage, values in stages.items():
            rows.append(f"{what:<10} {stage:<12} {statistics.median(values):>10.1f} "
                        f"{min(values):>8.1f} {max(values):>8.1f} {len(values):>5}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=5)
    args = parser.parse_args()
    if args.runs < 1 or args.megabytes < 0:
        parser.error("--runs must be >= 1 and --megabytes >= 0")
    results = asyncio.run(compare(args.runs, args.megabytes))
    raw, ours = results["raw criu"], results["backend"]
    print(table(results))
    dump, restore = statistics.median(raw["dump"]), statistics.median(raw["restore"])
    print(f"\ncheckpoint stage / raw dump: {statistics.median(ours['checkpoint']) / dump:.2f}x"
          f"   restart (rebuild+resume_rst) / raw restore: {statistics.median(ours['restart']) / restore:.2f}x")


if __name__ == "__main__":
    main()
