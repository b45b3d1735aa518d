"""Running the ``criu`` command line tool from asyncio.

Every call runs criu as a child of the calling event loop's thread (this matters for
``restore --restore-sibling``: the restored root becomes a child of that thread, see
criu.py).  Failures raise CheckpointError with the first error line of criu's log.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .base import CheckpointError

DEFAULT_CRIU = "/usr/local/sbin/criu"


def find_criu(explicit: str | None = None) -> str:
    """The criu executable: ``explicit``, $GRIDCKPT_CRIU, criu on PATH, /usr/local/sbin/criu."""
    for candidate in (explicit, os.environ.get("GRIDCKPT_CRIU"), shutil.which("criu"),
                      shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise CheckpointError("criu not found: install CRIU 4.x or set $GRIDCKPT_CRIU")


def log_error(log: Path) -> str:
    """The most telling line of a criu log: its first error, else its last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"no log at {log}"
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    line = errors[0] if errors else (lines[-1] if lines else "empty log")
    return line.split("): ", 1)[-1].strip() if "): " in line else line.strip()


class SpawnedProcess:
    """A child started by this thread with posix_spawn and watched through a pidfd by the
    running event loop (asyncio's subprocess machinery, a waiter thread per child and pipes,
    cost several milliseconds more per criu call, which the stages cannot afford).

    ``stderr``: the file the child's stderr goes to (stdin and stdout are /dev/null);
    ``dup2``: (our fd, the child's fd) to hand the child, e.g. a socket."""

    def __init__(self, argv: list[str], stderr: Path, dup2: tuple[int, int] | None = None) -> None:
        loop = asyncio.get_running_loop()
        actions: list[tuple] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                (os.POSIX_SPAWN_OPEN, 2, str(stderr), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
        if dup2 is not None:
            actions.append((os.POSIX_SPAWN_DUP2, *dup2))
        self.pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        self._pidfd: int | None = os.pidfd_open(self.pid)
        self.exited: asyncio.Future[int] = loop.create_future()
        self._loop = loop
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:      # reaped elsewhere: its status is lost
            pid, status = self.pid, -1
        if pid == 0:
            return
        self._close_pidfd()
        if not self.exited.done():
            self.exited.set_result(os.waitstatus_to_exitcode(status) if status != -1 else -1)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    async def wait(self) -> int:
        """The exit code (-N: killed by signal N)."""
        return await asyncio.shield(self.exited)

    def kill(self) -> None:
        """SIGKILL, unless it has exited (through the pidfd: never another process's pid)."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_and_reap(self) -> None:
        """SIGKILL and reap now (blocks until it is gone: for a process that had started work)."""
        if self._pidfd is None:
            return
        self.kill()
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        self._close_pidfd()
        if not self.exited.done():
            self.exited.set_result(code)


async def spawn_and_wait(argv: list[str], stderr: Path) -> int:
    """Run ``argv`` as a child of this thread and wait for it without blocking the loop; the
    exit code (-N: signal N).  Cancelled: the child is killed and reaped."""
    child = SpawnedProcess(argv, stderr)
    try:
        return await child.wait()
    except BaseException:
        child.kill_and_reap()
        raise


class CriuRunner:
    """Runs criu subcommands with logs in a node-local work directory."""

    def __init__(self, criu: str | None = None, work_dir: Path | None = None,
                 log_level: int = 2) -> None:
        self.criu = find_criu(criu)
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "gridckpt-criu"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self._work_fd: int | None = None

    def log_path(self, name: str) -> Path:
        return self.work_dir / name

    def work_dir_fd(self) -> int:
        """A descriptor of the work directory, kept open (CRIU's RPC takes directories as
        descriptors of the caller: criu opens /proc/<agent>/fd/<n>)."""
        if self._work_fd is None:
            self._work_fd = os.open(self.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._work_fd

    def keep_log(self, name: str, final: str) -> None:
        """(thread) The log ``name`` becomes ``final`` (a unit's last dump or restore log); its
        stderr file goes."""
        try:
            os.replace(self.log_path(name), self.log_path(final))
        except OSError:
            pass
        self.log_path(name + ".stderr").unlink(missing_ok=True)

    def drop_log(self, name: str) -> None:
        """(thread) Remove the log ``name`` and its stderr file."""
        self.log_path(name).unlink(missing_ok=True)
        self.log_path(name + ".stderr").unlink(missing_ok=True)

    def argv(self, args: list[str], log_name: str) -> list[str]:
        """``criu ARGS -W work_dir -o log_name -vN``."""
        return [self.criu, *args, "-W", str(self.work_dir), "-o", log_name, f"-v{self.log_level}"]

    def failure(self, what: str, log_name: str) -> CheckpointError:
        """The error for a criu run that failed: the telling line of its log (or stderr)."""
        log = self.log_path(log_name)
        reason = log_error(log)
        if reason.startswith("no log"):
            reason = log_error(self.work_dir / (log_name + ".stderr"))
        return CheckpointError(f"{what} failed: {reason} (log {log})")

    async def run(self, what: str, args: list[str], log_name: str) -> None:
        """Run ``criu ARGS -W work_dir -o log_name``; raise CheckpointError on failure."""
        status = await spawn_and_wait(self.argv(args, log_name), self.work_dir / (log_name + ".stderr"))
        if status != 0:
            raise self.failure(what, log_name)

    async def node_cpuinfo(self) -> bytes:
        """This node's ``criu cpuinfo dump`` image, cached on disk per boot."""
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = "unknown"
        cached = self.work_dir / f"cpuinfo-{boot}.img"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        tmp = Path(tempfile.mkdtemp(prefix="cpuinfo-", dir=self.work_dir))
        try:
            await self.run("criu cpuinfo dump", ["cpuinfo", "dump", "-D", str(tmp)], "cpuinfo-dump.log")
            data = (tmp / "cpuinfo.img").read_bytes()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        part = cached.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(data)
        os.replace(part, cached)
        return data
