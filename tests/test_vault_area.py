"""vault/'s Area object without FUSE: snapshot hooks (ciphertext only, atomic restore), lock rules."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from snapshot_doubles import DirSink, DirSource

from kfs.bus import Bus, Event
from kfs.config import VaultConfig
from kfs.fs.area import Ctx
from kfs.store import StoreDir
from kfs.vault import keyfile
from kfs.vault.area import VaultArea


class Opts:
    def __init__(self, passphrase: bytes | None) -> None:
        self.passphrase = bytearray(passphrase) if passphrase else None


def make_area(store_path: Path, passphrase: bytes | None = b"pw") -> tuple[VaultArea, list[Event]]:
    store = StoreDir.open(str(store_path))
    if passphrase and not store.exists(".kfs-vault.json"):
        kf, _master = keyfile.KeyFile.create(passphrase, 1000)
        keyfile.save(store, kf)
    bus = Bus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return VaultArea(bus, store, VaultConfig(chunk_size=4096), Opts(passphrase)), seen


async def put(area: VaultArea, path: str, data: bytes) -> None:
    handle = await area.create(path, 0o644, os.O_WRONLY | os.O_TRUNC, Ctx())
    await area.write(handle, 0, data)
    await area.release(handle)


async def get(area: VaultArea, path: str) -> bytes:
    handle = await area.open(path, os.O_RDONLY, Ctx())
    try:
        return await area.read(handle, 0, 1 << 24)
    finally:
        await area.release(handle)


def test_snapshot_holds_ciphertext_and_restore_is_atomic(tmp_path: Path) -> None:
    async def main() -> None:
        area, seen = make_area(tmp_path / "vault")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await area.mkdir("team", 0o700, Ctx())
            await put(area, "a.json", b'{"key":"PLAINTEXT-A"}')
            await put(area, "team/b.json", b"PLAINTEXT-B" * 1000)
            sink = DirSink(tmp_path / "snap")
            await area.export_state(sink, {"type": "full"})
            assert sorted(sink.compressed) == [".kfs-vault.json", "a.json", "team/b.json"]
            assert not any(sink.compressed.values())
            for f in (tmp_path / "snap").rglob("*"):
                if f.is_file():
                    assert b"PLAINTEXT" not in f.read_bytes()
            # change everything, then restore
            await put(area, "a.json", b"changed")
            await area.unlink("team/b.json")
            await put(area, "new.json", b"added after the snapshot")
            changed = await area.restore_state(DirSource(tmp_path / "snap"))
            assert set(changed) == {"a.json", "team/b.json", "new.json"}
            assert any(e.topic == "vault_locked" and e.data["reason"] == "restore" for e in seen)
            await area.control("unlock", {"passphrase": "pw"})
            assert await get(area, "a.json") == b'{"key":"PLAINTEXT-A"}'
            assert await get(area, "team/b.json") == b"PLAINTEXT-B" * 1000
            assert [n for n, _ in await area.readdir("")] == ["a.json", "team"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_restore_interrupted_after_its_plan_is_rolled_forward(tmp_path: Path) -> None:
    async def main() -> None:
        area, _ = make_area(tmp_path / "vault")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await put(area, "s", b"old")
            await put(area, "gone", b"deleted by the restore")
            blob_new = tmp_path / "new"
            await put(area, "s", b"new")
            shutil.copy(tmp_path / "vault" / "s", blob_new)
            await put(area, "s", b"old")
            nursery.cancel_scope.cancel()
        # a restore died mid-swap: its plan is written, nothing moved yet
        stage = tmp_path / "vault" / ".kfs-restore-dead"
        stage.mkdir()
        shutil.copy(blob_new, stage / "0")
        (stage / "plan.json").write_text(json.dumps({"moves": [["0", "s"]], "delete": ["gone"]}))
        # and one died while staging: no plan, discarded
        (tmp_path / "vault" / ".kfs-restore-early").mkdir()
        (tmp_path / "vault" / ".kfs-restore-early" / "0").write_bytes(b"partial")
        again, _ = make_area(tmp_path / "vault")
        async with trio.open_nursery() as nursery:
            await again.start(nursery)
            assert await get(again, "s") == b"new"
            assert [n for n, _ in await again.readdir("")] == ["s"]
            assert sorted(os.listdir(tmp_path / "vault")) == [".kfs-vault.json", "s"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_locked_area_lists_but_refuses_contents(tmp_path: Path) -> None:
    async def main() -> None:
        area, seen = make_area(tmp_path / "vault")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await put(area, "s", b"12345")
            await area.control("lock", {})
            assert [(n, a.size) for n, a in await area.readdir("")] == [("s", 5)]
            with pytest.raises(OSError) as err:
                await area.open("s", os.O_RDONLY, Ctx())
            assert err.value.errno == errno.EACCES
            with pytest.raises(OSError) as err:
                await area.create("t", 0o600, os.O_WRONLY, Ctx())
            assert err.value.errno == errno.EACCES
            with pytest.raises(Exception, match="wrong vault passphrase"):
                await area.control("unlock", {"passphrase": "nope"})
            assert area.status()["unlock_failures"] == 1
            assert [e.topic for e in seen][-2:] == ["vault_locked", "vault_unlock_failed"]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_rename_and_unlink_under_an_open_writer(tmp_path: Path) -> None:
    async def main() -> None:
        area, _ = make_area(tmp_path / "vault")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await area.mkdir("d", 0o700, Ctx())
            handle = await area.create("d/f", 0o600, os.O_WRONLY, Ctx())
            await area.write(handle, 0, b"written before the rename")
            await area.rename("d", "e", 0)
            await area.write(handle, 0, b"W")
            await area.release(handle)
            assert await get(area, "e/f") == b"Written before the rename"
            handle = await area.open("e/f", os.O_WRONLY, Ctx())
            await area.write(handle, 0, b"lost with the name")
            await area.unlink("e/f")
            await area.release(handle)
            assert await area.readdir("e") == []
            assert os.listdir(tmp_path / "vault" / "e") == []
            nursery.cancel_scope.cancel()

    trio.run(main)


def _run_on_terminal(args: list[str], answers: list[bytes], cwd: str) -> tuple[int, str]:
    """Run ``python -m kfs ARGS`` on a real pseudo-terminal, answering each prompt in turn."""
    import pty
    import select
    import sys

    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.chdir(cwd)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KFS_VAULT")}
        os.execve(sys.executable, [sys.executable, "-m", "kfs", *args], env)
    output = b""
    pending = list(answers)
    while True:
        ready, _, _ = select.select([fd], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if pending and chunk.rstrip().endswith((b":", b"]")):
            os.write(fd, pending.pop(0) + b"\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_init_on_a_terminal_asks_twice(tmp_path: Path) -> None:
    repo = str(Path(__file__).resolve().parent.parent)
    code, out = _run_on_terminal(["vault", "init", "--store", str(tmp_path / "s")], [b"one", b"two"], repo)
    assert code == 1 and "do not match" in out
    assert not (tmp_path / "s" / "vault" / ".kfs-vault.json").exists()
    code, out = _run_on_terminal(["vault", "init", "--store", str(tmp_path / "s")], [b"same", b"same"], repo)
    assert code == 0, out
    kf = keyfile.load(StoreDir.open(str(tmp_path / "s" / "vault")))
    assert kf is not None and kf.unwrap(b"same")


class KernelRecorder:
    """A KernelCache that records what the area asks of the kernel (no FUSE here)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def invalidate(self, area: str, path: str, attr_only: bool = False) -> None:
        self.calls.append(("invalidate", path, attr_only))

    def invalidate_entry(self, area: str, parent: str, name: str) -> None:
        self.calls.append(("entry", parent, name))

    def store(self, area: str, path: str, offset: int, data: Any) -> None:
        self.calls.append(("store", path, offset, bytes(data)))


def test_reads_fill_the_page_cache_only_while_nothing_changed(tmp_path: Path) -> None:
    async def main() -> None:
        area, _ = make_area(tmp_path / "vault")  # 4 KiB chunks
        kernel = KernelRecorder()
        area.kernel = kernel
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            data = os.urandom(4096 * 6 + 100)
            await put(area, "f", data)
            # 4 KiB chunks: a page-sized read leaves nothing of its chunk to push
            handle = await area.open("f", os.O_RDONLY, Ctx())
            assert await area.read(handle, 4096, 4096) == data[4096:8192]
            # the first read of a chunk only remembers it (a cold pass gains nothing from a push)
            assert await area.read(handle, 8192, 1000) == data[8192:9192]
            assert not [c for c in kernel.calls if c[0] == "store"]
            # coming back to a chunk after it left the handle's small cache: the rest is pushed
            for index in (0, 1, 3, 4, 5):
                await area.read(handle, index * 4096, 100)
            assert await area.read(handle, 8192 + 1000, 1000) == data[9192:10192]
            stores = [c for c in kernel.calls if c[0] == "store"]
            assert stores == [("store", "f", 8192, data[8192:9192]), ("store", "f", 10192, data[10192:12288])]
            assert await area.read(handle, 8192, 1000) == data[8192:9192]  # cached: no second push
            assert len([c for c in kernel.calls if c[0] == "store"]) == 2
            # a change anywhere (here a commit to the same file) stops older handles pushing:
            # their snapshot may be older than what the page cache must hold
            await put(area, "f", b"new")
            kernel.calls.clear()
            assert await area.read(handle, 0, 10) == data[:10]  # still its snapshot
            assert not [c for c in kernel.calls if c[0] == "store"]
            await area.release(handle)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_lock_drops_decrypted_chunks_and_invalidates_every_file(tmp_path: Path) -> None:
    async def main() -> None:
        area, _ = make_area(tmp_path / "vault")
        kernel = KernelRecorder()
        area.kernel = kernel
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await area.mkdir("d", 0o700, Ctx())
            await put(area, "d/a", b"secret-a" * 100)
            await put(area, "b", b"secret-b")
            handle = await area.open("b", os.O_RDONLY, Ctx())
            assert await area.read(handle, 0, 100) == b"secret-b"
            assert handle.view is not None and handle.view.source._cache  # decrypted chunk kept
            kernel.calls.clear()
            await area.control("lock", {})
            assert not handle.view.source._cache
            assert {c[1] for c in kernel.calls if c[0] == "invalidate" and not c[2]} == {"d/a", "b"}
            with pytest.raises(PermissionError):
                await area.read(handle, 0, 100)
            await area.control("unlock", {"passphrase": "pw"})
            assert await area.read(handle, 0, 100) == b"secret-b"
            await area.release(handle)
            nursery.cancel_scope.cancel()

    trio.run(main)
