"""The app checkpointer on real programs: examples/counter_app.py saves and restores itself."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodeagent.appclient import AppClient
from nodeagent.checkpointers.app import AppCheckpointer, socket_path_for
from nodeagent.checkpointers.base import CheckpointError
from nodeagent.stages import UnitStageRunner
from nodeagent.units import Unit
from orchestrator.store import Store

ROOT = Path(__file__).resolve().parents[1]
COUNTER = str(ROOT / "examples" / "counter_app.py")
PY = sys.executable


def counts(u: Unit) -> list[int]:
    return [int(m) for m in re.findall(r"^count (\d+)$", (u.unit_dir / "stdout").read_text(), re.M)]


async def wait_for(pred, timeout: float = 10.0, step: float = 0.01) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


@pytest.fixture
async def env(tmp_path):
    """A store, a runner with a short-timeout app backend, and cleanup of every unit."""
    store = Store(tmp_path / "store")
    backend = AppCheckpointer(timeout=5.0, connect_timeout=10.0)
    runner = UnitStageRunner(store, node="n1", backends={"app": backend}, callback_timeout=5.0)
    units: list[Unit] = []

    async def start(name: str, command: list[str], **spec) -> Unit:
        spec = {"command": command, "checkpointer": "app", **spec}
        u = Unit("job1", name, spec, store.unit_dir("job1", name), cwd=ROOT)
        units.append(u)
        await u.launch(backend.plan_launch(u, command))
        return u

    yield store, backend, runner, start
    for u in units:
        await u.close()
        await runner.release(u)


async def checkpoint(runner, u, cid, seq) -> dict:
    out = {}
    for stage in ("prepare", "stop", "checkpoint", "resume_cp"):
        out[stage] = await runner.run(u, stage, cid, seq)
    return out


async def test_checkpoint_then_restart_continues_from_saved_count(env):
    store, backend, runner, start = env
    u = await start("c", [PY, COUNTER, "--interval", "0.01"])
    await wait_for(lambda: len(counts(u)) >= 5)
    res = await checkpoint(runner, u, "ck1", 1)
    images = store.images_dir("job1", "c", 1)
    saved = json.loads((images / "counter.json").read_text())["count"]
    manifest = json.loads((images / "manifest.json").read_text())
    assert manifest["checkpointer"] == "app" and "counter.json" in manifest["files"]
    assert set(manifest["stages_ms"]) >= {"prepare", "stop", "checkpoint"}
    assert res["checkpoint"]["data"]["bytes"] == manifest["bytes"] > 0
    assert all(r["ms"] >= 0 for r in res.values())
    # it goes on counting after resume_cp, and got the post-checkpoint hook
    await wait_for(lambda: max(counts(u)) >= saved + 5)
    assert "post_checkpoint ck1" in (u.unit_dir / "stdout").read_text()

    # lose it, then rebuild from the checkpoint
    os.kill(u.root_pid, signal.SIGKILL)
    assert await u.wait(3) == "failed"
    lost_at = max(counts(u))
    assert lost_at > saved
    reb = await runner.run(u, "rebuild", "rs1", 1)
    assert u.state == "stopped" and reb["data"]["pid"] == u.root_pid
    n_lines = len(counts(u))
    await asyncio.sleep(0.2)
    assert len(counts(u)) == n_lines, "a rebuilt unit ran before resume_rst"
    await runner.run(u, "resume_rst", "rs1", 1)
    assert u.state == "running"
    await wait_for(lambda: len(counts(u)) >= n_lines + 3)
    out = (u.unit_dir / "stdout").read_text()
    assert f"restored count {saved} from {images}" in out
    assert f"restart callback {images}" in out
    after = counts(u)[n_lines:]
    assert after[0] == saved + 1, f"restarted at {after[0]}, not from the checkpoint ({saved})"


async def test_failing_pre_checkpoint_callback_aborts_cleanly(env, tmp_path):
    store, backend, runner, start = env
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\necho flushing\necho 'disk full' >&2\nexit 4\n")
    hook.chmod(0o755)
    u = await start("c", [PY, COUNTER, "--interval", "0.01"],
                    callbacks={"pre_checkpoint": [str(hook)]})
    await wait_for(lambda: len(counts(u)) >= 2)
    with pytest.raises(CheckpointError) as e:
        await runner.run(u, "prepare", "ck1", 1)
    msg = str(e.value)
    assert "pre_checkpoint" in msg and "exit code 4" in msg and "disk full" in msg
    assert "\n" not in msg
    await runner.run(u, "abort", "ck1", 1)
    assert not store.images_dir("job1", "c", 1).exists()
    n = max(counts(u))
    await wait_for(lambda: max(counts(u)) > n + 2)       # still running
    assert "checkpoint count" not in (u.unit_dir / "stdout").read_text()


async def test_abort_after_save_unblocks_the_program(env):
    store, backend, runner, start = env
    u = await start("c", [PY, COUNTER, "--interval", "0.01"])
    await wait_for(lambda: len(counts(u)) >= 2)
    await runner.run(u, "prepare", "ck1", 1)
    await runner.run(u, "stop", "ck1", 1)
    await runner.run(u, "abort", "ck1", 1)
    assert not store.images_dir("job1", "c", 1).exists()
    n = max(counts(u))
    await wait_for(lambda: max(counts(u)) > n + 2)


async def test_program_error_and_silence_fail_the_stage(env, tmp_path):
    store, backend, runner, start = env
    backend.timeout = 0.5
    failing = tmp_path / "failing.py"
    failing.write_text(
        "import time\nfrom nodeagent.appclient import AppClient\n"
        "c = AppClient.from_env()\n"
        "def save(d):\n    raise OSError('quota exceeded')\n"
        "c.on_checkpoint(save); c.start()\n"
        "while True: time.sleep(0.05)\n")
    u = await start("f", [PY, str(failing)])
    with pytest.raises(CheckpointError, match="refused CHECKPOINT: OSError: quota exceeded"):
        await runner.run(u, "prepare", "ck1", 1)
    # a program that never reaches a safe point: the checkpoint times out
    silent = tmp_path / "silent.py"
    silent.write_text(
        "import time\nfrom nodeagent.appclient import AppClient\n"
        "c = AppClient.from_env(safe_points=True)\n"
        "c.on_checkpoint(lambda d: None); c.start()\n"
        "while True: time.sleep(0.05)\n")
    s = await start("s", [PY, str(silent)])
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="did not answer CHECKPOINT within 0.5 s"):
        await runner.run(s, "prepare", "ck1", 1)
    assert time.monotonic() - t0 < 3


async def test_two_connections_both_must_save(env, tmp_path):
    """A unit of two processes, each with its own connection: both save into the dir."""
    store, backend, runner, start = env
    prog = tmp_path / "pair.py"
    prog.write_text(
        "import os, time\nfrom nodeagent.appclient import AppClient\n"
        "child = os.fork()\n"
        "c = AppClient.from_env()\n"
        "def save(d):\n    open(os.path.join(d, f'part-{os.getpid()}'), 'w').write('x')\n"
        "c.on_checkpoint(save); c.start()\n"
        "while True: time.sleep(0.05)\n")
    u = await start("p", [PY, str(prog)])
    await wait_for(lambda: len(backend.connected_pids(u)) == 2)
    await checkpoint(runner, u, "ck1", 1)
    parts = sorted(p.name for p in store.images_dir("job1", "p", 1).glob("part-*"))
    assert parts == sorted(f"part-{pid}" for pid in backend.connected_pids(u))


def test_client_is_a_noop_without_the_agent(monkeypatch):
    monkeypatch.delenv("GRIDCKPT_APP_SOCKET", raising=False)
    monkeypatch.delenv("GRIDCKPT_RESTORE", raising=False)
    c = AppClient.from_env()
    c.on_checkpoint(lambda d: None)
    assert not c.enabled and c.start() is c and c.restore_path() is None
    assert c.safe_point() is False
    c.close()
    out = subprocess.run([PY, COUNTER, "--to", "3", "--interval", "0"], capture_output=True,
                         text=True, timeout=20, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "done at 3"


def test_socket_path_stays_short(tmp_path):
    class U:
        job, name = "j", "u"
        unit_dir = tmp_path / ("x" * 120) / "units" / "u"
    p = socket_path_for(U())
    assert len(p.encode()) <= 100 and p.endswith(".sock")
    U.unit_dir = tmp_path / "u"
    assert socket_path_for(U()) == str(tmp_path / "u" / "app.sock")


RAW = r'''
import json, os, socket, time
state = {"n": 0}
if os.environ.get("GRIDCKPT_RESTORE"):
    state = json.load(open(os.path.join(os.environ["GRIDCKPT_RESTORE"], "state.json")))
    print("restored", state["n"], flush=True)
s = socket.socket(socket.AF_UNIX); s.connect(os.environ["GRIDCKPT_APP_SOCKET"])
f = s.makefile("rw", newline="\n")
f.write(f"HELLO {os.getpid()} 1\n"); f.flush(); assert f.readline().startswith("WELCOME")
state["n"] = 41 if not os.environ.get("GRIDCKPT_RESTORE") else state["n"] + 1
for line in f:
    print("got", line.rstrip("\n"), flush=True)
    word, _, rest = line.rstrip("\n").partition(" ")
    if word == "CHECKPOINT":
        cid, _, d = rest.partition(" ")
        json.dump(state, open(os.path.join(d, "state.json"), "w"))
        f.write("DONE\n")
    else:
        f.write("OK\n")
    f.flush()
'''


async def test_protocol_spoken_without_the_client_module(env, tmp_path):
    """The documented line protocol, spoken by a program that only uses sockets."""
    store, backend, runner, start = env
    prog = tmp_path / "raw.py"
    prog.write_text(RAW)
    u = await start("r", [PY, str(prog)])
    await checkpoint(runner, u, "ck7", 1)
    images = store.images_dir("job1", "r", 1)
    lines = [ln for ln in (u.unit_dir / "stdout").read_text().splitlines() if ln.startswith("got")]
    assert lines == ["got PRE_CHECKPOINT ck7", f"got CHECKPOINT ck7 {images}",
                     "got RESUME ck7", "got POST_CHECKPOINT ck7"]
    await u.kill()
    await runner.run(u, "rebuild", "rs1", 1)
    await runner.run(u, "resume_rst", "rs1", 1)
    await wait_for(lambda: f"got RESTART {images}" in (u.unit_dir / "stdout").read_text())
    assert "restored 41" in (u.unit_dir / "stdout").read_text()


async def test_late_answer_after_timeout_keeps_the_protocol_in_step(env, tmp_path):
    """A program slower than the deadline: the stage fails, abort unblocks it, and the next
    checkpoint (with a longer deadline) works: late answers are not taken for new ones."""
    store, backend, runner, start = env
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import os, time\nfrom nodeagent.appclient import AppClient\n"
        "c = AppClient.from_env(safe_points=True)\n"
        "n = 0\n"
        "def save(d):\n    open(os.path.join(d, 'n'), 'w').write(str(n))\n"
        "c.on_checkpoint(save); c.start()\n"
        "while True:\n    n += 1\n    print('step', n, flush=True)\n"
        "    time.sleep(0.4)\n    c.safe_point()\n")
    u = await start("s", [PY, str(slow)])
    backend.timeout = 0.1
    with pytest.raises(CheckpointError, match="did not answer"):
        await runner.run(u, "prepare", "ck1", 1)
    await runner.run(u, "abort", "ck1", 1)
    steps = lambda: (u.unit_dir / "stdout").read_text().count("step")   # noqa: E731
    n = steps()
    await wait_for(lambda: steps() >= n + 2)          # not left quiesced
    backend.timeout = 3.0
    await checkpoint(runner, u, "ck2", 2)
    assert (store.images_dir("job1", "s", 2) / "n").read_text().isdigit()
    n = steps()
    await wait_for(lambda: steps() >= n + 2)


async def test_asyncio_program_uses_async_safe_points(env, tmp_path):
    store, backend, runner, start = env
    prog = tmp_path / "aio.py"
    prog.write_text(
        "import asyncio, os\nfrom nodeagent.appclient import AppClient\n"
        "async def main():\n"
        "    c = AppClient.from_env(safe_points=True)\n"
        "    n = 0\n"
        "    def save(d):\n        open(os.path.join(d, 'n'), 'w').write(str(n))\n"
        "    c.on_checkpoint(save); c.start()\n"
        "    while True:\n"
        "        n += 1\n        print('n', n, flush=True)\n"
        "        await asyncio.sleep(0.01)\n        await c.asafe_point()\n"
        "asyncio.run(main())\n")
    u = await start("aio", [PY, str(prog)])
    await wait_for(lambda: (u.unit_dir / "stdout").read_text().count("n ") >= 3)
    await runner.run(u, "prepare", "ck1", 1)
    saved = int((store.images_dir("job1", "aio", 1) / "n").read_text())
    await asyncio.sleep(0.1)     # quiesced: no step after the saved one until RESUME
    last = int((u.unit_dir / "stdout").read_text().split()[-1])
    assert last == saved
    for stage in ("stop", "checkpoint", "resume_cp"):
        await runner.run(u, stage, "ck1", 1)
    await wait_for(lambda: int((u.unit_dir / "stdout").read_text().split()[-1]) > saved + 2)


async def test_announced_hooks_spare_the_other_round_trips(env, tmp_path):
    """HELLO <pid> 1 <hooks>: only the optional requests the program handles are sent."""
    store, backend, runner, start = env
    prog = tmp_path / "hooks.py"
    prog.write_text(RAW.replace('f.write(f"HELLO {os.getpid()} 1\\n")',
                                'f.write(f"HELLO {os.getpid()} 1 POST_CHECKPOINT\\n")'))
    assert "POST_CHECKPOINT\\n" in prog.read_text()
    u = await start("h", [PY, str(prog)])
    await checkpoint(runner, u, "ck9", 1)
    lines = [ln for ln in (u.unit_dir / "stdout").read_text().splitlines() if ln.startswith("got")]
    images = store.images_dir("job1", "h", 1)
    assert lines == [f"got CHECKPOINT ck9 {images}", "got RESUME ck9", "got POST_CHECKPOINT ck9"]


async def test_resume_is_not_waited_for_but_the_next_request_is_in_step(env, tmp_path):
    """resume_cp does not wait for RESUME's OK (here 0.6 s late); the next request still goes
    out only after that OK: one request on the wire at a time, as the protocol promises."""
    store, backend, runner, start = env
    prog = tmp_path / "slow_resume.py"
    prog.write_text(RAW.replace('''    else:
        f.write("OK\\n")''', '''    elif word == "RESUME":
        time.sleep(0.6)
        print("answered RESUME", time.monotonic(), flush=True)
        f.write("OK\\n")
    else:
        print("got-at", word, time.monotonic(), flush=True)
        f.write("OK\\n")'''))
    assert "answered RESUME" in prog.read_text()
    u = await start("s", [PY, str(prog)])
    for stage in ("prepare", "stop", "checkpoint"):
        await runner.run(u, stage, "ck1", 1)
    t0 = time.monotonic()
    await runner.run(u, "resume_cp", "ck1", 1)          # POST_CHECKPOINT follows RESUME
    assert time.monotonic() - t0 >= 0.5, "POST_CHECKPOINT went out before RESUME was answered"
    out = (u.unit_dir / "stdout").read_text()
    answered = float(re.search(r"^answered RESUME (\S+)$", out, re.M).group(1))
    post = float(re.search(r"^got-at POST_CHECKPOINT (\S+)$", out, re.M).group(1))
    assert post >= answered
    # a program that handles no POST_CHECKPOINT: resume_cp returns without waiting for the OK
    prog2 = tmp_path / "slow_resume_nohooks.py"
    prog2.write_text(prog.read_text().replace('f.write(f"HELLO {os.getpid()} 1\\n")',
                                              'f.write(f"HELLO {os.getpid()} 1 -\\n")'))
    u2 = await start("t", [PY, str(prog2)])
    for stage in ("prepare", "stop", "checkpoint"):
        await runner.run(u2, stage, "ck2", 1)
    t0 = time.monotonic()
    await runner.run(u2, "resume_cp", "ck2", 1)
    assert time.monotonic() - t0 < 0.4, "resume_cp waited for RESUME's OK"
    t0 = time.monotonic()
    await runner.run(u2, "prepare", "ck3", 2)             # the next CHECKPOINT waits for it
    assert time.monotonic() - t0 >= 0.2
    await runner.run(u2, "abort", "ck3", 2)


async def test_the_c_client_of_the_protocol_checkpoints_twice(env, tmp_path):
    """bench/idle_app.c, the C client the scaling benchmark uses: it says HELLO with no hooks,
    saves its pid into <dir>/state on CHECKPOINT and leaves quiescence on RESUME, so a second
    checkpoint goes through as well; ABORT is answered too."""
    store, backend, runner, start = env
    binary = tmp_path / "idle_app"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(ROOT / "bench" / "idle_app.c")],
                   check=True)
    u = await start("c", [str(binary)])
    for seq in (1, 2):
        await checkpoint(runner, u, f"ck{seq}", seq)
        images = store.images_dir("job1", "c", seq)
        assert (images / "state").read_text() == str(u.root_pid)
        manifest = json.loads((images / "manifest.json").read_text())
        assert manifest["checkpointer"] == "app" and "state" in manifest["files"]
    await runner.run(u, "prepare", "ck3", 3)
    await runner.run(u, "abort", "ck3", 3)
    assert not store.images_dir("job1", "c", 3).exists()
    assert u.state == "running" and not u.ended


async def test_the_scaling_benchmarks_bare_round_asks_real_programs(tmp_path):
    """bench_raw_fanout, the baseline of the scaling table: real idle_app.c programs each write
    their state file and answer DONE to every round, and each round is timed."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_raw_fanout import build, raw_rounds
    finally:
        sys.path.remove(str(ROOT / "bench"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "work").mkdir()
    times = await raw_rounds(build(tmp_path / "bin"), [1, 3], 4, tmp_path / "work")
    assert {n: len(t) for n, t in times.items()} == {1: 4, 3: 4} and all(x > 0 for t in times.values() for x in t)
    states = sorted(p.read_text() for p in (tmp_path / "work").glob("d*/state"))
    assert len(states) == 4 and all(s.isdigit() for s in states)     # one state file per program


def test_the_benchmarks_say_in_one_line_when_there_is_no_broker(tmp_path):
    """A benchmark run with no RabbitMQ to reach (here: no rabbitmqctl at all) ends with a
    one-line reason and what to do, not a traceback."""
    code = "import sys; sys.path.insert(0, 'bench'); from benchenv import bench_broker; bench_broker()"
    env = {k: v for k, v in os.environ.items() if k != "GRIDCKPT_BENCH_BROKER"}
    env["PATH"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().startswith("benchmark: no local RabbitMQ broker to use") and "--broker" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_resume_acknowledgements_wait_for_the_gate_and_never_delay_a_request(env, tmp_path, monkeypatch):
    """Under a stage chain the programs' OKs to RESUME are read once the unit's background gate
    opens (the chain's answer is out), not in front of that answer; a request meanwhile is
    not held up by it (the hold would last 30 s here, the request's deadline is 5 s)."""
    import nodeagent.checkpointers.app_sockets as app_sockets
    monkeypatch.setattr(app_sockets, "HOLD_MAX", 30.0)
    store, backend, runner, start = env
    prog = tmp_path / "nohooks.py"
    prog.write_text(RAW.replace('1\\n")', '1 -\\n")'))      # no optional requests wanted
    u = await start("g", [PY, str(prog)])
    gate = asyncio.get_running_loop().create_future()
    u.background_gate = lambda: gate
    out = u.unit_dir / "stdout"
    await checkpoint(runner, u, "ck1", 1)
    conn = backend._sessions[("job1", "g")].live()[0]
    assert conn.hooks == set()
    await wait_for(lambda: "got RESUME ck1" in out.read_text())
    await asyncio.sleep(0.1)
    assert conn.skip == 1            # the program answered OK; it waits in the socket
    t0 = time.monotonic()
    await checkpoint(runner, u, "ck2", 2)    # reads the owed OK first, at once
    assert time.monotonic() - t0 < 4.0
    await wait_for(lambda: "got RESUME ck2" in out.read_text())
    await asyncio.sleep(0.1)
    assert conn.skip == 1            # ck2's OK: owed again, held again
    gate.set_result(None)
    await wait_for(lambda: conn.skip == 0)
    assert json.loads((store.images_dir("job1", "g", 2) / "state.json").read_text()) == {"n": 41}


async def test_before_thaw_many_tells_every_program_and_fails_only_the_unknown_unit(env, tmp_path):
    """RESUME to many units in one pass (stage_batch, units thawed together); a unit this
    backend never launched fails alone, the others are told."""
    store, backend, runner, start = env
    prog = tmp_path / "raw.py"
    prog.write_text(RAW)
    a, b = await start("a", [PY, str(prog)]), await start("b", [PY, str(prog)])
    await wait_for(lambda: len(backend.connected_pids(a)) == len(backend.connected_pids(b)) == 1)

    class Stranger:
        job, name = "job1", "x"
    a.checkpoint_id = b.checkpoint_id = "ck5"
    out = await backend.before_thaw_many([(a,), (Stranger(),), (b,)])
    assert out[0] is None and out[2] is None
    assert isinstance(out[1], CheckpointError) and "not launched by the app checkpointer" in str(out[1])
    for u in (a, b):
        await wait_for(lambda: "got RESUME ck5" in (u.unit_dir / "stdout").read_text())


async def test_bad_connections_are_closed_and_the_program_still_checkpoints(env, tmp_path, monkeypatch):
    """Whatever else connects to a unit's socket: no HELLO in time, something else than
    HELLO, a line over 64 KiB, or a HELLO in pieces then BYE.  Each is closed (the bad ones
    with a reason) and none is taken for the program, which checkpoints as before."""
    import nodeagent.checkpointers.app as app_mod
    monkeypatch.setattr(app_mod, "HELLO_TIMEOUT", 0.3)
    store, backend, runner, start = env
    prog = tmp_path / "raw.py"
    prog.write_text(RAW)
    u = await start("r", [PY, str(prog)])
    await wait_for(lambda: len(backend.connected_pids(u)) == 1)
    path = socket_path_for(u)

    async def talk(*chunks: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        for c in chunks:
            writer.write(c)
            await writer.drain()
            await asyncio.sleep(0.05)
        got = await asyncio.wait_for(reader.read(), 5)    # until the agent closes
        writer.close()
        return got

    silent, garbage, pieces, too_long = await asyncio.gather(
        talk(), talk(b"GET / HTTP/1.0\n"), talk(b"HEL", b"LO 4242 1 -\n", b"BYE\n"),
        talk(b"HELLO 4343 1\n", b"x" * 70000))
    assert silent == b""
    assert garbage == b"ERROR expected HELLO <pid>\n"
    assert pieces == b"WELCOME 1\n"
    assert too_long == b"WELCOME 1\n"
    assert backend.connected_pids(u) == [u.root_pid]
    await checkpoint(runner, u, "ck1", 1)
    assert json.loads((store.images_dir("job1", "r", 1) / "state.json").read_text()) == {"n": 41}


async def test_the_checkpoint_stage_checks_the_program_wrote_its_state(tmp_path):
    """A state file at the top settles it at once; a program that wrote only subdirectories is
    walked; nothing written (a manifest is not state), or no images dir at all, is refused."""
    class U:
        name = "u"
    backend = AppCheckpointer()
    top = tmp_path / "top"
    top.mkdir()
    (top / "state").write_text("1")
    assert backend.checkpoint_now(U(), top) is True
    await backend.checkpoint(U(), top)
    deep = tmp_path / "deep"
    (deep / "a" / "b").mkdir(parents=True)
    (deep / "a" / "b" / "state").write_text("1")
    assert backend.checkpoint_now(U(), deep) is False       # a walk must tell
    await backend.checkpoint(U(), deep)
    for name, make in (("empty", lambda d: None), ("manifest-only", lambda d: (d / "manifest.json").write_text("{}")),
                       ("empty-subdir", lambda d: (d / "sub").mkdir())):
        d = tmp_path / name
        d.mkdir()
        make(d)
        with pytest.raises(CheckpointError, match="wrote no state"):
            await backend.checkpoint(U(), d)
    with pytest.raises(CheckpointError, match="is missing"):
        await backend.checkpoint(U(), tmp_path / "nowhere")
