"""Hard links in vault/ through a real mount: one inode under every name, commits that keep
the link joined (rewritten in place), kill -9 in the middle of one, and the errors link(2) gives."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from test_vault_mount import PASS, store_file, vault_config


@pytest.fixture
def vault(kfs_mount: Callable[..., Mount]) -> Mount:
    return kfs_mount(config=vault_config(), passphrase=PASS)


def expect_errno(code: int, func: Callable[[], object]) -> None:
    with pytest.raises(OSError) as e:
        func()
    assert e.value.errno == code, f"expected {errno.errorcode[code]}, got {e.value!r}"


def same_file(*paths: Path, nlink: int) -> None:
    stats = [os.stat(p) for p in paths]
    assert len({st.st_ino for st in stats}) == 1, [st.st_ino for st in stats]
    assert [st.st_nlink for st in stats] == [nlink] * len(paths)
    assert len({st.st_size for st in stats}) == 1


def test_link_is_one_file_under_two_names(vault: Mount) -> None:
    v = vault.path / "vault"
    (v / "a").write_bytes(b"first version")
    os.link(v / "a", v / "b")
    assert (v / "b").read_bytes() == b"first version"
    same_file(v / "a", v / "b", nlink=2)
    # one ciphertext inode in the store (a store hard link), no plaintext in it
    sa, sb = os.stat(store_file(vault, "a")), os.stat(store_file(vault, "b"))
    assert sa.st_ino == sb.st_ino and sa.st_nlink == 2
    # writes through either name are seen through the other, contents and size
    (v / "b").write_bytes(b"second, longer version" * 2000)
    assert (v / "a").read_bytes() == b"second, longer version" * 2000
    with open(v / "a", "ab") as f:
        f.write(b"+tail")
    assert (v / "b").read_bytes().endswith(b"version+tail")
    os.truncate(v / "b", 6)
    assert (v / "a").read_bytes() == b"second"
    same_file(v / "a", v / "b", nlink=2)
    # the link stayed joined through every commit: still one store inode
    assert os.stat(store_file(vault, "a")).st_ino == sa.st_ino == os.stat(store_file(vault, "b")).st_ino
    assert b"second" not in store_file(vault, "a").read_bytes()
    assert sorted(os.listdir(v)) == ["a", "b"]
    assert not [n for n in os.listdir(vault.store / "vault") if n.startswith((".kfs-tmp", ".kfs-redo"))]
    assert "0 damaged" in vault.cli("vault", "verify", str(vault.path)).stdout
    vault.restart()  # the kernel and the daemon forget everything: the names are one inode again
    same_file(v / "b", v / "a", nlink=2)
    assert (v / "a").read_bytes() == b"second"


def test_an_open_reader_sees_a_commit_through_the_other_name(vault: Mount) -> None:
    v = vault.path / "vault"
    (v / "a").write_bytes(b"old" * 10000)
    os.link(v / "a", v / "b")
    fd = os.open(v / "a", os.O_RDONLY)
    try:
        assert os.pread(fd, 9, 0) == b"oldoldold"
        (v / "b").write_bytes(b"new" * 10000)
        # as on a local disk: a file's readers read the file, not a snapshot of it
        assert os.pread(fd, 9, 0) == b"newnewnew"
        assert os.fstat(fd).st_size == 30000
    finally:
        os.close(fd)


def test_unlink_one_name_and_the_other_still_reads_and_writes(vault: Mount) -> None:
    v = vault.path / "vault"
    (v / "a").write_bytes(b"shared")
    os.link(v / "a", v / "b")
    ino = os.stat(v / "a").st_ino
    os.unlink(v / "a")
    assert not (v / "a").exists()
    assert (v / "b").read_bytes() == b"shared"
    st = os.stat(v / "b")
    assert st.st_nlink == 1 and st.st_ino == ino
    (v / "b").write_bytes(b"rewritten alone")  # one name again: replaced by rename as usual
    assert (v / "b").read_bytes() == b"rewritten alone"
    assert os.stat(store_file(vault, "b")).st_nlink == 1
    # a file open for writing through a name that goes: its writes still reach the file
    os.link(v / "b", v / "c")
    fd = os.open(v / "b", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"written through a name that was unlinked")
        os.unlink(v / "b")
    finally:
        os.close(fd)
    assert (v / "c").read_bytes() == b"written through a name that was unlinked"
    assert sorted(os.listdir(v)) == ["c"]


def test_rename_of_a_linked_file_and_links_into_subdirectories(vault: Mount) -> None:
    v = vault.path / "vault"
    os.makedirs(v / "sub" / "deeper")
    (v / "a").write_bytes(b"linked")
    os.link(v / "a", v / "sub" / "b")
    os.link(v / "sub" / "b", v / "sub" / "deeper" / "c")
    same_file(v / "a", v / "sub" / "b", v / "sub" / "deeper" / "c", nlink=3)
    os.rename(v / "sub" / "b", v / "renamed")
    os.rename(v / "sub", v / "moved")
    same_file(v / "a", v / "renamed", v / "moved" / "deeper" / "c", nlink=3)
    (v / "moved" / "deeper" / "c").write_bytes(b"through the moved name")
    assert (v / "a").read_bytes() == b"through the moved name"
    assert (v / "renamed").read_bytes() == b"through the moved name"
    # rename between two names of one file does nothing (POSIX), both stay
    os.rename(v / "a", v / "renamed")
    assert (v / "a").exists() and (v / "renamed").exists()
    # rename of another file over one name: that name is the other file now, the rest stay linked
    (v / "other").write_bytes(b"other")
    os.replace(v / "other", v / "renamed")
    assert (v / "renamed").read_bytes() == b"other" and os.stat(v / "renamed").st_nlink == 1
    same_file(v / "a", v / "moved" / "deeper" / "c", nlink=2)
    assert "0 damaged" in vault.cli("vault", "verify", str(vault.path)).stdout


def test_link_errors(vault: Mount) -> None:
    v = vault.path / "vault"
    (v / "a").write_bytes(b"x")
    (v / "exists").write_bytes(b"y")
    (v / "dir").mkdir()
    expect_errno(errno.EEXIST, lambda: os.link(v / "a", v / "exists"))
    expect_errno(errno.ENOENT, lambda: os.link(v / "missing", v / "new"))
    expect_errno(errno.EPERM, lambda: os.link(v / "dir", v / "dir2"))  # POSIX: no links to directories
    expect_errno(errno.EPERM, lambda: os.link(v / "a", v / ".kfs-reserved"))
    expect_errno(errno.EXDEV, lambda: os.link(v / "a", vault.path / "logs" / "a.log.jsonl"))
    logs = vault.path / "logs"
    (logs / "x.log.jsonl").write_text('{"a": 1}\n')
    expect_errno(errno.EPERM, lambda: os.link(logs / "x.log.jsonl", logs / "y.log.jsonl"))
    vault.cli("vault", "lock", str(vault.path))
    expect_errno(errno.EACCES, lambda: os.link(v / "a", v / "while-locked"))
    vault.cli("vault", "unlock", str(vault.path))
    os.link(v / "a", v / "after-unlock")
    assert sorted(os.listdir(v)) == ["a", "after-unlock", "dir", "exists"]


def test_kill9_during_the_commit_of_a_linked_file(vault: Mount) -> None:
    """Old or new contents through both names after kill -9 at any point of an in-place commit."""
    v = vault.path / "vault"
    size = 32 << 20
    old, new = b"O" * size, b"N" * size
    (v / "a").write_bytes(old)
    os.link(v / "a", v / "b")
    with open(v / "b", "wb") as f:  # how long a commit takes here: kill at fractions of it
        f.write(new)
        started = time.monotonic()
    took = time.monotonic() - started
    seen = set()
    for attempt, fraction in enumerate((0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.5)):
        (v / "a").write_bytes(old)
        fd = os.open(v / "b", os.O_WRONLY)
        os.write(fd, new)
        closed = threading.Event()

        def commit(fd: int = fd, closed: threading.Event = closed) -> None:
            try:
                os.close(fd)  # the commit: seal, fsync, then the in-place rewrite
            except OSError:
                pass
            closed.set()

        threading.Thread(target=commit, daemon=True).start()
        time.sleep(took * fraction)
        vault.kill9()
        closed.wait(10)
        vault.start()
        a, b = (v / "a").read_bytes(), (v / "b").read_bytes()
        assert a == b and a in (old, new), (attempt, len(a), a[:1], a[-1:])
        seen.add(a[:1])
        same_file(v / "a", v / "b", nlink=2)
        leftovers = [n for n in os.listdir(vault.store / "vault") if n.startswith((".kfs-tmp", ".kfs-redo"))]
        assert not leftovers
        assert "0 damaged" in vault.cli("vault", "verify", str(vault.path)).stdout
    assert seen  # (which of old and new each attempt got depends on the machine's speed)


def test_a_rewrite_cut_short_is_redone_at_the_next_mount(vault: Mount) -> None:
    """The on-disk state kill -9 leaves after the commit point (record written, the copy half
    done), made by hand: the next mount finishes the copy; before the commit point, the old
    contents stand."""
    v, sv = vault.path / "vault", vault.store / "vault"
    old, new = b"O" * 100_000, b"N" * 200_000
    (v / "a").write_bytes(new)
    new_cipher = store_file(vault, "a").read_bytes()
    (v / "a").write_bytes(old)
    os.link(v / "a", v / "b")
    vault.stop()
    (sv / ".kfs-redo-1").write_bytes(new_cipher)  # after the commit point ...
    os.link(sv / "a", sv / ".kfs-redo-1-target")
    with open(sv / "a", "r+b") as f:  # ... and half way through the copy
        f.write(new_cipher[:len(new_cipher) // 2])
    os.link(sv / "a", sv / ".kfs-redo-2-target")  # a rewrite that died before its commit point
    vault.start()
    assert (v / "a").read_bytes() == (v / "b").read_bytes() == new
    same_file(v / "a", v / "b", nlink=2)
    assert vault.status()["areas"]["vault"]["counters"].get("rewrites_redone") == 1
    assert sorted(os.listdir(sv)) == [".kfs-vault.json", "a", "b"]
    assert "0 damaged" in vault.cli("vault", "verify", str(vault.path)).stdout


def test_area_links_commit_in_place_and_reload_readers(tmp_path: Path) -> None:
    """The Area without FUSE: link, a commit through one name, a reader of the other."""
    import trio
    from test_vault_area import get, make_area, put

    from kfs.fs.area import Ctx

    async def main() -> None:
        area, _ = make_area(tmp_path / "vault")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await put(area, "a", b"old" * 3000)
            attr = await area.link("a", "b")
            assert attr.nlink == 2 and attr.identity is not None
            assert (await area.getattr("a")).identity == attr.identity
            reader = await area.open("a", os.O_RDONLY, Ctx())
            assert await area.read(reader, 0, 3) == b"old"
            await put(area, "b", b"new" * 5000)
            assert await area.read(reader, 0, 3) == b"new"  # reloaded: the same inode, rewritten
            await area.release(reader)
            assert await get(area, "a") == b"new" * 5000
            assert area.counters["commits_in_place"] == 1
            assert (await area.getattr("b")).identity == attr.identity  # still one store inode
            await area.unlink("a")
            assert (await area.getattr("b")).identity is None  # one name: a file is its path again
            await area.mkdir("d", 0o700, Ctx())
            for bad, code in (("d", errno.EPERM), ("missing", errno.ENOENT)):
                with pytest.raises(OSError) as e:
                    await area.link(bad, "x")
                assert e.value.errno == code
            nursery.cancel_scope.cancel()

    trio.run(main)
