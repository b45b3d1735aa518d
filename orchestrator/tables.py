"""Plain-text tables for the CLI: the checkpoint stage table (like the 2009
measurement table), the restart table, job status and the checkpoint list.

Input dicts have the shapes of the ``--json`` outputs of DESIGN.md section 3;
missing values print as ``-``.  Text columns are left-aligned, numbers
right-aligned; times are milliseconds with one decimal.
"""

from __future__ import annotations

import signal as _signal
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

__all__ = ["format_table", "stage_table", "restart_table", "status_table", "jobs_table",
           "checkpoints_table", "fmt_ms", "fmt_bytes", "fmt_duration"]

CHECKPOINT_STAGES = ("prepare", "stop", "checkpoint", "resume_cp")
RESTART_STAGES = ("rebuild", "resume_rst")
DASH = "-"


# ---------------------------------------------------------------------------
# cell formatting


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def fmt_ms(value: Any) -> str:
    """Milliseconds with one decimal, ``-`` if absent."""
    v = _num(value)
    return DASH if v is None else f"{v:.1f}"


def fmt_bytes(value: Any) -> str:
    """``812 B``, ``4.9 KiB``, ``5.0 MiB``, ``1.2 GiB``; ``-`` if absent."""
    v = _num(value)
    if v is None:
        return DASH
    if v < 1024:
        return f"{int(v)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        v /= 1024
        if v < 1024 or unit == "TiB":
            return f"{v:.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_duration(seconds: Any) -> str:
    """A compact uptime: ``42s``, ``3m05s``, ``1h02m``, ``2d03h``; ``-`` if absent."""
    v = _num(seconds)
    if v is None or v < 0:
        return DASH
    s = int(v)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _fmt_time(epoch: Any) -> str:
    v = _num(epoch)
    if v is None:
        return DASH
    return datetime.fromtimestamp(v, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _text(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def _exit_text(unit: dict[str, Any]) -> str:
    sig = unit.get("signal")
    if isinstance(sig, int) and not isinstance(sig, bool) and sig > 0:
        try:
            return _signal.Signals(sig).name
        except ValueError:
            return f"signal {sig}"
    code = unit.get("exit_code", unit.get("exit"))
    return _text(code)


# ---------------------------------------------------------------------------
# the generic table


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                 right: Sequence[bool] | None = None, rule_before: Sequence[int] = ()) -> str:
    """Align ``rows`` under ``headers``; ``right[i]`` right-aligns column i.
    A dashed rule is drawn under the header and before each row index in
    ``rule_before``.  No trailing spaces."""
    body = [[_text(c) for c in row] for row in rows]
    ncol = len(headers)
    for row in body:
        if len(row) != ncol:
            raise ValueError(f"row has {len(row)} cells, table has {ncol} columns: {row}")
    right = list(right) if right is not None else [False] * ncol
    widths = [max([len(headers[i])] + [len(r[i]) for r in body]) for i in range(ncol)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(headers), rule]
    for i, row in enumerate(body):
        if i in rule_before:
            lines.append(rule)
        lines.append(line(row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the CLI's tables


def stage_table(result: dict[str, Any]) -> str:
    """The checkpoint stage table: one row per unit and a ``job`` row.

    ``result`` is shaped like ``gridckpt checkpoint --json``: ``units`` with
    name, node, seq, bytes, total_ms and stages_ms {prepare, stop, checkpoint,
    resume_cp}; the job row takes the job-level ``stages_ms`` (wall time of
    each stage across all units) if present, and ``total_ms``.  When the units
    were sealed after they resumed (``stages_ms.seal``), two more columns follow
    ``total``: ``seal`` (hashing the images and writing the manifest while the
    unit runs) and ``committed`` (job row: time until the checkpoint was durable
    and listed, ``committed_ms``).
    """
    return _timed_table(result, ("unit", "node", "seq", "bytes"), CHECKPOINT_STAGES,
                        lambda u: [u.get("name"), u.get("node"), u.get("seq"), fmt_bytes(u.get("bytes"))],
                        lambda us: [DASH, DASH, _sum_bytes(us)],
                        numeric=(False, False, True, True),
                        after=_seal_columns(result))


def _seal_columns(result: dict[str, Any]) -> list[tuple[str, Any, str]]:
    if "seal" not in (result.get("stages_ms") or {}):
        return []
    return [("seal", lambda u: fmt_ms((u.get("stages_ms") or {}).get("seal")),
             fmt_ms((result.get("stages_ms") or {}).get("seal"))),
            ("committed", lambda u: DASH, fmt_ms(result.get("committed_ms")))]


def restart_table(result: dict[str, Any]) -> str:
    """The restart table (rebuild, resume_rst, total per unit and for the job),
    for a result shaped like ``gridckpt restart --json``."""
    return _timed_table(result, ("unit", "node", "pid"), RESTART_STAGES,
                        lambda u: [u.get("name"), u.get("node"), u.get("pid")],
                        lambda us: [DASH, DASH],
                        numeric=(False, False, True))


def _sum_bytes(units: list[dict[str, Any]]) -> str:
    values = [_num(u.get("bytes")) for u in units]
    if not values or any(v is None for v in values):
        return DASH
    return fmt_bytes(sum(values))  # type: ignore[arg-type]


def _timed_table(result: dict[str, Any], lead: Sequence[str], stages: Sequence[str],
                 unit_cells, job_cells, numeric: Sequence[bool],
                 after: Sequence[tuple[str, Any, str]] = ()) -> str:
    """``after``: extra columns past ``total``, as (header, unit row -> cell, job cell)."""
    units = [u for u in result.get("units") or [] if isinstance(u, dict)]
    headers = [*lead, *stages, "total", *(h for h, _, _ in after)]
    right = [*numeric, *([True] * (len(stages) + 1 + len(after)))]
    rows = []
    for u in units:
        st = u.get("stages_ms") or {}
        rows.append([*unit_cells(u), *(fmt_ms(st.get(s)) for s in stages), fmt_ms(u.get("total_ms")),
                     *(cell(u) for _, cell, _ in after)])
    job_st = result.get("stages_ms") or {}
    rows.append(["job", *job_cells(units), *(fmt_ms(job_st.get(s)) for s in stages),
                 fmt_ms(result.get("total_ms")), *(job for _, _, job in after)])
    return format_table(headers, rows, right, rule_before=(len(rows) - 1,) if units else ())


def status_table(status: dict[str, Any], now: float | None = None) -> str:
    """A job's state line and one row per unit: name, node, state, pid, nprocs,
    uptime, exit (code, or the signal's name).  Uptime comes from ``uptime_s``
    (or ``uptime``) seconds, else from ``started`` (epoch) for live units."""
    now = time.time() if now is None else now
    head = f"job {_text(status.get('job'))}: {_text(status.get('state'))}"
    extras = [f"{k} {status[k]}" for k in ("name", "protocol", "restarts") if status.get(k) is not None]
    if extras:
        head += "  (" + ", ".join(extras) + ")"
    rows = []
    for u in status.get("units") or []:
        if not isinstance(u, dict):
            continue
        uptime = u.get("uptime_s", u.get("uptime"))
        started = _num(u.get("started"))
        if _num(uptime) is None and started is not None and u.get("state") in ("running", "stopped"):
            uptime = now - started
        rows.append([u.get("name"), u.get("node"), u.get("state"), u.get("pid"), u.get("nprocs"),
                     fmt_duration(uptime), _exit_text(u)])
    table = format_table(("unit", "node", "state", "pid", "nprocs", "uptime", "exit"), rows,
                         (False, False, False, True, True, True, True))
    return head + "\n" + table


def jobs_table(jobs: Iterable[dict[str, Any]]) -> str:
    """One row per job (``gridckpt status`` without a job): job, name, state, units."""
    rows = []
    for j in jobs:
        units = j.get("units")
        n = len(units) if isinstance(units, list) else units
        rows.append([j.get("job"), j.get("name"), j.get("state"), n])
    if not rows:
        return "(no jobs)"
    return format_table(("job", "name", "state", "units"), rows, (False, False, False, True))


def checkpoints_table(checkpoints: Iterable[dict[str, Any]], max_units_width: int = 48) -> str:
    """Committed checkpoints: id, time (UTC), units (unit:seq ...), bytes, total."""
    rows = []
    for c in checkpoints:
        units = c.get("units") or {}
        if isinstance(units, dict):
            text = " ".join(f"{u}:{s}" for u, s in sorted(units.items()))
        else:  # a list of unit dicts, as in checkpoint --json
            text = " ".join(f"{u.get('name')}:{u.get('seq')}" for u in units if isinstance(u, dict))
        if len(text) > max_units_width:
            n = len(units)
            text = text[: max_units_width - 12].rsplit(" ", 1)[0] + f" ... ({n} units)"
        rows.append([c.get("id", c.get("checkpoint")), _fmt_time(c.get("time")), text or DASH,
                     fmt_bytes(c.get("bytes")), fmt_ms(c.get("total_ms"))])
    if not rows:
        return "(no checkpoints)"
    return format_table(("checkpoint", "time (UTC)", "units", "bytes", "total"), rows,
                        (False, False, False, True, True))
