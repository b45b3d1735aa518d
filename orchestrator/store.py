"""The checkpoint store (DESIGN.md section 3): a directory shared by the
orchestrator and the node agents (local disk, or NFS/CephFS/Lustre for a site).

Layout::

    <root>/jobs/<job>/job.json                          job metadata
    <root>/jobs/<job>/units/<unit>/<seq>/...            images of one unit checkpoint
    <root>/jobs/<job>/units/<unit>/<seq>/manifest.json  written last, by atomic rename
    <root>/jobs/<job>/units/<unit>/.last_seq            highest seq whose dir was deleted
    <root>/jobs/<job>/units/<unit>/.spare-images        an empty dir the agent made ahead; the
                                                        next checkpoint's images dir, renamed
    <root>/jobs/<job>/checkpoints/<id>.json             a committed coordinated checkpoint
    <root>/jobs/<job>/checkpoints/<id>.pending.json     a checkpoint begun, not (yet) committed
    <root>/jobs/<job>/determinants/                     the job's determinant log

Rules that make it crash-safe:

* Every JSON file is written by ``write_json_atomic`` (temporary file in the
  same directory, fsync, ``os.replace``, fsync of the directory), so a reader
  sees the old file or the new one, never a torn one.
* No manifest, no checkpoint: ``write_manifest`` hashes (and fsyncs) every
  image file first and writes ``manifest.json`` last.  Deleting images removes
  the manifest first, so a crash mid-delete leaves an uncommitted dir.
* Two-phase commit of a coordinated checkpoint: ``begin_checkpoint`` writes the
  pending marker *before* any agent writes images; ``commit_checkpoint`` writes
  ``<id>.json`` and then drops the marker; ``abort_checkpoint`` deletes the
  images the marker names and then the marker.  An orchestrator started
  again aborts every ``pending_checkpoints`` entry.  A marker whose
  committed record exists (crash between the two steps) is never aborted:
  it is just removed.  The coordinator writes the marker without fsync (it is
  on the checkpoint's critical path): a killed orchestrator finds it all the
  same; a crash of the host may lose it or leave it torn, and then
  ``remove_partial``, which the orchestrator runs at start too, deletes the
  images it named (no manifest, named by no record), and ``pending_checkpoints``
  drops the torn marker.
* Seqs are never reused: ``next_seq`` counts existing seq dirs (partial ones
  too) and pending markers, and every deletion of a seq dir first raises the
  unit's high-water mark in ``.last_seq``, so a deleted seq is not handed out again.

``verify_manifest`` ignores files that the manifest does not list (by default):
restore tools write logs into the images directory (``criu restore`` writes
``restore.log`` there), and a second restart from the same checkpoint must
still verify.  Every file the manifest names is checked for presence, size
and sha256, so an image cannot be altered unnoticed.  ``strict=True`` rejects
extra files too.  The sha256 of a file is recomputed only if the file may have
been written since it was sealed: the manifest keeps each file's fingerprint
(inode, size, mtime, ctime) from sealing time, and sealing sets the mtime to a
value no write can produce, so any write, truncation, replacement or ``touch``
through the file system shows (ctime cannot be set from user space).  What a
fingerprint cannot see (bits rotting beneath the file system, a raw write to
the block device) ``full=True`` catches: a job's ``verify_images = "full"``.

All functions block (file I/O, hashing); asyncio callers run them in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "Store", "StoreError", "CorruptCheckpoint", "JobNotFound", "CheckpointNotFound",
    "write_json_atomic", "read_json", "write_manifest", "verify_manifest", "MANIFEST",
    "changed_since_sealed", "unchanged_since_sealed",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PENDING_SUFFIX = ".pending.json"


class StoreError(RuntimeError):
    """A store operation that cannot be done; the message says which file and why."""


class CorruptCheckpoint(StoreError):
    """A checkpoint's images do not match their manifest (or there is no manifest)."""


class JobNotFound(StoreError):
    """No such job in the store."""


class CheckpointNotFound(StoreError):
    """No such committed checkpoint."""


# ---------------------------------------------------------------------------
# atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, durable: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` so readers see the old or the new file, never
    a torn one: tmp file in the same dir, fsync, ``os.replace``, fsync of the dir.
    Creates the parent directories.  ``durable=False`` skips both fsyncs (the caller
    syncs a whole batch later, or the file is only a hint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; ``StoreError`` naming the file if it is not valid JSON.
    ``FileNotFoundError`` passes through."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not valid JSON: {e}") from None


# ---------------------------------------------------------------------------
# manifests


def _is_tmp(name: str) -> bool:
    return name.startswith(_TMP_PREFIX)


def _image_files(images_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relpath, path) of every regular file under images_dir, except the manifest
    and our temporary files, sorted.  Anything else than files and dirs is an error."""
    out = []
    for dirpath, dirnames, filenames in os.walk(images_dir):
        d = Path(dirpath)
        for name in list(dirnames):
            if (d / name).is_symlink():
                raise StoreError(f"{d / name}: a symlink in an images directory is not allowed")
        for name in filenames:
            p = d / name
            rel = p.relative_to(images_dir).as_posix()
            if rel == MANIFEST or _is_tmp(name):
                continue
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{p}: not a regular file; images directories hold regular files only")
            out.append((rel, p))
    out.sort()
    return iter(out)


def _open_noatime(path: Path) -> int:
    """Open for reading without touching atime (an atime update dirties the inode and
    makes a later sync cost a journal commit per file); plain open if not allowed."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _fingerprint(st: os.stat_result) -> list[int]:
    """What changes whenever a file's content is written through the file system: inode,
    size, mtime and ctime (ctime cannot be set back from user space)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_file(path: Path, fsync: bool) -> tuple[int, str, list[int]]:
    """(size, sha256 hex, fingerprint) of a file, read in 1 MiB chunks; optionally fsync it."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(_open_noatime(path), "rb", buffering=0) as f:
        before = _fingerprint(os.fstat(f.fileno()))
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
        after = _fingerprint(os.fstat(f.fileno()))
    if size != before[1] or after != before:
        raise StoreError(f"{path}: changed while being hashed ({before[1]} -> {size} bytes)")
    return size, h.hexdigest(), after


def _seal(path: Path, hashed: list[int]) -> list[int]:
    """Mark a file just hashed so that any later write shows in its fingerprint, whatever the
    kernel's timestamp granularity: its mtime is set 1 ns before the last write's, a value
    no later write can produce (a write stamps the current time).  Returns the fingerprint."""
    st = os.lstat(path)
    if _fingerprint(st) != hashed:
        raise StoreError(f"{path}: changed while being hashed")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 1), follow_symlinks=False)
    return _fingerprint(os.lstat(path))


_libc: Any = None


def _syncfs(path: Path) -> bool:
    """syncfs(2) on the file system holding ``path``: one flush (one journal commit)
    for all image files instead of one fsync each.  False if unavailable."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        syncfs = _libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def sync_store(path: str | os.PathLike[str]) -> None:
    """Make everything written under ``path``'s file system durable (one syncfs, else sync)."""
    if not _syncfs(Path(path)):
        os.sync()


def write_manifest(images_dir: str | os.PathLike[str], meta: dict[str, Any],
                   fsync: bool = True) -> dict[str, Any]:
    """Hash and size every image file under ``images_dir`` and write ``manifest.json``
    last, by atomic rename.  Returns the manifest.

    The manifest is ``meta`` (checkpointer, node, stages_ms, job, unit, seq ...)
    plus ``format``, ``created`` (unless given), ``files`` ({relpath: {size, sha256,
    sealed}}, ``sealed`` the file's fingerprint when it was hashed: inode, size, mtime and
    ctime in ns) and ``bytes`` (total); the computed keys win over keys of the same name in meta.
    With ``fsync`` (default) the image files and their directories are made durable
    before the manifest is written (one ``syncfs`` of their file system, or an
    fsync per file where syncfs is unavailable), so a committed checkpoint
    survives a power cut.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise StoreError(f"{images_dir}: images directory does not exist")
    files: dict[str, dict[str, Any]] = {}
    dirs: set[Path] = set()
    total = 0
    paths = []
    for rel, p in _image_files(images_dir):
        size, digest, fp = _hash_file(p, fsync=False)
        files[rel] = {"size": size, "sha256": digest, "sealed": _seal(p, fp)}
        total += size
        paths.append(p)
        dirs.add(p.parent)
    if fsync and not _syncfs(images_dir):
        for p in paths:
            fd = _open_noatime(p)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for d in dirs:
            _fsync_dir(d)
    manifest = dict(meta)
    manifest.setdefault("created", time.time())
    manifest.update(format=MANIFEST_FORMAT, files=files, bytes=total)
    write_json_atomic(images_dir / MANIFEST, manifest, durable=fsync)  # fsyncs images_dir itself
    return manifest


def verify_manifest(images_dir: str | os.PathLike[str], strict: bool = False,
                    hash_files: Callable[[str], bool] | None = None,
                    full: bool = False) -> dict[str, Any]:
    """Check every file the manifest names (presence, size, sha256); return the manifest.

    Raises ``CorruptCheckpoint`` naming the file and what is wrong: no manifest,
    unparsable manifest, missing file, truncated (or grown) file, sha256
    mismatch (tampered).  Files the manifest does not name are ignored unless
    ``strict`` (see the module docstring for why).  ``hash_files(relpath)`` picks
    the files whose sha256 is checked (default: all; the others get presence and
    size only, see ``verify_hashes``).  A picked file whose fingerprint (inode, size,
    mtime, ctime) is still the one it had when it was sealed was not written since
    and is not read again, unless ``full``.
    """
    images_dir = Path(images_dir)
    mpath = images_dir / MANIFEST
    if not images_dir.is_dir():
        raise CorruptCheckpoint(f"{images_dir}: images directory is missing")
    try:
        manifest = read_json(mpath)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{mpath}: missing: the checkpoint was never committed") from None
    except StoreError as e:
        raise CorruptCheckpoint(f"{e} (unparsable manifest)") from None
    except OSError as e:
        raise CorruptCheckpoint(f"{mpath}: cannot read: {e.strerror or e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CorruptCheckpoint(f"{mpath}: malformed manifest: no 'files' table")
    for rel, entry in sorted(files.items()):
        if (not isinstance(entry, dict) or isinstance(entry.get("size"), bool)
                or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str)
                or not _SHA256_RE.fullmatch(entry["sha256"])):
            raise CorruptCheckpoint(f"{mpath}: malformed manifest entry for {rel!r}")
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            raise CorruptCheckpoint(f"{mpath}: malformed manifest: bad file name {rel!r}")
        p = images_dir / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{p}: missing (listed in the manifest)") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpoint(f"{p}: not a regular file")
        want = entry["size"]
        if st.st_size < want:
            raise CorruptCheckpoint(f"{p}: truncated: {st.st_size} bytes, manifest says {want}")
        if st.st_size > want:
            raise CorruptCheckpoint(f"{p}: size mismatch: {st.st_size} bytes, manifest says {want}")
        if hash_files is None or hash_files(rel):
            _check_digest(p, entry, None if full else st)
    if strict:
        for rel, p in _image_files(images_dir):
            if rel not in files:
                raise CorruptCheckpoint(f"{p}: extra file not in the manifest")
    return manifest


def sizes_only(rel: str) -> bool:
    """A ``hash_files`` for ``verify_manifest`` that hashes nothing: presence and sizes only."""
    return False


def verify_hashes(images_dir: str | os.PathLike[str], manifest: dict[str, Any],
                  hash_files: Callable[[str], bool], full: bool = False) -> None:
    """The sha256 check of the files ``hash_files`` picks, against a manifest that
    ``verify_manifest`` already accepted; raises ``CorruptCheckpoint`` naming the file.
    Files unchanged since they were sealed are skipped unless ``full`` (as there)."""
    images_dir = Path(images_dir)
    for rel, entry in sorted(manifest["files"].items()):
        if hash_files(rel):
            p = images_dir / rel
            st = None
            if not full:
                try:
                    st = os.lstat(p)
                except OSError:
                    st = None
            _check_digest(p, entry, st)


def changed_since_sealed(images_dir: str | os.PathLike[str], manifest: dict[str, Any],
                         which: Callable[[str], bool]) -> list[str]:
    """The files ``which`` picks that may have been written since they were sealed (their
    fingerprint differs, or they cannot be stat'ed): the ones a check must hash."""
    out = []
    for rel, entry in sorted(manifest["files"].items()):
        if which(rel):
            try:
                st: os.stat_result | None = os.lstat(Path(images_dir) / rel)
            except OSError:
                st = None
            if not unchanged_since_sealed(entry, st):
                out.append(rel)
    return out


def unchanged_since_sealed(entry: dict[str, Any], st: os.stat_result | None) -> bool:
    """True if ``st`` is the fingerprint the manifest ``entry`` recorded when the file was
    hashed: nothing wrote to the file through the file system since."""
    sealed = entry.get("sealed")
    return st is not None and isinstance(sealed, list) and sealed == _fingerprint(st)


def _check_digest(p: Path, entry: dict[str, Any], st: os.stat_result | None = None) -> None:
    """Hash ``p`` against ``entry`` unless ``st`` shows it unchanged since it was sealed."""
    if unchanged_since_sealed(entry, st):
        return
    want = entry["size"]
    try:
        size, digest, _ = _hash_file(p, fsync=False)
    except StoreError as e:
        raise CorruptCheckpoint(str(e)) from None
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{p}: missing (listed in the manifest)") from None
    except OSError as e:
        raise CorruptCheckpoint(f"{p}: cannot read: {e.strerror or e}") from None
    if size != want:
        raise CorruptCheckpoint(f"{p}: size mismatch: {size} bytes, manifest says {want}")
    if digest != entry["sha256"]:
        raise CorruptCheckpoint(f"{p}: sha256 mismatch: the image was modified (tampered)")


# ---------------------------------------------------------------------------
# the store


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid {kind} name {name!r} (letters, digits, '_', '.', '-')")
    return name


def _check_seq(seq: int) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"invalid checkpoint seq {seq!r} (an integer >= 1)")
    return seq


def _check_ckpt_id(ckpt_id: str) -> str:
    _check_name("checkpoint id", ckpt_id)
    if ckpt_id.startswith(".") or ckpt_id.endswith(".pending"):
        raise ValueError(f"invalid checkpoint id {ckpt_id!r}")
    return ckpt_id


class Store:
    """A checkpoint store rooted at ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # the highest seq known used per (job, unit), from a full count or a checkpoint this
        # Store began: the next one is then checked with one stat, not by listing the unit's
        # directory (which grows with its history) and reading its marks
        self._seq_hint: dict[tuple[str, str], int] = {}
        self._unit_dir_strs: dict[tuple[str, str], str] = {}
        self._unit_dirs: dict[tuple[str, str], Path] = {}
        self._mark_cache: dict[tuple[str, str], tuple[tuple[int, int, int, int], int]] = {}
        # next seqs checked ahead (``check_next_seqs``), each handed out once with no stat
        self._checked_next: dict[tuple[str, str], int] = {}

    # -- paths ------------------------------------------------------------

    def job_dir(self, job: str) -> Path:
        return self.root / "jobs" / _check_name("job", job)

    def unit_dir(self, job: str, unit: str) -> Path:
        d = self._unit_dirs.get((job, unit))
        if d is None:    # checked and joined once per unit (four joins on every stage of 64 units)
            d = self.job_dir(job) / "units" / _check_name("unit", unit)
            if len(self._unit_dirs) > 65536:
                self._unit_dirs.clear()
            self._unit_dirs[(job, unit)] = d
        return d

    def images_dir(self, job: str, unit: str, seq: int) -> Path:
        """``units/<unit>/<seq>`` (not created: see ``reserve_seq``)."""
        return self.unit_dir(job, unit) / str(_check_seq(seq))

    def checkpoints_dir(self, job: str) -> Path:
        return self.job_dir(job) / "checkpoints"

    def determinants_dir(self, job: str) -> Path:
        return self.job_dir(job) / "determinants"

    def _checkpoint_path(self, job: str, ckpt_id: str) -> Path:
        return self.checkpoints_dir(job) / f"{_check_ckpt_id(ckpt_id)}.json"

    def _pending_path(self, job: str, ckpt_id: str) -> Path:
        return self.checkpoints_dir(job) / f"{_check_ckpt_id(ckpt_id)}{_PENDING_SUFFIX}"

    # -- jobs -------------------------------------------------------------

    def save_job(self, job: str, meta: dict[str, Any]) -> None:
        """Write ``job.json`` atomically (creates the job directory)."""
        write_json_atomic(self.job_dir(job) / "job.json", meta)

    def load_job(self, job: str) -> dict[str, Any]:
        """``job.json`` of a job; ``JobNotFound`` if there is none."""
        try:
            return read_json(self.job_dir(job) / "job.json")
        except FileNotFoundError:
            raise JobNotFound(f"no job {job!r} in the store {self.root}") from None

    def list_jobs(self) -> list[str]:
        """Names of the jobs that have a ``job.json``, sorted."""
        jobs = self.root / "jobs"
        if not jobs.is_dir():
            return []
        return sorted(p.name for p in jobs.iterdir()
                      if _NAME_RE.fullmatch(p.name) and (p / "job.json").is_file())

    # -- unit checkpoints (seqs) -------------------------------------------

    def _seq_dirs(self, job: str, unit: str) -> list[int]:
        try:
            with os.scandir(self.unit_dir(job, unit)) as it:   # d_type: no stat per entry
                return sorted(int(e.name) for e in it
                              if e.name.isdigit() and e.name == str(int(e.name)) and int(e.name) >= 1
                              and e.is_dir())
        except FileNotFoundError:
            return []

    def _last_seq_mark(self, job: str, unit: str, udir: str | None = None) -> int:
        """The high-water mark of the unit's deleted seq dirs (0: none); re-read only when
        the mark file changed (one stat otherwise)."""
        path = f"{udir}/.last_seq" if udir is not None else self.unit_dir(job, unit) / ".last_seq"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return 0
        key, sig = (job, unit), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._mark_cache.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            value = read_json(path)
        except (FileNotFoundError, StoreError):
            return 0
        value = value if isinstance(value, int) and not isinstance(value, bool) else 0
        self._mark_cache[key] = (sig, value)
        return value

    def next_seq(self, job: str, unit: str) -> int:
        """1 + the highest seq ever used by this unit: existing dirs (committed or
        partial), pending markers, and the high-water mark of deleted dirs.
        Does not reserve it: concurrent writers for one unit use ``reserve_seq``."""
        return self.next_seqs(job, [unit])[unit]

    def next_seqs(self, job: str, units: list[str]) -> dict[str, int]:
        """``next_seq`` of several units of one job (the pending markers read once)."""
        out = {}
        pending: list[dict[str, Any]] | None = None
        checked = self._checked_next
        for unit in units:
            hint = self._seq_hint.get((job, unit))
            if hint is not None:
                if checked and checked.pop((job, unit), None) == hint + 1:
                    out[unit] = hint + 1
                    continue
                udir = self._unit_dir_strs.get((job, unit))
                if udir is None:
                    udir = self._unit_dir_strs[(job, unit)] = str(self.unit_dir(job, unit))
                if not os.path.lexists(f"{udir}/{hint + 1}") and self._last_seq_mark(job, unit, udir) <= hint:
                    out[unit] = hint + 1
                    continue
            if pending is None:
                pending = self.pending_checkpoints(job)
            highest = max([0, self._last_seq_mark(job, unit), *self._seq_dirs(job, unit)])
            for marker in pending:
                seq = marker.get("units", {}).get(unit)
                if isinstance(seq, int):
                    highest = max(highest, seq)
            self._seq_hint[(job, unit)] = highest
            out[unit] = highest + 1
        return out

    def check_next_seqs(self, job: str, units: list[str]) -> None:
        """Check the units' next seqs now (``next_seqs``), for the next ``next_seqs`` to hand
        them out with no stat: the coordinator calls it once a checkpoint is committed, off
        the next checkpoint's path (64 units: two stats each, 0.5 ms).  A checked seq is handed
        out once, and only while this Store knows no higher seq used; one taken meanwhile by
        another Store on the same root is caught later, as in the window between any check
        and its use: the agent's prepare refuses a committed images dir."""
        for unit, seq in self.next_seqs(job, units).items():
            if len(self._checked_next) > 65536:
                self._checked_next.clear()
            self._checked_next[(job, unit)] = seq

    def _seqs_used(self, job: str, seqs: dict[str, int]) -> None:
        """Raise the seq hints: these seqs are taken (a checkpoint began with them)."""
        for unit, seq in seqs.items():
            key = (job, unit)
            if isinstance(seq, int) and key in self._seq_hint and seq > self._seq_hint[key]:
                self._seq_hint[key] = seq

    def reserve_seq(self, job: str, unit: str) -> int:
        """Hand out a new seq for a unit by creating its (empty) images dir, under a
        lock file so concurrent callers get distinct seqs."""
        udir = self.unit_dir(job, unit)
        udir.mkdir(parents=True, exist_ok=True)
        with self._locked(udir / ".seq.lock"):
            seq = self.next_seq(job, unit)
            while True:
                try:
                    (udir / str(seq)).mkdir()
                    break
                except FileExistsError:
                    seq += 1
        self._seqs_used(job, {unit: seq})
        return seq

    def _bump_last_seq(self, udir: Path, seq: int) -> None:
        """Record that ``seq`` was used, before its dir goes away (so it is never reused)."""
        with self._locked(udir / ".seq.lock"):
            mark = udir / ".last_seq"
            try:
                old = read_json(mark)
            except (FileNotFoundError, StoreError):
                old = 0
            if not isinstance(old, int) or isinstance(old, bool) or old < seq:
                write_json_atomic(mark, seq)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def unit_checkpoints(self, job: str, unit: str) -> list[int]:
        """Seqs of the unit's committed checkpoints (those with a manifest), ascending."""
        d = self.unit_dir(job, unit)
        return [s for s in self._seq_dirs(job, unit) if (d / str(s) / MANIFEST).is_file()]

    def units(self, job: str) -> list[str]:
        """Names of the units that have a directory in the store."""
        d = self.job_dir(job) / "units"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name))

    def delete_images(self, job: str, unit: str, seq: int) -> bool:
        """Delete one unit checkpoint's images (manifest first, so a crash midway
        leaves an uncommitted dir).  Refuses (``StoreError``) images that a committed
        coordinated checkpoint still names: delete that checkpoint first.
        Returns False if there was nothing to delete."""
        d = self.images_dir(job, unit, seq)
        users = [c["id"] for c in self.list_checkpoints(job)
                 if c.get("units", {}).get(unit) == seq]
        if users:
            raise StoreError(f"{d}: still used by committed checkpoint(s) {', '.join(users)}")
        return self._remove_images(d)

    def _remove_images(self, d: Path) -> bool:
        if not d.exists():
            return False
        self._bump_last_seq(d.parent, int(d.name))
        try:
            (d / MANIFEST).unlink()
            _fsync_dir(d)
        except FileNotFoundError:
            pass
        shutil.rmtree(d)
        _fsync_dir(d.parent)
        return True

    def remove_partial(self, job: str, min_age: float = 0.0) -> list[tuple[str, int]]:
        """Delete seq dirs that have no manifest and that no checkpoint (committed or
        pending) names; for recovery after an orchestrator crash.

        ``min_age`` (seconds) spares dirs modified more recently, e.g. an
        independent checkpoint an agent is writing right now.  Never touches a
        committed unit checkpoint, nor a dir a committed coordinated checkpoint
        names even if its manifest is gone (that is corruption to report, not
        to sweep away).  Returns the (unit, seq) pairs removed.
        """
        named: set[tuple[str, int]] = set()
        for rec in self.list_checkpoints(job) + self.pending_checkpoints(job):
            for unit, seq in rec.get("units", {}).items():
                named.add((unit, seq))
        now = time.time()
        removed = []
        for unit in self.units(job):
            udir = self.unit_dir(job, unit)
            for seq in self._seq_dirs(job, unit):
                d = udir / str(seq)
                if (d / MANIFEST).is_file() or (unit, seq) in named:
                    continue
                if min_age > 0:
                    try:
                        if now - d.stat().st_mtime < min_age:
                            continue
                    except FileNotFoundError:
                        continue
                if self._remove_images(d):
                    removed.append((unit, seq))
        return removed

    # -- coordinated checkpoints (two-phase) ---------------------------------

    def begin_checkpoint(self, job: str, ckpt_id: str, units: dict[str, int],
                         meta: dict[str, Any] | None = None, durable: bool = True) -> dict[str, Any]:
        """Phase one: record that checkpoint ``ckpt_id`` with these unit seqs is under
        way (write this before any agent writes images).  Idempotent for the same units.
        ``durable=False``: not fsync'ed (see the module docstring)."""
        units = {_check_name("unit", u): _check_seq(s) for u, s in units.items()}
        if self._checkpoint_path(job, ckpt_id).exists():
            raise StoreError(f"checkpoint {ckpt_id!r} of job {job!r} is already committed")
        path = self._pending_path(job, ckpt_id)
        if path.exists():
            old = read_json(path)
            if old.get("units") != units:
                raise StoreError(f"{path}: checkpoint {ckpt_id!r} already begun with other units")
            return old
        record = {**(meta or {}), "id": ckpt_id, "job": job, "units": units,
                  "state": "pending", "time": time.time()}
        write_json_atomic(path, record, durable)
        self._seqs_used(job, units)
        return record

    def commit_checkpoint(self, job: str, ckpt_id: str, units: dict[str, int],
                          meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Phase two: write ``checkpoints/<id>.json`` atomically, then drop the pending
        marker.  Refuses (``StoreError``) unless every unit's images have a manifest.
        Idempotent: committing the same id with the same units again returns the record."""
        units = {_check_name("unit", u): _check_seq(s) for u, s in units.items()}
        if not units:
            raise StoreError(f"checkpoint {ckpt_id!r}: no units")
        path = self._checkpoint_path(job, ckpt_id)
        if path.exists():
            old = read_json(path)
            if old.get("units") != units:
                raise StoreError(f"{path}: checkpoint {ckpt_id!r} already committed with other units")
            self._drop_pending(job, ckpt_id)
            return old
        for unit, seq in sorted(units.items()):
            m = self.images_dir(job, unit, seq) / MANIFEST
            if not m.is_file():
                raise StoreError(f"{m}: missing; cannot commit checkpoint {ckpt_id!r}")
        meta = dict(meta or {})
        record = {**meta, "id": ckpt_id, "job": job, "units": units, "state": "committed",
                  "time": meta.get("time", time.time())}
        write_json_atomic(path, record)
        self._drop_pending(job, ckpt_id)
        return record

    def _drop_pending(self, job: str, ckpt_id: str) -> None:
        try:
            self._pending_path(job, ckpt_id).unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self.checkpoints_dir(job))

    def abort_checkpoint(self, job: str, ckpt_id: str | dict[str, Any]) -> list[tuple[str, int]]:
        """Abort a pending checkpoint: delete the images its marker names (with or
        without manifest), then the marker.  Idempotent.  If the checkpoint was
        committed meanwhile, only the stale marker goes and its images stay.
        ``ckpt_id`` may also be a marker from ``pending_checkpoints``.
        Returns the (unit, seq) pairs whose images were deleted."""
        if isinstance(ckpt_id, dict):
            ckpt_id = ckpt_id["id"]
        path = self._pending_path(job, ckpt_id)
        if self._checkpoint_path(job, ckpt_id).exists():
            self._drop_pending(job, ckpt_id)
            return []
        try:
            marker = read_json(path)
        except FileNotFoundError:
            return []
        committed = {(u, s) for c in self.list_checkpoints(job) for u, s in c.get("units", {}).items()}
        removed = []
        for unit, seq in sorted(marker.get("units", {}).items()):
            if (unit, seq) in committed:  # never happens with fresh seqs; guard anyway
                continue
            if self._remove_images(self.images_dir(job, unit, seq)):
                removed.append((unit, seq))
        self._drop_pending(job, ckpt_id)
        return removed

    def pending_checkpoints(self, job: str) -> list[dict[str, Any]]:
        """Markers of checkpoints begun but neither committed nor aborted, oldest first
        (stale markers of committed checkpoints are removed, not listed)."""
        out = []
        for p in self._records(job, pending=True):
            rec = self._read_record(p)
            if rec is None:   # gone meanwhile, or torn by a crash of the host (not fsync'ed)
                if p.exists():
                    log.warning("dropping unreadable pending marker %s", p)
                    p.unlink(missing_ok=True)
                continue
            ckpt_id = p.name[: -len(_PENDING_SUFFIX)]
            if (p.parent / f"{ckpt_id}.json").exists():
                self._drop_pending(job, ckpt_id)
                continue
            rec.setdefault("id", ckpt_id)
            out.append(rec)
        out.sort(key=lambda r: (r.get("time", 0), r["id"]))
        return out

    def list_checkpoints(self, job: str) -> list[dict[str, Any]]:
        """Committed coordinated checkpoints, oldest first (never pending ones)."""
        out = []
        for p in self._records(job, pending=False):
            rec = self._read_record(p)
            if rec is not None:
                rec.setdefault("id", p.name[: -len(".json")])
                out.append(rec)
        out.sort(key=lambda r: (r.get("time", 0), r["id"]))
        return out

    def committed_checkpoint(self, job: str, ckpt_id: str) -> dict[str, Any] | None:
        """The committed checkpoint with exactly this id (its record, as listed by
        ``list_checkpoints``), or None: one file read instead of the whole listing."""
        try:
            path = self._checkpoint_path(job, ckpt_id)
        except ValueError:
            return None
        rec = self._read_record(path)
        if rec is not None:
            rec.setdefault("id", ckpt_id)
        return rec

    def load_checkpoint(self, job: str, ckpt_id: str) -> dict[str, Any]:
        """A committed checkpoint's record; ``CheckpointNotFound`` otherwise."""
        path = self._checkpoint_path(job, ckpt_id)
        try:
            return read_json(path)
        except FileNotFoundError:
            if self._pending_path(job, ckpt_id).exists():
                raise CheckpointNotFound(
                    f"checkpoint {ckpt_id!r} of job {job!r} is pending, not committed") from None
            raise CheckpointNotFound(f"no checkpoint {ckpt_id!r} for job {job!r}") from None

    def delete_checkpoint(self, job: str, ckpt_id: str) -> bool:
        """Remove a committed checkpoint's record (not its images: ``delete_images``
        them afterwards, if nothing else uses them).  False if it did not exist."""
        try:
            self._checkpoint_path(job, ckpt_id).unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self.checkpoints_dir(job))
        return True

    def _records(self, job: str, pending: bool) -> list[Path]:
        d = self.checkpoints_dir(job)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            if n.startswith(".") or not n.endswith(".json"):
                continue
            if n.endswith(_PENDING_SUFFIX) == pending:
                out.append(d / n)
        return out

    @staticmethod
    def _read_record(path: Path) -> dict[str, Any] | None:
        try:
            rec = read_json(path)
        except FileNotFoundError:
            return None
        except StoreError as e:
            log.warning("skipping unreadable checkpoint record: %s", e)
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("units"), dict):
            log.warning("skipping malformed checkpoint record: %s", path)
            return None
        return rec
