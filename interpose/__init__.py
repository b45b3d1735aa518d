"""The LD_PRELOAD interposition shim and the reader of its determinant records.

`library_path()` gives the compiled shim (built on demand when missing), `logctl_path()`
the log-control library next to it (`interpose.logctl` closes records before shipping);
`interpose.reader` decodes its logs, `interpose.control.ControlPage` drives the
interval counter, `interpose.trace` runs a command under the shim.
"""
from __future__ import annotations

import os
from pathlib import Path

from .build import ASAN_LIBRARY_NAME, LIBRARY_NAME, LOGCTL_LIBRARY_NAME, HERE, BuildError, build_library, \
    source_digest

__all__ = ["library_path", "logctl_path", "asan_library_path", "shim_env", "BuildError"]

ENV_DIR = "GRIDCKPT_SHIM_DIR"
ENV_UNIT = "GRIDCKPT_UNIT"
ENV_CONTROL = "GRIDCKPT_SHIM_CONTROL"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gridckpt" / "interpose"


def _is_current(lib: Path, source: str = "shim.c") -> bool:
    """True when `lib` exists and is not older than the sources next to it (if any)."""
    if not lib.exists():
        return False
    sources = [HERE / source, HERE / "gridckpt_shim.h"]
    mtime = lib.stat().st_mtime
    return all(not s.exists() or s.stat().st_mtime <= mtime for s in sources)


def library_path() -> Path:
    """Path of the compiled shim: the installed one, else one built into the user cache."""
    installed = HERE / LIBRARY_NAME
    if _is_current(installed):
        return installed
    if not (HERE / "shim.c").exists():
        if installed.exists():
            return installed
        raise BuildError(f"the gridckpt shim is not installed and its source is missing ({HERE / 'shim.c'})")
    cached = _cache_dir() / source_digest() / LIBRARY_NAME
    if not cached.exists():
        build_library(cached)
    return cached


def logctl_path() -> Path:
    """Path of the compiled log-control library (built with the shim, found like it)."""
    installed = HERE / LOGCTL_LIBRARY_NAME
    if _is_current(installed, "logctl.c"):
        return installed
    if not (HERE / "logctl.c").exists():
        if installed.exists():
            return installed
        raise BuildError(f"the gridckpt log-control library is not installed and its source is missing "
                         f"({HERE / 'logctl.c'})")
    cached = _cache_dir() / source_digest() / LOGCTL_LIBRARY_NAME
    if not cached.exists():
        build_library(cached.parent / LIBRARY_NAME)
    return cached


def asan_library_path() -> Path:
    """Path of an AddressSanitizer build of the shim (built into the cache; for tests)."""
    cached = _cache_dir() / source_digest(asan=True) / ASAN_LIBRARY_NAME
    if not cached.exists():
        build_library(cached, asan=True)
    return cached


def shim_env(unit: str, log_dir: os.PathLike | str, control: os.PathLike | str | None = None,
             base: dict[str, str] | None = None, library: os.PathLike | str | None = None) -> dict[str, str]:
    """An environment that runs a command under the shim, logging into `log_dir`."""
    env = dict(os.environ if base is None else base)
    lib = str(library or library_path())
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = lib + (":" + preload if preload else "")
    env[ENV_DIR] = str(log_dir)
    env[ENV_UNIT] = unit
    if control is not None:
        env[ENV_CONTROL] = str(control)
    return env
