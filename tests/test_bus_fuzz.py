"""1,000 fuzzed bodies over each bus: every one dead-lettered with a reason, the consumer keeps going."""

from __future__ import annotations

import asyncio
import collections

import pytest

from busenv import BusEnv, drop_vhost, make_vhost, wait_dead, wait_until
from fuzzmsgs import CATEGORIES, fuzz_bodies
from orchestrator import protocol


@pytest.fixture(scope="module")
def amqp_url():
    """One vhost for this module: its dead-letter queue sees only these tests' messages."""
    url = make_vhost()
    yield url
    drop_vhost(url)


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.amqp)])
async def env(request):
    e = BusEnv(request.param, request.getfixturevalue("amqp_url") if request.param == "amqp" else "")
    await e.new_bus()
    try:
        yield e
    finally:
        await e.cleanup()


async def test_fuzzed_messages_all_dead_lettered_consumer_survives(env):
    orch, agent = env.buses[0], await env.new_bus()
    got: list[str] = []

    async def handler(msg, delivery):
        got.append(msg["id"])

    queue = env.q("events")
    await orch.consume(queue, [env.key("events", "#")], handler, kind="quorum", prefetch=256)
    fuzz = fuzz_bodies(1000, seed=2)
    assert {c for c, _ in fuzz} == set(CATEGORIES)
    valid = []
    for start in range(0, len(fuzz), 100):  # a valid event after every 100 fuzzed bodies
        await asyncio.gather(*(agent.publish_raw(env.key("events", "s", "n"), body)
                               for _, body in fuzz[start:start + 100]))
        msg = protocol.make("pong", node="n", ping=str(start))
        valid.append(msg["id"])
        await agent.publish(env.key("events", "s", "n"), msg)
    await wait_until(lambda: len(got) == len(valid), timeout=20, what="every valid event")
    assert sorted(got) == sorted(valid)

    dead = await wait_dead(env, len(fuzz), timeout=20)
    assert collections.Counter(b for b, _ in dead) == collections.Counter(b for _, b in fuzz)
    assert all(r.startswith(f"malformed message on queue {queue}: ") and len(r) > len(queue) + 30 for _, r in dead)

    # Still consuming after the storm.
    last = protocol.make("pong", node="n", ping="after")
    await agent.publish(env.key("events", "s", "n"), last, mandatory=True)
    await wait_until(lambda: last["id"] in got, what="an event after the fuzz")
