"""Benchmark of the determinant log and the recovery line.

1. Generates a determinant log in the store's own format (``DeterminantLog`` files,
   written directly: 24-byte records per unit file, the conn table, the events file):
   by default 1,000 units, 100 checkpoints each, 10 million send/recv records.
   Each unit writes 5 streams to random peers; each stream carries equal chunks, read
   by its peer a fixed delay later; checkpoint times are random per unit, so the log
   is that of an independent-checkpointing run (dense traffic: expect a domino).
2. Measures, in the same run: reading the files, merely decoding every record
   (``struct.iter_unpack`` to tuples), ``DeterminantLog.load()`` (the model), computing
   the line (one unit failed) and the full result (plus useless and obsolete).
3. Runs the offline command on a generated exchange-format file of 1 million lines.

    .venv/bin/python bench/bench_recovery.py [--units N] [--checkpoints K]
        [--records R] [--exchange-lines L] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from array import array
from bisect import bisect_right

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from orchestrator.recovery import cli, line  # noqa: E402
from orchestrator.recovery.detlog import DeterminantLog, record_key  # noqa: E402

STREAMS_PER_UNIT = 5
CHUNK = 1000                 # bytes per record
HORIZON = 1_000_000          # time units of the simulated run


def plan(units: int, checkpoints: int, records: int, seed: int = 7):
    """Streams (writer, reader, phase, delay), per-unit checkpoint times, chunks per stream."""
    rnd = random.Random(seed)
    streams = []
    for u in range(units):
        for _ in range(STREAMS_PER_UNIT):
            v = rnd.randrange(units - 1)
            v = v + 1 if v >= u else v
            streams.append((u, v, rnd.randrange(1000), rnd.randrange(1, 5000)))
    ckpt_times = [sorted(rnd.sample(range(1, HORIZON), checkpoints)) for _ in range(units)]
    chunks = max(1, records // (2 * len(streams)))
    return streams, ckpt_times, chunks


def chunk_times(phase: int, chunks: int) -> range:
    step = HORIZON // chunks
    return range(phase % step, phase % step + step * chunks, step)


def generate_detlog(d: str, units: int, checkpoints: int, records: int) -> int:
    """Write the log files directly (not through append); returns the record count."""
    streams, ckpt, chunks = plan(units, checkpoints, records)
    names = [f"u{u}" for u in range(units)]
    with open(os.path.join(d, "conns.jsonl"), "w") as f:
        f.writelines(json.dumps(f"10.0.{s // 250}.{s % 250}:4000>peer#{s}") + "\n"
                     for s in range(len(streams)))
    with open(os.path.join(d, "events.jsonl"), "w") as f:
        for u in range(units):
            f.write(json.dumps({"kind": "unit", "unit": names[u]}) + "\n")
        for u in range(units):
            f.writelines(json.dumps({"kind": "checkpoint", "unit": names[u], "seq": k}) + "\n"
                         for k in range(1, checkpoints + 1))
        f.write(json.dumps({"kind": "failed", "unit": names[0]}) + "\n")
    per_unit: list[list[int]] = [[] for _ in range(units)]    # stream ids touching the unit
    for sid, (u, v, _phase, _delay) in enumerate(streams):
        per_unit[u].append(sid)
        per_unit[v].append(sid)
    starts = array("Q", range(0, CHUNK * chunks, CHUNK))
    ends = array("Q", range(CHUNK, CHUNK * (chunks + 1), CHUNK))
    total = 0
    for u in range(units):
        parts = []
        times_u = ckpt[u]
        for sid in per_unit[u]:
            w, _v, phase, delay = streams[sid]
            direction = 0 if w == u else 1
            times = chunk_times(phase, chunks)
            shift = 0 if direction == 0 else delay
            base = record_key(sid, direction, 0)
            keys = array("Q", [base | bisect_right(times_u, t + shift) for t in times])
            block = array("Q", bytes(24 * chunks))
            block[0::3] = keys
            block[1::3] = starts
            block[2::3] = ends
            parts.append(block)
            total += chunks
        with open(os.path.join(d, f"u{u}.bin"), "wb") as f:
            for block in parts:
                f.write(block.tobytes())
    return total


def generate_exchange(path: str, lines: int) -> int:
    """An exchange-format file of about ``lines`` lines (100 units, 10 checkpoints each)."""
    units, checkpoints = 100, 10
    records = lines - units - units * checkpoints - 1
    streams, ckpt, chunks = plan(units, checkpoints, records, seed=11)
    out = []
    for u in range(units):
        out.append(json.dumps({"kind": "unit", "unit": f"u{u}"}))
    for u in range(units):
        out.extend(json.dumps({"kind": "checkpoint", "unit": f"u{u}", "seq": k})
                   for k in range(1, checkpoints + 1))
    for sid, (w, v, phase, delay) in enumerate(streams):
        conn = f"c{sid}"
        for m, t in enumerate(chunk_times(phase, chunks)):
            out.append(f'{{"kind": "send", "unit": "u{w}", "conn": "{conn}", "start": '
                       f'{m * CHUNK}, "end": {(m + 1) * CHUNK}, "interval": '
                       f'{bisect_right(ckpt[w], t)}}}')
            out.append(f'{{"kind": "recv", "unit": "u{v}", "conn": "{conn}", "start": '
                       f'{m * CHUNK}, "end": {(m + 1) * CHUNK}, "interval": '
                       f'{bisect_right(ckpt[v], t + delay)}}}')
    out.append(json.dumps({"kind": "failed", "unit": "u0"}))
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return len(out)


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--checkpoints", type=int, default=100)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--exchange-lines", type=int, default=1_000_000)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="bench-recovery-")
    os.makedirs(work, exist_ok=True)
    logdir = os.path.join(work, "determinants")
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    rows = []
    try:
        n, t_gen = timed(lambda: generate_detlog(logdir, args.units, args.checkpoints,
                                                 args.records))
        size = sum(os.path.getsize(os.path.join(logdir, f)) for f in os.listdir(logdir))
        print(f"generated {n:,} records of {args.units} units x {args.checkpoints} checkpoints "
              f"({size / 1e6:.0f} MB) in {t_gen:.1f} s (not counted)", flush=True)
        files = [os.path.join(logdir, f"u{u}.bin") for u in range(args.units)]

        def read_all():
            total = 0
            for p in files:
                with open(p, "rb") as f:
                    total += len(f.read())
            return total

        def decode_all():
            count = 0
            unpack = struct.Struct("<QQQ").iter_unpack
            for p in files:
                with open(p, "rb") as f:
                    count += len(list(unpack(f.read())))
            return count

        read_all()                                  # warm the page cache for every step
        _, t_read = timed(read_all)
        decoded, t_decode = timed(decode_all)
        assert decoded == n
        model, t_load = timed(lambda: DeterminantLog(logdir).load())
        graph, t_graph = timed(lambda: line.build_graph(model))
        result, t_line = timed(lambda: line.compute(model, extras=False, graph=graph))
        full, t_full = timed(lambda: line.compute(model))
        t_compute = t_graph + t_line
        rows += [
            ("read the unit files (page cache)", t_read, ""),
            ("decode every record (iter_unpack)", t_decode, f"{n:,} records"),
            ("load() -> model", t_load, f"{len(model.streams):,} streams"),
            ("  build rollback-dependency graph", t_graph,
             f"{graph.graph.number_of_nodes():,} nodes, {graph.graph.number_of_edges():,} edges"),
            ("  line + replay + domino (1 failed)", t_line,
             f"domino={result.domino}, {len(result.replay):,} replay ranges"),
            ("compute = graph + line", t_compute, f"{t_compute / t_decode:.2f} x decode "
                                                   f"(limit 3 x)"),
            ("load + compute", t_load + t_compute, "limit 10 s"),
            ("full result (+ useless, obsolete)", t_full,
             f"{sum(map(len, full.useless.values())):,} useless, "
             f"{sum(map(len, full.obsolete.values())):,} obsolete"),
        ]
        xpath = os.path.join(work, "log.jsonl")
        lines, t_xgen = timed(lambda: generate_exchange(xpath, args.exchange_lines))
        print(f"generated an exchange file of {lines:,} lines "
              f"({os.path.getsize(xpath) / 1e6:.0f} MB) in {t_xgen:.1f} s (not counted)",
              flush=True)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            status, t_offline = timed(lambda: cli.recovery_line_offline(xpath, [], True))
        assert status == 0, "the offline command failed on the generated file"
        out = json.loads(sink.getvalue())
        rows.append((f"offline recovery-line --json, {lines:,} lines", t_offline,
                     f"domino={out['domino']}, {len(out['replay'])} replay ranges"))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'step'.ljust(width)}  {'seconds':>8}  notes")
    for name, seconds, note in rows:
        print(f"{name.ljust(width)}  {seconds:8.2f}  {note}")
    ok = t_load + t_compute <= 10 and t_compute <= 3 * t_decode
    print(f"\ntargets (load + compute <= 10 s, compute <= 3 x decode): "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
