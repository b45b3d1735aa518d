"""Shared fixtures: a fresh RabbitMQ vhost per test, daemons in separate processes, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
BROKER = os.environ.get("GRIDCKPT_TEST_BROKER", "amqp://guest:guest@localhost/")


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost_url() -> Iterator[str]:
    """An amqp:// URL of a brand-new vhost (a virtual organisation of our own), deleted after."""
    name = f"gridckpt-test-{uuid.uuid4().hex[:8]}"
    try:
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"RabbitMQ is needed for this test and rabbitmqctl failed: {exc} "
                    "(run the suite through deploy/test.sh, which starts the broker)")
    base = BROKER.rstrip("/")
    yield f"{base}/{name}"
    try:
        _rabbitmqctl("delete_vhost", name)
    except (OSError, subprocess.CalledProcessError):
        pass


def kill_store_processes(store: Path) -> int:
    """Kill every process whose environment points into ``store`` (a unit left behind)."""
    killed = 0
    needle = str(store)
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if any(needle in v for v in env.values()) and p.status() != psutil.STATUS_ZOMBIE:
            try:
                p.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


def release_job_cgroups(job: str) -> None:
    """Thaw, empty and remove a job's freezer cgroups (a test that failed mid-checkpoint
    must not leave frozen processes behind: a frozen process cannot even die)."""
    root = Path("/sys/fs/cgroup/freezer/gridckpt") / job
    if not root.is_dir():
        return
    for unit in root.iterdir():
        if not unit.is_dir():
            continue
        try:
            for pid in (unit / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            (unit / "freezer.state").write_text("THAWED")
        except OSError:
            pass
    deadline = time.monotonic() + 5
    for unit in [u for u in root.iterdir() if u.is_dir()] + [root]:
        while time.monotonic() < deadline:
            try:
                unit.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


class Cluster:
    """Daemons (orchestrator, agents) as separate processes and a CLI runner, on one store."""

    def __init__(self, url: str, store: Path, heartbeat: float = 0.3) -> None:
        self.url = url
        self.store = store
        self.heartbeat = heartbeat
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: list[str] = []
        self.logdir = store / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(GRIDCKPT_BROKER=self.url, GRIDCKPT_STORE=str(self.store), PYTHONUNBUFFERED="1")
        return env

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "--heartbeat", str(self.heartbeat)],
                                env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs[name] = proc
        return proc

    def orchestrator(self) -> subprocess.Popen:
        return self.start("orchestrator", "orchestrator")

    def agent(self, node: str, site: str = "s1") -> subprocess.Popen:
        return self.start(f"agent-{node}", "agent", "--node", node, "--site", site)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=self.env(), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 60) -> Any:
        r = self.cli(*args, "--json", timeout=timeout)
        assert r.returncode == 0, f"gridckpt {' '.join(args)} failed ({r.returncode}): {r.stderr}"
        return json.loads(r.stdout)

    def submit(self, job_file: Path) -> str:
        job = self.cli_json("submit", str(job_file))["job"]
        self.jobs.append(job)
        return job

    def wait_agents(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            r = self.cli("status", "--json", timeout=10)
            if r.returncode == 0:
                last = json.loads(r.stdout)
                if sum(1 for a in last["agents"] if not a["lost"]) >= n:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{n} agents did not register: {last}")

    def wait_status(self, job: str, pred: Any, timeout: float = 20) -> dict[str, Any]:
        """Poll `gridckpt status JOB --json` until ``pred(status)`` holds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            r = self.cli("status", job, "--json", timeout=10)
            if r.returncode == 0:
                last = json.loads(r.stdout)
                if pred(last):
                    return last
            time.sleep(0.15)
        raise AssertionError(f"condition not reached for {job}; last status: {last}")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{name} did not stop within {timeout} s")

    def close(self) -> None:
        for job in self.jobs:
            if "orchestrator" in self.procs and self.procs["orchestrator"].poll() is None:
                self.cli("cancel", job, timeout=30)
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        kill_store_processes(self.store)
        for job in self.jobs:
            release_job_cgroups(job)


def unit_of(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(u for u in status["units"] if u["name"] == name)


@pytest.fixture
def cluster(vhost_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(vhost_url, tmp_path / "store")
    try:
        yield c
    finally:
        c.close()


def write_job(path: Path, text: str) -> Path:
    """Write a job file next to the examples' programs (their commands are relative)."""
    path.write_text(text)
    return path
