"""The orchestrator (job checkpointer): agents, jobs, placement, and the control operations.

It consumes ``events.#`` and ``determinants.#`` (quorum queues), ``heartbeat.#`` (transient)
and ``orchestrator.control`` (exclusive: a second orchestrator on the same VO is refused).
The coordinated stage machine lives in ``orchestrator.coordinator``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any

from . import protocol
from .bus.base import Bus, BusError, Delivery, Reject, Unroutable
from .control import ControlError, dispatch
from .coordinator import Coordinator
from .determinants import BadBatch, DeterminantSink
from .jobs import TERMINAL_UNIT_STATES, AgentInfo, JobState, PlacementError, UnitState, place_units
from .jobspec import JobFileError, JobSpec
from .logs import event
from .recovery.line import compute as line_compute
from .store import Store

log = logging.getLogger("gridckpt.orchestrator")


class Orchestrator:
    """The job checkpointer daemon's state and behaviour (transport-agnostic)."""

    def __init__(self, bus: Bus, store: Store, *, heartbeat_interval: float = 1.0) -> None:
        self.bus = bus
        self.store = store
        self.heartbeat_interval = heartbeat_interval
        self.agents: dict[str, AgentInfo] = {}
        self.jobs: dict[str, JobState] = {}
        self.coordinator = Coordinator(self)
        self.determinants = DeterminantSink(store)
        self._consumers: list[Any] = []
        self._tasks: set[asyncio.Task] = set()
        self._periodic: dict[str, asyncio.Task] = {}
        self._unit_waiters: list[tuple[asyncio.Future, Any]] = []
        self._unreported: set[tuple[str, str]] = set()
        self._abandoned: list[tuple[str, str, dict[str, int]]] = []  # checkpoints a crash left pending  # units recovered from the store, not yet reported

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Recover state from the store, then start consuming."""
        await asyncio.to_thread(self._recover_from_store)
        self._consumers.append(await self.bus.consume(
            protocol.EVENTS_QUEUE, ["events.#"], self._on_event, kind="quorum", prefetch=256))
        self._consumers.append(await self.bus.consume(
            protocol.REPLIES_QUEUE, [protocol.REPLIES_KEY], self._on_event, kind="exclusive", prefetch=256))
        self._consumers.append(await self.bus.consume(
            protocol.HEARTBEAT_QUEUE, ["heartbeat.#"], self._on_heartbeat, kind="transient"))
        self._consumers.append(await self.bus.consume(
            protocol.DETERMINANTS_QUEUE, ["determinants.#"], self._on_determinants, kind="quorum", prefetch=64))
        self._consumers.append(await self.bus.consume(
            protocol.CONTROL_QUEUE, [protocol.CONTROL_KEY], self._on_control, kind="exclusive", prefetch=16))
        self._spawn(self._watch_agents())
        for job_id, ckpt_id, seqs in self._abandoned:
            self._spawn(self._tell_abort(job_id, ckpt_id, seqs))
        if self._unreported:
            self._spawn(self._expire_unreported())
        for job in self.jobs.values():
            self._schedule_periodic(job)
        event(log, "orchestrator started", broker=self.bus.url, store=str(self.store.root),
              jobs=len(self.jobs))

    async def stop(self) -> None:
        """Stop intake, finish in-flight work, cancel background tasks."""
        for c in self._consumers:
            await c.cancel()
        self._consumers.clear()
        for t in list(self._tasks) + list(self._periodic.values()):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._periodic.values(), return_exceptions=True)
        event(log, "orchestrator stopped")

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _recover_from_store(self) -> None:
        """Load live jobs; abort checkpoints a previous orchestrator left half-done."""
        for job_id in self.store.list_jobs():
            try:
                rec = self.store.load_job(job_id)
            except Exception as exc:  # a damaged job.json must not stop the daemon
                event(log, "job record unreadable", logging.WARNING, job=job_id, error=str(exc))
                continue
            for ckpt in self.store.pending_checkpoints(job_id):
                self.store.abort_checkpoint(job_id, ckpt)
                ckpt_id = ckpt["id"] if isinstance(ckpt, dict) else ckpt
                self._abandoned.append((job_id, ckpt_id, dict(ckpt.get("units", {})) if isinstance(ckpt, dict) else {}))
                event(log, "aborted unfinished checkpoint", job=job_id, checkpoint=ckpt_id)
            for unit, seq in self.store.remove_partial(job_id):
                event(log, "removed partial images", job=job_id, unit=unit, seq=seq)
            if rec.get("state") in ("cancelled", "succeeded"):
                continue
            units = {name: UnitState(name=name, node=p.get("node", ""), site=p.get("site", ""),
                                     detail="awaiting a report from its agent")
                     for name, p in rec.get("placement", {}).items()}
            self._unreported.update((job_id, name) for name in units)
            job = JobState(id=job_id, spec=rec["spec"], units=units, state=rec.get("state", "running"),
                           restarts=rec.get("restarts", 0), submitted=rec.get("submitted", time.time()),
                           lineage={u: list(v) for u, v in (rec.get("lineage") or {}).items()})
            if job.state == "restarting":
                job.state = "failed"
            self.jobs[job_id] = job

    async def _tell_abort(self, job_id: str, ckpt_id: str, seqs: dict[str, int]) -> None:
        """Units may still be prepared or frozen for a checkpoint a crash left behind: abort it."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        for unit in job.units.values():
            try:
                await self.send(unit.site, unit.node, "stages", job=job_id, checkpoint=ckpt_id,
                                stage=protocol.ABORT_STAGE, units={unit.name: {"seq": seqs.get(unit.name, 0)}})
            except BusError:
                pass  # that agent is gone; its watchdog resumes the unit

    async def _expire_unreported(self) -> None:
        """Units recovered from the store that no agent reports within 3 heartbeats are lost."""
        await asyncio.sleep(3 * self.heartbeat_interval)
        for job_id, name in list(self._unreported):
            job = self.jobs.get(job_id)
            if job and job.units[name].state == "pending":
                job.units[name].state = "lost"
                job.units[name].detail = "no agent reports this unit"
                self._unit_changed(job, job.units[name])
        self._unreported.clear()

    async def save_job(self, job: JobState) -> None:
        await asyncio.to_thread(self.store.save_job, job.id, job.to_record())

    # ----------------------------------------------------------------- bus handlers
    async def _on_control(self, msg: dict[str, Any], d: Delivery) -> dict[str, Any]:
        return await dispatch(self.control, msg["op"], msg["args"])

    async def _on_determinants(self, msg: dict[str, Any], d: Delivery) -> None:
        if msg["job"] not in self.jobs:
            raise Reject(f"determinants for unknown job {msg['job']!r}")
        try:
            await self.determinants.ingest(msg)
        except BadBatch as exc:
            raise Reject(str(exc)) from None

    async def _on_heartbeat(self, msg: dict[str, Any], d: Delivery) -> None:
        agent = self._touch_agent(msg["site"], msg["node"])
        for u in msg["units"]:
            if isinstance(u, dict):
                self._apply_unit_report(agent, u, from_heartbeat=True)

    async def _on_event(self, msg: dict[str, Any], d: Delivery) -> None:
        t = msg["type"]
        if t == "register":
            agent = self._touch_agent(msg["site"], msg["node"])
            agent.pid = msg["pid"]
            agent.hostname = msg.get("hostname") or ""
            agent.capabilities = msg.get("capabilities") or {}
            event(log, "agent registered", node=agent.node, site=agent.site, pid=agent.pid)
        elif t == "unit_event":
            agent = self.agents.get(self._agent_key_of(msg["node"]))
            self._apply_unit_report(agent, msg, from_heartbeat=False)
            for rep in msg.get("more") or ():   # the rest of a burst, in order
                if isinstance(rep, dict) and all(isinstance(rep.get(k), str) for k in ("job", "unit", "state")):
                    self._apply_unit_report(agent, rep, from_heartbeat=False)
        elif t == "stage_results":
            self.coordinator.on_stage_results(msg)
        elif t == "pong":
            pass  # the answer to a tool's liveness ping of an agent
        else:
            event(log, "unexpected event type", logging.WARNING, type=t, key=d.routing_key)

    def _agent_key_of(self, node: str) -> str:
        for key, a in self.agents.items():
            if a.node == node:
                return key
        return ""

    def _touch_agent(self, site: str, node: str) -> AgentInfo:
        key = f"{site}/{node}"
        agent = self.agents.get(key)
        if agent is None:
            agent = self.agents[key] = AgentInfo(node=node, site=site)
        agent.last_seen = time.monotonic()
        if agent.lost:
            agent.lost = False
            event(log, "agent back", node=node, site=site)
        return agent

    def _apply_unit_report(self, agent: AgentInfo | None, rep: dict[str, Any], *, from_heartbeat: bool) -> None:
        job = self.jobs.get(rep.get("job", ""))
        if job is None:
            return
        unit = job.units.get(rep.get("unit", ""))
        if unit is None:
            return
        if agent is not None and unit.node and unit.node != agent.node:
            return  # a stale report from the unit's previous node
        if job.busy and from_heartbeat:
            return  # the stage machine owns unit states while it runs
        state = rep.get("state")
        self._unreported.discard((job.id, unit.name))
        if state not in protocol.UNIT_STATES:
            return
        if from_heartbeat and unit.state in TERMINAL_UNIT_STATES and state == unit.state:
            return
        changed = state != unit.state
        unit.state = state
        unit.pid = rep.get("pid", unit.pid)
        unit.nprocs = rep.get("nprocs", unit.nprocs) or 0
        if rep.get("started"):
            unit.started = rep["started"]
        if state in ("exited", "failed"):
            unit.exit_code = rep.get("exit_code")
            unit.signal = rep.get("signal")
        else:
            unit.exit_code = unit.signal = None
        unit.detail = rep.get("detail", "") or ""
        if changed:
            event(log, "unit " + state, job=job.id, unit=unit.name, node=unit.node, pid=unit.pid,
                  exit_code=unit.exit_code, signal=unit.signal)
            self._unit_changed(job, unit)

    def _unit_changed(self, job: JobState, unit: UnitState) -> None:
        for fut, pred in list(self._unit_waiters):
            if not fut.done() and pred(job, unit):
                fut.set_result(unit)
        if job.busy:
            return
        old = job.state
        job.state = job.derive_state()
        if job.state != old:
            event(log, "job " + job.state, job=job.id)
            self._spawn(self.save_job(job))
        if unit.state in ("failed", "lost") and job.spec.get("restart") == "auto" and job.state == "failed":
            self._spawn(self.coordinator.auto_restart(job))

    async def wait_units(self, pred: Any, timeout: float) -> UnitState | None:
        """Wait until a unit change satisfies ``pred(job, unit)``; None on timeout."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        item = (fut, pred)
        self._unit_waiters.append(item)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self._unit_waiters.remove(item)

    async def _watch_agents(self) -> None:
        """Mark agents lost after 3 missed heartbeats, and their units with them."""
        while True:
            await asyncio.sleep(self.heartbeat_interval / 2)
            limit = 3 * self.heartbeat_interval
            now = time.monotonic()
            for agent in self.agents.values():
                if not agent.lost and now - agent.last_seen > limit:
                    agent.lost = True
                    event(log, "agent lost", logging.WARNING, node=agent.node, site=agent.site,
                          silent_s=round(now - agent.last_seen, 2))
                    for job in self.jobs.values():
                        self.coordinator.agent_lost(agent.node, job)
                        for unit in job.units.values():
                            if unit.node == agent.node and unit.state not in TERMINAL_UNIT_STATES:
                                unit.state = "lost"
                                unit.detail = f"agent {agent.node} lost"
                                event(log, "unit lost", job=job.id, unit=unit.name, node=agent.node)
                                self._unit_changed(job, unit)

    # ----------------------------------------------------------------- commands to agents
    async def send(self, site: str, node: str, type_: str, **fields: Any) -> None:
        """Publish a command to an agent; raise Unroutable if its queue is gone."""
        await self.bus.publish(protocol.agent_key(site, node), protocol.make(type_, **fields), mandatory=True)

    def live_agents(self) -> list[AgentInfo]:
        return [a for a in self.agents.values() if not a.lost]

    def agent_for(self, node: str) -> AgentInfo | None:
        return next((a for a in self.agents.values() if a.node == node), None)

    def unit_load(self) -> dict[str, int]:
        load: dict[str, int] = {}
        for job in self.jobs.values():
            for u in job.units.values():
                if u.state not in TERMINAL_UNIT_STATES:
                    load[f"{u.site}/{u.node}"] = load.get(f"{u.site}/{u.node}", 0) + 1
        return load

    # ----------------------------------------------------------------- control ops
    async def control(self, op: str, args: dict[str, Any]) -> Any:
        """Entry point of every CLI operation."""
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ControlError(f"unknown operation {op!r}", 2)
        try:
            return await handler(**args)
        except TypeError as exc:
            raise ControlError(f"{op}: bad arguments ({exc})", 2) from None

    def job(self, job_id: str) -> JobState:
        job = self.jobs.get(job_id)
        if job is None:
            matches = [j for j in self.jobs if j.startswith(job_id)] if job_id else []
            if len(matches) == 1:
                return self.jobs[matches[0]]
            raise ControlError(f"no such job {job_id!r}", 2 if not matches else 2)
        return job

    async def op_submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        try:
            js = JobSpec.from_dict(spec)
        except (JobFileError, KeyError, TypeError, ValueError) as exc:
            raise ControlError(f"bad job: {exc}", 2) from None
        spec = js.to_dict()
        try:
            placed = place_units(spec["units"], self.live_agents(), self.unit_load())
        except PlacementError as exc:
            raise ControlError(str(exc), 1) from None
        job_id = f"{spec['name']}-{uuid.uuid4().hex[:8]}"
        units = {u["name"]: UnitState(name=u["name"], node=placed[u["name"]].node, site=placed[u["name"]].site)
                 for u in spec["units"]}
        job = JobState(id=job_id, spec=spec, units=units, state="pending")
        self.jobs[job_id] = job
        await self.save_job(job)
        interposed = job.interposed()
        if interposed:
            await asyncio.to_thread(lambda: [self.determinants.log_of(job_id).add_unit(n) for n in interposed])
        event(log, "job submitted", job=job_id, units=len(units))
        await self.launch_units(job, list(units))
        self._schedule_periodic(job)
        return {"job": job_id, "placement": {n: u.node for n, u in units.items()}}

    async def launch_units(self, job: JobState, names: list[str]) -> None:
        """Ask each unit's agent to start it fresh."""
        specs = {u["name"]: u for u in job.spec["units"]}
        for name in names:
            unit = job.units[name]
            unit.state, unit.pid, unit.exit_code, unit.signal, unit.attempt = "pending", None, None, None, unit.attempt + 1
            try:
                await self.send(unit.site, unit.node, "launch", job=job.id, unit=name,
                                spec=self.unit_launch_spec(job, specs[name]), attempt=unit.attempt)
            except (Unroutable, BusError) as exc:
                unit.state, unit.detail = "lost", f"agent {unit.node} unreachable: {exc}"
                event(log, "launch failed", logging.WARNING, job=job.id, unit=name, node=unit.node, error=str(exc))

    def unit_launch_spec(self, job: JobState, unit_spec: dict[str, Any]) -> dict[str, Any]:
        """What an agent needs to run a unit: its table plus job-level settings."""
        return {**unit_spec, "base_dir": job.spec.get("base_dir", ""), "protocol": job.spec.get("protocol"),
                "job_name": job.spec.get("name")}

    async def op_status(self, job: str | None = None) -> Any:
        if job:
            return self.job(job).as_dict()
        return {"jobs": [j.as_dict() for j in self.jobs.values()],
                "agents": [{"node": a.node, "site": a.site, "lost": a.lost, "pid": a.pid,
                            "last_seen_s": round(time.monotonic() - a.last_seen, 2)} for a in self.agents.values()]}

    async def op_cancel(self, job: str) -> dict[str, Any]:
        j = self.job(job)
        j.state = "cancelled"
        task = self._periodic.pop(j.id, None)
        if task:
            task.cancel()
        await self.coordinator.kill_units(j, list(j.units))
        await self.save_job(j)
        event(log, "job cancelled", job=j.id)
        return j.as_dict()

    async def op_checkpoint(self, job: str) -> dict[str, Any]:
        return await self.coordinator.checkpoint(self.job(job))

    async def op_checkpoints(self, job: str) -> list[dict[str, Any]]:
        j = self.job(job)
        return await asyncio.to_thread(self.store.list_checkpoints, j.id)

    async def op_restart(self, job: str, checkpoint: str | None = None,
                         place: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.coordinator.restart(self.job(job), checkpoint, place or {})

    async def op_export_determinants(self, job: str, path: str) -> dict[str, Any]:
        j = self.job(job)
        try:
            n = await asyncio.to_thread(self.determinants.export, j.id, path)
        except OSError as exc:
            raise ControlError(f"cannot write {path}: {exc.strerror or exc}", 1) from None
        return {"job": j.id, "path": path, "records": n}

    async def recovery_line(self, job: JobState) -> dict[str, Any]:
        """The recovery line of a job's live determinant log: failed/lost units have failed
        (none failed: every unit counts as failed, as for a whole-job restart)."""
        failed = [u.name for u in job.units.values() if u.state in ("failed", "lost")] or None
        sink = self.determinants

        def compute() -> dict[str, Any]:
            model = sink.log_of(job.id).load()
            return line_compute(model, failed).to_json()

        try:
            return await asyncio.to_thread(compute)
        except ValueError as exc:
            raise ControlError(f"recovery line of {job.id}: {exc}") from None

    async def op_recovery_line(self, job: str) -> dict[str, Any]:
        j = self.job(job)
        if not j.interposed():
            raise ControlError(f"job {j.id} runs no unit under the shim, so it has no determinant log", 2)
        return await self.recovery_line(j)

    async def op_restart_line(self, job: str, place: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.coordinator.restart_line(self.job(job), place or {})

    async def op_gc(self, job: str, dry_run: bool = False) -> dict[str, Any]:
        return await self.coordinator.gc(self.job(job), dry_run)

    async def op_unit_checkpoint(self, job: str, unit: str) -> dict[str, Any]:
        j = self.job(job)
        if unit not in j.units:
            raise ControlError(f"job {j.id} has no unit {unit!r}", 2)
        return await self.coordinator.unit_checkpoint(j, unit)

    # ----------------------------------------------------------------- periodic checkpoints
    def _schedule_periodic(self, job: JobState) -> None:
        if job.id in self._periodic:
            return
        if job.spec.get("protocol") == "independent":
            if any(u.get("checkpoint_every") or job.spec.get("checkpoint_every") for u in job.spec["units"]):
                self._periodic[job.id] = asyncio.create_task(self._independent_loops(job))
        elif job.spec.get("checkpoint_every"):
            self._periodic[job.id] = asyncio.create_task(self._periodic_loop(job, float(job.spec["checkpoint_every"])))

    async def _independent_loops(self, job: JobState) -> None:
        """Each unit checkpoints alone on its own schedule, with jitter so they drift apart."""
        loops = []
        units = job.spec["units"]
        for i, u in enumerate(units):
            every = u.get("checkpoint_every") or job.spec.get("checkpoint_every")
            if every:
                jitter = u.get("checkpoint_jitter")
                if jitter is None:
                    jitter = float(every) * float(u.get("checkpoint_jitter_fraction") or 0.1)
                phase = float(every) * i / len(units)  # staggered: units start out of step
                loops.append(self._unit_loop(job, u["name"], float(every), float(jitter), phase))
        await asyncio.gather(*loops)

    async def _unit_loop(self, job: JobState, unit: str, every: float, jitter: float, phase: float) -> None:
        rnd = random.Random(f"{job.id}/{unit}")
        await asyncio.sleep(phase)
        while job.state not in ("cancelled", "succeeded"):
            await asyncio.sleep(max(0.05, every + rnd.uniform(-jitter, jitter)))
            if job.busy or job.units[unit].state != "running":
                continue
            try:
                res = await self.coordinator.unit_checkpoint(job, unit)
                event(log, "unit checkpoint", job=job.id, unit=unit, seq=res["units"][0]["seq"],
                      total_ms=res["total_ms"])
            except ControlError as exc:
                event(log, "unit checkpoint failed", logging.WARNING, job=job.id, unit=unit, error=str(exc))

    async def _periodic_loop(self, job: JobState, every: float) -> None:
        while job.state not in ("cancelled", "succeeded"):
            await asyncio.sleep(every)
            if job.state != "running" or job.busy:
                continue
            try:
                res = await self.coordinator.checkpoint(job)
                event(log, "periodic checkpoint", job=job.id, checkpoint=res["checkpoint"], total_ms=res["total_ms"])
            except ControlError as exc:
                event(log, "periodic checkpoint failed", logging.WARNING, job=job.id, error=str(exc))
