"""Ingest of determinant batches into each job's determinant log, exactly once.

A ``determinants`` message carries a msgpack list of ``[kind, conn, start, end, interval]``
records of one unit, read from one shim log file (``source``) starting at record index
``first``.  The sink keeps, per (unit, source), the index of the next record it expects
(persisted next to the log), so a batch redelivered by the broker or re-sent by a restarted
agent is skipped or trimmed, never appended twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import msgpack

from .logs import event
from .recovery.detlog import DeterminantLog
from .store import Store, write_json_atomic

log = logging.getLogger("gridckpt.determinants")
WATERMARKS = "shipped.json"


class BadBatch(ValueError):
    """A determinants message whose batch cannot be decoded (the message is dead-lettered)."""


class DeterminantSink:
    """Appends batches to ``<store>/jobs/<job>/determinants/``; one per orchestrator."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._logs: dict[str, DeterminantLog] = {}
        self._marks: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def log_of(self, job: str) -> DeterminantLog:
        """The job's determinant log (opened once)."""
        with self._lock:
            dl = self._logs.get(job)
            if dl is None:
                d = self.store.determinants_dir(job)
                dl = self._logs[job] = DeterminantLog(str(d))
                path = Path(d) / WATERMARKS
                self._marks[job] = json.loads(path.read_text()) if path.exists() else {}
            return dl

    async def ingest(self, msg: dict[str, Any]) -> int:
        """Append one batch; return how many records were new."""
        try:
            records = msgpack.unpackb(msg["batch"], raw=False, use_list=False)
            if not isinstance(records, tuple):
                raise ValueError("batch is not a list")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BadBatch(f"determinants batch of {msg.get('unit')}: {exc}") from None
        if len(records) != msg["count"]:
            raise BadBatch(f"determinants batch of {msg['unit']}: count {msg['count']} but {len(records)} records")
        return await asyncio.to_thread(self._ingest, msg["job"], msg["unit"], msg.get("source") or "", msg["first"],
                                       records)

    def _ingest(self, job: str, unit: str, source: str, first: int, records: tuple) -> int:
        dl = self.log_of(job)
        with self._lock:
            marks = self._marks[job]
            key = f"{unit}/{source}"
            expected = marks.get(key, 0)
            if first + len(records) <= expected:
                return 0
            if first > expected:
                event(log, "determinant gap", logging.WARNING, job=job, unit=unit, source=source,
                      expected=expected, first=first)
            fresh = records[max(0, expected - first):]
            try:
                n = dl.append(unit, fresh)
            except ValueError as exc:
                raise BadBatch(f"determinants batch of {unit}: {exc}") from None
            marks[key] = first + len(records)
            write_json_atomic(Path(self.store.determinants_dir(job)) / WATERMARKS, marks)
            return n

    async def wait_for(self, job: str, unit: str, shipped: dict[str, int], timeout: float) -> bool:
        """Wait until the log holds every record ``shipped`` names ({source: next index})."""
        self.log_of(job)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            marks = self._marks.get(job, {})
            if all(marks.get(f"{unit}/{src}", 0) >= n for src, n in shipped.items()):
                return True
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.01)

    def add_checkpoint(self, job: str, unit: str, seq: int) -> None:
        """A unit committed checkpoint ``seq`` (blocking; call in a thread)."""
        self.log_of(job).add_checkpoint(unit, seq)

    def rollback(self, job: str, unit: str, seq: int) -> None:
        """A unit restarts from ``seq``: its later intervals are forgotten (blocking)."""
        self.log_of(job).rollback(unit, seq)

    def export(self, job: str, path: str) -> int:
        """Write the job's log in the exchange format (blocking)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return self.log_of(job).export(path)
