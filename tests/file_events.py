"""Renames into folders, as the kernel reports them (Linux inotify through ctypes): what tests count to show
that every shard was written exactly once, independently of the code that writes them."""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from collections import Counter
from pathlib import Path

IN_MOVED_TO = 0x00000080
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


def inotify_works() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC)
    except (OSError, AttributeError):
        return False
    if fd < 0:
        return False
    os.close(fd)
    return True


class RenameLog:
    """Counts every file renamed into the watched folders (`os.replace` of a temporary into its final name) by
    any process, until `close()`."""

    def __init__(self, folders: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_MOVED_TO)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.folders[wd] = folder
        self.renames: Counter[Path] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stop.is_set():
            if select.select([self.fd], [], [], 0.1)[0]:
                self._drain()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _HEADER.unpack_from(data, offset)
                name = data[offset + _HEADER.size : offset + _HEADER.size + length].rstrip(b"\0").decode()
                offset += _HEADER.size + length
                with self.lock:
                    self.renames[self.folders[wd] / name] += 1

    def counts(self) -> Counter[Path]:
        with self.lock:
            return Counter(self.renames)

    def close(self) -> Counter[Path]:
        """Stop watching (after a last read) and return the counts."""
        self.stop.set()
        self.thread.join(timeout=5)
        self._drain()
        os.close(self.fd)
        return self.counts()
