"""The store's determinant log: persistence, crash tolerance, order handling, export, gc."""

from __future__ import annotations

import json
import os

import pytest

from orchestrator.recovery import exchange, line
from orchestrator.recovery.detlog import RECORD_SIZE, DeterminantLog


def small_log(d) -> DeterminantLog:
    log = DeterminantLog(str(d))
    log.add_unit("a")
    log.add_unit("b")
    log.append("a", [("send", "s", 0, 100, 0)])
    log.add_checkpoint("a", 1)
    log.append("a", [("send", "s", 100, 150, 1), ("send", "s", 150, 180, 1)])
    log.append("b", [("recv", "s", 0, 150, 0)])
    log.add_checkpoint("b", 1)
    log.append("b", [("recv", "s", 150, 180, 1)])
    log.mark_failed("a")
    return log


def test_reopen_load_and_line(tmp_path):
    small_log(tmp_path)
    log = DeterminantLog(str(tmp_path))           # a new process would do this
    model = log.load()
    assert model.units == {"a": 1, "b": 1} and model.failed == {"a"}
    r = line.compute(model)
    assert r.to_json()["line"] == {"a": 1, "b": 0}
    assert r.replay == [{"conn": "s", "from": "a", "to": "b", "start": 0, "end": 100}]
    assert r.domino is True


def test_export_merges_adjacent_ranges(tmp_path):
    log = small_log(tmp_path)
    out = tmp_path / "x.jsonl"
    log.export(str(out))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    sends = [r for r in recs if r["kind"] == "send"]
    assert sends == [exchange.range_record("send", "a", "s", 0, 100, 0),
                     exchange.range_record("send", "a", "s", 100, 180, 1)]
    assert recs[0] == exchange.unit_record("a") and recs[-1] == exchange.failed_record("a")
    assert line.compute(exchange.read(str(out))).positions == \
        line.compute(log.load()).positions


def test_checkpoints_are_idempotent_and_in_order(tmp_path):
    log = DeterminantLog(str(tmp_path))
    log.add_checkpoint("a", 1)
    log.add_checkpoint("a", 1)                   # redelivery
    log.add_checkpoint("a", 2)
    with pytest.raises(ValueError, match="expected 3"):
        log.add_checkpoint("a", 5)
    assert DeterminantLog(str(tmp_path)).units == {"a": 2}


@pytest.mark.parametrize("bad", [
    ("sned", "s", 0, 1, 0), ("send", "", 0, 1, 0), ("send", "s", 5, 5, 0),
    ("send", "s", -1, 5, 0), ("send", "s", 0, 5, -1), ("send", "s", 0, 5.0, 0), ("send", "s"),
])
def test_append_rejects_bad_records_and_writes_nothing(tmp_path, bad):
    log = DeterminantLog(str(tmp_path))
    with pytest.raises(ValueError):
        log.append("a", [("send", "s", 0, 5, 0), bad])
    assert log.records("a") == []


def test_torn_tails_are_ignored_and_repaired(tmp_path):
    log = small_log(tmp_path)
    before = line.compute(log.load()).positions
    with open(log.unit_file("a"), "ab") as f:
        f.write(b"\x01\x02\x03")                  # a record cut by a crash
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"kind": "checkpoint", "un')     # an event cut by a crash
    log = DeterminantLog(str(tmp_path))
    assert line.compute(log.load()).positions == before
    log.append("a", [("send", "s", 180, 200, 1)])
    log.add_checkpoint("a", 2)
    assert os.path.getsize(log.unit_file("a")) % RECORD_SIZE == 0
    log = DeterminantLog(str(tmp_path))
    assert log.records("a")[-1] == ("send", "s", 180, 200, 1)
    assert log.units["a"] == 2


def test_out_of_order_batches_are_sorted_and_late_records_handled(tmp_path):
    log = DeterminantLog(str(tmp_path))
    log.add_checkpoint("b", 1)
    # one batch out of order: sorted before writing, fast path stays valid
    log.append("b", [("recv", "s", 10, 20, 0), ("recv", "s", 0, 10, 0)])
    assert [r[2] for r in log.records("b")] == [0, 10]
    # a late record of an earlier interval: the unit goes to the exact path
    log.append("b", [("recv", "s", 30, 40, 1)])
    log.append("b", [("recv", "s", 20, 30, 0)])
    reopened = DeterminantLog(str(tmp_path))
    s = reopened.load().streams["s"]
    assert (s.recv_iv, s.recv_cum) == ([0, 1], [30, 40])
    # the exact path takes maxima, not the last record: 'last' would say 30 for interval 0
    assert s.rcvd_at(1) == 30


def test_rollback_forgets_the_lost_execution(tmp_path):
    log = small_log(tmp_path)
    log.rollback("b", 0)
    log.rollback("a", 1)
    model = DeterminantLog(str(tmp_path)).load()
    assert model.units == {"a": 1, "b": 0} and model.failed == set()
    s = model.streams["s"]
    assert (s.send_iv, s.send_cum, s.recv_iv, s.recv_cum) == ([0], [100], [], [])
    # the re-executed run appends again from where the line left it
    log.append("b", [("recv", "s", 0, 100, 0)])
    log.append("a", [("send", "s", 100, 120, 1)])
    log.add_checkpoint("a", 2)
    assert DeterminantLog(str(tmp_path)).units == {"a": 2, "b": 0}
    with pytest.raises(ValueError):
        log.rollback("a", 7)


def test_gc_merges_old_intervals_and_never_passes_the_safe_line(tmp_path):
    log = DeterminantLog(str(tmp_path))
    for k in range(5):
        log.append("a", [("send", "s", 10 * k, 10 * k + 5, k), ("send", "s", 10 * k + 5,
                                                                  10 * k + 10, k)])
        log.append("b", [("recv", "s", 10 * k, 10 * k + 10, k)])
        log.add_checkpoint("a", k + 1)
        log.add_checkpoint("b", k + 1)
    assert log.safe_floors() == {"a": 5, "b": 5}
    assert line.compute(log.load()).obsolete == {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]}
    stats = log.gc({"a": 3, "b": 9})             # b asks too much: lowered to 5
    assert stats["floors"] == {"a": 3, "b": 5}
    assert stats["records_before"] == 15 and stats["records_after"] == 1 + 4 + 1
    assert [r for r in log.records("a")][:1] == [("send", "s", 0, 30, 2)]
    model = DeterminantLog(str(tmp_path)).load()
    assert model.floors == {"a": 3, "b": 5}
    r = line.compute(model)
    assert r.positions == {"a": 5, "b": 5}
    assert r.obsolete == {"a": [3, 4], "b": []}
    assert log.gc()["units"] == 1                # the rest of a
    assert log.gc()["units"] == 0


def test_records_ahead_of_their_checkpoint_count_as_current(tmp_path):
    log = DeterminantLog(str(tmp_path))
    log.append("a", [("send", "s", 0, 10, 0)])
    log.append("b", [("recv", "s", 0, 10, 1)])   # b's checkpoint 1 not registered yet
    model = log.load()
    assert any("counted as current" in w for w in model.warnings)
    assert line.compute(model, ["a"]).line == {"a": 0, "b": 0}
    assert line.compute(model, ["b"]).line == {"a": "current", "b": 0}
    with pytest.raises(ValueError, match="unknown unit 'zz'"):
        line.compute(model, ["zz"])


def test_live_command(tmp_path, capsys):
    from orchestrator.recovery import cli

    small_log(tmp_path)
    assert cli.recovery_line_live(str(tmp_path), [], True) == 0
    assert json.loads(capsys.readouterr().out)["line"] == {"a": 1, "b": 0}
    assert cli.recovery_line_live(str(tmp_path), ["nobody"], True) == 2
    assert "nobody" in capsys.readouterr().err
