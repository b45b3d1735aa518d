"""The RabbitMQ bus (``amqp://user:pass@host/vhost``, ``amqps://``) over aio-pika.

The virtual host in the URL selects the virtual organisation.  One robust connection; one
channel with publisher confirms and ``on_return_raises`` for publishing (a mandatory message
nobody routes raises ``Unroutable``); one channel per consumer, so each has its own prefetch.

Dead-lettering of malformed bodies: the consumer re-publishes the body to the dead-letter
exchange with the header ``x-gridckpt-reason`` (confirmed), then acks the original.  If that
publish fails, it falls back to ``reject(requeue=False)``, which makes RabbitMQ dead-letter
the original itself (reason then only in the log and ``x-death``).  Either way every
malformed message ends in ``DEAD_LETTER_QUEUE``; ``dead_letters`` reads the reason from our
header, else from RabbitMQ's ``x-death``.

Batching (``batching=True``, the default): while ``PIPELINE`` publishes to one routing key
await their confirms, further publishes to that key wait, and leave together as one AMQP
message (content type ``application/x-gridckpt-batch``: a msgpack list of message bodies), one
confirm for all; each caller still gets its own result (``Unroutable``, ``PublishTimeout``).  A
lone publish goes out at once as a plain message with ``message_id`` = its id, so latency is
unchanged; only bursts are grouped, which is what makes tens of thousands of confirmed events/s
possible from Python.  The consumer unpacks an envelope and treats each message as if it came
alone (decode, dedupe, handler, dead-letter); if a handler fails, the envelope is requeued and,
thanks to the dedupe, only the failed messages run again; at the delivery limit those are
dead-lettered one by one.

Handlers that raise: quorum queues count deliveries themselves (``x-delivery-limit``);
exclusive and transient (classic) queues cannot, so the consumer counts redeliveries per
message id and dead-letters at the same limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import msgpack
from aio_pika.abc import AbstractIncomingMessage

from .. import protocol
from .base import Bus, BusError, Consumer, Delivery, Handler, PublishTimeout, RequestTimeout, Unroutable
from .common import (QUEUE_HEADER, REASON_HEADER, SeenIds, check_kind, decide, limit_reason, log,
                     masked_url, over_limit)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
CONTENT_TYPE = "application/msgpack"
BATCH_CONTENT_TYPE = "application/x-gridckpt-batch"
PIPELINE = 4        # plain publishes in flight per routing key before batching starts
MAX_BATCH = 500     # messages per envelope
MAX_BATCH_BYTES = 4 << 20  # bytes per envelope (a bigger lone message still goes out alone)
BATCH_TIMEOUT = 30.0


class _QuietFirstConnect(logging.Filter):
    """Drops aiormq's per-attempt error records while ``connect`` retries (it logs its own line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error when creating transport")


def queue_arguments(kind: str) -> dict[str, Any]:
    """The x-arguments a queue of ``kind`` is declared with."""
    args: dict[str, Any] = {"x-dead-letter-exchange": protocol.DEAD_LETTER_EXCHANGE}
    if kind == "quorum":
        args["x-queue-type"] = "quorum"
        args["x-delivery-limit"] = protocol.DELIVERY_LIMIT
    return args


class _Lane:
    """Publishes to one routing key: how many are in flight, and those waiting for a slot."""

    def __init__(self, routing_key: str, mandatory: bool) -> None:
        self.routing_key, self.mandatory = routing_key, mandatory
        self.in_flight = 0
        self.waiting: list[tuple[bytes, str, asyncio.Future]] = []


class _AmqpConsumer(Consumer):
    """One queue's consumer: its own channel, a serial worker, dedupe and redelivery counts."""

    def __init__(self, bus: "AmqpBus", channel: aio_pika.abc.AbstractChannel,
                 queue: aio_pika.abc.AbstractQueue, kind: str, handler: Handler) -> None:
        self.bus, self.channel, self.queue, self.kind, self.handler = bus, channel, queue, kind, handler
        self.seen = SeenIds()
        self.failures: dict[Any, int] = {}  # classic queues: redeliveries per message id
        self.inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.tag: str | None = None
        self._idle = True
        self._stopping = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"amqp-consumer-{self.queue.name}")
        # An exclusive queue has one consumer, as on memory:// (a second one is refused).
        self.tag = await self.queue.consume(self._on_message, exclusive=(self.kind == "exclusive"))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.inbox.put_nowait(message)

    async def _run(self) -> None:
        while not self._stopping:
            self._idle = True
            message = await self.inbox.get()
            self._idle = False
            try:
                await self._process(message)
            except Exception as exc:  # a channel error must not kill the worker
                log.error("consumer of %s could not settle a message: %s: %s",
                          self.queue.name, type(exc).__name__, exc)

    def _redeliveries(self, message: AbstractIncomingMessage, key: Any) -> int:
        """How many times ``message`` was requeued before (this delivery not counted)."""
        if self.kind == "quorum":
            count = (message.headers or {}).get("x-delivery-count", 0)
            return count if isinstance(count, int) else 0
        return self.failures.get(key, 0)

    def _count_failure(self, key: Any) -> None:
        if self.kind != "quorum":
            self.failures[key] = self.failures.get(key, 0) + 1
            if len(self.failures) > 10_000:
                self.failures.pop(next(iter(self.failures)))

    async def _process(self, message: AbstractIncomingMessage) -> None:
        if message.content_type == BATCH_CONTENT_TYPE:
            return await self._process_batch(message)
        headers = dict(message.headers or {})
        delivery = Delivery(message.routing_key or "", message.message_id or "", bool(message.redelivered),
                            message.reply_to, message.correlation_id, headers)
        out = await decide(self.queue.name, message.body, delivery, self.handler, self.seen)
        if out.action == "ack":
            if out.reply is not None and message.reply_to:
                await self.bus._send_reply(message.reply_to, message.correlation_id, out.reply)
            self.failures.pop(delivery.message_id, None)
            await message.ack()
        elif out.action == "dead":
            await self.bus._dead_letter(message, out.reason, self.queue.name)
        elif self.kind == "quorum":
            await message.nack(requeue=True)  # the broker counts and dead-letters
        elif over_limit(self._redeliveries(message, delivery.message_id) + 1):
            # (delivery.message_id is the decoded message's id: a retry implies it decoded.)
            self.failures.pop(delivery.message_id, None)
            reason = limit_reason(self.queue.name)
            log.warning("dead-lettering message %s: %s", delivery.message_id, reason)
            await self.bus._dead_letter(message, reason, self.queue.name)
        else:
            self._count_failure(delivery.message_id)
            await message.nack(requeue=True)

    async def _process_batch(self, message: AbstractIncomingMessage) -> None:
        """An envelope of several messages (see ``AmqpBus.publish``): each one handled as if alone.

        Handled messages are remembered, so a requeued envelope only re-runs the ones whose
        handler failed; on the last allowed delivery those are dead-lettered one by one.
        """
        try:
            bodies = msgpack.unpackb(message.body, raw=False)
            if not isinstance(bodies, list) or not all(isinstance(b, bytes) for b in bodies):
                raise ValueError("not a list of bodies")
        except Exception as exc:
            reason = f"malformed batch on queue {self.queue.name}: {type(exc).__name__}: {exc}"
            log.warning("dead-lettering %s", reason)
            return await self.bus._dead_letter(message, reason, self.queue.name)
        failed: list[bytes] = []
        for body in bodies:
            delivery = Delivery(message.routing_key or "", "", bool(message.redelivered), None, None,
                                dict(message.headers or {}))
            out = await decide(self.queue.name, body, delivery, self.handler, self.seen)
            if out.action == "dead":
                if not await self.bus._dead_letter_body(body, out.reason, self.queue.name, message.routing_key):
                    failed.append(body)  # could not dead-letter it now: keep the envelope
            elif out.action == "retry":
                failed.append(body)
        key = message.message_id or message.body  # envelopes always carry a message id
        if not failed:
            self.failures.pop(key, None)
            return await message.ack()
        if over_limit(self._redeliveries(message, key) + 1):
            self.failures.pop(key, None)
            reason = limit_reason(self.queue.name)
            for body in failed:
                log.warning("dead-lettering a batched message: %s", reason)
                if not await self.bus._dead_letter_body(body, reason, self.queue.name, message.routing_key):
                    return await message.reject(requeue=False)  # RabbitMQ dead-letters the envelope
            return await message.ack()
        self._count_failure(key)
        await message.nack(requeue=True)

    async def cancel(self) -> None:
        """Stop intake, let the in-flight handler finish, return prefetched messages."""
        if self._stopping:
            return
        self._stopping = True
        try:
            if self.tag is not None and not self.channel.is_closed:
                await self.queue.cancel(self.tag)
        except Exception as exc:
            log.info("cancelling consumer of %s: %s", self.queue.name, exc)
        if self._task is not None:
            if self._idle:
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if not self._task.cancelled():
                    raise
        # Unacked prefetched messages go back to the queue when the channel closes.
        try:
            await self.channel.close()
        except Exception as exc:
            log.info("closing consumer channel of %s: %s", self.queue.name, exc)
        self.bus._consumers.discard(self)


class AmqpBus(Bus):
    """A bus over RabbitMQ: one virtual host = one virtual organisation."""

    def __init__(self, url: str, *, connect_timeout: float = 30.0, batching: bool = True, **_: Any) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.batching = batching
        self._lanes: dict[tuple[str, bool], _Lane] = {}
        self._batch_tasks: set[asyncio.Task] = set()
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._dlx: aio_pika.abc.AbstractExchange | None = None
        self._consumers: set[_AmqpConsumer] = set()
        self._pending: dict[str, asyncio.Future] = {}
        self._reply_lock = asyncio.Lock()
        self._reply_consumer: Any = None

    async def __aenter__(self) -> "AmqpBus":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        quiet, aiormq_log = _QuietFirstConnect(), logging.getLogger("aiormq.connection")
        aiormq_log.addFilter(quiet)
        try:
            await self._first_connect()
        finally:
            aiormq_log.removeFilter(quiet)
        await self._declare_topology()

    async def _first_connect(self) -> None:
        """Connect, retrying until ``connect_timeout``; fail at once on refused credentials or vhost."""
        deadline = time.monotonic() + self.connect_timeout
        delay, last = 0.2, None
        while True:
            left = deadline - time.monotonic()
            try:
                self._conn = await aio_pika.connect_robust(self.url, timeout=max(1.0, min(left, 10.0)))
                break
            except aiormq.exceptions.ProbableAuthenticationError as exc:
                raise BusError(f"cannot log in to {masked_url(self.url)}: access refused "
                               f"(check user, password and virtual host): {exc}") from None
            except aiormq.exceptions.InvalidFrameError as exc:
                if "Connection.Close" not in str(exc):
                    raise BusError(f"broker at {masked_url(self.url)} answered oddly: {exc}") from None
                vhost = urlsplit(self.url).path[1:] or "/"
                raise BusError(f"broker at {masked_url(self.url)} refused virtual host {unquote(vhost)!r}: "
                               f"it does not exist or the user may not use it") from None
            except Exception as exc:
                last = exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(f"cannot connect to {masked_url(self.url)} within {self.connect_timeout:g}s: "
                               f"{type(last).__name__}: {last}") from None
            log.info("broker %s not reachable yet (%s), retrying", masked_url(self.url), last)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)

    async def _declare_topology(self) -> None:
        """The VO's topic exchange, the fanout dead-letter exchange and its durable queue."""
        try:
            self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = await self._channel.declare_exchange(
                protocol.EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            self._dlx = await self._channel.declare_exchange(
                protocol.DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
            dead = await self._channel.declare_queue(protocol.DEAD_LETTER_QUEUE, durable=True)
            await dead.bind(self._dlx)
        except Exception as exc:
            conn, self._conn = self._conn, None
            await conn.close()
            raise BusError(f"setting up exchanges on {masked_url(self.url)} failed: {exc}") from None

    async def close(self) -> None:
        if self._conn is None:
            return
        await asyncio.gather(*(c.cancel() for c in list(self._consumers)))
        if self._batch_tasks:
            await asyncio.wait(set(self._batch_tasks), timeout=BATCH_TIMEOUT)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BusError("bus closed while waiting for a reply"))
        conn, self._conn = self._conn, None
        await conn.close()

    def _check(self) -> None:
        if self._conn is None or self._channel is None:
            raise BusError(f"bus {masked_url(self.url)} is not connected")

    # -- publishing -------------------------------------------------------------------

    async def publish(self, routing_key: str, msg: dict[str, Any], *, mandatory: bool = False,
                      timeout: float = 5.0, reply_to: str | None = None,
                      correlation_id: str | None = None) -> None:
        body = protocol.encode(msg)
        self._check()
        lane = None
        if self.batching and reply_to is None and correlation_id is None:
            lane = self._lanes.get((routing_key, mandatory))
            if lane is None:
                lane = self._lanes[(routing_key, mandatory)] = _Lane(routing_key, mandatory)
            if lane.in_flight >= PIPELINE or lane.waiting:
                return await self._enqueue(lane, body, msg["id"], timeout)
            lane.in_flight += 1
        message = aio_pika.Message(body, message_id=msg["id"], content_type=CONTENT_TYPE,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   reply_to=reply_to, correlation_id=correlation_id)
        try:
            await self._confirmed(self._exchange, message, routing_key, mandatory, timeout)
        finally:
            if lane is not None:
                lane.in_flight -= 1
                self._flush(lane)

    async def _enqueue(self, lane: "_Lane", body: bytes, message_id: str, timeout: float) -> None:
        """Wait for a slot on a busy lane; queued bodies leave together as one envelope."""
        fut = asyncio.get_running_loop().create_future()
        lane.waiting.append((body, message_id, fut))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            raise PublishTimeout(f"broker did not confirm a publish to {lane.routing_key!r} "
                                 f"within {timeout:g}s") from None

    def _flush(self, lane: "_Lane") -> None:
        while lane.in_flight < PIPELINE and lane.waiting:
            take, size = 0, 0
            while take < min(MAX_BATCH, len(lane.waiting)):
                size += len(lane.waiting[take][0])
                if take and size > MAX_BATCH_BYTES:
                    break
                take += 1
            batch, lane.waiting = lane.waiting[:take], lane.waiting[take:]
            lane.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send_batch(lane, batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
        if not lane.in_flight and not lane.waiting:
            self._lanes.pop((lane.routing_key, lane.mandatory), None)

    async def _send_batch(self, lane: "_Lane", batch: list[tuple[bytes, str, asyncio.Future]]) -> None:
        try:
            if len(batch) == 1:
                body, message_id, _ = batch[0]
                message = aio_pika.Message(body, message_id=message_id, content_type=CONTENT_TYPE,
                                           delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            else:
                message = aio_pika.Message(msgpack.packb([b for b, _, _ in batch], use_bin_type=True),
                                           message_id=f"batch-{protocol.new_id()}",
                                           content_type=BATCH_CONTENT_TYPE,
                                           headers={"x-gridckpt-batch": len(batch)},
                                           delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await self._confirmed(self._exchange, message, lane.routing_key, lane.mandatory, BATCH_TIMEOUT)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(type(exc)(str(exc)) if isinstance(exc, BusError)
                                      else BusError(f"publish failed: {exc!r}"))
                    fut.exception()  # the waiter may have timed out already: no "never retrieved" noise
            if not isinstance(exc, Exception):
                raise
        else:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
        finally:
            lane.in_flight -= 1
            self._flush(lane)

    async def publish_raw(self, routing_key: str, body: bytes, *, message_id: str | None = None,
                          timeout: float = 5.0) -> None:
        message = aio_pika.Message(bytes(body), message_id=message_id or protocol.new_id(),
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._confirmed(self._exchange, message, routing_key, False, timeout)

    async def _confirmed(self, exchange: Any, message: aio_pika.Message, routing_key: str,
                         mandatory: bool, timeout: float) -> None:
        self._check()
        try:
            async with asyncio.timeout(timeout):  # no extra task per publish, unlike wait_for
                await exchange.publish(message, routing_key, mandatory=mandatory)
        except aio_pika.exceptions.PublishError:
            raise Unroutable(f"no queue takes routing key {routing_key!r}") from None
        except TimeoutError:
            raise PublishTimeout(f"broker did not confirm a publish to {routing_key!r} within {timeout:g}s") from None
        except aio_pika.exceptions.DeliveryError as exc:
            raise BusError(f"broker refused a publish to {routing_key!r}: {exc}") from None
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise BusError(f"publish to {routing_key!r} failed: {type(exc).__name__}: {exc}") from None

    async def _send_reply(self, reply_to: str, corr: str | None, reply: dict[str, Any]) -> None:
        message = aio_pika.Message(protocol.encode(reply), message_id=reply["id"], correlation_id=corr,
                                   content_type=CONTENT_TYPE)
        try:
            await self._confirmed(self._channel.default_exchange, message, reply_to, False, 5.0)
        except BusError as exc:
            log.warning("reply to %s not sent: %s", reply_to, exc)

    async def _dead_letter_body(self, body: bytes, reason: str, queue: str, routing_key: str | None) -> bool:
        """Publish one body to the dead-letter exchange with ``reason``; False if that failed."""
        copy = aio_pika.Message(body, headers={REASON_HEADER: reason, QUEUE_HEADER: queue},
                                message_id=protocol.new_id(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self._confirmed(self._dlx, copy, routing_key or "", False, 5.0)
            return True
        except BusError as exc:
            log.error("could not publish to %s: %s", protocol.DEAD_LETTER_EXCHANGE, exc)
            return False

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str, queue: str) -> None:
        """Re-publish ``message`` to the dead-letter exchange with ``reason``; ack the original.

        Falls back to ``reject(requeue=False)`` (RabbitMQ dead-letters it) if the publish fails.
        """
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        headers[QUEUE_HEADER] = queue
        copy = aio_pika.Message(message.body, headers=headers, message_id=message.message_id,
                                content_type=message.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        try:
            await self._confirmed(self._dlx, copy, message.routing_key or "", False, 5.0)
        except BusError as exc:
            log.error("could not publish to %s (%s); rejecting instead", protocol.DEAD_LETTER_EXCHANGE, exc)
            await message.reject(requeue=False)
            return
        await message.ack()

    # -- consuming ----------------------------------------------------------------------

    async def consume(self, queue: str, bindings: list[str], handler: Handler, *,
                      kind: str = "quorum", prefetch: int = 64) -> Consumer:
        self._check()
        check_kind(kind)
        channel = await self._conn.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=prefetch)
            q = await channel.declare_queue(
                queue, durable=(kind == "quorum"), exclusive=(kind == "exclusive"),
                auto_delete=(kind == "transient"), arguments=queue_arguments(kind))
            for pattern in bindings:
                await q.bind(protocol.EXCHANGE, pattern)
            consumer = _AmqpConsumer(self, channel, q, kind, handler)
            await consumer.start()
        except aiormq.exceptions.AMQPError as exc:
            if not channel.is_closed:
                await channel.close()
            raise BusError(f"cannot consume from {kind} queue {queue!r}: {exc}") from None
        self._consumers.add(consumer)
        return consumer

    async def delete_queue(self, queue: str) -> None:
        """Delete ``queue`` (tests and tools)."""
        self._check()
        channel = await self._conn.channel(publisher_confirms=False)
        try:
            await channel.queue_delete(queue)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def queue_exists(self, queue: str) -> bool:
        """True when ``queue`` exists in this virtual host (tests and tools)."""
        self._check()
        channel = await self._conn.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(queue, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()

    # -- request / reply ----------------------------------------------------------------

    async def _ensure_reply_consumer(self) -> None:
        # Direct reply-to needs a consumer on the very channel that publishes; after a
        # reconnect the robust channel has a new underlying channel, so consume again.
        async with self._reply_lock:
            underlay = await self._channel.get_underlay_channel()
            if self._reply_consumer is underlay:
                return
            await underlay.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
            self._reply_consumer = underlay

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        corr = message.header.properties.correlation_id
        fut = self._pending.get(corr or "")
        if fut is None or fut.done():
            log.info("late or unknown reply %s dropped", corr)
            return
        try:
            fut.set_result(protocol.decode(message.body))
        except protocol.ProtocolError as exc:
            fut.set_exception(BusError(f"malformed reply: {exc}"))

    async def request(self, routing_key: str, msg: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
        self._check()
        await self._ensure_reply_consumer()
        corr = protocol.new_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self.publish(routing_key, msg, mandatory=True, reply_to=DIRECT_REPLY_TO,
                               correlation_id=corr, timeout=min(timeout, 5.0))
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(f"no reply to {msg['type']} on {routing_key!r} within {timeout:g}s") from None
        finally:
            self._pending.pop(corr, None)

    # -- diagnostics ----------------------------------------------------------------------

    async def dead_letters(self, limit: int = 10_000) -> list[tuple[bytes, str]]:
        self._check()
        channel = await self._conn.channel(publisher_confirms=False)
        out: list[tuple[bytes, str]] = []
        try:
            q = await channel.declare_queue(protocol.DEAD_LETTER_QUEUE, durable=True)
            while len(out) < limit:
                m = await q.get(no_ack=False, fail=False, timeout=5)
                if m is None:
                    break
                reason = dead_reason(m.headers or {})
                if m.content_type == BATCH_CONTENT_TYPE:
                    out.extend((body, reason) for body in _batch_bodies(m.body))
                else:
                    out.append((m.body, reason))
                await m.ack()
        finally:
            if not channel.is_closed:
                await channel.close()
        return out


def dead_reason(headers: dict[str, Any]) -> str:
    """Why a message was dead-lettered: our header, else RabbitMQ's first x-death entry."""
    reason = headers.get(REASON_HEADER)
    if reason:
        return reason.decode() if isinstance(reason, bytes) else str(reason)
    deaths = headers.get("x-death") or []
    if deaths:
        d = deaths[0]
        r, q = d.get("reason", "unknown"), d.get("queue", "?")
        r = r.decode() if isinstance(r, bytes) else r
        q = q.decode() if isinstance(q, bytes) else q
        return f"{r} on queue {q}"
    return "unknown (no reason recorded)"


def _batch_bodies(body: bytes) -> list[bytes]:
    """The message bodies inside an envelope (the envelope itself if it is not one)."""
    try:
        bodies = msgpack.unpackb(body, raw=False)
    except Exception:
        return [body]
    if isinstance(bodies, list) and all(isinstance(b, bytes) for b in bodies):
        return bodies
    return [body]
