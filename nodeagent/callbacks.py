"""Job-file callbacks: ``pre_checkpoint``, ``post_checkpoint``, ``restart``.

Each is one command (an argv list) in the unit's ``callbacks`` table.  It runs with the unit's
environment plus ``GRIDCKPT_JOB``, ``GRIDCKPT_UNIT``, ``GRIDCKPT_CHECKPOINT`` and
``GRIDCKPT_IMAGES``, in the unit's working directory, in its own session, bounded by a
timeout.  A non-zero exit (or a timeout, or a command that cannot start) raises
``CheckpointError`` naming the callback, its exit code and its last line of stderr.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from nodeagent.checkpointers.base import CheckpointError

CALLBACK_NAMES = ("pre_checkpoint", "post_checkpoint", "restart")
DEFAULT_TIMEOUT = 30.0


def callback_argv(spec: dict[str, Any], name: str) -> list[str] | None:
    """The argv of callback ``name`` in a unit spec, or None if it has none."""
    cbs = spec.get("callbacks") or {}
    argv = cbs.get(name)
    if argv is None:
        return None
    if isinstance(argv, str):
        argv = [argv]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise CheckpointError(f"callback {name}: expected a non-empty list of strings")
    return argv


async def run_callback(unit: Any, name: str, *, checkpoint: str = "", images: Path | str | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any] | None:
    """Run the unit's callback ``name`` if it has one; return {argv, ms, stdout} or None."""
    argv = callback_argv(unit.spec, name)
    if argv is None:
        return None
    env = dict(unit.env)
    env.update({"GRIDCKPT_JOB": unit.job, "GRIDCKPT_UNIT": unit.name,
                "GRIDCKPT_CHECKPOINT": checkpoint or "", "GRIDCKPT_IMAGES": str(images or "")})
    cwd = getattr(unit, "cwd", None) or str(unit.unit_dir)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
    except OSError as e:
        raise CheckpointError(f"{name} callback {argv[0]!r} cannot start: {e.strerror or e}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        raise CheckpointError(f"{name} callback {argv[0]!r} timed out after {timeout:g} s") from None
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        raise
    _kill_group(proc.pid)    # anything it left running in its session
    if proc.returncode != 0:
        last = _last_line(err)
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        raise CheckpointError(f"{name} callback {argv[0]!r} failed ({how})"
                              + (f": {last}" if last else ""))
    return {"argv": argv, "ms": round((loop.time() - t0) * 1000, 3),
            "stdout": out.decode(errors="replace")[-4096:]}


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
