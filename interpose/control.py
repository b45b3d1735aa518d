"""The shim's shared-memory control page: the unit's checkpoint interval counter.

Layout in gridckpt_shim.h (struct gc_ctl_header): the agent bumps `interval` at each
resume_cp; every process of the unit maps the same file and stamps each record with it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

CTL_MAGIC = 0x31304C544B434347
CTL_VERSION = 2
CTL_HEADER = 4096
CTL_SLOT_SIZE = 128
CTL_NSLOTS = 32768
CTL_SIZE = CTL_HEADER + CTL_NSLOTS * CTL_SLOT_SIZE
_OFF_INTERVAL = 64
_OFF_LOST = 128


class ControlPage:
    """A unit's control file, mapped shared.  Created (sparse) when missing.

    `interval` reads and writes the 64-bit interval counter with single aligned
    loads/stores; `bump()` adds one (only the agent writes it).
    """

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < CTL_SIZE:
                os.ftruncate(fd, CTL_SIZE)
            self._map = mmap.mmap(fd, CTL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        magic, version, nslots = struct.unpack_from("<QII", self._map, 0)
        if magic == 0:
            struct.pack_into("<II", self._map, 8, CTL_VERSION, CTL_NSLOTS)
            struct.pack_into("<Q", self._map, 0, CTL_MAGIC)
        elif magic != CTL_MAGIC or version != CTL_VERSION:
            self.close()
            raise ValueError(f"{self.path}: not a gridckpt shim control file (version {version})")
        self._interval = ctypes.c_uint64.from_buffer(self._map, _OFF_INTERVAL)
        self._lost = ctypes.c_uint64.from_buffer(self._map, _OFF_LOST)

    @property
    def interval(self) -> int:
        """The current checkpoint interval of the unit."""
        return self._interval.value

    @interval.setter
    def interval(self, value: int) -> None:
        if value < 0:
            raise ValueError("interval must be >= 0")
        self._interval.value = value

    def bump(self) -> int:
        """Start the next interval (at resume_cp); returns the new interval."""
        self._interval.value += 1
        return self._interval.value

    @property
    def lost_records(self) -> int:
        """Records the shim could not write (connection table or log full)."""
        return self._lost.value

    def close(self) -> None:
        """Unmap the page."""
        if getattr(self, "_map", None) is not None:
            self._interval = self._lost = None  # release the buffer exports first
            self._map.close()
            self._map = None

    def __enter__(self) -> "ControlPage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
