"""Stop and resume a unit's whole process tree: cgroup freezer, or signals where none exists.

Three kinds, detected once per agent (override with ``GRIDCKPT_FREEZER=v1|v2|signal``):

``v1``      the cgroup v1 freezer hierarchy (``freezer.state``), wherever it is mounted
``v2``      a cgroup v2 hierarchy (``cgroup.freeze`` / ``cgroup.events``)
``signal``  no usable freezer: SIGSTOP / SIGCONT to every pid of the tree

A unit's cgroup is ``<root>/gridckpt/<job>/<unit>``; ``path`` is what CRIU's
``--freeze-cgroup`` wants.  Processes join it before they exec (see ``launch_wrapper``), so
nothing the unit forks can escape it.  Freezing is asynchronous and bounded: the state file is
polled with ``asyncio.sleep`` until the kernel reports the tree frozen.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from typing import Callable

import psutil

from nodeagent.checkpointers.base import CheckpointError

FREEZE_TIMEOUT = 5.0
_POLL_FIRST = 0.0005
_POLL_MAX = 0.02


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    out.append((parts[2], parts[1].replace("\\040", " "), parts[3].split(",")))
    except OSError:
        pass
    return out


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


def detect() -> tuple[str, str | None]:
    """Return (kind, hierarchy mount point) of the best freezer on this machine."""
    forced = os.environ.get("GRIDCKPT_FREEZER", "").strip().lower()
    v1 = v2 = None
    for fstype, mnt, opts in _mounts():
        if fstype == "cgroup" and "freezer" in opts and v1 is None:
            v1 = mnt
        elif fstype == "cgroup2" and v2 is None:
            v2 = mnt
    if v1 and not _writable_dir(v1):
        v1 = None
    if v2 and not (_writable_dir(v2) and _v2_supports_freeze(v2)):
        v2 = None
    if forced == "signal":
        return "signal", None
    if forced == "v1":
        if not v1:
            raise CheckpointError("GRIDCKPT_FREEZER=v1 but no writable cgroup v1 freezer is mounted")
        return "v1", v1
    if forced == "v2":
        if not v2:
            raise CheckpointError("GRIDCKPT_FREEZER=v2 but no writable cgroup v2 hierarchy with cgroup.freeze")
        return "v2", v2
    if forced:
        raise CheckpointError(f"GRIDCKPT_FREEZER={forced!r}: expected v1, v2 or signal")
    if v1:
        return "v1", v1
    if v2:
        return "v2", v2
    return "signal", None


def _v2_supports_freeze(mnt: str) -> bool:
    """cgroup.freeze exists only in non-root v2 cgroups; look for it in any child."""
    try:
        for entry in os.scandir(mnt):
            if entry.is_dir() and os.path.exists(os.path.join(entry.path, "cgroup.freeze")):
                return True
    except OSError:
        return False
    # no child yet: try to make one
    probe = os.path.join(mnt, "gridckpt")
    try:
        os.makedirs(probe, exist_ok=True)
        return os.path.exists(os.path.join(probe, "cgroup.freeze"))
    except OSError:
        return False


_detected: tuple[str, str | None] | None = None


def freezer_kind() -> tuple[str, str | None]:
    """The cached result of ``detect()``."""
    global _detected
    if _detected is None:
        _detected = detect()
    return _detected


def _read(path: str) -> str:
    """A small control file (cgroupfs, procfs) in one read: no buffered text object."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:   # to the end (a long cgroup.procs takes several reads)
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode()
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    """One write(2) to a control file, as the kernel wants it (no buffering)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def tree_pids(root: int | None) -> list[int]:
    """The live pids of root and its descendants (zombies excluded).

    Walks ``/proc/PID/task/TID/children`` (tens of microseconds for a small tree); where the
    kernel lacks that file, psutil's scan of every process (about a millisecond)."""
    if root is None:
        return []
    try:
        return _walk_children(root)
    except _NoChildrenFile:
        pass
    try:
        proc = psutil.Process(root)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in procs if _alive(p)]


class _NoChildrenFile(Exception):
    pass


def _walk_children(root: int) -> list[int]:
    out, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            tids = os.listdir(f"/proc/{pid}/task")
        except (OSError, IndexError):
            continue              # gone meanwhile
        if state in (b"Z", b"X"):
            continue
        out.append(pid)
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                    continue      # the thread ended
                raise _NoChildrenFile() from None
            except OSError:
                continue
    return out


def session_pids(sid: int | None) -> list[int]:
    """Every pid in session ``sid`` (finds orphans of a tree without a cgroup)."""
    if not sid:
        return []
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            continue
    return out


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _proc_state(pid: int) -> bytes:
    """The state letter of /proc/<pid>/stat (b"" if the process is gone): one read, no psutil."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return b""
    end = data.rfind(b")")
    return data[end + 2:end + 3] if end >= 0 else b""


def alive_pids(pids: list[int]) -> list[int]:
    """The pids that exist and are neither zombie nor dead.  A process whose main thread has
    exited while others still run shows its leader as a zombie: it counts as alive."""
    out = []
    for pid in pids:
        state = _proc_state(pid)
        if state in (b"", b"X", b"x") or (state == b"Z" and not _threads_left(pid)):
            continue
        out.append(pid)
    return out


def _threads_left(pid: int) -> bool:
    """Whether a process shown as a zombie still has threads running (its leader exited)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _ask(kind: str, path: str, frozen: bool) -> None:
    """Ask the kernel to freeze (or thaw) cgroup ``path``."""
    if kind == "v1":
        _write(os.path.join(path, "freezer.state"), "FROZEN" if frozen else "THAWED")
    else:
        _write(os.path.join(path, "cgroup.freeze"), "1" if frozen else "0")


def _frozen_at(kind: str, path: str) -> bool:
    """Whether every task under cgroup ``path`` is frozen (whoever asked for it)."""
    if kind == "v1":
        return _read(os.path.join(path, "freezer.state")).strip() == "FROZEN"
    for line in _read(os.path.join(path, "cgroup.events")).splitlines():
        if line.startswith("frozen "):
            return line.split()[1] == "1"
    return False


def _asked_frozen(kind: str, path: str) -> bool:
    """Whether cgroup ``path`` itself was asked to freeze (not only one of its ancestors)."""
    if kind == "v1":
        return _read(os.path.join(path, "freezer.self_freezing")).strip() == "1"
    return _read(os.path.join(path, "cgroup.freeze")).strip() == "1"


# job cgroup -> the unit cgroups this agent froze through it (freeze_together), until thawed
_frozen_together: dict[str, set[str]] = {}


async def freeze_together(freezers: list["Freezer"], timeout: float = FREEZE_TIMEOUT) -> bool:
    """Freeze several units of one job with one write, to their job's cgroup.

    Only when that cgroup holds exactly their cgroups (a unit of the job under another agent
    of this host rules it out), all made and none frozen yet.  False: not possible, freeze
    them one by one.  CheckpointError when the job did not freeze in time (it is thawed).
    ``thaw_together`` undoes it with one write too; a unit thawed alone meanwhile
    (``Freezer.thaw``) first has the others frozen each on its own."""
    if len(freezers) < 2:
        return False
    kind = freezers[0].kind
    if kind not in ("v1", "v2"):
        return False
    parent: str | None = None
    names: set[str] = set()
    for f in freezers:
        if f.kind != kind or not f.path or f.frozen or not f._created:
            return False
        d, name = os.path.split(f.path)
        if parent is None:
            parent = d
        elif d != parent:
            return False
        names.add(name)
    if parent is None or len(names) != len(freezers) or parent in _frozen_together:
        return False
    try:
        with os.scandir(parent) as it:
            if {e.name for e in it if e.is_dir(follow_symlinks=False)} != names:
                return False
        _ask(kind, parent, True)
    except OSError:
        return False
    _frozen_together[parent] = {f.path for f in freezers if f.path}
    deadline = time.monotonic() + timeout
    delay = _POLL_FIRST
    try:
        while not _frozen_at(kind, parent):
            if time.monotonic() > deadline:
                raise CheckpointError(f"freezer {parent} did not freeze within {timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
    except (OSError, CheckpointError, asyncio.CancelledError) as e:
        _frozen_together.pop(parent, None)
        try:
            _ask(kind, parent, False)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot freeze {parent}: {e.strerror}") from None
        raise
    for f in freezers:
        f.frozen = True
    return True


async def thaw_together(freezers: list["Freezer"], timeout: float = FREEZE_TIMEOUT) -> bool:
    """Thaw units that ``freeze_together`` froze, exactly these, with one write.  False when
    they are not such a group (any more): thaw them one by one."""
    if not freezers or not freezers[0].path:
        return False
    kind = freezers[0].kind
    parent = os.path.dirname(freezers[0].path)
    if _frozen_together.get(parent) != {f.path for f in freezers}:
        return False
    try:
        _ask(kind, parent, False)
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST
        while _frozen_at(kind, parent):     # v1 answers at once; v2 may take a moment
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
    except OSError:
        return False
    _frozen_together.pop(parent, None)
    for f in freezers:
        f.frozen = False
    return True


class Freezer:
    """The freezer of one unit.  ``pids_fn`` lists the tree (used by the signal fallback)."""

    def __init__(self, job: str, unit: str, pids_fn: Callable[[], list[int]],
                 kind: tuple[str, str | None] | None = None):
        self.kind, self.mount = kind or freezer_kind()
        self.pids_fn = pids_fn
        self.path: str | None = (os.path.join(self.mount, "gridckpt", job, unit)
                                 if self.mount else None)
        self.frozen = False
        self._created = False
        self._freeze_started = False   # start_freeze wrote the request; freeze need not

    # -- the cgroup itself -------------------------------------------------------------
    def create(self) -> None:
        """Create the unit's cgroup (idempotent); nothing to do for the signal fallback."""
        if self.path is None:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            self._created = True
        except OSError as e:
            raise CheckpointError(f"cannot create freezer cgroup {self.path}: {e.strerror}") from None

    @property
    def procs_file(self) -> str | None:
        return os.path.join(self.path, "cgroup.procs") if self.path else None

    def cgroup_pids(self) -> list[int]:
        """Every pid in the cgroup (zombies may be listed; filter with alive_pids)."""
        if not self.path:
            return []
        try:
            return [int(x) for x in _read(self.procs_file).split()]
        except (OSError, ValueError):
            return []

    def attach(self, pids: list[int]) -> None:
        """Move processes (e.g. a restored, stopped tree) into the unit's cgroup."""
        if not self.path:
            return
        self.create()
        present = set(self.cgroup_pids())
        for pid in pids:
            if pid in present:
                continue
            try:
                _write(self.procs_file, str(pid))
            except ProcessLookupError:
                pass
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise CheckpointError(f"cannot move pid {pid} into {self.path}: {e.strerror}") from None

    def _try_remove(self) -> bool:
        """One attempt; True once the cgroup is gone (EBUSY: tasks still leaving it)."""
        if not self.path or not os.path.isdir(self.path):
            return True
        if self.frozen or self.is_frozen():
            try:
                self._thaw_now()
                self.frozen = False
            except OSError:
                pass
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            return e.errno != errno.EBUSY
        self._created = False
        try:
            os.rmdir(os.path.dirname(self.path))     # the job's directory, once empty
        except OSError:
            pass
        return True

    def remove(self) -> None:
        """Remove the cgroup if it is empty (one attempt, never blocks)."""
        self._try_remove()

    async def remove_async(self, timeout: float = 1.0) -> None:
        """Remove the cgroup, waiting a little for exiting tasks to leave it."""
        deadline = time.monotonic() + timeout
        while not self._try_remove() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    # -- freeze / thaw -----------------------------------------------------------------
    def _v1_state(self) -> str:
        return _read(os.path.join(self.path, "freezer.state")).strip()

    def is_frozen(self) -> bool:
        """What the kernel says (cgroup kinds) or what we did (signal kind)."""
        if self.kind in ("v1", "v2") and self.path:
            return _frozen_at(self.kind, self.path)
        return self.frozen

    def start_freeze(self) -> None:
        """Ask the kernel to freeze the tree and return at once (``freeze`` then waits): a
        stage that freezes many units starts them all first.  Best effort: ``freeze``
        reports what goes wrong."""
        if self.kind == "signal" or not self.path:
            return
        try:
            if not self._created:
                self.create()
            _ask(self.kind, self.path, True)
            self._freeze_started = True
        except (OSError, CheckpointError):
            pass

    async def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze the whole tree and return once the kernel says it is frozen."""
        deadline = time.monotonic() + timeout
        if self.kind == "signal":
            await self._signal_stop(deadline)
            self.frozen = True
            return
        if not self._created:   # once: a makedirs per freeze costs two syscalls
            self.create()
        delay = _POLL_FIRST
        ask, self._freeze_started = not self._freeze_started, False   # start_freeze asked already
        try:
            while True:
                if ask:
                    _ask(self.kind, self.path, True)
                ask = True
                if _frozen_at(self.kind, self.path):
                    self.frozen = True
                    return
                if time.monotonic() > deadline:
                    self._thaw_now()
                    raise CheckpointError(f"freezer {self.path} did not freeze within {timeout:g} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
        except OSError as e:
            raise CheckpointError(f"cannot freeze {self.path}: {e.strerror}") from None

    def _leave_group(self) -> None:
        """Before this unit is thawed alone: if it was frozen with its job's others
        (freeze_together), freeze each of them on its own, then thaw the job's cgroup."""
        parent = os.path.dirname(self.path or "")
        members = _frozen_together.get(parent)
        if members is None or self.path not in members:
            return
        del _frozen_together[parent]
        for other in members - {self.path}:
            try:
                _ask(self.kind, other, True)
            except OSError:
                pass    # that unit's cgroup is gone
        _ask(self.kind, parent, False)

    def _thaw_parent_left_frozen(self) -> bool:
        """The job's cgroup is frozen but not by this agent as it runs now (an agent killed
        between freeze_together and thaw_together, then started again): thaw it, or none of
        its units can run.  True if it was."""
        parent = os.path.dirname(self.path or "")
        try:
            if parent in _frozen_together or not _asked_frozen(self.kind, parent):
                return False
            _ask(self.kind, parent, False)
        except OSError:
            return False
        return True

    def _thaw_now(self) -> None:
        self._leave_group()
        if self.kind in ("v1", "v2"):
            _ask(self.kind, self.path, False)

    async def thaw(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Let the tree run again (idempotent)."""
        if self.kind == "signal":
            for pid in alive_pids(self.pids_fn()):
                _kill(pid, signal.SIGCONT)
            self.frozen = False
            return
        if not self.path:
            self.frozen = False
            return
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST
        try:
            while True:
                try:
                    self._thaw_now()
                except FileNotFoundError:   # no cgroup (any more): nothing is frozen
                    self.frozen = False
                    return
                # v1: one read (THAWED, not FREEZING/FROZEN); v2: cgroup.events
                if (self._v1_state() == "THAWED") if self.kind == "v1" else not _frozen_at("v2", self.path):
                    self.frozen = False
                    return
                if self._thaw_parent_left_frozen():
                    continue
                if time.monotonic() > deadline:
                    raise CheckpointError(f"freezer {self.path} did not thaw within {timeout:g} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
        except OSError as e:
            raise CheckpointError(f"cannot thaw {self.path}: {e.strerror}") from None

    async def _signal_stop(self, deadline: float) -> None:
        """SIGSTOP every pid until the set is stable and every one of them is stopped."""
        stopped: set[int] = set()
        delay = _POLL_FIRST
        while True:
            pids = alive_pids(self.pids_fn())
            for pid in pids:
                if pid not in stopped:
                    _kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
            if all(_is_stopped(pid) for pid in pids) and set(alive_pids(self.pids_fn())) <= stopped:
                return
            if time.monotonic() > deadline:
                for pid in stopped:
                    _kill(pid, signal.SIGCONT)
                raise CheckpointError("process tree did not stop after SIGSTOP")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)


def _is_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP,
                                                psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return True


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def launch_wrapper(argv: list[str], procs_file: str | None, stop_before_exec: bool = False) -> list[str]:
    """An argv that joins ``procs_file``'s cgroup (and optionally SIGSTOPs itself) before exec.

    ``sh`` writes its own pid, which exec keeps, into cgroup.procs and only then execs the
    unit's command: nothing of the unit ever runs outside its cgroup (no race with forks).
    """
    if procs_file is None and not stop_before_exec:
        return list(argv)
    script = ""
    if procs_file is not None:
        script += 'echo $$ > "$0" || exit 126; '
    if stop_before_exec:
        script += "kill -STOP $$; "
    script += 'exec "$@"'
    return ["/bin/sh", "-c", script, procs_file or "sh", *argv]


def sweep_empty_cgroups(min_age: float = 60.0) -> list[str]:
    """Remove unit cgroups left empty by an agent that died (older than ``min_age`` s,
    so a cgroup another agent has just created for a launch is never touched)."""
    kind, mount = freezer_kind()
    if mount is None:
        return []
    top = os.path.join(mount, "gridckpt")
    removed = []
    now = time.time()
    try:
        jobs = [e.path for e in os.scandir(top) if e.is_dir()]
    except OSError:
        return []
    for job in jobs:
        try:
            units = [e.path for e in os.scandir(job) if e.is_dir()]
        except OSError:
            continue
        for path in units + [job]:
            try:
                if now - os.stat(path).st_mtime < min_age:
                    continue
                if _read(os.path.join(path, "cgroup.procs")).strip():
                    continue
                os.rmdir(path)
                removed.append(path)
            except OSError:
                continue
    return removed
