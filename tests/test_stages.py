"""UnitStageRunner: idempotent stages under redelivery, failures, verification on rebuild."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from nodeagent.checkpointers import registry
from nodeagent.checkpointers.app import AppCheckpointer
from nodeagent.checkpointers.base import CheckpointError, RestoreRefused
from nodeagent.stages import UnitStageRunner
from nodeagent.freezer import alive_pids, tree_pids
from nodeagent.units import Unit
from orchestrator.store import Store

ROOT = Path(__file__).resolve().parents[1]
COUNTER = str(ROOT / "examples" / "counter_app.py")
PY = sys.executable


def stdout(u: Unit) -> str:
    return (u.unit_dir / "stdout").read_text()


def counts(u: Unit) -> list[int]:
    return [int(m) for m in re.findall(r"^count (\d+)$", stdout(u), re.M)]


async def wait_for(pred, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def env(tmp_path):
    store = Store(tmp_path / "store")
    backend = AppCheckpointer(timeout=5.0, connect_timeout=10.0)
    runner = UnitStageRunner(store, node="n1", backends={"app": backend}, callback_timeout=5.0)
    units: list[Unit] = []

    async def start(name: str, **spec) -> Unit:
        command = [PY, COUNTER, "--interval", "0.01"]
        u = Unit("job1", name, {"command": command, "checkpointer": "app", **spec},
                 store.unit_dir("job1", name), cwd=ROOT)
        units.append(u)
        await u.launch(backend.plan_launch(u, command))
        await wait_for(lambda: len(counts(u)) >= 2)
        return u

    yield store, runner, start
    for u in units:
        await u.close()
        await runner.release(u)


async def test_redelivered_stages_run_once(env):
    store, runner, start = env
    u = await start("a")
    first = await runner.run(u, "prepare", "ck1", 1)
    again = await runner.run(u, "prepare", "ck1", 1)
    assert again == first
    # duplicates arriving together: one execution, the same answer
    a, b = await asyncio.gather(runner.run(u, "stop", "ck1", 1), runner.run(u, "stop", "ck1", 1))
    assert a == b and u.state == "stopped"
    c1 = await runner.run(u, "checkpoint", "ck1", 1)
    manifest_mtime = (store.images_dir("job1", "a", 1) / "manifest.json").stat().st_mtime_ns
    assert await runner.run(u, "checkpoint", "ck1", 1) == c1
    assert (store.images_dir("job1", "a", 1) / "manifest.json").stat().st_mtime_ns == manifest_mtime
    await runner.run(u, "resume_cp", "ck1", 1)
    await runner.run(u, "resume_cp", "ck1", 1)
    await wait_for(lambda: stdout(u).count("post_checkpoint ck1") == 1 and len(counts(u)) > 10)
    assert stdout(u).count("checkpoint count") == 1, "the program saved twice"
    assert stdout(u).count("post_checkpoint ck1") == 1
    # a second checkpoint is a new id: it does run
    await runner.run(u, "prepare", "ck2", 2)
    assert stdout(u).count("checkpoint count") == 2
    await runner.run(u, "abort", "ck2", 2)


async def test_seal_later_resumes_before_the_manifest(env):
    store, runner, start = env
    u = await start("a")
    images = store.images_dir("job1", "a", 1)
    args = {"seal_later": True}
    for stage in ("prepare", "stop", "checkpoint"):
        await runner.run(u, stage, "ck1", 1, args)
    assert not (images / "manifest.json").exists()
    await runner.run(u, "resume_cp", "ck1", 1, args)
    n = len(counts(u))
    await wait_for(lambda: len(counts(u)) > n + 3)   # it runs while its images are not sealed yet
    sealed = await runner.run(u, "seal", "ck1", 1, args)
    manifest = store.images_dir("job1", "a", 1) / "manifest.json"
    assert manifest.is_file() and sealed["data"]["bytes"] > 0 and sealed["data"]["files"] >= 1
    assert await runner.run(u, "seal", "ck1", 1, args) == sealed   # redelivered: not sealed twice
    # sealing a checkpoint this agent never wrote is refused with a reason
    with pytest.raises(CheckpointError, match="no unsealed images"):
        await runner.run(u, "seal", "ck9", 9, args)
    # a checkpoint abandoned after its units resumed: images gone, unit untouched
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck2", 2, args)
    assert store.images_dir("job1", "a", 2).is_dir()
    await runner.run(u, "abort", "ck2", 2, args)
    assert not store.images_dir("job1", "a", 2).exists() and u.state == "running"
    n = len(counts(u))
    await wait_for(lambda: len(counts(u)) > n + 3)


async def test_failure_is_remembered_not_retried(env, tmp_path):
    store, runner, start = env
    log = tmp_path / "calls"
    u = await start("a", callbacks={"pre_checkpoint": ["sh", "-c", f"echo x >> {log}; echo nope >&2; exit 2"]})
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"pre_checkpoint callback 'sh' failed \(exit code 2\): nope"):
            await runner.run(u, "prepare", "ck1", 1)
    assert log.read_text() == "x\n"


async def test_unit_dying_before_stop_fails_the_stage(env):
    store, runner, start = env
    u = await start("a")
    await runner.run(u, "prepare", "ck1", 1)
    os.kill(u.root_pid, signal.SIGKILL)
    await u.wait(3)
    with pytest.raises(CheckpointError, match="stop: unit a is not running"):
        await runner.run(u, "stop", "ck1", 1)
    res = await runner.run(u, "abort", "ck1", 1)
    assert res["data"]["deleted"] and not store.images_dir("job1", "a", 1).exists()


async def test_rebuild_refuses_tampered_and_uncommitted_images(env):
    store, runner, start = env
    u = await start("a")
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck1", 1)
    state = store.images_dir("job1", "a", 1) / "counter.json"
    state.write_text(state.read_text().replace('"count": ', '"count": 9'))
    with pytest.raises(CheckpointError, match=r"counter.json: .*(sha256|size)"):
        await runner.run(u, "rebuild", "rs1", 1)
    assert u.state == "running", "a refused rebuild must not touch the running unit"
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        (store.images_dir("job1", "a", 2)).mkdir(parents=True)
        await runner.run(u, "rebuild", "rs2", 2)


async def test_rebuild_refuses_images_of_another_checkpointer(env):
    store, runner, start = env
    u = await start("a")
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck1", 1)
    u.spec["checkpointer"] = "criu"
    with pytest.raises(RestoreRefused, match="written by 'app'"):
        await runner.run(u, "rebuild", "rs1", 1)


async def test_bad_stage_and_prepare_over_committed(env):
    store, runner, start = env
    u = await start("a")
    with pytest.raises(CheckpointError, match="unknown stage 'explode'"):
        await runner.run(u, "explode", "ck1", 1)
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck1", 1)
    with pytest.raises(CheckpointError, match="already holds a committed checkpoint"):
        await runner.run(u, "prepare", "ck9", 1)


def test_registry():
    assert registry.backend_class("app") is AppCheckpointer
    with pytest.raises(registry.UnknownCheckpointer, match="unknown checkpointer 'dmtcp'"):
        registry.backend_class("dmtcp")
    caps = registry.capabilities()
    assert caps["app"]["coordinated"] and caps["app"]["migration"]


COUNT_TREE = r"""
import os, threading, time
n = 0
def spin():
    while True:
        time.sleep(0.5)
threading.Thread(target=spin, daemon=True).start()
while True:
    n += 1
    print("count", n, flush=True)
    time.sleep(0.02)
"""


@pytest.mark.criu
async def test_criu_unit_through_every_stage_and_back(tmp_path):
    """The runner with the real CRIU backend: checkpoint, kill -9, rebuild (the restored tree is
    adopted into the unit's cgroup), resume, checkpoint the restored tree again, cancel."""
    store = Store(tmp_path / "store")
    runner = UnitStageRunner(store, node="n1")
    backend = runner.backend("criu")
    command = [PY, "-c", COUNT_TREE]
    u = Unit("jobc", "c", {"command": command, "checkpointer": "criu"},
             store.unit_dir("jobc", "c"), cwd=tmp_path)
    try:
        await u.launch(backend.plan_launch(u, command))
        await wait_for(lambda: len(counts(u)) >= 5)
        for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
            await runner.run(u, stage, "ck1", 1)
        saved = max(counts(u))
        os.kill(u.root_pid, signal.SIGKILL)
        assert await u.wait(3) == "failed"
        # refused, with nothing restored nor rolled back, while stdout is shorter than checkpointed
        out = u.unit_dir / "stdout"
        full = out.read_bytes()
        out.write_bytes(full[:10])
        with pytest.raises(RestoreRefused, match=f"file {out} shrank"):
            await runner.run(u, "rebuild", "rs0", 1)
        assert out.read_bytes() == full[:10] and not u.pids()
        out.write_bytes(full)
        reb = await runner.run(u, "rebuild", "rs1", 1)
        assert u.state == "stopped" and reb["data"]["pid"] == u.root_pid
        if u.freezer_path:    # moved in the background (Unit.attach_soon), before any freeze
            await u.attached()
            assert set(u.pids()) <= set(u.freezer.cgroup_pids()), "restored tree not in the cgroup"
        await runner.run(u, "resume_rst", "rs1", 1)
        await wait_for(lambda: len(counts(u)) > saved + 5)
        after = counts(u)
        # stdout was rolled back to its checkpointed size and the restored tree goes on from
        # there: one unbroken sequence 1, 2, 3, ... (from scratch would repeat 1, 2, ...)
        assert after == list(range(1, len(after) + 1)), "the restored unit did not continue"
        # the restored tree can be checkpointed again (the freezer holds it)
        await runner.run(u, "prepare", "ck2", 2)
        await runner.run(u, "stop", "ck2", 2)
        n = len(counts(u))
        await asyncio.sleep(0.2)
        assert len(counts(u)) == n, "the restored tree kept running while stopped"
        await runner.run(u, "checkpoint", "ck2", 2)
        await runner.run(u, "resume_cp", "ck2", 2)
        pids = u.pids()
        await u.kill()
        assert u.state == "exited" and not [p for p in pids if psutil_alive(p)]
    finally:
        await u.close()


def psutil_alive(pid: int) -> bool:
    from nodeagent.freezer import alive_pids
    return bool(alive_pids([pid]))


async def test_job_file_callbacks_get_their_environment(env, tmp_path):
    store, runner, start = env
    log = tmp_path / "cb.log"
    script = f'echo "$0 $GRIDCKPT_JOB $GRIDCKPT_UNIT $GRIDCKPT_CHECKPOINT $GRIDCKPT_IMAGES $MYVAR $PWD" >> {log}'
    u = await start("a", env={"MYVAR": "v1"},
                    callbacks={name: ["sh", "-c", script, name]
                               for name in ("pre_checkpoint", "post_checkpoint", "restart")})
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck1", 1)
    await u.kill()
    await runner.run(u, "rebuild", "rs1", 1)
    await runner.run(u, "resume_rst", "rs1", 1)
    images = store.images_dir("job1", "a", 1)
    assert log.read_text().splitlines() == [
        f"pre_checkpoint job1 a ck1 {images} v1 {ROOT}",
        f"post_checkpoint job1 a ck1 {images} v1 {ROOT}",
        f"restart job1 a rs1 {images} v1 {ROOT}",
    ]


async def test_callback_timeout(env):
    store, runner, start = env
    u = await start("a", callbacks={"pre_checkpoint": ["sleep", "30"]})
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="pre_checkpoint callback 'sleep' timed out after 0.3 s"):
        await runner.run(u, "prepare", "ck1", 1, {"callback_timeout": 0.3})
    assert time.monotonic() - t0 < 2



# -- many units in one pass (stage_batch) -------------------------------------------------

CK_STAGES = ("prepare", "stop", "checkpoint", "resume_cp")


def shape(res: dict) -> tuple:
    """What a stage result says, without its timing."""
    return res["stage"], {k: v for k, v in res["data"].items() if k not in ("backend_ms",)}


async def test_batch_gives_each_unit_what_run_gives(env, tmp_path):
    """Three units through the four checkpoint stages in batches, a fourth through run():
    the same results unit by unit, a redelivered batch runs nothing again, and run() after a
    batch (or a batch after run()) returns the first outcome."""
    store, runner, start = env
    units = [await start(n) for n in ("a", "b", "c")]
    alone = await start("d")
    batch_res = {}
    for stage in CK_STAGES:
        out = await runner.run_batch(stage, "ck1", [(u, {"seq": 1, "seal_later": False}) for u in units])
        assert set(out) == {"a", "b", "c"} and all(isinstance(r, dict) for r in out.values()), out
        batch_res[stage] = out
        ref = await runner.run(alone, stage, "ck1", 1, {"seal_later": False})
        assert {shape(r)[0] for r in out.values()} == {stage}
        for name, r in out.items():
            want = shape(ref)[1]
            got = shape(r)[1]
            if "bytes" in want:    # each program's own state file
                assert got["bytes"] > 0 and got["files"] == want["files"]
                got, want = {k: v for k, v in got.items() if k != "bytes"}, {k: v for k, v in want.items() if k != "bytes"}
            assert got == want, (stage, name, got, want)
        again = await runner.run_batch(stage, "ck1", [(u, {"seq": 1}) for u in units])
        assert again == out, "a redelivered batch gives the first outcome"
        assert await runner.run(units[0], stage, "ck1", 1) == out["a"]
    for u in units:
        verify = (store.images_dir("job1", u.name, 1) / "manifest.json")
        assert verify.exists()
        await wait_for(lambda: stdout(u).count("checkpoint count") == 1 and u.state == "running"
                       and len(counts(u)) > 5)
    # a batch after run(): the first outcome, nothing run again
    await runner.run(alone, "prepare", "ck2", 2)
    out = await runner.run_batch("prepare", "ck2", [(alone, {"seq": 2}), (units[0], {"seq": 2})])
    assert set(out) == {"d", "a"} and stdout(alone).count("checkpoint count") == 2
    for u in (alone, units[0]):
        await runner.run(u, "abort", "ck2", 2)


async def test_batch_seal_gives_each_unit_what_run_gives(env):
    """Checkpoints taken with seal_later, sealed as one batch: each unit's manifest and answer
    as a seal through run() gives them; a unit with nothing to seal fails alone; redelivered,
    nothing is sealed twice."""
    store, runner, start = env
    units = [await start(n) for n in ("a", "b", "c")]
    alone = await start("d")
    args = {"seq": 1, "seal_later": True}
    for stage in CK_STAGES:
        await runner.run_batch(stage, "ck1", [(u, dict(args)) for u in units])
        await runner.run(alone, stage, "ck1", 1, dict(args))
    assert not any((store.images_dir("job1", u.name, 1) / "manifest.json").exists() for u in units)
    ref = await runner.run(alone, "seal", "ck1", 1, dict(args))
    out = await runner.run_batch("seal", "ck9", [(units[0], dict(args))])       # never checkpointed
    assert isinstance(out["a"], CheckpointError) and "no unsealed images" in str(out["a"])
    out = await runner.run_batch("seal", "ck1", [(u, dict(args)) for u in units])
    for u in units:
        r = out[u.name]
        assert r["stage"] == "seal" and set(r["data"]) == set(ref["data"]) and r["data"]["seq"] == 1
        manifest = json.loads((store.images_dir("job1", u.name, 1) / "manifest.json").read_text())
        assert manifest["bytes"] == r["data"]["bytes"] > 0 and manifest["unit"] == u.name
        assert set(manifest["stages_ms"]) == set(CK_STAGES)
    assert await runner.run_batch("seal", "ck1", [(u, dict(args)) for u in units]) == out
    assert await runner.run(units[1], "seal", "ck1", 1, dict(args)) == out["b"]


async def test_batch_failures_stay_with_their_unit(env, tmp_path):
    """In one batch: a dead unit, a failing job-file callback and a healthy unit.  Each failure
    is that unit's one-line error, remembered like run()'s; the healthy unit goes on."""
    store, runner, start = env
    ok = await start("ok")
    dead = await start("dead")
    log = tmp_path / "calls"
    bad = await start("bad", callbacks={"pre_checkpoint": ["sh", "-c", f"echo x >> {log}; echo nope >&2; exit 2"]})
    os.kill(dead.root_pid, signal.SIGKILL)
    await dead.wait(3)
    out = await runner.run_batch("prepare", "ck1", [(u, {"seq": 1}) for u in (ok, dead, bad)])
    assert isinstance(out["ok"], dict) and out["ok"]["data"]["seq"] == 1
    assert isinstance(out["dead"], CheckpointError) and "prepare: unit dead is not running" in str(out["dead"])
    assert isinstance(out["bad"], CheckpointError)
    assert re.search(r"pre_checkpoint callback 'sh' failed \(exit code 2\): nope", str(out["bad"]))
    with pytest.raises(CheckpointError, match="exit code 2"):
        await runner.run(bad, "prepare", "ck1", 1)
    assert log.read_text() == "x\n", "a failure is remembered, not retried"
    assert stdout(bad).count("checkpoint count") == 0, "no state saved after a failed callback"
    out = await runner.run_batch("stop", "ck1", [(ok, {"seq": 1})])
    assert ok.state == "stopped"
    for u in (ok, bad):
        await runner.run(u, "abort", "ck1", 1)
    assert ok.state == "running" and not store.images_dir("job1", "ok", 1).exists()


async def test_batch_request_timeout_is_per_program(env, tmp_path):
    """A program that never answers CHECKPOINT fails its own unit after the backend's timeout;
    the others answered in time; the late answer is discarded and the unit can be aborted."""
    store, runner, start = env
    backend = runner.backend("app")
    backend.timeout = 0.5
    fast = await start("fast")
    slow = await start("slow")
    os.kill(slow.root_pid, signal.SIGSTOP)      # it cannot answer until SIGCONT
    t0 = time.monotonic()
    out = await runner.run_batch("prepare", "ck1", [(u, {"seq": 1}) for u in (fast, slow)])
    assert time.monotonic() - t0 < 1.4
    os.kill(slow.root_pid, signal.SIGCONT)      # its DONE comes late, and is discarded
    assert isinstance(out["fast"], dict)
    assert isinstance(out["slow"], CheckpointError) and "did not answer CHECKPOINT within 0.5 s" in str(out["slow"])
    backend.timeout = 5.0
    for u in (fast, slow):
        await runner.run(u, "abort", "ck1", 1)
    await wait_for(lambda: len(counts(slow)) > 3 and slow.state == "running")


FORK_TREE = r"""
import os, sys, time
for k in range(3):
    if os.fork() == 0:
        n = 0
        while True:
            n += 1
            print(f"child{k} {n}", flush=True)
            time.sleep(0.01)
while True:
    time.sleep(0.05)
"""


@pytest.mark.criu
@pytest.mark.parametrize("gate", ["none", "held"])
async def test_a_freeze_right_after_a_restart_holds_the_whole_restored_tree(tmp_path, gate):
    """A restored tree joins its cgroup in the background (Unit.attach_soon), when the
    agent's background gate opens.  A checkpoint's stop that comes at once after the restart
    still freezes every process of it: the freeze waits for the move, and starts it if the
    gate is still closed ("held": a gate that never opens)."""
    store = Store(tmp_path / "store")
    runner = UnitStageRunner(store, node="n1")
    backend = runner.backend("criu")
    command = [PY, "-c", FORK_TREE]
    u = Unit("jobf", "f", {"command": command, "checkpointer": "criu"}, store.unit_dir("jobf", "f"), cwd=tmp_path)
    if gate == "held":
        closed = asyncio.get_running_loop().create_future()
        u.background_gate = lambda: closed
    lines = lambda: stdout(u).count("\n")  # noqa: E731
    try:
        await u.launch(backend.plan_launch(u, command))
        await wait_for(lambda: lines() > 20)
        for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
            await runner.run(u, stage, "ck1", 1)
        os.kill(u.root_pid, signal.SIGKILL)
        await u.wait(3)
        await runner.run(u, "rebuild", "rs1", 1)
        await runner.run(u, "resume_rst", "rs1", 1)
        await runner.run(u, "prepare", "ck2", 2)
        async with asyncio.timeout(20):
            await runner.run(u, "stop", "ck2", 2)
        if u.freezer_path:
            tree = set(alive_pids(tree_pids(u.root_pid)))
            assert len(tree) >= 4, tree      # the namespace's init and its three children
            inside = set(u.freezer.cgroup_pids())
            assert tree <= inside, (tree, inside)
        n = lines()
        await asyncio.sleep(0.3)
        assert lines() == n, "a restored process kept running through the stop stage"
        await runner.run(u, "abort", "ck2", 2)
    finally:
        await u.close()


def test_images_dir_is_the_units_spare_renamed_and_never_clobbers(tmp_path):
    """An images dir is the unit's spare (made ahead) renamed when there is one; a partial dir
    in the way is cleared the old way, a committed one refused, and the spare kept for later."""
    from nodeagent.stages import SPARE_DIR, _fresh_images_dir, make_spare_dirs
    udir = tmp_path / "units" / "u"
    udir.mkdir(parents=True)
    spare = udir / SPARE_DIR
    assert _fresh_images_dir(udir / "1") is False and (udir / "1").is_dir()    # no spare: mkdir
    make_spare_dirs([udir, tmp_path / "gone"])          # a unit dir gone meanwhile: skipped
    ino = spare.stat().st_ino
    assert _fresh_images_dir(udir / "2") is True
    assert (udir / "2").stat().st_ino == ino and not spare.exists()
    make_spare_dirs([udir])
    (udir / "3").mkdir()
    (udir / "3" / "pages.img").write_bytes(b"partial")
    assert _fresh_images_dir(udir / "3") is False
    assert (udir / "3").is_dir() and not any((udir / "3").iterdir()) and spare.is_dir()
    (udir / "4").mkdir()
    (udir / "4" / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="already holds a committed checkpoint"):
        _fresh_images_dir(udir / "4")
    assert (udir / "4" / "manifest.json").read_text() == "{}" and spare.is_dir()
    (udir / "5").mkdir()                                 # empty: the spare takes its place
    assert _fresh_images_dir(udir / "5") is True and not spare.exists()


async def test_app_state_goes_to_the_spare_and_moves_into_place_with_the_manifest(env):
    """An app unit with an empty spare images dir writes its state there (no directory made
    before it is asked), through run() and in a batch alike; the spare becomes the images dir,
    checked, when the manifest is written, and a new spare is made afterwards.  An aborted
    checkpoint leaves neither its images dir nor a written spare."""
    from nodeagent.stages import SPARE_DIR
    store, runner, start = env
    units = [await start(n) for n in ("a", "b", "c")]
    for u in units:
        runner.want_spare(str(u.unit_dir))
    await runner.make_spares()
    spares = {u.name: u.unit_dir / SPARE_DIR for u in units}
    inodes = {n: p.stat().st_ino for n, p in spares.items()}
    args = {"seq": 1, "seal_later": True}
    await runner.run(units[0], "prepare", "ck1", 1, dict(args))
    await runner.run_batch("prepare", "ck1", [(u, dict(args)) for u in units[1:]])
    for u in units:
        assert not store.images_dir("job1", u.name, 1).exists()
        assert (spares[u.name] / "counter.json").is_file(), list(spares[u.name].iterdir())
    await runner.run(units[0], "stop", "ck1", 1, dict(args))
    ck = await runner.run(units[0], "checkpoint", "ck1", 1, dict(args))
    assert ck["data"]["sealed"] is False and "images" not in ck["data"]
    for stage in ("stop", "checkpoint"):
        await runner.run_batch(stage, "ck1", [(u, dict(args)) for u in units[1:]])
    await runner.run(units[0], "resume_cp", "ck1", 1, dict(args))
    await runner.run_batch("resume_cp", "ck1", [(u, dict(args)) for u in units[1:]])
    assert not any(store.images_dir("job1", u.name, 1).exists() for u in units)
    await runner.run(units[0], "seal", "ck1", 1, dict(args))
    out = await runner.run_batch("seal", "ck1", [(u, dict(args)) for u in units[1:]])
    assert all(isinstance(r, dict) for r in out.values()), out
    for u in units:
        images = store.images_dir("job1", u.name, 1)
        assert images.stat().st_ino == inodes[u.name] and not spares[u.name].exists()
        manifest = json.loads((images / "manifest.json").read_text())
        assert "counter.json" in manifest["files"]
    await runner.make_spares()
    assert all(p.is_dir() and not any(p.iterdir()) for p in spares.values())
    # aborted after the programs wrote into their spares: nothing of it is left
    for u in units:
        await runner.run(u, "prepare", "ck2", 2, dict(args, seq=2))
        assert any(spares[u.name].iterdir())
        await runner.run(u, "abort", "ck2", 2, dict(args, seq=2))
        assert not store.images_dir("job1", u.name, 2).exists()
        assert not spares[u.name].exists() or not any(spares[u.name].iterdir())
    await runner.make_spares()
    out = await runner.run_batch("prepare", "ck3", [(u, {"seq": 3}) for u in units])
    assert all(isinstance(r, dict) for r in out.values()), out
    assert all((spares[u.name] / "counter.json").is_file() for u in units)
    for stage in ("stop", "checkpoint", "resume_cp"):      # sealed at once (a unit under the shim)
        await runner.run_batch(stage, "ck3", [(u, {"seq": 3}) for u in units])
    for u in units:
        assert (store.images_dir("job1", u.name, 3) / "manifest.json").is_file() and not spares[u.name].exists()
        assert counts(u)[-1] > 0 and u.state == "running"


async def test_a_spare_the_program_wrote_nothing_into_is_refused_at_the_seal(env, tmp_path):
    """The check the checkpoint stage makes of app state (a file written) is made when the spare
    moves into place: an empty spare fails the seal naming the unit and what is missing."""
    store, runner, start = env
    u = await start("a")
    images = store.images_dir("job1", "a", 5)
    spare = tmp_path / "spare"
    spare.mkdir()
    ctx = {"seq": 5, "images": images, "spare": str(spare), "stages_ms": {}}
    with pytest.raises(CheckpointError, match="unit a: the program wrote no state"):
        await asyncio.to_thread(runner.manifest_now, u, ctx, {"seq": 5}, {})
    assert images.is_dir() and not (images / "manifest.json").exists()


def test_a_spare_left_written_never_reaches_an_images_dir(tmp_path):
    """A spare that holds something (an agent stopped between a program's writes and their
    move) is emptied when spares are made, and is never renamed into an images dir before."""
    from nodeagent.stages import SPARE_DIR, make_spare_dirs
    runner = UnitStageRunner(Store(tmp_path / "store"), node="n1")
    udir = tmp_path / "units" / "u"
    (udir / SPARE_DIR).mkdir(parents=True)
    (udir / SPARE_DIR / "state").write_text("old")
    runner.new_images_dir(udir / "1")          # not known to be empty: a new dir
    assert not any((udir / "1").iterdir()) and (udir / SPARE_DIR / "state").exists()
    assert make_spare_dirs([str(udir)]) == [str(udir)]
    assert (udir / SPARE_DIR).is_dir() and not any((udir / SPARE_DIR).iterdir())


async def test_a_rebuilt_unit_gets_its_spare_made_again(env):
    """A spare this agent made and another took meanwhile (the unit restarted on another node,
    then back here): a rebuild has it made again before the next checkpoint hands it out."""
    from nodeagent.stages import SPARE_DIR
    store, runner, start = env
    u = await start("a")
    runner.want_spare(str(u.unit_dir))
    await runner.make_spares()
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck1", 1)
    await runner.make_spares()
    assert str(u.unit_dir) in runner.spares_ready
    (u.unit_dir / SPARE_DIR).rmdir()            # taken by the agent that had the unit meanwhile
    await runner.run(u, "rebuild", "rs1", 1)
    await runner.run(u, "resume_rst", "rs1", 1)
    assert str(u.unit_dir) not in runner.spares_ready
    await runner.make_spares()
    assert str(u.unit_dir) in runner.spares_ready and (u.unit_dir / SPARE_DIR).is_dir()
    await wait_for(lambda: len(counts(u)) >= 2)
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck2", 2)
    assert (store.images_dir("job1", "a", 2) / "manifest.json").is_file()


def test_a_spare_replaces_a_partial_images_dir_never_a_committed_one(tmp_path):
    """The spare moves onto a partial images dir left by an earlier try (replaced), and refuses
    one that holds a committed checkpoint (both left as they were)."""
    from nodeagent.stages import SPARE_DIR
    runner = UnitStageRunner(Store(tmp_path / "store"), node="n1")
    udir = tmp_path / "u"
    for seq, committed in ((1, False), (2, True)):
        (udir / SPARE_DIR).mkdir(parents=True)
        (udir / SPARE_DIR / "state").write_text("new")
        (udir / str(seq)).mkdir()
        (udir / str(seq) / ("manifest.json" if committed else "old")).write_text("{}")
        ctx = {"images": udir / str(seq), "spare": udir / SPARE_DIR}
        if committed:
            with pytest.raises(CheckpointError, match="already holds a committed checkpoint"):
                runner._settle_spare(ctx)
            assert (udir / "2" / "manifest.json").exists() and (udir / SPARE_DIR / "state").exists()
        else:
            runner._settle_spare(ctx)
            assert sorted(p.name for p in (udir / "1").iterdir()) == ["state"] and not (udir / SPARE_DIR).exists()
            assert "spare" not in ctx and str(udir) in runner.spares_wanted
