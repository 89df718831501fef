"""API keys for the embedding endpoint and a Qdrant server, read when they are needed.

A reference in ``vector_config.yaml`` names where the key is:

- ``vault:PATH[#FIELD]`` — the vault file ``PATH`` (relative to ``vault/``), read through the
  bus service ``vault.read_secret`` (areas never import each other); with ``#FIELD`` the
  file is JSON and the key is that field, else the whole file (stripped) is the key;
- ``env:NAME`` — the daemon's environment variable ``NAME``;
- ``file:PATH[#FIELD]`` — a plain file outside the mount.

The key is read again at every use and never kept: when the vault locks, the next
embedding call fails (`SecretUnavailable`, ``locked``) and the sync agent keeps the
records queued until the vault is unlocked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

VAULT_SERVICE = "vault.read_secret"


class SecretUnavailable(Exception):
    """The key cannot be read now (vault locked, file missing, field absent)."""

    def __init__(self, message: str, locked: bool = False) -> None:
        super().__init__(message)
        self.locked = locked


@dataclass(frozen=True)
class SecretRef:
    scheme: str  # vault | env | file
    target: str
    field: str | None = None

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        scheme, sep, rest = text.partition(":")
        if not sep or scheme not in ("vault", "env", "file") or not rest:
            raise ValueError(f"{text!r}: expected vault:PATH[#FIELD], env:NAME or file:PATH[#FIELD]")
        target, _, field = rest.partition("#") if scheme != "env" else (rest, "", "")
        return cls(scheme, target, field or None)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}" + (f"#{self.field}" if self.field else "")


class SecretReader:
    """Resolves a `SecretRef` (blocking only for ``file:``; ``vault:`` hops onto the trio loop).

    ``bind`` (called on the trio loop, at the area's start) records the loop's token, so
    that worker threads (the sync agent, searches) can run the vault's provider on the
    loop, which owns the vault's key state.
    """

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self._token: trio.lowlevel.TrioToken | None = None

    def bind(self) -> None:
        self._token = trio.lowlevel.current_trio_token()

    def _vault_read(self, path: str) -> bytes:
        if self.bus is None:
            raise SecretUnavailable("no vault here (no event bus)")
        in_loop = True
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            in_loop = False
        if in_loop or self._token is None:
            return bytes(self.bus.request(VAULT_SERVICE, path=path))
        return bytes(trio.from_thread.run_sync(lambda: self.bus.request(VAULT_SERVICE, path=path),
                                               trio_token=self._token))

    def read(self, ref: SecretRef) -> str:
        where = str(ref)
        try:
            if ref.scheme == "env":
                value = os.environ.get(ref.target)
                if not value:
                    raise SecretUnavailable(f"{where}: not set in the daemon's environment")
                return value
            raw = self._vault_read(ref.target) if ref.scheme == "vault" else Path(ref.target).read_bytes()
        except SecretUnavailable:
            raise
        except PermissionError:
            raise SecretUnavailable(f"{where}: the vault is locked" if ref.scheme == "vault"
                                    else f"{where}: permission denied", locked=ref.scheme == "vault") from None
        except LookupError as e:  # bus.NoProvider: no vault area
            raise SecretUnavailable(f"{where}: {e}") from None
        except FileNotFoundError:
            raise SecretUnavailable(f"{where}: no such file") from None
        except (OSError, trio.RunFinishedError) as e:
            raise SecretUnavailable(f"{where}: {e}") from None
        return _extract(raw, ref)


def _extract(raw: bytes, ref: SecretRef) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    if ref.field is None:
        if not text:
            raise SecretUnavailable(f"{ref}: empty")
        return text
    try:
        value = json.loads(text).get(ref.field)
    except (ValueError, AttributeError):
        raise SecretUnavailable(f"{ref}: not a JSON object") from None
    if not isinstance(value, str) or not value:
        raise SecretUnavailable(f"{ref}: no string field {ref.field!r}")
    return value
