"""One set of POSIX checks, run first on a plain Linux directory as the baseline and
then on kfs directories that promise normal file semantics (vault/).

Each check takes a fresh, empty directory and asserts what Linux does; where kfs
differs from the baseline, the check says so by failing on the mount only.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

CHECKS: list[Callable[[Path], None]] = []


def check(func: Callable[[Path], None]) -> Callable[[Path], None]:
    CHECKS.append(func)
    return func


def expect_errno(code: int, func: Callable[[], object]) -> None:
    with pytest.raises(OSError) as e:
        func()
    assert e.value.errno == code, f"expected {errno.errorcode[code]}, got {e.value!r}"


@check
def write_then_read_back(d: Path) -> None:
    (d / "f").write_bytes(b"hello")
    assert (d / "f").read_bytes() == b"hello"
    assert (d / "f").stat().st_size == 5


@check
def overwrite_truncates(d: Path) -> None:
    (d / "f").write_bytes(b"long contents")
    (d / "f").write_bytes(b"short")
    assert (d / "f").read_bytes() == b"short"


@check
def append_mode_appends(d: Path) -> None:
    (d / "f").write_bytes(b"a")
    with open(d / "f", "ab") as f:
        f.write(b"b")
    assert (d / "f").read_bytes() == b"ab"


@check
def pwrite_past_the_end_leaves_a_zero_hole(d: Path) -> None:
    fd = os.open(d / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x", 10)
        assert os.pread(fd, 100, 0) == b"\0" * 10 + b"x"
    finally:
        os.close(fd)


@check
def truncate_extends_with_zeros_and_shrinks(d: Path) -> None:
    (d / "f").write_bytes(b"abc")
    os.truncate(d / "f", 6)
    assert (d / "f").read_bytes() == b"abc\0\0\0"
    os.truncate(d / "f", 1)
    assert (d / "f").read_bytes() == b"a"


@check
def exclusive_create_of_an_existing_file_fails(d: Path) -> None:
    (d / "f").write_bytes(b"")
    expect_errno(errno.EEXIST, lambda: os.open(d / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL))


@check
def missing_file_is_enoent(d: Path) -> None:
    expect_errno(errno.ENOENT, lambda: os.stat(d / "nope"))
    expect_errno(errno.ENOENT, lambda: open(d / "nope", "rb"))


@check
def rename_replaces_the_target_atomically(d: Path) -> None:
    (d / "a").write_bytes(b"new")
    (d / "b").write_bytes(b"old")
    os.rename(d / "a", d / "b")
    assert (d / "b").read_bytes() == b"new"
    assert not (d / "a").exists()


@check
def directories_nest_list_and_refuse_rmdir_when_not_empty(d: Path) -> None:
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "file").write_bytes(b"x")
    assert sorted(os.listdir(d / "sub")) == ["deeper", "file"]
    expect_errno(errno.ENOTEMPTY, lambda: os.rmdir(d / "sub"))
    expect_errno(errno.EEXIST, lambda: os.mkdir(d / "sub"))
    expect_errno(errno.ENOTDIR, lambda: os.listdir(d / "sub" / "file"))
    os.rename(d / "sub", d / "moved")
    assert (d / "moved" / "file").read_bytes() == b"x"


@check
def unlink_removes_and_rmdir_removes(d: Path) -> None:
    (d / "f").write_bytes(b"x")
    (d / "dir").mkdir()
    os.unlink(d / "f")
    os.rmdir(d / "dir")
    assert os.listdir(d) == []
    expect_errno(errno.EISDIR, lambda: open(d, "wb"))


@check
def chmod_and_utime_stick(d: Path) -> None:
    (d / "f").write_bytes(b"x")
    os.chmod(d / "f", 0o640)
    os.utime(d / "f", ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(d / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 2_000_000_000


@check
def an_open_file_still_reads_after_unlink(d: Path) -> None:
    (d / "f").write_bytes(b"still here")
    with open(d / "f", "rb") as f:
        os.unlink(d / "f")
        assert f.read() == b"still here"


@check
def an_unlinked_open_file_still_fstats_after_the_attribute_cache_expires(d: Path) -> None:
    import time

    (d / "f").write_bytes(b"abc")
    with open(d / "f", "rb") as f:
        os.unlink(d / "f")
        time.sleep(1.2)  # past kfs's 1 s attribute timeout: the kernel asks the daemon again
        assert os.fstat(f.fileno()).st_size == 3
        assert f.read() == b"abc"


@check
def long_names_get_enametoolong(d: Path) -> None:
    expect_errno(errno.ENAMETOOLONG, lambda: open(d / ("x" * 256), "wb"))


@check
def stat_sees_size_and_mtime_of_a_write_through_another_descriptor(d: Path) -> None:
    # kfs lets the kernel cache attributes for long where it invalidates every change:
    # a stat taken before the write must not be what a stat after it sees
    (d / "f").write_bytes(b"abc")
    os.utime(d / "f", ns=(1_000_000_000, 1_000_000_000))
    assert os.stat(d / "f").st_size == 3
    fd = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"defg")
        assert os.stat(d / "f").st_size == 7  # before close too
    finally:
        os.close(fd)
    st = os.stat(d / "f")
    assert st.st_size == 7 and st.st_mtime_ns > 1_000_000_000
    os.truncate(d / "f", 2)
    assert os.stat(d / "f").st_size == 2 and (d / "f").read_bytes() == b"ab"


@check
def a_reopened_file_reads_what_was_last_written(d: Path) -> None:
    # read-only opens may keep the kernel's page cache: every write path must drop it
    (d / "f").write_bytes(b"1" * 9000)
    assert (d / "f").read_bytes() == b"1" * 9000
    with open(d / "f", "r+b", buffering=0) as f:
        f.seek(4096)
        f.write(b"2" * 10)
    assert (d / "f").read_bytes() == b"1" * 4096 + b"2" * 10 + b"1" * (9000 - 4106)
    (d / "g").write_bytes(b"3" * 5)
    os.rename(d / "g", d / "f")
    assert (d / "f").read_bytes() == b"33333"
    with open(d / "f", "ab") as f:
        f.write(b"4")
    assert (d / "f").read_bytes() == b"333334"


@check
def hard_links_are_one_file(d: Path) -> None:
    (d / "a").write_bytes(b"one")
    os.link(d / "a", d / "b")
    assert os.stat(d / "a").st_ino == os.stat(d / "b").st_ino and os.stat(d / "b").st_nlink == 2
    (d / "b").write_bytes(b"two")
    assert (d / "a").read_bytes() == b"two"
    wa = os.open(d / "a", os.O_WRONLY)
    wb = os.open(d / "b", os.O_WRONLY)
    try:  # two writers through two names write one file
        os.pwrite(wa, b"A", 0)
        os.pwrite(wb, b"B", 2)
    finally:
        os.close(wa)
        os.close(wb)
    assert (d / "a").read_bytes() == b"AwB"
    os.unlink(d / "a")
    assert (d / "b").read_bytes() == b"AwB" and os.stat(d / "b").st_nlink == 1
    (d / "sub").mkdir()
    expect_errno(errno.EPERM, lambda: os.link(d / "sub", d / "sub2"))
