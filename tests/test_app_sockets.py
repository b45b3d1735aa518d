"""The app checkpointer's epoll set of sockets (nodeagent/checkpointers/app_sockets.py), on
real Unix sockets: lines both ways, a write bigger than the socket takes, a close that lets the
peer read the last line, a peer that leaves, and holding the reading until a future is done."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from nodeagent.checkpointers import app_sockets
from nodeagent.checkpointers.app_sockets import AppSockets, sockets_for


class Recorder(asyncio.Protocol):
    """What a connection was told, in order."""

    def __init__(self) -> None:
        self.transport = None
        self.data = bytearray()
        self.events: list[str] = []
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


async def until(pred, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
async def served(tmp_path: Path):
    """A listening socket in the loop's set; ``connect()`` gives (client socket, its Recorder)."""
    path = str(tmp_path / "s.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(8)
    made: list[Recorder] = []

    def factory() -> Recorder:
        made.append(Recorder())
        return made[-1]

    sockets = sockets_for(asyncio.get_running_loop())
    listener = sockets.listen(listening, factory)
    clients: list[socket.socket] = []

    async def connect() -> tuple[socket.socket, Recorder]:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        c.setblocking(False)
        clients.append(c)
        n = len(made)
        await until(lambda: len(made) > n)
        return c, made[-1]

    yield sockets, connect
    listener.close()
    for c in clients:
        c.close()


async def recv_all(c: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(c, 1 << 20), 5)
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def test_lines_both_ways_and_a_peer_that_leaves(served):
    sockets, connect = served
    c, rec = await connect()
    c.send(b"HELLO 1\nDO")
    c.send(b"NE\n")
    await until(lambda: rec.data == b"HELLO 1\nDONE\n")
    rec.transport.write(b"WELCOME 1\n")
    assert await recv_all(c, 10) == b"WELCOME 1\n"
    c.close()
    assert await asyncio.wait_for(rec.lost, 5) is None
    assert rec.events == ["made", "eof", "lost"]
    assert rec.transport.is_closing()
    rec.transport.write(b"late\n")      # after the close: dropped, no error


async def test_a_write_bigger_than_the_socket_takes_is_buffered_in_order(served):
    """The protocol is asked to pause above the high-water mark and to go on once the peer
    has read enough; every byte arrives, in order."""
    sockets, connect = served
    c, rec = await connect()
    blob = bytes(range(256)) * 16384        # 4 MiB: far more than a Unix socket buffers
    rec.transport.write(blob)
    rec.transport.write(b"tail\n")
    assert "pause" in rec.events
    got = await recv_all(c, len(blob) + 5)
    assert got == blob + b"tail\n"
    await until(lambda: "resume" in rec.events)


async def test_a_close_lets_the_peer_read_the_last_line_despite_unread_input(served, monkeypatch):
    """Input left unread would turn the close into a reset, and the peer would lose the line
    sent just before it (an ERROR, say).  Reads are made small here so that most of what the
    peer sent is still unread when the first piece has the connection closed."""
    monkeypatch.setattr(app_sockets, "READ_SIZE", 1000)
    sockets, connect = served
    c, rec = await connect()

    def refuse(data: bytes) -> None:
        Recorder.data_received(rec, data)
        rec.transport.write(b"ERROR line too long\n")
        rec.transport.close()
    rec.data_received = refuse      # type: ignore[method-assign]
    c.send(b"x" * 70000)
    assert await recv_all(c, 1 << 20) == b"ERROR line too long\n"    # to the end, no reset
    assert await asyncio.wait_for(rec.lost, 5) is None
    assert len(rec.data) == 1000


async def held_connection(served, line: bytes) -> tuple[socket.socket, Recorder, asyncio.Future]:
    """A connection whose set is held until the returned future is done; ``line`` sent to it
    waits unread."""
    sockets, connect = served
    c, rec = await connect()
    gate = asyncio.get_running_loop().create_future()
    sockets.hold_reading(gate)
    c.send(line)
    await asyncio.sleep(0.05)
    assert rec.data == b""
    return c, rec, gate


async def test_reading_is_held_until_the_future_is_done(served):
    c, rec, gate = await held_connection(served, b"OK\n")
    rec.transport.write(b"RESUME x\n")   # writing is not held
    assert await recv_all(c, 9) == b"RESUME x\n"
    gate.set_result(None)
    await until(lambda: rec.data == b"OK\n")


async def test_read_now_ends_a_hold_and_a_hold_ends_by_itself(served):
    sockets, _ = served
    c, rec, gate = await held_connection(served, b"a\n")
    rec.transport.read_now()          # an answer is awaited: read at once
    await until(lambda: rec.data == b"a\n")
    sockets.hold_reading(gate, longest=0.1)   # never done: the hold ends after 0.1 s anyway
    c.send(b"b\n")
    await until(lambda: rec.data == b"a\nb\n", timeout=2)
    gate.cancel()


async def test_a_peer_that_leaves_during_a_hold_is_seen_when_reading_starts_again(served):
    c, rec, gate = await held_connection(served, b"OK\n")
    c.close()
    await asyncio.sleep(0.05)
    assert not rec.lost.done()
    gate.set_result(None)
    assert await asyncio.wait_for(rec.lost, 5) is None
    assert rec.data == b"OK\n"


async def test_one_set_per_loop_and_a_closed_one_is_replaced():
    loop = asyncio.get_running_loop()
    first = sockets_for(loop)
    assert sockets_for(loop) is first
    first.close()
    assert first.closed
    second = sockets_for(loop)
    assert second is not first and second.usable_in(loop)


def test_a_set_of_a_closed_loop_is_closed_when_a_new_loop_asks():
    old_loop = asyncio.new_event_loop()
    old = old_loop.run_until_complete(_set_of_running_loop())
    old_loop.close()
    new_loop = asyncio.new_event_loop()
    try:
        new = new_loop.run_until_complete(_set_of_running_loop())
        assert new is not old and old.closed
    finally:
        new.close()
        new_loop.close()


async def _set_of_running_loop() -> AppSockets:
    return app_sockets.sockets_for(asyncio.get_running_loop())
