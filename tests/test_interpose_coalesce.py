"""Records coalesced in place (log version 2): a process continues its last record of a
connection direction while its transfers stay contiguous; a reader closes records (CLOSED
bit, atomically) before shipping them.  Real programs on real sockets: ping-pong coalesces,
and writers racing a closer (threads, a forked child, dup'ed fds, interval bumps) still
leave every byte in exactly one shipped record."""
from __future__ import annotations

import asyncio
import re
import struct
import sys
import threading
from collections import defaultdict
from pathlib import Path

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "progs"))
import shimlib  # noqa: E402
from shimlib import Unit, finish, kill_all  # noqa: E402

import interpose  # noqa: E402
from interpose import logctl  # noqa: E402
from interpose.logctl import close_log, read_final_records  # noqa: E402
from interpose.control import ControlPage  # noqa: E402
from interpose.reader import END_CLOSED, REC_MAGIC, REC_SIZE, REC_VERSION, Record, log_files, read_directory, \
    read_records  # noqa: E402
from nodeagent.shipper import Shipper  # noqa: E402

_FMT = struct.Struct("<IBBBBIIQQQQ16s16sHHIQ")
HEADER_H = Path(interpose.__file__).resolve().parent / "gridckpt_shim.h"


def rec(start, end, kind=1, version=REC_VERSION, interval=0, magic=REC_MAGIC):
    src = bytes([127, 0, 0, 1]) + bytes(12)
    dst = bytes([127, 0, 0, 2]) + bytes(12)
    return _FMT.pack(magic, version, kind, 4, 0, 7, 0, start, end, interval, 5, src, dst, 1000, 2000, 1, 0)


def header():
    return _FMT.pack(REC_MAGIC, REC_VERSION, 16, 0, 0, 7, 1, 123, 0, 0, 5, b"u".ljust(16, b"\0"), bytes(16), 0, 0,
                     0, 0)


@pytest.fixture(scope="module")
def progs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("progs")
    return {name: str(shimlib.build_c(shimlib.PROGS / f"{name}.c", d / name)) for name in ("benchprog", "racer")}


def exact_cover(recs, total):
    """Per (conn, direction): the records cover [0, total) exactly once (any interval)."""
    by = defaultdict(list)
    for r in recs:
        by[(r.conn, r.direction)].append((r.start, r.end))
    for key, ranges in by.items():
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == total, (key, ranges[:3], ranges[-3:], total)
        for (s1, e1), (s2, e2) in zip(ranges, ranges[1:]):
            assert e1 == s2, f"{key}: gap or overlap between {s1, e1} and {s2, e2}"
        assert all(s < e for s, e in ranges), key
    return by


# ------------------------------------------------------------------ format, reader, closer

def test_version_bump_is_consistent():
    text = HEADER_H.read_text()
    assert int(re.search(r"#define GC_REC_VERSION (\d+)", text).group(1)) == REC_VERSION == 2
    assert re.search(r"#define GC_END_CLOSED \(1ull << 63\)", text) and END_CLOSED == 1 << 63
    assert logctl.library_version() == REC_VERSION


def test_reader_masks_closed_and_checks_version(tmp_path):
    log = tmp_path / "det.1.1.log"
    log.write_bytes(header() + rec(0, 10 | END_CLOSED) + rec(10, 25) + rec(25, 30, version=1)
                    + rec(30, 40 | END_CLOSED, kind=2) + bytes(REC_SIZE * 3))
    recs, off = read_records(log)
    assert [(r.direction, r.start, r.end) for r in recs] == [("send", 0, 10), ("send", 10, 25), ("send", 25, 30),
                                                             ("recv", 30, 40)]
    assert off == 5 * REC_SIZE
    assert [(r.start, r.end) for r in read_records(log, REC_SIZE, max_records=2)[0]] == [(0, 10), (10, 25)]
    assert read_records(log, REC_SIZE, max_records=2)[1] == 3 * REC_SIZE
    bad = tmp_path / "det.1.2.log"
    bad.write_bytes(header() + rec(0, 1, version=3))
    with pytest.raises(ValueError, match="version 3"):
        read_records(bad)


def test_close_log_closes_the_complete_prefix_only(tmp_path):
    log = tmp_path / "det.1.1.log"
    log.write_bytes(header() + rec(0, 10) + rec(10, 20 | END_CLOSED) + rec(20, 30, kind=2) + rec(0, 0, magic=0)
                    + rec(30, 40) + bytes(REC_SIZE))
    assert close_log(log, 0, max_records=2) == 2
    raw = log.read_bytes()
    ends = [struct.unpack_from("<Q", raw, i * REC_SIZE + 24)[0] for i in range(6)]
    assert ends[0] == 0  # the header is not touched
    assert ends[1] == 10 | END_CLOSED and ends[3] == 30  # max_records: the third is still open
    assert close_log(log, REC_SIZE) == 3  # stops at the hole
    raw = log.read_bytes()
    ends = [struct.unpack_from("<Q", raw, i * REC_SIZE + 24)[0] for i in range(6)]
    assert ends[1:4] == [10 | END_CLOSED, 20 | END_CLOSED, 30 | END_CLOSED]
    assert ends[5] == 40  # behind the hole: not complete yet, not closed
    assert close_log(log, 10 * REC_SIZE) == 0
    with pytest.raises(ValueError, match="multiple"):
        close_log(log, 5)
    recs, off = read_final_records(log, REC_SIZE)
    assert [(r.start, r.end) for r in recs] == [(0, 10), (10, 20), (20, 30)] and off == 4 * REC_SIZE


def test_shim_writes_version_2_records(tmp_path, progs):
    unit = Unit("u", tmp_path)
    try:
        p = unit.popen([progs["benchprog"], "pingpong", "100"])
        p.communicate(timeout=30)
        assert p.returncode == 0
    finally:
        kill_all(unit)
    for f in log_files(unit.dir):
        data = f.read_bytes()
        versions = {data[i + 4] for i in range(0, len(data), REC_SIZE) if data[i:i + 4] == REC_MAGIC.to_bytes(4, "little")}
        assert versions == {2}


# ------------------------------------------------------------------ coalescing on real programs

def test_pingpong_coalesces(tmp_path, progs):
    """1-byte ping-pong between two shimmed processes: byte totals exact, a handful of
    records per process instead of one per transfer (nobody closes them)."""
    rounds = 3000
    unit = Unit("u", tmp_path)
    try:
        p = unit.popen([progs["benchprog"], "pingpong", str(rounds)])
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    finally:
        kill_all(unit)
    recs = read_directory(unit.dir)
    total = rounds + rounds // 10  # the warm-up rounds move bytes too
    by = exact_cover(recs, total)
    assert len(by) == 4  # two connection directions, each seen by its sender and its receiver
    assert len({(r.conn, r.direction, r.pid) for r in recs}) == 4
    per_pid = defaultdict(int)
    for r in recs:
        per_pid[r.pid] += 1
    assert len(per_pid) == 2
    assert all(n <= 8 for n in per_pid.values()), dict(per_pid)  # vs 2 * total without coalescing


# ------------------------------------------------------------------ a closer racing the writers

def run_racer_with_closers(tmp_path, racer, opts, preload=None, bump_every=0.002):
    """Run racer under the shim while (1) a tailer closes+reads new records like the shipper,
    (2) another thread closes every record of every log in a tight loop, (3) the interval is
    bumped now and then.  Returns (tailed records, racer lines, unit)."""
    unit = Unit("u", tmp_path, preload=preload)
    stop = threading.Event()
    errors: list[BaseException] = []
    tailed = []
    bumps = [0]

    def hammer():
        try:
            while not stop.is_set():
                for f in log_files(unit.dir):
                    close_log(f, 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def bumper():
        with ControlPage(unit.control) as page:
            while not stop.wait(bump_every):
                page.bump()
                bumps[0] += 1

    threads = [threading.Thread(target=hammer), threading.Thread(target=bumper)]
    offsets: dict[Path, int] = {}
    p = unit.popen([racer, *opts], env={"ASAN_OPTIONS": "detect_leaks=0"})
    for t in threads:
        t.start()
    try:
        while True:
            done = p.poll() is not None
            for f in log_files(unit.dir):
                recs, offsets[f] = read_final_records(f, offsets.get(f, 0))
                tailed.extend(recs)
            if done:
                break
        lines = finish(p)
    finally:
        stop.set()
        for t in threads:
            t.join()
        kill_all(unit)
    assert not errors, errors
    for f in log_files(unit.dir):  # the last records (the writers are gone)
        recs, offsets[f] = read_final_records(f, offsets.get(f, 0))
        tailed.extend(recs)
    return tailed, lines, unit, bumps[0]


@pytest.mark.parametrize("opts", [["--threads", "4", "--bytes", "2000000"],
                                  ["--threads", "3", "--readers", "2", "--bytes", "1500000", "--fork"]],
                         ids=["threads", "threads+fork"])
def test_closer_racing_writers(tmp_path, progs, opts):
    tailed, lines, unit, bumps = run_racer_with_closers(tmp_path, progs["racer"], opts)
    sent, recvd = sum(l["sent"] for l in lines), sum(l["recv"] for l in lines)
    nproc = 2 if "--fork" in opts else 1
    assert len(lines) == nproc
    assert sent == recvd == nproc * int(opts[1]) * int(opts[opts.index("--bytes") + 1]) + 100
    exact_cover(tailed, sent)  # every byte in exactly one shipped record, per direction
    # nothing grew after it was shipped: the logs, read after the fact, say the same
    assert sorted(read_directory(unit.dir)) == sorted(tailed)
    assert len({r.pid for r in tailed}) == nproc
    assert bumps > 0 and len({r.interval for r in tailed}) > 1
    print(f"{len(tailed)} records for {sent} bytes each way, {bumps} interval bumps")


def test_closer_racing_writers_under_asan(tmp_path, progs):
    preload = shimlib.asan_preload()
    opts = ["--threads", "3", "--bytes", "150000", "--fork"]
    tailed, lines, unit, _ = run_racer_with_closers(tmp_path, progs["racer"], opts, preload=preload)
    sent = sum(l["sent"] for l in lines)
    assert sent == sum(l["recv"] for l in lines) == 2 * 3 * 150000 + 100
    exact_cover(tailed, sent)
    assert sorted(read_directory(unit.dir)) == sorted(tailed)


# ------------------------------------------------------------------ the shipper

class _CaptureBus:
    def __init__(self) -> None:
        self.msgs: list[dict] = []

    async def publish(self, key, msg, timeout=None):
        self.msgs.append(msg)


def test_shipper_ships_each_byte_once_while_records_grow(tmp_path, progs):
    """The agent's shipper tails a racing unit: decoded batches cover every byte exactly
    once, batches of a source are contiguous in record index (what the orchestrator's
    watermarks expect), and a rollback closes the logs' records."""
    unit = Unit("u", tmp_path)
    bus = _CaptureBus()
    shipper = Shipper(bus, "s", "n", batch_records=50)
    shipper.watch("j", "u", unit.dir)

    async def main():
        p = unit.popen([progs["racer"], "--threads", "3", "--bytes", "300000", "--fork"])
        while p.poll() is None:
            await shipper.flush()
            await asyncio.sleep(0.001)
        lines = finish(p)
        await shipper.flush()
        return lines

    try:
        lines = asyncio.run(main())
    finally:
        kill_all(unit)
    total = sum(l["sent"] for l in lines)
    assert total == sum(l["recv"] for l in lines) == 2 * 3 * 300000 + 100
    nxt: dict[str, int] = {}
    got = []
    for m in bus.msgs:
        assert m["first"] == nxt.get(m["source"], 0), "batches of a source are contiguous, in order"
        nxt[m["source"]] = m["first"] + m["count"]
        for direction, conn, start, end, interval in msgpack.unpackb(m["batch"], raw=False):
            assert end < END_CLOSED
            got.append(Record(conn, direction, start, end, interval, 0, 0))
    exact_cover(got, total)
    # restore: every record of the logs is closed, shipping resumes at the end
    shipper.rolled_back("j", "u")
    for f in log_files(unit.dir):
        raw = f.read_bytes()
        for i in range(REC_SIZE, len(raw), REC_SIZE):
            if raw[i:i + 4] == REC_MAGIC.to_bytes(4, "little"):
                assert struct.unpack_from("<Q", raw, i + 24)[0] & END_CLOSED


def test_in_process_ab_bench_bypasses_the_shim_in_its_direct_blocks(tmp_path, progs):
    """bench_shim's in-process A/B is only meaningful if its "direct" blocks really skip the
    shim and its "hooked" blocks really go through it: the records must cover exactly the
    hooked share of the stream (warm-up plus half the blocks, ABBA)."""
    rounds, blocks = 800, 8
    unit = Unit("u", tmp_path)
    try:
        p = unit.popen([progs["benchprog"], "ab-pingpong", str(rounds), str(blocks)])
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert re.fullmatch(r"hooked \d+\.\d+ direct \d+\.\d+\n", out), out
    finally:
        kill_all(unit)
    per = rounds // blocks
    hooked = per + per * blocks // 2  # warm-up + blocks 0, 3, 4, 7
    totals = defaultdict(int)
    for r in read_directory(unit.dir):
        totals[(r.conn, r.direction, r.pid)] += r.end - r.start
    assert len(totals) == 4 and set(totals.values()) == {hooked}, dict(totals)
