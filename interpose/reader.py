"""Decode the shim's per-process determinant logs (layout in gridckpt_shim.h).

`read_records(path, offset)` returns only complete records and the offset to resume
from.  A record's `end` may still grow while its writer runs (version 2: records are
continued in place until closed), so a tailer of a live log must close records before it
reads them: `interpose.logctl.read_final_records`.  Once the writers have exited,
`read_records`/`read_directory` give final values.
"""
from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

REC_MAGIC = 0x31544544
REC_SIZE = 96
REC_VERSION = 2  # GC_REC_VERSION; version 1 logs (records never grown) read the same way
REC_VERSIONS = (1, 2)
END_CLOSED = 1 << 63  # GC_END_CLOSED: set in `end` once the record is final; masked off here
_END_MASK = END_CLOSED - 1
KIND_SEND = 1
KIND_RECV = 2
KIND_HEADER = 16
_FMT = struct.Struct("<IBBBBIIQQQQ16s16sHHIQ")
assert _FMT.size == REC_SIZE
_READ_CHUNK = REC_SIZE * 87381  # about 8 MiB


class Record(NamedTuple):
    """One determinant: during `interval`, process `pid` moved bytes [start, end) of `conn`."""

    conn: str
    direction: str  # "send" or "recv"
    start: int
    end: int
    interval: int
    pid: int
    mono_ns: int


class LogHeader(NamedTuple):
    """The first record of a log: who wrote it."""

    unit: str
    pid: int
    ppid: int
    realtime_ns: int
    mono_ns: int


def _addr(family: int, raw: bytes, port: int) -> str:
    if family == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[:4])}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{port}"


def conn_id(family: int, src: bytes, src_port: int, dst: bytes, dst_port: int, gen: int) -> str:
    """The exchange-format id of one direction of a TCP connection."""
    return f"{_addr(family, src, src_port)}>{_addr(family, dst, dst_port)}#{gen}"


def _complete_prefix(data: bytes, skip_holes: bool) -> tuple[int, list[int]]:
    """(number of records usable from data, indices of holes to skip)."""
    firsts = data[0::REC_SIZE][: len(data) // REC_SIZE]
    used = len(firsts.rstrip(b"\x00"))  # trailing zero records: not written yet
    hole = firsts.find(b"\x00", 0, used)
    if hole < 0:
        return used, []
    if not skip_holes:
        return hole, []
    holes = [i for i in range(hole, used) if firsts[i] == 0]
    return used, holes


def decode(data: bytes, skip_holes: bool = False) -> tuple[list[Record], int, LogHeader | None]:
    """Decode a run of whole records: (records, bytes consumed, header if present)."""
    count, holes = _complete_prefix(data, skip_holes)
    records: list[Record] = []
    header: LogHeader | None = None
    names: dict[tuple, str] = {}
    append = records.append
    view = memoryview(data)[: count * REC_SIZE]
    hole_set = set(holes)
    for i, (magic, ver, kind, fam, _fl, pid, gen, start, end, interval, mono, src, dst, sport, dport, _tid,
            _key) in enumerate(_FMT.iter_unpack(view)):
        if magic != REC_MAGIC:
            if i in hole_set:
                continue
            raise ValueError(f"corrupt determinant record at byte {i * REC_SIZE}")
        if ver not in REC_VERSIONS:
            raise ValueError(f"determinant record of unknown version {ver} at byte {i * REC_SIZE}")
        if kind == KIND_SEND or kind == KIND_RECV:
            key = (fam, src, sport, dst, dport, gen)
            name = names.get(key)
            if name is None:
                name = names[key] = conn_id(*key)
            append(Record(name, "send" if kind == KIND_SEND else "recv", start, end & _END_MASK, interval, pid,
                          mono))
        elif kind == KIND_HEADER:
            unit = (src + dst).split(b"\x00", 1)[0].decode("utf-8", "replace")
            header = LogHeader(unit, pid, gen, start, mono)
    return records, count * REC_SIZE, header


def read_records(path: os.PathLike | str, offset: int = 0, skip_holes: bool = False,
                 max_records: int | None = None) -> tuple[list[Record], int]:
    """Complete records of one log from byte `offset` on, and the offset to resume from.

    A record still being written (and everything after it) is left for the next call,
    unless `skip_holes` (use it only once the writing process has exited: a process
    killed while writing one record leaves a zero hole).  `max_records` bounds how many
    records are read from `offset` on (the header counts as one).  The ends of records whose writer
    still runs may grow later: see `interpose.logctl.read_final_records`.
    """
    if offset % REC_SIZE:
        raise ValueError(f"offset {offset} is not a multiple of the record size {REC_SIZE}")
    records: list[Record] = []
    left = None if max_records is None else max_records * REC_SIZE
    with open(path, "rb") as f:
        f.seek(offset)
        while left is None or left > 0:
            want = _READ_CHUNK if left is None else min(_READ_CHUNK, left)
            data = f.read(want)
            if not data:
                break
            recs, used, _ = decode(data, skip_holes)
            records.extend(recs)
            offset += used
            if left is not None:
                left -= used
            if used < len(data) - len(data) % REC_SIZE or len(data) < want:
                break
            f.seek(offset)
    return records, offset


def read_header(path: os.PathLike | str) -> LogHeader | None:
    """The header of a log (None if not written yet)."""
    with open(path, "rb") as f:
        data = f.read(REC_SIZE)
    return decode(data)[2] if len(data) == REC_SIZE else None


def log_files(directory: os.PathLike | str) -> list[Path]:
    """The determinant logs in a unit's shim directory, oldest first."""
    def order(p: Path) -> tuple[int, int]:
        parts = p.name.split(".")
        try:
            return int(parts[2]), int(parts[1])
        except (IndexError, ValueError):
            return 0, 0
    return sorted(Path(directory).glob("det.*.log"), key=order)


def read_directory(directory: os.PathLike | str, skip_holes: bool = True) -> list[Record]:
    """All records of all logs in a directory (the writers should have exited)."""
    out: list[Record] = []
    for p in log_files(directory):
        out.extend(read_records(p, 0, skip_holes=skip_holes)[0])
    return out


def merge_ranges(records: Iterable[Record]) -> dict[tuple[str, str, int], list[tuple[int, int]]]:
    """Byte ranges per (conn, direction, interval), sorted, adjacent/overlapping ones merged."""
    groups: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
    for r in records:
        groups.setdefault((r.conn, r.direction, r.interval), []).append((r.start, r.end))
    for key, ranges in groups.items():
        ranges.sort()
        merged = [ranges[0]]
        for s, e in ranges[1:]:
            ls, le = merged[-1]
            if s <= le:
                if e > le:
                    merged[-1] = (ls, e)
            else:
                merged.append((s, e))
        groups[key] = merged
    return groups


def to_exchange(records: Iterable[Record], unit: str) -> Iterator[dict]:
    """Exchange-format send/recv lines of one unit's records, adjacent ranges merged."""
    groups = merge_ranges(records)
    for (conn, direction, interval) in sorted(groups):
        for start, end in groups[(conn, direction, interval)]:
            yield {"kind": direction, "unit": unit, "conn": conn, "start": start, "end": end,
                   "interval": interval}
