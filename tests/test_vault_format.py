"""vault/ without FUSE: the format, the key file, and the working copy against a plain-file model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from kfs.store import StoreDir
from kfs.vault import keyfile
from kfs.vault.contentenc import (
    HEADER_SIZE,
    FormatError,
    Header,
    chunk_count,
    cipher_size,
    decrypt_bytes,
    encrypt_bytes,
    plain_size,
    verify_fd,
)
from kfs.vault.cryptocore import OVERHEAD, CryptoCore, IntegrityError
from kfs.vault.lockstate import LockState
from kfs.vault.openfile import DIRTY_LIMIT, TMP_PREFIX, ChunkError, ReaderView, WorkingFile

CS = 512  # the smallest chunk: many boundaries in few bytes


@pytest.fixture
def core() -> CryptoCore:
    return CryptoCore(os.urandom(32))


@pytest.fixture
def store(tmp_path: Path) -> StoreDir:
    return StoreDir.open(str(tmp_path / "vault"))


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 3 * CS, 10 * CS + 7])
def test_round_trip_and_size_from_ciphertext(core: CryptoCore, size: int) -> None:
    data = os.urandom(size)
    blob = encrypt_bytes(core, data, CS)
    assert len(blob) == cipher_size(size, CS)
    assert plain_size(len(blob), CS) == size
    assert len(blob) == HEADER_SIZE + size + chunk_count(size, CS) * OVERHEAD
    assert decrypt_bytes(core, blob) == data
    header = Header.decode(blob[:HEADER_SIZE])
    assert header.chunk_size == CS and blob[HEADER_SIZE - 1:HEADER_SIZE] == b"\n"


def test_header_rejects_garbage() -> None:
    for raw in (b"", b"x" * HEADER_SIZE, b'{"format":"other"}'.ljust(HEADER_SIZE - 1) + b"\n"):
        with pytest.raises(FormatError):
            Header.decode(raw)


def _chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    body = blob[HEADER_SIZE:]
    stride = CS + OVERHEAD
    return blob[:HEADER_SIZE], [body[i:i + stride] for i in range(0, len(body), stride)]


def test_every_tamper_case_is_detected(core: CryptoCore) -> None:
    data = os.urandom(4 * CS + 100)
    blob = encrypt_bytes(core, data, CS)
    head, chunks = _chunks(blob)
    other_head, other_chunks = _chunks(encrypt_bytes(core, os.urandom(4 * CS + 100), CS))
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + CS + 40] ^= 0x01
    cases = {
        "flipped bit": bytes(flipped),
        "swapped chunks": head + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "chunk from another file": head + chunks[0] + other_chunks[1] + b"".join(chunks[2:]),
        "truncated at a chunk boundary": head + b"".join(chunks[:3]),
        "truncated mid-chunk": blob[:-50],
        "last chunk dropped to header": head,
        "header swapped with another file's": other_head + b"".join(chunks),
        "torn tail": blob[:HEADER_SIZE + 5 * (CS + OVERHEAD) - 5 * (CS + OVERHEAD) + 10],
    }
    for name, bad in cases.items():
        with pytest.raises(IntegrityError):
            decrypt_bytes(core, bad)
        assert name


def test_verify_fd_and_wrong_key(tmp_path: Path, core: CryptoCore) -> None:
    path = tmp_path / "f"
    path.write_bytes(encrypt_bytes(core, os.urandom(5000), CS))
    fd = os.open(path, os.O_RDONLY)
    try:
        verify_fd(core, fd)
        with pytest.raises(IntegrityError):
            verify_fd(CryptoCore(os.urandom(32)), fd)
    finally:
        os.close(fd)


def test_keyfile_wrap_unwrap_rewrap() -> None:
    kf, master = keyfile.KeyFile.create(b"correct horse", 1000)
    again = keyfile.KeyFile.decode(kf.encode())
    assert again.unwrap(b"correct horse") == master
    with pytest.raises(keyfile.WrongPassphrase):
        again.unwrap(b"wrong")
    rewrapped = again.rewrap(b"correct horse", b"new one", 2000)
    assert rewrapped.unwrap(b"new one") == master and rewrapped.iterations == 2000
    assert rewrapped.salt != kf.salt
    with pytest.raises(keyfile.WrongPassphrase):
        rewrapped.unwrap(b"correct horse")
    with pytest.raises(keyfile.KeyFileError):
        keyfile.KeyFile.decode(b"{not json")


def test_lock_wipes_the_key() -> None:
    state = LockState(auto_lock_timeout=0.0)
    key = bytearray(os.urandom(32))
    state.unlock(key)
    assert state.unlocked and state.mlocked in (True, False)
    assert state.lock()
    assert key == bytearray(32) and not state.unlocked


def _new_file(store: StoreDir, core: CryptoCore, path: str, data: bytes = b"") -> None:
    store.write_atomic(path, encrypt_bytes(core, data, CS))


def _read_committed(store: StoreDir, core: CryptoCore, path: str) -> bytes:
    return decrypt_bytes(core, store.read_bytes(path))


def test_working_file_random_ops_against_a_model(store: StoreDir, core: CryptoCore) -> None:
    """>= 2,000 seeded writes/truncates/reads/commits at random offsets, checked against bytes."""
    rng = random.Random(20261202)
    _new_file(store, core, "model")
    model = bytearray()
    wf = WorkingFile(store, "model", lambda: core, CS)
    wf.refs = 1
    for step in range(2500):
        op = rng.random()
        if op < 0.45:
            offset = rng.randrange(0, len(model) + 3 * CS + 1)
            data = rng.randbytes(rng.choice([1, 7, CS - 1, CS, CS + 1, 3 * CS + 5, rng.randrange(1, 5000)]))
            wf.ensure_working_copy()
            wf.write(offset, data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
        elif op < 0.6:
            size = rng.randrange(0, len(model) + 4 * CS + 1)
            wf.ensure_working_copy(truncate_all=size == 0)
            wf.truncate(size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif op < 0.9:
            offset = rng.randrange(0, len(model) + 10)
            length = rng.randrange(0, 4 * CS)
            assert wf.read(offset, length) == bytes(model[offset:offset + length]), f"step {step}"
        else:
            wf.commit()
            assert _read_committed(store, core, "model") == bytes(model), f"step {step}"
        assert wf.size == len(model)
        if step % 500 == 0:  # memory stays bounded by spilling
            wf.ensure_working_copy()
            wf.spill(keep_last=True)
    wf.commit()
    wf.close()
    assert _read_committed(store, core, "model") == bytes(model)
    assert not [n for n in store.listdir() if n.startswith(TMP_PREFIX)]


def test_uncommitted_changes_never_reach_the_file(store: StoreDir, core: CryptoCore) -> None:
    old = os.urandom(3 * CS + 3)
    _new_file(store, core, "f", old)
    wf = WorkingFile(store, "f", lambda: core, CS)
    wf.ensure_working_copy()
    wf.write(CS // 2, os.urandom(2 * CS))
    wf.spill(keep_last=False)
    # a crash now: the committed file is untouched, the temp is an orphan
    assert _read_committed(store, core, "f") == old
    wf.close()
    assert _read_committed(store, core, "f") == old
    assert store.listdir() == ["f"]


def test_large_file_spills_in_bounded_memory(store: StoreDir, core: CryptoCore) -> None:
    _new_file(store, core, "big")
    wf = WorkingFile(store, "big", lambda: core, 65536)
    wf.ensure_working_copy(truncate_all=True)
    data = os.urandom(1 << 20)
    for i in range(24):
        wf.write(i << 20, data)
        assert len(wf.dirty) * 65536 <= DIRTY_LIMIT + 65536
    wf.commit()
    wf.close()
    fd = store.open_fd("big", os.O_RDONLY)
    view = ReaderView(fd, lambda: core)
    assert view.size == 24 << 20
    assert view.read((5 << 20) + 17, 100) == data[17:117]
    view.close()


def test_reader_detects_torn_file(store: StoreDir, core: CryptoCore) -> None:
    store.write_atomic("t", encrypt_bytes(core, os.urandom(2 * CS), CS)[:-3])
    view = ReaderView(store.open_fd("t", os.O_RDONLY), lambda: core)
    with pytest.raises(ChunkError):
        view.read(0, 2 * CS)
    view.close()


def test_spills_stay_consistent_with_reads_truncates_and_overwrites(store: StoreDir, core: CryptoCore) -> None:
    """A 20 MiB write spills several times; reads, a truncate and an overwrite of spilled chunks see it all."""
    _new_file(store, core, "bg")
    wf = WorkingFile(store, "bg", lambda: core, 4096)
    wf.ensure_working_copy(truncate_all=True)
    model = bytearray()
    block = os.urandom(1 << 20)
    for i in range(20):  # 20 MiB of 4 KiB chunks: several spills
        wf.write(len(model), block)
        model += block
        if i == 9:
            assert wf.read(3 << 20, 10000) == bytes(model[3 << 20:(3 << 20) + 10000])
        if i == 14:
            wf.truncate(11 << 20)
            del model[11 << 20:]
    wf.write(5 << 20, b"overwritten")  # inside a chunk already spilled
    model[5 << 20:(5 << 20) + 11] = b"overwritten"
    assert wf.read((5 << 20) - 5, 20) == bytes(model[(5 << 20) - 5:(5 << 20) + 15])
    wf.commit()
    wf.close()
    assert _read_committed(store, core, "bg") == bytes(model)


def test_reads_answer_with_views_that_match_the_plaintext(store: StoreDir, core: CryptoCore) -> None:
    data = os.urandom(9 * CS + 77)
    _new_file(store, core, "v", data)
    view = ReaderView(store.open_fd("v", os.O_RDONLY), lambda: core)
    rng = random.Random(7)
    for _ in range(500):
        offset, length = rng.randrange(0, len(data) + 5), rng.randrange(0, 4 * CS)
        assert bytes(view.read_buffer(offset, length)) == data[offset:offset + length]
    view.close()


def test_seal_run_and_open_run_round_trip_and_name_the_bad_chunk(core: CryptoCore) -> None:
    """The batched cipher calls of sequential I/O: fresh nonces, and damage pinned to its chunk."""
    plains = [os.urandom(CS) for _ in range(5)] + [os.urandom(100)]
    aads = [b"file" + i.to_bytes(8, "big") + (b"\x01" if i == 5 else b"\x00") for i in range(6)]
    sealed = core.seal_run(plains, aads)
    nonces = sealed[0::2]
    assert len(set(nonces)) == 6 and all(len(n) == 12 for n in nonces)
    blob = bytearray(b"".join(sealed))
    lengths = [CS] * 5 + [100]
    out = memoryview(bytearray(sum(lengths)))
    core.open_run(memoryview(bytes(blob)), CS + OVERHEAD, lengths, aads, out)
    assert bytes(out) == b"".join(plains)
    blob[3 * (CS + OVERHEAD) + 20] ^= 0x40
    with pytest.raises(IntegrityError) as bad:
        core.open_run(memoryview(bytes(blob)), CS + OVERHEAD, lengths, aads, out)
    assert bad.value.position == 3
    with pytest.raises(IntegrityError) as short:  # cut short: the last chunk misses a byte
        core.open_run(memoryview(b"".join(sealed)[:-1]), CS + OVERHEAD, lengths, aads, out)
    assert short.value.position == 5
    swapped = [aads[1], aads[0], *aads[2:]]
    with pytest.raises(IntegrityError) as moved:
        core.open_run(memoryview(b"".join(sealed)), CS + OVERHEAD, lengths, swapped, out)
    assert moved.value.position == 0


def test_multi_chunk_reads_report_the_damaged_chunk(store: StoreDir, core: CryptoCore) -> None:
    data = os.urandom(8 * CS + 10)
    blob = bytearray(encrypt_bytes(core, data, CS))
    blob[HEADER_SIZE + 5 * (CS + OVERHEAD) + 40] ^= 0x01
    store.write_atomic("d", bytes(blob))
    view = ReaderView(store.open_fd("d", os.O_RDONLY), lambda: core)
    try:
        assert bytes(view.read_buffer(0, 5 * CS)) == data[:5 * CS]  # chunks before the damage read fine
        with pytest.raises(ChunkError) as bad:
            view.read_buffer(3 * CS + 7, 4 * CS)
        assert bad.value.index == 5
    finally:
        view.close()
