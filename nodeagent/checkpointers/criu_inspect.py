"""What a process tree holds on disk, read from /proc (for the CRIU backend).

CRIU writes memory and kernel state, but two things it leaves to the caller decide whether
an image can be restored, and restored consistently:

* files the tree writes: their contents are not in the image.  A restart must see them as
  they were at the checkpoint, so their sizes (and for in-place writers a copy) are recorded;
* files the tree maps or executes (the program, its libraries, an LD_PRELOADed shim): the
  image refers to them by path, so another node must hold the very same files.

Everything here is blocking /proc and file I/O: call it from a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_DELETED = " (deleted)"


@dataclass
class OpenFile:
    """A regular file some process of the tree holds open."""

    path: str
    size: int
    mtime_ns: int
    write: bool = False          # open for writing through at least one descriptor
    append_only: bool = True     # every writing descriptor has O_APPEND
    at_end: bool = True          # every writing descriptor's offset is at the end of file
    shared_map: bool = False     # mapped MAP_SHARED and writable
    snapshot: str | None = None  # name of the copy kept in the images directory

    def needs_copy(self) -> bool:
        """True when truncating to ``size`` cannot undo later writes (in-place writers)."""
        if self.shared_map:
            return True
        return self.write and not self.append_only and not self.at_end


@dataclass
class MappedFile:
    """An executable, library or other file mapped privately into some process of the tree."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class TreeFiles:
    """Files of one process tree."""

    pids: list[int]
    files: dict[str, OpenFile] = field(default_factory=dict)
    mapped: dict[str, MappedFile] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pids": self.pids,
            "files": [asdict(f) for f in self.files.values()],
            "mapped": [asdict(m) for m in self.mapped.values()],
        }


class Sha256Cache:
    """sha256 of files, remembered by (path, device, inode, size, mtime)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def digest(self, path: str, st: os.stat_result) -> str:
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        value = h.hexdigest()
        with self._lock:
            self._known[key] = value
        return value


def parent_of(pid: int | str) -> int | None:
    """The parent pid of ``pid``, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: the fields follow the last ')'
    return int(data[data.rindex(b")") + 2:].split(b" ", 2)[1])


def tree_pids(root: int) -> list[int]:
    """The root and all its descendants, root first (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = parent_of(name)
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def ns_pids(pid: int) -> list[int]:
    """The NSpid line of /proc/PID/status: the pid as seen from each nested PID namespace."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    return [pid]


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3] in (b"Z", b"X")


def _fd_flags_pos(pid: int, fd: str) -> tuple[int, int]:
    flags = pos = 0
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                flags = int(line.split()[1], 8)
            elif line.startswith("pos:"):
                pos = int(line.split()[1])
    return flags, pos


def _scan_fds(pid: int, files: dict[str, OpenFile], ignore: tuple[str, ...] = ()) -> None:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("/") or target.endswith(_DELETED) or target.startswith(ignore):
                continue
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if not stat.S_ISREG(st.st_mode):
                continue
            flags, pos = _fd_flags_pos(pid, fd)
        except OSError:
            continue  # closed meanwhile
        entry = files.get(target)
        if entry is None:
            entry = files[target] = OpenFile(target, st.st_size, st.st_mtime_ns)
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            entry.write = True
            entry.append_only = entry.append_only and bool(flags & os.O_APPEND)
            entry.at_end = entry.at_end and pos >= st.st_size


def _scan_maps(pid: int, mapped: set[str], shared_writable: set[str]) -> None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        path = parts[5].rstrip("\n")
        if not path.startswith("/") or path.endswith(_DELETED):
            continue
        perms = parts[1]
        if "s" not in perms:
            mapped.add(path)            # program, libraries, private file mappings
        elif "w" in perms:
            shared_writable.add(path)   # its contents live in the file: copied at checkpoint
        # read-only shared mappings (e.g. a control page another process updates) are
        # neither binaries nor written by the tree: CRIU maps them again by path


def inspect_tree(root: int, hashes: Sha256Cache, ignore: tuple[str, ...] = ()) -> TreeFiles:
    """Open regular files and mapped files of the tree rooted at ``root``; descriptors of files
    whose path starts with one of ``ignore`` are not the tree's own (a scan beside a dump sees
    the log descriptor CRIU lends its parasite inside the dumped process)."""
    pids = [p for p in tree_pids(root) if not is_zombie(p)]
    tree = TreeFiles(pids)
    mapped: set[str] = set()
    shared_writable: set[str] = set()
    for pid in pids:
        _scan_fds(pid, tree.files, ignore)
        _scan_maps(pid, mapped, shared_writable)
    for path in sorted(mapped | shared_writable):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if path in shared_writable:
            entry = tree.files.setdefault(path, OpenFile(path, st.st_size, st.st_mtime_ns))
            entry.write = entry.shared_map = True
        if path in mapped:
            tree.mapped[path] = MappedFile(path, st.st_size, st.st_mtime_ns, hashes.digest(path, st))
    return tree


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy contents only (no metadata), creating ``dst``'s directory."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(1 << 20):
            fo.write(block)
