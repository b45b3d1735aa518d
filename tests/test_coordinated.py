"""Coordinated checkpoint and restart through the CLI, daemons in separate processes over RabbitMQ."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLES, REPO, Cluster, unit_of, write_job
from nodeagent.freezer import Freezer, alive_pids

pytestmark = [pytest.mark.amqp, pytest.mark.criu]

PROGRESS = EXAMPLES / "progress.py"
COUNTER_APP = EXAMPLES / "counter_app.py"


def _running(st: dict) -> bool:
    return st["state"] == "running" and all(u["state"] == "running" for u in st["units"])


def _step(cluster: Cluster, job: str, unit: str) -> int:
    """The last step a progress.py / counter_app.py unit printed."""
    text = (cluster.store / "jobs" / job / "units" / unit / "stdout").read_text(errors="replace")
    nums = re.findall(r"(?:step=|count )(\d+)", text)
    return int(nums[-1]) if nums else 0


def _wait_step(cluster: Cluster, job: str, unit: str, above: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = _step(cluster, job, unit)
        if n > above:
            return n
        time.sleep(0.05)
    raise AssertionError(f"unit {unit} made no progress past {above}")


def _three_units(tmp_path: Path, extra: str = "", a_extra: str = "", nodes: str = "n1 n2 n2") -> Path:
    na, nb, nc = nodes.split()
    return write_job(tmp_path / "trio.toml", f'''
name = "trio"
stage_timeout = "5s"
{extra}
[[units]]
name = "a"
command = ["python3", "{PROGRESS}", "--every", "0.05"]
checkpointer = "criu"
node = "{na}"
{a_extra}
[[units]]
name = "b"
command = ["python3", "{PROGRESS}", "--every", "0.05", "--child"]
checkpointer = "criu"
node = "{nb}"
[[units]]
name = "c"
command = ["python3", "{COUNTER_APP}", "--to", "0", "--interval", "0.05"]
checkpointer = "app"
node = "{nc}"
''')


def _start(cluster: Cluster, nodes: tuple[str, ...] = ("n1", "n2")) -> None:
    cluster.orchestrator()
    for n in nodes:
        cluster.agent(n)
    cluster.wait_agents(len(nodes))


def _partial_dirs(cluster: Cluster, job: str) -> list[Path]:
    units = cluster.store / "jobs" / job / "units"
    return [d for d in units.glob("*/[0-9]*") if d.is_dir() and not (d / "manifest.json").exists()]


def test_checkpoint_kill_restart_same_and_other_node(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster)
    job = cluster.submit(_three_units(tmp_path))
    cluster.wait_status(job, _running)
    for u in "abc":
        _wait_step(cluster, job, u, 3)
    ck = cluster.cli_json("checkpoint", job)
    assert {u["name"] for u in ck["units"]} == {"a", "b", "c"}
    for u in ck["units"]:
        # sealed (hashed, manifest written) after resume_cp: not part of the unit's total
        assert set(u["stages_ms"]) == {"prepare", "stop", "checkpoint", "resume_cp", "seal"} and u["bytes"] > 0
        assert u["total_ms"] < sum(u["stages_ms"].values())
    assert 0 < ck["total_ms"] <= ck["committed_ms"]
    at_ckpt = {u: _step(cluster, job, u) for u in "abc"}
    table = cluster.cli("checkpoints", job)
    assert ck["checkpoint"] in table.stdout
    for u in "abc":
        _wait_step(cluster, job, u, at_ckpt[u] + 5)
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "b")["pid"], signal.SIGKILL)  # b runs on n2
    cluster.wait_status(job, lambda s: unit_of(s, "b")["state"] == "failed", timeout=5)
    # restart, moving b to n1 (the store is shared) and keeping the others where they were
    rs = cluster.cli_json("restart", job, "--place", "b=n1")
    assert rs["from"] == ck["checkpoint"]
    assert {u["name"]: u["node"] for u in rs["units"]} == {"a": "n1", "b": "n1", "c": "n2"}
    st = cluster.wait_status(job, _running)
    assert unit_of(st, "b")["node"] == "n1"
    for u in "abc":  # every unit continued from its checkpointed state, not from scratch
        n = _wait_step(cluster, job, u, at_ckpt[u])
        assert n > at_ckpt[u] > 3
    # the app unit wrote its state into its spare images dir (made ahead), which became the
    # checkpoint's own dir with the manifest: the restart reads it there
    c_dir = cluster.store / "jobs" / job / "units" / "c"
    out_c = (c_dir / "stdout").read_text()
    seq_c = next(u["seq"] for u in ck["units"] if u["name"] == "c")
    assert f"into {c_dir / '.spare-images'}\n" in out_c, out_c[-2000:]
    assert re.search(rf"^restored count \d+ from {re.escape(str(c_dir / str(seq_c)))}$", out_c, re.M), out_c[-2000:]
    out_a = (cluster.store / "jobs" / job / "units" / "a" / "stdout").read_text().splitlines()
    steps = [int(m) for m in re.findall(r"step=(\d+)", "\n".join(out_a))]
    assert steps == list(range(1, len(steps) + 1)), "a's output file rolled back to the checkpoint and went on"
    # and again, everything on the same nodes, from the same checkpoint
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "a")["pid"], signal.SIGKILL)
    cluster.wait_status(job, lambda s: unit_of(s, "a")["state"] == "failed", timeout=5)
    r = cluster.cli("restart", job, "--checkpoint", ck["checkpoint"])
    assert r.returncode == 0, r.stderr
    assert "rebuild" in r.stdout and "resume_rst" in r.stdout
    cluster.wait_status(job, _running)
    _wait_step(cluster, job, "a", at_ckpt["a"])


@pytest.mark.parametrize("nodes", ["n1 n2 n2", "n1 n1 n1"], ids=["two-agents", "one-agent-keeps-the-barrier"])
def test_failing_pre_checkpoint_callback_aborts_cleanly(cluster: Cluster, tmp_path: Path, nodes: str) -> None:
    _start(cluster, tuple(sorted(set(nodes.split()))))
    job = cluster.submit(_three_units(tmp_path, a_extra='callbacks = { pre_checkpoint = ["sh", "-c", "exit 7"] }',
                                      nodes=nodes))
    cluster.wait_status(job, _running)
    r = cluster.cli("checkpoint", job)
    assert r.returncode == 1 and "aborted" in r.stderr and "pre_checkpoint" in r.stderr, r.stderr
    assert cluster.cli_json("checkpoints", job) == []
    assert not _partial_dirs(cluster, job)
    st = cluster.wait_status(job, _running)
    for u in "abc":  # every unit was resumed and makes progress
        _wait_step(cluster, job, u, _step(cluster, job, u))
    assert st["state"] == "running"


def test_seal_failing_after_resume_aborts_cleanly(cluster: Cluster, tmp_path: Path) -> None:
    """The units resume before their images are sealed; a seal that fails then still aborts:
    nothing listed, no partial images, the job runs on (here a post_checkpoint callback,
    which runs in resume_cp, destroys unit a's images before they are sealed)."""
    _start(cluster)
    job = cluster.submit(_three_units(
        tmp_path, a_extra='callbacks = { post_checkpoint = ["sh", "-c", "rm -rf \\"$GRIDCKPT_IMAGES\\""] }'))
    cluster.wait_status(job, _running)
    r = cluster.cli("checkpoint", job)
    assert r.returncode == 1 and "aborted" in r.stderr and "seal" in r.stderr, r.stderr
    assert cluster.cli_json("checkpoints", job) == []
    assert not _partial_dirs(cluster, job)
    cluster.wait_status(job, _running)
    for u in "abc":
        _wait_step(cluster, job, u, _step(cluster, job, u))


@pytest.mark.parametrize("nodes", ["n1 n2 n2", "n1 n1 n1"], ids=["two-agents", "one-agent-keeps-the-barrier"])
def test_unit_dying_mid_checkpoint_aborts(cluster: Cluster, tmp_path: Path, nodes: str) -> None:
    _start(cluster, tuple(sorted(set(nodes.split()))))
    job = cluster.submit(_three_units(tmp_path, a_extra='callbacks = { pre_checkpoint = ["sleep", "1.5"] }',
                                      nodes=nodes))
    st = cluster.wait_status(job, _running)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "checkpoint", job], env=cluster.env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)
    os.kill(unit_of(st, "a")["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "aborted" in err, (out, err)
    assert cluster.cli_json("checkpoints", job) == []
    assert not _partial_dirs(cluster, job)
    for u in "bc":
        _wait_step(cluster, job, u, _step(cluster, job, u))


def test_agent_lost_mid_checkpoint_aborts_and_others_resume(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster, ("n1", "n2", "n3"))
    jf = write_job(tmp_path / "lost.toml", f'''
name = "lost"
stage_timeout = "10s"
[[units]]
name = "a"
command = ["python3", "{PROGRESS}", "--every", "0.05"]
node = "n1"
[[units]]
name = "z"
command = ["python3", "{PROGRESS}", "--every", "0.05"]
node = "n3"
callbacks = {{ pre_checkpoint = ["sleep", "2"] }}
''')
    job = cluster.submit(jf)
    cluster.wait_status(job, _running)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "checkpoint", job], env=cluster.env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    t0 = time.monotonic()
    cluster.stop("agent-n3", signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "aborted" in err, (out, err)
    assert time.monotonic() - t0 < 5, "a lost agent must abort the checkpoint well before the stage timeout"
    assert cluster.cli_json("checkpoints", job) == []
    assert not _partial_dirs(cluster, job)
    _wait_step(cluster, job, "a", _step(cluster, job, "a"))  # a was thawed


@pytest.mark.parametrize("nodes", ["n1 n2 n2", "n1 n1 n1"], ids=["two-agents", "one-agent-keeps-the-barrier"])
def test_orchestrator_killed_mid_checkpoint_and_restarted(cluster: Cluster, tmp_path: Path, nodes: str) -> None:
    _start(cluster, tuple(sorted(set(nodes.split()))))
    job = cluster.submit(_three_units(tmp_path, a_extra='callbacks = { pre_checkpoint = ["sleep", "1.5"] }',
                                      nodes=nodes))
    cluster.wait_status(job, _running)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "checkpoint", job, "--timeout", "4"],
                            env=cluster.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    cluster.stop("orchestrator", signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    cluster.orchestrator()  # finds the truth in the store and in the agents' heartbeats
    st = cluster.wait_status(job, _running, timeout=20)
    assert cluster.cli_json("checkpoints", job) == []
    assert not list((cluster.store / "jobs" / job / "checkpoints").glob("*.pending.json"))
    assert not _partial_dirs(cluster, job)
    ck = cluster.cli_json("checkpoint", job, timeout=60)  # and the job can be checkpointed again
    assert [c["id"] for c in cluster.cli_json("checkpoints", job)] == [ck["checkpoint"]]
    assert st["state"] == "running"


def _checkpointed_trio(cluster: Cluster, tmp_path: Path) -> tuple[str, Path]:
    """The trio running on n1 and n2, checkpointed once: (job, unit a's images dir)."""
    _start(cluster, ("n1", "n2"))
    job = cluster.submit(_three_units(tmp_path))
    cluster.wait_status(job, _running)
    ck = cluster.cli_json("checkpoint", job)
    seq = next(u["seq"] for u in ck["units"] if u["name"] == "a")
    return job, cluster.store / "jobs" / job / "units" / "a" / str(seq)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_image_is_refused_before_the_job_is_touched(cluster: Cluster, tmp_path: Path) -> None:
    job, images = _checkpointed_trio(cluster, tmp_path)
    victim = max((p for p in images.iterdir() if p.name != "manifest.json" and p.is_file()), key=lambda p: p.stat().st_size)
    _flip_a_byte(victim)
    r = cluster.cli("restart", job)
    assert r.returncode == 1 and victim.name in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    cluster.wait_status(job, _running)  # the running job was left alone
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    r = cluster.cli("restart", job)
    assert r.returncode == 1 and victim.name in r.stderr, r.stderr


def test_tampered_pages_of_a_dead_job_are_caught_while_restoring(cluster: Cluster, tmp_path: Path) -> None:
    """With no live unit at stake the orchestrator checks sizes only and the agent hashes CRIU's
    page data while CRIU restores: a flipped byte still fails the restart, naming the file,
    and the restored tree (stopped, never resumed) is killed."""
    job, images = _checkpointed_trio(cluster, tmp_path)
    victim = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    _flip_a_byte(victim)
    st = cluster.cli_json("status", job)
    for u in st["units"]:
        os.kill(u["pid"], signal.SIGKILL)
    cluster.wait_status(job, lambda s: all(u["state"] == "failed" for u in s["units"]), timeout=5)
    r = cluster.cli("restart", job)
    assert r.returncode == 1 and victim.name in r.stderr and "sha256" in r.stderr, r.stderr
    st = cluster.wait_status(job, lambda s: s["state"] == "failed")
    assert all(u["state"] in ("failed", "exited", "cancelled") for u in st["units"]), st
    left = alive_pids(Freezer(job, "a", list).cgroup_pids())
    assert not left, f"the restored tree of a survived: {left}"


def test_verify_images_full_rehashes_files_unchanged_since_sealed(cluster: Cluster, tmp_path: Path) -> None:
    """By default a restart re-reads only image files written since they were sealed; with
    ``verify_images = "full"`` it hashes every file, so a sha256 that no longer matches an
    untouched file (what bits rotting beneath the file system look like) is refused."""
    _start(cluster, ("n1", "n2"))
    job = cluster.submit(_three_units(tmp_path, extra='verify_images = "full"'))
    cluster.wait_status(job, _running)
    ck = cluster.cli_json("checkpoint", job)
    seq = next(u["seq"] for u in ck["units"] if u["name"] == "a")
    images = cluster.store / "jobs" / job / "units" / "a" / str(seq)
    victim = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    manifest = json.loads((images / "manifest.json").read_text())
    manifest["files"][victim.name]["sha256"] = "0" * 64
    (images / "manifest.json").write_text(json.dumps(manifest))
    r = cluster.cli("restart", job)
    assert r.returncode == 1 and victim.name in r.stderr and "sha256" in r.stderr, r.stderr
    cluster.wait_status(job, _running)  # refused before the running job was touched


def test_periodic_checkpoints_and_auto_restart(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster, ("n1", "n2"))
    job = cluster.submit(_three_units(tmp_path, extra='checkpoint_every = "1s"\nrestart = "auto"\nmax_restarts = 2'))
    cluster.wait_status(job, _running)
    deadline = time.monotonic() + 15
    while len(cluster.cli_json("checkpoints", job)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    ckpts = cluster.cli_json("checkpoints", job)
    assert len(ckpts) >= 2
    before = _step(cluster, job, "b")
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "b")["pid"], signal.SIGKILL)
    st = cluster.wait_status(job, lambda s: s["restarts"] == 1 and _running(s), timeout=20)
    assert unit_of(st, "b")["state"] == "running"
    n = _wait_step(cluster, job, "b", 0)
    assert n > 3 and n <= before + 40  # resumed from a checkpoint, not from step 1




def _criu_children(pid: int) -> set[int]:
    """The live criu processes an agent started (ahead: a dump session, restore slots)."""
    found = set()
    for child in psutil.Process(pid).children():
        try:
            if os.path.basename(child.exe()) == "criu" and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


def _gone(pids: set[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            pass
    return True


def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _one_unit_running(cluster: Cluster, tmp_path: Path) -> str:
    """One agent (n1) and a job of one CRIU unit ``a`` (progress.py), running."""
    _start(cluster, ("n1",))
    jf = write_job(tmp_path / "one.toml", f'''
name = "one"
[[units]]
name = "a"
command = ["python3", "{PROGRESS}", "--every", "0.05"]
''')
    job = cluster.submit(jf)
    cluster.wait_status(job, _running)
    return job


def test_criu_started_ahead_through_the_daemons(cluster: Cluster, tmp_path: Path) -> None:
    """The agent starts criu ahead (a dump waiting for the unit's next checkpoint, a restore
    slot): checkpoints and restarts say they used it, and a stopped agent leaves none behind."""
    job = _one_unit_running(cluster, tmp_path)
    agent = cluster.procs["agent-n1"].pid
    _until(lambda: len(_criu_children(agent)) == 2, 10, "a dump session and a restore slot")
    for _ in range(2):
        ck = cluster.cli_json("checkpoint", job)
        assert ck["units"][0]["started_ahead"] is True, ck
    at_ckpt = _step(cluster, job, "a")
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "a")["pid"], signal.SIGKILL)
    cluster.wait_status(job, lambda s: unit_of(s, "a")["state"] == "failed", timeout=5)
    rs = cluster.cli_json("restart", job, "--checkpoint", ck["checkpoint"])
    assert rs["units"][0]["started_ahead"] is True, rs
    cluster.wait_status(job, _running)
    _wait_step(cluster, job, "a", at_ckpt)
    out = (cluster.store / "jobs" / job / "units" / "a" / "stdout").read_text()
    steps = [int(m) for m in re.findall(r"step=(\d+)", out)]
    assert steps == list(range(1, len(steps) + 1)), "rolled back to the checkpoint and went on"
    _until(lambda: len(_criu_children(agent)) == 2, 10, "criu ahead again, for the restored tree")
    assert cluster.cli_json("checkpoint", job)["units"][0]["started_ahead"] is True
    _until(lambda: len(_criu_children(agent)) == 2, 10, "criu ahead again after the checkpoint")
    ahead = _criu_children(agent)
    cluster.stop("agent-n1")
    _until(lambda: _gone(ahead), 5, "the agent's criu processes to end with it")
    _wait_step(cluster, job, "a", _step(cluster, job, "a"))        # the unit itself runs on


def test_restored_unit_outlives_an_agent_restart(cluster: Cluster, tmp_path: Path) -> None:
    job = _one_unit_running(cluster, tmp_path)
    ck = cluster.cli_json("checkpoint", job)
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "a")["pid"], signal.SIGKILL)
    cluster.wait_status(job, lambda s: unit_of(s, "a")["state"] == "failed", timeout=5)
    cluster.cli_json("restart", job, "--checkpoint", ck["checkpoint"])
    pid = unit_of(cluster.wait_status(job, _running), "a")["pid"]
    agent = cluster.procs["agent-n1"].pid
    _until(lambda: len(_criu_children(agent)) == 2, 10, "criu started ahead")
    ahead = _criu_children(agent)
    cluster.stop("agent-n1", signal.SIGKILL)
    _until(lambda: _gone(ahead), 5, "criu started ahead to end with its killed agent")
    time.sleep(0.5)
    _wait_step(cluster, job, "a", _step(cluster, job, "a"))  # the restored unit runs on without its agent
    cluster.agent("n1")  # and the next agent adopts it
    deadline = time.monotonic() + 15
    while "unit adopted" not in cluster.log("agent-n1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"unit adopted job={job} unit=a pid={pid}" in cluster.log("agent-n1"), cluster.log("agent-n1")[-2000:]
    cluster.wait_status(job, lambda s: unit_of(s, "a")["state"] == "running" and unit_of(s, "a")["pid"] == pid)
    _wait_step(cluster, job, "a", _step(cluster, job, "a"))
    agent = cluster.procs["agent-n1"].pid      # it starts criu ahead for the unit it adopted
    _until(lambda: len(_criu_children(agent)) == 2, 10, "criu started ahead by the new agent")
    assert cluster.cli_json("checkpoint", job)["units"][0]["started_ahead"] is True
    os.kill(pid, signal.SIGKILL)  # and the new agent sees it die
    cluster.wait_status(job, lambda s: unit_of(s, "a")["state"] in ("failed", "exited"), timeout=5)
