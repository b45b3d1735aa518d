"""Reader, control page and log format: incremental reads, incomplete records, interval
stamping, exchange export, build flags."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest

import interpose
from interpose import trace
from interpose.control import ControlPage
from interpose.logctl import read_final_records
from interpose.reader import REC_MAGIC, REC_SIZE, Record, read_directory, read_header, read_records, to_exchange, \
    log_files

_FMT = struct.Struct("<IBBBBIIQQQQ16s16sHHIQ")


def rec(kind=1, start=0, end=10, interval=0, gen=0, magic=REC_MAGIC, pid=7):
    src = bytes([127, 0, 0, 1]) + bytes(12)
    dst = bytes([127, 0, 0, 2]) + bytes(12)
    return _FMT.pack(magic, 1, kind, 4, 0, pid, gen, start, end, interval, 5, src, dst, 1000, 2000, 1, 0)


def test_read_records_resumes_and_stops_at_incomplete(tmp_path):
    log = tmp_path / "det.1.1.log"
    hdr = _FMT.pack(REC_MAGIC, 1, 16, 0, 0, 7, 1, 123, 0, 0, 5, b"unit-a".ljust(16, b"\0"), bytes(16), 0, 0, 0, 0)
    log.write_bytes(hdr + rec(start=0, end=10) + rec(start=10, end=25) + rec(magic=0) + rec(start=40, end=50)
                    + bytes(REC_SIZE * 5))
    assert read_header(log).unit == "unit-a"
    recs, off = read_records(log)
    assert [(r.start, r.end) for r in recs] == [(0, 10), (10, 25)]
    assert off == 3 * REC_SIZE
    assert recs[0] == Record("127.0.0.1:1000>127.0.0.2:2000#0", "send", 0, 10, 0, 7, 5)
    again, off2 = read_records(log, off)
    assert again == [] and off2 == off  # the hole is not skipped while the writer may fill it
    # the writer completes the record: the tailer continues from its offset
    data = bytearray(log.read_bytes())
    data[3 * REC_SIZE:4 * REC_SIZE] = rec(start=25, end=40, kind=2)
    log.write_bytes(bytes(data))
    more, off3 = read_records(log, off)
    assert [(r.direction, r.start, r.end) for r in more] == [("recv", 25, 40), ("send", 40, 50)]
    assert off3 == 5 * REC_SIZE
    with pytest.raises(ValueError, match="multiple"):
        read_records(log, 5)


def test_skip_holes_after_writer_exit(tmp_path):
    log = tmp_path / "det.1.2.log"
    log.write_bytes(rec(start=0, end=1) + rec(magic=0) + rec(start=2, end=3) + bytes(REC_SIZE))
    assert len(read_records(log)[0]) == 1
    assert [(r.start, r.end) for r in read_records(log, skip_holes=True)[0]] == [(0, 1), (2, 3)]


def test_to_exchange_merges_adjacent_ranges_per_interval():
    c = "10.0.0.1:1>10.0.0.2:2#0"
    recs = [Record(c, "send", 10, 20, 0, 1, 0), Record(c, "send", 0, 10, 0, 2, 0),
            Record(c, "send", 20, 30, 1, 1, 0), Record(c, "send", 35, 40, 1, 1, 0),
            Record(c, "recv", 0, 5, 0, 1, 0)]
    assert list(to_exchange(recs, "a")) == [
        {"kind": "recv", "unit": "a", "conn": c, "start": 0, "end": 5, "interval": 0},
        {"kind": "send", "unit": "a", "conn": c, "start": 0, "end": 20, "interval": 0},
        {"kind": "send", "unit": "a", "conn": c, "start": 20, "end": 30, "interval": 1},
        {"kind": "send", "unit": "a", "conn": c, "start": 35, "end": 40, "interval": 1},
    ]


def test_control_page_interval(tmp_path):
    with ControlPage(tmp_path / "ctl") as cp:
        assert cp.interval == 0
        assert cp.bump() == 1
        cp.interval = 5
    with ControlPage(tmp_path / "ctl") as cp:
        assert cp.interval == 5 and cp.lost_records == 0
    (tmp_path / "bad").write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="not a gridckpt"):
        ControlPage(tmp_path / "bad")


INTERVAL_PROG = textwrap.dedent("""
    import socket, sys
    ls = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(ls.getsockname()); b, _ = ls.accept()
    for step in range(3):
        for _ in range(5):
            a.sendall(b"x" * (20 + step)); b.recv(1000)
        print("sent", flush=True)
        sys.stdin.readline()
""")


def test_records_carry_the_interval_the_agent_sets(tmp_path):
    """The sends of an interval continue one record in place (coalescing); the agent's bump
    of the interval starts a new one."""
    ctl = tmp_path / "ctl"
    logs = tmp_path / "logs"
    logs.mkdir()
    page = ControlPage(ctl)
    p = subprocess.Popen([sys.executable, "-c", INTERVAL_PROG], env=interpose.shim_env("u", logs, ctl),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert p.stdout.readline() == "sent\n"
            page.bump()  # resume_cp
            p.stdin.write("\n")
            p.stdin.flush()
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        page.close()
    sends = sorted((r.interval, r.start, r.end) for r in read_directory(logs) if r.direction == "send")
    assert sends == [(0, 0, 100), (1, 100, 205), (2, 205, 315)]


def test_tailing_a_live_log(tmp_path):
    """A reader following a log that a running process is appending to (and growing records
    of, in place) sees every byte once: it closes the records it reads (read_final_records)."""
    ctl, logs = tmp_path / "ctl", tmp_path / "logs"
    logs.mkdir()
    prog = textwrap.dedent("""
        import socket, sys
        ls = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(ls.getsockname()); b, _ = ls.accept()
        for i in range(3000):
            a.send(b"y" * 10); b.recv(10, socket.MSG_WAITALL)
    """)
    p = subprocess.Popen([sys.executable, "-c", prog], env=interpose.shim_env("u", logs, ctl))
    seen, offsets = [], {}
    try:
        while True:
            done = p.poll() is not None
            for f in log_files(logs):
                recs, offsets[f] = read_final_records(f, offsets.get(f, 0))
                seen.extend(recs)
            if done:
                break
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    sends = sorted((r.start, r.end) for r in seen if r.direction == "send")
    # one contiguous cover of the 30000 bytes: no gap, no overlap, however the tailer cut it
    assert sends[0][0] == 0 and sends[-1][1] == 30000
    assert all(a[1] == b[0] for a, b in zip(sends, sends[1:])), sends[:10]
    # once the writer is gone, the plain reader agrees with what the tailer took
    again = sorted((r.start, r.end) for r in read_directory(logs) if r.direction == "send")
    assert again == sends


def test_exported_symbols_are_only_the_hooks():
    lib = interpose.library_path()
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    hooks = {"read", "write", "readv", "writev", "recv", "send", "recvfrom", "sendto", "recvmsg", "sendmsg",
             "recvmmsg", "sendmmsg", "__read_chk", "__recv_chk", "__recvfrom_chk", "sendfile", "sendfile64",
             "splice", "connect", "accept", "accept4", "close", "shutdown", "dup", "dup2", "dup3", "fcntl",
             "fcntl64", "close_range", "closefrom", "fclose", "socket", "socketpair", "open", "open64", "openat",
             "openat64", "pipe", "pipe2", "getsockopt", "execve", "execvpe", "fexecve", "posix_spawn",
             "posix_spawnp"}
    assert names == hooks


def test_build_without_compiler_fails_clearly(tmp_path, monkeypatch):
    from interpose import build
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.BuildError, match="no C compiler"):
        build.build_library(tmp_path / "x.so")


def test_trace_command(tmp_path):
    out = tmp_path / "t.jsonl"
    rc = trace.main(["--unit", "demo", "--out", str(out), "--", sys.executable, "-c", INTERVAL_PROG.replace(
        "sys.stdin.readline()", "pass")])
    assert rc == 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines[0] == {"kind": "unit", "unit": "demo"}
    body = lines[1:]
    assert {l["kind"] for l in body} == {"send", "recv"}
    assert all(l["unit"] == "demo" and l["interval"] == 0 for l in body)
    sends = [l for l in body if l["kind"] == "send"]
    assert len(sends) == 1 and (sends[0]["start"], sends[0]["end"]) == (0, 315)  # merged
    recvs = [l for l in body if l["kind"] == "recv"]
    assert [(l["conn"], l["start"], l["end"]) for l in recvs] == [(sends[0]["conn"], 0, 315)]


def test_trace_exit_status_and_usage(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert trace.main(["--unit", "u", "--out", str(out), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert out.read_text() == '{"kind": "unit", "unit": "u"}\n'
    assert trace.main(["--unit", "u", "--out", str(out), "--", sys.executable, "-c",
                       "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]) == 128 + 15
    for argv, msg in [([], "--unit"), (["--unit", "u"], "--out"), (["--unit", "u", "--out", str(out)], "no command"),
                      (["--bogus"], "unknown argument"),
                      (["--unit", "u", "--out", str(out), "--", "/nonexistent/prog"], "cannot run"),
                      (["--unit", "u", "--out", str(tmp_path / "no" / "f"), "--", "true"], "does not exist")]:
        capsys.readouterr()
        assert trace.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
