"""Classic hand-made recovery-line cases, with results worked out by hand."""

from __future__ import annotations

import json

from orchestrator.recovery import cli, exchange, line


class Log:
    """A tiny script of a run: units checkpoint, write and read streams (offsets tracked)."""

    def __init__(self, *units: str):
        self.records = [exchange.unit_record(u) for u in units]
        self.interval = {u: 0 for u in units}
        self.sent: dict[str, int] = {}
        self.rcvd: dict[str, int] = {}

    def ckpt(self, unit: str) -> "Log":
        self.interval[unit] += 1
        self.records.append(exchange.checkpoint_record(unit, self.interval[unit]))
        return self

    def send(self, unit: str, conn: str, n: int) -> "Log":
        s = self.sent.get(conn, 0)
        self.records.append(exchange.range_record("send", unit, conn, s, s + n,
                                                  self.interval[unit]))
        self.sent[conn] = s + n
        return self

    def recv(self, unit: str, conn: str, n: int) -> "Log":
        r = self.rcvd.get(conn, 0)
        assert r + n <= self.sent.get(conn, 0), "the script reads bytes not yet written"
        self.records.append(exchange.range_record("recv", unit, conn, r, r + n,
                                                  self.interval[unit]))
        self.rcvd[conn] = r + n
        return self

    def fail(self, unit: str) -> "Log":
        self.records.append(exchange.failed_record(unit))
        return self

    def model(self):
        return exchange.parse(list(exchange.dump_lines(self.records)))

    def result(self, failed=None):
        return line.compute(self.model(), failed)


WORKED_EXAMPLE = """\
{"kind": "unit", "unit": "a"}
{"kind": "unit", "unit": "b"}
{"kind": "send", "unit": "a", "conn": "s", "start": 0, "end": 100, "interval": 0}
{"kind": "checkpoint", "unit": "a", "seq": 1}
{"kind": "send", "unit": "a", "conn": "s", "start": 100, "end": 180, "interval": 1}
{"kind": "recv", "unit": "b", "conn": "s", "start": 0, "end": 150, "interval": 0}
{"kind": "checkpoint", "unit": "b", "seq": 1}
{"kind": "recv", "unit": "b", "conn": "s", "start": 150, "end": 180, "interval": 1}
{"kind": "failed", "unit": "a"}
"""


def test_worked_example_of_design_md(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text(WORKED_EXAMPLE)
    assert cli.recovery_line_offline(str(path), [], True) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: out[k] for k in ("line", "replay", "domino")} == {
        "line": {"a": 1, "b": 0},
        "replay": [{"conn": "s", "from": "a", "to": "b", "start": 0, "end": 100}],
        "domino": True}
    # the fixpoint walk of DESIGN.md: b goes current (180) -> 1 (150) -> 0
    model = exchange.parse(WORKED_EXAMPLE.splitlines())
    assert line.fixpoint_positions(model, {"a"}) == {"a": 1, "b": 0}


def test_worked_example_table(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text(WORKED_EXAMPLE)
    assert cli.recovery_line_offline(str(path), [], False) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    # unit failed newest line lost replay-in replay-out
    assert ["a", "yes", "1", "1", "0", "0", "100"] in rows
    assert ["b", "no", "1", "0", "1", "100", "0"] in rows
    assert ["domino", "effect:", "yes"] in rows


def test_orphan_chain_rolls_back_along_the_chain():
    log = (Log("a", "b", "c").ckpt("a").ckpt("b").ckpt("c")
           .send("a", "ab", 10).recv("b", "ab", 10)
           .send("b", "bc", 10).recv("c", "bc", 10)
           .send("c", "cd", 5)
           .fail("a"))
    r = log.result()
    assert r.line == {"a": 1, "b": 1, "c": 1}
    assert r.replay == []
    assert r.domino is False


def test_orphan_chain_stops_where_the_bytes_were_remembered():
    log = (Log("a", "b", "c").send("a", "ab", 10).ckpt("a")
           .recv("b", "ab", 10).send("b", "bc", 4).ckpt("b").send("b", "bc", 6)
           .recv("c", "bc", 10)
           .fail("a"))
    r = log.result()
    # a at 1 remembers 10 bytes: b is fine, c too
    assert r.line == {"a": 1, "b": "current", "c": "current"}
    r = log.result(["b"])
    # b at 1 remembers 4 bytes of bc; c read 10 in its interval 0: orphan, c to 0
    assert r.line == {"a": "current", "b": 1, "c": 0}
    assert r.replay == [{"conn": "bc", "from": "b", "to": "c", "start": 0, "end": 4}]
    assert r.domino is False      # c had no checkpoint newer than 0


def test_lost_message_is_replayed_not_rolled_back():
    log = (Log("a", "b").send("a", "ab", 10).ckpt("a").ckpt("b").recv("b", "ab", 10)
           .fail("b"))
    r = log.result()
    assert r.line == {"a": "current", "b": 1}
    assert r.replay == [{"conn": "ab", "from": "a", "to": "b", "start": 0, "end": 10}]
    assert r.domino is False


def test_in_transit_bytes_of_a_partial_read():
    log = Log("a", "b").send("a", "ab", 100).recv("b", "ab", 30).ckpt("b").recv("b", "ab", 20)
    r = log.result(["b"])
    assert r.line == {"a": "current", "b": 1}
    assert r.replay == [{"conn": "ab", "from": "a", "to": "b", "start": 30, "end": 100}]


def test_two_process_domino():
    log = (Log("a", "b")
           .send("b", "ba", 10).recv("a", "ba", 10).ckpt("a")
           .send("a", "ab", 10).recv("b", "ab", 10).ckpt("b")
           .send("b", "ba", 10).recv("a", "ba", 10).ckpt("a")
           .send("a", "ab", 10).recv("b", "ab", 10).ckpt("b")
           .fail("a"))
    r = log.result()
    assert r.line == {"a": 0, "b": 0}
    assert r.domino is True
    assert r.replay == []
    assert line.fixpoint_positions(log.model(), {"a"}) == {"a": 0, "b": 0}


def test_three_process_domino():
    log = (Log("a", "b", "c")
           .send("a", "ab", 10).recv("b", "ab", 10).ckpt("b")
           .send("b", "bc", 10).recv("c", "bc", 10).ckpt("c")
           .send("c", "ca", 10).recv("a", "ca", 10).ckpt("a")
           .send("a", "ab", 10).recv("b", "ab", 10).ckpt("b")
           .send("b", "bc", 10).recv("c", "bc", 10).ckpt("c")
           .send("c", "ca", 10).recv("a", "ca", 10).ckpt("a")
           .send("a", "ab", 10).recv("b", "ab", 10)
           .fail("a"))
    r = log.result()
    assert r.line == {"a": 0, "b": 0, "c": 0}
    assert r.domino is True
    # only what c wrote before its checkpoint... none is remembered at 0: nothing to replay
    assert r.replay == []


def test_no_domino_when_only_the_failed_unit_talks_late():
    log = (Log("a", "b", "c")
           .send("a", "ab", 10).recv("b", "ab", 10).ckpt("a").ckpt("b").ckpt("c")
           .send("a", "ab", 5)
           .fail("a"))
    r = log.result()
    assert r.line == {"a": 1, "b": "current", "c": "current"}
    assert r.replay == []       # a at 1 remembers 10 bytes and b read exactly those


def test_non_causal_z_path_makes_a_checkpoint_useless():
    # m2: a -> b in a's interval 0, read by b before its checkpoint 1;
    # m1: b -> a after b's checkpoint 1, read by a in interval 0 *after* a sent m2.
    # m1 then m2 is a Z-path from C(b,1) back before C(b,1) with no causal path:
    # no consistent line contains C(b,1).
    log = (Log("a", "b").send("a", "ab", 8).recv("b", "ab", 8).ckpt("b")
           .send("b", "ba", 5).recv("a", "ba", 5).ckpt("a"))
    r = log.result()
    assert r.useless == {"a": [], "b": [1]}
    assert log.result(["b"]).line == {"a": 0, "b": 0}
    # C(a,1) is fine: with b current it is consistent
    assert log.result(["a"]).line == {"a": 1, "b": "current"}


def test_causal_paths_without_a_z_cycle_leave_checkpoints_useful():
    log = (Log("a", "b").ckpt("a").send("a", "ab", 4).recv("b", "ab", 4)
           .send("b", "ba", 4).recv("a", "ba", 4).ckpt("a").ckpt("b"))
    # a's checkpoint 1 precedes everything: a path from (a,2) cannot reach (a,1)
    assert log.result().useless == {"a": [], "b": []}
    log = (Log("a", "b").send("b", "ba", 4).ckpt("b").recv("a", "ba", 4).send("a", "ab", 4)
           .ckpt("a").recv("b", "ab", 4).send("b", "ba", 4).recv("a", "ba", 4))
    # b's checkpoint 1 remembers nothing read, a's checkpoint 1 read b's interval-0
    # bytes: both usable
    assert log.result().useless == {"a": [], "b": []}


def test_obsolete_checkpoints():
    log = Log("a", "b")
    for _ in range(3):
        log.ckpt("a").ckpt("b")
    r = log.result()
    assert r.obsolete == {"a": [1, 2], "b": [1, 2]}
    # a dependency keeps old ones: b read bytes a wrote after its checkpoint 1
    log = (Log("a", "b").ckpt("a").ckpt("b").send("a", "ab", 5).ckpt("b").recv("b", "ab", 5)
           .ckpt("b").ckpt("a"))
    r = log.result()
    # every unit failed: a at 2 (sent 5), b at 3 (read 5): consistent
    assert r.line == {"a": 2, "b": 3}
    assert r.obsolete == {"a": [1], "b": [1, 2]}
    log2 = (Log("a", "b").ckpt("a").ckpt("b").ckpt("b").send("a", "ab", 5).recv("b", "ab", 5)
            .ckpt("b"))
    # a at 1 remembers nothing sent; b at 3 read 5 -> b back to 2
    assert log2.result().line == {"a": 1, "b": 2}
    assert log2.result().obsolete == {"a": [], "b": [1]}


def test_units_without_traffic_and_self_streams():
    log = (Log("a", "b", "solo").ckpt("solo").ckpt("solo")
           .send("a", "loop", 3).recv("a", "loop", 3).ckpt("a"))
    r = log.result(["solo"])
    assert r.line == {"a": "current", "b": "current", "solo": 2}
    r = log.result()
    assert r.line == {"a": 1, "b": 0, "solo": 2}
    assert r.domino is False


def test_bytes_never_read_are_listed_with_no_reader():
    log = Log("a", "b").ckpt("a").send("a", "out", 7).ckpt("a")
    r = log.result(["a"])
    assert r.replay == [{"conn": "out", "from": "a", "to": None, "start": 0, "end": 7}]
