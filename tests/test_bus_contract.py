"""One contract suite for both buses: memory:// and amqp:// (real RabbitMQ) must behave alike."""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack
import pytest

from busenv import BusEnv, drop_vhost, make_vhost, wait_dead, wait_until
from orchestrator import protocol
from orchestrator.bus import BusError, Delivery, PublishTimeout, RequestTimeout, Unroutable, open_bus

TRANSPORTS = ["memory", pytest.param("amqp", marks=pytest.mark.amqp)]


@pytest.fixture(scope="module")
def amqp_url():
    """One vhost for this module: its dead-letter queue sees only these tests' messages."""
    url = make_vhost()
    yield url
    drop_vhost(url)


@pytest.fixture(params=TRANSPORTS)
async def env(request):
    e = BusEnv(request.param, request.getfixturevalue("amqp_url") if request.param == "amqp" else "")
    await e.new_bus()
    try:
        yield e
    finally:
        await e.cleanup()


def recorder():
    got: list[tuple[dict, Delivery]] = []

    async def handler(msg, delivery):
        got.append((msg, delivery))

    return got, handler


def ping(**kw):
    return protocol.make("ping", sent=time.time(), **kw)


async def test_publish_consume(env):
    bus = env.buses[0]
    got, handler = recorder()
    await bus.consume(env.q("events"), [env.key("events", "#")], handler, kind="quorum")
    sent = [protocol.make("pong", node=f"n{i}", ping="p") for i in range(3)]
    for i, m in enumerate(sent):
        await bus.publish(env.key("events", "s", f"n{i}"), m, mandatory=True)
    await wait_until(lambda: len(got) == 3, what="3 deliveries")
    assert [m["id"] for m, _ in got] == [m["id"] for m in sent]
    assert [m["node"] for m, _ in got] == ["n0", "n1", "n2"]
    assert [d.routing_key for _, d in got] == [env.key("events", "s", f"n{i}") for i in range(3)]
    assert all(d.message_id == m["id"] and not d.redelivered for m, d in got)


async def test_topic_wildcards(env):
    bus = env.buses[0]
    star, hashq, exact = recorder(), recorder(), recorder()
    await bus.consume(env.q("star"), [env.key("a", "*")], star[1], kind="transient")
    await bus.consume(env.q("hash"), [env.key("#", "z")], hashq[1], kind="transient")
    await bus.consume(env.q("exact"), [env.key("a", "b")], exact[1], kind="transient")
    keys = {"ab": env.key("a", "b"), "abz": env.key("a", "b", "z"), "xz": env.key("x", "z"),
            "z": env.key("z"), "a": env.key("a")}
    for tag, key in keys.items():
        await bus.publish(key, ping(id=f"{env.prefix}-{tag}"))
    await bus.publish(env.key("done", "z"), ping(id=f"{env.prefix}-done"))
    await wait_until(lambda: len(hashq[0]) == 4, what="the # queue")
    await asyncio.sleep(0.1)
    tags = lambda got: sorted(m["id"].rsplit("-", 1)[1] for m, _ in got)  # noqa: E731
    assert tags(star[0]) == ["ab"]
    assert tags(hashq[0]) == ["abz", "done", "xz", "z"]
    assert tags(exact[0]) == ["ab"]


async def test_mandatory_unroutable_raises(env):
    bus = env.buses[0]
    with pytest.raises(Unroutable):
        await bus.publish(env.key("agent", "s", "ghost"), ping(), mandatory=True)
    await bus.publish(env.key("agent", "s", "ghost"), ping())  # not mandatory: silently dropped
    with pytest.raises(Unroutable):
        await bus.request(env.key("agent", "s", "ghost"), ping(), timeout=2)
    # The bus still works after a returned message.
    got, handler = recorder()
    await bus.consume(env.q("agent"), [env.key("agent", "s", "n1")], handler, kind="exclusive")
    await bus.publish(env.key("agent", "s", "n1"), ping(), mandatory=True)
    await wait_until(lambda: len(got) == 1, what="delivery after an unroutable publish")


async def test_request_reply(env):
    server = await env.new_bus()
    client = env.buses[0]

    async def control(msg, delivery):
        assert delivery.reply_to and delivery.correlation_id
        return protocol.make("control_reply", ok=True, result={"op": msg["op"], "args": msg["args"]})

    await server.consume(env.q("control"), [env.key("control")], control, kind="exclusive")
    replies = await asyncio.gather(*(
        client.request(env.key("control"), protocol.make("control", op="status", args={"i": i}), timeout=5)
        for i in range(10)))
    assert [r["result"]["args"]["i"] for r in replies] == list(range(10))
    assert all(r["type"] == "control_reply" and r["ok"] for r in replies)


async def test_request_timeout(env):
    bus = env.buses[0]
    got, silent = recorder()
    await bus.consume(env.q("silent"), [env.key("silent")], silent, kind="exclusive")
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout):
        await bus.request(env.key("silent"), protocol.make("control", op="x", args={}), timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 3
    assert len(got) == 1


@pytest.mark.parametrize("kind", ["quorum", "exclusive"])
async def test_handler_exception_redelivered_then_dead_lettered(env, kind):
    bus = env.buses[0]
    calls: list[Delivery] = []

    async def failing(msg, delivery):
        calls.append(delivery)
        raise RuntimeError("boom")

    queue = env.q(f"fail-{kind}")
    await bus.consume(queue, [env.key("fail")], failing, kind=kind)
    msg = ping()
    await bus.publish(env.key("fail"), msg, mandatory=True)
    dead = await wait_dead(env, 1)
    assert len(calls) == 1 + protocol.DELIVERY_LIMIT
    assert [d.redelivered for d in calls] == [False] + [True] * protocol.DELIVERY_LIMIT
    assert dead == [(protocol.encode(msg), f"delivery_limit on queue {queue}")] or \
        (protocol.decode(dead[0][0])["id"] == msg["id"] and dead[0][1] == f"delivery_limit on queue {queue}")


async def test_handler_recovers_after_failures(env):
    bus = env.buses[0]
    calls = []

    async def flaky(msg, delivery):
        calls.append(msg["id"])
        if len(calls) < 3:
            raise RuntimeError("not yet")

    await bus.consume(env.q("flaky"), [env.key("flaky")], flaky, kind="quorum")
    msg = ping()
    await bus.publish(env.key("flaky"), msg)
    await wait_until(lambda: len(calls) == 3, what="third delivery")
    await asyncio.sleep(0.2)
    assert calls == [msg["id"]] * 3  # the dedupe does not swallow a redelivery after a failure
    assert await env.dead_letters() == []


async def test_duplicate_message_id_delivered_once(env):
    bus = env.buses[0]
    got, handler = recorder()
    await bus.consume(env.q("dup"), [env.key("dup")], handler, kind="quorum")
    first, second = ping(), ping()
    for m in (first, first, first, second):
        await bus.publish(env.key("dup"), m)
    await wait_until(lambda: any(m["id"] == second["id"] for m, _ in got), what="the second message")
    assert [m["id"] for m, _ in got] == [first["id"], second["id"]]


async def test_malformed_bodies_dead_lettered_with_reason(env, caplog):
    bus = env.buses[0]
    got, handler = recorder()
    queue = env.q("events")
    await bus.consume(queue, [env.key("events", "#")], handler, kind="quorum")
    bad = {
        b"\xc1garbage": "not msgpack",
        msgpack.packb({"v": 99, "type": "ping", "id": "x"}): "protocol version 99",
        msgpack.packb({"v": 1, "type": "nope", "id": "x"}): "unknown message type 'nope'",
        msgpack.packb({"v": 1, "type": "pong", "id": "x", "ping": "p"}): "missing field 'node'",
        msgpack.packb({"v": 1, "type": "pong", "id": "x", "node": 5, "ping": "p"}): "field 'node' is int",
    }
    with caplog.at_level(logging.WARNING, logger="gridckpt.bus"):
        for body in bad:
            await bus.publish_raw(env.key("events", "s", "n"), body)
        good = protocol.make("pong", node="n", ping="p")
        await bus.publish(env.key("events", "s", "n"), good)
        await wait_until(lambda: len(got) == 1, what="the valid message after malformed ones")
        dead = await wait_dead(env, len(bad))
    assert got[0][0]["id"] == good["id"]
    assert sorted(b for b, _ in dead) == sorted(bad)
    for body, reason in dead:
        assert bad[body] in reason and queue in reason, reason
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "gridckpt.bus")
    assert all(fragment in logged for fragment in bad.values())


async def test_exclusive_queue_gone_after_close(env):
    agent = await env.new_bus()
    orch = env.buses[0]
    queue = env.q("agent-n1")
    got, handler = recorder()
    await agent.consume(queue, [env.key("agent", "s", "n1")], handler, kind="exclusive")
    await orch.publish(env.key("agent", "s", "n1"), ping(), mandatory=True)
    await wait_until(lambda: len(got) == 1, what="command delivery")
    other = await env.new_bus()
    with pytest.raises(BusError):
        await other.consume(queue, [env.key("agent", "s", "n1")], handler, kind="exclusive")
    await agent.close()
    with pytest.raises(Unroutable):
        await orch.publish(env.key("agent", "s", "n1"), ping(), mandatory=True)


async def test_transient_queue_deleted_with_its_consumer(env):
    bus = env.buses[0]
    got, handler = recorder()
    consumer = await bus.consume(env.q("hb"), [env.key("heartbeat", "#")], handler, kind="transient")
    await bus.publish(env.key("heartbeat", "s", "n"), ping(), mandatory=True)
    await wait_until(lambda: len(got) == 1, what="heartbeat")
    await consumer.cancel()
    with pytest.raises(Unroutable):
        await bus.publish(env.key("heartbeat", "s", "n"), ping(), mandatory=True)


async def test_close_waits_for_in_flight_handler(env):
    bus = await env.new_bus()
    started, finished = asyncio.Event(), []

    async def slow(msg, delivery):
        started.set()
        await asyncio.sleep(0.5)
        finished.append(msg["id"])

    queue = env.q("slow")
    await bus.consume(queue, [env.key("slow")], slow, kind="quorum")
    msg = ping()
    await env.buses[0].publish(env.key("slow"), msg)
    await asyncio.wait_for(started.wait(), 5)
    await bus.close()
    assert finished == [msg["id"]]
    # It was acked: a new consumer of the durable queue does not get it again.
    again, handler = recorder()
    await env.buses[0].consume(queue, [env.key("slow")], handler, kind="quorum")
    await asyncio.sleep(0.3)
    assert again == []


async def test_reply_dropped_when_handler_returns_nothing_useful(env):
    """A handler answering a plain publish (no reply_to) is acked; no reply is sent anywhere."""
    bus = env.buses[0]
    got = []

    async def answers(msg, delivery):
        got.append(msg)
        return protocol.make("control_reply", ok=True)

    await bus.consume(env.q("noreply"), [env.key("noreply")], answers, kind="quorum")
    await bus.publish(env.key("noreply"), ping())
    await wait_until(lambda: len(got) == 1, what="delivery")
    await asyncio.sleep(0.1)
    assert len(got) == 1 and await env.dead_letters() == []


def test_open_bus_rejects_unknown_scheme():
    with pytest.raises(BusError, match="unsupported bus URL 'redis://x'"):
        open_bus("redis://x")


def test_memory_buses_on_one_url_share_a_broker():
    from orchestrator.bus.memory import MemoryBus
    a, b, c = MemoryBus("memory://"), MemoryBus("memory:///"), MemoryBus("memory://other")
    assert a._broker is b._broker and a._broker is not c._broker


@pytest.mark.amqp
async def test_amqp_connect_gives_up_naming_the_url():
    bus = open_bus("amqp://guest:secret@127.0.0.1:1/vo", connect_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(BusError) as err:
        await bus.connect()
    assert 0.9 < time.monotonic() - t0 < 5
    assert "amqp://guest:***@127.0.0.1:1/vo" in str(err.value) and "secret" not in str(err.value)


@pytest.mark.amqp
async def test_amqp_unknown_vhost_is_a_clear_error():
    bus = open_bus("amqp://guest:guest@localhost/no-such-vo", connect_timeout=2.0)
    with pytest.raises(BusError, match="refused virtual host .no-such-vo."):
        await bus.connect()


@pytest.mark.parametrize("kind", ["quorum", "exclusive"])
async def test_burst_each_message_handled_once_poison_dead_lettered(env, kind):
    """600 concurrent publishes (amqp groups them into envelopes): the same per-message contract."""
    bus, agent = env.buses[0], await env.new_bus()
    poison = {f"{env.prefix}-poison-{i}" for i in range(3)}
    flaky = {f"{env.prefix}-m-{i}" for i in range(0, 600, 50)}
    calls: dict[str, int] = {}
    handled: list[str] = []
    batched = []

    async def handler(msg, delivery):
        mid = msg["id"]
        calls[mid] = calls.get(mid, 0) + 1
        batched.append("x-gridckpt-batch" in delivery.headers)
        if mid in poison or (mid in flaky and calls[mid] == 1):
            raise RuntimeError("fails")
        handled.append(mid)

    queue = env.q(f"burst-{kind}")
    await bus.consume(queue, [env.key("burst")], handler, kind=kind, prefetch=256)
    ids = [f"{env.prefix}-m-{i}" for i in range(600)] + sorted(poison)
    await asyncio.gather(*(agent.publish(env.key("burst"), ping(id=i)) for i in ids))
    await wait_until(lambda: len(handled) == 600, timeout=15, what="600 handled messages")
    dead = await wait_dead(env, len(poison))
    assert sorted(handled) == sorted(ids[:600])  # every message exactly once, none lost
    assert all(calls[i] == 1 for i in ids[:600] if i not in flaky)
    assert all(calls[i] == 2 for i in flaky)
    assert all(calls[i] == 1 + protocol.DELIVERY_LIMIT for i in poison)
    assert sorted(protocol.decode(b)["id"] for b, _ in dead) == sorted(poison)
    assert {r for _, r in dead} == {f"delivery_limit on queue {queue}"}
    if env.transport == "amqp":
        assert any(batched), "the burst was not grouped: the envelope path went untested"


async def test_burst_of_mandatory_publishes_to_nowhere_all_raise(env):
    bus = env.buses[0]
    results = await asyncio.gather(*(bus.publish(env.key("void"), ping(), mandatory=True) for _ in range(100)),
                                   return_exceptions=True)
    assert all(isinstance(r, Unroutable) for r in results), {type(r).__name__ for r in results}


async def test_burst_of_malformed_and_valid_mixed(env):
    """Malformed bodies interleaved with a burst of valid ones: valid ones all delivered once."""
    bus, agent = env.buses[0], await env.new_bus()
    got, handler = recorder()
    queue = env.q("mixed")
    await bus.consume(queue, [env.key("mixed")], handler, kind="quorum", prefetch=128)
    valid = [ping() for _ in range(300)]
    bad = [b"\x93\x01\x02" + bytes([i % 256]) for i in range(30)]
    await asyncio.gather(*(agent.publish(env.key("mixed"), m) for m in valid),
                         *(agent.publish_raw(env.key("mixed"), b) for b in bad))
    await wait_until(lambda: len(got) == len(valid), timeout=15, what="all valid messages")
    dead = await wait_dead(env, len(bad))
    assert sorted(m["id"] for m, _ in got) == sorted(m["id"] for m in valid)
    assert sorted(b for b, _ in dead) == sorted(bad)


@pytest.fixture
async def amqp_env(amqp_url):
    e = BusEnv("amqp", amqp_url)
    await e.new_bus()
    try:
        yield e
    finally:
        await e.cleanup()


@pytest.mark.amqp
async def test_amqp_publish_timeout(amqp_env):
    """(amqp only: memory:// confirms at once, a publish there cannot time out.)"""
    env = amqp_env
    bus = env.buses[0]
    await bus.consume(env.q("slowpoke"), [env.key("slowpoke")], recorder()[1], kind="quorum")
    with pytest.raises(PublishTimeout):
        await bus.publish(env.key("slowpoke"), ping(), timeout=1e-6)
    results = await asyncio.gather(*(bus.publish(env.key("slowpoke"), ping(), timeout=1e-6) for _ in range(50)),
                                   return_exceptions=True)  # queued behind the pipeline, too
    assert all(isinstance(r, PublishTimeout) for r in results), {type(r).__name__ for r in results}
    await bus.publish(env.key("slowpoke"), ping(), timeout=5)  # the bus is fine afterwards


@pytest.mark.amqp
async def test_amqp_first_connect_is_retried_until_the_broker_appears():
    """Nothing listens at first; a forwarder to RabbitMQ starts 1 s later; connect() succeeds."""
    from busenv import AMQP_URL
    from urllib.parse import urlsplit

    target = urlsplit(AMQP_URL)
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    pipes: list[asyncio.Task] = []

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def forward(reader, writer):
        up_r, up_w = await asyncio.open_connection(target.hostname, target.port or 5672)
        pipes.extend([asyncio.create_task(pipe(reader, up_w)), asyncio.create_task(pipe(up_r, writer))])

    async def start_later():
        await asyncio.sleep(1.0)
        return await asyncio.start_server(forward, "127.0.0.1", port)

    starter = asyncio.create_task(start_later())
    bus = open_bus(f"amqp://guest:guest@127.0.0.1:{port}/", connect_timeout=10)
    t0 = time.monotonic()
    await bus.connect()
    assert time.monotonic() - t0 >= 0.9
    server = await starter
    try:
        got, handler = recorder()
        await bus.consume(f"t-retry-{port}", [f"retry.{port}"], handler, kind="exclusive")
        await bus.publish(f"retry.{port}", ping(), mandatory=True)
        await wait_until(lambda: len(got) == 1, what="a message through the late broker")
    finally:
        await bus.close()
        server.close()
        for t in pipes:
            t.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


async def test_exclusive_queue_takes_one_consumer(env):
    bus = env.buses[0]
    queue = env.q("solo")
    got, handler = recorder()
    await bus.consume(queue, [env.key("solo")], handler, kind="exclusive")
    with pytest.raises(BusError):
        await bus.consume(queue, [env.key("solo")], recorder()[1], kind="exclusive")
    await bus.publish(env.key("solo"), ping(), mandatory=True)  # the first consumer still works
    await wait_until(lambda: len(got) == 1, what="delivery after a refused consumer")


async def test_queue_kind_mismatch_is_refused(env):
    bus = env.buses[0]
    queue = env.q("kind")
    await bus.consume(queue, [env.key("kind")], recorder()[1], kind="quorum")
    with pytest.raises(BusError):
        await bus.consume(queue, [env.key("kind")], recorder()[1], kind="transient")
    with pytest.raises(ValueError, match="unknown queue kind 'durable'"):
        await bus.consume(env.q("k2"), [env.key("kind")], recorder()[1], kind="durable")


async def test_burst_of_large_messages(env):
    """Sixteen 1 MiB determinant batches at once: all delivered intact (envelopes stay bounded)."""
    bus, agent = env.buses[0], await env.new_bus()
    got, handler = recorder()
    await bus.consume(env.q("dets"), [env.key("determinants", "#")], handler, kind="quorum", prefetch=8)
    msgs = [protocol.make("determinants", job="j", unit="u", node="n", batch=bytes([i]) * (1 << 20),
                          first=i, count=1) for i in range(16)]
    await asyncio.gather(*(agent.publish(env.key("determinants", "s", "n"), m, timeout=30) for m in msgs))
    await wait_until(lambda: len(got) == 16, timeout=20, what="16 large messages")
    assert sorted(m["first"] for m, _ in got) == list(range(16))
    assert all(m["batch"] == bytes([m["first"]]) * (1 << 20) for m, _ in got)
    assert all(d.headers.get("x-gridckpt-batch", 1) <= 4 for _, d in got)
