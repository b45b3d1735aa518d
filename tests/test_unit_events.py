"""The orchestrator applies a burst of unit reports sent as one ``unit_event`` (``more``)."""

from __future__ import annotations

from pathlib import Path

from orchestrator import protocol
from orchestrator.bus.base import Delivery
from orchestrator.daemon import Orchestrator
from orchestrator.jobs import JobState, UnitState
from orchestrator.store import Store


async def test_burst_of_reports_in_one_event(tmp_path: Path) -> None:
    orch = Orchestrator(bus=None, store=Store(tmp_path / "store"))  # type: ignore[arg-type]
    units = {n: UnitState(name=n, node="n1", site="s1", state="running") for n in ("a", "b", "c")}
    orch.jobs["j"] = JobState(id="j", spec={"units": []}, units=units)
    msg = protocol.make("unit_event", job="j", unit="a", node="n1", state="stopped",
                        more=[{"job": "j", "unit": "b", "state": "stopped"},
                              {"job": "j", "unit": "c", "state": "failed", "exit_code": 3},
                              {"job": "j", "unit": "c", "state": 7},        # malformed: skipped
                              "junk", {"unit": "b", "state": "exited"}])    # no job: skipped
    protocol.validate(protocol.decode(protocol.encode(msg)))
    await orch._on_event(msg, Delivery("events.s1.n1", msg["id"], False, None, None, {}))
    assert [units[n].state for n in "abc"] == ["stopped", "stopped", "failed"]
    assert units["c"].exit_code == 3
