"""Determinant shipping end to end: two units on two agents over RabbitMQ, agent killed mid-flow."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, Cluster, unit_of, write_job

pytestmark = pytest.mark.amqp

ROUNDS = 400


def _totals(path: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in ("send", "recv"):
            key = (rec["unit"], rec["kind"])
            out[key] = out.get(key, 0) + rec["end"] - rec["start"]
    return out


def test_records_exact_across_agent_restart(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.agent("n2")
    cluster.wait_agents(2)
    port = 17000 + int(time.time() * 1000) % 2000
    job_file = write_job(tmp_path / "pair.toml", f'''
name = "pair"
[[units]]
name = "server"
command = ["python3", "{EXAMPLES}/tcp_pair.py", "serve", "--port", "{port}", "--once"]
node = "n1"
interpose = true
[[units]]
name = "client"
command = ["python3", "{EXAMPLES}/tcp_pair.py", "call", "--port", "{port}", "--rounds", "{ROUNDS}", "--every", "0.005"]
node = "n2"
interpose = true
''')
    job = cluster.submit(job_file)
    cluster.wait_status(job, lambda s: unit_of(s, "client")["state"] == "running")
    time.sleep(0.8)  # records are flowing
    cluster.stop("agent-n2", signal.SIGKILL)
    time.sleep(0.5)
    cluster.agent("n2")  # adopts the running client and resumes shipping where it was confirmed
    st = cluster.wait_status(job, lambda s: all(u["state"] in ("exited", "failed") for u in s["units"]), timeout=60)
    assert unit_of(st, "server")["exit_code"] == 0, st
    expected = sum(len(f"msg {i}\n") for i in range(1, ROUNDS + 1))
    want = {("client", "send"): expected, ("client", "recv"): expected,
            ("server", "send"): expected, ("server", "recv"): expected}
    export = tmp_path / "det.jsonl"
    deadline = time.monotonic() + 20
    got: dict = {}
    while time.monotonic() < deadline:
        cluster.cli_json("determinants", job, "--export", str(export))
        got = _totals(export)
        if got == want:
            break
        time.sleep(0.3)
    assert got == want
    conns = {json.loads(l)["conn"] for l in export.read_text().splitlines() if '"conn"' in l}
    assert len(conns) == 2  # one id per direction, named alike by both ends


def _pair_job(tmp_path: Path, rounds: int, every: str) -> Path:
    port = 17000 + int(time.time() * 1000) % 2000
    return write_job(tmp_path / "pair.toml", f'''
name = "pair"
[[units]]
name = "server"
command = ["python3", "{EXAMPLES}/tcp_pair.py", "serve", "--port", "{port}", "--once"]
node = "n1"
interpose = true
[[units]]
name = "client"
command = ["python3", "{EXAMPLES}/tcp_pair.py", "call", "--port", "{port}", "--rounds", "{rounds}", "--every", "{every}"]
node = "n1"
interpose = true
''')


def test_records_exact_across_broker_restart(cluster: Cluster, tmp_path: Path) -> None:
    import subprocess

    cluster.orchestrator()
    cluster.agent("n1")
    cluster.wait_agents(1)
    rounds = 300
    job = cluster.submit(_pair_job(tmp_path, rounds, "0.01"))
    cluster.wait_status(job, lambda s: unit_of(s, "client")["state"] == "running")
    time.sleep(0.8)
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=60)
    time.sleep(1.0)  # the units go on writing records while the broker is down
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, capture_output=True, timeout=60)
    st = cluster.wait_status(job, lambda s: all(u["state"] in ("exited", "failed") for u in s["units"]), timeout=60)
    assert unit_of(st, "client")["exit_code"] == 0, st
    expected = sum(len(f"msg {i}\n") for i in range(1, rounds + 1))
    want = {(u, k): expected for u in ("client", "server") for k in ("send", "recv")}
    export = tmp_path / "det.jsonl"
    deadline = time.monotonic() + 30
    got: dict = {}
    while time.monotonic() < deadline:
        r = cluster.cli("determinants", job, "--export", str(export), "--json")
        if r.returncode == 0:
            got = _totals(export)
            if got == want:
                break
        time.sleep(0.3)
    assert got == want
    for name, proc in cluster.procs.items():
        assert proc.poll() is None, f"{name} died with the broker: {cluster.log(name)[-1500:]}"
