"""Pieces both buses share: the per-delivery decision, message-id dedupe, logging, URL masking.

``decide`` is the whole consumer contract in one place (decode, dedupe, call the handler)
so that amqp:// and memory:// cannot drift apart; each transport only carries out the
outcome it returns (ack, requeue, dead-letter, reply).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import protocol
from .base import Delivery, Handler, Reject

log = logging.getLogger("gridckpt.bus")

QUEUE_KINDS = ("quorum", "exclusive", "transient")
REASON_HEADER = "x-gridckpt-reason"
QUEUE_HEADER = "x-gridckpt-queue"
DEDUPE_SIZE = 65_536


class SeenIds:
    """A bounded LRU set of message ids already handled by one consumer."""

    def __init__(self, size: int = DEDUPE_SIZE) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def __contains__(self, message_id: str) -> bool:
        if message_id in self._ids:
            self._ids.move_to_end(message_id)
            return True
        return False

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)


@dataclass
class Outcome:
    """What the transport must do with one delivery.

    action: "ack" (handled, or a duplicate), "retry" (handler raised: requeue),
    "dead" (malformed: dead-letter at once with ``reason``).
    """

    action: str
    reason: str = ""
    reply: dict[str, Any] | None = None


async def decide(queue: str, body: bytes, delivery: Delivery, handler: Handler, seen: SeenIds) -> Outcome:
    """Decode ``body``, drop duplicates, run ``handler``; never raises (except cancellation)."""
    try:
        msg = protocol.decode(body)
    except protocol.ProtocolError as exc:
        reason = f"malformed message on queue {queue}: {exc}"
        log.warning("dead-lettering %s (routing key %s, %d bytes)", reason, delivery.routing_key, len(body))
        return Outcome("dead", reason)
    mid = msg["id"]
    if mid in seen:
        log.debug("duplicate message %s on queue %s acked without handling", mid, queue)
        return Outcome("ack")
    delivery.message_id = mid
    try:
        result = await handler(msg, delivery)
    except Reject as exc:
        reason = f"{msg['type']} {mid} rejected on queue {queue}: {exc}"
        log.warning("dead-lettering %s", reason)
        seen.add(mid)
        return Outcome("dead", reason)
    except Exception as exc:  # a failing handler must not kill the consumer
        reason = f"handler for {msg['type']} {mid} on queue {queue} raised {type(exc).__name__}: {exc}"
        log.warning("%s; requeued", reason)
        return Outcome("retry", reason)
    seen.add(mid)
    reply = None
    if delivery.reply_to and isinstance(result, dict):
        try:
            protocol.validate(result)
            reply = result
        except protocol.ProtocolError as exc:
            log.error("handler for %s %s returned an invalid reply, not sent: %s", msg["type"], mid, exc)
    return Outcome("ack", reply=reply)


def limit_reason(queue: str) -> str:
    """The dead-letter reason of a message whose handler kept failing (RabbitMQ's wording)."""
    return f"delivery_limit on queue {queue}"


def over_limit(redeliveries: int) -> bool:
    """True when a message requeued ``redeliveries`` times must be dead-lettered instead.

    Same rule as a RabbitMQ quorum queue with ``x-delivery-limit``: the handler runs at
    most ``1 + DELIVERY_LIMIT`` times.
    """
    return redeliveries > protocol.DELIVERY_LIMIT


def check_kind(kind: str) -> None:
    if kind not in QUEUE_KINDS:
        raise ValueError(f"unknown queue kind {kind!r} (expected one of {', '.join(QUEUE_KINDS)})")


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for error messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))
