"""Shim overhead benchmark: the same C programs with and without the shim, interleaved.

  python bench/bench_shim.py [--reps N] [--quick] [--json]

1-byte TCP ping-pong round trip over loopback, 64 KiB bulk throughput over loopback,
and a non-socket loop of 4 KiB file reads; plus A/A rows (ping-pong and bulk, no shim on
either side) that show the noise floor of the method.  Both ends are pinned to one CPU
(see benchprog.c).  Each measurement alternates runs without and with LD_PRELOAD (shim
logging into a temporary unit directory) and reports medians and the overhead ratio.

Then the same three in-process: one run alternates 200 blocks between the shim's hooks and
libc's own functions (both ends of a connection switch together), so drift between runs
cannot bias the ratio; this machine's run-to-run noise (see the A/A rows) is larger than the
targets, the in-process A/A is a fraction of it.  Targets: latency <= 3 %, throughput <= 1 %, non-socket <= 1 %.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import interpose  # noqa: E402
from interpose.control import ControlPage  # noqa: E402

BENCH_SRC = ROOT / "tests" / "progs" / "benchprog.c"


def build(tmp: Path) -> str:
    out = tmp / "benchprog"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(BENCH_SRC)], check=True)
    return str(out)


def run(cmd: list[str], env: dict[str, str]) -> float:
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300).stdout
    return float(out.split()[1])


def measure(name: str, cmd: list[str], reps: int, shim_env: dict, plain_env: dict, higher_is_better: bool,
            logdir: Path) -> dict:
    base, shim = [], []
    for i in range(reps):
        order = [(base, plain_env), (shim, shim_env)] if i % 2 == 0 else [(shim, shim_env), (base, plain_env)]
        for store, env in order:
            store.append(run(cmd, env))
            for f in logdir.glob("det.*.log"):  # keep the disk footprint flat between runs
                f.unlink()
    # Best-of-N: on a shared machine the other tenants only ever add time, so the best run
    # of each variant is the least disturbed one.  Medians are reported alongside.
    best = max if higher_is_better else min
    b, s = best(base), best(shim)
    overhead = (b / s - 1) if higher_is_better else (s / b - 1)
    mb, ms = statistics.median(base), statistics.median(shim)
    med_overhead = (mb / ms - 1) if higher_is_better else (ms / mb - 1)
    return {"bench": name, "without": b, "with": s, "overhead_pct": 100 * overhead,
            "median_without": mb, "median_with": ms, "median_overhead_pct": 100 * med_overhead,
            "unit": "MiB/s" if higher_is_better else "ns", "runs": reps}


def measure_ab(name: str, cmd: list[str], reps: int, shim_env: dict, plain_env: dict, higher_is_better: bool,
               logdir: Path) -> dict:
    """One process alternates blocks between the shim's hooks and libc's own functions
    (benchprog ab-*): both variants see the same machine state within milliseconds.  The
    same program without the shim (both variants libc's) gives the method's A/A."""
    def overheads(env: dict) -> list[float]:
        out = []
        for _ in range(reps):
            words = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                   timeout=300).stdout.split()
            hooked, direct = float(words[1]), float(words[3])
            out.append(100 * ((direct / hooked - 1) if higher_is_better else (hooked / direct - 1)))
            for f in logdir.glob("det.*.log"):
                f.unlink()
        return out
    with_shim, a_a = overheads(shim_env), overheads(plain_env)
    return {"bench": name, "median_overhead_pct": statistics.median(with_shim),
            "min_overhead_pct": min(with_shim), "max_overhead_pct": max(with_shim),
            "a_a_median_pct": statistics.median(a_a), "runs": reps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="runs per variant")
    ap.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cpu", type=int, default=os.cpu_count() - 1,
                    help="pin both ends to this CPU (default: the last one); -1: do not pin")
    args = ap.parse_args(argv)
    if args.cpu is not None and args.cpu < 0:
        args.cpu = None
    with tempfile.TemporaryDirectory(prefix="gridckpt-bench-") as tmp_s:
        tmp = Path(tmp_s)
        prog = build(tmp)
        logdir = tmp / "unit"
        logdir.mkdir()
        ControlPage(tmp / "control").close()
        plain = {k: v for k, v in os.environ.items() if not k.startswith("GRIDCKPT_") and k != "LD_PRELOAD"}
        if args.cpu is not None:
            plain["BENCH_CPU"] = str(args.cpu)
        shim = interpose.shim_env("bench", logdir, tmp / "control", base=plain)
        data = tmp / "data.bin"
        data.write_bytes(os.urandom(1 << 20))
        scale = 10 if args.quick else 1
        rows = [
            measure("tcp ping-pong 1 B round trip", [prog, "pingpong", str(30000 // scale)], args.reps, shim, plain,
                    False, logdir),
            measure("tcp bulk 64 KiB writes", [prog, "bulk", str(2000 // scale)], args.reps, shim, plain, True, logdir),
            measure("file reads 4 KiB (non-socket)", [prog, "fileread", str(data), str(2000000 // scale)], args.reps,
                    shim, plain, False, logdir),
            # A/A: the same program without the shim on both sides: the method's noise floor.
            measure("A/A ping-pong, no shim either side", [prog, "pingpong", str(30000 // scale)], args.reps, plain,
                    plain, False, logdir),
            measure("A/A bulk, no shim either side", [prog, "bulk", str(2000 // scale)], args.reps, plain, plain,
                    True, logdir),
        ]
        ab_rows = [
            measure_ab("tcp ping-pong 1 B round trip", [prog, "ab-pingpong", str(40000 // scale), "200"],
                       args.reps, shim, plain, False, logdir),
            measure_ab("tcp bulk 64 KiB writes", [prog, "ab-bulk", str(4000 // scale), "200"], args.reps, shim,
                       plain, True, logdir),
            measure_ab("file reads 4 KiB (non-socket)", [prog, "ab-fileread", str(data), str(2000000 // scale),
                                                         "200"], args.reps, shim, plain, False, logdir),
        ]
    targets = {"A/A ping-pong, no shim either side": 0.0, "A/A bulk, no shim either side": 0.0,
               "tcp ping-pong 1 B round trip": 3.0, "tcp bulk 64 KiB writes": 1.0, "file reads 4 KiB (non-socket)": 1.0}
    for r in rows:
        r["target_pct"] = targets[r["bench"]]
        r["ratio"] = round(1 + r["overhead_pct"] / 100, 4)
    for r in ab_rows:
        r["target_pct"] = targets[r["bench"]]
    if args.json:
        print(json.dumps({"processes": rows, "in_process_ab": ab_rows}, indent=2))
    else:
        print(f"{'benchmark':32} {'without':>10} {'with shim':>10} {'ratio':>7} {'overhead':>9} {'target':>7}"
              f" {'median w/o':>11} {'median w/':>10} {'med ovh':>8}")
        for r in rows:
            print(f"{r['bench']:32} {r['without']:>10.1f} {r['with']:>10.1f} {r['ratio']:>7.4f} "
                  f"{r['overhead_pct']:>8.2f}% {r['target_pct']:>6.1f}% {r['median_without']:>11.1f}"
                  f" {r['median_with']:>10.1f} {r['median_overhead_pct']:>7.2f}%")
        print(f"(best of {args.reps} interleaved runs per variant, medians alongside; ping-pong and file reads"
              " in ns per operation, bulk in MiB/s)")
        print()
        print(f"{'in-process A/B (200 blocks)':32} {'overhead':>9} {'min':>7} {'max':>7} {'target':>7} {'A/A':>7}")
        for r in ab_rows:
            print(f"{r['bench']:32} {r['median_overhead_pct']:>8.2f}% {r['min_overhead_pct']:>6.2f}%"
                  f" {r['max_overhead_pct']:>6.2f}% {r['target_pct']:>6.1f}% {r['a_a_median_pct']:>6.2f}%")
        print(f"(median of {args.reps} runs; each run alternates 200 blocks, ABBA, between the shim's hooks and"
              " libc's functions in one process; A/A: the same without the shim)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
