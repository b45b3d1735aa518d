"""Generator of malformed bus message bodies (for the bus fuzz test and the daemon fuzz test).

Every body returned fails ``protocol.decode`` (the generator checks), so a correct consumer
dead-letters every one of them.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack

from orchestrator import protocol

CATEGORIES = ("random_bytes", "truncated", "wrong_version", "unknown_type", "missing_field",
              "mistyped_field", "not_a_map", "bad_id", "bad_keys")

_SAMPLE: dict[Any, Any] = {str: "x", int: 7, float: 1.5, bool: True, dict: {"k": 1}, list: [1, 2],
                           bytes: b"\x00\x01"}


def _sample_value(types: Any) -> Any:
    t = types[0] if isinstance(types, tuple) else types
    return _SAMPLE.get(t, "any")


def valid_message(type_: str, rnd: random.Random) -> dict[str, Any]:
    """A valid message of ``type_`` with every declared field filled."""
    fields = {name: _sample_value(types) for name, (types, _req) in protocol.MESSAGE_TYPES[type_].items()}
    if "stage" in fields:
        fields["stage"] = rnd.choice(protocol.STAGES)
    if "then" in fields:
        fields["then"] = [rnd.choice(protocol.STAGES)]
    return protocol.make(type_, **fields)


def _wrong_value(types: Any, rnd: random.Random) -> Any:
    allowed = types if isinstance(types, tuple) else (types,)
    candidates = ["str", 12345, 2.5, [1], {"a": 1}, b"\xff", True]
    bad = [c for c in candidates
           if not isinstance(c, allowed) or (isinstance(c, bool) and bool not in allowed)]
    return rnd.choice(bad)


def _one(category: str, rnd: random.Random) -> bytes:
    types = sorted(protocol.MESSAGE_TYPES)
    msg = valid_message(rnd.choice(types), rnd)
    if category == "random_bytes":
        return rnd.randbytes(rnd.randint(0, 200))
    if category == "truncated":
        body = msgpack.packb(msg, use_bin_type=True)
        return body[: rnd.randint(0, len(body) - 1)]
    if category == "wrong_version":
        msg["v"] = rnd.choice([0, 2, 99, -1, "1", None, 1.5])
    elif category == "unknown_type":
        msg["type"] = rnd.choice(["nope", "", "PING", "launch2", 3, None])
    elif category == "missing_field":
        required = [n for n, (_t, req) in protocol.MESSAGE_TYPES[msg["type"]].items() if req]
        victim = rnd.choice(required + ["v", "type", "id"])
        msg.pop(victim)
    elif category == "mistyped_field":
        spec = protocol.MESSAGE_TYPES[msg["type"]]
        typed = [n for n, (t, _r) in spec.items() if t is not object]
        if not typed:
            msg["v"] = "one"
        else:
            victim = rnd.choice(typed)
            msg[victim] = _wrong_value(spec[victim][0], rnd)
    elif category == "not_a_map":
        return msgpack.packb(rnd.choice([[1, 2, 3], "ping", 42, None, b"raw", 3.14]), use_bin_type=True)
    elif category == "bad_id":
        msg["id"] = rnd.choice(["", 17, None, ["x"], b"bytes"])
    elif category == "bad_keys":
        return msgpack.packb({1: "int key", "v": 1}, use_bin_type=True, strict_types=False)
    return msgpack.packb(msg, use_bin_type=True)


def fuzz_bodies(n: int = 1000, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (category, body) pairs, all rejected by ``protocol.decode``, categories round-robin."""
    rnd = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    i = 0
    while len(out) < n:
        category = CATEGORIES[i % len(CATEGORIES)]
        i += 1
        body = _one(category, rnd)
        try:
            protocol.decode(body)
        except protocol.ProtocolError:
            out.append((category, body))
    return out
