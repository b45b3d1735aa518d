"""Running the ``criu`` command line tool from asyncio.

Every call runs criu as a child of the calling event loop's thread (this matters for
``restore --restore-sibling``: the restored root becomes a child of that thread, see
criu.py).  Failures raise CheckpointError with the first error line of criu's log.
"""

from __future__ import annotations

import asyncio
import os
import shutil
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
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            reason = log_error(log)
            if reason.startswith("no log") and err:
                reason = err.decode(errors="replace").strip().splitlines()[-1]
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
