"""Recovery-line commands for the ``gridckpt`` CLI (the lead wires them into argparse)."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from . import exchange
from .line import CURRENT, LineResult, compute


def recovery_line_offline(log_path: str, failed: Sequence[str] | None, as_json: bool) -> int:
    """``gridckpt recovery-line --log FILE [--failed UNIT ...] [--json]``.

    ``failed``, when non-empty, replaces the ``failed`` marks of the file (to ask "what
    if these units fail"); otherwise the file's marks are used, and with none every unit
    counts as failed. Prints the table or the JSON; returns the exit status (2 with
    ``<file>:<line>: <what is wrong>`` on stderr for bad input).
    """
    try:
        model = exchange.read(log_path)
    except exchange.ExchangeError as exc:
        print(f"{log_path}:{exc.line}: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{log_path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    unknown = [u for u in failed or () if u not in model.units]
    if unknown:
        print(f"{log_path}: --failed names unit {unknown[0]!r}, which the log does not declare",
              file=sys.stderr)
        return 2
    result = compute(model, list(failed) if failed else None)
    print(format_line(result, as_json))
    return 0


def recovery_line_live(det_dir: str, failed: Sequence[str] | None, as_json: bool) -> int:
    """``gridckpt recovery-line JOB``: the same, on a job's live determinant log directory
    (``<store>/jobs/<job>/determinants``). Returns the exit status."""
    from .detlog import DeterminantLog

    try:
        model = DeterminantLog(det_dir).load()
        result = compute(model, list(failed) if failed else None)
    except (OSError, ValueError) as exc:
        print(f"{det_dir}: {exc}", file=sys.stderr)
        return 2
    for warning in model.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_line(result, as_json))
    return 0


def format_line(result: LineResult, as_json: bool) -> str:
    """The JSON of DESIGN.md (plus useless/obsolete/failed/newest) or a readable table."""
    if as_json:
        return json.dumps(result.to_json())
    replay_in: dict[str, int] = {}
    replay_out: dict[str, int] = {}
    for r in result.replay:
        n = r["end"] - r["start"]
        replay_out[r["from"]] = replay_out.get(r["from"], 0) + n
        if r["to"] is not None:
            replay_in[r["to"]] = replay_in.get(r["to"], 0) + n
    failed = set(result.failed)
    header = ("unit", "failed", "newest", "line", "ckpts lost", "replay in (B)", "replay out (B)")
    rows = [header]
    for unit, value in result.line.items():
        newest = result.newest[unit]
        lost = 0 if value == CURRENT else newest - value
        rows.append((unit, "yes" if unit in failed else "no", str(newest), str(value), str(lost),
                     str(replay_in.get(unit, 0)), str(replay_out.get(unit, 0))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    if result.replay:
        lines.append("")
        lines.append("bytes to replay (from the writer's send log):")
        for r in result.replay:
            to = r["to"] if r["to"] is not None else "(no reader logged)"
            lines.append(f"  {r['conn']}  {r['from']} -> {to}  [{r['start']}, {r['end']})  "
                         f"{r['end'] - r['start']} B")
    else:
        lines.append("")
        lines.append("bytes to replay: none")
    lines.append(f"domino effect: {'yes' if result.domino else 'no'}")
    for title, table in (("useless checkpoints (on a Z-cycle)", result.useless),
                         ("obsolete checkpoints (older than the all-failed line)",
                          result.obsolete)):
        if table is None:
            continue
        parts = [f"{u}: {_seqs(seqs)}" for u, seqs in table.items() if seqs]
        lines.append(f"{title}: {'; '.join(parts) if parts else 'none'}")
    return "\n".join(lines)


def _seqs(seqs: list[int]) -> str:
    """Compact seq list: 1-4, 7."""
    out = []
    i = 0
    while i < len(seqs):
        j = i
        while j + 1 < len(seqs) and seqs[j + 1] == seqs[j] + 1:
            j += 1
        out.append(str(seqs[i]) if i == j else f"{seqs[i]}-{seqs[j]}")
        i = j + 1
    return ", ".join(out)
