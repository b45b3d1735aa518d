"""The determinant log exchange format (JSON Lines, DESIGN.md section 3): parse and write.

Rules enforced by :func:`parse` (each violation raises :class:`ExchangeError` naming
the 1-based line number):

- every non-blank line is a JSON object with a known ``kind``
  (``unit``, ``checkpoint``, ``send``, ``recv``, ``failed``) and its fields with the
  right types; unknown extra fields are ignored (room for additions);
- a unit must be declared by its ``{"kind": "unit"}`` line *before* any other record
  of that unit (no implicit units: a missing declaration is reported, it usually means
  a truncated or mis-concatenated file); declaring a unit twice is an error;
- checkpoint seqs of a unit are 1, 2, 3, ... in file order;
- ``send``/``recv``: ``start`` and ``interval`` are non-negative integers, ``end > start``;
  ``interval`` is at most the unit's newest checkpoint seq (checked at the end);
- one conn has one writer and one reader unit;
- on one conn in one direction, ranges do not overlap and later bytes never belong to
  an earlier interval (a byte stream is written and read in order);
- a ``recv`` ends at most where the conn's writer stopped writing (checked after the
  whole file: a recv of bytes nobody sent);
- ``failed`` names a declared unit (repeating it is harmless).

Offsets are stream positions: what a unit remembers of a stream at a position is the
largest ``end`` of its records of earlier intervals; gaps between ranges are allowed.

For errors found only after reading the whole file, the earliest offending line is
reported.
"""

from __future__ import annotations

import json
from typing import IO, Iterable, Iterator

from .model import RECV, SEND, Model

KINDS = ("unit", "checkpoint", "send", "recv", "failed")
DIR_NAMES = ("send", "recv")
DIR_VERBS = ("write", "read")


class ExchangeError(ValueError):
    """Bad exchange-format input; ``line`` is the 1-based line number."""

    def __init__(self, line: int, message: str):
        super().__init__(f"{line}: {message}")
        self.line = line
        self.message = message


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field_error(rec: dict, name: str, what: str) -> str:
    if name not in rec:
        return f"missing field {name!r}"
    return f"field {name!r} must be {what}, got {_short(rec[name])}"


def _uint(rec: dict, name: str, lineno: int) -> int:
    value = rec.get(name)
    if type(value) is not int or value < 0:
        raise ExchangeError(lineno, _field_error(rec, name, "a non-negative integer"))
    return value


def _name(rec: dict, name: str, lineno: int) -> str:
    value = rec.get(name)
    if type(value) is not str or not value:
        raise ExchangeError(lineno, _field_error(rec, name, "a non-empty string"))
    return value


def parse(lines: Iterable[str]) -> Model:
    """Parse exchange-format lines into a :class:`Model`; raises :class:`ExchangeError`."""
    loads = json.loads
    model = Model()
    declared: dict[str, int] = {}           # unit -> line of its declaration
    newest: dict[str, int] = {}             # unit -> newest checkpoint seq
    owners: dict[tuple[str, int], tuple[str, int]] = {}   # (conn, dir) -> (unit, line)
    ranges: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {}
    failed: list[str] = []

    lineno = 0
    for lineno, text in enumerate(lines, 1):
        if not text or text.isspace():
            continue
        try:
            rec = loads(text)
        except ValueError as exc:
            msg = getattr(exc, "msg", None) or str(exc)
            raise ExchangeError(lineno, f"malformed JSON: {msg}") from None
        if type(rec) is not dict:
            raise ExchangeError(lineno, f"expected a JSON object, got {_short(rec)}")
        kind = rec.get("kind")
        if kind == "send" or kind == "recv":
            unit = rec.get("unit")
            if type(unit) is not str or unit not in declared:
                unit = _name(rec, "unit", lineno)
                raise ExchangeError(lineno, f"unit {unit!r} has no unit line before this record")
            conn = rec.get("conn")
            if type(conn) is not str or not conn:
                raise ExchangeError(lineno, _field_error(rec, "conn", "a non-empty string"))
            start = rec.get("start")
            end = rec.get("end")
            interval = rec.get("interval")
            if type(start) is not int or start < 0:
                raise ExchangeError(lineno, _field_error(rec, "start", "a non-negative integer"))
            if type(end) is not int or end < 0:
                raise ExchangeError(lineno, _field_error(rec, "end", "a non-negative integer"))
            if type(interval) is not int or interval < 0:
                raise ExchangeError(lineno, _field_error(rec, "interval", "a non-negative integer"))
            if end <= start:
                raise ExchangeError(lineno, f"empty or negative range [{start}, {end})")
            direction = SEND if kind == "send" else RECV
            key = (conn, direction)
            owner = owners.get(key)
            if owner is None:
                owners[key] = (unit, lineno)
                ranges[key] = [(start, end, interval, lineno)]
            else:
                if owner[0] != unit:
                    verb = "written" if direction == SEND else "read"
                    raise ExchangeError(lineno, f"conn {conn!r} is already {verb} by unit "
                                                f"{owner[0]!r} (line {owner[1]}); one conn has one "
                                                f"writer and one reader")
                ranges[key].append((start, end, interval, lineno))
        elif kind == "checkpoint":
            unit = _name(rec, "unit", lineno)
            if unit not in declared:
                raise ExchangeError(lineno, f"unit {unit!r} has no unit line before this record")
            seq = rec.get("seq")
            if type(seq) is not int:
                raise ExchangeError(lineno, _field_error(rec, "seq", "an integer"))
            expected = newest[unit] + 1
            if seq != expected:
                raise ExchangeError(lineno, f"checkpoint seq {seq} of unit {unit!r}, expected "
                                            f"{expected} (seqs go 1, 2, 3, ...)")
            newest[unit] = seq
        elif kind == "unit":
            unit = _name(rec, "unit", lineno)
            if unit in declared:
                raise ExchangeError(lineno, f"unit {unit!r} declared twice (first on line "
                                            f"{declared[unit]})")
            declared[unit] = lineno
            newest[unit] = 0
        elif kind == "failed":
            unit = _name(rec, "unit", lineno)
            if unit not in declared:
                raise ExchangeError(lineno, f"unit {unit!r} has no unit line before this record")
            failed.append(unit)
        elif "kind" not in rec:
            raise ExchangeError(lineno, "missing field 'kind'")
        else:
            raise ExchangeError(lineno, f"unknown kind {_short(kind)} (expected one of "
                                        f"{', '.join(KINDS)})")

    for unit in declared:
        model.units[unit] = newest[unit]
    model.failed = set(failed)
    errors: list[tuple[int, str]] = []
    for (conn, direction), recs in ranges.items():
        unit = owners[(conn, direction)][0]
        err = _check_and_fill(model, conn, direction, unit, recs, newest[unit])
        if err:
            errors.append(err)
    for (conn, direction), recs in ranges.items():
        if direction != RECV:
            continue
        stream = model.streams[conn]
        limit = stream.max_sent if stream.sender is not None else 0
        if stream.max_rcvd <= limit:
            continue
        bad = min(r[3] for r in recs if r[1] > limit)
        if stream.sender is None:
            errors.append((bad, f"recv of bytes nobody sent: no unit writes conn {conn!r}"))
        else:
            rec = next(r for r in recs if r[3] == bad)
            errors.append((bad, f"recv of bytes nobody sent: [{rec[0]}, {rec[1]}) on conn "
                                f"{conn!r}, but {stream.sender!r} wrote only up to {limit}"))
    if errors:
        raise ExchangeError(*min(errors))
    return model


def _check_and_fill(model: Model, conn: str, direction: int, unit: str,
                    recs: list[tuple[int, int, int, int]], newest: int) -> tuple[int, str] | None:
    """Validate one side of a stream and attach its offsets by interval to the model."""
    errors: list[tuple[int, str]] = []
    top_end = -1
    top_iv = -1
    in_order = True
    for start, end, interval, lineno in recs:
        if interval > newest:
            errors.append((lineno, f"interval {interval} but unit {unit!r} has checkpoints only "
                                   f"up to {newest}"))
        if start < top_end or interval < top_iv:
            in_order = False
        if end > top_end:
            top_end = end
        if interval > top_iv:
            top_iv = interval
    if not in_order:
        verb = DIR_VERBS[direction]
        ordered = sorted(recs)
        top_end, top_iv = -1, -1
        end_line = iv_line = 0
        for start, end, interval, lineno in ordered:
            if start < top_end:
                errors.append((max(lineno, end_line), f"overlapping ranges on conn {conn!r} "
                               f"({DIR_NAMES[direction]}): [{start}, {end}) overlaps bytes up to "
                               f"{top_end} (line {min(lineno, end_line)})"))
            elif interval < top_iv:
                errors.append((max(lineno, iv_line), f"out of order on conn {conn!r}: unit "
                               f"{unit!r} {verb}s bytes [{start}, {end}) in interval {interval} "
                               f"after earlier bytes in interval {top_iv} (line "
                               f"{min(lineno, iv_line)})"))
            if end > top_end:
                top_end, end_line = end, lineno
            if interval > top_iv:
                top_iv, iv_line = interval, lineno
    if errors:
        return min(errors)
    best: dict[int, int] = {}
    for _start, end, interval, _lineno in recs:
        if end > best.get(interval, -1):
            best[interval] = end
    intervals = sorted(best)
    cumulative = []
    top = 0
    for iv in intervals:
        if best[iv] > top:
            top = best[iv]
        cumulative.append(top)
    model.set_side(conn, direction, unit, intervals, cumulative)
    return None


def read(path: str) -> Model:
    """Parse an exchange-format file; raises :class:`ExchangeError` or ``OSError``."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f)


# ----------------------------------------------------------------------------- writing

def unit_record(unit: str) -> dict:
    return {"kind": "unit", "unit": unit}


def checkpoint_record(unit: str, seq: int) -> dict:
    return {"kind": "checkpoint", "unit": unit, "seq": seq}


def range_record(kind: str, unit: str, conn: str, start: int, end: int, interval: int) -> dict:
    return {"kind": kind, "unit": unit, "conn": conn, "start": start, "end": end,
            "interval": interval}


def failed_record(unit: str) -> dict:
    return {"kind": "failed", "unit": unit}


def dump_lines(records: Iterable[dict]) -> Iterator[str]:
    """One compact JSON line (with newline) per record."""
    dumps = json.JSONEncoder(separators=(", ", ": "), ensure_ascii=False).encode
    for rec in records:
        yield dumps(rec) + "\n"


def write(out: str | IO[str], records: Iterable[dict]) -> int:
    """Write records as exchange-format lines to a path or an open text file; returns the count."""
    if isinstance(out, str):
        with open(out, "w", encoding="utf-8", errors="surrogateescape") as f:
            return write(f, records)
    n = 0
    for line in dump_lines(records):
        out.write(line)
        n += 1
    return n
