"""The message bus: ``open_bus(url)`` picks the transport by URL scheme.

``memory://[name]`` is the in-process bus (one shared broker per URL in a process);
``amqp://user:pass@host[:port]/vhost`` and ``amqps://`` use RabbitMQ, the vhost being the
virtual organisation.  Both have the semantics described in ``orchestrator.bus.base``.
"""

from __future__ import annotations

from typing import Any

from .base import Bus, BusError, Consumer, Delivery, Handler, PublishTimeout, RequestTimeout, Unroutable


def open_bus(url: str, **kw: Any) -> Bus:
    """A (not yet connected) bus for ``url``; ``await bus.connect()`` or ``async with``.

    amqp keyword: ``connect_timeout`` (seconds, default 30) for the retried first connect.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryBus
        return MemoryBus(url, **kw)
    if scheme in ("amqp", "amqps"):
        from .amqp import AmqpBus
        return AmqpBus(url, **kw)
    raise BusError(f"unsupported bus URL {url!r}: expected memory://[name] or amqp://user:pass@host/vhost")


__all__ = ["open_bus", "Bus", "BusError", "Consumer", "Delivery", "Handler", "PublishTimeout",
           "RequestTimeout", "Unroutable"]
