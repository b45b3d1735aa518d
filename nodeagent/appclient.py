"""The Python side of the ``app`` checkpointer's line protocol (stdlib only).

Usage in a program::

    from nodeagent.appclient import AppClient

    client = AppClient.from_env()            # a no-op client when not run by gridckpt
    state = load(client.restore_path())      # GRIDCKPT_RESTORE, None on a fresh start
    client.on_checkpoint(lambda d: save(state, d))
    client.start()
    while True:
        work(state)
        client.safe_point()                  # blocks while a checkpoint is in progress

Handlers run in the client's background thread by default, so the program must make its own
state consistent while ``on_checkpoint`` copies it (a lock).  With ``safe_points=True`` the
checkpoint handler runs instead in the thread that calls ``safe_point()``, between two steps
of the program's own loop, which needs no lock.  Either way ``safe_point()`` blocks from the
moment the state is saved until the agent says RESUME or ABORT (quiescence, see the protocol
in ``nodeagent.checkpointers.app`` and ``examples/APP_PROTOCOL.md``).

An asyncio program calls ``await client.asafe_point()`` between steps, or keeps the handlers
in the background thread.
"""

from __future__ import annotations

import os
import socket
import threading
import traceback
from typing import Callable, Optional

PROTOCOL_VERSION = 1
Handler = Callable[..., object]


class AppClient:
    """A connection from a program to its node agent."""

    def __init__(self, socket_path: Optional[str], restore: Optional[str] = None,
                 safe_points: bool = False):
        self.socket_path = socket_path or None
        self._restore = restore or None
        self.safe_points = safe_points
        self._handlers: dict[str, Handler] = {}
        self._sock: Optional[socket.socket] = None
        self._send_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._running = threading.Event()          # set: not quiesced
        self._running.set()
        # safe-points mode: a CHECKPOINT request is "pending" until a safe point takes it,
        # then "running" until its answer is sent; later requests wait for that answer
        self._ckpt: Optional[tuple[str, str]] = None
        self._ckpt_state: Optional[str] = None
        self._cv = threading.Condition()
        self.checkpoints = 0
        self.last_error: Optional[str] = None

    @classmethod
    def from_env(cls, *, safe_points: bool = False) -> "AppClient":
        """A client for GRIDCKPT_APP_SOCKET; disabled (every call a no-op) when it is unset."""
        return cls(os.environ.get("GRIDCKPT_APP_SOCKET"), os.environ.get("GRIDCKPT_RESTORE"),
                   safe_points=safe_points)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def restore_path(self) -> Optional[str]:
        """The images directory to restore from (GRIDCKPT_RESTORE), None on a fresh start."""
        return self._restore

    # -- handlers (usable as decorators) -----------------------------------------------
    def on_checkpoint(self, fn: Handler) -> Handler:
        """fn(images_dir): write the program's state files into images_dir."""
        self._handlers["CHECKPOINT"] = fn
        return fn

    def on_pre_checkpoint(self, fn: Handler) -> Handler:
        """fn(checkpoint_id)."""
        return self._register("PRE_CHECKPOINT", fn)

    def on_post_checkpoint(self, fn: Handler) -> Handler:
        """fn(checkpoint_id), after the job's checkpoint is complete and the program resumed."""
        return self._register("POST_CHECKPOINT", fn)

    def on_restart(self, fn: Handler) -> Handler:
        """fn(images_dir), once after a restart from images_dir."""
        return self._register("RESTART", fn)

    def on_abort(self, fn: Handler) -> Handler:
        """fn(checkpoint_id): the checkpoint was abandoned."""
        self._handlers["ABORT"] = fn
        return fn

    # -- connection --------------------------------------------------------------------
    def start(self) -> "AppClient":
        """Connect, say HELLO and serve the agent's requests in a daemon thread."""
        if not self.enabled or self._thread is not None:
            return self
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.socket_path)
        self._sock = sock
        self._send(f"HELLO {os.getpid()} {PROTOCOL_VERSION} {self._hooks()}")
        self._file = sock.makefile("r", encoding="utf-8", newline="\n")
        welcome = self._file.readline()
        if not welcome.startswith("WELCOME"):
            sock.close()
            raise ConnectionError(f"gridckpt agent refused HELLO: {welcome.strip()!r}")
        self._thread = threading.Thread(target=self._serve, name="gridckpt-app", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Say BYE and disconnect."""
        if self._sock is not None:
            try:
                self._send("BYE")
            except OSError:
                pass
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        self._running.set()

    def _hooks(self) -> str:
        """The optional requests this program handles, for HELLO/HOOKS."""
        return ",".join(w for w in ("PRE_CHECKPOINT", "POST_CHECKPOINT", "RESTART") if w in self._handlers) or "-"

    def _register(self, word: str, fn: Handler) -> Handler:
        self._handlers[word] = fn
        if self._sock is not None:   # registered after start: tell the agent
            self._send(f"HOOKS {self._hooks()}")
        return fn

    def _send(self, line: str) -> None:
        data = (line.replace("\n", " ") + "\n").encode()
        with self._send_lock:
            if self._sock is not None:
                self._sock.sendall(data)

    # -- quiescence ----------------------------------------------------------------------
    def safe_point(self, timeout: Optional[float] = None) -> bool:
        """Call between steps: runs a pending checkpoint (safe_points mode) and blocks while
        the program is quiesced.  Returns True if a checkpoint happened here or was waited on."""
        if not self.enabled:
            return False
        happened = False
        if self.safe_points:
            with self._cv:
                job = self._ckpt if self._ckpt_state == "pending" else None
                if job is not None:
                    self._ckpt_state = "running"
            if job is not None:
                try:
                    self._answer_checkpoint(*job)
                finally:
                    with self._cv:
                        self._ckpt, self._ckpt_state = None, None
                        self._cv.notify_all()
                happened = True
        if not self._running.is_set():
            self._running.wait(timeout)
            happened = True
        return happened

    async def asafe_point(self) -> bool:
        """``safe_point`` for asyncio programs (runs it in the default executor)."""
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(None, self.safe_point)

    @property
    def quiesced(self) -> bool:
        return not self._running.is_set()

    # -- the request loop --------------------------------------------------------------
    def _serve(self) -> None:
        try:
            for line in self._file:
                if not line.endswith("\n"):
                    break
                self._dispatch(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        finally:
            self._running.set()     # never leave the program blocked without an agent

    def _settle_checkpoint(self) -> None:
        """Every request is answered once, in order: before answering the next request,
        finish (or refuse) a checkpoint still waiting for a safe point."""
        with self._cv:
            if self._ckpt_state == "pending":
                self._ckpt, self._ckpt_state = None, None
                self._send("ERROR checkpoint abandoned before the program reached a safe point")
            while self._ckpt_state == "running":
                self._cv.wait()

    def _dispatch(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        self._settle_checkpoint()
        if word == "PING":
            self._send("PONG")
        elif word == "CHECKPOINT":
            cid, _, images = rest.partition(" ")
            if self.safe_points:
                with self._cv:
                    self._ckpt, self._ckpt_state = (cid, images), "pending"
            else:
                self._answer_checkpoint(cid, images)
        elif word in ("RESUME", "ABORT"):
            err = self._call(word, rest) if word == "ABORT" else None
            self._running.set()
            self._send("OK" if err is None else f"ERROR {err}")
        elif word in ("PRE_CHECKPOINT", "POST_CHECKPOINT", "RESTART"):
            err = self._call(word, rest)
            self._send("OK" if err is None else f"ERROR {err}")
        else:
            self._send(f"ERROR unknown request {word}")

    def _answer_checkpoint(self, cid: str, images: str) -> None:
        if "CHECKPOINT" not in self._handlers:
            self._send("ERROR the program registered no on_checkpoint handler")
            return
        self._running.clear()       # quiesced from the moment the state is taken
        err = self._call("CHECKPOINT", images)
        if err is None:
            self.checkpoints += 1
            self._send("DONE")
        else:
            self._running.set()
            self._send(f"ERROR {err}")

    def _call(self, word: str, arg: str) -> Optional[str]:
        fn = self._handlers.get(word)
        if fn is None:
            return None
        try:
            fn(arg)
            return None
        except Exception as e:   # reported to the agent, which aborts the checkpoint
            self.last_error = traceback.format_exc()
            return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
