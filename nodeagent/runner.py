"""Running a node agent daemon, and `gridckpt run`: orchestrator + local agent in one process."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path


from orchestrator import tables
from orchestrator.bus import open_bus
from orchestrator.control import ControlError, default_broker, default_store, serve_unix
from orchestrator.daemon import Orchestrator
from orchestrator.jobspec import load_job_file
from orchestrator.runner import serve_daemon, stop_event_on_signals
from orchestrator.store import Store

from .daemon import NodeAgent


async def serve_agent(args: argparse.Namespace) -> int:
    """`gridckpt agent`: serve until SIGTERM/SIGINT; units keep running after the agent stops."""
    return await serve_daemon(args, "agent", lambda bus, store: NodeAgent(
        bus, store, args.node, args.site, heartbeat_interval=args.heartbeat))


def _say(text: str) -> None:
    print(text, flush=True)


async def run_embedded(args: argparse.Namespace) -> int:
    """`gridckpt run JOB.toml`: the job in the foreground; exit status = the job's outcome."""
    spec = load_job_file(args.job_file)
    broker = args.broker or default_broker()
    store = Store(Path(args.store or default_store()))
    bus = open_bus(broker)
    await bus.connect()
    orch = Orchestrator(bus, store, heartbeat_interval=0.5)
    agent = NodeAgent(bus, store, args.node, "local", heartbeat_interval=0.5)
    server = None
    job_id = ""
    stop = stop_event_on_signals()
    try:
        await orch.start()
        await agent.start()
        if broker.startswith("memory://"):
            server = await serve_unix(store.root, orch.control)
        deadline = time.monotonic() + 10
        while not orch.live_agents() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        res = await orch.control("submit", {"spec": spec.to_dict()})
        job_id = res["job"]
        _say(f"job {job_id} submitted ({len(res['placement'])} units, store {store.root})")
        if args.demo:
            return await _demo(orch, agent, job_id, args, stop)
        return await _follow(orch, job_id, stop)
    except ControlError as exc:
        print(f"gridckpt: {exc}", file=sys.stderr)
        return exc.code
    finally:
        if job_id and orch.jobs[job_id].state not in ("cancelled", "succeeded"):
            try:
                await orch.control("cancel", {"job": job_id})
                _say(f"job {job_id} cancelled")
            except ControlError:
                pass
        if server is not None:
            server.close()
        await agent.stop(kill_units=True)
        await orch.stop()
        await bus.close()


def _outcome(orch: Orchestrator, job_id: str) -> int | None:
    """The exit status once the job is over, else None."""
    job = orch.jobs[job_id]
    if job.busy:
        return None
    if job.state == "succeeded":
        return 0
    if job.state == "failed":
        auto = job.spec.get("restart") == "auto" and job.restarts < int(job.spec.get("max_restarts", 3))
        return None if auto else 1
    return None


async def _follow(orch: Orchestrator, job_id: str, stop: asyncio.Event) -> int:
    """Print unit state changes until the job ends or the user interrupts."""
    seen: dict[str, tuple] = {}
    while True:
        job = orch.jobs[job_id]
        for u in job.units.values():
            key = (u.state, u.pid, u.exit_code, u.signal)
            if seen.get(u.name) != key:
                seen[u.name] = key
                extra = f" exit={u.exit_code}" if u.exit_code is not None else ""
                extra += f" signal={u.signal}" if u.signal else ""
                _say(f"unit {u.name}: {u.state} node={u.node} pid={u.pid}{extra}")
        rc = _outcome(orch, job_id)
        if rc is not None:
            _say(f"job {job_id}: {job.state}")
            return rc
        if stop.is_set():
            _say("interrupted: cancelling the job")
            await orch.control("cancel", {"job": job_id})
            return 130
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, asyncio.ensure_future(orch.wait_units(lambda j, u: j.id == job_id, 1.0))],
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()


_HOOK_WORDS = ("post_checkpoint", "checkpoint", "restart", "restored")


def _progress_lines(path: Path, start: int = 0) -> list[str]:
    """The unit's output lines from byte ``start``, without the lines its checkpoint hooks
    print (the demo shows progress)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if line.strip() and line.split()[0] not in _HOOK_WORDS]


def _last_line(path: Path) -> str:
    lines = _progress_lines(path)
    return lines[-1] if lines else "(no output yet)"


def _first_line(path: Path, start: int) -> str:
    lines = _progress_lines(path, start)
    return lines[0] if lines else "(no output yet)"


async def _running(orch: Orchestrator, job_id: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(u.state == "running" for u in orch.jobs[job_id].units.values()):
            return True
        await orch.wait_units(lambda j, u: j.id == job_id, 0.2)
    return False


async def _demo(orch: Orchestrator, agent: NodeAgent, job_id: str, args: argparse.Namespace,
                stop: asyncio.Event) -> int:
    """Run, checkpoint, kill a unit, restart from the checkpoint, and show the unit continued."""
    job = orch.jobs[job_id]
    if not await _running(orch, job_id, 20):
        _say("the job's units did not all start: " + ", ".join(f"{u.name}={u.state} {u.detail}" for u in job.units.values()))
        return 1
    names = list(job.units)
    victim = args.kill_unit or names[0]
    if victim not in job.units:
        print(f"gridckpt: --kill-unit: no unit {victim!r} (units: {', '.join(names)})", file=sys.stderr)
        return 2
    out = {n: orch.store.unit_dir(job_id, n) / "stdout" for n in names}
    wait = args.demo_wait
    _say(f"\n== 1. the job runs ({wait:g} s)")
    await asyncio.sleep(wait)
    for n in names:
        _say(f"  {n}: {_last_line(out[n])}")
    _say("\n== 2. coordinated checkpoint")
    ck = await orch.control("checkpoint", {"job": job_id})
    _say(tables.stage_table(ck))
    at_ckpt = {n: _last_line(out[n]) for n in names}
    await asyncio.sleep(wait)
    _say(f"\n== 3. the job ran on; kill -9 unit {victim!r}")
    before = {n: _last_line(out[n]) for n in names}
    for n in names:
        _say(f"  {n}: {before[n]}")
    unit = agent.units[(job_id, victim)]
    t_kill = time.monotonic()
    for pid in unit.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    failed = await orch.wait_units(lambda j, u: j.id == job_id and u.name == victim and u.state in ("failed", "exited"), 10)
    if failed is None:
        _say("the kill was not detected within 10 s")
        return 1
    _say(f"  detected: unit {victim} {failed.state} (signal {failed.signal}) after "
         f"{(time.monotonic() - t_kill) * 1000:.0f} ms")
    _say(f"\n== 4. restart from checkpoint {ck['checkpoint']}")
    rs = await orch.control("restart", {"job": job_id, "checkpoint": ck["checkpoint"]})
    marks = {n: out[n].stat().st_size if out[n].exists() else 0 for n in names}
    _say(tables.restart_table(rs))
    await asyncio.sleep(wait)
    _say("\n== 5. proof: every unit continued from its checkpointed state")
    for n in names:
        _say(f"  {n}:\n     at checkpoint   {at_ckpt[n]}\n     before the kill {before[n]}\n"
             f"     first after restart {_first_line(out[n], marks[n])}\n     now             {_last_line(out[n])}")
    ok = all(u.state == "running" for u in orch.jobs[job_id].units.values())
    _say(f"\njob {job_id}: {'all units running after the restart' if ok else 'not every unit runs'}")
    return 0 if ok else 1
