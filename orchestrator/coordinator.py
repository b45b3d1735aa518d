"""The coordinated stage machine: two-phase checkpoint and restart of a whole job.

Checkpoint: prepare -> stop -> checkpoint on every unit, a barrier after each stage; the
checkpoint is committed (``checkpoints/<id>.json``) only once every unit's manifest is in
the store, then every unit gets resume_cp.  Any failure or timeout before the commit aborts:
every unit gets ``abort`` (thaw, forget), the partial images are deleted, the job runs on.
Restart: every unit of the job is killed, then rebuild on all, then resume_rst on all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from . import protocol
from .bus.base import BusError
from .control import ControlError
from .jobs import TERMINAL_UNIT_STATES, JobState, PlacementError, UnitState, place_units
from .logs import event
from .store import CorruptCheckpoint, StoreError, verify_manifest

if TYPE_CHECKING:
    from .daemon import Orchestrator

log = logging.getLogger("gridckpt.coordinator")


def _tree_size(path: Any) -> int:
    """Bytes of the files under ``path`` (0 if it is gone)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class StageFailed(Exception):
    """A unit failed or missed a stage (``stage``: which one)."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


class Coordinator:
    """Drives jobs through checkpoint and restart stages."""

    def __init__(self, orch: "Orchestrator") -> None:
        self.orch = orch
        self._waiting: dict[tuple[str, str, str], asyncio.Future] = {}
        self._unit_busy: set[tuple[str, str]] = set()

    # ----------------------------------------------------------------- stage plumbing
    def on_stage_results(self, msg: dict[str, Any]) -> None:
        """One agent's answer for all its units of a stage (and, in ``more``, of the stages of
        its chain that completed meanwhile; a malformed entry is skipped)."""
        self._stage_answer(msg["node"], msg["checkpoint"], msg["stage"], msg["results"], msg.get("wall_ms"))
        more = msg.get("more")
        for entry in more if isinstance(more, list) else ():
            if (isinstance(entry, dict) and entry.get("stage") in protocol.STAGES
                    and isinstance(entry.get("results"), dict)):
                self._stage_answer(msg["node"], msg["checkpoint"], entry["stage"], entry["results"],
                                   entry.get("wall_ms"))

    def _stage_answer(self, node: str, ckpt: str, stage: str, results: dict[str, Any], wall_ms: Any) -> None:
        wall = float(wall_ms) if isinstance(wall_ms, (int, float)) and not isinstance(wall_ms, bool) else None
        if wall is not None and not (math.isfinite(wall) and wall >= 0):
            wall = None     # a malformed time is not taken into the table
        for unit, res in results.items():
            if not isinstance(res, dict) or not isinstance(res.get("ok"), bool):
                continue
            fut = self._waiting.get((ckpt, unit, stage))
            if fut is not None and not fut.done():
                fut.set_result({"unit": unit, "node": node, "ok": res["ok"], "ms": float(res.get("ms") or 0.0),
                                "error": str(res.get("error") or ""), "data": res.get("data") or {},
                                "wall_ms": wall})

    def agent_lost(self, node: str, job: JobState) -> None:
        """Fail the stages waiting on units of a lost agent at once."""
        for (ckpt, unit_name, stage), fut in self._waiting.items():
            unit = job.units.get(unit_name)
            if unit is not None and unit.node == node and not fut.done():
                fut.set_exception(StageFailed(f"unit {unit_name}: agent {node} lost during {stage}"))

    async def _stage_all(self, job: JobState, op_id: str, stage: str, units: list[UnitState],
                         args: dict[str, dict[str, Any]], timeout: float) -> dict[str, dict[str, Any]]:
        """Run one stage on every unit in parallel; raise StageFailed naming the first failure."""
        futs = self._expect(op_id, stage, units)
        by_agent: dict[tuple[str, str], dict[str, Any]] = {}
        for u in units:
            by_agent.setdefault((u.site, u.node), {})[u.name] = args.get(u.name, {})
        try:
            try:  # one message per agent and stage, whatever the number of its units
                await asyncio.gather(*(self.orch.send(site, node, "stages", job=job.id, checkpoint=op_id, stage=stage,
                                                      units=batch) for (site, node), batch in by_agent.items()))
            except BusError as exc:
                raise StageFailed(f"{stage}: cannot reach an agent ({exc})", stage) from None
            return await self._collect(futs, stage, timeout)
        finally:
            self._forget(op_id, units, stage)

    async def _stages_in_turn(self, job: JobState, op_id: str, stages: list[str], units: list[UnitState],
                              args: dict[str, dict[str, Any]], timeout: float,
                              done: Callable[[str, dict[str, dict[str, Any]], float], None]) -> None:
        """Run ``stages`` one after the other, each on every unit, with a barrier between them:
        a stage starts on no unit before the one before it succeeded on all.  ``done(stage,
        results, ms)`` is called as each completes; StageFailed (its ``stage`` set) ends the run.

        When every unit is on one agent, that agent keeps the barrier: one message names all
        the stages (``then``), it runs each on every unit before the next, stops at the first
        failure, and answers each stage (several in one message when they complete close
        together: see NodeAgent._stages).  A stage's time is then the agent's (``wall_ms``); the
        caller's total still counts the bus.  Otherwise one round trip per stage."""
        if len(stages) < 2 or len({(u.site, u.node) for u in units}) != 1:
            for stage in stages:
                t0 = time.perf_counter()
                res = await self._stage_all(job, op_id, stage, units, args, timeout)
                done(stage, res, _ms(t0))
            return
        futs = {stage: self._expect(op_id, stage, units) for stage in stages}
        site, node = units[0].site, units[0].node
        try:
            t0 = time.perf_counter()
            try:
                await self.orch.send(site, node, "stages", job=job.id, checkpoint=op_id, stage=stages[0],
                                     then=stages[1:], units={u.name: args.get(u.name, {}) for u in units})
            except BusError as exc:
                raise StageFailed(f"{stages[0]}: cannot reach agent {node} ({exc})", stages[0]) from None
            for stage in stages:
                res = await self._collect(futs[stage], stage, timeout)
                walls = [r["wall_ms"] for r in res.values() if r.get("wall_ms") is not None]
                done(stage, res, round(max(walls), 2) if walls else _ms(t0))
                t0 = time.perf_counter()
        finally:
            for stage in stages:
                self._forget(op_id, units, stage)

    def _expect(self, op_id: str, stage: str, units: list[UnitState]) -> dict[str, asyncio.Future]:
        """The futures the units' results for ``stage`` of ``op_id`` will complete."""
        loop = asyncio.get_running_loop()
        return {u.name: self._waiting.setdefault((op_id, u.name, stage), loop.create_future()) for u in units}

    @staticmethod
    async def _collect(futs: dict[str, asyncio.Future], stage: str, timeout: float) -> dict[str, dict[str, Any]]:
        """Wait for every unit's result of one stage; StageFailed naming the first failure."""
        # (an abort may concern no unit any more: all of them ended).  In a chain answered in
        # one message every stage after the first finds its futures done: asyncio.wait would
        # still put a callback per future through the loop (64 units: 192 per checkpoint)
        if futs and not all(f.done() for f in futs.values()):
            await asyncio.wait(futs.values(), timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        results: dict[str, dict[str, Any]] = {}
        for name, fut in futs.items():
            if not fut.done():
                raise StageFailed(f"unit {name}: {stage} timed out after {timeout:g} s", stage)
            exc = fut.exception()
            if exc is not None:
                raise StageFailed(str(exc), stage)
            res = fut.result()
            if not res["ok"]:
                raise StageFailed(f"unit {name}: {stage} failed: {res.get('error') or 'no reason given'}", stage)
            results[name] = res
        return results

    def _forget(self, op_id: str, units: list[UnitState], stage: str) -> None:
        for u in units:
            fut = self._waiting.pop((op_id, u.name, stage), None)
            if fut is not None and not fut.done():
                fut.cancel()

    def _timeout(self, job: JobState) -> float:
        return float(job.spec.get("stage_timeout") or 30.0)

    # ----------------------------------------------------------------- checkpoint
    async def checkpoint(self, job: JobState) -> dict[str, Any]:
        """Coordinated checkpoint of every unit; returns the stage table as a dict.

        ``total_ms`` is the time until every unit runs again (its images written, as a raw
        ``criu dump`` leaves them); ``committed_ms`` the time until the checkpoint is durable,
        verified by its manifests and listed.  Units under the shim are sealed before they
        resume (their next determinants carry the new interval, so the checkpoint must not
        fail after that); the others resume first and are sealed while they run.
        """
        if job.busy:
            raise ControlError(f"job {job.id} is busy ({job.busy} in progress)")
        units = list(job.units.values())
        # "stopped" may be the echo of the previous checkpoint's freeze, still on its way
        not_running = [f"{u.name} ({u.state})" for u in units if u.state not in ("running", "stopped")]
        if not_running:
            raise ControlError(f"job {job.id}: cannot checkpoint, units not running: {', '.join(not_running)}")
        job.busy = "checkpoint"
        ckpt_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        store = self.orch.store
        t_all = time.perf_counter()
        stages_ms: dict[str, float] = {}
        per_unit: dict[str, dict[str, Any]] = {u.name: {"name": u.name, "node": u.node, "stages_ms": {}} for u in units}
        seal_later = not job.interposed()
        resumed = False
        total_ms = 0.0
        res_ck: dict[str, dict[str, Any]] = {}

        def record(stage: str, res: dict[str, dict[str, Any]], ms: float) -> None:
            nonlocal total_ms
            stages_ms[stage] = ms
            for name, r in res.items():
                per_unit[name]["stages_ms"][stage] = r["ms"]
                data = r.get("data") or {}
                if "bytes" in data:
                    per_unit[name]["bytes"] = data["bytes"]
                if isinstance(data.get("started_ahead"), bool):    # the backend's tool (criu) was
                    per_unit[name]["started_ahead"] = data["started_ahead"]   # started ahead
            if stage == "checkpoint":
                res_ck.update(res)
            elif stage == "resume_cp":
                for name in per_unit:
                    job.units[name].state = "running"
                total_ms = _ms(t_all)

        async def run_stages(stages: list[str]) -> None:
            nonlocal resumed, total_ms
            resumed = resumed or "resume_cp" in stages
            try:
                await self._stages_in_turn(job, ckpt_id, stages, units, args, self._timeout(job), record)
            except StageFailed as exc:
                if exc.stage != "resume_cp":   # the images are written: not a reason to abort
                    raise
                event(log, "resume_cp failed", logging.WARNING, job=job.id, checkpoint=ckpt_id, reason=str(exc))
                total_ms = _ms(t_all)

        try:
            def begin() -> dict[str, int]:
                seqs = store.next_seqs(job.id, [u.name for u in units])
                # not fsync'ed: a crash of the host that loses it loses nothing else (see store.py)
                store.begin_checkpoint(job.id, ckpt_id, seqs, durable=False)
                return seqs
            seqs = await asyncio.to_thread(begin)
            for u in units:
                per_unit[u.name]["seq"] = seqs[u.name]
            args = {u.name: {"seq": seqs[u.name], "timeout": self._timeout(job), "seal_later": seal_later,
                             "interval": job.interval_of(u.name) + 1} for u in units}
            try:
                # every image written: with seal_later the units need not wait for hashing and sync
                await run_stages(["prepare", "stop", "checkpoint"] + (["resume_cp"] if seal_later else []))
                if seal_later:
                    await run_stages([protocol.SEAL_STAGE])
                meta = {"stages_ms": stages_ms, "units_ms": {n: per_unit[n]["stages_ms"] for n in seqs},
                        "bytes": sum(pu.get("bytes", 0) for pu in per_unit.values()), "total_ms": total_ms or _ms(t_all)}

                def commit() -> str:   # the next checkpoint's seqs checked too: off its path
                    try:    # (refused unless every unit's manifest is in the store)
                        store.commit_checkpoint(job.id, ckpt_id, seqs, meta)
                    except StoreError as exc:
                        return str(exc)
                    store.check_next_seqs(job.id, list(seqs))
                    return ""
                refused = await asyncio.to_thread(commit)
                if refused:
                    raise StageFailed(refused)
            except StageFailed as exc:
                event(log, "checkpoint aborted", logging.WARNING, job=job.id, checkpoint=ckpt_id, reason=str(exc))
                try:
                    await self._stage_all(job, ckpt_id, protocol.ABORT_STAGE,
                                          [u for u in units if u.state not in TERMINAL_UNIT_STATES], args,
                                          self._timeout(job))
                except StageFailed as exc2:
                    event(log, "abort incomplete", logging.WARNING, job=job.id, checkpoint=ckpt_id, reason=str(exc2))
                await asyncio.to_thread(store.abort_checkpoint, job.id, ckpt_id)
                raise ControlError(f"checkpoint of {job.id} aborted: {exc}") from None
            for u in units:
                job.lineage.setdefault(u.name, []).append(seqs[u.name])
            await self.orch.save_job(job)
            await self._register_checkpoints(job, {u.name: res_ck[u.name] for u in units})
            event(log, "checkpoint committed", job=job.id, checkpoint=ckpt_id)
            committed_ms = _ms(t_all)
            if not resumed:
                await run_stages(["resume_cp"])
        finally:
            job.busy = ""
        for pu in per_unit.values():
            pu["total_ms"] = round(sum(v for k, v in pu["stages_ms"].items() if k != protocol.SEAL_STAGE), 2)
        return {"job": job.id, "checkpoint": ckpt_id, "total_ms": total_ms, "committed_ms": committed_ms,
                "stages_ms": stages_ms, "units": list(per_unit.values())}

    async def _register_checkpoints(self, job: JobState, results: dict[str, dict[str, Any]]) -> None:
        """Tell the determinant log that these units committed their next checkpoint.

        The agent flushed the unit's records before answering the checkpoint stage; its answer
        says how far (``shipped``), and the log must hold them before the checkpoint is added.
        """
        interposed = set(job.interposed())
        sink = self.orch.determinants
        for name, res in results.items():
            if name not in interposed:
                continue
            shipped = (res.get("data") or {}).get("shipped") or {}
            if not await sink.wait_for(job.id, name, shipped, timeout=self._timeout(job)):
                event(log, "determinants not all in before the checkpoint was registered", logging.WARNING,
                      job=job.id, unit=name)
            await asyncio.to_thread(sink.add_checkpoint, job.id, name, job.interval_of(name))

    # ----------------------------------------------------------------- independent
    async def unit_checkpoint(self, job: JobState, name: str) -> dict[str, Any]:
        """Checkpoint one unit alone (independent checkpointing): no barrier with the others."""
        if job.busy:
            raise ControlError(f"job {job.id} is busy ({job.busy} in progress)")
        unit = job.units[name]
        if unit.state not in ("running", "stopped"):
            raise ControlError(f"job {job.id}: unit {name} is {unit.state}, not running")
        key = (job.id, name)
        if key in self._unit_busy:
            raise ControlError(f"job {job.id}: unit {name} is already checkpointing")
        self._unit_busy.add(key)
        store = self.orch.store
        op_id = f"u-{name}-" + uuid.uuid4().hex[:10]
        t_all = time.perf_counter()
        stages: dict[str, float] = {}
        try:
            seq = await asyncio.to_thread(store.next_seq, job.id, name)
            args = {name: {"seq": seq, "timeout": self._timeout(job), "interval": job.interval_of(name) + 1}}
            try:
                res: dict[str, dict[str, Any]] = {}
                for stage in ("prepare", "stop", "checkpoint"):
                    res = await self._stage_all(job, op_id, stage, [unit], args, self._timeout(job))
                    stages[stage] = res[name]["ms"]
                manifest = store.images_dir(job.id, name, seq) / "manifest.json"
                if not await asyncio.to_thread(manifest.exists):
                    raise StageFailed(f"no manifest in the store for unit {name}")
            except StageFailed as exc:
                try:
                    await self._stage_all(job, op_id, protocol.ABORT_STAGE, [unit], args, self._timeout(job))
                except StageFailed:
                    pass
                await asyncio.to_thread(store.delete_images, job.id, name, seq)
                raise ControlError(f"checkpoint of unit {name} of {job.id} aborted: {exc}") from None
            nbytes = (res[name].get("data") or {}).get("bytes", 0)
            job.lineage.setdefault(name, []).append(seq)
            await self.orch.save_job(job)
            await self._register_checkpoints(job, res)
            try:
                r = await self._stage_all(job, op_id, "resume_cp", [unit], args, self._timeout(job))
                stages["resume_cp"] = r[name]["ms"]
            except StageFailed as exc:
                event(log, "resume_cp failed", logging.WARNING, job=job.id, unit=name, reason=str(exc))
        finally:
            self._unit_busy.discard(key)
        return {"job": job.id, "checkpoint": f"{name}:{seq}", "total_ms": _ms(t_all), "stages_ms": dict(stages),
                "units": [{"name": name, "node": unit.node, "seq": seq, "interval": job.interval_of(name),
                           "bytes": nbytes, "stages_ms": stages, "total_ms": round(sum(stages.values()), 2)}]}

    async def gc(self, job: JobState, dry_run: bool) -> dict[str, Any]:
        """Delete the checkpoints no recovery line can use any more, and the records only they needed."""
        store = self.orch.store
        doomed: dict[str, list[int]] = {}   # unit -> store seqs
        records: list[str] = []
        if job.interposed():
            result = await self.orch.recovery_line(job) if dry_run else None
            if dry_run:
                floors = {u: (max(ks) + 1 if ks else 0) for u, ks in (result or {}).get("obsolete", {}).items()}
            else:
                stats = await asyncio.to_thread(self.orch.determinants.log_of(job.id).gc)
                floors = stats["floors"]
                records.append(f"{stats['records_before'] - stats['records_after']} determinant records merged away")
            for unit, floor in floors.items():
                hist = job.lineage.get(unit, [])
                doomed[unit] = [hist[k - 1] for k in range(1, min(floor, len(hist) + 1)) if k - 1 < len(hist)]
        coordinated = await asyncio.to_thread(store.list_checkpoints, job.id)
        keep_records = coordinated[-1:] if not job.interposed() else [
            c for c in coordinated if any(c["units"][u] not in doomed.get(u, []) for u in c["units"])]
        drop_records = [c for c in coordinated if c not in keep_records]
        if not job.interposed():
            kept = {u: s for c in keep_records for u, s in c["units"].items()}
            for c in drop_records:
                for u, s in c["units"].items():
                    if kept.get(u) != s:
                        doomed.setdefault(u, []).append(s)
        in_history = {u: set(h) for u, h in job.lineage.items()}
        for u in job.units:  # images left by an abandoned history (checkpoints after a restart point)
            for s in await asyncio.to_thread(store.unit_checkpoints, job.id, u):
                used = any(c["units"].get(u) == s for c in keep_records)
                if s not in in_history.get(u, set()) and not used and s not in doomed.get(u, []):
                    doomed.setdefault(u, []).append(s)
        freed = 0
        if not dry_run:
            for c in drop_records:
                await asyncio.to_thread(store.delete_checkpoint, job.id, c["id"])
            for u, seqs in doomed.items():
                for s in seqs:
                    d = store.images_dir(job.id, u, s)
                    freed += await asyncio.to_thread(_tree_size, d)
                    await asyncio.to_thread(store.delete_images, job.id, u, s)
        return {"job": job.id, "dry_run": dry_run, "deleted_checkpoints": [c["id"] for c in drop_records],
                "deleted_images": {u: sorted(v) for u, v in doomed.items() if v}, "bytes_freed": freed,
                "notes": records}

    # ----------------------------------------------------------------- restart
    async def kill_units(self, job: JobState, names: list[str], timeout: float = 10.0) -> None:
        """Kill the named units' trees and wait until their agents report them gone."""
        targets = [job.units[n] for n in names if job.units[n].state not in TERMINAL_UNIT_STATES]
        for u in targets:
            try:
                await self.orch.send(u.site, u.node, "kill", job=job.id, unit=u.name)
            except BusError:
                u.state = "lost"
        deadline = time.monotonic() + timeout
        while any(u.state not in TERMINAL_UNIT_STATES for u in targets) and time.monotonic() < deadline:
            await self.orch.wait_units(lambda j, u: j is job, 0.2)

    async def restart(self, job: JobState, checkpoint: str | None, place: dict[str, str]) -> dict[str, Any]:
        """Restart every unit of ``job`` from a committed checkpoint (the newest by default)."""
        if job.busy:
            raise ControlError(f"job {job.id} is busy ({job.busy} in progress)")
        store = self.orch.store

        def pick() -> dict[str, Any] | list[dict[str, Any]]:
            """The checkpoint named exactly (one file read), else every committed one."""
            exact = store.committed_checkpoint(job.id, checkpoint) if checkpoint else None
            return exact if exact is not None else store.list_checkpoints(job.id)

        found = await asyncio.to_thread(pick)
        if isinstance(found, dict):
            ckpt = found
        elif checkpoint:
            matches = [c for c in found if c["id"] == checkpoint or c["id"].startswith(checkpoint)]
            if len(matches) != 1:
                raise ControlError(f"job {job.id}: no committed checkpoint {checkpoint!r}", 2)
            ckpt = matches[0]
        elif found:
            ckpt = found[-1]
        else:
            raise ControlError(f"job {job.id} has no committed checkpoint")
        plan = {name: int(ckpt["units"][name]) for name in job.units}
        return await self._restore(job, plan, place, ckpt["id"])

    async def restart_line(self, job: JobState, place: dict[str, str]) -> dict[str, Any]:
        """Restart from the recovery line: units whose line is `current` keep running."""
        if job.busy:
            raise ControlError(f"job {job.id} is busy ({job.busy} in progress)")
        if not job.interposed():
            raise ControlError(f"job {job.id} runs no unit under the shim: it has no determinant log "
                               "(use a coordinated checkpoint, or protocol = \"independent\")", 2)
        result = await self.orch.recovery_line(job)
        plan: dict[str, int] = {}
        for name, value in result["line"].items():
            if value == "current":
                continue
            hist = job.lineage.get(name, [])
            plan[name] = hist[value - 1] if value else 0
        if not plan:
            raise ControlError(f"job {job.id}: the recovery line keeps every unit at its current state; "
                               "nothing to restart")
        res = await self._restore(job, plan, place, "recovery-line")
        res.update(line=result["line"], replay=result["replay"], domino=result["domino"])
        return res

    async def _restore(self, job: JobState, plan: dict[str, int], place: dict[str, str],
                       label: str) -> dict[str, Any]:
        """Kill the units of ``plan`` and bring each back from its store seq (0: start afresh)."""
        unknown = [n for n in place if n not in job.units]
        if unknown:
            raise ControlError(f"--place names unknown unit(s): {', '.join(unknown)}", 2)
        not_planned = [n for n in place if n not in plan]
        if not_planned:
            raise ControlError(f"--place names unit(s) that keep running: {', '.join(not_planned)}", 2)
        store = self.orch.store
        t_all = time.perf_counter()
        # Refuse a damaged checkpoint before touching the running job: with a live unit at stake
        # every image is hashed here.  With none, the agents check presence, sizes and sha256
        # before anything restored runs (CRIU's page data while CRIU restores).
        verified = any(job.units[n].state not in TERMINAL_UNIT_STATES for n in plan)
        full = job.spec.get("verify_images") == "full"   # else files unchanged since sealed are not re-read
        if verified:
            try:
                await asyncio.to_thread(lambda: [verify_manifest(store.images_dir(job.id, n, s), False, None, full)
                                                 for n, s in plan.items() if s])
            except CorruptCheckpoint as exc:
                raise ControlError(f"checkpoint {label} of {job.id} is damaged: {exc}") from None
        job.busy = "restart"
        job.state = "restarting"
        rst_id = "rst-" + uuid.uuid4().hex[:10]
        names = list(plan)
        try:
            await self.kill_units(job, names)
            fixed = dict(place)
            for name in names:
                u = job.units[name]
                agent = self.orch.agent_for(u.node)
                if name not in fixed and agent is not None and not agent.lost:
                    fixed[name] = u.node
            try:
                placed = place_units([{"name": n} for n in names], self.orch.live_agents(), self.orch.unit_load(),
                                     fixed)
            except PlacementError as exc:
                raise StageFailed(str(exc)) from None
            units = [job.units[n] for n in names]
            for u in units:
                agent = placed[u.name]
                u.node, u.site, u.state = agent.node, agent.site, "restarting"
            specs = {s["name"]: self.orch.unit_launch_spec(job, s) for s in job.spec["units"]}
            intervals = {n: job.rewind(n, plan[n]) for n in names}
            args = {n: {"seq": plan[n], "from": label, "spec": specs[n], "interval": intervals[n],
                        "fresh": plan[n] == 0, "verified": verified, "full_verify": full,
                        "timeout": self._timeout(job)} for n in names}
            stages_ms: dict[str, float] = {}
            per_unit = {u.name: {"name": u.name, "node": u.node, "seq": plan[u.name], "stages_ms": {}} for u in units}
            def record(stage: str, res: dict[str, dict[str, Any]], ms: float) -> None:
                stages_ms[stage] = ms
                for name, r in res.items():
                    per_unit[name]["stages_ms"][stage] = r["ms"]
                    data = r.get("data") or {}
                    if data.get("pid"):
                        per_unit[name]["pid"] = job.units[name].pid = data["pid"]
                    if isinstance(data.get("started_ahead"), bool):
                        per_unit[name]["started_ahead"] = data["started_ahead"]

            await self._stages_in_turn(job, rst_id, list(protocol.RESTART_STAGES), units, args,
                                       self._timeout(job), record)
            interposed = set(job.interposed())
            if interposed & set(names):
                await asyncio.to_thread(lambda: [self.orch.determinants.rollback(job.id, n, intervals[n])
                                                 for n in names if n in interposed])
        except StageFailed as exc:
            job.busy = ""
            await self.kill_units(job, names)
            for n in names:
                if job.units[n].state not in TERMINAL_UNIT_STATES:
                    job.units[n].state = "failed"
            job.state = "failed"
            await self.orch.save_job(job)
            event(log, "restart failed", logging.WARNING, job=job.id, reason=str(exc))
            raise ControlError(f"restart of {job.id} failed: {exc}") from None
        total_ms = _ms(t_all)   # every unit runs again (as for a checkpoint's total)
        now = time.time()
        for n in names:
            u = job.units[n]
            u.state, u.started, u.exit_code, u.signal = "running", now, None, None
            u.detail = f"restored from {label}" if plan[n] else "started afresh"
        job.restarts += 1
        job.busy = ""
        job.state = job.derive_state()
        await self.orch.save_job(job)
        for pu in per_unit.values():
            pu["total_ms"] = round(sum(pu["stages_ms"].values()), 2)
        event(log, "job restarted", job=job.id, source=label, units=",".join(names))
        return {"job": job.id, "from": label, "total_ms": total_ms, "stages_ms": stages_ms,
                "units": list(per_unit.values())}

    async def auto_restart(self, job: JobState) -> None:
        """`restart = "auto"`: bring a failed job back from its newest checkpoint, or from scratch."""
        limit = int(job.spec.get("max_restarts", 3))
        if job.busy or job.state == "cancelled":
            return
        if job.restarts >= limit:
            event(log, "auto restart: limit reached", logging.WARNING, job=job.id, restarts=job.restarts)
            return
        ckpts = await asyncio.to_thread(self.orch.store.list_checkpoints, job.id)
        try:
            if job.spec.get("protocol") == "independent":
                res = await self.restart_line(job, {})
                event(log, "auto restart from the recovery line", job=job.id, line=str(res["line"]),
                      total_ms=res["total_ms"])
            elif ckpts:
                res = await self.restart(job, None, {})
                event(log, "auto restart", job=job.id, checkpoint=res["from"], total_ms=res["total_ms"])
            else:
                job.busy = "restart"
                try:
                    await self.kill_units(job, list(job.units))
                finally:
                    job.busy = ""
                job.restarts += 1
                job.state = "pending"
                await self.orch.launch_units(job, list(job.units))
                event(log, "auto restart from scratch", job=job.id)
        except ControlError as exc:
            event(log, "auto restart failed", logging.WARNING, job=job.id, error=str(exc))
