"""Property tests of the recovery line against brute force on random small executions.

A random execution is simulated (units checkpoint, write and read streams in causal
order), written in the exchange format, parsed, and the results of
``orchestrator.recovery`` are compared with definitions evaluated directly on the
records: all lines enumerated, the Z-cycle definition of useless checkpoints, the
"no future line goes below" property of obsolete checkpoints and of garbage collection.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.recovery import exchange, line
from orchestrator.recovery.detlog import DeterminantLog

MAX_CKPT = 3


@dataclass
class Execution:
    """A simulated run: per unit its interval, per stream its offsets; records as dicts."""

    units: list[str]
    streams: list[tuple[str, str, str]]          # (conn, writer, reader)
    interval: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    rcvd: dict[str, int] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        for u in self.units:
            self.interval[u] = 0
            self.records.append(exchange.unit_record(u))
        for conn, _w, _r in self.streams:
            self.sent[conn] = self.rcvd[conn] = 0

    def run(self, actions):
        new = []
        for op, x, size in actions:
            if op == "ckpt":
                u = self.units[x % len(self.units)]
                if self.interval[u] < MAX_CKPT:
                    self.interval[u] += 1
                    new.append(exchange.checkpoint_record(u, self.interval[u]))
                continue
            conn, writer, reader = self.streams[x % len(self.streams)]
            if op == "send":
                s = self.sent[conn]
                new.append(exchange.range_record("send", writer, conn, s, s + size,
                                                 self.interval[writer]))
                self.sent[conn] = s + size
            else:
                r = self.rcvd[conn]
                n = min(size, self.sent[conn] - r)
                if n > 0:
                    new.append(exchange.range_record("recv", reader, conn, r, r + n,
                                                     self.interval[reader]))
                    self.rcvd[conn] = r + n
        self.records.extend(new)
        return new

    @property
    def newest(self):
        return dict(self.interval)

    def ranges(self):
        return [r for r in self.records if r["kind"] in ("send", "recv")]


def offset(ranges, kind, unit, conn, position):
    return max((r["end"] for r in ranges if r["kind"] == kind and r["unit"] == unit
                and r["conn"] == conn and r["interval"] < position), default=0)


def consistent(ex: Execution, ranges, pos) -> bool:
    return all(offset(ranges, "recv", r, c, pos[r]) <= offset(ranges, "send", w, c, pos[w])
               for c, w, r in ex.streams)


def all_lines(ex: Execution, top: dict[str, int]):
    ranges = ex.ranges()
    for combo in itertools.product(*(range(top[u] + 1) for u in ex.units)):
        pos = dict(zip(ex.units, combo))
        if consistent(ex, ranges, pos):
            yield pos


def brute_line(ex: Execution, failed: set[str]) -> dict[str, int]:
    top = {u: n if u in failed else n + 1 for u, n in ex.newest.items()}
    best = {u: 0 for u in ex.units}
    for pos in all_lines(ex, top):
        best = {u: max(best[u], pos[u]) for u in ex.units}
    assert consistent(ex, ex.ranges(), best), "consistent lines must be closed under max"
    return best


def brute_replay(ex: Execution, pos):
    ranges = ex.ranges()
    out = []
    for conn, w, r in sorted(ex.streams):
        end = offset(ranges, "send", w, conn, pos[w])
        start = offset(ranges, "recv", r, conn, pos[r])
        read_any = any(x["kind"] == "recv" and x["conn"] == conn for x in ranges)
        if end > start:
            out.append({"conn": conn, "from": w, "to": r if read_any else None,
                        "start": start, "end": end})
    return out


def z_useless(ex: Execution) -> dict[str, list[int]]:
    """Checkpoints on a Z-cycle, straight from the definition (Netzer and Xu).

    A message goes from (writer, send interval) to (reader, recv interval) when the recv
    range overlaps the send range. A Z-path from checkpoint (u, k): a first message sent
    by u in an interval >= k; each next message sent by the previous one's receiver in
    the same or a later interval; a Z-cycle ends with a message received by u in an
    interval < k.
    """
    ranges = ex.ranges()
    sends = [r for r in ranges if r["kind"] == "send"]
    recvs = [r for r in ranges if r["kind"] == "recv"]
    messages = {(s["unit"], s["interval"], v["unit"], v["interval"])
                for s in sends for v in recvs
                if s["conn"] == v["conn"] and s["start"] < v["end"] and v["start"] < s["end"]}
    out = {}
    for u in ex.units:
        found = []
        for k in range(1, ex.newest[u] + 1):
            frontier = [(v, j) for (w, i, v, j) in messages if w == u and i >= k]
            seen = set(frontier)
            while frontier:
                at, j0 = frontier.pop()
                for (w, i, v, j) in messages:
                    if w == at and i >= j0 and (v, j) not in seen:
                        seen.add((v, j))
                        frontier.append((v, j))
            if any(v == u and j < k for v, j in seen):
                found.append(k)
        out[u] = found
    return out


def lines_useless(ex: Execution) -> dict[str, list[int]]:
    """Checkpoints that no consistent line (any unit may be current) contains."""
    top = {u: n + 1 for u, n in ex.newest.items()}
    usable = {u: set() for u in ex.units}
    for pos in all_lines(ex, top):
        for u in ex.units:
            usable[u].add(pos[u])
    return {u: [k for k in range(1, ex.newest[u] + 1) if k not in usable[u]] for u in ex.units}


@st.composite
def actions(draw, min_size=6, max_size=40):
    """A random program; drawn from a seeded generator, which explores far more
    interleavings than element-wise drawing (whose small values make dull runs)."""
    rnd = draw(st.randoms(use_true_random=False))
    n = rnd.randint(min_size, max_size)
    kinds = ("ckpt", "ckpt", "send", "send", "recv", "recv", "recv")
    return [(rnd.choice(kinds), rnd.randrange(50),
             rnd.randint(1, 6)) for _ in range(n)]


ACTIONS = actions()


@st.composite
def executions(draw, max_units=4):
    rnd = draw(st.randoms(use_true_random=False))
    n = rnd.randint(2, max_units)
    units = [f"u{i}" for i in range(n)]
    pairs = [(rnd.choice(units), rnd.choice(units)) for _ in range(rnd.randint(1, 3))]
    if rnd.random() < 0.7:                       # streams both ways make Z-cycles likely
        pairs += [(b, a) for a, b in pairs]
    streams = [(f"c{i}", a, b) for i, (a, b) in enumerate(pairs)]
    ex = Execution(units, streams)
    ex.run(draw(ACTIONS))
    return ex


def parse(ex: Execution):
    return exchange.parse(list(exchange.dump_lines(ex.records)))


FAST = settings(max_examples=500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(executions(), st.data())
def test_line_equals_brute_force(ex, data):
    failed = set(data.draw(st.lists(st.sampled_from(ex.units), unique=True)))
    model = parse(ex)
    effective = failed or set(ex.units)
    result = line.compute(model, failed or None)
    expected = brute_line(ex, effective)
    assert result.positions == expected
    assert line.fixpoint_positions(model, effective) == expected
    assert result.replay == brute_replay(ex, expected)
    assert result.domino == any(ex.newest[u] > 0 and expected[u] == 0 for u in ex.units)
    for u, value in result.line.items():
        assert value == ("current" if expected[u] == ex.newest[u] + 1 else expected[u])
        if u in effective:
            assert value != "current"


@FAST
@given(executions())
def test_useless_checkpoints_are_exactly_those_on_a_z_cycle(ex):
    model = parse(ex)
    got = line.useless_checkpoints(line.build_graph(model))
    assert got == z_useless(ex)
    assert got == lines_useless(ex)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(executions(), ACTIONS, st.data())
def test_no_future_line_uses_an_obsolete_checkpoint(ex, future, data):
    all_failed = line.compute(parse(ex)).obsolete
    ex.run(future)
    failed = set(data.draw(st.lists(st.sampled_from(ex.units), unique=True))) or set(ex.units)
    later = brute_line(ex, failed)
    for u, seqs in all_failed.items():
        assert all(later[u] > k for k in seqs), (u, seqs, later)


def _to_detlog(log: DeterminantLog, records):
    batch: dict[str, list] = {}

    def flush():
        for unit, recs in batch.items():
            log.append(unit, recs)
        batch.clear()

    for r in records:
        kind = r["kind"]
        if kind in ("send", "recv"):
            batch.setdefault(r["unit"], []).append(
                (kind, r["conn"], r["start"], r["end"], r["interval"]))
            continue
        flush()
        if kind == "unit":
            log.add_unit(r["unit"])
        elif kind == "checkpoint":
            log.add_checkpoint(r["unit"], r["seq"])
        elif kind == "failed":
            log.mark_failed(r["unit"])
    flush()


def _semantics(model, units):
    """Everything a line computation can tell, for every failed set."""
    out = {}
    for size in range(0, len(units) + 1):
        for failed in itertools.combinations(units, size):
            r = line.compute(model, list(failed) or None, extras=False)
            out[failed] = (r.positions, r.replay, r.domino)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(executions(), ACTIONS)
def test_detlog_round_trip_and_gc_keeps_every_future_line(ex, future):
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        log, ref = DeterminantLog(d1, durable=False), DeterminantLog(d2, durable=False)
        _to_detlog(log, ex.records)
        _to_detlog(ref, ex.records)
        # round trip: append -> export -> parse equals the parsed original
        log.export(d1 + "/x.jsonl")
        assert _same_model(exchange.read(d1 + "/x.jsonl"), parse(ex))
        assert _same_model(log.load(), parse(ex))

        floors = log.safe_floors()
        stats = log.gc({u: ex.newest[u] for u in ex.units})   # asks too much: clamped
        assert stats["records_after"] <= stats["records_before"]
        assert log.load().floors == {u: f for u, f in floors.items() if f > 0}
        new = ex.run(future)
        _to_detlog(log, new)
        _to_detlog(ref, new)
        m_gc, m_ref = log.load(), ref.load()
        assert _semantics(m_gc, ex.units) == _semantics(m_ref, ex.units)
        full_gc, full_ref = line.compute(m_gc), line.compute(m_ref)
        for u in ex.units:
            kept = [k for k in full_ref.useless[u] if k >= floors[u]]
            assert full_gc.useless[u] == kept
            assert full_gc.obsolete[u] == [k for k in full_ref.obsolete[u] if k >= floors[u]]
        # the gc'd log still exports a valid exchange file
        log.export(d1 + "/y.jsonl")
        assert line.compute(exchange.read(d1 + "/y.jsonl")).positions == full_ref.positions


def _same_model(a, b) -> bool:
    def norm(m):
        return (m.units, m.failed, {c: (s.sender, s.receiver, s.send_iv, s.send_cum,
                                         s.recv_iv, s.recv_cum)
                                     for c, s in m.streams.items()})
    return norm(a) == norm(b)
