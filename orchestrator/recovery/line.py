"""The recovery line (DESIGN.md section 3), computed on a rollback-dependency graph.

Graph (networkx ``DiGraph``). One node per unit position ``k`` = 0 .. newest + 1
(checkpoint k, and newest + 1 for the volatile "current" state). An edge ``A -> B``
reads "if the line is below A, it must be below B" ("below (u, k)" = position < k):

- interval-to-next edges ``(u, k) -> (u, k + 1)``;
- message edges: if V read, in interval j, bytes of a stream up to offset e, and the
  writer U wrote offset e in interval i (the first interval whose running max reaches
  e), then V at a position > j remembers bytes that U remembers only at positions > i:
  edge ``(U, i + 1) -> (V, j + 1)``. Earlier send intervals are implied through the
  interval-to-next edges, so one edge per receiver interval and sender is kept (the
  latest send interval).
- a recv beyond everything the writer is known to have written (possible in a live log
  whose sender records have not arrived) hangs from a node ``UNSENT`` that is always
  "beyond the start".

The line for a failed set F: the nodes beyond the start are ``(u, newest + 1)`` for u
in F (their volatile state is gone) and ``UNSENT``; everything reachable from them is
rolled back, and each unit's position is one below its lowest rolled-back node. That
is the maximal consistent line below the start, i.e. the same as the fixpoint
definition (:func:`fixpoint_positions`, kept as the reference).

Useless checkpoints: (u, k) is on a Z-cycle iff there is a path (u, k+1) -> (u, k),
i.e. iff (u, k) and (u, k+1) are in the same strongly connected component.
Obsolete checkpoints: those older than the line computed with every unit failed.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx

from .model import Model

CURRENT = "current"


@dataclass
class RollbackGraph:
    """The rollback-dependency graph with integer nodes; see :meth:`node` and :meth:`label`."""

    graph: nx.DiGraph
    units: list[str]
    base: dict[str, int]        # node of (unit, 0)
    top: dict[str, int]         # newest + 1, the "current" position
    unsent: int                 # the always-rolled-back node
    _unit_of: list[int] = field(repr=False, default_factory=list)

    def node(self, unit: str, position: int) -> int:
        return self.base[unit] + position

    def label(self, node: int) -> tuple[str, int] | str:
        """(unit, position) of a node, or ``"UNSENT"``."""
        if node == self.unsent:
            return "UNSENT"
        unit = self.units[self._unit_of[node]]
        return unit, node - self.base[unit]


def build_graph(model: Model) -> RollbackGraph:
    """Build the rollback-dependency graph of a model (linear in its size)."""
    units = list(model.units)
    base: dict[str, int] = {}
    top: dict[str, int] = {}
    unit_of: list[int] = []
    n = 0
    for index, unit in enumerate(units):
        base[unit] = n
        top[unit] = model.units[unit] + 1
        width = top[unit] + 1
        unit_of.extend([index] * width)
        n += width
    unsent = n
    edges: list[tuple[int, int]] = []
    for unit in units:
        b = base[unit]
        edges.extend((b + k, b + k + 1) for k in range(top[unit]))
    # per (receiver, sender): (receiver node, sender node) pairs, pruned of implied edges
    pairs: dict[tuple[str, str | None], list[tuple[int, int]]] = {}
    for s in model.streams.values():
        if s.receiver is None or not s.recv_iv or s.receiver not in base:
            continue
        bv = base[s.receiver] + 1
        sender = s.sender if s.sender in base else None
        if sender is None:
            pairs.setdefault((s.receiver, None), []).append((bv + s.recv_iv[0], unsent))
            continue
        bu = base[sender] + 1
        send_iv, send_cum = s.send_iv, s.send_cum
        nsend = len(send_cum)
        found = pairs.setdefault((s.receiver, sender), [])
        lo = 0
        last = -1
        for j, e in zip(s.recv_iv, s.recv_cum):
            lo = bisect_left(send_cum, e, lo)
            src = bu + send_iv[lo] if lo < nsend else unsent
            if src > last:          # same source as an earlier interval: implied, skip
                found.append((bv + j, src))
                last = src
    for found in pairs.values():
        if len(found) > 1:
            found.sort(key=lambda e: (e[0], -e[1]))
        last = -1
        for dst, src in found:
            if src > last:          # unsent is the largest node id
                edges.append((src, dst))
                last = src
    g = nx.DiGraph()
    g.add_nodes_from(range(n + 1))
    g.add_edges_from(edges)
    return RollbackGraph(g, units, base, top, unsent, unit_of)


def reachable(graph: nx.DiGraph, sources: Iterable[int]) -> set[int]:
    """Every node reachable from ``sources`` (sources included)."""
    seen: set[int] = set()
    for layer in nx.bfs_layers(graph, list(sources)):
        seen.update(layer)
    return seen


def graph_positions(rg: RollbackGraph, failed: Iterable[str]) -> dict[str, int]:
    """Line positions from the graph: one below each unit's lowest rolled-back node."""
    sources = [rg.base[u] + rg.top[u] for u in failed]
    sources.append(rg.unsent)
    positions = dict(rg.top)
    units, unit_of, base = rg.units, rg._unit_of, rg.base
    for node in reachable(rg.graph, sources):
        if node == rg.unsent:
            continue
        unit = units[unit_of[node]]
        k = node - base[unit] - 1
        if k < positions[unit]:
            positions[unit] = k
    return positions


def fixpoint_positions(model: Model, failed: Iterable[str]) -> dict[str, int]:
    """Reference definition: start failed units at newest, others at current, roll back
    receivers until rcvd(V) <= sent(U) on every stream (iterated to a fixpoint)."""
    failed = set(failed)
    pos = {u: (n if u in failed else n + 1) for u, n in model.units.items()}
    streams = [s for s in model.streams.values() if s.receiver in pos and s.recv_iv]
    changed = True
    while changed:
        changed = False
        for s in streams:
            limit = s.sent_at(pos[s.sender]) if s.sender in pos else 0
            pv = pos[s.receiver]
            if s.rcvd_at(pv) > limit:
                i = bisect_right(s.recv_cum, limit)
                pos[s.receiver] = s.recv_iv[i]
                changed = True
    return pos


def replay_ranges(model: Model, positions: dict[str, int]) -> list[dict]:
    """Every stream with bytes in [rcvd(V), sent(U)) at the line, sorted by conn."""
    out = []
    for conn in sorted(model.streams):
        s = model.streams[conn]
        if s.sender not in positions:
            continue
        end = s.sent_at(positions[s.sender])
        start = s.rcvd_at(positions[s.receiver]) if s.receiver in positions else 0
        if end > start:
            out.append({"conn": conn, "from": s.sender, "to": s.receiver,
                        "start": start, "end": end})
    return out


def useless_checkpoints(rg: RollbackGraph, floors: dict[str, int] | None = None
                        ) -> dict[str, list[int]]:
    """Checkpoints on a Z-cycle: (u, k) and (u, k + 1) strongly connected."""
    comp: dict[int, int] = {}
    for index, members in enumerate(nx.strongly_connected_components(rg.graph)):
        if len(members) > 1:
            for node in members:
                comp[node] = index
    out: dict[str, list[int]] = {}
    floors = floors or {}
    for unit in rg.units:
        b = rg.base[unit]
        found = []
        for k in range(max(1, floors.get(unit, 0)), rg.top[unit]):
            c = comp.get(b + k)
            if c is not None and comp.get(b + k + 1) == c:
                found.append(k)
        out[unit] = found
    return out


def obsolete_checkpoints(model: Model, all_failed: dict[str, int]) -> dict[str, list[int]]:
    """Checkpoints (seq >= 1, not yet collected) older than the all-failed line."""
    return {u: list(range(max(1, model.floors.get(u, 0)), all_failed[u])) for u in model.units}


@dataclass
class LineResult:
    """A computed recovery line; ``positions`` are seqs, newest + 1 meaning current."""

    positions: dict[str, int]
    newest: dict[str, int]
    failed: list[str]
    replay: list[dict]
    domino: bool
    useless: dict[str, list[int]] | None = None
    obsolete: dict[str, list[int]] | None = None

    @property
    def line(self) -> dict[str, int | str]:
        return {u: (CURRENT if p > self.newest[u] else p) for u, p in self.positions.items()}

    def to_json(self) -> dict:
        out: dict = {"line": self.line, "replay": self.replay, "domino": self.domino}
        if self.useless is not None:
            out["useless"] = self.useless
        if self.obsolete is not None:
            out["obsolete"] = self.obsolete
        out["failed"] = self.failed
        out["newest"] = dict(self.newest)
        return out


def compute(model: Model, failed: Iterable[str] | None = None, *, extras: bool = True,
            graph: RollbackGraph | None = None) -> LineResult:
    """The recovery line of ``model`` for ``failed`` (default: the marked units, else all).

    With ``extras`` also the useless and the obsolete checkpoints.
    """
    chosen = model.failed_or_all(failed)
    unknown = sorted(chosen - set(model.units))
    if unknown:
        raise ValueError(f"unknown unit {unknown[0]!r} among the failed units")
    rg = graph or build_graph(model)
    positions = graph_positions(rg, chosen)
    domino = any(n > 0 and positions[u] == 0 for u, n in model.units.items())
    result = LineResult(positions, dict(model.units), [u for u in model.units if u in chosen],
                        replay_ranges(model, positions), domino)
    if extras:
        result.useless = useless_checkpoints(rg, model.floors)
        everyone = (positions if len(chosen) == len(model.units)
                    else graph_positions(rg, model.units))
        result.obsolete = obsolete_checkpoints(model, everyone)
    return result
