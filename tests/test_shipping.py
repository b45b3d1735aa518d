"""Determinant shipping end to end: units on agents over RabbitMQ, an agent or the broker
restarted while records flow, and the exported totals still exact."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, Cluster, unit_of, write_job

pytestmark = pytest.mark.amqp


def _totals(path: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] in ("send", "recv"):
            key = (rec["unit"], rec["kind"])
            out[key] = out.get(key, 0) + rec["end"] - rec["start"]
    return out


def _pair_job(tmp_path: Path, rounds: int, every: str, client_node: str) -> Path:
    """An echo server on n1 and a client doing ``rounds`` round trips, both under the shim."""
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
node = "{client_node}"
interpose = true
''')


def _assert_exact_totals(cluster: Cluster, job: str, rounds: int, tmp_path: Path) -> Path:
    """Wait for the pair to finish; the exported records must count every byte once."""
    st = cluster.wait_status(job, lambda s: all(u["state"] in ("exited", "failed") for u in s["units"]), timeout=60)
    assert unit_of(st, "server")["exit_code"] == 0, st  # (an adopted unit's exit status is not known)
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
    return export


def test_records_exact_across_agent_restart(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.agent("n2")
    cluster.wait_agents(2)
    rounds = 400
    job = cluster.submit(_pair_job(tmp_path, rounds, "0.005", "n2"))
    cluster.wait_status(job, lambda s: unit_of(s, "client")["state"] == "running")
    time.sleep(0.8)  # records are flowing
    cluster.stop("agent-n2", signal.SIGKILL)
    time.sleep(0.5)
    cluster.agent("n2")  # adopts the running client and resumes shipping where it was confirmed
    export = _assert_exact_totals(cluster, job, rounds, tmp_path)
    conns = {json.loads(line)["conn"] for line in export.read_text().splitlines() if '"conn"' in line}
    assert len(conns) == 2  # one id per direction, named alike by both ends


def test_records_exact_across_broker_restart(cluster: Cluster, tmp_path: Path) -> None:
    cluster.orchestrator()
    cluster.agent("n1")
    cluster.wait_agents(1)
    rounds = 300
    job = cluster.submit(_pair_job(tmp_path, rounds, "0.01", "n1"))
    cluster.wait_status(job, lambda s: unit_of(s, "client")["state"] == "running")
    time.sleep(0.8)
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=60)
    time.sleep(1.0)  # the units go on writing records while the broker is down
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, capture_output=True, timeout=60)
    _assert_exact_totals(cluster, job, rounds, tmp_path)
    for name, proc in cluster.procs.items():
        assert proc.poll() is None, f"{name} died with the broker: {cluster.log(name)[-1500:]}"
