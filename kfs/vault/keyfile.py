"""The vault key file ``vault/.kfs-vault.json``: a random master key, wrapped.

The master key (32 random bytes) is sealed with AES-256-GCM under a key derived
from the passphrase by PBKDF2-HMAC-SHA256 (per-vault random 16-byte salt).  A
wrong passphrase fails the GCM tag: there is no separate check value to attack.
Changing the passphrase rewraps the same master key: file contents are untouched.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from kfs.vault.contentenc import KEY_FILE
from kfs.vault.cryptocore import KEY_SIZE, CryptoCore, IntegrityError

KEY_FORMAT = "kfs-vault-key"
WRAP_AAD = b"kfs-vault-key/1"
SALT_SIZE = 16
MIN_ITERATIONS = 1000


class KeyFileError(Exception):
    """Missing or unreadable key file; ``str()`` is one line for the user."""


class WrongPassphrase(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def derive(passphrase: bytes | bytearray, salt: bytes, iterations: int) -> bytearray:
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, iterations=iterations)
    return bytearray(kdf.derive(bytes(passphrase)))


@dataclass
class KeyFile:
    iterations: int
    salt: bytes
    wrapped: bytes  # nonce ‖ ciphertext ‖ tag
    created: str = ""

    # -- (de)serialisation ---------------------------------------------------------
    def encode(self) -> bytes:
        doc = {
            "format": KEY_FORMAT, "version": 1, "kdf": "pbkdf2-hmac-sha256", "iterations": self.iterations,
            "salt": _b64(self.salt), "wrap": "aes-256-gcm", "wrap_aad": WRAP_AAD.decode(),
            "wrapped_key": _b64(self.wrapped), "created": self.created,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes) -> KeyFile:
        try:
            doc = json.loads(raw)
            if doc.get("format") != KEY_FORMAT or doc.get("version") != 1:
                raise ValueError("format")
            return cls(int(doc["iterations"]), base64.b64decode(doc["salt"]),
                       base64.b64decode(doc["wrapped_key"]), str(doc.get("created", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeyFileError(f"{KEY_FILE} is damaged or not a kfs vault key file") from None

    # -- key operations --------------------------------------------------------------
    @classmethod
    def create(cls, passphrase: bytes | bytearray, iterations: int) -> tuple[KeyFile, bytearray]:
        """A new vault: a random master key wrapped under ``passphrase``."""
        master = bytearray(os.urandom(KEY_SIZE))
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls.wrap(master, passphrase, iterations, created), master

    @classmethod
    def wrap(cls, master: bytearray, passphrase: bytes | bytearray, iterations: int, created: str) -> KeyFile:
        if iterations < MIN_ITERATIONS:
            raise KeyFileError(f"kdf_iterations must be at least {MIN_ITERATIONS}")
        salt = os.urandom(SALT_SIZE)
        kek = derive(passphrase, salt, iterations)
        try:
            wrapped = CryptoCore(kek).seal(master, WRAP_AAD)
        finally:
            kek[:] = bytes(len(kek))
        return cls(iterations, salt, wrapped, created)

    def unwrap(self, passphrase: bytes | bytearray) -> bytearray:
        """The master key, or WrongPassphrase."""
        kek = derive(passphrase, self.salt, self.iterations)
        try:
            return bytearray(CryptoCore(kek).open(self.wrapped, WRAP_AAD))
        except IntegrityError:
            raise WrongPassphrase("wrong vault passphrase") from None
        finally:
            kek[:] = bytes(len(kek))

    def rewrap(self, old: bytes | bytearray, new: bytes | bytearray, iterations: int) -> KeyFile:
        master = self.unwrap(old)
        try:
            return KeyFile.wrap(master, new, iterations, self.created)
        finally:
            master[:] = bytes(len(master))


def load(store: object) -> KeyFile | None:
    """The key file of a vault store dir (`kfs.store.StoreDir`), None if there is none."""
    try:
        raw = store.read_bytes(KEY_FILE)  # type: ignore[attr-defined]
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KeyFileError(f"{KEY_FILE}: {e.strerror}") from None
    return KeyFile.decode(raw)


def save(store: object, keyfile: KeyFile) -> None:
    store.write_atomic(KEY_FILE, keyfile.encode(), 0o600)  # type: ignore[attr-defined]
