"""vault/ through a real mount: round trips, atomic replacement, lock state, tamper, crash, POSIX."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Mount, is_mounted, kfs_cli, lazy_unmount

PASS = "correct horse battery staple"
CS = 16384  # the shipped default, set explicitly so the tamper offsets stay right


def vault_config(**vault: Any) -> dict[str, dict[str, Any]]:
    # the websocket broker's fixed port would collide between parallel test mounts
    return {"streams.yaml": {"websocket": {"enabled": False}}, "vault_config.yaml": {"chunk_size": CS, **vault}}


@pytest.fixture
def vault(kfs_mount: Callable[..., Mount]) -> Mount:
    return kfs_mount(config=vault_config(), passphrase=PASS)


def store_file(m: Mount, name: str) -> Path:
    return m.store / "vault" / name


def events(m: Mount, topic: str) -> list[dict[str, Any]]:
    return [e for e in m.status()["areas"]["vault"]["recent_events"] if e["topic"] == topic]


def test_round_trip_sizes_and_ciphertext_has_no_plaintext(vault: Mount) -> None:
    v = vault.path / "vault"
    marker = b"sk-PLAINTEXT-MARKER-"
    for size in (0, 1, CS - 1, CS, CS + 1, 3 * CS + 17):
        data = (marker * (size // len(marker) + 1))[:size]
        (v / f"f{size}").write_bytes(data)
        assert (v / f"f{size}").read_bytes() == data
        assert os.stat(v / f"f{size}").st_size == size
        raw = store_file(vault, f"f{size}").read_bytes()
        assert raw.startswith(b'{"format":"kfs-vault-file"') and (size < 5 or marker[:5] not in raw)
    secret = b'{"openai_api_key":"sk-abc123"}\n'
    (v / "master-config.enc.json").write_bytes(secret)
    assert subprocess.run(["cat", str(v / "master-config.enc.json")], capture_output=True).stdout == secret
    assert b"sk-abc123" not in store_file(vault, "master-config.enc.json").read_bytes()
    assert sorted(os.listdir(v)) == sorted([f"f{s}" for s in (0, 1, CS - 1, CS, CS + 1, 3 * CS + 17)]
                                           + ["master-config.enc.json"])  # key file hidden
    assert not (v / ".kfs-vault.json").exists()
    # the next mount reads it back
    vault.restart()
    assert (v / "master-config.enc.json").read_bytes() == secret
    assert (v / f"f{CS + 1}").read_bytes() == (marker * (CS // len(marker) + 2))[:CS + 1]


@pytest.mark.slow
def test_fifty_megabytes(vault: Mount) -> None:
    p = vault.path / "vault" / "big.bin"
    data = random.Random(5).randbytes(50 * 1000 * 1000)
    with open(p, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    with open(p, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    with open(p, "rb") as f:  # random access in the middle of a chunk
        f.seek(31_337_000)
        assert f.read(100_000) == data[31_337_000:31_437_000]


def test_random_ops_through_the_mount(kfs_mount: Callable[..., Mount]) -> None:
    m = kfs_mount(config=vault_config(chunk_size=4096), passphrase=PASS)
    p = m.path / "vault" / "model.bin"
    rng = random.Random(7)
    model = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for step in range(600):
            op = rng.random()
            if op < 0.45:
                offset = rng.randrange(0, len(model) + 9000)
                data = rng.randbytes(rng.choice([1, 4095, 4096, 4097, rng.randrange(1, 20000)]))
                assert os.pwrite(fd, data, offset) == len(data)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(data)] = data
            elif op < 0.6:
                size = rng.randrange(0, len(model) + 9000)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op < 0.95:
                offset = rng.randrange(0, len(model) + 10)
                length = rng.randrange(1, 20000)
                assert os.pread(fd, length, offset) == bytes(model[offset:offset + length]), step
            else:
                os.fsync(fd)
            assert os.fstat(fd).st_size == len(model), step
    finally:
        os.close(fd)
    assert p.read_bytes() == bytes(model)
    m.restart()
    assert p.read_bytes() == bytes(model)


def test_sed_in_place_and_editor_rename(vault: Mount) -> None:
    v = vault.path / "vault"
    (v / "conf").write_text("token=old\nother=1\n")
    subprocess.run(["sed", "-i", "s/old/new/", str(v / "conf")], check=True)
    assert (v / "conf").read_text() == "token=new\nother=1\n"
    # an editor: write a temp beside it, fsync, rename over
    tmp = v / ".conf.swp"
    with open(tmp, "w") as f:
        f.write("token=edited\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, v / "conf")
    assert (v / "conf").read_text() == "token=edited\n"
    assert sorted(os.listdir(v)) == ["conf"]
    with open(v / "conf", "a") as f:
        f.write("appended\n")
    assert (v / "conf").read_text() == "token=edited\nappended\n"


def test_lock_unlock_and_listing_while_locked(vault: Mount) -> None:
    v = vault.path / "vault"
    (v / "x").write_text("secret")
    vault.cli("vault", "lock", str(vault.path))
    assert vault.status()["areas"]["vault"]["state"] == "locked"
    assert os.listdir(v) == ["x"] and os.stat(v / "x").st_size == 6
    with pytest.raises(PermissionError):
        (v / "x").read_text()
    with pytest.raises(PermissionError):
        (v / "y").write_text("new")
    cat = subprocess.run(["cat", str(v / "x")], capture_output=True, text=True)
    assert cat.returncode != 0 and "Permission denied" in cat.stderr
    bad = kfs_cli("vault", "unlock", str(vault.path), env={"KFS_VAULT_PASSPHRASE": "wrong"})
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "wrong vault passphrase" in bad.stderr
    status = vault.status()["areas"]["vault"]
    assert status["state"] == "locked" and status["unlock_failures"] == 1
    vault.cli("vault", "unlock", str(vault.path))
    assert (v / "x").read_text() == "secret"
    topics = [e["topic"] for e in vault.status()["areas"]["vault"]["recent_events"]]
    assert topics[-3:] == ["vault_locked", "vault_unlock_failed", "vault_unlocked"]
    out = vault.cli("vault", "status", str(vault.path)).stdout
    assert "unlocked" in out and "failed unlocks 1" in out


def test_lock_drops_the_page_cache_of_files_open_before_it(vault: Mount) -> None:
    """Read-only opens keep the kernel's page cache (keep_cache); a lock must not leave
    plaintext readable there: an fd opened before the lock gets EACCES, also for pages it
    has read before, and reads again after unlock."""
    v = vault.path / "vault"
    data = os.urandom(3 * CS + 123)
    (v / "big").write_bytes(data)
    (v / "small").write_bytes(b"sk-0123456789")
    fds = [os.open(v / "big", os.O_RDONLY), os.open(v / "small", os.O_RDONLY)]
    try:
        for _ in range(2):  # the second pass is served by the kernel's page cache
            assert os.pread(fds[0], len(data), 0) == data
            assert os.pread(fds[1], 100, 0) == b"sk-0123456789"
        vault.cli("vault", "lock", str(vault.path))
        for fd, offsets in ((fds[0], (0, 4096, 2 * CS, 3 * CS)), (fds[1], (0,))):
            for offset in offsets:  # (past the end the kernel answers 0 bytes by itself)
                with pytest.raises(PermissionError):
                    os.pread(fd, 4096, offset)
        with pytest.raises(PermissionError):
            (v / "small").read_bytes()
        vault.cli("vault", "unlock", str(vault.path))
        assert os.pread(fds[0], len(data), 0) == data
        assert os.pread(fds[1], 100, 0) == b"sk-0123456789"
    finally:
        for fd in fds:
            os.close(fd)


def test_lock_drops_the_page_cache_of_a_file_unlinked_while_open(vault: Mount) -> None:
    # the daemon runs the repo's code (conftest.REPO), which is what must have the hook
    if "def invalidate_area(" not in (REPO / "kfs" / "fs" / "operations.py").read_text():
        pytest.skip("needs the core's KernelNotifier.invalidate_area (see docs/vault.md, Lock state)")
    v = vault.path / "vault"
    (v / "gone").write_bytes(b"sk-unlinked" * 500)
    fd = os.open(v / "gone", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0)[:11] == b"sk-unlinked"
        os.unlink(v / "gone")
        assert os.pread(fd, 100, 0)[:11] == b"sk-unlinked"
        vault.cli("vault", "lock", str(vault.path))
        with pytest.raises(PermissionError):
            os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def test_page_cache_follows_writes_through_any_handle_and_rename(vault: Mount) -> None:
    """keep_cache across opens is only right because every change invalidates: a write
    through another handle, a truncate by path, a rename over the file, and a reader opened
    while a writer has unflushed data must not put stale pages where the writer reads."""
    v = vault.path / "vault"
    (v / "f").write_bytes(b"A" * 10000)
    assert (v / "f").read_bytes() == b"A" * 10000  # cached now
    with open(v / "f", "r+b", buffering=0) as w:
        w.write(b"B" * 100)
        # a reader opened now reads the committed file; the writer must still see its write
        with open(v / "f", "rb", buffering=0) as r:
            assert r.read(5) == b"AAAAA"
        w.seek(0)
        assert w.read(100) == b"B" * 100
    assert (v / "f").read_bytes() == b"B" * 100 + b"A" * 9900
    os.truncate(v / "f", 50)
    assert (v / "f").read_bytes() == b"B" * 50
    (v / "g").write_bytes(b"G" * 7)
    assert (v / "g").read_bytes() == b"G" * 7
    os.rename(v / "f", v / "g")
    assert (v / "g").read_bytes() == b"B" * 50
    (v / "g.tmp").write_bytes(b"new contents")
    os.replace(v / "g.tmp", v / "g")
    assert (v / "g").read_bytes() == b"new contents" and os.stat(v / "g").st_size == 12


def resident_pages(path: Path, pages: int) -> list[bool]:
    """Which of the first ``pages`` pages of ``path`` the kernel's page cache holds (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    length = pages * 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, length, vector) == 0, os.strerror(ctypes.get_errno())
            return [bool(b & 1) for b in vector.raw]
        finally:
            libc.munmap(address, length)
    finally:
        os.close(fd)


def test_coming_back_to_a_chunk_puts_all_of_it_in_the_page_cache(vault: Mount) -> None:
    """A random read decrypts its whole chunk; once a reader comes back to a chunk (locality),
    kfs hands the rest of it to the kernel, which then answers those pages itself."""
    v = vault.path / "vault"
    chunks = 8
    data = os.urandom(chunks * CS)
    (v / "big").write_bytes(data)
    per_chunk = CS // 4096
    fd = os.open(v / "big", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the write left pages behind
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for chunk in range(chunks):  # one page of each chunk: decrypted once, nothing pushed
            assert os.pread(fd, 4096, chunk * CS) == data[chunk * CS:chunk * CS + 4096]
        first_pass = resident_pages(v / "big", chunks * per_chunk)
        assert not any(first_pass[page] for page in range(len(first_pass)) if page % per_chunk)
        # back to chunk 0 (long gone from the reader's few decrypted chunks): the rest of it follows.
        # (Pages 2 and 3 are the ones no read asked for.  Pages that were read may still be dropped
        # by the write's own invalidation, which is sent asynchronously, but always before the pushes.)
        assert os.pread(fd, 4096, 4096) == data[4096:8192]
        deadline = time.monotonic() + 10
        while not all(resident_pages(v / "big", per_chunk)[2:]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(resident_pages(v / "big", per_chunk)[2:])
        reads = vault.status()["fuse"]["requests_by_op"]["read"]
        assert os.pread(fd, CS - 8192, 8192) == data[8192:CS]  # from the page cache
        assert vault.status()["fuse"]["requests_by_op"]["read"] == reads
        assert not any(resident_pages(v / "big", chunks * per_chunk)[per_chunk + 1:2 * per_chunk])
    finally:
        os.close(fd)


def test_auto_lock_when_idle_but_never_under_an_open_file(kfs_mount: Callable[..., Mount]) -> None:
    m = kfs_mount(config=vault_config(auto_lock_timeout="1s"), passphrase=PASS)
    v = m.path / "vault"
    (v / "held").write_text("keep me")
    with open(v / "held", "rb", buffering=0) as f:
        time.sleep(3.0)  # three timeouts with a file open
        assert m.status()["areas"]["vault"]["state"] == "unlocked"
        assert f.read() == b"keep me"
    deadline = time.monotonic() + 15
    while m.status()["areas"]["vault"]["state"] != "locked":
        assert time.monotonic() < deadline, "never auto-locked"
        time.sleep(0.3)
    assert any(e.get("reason") == "idle" for e in events(m, "vault_locked"))
    with pytest.raises(PermissionError):
        (v / "held").read_text()


def _corrupt(m: Mount, name: str, how: str, other: str | None = None) -> None:
    path = store_file(m, name)
    raw = bytearray(path.read_bytes())
    head, stride = 192, CS + 28
    if how == "flip":
        raw[head + 1000] ^= 0x04
    elif how == "swap":
        a, b = raw[head:head + stride], raw[head + stride:head + 2 * stride]
        raw[head:head + 2 * stride] = b + a
    elif how == "foreign":
        assert other is not None
        foreign = store_file(m, other).read_bytes()
        raw[head + stride:head + 2 * stride] = foreign[head + stride:head + 2 * stride]
    elif how == "truncate":
        del raw[head + 2 * stride:]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["flip", "swap", "foreign", "truncate"])
def test_tamper_gives_eio_event_and_verify_fails(kfs_mount: Callable[..., Mount], how: str) -> None:
    m = kfs_mount(config=vault_config(), passphrase=PASS)
    v = m.path / "vault"
    rng = random.Random(how)
    (v / "victim").write_bytes(rng.randbytes(3 * CS + 100))
    (v / "donor").write_bytes(rng.randbytes(3 * CS + 100))
    ok = m.cli("vault", "verify", str(m.path))
    assert "0 damaged" in ok.stdout
    _corrupt(m, "victim", how, "donor")
    subprocess.run(["sync"], check=False)
    # the kernel may hold pages of the old contents: a lock drops them (and every plaintext
    # cache), so after unlock reads reach the store again
    m.cli("vault", "lock", str(m.path))
    m.cli("vault", "unlock", str(m.path))
    with pytest.raises(OSError) as err:
        (v / "victim").read_bytes()
    assert err.value.errno == errno.EIO
    assert (v / "donor").read_bytes()  # the rest of the vault is fine
    bad = [e for e in events(m, "vault_integrity_error") if e["file"] == "victim"]
    assert bad, m.status()["areas"]["vault"]["recent_events"]
    live = m.cli("vault", "verify", str(m.path), check=False)
    assert live.returncode == 1 and "DAMAGED victim" in live.stdout and "donor" not in live.stdout
    m.stop()
    offline = kfs_cli("vault", "verify", "--store", str(m.store), env={"KFS_VAULT_PASSPHRASE": PASS})
    assert offline.returncode == 1 and "DAMAGED victim" in offline.stdout


def test_kill9_mid_write_then_remount(vault: Mount) -> None:
    v = vault.path / "vault"
    old = b"old contents\n" * 10000
    (v / "a").write_bytes(old)
    fsynced = os.urandom(200_000)
    fd_a = os.open(v / "a", os.O_WRONLY | os.O_TRUNC)
    fd_b = os.open(v / "b", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd_a, b"half of the new contents")
    os.write(fd_b, fsynced)
    os.fsync(fd_b)
    os.write(fd_b, b"after the fsync, never flushed")
    vault.kill9()
    for fd in (fd_a, fd_b):
        try:
            os.close(fd)
        except OSError:
            pass
    vault.start()
    assert (v / "a").read_bytes() == old
    assert (v / "b").read_bytes() == fsynced
    assert sorted(os.listdir(v)) == ["a", "b"]
    assert not [n for n in os.listdir(vault.store / "vault") if n.startswith(".kfs-tmp")]
    assert "0 damaged" in vault.cli("vault", "verify", str(vault.path)).stdout


def test_wrong_passphrase_at_mount_changes_nothing(kfs_mount: Callable[..., Mount]) -> None:
    m = kfs_mount(config=vault_config(), passphrase=PASS)
    (m.path / "vault" / "s").write_text("x")
    m.stop()
    key_before = store_file(m, ".kfs-vault.json").read_bytes()
    started = time.monotonic()
    result = kfs_cli("mount", str(m.path), "--store", str(m.store), "--config", str(m.config_dir),
                     env={"KFS_VAULT_PASSPHRASE": "not it"})
    assert result.returncode != 0
    assert result.stderr.strip() == "kfs: wrong vault passphrase; nothing changed"
    assert time.monotonic() - started >= 0.45  # the constant delay
    assert not os.path.ismount(m.path)
    assert store_file(m, ".kfs-vault.json").read_bytes() == key_before


def test_passwd_rewraps_only(vault: Mount, tmp_path: Path) -> None:
    v = vault.path / "vault"
    (v / "s").write_text("stays")
    before = store_file(vault, "s").read_bytes()
    new = tmp_path / "new-pass"
    new.write_text("a new passphrase\n")
    vault.cli("vault", "passwd", str(vault.path), "--new-passphrase-file", str(new))
    assert store_file(vault, "s").read_bytes() == before
    vault.stop()
    vault.passphrase = None
    vault.start("--passphrase-file", str(new))
    assert (v / "s").read_text() == "stays"
    vault.stop()
    vault.passphrase = PASS
    with pytest.raises(AssertionError, match="wrong vault passphrase"):
        vault.start()


def test_no_key_stays_locked_then_init_on_live_mount(kfs_mount: Callable[..., Mount], tmp_path: Path) -> None:
    m = kfs_mount(config=vault_config())
    status = m.status()["areas"]["vault"]
    assert status["state"] == "no key" and "kfs vault init" in status["message"]
    assert "kfs vault init" in m.cli("status", str(m.path)).stdout
    assert os.listdir(m.path / "logs") is not None  # the rest of the mount works
    with pytest.raises(PermissionError):
        (m.path / "vault" / "s").write_text("x")
    pf = tmp_path / "pass"
    pf.write_text(PASS)
    m.cli("vault", "init", str(m.path), "--passphrase-file", str(pf))
    (m.path / "vault" / "s").write_text("x")
    again = m.cli("vault", "init", str(m.path), "--passphrase-file", str(pf), check=False)
    assert again.returncode == 1 and "already has a key" in again.stderr


def test_offline_init_on_a_store(kfs_mount: Callable[..., Mount], tmp_path: Path) -> None:
    m = kfs_mount(config=vault_config(), start=False)
    pf = tmp_path / "pass"
    pf.write_text(PASS + "\n")
    out = kfs_cli("vault", "init", "--store", str(m.store), "--passphrase-file", str(pf), "--iterations", "20000")
    assert out.returncode == 0, out.stderr
    key = json.loads(store_file(m, ".kfs-vault.json").read_text())
    assert key["iterations"] == 20000 and key["kdf"] == "pbkdf2-hmac-sha256"
    m.start("--passphrase-file", str(pf))
    assert m.status()["areas"]["vault"]["state"] == "unlocked"


def test_posix_semantics_as_root(vault: Mount) -> None:
    v = vault.path / "vault"
    os.makedirs(v / "a" / "b")
    p = v / "a" / "b" / "s"
    p.write_text("hello")
    st = os.stat(p)
    assert (st.st_mode & 0o777) == 0o600 and st.st_uid == os.getuid()
    os.chmod(p, 0o640)
    os.chown(p, 123, 456)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(p)
    assert (st.st_mode & 0o777) == 0o640 and (st.st_uid, st.st_gid) == (123, 456)
    assert st.st_mtime_ns == 2_000_000_000
    with open(p, "r+") as f:  # a write keeps mode and owner
        f.write("J")
    st = os.stat(p)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 123, 456)
    os.truncate(p, 2)
    assert p.read_text() == "Je"
    os.truncate(p, 5)
    assert p.read_bytes() == b"Je\0\0\0"
    os.rename(v / "a", v / "c")
    assert (v / "c" / "b" / "s").read_bytes() == b"Je\0\0\0"
    os.unlink(v / "c" / "b" / "s")
    os.rmdir(v / "c" / "b")
    assert os.listdir(v / "c") == []
    with pytest.raises(OSError) as err:
        (v / ".kfs-vault.json").write_text("x")
    assert err.value.errno in (errno.EPERM, errno.ENOENT)


def test_unprivileged_user_with_allow_other() -> None:
    # pytest's tmp dirs are 0700 root: this mount lives where an unprivileged user can reach it
    root = Path(tempfile.mkdtemp(prefix="kfs-vault-other-"))
    os.chmod(root, 0o755)
    m = Mount(root, vault_config(), PASS)
    try:
        m.start("--allow-other")
        os.mkdir(m.path / "vault" / "nobody")
        os.chown(m.path / "vault" / "nobody", 65534, 65534)
        (m.path / "vault" / "rootonly").write_text("root secret")
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        script = (
            "import os\n"
            f"p = '{m.path}/vault/nobody/s'\n"
            "open(p, 'w').write('mine')\n"
            "st = os.stat(p)\n"
            "print(oct(st.st_mode & 0o777), st.st_uid, st.st_gid, open(p).read())\n"
            "os.chmod(p, 0o400); os.rename(p, p + '2'); print(open(p + '2').read())\n"
            f"try:\n    open('{m.path}/vault/rootonly').read()\nexcept PermissionError:\n    print('denied')\n"
        )
        out = subprocess.run([*user, "/usr/bin/python3", "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:3] == ["0o600 65534 65534 mine", "mine", "denied"]
        assert os.stat(m.store / "vault" / "nobody" / "s2").st_uid == 65534
    finally:
        try:
            m.stop()
        except Exception:
            m.kill9()
        if is_mounted(m.path):
            lazy_unmount(m.path)
        shutil.rmtree(root, ignore_errors=True)


def test_disabled_vault_is_absent_and_bad_config_is_one_line(kfs_mount: Callable[..., Mount]) -> None:
    m = kfs_mount(config={**vault_config(enabled=False)}, passphrase=PASS)
    assert "vault" not in os.listdir(m.path)
    assert not (m.store / "vault" / ".kfs-vault.json").exists()  # no key made for a disabled vault
    bad = kfs_mount(config=vault_config(chunk_size=100), start=False, name="bad")
    bad.write_config()
    result = kfs_cli("mount", str(bad.path), "--store", str(bad.store), "--config", str(bad.config_dir))
    assert result.returncode == 1
    assert result.stderr.strip() == "kfs: vault_config.yaml: chunk_size: must be between 512 and 1048576, got 100"


def test_mount_on_a_terminal_offers_to_create_the_key(kfs_mount: Callable[..., Mount]) -> None:
    from test_vault_area import _run_on_terminal

    m = kfs_mount(config=vault_config(), start=False)
    m.write_config()
    repo = str(Path(__file__).resolve().parent.parent)
    args = ["mount", str(m.path), "--store", str(m.store), "--config", str(m.config_dir)]
    code, out = _run_on_terminal(args, [b"y", PASS.encode(), PASS.encode()], repo)
    assert code == 0, out
    assert "created a new vault key" in out
    pid = re.search(r"pid (\d+)", out)
    assert pid
    m.pid = int(pid.group(1))  # the fixture unmounts it
    assert m.status()["areas"]["vault"]["state"] == "unlocked"
    (m.path / "vault" / "s").write_text("typed on a terminal")
    assert (m.path / "vault" / "s").read_text() == "typed on a terminal"

