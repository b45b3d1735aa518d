"""One checkpoint stage on many units of this agent in one pass (``UnitStageRunner.run_batch``).

``run`` per unit costs a task, a future, a timer and a queue hop per unit and stage, plus a
trip to a thread for each images directory and manifest; with 64 units on one agent that
overhead was most of the checkpoint.  Here each stage does its per-unit bookkeeping in plain
loops and its waiting once for all units:

=============  =============================================================================
prepare        images directories made in one thread trip; job-file callbacks (units that
               have one) side by side; backend ``prepare_many`` (app: every program gets
               CHECKPOINT before the first answer is awaited) or ``prepare`` side by side.
               Backends that ``stages_images`` (app) write into the units' spare dirs
               instead, asked at once; the spares move into place with the manifests
stop           units whose backend leaves the freezer alone (app) frozen through their job's
               cgroup, one write, when it holds just them (freezer.freeze_together); else every
               freezer told to freeze first, then each waited for (the kernel freezes them all
               meanwhile)
checkpoint     backends flagged ``quick_checkpoint`` (app: a directory listing; nothing when
               the images went to the spare) one after the other, the others (CRIU) side
               by side; manifests, when not sealed later, written in one thread trip
resume_cp      before_thaw and thaw unit by unit (neither waits; units frozen together: every
               before_thaw, ``before_thaw_many`` if the backend has it, then one thaw),
               backend ``resume_cp_many``
               or ``resume_cp`` side by side, job-file callbacks side by side
seal           every manifest hashed and written in one thread trip (the daemon then makes
               them durable with one syncfs)
=============  =============================================================================

The outcome of each unit is what ``run`` would have given it: the same result or error, the
same idempotence under redelivery (a unit whose stage already ran, or is running, gets that
outcome), the same timings in its checkpoint context.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from nodeagent.callbacks import run_callback
from nodeagent.checkpointers.base import CheckpointError
from nodeagent.freezer import freeze_together, thaw_together
from orchestrator.store import StoreError

if TYPE_CHECKING:
    from nodeagent.stages import UnitStageRunner

log = logging.getLogger("gridckpt.stages")

BATCH_STAGES = frozenset({"prepare", "stop", "checkpoint", "resume_cp", "seal"})


class _Item:
    """One unit's part of a batch."""

    __slots__ = ("unit", "args", "seq", "fut", "backend", "ctx", "data", "error", "t_done")

    def __init__(self, unit: Any, args: dict[str, Any], seq: int | None, fut: asyncio.Future, backend: Any) -> None:
        self.unit, self.args, self.seq, self.fut, self.backend = unit, args, seq, fut, backend
        self.ctx: dict[str, Any] = {}
        self.data: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.t_done = 0.0

    @property
    def live(self) -> bool:
        return self.error is None and self.data is None

    def fail(self, exc: BaseException) -> None:
        if self.live:
            self.error, self.t_done = exc, time.monotonic()

    def finish(self, data: dict[str, Any]) -> None:
        if self.live:
            self.data, self.t_done = data, time.monotonic()


def _as_checkpoint_error(exc: BaseException, stage: str, item: _Item) -> CheckpointError:
    """The error ``run`` would have raised for this unit."""
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, (StoreError, OSError)):
        return CheckpointError(f"{stage} of {item.unit.name}: {exc}")
    log.error("stage %s of %s/%s crashed: %r", stage, item.unit.job, item.unit.name, exc)
    return CheckpointError(f"{stage} of {item.unit.name}: internal error: {type(exc).__name__}: {exc}")


async def run_batch(runner: "UnitStageRunner", stage: str, cid: str,
                    units: list[tuple[Any, dict[str, Any]]]) -> dict[str, dict[str, Any] | CheckpointError]:
    """``stage`` of checkpoint ``cid`` on every (unit, args): each unit's ``run`` result, or
    its CheckpointError, by unit name.  The results are the stage's remembered outcomes
    themselves (``run`` hands out copies): read them, do not change them."""
    if stage not in BATCH_STAGES:
        raise ValueError(f"stage {stage!r} has no batch form")
    items: list[_Item] = []
    earlier: dict[str, asyncio.Future] = {}
    for unit, args in units:
        fut = runner.claim(unit, cid, stage)
        if fut is None:      # ran already, or running: its outcome, as run() would give it
            earlier[unit.name] = runner.outcome(unit, cid, stage)
            continue
        items.append(_Item(unit, args, int(args.get("seq") or 0) or None, fut, runner.backend_for(unit)))
    t0 = time.monotonic()
    try:
        await _BODIES[stage](runner, cid, items)
    except asyncio.CancelledError:
        for it in items:
            if not it.fut.done():
                runner.unclaim(it.unit, cid, stage)
                it.fut.cancel()
        raise
    except Exception as exc:      # a bug: every unit still gets a one-line answer
        for it in items:
            it.fail(exc)
    out: dict[str, dict[str, Any] | CheckpointError] = {}
    for it in items:
        if it.live:   # a body that forgot a unit: never leave its future pending
            it.fail(RuntimeError("no outcome"))
        if it.error is not None:
            err = _as_checkpoint_error(it.error, stage, it)
            it.fut.set_exception(err)
            it.fut.exception()   # retrieved: the caller reads it from ``out``
            out[it.unit.name] = err
        else:
            ms = round((it.t_done - t0) * 1000, 3)
            res = {"stage": stage, "ms": ms, "data": it.data or {}}
            runner.stage_done(it.unit, cid, stage, ms)
            it.fut.set_result(res)
            out[it.unit.name] = res      # (shared with the remembered outcome: read, never changed)
    for name, fut in earlier.items():
        try:
            res = await asyncio.shield(fut)
            out[name] = dict(res, data=dict(res["data"]))
        except CheckpointError as exc:
            out[name] = exc
    return out


def _enter(runner: "UnitStageRunner", cid: str, items: list[_Item], stage: str, alive_first: bool) -> list[_Item]:
    """Each unit's checkpoint context and liveness check, in ``run``'s order; the live ones."""
    for it in items:
        try:
            if alive_first:
                runner._require_alive(it.unit, stage)
            it.ctx = runner._context(it.unit, cid, it.seq)
            if not alive_first and stage != "resume_cp":
                runner._require_alive(it.unit, stage)
        except CheckpointError as exc:
            it.fail(exc)
    return [it for it in items if it.live]


async def _side_by_side(items: list[_Item], call: Callable[[_Item], Awaitable[Any]]) -> list[Any]:
    """``call`` for every item concurrently; each item's outcome (value or exception)."""
    if not items:
        return []
    if len(items) == 1:
        try:
            return [await call(items[0])]
        except Exception as exc:  # noqa: BLE001 - reported per unit
            return [exc]
    return list(await asyncio.gather(*(call(it) for it in items), return_exceptions=True))


def _by_backend(runner: "UnitStageRunner", items: list[_Item]) -> dict[int, tuple[Any, list[_Item]]]:
    groups: dict[int, tuple[Any, list[_Item]]] = {}
    for it in items:
        groups.setdefault(id(it.backend), (it.backend, []))[1].append(it)
    return groups


def _has_callback(unit: Any, name: str) -> bool:
    return (unit.spec.get("callbacks") or {}).get(name) is not None


async def _callbacks(runner: "UnitStageRunner", items: list[_Item], name: str, cid: str) -> dict[int, float]:
    """Job-file callback ``name`` of the units that have one, side by side; ms by item id."""
    with_cb = [it for it in items if _has_callback(it.unit, name)]
    results = await _side_by_side(with_cb, lambda it: run_callback(
        it.unit, name, checkpoint=cid, images=it.ctx["images"],
        timeout=it.args.get("callback_timeout", runner.callback_timeout)))
    ms: dict[int, float] = {}
    for it, res in zip(with_cb, results):
        if isinstance(res, BaseException):
            it.fail(res)
        elif res:
            ms[id(it)] = res["ms"]
    return ms


async def _backend_calls(runner: "UnitStageRunner", items: list[_Item], method: str,
                         args: Callable[[_Item], tuple]) -> None:
    """``backend.<method>`` for every item: ``<method>_many`` when the backend has it, else
    one call per unit side by side; failures recorded on the items."""
    for backend, group in _by_backend(runner, items).values():
        many = getattr(backend, method + "_many", None)
        if many is not None:
            outcomes = await many([args(it) for it in group])
        else:
            outcomes = await _side_by_side(group, lambda it: getattr(backend, method)(*args(it)))
        for it, res in zip(group, outcomes):
            if isinstance(res, BaseException):
                it.fail(res)


PREPARE_CHUNK = 64   # units whose images directories are made per trip to the thread


async def _prepare(runner: "UnitStageRunner", cid: str, items: list[_Item]) -> None:
    """Images directories are made a chunk at a time (``PREPARE_CHUNK``), and each chunk's
    programs are asked as soon as theirs exist: in a big batch the programs save their state
    while the thread makes the next chunk's directories.  A directory is usually the unit's
    spare renamed (stages._fresh_images_dir), quick enough that one trip per 64 units beats
    smaller chunks (measured with 64 units: 16 per trip was 1.5 ms slower).  Units whose
    backend ``stages_images`` (app) and that have an empty spare write into it instead
    (UnitStageRunner.take_spare): they are asked at once, with no trip to a thread."""
    live = _enter(runner, cid, items, "prepare", alive_first=True)
    staged: list[_Item] = []
    to_make: list[_Item] = []
    for it in live:
        spare = runner.take_spare(it.unit, it.ctx["images"], it.backend)
        if spare is None:
            to_make.append(it)
        else:
            it.ctx["spare"] = spare
            staged.append(it)

    def make(chunk: list[_Item]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        for it in chunk:
            try:
                runner.new_images_dir(it.ctx["images"])
                errors.append(None)
            except (CheckpointError, OSError) as exc:
                errors.append(exc)
        return errors

    async def ask(chunk: list[_Item]) -> None:
        cb_ms = await _callbacks(runner, chunk, "pre_checkpoint", cid)
        chunk = [it for it in chunk if it.live]
        await _backend_calls(runner, chunk, "prepare", lambda it: (it.unit, it.ctx.get("spare") or it.ctx["images"]))
        for it in chunk:
            extra = {"callback_ms": cb_ms[id(it)]} if id(it) in cb_ms else {}
            it.finish({"seq": it.ctx["seq"], **extra})

    asking: list[asyncio.Future] = []
    chunks: list[list[_Item]] = []
    try:
        for it in staged:
            it.unit.checkpoint_id = cid
        if staged:
            chunks.append(staged)
            asking.append(asyncio.ensure_future(ask(staged)))
        for start in range(0, len(to_make), PREPARE_CHUNK):
            chunk = to_make[start:start + PREPARE_CHUNK]
            for it, exc in zip(chunk, await asyncio.to_thread(make, chunk)):
                if exc is not None:
                    it.fail(exc)
            chunk = [it for it in chunk if it.live]
            for it in chunk:
                it.unit.checkpoint_id = cid
            if chunk:
                chunks.append(chunk)
                asking.append(asyncio.ensure_future(ask(chunk)))
        for chunk, res in zip(chunks, await asyncio.gather(*asking, return_exceptions=True)):
            if isinstance(res, Exception):     # a bug: the chunk's units answer with it
                for it in chunk:
                    it.fail(res)
            elif isinstance(res, BaseException):
                raise res
    except BaseException:
        for fut in asking:
            fut.cancel()
        raise


def _freezers_together(runner: "UnitStageRunner", live: list[_Item]) -> list[Any] | None:
    """The units' freezers, when they may be frozen and thawed through their job's cgroup:
    several units, every backend leaving the freezer alone (``freezer_untouched``)."""
    if len(live) < 2:
        return None
    freezers = [getattr(it.unit, "freezer", None) for it in live]
    if any(f is None for f in freezers) or not all(
            getattr(it.backend, "freezer_untouched", False) for it in live):
        return None
    return freezers


async def _stop(runner: "UnitStageRunner", cid: str, items: list[_Item]) -> None:
    live = _enter(runner, cid, items, "stop", alive_first=False)
    freezers = _freezers_together(runner, live)
    if freezers is not None:
        try:
            for it in live:         # a tree not yet in its cgroup would not freeze
                await it.unit.attached()
            together = await freeze_together(freezers)
        except CheckpointError:
            together = False        # each unit's own freeze says what is wrong
        if together:
            for it in live:
                await it.unit.freeze(freezer_done=True)
                it.finish({})
            return
    for it in live:     # every freezer starts at once; the waits below mostly find it done
        start = getattr(getattr(it.unit, "freezer", None), "start_freeze", None)
        if start is not None:
            start()
    for it in live:
        try:
            await it.unit.freeze()
        except CheckpointError as exc:
            it.fail(exc)
            continue
        it.finish({})


async def _checkpoint(runner: "UnitStageRunner", cid: str, items: list[_Item]) -> None:
    live = _enter(runner, cid, items, "checkpoint", alive_first=False)
    backend_ms: dict[int, float] = {}

    async def one(it: _Item) -> None:
        t = time.monotonic()
        await it.backend.checkpoint(it.unit, it.ctx["images"])
        backend_ms[id(it)] = round((time.monotonic() - t) * 1000, 3)

    for backend, group in _by_backend(runner, live).values():
        if getattr(backend, "quick_checkpoint", False):
            now = getattr(backend, "checkpoint_now", None)    # settles most units without a coroutine
            outcomes: list[Any] = []
            for it in group:
                if "spare" in it.ctx:       # prepare wrote the images: checked with the manifest
                    backend_ms[id(it)] = 0.0
                    outcomes.append(None)
                    continue
                try:
                    t = time.monotonic()
                    if now is not None and now(it.unit, it.ctx["images"]):
                        backend_ms[id(it)] = round((time.monotonic() - t) * 1000, 3)
                        outcomes.append(None)
                    else:
                        outcomes.append(await one(it))
                except Exception as exc:  # noqa: BLE001 - reported per unit
                    outcomes.append(exc)
        else:
            outcomes = await _side_by_side(group, one)
        for it, res in zip(group, outcomes):
            if isinstance(res, BaseException):
                it.fail(res)
    to_seal: list[tuple[_Item, dict[str, Any], dict[str, Any]]] = []
    for it in live:
        if not it.live:
            continue
        meta = runner.checkpoint_meta(it.unit, cid, it.ctx, backend_ms[id(it)])
        note = it.backend.stage_note(it.unit)
        if it.args.get("seal_later"):
            it.ctx["unsealed"] = meta
            it.finish(runner.checkpoint_data(it.ctx, backend_ms[id(it)], None, note))
        else:
            to_seal.append((it, meta, note))
    if to_seal:
        written = await _manifests(runner, [(it, meta) for it, meta, _ in to_seal])
        for (it, _, note), manifest in zip(to_seal, written):
            if isinstance(manifest, BaseException):
                it.fail(manifest)
            else:
                it.finish(runner.checkpoint_data(it.ctx, backend_ms[id(it)], manifest, note))


async def _manifests(runner: "UnitStageRunner", todo: list[tuple[_Item, dict[str, Any]]]) -> list[Any]:
    """Each item's manifest (or its CheckpointError), all written in one trip to a thread."""
    def write_all() -> list[Any]:
        out: list[Any] = []
        for it, meta in todo:
            try:
                out.append(runner.manifest_now(it.unit, it.ctx, meta, it.args))
            except CheckpointError as exc:
                out.append(exc)
        return out
    return await asyncio.to_thread(write_all) if todo else []


async def _seal(runner: "UnitStageRunner", cid: str, items: list[_Item]) -> None:
    """The manifests of a checkpoint taken with ``seal_later``, while the units run again."""
    todo = []
    for it in items:
        try:
            it.ctx, meta = runner.unsealed(it.unit, cid)
            todo.append((it, meta))
        except CheckpointError as exc:
            it.fail(exc)
    for (it, _), manifest in zip(todo, await _manifests(runner, todo)):
        if isinstance(manifest, BaseException):
            it.fail(manifest)
        else:
            it.finish(runner.seal_data(it.ctx, manifest))


async def _resume_cp(runner: "UnitStageRunner", cid: str, items: list[_Item]) -> None:
    live = _enter(runner, cid, items, "resume_cp", alive_first=False)
    freezers = _freezers_together(runner, live)
    if freezers is not None:    # (app: every RESUME in one pass, before_thaw_many)
        await _backend_calls(runner, live, "before_thaw", lambda it: (it.unit,))
    else:
        for it in live:     # neither waits for the program: one after the other
            try:
                await it.backend.before_thaw(it.unit)
                await it.unit.thaw()
            except CheckpointError as exc:
                it.fail(exc)
    live = [it for it in live if it.live]
    if freezers is not None:     # every program's RESUME is out: one thaw for all
        together = len(live) == len(freezers) and await thaw_together(freezers)
        for it in live:
            try:
                await it.unit.thaw(freezer_done=together)
            except CheckpointError as exc:
                it.fail(exc)
        live = [it for it in live if it.live]
    await _backend_calls(runner, live, "resume_cp", lambda it: (it.unit,))
    live = [it for it in live if it.live]
    await _callbacks(runner, live, "post_checkpoint", cid)
    for it in live:
        it.finish({"seq": it.ctx["seq"]})


_BODIES: dict[str, Callable[["UnitStageRunner", str, list[_Item]], Awaitable[None]]] = {
    "prepare": _prepare, "stop": _stop, "checkpoint": _checkpoint, "resume_cp": _resume_cp, "seal": _seal}
