"""Helpers for the shim tests: build the C test programs, run units under the shim,
and compare what the programs counted with what the shim recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import interpose
from interpose.control import ControlPage
from interpose.reader import Record, merge_ranges, read_directory

PROGS = Path(__file__).resolve().parent
PYPROG = PROGS / "pyprog.py"
TIMEOUT = 30


def asan_preload() -> str:
    """LD_PRELOAD for the shim's AddressSanitizer build (libasan first).  Without libasan the
    test is skipped, except on CI: deploy/test.sh installs gcc with it, so there it fails."""
    import pytest
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        if os.environ.get("CI"):
            pytest.fail("gcc has no AddressSanitizer runtime (libasan) on this CI machine")
        pytest.skip("gcc has no AddressSanitizer runtime (libasan) on this machine")
    return f"{os.path.realpath(libasan)}:{interpose.asan_library_path()}"


def build_c(src: Path, out: Path, extra: tuple[str, ...] = ()) -> Path:
    """Compile a test program (fortified, so __recv_chk/__read_chk are exercised)."""
    cmd = ["gcc", "-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Wextra", "-Werror", *extra, "-o", str(out),
           str(src), "-pthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@dataclass
class Unit:
    """One unit: a log directory and a control page of its own."""

    name: str
    root: Path
    preload: str | None = None  # LD_PRELOAD override (ASan runs)
    procs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.root / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.control = self.dir / "control"
        ControlPage(self.control).close()

    def env(self, extra: dict | None = None) -> dict[str, str]:
        env = interpose.shim_env(self.name, self.dir, self.control)
        if self.preload:
            env["LD_PRELOAD"] = self.preload
        env.update(extra or {})
        return env

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=self.env(kw.pop("env", None)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def records(self) -> list[Record]:
        return read_directory(self.dir)


def start_server(unit: Unit, cmd: list[str]) -> tuple[subprocess.Popen, int]:
    """Start a server that prints 'PORT n' first; return it and its port."""
    p = unit.popen(cmd)
    line = p.stdout.readline()
    if not line.startswith("PORT "):
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"server did not start: {line!r} {err}")
    return p, int(line.split()[1])


def finish(p: subprocess.Popen) -> list[dict]:
    """Wait for a program, check it succeeded, return its JSON lines (connections)."""
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"program timed out: {p.args} {err}")
    assert p.returncode == 0, f"{p.args} failed with {p.returncode}: {err}"
    assert "ERROR: AddressSanitizer" not in err, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def kill_all(*units: Unit) -> None:
    for u in units:
        for p in u.procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def conns_of(lines: list[dict]) -> list[dict]:
    return [l for l in lines if "local" in l]


def check_unit(unit: Unit, lines: list[dict]) -> dict[str, dict[str, int]]:
    """The unit's records must match its programs' own counts exactly.

    Every connection line {"local", "peer", "sent", "recv"} of the programs is matched,
    in order, to the generations of its address pair: the i-th connection on a pair is
    generation i.  Each direction's records must cover [0, total) exactly once, all in
    interval 0.  Returns {conn id: {"send": n, "recv": n}} for comparing the two ends.
    """
    recs = unit.records()
    groups = merge_ranges(recs)
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"send": 0, "recv": 0})
    for (conn, direction, interval), ranges in groups.items():
        assert interval == 0, (conn, interval)
        assert ranges == [(0, ranges[-1][1])], f"{unit.name}: {conn} {direction} not contiguous: {ranges[:5]}"
        totals[conn][direction] = ranges[-1][1]
    # no byte recorded twice: the raw record lengths add up to the merged totals
    raw: dict[tuple[str, str], int] = defaultdict(int)
    for r in recs:
        raw[(r.conn, r.direction)] += r.end - r.start
    for (conn, direction), n in raw.items():
        assert n == totals[conn][direction], f"{unit.name}: {conn} {direction}: {n} bytes in records, overlap"
    expected: dict[str, dict[str, int]] = defaultdict(lambda: {"send": 0, "recv": 0})
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for l in conns_of(lines):
        pair = (l["local"], l["peer"])
        if l.get("continued"):  # same connection, continued by another program (exec)
            gen = seen[pair] - 1
        else:
            gen = seen[pair]
            seen[pair] += 1
        if l["sent"]:
            expected[f"{l['local']}>{l['peer']}#{gen}"]["send"] += l["sent"]
        if l["recv"]:
            expected[f"{l['peer']}>{l['local']}#{gen}"]["recv"] += l["recv"]
    got = {c: dict(v) for c, v in totals.items()}
    assert got == {c: dict(v) for c, v in expected.items()}, f"{unit.name}: records {got} != programs {dict(expected)}"
    return got


def check_ends_agree(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> None:
    """What one end sent on a conn id, the other received on the same id, and vice versa."""
    sends_a = {c: v["send"] for c, v in a.items() if v["send"]}
    recvs_b = {c: v["recv"] for c, v in b.items() if v["recv"]}
    sends_b = {c: v["send"] for c, v in b.items() if v["send"]}
    recvs_a = {c: v["recv"] for c, v in a.items() if v["recv"]}
    assert sends_a == recvs_b, f"a->b: {sends_a} != {recvs_b}"
    assert sends_b == recvs_a, f"b->a: {sends_b} != {recvs_a}"


def python() -> str:
    return sys.executable
