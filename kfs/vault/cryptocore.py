"""AES-256-GCM sealing, the only place that touches the cipher (like gocryptfs's cryptocore).

A sealed blob is ``nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)``: every seal
draws a fresh random 96-bit nonce, so re-sealing a chunk never reuses one.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


class IntegrityError(Exception):
    """A blob failed authentication: tampered, torn, misplaced or sealed with another key.

    ``position`` is the blob's place in a run (`open_run`), None for a single blob.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class CryptoCore:
    """Seals and opens blobs with one 256-bit key."""

    def __init__(self, key: bytes | bytearray) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        # cryptography keeps its own copy inside the AESGCM object; dropping the
        # object (lock) is all we can do for that copy.  Ours is the caller's bytearray.
        self._aead: AESGCM | None = AESGCM(bytes(key))

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        nonce, sealed = self.seal_parts(plaintext, aad)
        return nonce + sealed

    def seal_parts(self, plaintext: bytes | bytearray | memoryview, aad: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext ‖ tag): written with one pwritev, no concatenation copy."""
        assert self._aead is not None, "key wiped"
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes | memoryview, aad: bytes) -> bytes:
        assert self._aead is not None, "key wiped"
        if len(blob) < OVERHEAD:
            raise IntegrityError("blob shorter than nonce + tag")
        try:
            view = memoryview(blob)
            return self._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None

    def open_into(self, blob: bytes | memoryview, aad: bytes, out: memoryview) -> None:
        """`open` decrypting straight into ``out`` (len(blob) - OVERHEAD bytes): no extra copy."""
        assert self._aead is not None, "key wiped"
        if len(blob) < OVERHEAD:
            raise IntegrityError("blob shorter than nonce + tag")
        try:
            view = memoryview(blob)
            self._aead.decrypt_into(view[:NONCE_SIZE], view[NONCE_SIZE:], aad, out)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None

    def seal_run(self, plains: list[bytes | bytearray | memoryview], aads: list[bytes]) -> list[bytes]:
        """Seal many blobs: [nonce_0, ct‖tag_0, nonce_1, ...], ready for one pwritev.

        The loop of a sequential write (256 chunks per MiB at 4 KiB): one getrandom call
        for all the nonces (each 12-byte slice is still an independent random nonce) and
        no per-chunk Python call besides the cipher's own.
        """
        aead = self._aead
        assert aead is not None, "key wiped"
        encrypt = aead.encrypt
        nonces = os.urandom(NONCE_SIZE * len(plains))
        out: list[bytes] = []
        append = out.append
        at = 0
        for plain, aad in zip(plains, aads, strict=True):
            nonce = nonces[at:at + NONCE_SIZE]
            at += NONCE_SIZE
            append(nonce)
            append(encrypt(nonce, plain, aad))
        return out

    def open_run(self, blob: memoryview, stride: int, lengths: list[int], aads: list[bytes],
                 out: memoryview) -> None:
        """Open consecutive blobs laid out every ``stride`` bytes of ``blob`` into ``out``, side by side.

        Blob k holds ``lengths[k]`` plaintext bytes (+ OVERHEAD) at ``k * stride``.
        IntegrityError (with ``position`` = k) on the first blob that fails or is short.
        """
        aead = self._aead
        assert aead is not None, "key wiped"
        decrypt_into = aead.decrypt_into
        have = len(blob)
        at = pos = 0
        k = 0
        try:
            for k, length in enumerate(lengths):
                end = at + length + OVERHEAD
                if end > have:
                    raise IntegrityError("missing bytes", k)
                decrypt_into(blob[at:at + NONCE_SIZE], blob[at + NONCE_SIZE:end], aads[k], out[pos:pos + length])
                at += stride
                pos += length
        except InvalidTag:
            raise IntegrityError("authentication failed", k) from None

    def wipe(self) -> None:
        self._aead = None
