"""The checkpoint store (orchestrator.store): atomic files, manifests, seqs, two-phase commit."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from orchestrator import store as store_mod
from orchestrator.store import (MANIFEST, CheckpointNotFound, CorruptCheckpoint, JobNotFound, Store,
                                StoreError, verify_manifest, write_json_atomic, write_manifest)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def no_tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def make_images(d: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


IMAGES = {"pages-1.img": os.urandom(3 * (1 << 20) + 17), "core-1.img": b"core" * 100,
          "sub/dir/app-state.bin": b"state", "empty.img": b""}


def committed_unit(store: Store, job: str, unit: str, files: dict[str, bytes] | None = None) -> int:
    seq = store.reserve_seq(job, unit)
    d = store.images_dir(job, unit, seq)
    make_images(d, files or {"pages.img": os.urandom(1000)})
    write_manifest(d, {"job": job, "unit": unit, "seq": seq, "checkpointer": "app"})
    return seq


# -- layout and atomic writes ------------------------------------------------


def test_layout(store: Store) -> None:
    root = store.root
    assert store.job_dir("j") == root / "jobs" / "j"
    assert store.unit_dir("j", "a") == root / "jobs" / "j" / "units" / "a"
    assert store.images_dir("j", "a", 3) == root / "jobs" / "j" / "units" / "a" / "3"
    assert store.checkpoints_dir("j") == root / "jobs" / "j" / "checkpoints"
    assert store.determinants_dir("j") == root / "jobs" / "j" / "determinants"


@pytest.mark.parametrize("call", [
    lambda s: s.job_dir(".."), lambda s: s.job_dir("a/b"), lambda s: s.unit_dir("j", "."),
    lambda s: s.unit_dir("j", ""), lambda s: s.images_dir("j", "a", 0), lambda s: s.images_dir("j", "a", "1"),
    lambda s: s.load_checkpoint("j", "x.pending"), lambda s: s.load_checkpoint("j", "../x")])
def test_bad_names_rejected(store: Store, call) -> None:
    with pytest.raises(ValueError):
        call(store)


def test_write_json_atomic_leaves_no_tmp_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b.json"
    write_json_atomic(p, {"x": 1})
    write_json_atomic(p, {"x": 2, "y": [1, 2]})
    assert json.loads(p.read_text()) == {"x": 2, "y": [1, 2]}
    assert os.listdir(p.parent) == ["b.json"]


def test_write_json_atomic_failure_keeps_old_file_and_no_tmp(tmp_path: Path) -> None:
    p = tmp_path / "b.json"
    write_json_atomic(p, {"x": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"x": object()})  # not serialisable: fails before any write
    assert json.loads(p.read_text()) == {"x": 1}
    assert os.listdir(tmp_path) == ["b.json"]


def test_write_json_atomic_failure_in_replace_cleans_tmp(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "b.json"
    write_json_atomic(p, {"x": 1})

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(p, {"x": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"x": 1}
    assert os.listdir(tmp_path) == ["b.json"]


def test_jobs(store: Store) -> None:
    assert store.list_jobs() == []
    with pytest.raises(JobNotFound, match="no job 'j1'"):
        store.load_job("j1")
    store.save_job("j2", {"spec": {"name": "x"}, "state": "running"})
    store.save_job("j1", {"state": "pending"})
    store.save_job("j1", {"state": "running"})
    (store.root / "jobs" / "half").mkdir()  # no job.json: not a job
    assert store.list_jobs() == ["j1", "j2"]
    assert store.load_job("j1") == {"state": "running"}
    assert no_tmp_files(store.root) == []


def test_load_job_unparsable_names_file(store: Store) -> None:
    store.save_job("j", {})
    (store.job_dir("j") / "job.json").write_text("{nope")
    with pytest.raises(StoreError, match="job.json: not valid JSON"):
        store.load_job("j")


# -- manifests -----------------------------------------------------------------


def test_manifest_contents(tmp_path: Path) -> None:
    d = tmp_path / "img"
    make_images(d, IMAGES)
    meta = {"checkpointer": "criu", "node": "n1", "job": "j", "unit": "a", "seq": 1,
            "stages_ms": {"prepare": 1.5}}
    m = write_manifest(d, meta)
    assert json.loads((d / MANIFEST).read_text()) == m
    assert set(m["files"]) == set(IMAGES)
    import hashlib
    for rel, data in IMAGES.items():
        st = os.lstat(d / rel)
        assert m["files"][rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                   "sealed": [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]}
    assert m["bytes"] == sum(len(v) for v in IMAGES.values())
    assert m["checkpointer"] == "criu" and m["stages_ms"] == {"prepare": 1.5} and m["created"] > 0
    assert verify_manifest(d) == m
    assert no_tmp_files(d) == []


def test_manifest_is_written_last(tmp_path: Path, monkeypatch) -> None:
    """While files are being hashed there is no manifest; it appears only by the final rename."""
    d = tmp_path / "img"
    make_images(d, IMAGES)
    seen = []
    real = store_mod._hash_file

    def spy(path, fsync):
        seen.append((d / MANIFEST).exists())
        return real(path, fsync)

    monkeypatch.setattr(store_mod, "_hash_file", spy)
    renames = []
    real_replace = os.replace

    def spy_replace(src, dst):
        renames.append((Path(src).name, Path(dst).name, len(seen)))
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", spy_replace)
    write_manifest(d, {})
    assert seen == [False] * len(IMAGES)
    assert len(renames) == 1 and renames[0][1] == MANIFEST and renames[0][0].startswith(".tmp-")
    assert renames[0][2] == len(IMAGES), "the manifest is renamed in after every file was hashed"


def test_manifest_rewrite_ignores_old_manifest_and_tmp(tmp_path: Path) -> None:
    d = tmp_path / "img"
    make_images(d, {"a": b"1"})
    write_manifest(d, {})
    (d / ".tmp-manifest.json.zzz").write_text("left over from a crash")
    m = write_manifest(d, {})
    assert set(m["files"]) == {"a"}


def test_manifest_refuses_symlinks(tmp_path: Path) -> None:
    d = tmp_path / "img"
    make_images(d, {"a": b"1"})
    (d / "link").symlink_to("/etc/passwd")
    with pytest.raises(StoreError, match="link: not a regular file"):
        write_manifest(d, {})
    assert not (d / MANIFEST).exists()


def test_manifest_of_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        write_manifest(tmp_path / "nope", {})


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    make_images(d, IMAGES)
    write_manifest(d, {"checkpointer": "criu"})
    return d


def test_verify_detects_tamper(images: Path) -> None:
    p = images / "pages-1.img"
    with open(p, "r+b") as f:
        f.seek(2 << 20)
        b = f.read(1)
        f.seek(2 << 20)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CorruptCheckpoint, match=rf"^{p}: sha256 mismatch.*tampered"):
        verify_manifest(images)


def _hashed_files(monkeypatch) -> list[str]:
    """Names of the files _hash_file reads from now on."""
    seen: list[str] = []
    real = store_mod._hash_file

    def spy(path, fsync):
        seen.append(Path(path).name)
        return real(path, fsync)

    monkeypatch.setattr(store_mod, "_hash_file", spy)
    return seen


def test_verify_skips_files_unchanged_since_sealed(images: Path, monkeypatch) -> None:
    seen = _hashed_files(monkeypatch)
    verify_manifest(images)
    assert seen == []
    verify_manifest(images, full=True)   # verify_images = "full": every file, every time
    assert sorted(seen) == sorted(Path(rel).name for rel in IMAGES)


@pytest.mark.parametrize("how", ["same bytes rewritten", "mtime put back", "replaced by a copy"])
def test_verify_rehashes_a_file_written_since_sealed(images: Path, monkeypatch, how: str) -> None:
    """Any write shows in the fingerprint (even one that keeps size and mtime), and the file is
    hashed again: identical content passes, a flipped byte with its mtime put back does not."""
    p = images / "pages-1.img"
    st = os.lstat(p)
    if how == "same bytes rewritten":
        with open(p, "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(b)
    elif how == "mtime put back":
        with open(p, "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(bytes([b[0] ^ 0x40]))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        shutil.copyfile(p, images / "copy.tmp")
        os.replace(images / "copy.tmp", p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen = _hashed_files(monkeypatch)
    if how == "mtime put back":
        with pytest.raises(CorruptCheckpoint, match=rf"^{p}: sha256 mismatch"):
            verify_manifest(images)
    else:
        verify_manifest(images)
    assert seen == ["pages-1.img"]


def test_verify_hashes_files_of_a_manifest_without_fingerprints(images: Path, monkeypatch) -> None:
    """Manifests written before fingerprints existed are verified in full."""
    m = json.loads((images / MANIFEST).read_text())
    for entry in m["files"].values():
        del entry["sealed"]
    (images / MANIFEST).write_text(json.dumps(m))
    seen = _hashed_files(monkeypatch)
    verify_manifest(images)
    assert len(seen) == len(IMAGES)


def test_verify_detects_truncate(images: Path) -> None:
    p = images / "sub" / "dir" / "app-state.bin"
    os.truncate(p, 2)
    with pytest.raises(CorruptCheckpoint, match=rf"^{p}: truncated: 2 bytes, manifest says 5"):
        verify_manifest(images)


def test_verify_detects_growth(images: Path) -> None:
    p = images / "core-1.img"
    with open(p, "ab") as f:
        f.write(b"x")
    with pytest.raises(CorruptCheckpoint, match=rf"^{p}: size mismatch"):
        verify_manifest(images)


def test_verify_detects_missing_file(images: Path) -> None:
    p = images / "empty.img"
    p.unlink()
    with pytest.raises(CorruptCheckpoint, match=rf"^{p}: missing"):
        verify_manifest(images)


def test_verify_detects_missing_manifest(images: Path) -> None:
    (images / MANIFEST).unlink()
    with pytest.raises(CorruptCheckpoint, match=rf"^{images / MANIFEST}: missing.*never committed"):
        verify_manifest(images)


def test_verify_detects_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpoint, match="images directory is missing"):
        verify_manifest(tmp_path / "gone")


@pytest.mark.parametrize("content,phrase", [
    ("{not json", "not valid JSON"), ("[]", "no 'files'"), ('{"files": {"a": 3}}', "entry for 'a'"),
    ('{"files": {"a": {"size": 1, "sha256": "zz"}}}', "entry for 'a'"),
    ('{"files": {"../x": {"size": 1, "sha256": "' + "0" * 64 + '"}}}', "bad file name '../x'"),
])
def test_verify_detects_unparsable_manifest(images: Path, content: str, phrase: str) -> None:
    (images / MANIFEST).write_text(content)
    with pytest.raises(CorruptCheckpoint, match=phrase) as ei:
        verify_manifest(images)
    assert MANIFEST in str(ei.value)


def test_verify_extra_files_ignored_unless_strict(images: Path) -> None:
    (images / "restore.log").write_text("criu restore wrote this")
    verify_manifest(images)
    with pytest.raises(CorruptCheckpoint, match="restore.log: extra file not in the manifest"):
        verify_manifest(images, strict=True)


# -- seqs --------------------------------------------------------------------


def test_next_seq_counts_partial_dirs(store: Store) -> None:
    assert store.next_seq("j", "a") == 1
    assert committed_unit(store, "j", "a") == 1
    store.images_dir("j", "a", 2).mkdir()  # partial: no manifest
    assert store.next_seq("j", "a") == 3
    assert store.unit_checkpoints("j", "a") == [1]
    (store.unit_dir("j", "a") / "stdout").write_text("unit output lives here too")
    (store.unit_dir("j", "a") / "07").mkdir()  # not a seq dir name
    assert store.next_seq("j", "a") == 3


def test_seq_never_reused_after_abort_or_cleanup(store: Store) -> None:
    s1 = committed_unit(store, "j", "a")
    s2 = store.reserve_seq("j", "a")
    store.begin_checkpoint("j", "c2", {"a": s2})
    make_images(store.images_dir("j", "a", s2), {"x": b"partial"})
    assert store.abort_checkpoint("j", "c2") == [("a", s2)]
    assert not store.images_dir("j", "a", s2).exists()
    s3 = store.reserve_seq("j", "a")
    assert s3 == s2 + 1, "an aborted seq is not handed out again"
    assert store.remove_partial("j") == [("a", s3)]
    assert store.reserve_seq("j", "a") == s3 + 1
    assert store.unit_checkpoints("j", "a") == [s1]


def test_seq_never_reused_with_next_seq_and_begin(store: Store) -> None:
    """The coordinator's way: next_seq, begin, agents write images, abort; then gc of the newest."""
    seq = store.next_seq("j", "a")
    store.begin_checkpoint("j", "c1", {"a": seq})
    assert store.next_seq("j", "a") == seq + 1, "a pending marker holds its seq"
    make_images(store.images_dir("j", "a", seq), {"x": b"1"})
    [marker] = store.pending_checkpoints("j")
    assert store.abort_checkpoint("j", marker) == [("a", seq)], "a marker dict is accepted too"
    assert store.next_seq("j", "a") == seq + 1
    s2 = committed_unit(store, "j", "a")
    assert s2 == seq + 1
    store.delete_images("j", "a", s2)
    assert store.next_seq("j", "a") == s2 + 1, "deleting the newest images does not free its seq"


def test_next_seq_counts_pending_markers(store: Store) -> None:
    store.begin_checkpoint("j", "c1", {"a": 5})
    assert store.next_seq("j", "a") == 6
    assert store.next_seq("j", "b") == 1


def test_reserve_seq_concurrent(store: Store) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            s = store.reserve_seq("j", "a")
            with lock:
                got.append(s)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 41))


# -- two-phase commit ----------------------------------------------------------


def test_pending_commit_lifecycle(store: Store) -> None:
    units = {"a": store.reserve_seq("j", "a"), "b": store.reserve_seq("j", "b")}
    marker = store.begin_checkpoint("j", "c1", units, {"protocol": "coordinated"})
    assert marker["units"] == units and marker["state"] == "pending"
    assert store.begin_checkpoint("j", "c1", units)["time"] == marker["time"], "idempotent"
    assert [p["id"] for p in store.pending_checkpoints("j")] == ["c1"]
    assert store.list_checkpoints("j") == [], "pending checkpoints are never listed"
    with pytest.raises(CheckpointNotFound, match="pending, not committed"):
        store.load_checkpoint("j", "c1")
    for unit, seq in units.items():
        make_images(store.images_dir("j", unit, seq), {"img": unit.encode()})
    write_manifest(store.images_dir("j", "a", units["a"]), {})
    with pytest.raises(StoreError, match=r"b/1/manifest.json: missing; cannot commit"):
        store.commit_checkpoint("j", "c1", units)
    assert store.list_checkpoints("j") == []
    write_manifest(store.images_dir("j", "b", units["b"]), {})
    rec = store.commit_checkpoint("j", "c1", units, {"total_ms": 12.5, "stages_ms": {"stop": 1.0}})
    assert rec["units"] == units and rec["state"] == "committed" and rec["total_ms"] == 12.5
    assert store.pending_checkpoints("j") == []
    assert not (store.checkpoints_dir("j") / "c1.pending.json").exists()
    assert store.load_checkpoint("j", "c1") == rec
    assert store.list_checkpoints("j") == [rec]
    assert store.commit_checkpoint("j", "c1", units) == rec, "redelivered commit is harmless"
    with pytest.raises(StoreError, match="other units"):
        store.commit_checkpoint("j", "c1", {"a": 1})
    with pytest.raises(StoreError, match="already committed"):
        store.begin_checkpoint("j", "c1", units)
    assert no_tmp_files(store.root) == []


def test_abort_deletes_partial_images_and_marker(store: Store) -> None:
    keep = committed_unit(store, "j", "a")
    store.commit_checkpoint("j", "c1", {"a": keep})
    units = {"a": store.reserve_seq("j", "a"), "b": store.reserve_seq("j", "b")}
    store.begin_checkpoint("j", "c2", units)
    make_images(store.images_dir("j", "a", units["a"]), {"x": b"1"})
    write_manifest(store.images_dir("j", "a", units["a"]), {})  # a finished, b did not
    make_images(store.images_dir("j", "b", units["b"]), {"x": b"half"})
    removed = store.abort_checkpoint("j", "c2")
    assert sorted(removed) == [("a", units["a"]), ("b", units["b"])]
    assert store.pending_checkpoints("j") == []
    assert [c["id"] for c in store.list_checkpoints("j")] == ["c1"]
    verify_manifest(store.images_dir("j", "a", keep))
    assert store.abort_checkpoint("j", "c2") == [], "abort is idempotent"
    assert store.abort_checkpoint("j", "never-begun") == []


def test_crash_between_commit_and_marker_removal(store: Store) -> None:
    """Both <id>.json and <id>.pending.json exist: the checkpoint is committed, its images stay."""
    seq = committed_unit(store, "j", "a")
    store.begin_checkpoint("j", "c1", {"a": seq})
    marker = (store.checkpoints_dir("j") / "c1.pending.json").read_text()
    store.commit_checkpoint("j", "c1", {"a": seq})
    (store.checkpoints_dir("j") / "c1.pending.json").write_text(marker)  # as if we crashed
    assert store.abort_checkpoint("j", "c1") == []
    verify_manifest(store.images_dir("j", "a", seq))
    (store.checkpoints_dir("j") / "c1.pending.json").write_text(marker)
    assert store.pending_checkpoints("j") == []
    assert not (store.checkpoints_dir("j") / "c1.pending.json").exists()
    assert [c["id"] for c in store.list_checkpoints("j")] == ["c1"]


@pytest.mark.parametrize("left", ["torn", "lost"])
def test_a_marker_not_fsynced_that_a_host_crash_tore_or_lost(store: Store, left: str) -> None:
    """The coordinator writes its pending marker without fsync: after a crash of the host the
    marker may be empty (torn) or gone, while an agent's partial images survived (on another
    host).  Recovery drops the torn marker and sweeps the images no record names; the
    committed checkpoint is untouched and the seqs are not handed out again."""
    keep = committed_unit(store, "j", "a")
    store.commit_checkpoint("j", "c1", {"a": keep})
    units = {"a": store.reserve_seq("j", "a")}
    store.begin_checkpoint("j", "c2", units, durable=False)
    make_images(store.images_dir("j", "a", units["a"]), {"pages-1.img": b"half"})
    marker = store.checkpoints_dir("j") / "c2.pending.json"
    if left == "torn":
        marker.write_bytes(b"")
    else:
        marker.unlink()
    fresh = Store(store.root)   # the orchestrator started again
    assert fresh.pending_checkpoints("j") == []
    assert not marker.exists()
    assert fresh.remove_partial("j") == [("a", units["a"])]
    assert [c["id"] for c in fresh.list_checkpoints("j")] == ["c1"]
    verify_manifest(fresh.images_dir("j", "a", keep))
    assert fresh.next_seq("j", "a") > units["a"]


def test_list_checkpoints_sorted_by_time_and_skips_junk(store: Store) -> None:
    seq = committed_unit(store, "j", "a")
    store.commit_checkpoint("j", "late", {"a": seq}, {"time": 200.0})
    store.commit_checkpoint("j", "early", {"a": seq}, {"time": 100.0})
    (store.checkpoints_dir("j") / "broken.json").write_text("{")
    (store.checkpoints_dir("j") / ".tmp-x.json.123").write_text("{}")
    assert [c["id"] for c in store.list_checkpoints("j")] == ["early", "late"]
    assert store.list_checkpoints("other") == []
    with pytest.raises(CheckpointNotFound, match="no checkpoint 'zz'"):
        store.load_checkpoint("j", "zz")


def test_delete_images_refuses_committed_then_allows(store: Store) -> None:
    seq = committed_unit(store, "j", "a")
    store.commit_checkpoint("j", "c1", {"a": seq})
    with pytest.raises(StoreError, match="still used by committed checkpoint"):
        store.delete_images("j", "a", seq)
    assert store.delete_checkpoint("j", "c1")
    assert store.delete_images("j", "a", seq)
    assert not store.images_dir("j", "a", seq).exists()
    assert store.delete_images("j", "a", seq) is False
    assert store.delete_checkpoint("j", "c1") is False


def test_remove_partial_never_touches_committed(store: Store) -> None:
    done = committed_unit(store, "j", "a")  # independent-style: manifest, no record
    coord = committed_unit(store, "j", "b")
    store.commit_checkpoint("j", "c1", {"b": coord})
    (store.images_dir("j", "b", coord) / MANIFEST).unlink()  # corrupted, but named by c1: keep
    partial = store.reserve_seq("j", "a")
    make_images(store.images_dir("j", "a", partial), {"x": b"half"})
    pend = store.reserve_seq("j", "b")
    store.begin_checkpoint("j", "c2", {"b": pend})  # pending: left for abort_checkpoint
    assert store.remove_partial("j") == [("a", partial)]
    assert store.images_dir("j", "a", done).is_dir() and store.images_dir("j", "b", coord).is_dir()
    assert store.images_dir("j", "b", pend).is_dir()
    assert store.unit_checkpoints("j", "a") == [done]


def test_remove_partial_min_age_spares_fresh_dirs(store: Store) -> None:
    fresh = store.reserve_seq("j", "a")
    old = store.reserve_seq("j", "a")
    os.utime(store.images_dir("j", "a", old), (1, 1))
    assert store.remove_partial("j", min_age=60) == [("a", old)]
    assert store.images_dir("j", "a", fresh).is_dir()


def test_manifest_without_syncfs_falls_back_to_fsync(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "img"
    make_images(d, IMAGES)
    monkeypatch.setattr(store_mod, "_syncfs", lambda path: False)
    synced = []
    real = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    write_manifest(d, {})
    # one fsync per image file, one per directory holding them, plus the manifest and its dir
    assert len(synced) >= len(IMAGES) + 2
    verify_manifest(d)


def test_committed_checkpoint_by_exact_id_is_what_the_listing_says(store: Store) -> None:
    seq = committed_unit(store, "j", "a")
    store.commit_checkpoint("j", "c1", {"a": seq}, {"time": 100.0})
    store.begin_checkpoint("j", "c2", {"a": store.reserve_seq("j", "a")})
    (store.checkpoints_dir("j") / "broken.json").write_text("{")
    (store.checkpoints_dir("j") / "nounits.json").write_text('{"units": 3}')
    assert store.committed_checkpoint("j", "c1") == store.list_checkpoints("j")[0]
    for missing in ("c", "c2", "broken", "nounits", "zz", "../j", ".hidden", "c2.pending"):
        assert store.committed_checkpoint("j", missing) is None, missing


def test_checked_next_seqs_go_out_once_with_no_stat_and_only_while_no_higher_seq_is_known(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_next_seqs (after a commit) lets the next checkpoint's next_seqs hand the seqs out
    without a stat; once only, and not after this Store began a checkpoint with a higher seq."""
    orch, agent = Store(tmp_path / "s"), Store(tmp_path / "s")
    seqs = {u: committed_unit(orch, "j", u) for u in ("a", "b")}
    orch.begin_checkpoint("j", "c1", seqs)
    orch.commit_checkpoint("j", "c1", seqs)
    orch.check_next_seqs("j", ["a", "b"])
    with monkeypatch.context() as m:
        def no_io(*a: object, **k: object) -> None:
            raise AssertionError("a checked seq needs no stat")
        m.setattr(store_mod.os.path, "lexists", no_io)
        m.setattr(store_mod.os, "stat", no_io)
        assert orch.next_seqs("j", ["a", "b"]) == {u: s + 1 for u, s in seqs.items()}
    # handed out once: the next call checks again and sees what another Store made meanwhile
    make_images(agent.images_dir("j", "a", seqs["a"] + 1), {"x": b"1"})
    assert orch.next_seqs("j", ["a", "b"]) == {"a": seqs["a"] + 2, "b": seqs["b"] + 1}
    # checked, then a checkpoint begun with that seq: the check no longer stands
    orch.check_next_seqs("j", ["b"])
    orch.begin_checkpoint("j", "c2", {"b": seqs["b"] + 1})
    assert orch.next_seqs("j", ["b"]) == {"b": seqs["b"] + 2}


def test_seq_hints_never_hand_out_a_used_seq(tmp_path: Path) -> None:
    """The orchestrator's Store remembers the highest seq it knows used, to check the next one
    with a stat instead of a listing.  Seqs used or deleted through another Store on the same
    root (an agent) must still never come back."""
    orch, agent = Store(tmp_path / "s"), Store(tmp_path / "s")
    seq = committed_unit(orch, "j", "a")
    assert orch.next_seqs("j", ["a"]) == {"a": seq + 1} == orch.next_seqs("j", ["a"]), "not reserved"
    # an independent checkpoint: the agent makes the dir of the seq it was given, then aborts it
    nxt = orch.next_seq("j", "a")
    make_images(agent.images_dir("j", "a", nxt), {"x": b"1"})
    assert orch.next_seq("j", "a") == nxt + 1
    assert agent.delete_images("j", "a", nxt)
    assert orch.next_seq("j", "a") == nxt + 1, "a deleted seq is not handed out again"
    # a checkpoint begun by this Store: its seqs are taken before any dir exists
    orch.begin_checkpoint("j", "c1", {"a": nxt + 1})
    assert orch.next_seq("j", "a") == nxt + 2
    orch.abort_checkpoint("j", "c1")
    assert orch.next_seq("j", "a") == nxt + 2
    # another Store's pending checkpoint (no dir yet), then a fresh Store finds everything
    agent.begin_checkpoint("j", "c2", {"a": nxt + 2})
    assert Store(tmp_path / "s").next_seq("j", "a") == nxt + 3
