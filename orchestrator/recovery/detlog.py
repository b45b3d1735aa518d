"""A job's determinant log in the store: append-only files built for fast ingest and load.

Layout of ``<store>/jobs/<job>/determinants/``::

    conns.jsonl    the conn-name table: one JSON string per line, id = line index (0-based)
    events.jsonl   unit, checkpoint, failed, rollback, gc and unordered events, one JSON
                   object a line
    u<N>.bin       the records of the N-th declared unit: fixed-size little-endian 24-byte
                   records (key, start, end), key = conn_id << 32 | direction << 31 | interval
                   (direction 0 = send, 1 = recv)

Appends write whole records with one ``write`` and fsync; a torn tail (after a crash) is
ignored on load, as is a torn last line of the JSON files. The conn table is written
before any record that names a new conn.

Fast load: a unit's records of one stream normally arrive in stream order, so the
last record of each (stream, interval) holds its largest end and one C-speed
``dict(zip(keys, ends))`` per file yields the per-interval offsets. When an append
breaks that order (a late record), the unit is marked ``unordered`` and its file is
loaded on an exact (slower) path instead. One writer per directory (the orchestrator);
the methods are thread-safe within that process.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from array import array
from typing import Iterable

from . import exchange
from .line import build_graph, graph_positions
from .model import Model, running_max

RECORD = struct.Struct("<QQQ")
RECORD_SIZE = RECORD.size
INTERVAL_MASK = (1 << 31) - 1
MAX_OFFSET = (1 << 64) - 1
KIND_DIR = {"send": 0, "recv": 1}


def record_key(conn_id: int, direction: int, interval: int) -> int:
    return (conn_id << 32) | (direction << 31) | interval


def _words(data: bytes) -> memoryview:
    """The complete records of a file as a flat uint64 view (a torn tail is dropped)."""
    whole = len(data) - len(data) % RECORD_SIZE
    if sys.byteorder != "little":
        a = array("Q")
        a.frombytes(data[:whole])
        a.byteswap()
        return memoryview(a)
    return memoryview(data)[:whole].cast("Q")


def _pack(words: list[int] | array) -> bytes:
    a = words if isinstance(words, array) else array("Q", words)
    if sys.byteorder != "little":
        a = array("Q", a)
        a.byteswap()
    return a.tobytes()


def _repair_json_file(path: str) -> None:
    """Cut a torn last line (no newline: the write never completed) so appends stay aligned."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def _read_json_lines(path: str) -> list:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == last:           # torn last line: the write never completed
                break
            raise ValueError(f"{path}:{i + 1}: corrupt determinant log line") from None
    return out


class DeterminantLog:
    """The determinant log of one job, stored in ``directory``."""

    def __init__(self, directory: str, durable: bool = True):
        """Open (creating if needed) the log in ``directory``; ``durable=False`` skips fsync."""
        self.dir = directory
        self.durable = durable
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.RLock()
        _repair_json_file(self._path("conns.jsonl"))
        _repair_json_file(self._path("events.jsonl"))
        self._conn_names: list[str] = [n for n in _read_json_lines(self._path("conns.jsonl"))]
        self._conn_ids = {name: i for i, name in enumerate(self._conn_names)}
        self._index: dict[str, int] = {}
        self._newest: dict[str, int] = {}
        self._failed: set[str] = set()
        self._floors: dict[str, int] = {}
        self._unordered: set[str] = set()
        self._tails: dict[str, dict[int, tuple[int, int]]] = {}
        self._trimmed: set[str] = set()
        for ev in _read_json_lines(self._path("events.jsonl")):
            self._apply(ev)

    # ------------------------------------------------------------------ helpers
    def _sync(self, f) -> None:
        f.flush()
        if self.durable:
            os.fsync(f.fileno())

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def unit_file(self, unit: str) -> str:
        return self._path(f"u{self._index[unit]}.bin")

    def _apply(self, ev: dict) -> None:
        kind, unit = ev.get("kind"), ev.get("unit")
        if kind == "unit":
            if unit not in self._index:
                self._index[unit] = len(self._index)
                self._newest[unit] = 0
        elif kind == "checkpoint":
            self._newest[unit] = max(self._newest[unit], ev["seq"])
        elif kind == "failed":
            self._failed.add(unit)
        elif kind == "rollback":
            self._newest[unit] = ev["seq"]
            self._failed.discard(unit)
            self._floors[unit] = min(self._floors.get(unit, 0), ev["seq"])
        elif kind == "gc":
            self._floors[unit] = max(self._floors.get(unit, 0), ev["min_seq"])
        elif kind == "unordered":
            self._unordered.add(unit)

    def _event(self, ev: dict) -> None:
        line = json.dumps(ev, ensure_ascii=False) + "\n"
        with open(self._path("events.jsonl"), "a", encoding="utf-8",
                  errors="surrogateescape") as f:
            f.write(line)
            self._sync(f)
        self._apply(ev)

    def _conn_id(self, conn: str, fresh: list[str]) -> int:
        cid = self._conn_ids.get(conn)
        if cid is None:
            cid = self._conn_ids[conn] = len(self._conn_names)
            self._conn_names.append(conn)
            fresh.append(conn)
        return cid

    def _tail(self, unit: str) -> dict[int, tuple[int, int]]:
        """Per stream (conn_id << 1 | direction): (largest end, largest interval) so far."""
        tails = self._tails.get(unit)
        if tails is None:
            tails = self._tails[unit] = {}
            try:
                with open(self.unit_file(unit), "rb") as f:
                    words = _words(f.read())
            except FileNotFoundError:
                words = memoryview(b"").cast("Q")
            for key, end in zip(words[0::3], words[2::3]):
                sk, iv = key >> 31, key & INTERVAL_MASK
                old = tails.get(sk)
                if old is None:
                    tails[sk] = (end, iv)
                else:
                    tails[sk] = (max(old[0], end), max(old[1], iv))
        return tails

    # ------------------------------------------------------------------ writing
    def add_unit(self, unit: str) -> None:
        """Declare a unit (idempotent)."""
        if not isinstance(unit, str) or not unit:
            raise ValueError(f"unit name must be a non-empty string, got {unit!r}")
        with self._lock:
            if unit not in self._index:
                self._event({"kind": "unit", "unit": unit})

    def add_checkpoint(self, unit: str, seq: int) -> None:
        """Record the unit's committed checkpoint ``seq`` (a repeated seq is ignored)."""
        with self._lock:
            self.add_unit(unit)
            newest = self._newest[unit]
            if type(seq) is not int or seq <= 0:
                raise ValueError(f"checkpoint seq must be a positive integer, got {seq!r}")
            if seq <= newest:
                return
            if seq != newest + 1:
                raise ValueError(f"checkpoint seq {seq} of unit {unit!r}, expected {newest + 1}")
            self._event({"kind": "checkpoint", "unit": unit, "seq": seq})

    def mark_failed(self, unit: str) -> None:
        """Record that the unit lost its volatile state."""
        with self._lock:
            self.add_unit(unit)
            if unit not in self._failed:
                self._event({"kind": "failed", "unit": unit})

    def append(self, unit: str, records: Iterable[tuple[str, str, int, int, int]]) -> int:
        """Append (kind 'send'|'recv', conn, start, end, interval) records of ``unit``.

        Raises ``ValueError`` (nothing written) on a malformed record. Returns the count.
        """
        with self._lock:
            self.add_unit(unit)
            fresh: list[str] = []
            words = array("Q")
            conn_id = self._conn_id
            for rec in records:
                try:
                    kind, conn, start, end, interval = rec
                except (TypeError, ValueError):
                    raise ValueError(f"record must be (kind, conn, start, end, interval), "
                                     f"got {rec!r}") from None
                direction = KIND_DIR.get(kind)
                if direction is None:
                    raise ValueError(f"record kind must be 'send' or 'recv', got {kind!r}")
                if not isinstance(conn, str) or not conn:
                    raise ValueError(f"conn must be a non-empty string, got {conn!r}")
                if (type(start) is not int or type(end) is not int or not
                        0 <= start < end <= MAX_OFFSET):
                    raise ValueError(f"bad byte range [{start!r}, {end!r}) on conn {conn!r}")
                if type(interval) is not int or not 0 <= interval <= INTERVAL_MASK:
                    raise ValueError(f"bad interval {interval!r} on conn {conn!r}")
                words.append(record_key(conn_id(conn, fresh), direction, interval))
                words.append(start)
                words.append(end)
            if not words:
                return 0
            if fresh:
                with open(self._path("conns.jsonl"), "a", encoding="utf-8",
                          errors="surrogateescape") as f:
                    f.write("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in fresh))
                    self._sync(f)
            words = self._keep_order(unit, words)
            self._trim_torn_tail(unit)
            with open(self.unit_file(unit), "ab") as f:
                f.write(_pack(words))
                self._sync(f)
            return len(words) // 3

    def _trim_torn_tail(self, unit: str) -> None:
        """Before the first append of this process to a unit file, cut a torn record."""
        if unit in self._trimmed:
            return
        try:
            size = os.path.getsize(self.unit_file(unit))
        except FileNotFoundError:
            size = 0
        if size % RECORD_SIZE:
            os.truncate(self.unit_file(unit), size - size % RECORD_SIZE)
        self._trimmed.add(unit)

    def _keep_order(self, unit: str, words: array) -> array:
        """Check that the batch continues every stream in order; sort it if that helps,
        else mark the unit unordered (its file then loads on the exact path)."""
        if unit in self._unordered:
            return words
        tails = self._tail(unit)
        if self._continues(tails, words, commit=False):
            self._continues(tails, words, commit=True)
            return words
        triples = sorted(zip(words[0::3], words[1::3], words[2::3]),
                         key=lambda t: (t[0] >> 31, t[1]))
        ordered = array("Q", [w for t in triples for w in t])
        if self._continues(tails, ordered, commit=False):
            self._continues(tails, ordered, commit=True)
            return ordered
        self._event({"kind": "unordered", "unit": unit})
        self._tails.pop(unit, None)
        return words

    @staticmethod
    def _continues(tails: dict, words: array, commit: bool) -> bool:
        seen = tails if commit else dict(tails)
        for i in range(0, len(words), 3):
            key, start, end = words[i], words[i + 1], words[i + 2]
            sk, iv = key >> 31, key & INTERVAL_MASK
            old = seen.get(sk)
            if old is not None and (start < old[0] or iv < old[1]):
                return False
            seen[sk] = (end, iv)
        return True

    def rollback(self, unit: str, seq: int) -> None:
        """The unit restarts from checkpoint ``seq``: forget its records of intervals >= seq
        and its checkpoints > seq (the next checkpoint is seq + 1); it is no longer failed."""
        with self._lock:
            if unit not in self._index or not 0 <= seq <= self._newest[unit]:
                raise ValueError(f"unit {unit!r} has no checkpoint {seq}")
            self._rewrite(unit, lambda key: (key & INTERVAL_MASK) < seq, merge_below=None)
            self._tails.pop(unit, None)
            self._event({"kind": "rollback", "unit": unit, "seq": seq})

    # ------------------------------------------------------------------ reading
    @property
    def units(self) -> dict[str, int]:
        """Unit -> newest checkpoint seq."""
        return dict(self._newest)

    @property
    def failed(self) -> set[str]:
        return set(self._failed)

    def _read_unit(self, unit: str) -> bytes:
        try:
            with open(self.unit_file(unit), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def load(self) -> Model:
        """The in-memory model: checkpoint seqs per unit, offsets by interval per stream."""
        with self._lock:
            model = Model()
            for unit in self._index:
                model.units[unit] = self._newest[unit]
            model.failed = set(self._failed)
            model.floors = dict(self._floors)
            names = self._conn_names
            for unit in self._index:
                words = _words(self._read_unit(unit))
                if unit in self._unordered:
                    best: dict[int, int] = {}
                    for key, end in zip(words[0::3], words[2::3]):
                        if end > best.get(key, -1):
                            best[key] = end
                else:
                    best = dict(zip(words[0::3], words[2::3]))
                newest = self._newest[unit]
                sides: dict[int, list[tuple[int, int]]] = {}
                early = 0
                for key, end in best.items():
                    sk, iv = key >> 31, key & INTERVAL_MASK
                    if iv > newest:         # its checkpoint is not registered yet
                        iv = newest         # same meaning: remembered only when current
                        early += 1
                    pairs = sides.get(sk)
                    if pairs is None:
                        sides[sk] = [(iv, end)]
                    else:
                        pairs.append((iv, end))
                if early:
                    model.warnings.append(f"unit {unit!r}: records of intervals after its "
                                          f"newest checkpoint {newest} counted as current")
                for sk, pairs in sides.items():
                    intervals, cumulative = _running(pairs)
                    model.set_side(names[sk >> 1], sk & 1, unit, intervals, cumulative)
            return model

    def records(self, unit: str) -> list[tuple[str, str, int, int, int]]:
        """Every stored record of a unit, as (kind, conn, start, end, interval), in file order."""
        words = _words(self._read_unit(unit))
        names = self._conn_names
        return [("recv" if (key >> 31) & 1 else "send", names[key >> 32], start, end,
                 key & INTERVAL_MASK)
                for key, start, end in zip(words[0::3], words[1::3], words[2::3])]

    def export(self, path: str) -> int:
        """Write the log in the exchange format, adjacent ranges merged; returns the line count."""
        with self._lock:
            return exchange.write(path, self._export_records())

    def _export_records(self):
        for unit in self._index:
            yield exchange.unit_record(unit)
        for unit in self._index:
            for seq in range(1, self._newest[unit] + 1):
                yield exchange.checkpoint_record(unit, seq)
        for unit in self._index:
            words = _words(self._read_unit(unit))
            streams: dict[int, list[tuple[int, int, int]]] = {}
            for key, start, end in zip(words[0::3], words[1::3], words[2::3]):
                streams.setdefault(key >> 31, []).append((start, end, key & INTERVAL_MASK))
            for sk in sorted(streams, key=lambda s: (self._conn_names[s >> 1], s & 1)):
                ranges = streams[sk]
                if unit in self._unordered:
                    ranges.sort()
                kind = "recv" if sk & 1 else "send"
                conn = self._conn_names[sk >> 1]
                cur = None
                for start, end, iv in ranges:
                    if cur is not None and cur[2] == iv and cur[1] == start:
                        cur = (cur[0], end, iv)
                        continue
                    if cur is not None:
                        yield exchange.range_record(kind, unit, conn, cur[0], cur[1], cur[2])
                    cur = (start, end, iv)
                if cur is not None:
                    yield exchange.range_record(kind, unit, conn, cur[0], cur[1], cur[2])
        for unit in self._index:
            if unit in self._failed:
                yield exchange.failed_record(unit)

    # ------------------------------------------------------------------ garbage collection
    def safe_floors(self) -> dict[str, int]:
        """Per unit, the line computed with every unit failed: checkpoints below it are obsolete."""
        model = self.load()
        return graph_positions(build_graph(model), model.units)

    def gc(self, keep: dict[str, int] | None = None) -> dict:
        """Drop what only checkpoints older than ``keep[unit]`` needed.

        Each unit's records of intervals < m (m = its ``keep`` value, lowered to the
        all-failed line if higher: nothing a future line could use is dropped) are merged
        into one record per stream in interval m - 1, which leaves every offset at
        positions >= m unchanged. ``keep=None`` uses the all-failed line. Returns stats.
        """
        with self._lock:
            safe = self.safe_floors()
            wanted = safe if keep is None else keep
            stats = {"units": 0, "records_before": 0, "records_after": 0,
                     "bytes_freed": 0, "floors": {}}
            for unit, m in wanted.items():
                if unit not in self._index:
                    raise ValueError(f"unknown unit {unit!r}")
                m = min(int(m), safe[unit])
                if m <= self._floors.get(unit, 0):
                    continue
                before, after = self._rewrite(unit, lambda key: True, merge_below=m)
                self._tails.pop(unit, None)
                self._event({"kind": "gc", "unit": unit, "min_seq": m})
                stats["units"] += 1
                stats["records_before"] += before
                stats["records_after"] += after
                stats["bytes_freed"] += (before - after) * RECORD_SIZE
                stats["floors"][unit] = m
            return stats

    def _rewrite(self, unit: str, keep_key, merge_below: int | None) -> tuple[int, int]:
        """Rewrite a unit file atomically, keeping records whose key passes ``keep_key``;
        with ``merge_below`` = m, records of intervals < m become one per stream."""
        words = _words(self._read_unit(unit))
        before = len(words) // 3
        out = array("Q")
        merged: dict[int, list[int]] = {}
        for key, start, end in zip(words[0::3], words[1::3], words[2::3]):
            if not keep_key(key):
                continue
            if merge_below is not None and (key & INTERVAL_MASK) < merge_below:
                sk = key >> 31
                cur = merged.get(sk)
                if cur is None:
                    merged[sk] = [start, end]
                else:
                    cur[0] = min(cur[0], start)
                    cur[1] = max(cur[1], end)
                continue
            out.extend((key, start, end))
        head = array("Q")
        for sk, (start, end) in merged.items():
            head.extend(((sk << 31) | (merge_below - 1), start, end))
        data = _pack(head + out)
        tmp = self.unit_file(unit) + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            self._sync(f)
        os.replace(tmp, self.unit_file(unit))
        return before, len(data) // RECORD_SIZE


def _running(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Intervals and running max of ends; fast when pairs are already in interval order."""
    intervals = []
    cumulative = []
    top = 0
    last = -1
    for iv, end in pairs:
        if iv <= last:
            return running_max(pairs)
        last = iv
        if end > top:
            top = end
        intervals.append(iv)
        cumulative.append(top)
    return intervals, cumulative
