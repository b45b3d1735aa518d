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
    have = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
    if BENCH_VHOST not in have.stdout.split():
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", BENCH_VHOST], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", BENCH_VHOST, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
    return f"amqp://guest:guest@localhost/{BENCH_VHOST}"
