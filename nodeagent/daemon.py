"""The node agent (job-unit checkpointer) daemon: one per node.

It registers with the orchestrator, heartbeats with the state of its units, and executes the
commands published to ``agent.<site>.<node>``: ``launch``, ``kill``, ``stages`` (one stage for
several of its units, answered with one ``stage_results``) and ``ping``.  Stages of one unit run
one after the other; different units proceed in parallel.  It also ships its units' determinants
(``shipper``) and remembers its units in ``<store>/agents/`` to adopt them after a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import psutil

from interpose import shim_env
from interpose.control import ControlPage
from orchestrator import protocol
from orchestrator.bus.base import Bus, BusError, Delivery
from orchestrator.logs import event
from orchestrator.store import Store, sync_store, write_json_atomic

from .checkpointers.base import CheckpointError
from .checkpointers.registry import capabilities
from .shipper import Shipper, ensure_shim_dir
from .freezer import Freezer, alive_pids, sweep_empty_cgroups
from .stage_batch import BATCH_STAGES
from .stages import UnitStageRunner
from .units import Unit, become_subreaper

log = logging.getLogger("gridckpt.agent")
HOLD_ANSWER = 0.002   # s a chained stage's answer waits for the next one (see NodeAgent._stages)
AFTER_CHAIN = 0.003   # s after a chain's last answer is out before the background work starts
FULL_REPORT_EVERY = 5   # heartbeats between two full reports of a unit (see _light_beat)


def _cgroup_root(job: Any, unit: Any) -> int | None:
    """The root of the tree in the unit's cgroup: the live member whose parent is not one."""
    if not isinstance(job, str) or not isinstance(unit, str):
        return None
    members = set(alive_pids(Freezer(job, unit, list).cgroup_pids()))
    roots = []
    for pid in members:
        try:
            if psutil.Process(pid).ppid() not in members:
                roots.append(pid)
        except psutil.Error:
            continue
    return min(roots) if roots else None


_ANSWERED = ("ok", "ms", "error", "data")   # a unit's fields in a stage_results answer


class _Watchdog:
    """The timer that abandons a checkpoint whose orchestrator fell silent, and the units (and
    their stage args) it still holds on this agent."""

    __slots__ = ("delay", "timer", "units")

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.timer: asyncio.TimerHandle
        self.units: dict[str, dict[str, Any]] = {}


def _said(report: dict[str, Any]) -> tuple:
    """What a unit report says that the orchestrator keeps: state, pid, start (nprocs is
    refreshed by heartbeats), and an ended unit's exit."""
    return (report.get("state"), report.get("pid"), report.get("started"), report.get("exit_code"),
            report.get("signal"), report.get("detail"))


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _zombie_status(pid: int) -> str:
    """How a zombie ended, from the exit_code field of /proc/<pid>/stat (wait status)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            status = int(f.read().rsplit(b" ", 1)[-1])
    except (OSError, ValueError):
        return ""
    return f" (signal {status & 0x7F})" if status & 0x7F else f" (code {status >> 8})"


class NodeAgent:
    """State and behaviour of one node agent (transport-agnostic)."""

    def __init__(self, bus: Bus, store: Store, node: str, site: str = "default", *,
                 heartbeat_interval: float = 1.0) -> None:
        self.bus = bus
        self.store = store
        self.node = node
        self.site = site
        self.heartbeat_interval = heartbeat_interval
        self.units: dict[tuple[str, str], Unit] = {}
        self.runner = UnitStageRunner(store, node=node)
        self.shipper = Shipper(bus, site, node)
        self._queues: dict[tuple[str, str], asyncio.Queue] = {}
        self._workers: dict[tuple[str, str], asyncio.Task] = {}
        self._executing: set[tuple[str, str]] = set()      # units whose worker runs a command
        self._batch_busy: dict[tuple[str, str], asyncio.Future] = {}   # units in a batch stage
        self._tasks: set[asyncio.Task] = set()
        self._consumer: Any = None
        self._hb_task: asyncio.Task | None = None
        self._watchdogs: dict[tuple[str, str], _Watchdog] = {}   # (job, checkpoint) -> its units here
        self._aborted: OrderedDict[str, None] = OrderedDict()   # checkpoint ids told to abort (recent)
        self._saved: dict[tuple[str, str], tuple] = {}   # what the unit list file holds of each unit
        self._save_task: asyncio.Task | None = None
        self._save_dirty = False
        self._save_asked = self._save_done = 0   # unit list writes asked for, and written
        self._save_waiters: list[tuple[int, asyncio.Future]] = []   # (upto, woken once written)
        self._events: asyncio.Queue = asyncio.Queue()
        self._event_task: asyncio.Task | None = None
        self.hold_answer = HOLD_ANSWER   # see _stages
        self._chains = 0   # stage chains running (_stages)
        self._held_units: set[tuple[str, str]] = set()   # their units, until _after_chains
        # the held units that changed, in the order of their last change: (unit, tree changed)
        self._held_changes: dict[tuple[str, str], tuple[Unit, bool]] = {}
        self._published: dict[tuple[str, str], tuple] = {}  # what each unit's last published report said
        self._save_after_chain = False   # a held unit changed what the unit list says
        self._listing: dict[tuple[str, str], int] = {}   # unit -> the write listing it as restarting
        self._gate: asyncio.Future | None = None   # see background_gate
        self._ready_wanted: set[tuple[str, str]] = set()   # units whose backend gets ready next (_get_ready)

    @property
    def queue_name(self) -> str:
        return f"gridckpt.agent.{self.site}.{self.node}"

    # ----------------------------------------------------------------- lifecycle
    @property
    def state_file(self) -> Path:
        """Where this agent remembers its units, to adopt them again after a restart."""
        return self.store.root / "agents" / f"{self.site}.{self.node}.json"

    def _save_soon(self) -> None:
        """Persist the unit list now, off the loop; changes made meanwhile go in the next write.
        Not fsync'ed: the file matters only while this node's processes live (a crash of the
        node takes the units with it), and an agent killed after the write loses nothing."""
        self._save_dirty = True
        self._save_asked += 1
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.create_task(self._save_loop())

    async def _save_loop(self) -> None:
        try:
            while self._save_dirty:
                self._save_dirty = False
                asked = self._save_asked
                try:
                    await asyncio.to_thread(self._save_units, self._unit_rows(), False)
                except OSError as exc:   # units run on; only a later agent's adoption would miss them
                    event(log, "unit list not written", logging.WARNING, path=str(self.state_file), error=str(exc))
                self._save_done = asked
                self._wake_save_waiters(asked)
        finally:
            self._wake_save_waiters(None)   # nothing more is being written: nobody waits on

    def _wake_save_waiters(self, done: int | None) -> None:
        """Wake who waits for a write up to ``done`` (None: everyone)."""
        keep = []
        for upto, fut in self._save_waiters:
            if done is None or upto <= done:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((upto, fut))
        self._save_waiters = keep

    async def _unit_list_written(self, upto: int) -> None:
        """Wait until the unit list on disk holds the changes asked for up to ``upto``
        (a ``_save_asked`` value): that write, not the ones asked for since (a rebuild's
        answer must not wait for the write that lists the restored pid)."""
        if self._save_done >= upto or self._save_task is None or self._save_task.done():
            return
        fut = asyncio.get_running_loop().create_future()
        self._save_waiters.append((upto, fut))
        await fut

    def _unit_rows(self) -> list[dict[str, Any]]:
        """Units whose tree lives (or is being restored: no pid yet; a later agent finds the
        tree in the unit's cgroup)."""
        return [{"job": u.job, "unit": u.name, "spec": u.spec, "pid": u.root_pid, "started": u.started}
                for u in self.units.values()
                if not u.ended and (u.root_pid or u.state in ("pending", "restarting"))]

    def _save_units(self, rows: list[dict[str, Any]] | None = None, durable: bool = True) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, self._unit_rows() if rows is None else rows, durable)

    async def _adopt_previous_units(self) -> None:
        """Units a previous incarnation of this agent left running are watched again."""
        try:
            rows = json.loads(await asyncio.to_thread(self.state_file.read_text))
        except FileNotFoundError:
            return
        except ValueError as exc:
            event(log, "unit state file unreadable", logging.WARNING, path=str(self.state_file), error=str(exc))
            return
        for row in rows:
            pid, started = row.get("pid"), row.get("started") or 0.0
            why = ""
            if not isinstance(pid, int) or not alive_pids([pid]):
                # listed while its tree was being restored (no pid yet, or the old tree's):
                # the restored tree is in the unit's cgroup
                found = _cgroup_root(row.get("job"), row.get("unit"))
                if found is not None:
                    pid, started = found, _create_time(found)
                elif not isinstance(pid, int):
                    event(log, "unit not adopted: no process left", job=row.get("job"), unit=row.get("unit"))
                    continue
            try:
                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE:
                    why = "exited" + _zombie_status(pid)
                elif abs(proc.create_time() - started) >= 5.0:
                    why = f"pid reused (started {proc.create_time():.1f}, expected {started:.1f})"
            except (psutil.Error, TypeError, ValueError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if why:
                event(log, "unit not adopted: its process is gone", job=row.get("job"), unit=row.get("unit"),
                      pid=pid, reason=why)
                continue
            unit = await self._new_unit(row["job"], row["unit"], row["spec"])
            unit.adopt(pid)
            unit.started = started
            await unit.set_state("running")
            event(log, "unit adopted", job=unit.job, unit=unit.name, pid=pid)
            self._ready_wanted.add((unit.job, unit.name))     # its backend gets ready, as for a launch
            self.runner.want_spare(str(unit.unit_dir))        # (one left written into is emptied)

    async def start(self) -> None:
        """Adopt units left running, consume commands, register, start heartbeating."""
        become_subreaper()
        await asyncio.to_thread(sweep_empty_cgroups, 60.0)
        await self._adopt_previous_units()
        self._consumer = await self.bus.consume(self.queue_name, [protocol.agent_key(self.site, self.node)],
                                                self._on_command, kind="exclusive", prefetch=256)
        await self._emit(protocol.event_key(self.site, self.node), "register", node=self.node, site=self.site,
                         pid=os.getpid(), hostname=socket.gethostname(), capabilities=capabilities(),
                         store=str(self.store.root))
        self._hb_task = asyncio.create_task(self._heartbeat_loop())
        self.shipper.start()
        if self._ready_wanted:
            self._make_spares()
        event(log, "agent started", node=self.node, site=self.site, broker=self.bus.url)

    async def stop(self, *, kill_units: bool = False) -> None:
        """Stop intake, finish in-flight stages, stop heartbeating (units keep running unless asked)."""
        if self._consumer is not None:
            await self._consumer.cancel()
            self._consumer = None
        for q in self._queues.values():
            await q.join()
        for dog in self._watchdogs.values():
            dog.timer.cancel()
        self._watchdogs.clear()
        for t in list(self._workers.values()) + list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._workers.values(), *self._tasks, return_exceptions=True)
        await self.shipper.stop()
        if self._hb_task:
            self._hb_task.cancel()
            await asyncio.gather(self._hb_task, return_exceptions=True)
        if kill_units:
            for unit in list(self.units.values()):
                await unit.close()
                await self.runner.release(unit)
        self._release_held()
        if self._event_task is not None:  # the last unit events, in order
            await asyncio.gather(self._event_task, return_exceptions=True)
        await self._publish_events()
        if self._save_task is not None:
            await asyncio.gather(self._save_task, return_exceptions=True)
        await asyncio.to_thread(self._save_units)
        await self.runner.close()
        event(log, "agent stopped", node=self.node)

    async def _emit(self, key: str, type_: str, **fields: Any) -> None:
        try:
            await self.bus.publish(key, protocol.make(type_, **fields))
        except BusError as exc:
            event(log, "publish failed", logging.WARNING, type=type_, error=str(exc))

    async def _heartbeat_loop(self) -> None:
        key = protocol.heartbeat_key(self.site, self.node)
        beat = 0
        while True:
            units = [self._unit_report(u, light=self._light_beat(u, i, beat)) for i, u in enumerate(self.units.values())]
            await self._emit(key, "heartbeat", node=self.node, site=self.site, units=units,
                             interval=self.heartbeat_interval)
            beat += 1
            await asyncio.sleep(self.heartbeat_interval)

    def _light_beat(self, unit: Unit, index: int, beat: int) -> bool:
        """Whether a heartbeat gives this unit the light report (state and pid, no scan of its
        tree, which costs about 0.25 ms a unit here: 64 of them held the loop for 15 ms).  Each
        live unit gets the full one every FULL_REPORT_EVERY beats, in turn; an ended unit always
        (its exit, nothing to scan); a unit in a stage chain never (its answers say how it is)."""
        if (unit.job, unit.name) in self._held_units:
            return True
        return not unit.ended and (index + beat) % FULL_REPORT_EVERY != 0

    def _unit_report(self, unit: Unit, *, light: bool = False) -> dict[str, Any]:
        """The unit's report for events and heartbeats; ``light``: state and pid only (no scan
        of the tree: a freeze or thaw changes neither its members nor their count)."""
        if light:
            rep = {"job": unit.job, "unit": unit.name, "state": unit.state, "started": unit.started or 0.0}
            if unit.root_pid is not None:
                rep["pid"] = unit.root_pid
            return rep
        st = unit.status()
        rep = {"job": unit.job, "unit": unit.name, "state": st["state"], "nprocs": st["nprocs"],
               "started": unit.started or 0.0}
        for k in ("pid", "exit_code", "signal"):
            if st.get(k) is not None:
                rep[k] = st[k]
        if st.get("detail"):
            rep["detail"] = str(st["detail"])
        return rep

    async def _on_unit_state(self, unit: Unit) -> None:
        """A unit changed state: report it in order, without holding up the stage that changed it
        (freeze and thaw must not wait for a quorum queue's confirm).  A unit in a running stage
        chain is held: its reports wait (the orchestrator learns the same from the chain's
        answers) until AFTER_CHAIN after the last chain's last answer, so that publishing them
        takes no time from the stages nor from their answers; so does the unit list write its
        change asks for.  Other units' reports (a unit of another job that died) go at once."""
        key, row = (unit.job, unit.name), (unit.root_pid, unit.started, unit.ended)
        same_tree = self._saved.get(key) == row   # a freeze or thaw: the unit file stays as it is
        if unit.ended:
            self.runner.unit_ended(unit)
        held = key in self._held_units
        if unit.state == "restarting":
            # listed as being restored (no pid yet) while its tree comes back: written now,
            # right before the restore starts (not while the rebuild's checks run: a thread
            # beside them slowed them), beside the restore; the rebuild's answer waits for it
            self._saved[key] = row
            self._save_soon()
            self._listing[key] = self._save_asked
        elif not same_tree:
            self._saved[key] = row
            if held:
                self._save_after_chain = True
            else:
                self._save_soon()
        if held:      # its report is made when the chains are over (the state it has then)
            full = not same_tree or self._held_changes.pop(key, (None, False))[1]
            self._held_changes[key] = (unit, full)      # (re-inserted: the order of last changes)
        else:
            self._events.put_nowait(self._unit_report(unit, light=same_tree))
            self._events_soon()

    def _events_soon(self) -> None:
        if not self._events.empty() and (self._event_task is None or self._event_task.done()):
            self._event_task = asyncio.create_task(self._publish_events())

    async def _publish_events(self) -> None:
        """Publish queued unit events in order, each message with its confirm.  What queued up
        meanwhile (a stage froze or thawed many units) goes as one message: the first report in
        its fields, the others in ``more``."""
        key = protocol.event_key(self.site, self.node)
        while not self._events.empty():
            batch = [self._events.get_nowait() for _ in range(min(self._events.qsize(), 512))]
            for report in batch:
                self._published[(report["job"], report["unit"])] = _said(report)
            await self._emit(key, "unit_event", node=self.node, **batch[0],
                             **({"more": batch[1:]} if len(batch) > 1 else {}))

    # ----------------------------------------------------------------- commands
    async def _on_command(self, msg: dict[str, Any], d: Delivery) -> None:
        t = msg["type"]
        if t == "ping":
            await self._emit(protocol.REPLIES_KEY, "pong", node=self.node, ping=msg["id"],
                             sent=msg.get("sent") or 0.0)
            return
        if t == "stages":
            self._spawn(self._stages(msg))
            return
        if t not in ("launch", "kill"):
            event(log, "ignored command", logging.WARNING, type=t)
            return
        self._on_command_local(msg)

    async def _stages(self, msg: dict[str, Any]) -> None:
        """Stages for several units of this node: ``stage``, then each of ``then`` (the message
        names every unit of the job: this agent keeps the barrier between stages).  Each stage
        runs on every unit (each in its unit's order); a checkpoint batch is made durable with one
        sync.  A stage that fails on any unit, or an abort of the checkpoint, ends the chain: the
        stages after it are not run.

        Answers (``stage_results``, each stage with ``wall_ms``, its time on this agent): the
        last stage's and a failure's at once; a stage followed by another waits up to
        ``hold_answer`` seconds and leaves with whatever completed meanwhile, as one message
        (``more``).  So the answers of quick stages (prepare, stop) go out while the next slow
        one (a CRIU dump) runs, rather than in front of it, and the last answer carries the one
        before it (checkpoint with resume_cp)."""
        if msg["stage"] == protocol.ABORT_STAGE:
            self._aborted[msg["checkpoint"]] = None
            while len(self._aborted) > 256:
                self._aborted.popitem(last=False)
        stages = [msg["stage"], *msg.get("then", ())]
        held: list[dict[str, Any]] = []
        timer: asyncio.TimerHandle | None = None
        sent: asyncio.Task | None = None

        def answer() -> None:
            nonlocal timer, sent
            if timer is not None:
                timer.cancel()
                timer = None
            if held:
                first, *more = held
                sent = self._spawn(self._emit(protocol.REPLIES_KEY, "stage_results", job=msg["job"], node=self.node,
                                              checkpoint=msg["checkpoint"], **first, **({"more": more} if more else {})))
                held.clear()

        self._chains += 1
        self._held_units.update((msg["job"], str(name)) for name in msg["units"])
        self._ready_wanted.update((msg["job"], str(name)) for name in msg["units"])
        try:
            for i, stage in enumerate(stages):
                if stage != msg["stage"] and msg["checkpoint"] in self._aborted:
                    event(log, "stage chain ended by an abort", job=msg["job"], checkpoint=msg["checkpoint"],
                          stage=stage)
                    return
                t0 = time.perf_counter()
                results = await self._stage_on_units(msg, stage)
                held.append({"stage": stage, "wall_ms": round((time.perf_counter() - t0) * 1000, 3),
                             "results": results})
                failed = not all(r["ok"] for r in results.values())
                if failed or i == len(stages) - 1:
                    answer()
                    return
                if timer is None:
                    timer = asyncio.get_running_loop().call_later(self.hold_answer, answer)
        finally:
            answer()   # (a chain ended by an abort or cancelled: what completed is still told)
            # the unit events wait until the last answer is out: on the broker too they would
            # hold it up (they go to a quorum queue)
            if sent is None or sent.done():
                self._chain_ended()
            else:
                sent.add_done_callback(lambda _: self._chain_ended())

    def _chain_ended(self) -> None:
        self._chains -= 1
        loop = asyncio.get_running_loop()
        if not self._chains:
            loop.call_later(AFTER_CHAIN, self._after_chains)
        if self.runner.spares_wanted or (self._ready_wanted and not self._chains):
            # the spare images dirs its prepare used, replaced while the checkpoint is sealed
            # (its units run again by now): not in the way of the next checkpoint; then the
            # backends get ready for the units' next stages
            loop.call_later(AFTER_CHAIN, self._make_spares)

    def _make_spares(self) -> None:
        if self.runner.spares_wanted or self._ready_wanted:
            self._spawn(self._get_ready())

    async def _get_ready(self) -> None:
        """Spare images dirs made, then (no stage chain running: it would compete with them)
        each unit's backend gets ready ahead for its next checkpoint or restart."""
        await self.runner.make_spares()
        if self._chains:
            return      # the last chain to end calls again
        wanted, self._ready_wanted = self._ready_wanted, set()
        units = [u for u in (self.units.get(k) for k in wanted) if u is not None and not u.ended
                 and u.root_pid is not None and u.state == "running"]
        if units:
            await self.runner.ready_next(units)

    def _after_chains(self) -> None:
        """``AFTER_CHAIN`` after the last chain's last answer went out: the unit list is
        written, unit events are published and background_gate opens.  The delay leaves the
        CPU to whoever handles that answer first (on one small host: the orchestrator); it
        measured 0.3 ms off a restart over amqp against writing the list at once."""
        gate, self._gate = self._gate, None
        if gate is not None and not gate.done():
            gate.set_result(None)
        if not self._chains:
            self._release_held()

    def _release_held(self) -> None:
        """The held units' reports join the queue and the unit list is written.  Only each
        unit's last report goes, and not even that when it says what the unit's last published
        report said (state, pid, start): a checkpoint froze and thawed the unit, the chain's
        answers told the orchestrator, and 64 units would otherwise send 128 reports after
        every checkpoint (logged as 128 state changes) for a net change of none."""
        self._held_units.clear()
        changes, self._held_changes = self._held_changes, {}
        for key, (unit, full) in changes.items():
            report = self._unit_report(unit, light=not full)
            if _said(report) != self._published.get(key):
                self._events.put_nowait(report)
        if self._save_after_chain:
            self._save_after_chain = False
            self._save_soon()
        self._events_soon()

    def background_gate(self) -> asyncio.Future | None:
        """For background work of a stage (a restored tree's move into its cgroup): a future
        done once the chains' answers are out, or None when no chain runs."""
        if not self._chains:
            return None
        if self._gate is None:
            self._gate = asyncio.get_running_loop().create_future()
        return self._gate

    async def _stage_on_units(self, msg: dict[str, Any], stage: str) -> dict[str, dict[str, Any]]:
        """One stage on every unit the ``stages`` message names; their results by unit name,
        each with the fields a ``stage_results`` answer carries (``_ANSWERED``)."""
        futs: dict[str, asyncio.Future] = {}
        loop = asyncio.get_running_loop()
        # a batch that writes manifests is made durable with one syncfs (see _made_durable)
        sync = stage == "seal" or (stage == "checkpoint" and any(
            not (a.get("seal_later") if isinstance(a, dict) else False) for a in msg["units"].values()))
        batch = self._batchable(msg, stage)
        if batch is not None:
            for _, _, args in batch:
                if stage in ("checkpoint", "seal"):
                    args["defer_sync"] = True
            return await self._made_durable(await self._stage_batch(msg, stage, batch), sync)
        for name, args in msg["units"].items():
            args = dict(args) if isinstance(args, dict) else {}
            if stage in ("checkpoint", "seal"):
                args["defer_sync"] = True
            futs[str(name)] = fut = loop.create_future()
            self._on_command_local({"type": "stage", "job": msg["job"], "unit": str(name),
                                    "checkpoint": msg["checkpoint"], "stage": stage, "args": args, "_reply": fut})
        results = {name: {k: v for k, v in r.items() if k in _ANSWERED}
                   for name, r in zip(futs, await asyncio.gather(*futs.values()))}
        return await self._made_durable(results, sync)

    async def _made_durable(self, results: dict[str, dict[str, Any]], sync: bool) -> dict[str, dict[str, Any]]:
        """A batch that wrote manifests is made durable with one syncfs before it is answered."""
        if sync and any(r["ok"] for r in results.values()):
            try:
                await asyncio.to_thread(sync_store, self.store.root)
            except OSError as exc:
                for r in results.values():
                    r.update(ok=False, error=f"cannot make the images durable: {exc}")
        return results

    async def _unit_worker(self, key: tuple[str, str], q: asyncio.Queue) -> None:
        while True:
            msg = await q.get()
            self._executing.add(key)
            try:
                held = self._batch_busy.get(key)
                if held is not None:      # the unit is in a batch stage: after it
                    await asyncio.shield(held)
                await self._execute(msg)
            except Exception as exc:  # a bug must not kill the worker or the daemon
                log.exception("command %s for %s/%s failed", msg["type"], *key)
                event(log, "command failed", logging.ERROR, type=msg["type"], job=key[0], unit=key[1], error=str(exc))
                reply = msg.get("_reply")
                if reply is not None and not reply.done():
                    reply.set_result({"ok": False, "ms": 0.0, "error": f"internal error: {exc}", "data": {}})
            finally:
                self._executing.discard(key)
                q.task_done()

    async def _execute(self, msg: dict[str, Any]) -> None:
        t = msg["type"]
        if t == "launch":
            await self._launch(msg["job"], msg["unit"], msg["spec"])
        elif t == "kill":
            unit = self.units.get((msg["job"], msg["unit"]))
            treeless = unit is None or unit.ended or unit.root_pid is None
            if unit is not None:
                await unit.kill()   # (a unit with no tree: leftovers in its cgroup, if any)
            if treeless:   # no tree to end, so no exit to report: say it is over, or the caller waits
                state = unit.state if unit is not None and unit.state in ("failed", "exited") else "exited"
                detail = (unit.detail if unit is not None and unit.detail else "not running here")
                await self._emit(protocol.event_key(self.site, self.node), "unit_event", node=self.node,
                                 job=msg["job"], unit=msg["unit"], state=state, detail=str(detail))
        else:
            await self._stage(msg)

    async def _new_unit(self, job: str, name: str, spec: dict[str, Any]) -> Unit:
        old = self.units.get((job, name))
        if old is not None and not old.ended:
            raise CheckpointError(f"unit {name} is still running here (pid {old.root_pid})")
        if old is not None:  # its backend lets go of what it held (the app socket) before the new one
            self.units.pop((job, name), None)
            await self.runner.release(old)
        unit = Unit(job, name, spec, self.store.unit_dir(job, name), cwd=spec.get("cwd") or spec.get("base_dir") or None,
                    on_state=self._on_unit_state)
        unit.background_gate = self.background_gate
        if spec.get("interpose") or spec.get("protocol") == "independent":
            shim_dir, control = ensure_shim_dir(unit.unit_dir)
            ControlPage(control).close()  # created before the unit maps it
            unit.env.update(shim_env(name, shim_dir, control, base={}))
            self.shipper.watch(job, name, shim_dir)
        self.units[(job, name)] = unit
        return unit

    async def _fresh(self, unit: Unit, stage: str) -> dict[str, Any]:
        """Restart stages for a unit whose recovery line is its initial state: launch it anew."""
        t0 = time.perf_counter()
        if stage == "rebuild":
            if unit.root_pid is not None and unit.pids():
                await unit.kill()
            self.shipper.rolled_back(unit.job, unit.name)
            self._set_interval(unit, 0)
            plan = self.runner.backend(unit.spec.get("checkpointer", "criu")).plan_launch(unit, list(unit.spec["command"]))
            await unit.launch(plan, stopped=True)
            await unit.set_state("stopped")
        else:
            await unit.thaw()
            await unit.set_state("running")
        return {"ms": (time.perf_counter() - t0) * 1000, "data": {"pid": unit.root_pid or 0, "fresh": True}}

    def _arm_watchdog(self, unit: Unit, ckpt: str, args: dict[str, Any]) -> None:
        """A unit mid-checkpoint whose orchestrator falls silent is resumed: the checkpoint is
        abandoned.  One timer per checkpoint (its units on this agent join it), not one per
        unit: a batch of 64 units armed and disarmed 64 timers per checkpoint."""
        key = (unit.job, ckpt)
        dog = self._watchdogs.get(key)
        if dog is None:
            delay = 2 * float(args.get("timeout") or 30.0)
            dog = self._watchdogs[key] = _Watchdog(delay)
            dog.timer = asyncio.get_running_loop().call_later(delay, self._watchdog_fired, key)
        dog.units[unit.name] = args

    def _watchdog_fired(self, key: tuple[str, str]) -> None:
        dog = self._watchdogs.pop(key, None)
        if dog is None:
            return
        job, ckpt = key
        for name, args in dog.units.items():
            event(log, "no resume_cp or abort in time: abandoning the checkpoint and thawing", logging.WARNING,
                  job=job, unit=name, checkpoint=ckpt, waited_s=dog.delay)
            self._on_command_local(protocol.make("stage", job=job, unit=name, checkpoint=ckpt,
                                                 stage=protocol.ABORT_STAGE, args=dict(args)))

    def _disarm_watchdog(self, job: str, name: str, ckpt: str) -> None:
        dog = self._watchdogs.get((job, ckpt))
        if dog is not None and dog.units.pop(name, None) is not None and not dog.units:
            dog.timer.cancel()
            del self._watchdogs[(job, ckpt)]

    def _on_command_local(self, msg: dict[str, Any]) -> None:
        """Queue a command as if it had come from the bus (serialised with the unit's others)."""
        key = (msg["job"], msg["unit"])
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = asyncio.Queue()
            self._workers[key] = asyncio.create_task(self._unit_worker(key, q))
        q.put_nowait(msg)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _set_interval(self, unit: Unit, interval: int) -> None:
        """Stamp the unit's next determinants with ``interval`` (a unit under the shim only)."""
        if "LD_PRELOAD" in unit.env:
            _, control = ensure_shim_dir(unit.unit_dir)
            with ControlPage(control) as page:
                page.interval = interval

    async def _launch(self, job: str, name: str, spec: dict[str, Any]) -> None:
        try:
            unit = await self._new_unit(job, name, spec)
            backend = self.runner.backend(spec.get("checkpointer", "criu"))
            plan = backend.plan_launch(unit, list(spec["command"]))
            await unit.launch(plan)
            event(log, "unit launched", job=job, unit=name, pid=unit.root_pid)
            self.runner.want_spare(str(unit.unit_dir))   # its first checkpoint finds a spare
            self._ready_wanted.add((job, name))
            if not self._chains:
                self._make_spares()
        except (CheckpointError, OSError, KeyError) as exc:
            event(log, "launch failed", logging.WARNING, job=job, unit=name, error=str(exc))
            await self._emit(protocol.event_key(self.site, self.node), "unit_event", node=self.node, job=job,
                             unit=name, state="failed", detail=f"launch failed: {exc}")

    async def _after_stage(self, unit: Unit, stage: str, ckpt: str, args: dict[str, Any],
                           res: dict[str, Any]) -> dict[str, Any]:
        """What follows a stage that succeeded on a unit: determinants flushed (checkpoint),
        the watchdog armed (prepare) or disarmed, the shim's interval moved on."""
        if stage == "checkpoint" and "LD_PRELOAD" in unit.env:
            res = dict(res, data={**res.get("data", {}),
                                  "shipped": await self.shipper.flush_unit(unit.job, unit.name)})
        self._after_stage_now(unit, stage, ckpt, args)
        return res

    def _after_stage_now(self, unit: Unit, stage: str, ckpt: str, args: dict[str, Any]) -> None:
        """``_after_stage`` but the determinants' flush."""
        job, name = unit.job, unit.name
        if stage == "prepare":
            self._arm_watchdog(unit, ckpt, args)
        if stage in ("resume_cp", protocol.ABORT_STAGE):
            self._disarm_watchdog(job, name, ckpt)
        if stage == "resume_cp":
            self._set_interval(unit, int(args.get("interval", args.get("seq", 0))))
        elif stage == "rebuild":
            self.shipper.rolled_back(job, name)
            self._set_interval(unit, int(args.get("interval", args.get("seq", 0))))

    def _batchable(self, msg: dict[str, Any], stage: str) -> list[tuple[str, Unit, dict[str, Any]]] | None:
        """The message's units for one ``run_batch``, or None: the stage has no batch form, or
        a unit is not here, has a command queued or running (its order must hold), or odd args."""
        if stage not in BATCH_STAGES or len(msg["units"]) < 2:
            return None
        batch = []
        copy = stage in ("checkpoint", "seal")      # their args get defer_sync (see _stage_on_units)
        job, units, queues, executing, busy = msg["job"], self.units, self._queues, self._executing, self._batch_busy
        for name, args in msg["units"].items():
            key = (job, str(name))
            unit = units.get(key)
            q = queues.get(key)
            if (unit is None or key in executing or key in busy or (q is not None and not q.empty())
                    or not isinstance(args, dict) or not isinstance(args.get("seq", 0), int)):
                return None
            batch.append((key[1], unit, dict(args) if copy else args))
        return batch

    async def _stage_batch(self, msg: dict[str, Any], stage: str,
                           batch: list[tuple[str, Unit, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """One stage on many units through ``run_batch``; each unit's answer fields, as
        ``_stage`` gives them.  The units' command queues wait meanwhile."""
        job, ckpt = msg["job"], msg["checkpoint"]
        held = asyncio.get_running_loop().create_future()
        for name, _, _ in batch:
            self._batch_busy[(job, name)] = held
        try:
            limit = 2 * max(float(args.get("timeout") or 30.0) for _, _, args in batch)
            try:
                async with asyncio.timeout(limit):
                    outcomes = await self.runner.run_batch(stage, ckpt, [(unit, args) for _, unit, args in batch])
            except TimeoutError:
                outcomes = {name: CheckpointError(f"{stage} of {name} did not finish within {limit:g} s")
                            for name, _, _ in batch}
            # the fields _stages answers with (run_batch's results are fresh copies: no copy here)
            results: dict[str, dict[str, Any]] = {}
            shimmed = stage == "checkpoint"
            for name, unit, args in batch:
                res = outcomes[name]
                if isinstance(res, CheckpointError):
                    event(log, "stage failed", logging.WARNING, job=job, unit=name, stage=stage, checkpoint=ckpt,
                          error=str(res))
                    results[name] = {"ok": False, "ms": 0.0, "data": {}, "error": str(res)}
                    continue
                if shimmed and "LD_PRELOAD" in unit.env:
                    res = await self._after_stage(unit, stage, ckpt, args, res)
                else:       # nothing to await: no coroutine per unit
                    self._after_stage_now(unit, stage, ckpt, args)
                results[name] = {"ok": True, "ms": float(res.get("ms", 0.0)), "data": res.get("data") or {}}
            return results
        finally:
            for name, _, _ in batch:
                self._batch_busy.pop((job, name), None)
            held.set_result(None)

    async def _stage(self, msg: dict[str, Any]) -> None:
        job, name, stage, ckpt = msg["job"], msg["unit"], msg["stage"], msg["checkpoint"]
        args = msg.get("args") or {}
        t0 = time.perf_counter()
        try:
            unit = self.units.get((job, name))
            if stage == "rebuild":
                if unit is None or unit.ended:
                    if "spec" not in args:
                        raise CheckpointError("rebuild without a unit spec")
                    unit = await self._new_unit(job, name, args["spec"])
                self._listing.pop((job, name), None)
            if unit is None:
                if stage == protocol.ABORT_STAGE:
                    res: dict[str, Any] = {"ms": 0.0, "data": {"note": "unit not here"}}
                else:
                    raise CheckpointError(f"unit {name} of job {job} is not on node {self.node}")
            elif args.get("fresh") and stage in protocol.RESTART_STAGES:
                res = await self._fresh(unit, stage)
            else:
                limit = 2 * float(args.get("timeout") or 30.0)  # a stuck stage must not block the unit forever
                try:
                    async with asyncio.timeout(limit):   # in this task: no task per unit and stage
                        res = await self.runner.run(unit, stage, ckpt, int(args.get("seq", 0)), args)
                except TimeoutError:
                    raise CheckpointError(f"{stage} of {name} did not finish within {limit:g} s") from None
                res = await self._after_stage(unit, stage, ckpt, args, res)
            if stage == "rebuild":   # an agent killed from now on still adopts the rebuilt tree
                listed = self._listing.pop((job, name), None)
                if listed is None:   # the unit never said "restarting" (a backend's own way)
                    self._save_soon()
                    listed = self._save_asked
                await self._unit_list_written(listed)
            ok, error = True, ""
        except CheckpointError as exc:
            res, ok, error = {"ms": (time.perf_counter() - t0) * 1000, "data": {}}, False, str(exc)
            event(log, "stage failed", logging.WARNING, job=job, unit=name, stage=stage, checkpoint=ckpt, error=error)
        data = dict(res.get("data") or {})
        fields: dict[str, Any] = {"job": job, "unit": name, "node": self.node, "checkpoint": ckpt, "stage": stage,
                                  "ok": ok, "ms": float(res.get("ms", 0.0)), "data": data}
        if error:
            fields["error"] = error
        reply = msg.get("_reply")  # None for the watchdog's own abort
        if reply is not None:
            reply.set_result(fields)
