"""Load and validate a gridckpt job file (TOML) into a ``JobSpec``.

The job file format is the contract of DESIGN.md section 3.  Validation is
strict: unknown keys, wrong types, duplicate unit names, unknown
checkpointers, empty commands and bad durations are rejected with a
``JobFileError`` whose one-line message names the file and the key, e.g.::

    job.toml: units[1].command: must be a non-empty array of non-empty strings, got string

The CLI turns a ``JobFileError`` into exit status 2.

``JobSpec.to_dict()`` / ``JobSpec.from_dict()`` (and the same on ``UnitSpec``)
give plain JSON/msgpack-able dicts: durations are float seconds, paths strings.

Rules beyond the type checks:

* ``name`` (job and unit) and ``node``/``site`` become directory names and
  routing-key words: names match ``[A-Za-z0-9_.-]+`` (not ``.`` or ``..``),
  node and site match ``[A-Za-z0-9_-]+`` (no dots: they are words of the
  routing key ``agent.<site>.<node>``).
* ``protocol = "independent"`` implies ``interpose = true`` on every unit; an
  explicit ``interpose = false`` there is an error.  Unit-level
  ``checkpoint_every`` / ``checkpoint_jitter`` only make sense for
  independent jobs and are rejected on coordinated ones (the job-level
  ``checkpoint_every`` drives coordinated checkpoints).
* ``cwd`` is resolved against the job file's directory (``base_dir``);
  ``command[0]`` is kept as written (the agent resolves it, normally against
  ``cwd`` or ``base_dir``).
"""

from __future__ import annotations

import datetime as _dt
import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "JobFileError", "JobSpec", "UnitSpec", "load_job_file", "parse_job", "parse_duration",
    "KNOWN_CHECKPOINTERS", "PROTOCOLS", "RESTART_POLICIES", "CALLBACKS", "VERIFY_MODES",
]

KNOWN_CHECKPOINTERS = ("criu", "app")
PROTOCOLS = ("coordinated", "independent")
RESTART_POLICIES = ("auto", "manual")
CALLBACKS = ("pre_checkpoint", "post_checkpoint", "restart")
VERIFY_MODES = ("changed", "full")

JOB_KEYS = ("name", "protocol", "checkpoint_every", "restart", "max_restarts",
            "stage_timeout", "verify_images", "units")
UNIT_KEYS = ("name", "command", "checkpointer", "node", "site", "interpose", "env", "cwd",
             "callbacks", "checkpoint_every", "checkpoint_jitter")

DEFAULT_STAGE_TIMEOUT = 30.0
DEFAULT_MAX_RESTARTS = 3

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PLACE_RE = re.compile(r"[A-Za-z0-9_-]+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_ORDER = ("h", "m", "s", "ms")
_DURATION_SCALE = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)%")


class JobFileError(ValueError):
    """A job file (or job dict) that is not valid; the message is one line naming file and key."""


# ---------------------------------------------------------------------------
# data classes


@dataclass
class UnitSpec:
    """One unit of a job: a command run as its own process tree on one node."""

    name: str
    command: list[str]
    checkpointer: str = "criu"
    node: str | None = None
    site: str | None = None
    interpose: bool = False
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    callbacks: dict[str, list[str]] = field(default_factory=dict)
    checkpoint_every: float | None = None
    checkpoint_jitter: float | None = None
    """Absolute jitter in seconds (from a duration like ``"2s"``)."""
    checkpoint_jitter_fraction: float | None = None
    """Relative jitter as a fraction of the interval (from ``"10%"`` -> 0.1)."""
    base_dir: str = ""
    """Absolute directory of the job file (copied from the job for the agent)."""

    def workdir(self) -> str:
        """The directory the unit runs in: ``cwd`` if given, else the job file's directory."""
        return self.cwd or self.base_dir

    def jitter_seconds(self, interval: float) -> float:
        """The jitter in seconds for a checkpoint interval of ``interval`` seconds."""
        if self.checkpoint_jitter is not None:
            return self.checkpoint_jitter
        if self.checkpoint_jitter_fraction is not None:
            return self.checkpoint_jitter_fraction * interval
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON/msgpack-able dict (copies, so callers may mutate it)."""
        return {
            "name": self.name,
            "command": list(self.command),
            "checkpointer": self.checkpointer,
            "node": self.node,
            "site": self.site,
            "interpose": self.interpose,
            "env": dict(self.env),
            "cwd": self.cwd,
            "callbacks": {k: list(v) for k, v in self.callbacks.items()},
            "checkpoint_every": self.checkpoint_every,
            "checkpoint_jitter": self.checkpoint_jitter,
            "checkpoint_jitter_fraction": self.checkpoint_jitter_fraction,
            "base_dir": self.base_dir,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UnitSpec":
        """Rebuild from ``to_dict()`` output; raises ``JobFileError`` on a malformed dict.

        Keys this version does not know are ignored (a newer orchestrator may add some).
        """
        where = "unit spec"
        if not isinstance(data, dict):
            raise JobFileError(f"{where}: must be a table/dict, got {_tname(data)}")
        name = _need(data, "name", str, where)
        where = f"unit spec {name!r}"
        command = _need(data, "command", list, where)
        if not command or not all(isinstance(c, str) and c for c in command):
            raise JobFileError(f"{where}: command: must be a non-empty list of non-empty strings")
        env = data.get("env") or {}
        callbacks = data.get("callbacks") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise JobFileError(f"{where}: env: must map strings to strings")
        if not isinstance(callbacks, dict) or not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v)
                for v in callbacks.values()):
            raise JobFileError(f"{where}: callbacks: must map names to lists of strings")
        return cls(
            name=name,
            command=list(command),
            checkpointer=_opt(data, "checkpointer", str, where) or "criu",
            node=_opt(data, "node", str, where),
            site=_opt(data, "site", str, where),
            interpose=bool(_opt(data, "interpose", bool, where) or False),
            env=dict(env),
            cwd=_opt(data, "cwd", str, where),
            callbacks={k: list(v) for k, v in callbacks.items()},
            checkpoint_every=_opt_num(data, "checkpoint_every", where),
            checkpoint_jitter=_opt_num(data, "checkpoint_jitter", where),
            checkpoint_jitter_fraction=_opt_num(data, "checkpoint_jitter_fraction", where),
            base_dir=_opt(data, "base_dir", str, where) or "",
        )


@dataclass
class JobSpec:
    """A validated job: its policy and its units."""

    name: str
    units: list[UnitSpec]
    protocol: str = "coordinated"
    checkpoint_every: float | None = None
    restart: str = "manual"
    max_restarts: int = DEFAULT_MAX_RESTARTS
    stage_timeout: float = DEFAULT_STAGE_TIMEOUT
    verify_images: str = "changed"
    """What a restart hashes: ``changed`` the image files whose inode, size, mtime or ctime
    differ from when they were sealed; ``full`` every file, every time."""
    base_dir: str = ""
    """Absolute directory of the job file; relative paths in the file are relative to it."""
    source: str = ""
    """The job file as the user named it (for messages), or ``<dict>``."""

    def unit(self, name: str) -> UnitSpec:
        """The unit called ``name`` (KeyError if there is none)."""
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def unit_checkpoint_every(self, unit: UnitSpec | str) -> float | None:
        """The checkpoint interval that applies to a unit of an independent job
        (its own ``checkpoint_every``, else the job's)."""
        u = self.unit(unit) if isinstance(unit, str) else unit
        return u.checkpoint_every if u.checkpoint_every is not None else self.checkpoint_every

    def validate(self) -> "JobSpec":
        """Check the rules ``parse_job`` enforces that types alone do not (names, choices,
        ranges, unique units); ``JobFileError`` naming the key.  Returns self."""
        where = self.source or "job spec"

        def bad(key: str, msg: str) -> NoReturn:
            raise JobFileError(f"{where}: {key}: {msg}")

        if not _NAME_RE.fullmatch(self.name) or self.name in (".", ".."):
            bad("name", f"{self.name!r} is not a valid name")
        if self.protocol not in PROTOCOLS:
            bad("protocol", f"unknown value {self.protocol!r} (known: {_quoted(PROTOCOLS)})")
        if self.restart not in RESTART_POLICIES:
            bad("restart", f"unknown value {self.restart!r} (known: {_quoted(RESTART_POLICIES)})")
        if self.verify_images not in VERIFY_MODES:
            bad("verify_images", f"unknown value {self.verify_images!r} (known: {_quoted(VERIFY_MODES)})")
        if self.max_restarts < 0:
            bad("max_restarts", f"must be an integer >= 0, got {self.max_restarts}")
        for key in ("checkpoint_every", "stage_timeout"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                bad(key, f"must be a positive duration, got {value!r}")
        if not self.units:
            bad("units", "must be a non-empty array of tables")
        seen: dict[str, int] = {}
        for i, u in enumerate(self.units):
            at = f"units[{i}]"
            if not _NAME_RE.fullmatch(u.name) or u.name in (".", ".."):
                bad(f"{at}.name", f"{u.name!r} is not a valid name")
            if u.name in seen:
                bad(f"{at}.name", f"duplicate unit name {u.name!r} (also units[{seen[u.name]}])")
            seen[u.name] = i
            if u.checkpointer not in KNOWN_CHECKPOINTERS:
                bad(f"{at}.checkpointer", f"unknown checkpointer {u.checkpointer!r} "
                    f"(known: {_quoted(KNOWN_CHECKPOINTERS)})")
            for key in ("node", "site"):
                value = getattr(u, key)
                if value is not None and not _PLACE_RE.fullmatch(value):
                    bad(f"{at}.{key}", f"{value!r} is not a valid {key} name")
            if self.protocol == "independent" and not u.interpose:
                bad(f"{at}.interpose", 'must be true when protocol = "independent"')
            for key in ("checkpoint_every", "checkpoint_jitter"):
                value = getattr(u, key)
                if value is not None and not (math.isfinite(value) and value > 0):
                    bad(f"{at}.{key}", f"must be a positive duration, got {value!r}")
            f = u.checkpoint_jitter_fraction
            if f is not None and not 0 < f <= 1:
                bad(f"{at}.checkpoint_jitter", f"a jitter fraction must be in (0, 1], got {f!r}")
            unknown = [k for k in u.callbacks if k not in CALLBACKS]
            if unknown:
                bad(f"{at}.callbacks.{unknown[0]}", f"unknown key (known: {', '.join(CALLBACKS)})")
            if any(not cmd for cmd in u.callbacks.values()):
                bad(f"{at}.callbacks", "every callback must be a non-empty command")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON/msgpack-able dict (copies, so callers may mutate it)."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "checkpoint_every": self.checkpoint_every,
            "restart": self.restart,
            "max_restarts": self.max_restarts,
            "stage_timeout": self.stage_timeout,
            "verify_images": self.verify_images,
            "base_dir": self.base_dir,
            "source": self.source,
            "units": [u.to_dict() for u in self.units],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        """Rebuild from ``to_dict()`` output and ``validate()`` it (a spec that came over
        the bus is checked again); raises ``JobFileError`` on a malformed dict.
        Keys this version does not know are ignored."""
        where = "job spec"
        if not isinstance(data, dict):
            raise JobFileError(f"{where}: must be a table/dict, got {_tname(data)}")
        units = _need(data, "units", list, where)
        max_restarts = _opt(data, "max_restarts", int, where)
        stage_timeout = _opt_num(data, "stage_timeout", where)
        return cls(
            name=_need(data, "name", str, where),
            units=[UnitSpec.from_dict(u) for u in units],
            protocol=_opt(data, "protocol", str, where) or "coordinated",
            checkpoint_every=_opt_num(data, "checkpoint_every", where),
            restart=_opt(data, "restart", str, where) or "manual",
            max_restarts=DEFAULT_MAX_RESTARTS if max_restarts is None else max_restarts,
            stage_timeout=DEFAULT_STAGE_TIMEOUT if stage_timeout is None else stage_timeout,
            verify_images=_opt(data, "verify_images", str, where) or "changed",
            base_dir=_opt(data, "base_dir", str, where) or "",
            source=_opt(data, "source", str, where) or "",
        ).validate()


# ---------------------------------------------------------------------------
# loading


def load_job_file(path: str | os.PathLike[str]) -> JobSpec:
    """Read, parse and validate a job file; raise ``JobFileError`` naming file and key."""
    source = os.fspath(path)
    p = Path(source)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise JobFileError(f"{source}: no such job file") from None
    except IsADirectoryError:
        raise JobFileError(f"{source}: is a directory, not a job file") from None
    except OSError as e:
        raise JobFileError(f"{source}: cannot read job file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError(f"{source}: not UTF-8 text (byte offset {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobFileError(f"{source}: invalid TOML: {e}") from None
    return parse_job(data, source, base_dir=p.resolve().parent)


def parse_job(data: dict[str, Any], source: str,
              base_dir: str | os.PathLike[str] | None = None) -> JobSpec:
    """Validate an already-parsed job table.

    ``source`` names the file in error messages.  ``base_dir`` is the directory
    relative paths are resolved against (default: the directory of ``source``
    if it names an existing file, else the current directory).
    """
    v = _Validator(source)
    if base_dir is None:
        src = Path(source)
        base_dir = src.resolve().parent if src.is_file() else Path.cwd()
    base = str(Path(base_dir).resolve())
    if not isinstance(data, dict):
        v.fail("", f"must be a table, got {_tname(data)}")
    v.no_unknown(data, JOB_KEYS, "")

    name = v.name(data, "name", "name", required=True)
    protocol = v.choice(data, "protocol", "protocol", PROTOCOLS, "coordinated")
    checkpoint_every = v.duration(data, "checkpoint_every", "checkpoint_every")
    restart = v.choice(data, "restart", "restart", RESTART_POLICIES, "manual")
    max_restarts = v.integer(data, "max_restarts", "max_restarts", DEFAULT_MAX_RESTARTS, minimum=0)
    stage_timeout = v.duration(data, "stage_timeout", "stage_timeout")
    if stage_timeout is None:
        stage_timeout = DEFAULT_STAGE_TIMEOUT
    verify_images = v.choice(data, "verify_images", "verify_images", VERIFY_MODES, "changed")

    if "units" not in data:
        v.fail("units", "missing: a job needs at least one [[units]] table")
    units_raw = data["units"]
    if not isinstance(units_raw, list) or not units_raw:
        v.fail("units", f"must be a non-empty array of tables ([[units]]), got {_describe(units_raw)}")
    units: list[UnitSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(units_raw):
        unit = _parse_unit(v, raw, f"units[{i}]", protocol, base)
        if unit.name in seen:
            v.fail(f"units[{i}].name",
                   f"duplicate unit name {unit.name!r} (also units[{seen[unit.name]}])")
        seen[unit.name] = i
        units.append(unit)
    return JobSpec(name=name, units=units, protocol=protocol, checkpoint_every=checkpoint_every,
                   restart=restart, max_restarts=max_restarts, stage_timeout=stage_timeout,
                   verify_images=verify_images, base_dir=base, source=source)


def _parse_unit(v: "_Validator", raw: Any, at: str, protocol: str, base: str) -> UnitSpec:
    if not isinstance(raw, dict):
        v.fail(at, f"must be a table, got {_describe(raw)}")
    v.no_unknown(raw, UNIT_KEYS, at)
    name = v.name(raw, "name", f"{at}.name", required=True)
    if "command" not in raw:
        v.fail(f"{at}.command", "missing: every unit needs a command (a non-empty array of strings)")
    command = v.str_list(raw["command"], f"{at}.command")
    checkpointer = v.choice(raw, "checkpointer", f"{at}.checkpointer", KNOWN_CHECKPOINTERS, "criu",
                            what="checkpointer")
    node = v.place(raw, "node", f"{at}.node")
    site = v.place(raw, "site", f"{at}.site")
    interpose = v.boolean(raw, "interpose", f"{at}.interpose")
    if protocol == "independent":
        if interpose is False:
            v.fail(f"{at}.interpose", 'must be true (or absent) when protocol = "independent": '
                   "independent checkpointing needs the shim's determinant log")
        interpose = True
    env = v.env(raw, "env", f"{at}.env")
    cwd = v.string(raw, "cwd", f"{at}.cwd")
    if cwd is not None:
        cwd = os.path.normpath(os.path.join(base, os.path.expanduser(cwd)))
    callbacks = v.callbacks(raw, "callbacks", f"{at}.callbacks")
    every = v.duration(raw, "checkpoint_every", f"{at}.checkpoint_every")
    jitter, fraction = v.jitter(raw, "checkpoint_jitter", f"{at}.checkpoint_jitter")
    if protocol != "independent":
        for key in ("checkpoint_every", "checkpoint_jitter"):
            if key in raw:
                v.fail(f"{at}.{key}", 'only allowed when protocol = "independent" '
                       "(coordinated jobs use the job-level checkpoint_every)")
    return UnitSpec(name=name, command=command, checkpointer=checkpointer, node=node, site=site,
                    interpose=bool(interpose), env=env, cwd=cwd, callbacks=callbacks,
                    checkpoint_every=every, checkpoint_jitter=jitter,
                    checkpoint_jitter_fraction=fraction, base_dir=base)


# ---------------------------------------------------------------------------
# durations


def parse_duration(value: Any, key: str = "duration") -> float:
    """Parse ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"1m30s"`` or a positive
    number of seconds into float seconds; ``ValueError`` names ``key`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{key}: must be a duration like \"30s\" or a number of seconds, got boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value.strip(), key)
    else:
        raise ValueError(f"{key}: must be a duration like \"30s\" or a number of seconds, "
                         f"got {_describe(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{key}: must be a positive duration, got {value!r}")
    return seconds


def _parse_duration_text(text: str, key: str) -> float:
    bad = ValueError(f"{key}: {text!r} is not a duration (use e.g. \"500ms\", \"30s\", \"2m\", "
                     f"\"1h\", \"1m30s\")")
    if not text:
        raise bad
    pos, total, last_rank = 0, 0.0, -1
    while pos < len(text):
        m = _DURATION_PART_RE.match(text, pos)
        if not m:
            raise bad
        rank = _DURATION_ORDER.index(m.group(2))
        if rank <= last_rank:  # units must go from largest to smallest, each once
            raise bad
        last_rank = rank
        total += float(m.group(1)) * _DURATION_SCALE[m.group(2)]
        pos = m.end()
    return total


# ---------------------------------------------------------------------------
# the validator: one place that knows how to word errors


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, msg: str) -> NoReturn:
        prefix = f"{self.source}: {key}: " if key else f"{self.source}: "
        raise JobFileError(prefix + msg)

    def no_unknown(self, table: dict[str, Any], known: tuple[str, ...], at: str) -> None:
        unknown = [k for k in table if k not in known]
        if not unknown:
            return
        paths = ", ".join(f"{at}.{k}" if at else k for k in unknown)
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            if close:
                hints.append(f"{close[0]!r}" if len(unknown) == 1 else f"{close[0]!r} for {k!r}")
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        noun = "unknown key" if len(unknown) == 1 else "unknown keys"
        self.fail(paths, f"{noun} (known: {', '.join(known)}){hint}")

    def _typed(self, table: dict[str, Any], key: str, path: str, types: tuple[type, ...],
               expected: str) -> Any:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) and bool not in types:
            self.fail(path, f"must be {expected}, got boolean")
        if not isinstance(value, types):
            self.fail(path, f"must be {expected}, got {_describe(value)}")
        return value

    def string(self, table: dict[str, Any], key: str, path: str) -> str | None:
        value = self._typed(table, key, path, (str,), "a non-empty string")
        if value is not None and not value:
            self.fail(path, "must be a non-empty string")
        if value is not None and "\0" in value:
            self.fail(path, "must not contain a NUL character")
        return value

    def name(self, table: dict[str, Any], key: str, path: str, required: bool) -> str:
        if key not in table and required:
            self.fail(path, "missing (required)")
        value = self._typed(table, key, path, (str,), "a string")
        if not _NAME_RE.fullmatch(value) or value in (".", ".."):
            self.fail(path, f"{value!r} is not a valid name (use letters, digits, '_', '.', '-')")
        return value

    def place(self, table: dict[str, Any], key: str, path: str) -> str | None:
        value = self._typed(table, key, path, (str,), "a string")
        if value is not None and not _PLACE_RE.fullmatch(value):
            self.fail(path, f"{value!r} is not a valid {key} name (use letters, digits, '_', '-')")
        return value

    def choice(self, table: dict[str, Any], key: str, path: str, choices: tuple[str, ...],
               default: str, what: str = "value") -> str:
        value = self._typed(table, key, path, (str,), f"one of {_quoted(choices)}")
        if value is None:
            return default
        if value not in choices:
            self.fail(path, f"unknown {what} {value!r} (known: {_quoted(choices)})")
        return value

    def boolean(self, table: dict[str, Any], key: str, path: str) -> bool | None:
        return self._typed(table, key, path, (bool,), "a boolean (true or false)")

    def integer(self, table: dict[str, Any], key: str, path: str, default: int,
                minimum: int) -> int:
        value = self._typed(table, key, path, (int,), f"an integer >= {minimum}")
        if value is None:
            return default
        if value < minimum:
            self.fail(path, f"must be an integer >= {minimum}, got {value}")
        return value

    def duration(self, table: dict[str, Any], key: str, path: str) -> float | None:
        if key not in table:
            return None
        try:
            return parse_duration(table[key], path)
        except ValueError as e:
            raise JobFileError(f"{self.source}: {e}") from None

    def jitter(self, table: dict[str, Any], key: str, path: str) -> tuple[float | None, float | None]:
        if key not in table:
            return None, None
        value = table[key]
        if isinstance(value, str):
            m = _PERCENT_RE.fullmatch(value.strip())
            if m:
                pct = float(m.group(1))
                if not 0 < pct <= 100:
                    self.fail(path, f"a jitter fraction must be in (0%, 100%], got {value!r}")
                return None, pct / 100.0
        try:
            return parse_duration(value, path), None
        except ValueError as e:
            raise JobFileError(f"{self.source}: {e} or a fraction like \"10%\"") from None

    def str_list(self, value: Any, path: str) -> list[str]:
        expected = "a non-empty array of non-empty strings"
        if not isinstance(value, list) or not value:
            self.fail(path, f"must be {expected}, got {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{path}[{i}]", f"must be a non-empty string, got {_describe(item)}")
            if not item:
                self.fail(f"{path}[{i}]", "must be a non-empty string, got an empty string")
            if "\0" in item:
                self.fail(f"{path}[{i}]", "must not contain a NUL character")
        return list(value)

    def env(self, table: dict[str, Any], key: str, path: str) -> dict[str, str]:
        value = self._typed(table, key, path, (dict,), "a table of string values")
        if value is None:
            return {}
        out: dict[str, str] = {}
        for k, val in value.items():
            if not k or "=" in k or "\0" in k:
                self.fail(f"{path}.{k}", "is not a valid environment variable name")
            if not isinstance(val, str):
                self.fail(f"{path}.{k}", f"must be a string, got {_describe(val)} "
                          "(quote it: environment values are strings)")
            if "\0" in val:
                self.fail(f"{path}.{k}", "must not contain a NUL character")
            out[k] = val
        return out

    def callbacks(self, table: dict[str, Any], key: str, path: str) -> dict[str, list[str]]:
        value = self._typed(table, key, path, (dict,), "a table of commands")
        if value is None:
            return {}
        self.no_unknown(value, CALLBACKS, path)
        return {k: self.str_list(cmd, f"{path}.{k}") for k, cmd in value.items()}


# ---------------------------------------------------------------------------
# helpers


_TOML_TYPES = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array",
               dict: "table", _dt.datetime: "datetime", _dt.date: "date", _dt.time: "time"}


def _tname(value: Any) -> str:
    for t, n in _TOML_TYPES.items():
        if type(value) is t:
            return n
    return type(value).__name__


def _describe(value: Any) -> str:
    """``string "x"``, ``integer 3``, ``empty array`` ... for error messages."""
    if isinstance(value, (list, dict)) and not value:
        return f"empty {_tname(value)}"
    if isinstance(value, (list, dict)):
        return _tname(value)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{_tname(value)} {text}"


def _quoted(choices: tuple[str, ...]) -> str:
    return ", ".join(f'"{c}"' for c in choices)


def _need(data: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in data:
        raise JobFileError(f"{where}: {key}: missing")
    value = data[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise JobFileError(f"{where}: {key}: must be {typ.__name__}, got {_tname(value)}")
    return value


def _opt(data: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if data.get(key) is None:
        return None
    return _need(data, key, typ, where)


def _opt_num(data: dict[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobFileError(f"{where}: {key}: must be a number, got {_tname(value)}")
    return float(value)
