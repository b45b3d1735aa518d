"""Where the benchmarks talk to RabbitMQ: a virtual host of their own, made on demand."""

from __future__ import annotations

import os
import subprocess

BENCH_VHOST = "gridckpt-bench"


def bench_broker(url: str | None = None) -> str:
    """``url`` if given (or $GRIDCKPT_BENCH_BROKER), else the local broker's bench vhost,
    created with rabbitmqctl when missing, so no benchmark leaves messages in another VO."""
    url = url or os.environ.get("GRIDCKPT_BENCH_BROKER")
    if url:
        return url
    try:
        have = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
        if have.returncode:
            raise OSError(have.stderr.strip().splitlines()[0] if have.stderr.strip() else f"exit {have.returncode}")
        if BENCH_VHOST not in have.stdout.split():
            for cmd in (["add_vhost", BENCH_VHOST], ["set_permissions", "-p", BENCH_VHOST, "guest", ".*", ".*", ".*"]):
                done = subprocess.run(["rabbitmqctl", "-q", *cmd], capture_output=True, text=True, timeout=60)
                if done.returncode:
                    raise OSError(done.stderr.strip() or f"rabbitmqctl {cmd[0]}: exit {done.returncode}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"benchmark: no local RabbitMQ broker to use ({exc}); start it (deploy/setup.sh, or "
                         "rabbitmq-server -detached; rabbitmqctl await_startup) or pass --broker / "
                         "$GRIDCKPT_BENCH_BROKER") from None
    return f"amqp://guest:guest@localhost/{BENCH_VHOST}"
