"""The common checkpointer API (the "translation library").

A unit is driven through the stages of DESIGN.md section 2.  The node agent owns the
stage order, the freezer (stop / thaw), the manifest and the callbacks that are job-file
commands; a backend owns what only it knows: how to start a unit so that it can later be
checkpointed, how to write its images, and how to rebuild it from them.

Stage calls, for a checkpoint with images directory ``images``::

    prepare(unit, images)      unit running; backend gets ready (app: tell the program)
    <agent freezes the tree>   (stop)
    checkpoint(unit, images)   unit frozen; write every image file into ``images`` (not
                               called when prepare wrote them: see ``stages_images``)
    before_thaw(unit)          resume_cp, tree still frozen (app: RESUME, read once thawed)
    resume_cp(unit)            after the agent thawed the tree
    abort(unit, images)        instead of the rest, after any failure; unit must run on

and for a restart::

    check_restorable(images, manifest)   raise RestoreRefused(reason) if this node cannot
    rebuild(unit, images)      restore the tree, still frozen/stopped; sets unit.root_pid
    resume_rst(unit)           let it run

All methods are coroutines; blocking work (CRIU, file I/O) runs in subprocesses or threads.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol


class CheckpointError(RuntimeError):
    """A stage failed; the text is a one-line reason shown to the user."""


class RestoreRefused(CheckpointError):
    """This node cannot restore the given images (CPU, binaries, missing files...)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; reported by agents at registration."""

    coordinated: bool = True
    independent: bool = False
    incremental: bool = False
    migration: bool = False
    live_tcp: bool = False

    def as_dict(self) -> dict[str, bool]:
        return dict(self.__dict__)


@dataclass
class LaunchPlan:
    """How to start a unit fresh: the argv actually executed, extra env, and notes."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    new_pid_namespace: bool = False


class UnitProcess(Protocol):
    """What a backend may rely on about a unit (implemented by nodeagent.units.Unit)."""

    job: str
    name: str
    spec: dict[str, Any]          # the validated unit table of the job file
    unit_dir: Path                # <store>/jobs/<job>/units/<unit>
    root_pid: int | None          # the root of the unit's process tree
    freezer_path: str | None      # cgroup v1 freezer directory, if the unit has one
    env: dict[str, str]           # the environment the unit runs with

    def pids(self) -> list[int]:
        """Every live pid of the tree (zombies excluded)."""
        ...


class Checkpointer(abc.ABC):
    """One checkpointing backend."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: Optional ``relpath -> bool``: image files that only reach the restored tree, which stays
    #: stopped until resume_rst, so their sha256 may be checked while ``rebuild`` runs.
    hashed_while_restoring: ClassVar[Callable[[str], bool] | None] = None
    #: ``rebuild`` itself refuses (RestoreRefused) whatever ``check_restorable`` would, before it
    #: changes anything: the stage runner then calls check_restorable only when a live tree of
    #: the unit is at stake (it must be refused before that tree is killed).
    rebuild_checks: ClassVar[bool] = False
    #: The backend leaves the unit's freezer cgroup alone between stop and resume_cp (CRIU's
    #: ``--freeze-cgroup`` writes the state it found back): several such units of one job may
    #: then be frozen and thawed through their job's cgroup, one write for all of them.
    freezer_untouched: ClassVar[bool] = False
    #: ``prepare`` writes all the images (app: the program saves its state when asked), and
    #: may write them into the unit's spare images dir, made empty ahead, which the agent moves
    #: into place when it writes the manifest: a checkpoint then makes no directory before its
    #: programs are asked.  ``checkpoint`` is not called for such images; ``check_written``
    #: is, before the manifest is written.
    stages_images: ClassVar[bool] = False

    @abc.abstractmethod
    def plan_launch(self, unit: UnitProcess, argv: list[str]) -> LaunchPlan:
        """Wrap the job file's command so the started tree can be checkpointed."""

    async def prepare(self, unit: UnitProcess, images: Path) -> None:
        """Get ready to checkpoint (the unit still runs)."""

    @abc.abstractmethod
    async def checkpoint(self, unit: UnitProcess, images: Path) -> None:
        """Write the frozen unit's images into ``images``."""

    def check_written(self, unit: UnitProcess, images: Path) -> None:
        """(thread; ``stages_images`` only) Raise CheckpointError unless ``images``, written by
        prepare, holds what a restart needs."""

    async def before_thaw(self, unit: UnitProcess) -> None:
        """resume_cp, while the tree is still frozen: what can be sent to it now is read when
        the thaw wakes it (one wake-up per process instead of two)."""

    async def resume_cp(self, unit: UnitProcess) -> None:
        """The unit was thawed after a committed checkpoint stage."""

    async def abort(self, unit: UnitProcess, images: Path) -> None:
        """Forget a checkpoint in progress; the unit keeps running."""

    async def check_restorable(self, images: Path, manifest: dict[str, Any]) -> None:
        """Raise RestoreRefused if this node cannot restore these images."""

    def rebuild_files(self, images: Path) -> Any:
        """(thread; no live tree of the unit) The file work ``rebuild`` would begin with
        (checks, roll-back), done ahead in the stage runner's verification thread: one trip to
        a thread instead of two.  Its result goes to ``rebuild`` as ``prepared``; None when
        there is nothing to do ahead (rebuild then does it all).  Raises RestoreRefused."""
        return None

    @abc.abstractmethod
    async def rebuild(self, unit: UnitProcess, images: Path, prepared: Any = None) -> None:
        """Restore the unit from ``images``, leaving it frozen or stopped; set unit.root_pid.
        ``prepared``: what ``rebuild_files`` returned for these images, if it was called."""

    @abc.abstractmethod
    async def resume_rst(self, unit: UnitProcess) -> None:
        """Let a rebuilt unit run."""

    # -- optional: work done ahead, outside the stages ----------------------------------
    #: The backend implements ``ready_next`` (the agent then calls it; see there).
    gets_ready: ClassVar[bool] = False

    async def ready_next(self, unit: UnitProcess, spare: Path) -> None:
        """The unit runs and no stage of it is under way (after its launch, after each stage
        chain): get ready ahead for its next checkpoint or a restart, so that the stages find
        the slow start-up done (CRIU: criu started and waiting).  ``spare``: the directory its
        next images dir will be, renamed into place by prepare (it may be missing)."""

    def unit_ended(self, unit: UnitProcess) -> None:
        """The unit's tree is gone (it may still be restarted): drop what was ready for it."""

    async def close(self) -> None:
        """The agent stops: end what the backend started ahead."""

    def stage_note(self, unit: UnitProcess) -> dict[str, Any]:
        """Fields the answer of the unit's checkpoint or rebuild stage adds to its data."""
        return {}
