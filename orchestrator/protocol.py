"""The wire protocol: message types, their fields, routing keys and msgpack encoding.

Every message on the bus is a msgpack map with at least:

    v     protocol version (int, must equal PROTOCOL_VERSION)
    type  one of MESSAGE_TYPES
    id    a unique message id (str); redelivery of the same id is harmless

plus the fields its type declares.  ``decode`` rejects anything else with a
``ProtocolError`` whose text names what is wrong; transports dead-letter such
messages and keep running.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# Exchanges and queues (names are per virtual organisation = per vhost).
EXCHANGE = "gridckpt"
DEAD_LETTER_EXCHANGE = "gridckpt.dlx"
DEAD_LETTER_QUEUE = "gridckpt.dead"
EVENTS_QUEUE = "gridckpt.orchestrator.events"
DETERMINANTS_QUEUE = "gridckpt.orchestrator.determinants"
HEARTBEAT_QUEUE = "gridckpt.orchestrator.heartbeats"
CONTROL_QUEUE = "gridckpt.orchestrator.control"
CONTROL_KEY = "orchestrator.control"
# Stage results and pongs answer one orchestrator's commands: they go to its exclusive,
# non-durable replies queue (no quorum fsync on the checkpoint's critical path); if that
# orchestrator dies meanwhile, the checkpoint they belong to is aborted anyway.
REPLIES_QUEUE = "gridckpt.orchestrator.replies"
REPLIES_KEY = "orchestrator.replies"
DELIVERY_LIMIT = 5


class ProtocolError(ValueError):
    """A message that is not valid under this protocol version (the text says why)."""


_NUM = (int, float)
_ANY = object

# type -> {field: (python types, required)}
_F = dict[str, tuple[Any, bool]]
MESSAGE_TYPES: dict[str, _F] = {
    # agent -> orchestrator (routing key events.<site>.<node>)
    "register": {"node": (str, True), "site": (str, True), "pid": (int, True),
                 "hostname": (str, False), "capabilities": (dict, False), "store": (str, False)},
    "unit_event": {"job": (str, True), "unit": (str, True), "node": (str, True), "state": (str, True),
                   "pid": (int, False), "nprocs": (int, False), "exit_code": (int, False),
                   "signal": (int, False), "detail": (str, False), "started": (_NUM, False),
                   # further reports of the same agent, in order (a stage froze or thawed many
                   # units at once): maps with the fields above but node
                   "more": (list, False)},
    "stage_results": {"job": (str, True), "node": (str, True), "checkpoint": (str, True),
                      "stage": (str, True), "results": (dict, True),
                      # the stage's time on the agent (ms); further stages of its chain that
                      # completed meanwhile: maps with stage, results, wall_ms
                      "wall_ms": (_NUM, False), "more": (list, False)},
    "pong": {"node": (str, True), "ping": (str, True), "sent": (_NUM, False)},
    # agent -> orchestrator (routing key heartbeat.<site>.<node>)
    "heartbeat": {"node": (str, True), "site": (str, True), "units": (list, True),
                  "interval": (_NUM, False)},
    # agent -> orchestrator (routing key determinants.<site>.<node>)
    "determinants": {"job": (str, True), "unit": (str, True), "node": (str, True),
                     "batch": (bytes, True), "first": (int, True), "count": (int, True),
                     "source": (str, False)},
    # orchestrator -> agent (routing key agent.<site>.<node>)
    "launch": {"job": (str, True), "unit": (str, True), "spec": (dict, True),
               "attempt": (int, False)},
    "kill": {"job": (str, True), "unit": (str, True), "signal": (int, False)},
    "stage": {"job": (str, True), "unit": (str, True), "checkpoint": (str, True),
              "stage": (str, True), "args": (dict, False)},
    "stages": {"job": (str, True), "checkpoint": (str, True), "stage": (str, True), "units": (dict, True),
               # stages to run after ``stage``, each once the one before succeeded on every unit
               # named (the message names every unit of the job: the agent keeps the barrier)
               "then": (list, False)},
    "ping": {"sent": (_NUM, False)},
    # CLI -> orchestrator (routing key orchestrator.control), reply to reply_to
    "control": {"op": (str, True), "args": (dict, True)},
    "control_reply": {"ok": (bool, True), "result": (_ANY, False), "error": (str, False),
                      "code": (int, False)},
}

CHECKPOINT_STAGES = ("prepare", "stop", "checkpoint", "resume_cp")
SEAL_STAGE = "seal"   # after resume_cp: the images get their manifest while the units run again
RESTART_STAGES = ("rebuild", "resume_rst")
ABORT_STAGE = "abort"
STAGES = CHECKPOINT_STAGES + (SEAL_STAGE,) + RESTART_STAGES + (ABORT_STAGE,)
UNIT_STATES = ("pending", "running", "stopped", "exited", "failed", "lost", "restarting")


def agent_key(site: str, node: str) -> str:
    """Routing key of an agent's command queue."""
    return f"agent.{site}.{node}"


def event_key(site: str, node: str) -> str:
    return f"events.{site}.{node}"


def heartbeat_key(site: str, node: str) -> str:
    return f"heartbeat.{site}.{node}"


def determinants_key(site: str, node: str) -> str:
    return f"determinants.{site}.{node}"


_ID_PREFIX = uuid.uuid4().hex[:16]  # unique per process; a counter makes each id unique
_id_counter = itertools.count()


def _new_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = uuid.uuid4().hex[:16]
    _id_counter = itertools.count()


os.register_at_fork(after_in_child=_new_prefix)


def new_id() -> str:
    """A fresh message id: unique across processes, cheap (no urandom per message)."""
    return f"{_ID_PREFIX}{next(_id_counter):x}"


def make(type_: str, *, id: str | None = None, **fields: Any) -> dict[str, Any]:
    """Build a message of ``type_`` and validate it (raises ProtocolError on a bad field)."""
    msg = {"v": PROTOCOL_VERSION, "type": type_, "id": id or new_id(), "ts": time.time(), **fields}
    validate(msg)
    return msg


def validate(msg: Any) -> dict[str, Any]:
    """Check a decoded message against its type; return it or raise ProtocolError."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, not a map")
    v = msg.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v!r} is not {PROTOCOL_VERSION}")
    type_ = msg.get("type")
    if not isinstance(type_, str) or type_ not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {type_!r}")
    mid = msg.get("id")
    if not isinstance(mid, str) or not mid:
        raise ProtocolError(f"{type_}: missing or mistyped field 'id'")
    for name, (types, required) in MESSAGE_TYPES[type_].items():
        if name not in msg:
            if required:
                raise ProtocolError(f"{type_}: missing field {name!r}")
            continue
        if types is _ANY:
            continue
        value = msg[name]
        if isinstance(value, bool) and types is not bool and bool not in _as_tuple(types):
            raise ProtocolError(f"{type_}: field {name!r} is bool, expected {_tname(types)}")
        if not isinstance(value, types) and not (value is None and not required):
            raise ProtocolError(f"{type_}: field {name!r} is {type(value).__name__}, expected {_tname(types)}")
    if type_ in ("stage", "stages", "stage_results") and msg["stage"] not in STAGES:
        raise ProtocolError(f"stage: unknown stage {msg['stage']!r}")
    if type_ == "stages" and msg.get("then") is not None:
        for later in msg["then"]:
            if not isinstance(later, str) or later not in STAGES:
                raise ProtocolError(f"stages: unknown stage {later!r} in 'then'")
    return msg


def _as_tuple(types: Any) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _tname(types: Any) -> str:
    return "/".join(t.__name__ for t in _as_tuple(types))


def encode(msg: dict[str, Any]) -> bytes:
    """msgpack-encode a message (validated first)."""
    validate(msg)
    return msgpack.packb(msg, use_bin_type=True)


def decode(body: bytes) -> dict[str, Any]:
    """Decode and validate a message body; raise ProtocolError naming what is wrong."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"not msgpack: {type(exc).__name__}: {exc}") from None
    return validate(msg)
