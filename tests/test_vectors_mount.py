"""vectors/ through a real mount: collections, records, search, schema errors, crashes."""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount

from kfs.cli import live_call

FAST = {"sync_interval": "300ms", "batch_size": 500}
HELD = {"sync_interval": "1h", "batch_size": 100_000}  # nothing reaches the backend until umount


# The WebSocket broker's fixed port would collide with other mounts running at the same time.
NO_WS = {"streams.yaml": {"websocket": {"enabled": False}}}


#: test ids that are not a provider's name: qdrant-client's local mode runs the server backend's code
PROVIDER_CONFIG: dict[str, dict[str, Any]] = {"qdrant-client": {"provider": "qdrant", "mode": "local"}}


def vec_config(provider: str = "chroma", **over: Any) -> dict[str, dict[str, Any]]:
    backend = PROVIDER_CONFIG.get(provider, {"provider": provider})
    return {"vector_config.yaml": {**backend, **FAST, **over}, **NO_WS}


@pytest.fixture(params=["chroma", "qdrant", "qdrant-client", "milvus"])
def provider(request: pytest.FixtureRequest) -> str:
    """The same suite for every backend: Chroma, qdrant-edge, Milvus Lite (embedded), and the Qdrant
    server backend (qdrant-client) in qdrant-client's local mode (no Qdrant server installs here)."""
    if request.param == "qdrant":
        pytest.importorskip("qdrant_edge")
    if request.param == "milvus":
        pytest.importorskip("milvus_lite")
    return str(request.param)


def append(path: Path, lines: list[dict[str, Any]] | list[bytes]) -> None:
    """One write() of all the lines, on an O_APPEND descriptor."""
    data = b"".join(x if isinstance(x, bytes) else json.dumps(x).encode() + b"\n" for x in lines)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def export(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def search(col: Path, query: str) -> list[dict[str, Any]]:
    out = subprocess.run(["cat", str(col / "search" / query)], capture_output=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def wait_synced(mount: Mount, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = mount.status()["areas"]["vectors"]
        if st["queue_depth"] == 0 and st["state"] == "ready":
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def record(dim: int, rng: random.Random, **meta: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "embedding": [rng.uniform(-1, 1) for _ in range(dim)],
            "metadata": {"context": "workflow", "tags": ["t"], **meta}}


def test_upsert_and_export_5000(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider, batch_size=1000))
    col = mount.path / "vectors" / "bulk"
    col.mkdir()
    rng = random.Random(1)
    records = [record(16, rng, n=i) for i in range(5000)]
    for start in range(0, 5000, 250):
        append(col / "records.jsonl", records[start:start + 250])
    # Read-your-writes: part of it may still be queued.
    got = export(col / "records.jsonl")
    assert len(got) == 5000 and len({r["id"] for r in got}) == 5000
    wait_synced(mount)
    got = {r["id"]: r for r in export(col / "records.jsonl")}
    assert len(got) == 5000
    for r in records[::97]:
        g = got[r["id"]]
        assert g["metadata"]["n"] == r["metadata"]["n"] and g["metadata"]["tags"] == ["t"]
        assert g["embedding"] == pytest.approx(r["embedding"], abs=1e-6)
    stats = json.loads((col / "collection.json").read_text())
    assert stats["count"] == 5000 and stats["dimension"] == 16 and stats["queue_depth"] == 0
    assert provider in stats["backend"]


def test_vector_search_known_neighbours(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider))
    col = mount.path / "vectors" / "axes"
    col.mkdir()
    ids = [str(uuid.uuid4()) for _ in range(4)]
    axes = [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)]
    append(col / "records.jsonl", [{"id": ids[i], "embedding": axes[i], "text": f"axis {i}"} for i in range(4)])
    for i in range(4):
        res = search(col, json.dumps([0.05 if j != i else 1.0 for j in range(4)]))
        assert res[0]["id"] == ids[i] and res[0]["document"] == f"axis {i}"
        assert res[0]["distance"] < res[1]["distance"]
        assert len(res) == 4
    wait_synced(mount)
    res = search(col, "k=2 [0.9, 0.8, 0, 0]")
    assert [r["id"] for r in res] == [ids[0], ids[1]]
    # A queued update moves a record: search ranks the backend's answer with the queue's.
    append(col / "records.jsonl", [{"id": ids[3], "embedding": [0.9, 0.81, 0, 0]}])
    res = search(col, "k=2 [0.9, 0.8, 0, 0]")
    assert res[0]["id"] == ids[3]
    with pytest.raises(OSError) as e:
        (col / "search" / "[1, 0]").read_bytes()  # wrong dimension
    assert e.value.errno == errno.EINVAL


def test_text_search_known_neighbours(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider))
    col = mount.path / "vectors" / "agent_memory"
    col.mkdir()
    texts = ["the user prefers dark mode", "the cat sat on the mat", "deploy the service on friday",
             "the invoice is due next week"]
    append(col / "records.jsonl", [{"text": t, "metadata": {"context": "chat"}} for t in texts])
    res = search(col, "what theme does the user like")
    assert res[0]["document"] == "the user prefers dark mode"
    assert res[0]["metadata"]["context"] == "chat"
    wait_synced(mount)
    assert search(col, "k=1 a kitten on a rug")[0]["document"] == "the cat sat on the mat"
    assert search(col, "k=1 release to production")[0]["document"] == "deploy the service on friday"
    assert len(search(col, "k=3 anything")) == 3
    out = mount.cli("vectors", "query", "agent_memory", "--text", "billing payment", "-k", "1", str(mount.path))
    assert json.loads(out.stdout)["document"] == "the invoice is due next week"


def test_schema_errors_store_nothing(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider))
    col = mount.path / "vectors" / "strict"
    col.mkdir()
    good = {"id": str(uuid.uuid4()), "embedding": [0.1, 0.2, 0.3],
            "metadata": {"agent_id": str(uuid.uuid4()), "timestamp": "2025-06-21T20:55:00Z",
                         "context": "chat", "tags": ["plan"], "mine": {"x": 1}}}
    append(col / "records.jsonl", [good])
    bad_lines = [
        b"{nope", b"[1]", b'{"id": "6f1c", "embedding": [1, 2, 3]}', b'{"embedding": [1, 2]}',
        b'{"embedding": [1, NaN, 3]}', b'{"embedding": [1, "2", 3]}', b'{"metadata": {}}',
        b'{"embedding": [1, 2, 3], "metadata": {"agent_id": "kai"}}',
        b'{"embedding": [1, 2, 3], "metadata": {"timestamp": "last tuesday"}}',
        b'{"embedding": [1, 2, 3], "metadata": {"context": "email"}}',
        b'{"embedding": [1, 2, 3], "metadata": {"tags": "plan"}}',
        b'{"embedding": [1, 2, 3], "metadata": [1]}', b'{"embedding": [1, 2, 3], "vector": 1}',
        b'{"text": "384 dimensions do not fit a 3-dimensional collection"}',
    ]
    for bad in bad_lines:
        with pytest.raises(OSError) as e:
            # a good line in the same write is not stored either: the write fails whole
            append(col / "records.jsonl", [json.dumps(good | {"id": str(uuid.uuid4())}).encode() + b"\n",
                                           bad + b"\n"])
        assert e.value.errno == errno.EINVAL, bad
    got = export(col / "records.jsonl")
    assert [r["id"] for r in got] == [good["id"]]
    assert got[0]["metadata"]["mine"] == {"x": 1}
    # the shell sees the error too
    r = subprocess.run(["bash", "-c", f"echo '{{\"embedding\": [1]}}' >> {col / 'records.jsonl'}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr


def test_collections_are_directories(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider))
    vectors = mount.path / "vectors"
    for bad in ["ab", "a..b", "-x-", "has space", "127.0.0.1"]:
        with pytest.raises(OSError) as e:
            (vectors / bad).mkdir()
        assert e.value.errno == errno.EINVAL
    (vectors / "one").mkdir()
    (vectors / "two.2").mkdir()
    with pytest.raises(FileExistsError):
        (vectors / "one").mkdir()
    assert sorted(os.listdir(vectors)) == ["one", "two.2"]
    assert sorted(os.listdir(vectors / "one")) == ["collection.json", "records.jsonl", "search"]
    rid = str(uuid.uuid4())
    append(vectors / "one" / "records.jsonl", [{"id": rid, "embedding": [1, 0]}, {"embedding": [0, 1]}])
    with pytest.raises(PermissionError):
        (vectors / "one" / "records.jsonl").unlink()
    with pytest.raises(PermissionError):
        open(vectors / "one" / "records.jsonl", "w").close()  # O_TRUNC
    with pytest.raises(OSError):
        (vectors / "one" / "other.txt").write_text("x")
    append(vectors / "one" / "records.jsonl", [{"id": rid, "delete": True}])
    assert len(export(vectors / "one" / "records.jsonl")) == 1
    wait_synced(mount)
    assert len(export(vectors / "one" / "records.jsonl")) == 1
    (vectors / "one").rmdir()
    assert os.listdir(vectors) == ["two.2"]
    (vectors / "one").mkdir()  # a new, empty collection of the same name
    assert export(vectors / "one" / "records.jsonl") == []
    wait_synced(mount)
    out = mount.cli("vectors", "ls", str(mount.path), "--json")
    assert sorted(c["name"] for c in json.loads(out.stdout)) == ["one", "two.2"]
    bad = mount.cli("vectors", "query", "nope", str(mount.path), "--text", "x", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_read_your_writes_while_queued(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider, **HELD))
    col = mount.path / "vectors" / "held"
    col.mkdir()
    rng = random.Random(2)
    records = [record(8, rng) for _ in range(300)]
    append(col / "records.jsonl", records)
    append(col / "records.jsonl", [{"id": records[0]["id"], "delete": True}])
    st = mount.status()["areas"]["vectors"]
    assert st["queue_depth"] == 301
    stats = json.loads((col / "collection.json").read_text())
    assert stats["queue_depth"] == 301 and stats["queued_upserts"] == 299 and stats["queued_deletes"] == 1
    assert len(export(col / "records.jsonl")) == 299
    target = records[5]
    assert search(col, "k=1 " + json.dumps([round(x, 4) for x in target["embedding"]]))[0]["id"] == target["id"]
    mount.stop()  # umount drains the queue into Chroma
    mount.start()
    st = mount.status()["areas"]["vectors"]
    assert st["queue_depth"] == 0
    assert len(export(col / "records.jsonl")) == 299
    assert json.loads((col / "collection.json").read_text())["count"] == 299


def test_searches_run_while_a_batch_is_applied(kfs_mount: Callable[..., Mount]) -> None:
    """Embedded Chroma in its child process: a search is answered between slices of the sync
    agent's upsert (not after the whole batch), and still ranks the batch's records, which stay
    in the queue until the upsert returns (read-your-writes)."""
    batch = 4000
    mount = kfs_mount(config=vec_config("chroma", sync_interval="1h", batch_size=batch))
    col = mount.path / "vectors" / "busy"
    col.mkdir()
    rng = random.Random(5)
    filler = " ".join(rng.choice("alpha beta gamma delta epsilon zeta eta theta".split()) for _ in range(150))
    records = [{**record(8, rng), "text": f"{i} {filler}"} for i in range(batch)]
    target = records[batch // 2]
    query = "k=3 " + json.dumps([round(x, 4) for x in target["embedding"]])
    for i in range(0, batch, 200):  # the last write fills the batch: the agent starts applying it
        append(col / "records.jsonl", records[i:i + 200])
    status = functools.partial(live_call, str(mount.path), "vectors.status")
    deadline = time.monotonic() + 60
    while not status()["applying"]:
        assert status()["applied"] == 0 and time.monotonic() < deadline, "the batch never started"
        time.sleep(0.005)
    during = 0
    while True:
        found = search(col, query)
        assert found[0]["id"] == target["id"] and found[0]["distance"] < 1e-3
        if not status()["applying"]:
            break
        during += 1
    st = status()
    # Answered while the batch was still being applied, more than once: not queued behind it.
    assert during >= 2, st
    wait_synced(mount)
    assert search(col, query)[0]["id"] == target["id"]


def test_kill9_mid_batch_loses_and_duplicates_nothing(kfs_mount: Callable[..., Mount], provider: str) -> None:
    mount = kfs_mount(config=vec_config(provider, sync_interval="200ms", batch_size=100))
    col = mount.path / "vectors" / "crash"
    col.mkdir()
    rng = random.Random(3)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            batch = [record(32, rng) for _ in range(20)]
            try:
                append(col / "records.jsonl", batch)
            except OSError:
                return  # the daemon died under us: this write was not acknowledged
            acknowledged.extend(r["id"] for r in batch)

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 800 and time.monotonic() < deadline:
        time.sleep(0.05)
    mount.kill9()
    stop.set()
    t.join(30)
    assert len(acknowledged) >= 800
    mount.start()
    got = export(col / "records.jsonl")
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "duplicates"
    assert set(acknowledged) <= set(ids)
    wait_synced(mount)
    ids = [r["id"] for r in export(col / "records.jsonl")]
    assert len(ids) == len(set(ids)) and set(acknowledged) <= set(ids)
    assert json.loads((col / "collection.json").read_text())["count"] == len(ids)


def test_memory_sync_embeds_chat_log_lines(kfs_mount: Callable[..., Mount]) -> None:
    """Bus to queue mapping: the same for every backend, so tested on the default one."""
    config = vec_config("chroma", memory_sync=[{"collection": "agent_memory", "match": {"context": "chat"},
                                      "text_field": "message"}])
    mount = kfs_mount(config=config)
    log = mount.path / "logs" / "kai.log.jsonl"
    try:
        os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        append(log, [{"context": "chat", "message": "the user prefers dark mode"},
                     {"context": "workflow", "message": "build started"},
                     {"context": "chat", "message": "the user lives in Lisbon"}])
    except OSError as e:
        pytest.skip(f"logs/ does not accept lines here: {e}")
    col = mount.path / "vectors" / "agent_memory"
    deadline = time.monotonic() + 30
    while not col.exists() or len(export(col / "records.jsonl")) < 2:
        assert time.monotonic() < deadline, "memory sync did not happen"
        time.sleep(0.2)
    docs = sorted(r["text"] for r in export(col / "records.jsonl"))
    assert docs == ["the user lives in Lisbon", "the user prefers dark mode"]
    assert search(col, "k=1 which city")[0]["document"] == "the user lives in Lisbon"
