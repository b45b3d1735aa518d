"""Close the shim's open determinant records before shipping them (layout in gridckpt_shim.h).

A send/recv record may still grow (its writer continues it in place) until its CLOSED bit
is set.  Python has no atomic read-modify-write on shared memory, so the closing is done by
libgridckpt_logctl.so (logctl.c, built next to the shim) through ctypes:

    n = close_log(path, offset)                         # records [offset, offset + n*96) are final
    records, new_offset = read_records(path, offset, max_records=n)

`read_final_records` does both.  Closing is idempotent and harmless for logs whose writers
are gone.
"""
from __future__ import annotations

import ctypes
import os
import threading

from . import logctl_path
from .reader import REC_SIZE, REC_VERSION, Record, read_records

__all__ = ["close_log", "read_final_records", "library_version"]

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                lib = ctypes.CDLL(str(logctl_path()))
                lib.gc_close_log.restype = ctypes.c_int64
                lib.gc_close_log.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64]
                lib.gc_close_records.restype = ctypes.c_uint64
                lib.gc_close_records.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
                lib.gc_logctl_version.restype = ctypes.c_int
                lib.gc_logctl_version.argtypes = []
                if lib.gc_logctl_version() != REC_VERSION:
                    raise RuntimeError(f"{logctl_path()}: record version {lib.gc_logctl_version()}, "
                                       f"the reader expects {REC_VERSION}")
                _lib = lib
    return _lib


def library_version() -> int:
    """The record layout version the log-control library was built for."""
    return _library().gc_logctl_version()


def close_log(path: os.PathLike | str, offset: int = 0, max_records: int | None = None) -> int:
    """Make the complete records of a log from byte ``offset`` on final; return how many
    complete records follow ``offset`` (at most ``max_records``): exactly those are final."""
    if offset % REC_SIZE:
        raise ValueError(f"offset {offset} is not a multiple of the record size {REC_SIZE}")
    lib = _library()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        n = lib.gc_close_log(fd, offset // REC_SIZE, (1 << 64) - 1 if max_records is None else max_records)
    finally:
        os.close(fd)
    if n < 0:
        raise OSError(-n, os.strerror(-n), str(path))
    return n


def read_final_records(path: os.PathLike | str, offset: int = 0) -> tuple[list[Record], int]:
    """Like ``read_records(path, offset)``, but every record returned is closed first, so its
    end is final even while its writer runs (what a shipper must use)."""
    n = close_log(path, offset)
    return read_records(path, offset, max_records=n)
