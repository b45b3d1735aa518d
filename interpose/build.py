"""Compile the shim with gcc: used by setup.py at install time and on demand at run time."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("shim.c",)
HEADERS = ("gridckpt_shim.h",)
LIBRARY_NAME = "libgridckpt_interpose.so"
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
    for name in SOURCES + HEADERS:
        h.update((src_dir / name).read_bytes())
    h.update(" ".join(ASAN_CFLAGS if asan else CFLAGS).encode())
    return h.hexdigest()[:16]


def build_library(out: Path, src_dir: Path = HERE, asan: bool = False) -> Path:
    """Compile the shim into `out` (written atomically); return `out`."""
    cc = find_compiler()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *(ASAN_CFLAGS if asan else CFLAGS), "-I", str(src_dir),
           *(str(src_dir / s) for s in SOURCES), "-o", tmp, *LDLIBS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cannot build the gridckpt shim: {' '.join(cmd)} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
