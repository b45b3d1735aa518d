"""Units as real process trees: launch, status, exit/kill detection, cancel, freeze/thaw."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nodeagent import freezer as fz
from nodeagent.checkpointers.base import CheckpointError, LaunchPlan
from nodeagent.units import Unit, become_subreaper

PY = sys.executable

# a root with two threads and a forked child (that has a thread too); both print progress
TREE = r"""
import os, sys, threading, time
print("env", os.environ.get("JOBVAR"), os.environ.get("AGENT_ONLY"), flush=True)
def spin():
    while True:
        time.sleep(1)
threading.Thread(target=spin, daemon=True).start()
if os.fork() == 0:
    threading.Thread(target=spin, daemon=True).start()
    while True:
        time.sleep(1)
i = 0
while True:
    i += 1
    print("tick", i, flush=True)
    time.sleep(0.01)
"""


def kinds() -> list:
    """Every freezer kind this machine offers, plus the signal fallback."""
    out = []
    saved = os.environ.get("GRIDCKPT_FREEZER")
    for kind in ("v1", "v2"):
        os.environ["GRIDCKPT_FREEZER"] = kind
        try:
            out.append(pytest.param(fz.detect(), id=kind))
        except CheckpointError as e:
            out.append(pytest.param(None, id=kind, marks=pytest.mark.skip(
                reason=f"no cgroup {kind} freezer on this machine ({e})")))
        finally:
            if saved is None:
                del os.environ["GRIDCKPT_FREEZER"]
            else:
                os.environ["GRIDCKPT_FREEZER"] = saved
    out.append(pytest.param(("signal", None), id="signal"))
    return out


def make_unit(tmp_path: Path, name: str = "u", kind=None, **spec) -> Unit:
    events: list[str] = []

    async def on_state(u: Unit) -> None:
        events.append(u.state)

    job = f"t{os.getpid()}-{tmp_path.name[-20:]}".replace("_", "-")
    u = Unit(job, name, spec, tmp_path / "units" / name, cwd=tmp_path,
             on_state=on_state, freezer_kind=kind)
    u.events = events   # type: ignore[attr-defined]
    return u


def gone(pids: list[int]) -> bool:
    return not fz.alive_pids(pids)


async def wait_for(pred, timeout: float = 5.0, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)
    return time.monotonic() - t0


def ticks(u: Unit) -> int:
    return (u.unit_dir / "stdout").read_text().count("tick")


@pytest.fixture
async def cleanup():
    units: list[Unit] = []
    yield units
    for u in units:
        await u.close()


async def test_launch_status_tree_env_and_output(tmp_path, cleanup):
    os.environ["AGENT_ONLY"] = "leak"
    try:
        u = make_unit(tmp_path, env={"JOBVAR": "fromjob"})
        cleanup.append(u)
        pid = await u.launch(LaunchPlan([PY, "-c", TREE]))
    finally:
        del os.environ["AGENT_ONLY"]
    await wait_for(lambda: u.status()["nprocs"] == 2)
    st = u.status()
    assert st["state"] == "running" and st["pid"] == pid and st["uptime"] > 0
    assert psutil.Process(pid).num_threads() == 2
    # own session, and every process in the unit's cgroup when there is one
    assert os.getsid(pid) == pid
    if u.freezer_path:
        assert set(u.pids()) == set(fz.alive_pids(u.freezer.cgroup_pids()))
    await wait_for(lambda: ticks(u) >= 2)
    out = (u.unit_dir / "stdout").read_text()
    assert "env fromjob None" in out          # job env in, agent env out
    assert u.events == ["running"]


async def test_exit_code_reported(tmp_path, cleanup):
    u = make_unit(tmp_path)
    cleanup.append(u)
    await u.launch(LaunchPlan([PY, "-c", "import sys; sys.stderr.write('bye\\n'); sys.exit(3)"]))
    assert await u.wait(5) == "exited"
    assert u.status()["exit_code"] == 3 and u.status()["signal"] is None
    assert (u.unit_dir / "stderr").read_text() == "bye\n"
    assert u.events == ["running", "exited"]


@pytest.mark.parametrize("kind", kinds())
async def test_kill_9_detected_fast_and_children_cleaned(tmp_path, cleanup, kind):
    u = make_unit(tmp_path, kind=kind)
    cleanup.append(u)
    pid = await u.launch(LaunchPlan([PY, "-c", TREE]))
    await wait_for(lambda: len(u.pids()) == 2)
    pids = u.pids()
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    assert await u.wait(3) == "failed"
    assert time.monotonic() - t0 < 3
    st = u.status()
    assert st["signal"] == 9 and st["exit_code"] is None and not st["cancelled"]
    assert gone(pids), "the forked child outlived its unit"


@pytest.mark.parametrize("kind", kinds())
async def test_cancel_leaves_no_process(tmp_path, cleanup, kind):
    u = make_unit(tmp_path, kind=kind)
    cleanup.append(u)
    # a grandchild that double-forks away from the tree (only the cgroup still knows it)
    prog = TREE.replace("i = 0", "import subprocess\nsubprocess.Popen(['sh','-c','sleep 60 &'])\ni = 0")
    await u.launch(LaunchPlan([PY, "-c", prog]))
    await wait_for(lambda: ticks(u) >= 1)
    await asyncio.sleep(0.05)
    pids = u.pids()
    sleeper = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "60"]
               and p.pid in u.pids()]
    await u.kill()
    assert u.state == "exited" and u.status()["cancelled"] and u.status()["signal"] == 9
    assert sleeper, "the double-forked sleeper should count as part of the unit"
    assert gone(pids) and gone(sleeper)
    if u.freezer_path:
        assert not os.path.exists(u.freezer_path)


@pytest.mark.parametrize("kind", kinds())
async def test_freeze_stops_progress_and_thaw_resumes(tmp_path, cleanup, kind):
    u = make_unit(tmp_path, kind=kind)
    cleanup.append(u)
    await u.launch(LaunchPlan([PY, "-c", TREE]))
    await wait_for(lambda: ticks(u) >= 3 and len(u.pids()) == 2)
    t0 = time.monotonic()
    await u.freeze()
    freeze_ms = (time.monotonic() - t0) * 1000
    assert u.state == "stopped" and u.freezer.is_frozen()
    before = ticks(u)
    await asyncio.sleep(0.3)
    assert ticks(u) == before, "a frozen unit made progress"
    if kind[0] == "signal":
        assert all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in u.pids())
    await u.thaw()
    assert u.state == "running"
    await wait_for(lambda: ticks(u) > before + 2)
    assert freeze_ms < 500
    # a frozen unit can still be cancelled
    await u.freeze()
    pids = u.pids()
    await u.kill()
    assert gone(pids)


@pytest.mark.parametrize("kind", kinds())
async def test_stopped_launch_runs_only_after_thaw(tmp_path, cleanup, kind):
    u = make_unit(tmp_path, kind=kind)
    cleanup.append(u)
    await u.launch(LaunchPlan([PY, "-c", TREE]), stopped=True)
    assert u.state == "stopped"
    await asyncio.sleep(0.3)
    assert not (u.unit_dir / "stdout").read_text(), "a stopped launch ran"
    await u.thaw()
    await wait_for(lambda: ticks(u) >= 1)


async def test_adopted_tree_exit_detected(tmp_path, cleanup):
    """A tree that is not the agent's child (as after a restore) is watched through a pidfd."""
    become_subreaper(False)   # the orphaned sleep must not become this process's child
    out = subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, check=True).stdout
    pid = int(out)
    u = make_unit(tmp_path)
    cleanup.append(u)
    try:
        u.adopt(pid)
        assert u.status()["nprocs"] == 1 and u.status()["pid"] == pid
        os.kill(pid, signal.SIGKILL)
        assert await u.wait(3) == "failed"
        assert "unknown" in u.status()["detail"]
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_bad_command_is_a_clear_error(tmp_path, cleanup):
    u = make_unit(tmp_path)
    cleanup.append(u)
    with pytest.raises(CheckpointError, match="cannot start '/nonexistent/prog'"):
        await u.launch(LaunchPlan(["/nonexistent/prog"]))
    assert u.ended and u.state == "failed" and "cannot start" in u.status()["detail"]


def test_launch_wrapper_shapes():
    assert fz.launch_wrapper(["a", "b"], None) == ["a", "b"]
    w = fz.launch_wrapper(["a", "b c"], "/cg/cgroup.procs")
    assert w[:2] == ["/bin/sh", "-c"] and w[3:] == ["/cg/cgroup.procs", "a", "b c"]


async def test_sweep_removes_only_old_empty_cgroups(tmp_path, cleanup):
    u = make_unit(tmp_path)
    cleanup.append(u)
    if u.freezer_path is None:
        pytest.skip("no cgroup freezer on this machine: nothing to sweep")
    pid = await u.launch(LaunchPlan([PY, "-c", TREE]))
    assert pid in u.freezer.cgroup_pids()      # launch returns once the root is inside
    stale = Path(u.freezer_path).parent / "stale-unit"
    stale.mkdir()
    fresh = Path(u.freezer_path).parent / "fresh-unit"
    fresh.mkdir()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(u.freezer_path, (old, old))
    removed = fz.sweep_empty_cgroups(min_age=60)
    assert str(stale) in removed
    assert fresh.exists() and os.path.exists(u.freezer_path)   # too young / not empty
    fresh.rmdir()


SUBREAPER_AGENT = r"""
import asyncio, os, signal, sys, psutil
from nodeagent.units import Unit, become_subreaper
from nodeagent.checkpointers.base import LaunchPlan
TREE = sys.argv[2]
async def main():
    assert become_subreaper()
    for how in ("kill-9", "cancel"):
        u = Unit("sr", how, {}, os.path.join(sys.argv[1], how))
        pid = await u.launch(LaunchPlan([sys.executable, "-c", TREE]))
        while len(u.pids()) < 2:
            await asyncio.sleep(0.01)
        if how == "kill-9":
            os.kill(pid, signal.SIGKILL)      # the forked child is orphaned to us
            await u.wait(3)
        else:
            await u.kill()
        await asyncio.sleep(0.1)
        zombies = [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
        print(how, u.state, "zombies", zombies, flush=True)
        await u.close()
asyncio.run(main())
"""


ZOMBIE_TREE = r"""
import os, time
if os.fork() == 0:
    time.sleep(0.3)
    os._exit(0)          # a zombie of its parent, which never waits for it
while True:
    time.sleep(1)
"""

ORPHAN_ZOMBIE_AGENT = r"""
import asyncio, os, sys, psutil
from nodeagent.units import Unit, become_subreaper
from nodeagent.checkpointers.base import LaunchPlan
async def main():
    assert become_subreaper()
    u = Unit("sr", "z", {}, os.path.join(sys.argv[1], "z"))
    await u.launch(LaunchPlan([sys.executable, "-c", sys.argv[2]]))
    while len(u.pids()) < 2:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.6)          # the child is now its parent's zombie
    u._reap_zombies()                 # a pass while its parent lives: not ours to reap yet
    await u.kill()                    # the parent dies and hands the zombie to us
    await asyncio.sleep(0.1)
    zombies = [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    print("zombies", zombies, flush=True)
    await u.close()
asyncio.run(main())
"""


async def test_a_zombie_handed_to_the_agent_by_its_dying_parent_is_reaped(tmp_path):
    """A member of the tree that is its parent's zombie when a reaping pass runs, and becomes
    the (subreaper) agent's when that parent is killed, is still reaped."""
    proc = await asyncio.create_subprocess_exec(
        PY, "-c", ORPHAN_ZOMBIE_AGENT, str(tmp_path), ZOMBIE_TREE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().splitlines() == ["zombies []"]


async def test_subreaper_agent_keeps_no_zombies(tmp_path):
    """An agent that is a subreaper adopts the units' orphans; they must not pile up as zombies."""
    proc = await asyncio.create_subprocess_exec(
        PY, "-c", SUBREAPER_AGENT, str(tmp_path), TREE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().splitlines() == ["kill-9 failed zombies []", "cancel exited zombies []"]


LEADER_EXITS = r"""
#include <pthread.h>
#include <unistd.h>
static void *spin(void *arg) { (void)arg; for (;;) pause(); return 0; }
int main(void)
{
    pthread_t t;
    pthread_create(&t, 0, spin, 0);
    pthread_exit(0);    /* the main thread ends; the process runs on in its other thread */
}
"""


async def test_a_process_whose_main_thread_exited_is_alive_and_killed(tmp_path, cleanup):
    """/proc shows a process whose main thread called pthread_exit as a zombie while its other
    threads run: it counts as alive (in pids(), so a kill reaches it), and a kill ends it."""
    src = tmp_path / "leader_exits.c"
    src.write_text(LEADER_EXITS)
    binary = tmp_path / "leader_exits"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(src)], check=True)
    u = make_unit(tmp_path)
    cleanup.append(u)
    pid = await u.launch(LaunchPlan([str(binary)]))
    await wait_for(lambda: fz._proc_state(pid) == b"Z")     # the leader shows as a zombie ...
    await asyncio.sleep(0.1)
    assert fz.alive_pids([pid]) == [pid] and u.pids() == [pid]   # ... but the process lives
    await u.kill()
    assert gone([pid]) and u.ended


CGROUP_KINDS = [k for k in kinds() if k.id != "signal"]
TICKER = "import time\ni = 0\nwhile True:\n    i += 1\n    print('tick', i, flush=True)\n    time.sleep(0.01)\n"


async def _three_units(tmp_path: Path, cleanup: list, kind) -> list[Unit]:
    units = [make_unit(tmp_path, name=f"g{i}", kind=kind) for i in range(3)]
    cleanup.extend(units)
    for u in units:
        await u.launch(LaunchPlan([PY, "-c", TICKER]))
    await wait_for(lambda: all(ticks(u) >= 2 for u in units))
    return units


async def _still(u: Unit) -> bool:
    before = ticks(u)
    await asyncio.sleep(0.25)
    return ticks(u) == before


@pytest.mark.parametrize("kind", CGROUP_KINDS)
async def test_units_frozen_together_thaw_together_or_alone(tmp_path, cleanup, kind):
    """The units of a job frozen with one write to the job's cgroup: all stop; thawed
    together they all run.  Frozen together again, one thawed alone runs while the others stay
    frozen (each is then frozen on its own), and thaw later one by one."""
    units = await _three_units(tmp_path, cleanup, kind)
    freezers = [u.freezer for u in units]
    assert await fz.freeze_together(freezers)
    assert all(f.frozen and f.is_frozen() for f in freezers)
    assert all([await _still(u) for u in units])
    assert await fz.thaw_together(freezers)
    for u in units:
        n = ticks(u)
        await wait_for(lambda: ticks(u) > n + 2)
    assert await fz.freeze_together(freezers)
    await units[0].thaw()
    n = ticks(units[0])
    await wait_for(lambda: ticks(units[0]) > n + 2)
    assert await _still(units[1]) and await _still(units[2])
    assert not await fz.thaw_together(freezers[1:]), "no longer a group: one was thawed alone"
    for u in units[1:]:
        await u.thaw()
        n = ticks(u)
        await wait_for(lambda: ticks(u) > n + 2)


@pytest.mark.parametrize("kind", CGROUP_KINDS)
async def test_freeze_together_only_when_the_job_cgroup_holds_just_these_units(tmp_path, cleanup, kind):
    """Another unit of the job in the job's cgroup (say, under another agent of this host)
    rules the shared write out: it must not be frozen with them."""
    units = await _three_units(tmp_path, cleanup, kind)
    assert not await fz.freeze_together([u.freezer for u in units[:2]])
    assert not any(u.freezer.frozen for u in units)
    assert not await fz.freeze_together([units[0].freezer])     # one unit: its own cgroup


@pytest.mark.parametrize("kind", CGROUP_KINDS)
async def test_a_job_left_frozen_by_a_dead_agent_is_thawed_unit_by_unit(tmp_path, cleanup, kind, monkeypatch):
    """An agent killed between freezing a job's units together and thawing them: the next
    agent knows nothing of it, and thawing a unit still lets it run (the job's cgroup is
    thawed)."""
    units = await _three_units(tmp_path, cleanup, kind)
    assert await fz.freeze_together([u.freezer for u in units])
    monkeypatch.setattr(fz, "_frozen_together", {})     # what a new agent process knows
    for u in units:
        u.freezer.frozen = True
        await u.thaw()
        n = ticks(u)
        await wait_for(lambda: ticks(u) > n + 2)


async def test_kill_of_a_unit_frozen_with_others_leaves_them_frozen(tmp_path, cleanup):
    """A unit killed while frozen with its job's others: it dies, they stay frozen."""
    kind = fz.freezer_kind()
    if kind[0] == "signal":
        pytest.skip("no cgroup freezer on this machine")
    units = await _three_units(tmp_path, cleanup, kind)
    assert await fz.freeze_together([u.freezer for u in units])
    pids = units[0].pids()
    await units[0].kill()
    assert gone(pids)
    assert await _still(units[1]) and await _still(units[2])
    for u in units[1:]:
        await u.thaw()
        n = ticks(u)
        await wait_for(lambda: ticks(u) > n + 2)
