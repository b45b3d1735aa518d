"""In-memory model of a determinant log, as the recovery line needs it.

Not every record is kept: per unit its newest checkpoint seq, and per stream (one
direction of one connection) the sender, the receiver and, for each side, the
running maximum of the stream offset reached by the end of each interval that has
records ("prefix sums of bytes by interval").

Positions. A unit's *position* on a line is a checkpoint seq ``k`` (it remembers
its intervals ``< k``) or ``newest + 1`` for ``"current"`` (it remembers all of its
intervals). ``sent_at``/``rcvd_at`` give the stream offset remembered at a position:
the largest ``end`` of the sender's/receiver's records in intervals ``< position``.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterable

SEND = 0
RECV = 1
DIRECTIONS = ("send", "recv")


def offset_at(intervals: list[int], cumulative: list[int], position: int) -> int:
    """Stream offset remembered at ``position`` (records of intervals < position)."""
    i = bisect_left(intervals, position)
    return cumulative[i - 1] if i else 0


def running_max(per_interval: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Sorted intervals and the running maximum of their ends, from (interval, end) pairs."""
    best: dict[int, int] = {}
    for interval, end in per_interval:
        if end > best.get(interval, -1):
            best[interval] = end
    intervals = sorted(best)
    cumulative = []
    top = 0
    for interval in intervals:
        end = best[interval]
        if end > top:
            top = end
        cumulative.append(top)
    return intervals, cumulative


@dataclass(slots=True)
class Stream:
    """One direction of one byte stream: who writes it, who reads it, offsets by interval."""

    conn: str
    sender: str | None = None
    receiver: str | None = None
    send_iv: list[int] = field(default_factory=list)
    send_cum: list[int] = field(default_factory=list)
    recv_iv: list[int] = field(default_factory=list)
    recv_cum: list[int] = field(default_factory=list)

    def sent_at(self, position: int) -> int:
        """Stream offset the sender remembers writing at ``position``."""
        return offset_at(self.send_iv, self.send_cum, position)

    def rcvd_at(self, position: int) -> int:
        """Stream offset the receiver remembers reading at ``position``."""
        return offset_at(self.recv_iv, self.recv_cum, position)

    @property
    def max_sent(self) -> int:
        return self.send_cum[-1] if self.send_cum else 0

    @property
    def max_rcvd(self) -> int:
        return self.recv_cum[-1] if self.recv_cum else 0


@dataclass
class Model:
    """Units (name -> newest checkpoint seq, in declaration order), failed units, streams.

    ``floors`` holds, per unit, the oldest checkpoint still kept after garbage
    collection (0 when nothing was collected). ``warnings`` collects oddities of a
    live log that do not stop a computation (e.g. two units writing one conn).
    """

    units: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    streams: dict[str, Stream] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add_unit(self, unit: str) -> None:
        self.units.setdefault(unit, 0)

    def stream(self, conn: str) -> Stream:
        s = self.streams.get(conn)
        if s is None:
            s = self.streams[conn] = Stream(conn)
        return s

    def set_side(self, conn: str, direction: int, unit: str,
                 intervals: list[int], cumulative: list[int]) -> None:
        """Attach one side of a stream (``SEND`` or ``RECV``) with its offsets by interval."""
        s = self.stream(conn)
        if direction == SEND:
            if s.sender is not None and s.sender != unit:
                self.warnings.append(f"conn {conn!r} written by both {s.sender!r} and {unit!r}; "
                                     f"keeping {s.sender!r}")
                return
            s.sender, s.send_iv, s.send_cum = unit, intervals, cumulative
        else:
            if s.receiver is not None and s.receiver != unit:
                self.warnings.append(f"conn {conn!r} read by both {s.receiver!r} and {unit!r}; "
                                     f"keeping {s.receiver!r}")
                return
            s.receiver, s.recv_iv, s.recv_cum = unit, intervals, cumulative

    def failed_or_all(self, failed: Iterable[str] | None = None) -> set[str]:
        """The failed set to use: ``failed`` if given, else the marked ones, else every unit."""
        chosen = set(self.failed if failed is None else failed)
        return chosen if chosen else set(self.units)
