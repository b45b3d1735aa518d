"""The orchestrator's view of agents, jobs and units, and unit placement."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

TERMINAL_UNIT_STATES = ("exited", "failed", "lost")


class PlacementError(ValueError):
    """No live agent can take a unit (the text says why)."""


@dataclass
class AgentInfo:
    """A registered node agent."""

    node: str
    site: str
    pid: int = 0
    hostname: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    lost: bool = False

    @property
    def key(self) -> str:
        return f"{self.site}/{self.node}"


@dataclass
class UnitState:
    """One job unit as the orchestrator knows it."""

    name: str
    node: str = ""
    site: str = ""
    state: str = "pending"
    pid: int | None = None
    nprocs: int = 0
    started: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    detail: str = ""
    attempt: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["uptime"] = round(time.time() - self.started, 1) if self.started and self.state in ("running", "stopped") else None
        return d


@dataclass
class JobState:
    """A submitted job."""

    id: str
    spec: dict[str, Any]
    units: dict[str, UnitState]
    state: str = "running"
    restarts: int = 0
    submitted: float = field(default_factory=time.time)
    busy: str = ""  # "checkpoint" / "restart" while a stage machine runs
    # per unit, the store seqs of its checkpoints in the current history: the k-th entry is
    # the unit's checkpoint k of the determinant log (its interval k starts there)
    lineage: dict[str, list[int]] = field(default_factory=dict)

    def interval_of(self, unit: str) -> int:
        """The unit's current checkpoint interval (= how many checkpoints its history holds)."""
        return len(self.lineage.get(unit, []))

    def rewind(self, unit: str, seq: int) -> int:
        """The unit goes back to store checkpoint ``seq`` (0: its start); returns its interval."""
        hist = self.lineage.setdefault(unit, [])
        if seq == 0:
            hist.clear()
        elif seq in hist:
            del hist[hist.index(seq) + 1:]
        else:
            hist[:] = [s for s in hist if s < seq] + [seq]
        return len(hist)

    def interposed(self) -> list[str]:
        """Units run under the shim (all of them in an independent job)."""
        indep = self.spec.get("protocol") == "independent"
        return [u["name"] for u in self.spec["units"] if indep or u.get("interpose")]

    def derive_state(self) -> str:
        """Job state from its units (a cancelled job stays cancelled)."""
        if self.state == "cancelled":
            return self.state
        states = [u.state for u in self.units.values()]
        if any(s in ("failed", "lost") for s in states):
            return "failed"
        if states and all(s == "exited" for s in states):
            return "succeeded" if all(u.exit_code == 0 for u in self.units.values()) else "failed"
        if any(s == "pending" for s in states):
            return "pending"
        return "running"

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "name": self.spec.get("name", ""),
            "state": self.state,
            "protocol": self.spec.get("protocol", "coordinated"),
            "restarts": self.restarts,
            "submitted": self.submitted,
            "units": [u.as_dict() for u in self.units.values()],
        }

    def to_record(self) -> dict[str, Any]:
        """What goes into the store's job.json."""
        return {"job": self.id, "spec": self.spec, "state": self.state, "restarts": self.restarts,
                "submitted": self.submitted, "lineage": self.lineage,
                "placement": {n: {"node": u.node, "site": u.site} for n, u in self.units.items()}}


def place_units(units: list[dict[str, Any]], agents: list[AgentInfo],
                load: dict[str, int], fixed: dict[str, str] | None = None) -> dict[str, AgentInfo]:
    """Choose an agent for every unit: ``fixed``/explicit ``node`` first, else the least loaded.

    ``load`` maps agent key -> units already running there; it is updated as units are placed.
    """
    live = [a for a in agents if not a.lost]
    if not live:
        raise PlacementError("no live node agent: start one with `gridckpt agent --node NAME`")
    by_node = {a.node: a for a in live}
    placed: dict[str, AgentInfo] = {}
    fixed = fixed or {}
    for u in units:
        want = fixed.get(u["name"]) or u.get("node")
        if want:
            agent = by_node.get(want)
            if agent is None:
                known = ", ".join(sorted(by_node)) or "none"
                raise PlacementError(f"unit {u['name']!r}: node {want!r} has no live agent (live: {known})")
            if u.get("site") and agent.site != u["site"]:
                raise PlacementError(f"unit {u['name']!r}: node {want!r} is in site {agent.site!r}, not {u['site']!r}")
        else:
            pool = [a for a in live if not u.get("site") or a.site == u["site"]]
            if not pool:
                raise PlacementError(f"unit {u['name']!r}: no live agent in site {u['site']!r}")
            agent = min(pool, key=lambda a: (load.get(a.key, 0), a.node))
        load[agent.key] = load.get(agent.key, 0) + 1
        placed[u["name"]] = agent
    return placed
