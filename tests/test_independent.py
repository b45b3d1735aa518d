"""Independent checkpointing end to end: units talking TCP through the shim, a unit killed,
the online recovery line equal to the offline one, and a restart of exactly the units it names."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, Cluster, unit_of, write_job

pytestmark = pytest.mark.amqp

PIPE = EXAMPLES / "pipeline_app.py"


def _running(st: dict) -> bool:
    return all(u["state"] == "running" for u in st["units"])


def _job(tmp_path: Path, extra: str = "") -> Path:
    base = 18000 + int(time.time() * 1000) % 2000
    return write_job(tmp_path / "pipe.toml", f'''
name = "pipe"
protocol = "independent"
stage_timeout = "5s"
{extra}
[[units]]
name = "src"
command = ["python3", "{PIPE}", "source", "--to", "127.0.0.1:{base}"]
checkpointer = "app"
node = "n1"
[[units]]
name = "relay"
command = ["python3", "{PIPE}", "relay", "--listen", "{base}", "--to", "127.0.0.1:{base + 1}"]
checkpointer = "app"
node = "n2"
[[units]]
name = "sink"
command = ["python3", "{PIPE}", "sink", "--listen", "{base + 1}"]
checkpointer = "app"
node = "n1"
''')


def _start(cluster: Cluster) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.agent("n2")
    cluster.wait_agents(2)


def test_recovery_line_online_equals_offline_and_restart_follows_it(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster)
    job = cluster.submit(_job(tmp_path))
    cluster.wait_status(job, _running)
    time.sleep(0.8)
    for unit in ("sink", "src", "relay"):  # each unit alone, at its own time
        res = cluster.cli_json("checkpoint", job, "--unit", unit)
        assert res["units"][0]["name"] == unit and res["units"][0]["interval"] == 1
        time.sleep(0.3)
    cluster.cli_json("checkpoint", job, "--unit", "sink")  # sink's checkpoint 2
    time.sleep(0.5)
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "relay")["pid"], signal.SIGKILL)
    cluster.wait_status(job, lambda s: unit_of(s, "relay")["state"] == "failed", timeout=5)
    time.sleep(0.5)  # the last records reach the orchestrator
    online = cluster.cli_json("recovery-line", job)
    export = tmp_path / "det.jsonl"
    cluster.cli_json("determinants", job, "--export", str(export))
    offline = cluster.cli("recovery-line", "--log", str(export), "--failed", "relay", "--json")
    assert offline.returncode == 0, offline.stderr
    offline_line = json.loads(offline.stdout)
    assert online["line"] == offline_line["line"]
    assert online["replay"] == offline_line["replay"]
    line = online["line"]
    assert line["relay"] == 1  # the failed unit goes back to its newest checkpoint
    assert line["src"] == "current"  # a sender never rolls back for bytes it sent
    # sink read bytes relay sent after relay's checkpoint: orphans, so sink must roll back
    assert line["sink"] != "current"
    text = cluster.cli("recovery-line", job)
    assert text.returncode == 0 and "domino effect" in text.stdout
    rs = cluster.cli_json("restart", job, "--recovery-line")
    restored = {u["name"] for u in rs["units"]}
    assert restored == {u for u, v in line.items() if v != "current"}
    assert rs["line"] == line and rs["from"] == "recovery-line"
    st = cluster.wait_status(job, _running, timeout=20)
    out = (cluster.store / "jobs" / job / "units" / "relay" / "stdout").read_text()
    assert "relay restored" in out
    src_pid = unit_of(st, "src")["pid"]
    assert src_pid == unit_of(cluster.cli_json("status", job), "src")["pid"]  # src kept running


def test_periodic_independent_checkpoints_with_jitter(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster)
    job = cluster.submit(_job(tmp_path, 'checkpoint_every = "0.6s"'))
    cluster.wait_status(job, _running)
    time.sleep(3.5)
    store_units = cluster.store / "jobs" / job / "units"
    counts = {u: len(list((store_units / u).glob("[0-9]*/manifest.json"))) for u in ("src", "relay", "sink")}
    assert all(n >= 2 for n in counts.values()), counts
    times = sorted((json.loads(p.read_text()).get("created", 0), p.parent.parent.name)
                   for p in store_units.glob("*/[0-9]*/manifest.json"))
    # not in lockstep: checkpoints of different units are spread out in time
    firsts = {}
    for t, unit in times:
        firsts.setdefault(unit, t)
    assert max(firsts.values()) - min(firsts.values()) > 0.25, firsts  # staggered over the 0.6 s period
    online = cluster.cli_json("recovery-line", job)
    assert set(online["line"]) == {"src", "relay", "sink"}
    r = cluster.cli_json("gc", job, "--dry-run")
    assert r["dry_run"] is True


def test_unit_without_checkpoint_restarts_afresh_from_the_line(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster)
    job = cluster.submit(_job(tmp_path))
    cluster.wait_status(job, _running)
    cluster.cli_json("checkpoint", job, "--unit", "src")
    time.sleep(0.5)
    st = cluster.cli_json("status", job)
    os.kill(unit_of(st, "sink")["pid"], signal.SIGKILL)
    cluster.wait_status(job, lambda s: unit_of(s, "sink")["state"] == "failed", timeout=5)
    line = cluster.cli_json("recovery-line", job)["line"]
    assert line == {"src": "current", "relay": "current", "sink": 0}  # nothing flows back from sink
    r = cluster.cli("restart", job, "--recovery-line")
    assert r.returncode == 0, r.stderr
    assert "kept running: src, relay" in r.stdout and "sink" in r.stdout
    st = cluster.wait_status(job, _running, timeout=20)
    assert unit_of(st, "src")["pid"] == unit_of(cluster.cli_json("status", job), "src")["pid"]
    out = cluster.store / "jobs" / job / "units" / "sink" / "stdout"
    deadline = time.monotonic() + 10
    while "received=" not in out.read_text().split("restored")[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "restored" not in out.read_text()  # a fresh start, not a restore


def test_auto_restart_of_an_independent_job_follows_the_line(cluster: Cluster, tmp_path: Path) -> None:
    _start(cluster)
    job = cluster.submit(_job(tmp_path, 'restart = "auto"\nmax_restarts = 1'))
    cluster.wait_status(job, _running)
    time.sleep(0.3)
    for unit in ("relay", "sink"):
        cluster.cli_json("checkpoint", job, "--unit", unit)
    st = cluster.cli_json("status", job)
    src_pid = unit_of(st, "src")["pid"]
    os.kill(unit_of(st, "relay")["pid"], signal.SIGKILL)
    st = cluster.wait_status(job, lambda s: s["restarts"] == 1 and _running(s), timeout=20)
    assert unit_of(st, "src")["pid"] == src_pid  # the line kept the source running
    out = (cluster.store / "jobs" / job / "units" / "relay" / "stdout").read_text()
    assert "relay restored" in out
