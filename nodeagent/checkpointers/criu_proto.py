"""The few messages of CRIU's RPC protocol (``images/rpc.proto``) the CRIU backend speaks.

``criu swrk <fd>`` reads one ``criu_req`` per SOCK_SEQPACKET packet and answers with
``criu_resp`` packets (protobuf 2).  The backend sends a DUMP request, answers NOTIFY messages
(the action-script points of ``notify_scripts``) and reads the final DUMP answer: a dozen
fields in all, so they are encoded here by hand instead of through a protobuf library and
generated code.  Field numbers are those of CRIU 4.x's rpc.proto (``images_dir_fd`` is
required there and always sent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# criu_req_type
DUMP = 1
NOTIFY = 6

# criu_cg_mode
CG_IGNORE = 0

# criu_opts fields: name -> (number, kind); kind "int" (varint: int32, uint32, bool, enum) or "str"
OPTS_FIELDS: dict[str, tuple[int, str]] = {
    "images_dir_fd": (1, "int"),
    "pid": (2, "int"),
    "leave_running": (3, "int"),
    "file_locks": (8, "int"),
    "log_level": (9, "int"),
    "log_file": (10, "str"),
    "notify_scripts": (12, "int"),
    "work_dir_fd": (17, "int"),
    "manage_cgroups_mode": (34, "int"),
    "freeze_cgroup": (44, "str"),
}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    """A protobuf varint; a negative int32/int64 as its 64-bit two's complement (10 bytes)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def field(number: int, value: int | bool | str | bytes) -> bytes:
    """One field: an int or bool as a varint, a str or bytes (or an encoded message) length-delimited."""
    if isinstance(value, (bool, int)):
        return varint(number << 3 | _VARINT) + varint(int(value))
    data = value.encode() if isinstance(value, str) else bytes(value)
    return varint(number << 3 | _LEN) + varint(len(data)) + data


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ProtoError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint longer than 10 bytes")


def decode(data: bytes) -> dict[int, list[int | bytes]]:
    """Every field of a message by number: varints as ints, length-delimited fields as bytes
    (fixed-size fields, which none of our messages use, as their raw bytes)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        value: int | bytes
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ProtoError("truncated length-delimited field")
            value, pos = bytes(data[pos:pos + size]), pos + size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > len(data):
                raise ProtoError("truncated fixed-size field")
            value, pos = bytes(data[pos:pos + size]), pos + size
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _int32(value: int) -> int:
    value &= (1 << 64) - 1
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def encode_opts(**opts: Any) -> bytes:
    """A ``criu_opts`` message from keyword fields (``OPTS_FIELDS``); None values are left out."""
    out = bytearray()
    for name, value in opts.items():
        if value is None:
            continue
        try:
            number, kind = OPTS_FIELDS[name]
        except KeyError:
            raise ValueError(f"criu_opts has no field {name!r} here") from None
        if kind == "str" and not isinstance(value, str):
            raise TypeError(f"criu_opts.{name} is a string")
        if kind == "int" and not isinstance(value, (bool, int)):
            raise TypeError(f"criu_opts.{name} is an integer")
        out += field(number, value)
    if "images_dir_fd" not in opts:
        out = bytearray(field(1, -1)) + out     # required in rpc.proto
    return bytes(out)


def dump_request(**opts: Any) -> bytes:
    """``criu_req`` of type DUMP with these ``criu_opts``."""
    return field(1, DUMP) + field(2, encode_opts(**opts))


def notify_answer(success: bool = True) -> bytes:
    """``criu_req`` of type NOTIFY: the answer to an action-script notification."""
    return field(1, NOTIFY) + field(3, bool(success))


@dataclass
class Response:
    """A decoded ``criu_resp``."""

    type: int
    success: bool
    script: str | None = None        # NOTIFY: the action (pre-dump, post-dump, ...)
    errno: int | None = None
    errmsg: str | None = None

    @property
    def is_notify(self) -> bool:
        return self.type == NOTIFY


def _last(fields: dict[int, list[int | bytes]], number: int, kind: type) -> Any:
    values = fields.get(number)
    if not values:
        return None
    value = values[-1]
    if not isinstance(value, kind):
        raise ProtoError(f"field {number} has the wrong wire type")
    return value


def parse_response(data: bytes) -> Response:
    """A ``criu_resp`` packet; ProtoError when it is malformed or lacks a required field."""
    fields = decode(data)
    rtype, success = _last(fields, 1, int), _last(fields, 2, int)
    if rtype is None or success is None:
        raise ProtoError("criu_resp without type or success")
    script = None
    notify = _last(fields, 5, bytes)
    if notify is not None:
        raw = _last(decode(notify), 1, bytes)
        script = raw.decode(errors="replace") if raw is not None else None
    errno = _last(fields, 7, int)
    errmsg = _last(fields, 9, bytes)
    return Response(type=rtype, success=bool(success), script=script,
                    errno=_int32(errno) if errno is not None else None,
                    errmsg=errmsg.decode(errors="replace").strip() if errmsg else None)
