"""The CRIU backend: a unit's whole process tree, checkpointed and restored by CRIU 4.x.

Dumps through RPC, restores through the command line, both started ahead (criu_warm).  Most
of a small dump's or restore's time is criu's own start-up (exec, then a probe of the
kernel's features that waits for RCU grace periods), before it touches the process; so the
agent starts criu while nothing waits (``ready_next``: after a launch, after each stage
chain) and a stage only waits for the work on the process.  A dump is ``criu swrk`` (CRIU's
RPC service, as runc and libcriu drive it) with ``notify_scripts``: it stops at its pre-dump
notification until the checkpoint stage answers it; RPC because only it can hold criu there
(criu_proto encodes the dozen fields of rpc.proto used).  Its options are those of ``dump
--leave-running --freeze-cgroup --manage-cgroups=ignore --file-locks`` (dump a tree the agent
already froze).  A restore is ``restore --restore-detached --restore-sibling --leave-stopped``
(the restored root becomes a child of the caller, exactly what ``swrk`` with ``rst_sibling``
gives runc, and stays stopped until resume_rst) on a placeholder whose inventory is a FIFO:
the command line keeps every call replayable by hand from the logged argv.  When nothing
was started ahead (or it does not fit, or died), criu starts on the spot: a dump through the
same RPC session, a restore directly on the images.  ``cpuinfo dump/check`` run on the
command line.

Launch.  ``plan_launch`` runs the command as ``unshare --pid --fork setsid CMD``: CMD is the
init (pid 1) of its own PID namespace and leads its own session, so CRIU dumps a
self-contained tree (session and process group inside it) and a restore recreates the PID
namespace: restored pids never clash with live ones, two restores of one image can run side
by side.  No mount namespace (CRIU would then have to handle mounts).  No ``--kill-child``:
CRIU dumps and restores the init's parent-death signal, and after a restore the parent is the
agent, so with it a restored unit died the moment its agent did.  A unit whose ``unshare``
root dies is still ended whole: the agent kills whatever the root leaves in its cgroup.  criu
is spawned by the event loop's thread, which lives as long as the agent (posix_spawn + pidfd,
see criu_cli.spawn_and_wait).

Checkpoint (the tree is frozen by the agent).  Concurrently: ``criu dump`` of the namespace
init; a scan of /proc recording every regular file the tree holds open (size, whether it is
written, with O_APPEND or in place) and every file mapped privately into it (the program,
libraries, an LD_PRELOADed shim: path, size, mtime, sha256 cached per inode; read-only shared
mappings such as a control page are left alone); this node's CPU description
(``criu cpuinfo dump``, cached per boot) copied as cpuinfo.img.  The scan is written to
``gridckpt-criu.json`` in the images directory.

Consistent restart.  File contents are not in a CRIU image, so a restarted tree must find the
files it writes as they were at the checkpoint.  Appending writers (stdout/stderr redirected to
files, logs, output files written sequentially: every writing descriptor is O_APPEND or sits
at the end of the file) are rolled back by truncating to the checkpointed size; writers that
seeked back (in-place updates) and writable shared mappings get a copy of the file in the
images (``gridckpt-files/``, up to ``snapshot_limit`` bytes) which is copied back at restart.
Read-only files must be unchanged (CRIU refuses sizes that differ).  This covers every regular
file the tree holds open at the checkpoint, in the unit dir or not (the shim's determinant logs
too: records of the undone interval are cut away); files written and closed before the
checkpoint are not tracked, and a file bigger than ``snapshot_limit`` is only truncated.
The old tree must be dead before a restart (the agent kills it), or the rollback would cut
under it.

Restart.  check_restorable refuses, naming what differs: a CPU lacking features
(cpuinfo.img compared with this node's, ``criu cpuinfo check`` when they differ), a mapped
file that is missing or has another content (size+mtime equal, else sha256 compared), an open
file that is missing, shrank, or (read-only) changed size.  rebuild rolls files back and
restores with ``--restore-sibling --leave-stopped``: the tree is a child of the agent, stopped;
unit.root_pid is the restored init's pid in the agent's PID namespace.  The tree is born in the
agent's cgroup; the stage runner moves it into the unit's freezer cgroup afterwards, without
waiting (Unit.attach_soon: a cgroup move blocks every fork on the host for an RCU grace period,
and moving criu while it restored slowed the restore by about 4 ms).  A pidfd watcher reaps
it when it exits (its status via ``exit_code``/``wait_exit``; psutil then sees no process).
resume_rst sends SIGCONT to every process of the tree.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .base import (Capabilities, Checkpointer, CheckpointError, LaunchPlan, RestoreRefused,
                   UnitProcess)
from . import criu_proto
from .criu_cli import CriuRunner
from .criu_inspect import (Sha256Cache, TreeFiles, copy_file, inspect_tree, ns_pids, parent_of,
                           tree_pids)
from .criu_warm import SETPRIV, DumpSession, RestoreSlot, WarmFailed, open_dir, scratch_dir, sweep_scratch

log = logging.getLogger("gridckpt.criu")

META_FILE = "gridckpt-criu.json"
SNAPSHOT_DIR = "gridckpt-files"
CPUINFO_FILE = "cpuinfo.img"
META_VERSION = 1

_UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
_SETSID = shutil.which("setsid") or "/usr/bin/setsid"
_COMMON = ["--manage-cgroups=ignore", "--file-locks"]
_RESTORE = ["--leave-stopped", *_COMMON]      # a restore: the tree stays stopped until resume_rst
_COMMON_RPC: dict[str, object] = {"manage_cgroups_mode": criu_proto.CG_IGNORE, "file_locks": True,
                                  "leave_running": True}     # the same, for a dump through criu swrk
WARM_RESTORES = 2       # restore slots an agent keeps (at most one per CRIU unit it serves)
WARM_MAX_AGE = 600.0    # s: criu processes started ahead longer ago are replaced (kernel state drifts)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class CriuCheckpointer(Checkpointer):
    """Checkpoint/restart of a unit's process tree with CRIU (see the module docstring)."""

    name = "criu"
    capabilities = Capabilities(coordinated=True, independent=True, incremental=False,
                                migration=True, live_tcp=False)
    rebuild_checks = True    # rebuild runs _check (with the roll-back) before criu restore
    gets_ready = True        # criu started ahead of the stages (ready_next)

    def __init__(self, criu: str | None = None, work_dir: Path | None = None, *,
                 snapshot_limit: int = 64 << 20, log_level: int = 2, ahead: bool | None = None,
                 warm_restores: int = WARM_RESTORES) -> None:
        """``criu``: executable; ``work_dir``: node-local directory for criu logs; ``ahead``:
        start criu before the stages that need it (default: unless $GRIDCKPT_CRIU_AHEAD=0);
        ``warm_restores``: restore slots kept (see criu_warm)."""
        self.runner = CriuRunner(criu, work_dir, log_level)
        self.ahead = ahead if ahead is not None else os.environ.get("GRIDCKPT_CRIU_AHEAD", "1") != "0"
        self.warm_restores = warm_restores if SETPRIV else 0
        self._sessions: dict[tuple[str, str], DumpSession] = {}   # per unit: its next dump, started
        self._slots: list[RestoreSlot] = []
        self._served: set[tuple[str, str]] = set()     # units this backend got ready for
        self._notes: dict[tuple[str, str], bool] = {}  # per unit: its last dump/restore was started ahead
        self._refresh: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future] = set()
        self._scratch: Path | None = None     # where slots put placeholders (the first ready_next)
        self.snapshot_limit = snapshot_limit
        self._hashes = Sha256Cache()
        self._cpuinfo: bytes | None = None
        self._init_of: dict[int, int] = {}        # unit root (unshare) -> namespace init
        self._cpus_ok: set[bytes] = set()         # other cpuinfo images this node can run
        self._tree_size: dict[int, int] = {}      # restored root -> processes in its image
        self._exits: dict[int, asyncio.Future[int | None]] = {}

    # ----------------------------------------------------------------- launch
    def plan_launch(self, unit: UnitProcess, argv: list[str]) -> LaunchPlan:
        if not argv:
            raise CheckpointError(f"unit {unit.name}: empty command")
        return LaunchPlan(argv=[_UNSHARE, "--pid", "--fork", _SETSID, *argv],
                          new_pid_namespace=True)

    # ------------------------------------------------------------- checkpoint
    async def prepare(self, unit: UnitProcess, images: Path) -> None:
        await self._node_cpuinfo()

    async def checkpoint(self, unit: UnitProcess, images: Path) -> None:
        images = Path(images)
        cpuinfo = await self._node_cpuinfo()
        root, lock, (dirfd, dir_id) = await asyncio.to_thread(self._before_dump, unit, images)
        try:
            if lock is not None and not lock.held:
                try:
                    await asyncio.to_thread(lock.wait)
                except BaseException:
                    os.close(dirfd)     # (_dump takes it over)
                    raise
            freezer = unit.freezer_path if unit.freezer_path and os.path.isdir(unit.freezer_path) else None
            results = await asyncio.gather(
                self._dump(unit, root, str(images), dirfd, dir_id, freezer),
                asyncio.to_thread(self._scan_and_describe, root, images, cpuinfo),
                return_exceptions=True)
        finally:
            if lock is not None:
                lock.release()
        for result in results:
            if isinstance(result, CheckpointError):
                raise result
            if isinstance(result, BaseException):
                raise CheckpointError(f"checkpoint of unit {unit.name} failed: {result}") from result

    async def _dump(self, unit: UnitProcess, root: int, images: str, dirfd: int, dir_id: tuple[int, int],
                    freezer: str | None) -> None:
        """criu dump of ``root`` into ``images`` (``dirfd``, ``dir_id``: open_dir's): through
        the unit's session started ahead when it fits (same root, freezer cgroup and
        directory), else through one started now on ``dirfd``."""
        key = (unit.job, unit.name)
        what = f"criu dump of unit {unit.name}"
        session = self._sessions.pop(key, None)
        if session is not None and not session.fits(root, dir_id, freezer):
            session.close()
            session = None
        ahead = session is not None
        if ahead:
            os.close(dirfd)
        else:
            session = self._start_session(self._log_name("dump", unit), root, images, dirfd, dir_id, freezer, what)
        try:
            await session.dump(what)
        except WarmFailed:
            if not ahead:
                raise
            log.warning("criu started ahead for unit %s/%s ended before the dump; dumping without it",
                        unit.job, unit.name)
            ahead = False
            fd, dir_id = await asyncio.to_thread(open_dir, images)
            session = self._start_session(self._log_name("dump", unit), root, images, fd, dir_id, freezer, what)
            await session.dump(what)
        self._later(session.keep_log)
        self._notes[key] = ahead

    def _start_session(self, final_log: str, root: int, images: str, dirfd: int, dir_id: tuple[int, int],
                       freezer: str | None, what: str) -> DumpSession:
        """A started DumpSession on ``dirfd`` (which it owns); CheckpointError naming ``what``."""
        # a log of its own while it runs: one started ahead must not truncate the unit's last
        session = DumpSession(self.runner, root=root, images=images, dirfd=dirfd, dir_id=dir_id,
                              log_name=f"{final_log[:-4]}.{uuid.uuid4().hex[:8]}.log", final_log=final_log,
                              freeze_cgroup=freezer, common=_COMMON_RPC)
        try:
            session.start()
        except OSError as exc:
            raise CheckpointError(f"{what}: cannot start criu: {exc}") from None
        return session

    def _before_dump(self, unit: UnitProcess, images: Path) -> tuple[int, "_CwdLock | None", tuple[int, tuple[int, int]]]:
        """(thread) The namespace init to dump, the images dir (made, and open_dir's), and the
        unit's cwd lock.

        The process whose /proc is not its PID namespace's (our units: no mount namespace)
        makes CRIU's parasite mount a procfs at ``<cwd>/proc.crtools``; two dumps of units
        sharing a cwd (units of one job file, on one or several agents of a host) would
        collide there (EEXIST).  A per-cwd flock serialises just those dumps.
        """
        root = self._dump_root(unit)
        images.mkdir(parents=True, exist_ok=True)
        opened = open_dir(images)
        try:
            cwd = os.readlink(f"/proc/{root}/cwd")
        except OSError:
            return root, None, opened
        return root, _CwdLock(cwd), opened

    def _scan_and_describe(self, root: int, images: Path, cpuinfo: bytes) -> None:
        """(thread, while criu dumps) The files the tree holds, then gridckpt-criu.json."""
        tree = self._scan(root, images)
        meta = {"version": META_VERSION, "node": os.uname().nodename, "root_pid": root,
                "criu": self.runner.criu, **tree.as_dict()}
        self._write_meta(images, meta, cpuinfo)

    def _dump_root(self, unit: UnitProcess) -> int:
        """The init of the unit's PID namespace (a child of ``unshare``, or the root itself)."""
        root = unit.root_pid
        if root is None:
            raise CheckpointError(f"unit {unit.name} has no running process")
        try:
            if ns_pids(root)[-1] == 1:
                return root
            init = self._init_of.get(root)
            if init is None or parent_of(init) != root:
                children = [p for p in tree_pids(root)[1:] if ns_pids(p)[-1] == 1]
                init = children[0] if children else root
                self._init_of[root] = init
            return init
        except (OSError, ValueError, IndexError):
            raise CheckpointError(f"unit {unit.name}: process {root} is gone") from None

    def _scan(self, root: int, images: Path) -> TreeFiles:
        # (criu's work dir: its parasite holds criu's log open inside the tree while it dumps)
        tree = inspect_tree(root, self._hashes, (os.path.join(self.runner.work_dir, ""),))
        for i, entry in enumerate(tree.files.values()):
            if entry.needs_copy() and entry.size <= self.snapshot_limit:
                entry.snapshot = f"{SNAPSHOT_DIR}/{i}"
                copy_file(entry.path, images / entry.snapshot)
        return tree

    @staticmethod
    def _write_meta(images: Path, meta: dict[str, Any], cpuinfo: bytes) -> None:
        (images / CPUINFO_FILE).write_bytes(cpuinfo)
        part = images / (META_FILE + ".part")
        part.write_text(json.dumps(meta, indent=1))
        os.replace(part, images / META_FILE)

    async def _node_cpuinfo(self) -> bytes:
        if self._cpuinfo is None:
            self._cpuinfo = await self.runner.node_cpuinfo()
        return self._cpuinfo

    # ---------------------------------------------------------------- restart
    async def check_restorable(self, images: Path, manifest: dict[str, Any] | None = None) -> None:
        images = Path(images)
        await self._check(images)

    async def _check(self, images: Path, roll_back: bool = False) -> dict[str, Any]:
        """Refuse, naming what differs, unless this node can run the images; their metadata.
        ``roll_back``: then put the files the tree writes back to their checkpointed state.
        The CPU first (cached verdict), then one trip to a thread for the rest."""
        problems = await self._cpu_problems(images)

        def files() -> tuple[dict[str, Any], list[str]]:
            meta = _load_meta(images)
            found = self._file_problems(meta, images)
            if roll_back and not found and not problems:
                _roll_back_files(meta, images)
            return meta, found

        meta, found = await asyncio.to_thread(files)
        problems = found + problems
        if problems:
            raise RestoreRefused(_refusal(images, problems))
        return meta

    async def _cpu_problems(self, images: Path) -> list[str]:
        try:
            wanted = (images / CPUINFO_FILE).read_bytes()
        except OSError:
            return [f"{CPUINFO_FILE} is missing from the images"]
        if wanted in self._cpus_ok or wanted == await self._node_cpuinfo():
            return []
        try:
            await self.runner.run("criu cpuinfo check", ["cpuinfo", "check", "-D", str(images)],
                                  "cpuinfo-check.log")
        except CheckpointError as e:
            return [f"the CPU lacks what the checkpointed node had ({e})"]
        self._cpus_ok.add(wanted)
        return []

    def _file_problems(self, meta: dict[str, Any], images: Path) -> list[str]:
        problems = []
        for m in meta["mapped"]:
            try:
                st = os.stat(m["path"])
            except OSError:
                problems.append(f"mapped file {m['path']} is missing")
                continue
            if st.st_size == m["size"] and st.st_mtime_ns == m["mtime_ns"]:
                continue
            if st.st_size != m["size"]:
                problems.append(f"mapped file {m['path']} differs (size {st.st_size}, "
                                f"checkpointed {m['size']})")
            elif self._hashes.digest(m["path"], st) != m["sha256"]:
                problems.append(f"mapped file {m['path']} differs (sha256)")
        for f in meta["files"]:
            path = f["path"]
            if f.get("snapshot"):
                if not (images / f["snapshot"]).is_file():
                    problems.append(f"copy of {path} is missing from the images")
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                problems.append(f"file {path} is missing")
                continue
            if f["write"] and size < f["size"]:
                problems.append(f"file {path} shrank below its checkpointed size "
                                f"({size} < {f['size']} bytes)")
            elif not f["write"] and size != f["size"]:
                problems.append(f"file {path} changed (size {size}, checkpointed {f['size']})")
        return problems

    @staticmethod
    def hashed_while_restoring(rel: str) -> bool:
        """Page data only reaches the restored processes' memory, which stays stopped until
        resume_rst: its sha256 may be checked while CRIU restores (see stages._rebuild)."""
        return rel.startswith("pages-") and rel.endswith(".img") and "/" not in rel

    def rebuild_files(self, images: Path) -> dict[str, Any] | None:
        """(thread) _check with the roll-back, when this node's CPU verdict on the images is
        known (the usual case): the images' metadata.  None when ``criu cpuinfo check`` must
        run first (rebuild then does the whole _check)."""
        images = Path(images)
        try:
            wanted = (images / CPUINFO_FILE).read_bytes()
        except OSError:
            return None
        if self._cpuinfo is None or (wanted != self._cpuinfo and wanted not in self._cpus_ok):
            return None
        meta = _load_meta(images)
        problems = self._file_problems(meta, images)
        if problems:
            raise RestoreRefused(_refusal(images, problems))
        _roll_back_files(meta, images)
        return meta

    async def rebuild(self, unit: UnitProcess, images: Path, prepared: Any = None) -> None:
        images = Path(images)
        # cheap: stat()s, cached CPU verdict (done already in the stage runner's thread: prepared)
        meta = prepared if prepared is not None else await self._check(images, roll_back=True)
        what = f"criu restore of unit {unit.name}"
        log_name = self._log_name("restore", unit)    # the unit's last restore log stays
        pid, ahead = None, False
        slot = self._take_slot()
        if slot is not None:
            try:
                pid, ahead = await slot.restore(images, what, log_name), True
                self._later(slot.finish, log_name)      # (its placeholder is not in the way)
            except WarmFailed as exc:
                self._later(slot.finish)
                log.warning("restore slot not used for unit %s/%s: %s", unit.job, unit.name, exc)
            except CheckpointError as exc:
                pid = await self._restore_now(images, what, log_name)   # its error, if it fails too
                log.warning("a restore through a slot failed where a plain one succeeded (%s): "
                            "restore slots turned off on this agent", exc)
                self.warm_restores = 0
                self._drop_slots()
        if pid is None:
            pid = await self._restore_now(images, what, log_name)
        unit.root_pid = pid
        self._tree_size[pid] = len(meta["pids"])
        self._notes[(unit.job, unit.name)] = ahead
        self._watch(pid)

    async def _restore_now(self, images: Path, what: str, log_name: str) -> int:
        """criu restore started now, on ``images`` themselves; the restored root's pid."""
        pidfile = self.runner.work_dir / f"restore-{uuid.uuid4().hex[:12]}.pid"
        await self.runner.run(
            what, ["restore", "-D", str(images), "--restore-detached", "--restore-sibling",
                   "--pidfile", str(pidfile), *_RESTORE], log_name)
        try:
            return int(pidfile.read_text())
        finally:
            pidfile.unlink(missing_ok=True)

    # ------------------------------------------------------------- started ahead
    async def ready_next(self, unit: UnitProcess, spare: Path | None) -> None:
        """The unit runs and no stage of it is under way: start criu for its next dump on
        ``spare`` (the directory its next images dir is renamed from), and keep the agent's
        restore slots filled (see criu_warm).  Nothing when ``ahead`` is off."""
        key = (unit.job, unit.name)
        self._served.add(key)
        if not self.ahead:
            return
        self._schedule_refresh()
        if self._scratch is None:       # (a /proc scan: once, in a thread)
            self._scratch = await asyncio.to_thread(self._prepare_scratch)
        freezer = unit.freezer_path if unit.freezer_path and os.path.isdir(unit.freezer_path) else None
        root, opened = await asyncio.to_thread(self._root_and_spare, unit, spare)
        old = self._sessions.get(key)
        if old is not None and opened is not None and old.fits(root, opened[1], freezer) \
                and time.monotonic() - old.born < WARM_MAX_AGE:
            os.close(opened[0])         # the one waiting is still right
        else:
            if old is not None:
                del self._sessions[key]
                old.close()
            if opened is not None:
                try:
                    self._sessions[key] = self._start_session(
                        self._log_name("dump", unit), root, str(spare), *opened, freezer, f"unit {unit.name}")
                except CheckpointError as exc:
                    log.debug("no criu started ahead for %s/%s: %s", unit.job, unit.name, exc)
        self._fill_slots()
        if self._cpuinfo is None:       # (the first prepare would run criu cpuinfo dump itself)
            try:
                await self._node_cpuinfo()
            except CheckpointError as exc:
                log.warning("criu cpuinfo dump failed: %s", exc)

    def _prepare_scratch(self) -> Path:
        """(thread) The placeholders' directory, cleared of what agents that are gone left."""
        scratch = scratch_dir(self.runner.work_dir)
        sweep_scratch(scratch)
        return scratch

    def _root_and_spare(self, unit: UnitProcess, spare: Path | None) -> tuple[int, tuple[int, tuple[int, int]] | None]:
        """(thread) The dump root and open_dir(spare); None for the latter when there is no
        tree or no spare to start a dump on."""
        if unit.root_pid is None or spare is None:
            return 0, None
        try:
            root = self._dump_root(unit)
            return root, open_dir(spare)
        except (CheckpointError, OSError):
            return 0, None

    def _later(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a thread, not awaited (file clean-up off the stages' path)."""
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fill_slots(self) -> None:
        now = time.monotonic()
        for slot in [s for s in self._slots if not s.usable or now - s.born > WARM_MAX_AGE]:
            self._slots.remove(slot)
            self._later(slot.finish)
        want = min(self.warm_restores, len(self._served)) if self.ahead and self._scratch else 0
        while len(self._slots) < want:
            slot = RestoreSlot(self.runner, _RESTORE, self._scratch)
            try:
                slot.start()
            except OSError as exc:
                log.warning("cannot start a restore slot: %s", exc)
                return
            self._slots.append(slot)

    def _take_slot(self) -> RestoreSlot | None:
        while self._slots:
            slot = self._slots.pop(0)
            if slot.usable and time.monotonic() - slot.born <= WARM_MAX_AGE:
                return slot
            self._later(slot.finish)
        return None

    def _drop_slots(self) -> None:
        for slot in self._slots:
            self._later(slot.finish)
        self._slots.clear()

    def _schedule_refresh(self) -> None:
        """Every half WARM_MAX_AGE, replace what was started ahead too long ago (units idle
        for that long get a fresh criu; a job checkpointed less often still finds one)."""
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().call_later(WARM_MAX_AGE / 2, self._refresh_old)

    def _refresh_old(self) -> None:
        self._refresh = None
        task = asyncio.ensure_future(self._replace_old())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _replace_old(self) -> None:
        """What was started ahead more than half WARM_MAX_AGE ago, started again."""
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if now - s.born > WARM_MAX_AGE / 2]:
            old = self._sessions.pop(key)
            old.close()
            try:
                fd, dir_id = await asyncio.to_thread(open_dir, old.images)
                if key not in self._sessions:     # (a checkpoint or ready_next meanwhile)
                    self._sessions[key] = self._start_session(old.final_log, old.root, old.images, fd, dir_id,
                                                              old.freeze_cgroup, f"unit {key[1]}")
                else:
                    os.close(fd)
            except (OSError, CheckpointError):
                pass    # the spare is gone: ready_next or the next checkpoint starts criu itself
        for slot in [s for s in self._slots if now - s.born > WARM_MAX_AGE / 2]:
            self._slots.remove(slot)
            self._later(slot.finish)
        self._fill_slots()
        if self._sessions or self._slots:
            self._schedule_refresh()

    def stage_note(self, unit: UnitProcess) -> dict[str, Any]:
        """What the stage answer says of the last dump or restore: criu was started ahead."""
        ahead = self._notes.pop((unit.job, unit.name), None)
        return {} if ahead is None else {"started_ahead": ahead}

    def unit_ended(self, unit: UnitProcess) -> None:
        """The unit's tree is gone: its dump started ahead is of no use."""
        session = self._sessions.pop((unit.job, unit.name), None)
        if session is not None:
            session.close()

    async def release(self, unit: UnitProcess) -> None:
        """The unit is gone for good."""
        self.unit_ended(unit)
        self._served.discard((unit.job, unit.name))

    async def close(self) -> None:
        """The agent stops: end every criu started ahead."""
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._drop_slots()
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def resume_rst(self, unit: UnitProcess) -> None:
        root = unit.root_pid
        if root is None:
            raise CheckpointError(f"unit {unit.name} was not rebuilt")
        pids = [root] if self._tree_size.pop(root, 0) == 1 else await asyncio.to_thread(tree_pids, root)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    @staticmethod
    def _log_name(what: str, unit: UnitProcess) -> str:
        return f"{what}-{_safe(unit.job)}-{_safe(unit.name)}.log"

    # ------------------------------------------------------- restored processes
    def _watch(self, pid: int) -> None:
        """Reap the restored root (our child) when it exits, keeping its exit code."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int | None] = loop.create_future()
        self._exits[pid] = done
        fd = os.pidfd_open(pid)

        def exited() -> None:
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                wpid, status = pid, None
            if wpid == 0:
                return
            loop.remove_reader(fd)
            os.close(fd)
            if not done.done():
                done.set_result(None if status is None else os.waitstatus_to_exitcode(status))

        loop.add_reader(fd, exited)

    def exit_code(self, pid: int) -> int | None:
        """Exit code of a restored root that has exited (negative: killed by a signal)."""
        done = self._exits.get(pid)
        return done.result() if done is not None and done.done() else None

    async def wait_exit(self, pid: int) -> int | None:
        """Wait until a restored root exits; its exit code.

        None at once for a pid this checkpointer did not restore, or None if reaped elsewhere.
        """
        done = self._exits.get(pid)
        return None if done is None else await asyncio.shield(done)


class _CwdLock:
    """An exclusive flock on a per-directory lock file (see CriuCheckpointer._before_dump)."""

    def __init__(self, cwd: str) -> None:
        lock_dir = Path(tempfile.gettempdir()) / "gridckpt-criu-locks"
        lock_dir.mkdir(exist_ok=True)
        self.fd = os.open(lock_dir / (hashlib.sha1(cwd.encode()).hexdigest()[:20] + ".lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held = True
        except BlockingIOError:
            self.held = False

    def wait(self) -> None:
        """(thread) Block until the lock is ours."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        os.close(self.fd)


def _refusal(images: Path, problems: list[str]) -> str:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return f"cannot restore {images} on this node: {shown}"


def _load_meta(images: Path) -> dict[str, Any]:
    path = images / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise RestoreRefused(f"{images} holds no criu checkpoint ({META_FILE} is missing)") from None
    except (OSError, ValueError) as e:
        raise RestoreRefused(f"{path} is unreadable: {e}") from None
    if meta.get("version") != META_VERSION:
        raise RestoreRefused(f"{path} has version {meta.get('version')}, expected {META_VERSION}")
    return meta


def _roll_back_files(meta: dict[str, Any], images: Path) -> None:
    """Put the files the tree writes back to their checkpointed state."""
    for f in meta["files"]:
        if f.get("snapshot"):
            copy_file(images / f["snapshot"], f["path"])
        elif f["write"]:
            try:
                if os.stat(f["path"]).st_size > f["size"]:
                    os.truncate(f["path"], f["size"])
            except OSError as e:
                raise CheckpointError(f"cannot roll back {f['path']}: {e.strerror}") from None
