"""The ``app`` checkpointer: programs that save and restore their own state.

The agent listens on a Unix stream socket, one per unit, named in the unit's environment as
``GRIDCKPT_APP_SOCKET``; the program connects to it (``nodeagent.appclient`` in Python, a few
lines of code in any other language).  The protocol is text, one request or answer per line:

Line protocol (version 1)
-------------------------
* UTF-8 lines ended by ``\\n``; words separated by one space; the last field of a line (a
  path) runs to the end of the line and may contain spaces.  Lines are at most 64 KiB.
* program -> agent, once, on connect: ``HELLO <pid> [<version> [<hooks>]]``; agent answers
  ``WELCOME 1``.  ``<hooks>`` (optional, comma-separated) names the optional requests the
  program handles among ``PRE_CHECKPOINT``, ``POST_CHECKPOINT`` and ``RESTART`` (``-`` for
  none): the agent then spares it the others' round trips.  Without ``<hooks>`` it gets them
  all.  A program that registers a hook later says ``HOOKS <hooks>`` (no answer).
* then the agent sends requests and the program answers each, in order, one at a time:

  ==============================  ====================================================
  agent sends                     program answers (``ERROR <reason>`` on failure)
  ==============================  ====================================================
  ``PRE_CHECKPOINT <id>``         ``OK``    in-process pre-checkpoint hook
  ``CHECKPOINT <id> <dir>``       ``DONE``  state files written into ``<dir>``; the
                                            program is now *quiesced* (see below)
  ``RESUME <id>``                 ``OK``    leave quiescence, carry on
  ``POST_CHECKPOINT <id>``        ``OK``    in-process post-checkpoint hook
  ``ABORT <id>``                  ``OK``    checkpoint abandoned; leave quiescence
  ``RESTART <dir>``               ``OK``    in-process restart hook, after a restart
  ``PING``                        ``PONG``
  ==============================  ====================================================

  An unknown request is answered ``ERROR unknown request <WORD>``.  Every request has a
  deadline (``timeout``, 30 s by default); no answer in time fails the stage, which aborts the
  checkpoint.  The program still answers, late; the agent discards that one owed answer, so
  both sides stay in step.  The agent does not wait for RESUME's ``OK`` either (leaving
  quiescence cannot fail; the unit runs again at once): it reads and drops it when it comes,
  and sends the next request only after it (one request on the wire at a time, always).
  A program may open several connections (one per process of its tree); then
  every request goes to every connection and all must answer.
* On restart the agent starts the unit's command afresh with ``GRIDCKPT_RESTORE=<dir>`` (the
  committed images directory, read-only: copy what you want to change) in the environment,
  and sends ``RESTART <dir>`` once the program has said HELLO.

When the state is taken (the consistent cut)
--------------------------------------------
The program saves its state at **prepare**, while it still runs and can answer; the agent
does not freeze first, since a frozen program cannot write anything.  From ``DONE`` until
``RESUME``/``ABORT`` the program is quiesced: it must not send application messages nor
change the state it saved (``AppClient.safe_point()`` blocks there).  **stop** then freezes
the tree like for every backend, and **checkpoint** only checks and lists what the program
wrote.  Because no unit sends anything after its save until every unit of the job has saved
(``resume_cp`` comes after the job-wide barrier), no message can be received before one
unit's save yet sent after another's: the cut across units is consistent.  Bytes in flight
at the cut are the in-transit-data issue's concern (the shim's channel flush), not this one's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nodeagent.checkpointers.app_sockets import Listener, SocketLink, sockets_for
from nodeagent.checkpointers.base import (Capabilities, CheckpointError, Checkpointer,
                                          LaunchPlan, RestoreRefused, UnitProcess)

log = logging.getLogger("gridckpt.app")

PROTOCOL_VERSION = 1
MAX_LINE = 65536
_SUN_PATH_MAX = 100
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # where `import nodeagent` works


def socket_path_for(unit: UnitProcess) -> str:
    """``<unit dir>/app.sock``, or a short path under /run or /tmp when that is too long."""
    path = str(Path(unit.unit_dir) / "app.sock")
    if len(path.encode()) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha1(f"{unit.unit_dir}".encode()).hexdigest()[:16]
    for base in ("/run/gridckpt", os.path.join(tempfile.gettempdir(), f"gridckpt-{os.getuid()}")):
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            if os.access(base, os.W_OK):
                return os.path.join(base, f"app-{digest}.sock")
        except OSError:
            continue
    raise CheckpointError(f"no short enough directory for the app socket of {unit.name}")


OPTIONAL_REQUESTS = ("PRE_CHECKPOINT", "POST_CHECKPOINT", "RESTART")


def _parse_hooks(text: str) -> set[str]:
    """The optional requests a program announced (``-``: none)."""
    return {w for w in text.strip().split(",") if w in OPTIONAL_REQUESTS}


HELLO_TIMEOUT = 10.0     # seconds a new connection has to say HELLO


class _Conn(asyncio.Protocol):
    """One program connection.  Lines are parsed as the bytes come (``data_received``) and an
    answer goes straight to the pending request: no reader task per connection, no stream
    buffer to wake (64 units answer twice per checkpoint).  Its transport is a ``SocketLink``
    of the loop's ``AppSockets`` (app_sockets.py: every answer ready is read in one wakeup)."""

    def __init__(self, session: "_Session") -> None:
        self.session = session
        self.transport: SocketLink | None = None
        self.pid = 0
        self.hooks: set[str] | None = None   # optional requests it handles; None: unknown, send them all
        self.hello = False
        self._buf = b""
        self._hello_timer: asyncio.TimerHandle | None = None
        self.pending: asyncio.Future | None = None
        self.closed = asyncio.Event()
        self.lock = asyncio.Lock()
        self.skip = 0       # answers owed to requests nobody waits for: discard them
        self.settled = asyncio.Event()   # set while no answer is owed (skip == 0)
        self.settled.set()
        self._writable = asyncio.Event()   # cleared while the transport asks us to pause
        self._writable.set()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport     # type: ignore[assignment]
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._no_hello)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data, self._buf = self._buf + data, b""
        *lines, rest = data.split(b"\n")
        for raw in lines:
            if self.closed.is_set():
                return
            if len(raw) > MAX_LINE or not self._line(raw.decode(errors="replace")):
                self.close()
                return
        if len(rest) > MAX_LINE:
            self.close()
        else:
            self._buf = rest

    def eof_received(self) -> bool:
        return False    # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.closed.set()
        self.settled.set()
        self._writable.set()
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(CheckpointError(
                f"program pid {self.pid} closed its checkpoint connection"))
        self.session.left(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- lines -----------------------------------------------------------------------------
    def _no_hello(self) -> None:
        if not self.hello:
            self.close()

    def _line(self, text: str) -> bool:
        """One line from the program; False: close the connection."""
        if not self.hello:
            words = text.split()
            if len(words) < 2 or words[0] != "HELLO" or not words[1].isdigit():
                self.send_line("ERROR expected HELLO <pid>")
                return False
            self.hello = True
            if self._hello_timer is not None:
                self._hello_timer.cancel()
            self.pid = int(words[1])
            self.hooks = _parse_hooks(words[3]) if len(words) > 3 else None
            self.send_line(f"WELCOME {PROTOCOL_VERSION}")
            self.session.joined(self)
            return True
        if text == "BYE":
            return False
        if text.startswith("HOOKS "):   # a hook registered after HELLO: not an answer
            self.hooks = _parse_hooks(text[6:])
            return True
        if self.skip:           # an answer nobody waits for (late, or to a RESUME)
            self.skip -= 1
            if not self.skip:
                self.settled.set()
            if not text.startswith("OK") and not text.startswith("DONE"):
                log.warning("program pid %s answered late or unasked: %s", self.pid, text[:200])
            return True
        if self.pending is not None and not self.pending.done():
            self.pending.set_result(text)
        # anything unsolicited is ignored (forward compatibility)
        return True

    def send_line(self, line: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode() + b"\n")

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark (rare: lines are short)."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed.is_set():
            raise ConnectionError("connection closed")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests --------------------------------------------------------------------------
    def read_now(self) -> None:
        """An answer is awaited: the loop's app sockets are read, held or not (app_sockets)."""
        if self.transport is not None:
            self.transport.read_now()

    async def _in_step(self, line: str, timeout: float) -> None:
        """One request on the wire at a time, as the protocol promises: first the answers
        still owed (to a RESUME, or late ones) must have come."""
        self.read_now()
        if self.skip:
            try:
                await asyncio.wait_for(self.settled.wait(), timeout)
            except asyncio.TimeoutError:
                raise CheckpointError(f"program pid {self.pid} did not answer an earlier request "
                                      f"within {timeout:g} s (before {line.split(' ', 1)[0]})") from None
        if self.closed.is_set():
            raise CheckpointError(f"program pid {self.pid} closed its checkpoint connection")

    async def request(self, line: str, timeout: float) -> str:
        async with self.lock:
            await self._in_step(line, timeout)
            loop = asyncio.get_running_loop()
            fut = self.pending = loop.create_future()
            # a timer on the answer's future, not asyncio.wait_for: no wrapper future and
            # done-callback per request (64 units make 128 of them per checkpoint)
            timer = loop.call_later(timeout, _expire, fut)
            try:
                self.send_line(line)
                await self.drain()
                return await fut
            except _Expired:
                word = line.split(" ", 1)[0]
                raise CheckpointError(f"program pid {self.pid} did not answer {word} "
                                      f"within {timeout:g} s") from None
            except ConnectionError as e:
                raise CheckpointError(f"program pid {self.pid}: connection lost ({e})") from None
            finally:
                timer.cancel()
                self.request_over(fut)

    def handles(self, word: str) -> bool:
        """Whether this program wants request ``word`` (the optional ones only if it said so)."""
        return word not in OPTIONAL_REQUESTS or self.hooks is None or word in self.hooks

    def request_over(self, fut: asyncio.Future) -> None:
        """The request answered by ``fut`` is over: without its answer (timed out, cancelled),
        the program still owes one, to be discarded when it comes."""
        self.pending = None
        if not fut.done() or fut.cancelled() or isinstance(fut.exception(), _Expired):
            self.skip += 1
            self.settled.clear()
            if not fut.done():
                fut.cancel()

    def notify_now(self) -> bool:
        """Whether ``notify`` can send at once (no request on the wire, none owed)."""
        return not self.lock.locked() and not self.skip and not self.closed.is_set()

    def notify_sync(self, line: str) -> None:
        """``notify`` when ``notify_now()``: sent at once, its answer to be discarded."""
        self.skip += 1
        self.settled.clear()
        self.send_line(line)

    async def notify(self, line: str, timeout: float) -> None:
        """Send a request whose answer nobody waits for: it is discarded when it comes, and
        the next request goes out only after it."""
        async with self.lock:
            await self._in_step(line, timeout)
            self.notify_sync(line)
            try:
                await self.drain()
            except ConnectionError as e:
                raise CheckpointError(f"program pid {self.pid}: connection lost ({e})") from None


class _Expired(Exception):
    """A request's deadline passed before its answer came."""


async def request_many(reqs: list[tuple[_Conn, str]], timeout: float) -> list[str | BaseException]:
    """``_Conn.request`` for many connections at once: every request goes out before the
    first answer is awaited, under one deadline; each answer (or its error) in order.  A
    connection busy with another request or owing an answer takes the general path."""
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future] = []
    direct: list[bool] = []
    for conn, line in reqs:
        if conn.lock.locked() or conn.skip or conn.closed.is_set():
            futs.append(asyncio.ensure_future(conn.request(line, timeout)))
            direct.append(False)
            continue
        await conn.lock.acquire()       # free: taken at once, no suspension
        fut = conn.pending = loop.create_future()
        futs.append(fut)
        direct.append(True)
        conn.send_line(line)
        conn.read_now()
    timer = loop.call_later(timeout, lambda: [_expire(f) for f, d in zip(futs, direct) if d])
    try:
        if futs:
            await asyncio.wait(futs)
    finally:
        timer.cancel()
        for (conn, _), fut, d in zip(reqs, futs, direct):
            if not d:
                if not fut.done():
                    fut.cancel()
                continue
            conn.request_over(fut)
            conn.lock.release()
    out: list[str | BaseException] = []
    for (conn, line), fut in zip(reqs, futs):
        exc = fut.exception()
        if isinstance(exc, _Expired):
            word = line.split(" ", 1)[0]
            out.append(CheckpointError(f"program pid {conn.pid} did not answer {word} within {timeout:g} s"))
        else:
            out.append(exc if exc is not None else fut.result())
    return out


def _verdict(unit: str, word: str, expect: str, conn: _Conn, ans: str | BaseException) -> CheckpointError | None:
    """The error a program's answer to ``word`` means for its unit (None: it is ``expect``)."""
    if isinstance(ans, BaseException):
        return ans if isinstance(ans, CheckpointError) else CheckpointError(f"unit {unit}: {word} failed: {ans}")
    if ans != expect:
        reason = ans[6:] if ans.startswith("ERROR ") else f"unexpected answer {ans[:80]!r}"
        return CheckpointError(f"unit {unit}: program pid {conn.pid} refused {word}: {reason}")
    return None


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


@dataclass
class _Session:
    """The listening socket of one unit and the programs connected to it."""

    path: str
    sock: socket.socket
    server: Listener | None = None
    conns: list[_Conn] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set = field(default_factory=set)

    async def start(self) -> None:
        if self.server is None:
            self.server = sockets_for(asyncio.get_running_loop()).listen(self.sock, lambda: _Conn(self))

    def joined(self, conn: _Conn) -> None:
        """``conn`` said HELLO."""
        self.conns.append(conn)
        self.changed.set()

    def left(self, conn: _Conn) -> None:
        if conn in self.conns:
            self.conns.remove(conn)

    def live(self) -> list[_Conn]:
        return [c for c in self.conns if not c.closed.is_set()]

    async def wait_connected(self, timeout: float, unit: str) -> list[_Conn]:
        if self.server is not None:
            live = self.live()
            if live:
                return live
        await self.start()
        loop = asyncio.get_running_loop()
        sockets_for(loop).read_now()     # a HELLO may be waiting in a held socket
        deadline = loop.time() + timeout
        while not self.live():
            self.changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise CheckpointError(f"unit {unit}: the program never connected to "
                                      f"GRIDCKPT_APP_SOCKET within {timeout:g} s")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return self.live()

    async def request_all(self, line: str, expect: str, timeout: float, unit: str) -> None:
        conns = await self.wait_connected(timeout, unit)
        word = line.split(" ", 1)[0]
        conns = [c for c in conns if c.handles(word)]   # optional requests: only to who handles them
        if not conns:
            return
        if len(conns) == 1:     # the usual case: no task per request
            try:
                answers: list[Any] = [await conns[0].request(line, timeout)]
            except Exception as e:      # noqa: BLE001 - reported like gather's
                answers = [e]
        else:
            answers = await asyncio.gather(*(c.request(line, timeout) for c in conns),
                                           return_exceptions=True)
        for conn, ans in zip(conns, answers):
            err = _verdict(unit, word, expect, conn, ans)
            if err is not None:
                raise err

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        if self.server is not None:
            self.server.close()
        else:
            self.sock.close()
        for t in list(self.tasks):
            t.cancel()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _top_level_files(images: Path) -> tuple[bool, bool]:
    """(a state file sits directly in ``images``, ``images`` has subdirectories)."""
    subdirs = False
    with os.scandir(images) as it:
        for e in it:
            if e.is_file():
                if e.name != "manifest.json":
                    return True, subdirs
            elif e.is_dir():
                subdirs = True
    return False, subdirs


class AppCheckpointer(Checkpointer):
    """Application-level checkpointing over the line protocol above."""

    name = "app"
    capabilities = Capabilities(coordinated=True, independent=True, incremental=False,
                                migration=True, live_tcp=False)

    def __init__(self, timeout: float = 30.0, connect_timeout: float = 30.0):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sessions: dict[tuple[str, str], _Session] = {}

    # -- launching ---------------------------------------------------------------------
    def plan_launch(self, unit: UnitProcess, argv: list[str]) -> LaunchPlan:
        """Open the unit's socket and pass its path (and the client's import path) on."""
        self._drop_session(unit)
        path = socket_path_for(unit)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise CheckpointError(f"unit {unit.name}: cannot listen on {path}: {e.strerror}") from None
        session = _Session(path=path, sock=sock)
        self._sessions[(unit.job, unit.name)] = session
        try:
            loop = asyncio.get_running_loop()
            task = loop.create_task(session.start())
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)
        except RuntimeError:
            pass    # no loop yet: started by the first stage that needs it
        pythonpath = os.pathsep.join(p for p in (_PACKAGE_ROOT, unit.env.get("PYTHONPATH", "")) if p)
        return LaunchPlan(argv=list(argv), env={"GRIDCKPT_APP_SOCKET": path,
                                                "PYTHONPATH": pythonpath})

    def _session(self, unit: UnitProcess) -> _Session:
        s = self._sessions.get((unit.job, unit.name))
        if s is None:
            raise CheckpointError(f"unit {unit.name} was not launched by the app checkpointer "
                                  "on this agent")
        return s

    def _drop_session(self, unit: UnitProcess) -> None:
        s = self._sessions.pop((unit.job, unit.name), None)
        if s is not None:
            for c in s.conns:
                c.close()
            if s.server is not None:
                s.server.close()
            else:
                s.sock.close()
            for t in list(s.tasks):
                t.cancel()

    async def release(self, unit: UnitProcess) -> None:
        """The unit is gone for good: close its socket."""
        s = self._sessions.pop((unit.job, unit.name), None)
        if s is not None:
            await s.close()

    def connected_pids(self, unit: UnitProcess) -> list[int]:
        s = self._sessions.get((unit.job, unit.name))
        return [c.pid for c in s.live()] if s else []

    # -- checkpoint --------------------------------------------------------------------
    @staticmethod
    def _ckpt_id(unit: UnitProcess, images: Path) -> str:
        return str(getattr(unit, "checkpoint_id", None) or Path(images).name)

    async def prepare(self, unit: UnitProcess, images: Path) -> None:
        """Pre-checkpoint hook, then the program saves its state into ``images`` and quiesces."""
        s = self._session(unit)
        cid = self._ckpt_id(unit, images)
        await s.wait_connected(self.connect_timeout, unit.name)
        await s.request_all(f"PRE_CHECKPOINT {cid}", "OK", self.timeout, unit.name)
        await s.request_all(f"CHECKPOINT {cid} {images}", "DONE", self.timeout, unit.name)

    async def prepare_many(self, items: list[tuple[UnitProcess, Path]]) -> list[BaseException | None]:
        """``prepare`` for many units: each request goes to every program before any answer is
        awaited (stage_batch); each unit's error, or None."""
        units = [u for u, _ in items]
        outcomes = await self._request_units(units, "PRE_CHECKPOINT", lambda u, i: self._ckpt_id(u, items[i][1]),
                                             "OK", self.connect_timeout)
        return await self._request_units(units, "CHECKPOINT", lambda u, i: f"{self._ckpt_id(u, items[i][1])} {items[i][1]}",
                                         "DONE", self.connect_timeout, outcomes)

    async def resume_cp_many(self, items: list[tuple[UnitProcess]]) -> list[BaseException | None]:
        """``resume_cp`` for many units (the post-checkpoint hook of those that have one)."""
        units = [t[0] for t in items]
        return await self._request_units(
            units, "POST_CHECKPOINT", lambda u, i: getattr(u, "checkpoint_id", "") or "-", "OK", self.timeout)

    async def _request_units(self, units: list[UnitProcess], word: str, rest_of: Callable[[UnitProcess, int], str],
                             expect: str, connect_timeout: float,
                             outcomes: list[BaseException | None] | None = None) -> list[BaseException | None]:
        """``_Session.request_all`` of ``<word> <rest_of(unit, i)>`` for each unit not already
        failed in ``outcomes``: units whose program is connected in one ``request_many``, the
        others (still connecting) each on the general path, side by side.  A program that does
        not handle ``word`` (an optional request it did not announce) is not asked."""
        outcomes = list(outcomes) if outcomes is not None else [None] * len(units)
        reqs: list[tuple[_Conn, str]] = []
        owner: list[int] = []
        waiting: list[int] = []
        sessions = self._sessions
        for i, unit in enumerate(units):
            if outcomes[i] is not None:
                continue
            s = sessions.get((unit.job, unit.name))
            if s is None:
                try:
                    self._session(unit)
                except CheckpointError as e:
                    outcomes[i] = e
                continue
            conns = s.live() if s.server is not None else []
            if not conns:
                waiting.append(i)
                continue
            line = None
            for c in conns:
                if c.handles(word):
                    if line is None:
                        line = f"{word} {rest_of(unit, i)}"
                    reqs.append((c, line))
                    owner.append(i)

        async def connect_then_ask(i: int) -> None:
            s = self._session(units[i])
            await s.wait_connected(connect_timeout, units[i].name)
            await s.request_all(f"{word} {rest_of(units[i], i)}", expect, self.timeout, units[i].name)

        # the connected programs are not kept waiting for those still connecting
        if waiting:
            done, answers = await asyncio.gather(
                asyncio.gather(*(connect_then_ask(i) for i in waiting), return_exceptions=True),
                request_many(reqs, self.timeout) if reqs else asyncio.sleep(0, []))
            for i, res in zip(waiting, done):
                if isinstance(res, BaseException):
                    outcomes[i] = res
        elif reqs:
            answers = await request_many(reqs, self.timeout)
        else:
            return outcomes
        for (conn, _), i, ans in zip(reqs, owner, answers):
            if outcomes[i] is None:
                outcomes[i] = _verdict(units[i].name, word, expect, conn, ans)
        return outcomes

    quick_checkpoint = True     # checkpoint() only lists a directory: stage_batch runs it in turn
    freezer_untouched = True    # see Checkpointer
    stages_images = True        # see Checkpointer: CHECKPOINT may name the unit's spare dir

    def checkpoint_now(self, unit: UnitProcess, images: Path) -> bool:
        """``checkpoint`` when one scandir settles it (nearly always: a state file at the top):
        True if the state is there, CheckpointError if it is not; False when only a walk in a
        thread can tell (the program wrote nothing but subdirectories): await ``checkpoint``."""
        try:
            found, subdirs = _top_level_files(images)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointError(f"unit {unit.name}: images directory {images} is missing") from None
        if found:
            return True
        if not subdirs:
            raise CheckpointError(f"unit {unit.name}: the program wrote no state into {images}")
        return False

    async def checkpoint(self, unit: UnitProcess, images: Path) -> None:
        """The state was written at prepare; check it is there."""
        # one scandir on the loop finds a state file at the top in nearly every case; only a
        # program that wrote nothing but subdirectories costs a walk in a thread
        if not self.checkpoint_now(unit, images):
            await asyncio.to_thread(self._written_deeper, unit, Path(images))

    def check_written(self, unit: UnitProcess, images: Path) -> None:
        """(thread) ``checkpoint``'s check, for the state the program wrote into the spare."""
        if not self.checkpoint_now(unit, images):
            self._written_deeper(unit, Path(images))

    @staticmethod
    def _written_deeper(unit: UnitProcess, images: Path) -> None:
        if not any(p.is_file() and p.name != "manifest.json" for p in images.rglob("*")):
            raise CheckpointError(f"unit {unit.name}: the program wrote no state into {images}")

    async def before_thaw(self, unit: UnitProcess) -> None:
        """Leave quiescence: RESUME goes out while the tree is still frozen, so the thaw that
        follows wakes the program once, with RESUME already waiting (a RESUME after the thaw
        woke every program a second time).

        RESUME is sent without waiting for its OK (the program's acknowledgement carries no
        verdict: leaving quiescence cannot fail), as a thaw does not wait for the tree to be
        scheduled; the OK is read and dropped when it comes, and the next request waits for it.
        Under a stage chain it comes after the chain's answer is out: the loop's app sockets
        are held until the unit's ``background_gate`` opens (app_sockets.hold_reading)."""
        s = self._session(unit)
        line = self._resume_line(unit)
        for conn in await s.wait_connected(self.timeout, unit.name):
            if conn.notify_now():      # the usual case: no lock to take, nothing owed
                conn.notify_sync(line)
            else:
                await conn.notify(line, self.timeout)
        self._hold_answers(unit)

    @staticmethod
    def _resume_line(unit: UnitProcess) -> str:
        return f"RESUME {getattr(unit, 'checkpoint_id', '') or '-'}"

    @staticmethod
    def _hold_answers(unit: UnitProcess) -> None:
        """The programs' OKs are read once the stage chain's answer is out: the loop's app
        sockets are held until the unit's ``background_gate`` opens (app_sockets.hold_reading)."""
        gate_of = getattr(unit, "background_gate", None)
        gate = gate_of() if gate_of is not None else None
        if gate is not None:
            sockets_for(asyncio.get_running_loop()).hold_reading(gate)

    async def before_thaw_many(self, items: list[tuple[UnitProcess]]) -> list[BaseException | None]:
        """``before_thaw`` for many units (stage_batch, units thawed together): RESUME goes to
        every program that can take it at once in one pass; the others (a request still owed an
        answer, a program not connected) take ``before_thaw``, side by side."""
        out: list[BaseException | None] = [None] * len(items)
        slow: list[int] = []
        told: UnitProcess | None = None
        sessions = self._sessions
        for i, (unit,) in enumerate(items):
            s = sessions.get((unit.job, unit.name))
            conns = s.live() if s is not None and s.server is not None else []
            if not conns or not all(c.notify_now() for c in conns):
                slow.append(i)
                continue
            line = self._resume_line(unit)
            for conn in conns:
                conn.notify_sync(line)
            told = unit
        if told is not None:    # one gate for all: the agent's
            self._hold_answers(told)
        if slow:
            done = await asyncio.gather(*(self.before_thaw(items[i][0]) for i in slow), return_exceptions=True)
            for i, res in zip(slow, done):
                out[i] = res if isinstance(res, BaseException) else None
        return out

    async def resume_cp(self, unit: UnitProcess) -> None:
        """The post-checkpoint hook (RESUME went out in ``before_thaw``)."""
        s = self._session(unit)
        cid = str(getattr(unit, "checkpoint_id", "") or "-")
        await s.request_all(f"POST_CHECKPOINT {cid}", "OK", self.timeout, unit.name)

    async def abort(self, unit: UnitProcess, images: Path) -> None:
        """Tell the program to forget the checkpoint (best effort: it may be the failure)."""
        s = self._sessions.get((unit.job, unit.name))
        if s is None or not s.live():
            return
        try:
            await s.request_all(f"ABORT {self._ckpt_id(unit, images)}", "OK",
                                min(self.timeout, 5.0), unit.name)
        except CheckpointError:
            pass

    # -- restart -----------------------------------------------------------------------
    async def check_restorable(self, images: Path, manifest: dict[str, Any]) -> None:
        """Any node can restart an app checkpoint; only the files must be there."""
        if not Path(images).is_dir():
            raise RestoreRefused(f"images directory {images} does not exist")
        if manifest.get("checkpointer", "app") != "app":
            raise RestoreRefused(f"images in {images} were written by the "
                                 f"{manifest.get('checkpointer')!r} checkpointer, not 'app'")

    async def rebuild(self, unit: UnitProcess, images: Path, prepared: Any = None) -> None:
        """Start the command afresh with GRIDCKPT_RESTORE=<images>, stopped before it execs."""
        launch = getattr(unit, "launch", None)
        if launch is None:
            raise CheckpointError(f"unit {unit.name}: the app checkpointer needs a launchable unit")
        argv = unit.spec.get("command")
        if not argv:
            raise CheckpointError(f"unit {unit.name}: no command to restart")
        plan = self.plan_launch(unit, list(argv))
        plan.env["GRIDCKPT_RESTORE"] = str(images)
        await launch(plan, stopped=True)
        unit.restore_images = str(images)   # type: ignore[attr-defined]

    async def resume_rst(self, unit: UnitProcess) -> None:
        """Let the program run, wait for its HELLO and send RESTART <images>."""
        thaw = getattr(unit, "thaw", None)
        if thaw is not None:
            await thaw()
        s = self._session(unit)
        images = getattr(unit, "restore_images", None) or unit.env.get("GRIDCKPT_RESTORE", "")
        await s.request_all(f"RESTART {images}", "OK", self.connect_timeout, unit.name)

