#!/usr/bin/env python3
"""A unit that counts and checkpoints itself through the app protocol.

It prints ``count N`` once per step.  When gridckpt checkpoints it, it writes
``counter.json`` into the images directory the agent names; when gridckpt restarts it with
``GRIDCKPT_RESTORE`` set, it reads that file back and goes on from the saved count, printing
``restored count N from DIR`` first: the proof it did not start from scratch.

    python3 examples/counter_app.py --to 0 --interval 0.1     # counts forever
    python3 examples/counter_app.py --to 50                   # stops at 50

Run outside gridckpt it simply counts (the client is a no-op without GRIDCKPT_APP_SOCKET).
"""

import argparse
import json
import os
import sys
import time

try:
    from nodeagent.appclient import AppClient
except ImportError:   # run from a source tree without installing gridckpt
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from nodeagent.appclient import AppClient

STATE_FILE = "counter.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--to", type=int, default=0, help="stop after this count (0: never)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between counts")
    args = ap.parse_args()

    client = AppClient.from_env(safe_points=True)
    count = 0
    restore = client.restore_path()
    if restore:
        with open(os.path.join(restore, STATE_FILE)) as f:
            count = json.load(f)["count"]
        print(f"restored count {count} from {restore}", flush=True)

    @client.on_checkpoint
    def save(images_dir: str) -> None:
        # runs at a safe point of the loop below: `count` is consistent without a lock
        tmp = os.path.join(images_dir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"count": count, "pid": os.getpid(), "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(images_dir, STATE_FILE))
        print(f"checkpoint count {count} into {images_dir}", flush=True)

    @client.on_restart
    def restarted(images_dir: str) -> None:
        print(f"restart callback {images_dir}", flush=True)

    @client.on_post_checkpoint
    def committed(checkpoint_id: str) -> None:
        print(f"post_checkpoint {checkpoint_id}", flush=True)

    client.start()
    while args.to == 0 or count < args.to:
        count += 1
        print(f"count {count}", flush=True)
        time.sleep(args.interval)
        client.safe_point()
    print(f"done at {count}", flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
