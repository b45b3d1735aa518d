"""An agent started again adopts the units its previous incarnation left running, also one it
listed while the unit's tree was being restored (no pid yet): the tree is found in the unit's
cgroup.  Real agents over memory://, a real process tree."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from nodeagent.daemon import NodeAgent
from nodeagent.freezer import alive_pids, freezer_kind
from nodeagent.units import become_subreaper
from orchestrator.bus import open_bus
from orchestrator.store import Store



async def _agent(url: str, store: Store) -> NodeAgent:
    bus = open_bus(url)
    await bus.connect()
    agent = NodeAgent(bus, store, "n1", "s1", heartbeat_interval=0.5)
    await agent.start()
    return agent


async def _stop(agent: NodeAgent, kill_units: bool) -> None:
    await agent.stop(kill_units=kill_units)
    await agent.bus.close()


@pytest.mark.parametrize("listed_pid", ["none", "the old tree's"])
async def test_unit_listed_while_restoring_is_found_in_its_cgroup(tmp_path: Path, listed_pid: str) -> None:
    if freezer_kind()[0] == "signal":   # the CI machines have cgroups: there this must run
        if os.environ.get("CI"):
            pytest.fail("no cgroup freezer on this CI machine")
        pytest.skip("no cgroup freezer here: units have no cgroup to be found in")
    store = Store(tmp_path / "store")
    url = f"memory://adopt-{time.monotonic_ns()}"
    first = await _agent(url, store)
    second = None
    pid = None
    try:
        spec = {"name": "u", "checkpointer": "criu", "command": [sys.executable, "-c", "import time; time.sleep(60)"]}
        await first._launch("job", "u", spec)
        unit = first.units[("job", "u")]
        pid = unit.root_pid
        assert pid and alive_pids([pid])
        await first._unit_list_written(first._save_asked)
        await _stop(first, kill_units=False)      # the agent goes, the unit stays
        rows = json.loads(first.state_file.read_text())
        assert [r["pid"] for r in rows] == [pid]
        # what an agent killed mid-restore leaves: the unit listed without (or with a dead) pid
        rows[0]["pid"] = None if listed_pid == "none" else 2 ** 22 + 17
        first.state_file.write_text(json.dumps(rows))
        second = await _agent(url, store)
        adopted = second.units.get(("job", "u"))
        assert adopted is not None and adopted.root_pid == pid and adopted.state == "running"
        os.kill(pid, signal.SIGKILL)               # and it watches the adopted tree
        await asyncio.wait_for(adopted.wait(), 5)
    finally:
        if second is not None:
            await _stop(second, kill_units=True)
        if pid is not None and alive_pids([pid]):
            os.kill(pid, signal.SIGKILL)
        become_subreaper(False)


async def test_unit_listed_without_a_tree_is_not_adopted(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    agent = NodeAgent(None, store, "n1", "s1")  # type: ignore[arg-type]  # only its unit list is used
    agent.state_file.parent.mkdir(parents=True)
    agent.state_file.write_text(json.dumps([{"job": "job", "unit": "gone", "spec": {"command": ["true"]},
                                             "pid": None, "started": 0.0}]))
    await agent._adopt_previous_units()
    assert agent.units == {}
