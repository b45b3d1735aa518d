"""Compile the shim with gcc: used by setup.py at install time and on demand at run time.

`build_library` builds the shim and, next to it, the small log-control library the agent's
shipper uses to close records (libgridckpt_logctl.so, from logctl.c), with the same flags:
`pip install .` (setup.py's build_ext) and the run-time cache both get the pair."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("shim.c",)
LOGCTL_SOURCES = ("logctl.c",)
HEADERS = ("gridckpt_shim.h",)
LIBRARY_NAME = "libgridckpt_interpose.so"
LOGCTL_LIBRARY_NAME = "libgridckpt_logctl.so"
ASAN_LIBRARY_NAME = "libgridckpt_interpose_asan.so"

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden", "-fPIC", "-shared"]
ASAN_CFLAGS = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-Wall", "-Wextra",
               "-Werror", "-fvisibility=hidden", "-fPIC", "-shared"]
LDLIBS = ["-ldl", "-pthread"]


class BuildError(RuntimeError):
    """The shim could not be compiled (no compiler, or the compiler failed)."""


def find_compiler() -> str:
    """Path of the C compiler ($CC, else gcc, else cc); BuildError if there is none."""
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
    raise BuildError("cannot build the gridckpt shim: no C compiler found (install gcc or set CC)")


def source_digest(src_dir: Path = HERE, asan: bool = False) -> str:
    """A short hash of the sources and flags: names a build in the cache."""
    h = hashlib.sha256()
    for name in SOURCES + LOGCTL_SOURCES + HEADERS:
        h.update((src_dir / name).read_bytes())
    h.update(" ".join(ASAN_CFLAGS if asan else CFLAGS).encode())
    return h.hexdigest()[:16]


def _compile(cc: str, flags: list[str], src_dir: Path, sources: tuple[str, ...], out: Path) -> None:
    """Compile `sources` into the shared library `out` (written atomically)."""
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *flags, "-I", str(src_dir), *(str(src_dir / s) for s in sources), "-o", tmp, *LDLIBS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cannot build the gridckpt shim: {' '.join(cmd)} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(out: Path, src_dir: Path = HERE, asan: bool = False) -> Path:
    """Compile the shim into `out` and (not for ASan) the log-control library next to it;
    both written atomically; return `out`."""
    cc = find_compiler()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not asan:  # first: a shim next to a missing logctl would look complete
        _compile(cc, CFLAGS, src_dir, LOGCTL_SOURCES, out.parent / LOGCTL_LIBRARY_NAME)
    _compile(cc, ASAN_CFLAGS if asan else CFLAGS, src_dir, SOURCES, out)
    return out
