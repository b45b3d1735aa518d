"""Test helper: a fresh bus per transport with unique queue names, cleaned up afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from typing import Callable

from orchestrator.bus import Bus, open_bus

AMQP_URL = os.environ.get("GRIDCKPT_TEST_BROKER", "amqp://guest:guest@localhost/")


def _rabbitmqctl(*args: str) -> None:
    try:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {exc} (is RabbitMQ installed and running?)")


def make_vhost() -> str:
    """A fresh vhost (so this module's dead-letter queue is its own); returns its amqp:// URL."""
    name = f"gridckpt-bus-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"{AMQP_URL.rstrip('/')}/{name}"


def drop_vhost(url: str) -> None:
    _rabbitmqctl("delete_vhost", url.rsplit("/", 1)[1])


class BusEnv:
    """Buses of one transport for one test; names made unique by ``prefix``."""

    def __init__(self, transport: str, amqp_url: str = AMQP_URL) -> None:
        self.transport = transport
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.url = f"memory://{self.prefix}" if transport == "memory" else amqp_url
        self.buses: list[Bus] = []
        self.queues: set[str] = set()

    async def new_bus(self) -> Bus:
        bus = open_bus(self.url, connect_timeout=5)
        await bus.connect()
        self.buses.append(bus)
        return bus

    def q(self, name: str) -> str:
        """A queue name unique to this test."""
        name = f"{self.prefix}.{name}"
        self.queues.add(name)
        return name

    def key(self, *words: str) -> str:
        """A routing key (or pattern) in this test's own key space."""
        return ".".join((self.prefix,) + words)

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        """Dead letters of this test's queues (others' are drained and dropped)."""
        bus = self.buses[0]
        return [(b, r) for b, r in await bus.dead_letters() if self.prefix in r]

    async def cleanup(self) -> None:
        for bus in self.buses:
            await bus.close()
        if self.transport == "amqp" and self.queues:
            admin = open_bus(self.url, connect_timeout=5)
            await admin.connect()
            for name in self.queues:
                try:
                    await admin.delete_queue(name)
                except Exception:
                    pass  # exclusive and transient queues are gone already
            await admin.close()


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_dead(env: BusEnv, count: int, timeout: float = 10.0) -> list[tuple[bytes, str]]:
    """Collect at least ``count`` of this test's dead letters."""
    got: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        got += await env.dead_letters()
        if len(got) >= count:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(got)} of {count} dead letters after {timeout}s")
        await asyncio.sleep(0.05)
    return got

