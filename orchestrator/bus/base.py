"""The transport interface shared by the amqp:// and memory:// buses.

Semantics (both implementations, checked by one contract test suite):

* One topic exchange (``protocol.EXCHANGE``).  ``publish(key, msg)`` routes ``msg`` to
  every queue bound with a matching pattern (``*`` one word, ``#`` zero or more).
* ``publish`` waits for the broker's confirm, at most ``timeout`` seconds
  (``PublishTimeout``).  With ``mandatory=True`` a message no queue takes raises
  ``Unroutable`` instead of vanishing.
* ``consume(queue, bindings, handler, kind=...)`` declares the queue, binds it and
  delivers decoded, validated messages to ``handler(msg, delivery)`` one at a time per
  consumer (prefetch is a parameter).  The message is acked after the handler returns; if
  the handler raises, it is requeued and redelivered, and after ``DELIVERY_LIMIT``
  redeliveries (the handler ran ``1 + DELIVERY_LIMIT`` times, as RabbitMQ's
  ``x-delivery-limit`` counts) it goes to the dead-letter exchange.  A body that fails
  ``protocol.decode`` is dead-lettered at once, with its reason logged.
* A message id seen before by the same consumer is acked without calling the handler.
* If the delivered message has a ``reply_to`` and the handler returns a dict, that dict is
  published as the reply (``request`` is the client side of this).
* Queue kinds: ``"quorum"`` (durable, delivery limit, dead-letter exchange: events,
  determinants), ``"exclusive"`` (one consumer, deleted with its connection: agent
  commands, control), ``"transient"`` (auto-delete, non-durable: heartbeats).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


class BusError(RuntimeError):
    """A transport failure."""


class Unroutable(BusError):
    """A mandatory message that no queue took (for a command: the agent is not there)."""


class PublishTimeout(BusError):
    """The broker did not confirm a publish in time."""


class RequestTimeout(BusError):
    """No reply to a request in time."""


class Reject(BusError):
    """Raised by a handler: the message is well-formed but unacceptable; dead-letter it now."""


@dataclass
class Delivery:
    """What a handler learns about a delivery besides the message itself."""

    routing_key: str
    message_id: str
    redelivered: bool = False
    reply_to: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[dict[str, Any], Delivery], Awaitable[dict[str, Any] | None]]


class Consumer(abc.ABC):
    """A running subscription; ``cancel`` stops intake and waits for the in-flight handler."""

    @abc.abstractmethod
    async def cancel(self) -> None: ...


class Bus(abc.ABC):
    """A connection to the message bus of one virtual organisation."""

    url: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect (amqp: retried until ``connect_timeout``), declare the exchanges."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel consumers, wait for in-flight handlers, close the connection."""

    @abc.abstractmethod
    async def publish(self, routing_key: str, msg: dict[str, Any], *, mandatory: bool = False,
                      timeout: float = 5.0, reply_to: str | None = None,
                      correlation_id: str | None = None) -> None:
        """Encode ``msg`` (protocol.encode) and publish it with a confirm."""

    @abc.abstractmethod
    async def publish_raw(self, routing_key: str, body: bytes, *, message_id: str | None = None,
                          timeout: float = 5.0) -> None:
        """Publish bytes as they are (tests and fuzzing: malformed bodies)."""

    @abc.abstractmethod
    async def consume(self, queue: str, bindings: list[str], handler: Handler, *,
                      kind: str = "quorum", prefetch: int = 64) -> Consumer:
        """Declare ``queue`` of ``kind``, bind it to ``bindings`` and start delivering."""

    @abc.abstractmethod
    async def request(self, routing_key: str, msg: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
        """Publish ``msg`` (mandatory) and wait for the reply (RequestTimeout)."""

    @abc.abstractmethod
    async def dead_letters(self, limit: int = 10_000) -> list[tuple[bytes, str]]:
        """Drain and return dead-lettered (body, reason) pairs (tests and `gridckpt` diagnostics)."""
