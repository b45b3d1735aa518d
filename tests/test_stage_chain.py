"""The barrier between stages: kept by the orchestrator (one round trip per stage) when a job
spans several agents, by the agent itself (one ``stages`` message with ``then``) when every
unit is on one agent.  Real daemons and app-level units over memory://; the amqp:// paths of
both are covered by tests/test_coordinated.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nodeagent import daemon as daemon_module
from nodeagent.daemon import NodeAgent
from nodeagent.units import become_subreaper
from orchestrator import protocol
from orchestrator.bus import open_bus
from orchestrator.control import ControlError
from orchestrator.daemon import Orchestrator
from orchestrator.jobspec import parse_job
from orchestrator.store import Store

ROOT = Path(__file__).resolve().parents[1]
COUNTER = str(ROOT / "examples" / "counter_app.py")


class Cell:
    """An orchestrator and agents n1, n2 in this process, over one memory:// bus; records every
    ``stages`` command the orchestrator publishes."""

    def __init__(self, tmp: Path) -> None:
        self.store = Store(tmp / "store")
        self.url = f"memory://chain-{time.monotonic_ns()}"
        self.sent: list[dict[str, Any]] = []
        self.agents: dict[str, NodeAgent] = {}

    async def __aenter__(self) -> "Cell":
        self.obus = open_bus(self.url)
        await self.obus.connect()
        publish = self.obus.publish

        async def spy(key: str, msg: dict[str, Any], **kw: Any) -> None:
            if msg.get("type") == "stages":
                self.sent.append(msg)
            await publish(key, msg, **kw)

        self.obus.publish = spy  # type: ignore[method-assign]
        self.orch = Orchestrator(self.obus, self.store, heartbeat_interval=0.5)
        await self.orch.start()
        for node in ("n1", "n2"):
            bus = open_bus(self.url)
            await bus.connect()
            agent = self.agents[node] = NodeAgent(bus, self.store, node, "s1", heartbeat_interval=0.5)
            await agent.start()
        await self.until(lambda: len(self.orch.live_agents()) == 2)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for job in list(self.orch.jobs):
            try:
                await self.orch.control("cancel", {"job": job})
            except ControlError:
                pass
        for agent in self.agents.values():
            await agent.stop(kill_units=True)
            await agent.bus.close()
        await self.orch.stop()
        await self.obus.close()
        become_subreaper(False)   # NodeAgent.start made this test process one

    @staticmethod
    async def until(pred, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.01)

    async def submit(self, nodes: list[str], extra: dict[str, Any] | None = None) -> str:
        units = [{"name": f"u{i}", "checkpointer": "app", "node": node,
                  "command": [sys.executable, COUNTER, "--interval", "0.02"], **(extra or {}).get(f"u{i}", {})}
                 for i, node in enumerate(nodes)]
        spec = parse_job({"name": "chain", "stage_timeout": "10s", "units": units}, "chain", ROOT).to_dict()
        job = (await self.orch.control("submit", {"spec": spec}))["job"]
        await self.until(lambda: all(u.state == "running" for u in self.orch.jobs[job].units.values()))
        await asyncio.sleep(0.3)  # every program has said HELLO
        return job

    def chains(self) -> list[tuple[str, list[str]]]:
        return [(m["stage"], list(m.get("then") or [])) for m in self.sent]


async def test_one_agent_keeps_the_barrier(tmp_path: Path) -> None:
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1", "n1"])
        ck = await cell.orch.control("checkpoint", {"job": job})
        assert cell.chains() == [("prepare", ["stop", "checkpoint", "resume_cp"]), ("seal", [])]
        assert list(ck["stages_ms"]) == ["prepare", "stop", "checkpoint", "resume_cp", "seal"]
        assert all(set(u["stages_ms"]) == set(ck["stages_ms"]) for u in ck["units"])
        assert [c["id"] for c in await asyncio.to_thread(cell.store.list_checkpoints, job)] == [ck["checkpoint"]]
        cell.sent.clear()
        rs = await cell.orch.control("restart", {"job": job, "checkpoint": ck["checkpoint"]})
        assert cell.chains() == [("rebuild", ["resume_rst"])]
        assert list(rs["stages_ms"]) == ["rebuild", "resume_rst"]
        assert all(u.state == "running" for u in cell.orch.jobs[job].units.values())


def _spy_agent(agent: NodeAgent) -> list[dict[str, Any]]:
    """Every stage_results and unit_event the agent publishes, in order."""
    out: list[dict[str, Any]] = []
    publish = agent.bus.publish

    async def spy(key: str, msg: dict[str, Any], **kw: Any) -> None:
        if msg.get("type") in ("stage_results", "unit_event", "heartbeat"):
            out.append(msg)
        await publish(key, msg, **kw)

    agent.bus.publish = spy  # type: ignore[method-assign]
    return out


def _answered(msgs: list[dict[str, Any]]) -> list[list[str]]:
    """The stages each stage_results message answers, message by message."""
    return [[m["stage"], *(e["stage"] for e in m.get("more", ()))] for m in msgs if m["type"] == "stage_results"]


async def test_the_agent_answers_a_chain_in_few_messages_and_reports_the_units_after(tmp_path: Path) -> None:
    """A chained stage's answer waits (``hold_answer``) for the next stage: with a long hold the
    whole checkpoint chain is one message, each stage timed on the agent (``wall_ms``), and the
    job's table takes those times; with none, an answer leaves whenever the loop turns.  The
    chain's units' state reports are held until after its last answer, and only each unit's
    last one goes, if it says something new: a checkpoint (frozen, thawed) sends none, a
    restart (restarting, stopped, running) one per unit, after its answers."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"])
        agent = cell.agents["n1"]
        seen = _spy_agent(agent)
        agent.hold_answer = 30.0
        ck = await cell.orch.control("checkpoint", {"job": job})
        await asyncio.sleep(0.3)
        answers = [m for m in seen if m["type"] == "stage_results"]
        assert _answered(answers) == [["prepare", "stop", "checkpoint", "resume_cp"], ["seal"]]
        chain = [answers[0], *answers[0]["more"]]
        walls = {e["stage"]: e["wall_ms"] for e in chain}
        assert all(isinstance(w, float) and w >= 0 for w in walls.values())
        assert all(ck["stages_ms"][stage] == round(w, 2) for stage, w in walls.items())
        assert not [m for m in seen if m["type"] == "unit_event"], "frozen then thawed: nothing new to report"
        assert all(u.state == "running" for u in cell.orch.jobs[job].units.values())

        seen.clear()
        agent.hold_answer = 0.0   # each answer leaves at the next turn of the loop
        await cell.orch.control("checkpoint", {"job": job})
        await cell.until(lambda: sum(map(len, _answered(seen))) == 5)
        assert len(_answered(seen)) > 2
        assert [stage for answer in _answered(seen) for stage in answer] == [
            "prepare", "stop", "checkpoint", "resume_cp", "seal"]

        os.kill(agent.units[(job, "u0")].root_pid, signal.SIGKILL)
        await cell.until(lambda: cell.orch.jobs[job].units["u0"].state == "failed")
        seen.clear()
        await cell.orch.control("restart", {"job": job})     # kills u1 first (reported at once)
        first_answer = next(i for i, m in enumerate(seen) if m["type"] == "stage_results")
        await cell.until(lambda: any(m["type"] == "unit_event" for m in seen[first_answer:]))
        await asyncio.sleep(0.1)
        last_answer = max(i for i, m in enumerate(seen) if m["type"] == "stage_results")
        events = [i for i, m in enumerate(seen[first_answer:], first_answer) if m["type"] == "unit_event"]
        assert min(events) > last_answer, "a unit report went out before the chain's last answer"
        reports = [r for i in events for r in [seen[i], *seen[i].get("more", ())]]
        assert sorted((r["unit"], r["state"]) for r in reports) == [("u0", "running"), ("u1", "running")]
        assert {r["unit"]: r["pid"] for r in reports} == {u: agent.units[(job, u)].root_pid for u in ("u0", "u1")}


async def test_a_unit_outside_the_chain_is_reported_at_once(tmp_path: Path) -> None:
    """Only the chain's own units are held: a unit of another job on the same agent that dies
    while a slow chain runs is reported before it ends.  Heartbeats meanwhile give the chain's
    unit the light report (no scan of its tree), an ended unit the full one (its exit)."""
    async with Cell(tmp_path) as cell:
        slow = await cell.submit(["n1"], {"u0": {"callbacks": {"pre_checkpoint": ["sleep", "1.5"]}}})
        other = await cell.submit(["n1"])
        seen = _spy_agent(cell.agents["n1"])
        checkpoint = asyncio.ensure_future(cell.orch.control("checkpoint", {"job": slow}))
        await asyncio.sleep(0.3)
        os.kill(cell.agents["n1"].units[(other, "u0")].root_pid, signal.SIGKILL)

        def reported() -> bool:   # a unit event, not a heartbeat (those carry states too)
            return any(r["job"] == other and r["state"] == "failed"
                       for m in seen if m["type"] == "unit_event" for r in [m, *m.get("more", ())])
        await cell.until(reported, timeout=1.0)
        assert not checkpoint.done(), "the slow chain ended first: the test proves nothing"
        await cell.until(lambda: any(m["type"] == "heartbeat" for m in seen), timeout=1.0)
        assert not checkpoint.done()
        beat = next(m for m in seen if m["type"] == "heartbeat")
        reports = {r["job"]: r for r in beat["units"]}
        assert "nprocs" not in reports[slow], reports       # held: light
        assert reports[other]["state"] == "failed" and "nprocs" in reports[other], reports   # ended: full
        await checkpoint


async def test_heartbeats_scan_each_unit_in_turn(tmp_path: Path) -> None:
    """A heartbeat scans the trees of a fifth of the live units (the full report, with nprocs),
    each in turn: every unit once per FULL_REPORT_EVERY beats; the others get state and pid."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1"] * 7)
        agent = cell.agents["n1"]
        units = list(agent.units.values())
        every = daemon_module.FULL_REPORT_EVERY
        full = {u.name: 0 for u in units}
        for beat in range(every):
            scanned = [u.name for i, u in enumerate(units) if not agent._light_beat(u, i, beat)]
            assert len(scanned) <= -(-len(units) // every)
            for name in scanned:
                full[name] += 1
        assert set(full.values()) == {1}, full
        agent._held_units.add((job, units[0].name))     # in a chain: never scanned
        assert all(agent._light_beat(units[0], 0, beat) for beat in range(every))


async def test_rebuilt_units_are_listed_before_the_rebuild_is_answered(tmp_path: Path) -> None:
    """The agent's unit list (what a later agent adopts) names every unit being restored by the
    time the rebuild's answer leaves: it is written when the unit turns "restarting", right
    before its restore, and the answer waits for that write."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"])
        ck = await cell.orch.control("checkpoint", {"job": job})
        agent = cell.agents["n1"]
        for name in ("u0", "u1"):
            os.kill(agent.units[(job, name)].root_pid, signal.SIGKILL)
        await cell.until(lambda: all(u.state == "failed" for u in cell.orch.jobs[job].units.values()))
        await cell.until(lambda: not any(r["job"] == job for r in json.loads(agent.state_file.read_text())))
        listed: list[set[str]] = []
        publish = agent.bus.publish

        async def spy(key: str, msg: dict[str, Any], **kw: Any) -> None:
            if msg.get("type") == "stage_results" and "rebuild" in [msg["stage"], *(e["stage"] for e in msg.get("more", ()))]:
                rows = json.loads(agent.state_file.read_text())
                listed.append({r["unit"] for r in rows if r["job"] == job})
            await publish(key, msg, **kw)

        agent.bus.publish = spy  # type: ignore[method-assign]
        await cell.orch.control("restart", {"job": job, "checkpoint": ck["checkpoint"]})
        assert listed == [{"u0", "u1"}], listed


async def test_background_work_waits_for_the_chains_answers(tmp_path: Path) -> None:
    """background_gate: open (None) when no chain runs; during one, a future that completes
    AFTER_CHAIN after the last chain's last answer went out, not before."""
    async with Cell(tmp_path) as cell:
        agent = cell.agents["n1"]
        assert agent.background_gate() is None
        agent._chains += 2            # two chains run
        gate = agent.background_gate()
        assert gate is not None and agent.background_gate() is gate
        agent._chain_ended()
        await asyncio.sleep(0.05)
        assert not gate.done(), "opened while a chain still ran"
        agent._chain_ended()
        t0 = time.monotonic()
        await asyncio.wait_for(gate, 5)
        assert time.monotonic() - t0 >= 0.9 * daemon_module.AFTER_CHAIN
        assert agent.background_gate() is None


async def test_a_failing_stage_is_answered_at_once_with_what_was_held(tmp_path: Path) -> None:
    """u1's pre_checkpoint callback fails under a long hold: the prepare answer (u0 ok, u1
    failed) leaves at once and the checkpoint aborts without waiting for the hold."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"], {"u1": {"callbacks": {"pre_checkpoint": ["sh", "-c", "exit 3"]}}})
        agent = cell.agents["n1"]
        seen = _spy_agent(agent)
        agent.hold_answer = 30.0
        t0 = time.monotonic()
        with pytest.raises(ControlError, match="aborted.*u1.*pre_checkpoint"):
            await cell.orch.control("checkpoint", {"job": job})
        assert time.monotonic() - t0 < 10
        answers = [m for m in seen if m["type"] == "stage_results"]
        assert _answered(answers)[0] == ["prepare"]
        assert answers[0]["results"]["u0"]["ok"] and not answers[0]["results"]["u1"]["ok"]


async def test_malformed_entries_of_a_multi_stage_answer_are_skipped(tmp_path: Path) -> None:
    """``more`` entries that are not maps of a known stage and its results are ignored; the
    well-formed ones still complete their stages."""
    async with Cell(tmp_path) as cell:
        coord = cell.orch.coordinator
        loop = asyncio.get_running_loop()
        waiting = {stage: coord._waiting.setdefault(("ck-x", "u0", stage), loop.create_future())
                   for stage in ("prepare", "stop")}
        coord.on_stage_results({"node": "n1", "checkpoint": "ck-x", "stage": "prepare", "wall_ms": "fast",
                                "results": {"u0": {"ok": True, "ms": 1.0}},
                                "more": [7, {"stage": "nope", "results": {}}, {"stage": "stop"},
                                         {"stage": "stop", "results": {"u0": "bad"}},
                                         {"stage": "stop", "results": {"u0": {"ok": True, "ms": 2.0}}, "wall_ms": 2.5}]})
        assert waiting["prepare"].result()["wall_ms"] is None
        nan = coord._waiting.setdefault(("ck-x", "u0", "checkpoint"), loop.create_future())
        coord.on_stage_results({"node": "n1", "checkpoint": "ck-x", "stage": "checkpoint", "wall_ms": float("nan"),
                                "results": {"u0": {"ok": True, "ms": 1.0}}})
        assert nan.result()["wall_ms"] is None
        assert waiting["stop"].result()["ok"] and waiting["stop"].result()["wall_ms"] == 2.5
        coord.on_stage_results({"node": "n1", "checkpoint": "ck-x", "stage": "stop", "results": {}, "more": "x"})


async def test_two_agents_one_round_trip_per_stage(tmp_path: Path) -> None:
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n2"])
        await cell.orch.control("checkpoint", {"job": job})
        stages = [stage for stage, then in cell.chains()]
        assert all(then == [] for _, then in cell.chains())
        assert stages == [s for s in ("prepare", "stop", "checkpoint", "resume_cp", "seal") for _ in (0, 1)]


@pytest.mark.parametrize("nodes", [["n1", "n1"], ["n1", "n2"]], ids=["one-agent", "two-agents"])
async def test_a_failing_stage_ends_the_chain_and_the_checkpoint_aborts(tmp_path: Path, nodes: list[str]) -> None:
    """u1's pre_checkpoint callback fails: no unit is stopped or checkpointed, every unit runs
    on, nothing is listed and no images are left."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(nodes, {"u1": {"callbacks": {"pre_checkpoint": ["sh", "-c", "exit 3"]}}})
        with pytest.raises(ControlError, match="aborted.*u1.*pre_checkpoint"):
            await cell.orch.control("checkpoint", {"job": job})
        sent = [stage for stage, _ in cell.chains()]
        assert "stop" not in sent and "checkpoint" not in sent and sent[-1] == protocol.ABORT_STAGE
        assert await asyncio.to_thread(cell.store.list_checkpoints, job) == []
        for name in ("u0", "u1"):
            assert not list(cell.store.unit_dir(job, name).glob("[0-9]*")), f"images of {name} left"
            unit = cell.agents[nodes[int(name[1])]].units[(job, name)]
            assert unit.state == "running" and not unit.ended


async def test_a_manifest_missing_at_commit_aborts_and_the_next_checkpoint_commits(tmp_path: Path) -> None:
    """A unit's manifest gone when the orchestrator commits (a store not really shared): the
    commit is refused naming the file, the checkpoint aborts (nothing listed, no images left,
    every unit runs on), and the next checkpoint takes fresh seqs and commits."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"])
        commit = cell.store.commit_checkpoint

        def lose_one(job_id: str, ckpt_id: str, seqs: dict[str, int], meta: Any = None) -> Any:
            (cell.store.images_dir(job_id, "u1", seqs["u1"]) / "manifest.json").unlink()
            return commit(job_id, ckpt_id, seqs, meta)
        cell.store.commit_checkpoint = lose_one  # type: ignore[method-assign]
        with pytest.raises(ControlError, match=r"aborted: .*u1/1/manifest.json: missing"):
            await cell.orch.control("checkpoint", {"job": job})
        assert await asyncio.to_thread(cell.store.list_checkpoints, job) == []
        assert _images_left(cell, job) == []
        assert all(u.state == "running" and not u.ended for u in cell.agents["n1"].units.values())
        cell.store.commit_checkpoint = commit  # type: ignore[method-assign]
        ck = await cell.orch.control("checkpoint", {"job": job})
        assert {u["name"]: u["seq"] for u in ck["units"]} == {"u0": 2, "u1": 2}
        assert [c["id"] for c in await asyncio.to_thread(cell.store.list_checkpoints, job)] == [ck["checkpoint"]]


def _images_left(cell: "Cell", job: str) -> list[Path]:
    return [p for name in ("u0", "u1") for p in cell.store.unit_dir(job, name).glob("[0-9]*")]


async def test_an_abort_stops_the_agents_chain(tmp_path: Path) -> None:
    """The orchestrator gives up on a chain (here: its stage timeout passes while a slow
    pre_checkpoint callback runs, which the agent, allowing twice as long, lets finish) and
    aborts; the agent must not run the chain's later stages after the abort, which would
    write images no checkpoint lists."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"], {"u0": {"callbacks": {"pre_checkpoint": ["sleep", "0.8"]}}})
        cell.orch.jobs[job].spec["stage_timeout"] = 0.5
        with pytest.raises(ControlError, match="aborted.*timed out"):
            await cell.orch.control("checkpoint", {"job": job})
        await asyncio.sleep(1.5)   # the callback ends; the chain would go on to stop and checkpoint
        agent = cell.agents["n1"]
        for name in ("u0", "u1"):
            assert not list(cell.store.unit_dir(job, name).glob("[0-9]*")), f"images of {name} left"
            unit = agent.units[(job, name)]
            assert unit.state == "running" and not unit.ended
        assert await asyncio.to_thread(cell.store.list_checkpoints, job) == []


async def test_a_failing_rebuild_ends_the_restart_chain(tmp_path: Path) -> None:
    """A restart of a job whose units are all gone, on one agent: the orchestrator checks sizes,
    the agent the sha256 of what changed since sealing.  u1's state file was rewritten: its
    rebuild fails naming the file, resume_rst runs on no unit, and the restart fails."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"])
        ck = await cell.orch.control("checkpoint", {"job": job})
        seq = {u["name"]: u["seq"] for u in ck["units"]}
        agent = cell.agents["n1"]
        for name in ("u0", "u1"):
            os.kill(agent.units[(job, name)].root_pid, signal.SIGKILL)
        await cell.until(lambda: all(u.state == "failed" for u in cell.orch.jobs[job].units.values()))
        victim = next(p for p in cell.store.images_dir(job, "u1", seq["u1"]).iterdir()
                      if p.is_file() and p.name != "manifest.json")
        data = victim.read_bytes()
        victim.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])   # same size, one byte flipped
        cell.sent.clear()
        with pytest.raises(ControlError, match=f"restart of {job} failed: .*{victim.name}"):
            await cell.orch.control("restart", {"job": job, "checkpoint": ck["checkpoint"]})
        assert cell.chains() == [("rebuild", ["resume_rst"])]
        for name in ("u0", "u1"):
            unit = agent.units.get((job, name))
            assert unit is None or unit.ended or unit.state != "running", f"{name} was resumed"


async def test_a_command_for_a_unit_in_a_batch_stage_waits_for_it(tmp_path: Path) -> None:
    """An agent runs a stage of many units in one pass (stage_batch); a command for one of
    those units that arrives meanwhile (here a kill) runs after that stage, never in its
    middle, as it would behind the unit's own stage."""
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1", "n1"])
        agent = cell.agents["n1"]
        units = {n: agent.units[(job, n)] for n in ("u0", "u1", "u2")}
        os.kill(units["u0"].root_pid, signal.SIGSTOP)     # its CHECKPOINT waits: prepare hangs
        ck = asyncio.create_task(cell.orch.control("checkpoint", {"job": job}))
        await cell.until(lambda: (job, "u1") in agent._batch_busy)
        agent._on_command_local({"type": "kill", "job": job, "unit": "u1"})
        await asyncio.sleep(0.5)
        assert not units["u1"].ended, "the kill ran in the middle of the batch stage"
        os.kill(units["u0"].root_pid, signal.SIGCONT)
        with pytest.raises(ControlError, match="u1"):
            await ck       # u1 is gone before it could be stopped: the checkpoint aborts
        await cell.until(lambda: units["u1"].ended)
        assert not units["u0"].ended and not units["u2"].ended
        assert not agent._batch_busy


async def test_app_units_are_frozen_through_their_job_and_all_run_after_an_abort(tmp_path: Path,
                                                                               monkeypatch) -> None:
    """Three app units on one agent are stopped with one write to their job's cgroup and
    thawed with one; when the checkpoint then fails on one of them (its state check refused
    here), the abort lets every unit run again, the refused one too."""
    from nodeagent import freezer, stage_batch
    from nodeagent.checkpointers.app import AppCheckpointer
    from nodeagent.checkpointers.base import CheckpointError

    if freezer.freezer_kind()[0] == "signal":
        pytest.skip("no cgroup freezer on this machine")
    calls: list[tuple[int, bool]] = []
    together = stage_batch.freeze_together

    async def spy(freezers: list[Any], *a: Any, **k: Any) -> bool:
        ok = await together(freezers, *a, **k)
        calls.append((len(freezers), ok))
        return ok

    monkeypatch.setattr(stage_batch, "freeze_together", spy)
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1", "n1"])
        names = ["u0", "u1", "u2"]

        async def all_count() -> None:
            sizes = {n: (cell.store.unit_dir(job, n) / "stdout").stat().st_size for n in names}
            await cell.until(lambda: all((cell.store.unit_dir(job, n) / "stdout").stat().st_size > sizes[n]
                                         for n in names), timeout=5)

        await cell.orch.control("checkpoint", {"job": job})
        assert calls == [(3, True)] and not freezer._frozen_together
        await all_count()
        checkpoint_now = AppCheckpointer.checkpoint_now

        def refuse_u1(self: AppCheckpointer, unit: Any, images: Path) -> bool:
            if unit.name == "u1":
                raise CheckpointError("unit u1: state refused (test)")
            return checkpoint_now(self, unit, images)

        monkeypatch.setattr(AppCheckpointer, "checkpoint_now", refuse_u1)
        with pytest.raises(ControlError, match="aborted.*state refused"):
            await cell.orch.control("checkpoint", {"job": job})
        assert calls[-1] == (3, True) and not freezer._frozen_together
        units = [cell.agents["n1"].units[(job, n)] for n in names]
        assert all(u.state == "running" and not u.freezer.is_frozen() for u in units)
        await all_count()


async def test_each_checkpoint_takes_the_spare_images_dir_made_after_the_last(tmp_path: Path) -> None:
    """The agent makes each unit a spare images dir when it starts and after each checkpoint;
    the next checkpoint's images dir is that spare, renamed (no directory made on the way)."""
    from nodeagent.stages import SPARE_DIR
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"])
        for _ in range(2):
            spares = {n: cell.store.unit_dir(job, n) / SPARE_DIR for n in ("u0", "u1")}
            await cell.until(lambda: all(p.is_dir() for p in spares.values()), timeout=5)
            inodes = {n: p.stat().st_ino for n, p in spares.items()}
            ck = await cell.orch.control("checkpoint", {"job": job})
            for u in ck["units"]:
                assert cell.store.images_dir(job, u["name"], u["seq"]).stat().st_ino == inodes[u["name"]]


async def test_units_of_a_checkpoint_whose_orchestrator_fell_silent_are_resumed(tmp_path: Path) -> None:
    """Prepared and frozen, then nothing more: after twice the stage timeout the agent abandons
    the checkpoint for every unit of it (one timer for the checkpoint): thawed, running, its
    partial images deleted, nothing left armed."""
    from nodeagent.stages import SPARE_DIR
    async with Cell(tmp_path) as cell:
        job = await cell.submit(["n1", "n1"])
        agent = cell.agents["n1"]
        units = [agent.units[(job, n)] for n in ("u0", "u1")]
        await cell.obus.publish(protocol.agent_key("s1", "n1"), protocol.make(
            "stages", job=job, checkpoint="ck-silent", stage="prepare", then=["stop"],
            units={u.name: {"seq": 99, "timeout": 0.25} for u in units}))
        await cell.until(lambda: all(u.freezer.frozen for u in units), timeout=5)
        assert set(agent._watchdogs) == {(job, "ck-silent")}
        # app units: each program wrote its state into its spare images dir (moved into place
        # only with the manifest), or into the images dir when it had no spare yet
        written = {u.name: cell.store.images_dir(job, u.name, 99) if cell.store.images_dir(job, u.name, 99).is_dir()
                   else cell.store.unit_dir(job, u.name) / SPARE_DIR for u in units}
        assert all(any(d.iterdir()) for d in written.values()), written
        await cell.until(lambda: not any(u.freezer.frozen for u in units), timeout=5)

        def nothing_left() -> bool:
            spares = [cell.store.unit_dir(job, u.name) / SPARE_DIR for u in units]
            return (not any(cell.store.images_dir(job, u.name, 99).exists() for u in units)
                    and not any(p.is_dir() and any(p.iterdir()) for p in spares))
        await cell.until(nothing_left, timeout=5)
        assert not agent._watchdogs and all(u.state == "running" for u in units)
        ck = await cell.orch.control("checkpoint", {"job": job})     # and the job checkpoints again
        assert {u["name"] for u in ck["units"]} == {"u0", "u1"}
