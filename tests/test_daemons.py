"""The platform at the level a user meets it: daemons in separate processes over RabbitMQ, the CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLES, Cluster, unit_of, write_job

pytestmark = pytest.mark.amqp

PROGRESS = EXAMPLES / "progress.py"


def _job(tmp_path: Path, name: str, units: str, extra: str = "") -> Path:
    return write_job(tmp_path / f"{name}.toml", f'name = "{name}"\n{extra}\n{units}')


def _unit(name: str, args: str = "", node: str | None = None, ckpt: str = "criu") -> str:
    node_line = f'node = "{node}"\n' if node else ""
    return (f'[[units]]\nname = "{name}"\ncommand = ["python3", "{PROGRESS}", "--every", "0.1"{args}]\n'
            f'checkpointer = "{ckpt}"\n{node_line}\n')


def _all_running(st: dict) -> bool:
    return st["state"] == "running" and all(u["state"] == "running" for u in st["units"])


def test_submit_status_cancel_across_two_agents(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.agent("n2")
    cluster.wait_agents(2)
    jf = _job(tmp_path, "three", _unit("a") + _unit("b", ', "--child"', node="n2") + _unit("c"))
    job = cluster.submit(jf)
    st = cluster.wait_status(job, _all_running)
    nodes = {u["name"]: u["node"] for u in st["units"]}
    assert nodes["b"] == "n2"
    assert set(nodes.values()) == {"n1", "n2"}, nodes  # least loaded spreads the others
    b = unit_of(st, "b")
    assert b["pid"] and psutil.pid_exists(b["pid"])
    st = cluster.wait_status(job, lambda s: unit_of(s, "b")["nprocs"] >= 2)  # the forked child is followed
    pids = {u["name"]: u["pid"] for u in st["units"]}
    tree = []
    for pid in pids.values():
        proc = psutil.Process(pid)
        tree += [proc] + proc.children(recursive=True)
    # the unit's output goes to files in its directory in the store
    out = cluster.store / "jobs" / job / "units" / "a" / "stdout"
    deadline = time.monotonic() + 5
    while "step=" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "a step=" in out.read_text()
    text = cluster.cli("status", job)
    assert text.returncode == 0 and "running" in text.stdout and "n2" in text.stdout
    r = cluster.cli("cancel", job)
    assert r.returncode == 0, r.stderr
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "cancel left processes behind"
    st = cluster.cli_json("status", job)
    assert st["state"] == "cancelled"


def test_unit_exit_code_and_kill_detection(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.wait_agents(1)
    jf = _job(tmp_path, "ends", _unit("quits", ', "--steps", "5", "--exit-code", "3"') + _unit("victim"))
    job = cluster.submit(jf)
    st = cluster.wait_status(job, lambda s: unit_of(s, "quits")["state"] == "exited")
    assert unit_of(st, "quits")["exit_code"] == 3
    st = cluster.wait_status(job, lambda s: unit_of(s, "victim")["state"] == "running")
    pid = unit_of(st, "victim")["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    st = cluster.wait_status(job, lambda s: unit_of(s, "victim")["state"] == "failed", timeout=10)
    assert time.monotonic() - t0 < 3.0, "a killed unit must be reported failed within 3 s"
    assert unit_of(st, "victim")["signal"] == signal.SIGKILL
    assert st["state"] == "failed"


def test_agent_loss_marks_units_lost(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.agent("n2")
    cluster.wait_agents(2)
    job = cluster.submit(_job(tmp_path, "loss", _unit("x", node="n1") + _unit("y", node="n2")))
    cluster.wait_status(job, _all_running)
    cluster.stop("agent-n2", signal.SIGKILL)
    t0 = time.monotonic()
    st = cluster.wait_status(job, lambda s: unit_of(s, "y")["state"] == "lost", timeout=10)
    # 3 heartbeat intervals of 0.3 s, plus the watcher's period and the CLI's polling
    assert time.monotonic() - t0 < 3 * cluster.heartbeat + 1.5
    assert unit_of(st, "x")["state"] == "running"
    allst = cluster.cli_json("status")
    assert [a for a in allst["agents"] if a["node"] == "n2"][0]["lost"] is True


def test_submit_without_agents_and_bad_job_files(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    good = _job(tmp_path, "lonely", _unit("a"))
    deadline = time.monotonic() + 10
    r = cluster.cli("submit", str(good))
    while "no orchestrator" in r.stderr and time.monotonic() < deadline:
        time.sleep(0.2)
        r = cluster.cli("submit", str(good))
    assert r.returncode == 1 and "no live node agent" in r.stderr
    bad = {
        'name = "x"\nbogus = 1\n' + _unit("a"): "bogus",
        'name = "x"\n' + _unit("a") + _unit("a"): "name",
        'name = "x"\n[[units]]\nname = "a"\ncommand = []\n': "command",
        'name = "x"\n' + _unit("a", ckpt="dmtcpx"): "checkpointer",
        'name = "x"\ncheckpoint_every = "soon"\n' + _unit("a"): "checkpoint_every",
        'name = "x"\nmax_restarts = "three"\n' + _unit("a"): "max_restarts",
        'name = "x"\n[[units]]\nname = "a"\ncommand = ["true"]\nenv = { A = 1 }\n': "env",
        'name = "x"\n[[units\n': "",
    }
    for i, (text, key) in enumerate(bad.items()):
        path = write_job(tmp_path / f"bad{i}.toml", text)
        r = cluster.cli("submit", str(path))
        assert r.returncode == 2, (text, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert f"bad{i}.toml" in r.stderr and key in r.stderr, r.stderr
    r = cluster.cli("submit", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    c = Cluster("amqp://guest:guest@localhost/", tmp_path)
    for args in (["frobnicate"], ["restart", "j", "--place", "nonsense"], ["status", "--timeout", "x"],
                 ["recovery-line"]):
        r = c.cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_sigterm_shuts_down_cleanly_with_json_logs(vhost_url: str, tmp_path: Path) -> None:
    c = Cluster(vhost_url, tmp_path / "store")
    try:
        c.start("orchestrator", "orchestrator", "--log-json")
        c.start("agent", "agent", "--node", "n1", "--log-json")
        c.wait_agents(1)
        assert c.stop("agent") == 0
        assert c.stop("orchestrator") == 0
        for name in ("orchestrator", "agent"):
            lines = [json.loads(line) for line in c.log(name).splitlines() if line.strip()]
            events = [l["event"] for l in lines]
            assert f"{name} started" in events and f"{name} stopped" in events, events
    finally:
        c.close()


def test_fuzzed_messages_leave_daemons_running(cluster: Cluster, tmp_path: Path) -> None:
    import asyncio

    from fuzzmsgs import fuzz_bodies
    from orchestrator import protocol
    from orchestrator.bus import open_bus

    cluster.orchestrator()
    cluster.agent("n1")
    cluster.wait_agents(1)
    keys = ["events.s1.n1", "heartbeat.s1.n1", "orchestrator.control", "agent.s1.n1", "determinants.s1.n1"]
    bodies = fuzz_bodies(1000, seed=7)

    async def blast() -> int:
        bus = open_bus(cluster.url)
        await bus.connect()
        try:
            await asyncio.gather(*(bus.publish_raw(keys[i % len(keys)], body, message_id=f"fuzz-{i}")
                                   for i, (_cat, body) in enumerate(bodies)))
            deadline = time.monotonic() + 30
            dead: list = []
            while len(dead) < len(bodies) and time.monotonic() < deadline:
                dead += await bus.dead_letters()
                await asyncio.sleep(0.2)
            return len(dead)
        finally:
            await bus.close()

    assert asyncio.run(blast()) == len(bodies)
    for name, proc in cluster.procs.items():
        assert proc.poll() is None, f"{name} died: {cluster.log(name)[-2000:]}"
    job = cluster.submit(_job(tmp_path, "after", _unit("a")))
    cluster.wait_status(job, _all_running)
    assert "rejected" in cluster.log("orchestrator") or "dead" in cluster.log("orchestrator").lower()
    assert protocol.PROTOCOL_VERSION == 1


def test_unreachable_broker_is_one_line_without_the_password(tmp_path: Path) -> None:
    c = Cluster("amqp://guest:guest@localhost/", tmp_path)
    r = c.cli("status", "--broker", "amqp://guest:s3cret@localhost:5999/", timeout=60)
    assert r.returncode == 1 and "cannot reach the broker" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "s3cret" not in r.stderr, r.stderr
