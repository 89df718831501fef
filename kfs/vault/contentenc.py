"""The vault file format: a fixed-size JSON header, then AES-256-GCM chunks.

See docs/vault-format.md for the full description (enough to write a decryptor).

    header   HEADER_SIZE bytes: one JSON object padded with spaces, ending in "\\n"
    chunk i  nonce(12) ‖ AES-256-GCM(plaintext_i) ‖ tag(16), plaintext_i of chunk_size
             bytes except the last one (0..chunk_size bytes; a file always has >= 1 chunk)
    AAD_i    file_id (16 bytes) ‖ i (8 bytes, big endian) ‖ last flag (1 byte: 1 on the last chunk)

Because every chunk but the last is full, the plaintext size follows from the
ciphertext size and the chunk size alone: ``st_size`` never decrypts anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kfs.vault.cryptocore import OVERHEAD, CryptoCore, IntegrityError

HEADER_SIZE = 192
FORMAT = "kfs-vault-file"
VERSION = 1
CIPHER = "aes-256-gcm"
KEY_FILE = ".kfs-vault.json"
FILE_ID_SIZE = 16
MIN_CHUNK = 512
MAX_CHUNK = 1 << 20


class FormatError(Exception):
    """Not a vault file, or a header we cannot use."""


@dataclass(frozen=True)
class Header:
    file_id: bytes
    chunk_size: int

    @classmethod
    def new(cls, chunk_size: int) -> Header:
        return cls(os.urandom(FILE_ID_SIZE), chunk_size)

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT, "version": VERSION, "cipher": CIPHER, "chunk_size": self.chunk_size,
            "file_id": self.file_id.hex(), "key": KEY_FILE,
        }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        return raw + b" " * (HEADER_SIZE - 1 - len(raw)) + b"\n"

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_SIZE or raw[HEADER_SIZE - 1:HEADER_SIZE] != b"\n":
            raise FormatError("missing or short header")
        try:
            doc = json.loads(raw[:HEADER_SIZE])
            file_id = bytes.fromhex(doc["file_id"])
            chunk_size = int(doc["chunk_size"])
        except (ValueError, KeyError, TypeError):
            raise FormatError("unreadable header") from None
        if doc.get("format") != FORMAT or doc.get("cipher") != CIPHER:
            raise FormatError("not a kfs vault file")
        if doc.get("version") != VERSION:
            raise FormatError(f"unsupported format version {doc.get('version')!r}")
        if len(file_id) != FILE_ID_SIZE or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise FormatError("bad file id or chunk size")
        return cls(file_id, chunk_size)

    @property
    def stride(self) -> int:
        """Bytes one full chunk takes on disk."""
        return self.chunk_size + OVERHEAD

    def aad(self, index: int, last: bool) -> bytes:
        return self.file_id + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")

    def chunk_offset(self, index: int) -> int:
        return HEADER_SIZE + index * self.stride


def chunk_count(plain_size: int, chunk_size: int) -> int:
    """Chunks a file of ``plain_size`` bytes has (an empty file has one empty chunk)."""
    return max(1, -(-plain_size // chunk_size))


def chunk_length(index: int, plain_size: int, chunk_size: int) -> int:
    return max(0, min(chunk_size, plain_size - index * chunk_size))


def cipher_size(plain_size: int, chunk_size: int) -> int:
    return HEADER_SIZE + plain_size + chunk_count(plain_size, chunk_size) * OVERHEAD


def plain_size(cipher_len: int, chunk_size: int) -> int:
    """The plaintext size for a ciphertext file of ``cipher_len`` bytes (0 if it has no chunk)."""
    body = cipher_len - HEADER_SIZE
    if body <= 0:
        return 0
    stride = chunk_size + OVERHEAD
    n = -(-body // stride)
    last = body - (n - 1) * stride
    return (n - 1) * chunk_size + max(0, last - OVERHEAD)


def is_well_formed_length(cipher_len: int, chunk_size: int) -> bool:
    body = cipher_len - HEADER_SIZE
    if body < OVERHEAD:
        return False
    stride = chunk_size + OVERHEAD
    last = body - (-(-body // stride) - 1) * stride
    return last >= OVERHEAD


def encrypt_bytes(core: CryptoCore, data: bytes, chunk_size: int, header: Header | None = None) -> bytes:
    """A whole ciphertext file for ``data`` (tests, init, small files)."""
    header = header or Header.new(chunk_size)
    n = chunk_count(len(data), chunk_size)
    out = [header.encode()]
    for i in range(n):
        piece = data[i * chunk_size:(i + 1) * chunk_size]
        out.append(core.seal(piece, header.aad(i, i == n - 1)))
    return b"".join(out)


def decrypt_bytes(core: CryptoCore, blob: bytes) -> bytes:
    """Decrypt a whole ciphertext file; IntegrityError/FormatError on any damage."""
    header = Header.decode(blob[:HEADER_SIZE])
    if not is_well_formed_length(len(blob), header.chunk_size):
        raise IntegrityError("truncated or torn file")
    size = plain_size(len(blob), header.chunk_size)
    n = chunk_count(size, header.chunk_size)
    out = []
    for i in range(n):
        start = header.chunk_offset(i)
        end = start + chunk_length(i, size, header.chunk_size) + OVERHEAD
        try:
            out.append(core.open(blob[start:end], header.aad(i, i == n - 1)))
        except IntegrityError as e:
            raise IntegrityError(f"chunk {i}: {e}") from None
    return b"".join(out)


def verify_fd(core: CryptoCore, fd: int, read_block: int = 1 << 20) -> None:
    """Authenticate every chunk of an open ciphertext file, in bounded memory."""
    head = os.pread(fd, HEADER_SIZE, 0)
    header = Header.decode(head)
    length = os.fstat(fd).st_size
    if not is_well_formed_length(length, header.chunk_size):
        raise IntegrityError("truncated or torn file")
    size = plain_size(length, header.chunk_size)
    n = chunk_count(size, header.chunk_size)
    per_read = max(1, read_block // header.stride)
    for first in range(0, n, per_read):
        last = min(n, first + per_read)
        start = header.chunk_offset(first)
        end = min(length, header.chunk_offset(last))
        blob = os.pread(fd, end - start, start)
        for i in range(first, last):
            off = (i - first) * header.stride
            piece = blob[off:off + chunk_length(i, size, header.chunk_size) + OVERHEAD]
            try:
                core.open(piece, header.aad(i, i == n - 1))
            except IntegrityError as e:
                raise IntegrityError(f"chunk {i}: {e}") from None
