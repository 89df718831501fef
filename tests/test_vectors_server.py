"""Chroma as a server (``chroma run``): killed in the middle of 2,000 writes, restarted, nothing lost."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount
from local_peers import free_port, kill, wait_until_listening
from test_vectors_mount import NO_WS, append, export, wait_synced

CHROMA = Path(sys.executable).parent / "chroma"


class ChromaServer:
    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "ORT_DISABLE_TELEMETRY": "1"}
        self.proc = subprocess.Popen(
            [str(CHROMA), "run", "--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_until_listening(self.proc, self.port, "chroma run", timeout=60)

    def kill(self) -> None:
        kill(self.proc)
        self.proc = None


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[ChromaServer]:
    if not CHROMA.exists():
        pytest.skip("chroma CLI not installed")
    server = ChromaServer(tmp_path / "chroma-data", free_port())
    server.start()
    yield server
    server.kill()


def server_mount(kfs_mount: Callable[..., Mount], server: ChromaServer, collection: str,
                 **config: Any) -> tuple[Mount, Path]:
    """A mount whose backend is ``server`` (streaming sync), and a new collection in it."""
    vectors = {"mode": "server", "host": "127.0.0.1", "port": server.port, "sync_mode": "streaming", **config}
    mount = kfs_mount(config={"vector_config.yaml": vectors, **NO_WS})
    col = mount.path / "vectors" / collection
    col.mkdir()
    return mount, col


def numbered(rng: random.Random, dim: int, numbers: range) -> list[dict[str, Any]]:
    """Records with random embeddings, ``metadata.n`` numbering them."""
    return [{"id": str(uuid.uuid4()), "embedding": [rng.uniform(-1, 1) for _ in range(dim)], "metadata": {"n": i}}
            for i in numbers]


@pytest.mark.slow
def test_server_killed_mid_writes_then_restarted(kfs_mount: Callable[..., Mount],
                                                  chroma_server: ChromaServer) -> None:
    mount, col = server_mount(kfs_mount, chroma_server, "remote", batch_size=200)
    records = numbered(random.Random(4), 16, range(2000))
    done = threading.Event()
    written: list[int] = []

    def writer() -> None:
        for start in range(0, 2000, 20):
            append(col / "records.jsonl", records[start:start + 20])  # must never fail: the queue is local
            written.append(start + 20)
            time.sleep(0.005)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not written or written[-1] < 700:
        time.sleep(0.02)
    chroma_server.kill()
    t.join(120)
    assert done.is_set() and written[-1] == 2000
    # The backend is down: reads of the records still see everything through the queue's side.
    st = mount.status()["areas"]["vectors"]
    assert st["queue_depth"] > 0 and st["state"].startswith("backend unavailable")
    chroma_server.start()
    wait_synced(mount, timeout=120)
    stats = json.loads((col / "collection.json").read_text())
    assert stats["count"] == 2000
    got = export(col / "records.jsonl")
    assert sorted(r["metadata"]["n"] for r in got) == list(range(2000))
    # And straight from the server, without kfs:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.HttpClient(host="127.0.0.1", port=chroma_server.port,
                                 settings=Settings(anonymized_telemetry=False))
    assert client.get_collection("remote").count() == 2000


def read_until_error(path: Path) -> tuple[bytes, int | None]:
    """Raw reads (Python retries EINTR itself): the bytes handed out, then the errno that ended it."""
    got = b""
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as e:
                return got, e.errno
            if not chunk:
                return got, None
            got += chunk
    finally:
        os.close(fd)


@pytest.mark.slow
def test_reads_while_server_down(kfs_mount: Callable[..., Mount], chroma_server: ChromaServer) -> None:
    """Server down: records.jsonl hands out the queued records, then EIO (never a silent partial
    export); search/ is EIO; collection.json and status say the backend is unreachable."""
    import errno

    mount, col = server_mount(kfs_mount, chroma_server, "down")
    rng = random.Random(5)
    applied = numbered(rng, 8, range(30))
    append(col / "records.jsonl", applied)
    wait_synced(mount)
    assert json.loads((col / "collection.json").read_text())["backend_reachable"] is True
    chroma_server.kill()
    queued = numbered(rng, 8, range(100, 107))
    append(col / "records.jsonl", queued)  # accepted: the queue is local

    data, err = read_until_error(col / "records.jsonl")
    assert err == errno.EIO
    assert sorted(json.loads(line)["metadata"]["n"] for line in data.splitlines()) == list(range(100, 107))
    _, err = read_until_error(col / "search" / json.dumps(queued[0]["embedding"]))
    assert err == errno.EIO
    stats = json.loads((col / "collection.json").read_text())
    assert stats["backend_reachable"] is False and stats["count"] is None and stats["queued_upserts"] == 7
    assert stats["last_error"]
    st = mount.status()["areas"]["vectors"]
    assert st["state"].startswith("backend unavailable") and st["queue_depth"] == 7

    chroma_server.start()
    wait_synced(mount, timeout=120)
    assert sorted(r["metadata"]["n"] for r in export(col / "records.jsonl")) == list(range(30)) + list(range(100, 107))
    stats = json.loads((col / "collection.json").read_text())
    assert stats["backend_reachable"] is True and stats["count"] == 37
