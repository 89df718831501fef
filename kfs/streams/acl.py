"""Bearer tokens and role ACLs for the WebSocket broker.

Tokens are random 256-bit secrets shown once at creation.  The store keeps
only their SHA-256 (``streams/.tokens.json``, written atomically): a stolen
store gives no usable token.  A presented token is hashed and compared with
every stored hash in constant time (`hmac.compare_digest`), so timing tells
nothing about which prefix matched.

Roles come from ``streams.yaml``: each lists stream-name globs it may
subscribe to and publish to.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from kfs.config import RoleConfig
from kfs.fs.area import fs_error
from kfs.store import StoreDir

TOKENS_FILE = ".tokens.json"
TOKEN_PREFIX = "kfs_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenInfo:
    id: str
    role: str
    hash: str
    created: str
    note: str = ""

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "created": self.created, "note": self.note}


class Acl:
    def __init__(self, store: StoreDir, roles: dict[str, RoleConfig]) -> None:
        self.store = store
        self.roles = roles
        self.tokens: list[TokenInfo] = []
        if store.exists(TOKENS_FILE):
            try:
                raw = json.loads(store.read_bytes(TOKENS_FILE))
                self.tokens = [TokenInfo(**entry) for entry in raw.get("tokens", [])]
            except (ValueError, TypeError) as e:
                raise ValueError(f"streams/{TOKENS_FILE}: unreadable ({e})") from None

    # ------------------------------------------------------------------ tokens
    def _save(self) -> None:
        data = {"version": 1, "tokens": [t.__dict__ for t in self.tokens]}
        self.store.write_atomic(TOKENS_FILE, json.dumps(data, indent=1).encode(), 0o600)

    def create_token(self, role: str, note: str = "") -> tuple[TokenInfo, str]:
        if role not in self.roles:
            raise fs_error(errno.EINVAL, f"unknown role {role!r} (roles: {', '.join(sorted(self.roles))})")
        token_id = secrets.token_hex(4)
        while any(t.id == token_id for t in self.tokens):
            token_id = secrets.token_hex(4)
        secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        info = TokenInfo(token_id, role, token_hash(secret), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), note)
        self.tokens.append(info)
        self._save()
        return info, secret

    def revoke(self, token_id: str) -> TokenInfo:
        for info in self.tokens:
            if info.id == token_id:
                self.tokens.remove(info)
                self._save()
                return info
        raise fs_error(errno.ENOENT, f"no token {token_id!r}")

    def authenticate(self, token: str | None) -> TokenInfo | None:
        """The token's entry, or None; compares against every hash in constant time."""
        if not token:
            return None
        presented = token_hash(token)
        found = None
        for info in self.tokens:
            if hmac.compare_digest(presented, info.hash):
                found = info
        return found

    # ------------------------------------------------------------------ roles
    def _allowed(self, role: str, stream: str, which: str) -> bool:
        config = self.roles.get(role)
        if config is None:
            return False
        return any(fnmatch.fnmatchcase(stream, glob) for glob in getattr(config, which))

    def may_subscribe(self, role: str, stream: str) -> bool:
        return self._allowed(role, stream, "subscribe")

    def may_publish(self, role: str, stream: str) -> bool:
        return self._allowed(role, stream, "publish")
