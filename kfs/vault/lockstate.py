"""Lock state: the master key in memory, wiped on lock, and the idle clock.

The key lives in one ``bytearray`` that `lock` overwrites with zeros.  We try
to ``mlock`` its page so it never reaches swap and report whether that held.
The idle clock counts time with no vault access *and* no open vault file: an
open handle (a long ``tail -f``, an editor) never gets its key pulled away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

from kfs.vault.cryptocore import CryptoCore

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    # without argtypes ctypes would pass the address as a 32-bit int
    for _fn in (_libc.mlock, _libc.munlock):
        _fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _fn.restype = ctypes.c_int
except OSError:  # pragma: no cover - no libc
    _libc = None


def _mlock(buf: bytearray) -> bool:
    if _libc is None or not buf:
        return False
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    try:
        return _libc.mlock(ctypes.addressof(view), ctypes.c_size_t(len(buf))) == 0
    finally:
        del view


def _munlock(buf: bytearray) -> None:
    if _libc is None or not buf:
        return
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    try:
        _libc.munlock(ctypes.addressof(view), ctypes.c_size_t(len(buf)))
    finally:
        del view


class LockState:
    def __init__(self, auto_lock_timeout: float) -> None:
        self.auto_lock_timeout = auto_lock_timeout
        self._key: bytearray | None = None
        self.core: CryptoCore | None = None
        self.mlocked: bool | None = None
        self.open_files = 0
        self.last_access = time.monotonic()
        self.unlock_failures = 0
        self.unlocked_at: float | None = None

    @property
    def unlocked(self) -> bool:
        return self.core is not None

    def unlock(self, key: bytearray) -> None:
        """Take ownership of ``key`` (the caller must not keep or wipe it)."""
        self.lock()
        self._key = key
        self.mlocked = _mlock(key)
        self.core = CryptoCore(key)
        self.unlocked_at = time.time()
        self.touch()

    def lock(self) -> bool:
        """Wipe the key; True if it was unlocked."""
        was = self.core is not None
        if self.core is not None:
            self.core.wipe()
            self.core = None
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            if self.mlocked:
                _munlock(self._key)
            self._key = None
        self.unlocked_at = None
        return was

    def touch(self) -> None:
        self.last_access = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_access

    def should_auto_lock(self) -> bool:
        return (self.unlocked and self.auto_lock_timeout > 0 and self.open_files == 0
                and self.idle_for() >= self.auto_lock_timeout)
