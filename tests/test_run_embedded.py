"""`gridckpt run`: the embedded orchestrator and agent over memory://, as the README shows it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLES, REPO, kill_store_processes, write_job

PROGRESS = EXAMPLES / "progress.py"


def _run(args: list[str], store: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRIDCKPT_STORE=str(store))
    env.pop("GRIDCKPT_BROKER", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_exits_with_the_jobs_outcome(tmp_path: Path) -> None:
    ok = write_job(tmp_path / "ok.toml", f'''name = "ok"
[[units]]
name = "a"
command = ["python3", "{PROGRESS}", "--steps", "3", "--every", "0.05"]
[[units]]
name = "b"
command = ["python3", "{PROGRESS}", "--steps", "5", "--every", "0.05"]
''')
    r = _run([str(ok)], tmp_path / "s1")
    assert r.returncode == 0, r.stderr
    assert "unit a: exited" in r.stdout and "succeeded" in r.stdout
    bad = write_job(tmp_path / "bad.toml", f'''name = "bad"
[[units]]
name = "a"
command = ["python3", "{PROGRESS}", "--steps", "3", "--every", "0.05", "--exit-code", "4"]
''')
    r = _run([str(bad)], tmp_path / "s2")
    assert r.returncode == 1 and "exit=4" in r.stdout, (r.stdout, r.stderr)


def test_run_rejects_a_bad_job_file_in_one_line(tmp_path: Path) -> None:
    bad = write_job(tmp_path / "broken.toml", 'name = "x"\nunits = 3\n')
    r = _run([str(bad)], tmp_path / "s")
    assert r.returncode == 2 and "broken.toml" in r.stderr and "units" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_cancels_cleanly(tmp_path: Path) -> None:
    job = write_job(tmp_path / "long.toml", f'''name = "long"
[[units]]
name = "a"
command = ["python3", "{PROGRESS}", "--child"]
''')
    store = tmp_path / "s"
    env = dict(os.environ, GRIDCKPT_STORE=str(store))
    env.pop("GRIDCKPT_BROKER", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(job)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        out = store / "jobs"
        while time.monotonic() < deadline and not list(out.glob("*/units/a/stdout")):
            time.sleep(0.1)
        time.sleep(0.5)
        pids = [p.pid for p in psutil.process_iter() if _in_store(p, store)]
        assert pids, "the unit did not start"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, (stdout, stderr)
        assert "cancelling the job" in stdout
        time.sleep(0.2)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_store_processes(store)


def _in_store(p: psutil.Process, store: Path) -> bool:
    try:
        return any(str(store) in v for v in p.environ().values())
    except (psutil.Error, OSError):
        return False


@pytest.mark.criu
def test_the_readme_main_job(tmp_path: Path) -> None:
    """`gridckpt run --demo examples/demo.toml`: checkpoint, kill, restart, proof of continuation."""
    r = _run(["--demo", "--demo-wait", "1.5", str(EXAMPLES / "demo.toml")], tmp_path / "store", timeout=180)
    try:
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        out = r.stdout
        for stage in ("prepare", "stop", "checkpoint", "resume_cp", "rebuild", "resume_rst"):
            assert stage in out
        assert "all units running after the restart" in out
        # the killed unit's first line after the restart continues from its checkpoint
        block = out.split("== 5.")[1]
        for unit in ("counter", "tree", "app"):
            assert f"  {unit}:" in block, block
        m = re.search(r"counter:\s+at checkpoint\s+count (\d+).*?before the kill count (\d+).*?"
                      r"first after restart count (\d+)", block, re.S)
        assert m, block
        at, before, first = (int(x) for x in m.groups())
        assert 1 < first <= at + 2 and first < before, block  # went on from the checkpoint, not from 1
    finally:
        kill_store_processes(tmp_path / "store")
