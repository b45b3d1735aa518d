"""Exchange-format parsing: every kind of bad input is reported with its line number,
through the offline ``recovery-line`` command (exit 2, ``<file>:<line>: <what>``)."""

from __future__ import annotations

import json

import pytest

from orchestrator.recovery import cli, exchange

HEAD = [
    '{"kind": "unit", "unit": "a"}',
    '{"kind": "unit", "unit": "b"}',
]


def send(start, end, interval=0, unit="a", conn="s"):
    return json.dumps({"kind": "send", "unit": unit, "conn": conn, "start": start, "end": end,
                       "interval": interval})


def recv(start, end, interval=0, unit="b", conn="s"):
    return json.dumps({"kind": "recv", "unit": unit, "conn": conn, "start": start, "end": end,
                       "interval": interval})


BAD = [
    ("malformed JSON", ['{"kind": "unit", "unit": '], 3, "malformed JSON"),
    ("not an object", ["[1, 2]"], 3, "expected a JSON object"),
    ("unknown kind", ['{"kind": "sned", "unit": "a"}'], 3, "unknown kind \"sned\""),
    ("missing kind", ['{"unit": "a"}'], 3, "missing field 'kind'"),
    ("missing unit", ['{"kind": "checkpoint", "seq": 1}'], 3, "missing field 'unit'"),
    ("missing conn", ['{"kind": "send", "unit": "a", "start": 0, "end": 4, "interval": 0}'],
     3, "missing field 'conn'"),
    ("missing start", ['{"kind": "send", "unit": "a", "conn": "s", "end": 4, "interval": 0}'],
     3, "missing field 'start'"),
    ("missing interval", ['{"kind": "send", "unit": "a", "conn": "s", "start": 0, "end": 4}'],
     3, "missing field 'interval'"),
    ("string start", ['{"kind": "send", "unit": "a", "conn": "s", "start": "0", "end": 4, '
                      '"interval": 0}'], 3, "field 'start' must be a non-negative integer"),
    ("float end", [send(0, 4.5)], 3, "field 'end' must be a non-negative integer"),
    ("bool interval", ['{"kind": "send", "unit": "a", "conn": "s", "start": 0, "end": 4, '
                       '"interval": true}'], 3, "field 'interval'"),
    ("numeric unit", ['{"kind": "send", "unit": 7, "conn": "s", "start": 0, "end": 4, '
                      '"interval": 0}'], 3, "field 'unit' must be a non-empty string"),
    ("list unit", ['{"kind": "failed", "unit": ["a"]}'], 3, "field 'unit'"),
    ("negative start", [send(-5, 4)], 3, "field 'start' must be a non-negative integer"),
    ("empty range", [send(4, 4)], 3, "empty or negative range [4, 4)"),
    ("negative range", [send(9, 4)], 3, "empty or negative range [9, 4)"),
    ("seq starts at 2", ['{"kind": "checkpoint", "unit": "a", "seq": 2}'], 3,
     "checkpoint seq 2 of unit 'a', expected 1"),
    ("seq repeated", ['{"kind": "checkpoint", "unit": "a", "seq": 1}',
                      '{"kind": "checkpoint", "unit": "b", "seq": 1}',
                      '{"kind": "checkpoint", "unit": "a", "seq": 1}'], 5, "expected 2"),
    ("seq not an int", ['{"kind": "checkpoint", "unit": "a", "seq": "1"}'], 3,
     "field 'seq' must be an integer"),
    ("undeclared unit", [send(0, 4), '{"kind": "checkpoint", "unit": "zz", "seq": 1}'], 4,
     "unit 'zz' has no unit line before this record"),
    ("unit declared later", [send(0, 4, unit="c"), '{"kind": "unit", "unit": "c"}'], 3,
     "unit 'c' has no unit line"),
    ("failed of unknown unit", ['{"kind": "failed", "unit": "q"}'], 3, "unit 'q' has no unit"),
    ("unit twice", ['{"kind": "unit", "unit": "a"}'], 3, "declared twice (first on line 1)"),
    ("recv nobody sent", [send(0, 10), recv(0, 10), recv(10, 12)], 5,
     "recv of bytes nobody sent: [10, 12) on conn 's', but 'a' wrote only up to 10"),
    ("recv on a conn nobody writes", [recv(0, 3, conn="x"), send(0, 4)], 3,
     "no unit writes conn 'x'"),
    ("recv before its send line is fine, beyond is not",
     [recv(0, 5), recv(5, 30), send(0, 20)], 4, "wrote only up to 20"),
    ("overlapping sends", [send(0, 10), send(5, 15)], 4, "overlapping ranges on conn 's' (send)"),
    ("overlapping recvs out of file order", [send(0, 50), recv(20, 30), recv(0, 25)], 5,
     "overlapping ranges on conn 's' (recv): [20, 30) overlaps bytes up to 25 (line 4)"),
    ("duplicate record", [send(0, 10), send(0, 10)], 4, "overlapping"),
    ("later bytes in an earlier interval",
     ['{"kind": "checkpoint", "unit": "a", "seq": 1}', send(0, 10, 1), send(10, 20, 0)], 5,
     "out of order on conn 's'"),
    ("interval beyond the newest checkpoint", [send(0, 10, 2)], 3,
     "interval 2 but unit 'a' has checkpoints only up to 0"),
    ("two writers of one conn", [send(0, 10), send(10, 20, unit="b")], 4,
     "conn 's' is already written by unit 'a' (line 3)"),
    ("two readers of one conn", [send(0, 10), recv(0, 5), recv(5, 10, unit="a")], 5,
     "already read by unit 'b'"),
]


@pytest.mark.parametrize("lines,lineno,what", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_line(tmp_path, capsys, lines, lineno, what):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(HEAD + lines) + "\n")
    with pytest.raises(exchange.ExchangeError) as info:
        exchange.read(str(path))
    assert info.value.line == lineno
    assert what in info.value.message
    assert cli.recovery_line_offline(str(path), [], True) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith(f"{path}:{lineno}: ")
    assert what in err
    assert "\n" not in err and "Traceback" not in err


def test_blank_lines_and_extra_fields_are_accepted():
    lines = HEAD + ["", send(0, 4).replace("}", ', "ts": 17}'), "   ", recv(0, 4)]
    model = exchange.parse(lines)
    assert model.streams["s"].max_rcvd == 4


def test_records_in_any_file_order_are_accepted():
    lines = HEAD + ['{"kind": "checkpoint", "unit": "a", "seq": 1}',
                    recv(10, 20), send(10, 20, 1), recv(0, 10), send(0, 10, 0)]
    model = exchange.parse(lines)
    s = model.streams["s"]
    assert (s.send_iv, s.send_cum, s.recv_iv, s.recv_cum) == ([0, 1], [10, 20], [0], [20])


def test_gaps_are_allowed_and_offsets_are_stream_positions():
    lines = HEAD + [send(0, 10), send(20, 30), recv(0, 5), recv(25, 30)]
    s = exchange.parse(lines).streams["s"]
    assert s.max_sent == 30 and s.max_rcvd == 30


def test_unreadable_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert cli.recovery_line_offline(str(missing), [], False) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{missing}: cannot read") and err.count("\n") == 1


def test_failed_option_overrides_and_is_checked(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(HEAD + [
        '{"kind": "checkpoint", "unit": "b", "seq": 1}', send(0, 10), recv(0, 10, 1),
        '{"kind": "failed", "unit": "a"}']) + "\n")
    assert cli.recovery_line_offline(str(path), [], True) == 0
    assert json.loads(capsys.readouterr().out)["line"] == {"a": 0, "b": 1}
    assert cli.recovery_line_offline(str(path), ["b"], True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["line"] == {"a": "current", "b": 1}
    assert out["replay"] == [{"conn": "s", "from": "a", "to": "b", "start": 0, "end": 10}]
    assert out["failed"] == ["b"]
    assert cli.recovery_line_offline(str(path), ["zz"], True) == 2
    assert "'zz'" in capsys.readouterr().err


def test_no_failed_mark_means_every_unit_failed(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(HEAD + ['{"kind": "checkpoint", "unit": "a", "seq": 1}']) + "\n")
    assert cli.recovery_line_offline(str(path), [], True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["line"] == {"a": 1, "b": 0}
    assert out["failed"] == ["a", "b"]
    assert set(out) >= {"line", "replay", "domino", "useless", "obsolete"}


def test_write_then_parse_round_trip(tmp_path):
    records = [exchange.unit_record("ü"), exchange.checkpoint_record("ü", 1),
               exchange.range_record("send", "ü", "10.0.0.1:5>10.0.0.2:6#0", 0, 9, 1),
               exchange.failed_record("ü")]
    path = tmp_path / "x.jsonl"
    assert exchange.write(str(path), records) == 4
    assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == records
    model = exchange.read(str(path))
    assert model.units == {"ü": 1} and model.failed == {"ü"}
