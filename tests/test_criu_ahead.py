"""criu started ahead of the stages: its RPC messages, dumps held at the pre-dump point, restore
slots held on their inventory FIFO, and every way back to criu started on the spot."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import signal
import time
import uuid
from pathlib import Path

import pytest

from nodeagent.checkpointers import criu_proto as P
from nodeagent.checkpointers.base import CheckpointError
from nodeagent.checkpointers.criu import CriuCheckpointer
from nodeagent.checkpointers.criu_warm import SETPRIV, DumpSession, RestoreSlot
from nodeagent.stages import SPARE_DIR
from test_criu_backend import FREEZER_ROOT, StandInUnit, binaries, counts, numbers, state, units, wait_for  # noqa: F401
from test_criu_backend import pytestmark as criu_marks


# ------------------------------------------------------------------ the RPC messages (pure)
def test_varints_and_fields_are_protobuf_encoded():
    assert P.varint(0) == b"\x00" and P.varint(1) == b"\x01" and P.varint(300) == b"\xac\x02"
    assert P.varint(-1) == b"\xff" * 9 + b"\x01"          # int32 -1: ten bytes, two's complement
    assert P.field(1, 1) == b"\x08\x01" and P.field(3, True) == b"\x18\x01"
    assert P.field(10, "dump.log") == b"\x52\x08dump.log"


def test_dump_request_round_trips_and_always_names_the_images_dir():
    req = P.decode(P.dump_request(pid=4242, images_dir_fd=7, log_file="d.log", notify_scripts=True,
                                  freeze_cgroup="/sys/fs/cgroup/freezer/x", manage_cgroups_mode=P.CG_IGNORE))
    assert req[1] == [P.DUMP]
    opts = P.decode(req[2][0])
    assert opts[1] == [7] and opts[2] == [4242] and opts[10] == [b"d.log"] and opts[12] == [1]
    assert opts[44] == [b"/sys/fs/cgroup/freezer/x"] and opts[34] == [0]
    bare = P.decode(P.decode(P.dump_request(pid=1))[2][0])
    assert bare[1] == [(1 << 64) - 1]                     # images_dir_fd = -1 (required field)
    with pytest.raises(ValueError, match="no field"):
        P.encode_opts(colour="red")
    with pytest.raises(TypeError):
        P.encode_opts(pid="12")
    assert P.decode(P.notify_answer()) == {1: [P.NOTIFY], 3: [1]}


def test_responses_are_parsed_and_malformed_ones_refused():
    notify = P.field(1, P.NOTIFY) + P.field(2, True) + P.field(5, P.field(1, "pre-dump"))
    r = P.parse_response(notify)
    assert r.is_notify and r.success and r.script == "pre-dump"
    failed = P.field(1, P.DUMP) + P.field(2, False) + P.field(7, -2) + P.field(9, " Can't seize \n")
    r = P.parse_response(failed)
    assert not r.is_notify and not r.success and r.errno == -2 and r.errmsg == "Can't seize"
    unknown_fields = P.field(1, P.DUMP) + P.field(2, True) + P.field(99, b"later") + b"\x7d\x01\x02\x03\x04"
    assert P.parse_response(unknown_fields).success
    for bad in (b"\x08", b"\x08\x01\x12\x05ab", b"\x0b", b"\x00\x01", b"\x08" + b"\xff" * 11,
                P.field(2, True), P.field(1, "notanint") + P.field(2, True)):
        with pytest.raises(P.ProtoError):
            P.parse_response(bad)


# ------------------------------------------------------------------ real CRIU
def with_criu(test):
    """test_criu_backend's marks: root, CRIU and a v1 freezer (never skipped in CI)."""
    for mark in criu_marks:
        test = mark(test)
    return test


class Unit(StandInUnit):
    """A stand-in unit that keeps one freezer cgroup (as an agent's unit does): criu started
    ahead is given that cgroup, and is used only if the checkpoint's is the same."""

    def freeze(self) -> None:
        if self.freezer_path is None:
            path = FREEZER_ROOT / f"gridckpt-test-{uuid.uuid4().hex[:8]}"
            path.mkdir()
            self.freezer_path = str(path)
        for pid in self.pids():      # (a restored tree is born outside it, as in the agent)
            (Path(self.freezer_path) / "cgroup.procs").write_text(str(pid))
        self._set("FROZEN")

    def _set(self, state: str) -> None:
        path = Path(self.freezer_path)
        (path / "freezer.state").write_text(state)
        while (path / "freezer.state").read_text().strip() != state:
            time.sleep(0.002)

    def thaw(self) -> None:
        if self.freezer_path:
            self._set("THAWED")

    async def kill(self, ckpt: CriuCheckpointer | None = None) -> None:
        await super().kill(ckpt)
        super().thaw()          # the cgroup goes too


def _backend(tmp_path: Path, **kw) -> CriuCheckpointer:
    return CriuCheckpointer(work_dir=tmp_path / "work", ahead=True, **kw)


async def _started(tmp_path: Path, ckpt: CriuCheckpointer, binaries, units, name: str = "c") -> Unit:
    unit = Unit("job1", name, tmp_path / name)
    units.append((unit, ckpt))
    await unit.start(ckpt, [str(binaries["counter"]), "5", str(unit.unit_dir / "counter.out"), "20"])
    await wait_for(lambda: len(counts(unit.stdout)) >= 3, what="counter output")
    unit.freeze()       # into its cgroup, for good
    unit.thaw()
    (unit.unit_dir / SPARE_DIR).mkdir()
    return unit


def _alive(pid: int) -> bool:
    try:
        return state(pid) != "Z"
    except OSError:
        return False


async def _ready(ckpt: CriuCheckpointer, unit: StandInUnit, slots: int = 1) -> None:
    await ckpt.ready_next(unit, unit.unit_dir / SPARE_DIR)
    await wait_for(lambda: ckpt._sessions[(unit.job, unit.name)].waiting, 10, "criu at its pre-dump point")
    assert len(ckpt._slots) == slots


async def _checkpoint(ckpt: CriuCheckpointer, unit: StandInUnit, images: Path) -> bool:
    unit.freeze()
    try:
        await ckpt.checkpoint(unit, images)
    finally:
        unit.thaw()
    return ckpt.stage_note(unit)["started_ahead"]


async def _unit_with_criu_ahead(tmp_path: Path, binaries, units) -> tuple[CriuCheckpointer, Unit, DumpSession]:
    ckpt = _backend(tmp_path)
    unit = await _started(tmp_path, ckpt, binaries, units)
    await _ready(ckpt, unit)
    return ckpt, unit, ckpt._sessions[(unit.job, unit.name)]


@with_criu
async def test_dump_and_restore_started_ahead(tmp_path, binaries, units):
    ckpt, unit, session = await _unit_with_criu_ahead(tmp_path, binaries, units)
    images = unit.unit_dir / "1"
    os.rename(unit.unit_dir / SPARE_DIR, images)      # what prepare does: the open dir follows
    unit.freeze()
    at_ckpt = counts(unit.stdout)[-1][0]
    t0 = time.monotonic()
    await ckpt.checkpoint(unit, images)
    unit.thaw()
    assert ckpt.stage_note(unit) == {"started_ahead": True}
    assert (images / "inventory.img").is_file() and list(images.glob("pages-*.img"))
    meta = json.loads((images / "gridckpt-criu.json").read_text())
    assert sorted(f["path"] for f in meta["files"]) == sorted(     # the tree's own, never criu's log
        str(unit.unit_dir / n) for n in ("counter.out", "stderr", "stdout"))
    await wait_for(lambda: not session.proc.alive, 5, "criu exits after its answer")
    await asyncio.sleep(0.2)        # (the session's log is renamed in the background)
    assert [p.name for p in (tmp_path / "work").glob("dump-*.log")] == ["dump-job1-c.log"]
    assert time.monotonic() - t0 < 5
    await wait_for(lambda: counts(unit.stdout)[-1][0] >= at_ckpt + 3, what="progress after checkpoint")
    await unit.kill()

    slot = ckpt._slots[0]
    await wait_for(lambda: slot.proc.alive and (slot.dir / "inventory.img").exists(), 5, "a restore slot")
    await ckpt.rebuild(unit, images)
    assert ckpt.stage_note(unit) == {"started_ahead": True}
    root = unit.root_pid
    assert root != slot.proc.pid and state(root) == "T" and os.getppid() != root
    await wait_for(lambda: not slot.dir.exists() and (tmp_path / "work" / "restore-job1-c.log").is_file(), 2,
                   "the slot's placeholder removed, its log kept")
    assert counts(unit.stdout)[-1][0] == at_ckpt                         # stdout rolled back
    await ckpt.resume_rst(unit)
    await wait_for(lambda: counts(unit.stdout)[-1][0] >= at_ckpt + 3, what="progress after restart")
    after = counts(unit.stdout)
    assert [n for n, _ in after] == list(range(1, len(after) + 1))       # continued, not restarted
    assert all(s == 256 * 5 * (n % 256) for n, s in after)
    assert numbers(unit.unit_dir / "counter.out") == list(range(1, len(numbers(unit.unit_dir / "counter.out")) + 1))

    # the restored tree (a new root) gets its own criu ahead, and so does the next restart
    unit.freeze()       # into a cgroup of its own, as the agent moves a restored tree
    unit.thaw()
    (unit.unit_dir / SPARE_DIR).mkdir()
    await _ready(ckpt, unit)
    images2 = unit.unit_dir / "2"
    os.rename(unit.unit_dir / SPARE_DIR, images2)
    assert await _checkpoint(ckpt, unit, images2)
    await unit.kill(ckpt)
    await ckpt.rebuild(unit, images2)
    assert ckpt.stage_note(unit) == {"started_ahead": True}
    await ckpt.resume_rst(unit)
    await wait_for(lambda: counts(unit.stdout)[-1][0] > at_ckpt + 3, what="progress after 2nd restart")
    await ckpt.close()


@with_criu
async def test_what_does_not_fit_or_died_is_replaced_by_criu_started_now(tmp_path, binaries, units):
    ckpt, unit, session = await _unit_with_criu_ahead(tmp_path, binaries, units)
    # another images dir than the spare criu holds: not that criu's
    assert not await _checkpoint(ckpt, unit, unit.unit_dir / "elsewhere")
    assert (unit.unit_dir / "elsewhere" / "inventory.img").is_file()
    await wait_for(lambda: not session.proc.alive, 5, "the unfit criu ended")

    # criu ahead killed while it waited: the checkpoint still succeeds, on the spot
    await _ready(ckpt, unit)
    session = ckpt._sessions[(unit.job, unit.name)]
    os.kill(session.proc.pid, signal.SIGKILL)
    images = unit.unit_dir / "1"
    os.rename(unit.unit_dir / SPARE_DIR, images)
    assert not await _checkpoint(ckpt, unit, images)
    await unit.kill()

    # a restore slot whose criu died: a plain restore serves
    dead = ckpt._slots[0]
    os.kill(dead.proc.pid, signal.SIGKILL)
    await ckpt.rebuild(unit, images)
    assert ckpt.stage_note(unit) == {"started_ahead": False}
    assert not dead.dir.exists() and not dead.pidfile.exists()
    await ckpt.resume_rst(unit)
    await wait_for(lambda: _alive(unit.root_pid) and state(unit.root_pid) != "T", 5, "the restored tree runs")
    await ckpt.close()


@with_criu
async def test_a_slot_failing_after_release_falls_back_and_turns_slots_off(tmp_path, binaries, units, caplog):
    ckpt, unit, _ = await _unit_with_criu_ahead(tmp_path, binaries, units)
    images = unit.unit_dir / "1"
    os.rename(unit.unit_dir / SPARE_DIR, images)
    assert await _checkpoint(ckpt, unit, images)
    await unit.kill()
    slot = ckpt._slots[0]

    async def broken(images: Path, what: str, timeout: float = 60.0) -> int:
        slot.released = True
        raise CheckpointError(f"{what} failed: a slot-only failure")

    slot.restore = broken        # a failure only the slot path meets (the logic under test)
    await ckpt.rebuild(unit, images)
    assert ckpt.stage_note(unit) == {"started_ahead": False}
    assert ckpt.warm_restores == 0 and not ckpt._slots
    assert "restore slots turned off" in caplog.text
    await ckpt.resume_rst(unit)
    await ckpt.ready_next(unit, unit.unit_dir / SPARE_DIR)
    assert not ckpt._slots                                 # stays off
    await ckpt.close()


@with_criu
async def test_unit_end_and_close_end_every_criu_started_ahead(tmp_path, binaries, units):
    ckpt = _backend(tmp_path, warm_restores=2)
    a = await _started(tmp_path, ckpt, binaries, units, "a")
    b = await _started(tmp_path, ckpt, binaries, units, "b")
    await _ready(ckpt, a, slots=1)
    await _ready(ckpt, b, slots=2)                         # one slot per unit served, at most 2
    sa, sb = ckpt._sessions[("job1", "a")], ckpt._sessions[("job1", "b")]
    slots = list(ckpt._slots)
    await a.kill()
    ckpt.unit_ended(a)
    await wait_for(lambda: not sa.proc.alive, 5, "a's criu ended")
    assert sb.proc.alive and all(s.proc.alive for s in slots)
    await ckpt.close()
    await wait_for(lambda: not sb.proc.alive and not any(s.proc.alive for s in slots), 5, "every criu ended")
    assert not [p for p in ckpt._scratch.glob("warm-restore-*") if any(p.name.startswith(s.name) for s in slots)]
    assert not ckpt._sessions and not ckpt._slots


@with_criu
# setpriv is in util-linux, essential on Debian: only a machine without it skips (never CI)
@pytest.mark.skipif(SETPRIV is None and not os.environ.get("CI"),
                    reason="setpriv (util-linux) missing: restore slots are off on such a machine")
async def test_a_restore_slot_dies_with_its_agent(tmp_path):
    """A slot's criu blocks on its FIFO, where a closed connection would not reach it: it runs
    under --pdeathsig, so a killed agent leaves no criu behind; the next agent's sweep removes
    its placeholder."""
    script = tmp_path / "agent.py"
    script.write_text(f"""
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from nodeagent.checkpointers.criu_cli import CriuRunner
from nodeagent.checkpointers.criu_warm import RestoreSlot
async def main():
    slot = RestoreSlot(CriuRunner(work_dir={str(tmp_path / 'work')!r}), ["--leave-stopped"], Path({str(tmp_path)!r}))
    slot.start()
    print(slot.proc.pid, slot.dir, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE)
    pid, placeholder = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().split()
    pid = int(pid)
    await wait_for(lambda: _naming(placeholder), 5, "criu in the slot")
    await asyncio.sleep(1.0)      # past its set-up (a criu killed in it leaves a helper asleep)
    proc.kill()
    await proc.wait()
    await wait_for(lambda: not _alive(pid) and not _naming(placeholder), 5, "the slot's criu gone with its agent")
    from nodeagent.checkpointers.criu_warm import sweep_scratch
    assert Path(placeholder).is_dir() and sweep_scratch(tmp_path) == 1 and not Path(placeholder).exists()


def _naming(path: str) -> list[int]:
    """Live processes whose command line names ``path``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if path.encode() in Path(f"/proc/{entry}/cmdline").read_bytes() and _alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _criu_swrk() -> set[int]:
    """Live ``criu swrk`` processes (a session's criu, or a helper it forked)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if len(args) > 1 and args[0].endswith(b"criu") and args[1] == b"swrk" and _alive(int(entry)):
                    found.add(int(entry))
            except OSError:
                pass
    return found


@with_criu
async def test_criu_dropped_while_it_sets_up_leaves_nothing_behind(tmp_path):
    """A session or slot dropped right after it started (its criu probing the kernel): criu is
    not killed there but ends by itself, since a criu killed while kerndat_init's ptrace helper
    lives leaves that helper asleep for good (seen: four of them after a benchmark)."""
    from nodeagent.checkpointers.criu_warm import DumpSession, open_dir
    ckpt = _backend(tmp_path)
    before = _criu_swrk()
    (tmp_path / "spare").mkdir()
    for delay in (0.002, 0.008, 0.015, 0.025, 0.04):    # at various points of criu's set-up
        dirfd, dir_id = open_dir(tmp_path / "spare")
        session = DumpSession(ckpt.runner, root=os.getpid(), images=str(tmp_path / "spare"), dirfd=dirfd,
                              dir_id=dir_id, log_name="s.log", final_log="f.log", freeze_cgroup=None, common={})
        session.start()
        slot = RestoreSlot(ckpt.runner, ["--leave-stopped"], tmp_path)
        slot.start()
        await asyncio.sleep(delay)
        session.close()
        slot.finish()
        codes = await asyncio.wait_for(asyncio.gather(session.proc.wait(), slot.proc.wait()), 10)
        assert -signal.SIGKILL not in codes, f"criu was killed while it set up (exit codes {codes})"
        assert not _naming(str(slot.dir))
    await asyncio.sleep(0.3)
    assert _criu_swrk() <= before, "a criu helper was left behind"
    await ckpt.close()


def test_restore_slot_needs_setpriv(tmp_path, monkeypatch):
    import nodeagent.checkpointers.criu_warm as warm
    monkeypatch.setattr(warm, "SETPRIV", None)

    class Runner:
        work_dir = tmp_path
    with pytest.raises(OSError, match="setpriv"):
        RestoreSlot(Runner(), []).start()      # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_placeholders_of_gone_agents_are_swept(tmp_path):
    from nodeagent.checkpointers.criu_warm import sweep_scratch
    gone = 2 ** 22 + 7      # above any pid_max default: no such process
    (tmp_path / f"warm-restore-{gone}-0a1b2c3d").mkdir()
    (tmp_path / f"warm-restore-{gone}-0a1b2c3d" / "inventory.img").write_text("x")
    (tmp_path / f"warm-restore-{gone}-0a1b2c3d.pid").write_text("1")
    (tmp_path / f"warm-restore-{os.getpid()}-00000000").mkdir()     # a live agent's: kept
    (tmp_path / "something-else").mkdir()
    assert sweep_scratch(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something-else", f"warm-restore-{os.getpid()}-00000000"]


def test_the_scan_leaves_out_what_is_not_the_trees_own(tmp_path):
    """A scan beside a dump sees the log CRIU's parasite holds inside the tree: left out."""
    from nodeagent.checkpointers.criu_inspect import Sha256Cache, inspect_tree
    (tmp_path / "criu").mkdir()
    code = ("import sys, time; a = open(sys.argv[1], 'a'); b = open(sys.argv[2], 'a'); "
            "print('ready', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out"), str(tmp_path / "criu" / "dump.log")],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        every = inspect_tree(proc.pid, Sha256Cache())
        own = inspect_tree(proc.pid, Sha256Cache(), (str(tmp_path / "criu") + "/",))
        assert {str(tmp_path / "out"), str(tmp_path / "criu" / "dump.log")} <= set(every.files)
        assert str(tmp_path / "out") in own.files and str(tmp_path / "criu" / "dump.log") not in own.files
    finally:
        proc.kill()
        proc.wait()
