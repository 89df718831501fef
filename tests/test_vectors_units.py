"""vectors/ modules without FUSE: schema, queue, embedder, ranking, the Chroma backend."""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from snapshot_doubles import MemorySink, MemorySource
from vectors_support import JsonServer

from kfs.store import StoreDir
from kfs.vectors.backends.base import BackendError, flatten_metadata, unflatten_metadata
from kfs.vectors.queue import CollectionQueue
from kfs.vectors.schema import Record, SchemaError, check_collection_name, parse_record
from kfs.vectors.search import Query, distance, export_chunks, parse_query

AGENT = str(uuid.uuid4())


def good(**over: object) -> dict[str, object]:
    rec: dict[str, object] = {"id": str(uuid.uuid4()), "embedding": [0.1, 0.2, 0.3],
                              "metadata": {"agent_id": AGENT, "timestamp": "2025-06-21T20:55:00Z",
                                           "context": "chat", "tags": ["plan"], "extra": {"kept": 1}}}
    rec.update(over)
    return rec


def test_good_record_keeps_extra_keys() -> None:
    r = parse_record(json.dumps(good()), 3, 384)
    assert r.embedding.tolist() == [0.1, 0.2, 0.3]
    assert r.metadata["extra"] == {"kept": 1}
    assert r.metadata["agent_id"] == AGENT


def test_missing_id_is_generated_and_timestamp_added() -> None:
    r = parse_record(b'{"text": "hello"}', None, 384)
    uuid.UUID(r.id)
    assert r.metadata["timestamp"].endswith("Z")


SCHEMA_ERRORS = {
    "not json": b"{nope",
    "not an object": b"[1, 2]",
    "bad id": json.dumps(good(id="6f1c")).encode(),
    "id not a string": json.dumps(good(id=5)).encode(),
    "wrong dimension": json.dumps(good(embedding=[0.1, 0.2])).encode(),
    "empty embedding": json.dumps(good(embedding=[])).encode(),
    "string in embedding": json.dumps(good(embedding=[0.1, "x", 0.3])).encode(),
    "bool in embedding": json.dumps(good(embedding=[0.1, True, 0.3])).encode(),
    "NaN": b'{"embedding": [0.1, NaN, 0.3]}',
    "Infinity": b'{"embedding": [0.1, Infinity, 0.3]}',
    "no embedding nor text": b'{"metadata": {}}',
    "empty text": b'{"text": "  "}',
    "text not a string": b'{"text": 5}',
    "metadata not an object": json.dumps(good(metadata=[1])).encode(),
    "bad agent_id": json.dumps(good(metadata={"agent_id": "kai"})).encode(),
    "bad timestamp": json.dumps(good(metadata={"timestamp": "yesterday"})).encode(),
    "impossible date": json.dumps(good(metadata={"timestamp": "2025-02-30T10:00:00Z"})).encode(),
    "bad context": json.dumps(good(metadata={"context": "email"})).encode(),
    "tags not a list": json.dumps(good(metadata={"tags": "plan"})).encode(),
    "tags not strings": json.dumps(good(metadata={"tags": [1]})).encode(),
    "reserved metadata key": json.dumps(good(metadata={"_kfs_meta": "x"})).encode(),
    "unknown top-level key": json.dumps(good(vector=[1])).encode(),
    "delete not true": b'{"id": "6f1c0000-0000-4000-8000-000000000000", "delete": 1}',
    "delete with more": json.dumps({"id": str(uuid.uuid4()), "delete": True, "text": "x"}).encode(),
}


@pytest.mark.parametrize("line", SCHEMA_ERRORS.values(), ids=SCHEMA_ERRORS.keys())
def test_schema_errors(line: bytes) -> None:
    with pytest.raises(SchemaError):
        parse_record(line, 3, 3)


def test_text_refused_when_model_dimension_differs() -> None:
    with pytest.raises(SchemaError, match="384"):
        parse_record(b'{"text": "hello"}', 3, 384)


@pytest.mark.parametrize("name", ["agent_memory", "abc", "a.b-c_d", "A1" * 31 + "x"])
def test_good_names(name: str) -> None:
    check_collection_name(name)


@pytest.mark.parametrize("name", ["ab", "-abc", "abc-", "a..b", "a b", "a/b", ".hidden", "x" * 64, "127.0.0.1", "ünï"])
def test_bad_names(name: str) -> None:
    with pytest.raises(SchemaError):
        check_collection_name(name)


def test_query_prefix_and_vectors() -> None:
    assert parse_query("k=3 hello world", 10) == Query(3, text="hello world")
    assert parse_query("hello", 10) == Query(10, text="hello")
    assert parse_query("[1, 0]", 10).vector.tolist() == [1.0, 0.0]
    with pytest.raises(SchemaError):
        parse_query("k=0 x", 10)


def test_distances_match_chroma() -> None:
    assert distance("cosine", [1, 0], [1, 0]) == pytest.approx(0)
    assert distance("cosine", [1, 0], [0, 1]) == pytest.approx(1)
    assert distance("l2", [1, 0], [0, 1]) == pytest.approx(2)
    assert distance("ip", [1, 0], [1, 0]) == pytest.approx(0)


def test_metadata_roundtrip() -> None:
    meta = {"tags": ["a"], "nested": {"x": [1]}, "context": "doc"}
    flat = flatten_metadata(meta)
    assert flat["context"] == "doc" and "tags" not in flat
    assert unflatten_metadata(flat) == meta
    scalars = {"context": "doc", "n": 3, "x": 1.5, "ok": True, "timestamp": "2025-06-21T20:55:00Z"}
    assert flatten_metadata(scalars) == scalars  # stored once: nothing to add
    for odd in [{"n": 1 << 70}, {"n": None}, {}]:
        assert unflatten_metadata(flatten_metadata(odd)) == odd


def test_queue_replays_and_drops_torn_tail(tmp_path: Path) -> None:
    qdir = StoreDir.open(str(tmp_path / "q"))
    q = CollectionQueue(qdir, "c")
    q.load()
    q.append([Record(str(uuid.uuid4()), [1.0], None, {}) for _ in range(5)])
    q.mark_applied(2)
    q.close()
    with open(tmp_path / "q" / "c.jsonl", "ab") as f:
        f.write(b'{"seq": 6, "record": {"id": "torn')  # a crash mid-write: never acknowledged
    q2 = CollectionQueue(qdir, "c")
    q2.load()
    assert [e.seq for e in q2.pending] == [3, 4, 5]
    assert (tmp_path / "q" / "c.jsonl").read_bytes().endswith(b"\n")
    q2.append([Record(str(uuid.uuid4()), [2.0], None, {})])
    assert q2.pending[-1].seq == 6
    q2.mark_applied(6)
    q2.compact()
    q2.close()
    q3 = CollectionQueue(qdir, "c")
    q3.load()
    assert q3.pending == [] and q3.next_seq == 7


def test_embedder_offline_known_neighbours() -> None:
    from kfs.vectors.embedder import MiniLMEmbedder

    e = MiniLMEmbedder()
    vecs = e.embed(["the user prefers dark mode", "what theme does the user like", "the cat sat on the mat"])
    assert len(vecs[0]) == 384
    assert abs(sum(x * x for x in vecs[0]) - 1) < 1e-3
    assert distance("cosine", vecs[1], vecs[0]) < distance("cosine", vecs[1], vecs[2])
    # padding per batch must not change a text's vector
    alone = e.embed(["the cat sat on the mat"])[0]
    assert distance("cosine", alone, vecs[2]) < 1e-4


def make_backend(provider: str, path: Path):  # type: ignore[no-untyped-def]
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if provider == "chroma":
        from kfs.vectors.backends.chroma import ChromaBackend

        return ChromaBackend(SimpleNamespace(mode="embedded", host="", port=0), str(path))
    if provider == "milvus":
        pytest.importorskip("milvus_lite")
        from kfs.vectors.backends.milvus import MilvusBackend

        path.mkdir()
        return MilvusBackend(SimpleNamespace(mode="embedded"), str(path))
    if provider == "chroma-process":
        from kfs.vectors.backends.isolated import IsolatedBackend

        path.mkdir()  # what the mount uses: Chroma in a child process, the store reached by a descriptor
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        return IsolatedBackend("kfs.vectors.backends.chroma", "ChromaBackend",
                               SimpleNamespace(mode="embedded", host="", port=0), f"/proc/self/fd/{fd}", fd)
    if provider == "qdrant-client":
        from kfs.vectors.backends.qdrant_server import QdrantClientBackend

        path.mkdir()  # qdrant-client's local mode: the server's client API, in-process
        return QdrantClientBackend(SimpleNamespace(mode="local", host="", port=0), str(path))
    pytest.importorskip("qdrant_edge")
    from kfs.vectors.backends.qdrant import QdrantEdgeBackend

    path.mkdir()
    return QdrantEdgeBackend(SimpleNamespace(), str(path))


@pytest.mark.parametrize("provider", ["chroma", "chroma-process", "qdrant", "qdrant-client", "milvus"])
def test_backend_direct(tmp_path: Path, provider: str) -> None:
    b = make_backend(provider, tmp_path / "db")
    ids = [str(uuid.UUID(int=i + 1)) for i in range(3)]
    b.ensure_collection("col", "cosine", None)
    b.upsert("col", ids[:2], [[1, 0], [0, 1]], [{"tags": ["x"]}, {}], ["doc a", None])
    b.upsert("col", ids[:1], [[1, 0.1]], [{"tags": ["y"]}], ["doc a2"])  # idempotent by id
    assert b.count("col") == 2
    got = b.query("col", [1, 0], 1)
    assert got[0].id == ids[0] and got[0].metadata == {"tags": ["y"]} and got[0].document == "doc a2"
    assert got[0].distance == pytest.approx(distance("cosine", [1, 0], [1, 0.1]), abs=1e-4)
    page, cursor = b.page("col", None, 1)
    rest, end = b.page("col", cursor, 10)
    assert end is None and {r.id for r in page + rest} == set(ids[:2])
    b.delete("col", [ids[1]])
    assert b.count("col") == 1
    assert b.list_collections() == ["col"]
    b.drop_collection("col")
    b.drop_collection("col")  # already gone: fine
    assert b.list_collections() == []
    b.close()


def test_backend_process_killed_is_restarted(tmp_path: Path) -> None:
    """The child that runs Chroma dies (OOM killer, a stray kill): the call in flight fails with
    BackendError (the sync agent retries), the next one starts a new child on the same data."""
    import signal

    b = make_backend("chroma-process", tmp_path / "db")
    ids = [str(uuid.UUID(int=i + 1)) for i in range(2)]
    b.ensure_collection("col", "cosine", None)
    b.upsert("col", ids, [[1, 0], [0, 1]], [{}, {}], [None, None])
    os.kill(b._proc.pid, signal.SIGKILL)
    with pytest.raises(BackendError):
        b.count("col")
    assert b.count("col") == 2
    b.close()
    b.close()  # twice: harmless


def test_backend_process_searches_between_upsert_slices(tmp_path: Path) -> None:
    """The searches channel, awaited by trio: answered between slices of an upsert running on the
    calls channel (not after it), with the query text embedded in the child; after the child dies
    it says ChannelUnavailable (the area then takes the calls channel, which starts a new child)."""
    import signal
    import threading

    import trio

    from kfs.vectors.backends.isolated import READ_SLICE, ChannelUnavailable

    b = make_backend("chroma-process", tmp_path / "db")
    rng = random.Random(3)
    b.ensure_collection("col", "cosine", None)
    b.upsert("col", ["near"], [[1.0] + [0.0] * 383], [{"k": 1}], ["near"])
    n = READ_SLICE * 6
    ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
    vectors = [[rng.uniform(-1, 1) for _ in range(384)] for _ in ids]
    upsert = threading.Thread(target=b.upsert, args=("col", ids, vectors, [{}] * n, ["x " * 500] * n))

    async def searches() -> tuple[int, list[Any]]:
        vector, _, found = await b.asearch("col", [1.0] + [0.0] * 383, None, 1, 384, None, [])
        assert found[0].id == "near"
        upsert.start()
        await trio.sleep(0.05)  # the upsert is under way (its first slice alone takes longer)
        during, last = 0, []
        while upsert.is_alive():
            vector, text_vectors, last = await b.asearch("col", None, "the cat sat", 2, 384, "all-MiniLM-L6-v2",
                                                         ["a queued record's text"])
            during += upsert.is_alive()
        return during, [vector, text_vectors, last]

    during, (vector, text_vectors, last) = trio.run(searches)
    assert during >= 2  # a search waits for one slice, not for the whole upsert
    assert len(vector) == 384 and len(text_vectors) == 1 and len(last) == 2
    assert b.count("col") == n + 1

    async def after_death() -> None:
        os.kill(b._proc.pid, signal.SIGKILL)
        with pytest.raises(ChannelUnavailable):
            await b.asearch("col", [1.0] + [0.0] * 383, None, 1, 384, None, [])

    trio.run(after_death)
    with pytest.raises(BackendError):  # the calls channel notices too, and restarts the child
        b.count("col")
    assert b.count("col") == n + 1
    b.close()


@pytest.mark.parametrize("provider", ["chroma", "qdrant", "qdrant-client"])
def test_snapshot_export_and_restore(tmp_path: Path, provider: str) -> None:
    """export_state/restore_state of the area, in-process (no FUSE)."""
    if provider == "qdrant":
        pytest.importorskip("qdrant_edge")
    import trio

    from kfs.bus import Bus
    from kfs.config import VectorConfig
    from kfs.fs.area import Ctx
    from kfs.vectors.area import VectorsArea

    def area_at(path: Path) -> VectorsArea:
        backend = {"provider": "qdrant", "mode": "local"} if provider == "qdrant-client" else {"provider": provider}
        cfg = VectorConfig(**backend, sync_interval=3600.0)  # type: ignore[arg-type]
        return VectorsArea(Bus(), StoreDir.open(str(path)), cfg)

    sink = MemorySink()
    ids = [str(uuid.UUID(int=i + 1)) for i in range(3)]

    async def take() -> None:
        area = area_at(tmp_path / "one")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await area.mkdir("mem", 0o755, Ctx())
            records = [Record(i, [float(n), 1.0], None, {"n": n}) for n, i in enumerate(ids)]
            await area._accept_records(area.collections["mem"], records)
            await area.ready.wait()
            await area.sync.sync_all(drain=True)
            await area._accept_records(area.collections["mem"], [Record(ids[0], delete=True)])  # still queued
            await area.export_state(sink, {"type": "full"})
            await area.stop()
            nursery.cancel_scope.cancel()

    async def restore() -> list[dict[str, object]]:
        area = area_at(tmp_path / "two")
        async with trio.open_nursery() as nursery:
            await area.start(nursery)
            await area.mkdir("stale", 0o755, Ctx())
            changed = await area.restore_state(MemorySource(sink.files))
            assert "mem" in changed and "stale" in changed
            await area.ready.wait()
            await area.sync.sync_all(drain=True)
            assert sorted(area.collections) == ["mem"]
            data = await trio.to_thread.run_sync(lambda: b"".join(export_chunks(area.backend, "mem", {}, True)))
            await area.stop()
            nursery.cancel_scope.cancel()
            return [json.loads(line) for line in data.splitlines()]

    trio.run(take)
    assert json.loads(sink.files["mem/settings.json"])["dimension"] == 2
    assert len(sink.files["mem/records.jsonl"].splitlines()) == 2
    restored = trio.run(restore)
    assert sorted(r["id"] for r in restored) == ids[1:]
    assert {r["metadata"]["n"] for r in restored} == {1, 2}


def test_endpoint_embedder_openai_compatible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real HTTP server on 127.0.0.1 speaking the OpenAI embeddings API."""
    from kfs.vectors.embedder import EmbedderError, make_embedder

    seen: list[tuple[str | None, dict[str, object]]] = []

    def embeddings(method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        seen.append((headers.get("Authorization"), body))
        rows = [{"index": i, "embedding": [float(len(t)), 1.0, 0.0]} for i, t in enumerate(body["input"])]
        return 200, {"data": list(reversed(rows)), "model": body["model"]}

    with JsonServer(embeddings) as server:
        key_file = tmp_path / "key.json"
        key_file.write_text('{"api_key": "sk-test"}')
        monkeypatch.delenv("KFS_EMBEDDING_API_KEY", raising=False)
        config = SimpleNamespace(embedding_model="text-embedding-ada-002", dimension=3,
                                 embedding_endpoint=server.address("/v1/embeddings"),
                                 embedding_api_key_secret=str(key_file))
        embedder = make_embedder(config)
        assert embedder.embed(["ab", "abcd"]) == [[2.0, 1.0, 0.0], [4.0, 1.0, 0.0]]  # ordered by index
        assert seen[0] == ("Bearer sk-test", {"model": "text-embedding-ada-002", "input": ["ab", "abcd"]})
        monkeypatch.setenv("KFS_EMBEDDING_API_KEY", "sk-env")
        make_embedder(config).embed(["x"])
        assert seen[1][0] == "Bearer sk-env"
    with pytest.raises(EmbedderError):
        make_embedder(config).embed(["down"])  # the server is gone: the sync agent retries later


@pytest.mark.parametrize("yaml_text, words", [
    ("search_k: 0\n", "search_k"), ("batch_size: 0\n", "batch_size"), ("sync_mode: sometimes\n", "sync_mode"),
    ("distance: hamming\n", "distance"), ("memory_sync: [{collection: x, colour: red}]\n", "colour"),
    ("provider: pinecone\n", "provider"), ("mode: local\n", "mode"),
    ("embedding_endpoint: http://127.0.0.1:9/v1/embeddings\n", "dimension"),
    ("embedding_api_key: sk-in-the-config\n", "embedding_api_key"), ("provider: qdrant\napi_key: k\n", "api_key"),
])
def test_config_errors_are_one_line(tmp_path: Path, yaml_text: str, words: str) -> None:
    from kfs.config import ConfigError, load_config

    (tmp_path / "vector_config.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert "vector_config.yaml" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
