"""CLI text tables (orchestrator.tables)."""

from __future__ import annotations

import pytest

from orchestrator.tables import (checkpoints_table, fmt_bytes, fmt_duration, fmt_ms, format_table,
                                 jobs_table, restart_table, stage_table, status_table)

CHECKPOINT = {
    "job": "j1", "checkpoint": "c1", "total_ms": 51.26,
    "stages_ms": {"prepare": 1.24, "stop": 3.4, "checkpoint": 40.0, "resume_cp": 2.05},
    "units": [
        {"name": "a", "node": "n1", "seq": 1, "bytes": 5 * 1024 * 1024, "total_ms": 48.0,
         "stages_ms": {"prepare": 1, "stop": 3, "checkpoint": 39.95, "resume_cp": 1.9}},
        {"name": "bravo", "node": "node-22", "seq": 12, "bytes": 800, "total_ms": 8.04,
         "stages_ms": {"prepare": 1, "stop": 3.04, "checkpoint": 2, "resume_cp": 1.96}},
    ],
}


def cells(line: str) -> list[str]:
    return line.split()


def assert_aligned(text: str) -> None:
    """Every row has the same column boundaries as the header's rule line."""
    lines = text.splitlines()
    rule = next(line for line in lines if set(line) <= {"-", " "})
    starts = [i for i, ch in enumerate(rule) if ch == "-" and (i == 0 or rule[i - 1] == " ")]
    for line in lines:
        assert not line.endswith(" "), repr(line)
        for s in starts[1:]:
            assert line[s - 1] == " ", f"column boundary at {s} broken in {line!r}"


def test_stage_table() -> None:
    text = stage_table(CHECKPOINT)
    lines = text.splitlines()
    assert cells(lines[0]) == ["unit", "node", "seq", "bytes", "prepare", "stop", "checkpoint",
                               "resume_cp", "total"]
    assert cells(lines[2]) == ["a", "n1", "1", "5.0", "MiB", "1.0", "3.0", "40.0", "1.9", "48.0"]
    assert cells(lines[3]) == ["bravo", "node-22", "12", "800", "B", "1.0", "3.0", "2.0", "2.0", "8.0"]
    assert set(lines[4]) <= {"-", " "}, "a rule separates the job row"
    assert cells(lines[5]) == ["job", "-", "-", "5.0", "MiB", "1.2", "3.4", "40.0", "2.0", "51.3"]
    assert len(lines) == 6
    assert_aligned(text)
    # numbers are right-aligned: the totals end in the same column
    assert len({len(line) for line in (lines[2], lines[3], lines[5])}) == 1


def test_stage_table_without_job_stages_or_optional_fields() -> None:
    result = {"job": "j", "checkpoint": "c", "total_ms": 10,
              "units": [{"name": "a", "seq": 3, "total_ms": 9.99, "stages_ms": {"prepare": 0.04}}]}
    lines = stage_table(result).splitlines()
    assert cells(lines[2]) == ["a", "-", "3", "-", "0.0", "-", "-", "-", "10.0"]
    assert cells(lines[4]) == ["job", "-", "-", "-", "-", "-", "-", "-", "10.0"]


def test_restart_table() -> None:
    result = {"job": "j", "from": "c1", "total_ms": 80.0, "stages_ms": {"rebuild": 61.0, "resume_rst": 12.5},
              "units": [{"name": "a", "node": "n1", "pid": 4321, "total_ms": 70.0,
                         "stages_ms": {"rebuild": 60.0, "resume_rst": 10.0}},
                        {"name": "b", "node": "n2", "pid": 99, "total_ms": 71.56,
                         "stages_ms": {"rebuild": 59.5, "resume_rst": 12.04}}]}
    text = restart_table(result)
    lines = text.splitlines()
    assert cells(lines[0]) == ["unit", "node", "pid", "rebuild", "resume_rst", "total"]
    assert cells(lines[2]) == ["a", "n1", "4321", "60.0", "10.0", "70.0"]
    assert cells(lines[3]) == ["b", "n2", "99", "59.5", "12.0", "71.6"]
    assert cells(lines[5]) == ["job", "-", "-", "61.0", "12.5", "80.0"]
    assert_aligned(text)


def test_status_table() -> None:
    status = {"job": "j1", "state": "running", "name": "ring", "units": [
        {"name": "a", "node": "n1", "state": "running", "pid": 12, "nprocs": 3, "started": 1000.0},
        {"name": "b", "node": "n2", "state": "exited", "pid": 13, "nprocs": 0, "exit_code": 0},
        {"name": "c", "node": "n2", "state": "failed", "pid": 14, "signal": 9},
        {"name": "d", "node": None, "state": "pending"},
        {"name": "e", "node": "n1", "state": "running", "pid": 15, "uptime_s": 7300},
    ]}
    text = status_table(status, now=1125.0)
    lines = text.splitlines()
    assert lines[0] == "job j1: running  (name ring)"
    assert cells(lines[1]) == ["unit", "node", "state", "pid", "nprocs", "uptime", "exit"]
    assert cells(lines[3]) == ["a", "n1", "running", "12", "3", "2m05s", "-"]
    assert cells(lines[4]) == ["b", "n2", "exited", "13", "0", "-", "0"]
    assert cells(lines[5]) == ["c", "n2", "failed", "14", "-", "-", "SIGKILL"]
    assert cells(lines[6]) == ["d", "-", "pending", "-", "-", "-", "-"]
    assert cells(lines[7]) == ["e", "n1", "running", "15", "-", "2h01m", "-"]
    assert_aligned("\n".join(lines[1:]))


def test_checkpoints_table() -> None:
    cps = [{"id": "c1", "time": 0, "units": {"b": 1, "a": 1}, "bytes": 2048, "total_ms": 5},
           {"id": "c2", "time": 86400 + 3661, "units": {f"u{i:02d}": 2 for i in range(64)}}]
    text = checkpoints_table(cps)
    lines = text.splitlines()
    assert cells(lines[0]) == ["checkpoint", "time", "(UTC)", "units", "bytes", "total"]
    assert cells(lines[2]) == ["c1", "1970-01-01", "00:00:00", "a:1", "b:1", "2.0", "KiB", "5.0"]
    assert cells(lines[3])[:5] == ["c2", "1970-01-02", "01:01:01", "u00:2", "u01:2"]
    assert "(64 units)" in lines[3] and "u63" not in lines[3]
    assert_aligned(text)
    assert checkpoints_table([]) == "(no checkpoints)"


def test_jobs_table() -> None:
    text = jobs_table([{"job": "j1", "name": "ring", "state": "running", "units": [{}, {}]},
                       {"job": "j2", "state": "cancelled", "units": []}])
    lines = text.splitlines()
    assert cells(lines[2]) == ["j1", "ring", "running", "2"]
    assert cells(lines[3]) == ["j2", "-", "cancelled", "0"]
    assert jobs_table([]) == "(no jobs)"


@pytest.mark.parametrize("value,text", [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                        (5 * 2**20 + 1, "5.0 MiB"), (3 * 2**30, "3.0 GiB"), ("x", "-")])
def test_fmt_bytes(value, text) -> None:
    assert fmt_bytes(value) == text


@pytest.mark.parametrize("value,text", [(None, "-"), (0, "0s"), (59.9, "59s"), (60, "1m00s"),
                                        (3599, "59m59s"), (3600, "1h00m"), (90000, "1d01h"), (-1, "-")])
def test_fmt_duration(value, text) -> None:
    assert fmt_duration(value) == text


def test_fmt_ms() -> None:
    assert [fmt_ms(v) for v in (0, 1.04, 1.06, 590, None, True, "3")] == \
        ["0.0", "1.0", "1.1", "590.0", "-", "-", "-"]


def test_format_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="2 cells"):
        format_table(("a", "b", "c"), [("1", "2")])
