"""Run one stage of the checkpoint/restart protocol on one unit (DESIGN.md section 2).

The daemon calls ``UnitStageRunner.run(unit, stage, checkpoint_id, seq, args)`` for each
unit named in a ``stages`` command and answers with the returned ``{"stage", "ms", "data"}``.

=============  =============================================================================
prepare        images dir created (a stale partial one is cleared), job-file pre_checkpoint
               callback, backend.prepare (app: the program saves its state and quiesces).
               A backend that ``stages_images`` (app) is handed the unit's spare images
               dir instead when it is there and empty (take_spare): no directory is made
               on the way, and the spare moves into place when the manifest is written
stop           freeze the unit's tree (cgroup freezer, SIGSTOP fallback)
checkpoint     backend.checkpoint (none if prepare wrote the images), then manifest.json
               (sizes, sha256, stage timings; a spare moved into place and checked first) written
               last in a thread; data: bytes, files.  With ``seal_later`` the manifest waits
               for the seal stage, so the unit can resume as soon as its images are written
resume_cp      backend.before_thaw, thaw, backend.resume_cp, job-file post_checkpoint callback
seal           (after resume_cp, only with ``seal_later``) hash the images and write the
               manifest while the unit runs again; data: bytes, files
abort          thaw if frozen, backend.abort, delete the partial images
rebuild        verify the manifest and, no live tree at stake, backend.rebuild_files (one
               thread trip); backend.check_restorable; backend.rebuild: the tree exists
               again, still frozen; data: pid
resume_rst     backend.resume_rst, make sure the tree runs, job-file restart callback
=============  =============================================================================

Idempotent: the same (job, unit, checkpoint id, stage) asked again (a redelivered command)
returns the first outcome, result or error, without running anything again; a duplicate that
arrives while the first is still running waits for it.  Failures raise ``CheckpointError``
with a one-line reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from nodeagent import stage_batch
from nodeagent.callbacks import run_callback
from nodeagent.checkpointers.base import CheckpointError, Checkpointer, RestoreRefused
from nodeagent.checkpointers.registry import make_backend
from nodeagent.freezer import alive_pids, tree_pids
from orchestrator.store import (MANIFEST, CorruptCheckpoint, Store, StoreError, changed_since_sealed, sizes_only,
                               verify_hashes, verify_manifest, write_manifest)

log = logging.getLogger("gridckpt.stages")

STAGES = ("prepare", "stop", "checkpoint", "resume_cp", "seal", "abort", "rebuild", "resume_rst")
_REMEMBER = 4096


class UnitStageRunner:
    """Drives units through stages; one per agent."""

    def __init__(self, store: Store, node: str = "", *, backends: dict[str, Checkpointer] | None = None,
                 callback_timeout: float = 30.0):
        self.store = store
        self.node = node
        self.backends: dict[str, Checkpointer] = dict(backends or {})
        self.callback_timeout = callback_timeout
        self._done: OrderedDict[tuple, asyncio.Future] = OrderedDict()
        self._ctx: dict[tuple, dict[str, Any]] = {}
        self.spares_wanted: set[str] = set()    # unit dirs whose spare images dir was used
        self.spares_ready: set[str] = set()     # unit dirs whose spare is there and empty
        self._spare_paths: dict[str, Path] = {}

    # -- backends ------------------------------------------------------------------------
    def backend(self, name: str) -> Checkpointer:
        """The (shared) backend instance called ``name``."""
        b = self.backends.get(name)
        if b is None:
            b = self.backends[name] = make_backend(name)
        return b

    def backend_for(self, unit: Any) -> Checkpointer:
        return self.backend(unit.spec.get("checkpointer") or "criu")

    def new_images_dir(self, images: Path) -> None:
        """(thread) ``_fresh_images_dir``, with the unit's spare if it is known to be empty
        (``make_spares`` made it), noting that the unit dir wants a new spare (a note lost to
        a concurrent ``make_spares`` only costs that unit a mkdir next time)."""
        udir = os.path.dirname(images)
        ready = udir in self.spares_ready
        self.spares_ready.discard(udir)
        _fresh_images_dir(images, ready)
        self.spares_wanted.add(udir)

    def want_spare(self, unit_dir: str) -> None:
        """The unit dir gets a spare images dir made (again) at the next ``make_spares``; it is
        not handed out meanwhile, so that make_spares never empties one that is written into."""
        self.spares_ready.discard(unit_dir)
        self.spares_wanted.add(unit_dir)

    def take_spare(self, unit: Any, images: Path, backend: Checkpointer | None = None) -> Path | None:
        """For a backend that ``stages_images`` (and a unit with no job-file pre_checkpoint
        command, which is told ``images``): the unit's spare images dir, when it is known to be
        there and empty, taken for this checkpoint (``prepare`` writes into it; the manifest's
        thread moves it into place as ``images``, ``_settle_spare``).  None: make ``images``.
        ``backend``: the unit's, when the caller has it at hand."""
        udir = os.path.dirname(images)
        if (udir not in self.spares_ready or not (backend or self.backend_for(unit)).stages_images
                or (unit.spec.get("callbacks") or {}).get("pre_checkpoint") is not None):
            return None
        self.spares_ready.discard(udir)
        spare = self._spare_paths.get(udir)
        if spare is None:      # (a Path made once per unit: the parse of a long path is slow)
            if len(self._spare_paths) > 65536:
                self._spare_paths.clear()
            spare = self._spare_paths[udir] = Path(udir, SPARE_DIR)
        return spare

    async def make_spares(self) -> None:
        """Replace the spare images dirs used since the last call (in a thread; for when no
        stage waits: the daemon calls it once its stage chains are over)."""
        dirs, self.spares_wanted = list(self.spares_wanted), set()
        if dirs:
            self.spares_ready.update(await asyncio.to_thread(make_spare_dirs, dirs))

    async def ready_next(self, units: list[Any]) -> None:
        """Each unit's backend gets ready ahead for its next checkpoint or restart
        (Checkpointer.ready_next; for when no stage waits, after make_spares)."""
        for unit in units:
            backend = self.backend_for(unit)
            if backend.gets_ready:
                try:
                    await backend.ready_next(unit, Path(unit.unit_dir) / SPARE_DIR)
                except Exception:       # never the unit's problem: its stages do without
                    log.exception("getting ready ahead failed for %s/%s", unit.job, unit.name)

    def unit_ended(self, unit: Any) -> None:
        """The unit's tree is gone: its backend drops what it had ready for it."""
        backend = self.backends.get(unit.spec.get("checkpointer") or "criu")
        if backend is not None and backend.gets_ready:
            backend.unit_ended(unit)

    async def close(self) -> None:
        """The agent stops: every backend ends what it started ahead."""
        for backend in self.backends.values():
            await backend.close()

    # -- entry point ---------------------------------------------------------------------
    async def run(self, unit: Any, stage: str, checkpoint_id: str, seq: int | None = None,
                  args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run ``stage``; return {"stage", "ms", "data"} or raise CheckpointError."""
        if stage not in STAGES:
            raise CheckpointError(f"unknown stage {stage!r}")
        seq = seq or None     # 0 / None: not given (the images dir then comes from prepare)
        fut = self.claim(unit, checkpoint_id, stage)
        if fut is None:
            fut = self.outcome(unit, checkpoint_id, stage)
        else:
            try:
                result = await self._run(unit, stage, checkpoint_id, seq, dict(args or {}))
            except CheckpointError as e:
                fut.set_exception(e)
            except (StoreError, OSError) as e:
                fut.set_exception(CheckpointError(f"{stage} of {unit.name}: {e}"))
            except asyncio.CancelledError:
                self.unclaim(unit, checkpoint_id, stage)
                fut.cancel()
                raise
            except Exception as e:   # a bug: still a one-line answer to the orchestrator
                log.exception("stage %s of %s/%s crashed", stage, unit.job, unit.name)
                fut.set_exception(CheckpointError(f"{stage} of {unit.name}: internal error: "
                                                  f"{type(e).__name__}: {e}"))
            else:
                fut.set_result(result)
        res = await asyncio.shield(fut)
        return dict(res, data=dict(res["data"]))

    async def run_batch(self, stage: str, checkpoint_id: str,
                        units: list[tuple[Any, dict[str, Any]]]) -> dict[str, dict[str, Any] | CheckpointError]:
        """``stage`` (prepare, stop, checkpoint or resume_cp) on many units in one pass: each
        unit's ``run`` outcome, result or CheckpointError, by name (see stage_batch)."""
        return await stage_batch.run_batch(self, stage, checkpoint_id, units)

    def claim(self, unit: Any, cid: str, stage: str) -> asyncio.Future | None:
        """A future for this unit's first run of ``stage``; None if it ran or runs already."""
        key = (unit.job, unit.name, cid, stage)
        if key in self._done:
            return None
        fut = self._done[key] = asyncio.get_running_loop().create_future()
        while len(self._done) > _REMEMBER:
            self._done.popitem(last=False)
        return fut

    def outcome(self, unit: Any, cid: str, stage: str) -> asyncio.Future:
        """The future of a claimed stage (its result or CheckpointError, once done)."""
        return self._done[(unit.job, unit.name, cid, stage)]

    def unclaim(self, unit: Any, cid: str, stage: str) -> None:
        """Forget a claim whose stage never ran (cancelled): a redelivery runs it."""
        self._done.pop((unit.job, unit.name, cid, stage), None)

    def stage_done(self, unit: Any, cid: str, stage: str, ms: float) -> None:
        """Record a stage's time in its checkpoint context; drop the context after the last."""
        ctx = self._ctx.get((unit.job, unit.name, cid))
        if ctx is not None:
            ctx["stages_ms"][stage] = ms
        if stage in ("seal", "abort", "resume_rst") or (stage == "resume_cp" and not (ctx or {}).get("unsealed")):
            self._ctx.pop((unit.job, unit.name, cid), None)

    async def _run(self, unit: Any, stage: str, cid: str, seq: int | None,
                   args: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        data = await getattr(self, "_" + stage)(unit, cid, seq, args)
        ms = round((time.monotonic() - t0) * 1000, 3)
        self.stage_done(unit, cid, stage, ms)
        return {"stage": stage, "ms": ms, "data": data}

    def _context(self, unit: Any, cid: str, seq: int | None) -> dict[str, Any]:
        key = (unit.job, unit.name, cid)
        ctx = self._ctx.get(key)
        if ctx is None:
            if seq is None:
                raise CheckpointError(f"unit {unit.name}: checkpoint {cid} has no seq "
                                      "(prepare was not run on this agent)")
            ctx = self._ctx[key] = {"seq": seq, "images": self.store.images_dir(unit.job, unit.name, seq),
                                    "stages_ms": {}}
        return ctx

    @staticmethod
    def _require_alive(unit: Any, stage: str) -> None:
        # a unit ends with its root, and a Unit's watcher says so (``ended``) without a read;
        # listing the whole tree (its cgroup, then every member's stat) cost several reads per
        # unit and stage.  Objects without that watcher: the root's /proc/<pid>/stat.
        ended = getattr(unit, "ended", None)
        if ended or unit.root_pid is None or (ended is None and not alive_pids([unit.root_pid])):
            state = getattr(unit, "state", "gone")
            raise CheckpointError(f"{stage}: unit {unit.name} is not running (state {state})")

    # -- checkpoint stages -----------------------------------------------------------------
    async def _prepare(self, unit, cid, seq, args) -> dict[str, Any]:
        self._require_alive(unit, "prepare")
        ctx = self._context(unit, cid, seq)
        images: Path = ctx["images"]
        spare = self.take_spare(unit, images)
        if spare is None:
            await asyncio.to_thread(self.new_images_dir, images)
        else:
            ctx["spare"] = spare
        unit.checkpoint_id = cid
        cb = await run_callback(unit, "pre_checkpoint", checkpoint=cid, images=images,
                                timeout=args.get("callback_timeout", self.callback_timeout))
        await self.backend_for(unit).prepare(unit, spare or images)
        return {"seq": ctx["seq"],
                **({"callback_ms": cb["ms"]} if cb else {})}

    async def _stop(self, unit, cid, seq, args) -> dict[str, Any]:
        self._context(unit, cid, seq)
        self._require_alive(unit, "stop")
        await unit.freeze()
        return {}   # no listing of the tree: reads per unit and stage that nothing used

    async def _checkpoint(self, unit, cid, seq, args) -> dict[str, Any]:
        ctx = self._context(unit, cid, seq)
        self._require_alive(unit, "checkpoint")
        images: Path = ctx["images"]
        backend = self.backend_for(unit)
        t0 = time.monotonic()
        if "spare" not in ctx:      # (else prepare wrote the images: checked with the manifest)
            await backend.checkpoint(unit, images)
        backend_ms = round((time.monotonic() - t0) * 1000, 3)
        meta = self.checkpoint_meta(unit, cid, ctx, backend_ms)
        if args.get("seal_later"):
            ctx["unsealed"] = meta
            return self.checkpoint_data(ctx, backend_ms, None, backend.stage_note(unit))
        manifest = await self._write_manifest(unit, ctx, meta, args)
        return self.checkpoint_data(ctx, backend_ms, manifest, backend.stage_note(unit))

    def checkpoint_meta(self, unit: Any, cid: str, ctx: dict[str, Any], backend_ms: float) -> dict[str, Any]:
        """What a unit's manifest says besides its files (the checkpoint stage's)."""
        return {"checkpointer": self.backend_for(unit).name, "node": self.node, "job": unit.job,
                "unit": unit.name, "seq": ctx["seq"], "checkpoint": cid,
                "stages_ms": dict(ctx["stages_ms"], checkpoint=backend_ms),
                "command": list(unit.spec.get("command") or [])}

    @staticmethod
    def checkpoint_data(ctx: dict[str, Any], backend_ms: float, manifest: dict[str, Any] | None = None,
                        note: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint stage's answer: sealed (``manifest`` written) or to be sealed later;
        ``note``: the backend's own fields (Checkpointer.stage_note)."""
        data = {"seq": ctx["seq"], "backend_ms": backend_ms, **(note or {})}
        if manifest is None:
            return dict(data, sealed=False)
        return dict(data, bytes=manifest["bytes"], files=len(manifest["files"]))

    def manifest_now(self, unit: Any, ctx: dict[str, Any], meta: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
        """(thread) Write the manifest of the unit's images (``ctx``: its checkpoint context),
        after moving them into place and having its backend check them if prepare wrote them
        into its spare (``take_spare``); CheckpointError naming the unit on failure.
        ``defer_sync``: the agent makes a whole batch durable with one syncfs before it answers."""
        images = ctx["images"]
        try:
            if "spare" in ctx:
                self._settle_spare(ctx)
                self.backend_for(unit).check_written(unit, images)
            return write_manifest(images, meta, not args.get("defer_sync"))
        except StoreError as e:
            raise CheckpointError(f"checkpoint of {unit.name}: manifest: {e}") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint of {unit.name}: {e}") from None

    def _settle_spare(self, ctx: dict[str, Any]) -> None:
        """(thread) Move the spare that prepare wrote into (``take_spare``) into place as the
        images dir; a partial images dir in the way (an earlier try) is replaced, a committed
        one refused.  The unit dir then wants a new spare."""
        spare, path = ctx["spare"], os.fspath(ctx["images"])
        try:
            os.rename(spare, path)      # onto nothing, or onto an empty dir
        except OSError as e:
            if not os.path.isdir(path) or not os.path.isdir(spare):
                raise CheckpointError(f"cannot move {spare} to {path}: {e.strerror}") from None
            _clear_partial(path)
            os.rename(spare, path)
        del ctx["spare"]
        self.spares_wanted.add(os.path.dirname(spare))

    def _drop_spare(self, ctx: dict[str, Any]) -> None:
        """(thread) An aborted checkpoint's spare, written into by prepare or not, emptied (it
        is made again for the next one)."""
        spare = ctx.pop("spare", None)
        if spare is not None:
            shutil.rmtree(spare, ignore_errors=True)
            self.spares_wanted.add(os.path.dirname(spare))

    async def _seal(self, unit, cid, seq, args) -> dict[str, Any]:
        ctx, meta = self.unsealed(unit, cid)
        return self.seal_data(ctx, await self._write_manifest(unit, ctx, meta, args))

    def unsealed(self, unit: Any, cid: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint context of a unit's images awaiting their seal, and its manifest's
        meta (stage times up to resume_cp); CheckpointError when there are none."""
        ctx = self._ctx.get((unit.job, unit.name, cid))
        if ctx is None or not ctx.get("unsealed"):
            raise CheckpointError(f"seal of {unit.name}: checkpoint {cid} has no unsealed images on this agent")
        meta = ctx["unsealed"]
        meta["stages_ms"] = {**ctx["stages_ms"], "checkpoint": meta["stages_ms"]["checkpoint"]}  # backend's own time
        return ctx, meta

    @staticmethod
    def seal_data(ctx: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
        """The seal stage's answer."""
        return {"bytes": manifest["bytes"], "files": len(manifest["files"]), "seq": ctx["seq"]}

    async def _write_manifest(self, unit: Any, ctx: dict[str, Any], meta: dict[str, Any],
                              args: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.manifest_now, unit, ctx, meta, args)

    async def _resume_cp(self, unit, cid, seq, args) -> dict[str, Any]:
        ctx = self._context(unit, cid, seq)
        backend = self.backend_for(unit)
        await backend.before_thaw(unit)
        await unit.thaw()
        await backend.resume_cp(unit)
        await run_callback(unit, "post_checkpoint", checkpoint=cid, images=ctx["images"],
                           timeout=args.get("callback_timeout", self.callback_timeout))
        return {"seq": ctx["seq"]}

    async def _abort(self, unit, cid, seq, args) -> dict[str, Any]:
        key = (unit.job, unit.name, cid)
        ctx = self._ctx.get(key)
        if ctx is not None and "spare" in ctx:
            await asyncio.to_thread(self._drop_spare, ctx)
        images = ctx["images"] if ctx else (self.store.images_dir(unit.job, unit.name, seq)
                                            if seq is not None else None)
        errors = []
        try:
            await unit.thaw()
        except CheckpointError as e:
            errors.append(str(e))
        if images is not None:
            try:
                await self.backend_for(unit).abort(unit, images)
            except CheckpointError as e:
                errors.append(str(e))
        deleted = False
        s = ctx["seq"] if ctx else seq
        if s is not None:
            try:
                deleted = await asyncio.to_thread(self.store.delete_images, unit.job, unit.name, s)
            except StoreError as e:   # a committed checkpoint uses it: keep it
                errors.append(str(e))
        if errors:
            raise CheckpointError(f"abort of {unit.name}: " + "; ".join(errors))
        return {"deleted": deleted}

    # -- restart stages --------------------------------------------------------------------
    async def _rebuild(self, unit, cid, seq, args) -> dict[str, Any]:
        """Verify, then restore.  Integrity: every image's sha256 is checked before the unit
        runs, except for files unchanged since they were sealed (same fingerprint; all files
        with ``full_verify``).  ``verified`` (the orchestrator checked them all before it
        touched the job): sizes only.  Otherwise the files the backend reads itself
        (``hashed_while_restoring``, CRIU's page data) are hashed while it restores, provided no
        live tree of the unit is at stake; a mismatch kills the restored tree, which never ran,
        and fails the stage naming the file.
        """
        ctx = self._context(unit, cid, seq)
        images: Path = ctx["images"]
        # the unit's spare is made again before it is handed out: another agent may have had the
        # unit meanwhile (a restart elsewhere, then back here) and taken it
        self.want_spare(os.fspath(unit.unit_dir))
        wanted = unit.spec.get("checkpointer") or "criu"
        live = unit.root_pid is not None and bool(unit.pids())
        later = None if args.get("verified") or live else getattr(self.backend(wanted), "hashed_while_restoring", None)
        hash_now = (sizes_only if args.get("verified") else
                    None if later is None else (lambda rel: not later(rel)))
        full = bool(args.get("full_verify"))   # else files unchanged since sealed are not re-read
        backend = self.backend(wanted)

        def check() -> tuple[dict[str, Any], Callable[[str], bool] | None, Any]:
            """(thread) The manifest; what to hash while restoring; with no live tree at stake,
            the backend's own checks and roll-back (rebuild_files) in the same trip."""
            manifest = verify_manifest(images, False, hash_now, full)
            prepared = None
            if not live and manifest.get("checkpointer", wanted) == wanted:
                prepared = backend.rebuild_files(images)
            if later is None or full:
                return manifest, later, prepared
            changed = set(changed_since_sealed(images, manifest, later))
            return manifest, (changed.__contains__ if changed else None), prepared

        try:
            manifest, later, prepared = await asyncio.to_thread(check)
        except CorruptCheckpoint as e:
            raise CheckpointError(f"rebuild of {unit.name}: {e}") from None
        written_by = manifest.get("checkpointer", wanted)
        if written_by != wanted:
            raise RestoreRefused(f"rebuild of {unit.name}: images written by {written_by!r}, "
                                 f"the unit uses {wanted!r}")
        if live or not backend.rebuild_checks:
            await backend.check_restorable(images, manifest)
        if live:
            await unit.kill()        # the old tree must be gone before its state comes back
        await unit.set_state("restarting")
        unit.freezer.create()
        hashing = asyncio.ensure_future(asyncio.to_thread(_verify_politely, images, manifest, later, full)) if later else None
        try:
            await backend.rebuild(unit, images, prepared)
        except BaseException as e:
            unit.mark_failed(f"rebuild failed: {e}")
            if hashing is not None:
                await asyncio.gather(hashing, return_exceptions=True)
            raise
        if unit.root_pid is None:
            raise CheckpointError(f"rebuild of {unit.name}: the backend restored no process")
        # watched (the backend may reap it), and moved into the unit's cgroup in the background
        # (a cgroup move waits for an RCU grace period: see Unit.attach_soon)
        root = unit.root_pid
        unit.adopt(root, exit_waiter=getattr(backend, "wait_exit", None), attached=True)
        attach_soon = getattr(unit, "attach_soon", None)
        if attach_soon is not None:
            attach_soon(root)
        else:
            await asyncio.to_thread(lambda: unit.freezer.attach(tree_pids(root)))
        if hashing is not None:
            try:
                await hashing
            except CorruptCheckpoint as e:
                await unit.kill()    # restored but never resumed: it ran nothing
                unit.mark_failed(f"rebuild failed: {e}")
                raise CheckpointError(f"rebuild of {unit.name}: {e}") from None
        await unit.set_state("stopped")
        return {"pid": unit.root_pid, "nprocs": len(unit.pids()), "bytes": manifest.get("bytes", 0),
                "seq": ctx["seq"], **backend.stage_note(unit)}

    async def _resume_rst(self, unit, cid, seq, args) -> dict[str, Any]:
        ctx = self._context(unit, cid, seq)
        self._require_alive(unit, "resume_rst")
        await self.backend_for(unit).resume_rst(unit)
        await unit.thaw()           # whatever the backend left frozen
        await run_callback(unit, "restart", checkpoint=cid, images=ctx["images"],
                           timeout=args.get("callback_timeout", self.callback_timeout))
        return {"pid": unit.root_pid, "seq": ctx["seq"]}

    async def release(self, unit: Any) -> None:
        """The unit is gone for good: let its backend close what it holds for it."""
        release = getattr(self.backend_for(unit), "release", None)
        if release is not None:
            await release(unit)


def _verify_politely(images: Path, manifest: dict[str, Any], which: Callable[[str], bool],
                     full: bool = False) -> None:
    """(thread) verify_hashes at the lowest CPU priority: on a small node it must not slow the
    restore it runs beside, only use what the restore leaves idle."""
    tid = threading.get_native_id()
    try:
        old = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
        old = None
    try:
        verify_hashes(images, manifest, which, full)
    finally:
        if old is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, old)
            except OSError:
                pass


SPARE_DIR = ".spare-images"   # in a unit's store dir: an empty dir made ahead, renamed into place


def _fresh_images_dir(images: Path, use_spare: bool = True) -> bool:
    """Create the images dir; clear a partial one; refuse to touch a committed one.

    The usual case is one rename: the unit's spare directory (``SPARE_DIR``, made ahead by
    ``make_spare_dirs`` while nothing waits; ``use_spare``: it is known to be empty) becomes
    the images dir.  A rename allocates no
    inode, where a mkdir does: on this kind of host (ext4 on a VM disk) a mkdir took 10 to
    300 us, and 64 of them competed with the programs writing their own state files.  The
    rename replaces nothing but an empty directory (rename(2)); a non-empty one is handled as
    below.  Without a spare: one mkdir.  True when the spare was used."""
    path = os.fspath(images)      # strings: this runs for every unit of a checkpoint
    if use_spare:
        try:
            os.rename(os.path.join(os.path.dirname(path), SPARE_DIR), path)
            return True
        except OSError:
            pass     # no spare (not made yet, or used), or images is not empty: the general path
    images = Path(images)
    try:
        os.mkdir(images)
        return False
    except FileNotFoundError:
        images.mkdir(parents=True)
        return False
    except FileExistsError:
        pass
    _clear_partial(images)
    images.mkdir(parents=True)
    return False


def _clear_partial(images: str | Path) -> None:
    """(thread) Remove an images dir left partial by an earlier try; CheckpointError, and
    nothing touched, when it holds a committed checkpoint (its manifest)."""
    if os.path.exists(os.path.join(images, MANIFEST)):
        raise CheckpointError(f"{images} already holds a committed checkpoint")
    shutil.rmtree(images)


def make_spare_dirs(unit_dirs: list[str | Path]) -> list[str]:
    """(thread) Each unit dir's spare images directory, where it is missing; one that holds
    something (a prepare's writes that an agent stopped before it moved them) is emptied.
    The unit dirs that have an empty spare now."""
    ready = []
    for d in unit_dirs:
        spare = os.path.join(d, SPARE_DIR)
        try:
            try:
                os.mkdir(spare)
            except FileExistsError:
                with os.scandir(spare) as entries:
                    stale = next(entries, None) is not None
                if stale:
                    shutil.rmtree(spare)
                    os.mkdir(spare)
            ready.append(os.fspath(d))
        except OSError as e:       # the unit dir went away meanwhile (a purge): no spare
            log.debug("no spare images dir in %s: %s", d, e)
    return ready
