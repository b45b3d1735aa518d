"""A unit: one process tree on this node, launched or adopted, watched, stopped and killed.

Lifecycle (``state``, the unit states of the protocol):

    pending -> running <-> stopped -> exited | failed
                 ^                        |
                 +---- restarting <-------+     (rebuild: fresh launch or an adopted restored tree)

A unit ends when its root process ends: ``exited`` with ``exit_code`` for a normal exit (any
code), ``failed`` with ``signal`` when a signal killed it.  Whatever the root leaves behind in
its cgroup is killed then, so no process outlives its unit.  ``kill()`` (cancel) freezes the
tree so nothing can fork away, SIGKILLs every pid, thaws, reaps, and reports ``exited`` with
``signal`` 9 and ``cancelled`` True.

The agent watches its own children through asyncio; a tree adopted after a restore (whose
root may not be the agent's child) is watched through a pidfd.  Call ``become_subreaper()``
once in the daemon so restored roots are re-parented to the agent and their exit status is
known.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import shutil
import signal as _signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from nodeagent.checkpointers.base import CheckpointError, LaunchPlan
from nodeagent.freezer import Freezer, alive_pids, launch_wrapper, session_pids, tree_pids

log = logging.getLogger("gridckpt.units")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
StateCallback = Callable[["Unit"], Awaitable[None]]


def become_subreaper(on: bool = True) -> bool:
    """Make this process the subreaper of its descendants (PR_SET_CHILD_SUBREAPER), or no
    longer (``on=False``: an agent that ran inside a longer-lived process, as in tests)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, int(on), 0, 0, 0) == 0
    except OSError:
        return False


def base_env(job: str, unit: str, unit_dir: Path) -> dict[str, str]:
    """The minimal environment every unit starts from (nothing inherited from the agent)."""
    try:
        pw = pwd.getpwuid(os.getuid())
        home, user = pw.pw_dir, pw.pw_name
    except KeyError:
        home, user = "/", str(os.getuid())
    return {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": home, "USER": user,
            "LOGNAME": user, "GRIDCKPT_JOB": job, "GRIDCKPT_UNIT": unit,
            "GRIDCKPT_UNIT_DIR": str(unit_dir)}


class Unit:
    """One unit of a job on this node (implements base.UnitProcess)."""

    def __init__(self, job: str, name: str, spec: dict[str, Any], unit_dir: Path | str, *,
                 cwd: str | Path | None = None, on_state: StateCallback | None = None,
                 freezer_kind: tuple[str, str | None] | None = None):
        self.job = job
        self.name = name
        self.spec = spec
        self.unit_dir = Path(unit_dir)
        self.cwd = str(cwd or spec.get("cwd") or os.getcwd())
        self.on_state = on_state
        self.root_pid: int | None = None
        self.state = "pending"
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.cancelled = False
        self.detail: str | None = None
        self.started: float | None = None      # wall clock, for status
        self._started_mono: float | None = None
        self.freezer = Freezer(job, name, self._tree_pids_raw, kind=freezer_kind)
        self.env: dict[str, str] = base_env(job, name, self.unit_dir)
        self.env.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._watched_pid: int | None = None
        self._ended = asyncio.Event()
        self._killing = False
        self._root_gone = False
        self._sid: int | None = None
        self._members: set[int] = set()     # pids seen in the tree, for _reap_zombies
        self._attaching: asyncio.Future | None = None   # attach_soon's move into the cgroup
        self._attach_go: asyncio.Event | None = None     # ... may start
        # the agent's gate for background work (attach_soon's move): a future done once it
        # may start, or None for now
        self.background_gate: Callable[[], asyncio.Future | None] | None = None

    # -- UnitProcess -------------------------------------------------------------------
    @property
    def freezer_path(self) -> str | None:
        return self.freezer.path

    def _tree_pids_raw(self) -> list[int]:
        # The cgroup holds every process of the unit, double-forked ones included, and
        # reading it is cheap; psutil's walk of the root's descendants (a scan of all /proc)
        # serves where there is no cgroup, or the cgroup is (still/already) empty.
        root = None if self._root_gone else self.root_pid   # a reaped pid may be reused
        pids = set(self.freezer.cgroup_pids())
        if pids:
            if root is not None:
                pids.add(root)
        else:
            pids.update(tree_pids(root))
            if self.freezer.path is None:   # no cgroup: orphans still carry the session id
                pids.update(session_pids(self._sid))
        pids.discard(os.getpid())
        return sorted(pids)

    def pids(self) -> list[int]:
        """Every live pid of the tree: the cgroup's members, else the root's descendants."""
        live = alive_pids(self._tree_pids_raw())
        self._members.update(live)
        return live

    # -- launch ------------------------------------------------------------------------
    async def launch(self, plan: LaunchPlan, *, stopped: bool = False,
                     extra_env: dict[str, str] | None = None) -> int:
        """Start ``plan`` as the unit's tree; ``stopped``: frozen before it execs (rebuild)."""
        if self.state in ("running", "stopped") and self.root_pid and self.pids():
            raise CheckpointError(f"unit {self.name} is already running (pid {self.root_pid})")
        if not plan.argv:
            raise CheckpointError(f"unit {self.name}: empty command")
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        self.freezer.create()
        env = dict(self.env)
        env.update({str(k): str(v) for k, v in plan.env.items()})
        env.update(extra_env or {})
        self.env = env
        for prog in {plan.argv[0], *(self.spec.get("command") or [])[:1]}:
            if _resolve(prog, env.get("PATH", DEFAULT_PATH), self.cwd) is None:
                msg = f"unit {self.name}: cannot start {prog!r}: no such executable"
                self.mark_failed(msg)
                raise CheckpointError(msg)
        use_cgroup = self.freezer.path is not None
        if stopped and use_cgroup:
            await self.freezer.freeze()
        argv = launch_wrapper(plan.argv, self.freezer.procs_file,
                              stop_before_exec=stopped and not use_cgroup)
        out = os.open(self.unit_dir / "stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        err = os.open(self.unit_dir / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=self.cwd, env=env, start_new_session=True)
        except OSError as e:
            if stopped and use_cgroup:
                await self.freezer.thaw()
            msg = f"unit {self.name}: cannot start {plan.argv[0]!r}: {e.strerror or e}"
            self.mark_failed(msg)
            raise CheckpointError(msg) from None
        finally:
            os.close(out)
            os.close(err)
        self._reset_exit()
        self._proc = proc
        self.root_pid = proc.pid
        self._sid = proc.pid            # start_new_session: the root leads its session
        self._started_mono = time.monotonic()
        self.started = time.time()
        self._watch_task(self._watch_child(proc))
        if stopped:
            try:
                await self._wait_stopped(proc.pid)
            except CheckpointError:
                await self.kill()
                raise
            if not use_cgroup:
                self.freezer.frozen = True
        elif use_cgroup:
            await self._wait_in_cgroup(proc)
        await self._set_state("stopped" if stopped else "running")
        return proc.pid

    async def _wait_in_cgroup(self, proc: asyncio.subprocess.Process, timeout: float = 2.0) -> None:
        """Return once the new root sits in its cgroup (or has already ended)."""
        deadline = time.monotonic() + timeout
        while proc.pid not in self.freezer.cgroup_pids() and proc.returncode is None:
            if not alive_pids([proc.pid]) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.0005)

    async def _wait_stopped(self, pid: int, timeout: float = 5.0) -> None:
        """Wait until a stopped launch really sits in its cgroup (or in SIGSTOP)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.freezer.path:
                if pid in self.freezer.cgroup_pids() and self.freezer.is_frozen():
                    return
            else:
                try:
                    if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                        return
                except psutil.Error:
                    break
            await asyncio.sleep(0.001)
        raise CheckpointError(f"unit {self.name}: pid {pid} did not reach its stopped state")

    def adopt(self, pid: int | None = None,
              exit_waiter: Callable[[int], Awaitable[int | None]] | None = None, *,
              attached: bool = False) -> None:
        """Watch a tree this agent did not launch itself (e.g. restored by CRIU).

        The tree joins the unit's cgroup (it must not fork meanwhile: adopt it stopped),
        unless the caller ``attached`` it already (off the event loop: a cgroup move may wait
        for an RCU grace period).
        ``exit_waiter(pid)``, when the restoring backend reaps the root itself, returns its
        exit code (negative: killed by that signal); otherwise a pidfd is watched.
        """
        pid = pid or self.root_pid
        if pid is None:
            raise CheckpointError(f"unit {self.name}: nothing to adopt (no root pid)")
        if self._watched_pid == pid and self._watch and not self._watch.done():
            return
        self._reset_exit()
        self.root_pid = pid
        self._proc = None
        try:
            sid = os.getsid(pid)
            self._sid = sid if sid != os.getsid(0) else None
        except OSError:
            self._sid = None
        self._started_mono = time.monotonic()
        self.started = time.time()
        if not attached:
            self.freezer.attach(tree_pids(pid))
        self._watch_task(self._watch_adopted(pid, exit_waiter))

    def attach_soon(self, root: int) -> None:
        """Move a tree adopted with ``attached=True`` into the unit's cgroup in a thread, not
        waited for here.  A cgroup move waits for an RCU grace period (5-13 ms on these
        machines) and meanwhile blocks every fork on the host: done while CRIU restores, it
        slowed the restore by about 4 ms; done before the answer, it added the wait to the
        restart.  It starts once ``background_gate`` allows (the agent: a few milliseconds
        after the restart's answer is out, so that it takes no CPU from the answer on a small
        host), or at once when ``attached`` is awaited.  A pass after each move catches what
        forked meanwhile (a fork during a move waits for it).  ``freeze`` and ``kill`` wait for
        it first."""
        def move() -> None:
            moved: set[int] = set()
            for _ in range(16):
                new = [p for p in tree_pids(root) if p not in moved]
                if not new:
                    return
                self.freezer.attach(new)
                moved.update(new)
            raise CheckpointError(f"unit {self.name}: its tree kept forking while it was moved into {self.freezer.path}")

        if self.freezer.path is None:
            return
        go = self._attach_go = asyncio.Event()
        gate = self.background_gate() if self.background_gate is not None else None
        if gate is None:
            go.set()
        else:
            gate.add_done_callback(lambda _: go.set())

        async def when_allowed() -> None:
            await go.wait()
            await asyncio.to_thread(move)

        self._attaching = asyncio.ensure_future(when_allowed())
        self._attaching.add_done_callback(lambda f: f.cancelled() or f.exception())   # read in attached()

    async def attached(self) -> None:
        """Return once ``attach_soon`` is done; its CheckpointError if the move failed."""
        fut = self._attaching
        if fut is not None:
            if self._attach_go is not None:
                self._attach_go.set()    # held for the agent's background: needed now
            if not fut.done():
                await asyncio.shield(fut)
            if not fut.cancelled() and fut.exception() is not None:
                raise fut.exception()   # type: ignore[misc]

    def _reset_exit(self) -> None:
        self._root_gone = False
        self.exit_code = self.signal = None
        self.cancelled = False
        self.detail = None
        self._ended = asyncio.Event()

    def _watch_task(self, coro) -> None:
        if self._watch and not self._watch.done():
            self._watch.cancel()
        self._watched_pid = self.root_pid
        self._watch = asyncio.get_running_loop().create_task(coro)

    # -- watching ----------------------------------------------------------------------
    async def _watch_child(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if rc is not None and rc < 0:
            await self._ended_with(None, -rc)
        else:
            await self._ended_with(rc, None)

    async def _watch_adopted(self, pid: int, exit_waiter) -> None:
        if exit_waiter is not None:
            code = await exit_waiter(pid)
            if code is not None:
                await self._ended_with(code if code >= 0 else None, -code if code < 0 else None)
                return
            if not alive_pids([pid]):
                await self._ended_with(None, None, "exit status unknown (reaped elsewhere)")
                return
        await self._watch_pidfd(pid)

    async def _watch_pidfd(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            await self._ended_with(None, None, "process vanished before it was adopted")
            return
        except OSError:
            fd = None
        try:
            if fd is not None:
                ready = asyncio.Event()
                loop = asyncio.get_running_loop()
                loop.add_reader(fd, ready.set)
                try:
                    await ready.wait()
                finally:
                    loop.remove_reader(fd)
                code, sig, detail = _reap_pidfd(fd)
            else:   # no pidfd support: poll
                while psutil.pid_exists(pid) and alive_pids([pid]):
                    await asyncio.sleep(0.2)
                code, sig, detail = None, None, "exit status unknown"
            await self._ended_with(code, sig, detail)
        finally:
            if fd is not None:
                os.close(fd)

    async def _ended_with(self, code: int | None, sig: int | None, detail: str | None = None) -> None:
        self._root_gone = True
        # leftovers in the cgroup (orphans of the root) die with the unit
        await self._kill_tree(reap=True)
        self.exit_code, self.signal = code, sig
        if self._killing:
            self.cancelled = True
            self.state = "exited"
        elif sig is not None or (code is None and detail):
            self.state = "failed"
        else:
            self.state = "exited"
        self.detail = detail
        await self.freezer.remove_async()
        self._ended.set()
        await self._notify()

    def mark_failed(self, detail: str) -> None:
        """No tree could be started or restored: the unit is over (failed), without event
        (the caller reports the error)."""
        if self.root_pid is not None and not self._root_gone and self.pids():
            return      # something still runs: its watcher will tell
        self.state = "failed"
        self.detail = detail
        self._ended.set()

    async def wait(self, timeout: float | None = None) -> str:
        """Wait until the unit has ended; return its final state."""
        await asyncio.wait_for(self._ended.wait(), timeout)
        return self.state

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # -- stop / resume / kill ----------------------------------------------------------
    async def freeze(self, freezer_done: bool = False) -> None:
        """Stop the whole tree (stage stop); ``freezer_done``: the freezer froze it already,
        with the job's other units (freezer.freeze_together)."""
        await self.attached()        # a tree not yet in its cgroup would not freeze
        if not freezer_done:
            await self.freezer.freeze()
        if self.state == "running":
            await self._set_state("stopped")

    async def thaw(self, freezer_done: bool = False) -> None:
        """Let the tree run (stage resume_cp / resume_rst, abort); ``freezer_done``: the
        freezer thawed it already (freezer.thaw_together)."""
        if not freezer_done:
            await self.freezer.thaw()
        if self.state in ("stopped", "restarting"):
            await self._set_state("running")

    async def kill(self, timeout: float = 5.0) -> None:
        """Kill the whole tree, leaving no process behind; return when it is gone."""
        try:
            await self.attached()    # every member where pids() finds it
        except CheckpointError:
            pass                     # pids() still finds the root's descendants
        if self.ended or self.root_pid is None:
            await self._kill_tree(reap=True)
            await self.freezer.remove_async()
            return
        self._killing = True
        try:
            await self._kill_tree(reap=True)
            try:
                await asyncio.wait_for(asyncio.shield(self._ended.wait()), timeout)
            except asyncio.TimeoutError:
                raise CheckpointError(f"unit {self.name}: tree still alive {timeout:g} s after SIGKILL")
        finally:
            self._killing = False

    async def _kill_tree(self, reap: bool) -> None:
        pids = self.pids()
        if not pids:
            if self.freezer.frozen:
                try:
                    await self.freezer.thaw()
                except CheckpointError:
                    pass
            if reap:
                await self._reap_until_gone()
            return
        froze = False
        if self.freezer.kind != "signal":
            try:
                await self.freezer.freeze(timeout=2.0)
                froze = True
            except CheckpointError:
                pass
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if froze or self.freezer.frozen:
                try:
                    await self.freezer.thaw()
                except CheckpointError:
                    pass
                froze = False
            await asyncio.sleep(0.005)
            if reap:
                self._reap_zombies()
        if self.freezer.frozen:
            try:
                await self.freezer.thaw()
            except CheckpointError:
                pass
        if reap:
            await self._reap_until_gone()

    async def _reap_until_gone(self, timeout: float = 0.5) -> None:
        """After a kill: reap the tree's members as they die.  A member SIGKILLed a moment ago
        may still be exiting (every thread of it must), or be the zombie of a parent that is
        exiting too and hands it to the agent: wait for those, bounded, rather than leave a
        zombie behind once the unit is reported gone."""
        deadline = time.monotonic() + timeout
        while self._reap_zombies() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    def _reap_zombies(self) -> bool:
        """Reap members of the tree that died as the agent's children: orphans re-parented
        to the agent (a subreaper) would otherwise stay zombies as long as it runs.  Never
        the root (reaped by asyncio, the pidfd watcher, or the backend that restored it),
        and only pids seen as members of this unit (never another child of the agent).
        True while a member may still become ours to reap (see _reap_until_gone)."""
        me = os.getpid()
        family = self._members | {me, self.root_pid}
        pending = False
        for pid in list(self._members):
            if pid == self.root_pid:
                self._members.discard(pid)
                continue
            try:
                p = psutil.Process(pid)
                zombie, ppid = p.status() == psutil.STATUS_ZOMBIE, p.ppid()
                if zombie and ppid == me:
                    if os.waitpid(pid, os.WNOHANG)[0] == 0:
                        # shown as a zombie but not waitable yet: a process whose main thread
                        # has exited while its other threads are still exiting
                        pending = True
                        continue
                elif ppid in family:
                    # alive, or the zombie of a parent in the tree, which reaps it or dies and
                    # hands it to us: keep watching it
                    pending = True
                    continue
                elif not zombie:
                    continue            # alive under another parent: keep watching it
            except (psutil.Error, ChildProcessError, OSError):
                pass
            self._members.discard(pid)  # reaped here, gone, or another's zombie (PID 1's)
        return pending

    # -- status ------------------------------------------------------------------------
    async def _set_state(self, state: str) -> None:
        if self.state != state:
            self.state = state
            await self._notify()

    async def set_state(self, state: str) -> None:
        """Set a state decided elsewhere (the stage runner: restarting) and notify."""
        await self._set_state(state)

    async def _notify(self) -> None:
        if self.on_state is None:
            return
        try:
            await self.on_state(self)
        except Exception:   # the daemon's problem, never the unit's
            log.exception("state callback failed for unit %s/%s", self.job, self.name)

    def status(self) -> dict[str, Any]:
        """state, pid, nprocs, uptime, exit_code, signal (and cancelled, detail)."""
        self._reap_zombies()
        live = not self.ended and self.root_pid is not None
        return {
            "state": self.state,
            "pid": self.root_pid,
            "nprocs": len(self.pids()) if live else 0,
            "uptime": round(time.monotonic() - self._started_mono, 3)
            if live and self._started_mono else 0.0,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "cancelled": self.cancelled,
            "detail": self.detail,
        }

    async def close(self) -> None:
        """Forget the unit: kill what is left and remove its cgroup."""
        if not self.ended and self.root_pid is not None:
            await self.kill()
        if self._watch and not self._watch.done():
            self._watch.cancel()
        await self.freezer.remove_async()


def _resolve(prog: str, path: str, cwd: str) -> str | None:
    """Where ``prog`` would be executed from, or None if it cannot be."""
    if "/" in prog:
        full = prog if os.path.isabs(prog) else os.path.join(cwd, prog)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    return shutil.which(prog, path=path)


def _reap_pidfd(fd: int) -> tuple[int | None, int | None, str | None]:
    """Exit status through the pidfd when the agent is the parent (or subreaper)."""
    try:
        info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None, None, "exit status unknown (not a child of the agent)"
    except OSError as e:
        return None, None, f"exit status unknown ({e.strerror})"
    if info is None:
        return None, None, "exit status unknown"
    if info.si_code == os.CLD_EXITED:
        return info.si_status, None, None
    return None, info.si_status, None
