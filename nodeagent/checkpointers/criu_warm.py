"""CRIU processes started before the stage that needs them: their start-up off the stage's path.

A ``criu dump`` or ``criu restore`` of a small process spends most of its time before it
touches the process: exec, then ``kerndat_init``, a probe of the kernel's features that
creates and destroys namespaces and sockets and waits for RCU grace periods.  Measured here
(a 5 MiB process, no kdat cache in /run, as on a host whose /run is not a tmpfs): a dump of
45 ms reaches its first action-script point after 30 ms, a restore of 44 ms after 34 ms;
with the kdat cache (systemd hosts), about 4 ms of a 20 ms dump.  Started ahead, that part
runs while the unit still computes, and a stage only waits for the work on the process.

``DumpSession``: ``criu swrk`` (CRIU's RPC service, the way runc and libcriu drive it) given
a DUMP request with ``notify_scripts``.  CRIU does its set-up, opens the images directory
and sends the ``pre-dump`` notification before it touches the tree; the session leaves that
notification unanswered until the checkpoint stage, then answers it and every notification
after it (``query-ext-files``, ``post-dump``...) until the dump's answer.  The images
directory is handed over as a descriptor (``images_dir_fd``): it is the unit's spare images
dir (stages.SPARE_DIR), renamed into place by prepare, and the open descriptor follows the
rename.  A session is used only if its dump root, freezer cgroup and images directory
(device and inode) are the checkpoint's own; otherwise it is dropped and a session started
on the spot serves (the same code path, just not ahead).

``RestoreSlot``: ``criu restore`` on an empty placeholder directory whose ``inventory.img``
is a FIFO.  CRIU opens its images directory and probes the kernel, then reads
``inventory.img`` first of all files, and its open of the FIFO blocks until a writer comes.
A restart links the checkpoint's files into the placeholder, opens the FIFO for writing
(which releases CRIU), puts a link to the real inventory in the FIFO's place (so any later
open finds the file) and writes the inventory's bytes through the FIFO.  CRIU's options are
otherwise those of a restore on the command line; a slot is not tied to any unit nor
checkpoint.  A slot whose criu ended before it was released (a CRIU that reads another file
first would fail on the empty placeholder) is not used; one that fails after it was
released is retried once as a plain restore, and if that one succeeds the slots are turned
off for the backend (see criu.py).  A slot's criu runs under ``setpriv --pdeathsig KILL``:
blocked on the FIFO, it would otherwise outlive a killed agent.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import time
import uuid
from pathlib import Path

from . import criu_proto
from .base import CheckpointError
from .criu_cli import CriuRunner, SpawnedProcess

log = logging.getLogger("gridckpt.criu")

SETPRIV = shutil.which("setpriv") or ("/usr/bin/setpriv" if os.access("/usr/bin/setpriv", os.X_OK) else None)
INVENTORY = "inventory.img"
FIFO_SIZE = 65536      # an inventory bigger than a pipe holds is not fed through the FIFO
_CMSG_FDS = socket.CMSG_SPACE(16 * 4)


class WarmFailed(CheckpointError):
    """A process started ahead ended before it was used: nothing was done with the unit."""


def open_dir(path: str | Path) -> tuple[int, tuple[int, int]]:
    """(thread) A descriptor of the directory ``path`` and its (device, inode).  OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    return fd, (st.st_dev, st.st_ino)


class DumpSession:
    """One ``criu swrk`` dump of one process tree, held at CRIU's pre-dump point (see module).
    ``dirfd`` (from ``open_dir``, owned by the session from then on) and ``dir_id`` name the
    images directory, ``images`` its path when the session was made."""

    def __init__(self, runner: CriuRunner, *, root: int, images: str, dirfd: int, dir_id: tuple[int, int],
                 log_name: str, final_log: str, freeze_cgroup: str | None, common: dict[str, object]) -> None:
        self.runner = runner
        self.root = root
        self.images = images
        self.log_name = log_name          # the log while the session runs (a session started
        self.final_log = final_log        # ahead must not truncate the last dump's): then this
        self.freeze_cgroup = freeze_cgroup
        self.common = common
        self.born = time.monotonic()
        self.dir_id = dir_id
        self.released = False             # the pre-dump point was answered: the dump runs
        self.proc: SpawnedProcess | None = None
        self._sock: socket.socket | None = None
        self._dirfd: int | None = dirfd
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._answer: asyncio.Future[criu_proto.Response] | None = None
        self._watching = False

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start ``criu swrk`` and send it the dump request.  OSError when criu cannot be
        started (then nothing is left open)."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._answer = self._loop.create_future()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = SpawnedProcess([self.runner.criu, "swrk", "3"],
                                       self.runner.log_path(self.log_name + ".stderr"), dup2=(theirs.fileno(), 3))
        except BaseException:
            ours.close()
            self._close_dir()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._loop.add_reader(ours.fileno(), self._readable)
        self._watching = True
        self.proc.exited.add_done_callback(self._exited)
        opts = dict(self.common, images_dir_fd=self._dirfd, work_dir_fd=self.runner.work_dir_fd(), pid=self.root,
                    log_file=self.log_name, log_level=self.runner.log_level, notify_scripts=True,
                    freeze_cgroup=self.freeze_cgroup)
        try:
            self._send(criu_proto.dump_request(**opts))
        except CheckpointError as exc:
            self.close()
            raise OSError(str(exc)) from None

    # -- state -----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Started, not released, criu still there."""
        return (not self.released and self.proc is not None and self.proc.alive
                and self._ready is not None and not (self._ready.done() and self._ready.exception()))

    @property
    def waiting(self) -> bool:
        """criu has done its set-up and waits at the pre-dump point."""
        return self.usable and self._ready is not None and self._ready.done()

    def fits(self, root: int, dir_id: tuple[int, int], freeze_cgroup: str | None) -> bool:
        """This session can dump ``root`` into the directory ``dir_id`` (the one it holds)."""
        return (self.usable and root == self.root and freeze_cgroup == self.freeze_cgroup
                and dir_id == self.dir_id)

    # -- the dump --------------------------------------------------------------------------
    async def dump(self, what: str) -> None:
        """Answer the pre-dump point (waiting for it if criu is still starting) and every
        notification after it; return once the dump succeeded and criu exited (then call
        ``keep_log``, whenever).  CheckpointError naming the log (WarmFailed if criu ended
        before the pre-dump point: nothing was done to the tree)."""
        assert self._ready is not None and self._answer is not None and self.proc is not None
        try:
            await asyncio.shield(self._ready)
        except CheckpointError:
            self.close()
            await self.proc.wait()
            self.keep_log()
            raise WarmFailed(str(self.runner.failure(what, self.final_log))) from None
        except asyncio.CancelledError:
            self.close()
            raise
        self.released = True
        try:
            try:
                self._send(criu_proto.notify_answer(True))
                answer: criu_proto.Response | None = await asyncio.shield(self._answer)
            except CheckpointError:
                answer = None
            if answer is None or not answer.success:
                await self.proc.wait()
        except asyncio.CancelledError:
            self.close(kill=True)
            self.keep_log()
            raise
        # A successful answer comes once the images are written and the tree let go: criu's
        # exit after it (about 1 ms) is not waited for; its pidfd watcher reaps it.
        self.close()
        if answer is None or not answer.success:
            self.keep_log()
            raise self.runner.failure(what, self.final_log)

    def keep_log(self) -> None:
        """(thread) The session's log becomes the unit's last dump log."""
        self.runner.keep_log(self.log_name, self.final_log)

    # -- the RPC socket --------------------------------------------------------------------
    def _send(self, packet: bytes) -> None:
        if self._sock is None:
            raise CheckpointError("criu's RPC connection is closed")
        try:
            self._sock.send(packet)
        except OSError as exc:
            self._lost(f"cannot write to criu: {exc.strerror}")
            raise CheckpointError(f"cannot write to criu: {exc.strerror}") from None

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data, ancdata, _, _ = sock.recvmsg(65536, _CMSG_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._unwatch()
            return self._lost(f"criu's RPC connection failed: {exc.strerror}")
        for level, kind, payload in ancdata:       # a descriptor sent along: not ours to keep
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for i in range(0, len(payload) - len(payload) % 4, 4):
                    os.close(int.from_bytes(payload[i:i + 4], "little"))
        if not data:        # end of the connection: stop watching it (it stays readable)
            self._unwatch()
            return self._lost("criu closed its RPC connection")
        try:
            resp = criu_proto.parse_response(data)
        except criu_proto.ProtoError as exc:
            return self._lost(f"criu sent a malformed answer ({exc})")
        assert self._ready is not None and self._answer is not None
        if resp.is_notify:
            if resp.script == "pre-dump" and not self._ready.done():
                self._close_dir()        # criu has its own descriptor of the images dir now
                self._ready.set_result(None)
                if not self.released:
                    return               # held: answered by dump()
            try:
                self._send(criu_proto.notify_answer(True))
            except CheckpointError:
                pass
            return
        if not self._answer.done():
            self._answer.set_result(resp)

    def _unwatch(self) -> None:
        if self._sock is not None and self._loop is not None and self._watching:
            self._loop.remove_reader(self._sock.fileno())
            self._watching = False

    def _exited(self, _: object) -> None:
        # an answer criu sent right before it exited is read first
        for _ in range(16):
            if self._sock is None or self._answer is None or self._answer.done() or not self._pending():
                break
            self._readable()
        self._lost("criu ended before answering")

    def _pending(self) -> bool:
        """Bytes are waiting on the RPC socket."""
        try:
            return bool(self._sock and self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    def _lost(self, reason: str) -> None:
        for fut in (self._ready, self._answer):
            if fut is not None and not fut.done():
                fut.set_exception(CheckpointError(reason))
                fut.exception()          # read: the one who waits, if any, gets it too

    # -- end -------------------------------------------------------------------------------
    def _close_dir(self) -> None:
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None

    def close(self, kill: bool = False) -> None:
        """Close the connection; ``kill``: SIGKILL criu and reap it now (a dump that was under
        way).  Otherwise criu ends by itself: waiting at the pre-dump point, it reads the end of
        the connection; still setting up, it finds it when it sends that notification.  Never
        SIGKILLed while it sets up: kerndat_init forks a ptrace helper that sleeps until criu
        kills it, and a criu killed meanwhile leaves it sleeping for good."""
        if self._sock is not None:
            self._unwatch()
            self._sock.close()
            self._sock = None
        self._close_dir()
        self._lost("session closed")
        if kill and self.proc is not None and self.proc.alive:
            self.proc.kill_and_reap()


def scratch_dir(fallback: Path) -> Path:
    """Where restore slots put their placeholders: a tmpfs (/dev/shm) when there is one, since
    a restart links some twenty files there on its path (1 ms on this VM's ext4, 0.15 ms on
    tmpfs); else ``fallback``.  The directory must be ours: /dev/shm is writable by all."""
    path = Path("/dev/shm") / f"gridckpt-criu-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return path
    except OSError:
        pass
    return fallback


def sweep_scratch(scratch: Path) -> int:
    """Remove the placeholders (and pid files) of slots whose agent is gone, and end what is
    left of their criu: a killed agent's criu dies with it (--pdeathsig) but leaves its
    placeholder behind, and, killed while it set up, the ptrace helper kerndat_init forks
    (its command line is criu's).  How many placeholders and pid files were removed."""
    _kill_orphans(scratch)
    removed = 0
    try:
        names = os.listdir(scratch)
    except OSError:
        return 0
    for name in names:
        parts = name.split("-")
        if len(parts) < 4 or parts[:2] != ["warm", "restore"] or not parts[2].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[2]}"):
            continue
        path = scratch / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def _kill_orphans(scratch: Path) -> None:
    """SIGKILL the processes whose command line names a placeholder of a gone agent."""
    prefix = os.path.join(str(scratch), "warm-restore-").encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        for arg in args:
            if arg.startswith(prefix):
                agent = arg[len(prefix):].split(b"-", 1)[0]
                if agent.isdigit() and not os.path.exists(f"/proc/{agent.decode()}"):
                    try:
                        os.kill(int(entry), signal.SIGKILL)
                    except OSError:
                        pass
                break


class RestoreSlot:
    """A ``criu restore`` started ahead on a placeholder images dir (see module)."""

    def __init__(self, runner: CriuRunner, extra: list[str], scratch: Path | None = None) -> None:
        self.runner = runner
        self.extra = extra
        self.born = time.monotonic()
        self.name = f"warm-restore-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        scratch = scratch or runner.work_dir
        self.dir = scratch / self.name
        self.pidfile = scratch / f"{self.name}.pid"
        self.log_name = f"{self.name}.log"
        self.proc: SpawnedProcess | None = None
        self.released = False

    def start(self) -> None:
        """The placeholder, its FIFO, and criu (OSError: nothing left behind)."""
        if SETPRIV is None:
            raise OSError("setpriv (util-linux) not found")
        os.mkdir(self.dir, 0o700)
        try:
            os.mkfifo(self.dir / INVENTORY, 0o600)
            argv = self.runner.argv(["restore", "-D", str(self.dir), "--restore-detached", "--restore-sibling",
                                     "--pidfile", str(self.pidfile), *self.extra], self.log_name)
            self.proc = SpawnedProcess([SETPRIV, "--pdeathsig", "KILL", *argv],
                                       self.runner.log_path(self.log_name + ".stderr"))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @property
    def usable(self) -> bool:
        return not self.released and self.proc is not None and self.proc.alive

    async def restore(self, images: Path, what: str, final_log: str, timeout: float = 60.0) -> int:
        """Restore from ``images``; the restored root's pid (then call ``finish``, whenever).
        WarmFailed when criu ended before it was released (nothing restored), CheckpointError
        naming the log (kept as ``final_log``) when the restore failed."""
        assert self.proc is not None
        images = Path(os.path.abspath(images))
        try:
            data = await asyncio.to_thread(self._link, images)
        except OSError as exc:
            raise WarmFailed(f"{what}: cannot link the images into the placeholder: {exc}") from None
        if len(data) >= FIFO_SIZE:
            raise WarmFailed(f"{what}: {INVENTORY} too big to pass through a pipe")
        fifo = self.dir / INVENTORY
        deadline = time.monotonic() + timeout
        while True:      # criu opens the FIFO once its start-up is over: usually long before
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO:        # ENXIO: no reader yet
                    raise WarmFailed(f"{what}: cannot open the placeholder's {INVENTORY}: {exc.strerror}") from None
            if not self.proc.alive:
                raise WarmFailed(f"{what}: criu started ahead has ended "
                                 f"({self.runner.failure('criu', self.log_name)})")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise WarmFailed(f"{what}: criu started ahead did not get ready in {timeout:g} s")
            await asyncio.sleep(0.001)
        self.released = True              # from here on the restore is criu's
        try:
            tmp = self.dir / ".inventory"
            os.symlink(images / INVENTORY, tmp)
            os.rename(tmp, fifo)          # a later open of inventory.img finds the file itself
            os.write(fd, data)
        finally:
            os.close(fd)
        try:
            code = await self.proc.wait()
        except asyncio.CancelledError:
            self.proc.kill_and_reap()
            self.finish(final_log)
            raise
        if code != 0:
            self.finish(final_log)
            raise self.runner.failure(what, final_log)
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            self.finish(final_log)
            raise CheckpointError(f"{what}: criu wrote no pid to {self.pidfile}") from None

    def _link(self, images: Path) -> bytes:
        """(thread) Every image but the inventory linked into the placeholder; the inventory's
        bytes."""
        data = (images / INVENTORY).read_bytes()
        for name in os.listdir(images):
            if name != INVENTORY:
                os.symlink(images / name, self.dir / name)
        return data

    def finish(self, log_name: str | None = None) -> None:
        """(thread) Remove the placeholder and the pid file; keep the log as ``log_name`` if given.  An
        unused slot's criu is made to end by itself, not killed (see DumpSession.close): the
        FIFO is moved aside, then opened for writing and closed.  A criu that had opened it
        reads nothing and ends; one still setting up finds no inventory.img and ends."""
        if self.proc is not None and self.proc.alive and not self.released:
            aside = self.dir / ".unused"
            try:
                os.rename(self.dir / INVENTORY, aside)
                fd = os.open(aside, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass        # (ENXIO: no reader: criu has not opened it, and now never will)
            else:
                os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.pidfile.unlink(missing_ok=True)
        if log_name is not None:
            self.runner.keep_log(self.log_name, log_name)
        else:
            self.runner.drop_log(self.log_name)
