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


async def spawn_and_wait(argv: list[str], stderr: Path) -> int:
    """Run ``argv`` as a child of this thread and wait for it without blocking the loop.

    posix_spawn plus a pidfd watched by the event loop: asyncio's subprocess machinery
    (a waiter thread per child, pipes) costs several milliseconds more per criu call, which
    the checkpoint and restart stages cannot afford.  Returns the exit code (-N: signal N).
    """
    loop = asyncio.get_running_loop()
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, str(stderr), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    pidfd = os.pidfd_open(pid)
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class CriuRunner:
    """Runs criu subcommands with logs in a node-local work directory."""

    def __init__(self, criu: str | None = None, work_dir: Path | None = None,
                 log_level: int = 2) -> None:
        self.criu = find_criu(criu)
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "gridckpt-criu"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level

    def log_path(self, name: str) -> Path:
        return self.work_dir / name

    async def run(self, what: str, args: list[str], log_name: str) -> None:
        """Run ``criu ARGS -W work_dir -o log_name``; raise CheckpointError on failure."""
        log = self.log_path(log_name)
        argv = [self.criu, *args, "-W", str(self.work_dir), "-o", log_name, f"-v{self.log_level}"]
        status = await spawn_and_wait(argv, self.work_dir / (log_name + ".stderr"))
        if status != 0:
            reason = log_error(log)
            if reason.startswith("no log"):
                reason = log_error(self.work_dir / (log_name + ".stderr"))
            raise CheckpointError(f"{what} failed: {reason} (log {log})")

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
