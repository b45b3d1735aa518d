"""Ship the shim's determinant records of this node's units to the orchestrator.

For every unit run with the shim, the shipper tails the per-process logs in the unit's shim
directory, batches new records (msgpack) and publishes them with publisher confirms.  A
record stays pending until its batch is confirmed: the confirmed offset of every log is
persisted in ``<shim dir>/shipped.json`` only after the confirm, so an agent restart re-sends
what was not confirmed and the orchestrator (which keeps per-source watermarks) drops what it
already has.  Nothing is lost or duplicated.

The shim continues its last record of a connection direction in place while the bytes stay
contiguous (gridckpt_shim.h, version 2), so a record is closed (made final, atomically, with
``interpose.logctl``) right before it is read for shipping: what goes out is its final end,
and the writer starts a new record for its next bytes.  Records still go out exactly once,
in index order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from interpose import BuildError
from interpose.logctl import read_final_records
from interpose.reader import REC_SIZE, log_files
from orchestrator import protocol
from orchestrator.bus.base import Bus, BusError
from orchestrator.logs import event
from orchestrator.store import write_json_atomic

log = logging.getLogger("gridckpt.shipper")
STATE_FILE = "shipped.json"
BATCH_RECORDS = 20_000


@dataclass
class _Tail:
    """One unit's shim directory and the confirmed offset of each of its logs."""

    job: str
    unit: str
    directory: Path
    offsets: dict[str, int] = field(default_factory=dict)
    epoch: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # source -> next record index, this epoch

    def load(self) -> None:
        path = self.directory / STATE_FILE
        try:
            state = json.loads(path.read_text())
            self.offsets = {str(k): int(v) for k, v in state.get("offsets", {}).items()}
            self.epoch = int(state.get("epoch", 0))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, AttributeError) as exc:
            event(log, "shipper state unreadable, re-sending from the start", logging.WARNING,
                  path=str(path), error=str(exc))

    def save(self) -> None:
        write_json_atomic(self.directory / STATE_FILE, {"offsets": self.offsets, "epoch": self.epoch})


class Shipper:
    """Tails the shim logs of registered units and publishes their records."""

    def __init__(self, bus: Bus, site: str, node: str, *, period: float = 0.1,
                 batch_records: int = BATCH_RECORDS) -> None:
        self.bus = bus
        self.site = site
        self.node = node
        self.period = period
        self.batch_records = batch_records
        self._tails: dict[tuple[str, str], _Tail] = {}
        self._task: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()
        self.shipped = 0

    def watch(self, job: str, unit: str, directory: Path) -> None:
        """Start shipping the logs of ``directory`` (idempotent)."""
        key = (job, unit)
        if key not in self._tails:
            tail = _Tail(job, unit, Path(directory))
            tail.load()
            self._tails[key] = tail

    def rolled_back(self, job: str, unit: str) -> None:
        """The unit was restored (still stopped): its logs hold what they held at the checkpoint
        (CRIU puts the shim's mapped logs back), so shipping resumes at the end of each log's
        valid records, under a new epoch so the orchestrator takes the new records as new.
        Every valid record is closed first: the restored processes must not grow a record
        that lies before the resume point (it may have been shipped already)."""
        tail = self._tails.get((job, unit))
        if tail is not None:
            tail.epoch += 1
            tail.sent.clear()
            names = {p.name for p in log_files(tail.directory)} if tail.directory.exists() else set()
            for name in sorted(names | set(tail.offsets)):
                try:
                    _, valid = read_final_records(tail.directory / name, 0)
                except FileNotFoundError:
                    valid = 0
                except (OSError, ValueError, BuildError, RuntimeError) as exc:
                    event(log, "cannot close the records of a restored log", logging.WARNING,
                          path=str(tail.directory / name), error=str(exc))
                    valid = 0
                if name in tail.offsets:
                    tail.offsets[name] = min(tail.offsets[name], valid)
            tail.save()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Ship what is there one last time, then stop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        except BusError as exc:
            event(log, "final shipping failed; records stay pending", logging.WARNING, error=str(exc))

    async def _loop(self) -> None:
        while True:
            try:
                await self.flush()
            except BusError as exc:
                event(log, "shipping failed; will retry", logging.WARNING, error=str(exc))
                await asyncio.sleep(1.0)
            try:
                await asyncio.wait_for(self._kick.wait(), self.period)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()

    async def flush_unit(self, job: str, unit: str) -> dict[str, int]:
        """Ship the unit's pending records now; return {source: records shipped so far}."""
        tail = self._tails.get((job, unit))
        if tail is None:
            return {}
        async with self._lock:
            await self._ship_tail(tail)
        return dict(tail.sent)

    async def flush(self) -> int:
        """Ship every complete record not yet confirmed; return how many were shipped."""
        total = 0
        async with self._lock:
            for tail in list(self._tails.values()):
                total += await self._ship_tail(tail)
        return total

    async def _ship_tail(self, tail: _Tail) -> int:
        shipped = 0
        files = await asyncio.to_thread(log_files, tail.directory) if tail.directory.exists() else []
        for path in files:
            name = path.name
            while True:
                offset = tail.offsets.get(name, 0)
                records, new_offset = await asyncio.to_thread(self._read, path, offset)
                if not records:
                    break
                base = max(0, offset // REC_SIZE - 1)  # the log's first record is its header
                for i in range(0, len(records), self.batch_records):
                    chunk = records[i:i + self.batch_records]
                    batch = msgpack.packb([[r.direction, r.conn, r.start, r.end, r.interval] for r in chunk],
                                          use_bin_type=True)
                    msg = protocol.make("determinants", job=tail.job, unit=tail.unit, node=self.node, batch=batch,
                                        first=base + i, count=len(chunk),
                                        source=f"{name}@{tail.epoch}")
                    await self.bus.publish(protocol.determinants_key(self.site, self.node), msg, timeout=10.0)
                    tail.sent[msg["source"]] = msg["first"] + msg["count"]
                    shipped += len(chunk)
                tail.offsets[name] = new_offset
                await asyncio.to_thread(tail.save)
                if len(records) < 4 * self.batch_records:
                    break
        self.shipped += shipped
        return shipped

    @staticmethod
    def _read(path: Path, offset: int) -> tuple[list[Any], int]:
        """Complete records from ``offset``, closed (final) before they are read; record
        indices count from the start of the file."""
        try:
            return read_final_records(path, offset)
        except FileNotFoundError:
            return [], offset
        except (OSError, ValueError, BuildError, RuntimeError) as exc:
            event(log, "unreadable determinant log", logging.WARNING, path=str(path), error=str(exc))
            return [], offset


def shim_paths(unit_dir: Path) -> tuple[Path, Path]:
    """(log directory, control file) of a unit run under the shim."""
    d = Path(unit_dir) / "shim"
    return d, d / "control"


def ensure_shim_dir(unit_dir: Path) -> tuple[Path, Path]:
    d, ctl = shim_paths(unit_dir)
    os.makedirs(d, exist_ok=True)
    return d, ctl
