"""`gridckpt trace --unit NAME --out FILE -- CMD ARGS...`: run a command under the shim.

No job and no broker: the command runs with interval 0; when it exits, the determinants
of all its processes are written to FILE in the exchange format (a unit line, then the
send/recv lines).  The exit status is the command's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import BuildError, shim_env
from .control import ControlPage
from .reader import read_directory, to_exchange

USAGE = "usage: gridckpt trace --unit NAME --out FILE -- CMD ARGS..."


class UsageError(ValueError):
    """Bad command line."""


def parse(argv: list[str]) -> tuple[str, Path, list[str]]:
    """(unit, out, command) from the arguments after `trace`."""
    unit = out = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            cmd = argv[i + 1:]
            break
        if arg in ("-h", "--help"):
            raise UsageError(USAGE)
        name, eq, value = arg.partition("=")
        if name not in ("--unit", "--out"):
            raise UsageError(f"trace: unknown argument {arg!r} ({USAGE})")
        if not eq:
            if i + 1 >= len(argv):
                raise UsageError(f"trace: {name} needs a value")
            value = argv[i + 1]
            i += 1
        if name == "--unit":
            unit = value
        else:
            out = value
        i += 1
    else:
        cmd = []
    if not unit:
        raise UsageError(f"trace: --unit NAME is required ({USAGE})")
    if not out:
        raise UsageError(f"trace: --out FILE is required ({USAGE})")
    if not cmd:
        raise UsageError(f"trace: no command given after -- ({USAGE})")
    return unit, Path(out), cmd


def write_exchange(path: Path, unit: str, records: list) -> None:
    """Write the unit line and its merged send/recv lines, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"kind": "unit", "unit": unit}) + "\n")
        for line in to_exchange(records, unit):
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def run(unit: str, out: Path, cmd: list[str]) -> int:
    """Run `cmd` under the shim and export its determinants; returns its exit status."""
    with tempfile.TemporaryDirectory(prefix="gridckpt-trace-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        control = Path(tmp) / "control"
        ControlPage(control).close()  # interval 0
        env = shim_env(unit, logs, control)
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as exc:
            raise UsageError(f"trace: cannot run {cmd[0]!r}: {exc.strerror}") from None
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait()
        write_exchange(out, unit, read_directory(logs))
    return rc if rc >= 0 else 128 - rc


def main(argv: list[str]) -> int:
    """Entry point for the CLI: arguments after `trace`; returns the exit status."""
    try:
        unit, out, cmd = parse(argv)
        if not out.parent.is_dir():
            raise UsageError(f"trace: directory of --out does not exist: {out.parent}")
        return run(unit, out, cmd)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except BuildError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
