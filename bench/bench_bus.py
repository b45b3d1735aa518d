"""Bus benchmark over memory:// and amqp:// in one run; prints a table.

    python bench/bench_bus.py [--broker amqp://guest:guest@localhost/] [--n 2000] [--events 50000] [--window 1000]

1. command round trip orchestrator -> agent -> orchestrator: the orchestrator publishes a
   ``ping`` (mandatory, confirmed) to ``agent.<site>.<node>`` (the agent's exclusive queue); the
   agent, on its own connection, answers a ``pong`` (confirmed) on ``events.<site>.<node>``, which
   the orchestrator consumes from a quorum queue.  Median and p99 over ``--n`` round trips.
2. events/s into the orchestrator: the agent publishes ``--events`` unit events with publisher
   confirms, ``--window`` publishes in flight; the orchestrator consumes and acks each one from a
   quorum queue.  Rate = events / (time from the first publish to the last event handled).
   On amqp:// the bus groups a burst of publishes to one routing key into envelopes (one
   confirm per envelope; each event still decoded, deduped, handled one by one): that is the
   "amqp://" row.  The "amqp:// unbatched" row is the same test with ``batching=False`` (one
   AMQP message and one confirm per event), for comparison.

Run it on a virtual host without a live orchestrator (its events would reach the
orchestrator's ``events.#`` queue); the benchmark refuses one that has it, unless ``--force``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from orchestrator import protocol  # noqa: E402
from orchestrator.bus import Bus, open_bus  # noqa: E402


async def round_trips(url: str, n: int, warmup: int = 50) -> list[float]:
    """``n`` ping/pong round trips in milliseconds (after ``warmup`` unmeasured ones)."""
    site, node = f"bench{uuid.uuid4().hex[:8]}", "n1"
    orch, agent = open_bus(url, connect_timeout=5), open_bus(url, connect_timeout=5)
    await orch.connect()
    await agent.connect()
    waiting: dict[str, asyncio.Future] = {}
    events_q = f"{site}.orchestrator.events"

    async def on_event(msg, delivery):
        fut = waiting.pop(msg.get("ping", ""), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def on_command(msg, delivery):
        await agent.publish(protocol.event_key(site, node),
                            protocol.make("pong", node=node, ping=msg["id"], sent=msg.get("sent")))

    try:
        consumer = await orch.consume(events_q, [f"events.{site}.*"], on_event, kind="quorum", prefetch=256)
        await agent.consume(f"{site}.agent.{node}", [protocol.agent_key(site, node)], on_command,
                            kind="exclusive", prefetch=64)
        loop = asyncio.get_running_loop()
        times = []
        for i in range(warmup + n):
            ping = protocol.make("ping", sent=time.time())
            fut = loop.create_future()
            waiting[ping["id"]] = fut
            t0 = time.perf_counter()
            await orch.publish(protocol.agent_key(site, node), ping, mandatory=True)
            await asyncio.wait_for(fut, 10)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        await agent.close()
        await consumer.cancel()
        await _drop(orch, [events_q])
        await orch.close()


async def events_rate(url: str, n: int, window: int, **bus_options) -> float:
    """Events per second from an agent into the orchestrator, confirmed and acked."""
    site, node = f"bench{uuid.uuid4().hex[:8]}", "n1"
    orch, agent = open_bus(url, connect_timeout=5), open_bus(url, connect_timeout=5, **bus_options)
    await orch.connect()
    await agent.connect()
    events_q = f"{site}.orchestrator.events"
    received = 0
    done = asyncio.Event()

    async def on_event(msg, delivery):
        nonlocal received
        received += 1
        if received >= n:
            done.set()

    try:
        consumer = await orch.consume(events_q, [f"events.{site}.*"], on_event, kind="quorum", prefetch=2000)
        key = protocol.event_key(site, node)
        msgs = [protocol.make("unit_event", job="j1", unit=f"u{i % 8}", node=node, state="running", pid=1000 + i)
                for i in range(n)]
        todo = iter(msgs)

        async def sender():  # ``window`` of these keep that many publishes in flight
            for m in todo:
                await agent.publish(key, m, timeout=30)

        t0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(window)))
        await asyncio.wait_for(done.wait(), 120)
        return n / (time.perf_counter() - t0)
    finally:
        await agent.close()
        await consumer.cancel()
        await _drop(orch, [events_q])
        await orch.close()


async def _has_orchestrator(url: str) -> bool:
    """True when ``url``'s vhost has the orchestrator's events queue (bound to ``events.#``)."""
    bus = open_bus(url, connect_timeout=5)
    await bus.connect()
    try:
        return await bus.queue_exists(protocol.EVENTS_QUEUE)
    finally:
        await bus.close()


async def _drop(bus: Bus, queues: list[str]) -> None:
    delete = getattr(bus, "delete_queue", None)
    for q in queues:
        try:
            await delete(q)
        except Exception:
            pass


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default="amqp://guest:guest@localhost/", help="amqp URL (default %(default)s)")
    ap.add_argument("--n", type=int, default=2000, help="round trips per transport (default %(default)s)")
    ap.add_argument("--events", type=int, default=50_000, help="events for the rate test (default %(default)s)")
    ap.add_argument("--window", type=int, default=1000, help="publishes in flight (default %(default)s)")
    ap.add_argument("--no-memory", action="store_true", help="skip memory://")
    ap.add_argument("--force", action="store_true",
                    help="run even if an orchestrator's events queue exists on the broker's vhost")
    ap.add_argument("--no-unbatched", action="store_true", help="skip the amqp:// rate without envelopes")
    args = ap.parse_args()
    if args.n < 2 or args.events < 1 or args.window < 1:
        print("bench_bus: --n must be at least 2, --events and --window positive", file=sys.stderr)
        return 2
    rows = []
    urls = ([] if args.no_memory else ["memory://bench"]) + [args.broker]
    try:
        if not args.force and await _has_orchestrator(args.broker):
            print(f"bench_bus: {args.broker} has an orchestrator's queue {protocol.EVENTS_QUEUE!r}: the benchmark's "
                  "events would pile up there; use a virtual host of its own (amqp://.../bench) or --force",
                  file=sys.stderr)
            return 2
        for url in urls:
            rt = await round_trips(url, args.n)
            rate = await events_rate(url, args.events, args.window)
            q = statistics.quantiles(rt, n=100)
            rows.append((url.split("://")[0] + "://", f"{statistics.median(rt):.3f}", f"{q[98]:.3f}", f"{rate:,.0f}"))
        if not args.no_unbatched:
            # The same with every event in its own AMQP message (no envelopes), for comparison.
            rate = await events_rate(args.broker, min(args.events, 10_000), args.window, batching=False)
            rows.append(("amqp:// unbatched", "-", "-", f"{rate:,.0f}"))
    except Exception as exc:
        print(f"bench_bus: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{'transport':<18} {'round trip median ms':>21} {'round trip p99 ms':>18} {'events/s (confirms)':>20}")
    for name, med, p99, rate in rows:
        print(f"{name:<18} {med:>21} {p99:>18} {rate:>20}")
    print(f"({args.n} round trips, {args.events} events, {args.window} publishes in flight, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
