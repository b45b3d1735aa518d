"""Running the orchestrator daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from .bus import open_bus
from .bus.base import Bus
from .control import default_broker, default_store
from .daemon import Orchestrator
from .store import Store


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the daemons' clean shutdown)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_daemon(args: argparse.Namespace, what: str, make: Callable[[Bus, Store], Any]) -> int:
    """Run the daemon ``make(bus, store)`` returns (start/stop coroutines) until SIGTERM or
    SIGINT; 0 after a clean shutdown, 2 without a broker."""
    broker = args.broker or default_broker()
    if broker.startswith("memory://"):
        print(f"gridckpt {what}: a daemon needs a broker: give --broker amqp://... or GRIDCKPT_BROKER "
              "(memory:// serves only `gridckpt run`)", file=sys.stderr)
        return 2
    store = Store(Path(args.store or default_store()))
    bus = open_bus(broker)
    await bus.connect()
    daemon = make(bus, store)
    stop = stop_event_on_signals()
    try:
        await daemon.start()
        await stop.wait()
    finally:
        await daemon.stop()
        await bus.close()
    return 0


async def serve_orchestrator(args: argparse.Namespace) -> int:
    """`gridckpt orchestrator`: the job checkpointer daemon."""
    return await serve_daemon(args, "orchestrator",
                              lambda bus, store: Orchestrator(bus, store, heartbeat_interval=args.heartbeat))
