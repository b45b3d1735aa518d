#!/usr/bin/env python3
"""A job unit that computes (a running sum of squares) and reports its progress.

Prints ``step=<n> sum=<s>`` every ``--every`` seconds.  With ``--steps N`` it exits after N
steps with ``--exit-code``; a forked helper child (``--child``) shows a multi-process tree.
The numbers continue from where they were after a restore, which is how the examples prove
a restart resumed from the checkpoint rather than from scratch.
"""

import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=0, help="exit after this many steps (0: run forever)")
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--child", action="store_true", help="fork a helper child that also reports")
    args = ap.parse_args()
    name = os.environ.get("GRIDCKPT_UNIT", "unit")
    if args.child and os.fork() == 0:
        while True:
            time.sleep(args.every * 5)
            print(f"{name} child alive ppid={os.getppid()}", flush=True)
    step, total = 0, 0
    while not args.steps or step < args.steps:
        step += 1
        total += step * step
        print(f"{name} step={step} sum={total}", flush=True)
        time.sleep(args.every)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
