"""The embedding endpoint's API key read from the vault, through the bus (no area imports another).

Unit tier: secret references, ``bus.provide``/``bus.request``.  Mount tier: a real kfs with a
vault, a real OpenAI-compatible HTTP server on 127.0.0.1 that checks the Bearer key, the key
written into ``vault/openai.json`` through the mount; locking the vault keeps records queued.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount
from test_vectors_mount import NO_WS, append, export, search, wait_synced
from vectors_support import JsonServer

from kfs.bus import Bus, NoProvider
from kfs.vectors.embedder import ApiKeyUnavailable, key_source
from kfs.vectors.secrets import VAULT_SERVICE, SecretReader, SecretRef, SecretUnavailable

PASS = "correct horse battery staple"
KEY = "sk-vault-" + uuid.uuid4().hex
VOCAB = ["dark", "cat", "deploy", "invoice"]


# ------------------------------------------------------------------ unit tier
def test_secret_refs_parse() -> None:
    assert SecretRef.parse("vault:openai.json#api_key") == SecretRef("vault", "openai.json", "api_key")
    assert SecretRef.parse("vault:keys/openai") == SecretRef("vault", "keys/openai", None)
    assert SecretRef.parse("env:OPENAI_API_KEY") == SecretRef("env", "OPENAI_API_KEY", None)
    assert SecretRef.parse("file:/etc/kfs/k.json#key") == SecretRef("file", "/etc/kfs/k.json", "key")
    for bad in ["openai.json", "vault:", "ftp:x", ""]:
        with pytest.raises(ValueError):
            SecretRef.parse(bad)


def test_bus_request_reply() -> None:
    bus = Bus()
    with pytest.raises(NoProvider) as e:
        bus.request("vault.read_secret", path="x")
    assert isinstance(e.value, LookupError) and "vault.read_secret" in str(e.value)
    unregister = bus.provide("echo", lambda **args: args)
    with pytest.raises(ValueError):
        bus.provide("echo", lambda **args: None)  # one provider per service
    assert bus.request("echo", a=1) == {"a": 1}
    unregister()
    unregister()  # twice: harmless
    with pytest.raises(NoProvider):
        bus.request("echo")


def test_secret_reader_maps_vault_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = Bus()
    files = {"openai.json": b'{"api_key": "sk-1", "n": 2}\n', "bare": b"sk-bare\n"}
    locked = False

    def read_secret(path: str) -> bytes:
        if locked:
            raise PermissionError(errno.EACCES, "the vault is locked")
        if path not in files:
            raise FileNotFoundError(errno.ENOENT, "no such vault file", path)
        return files[path]

    bus.provide(VAULT_SERVICE, read_secret)
    reader = SecretReader(bus)
    assert reader.read(SecretRef.parse("vault:openai.json#api_key")) == "sk-1"
    assert reader.read(SecretRef.parse("vault:bare")) == "sk-bare"
    for ref in ["vault:openai.json#n", "vault:openai.json#nope", "vault:bare#api_key", "vault:absent"]:
        with pytest.raises(SecretUnavailable) as e:
            reader.read(SecretRef.parse(ref))
        assert not e.value.locked
    locked = True
    with pytest.raises(SecretUnavailable) as e:
        reader.read(SecretRef.parse("vault:openai.json#api_key"))
    assert e.value.locked and "locked" in str(e.value)
    with pytest.raises(SecretUnavailable):
        SecretReader(Bus()).read(SecretRef.parse("vault:bare"))  # no vault area at all
    (tmp_path / "k.json").write_text('{"key": "sk-file"}')
    monkeypatch.setenv("KFS_TEST_KEY", "sk-env")
    assert reader.read(SecretRef.parse(f"file:{tmp_path}/k.json#key")) == "sk-file"
    assert reader.read(SecretRef.parse("env:KFS_TEST_KEY")) == "sk-env"
    # the embedder's key source: unavailable keys are an EmbedderError the sync agent retries
    config = type("C", (), {"embedding_api_key": "vault:openai.json#api_key", "embedding_api_key_secret": None})
    with pytest.raises(ApiKeyUnavailable) as ke:
        key_source(config, reader)()
    assert ke.value.locked


# ------------------------------------------------------------------ mount tier
class Endpoint(JsonServer):
    """An OpenAI-compatible /v1/embeddings on 127.0.0.1: one dimension per word of VOCAB, plus a
    constant, so nearest neighbours are known; refuses any key but KEY with 401."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []
        self.texts: list[str] = []
        super().__init__(self._answer)
        self.url = self.address("/v1/embeddings")

    def _answer(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        auth = headers.get("Authorization")
        self.keys.append(auth)
        if auth != f"Bearer {KEY}":
            return 401, None
        self.texts.extend(body["input"])
        rows = [{"index": i, "embedding": [float(w in t.split()) for w in VOCAB] + [0.1]}
                for i, t in enumerate(body["input"])]
        return 200, {"data": rows, "model": body["model"]}


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    with Endpoint() as e:
        yield e


def wait_for(what: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return got


def test_endpoint_key_from_vault(kfs_mount: Callable[..., Mount], endpoint: Endpoint) -> None:
    config = {"vector_config.yaml": {
        "embedding_endpoint": endpoint.url, "embedding_model": "text-embedding-ada-002", "dimension": 5,
        "embedding_api_key": "vault:keys/openai.json#api_key", "sync_interval": "300ms"}, **NO_WS}
    mount = kfs_mount(config=config, passphrase=PASS)
    (mount.path / "vault" / "keys").mkdir()
    (mount.path / "vault" / "keys" / "openai.json").write_text(json.dumps({"api_key": KEY}))
    assert KEY.encode() not in (mount.store / "vault" / "keys" / "openai.json").read_bytes()  # ciphertext
    col = mount.path / "vectors" / "agent_memory"
    col.mkdir()
    append(col / "records.jsonl", [{"text": "the user prefers dark mode"}, {"text": "the cat sat on the mat"}])
    wait_synced(mount)
    assert endpoint.keys and set(endpoint.keys) == {f"Bearer {KEY}"}
    assert search(col, "k=1 dark theme")[0]["document"] == "the user prefers dark mode"

    # Locked: the record is accepted and queued, the endpoint is never called without the key,
    # a text search answers EACCES, the export still has the record (read-your-writes).
    mount.cli("vault", "lock", str(mount.path))
    calls = len(endpoint.keys)
    append(col / "records.jsonl", [{"text": "deploy the service on friday"}])
    st = wait_for(lambda: (s := mount.status()["areas"]["vectors"])["last_error"] and s)
    assert "locked" in st["last_error"] and st["queue_depth"] == 1
    assert st["state"] == "embedding key unavailable (queueing)"
    time.sleep(1.5)  # a few retries
    assert mount.status()["areas"]["vectors"]["queue_depth"] == 1
    assert len(endpoint.keys) == calls
    with pytest.raises(PermissionError):
        (col / "search" / "deploy").read_bytes()
    assert "deploy the service on friday" in [r.get("text") for r in export(col / "records.jsonl")]
    stats = json.loads((col / "collection.json").read_text())
    assert stats["queued_upserts"] == 1 and stats["backend_reachable"] is True

    # Unlocked: applied at once (the sync agent hears vault_unlocked), nothing lost, nothing twice.
    mount.cli("vault", "unlock", str(mount.path))
    wait_synced(mount, timeout=30)
    assert set(endpoint.keys) == {f"Bearer {KEY}"}
    assert search(col, "k=1 deploy now")[0]["document"] == "deploy the service on friday"
    got = export(col / "records.jsonl")
    assert len(got) == 3 and len({r["id"] for r in got}) == 3

    # A wrong key in the vault: refused by the endpoint, the record stays queued.
    (mount.path / "vault" / "keys" / "openai.json").write_text(json.dumps({"api_key": "sk-wrong"}))
    append(col / "records.jsonl", [{"text": "the invoice is due"}])
    wait_for(lambda: "Bearer sk-wrong" in endpoint.keys)
    assert mount.status()["areas"]["vectors"]["queue_depth"] == 1
    os.unlink(mount.path / "vault" / "keys" / "openai.json")  # absent: says so, still queued
    st = wait_for(lambda: "no such file" in str((s := mount.status()["areas"]["vectors"])["last_error"]) and s)
    assert st["queue_depth"] == 1
    (mount.path / "vault" / "keys" / "openai.json").write_text(json.dumps({"api_key": KEY}))
    wait_synced(mount, timeout=30)
    assert len(export(col / "records.jsonl")) == 4


def test_qdrant_server_mode_speaks_rest_with_the_vault_key() -> None:
    """The server backend on the wire: host/port from the config, the api-key header from the vault
    (a minimal Qdrant REST endpoint on 127.0.0.1 answers GET /collections); locked vault or a
    server gone: BackendError (the sync agent retries), never a hang."""
    from types import SimpleNamespace

    from kfs.vectors.backends.base import BackendError
    from kfs.vectors.backends.qdrant_server import QdrantClientBackend

    seen: list[tuple[str, str | None]] = []

    def collections(method: str, path: str, headers: Any, body: Any) -> tuple[int, Any]:
        seen.append((path, headers.get("api-key")))
        return 200, {"result": {"collections": [{"name": "agent_memory"}]}, "status": "ok", "time": 0.0}

    bus = Bus()
    locked = True

    def read_secret(path: str) -> bytes:
        if locked:
            raise PermissionError(errno.EACCES, "the vault is locked")
        return json.dumps({"api_key": "qd-key"}).encode() if path == "qdrant.json" else b""

    bus.provide(VAULT_SERVICE, read_secret)
    with JsonServer(collections) as server:
        config = SimpleNamespace(mode="server", host="127.0.0.1", port=server.port, https=False,
                                 api_key="vault:qdrant.json#api_key")
        backend = QdrantClientBackend(config, "", SecretReader(bus))
        assert "server http://127.0.0.1" in backend.label
        with pytest.raises(BackendError) as e:
            backend.connect()
        assert "locked" in str(e.value)
        locked = False
        assert backend.list_collections() == ["agent_memory"]
        assert seen == [("/collections", "qd-key")]
    with pytest.raises(BackendError):
        backend.list_collections()  # the server is gone
    backend.close()
