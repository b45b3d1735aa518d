"""The in-process bus (``memory://`` and ``memory://name``): the amqp:// semantics without a broker.

All ``MemoryBus`` objects opened on the same URL in one process share one ``_Broker``, so an
embedded orchestrator and agent talk to each other.  Bodies go through msgpack exactly as on
the wire, so malformed messages are dead-lettered the same way.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field
from typing import Any

from .. import protocol
from .base import Bus, BusError, Consumer, Delivery, Handler, RequestTimeout, Unroutable
from .common import SeenIds, check_kind, decide, limit_reason, log, over_limit
from .topic import matches

_BROKERS: dict[str, "_Broker"] = {}
_TOKENS = itertools.count(1)


def broker_for(url: str) -> "_Broker":
    """The process-wide broker of a ``memory://[name]`` URL."""
    if not url.startswith("memory://"):
        raise BusError(f"not a memory bus URL: {url!r}")
    name = url[len("memory://"):].strip("/")
    if name not in _BROKERS:
        _BROKERS[name] = _Broker(name)
    return _BROKERS[name]


@dataclass
class _Envelope:
    body: bytes
    routing_key: str
    message_id: str
    reply_to: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    redeliveries: int = 0


class _Queue:
    """One queue: a deque of envelopes and the consumers waiting on it."""

    def __init__(self, name: str, kind: str, owner: "MemoryBus | None") -> None:
        self.name, self.kind, self.owner = name, kind, owner
        self.messages: collections.deque[_Envelope] = collections.deque()
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.consumers = 0
        self.deleted = False

    def put(self, env: _Envelope, *, front: bool = False) -> None:
        (self.messages.appendleft if front else self.messages.append)(env)
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    async def get(self) -> _Envelope:
        while not self.messages:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
        return self.messages.popleft()


class _Broker:
    """Queues, bindings, reply routes and the dead-letter queue of one memory:// URL."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[str, _Queue] = {}
        self.bindings: list[tuple[str, str]] = []  # (pattern, queue name)
        self.reply_routes: dict[str, "MemoryBus"] = {}
        self.dead: collections.deque[tuple[bytes, str]] = collections.deque()

    def declare(self, name: str, kind: str, owner: "MemoryBus") -> _Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue(name, kind, owner if kind == "exclusive" else None)
            return q
        if q.kind != kind:
            raise BusError(f"queue {name!r} exists as {q.kind}, cannot declare it as {kind}")
        if q.kind == "exclusive" and q.owner is not owner:
            raise BusError(f"queue {name!r} is exclusive to another connection")
        return q

    def bind(self, pattern: str, queue: str) -> None:
        if (pattern, queue) not in self.bindings:
            self.bindings.append((pattern, queue))

    def delete(self, name: str) -> None:
        q = self.queues.pop(name, None)
        if q is not None:
            q.deleted = True
            q.messages.clear()
            self.bindings = [(p, n) for p, n in self.bindings if n != name]

    def route(self, env: _Envelope) -> int:
        """Put ``env`` on every queue bound to a matching pattern; return how many took it."""
        targets = {n for p, n in self.bindings if matches(p, env.routing_key)}
        for n in targets:
            self.queues[n].put(_Envelope(env.body, env.routing_key, env.message_id, env.reply_to,
                                         env.correlation_id, dict(env.headers)))
        return len(targets)

    def dead_letter(self, body: bytes, reason: str) -> None:
        self.dead.append((body, reason))


class _MemoryConsumer(Consumer):
    def __init__(self, bus: "MemoryBus", queue: _Queue, handler: Handler) -> None:
        self.bus, self.queue, self.handler = bus, queue, handler
        self.seen = SeenIds()
        self._idle = True
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"memory-consumer-{queue.name}")

    async def _run(self) -> None:
        while not self._stopping:
            self._idle = True
            env = await self.queue.get()
            self._idle = False
            await self._process(env)
            await asyncio.sleep(0)  # let publishers and other consumers run between messages

    async def _process(self, env: _Envelope) -> None:
        delivery = Delivery(env.routing_key, env.message_id, env.redeliveries > 0, env.reply_to,
                            env.correlation_id, dict(env.headers))
        out = await decide(self.queue.name, env.body, delivery, self.handler, self.seen)
        if out.action == "dead":
            self.bus._broker.dead_letter(env.body, out.reason)
        elif out.action == "retry":
            env.redeliveries += 1
            if over_limit(env.redeliveries):
                reason = limit_reason(self.queue.name)
                log.warning("dead-lettering message %s: %s", env.message_id, reason)
                self.bus._broker.dead_letter(env.body, reason)
            elif not self.queue.deleted:
                self.queue.put(env, front=True)
        elif out.reply is not None and env.reply_to:
            self.bus._broker_reply(env.reply_to, env.correlation_id, out.reply)

    async def cancel(self) -> None:
        if self._task.done():
            return
        self._stopping = True
        if self._idle:
            self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise
        self.queue.consumers -= 1
        if self.queue.kind == "transient" and self.queue.consumers <= 0:
            self.bus._broker.delete(self.queue.name)
        self.bus._consumers.discard(self)


class MemoryBus(Bus):
    """An in-process bus with the same semantics as the amqp:// one."""

    def __init__(self, url: str = "memory://", **_: Any) -> None:
        self.url = url
        self._broker = broker_for(url)
        self._token = f"memory.reply.{next(_TOKENS)}"
        self._consumers: set[_MemoryConsumer] = set()
        self._exclusive: set[str] = set()
        self._pending: dict[str, asyncio.Future] = {}
        self._connected = False

    async def __aenter__(self) -> "MemoryBus":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        self._broker.reply_routes[self._token] = self
        self._connected = True

    async def close(self) -> None:
        if not self._connected:
            return
        self._connected = False
        await asyncio.gather(*(c.cancel() for c in list(self._consumers)))
        for name in self._exclusive:
            self._broker.delete(name)
        self._exclusive.clear()
        self._broker.reply_routes.pop(self._token, None)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BusError("bus closed while waiting for a reply"))

    def _check(self) -> None:
        if not self._connected:
            raise BusError(f"bus {self.url} is not connected")

    async def publish(self, routing_key: str, msg: dict[str, Any], *, mandatory: bool = False,
                      timeout: float = 5.0, reply_to: str | None = None,
                      correlation_id: str | None = None) -> None:
        body = protocol.encode(msg)
        await self._publish(_Envelope(body, routing_key, msg["id"], reply_to, correlation_id), mandatory)

    async def publish_raw(self, routing_key: str, body: bytes, *, message_id: str | None = None,
                          timeout: float = 5.0) -> None:
        await self._publish(_Envelope(bytes(body), routing_key, message_id or protocol.new_id()), False)

    async def _publish(self, env: _Envelope, mandatory: bool) -> None:
        self._check()
        taken = self._broker.route(env)
        if mandatory and not taken:
            raise Unroutable(f"no queue takes routing key {env.routing_key!r}")
        await asyncio.sleep(0)

    async def consume(self, queue: str, bindings: list[str], handler: Handler, *,
                      kind: str = "quorum", prefetch: int = 64) -> Consumer:
        self._check()
        check_kind(kind)
        q = self._broker.declare(queue, kind, self)
        if kind == "exclusive":
            if q.consumers:
                raise BusError(f"exclusive queue {queue!r} already has a consumer")
            self._exclusive.add(queue)
        for pattern in bindings:
            self._broker.bind(pattern, queue)
        q.consumers += 1
        consumer = _MemoryConsumer(self, q, handler)
        self._consumers.add(consumer)
        return consumer

    async def request(self, routing_key: str, msg: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
        corr = protocol.new_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self.publish(routing_key, msg, mandatory=True, reply_to=self._token, correlation_id=corr)
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(f"no reply to {msg['type']} on {routing_key!r} within {timeout:g}s") from None
        finally:
            self._pending.pop(corr, None)

    def _broker_reply(self, reply_to: str, corr: str | None, reply: dict[str, Any]) -> None:
        target = self._broker.reply_routes.get(reply_to)
        if target is None:
            log.info("reply to %s dropped: the requester is gone", reply_to)
            return
        target._on_reply(corr, protocol.encode(reply))

    def _on_reply(self, corr: str | None, body: bytes) -> None:
        fut = self._pending.get(corr or "")
        if fut is None or fut.done():
            log.info("late or unknown reply %s dropped", corr)
            return
        try:
            fut.set_result(protocol.decode(body))
        except protocol.ProtocolError as exc:
            fut.set_exception(BusError(f"malformed reply: {exc}"))

    async def dead_letters(self, limit: int = 10_000) -> list[tuple[bytes, str]]:
        out = []
        while self._broker.dead and len(out) < limit:
            out.append(self._broker.dead.popleft())
        return out

    async def queue_exists(self, queue: str) -> bool:
        """True when ``queue`` exists on this broker (tests and tools)."""
        return queue in self._broker.queues

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` and its bindings (tests and tools)."""
        self._broker.delete(queue)


__all__ = ["MemoryBus", "broker_for"]
