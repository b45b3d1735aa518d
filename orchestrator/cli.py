"""The `gridckpt` command line (DESIGN.md section 3).

Exit status: 0 success, 1 a failed operation, 2 bad usage or bad input; errors are one line
on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .control import ControlError, call, default_broker, default_store
from .logs import setup_logging


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", default=None, help="bus URL (default $GRIDCKPT_BROKER, else memory://)")
    common.add_argument("--store", default=None, type=Path, help="checkpoint store (default $GRIDCKPT_STORE)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    common.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the orchestrator")

    p = _Parser(prog="gridckpt", description="Checkpoint/restart for distributed multi-process jobs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common], description=help_)

    s = verb("run", "run a job in the foreground: orchestrator and a local agent in one process")
    s.add_argument("job_file", type=Path)
    s.add_argument("--node", default="local", help="name of the embedded agent's node")
    s.add_argument("--demo", action="store_true",
                   help="the story: run, checkpoint, kill a unit, restart from the checkpoint, show the proof")
    s.add_argument("--demo-wait", type=float, default=3.0, help="seconds the demo lets the job run between steps")
    s.add_argument("--kill-unit", default=None, help="the unit the demo kills (default: the first)")
    s.add_argument("-v", "--verbose", action="store_true", help="log every event, not only warnings")

    s = verb("orchestrator", "the job checkpointer daemon")
    s.add_argument("--heartbeat", type=float, default=1.0, help="agents' heartbeat interval, seconds")

    s = verb("agent", "a node agent daemon")
    s.add_argument("--node", required=True)
    s.add_argument("--site", default="default")
    s.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval, seconds")

    s = verb("submit", "submit a job file; prints the job id")
    s.add_argument("job_file", type=Path)

    s = verb("status", "job and unit states")
    s.add_argument("job", nargs="?")

    s = verb("checkpoint", "coordinated checkpoint now; prints the stage table")
    s.add_argument("job")
    s.add_argument("--unit", default=None, help="checkpoint this unit alone (independent checkpointing)")

    s = verb("checkpoints", "committed checkpoints of a job")
    s.add_argument("job")

    s = verb("restart", "restart a job from a checkpoint")
    s.add_argument("job")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", default=None, help="checkpoint id (default: the newest)")
    g.add_argument("--recovery-line", action="store_true", help="restart from the recovery line")
    s.add_argument("--place", action="append", default=[], metavar="UNIT=NODE")

    s = verb("cancel", "kill every unit of a job")
    s.add_argument("job")

    s = verb("recovery-line", "the recovery line of a job, or of an exchange-format log")
    s.add_argument("job", nargs="?")
    s.add_argument("--log", type=Path, default=None, help="exchange-format JSON Lines file (offline)")
    s.add_argument("--failed", nargs="+", default=[], metavar="UNIT")

    s = verb("determinants", "the job's determinant log")
    s.add_argument("job")
    s.add_argument("--export", type=Path, required=True, metavar="FILE")

    s = verb("gc", "delete checkpoints that no recovery line can use")
    s.add_argument("job")
    s.add_argument("--dry-run", action="store_true")

    sub.add_parser("trace", help="run any command under the interposition shim: "
                   "trace --unit NAME --out FILE -- CMD ARGS...", add_help=False)
    return p


def _print(obj: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        print(json.dumps(obj, indent=None, default=str))
    elif text is not None:
        print(text)


def _place(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        unit, sep, node = item.partition("=")
        if not sep or not unit or not node:
            raise UsageError(f"gridckpt restart: --place wants UNIT=NODE, got {item!r}")
        out[unit] = node
    return out


async def _client(args: argparse.Namespace) -> int:
    from . import tables
    broker = args.broker or default_broker()
    store = args.store or default_store()
    verb = args.verb

    async def c(op: str, **kw: Any) -> Any:
        return await call(broker, store, op, kw, timeout=args.timeout)

    if verb == "submit":
        from .jobspec import load_job_file
        spec = load_job_file(args.job_file)
        res = await c("submit", spec=spec.to_dict())
        _print(res, args.json, res["job"])
    elif verb == "status":
        res = await c("status", job=args.job)
        _print(res, args.json, tables.status_table(res) if args.job else _status_all(res, tables))
    elif verb == "checkpoint":
        res = await (c("unit_checkpoint", job=args.job, unit=args.unit) if args.unit else c("checkpoint", job=args.job))
        _print(res, args.json, tables.stage_table(res))
    elif verb == "checkpoints":
        res = await c("checkpoints", job=args.job)
        _print(res, args.json, tables.checkpoints_table(res))
    elif verb == "restart":
        if args.recovery_line:
            res = await c("restart_line", job=args.job, place=_place(args.place))
            _print(res, args.json, tables.restart_table(res) + "\n" + _replay_text(res))
            return 0
        else:
            res = await c("restart", job=args.job, checkpoint=args.checkpoint, place=_place(args.place))
        _print(res, args.json, tables.restart_table(res))
    elif verb == "cancel":
        res = await c("cancel", job=args.job)
        _print(res, args.json, f"cancelled {res['job']}")
    elif verb == "recovery-line":
        res = await c("recovery_line", job=args.job)
        from .recovery.cli import format_line
        from .recovery.line import CURRENT, LineResult
        newest = res["newest"]
        result = LineResult({u: newest[u] + 1 if v == CURRENT else v for u, v in res["line"].items()}, newest,
                            res["failed"], res["replay"], res["domino"], res.get("useless"), res.get("obsolete"))
        print(format_line(result, args.json))
    elif verb == "determinants":
        res = await c("export_determinants", job=args.job, path=str(args.export.resolve()))
        _print(res, args.json, f"wrote {res.get('records', 0)} records to {args.export}")
    elif verb == "gc":
        res = await c("gc", job=args.job, dry_run=args.dry_run)
        _print(res, args.json, _gc_text(res))
    else:  # pragma: no cover - argparse restricts verbs
        raise UsageError(f"gridckpt: unknown verb {verb}")
    return 0


def _replay_text(res: dict[str, Any]) -> str:
    """What a restart from the recovery line could not give back to the programs."""
    kept = [u for u, v in res["line"].items() if v == "current"]
    lines = ["recovery line: " + ", ".join(f"{u}={v}" for u, v in res["line"].items()),
             "kept running: " + (", ".join(kept) if kept else "none")]
    if res["replay"]:
        lines.append("bytes the readers will not see again (in transit or lost at the line; "
                     "gridckpt does not replay them yet):")
        for r in res["replay"]:
            lines.append(f"  {r['conn']}  {r['from']} -> {r['to'] or '?'}  [{r['start']}, {r['end']})  "
                         f"{r['end'] - r['start']} B")
    else:
        lines.append("no bytes in transit at the line")
    if res.get("domino"):
        lines.append("domino effect: a unit went back to its initial state")
    return "\n".join(lines)


def _gc_text(res: dict[str, Any]) -> str:
    verb = "would delete" if res["dry_run"] else "deleted"
    lines = [f"{res['job']}: {verb} {len(res['deleted_checkpoints'])} coordinated checkpoint(s)"]
    for unit, seqs in sorted(res["deleted_images"].items()):
        lines.append(f"  unit {unit}: images of checkpoint(s) {', '.join(map(str, seqs))}")
    if not res["dry_run"]:
        lines.append(f"  {res['bytes_freed']} bytes freed")
    lines += [f"  {n}" for n in res.get("notes", [])]
    return "\n".join(lines)


def _status_all(res: dict[str, Any], tables: Any) -> str:
    parts = []
    agents = res.get("agents", [])
    if agents:
        parts.append("agents: " + ", ".join(f"{a['node']}@{a['site']}{' (lost)' if a['lost'] else ''}" for a in agents))
    for job in res.get("jobs", []):
        parts.append(tables.status_table(job))
    return "\n\n".join(parts) if parts else "no jobs"


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "trace":
        from interpose.trace import main as trace_main
        return trace_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
        if args.verb == "recovery-line" and args.log is not None:
            if args.job:
                raise UsageError("gridckpt recovery-line: give a JOB or --log FILE, not both")
            from .recovery.cli import recovery_line_offline
            return recovery_line_offline(args.log, args.failed, args.json)
        if args.verb == "recovery-line" and not args.job:
            raise UsageError("gridckpt recovery-line: give a JOB or --log FILE")
        # daemons log every event; `run` and the client verbs only what goes wrong
        quiet = args.verb not in ("orchestrator", "agent") and not getattr(args, "verbose", False)
        setup_logging(as_json=args.log_json, level=logging.WARNING if quiet else logging.INFO)
        if args.verb == "orchestrator":
            from .runner import serve_orchestrator
            return asyncio.run(serve_orchestrator(args))
        if args.verb in ("agent", "run"):
            # The CLI is the composition root: only these verbs need the node side.
            runner = importlib.import_module("nodeagent.runner")
            return asyncio.run(runner.serve_agent(args) if args.verb == "agent" else runner.run_embedded(args))
        return asyncio.run(_client(args))
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"gridckpt: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("gridckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the user gets one line, not a traceback
        from .jobspec import JobFileError
        if isinstance(exc, JobFileError):
            print(f"gridckpt: {exc}", file=sys.stderr)
            return 2
        if os.environ.get("GRIDCKPT_DEBUG"):
            raise
        print(f"gridckpt: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
