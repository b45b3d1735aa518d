"""The control channel between the CLI and the orchestrator.

Over a broker, a ``control`` message is a request to ``orchestrator.control`` answered with a
``control_reply``.  With the embedded ``memory://`` bus (``gridckpt run``) other CLI processes
cannot see the in-process bus, so the embedded orchestrator also answers the same requests
on a Unix socket in the store (``<store>/orchestrator.sock``): 4-byte length + msgpack.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack

from . import protocol
from .bus import open_bus
from .bus.base import BusError, RequestTimeout, Unroutable
from .bus.common import masked_url

SOCKET_NAME = "orchestrator.sock"
ControlHandler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """A control operation failed; ``code`` is the CLI exit status (1 failed, 2 bad input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


async def dispatch(handler: ControlHandler, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run a control op and turn its outcome into a control_reply."""
    try:
        result = await handler(op, args)
        return protocol.make("control_reply", ok=True, result=result)
    except ControlError as exc:
        return protocol.make("control_reply", ok=False, error=str(exc), code=exc.code)


def socket_path(store: Path) -> Path:
    return Path(store) / SOCKET_NAME


async def serve_unix(store: Path, handler: ControlHandler) -> asyncio.AbstractServer:
    """Serve control requests on the store's Unix socket (embedded orchestrator)."""
    path = socket_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = struct.unpack("!I", await reader.readexactly(4))[0]
            req = msgpack.unpackb(await reader.readexactly(size), raw=False)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str) or not isinstance(req.get("args"), dict):
                reply = protocol.make("control_reply", ok=False, error="malformed control request", code=2)
            else:
                reply = await dispatch(handler, req["op"], req["args"])
            body = msgpack.packb(reply, use_bin_type=True)
            writer.write(struct.pack("!I", len(body)) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, msgpack.UnpackException):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(on_client, path=str(path))


async def call(broker: str, store: Path | None, op: str, args: dict[str, Any], timeout: float = 120.0) -> Any:
    """Send one control request to the orchestrator and return its result (raise ControlError)."""
    if broker.startswith("memory://"):
        reply = await _call_unix(store, op, args, timeout)
    else:
        bus = open_bus(broker, connect_timeout=5)
        try:
            await bus.connect()
            msg = protocol.make("control", op=op, args=args)
            reply = await bus.request(protocol.CONTROL_KEY, msg, timeout=timeout)
        except Unroutable:
            raise ControlError(f"no orchestrator is running on {masked_url(broker)} "
                               "(start one with `gridckpt orchestrator`)") from None
        except RequestTimeout:
            raise ControlError(f"the orchestrator did not answer {op!r} within {timeout:.0f} s") from None
        except (BusError, OSError) as exc:
            raise ControlError(f"cannot reach the broker {masked_url(broker)}: {exc}") from None
        finally:
            await bus.close()
    if not reply.get("ok"):
        raise ControlError(reply.get("error") or "failed", int(reply.get("code") or 1))
    return reply.get("result")


async def _call_unix(store: Path | None, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    path = socket_path(store) if store else None
    if path is None or not path.exists():
        raise ControlError("no orchestrator reachable: memory:// serves only the process of `gridckpt run`; "
                           "give --broker amqp://... (or GRIDCKPT_BROKER) to reach a daemon", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, asyncio.TimeoutError):
        raise ControlError(f"no orchestrator answers on {path} (is `gridckpt run` still running?)") from None
    try:
        body = msgpack.packb({"op": op, "args": args}, use_bin_type=True)
        writer.write(struct.pack("!I", len(body)) + body)
        await writer.drain()
        size = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), timeout))[0]
        return msgpack.unpackb(await reader.readexactly(size), raw=False)
    except asyncio.TimeoutError:
        raise ControlError(f"the orchestrator did not answer {op!r} within {timeout:.0f} s") from None
    except (asyncio.IncompleteReadError, OSError):
        raise ControlError("the orchestrator closed the control connection") from None
    finally:
        writer.close()


def default_store() -> Path:
    """$GRIDCKPT_STORE, else /var/lib/gridckpt as root, else ~/.local/share/gridckpt."""
    env = os.environ.get("GRIDCKPT_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/gridckpt")
    return Path.home() / ".local/share/gridckpt"


def default_broker() -> str:
    return os.environ.get("GRIDCKPT_BROKER") or "memory://"
