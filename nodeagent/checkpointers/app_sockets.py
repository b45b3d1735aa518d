"""Every app-protocol socket of one event loop in one epoll set, itself one reader of the loop.

The app checkpointer talks to every program of every unit over its own Unix socket.  With
asyncio's own transports each answer costs a trip through the loop: the loop's selector
reports the socket, a handle is queued and run, the transport reads and hands the bytes on,
about 15-20 us of Python per answer.  When 64 programs answer CHECKPOINT that is most of the
round (measured on a 2-vCPU VM: 2.1-2.4 ms with transports, 1.3 ms through one epoll set).

Here the listening sockets and the connections sit in one ``select.epoll`` of their own, and
the loop watches just that epoll's fd.  When it is readable, ``_ready`` takes every socket
that is ready in one ``poll(0)`` and reads each straight away: many answers per loop wakeup,
a few microseconds each.  Nothing blocks: the poll never waits, sockets are non-blocking,
and a write the kernel cannot take at once is buffered and finished when the socket is
writable, as an asyncio transport would.

``hold_reading(until)`` stops reading the whole set until a future is done: the agent holds it
from the moment every program has been told RESUME until the checkpoint's answer is out, so
that the programs' acknowledgements (64 ``OK`` lines, which nobody waits for) are read after
the answer rather than in front of it (measured: they held the answer up by 0.75 ms).  Whoever
waits for something from a socket calls ``read_now`` first, so a hold never delays a request.

Connections speak to an ``asyncio.Protocol`` (``connection_made``, ``data_received``,
``eof_received``, ``connection_lost``, ``pause_writing``/``resume_writing``) through a
``SocketLink`` that offers the transport calls the protocol uses: ``write``, ``close``,
``is_closing``.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from typing import Callable

log = logging.getLogger("gridckpt.app")

READ_SIZE = 262144                # bytes read per wakeup at most (asyncio's own figure)
DISCARD_MAX = 16                  # reads of unread input dropped before a close (see _lost),
DISCARD_SIZE = 262144             # of this many bytes at most each
HIGH_WATER = 65536                # bytes buffered before the protocol is asked to pause
LOW_WATER = 16384                 # and told to go on again below this
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR
HOLD_MAX = 0.5                    # s a hold lasts at most, whatever it waits for


class AppSockets:
    """The epoll set of one loop's app sockets (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._reading = True
        self._held_by: asyncio.Future | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        loop.add_reader(self._ep.fileno(), self._ready)

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def usable_in(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether this set serves ``loop`` (tests run one loop after another)."""
        return self.loop is loop and not self._ep.closed and not loop.is_closed()

    def watch(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def rewatch(self, fd: int, mask: int) -> None:
        if fd in self._handlers:
            self._ep.modify(fd, mask)

    def forget(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass        # already closed

    def hold_reading(self, until: asyncio.Future, longest: float | None = None) -> None:
        """Read no socket of the set until ``until`` is done, ``longest`` seconds pass
        (``HOLD_MAX`` by default) or ``read_now`` is called.  What arrives meanwhile waits in the
        sockets (a peer that closes is seen when reading starts again)."""
        if until.done() or self._ep.closed:
            return
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self._ep.fileno())
            self._hold_timer = self.loop.call_later(HOLD_MAX if longest is None else longest, self.read_now)
        if until is not self._held_by:
            self._held_by = until
            until.add_done_callback(lambda _: self.read_now())

    def read_now(self) -> None:
        """End a hold (nothing to do without one): call before waiting for a socket."""
        if self._reading or self._ep.closed:
            return
        self._reading = True
        self._held_by = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.loop.add_reader(self._ep.fileno(), self._ready)

    def close(self) -> None:
        """Stop watching (the sockets themselves belong to their owners)."""
        if self._ep.closed:
            return
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        if self._reading and not self.loop.is_closed():
            self.loop.remove_reader(self._ep.fileno())
        self._handlers.clear()
        self._ep.close()

    def _ready(self) -> None:
        try:
            events = self._ep.poll(0)
        except InterruptedError:
            return
        for fd, mask in events:
            handler = self._handlers.get(fd)
            if handler is None:
                continue
            try:
                handler(mask)
            except Exception:       # a protocol's bug must not stop the other sockets
                log.exception("app socket %d: handler failed", fd)

    def listen(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> "Listener":
        """Accept connections on the listening ``sock``, each served by a new ``factory()``."""
        return Listener(self, sock, factory)


class Listener:
    """A listening socket in the set; ``close`` closes it (like ``asyncio.Server.close``)."""

    def __init__(self, sockets: AppSockets, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        self.sockets, self.sock, self.factory = sockets, sock, factory
        sock.setblocking(False)
        self._fd = sock.fileno()
        sockets.watch(self._fd, _IN, self._accept)

    def _accept(self, mask: int) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # e.g. EMFILE: try again on the next wakeup
                log.warning("app socket %s: accept failed: %s", self.sock.getsockname(), exc)
                return
            SocketLink(self.sockets, conn, self.factory())

    def close(self) -> None:
        self.sockets.forget(self._fd)
        self.sock.close()


class SocketLink:
    """One connection in the set: the transport side of its protocol."""

    __slots__ = ("sockets", "sock", "fd", "protocol", "_out", "_closing", "_closed", "_paused")

    def __init__(self, sockets: AppSockets, sock: socket.socket, protocol: asyncio.Protocol) -> None:
        self.sockets, self.sock, self.protocol = sockets, sock, protocol
        sock.setblocking(False)
        self.fd = sock.fileno()
        self._out = bytearray()
        self._closing = self._closed = self._paused = False
        sockets.watch(self.fd, _IN, self._event)
        protocol.connection_made(self)       # type: ignore[arg-type]

    # -- what the protocol calls -----------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._closed

    def write(self, data: bytes) -> None:
        """Send now what the socket takes; buffer the rest until it is writable."""
        if self._closing or self._closed:
            return
        if not self._out:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:     # the protocol hears of it from the loop, as from asyncio's
                self._closing = True
                self.sockets.rewatch(self.fd, 0)
                self.sockets.loop.call_soon(self._lost, exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self.sockets.rewatch(self.fd, _IN | _OUT)
            self.sockets.read_now()     # the rest goes when the set says the socket is writable
        self._out += data
        if not self._paused and len(self._out) > HIGH_WATER:
            self._paused = True
            self.protocol.pause_writing()

    def close(self) -> None:
        """Close once what is buffered is sent (at once if nothing is)."""
        if self._closing or self._closed:
            return
        self._closing = True
        if self._out:
            self.sockets.rewatch(self.fd, _OUT)
        else:       # nothing more to read either: not woken again before the close
            self.sockets.rewatch(self.fd, 0)
            self.sockets.loop.call_soon(self._lost, None)

    def read_now(self) -> None:
        """``AppSockets.read_now``: an answer is awaited from this connection."""
        self.sockets.read_now()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default

    # -- events ----------------------------------------------------------------------------
    def _event(self, mask: int) -> None:
        if self._closed:
            return
        if mask & _OUT and self._out:
            self._flush()
        if mask & (_IN | _GONE) and not self._closing:
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(exc)
                return
            if not data:
                self.protocol.eof_received()
                self._lost(None)
                return
            self.protocol.data_received(data)
        elif mask & _GONE and self._closing:
            self._lost(None)

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._out.clear()
            self._lost(exc)
            return
        del self._out[:sent]
        if self._paused and len(self._out) <= LOW_WATER:
            self._paused = False
            self.protocol.resume_writing()
        if not self._out:
            if self._closing:
                self._lost(None)
            else:
                self.sockets.rewatch(self.fd, _IN)

    def _discard_input(self) -> None:
        for _ in range(DISCARD_MAX):
            try:
                if not self.sock.recv(DISCARD_SIZE):
                    return
            except OSError:     # nothing more (EAGAIN) or the peer is gone
                return

    def _lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self.sockets.forget(self.fd)
        if exc is None:     # input left unread would make the close a reset: the peer could
            self._discard_input()    # then not read the last line sent (an ERROR, say)
        self.sock.close()
        self.protocol.connection_lost(exc)


_SETS: dict[int, AppSockets] = {}


def sockets_for(loop: asyncio.AbstractEventLoop) -> AppSockets:
    """The epoll set of ``loop``'s app sockets, made on first use (the sets of closed loops
    are closed then)."""
    found = _SETS.get(id(loop))
    if found is not None and found.usable_in(loop):
        return found
    for key, old in list(_SETS.items()):
        if old.loop.is_closed() or old.closed:
            old.close()
            del _SETS[key]
    made = _SETS[id(loop)] = AppSockets(loop)
    return made
