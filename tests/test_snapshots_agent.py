"""Agent and conversation snapshots of streams/ and vectors/, through a real mount (and their filters, fast)."""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Callable

from conftest import Mount

from kfs.streams.export import event_of_agent, filter_lines, is_conversation_stream
from kfs.vectors.search import of_agent

# The streams broker's fixed WebSocket port would collide with other mounts running at the same time.
NO_WS = {"streams.yaml": {"websocket": {"enabled": False}}}
# vectors/ keeps metadata.agent_id as a canonical UUID
MINE, THEIRS = "0b7e5c1a-9d2f-4a61-8f3e-6c0d2b7a9e14", "ffffffff-0000-4000-8000-000000000001"


def publish(mount: Mount, stream: str, events: list[dict]) -> None:
    with open(mount.path / "streams" / stream, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))


def add_vectors(mount: Mount, collection: str, records: list[dict]) -> None:
    col = mount.path / "vectors" / collection
    if not col.exists():
        col.mkdir()
    fd = os.open(col / "records.jsonl", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, "".join(json.dumps(r) + "\n" for r in records).encode())
    finally:
        os.close(fd)


def zip_lines(zf: zipfile.ZipFile, prefix: str) -> list[dict]:
    """Every JSON line of the entries under ``prefix``, in entry order."""
    out: list[dict] = []
    for name in sorted(n for n in zf.namelist() if n.startswith(prefix)):
        out += [json.loads(line) for line in zf.read(name).splitlines() if line.strip()]
    return out


def vector(i: int) -> list[float]:
    return [1.0 if i % 4 == j else 0.0 for j in range(4)]


def test_agent_snapshot_keeps_only_that_agents_stream_events_and_vectors(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config=NO_WS)
    publish(mount, "chat", [
        {"agent_id": MINE, "text": "mine 1"},
        {"agent_id": THEIRS, "text": "theirs 1"},
        {"agent": MINE, "text": "mine 2"},
        {"metadata": {"agent_id": MINE}, "text": "mine 3"},
        {"text": f"mentions {MINE} but carries no agent"},
        {"metadata": {"agent": THEIRS}, "text": "theirs 2"},
    ])
    publish(mount, "tasks", [{"agent_id": THEIRS, "task": "not mine"}])
    mine_ids = [str(uuid.uuid4()) for _ in range(3)]
    theirs_ids = [str(uuid.uuid4()) for _ in range(2)]
    add_vectors(mount, "memory",
                [{"id": i, "embedding": vector(n), "text": "m", "metadata": {"agent_id": MINE}}
                 for n, i in enumerate(mine_ids)]
                + [{"id": i, "embedding": vector(n), "text": "t", "metadata": {"agent_id": THEIRS}}
                   for n, i in enumerate(theirs_ids)])
    add_vectors(mount, "others", [{"id": str(uuid.uuid4()), "embedding": vector(0), "metadata": {"agent_id": THEIRS}}])

    mount.cli("snapshot", "create", str(mount.path), "--type", "agent", "--agent", MINE, "--name", "ag")
    with zipfile.ZipFile(mount.store / "snapshots" / "ag.zip") as zf:
        names = zf.namelist()
        chat = zip_lines(zf, "streams/chat/")
        records = zip_lines(zf, "vectors/memory/records.jsonl")
        settings = json.loads(zf.read("vectors/memory/settings.json"))
    assert [e["text"] for e in chat] == ["mine 1", "mine 2", "mine 3"]
    assert all(e["stream"] == "chat" for e in chat)
    assert not any(n.startswith("streams/tasks/") for n in names)          # none of its events are mine
    assert sorted(r["id"] for r in records) == sorted(mine_ids)
    assert all(r["metadata"]["agent_id"] == MINE for r in records)
    assert settings["name"] == "memory"
    assert not any(n.startswith("vectors/others/") for n in names)         # a collection with none of mine
    assert not any(".snapshot-export" in n for n in names)
    # the spool files are gone from the store
    assert not (mount.store / "streams" / ".snapshot-export").exists()
    assert not (mount.store / "vectors" / ".snapshot-export").exists()

    # a full snapshot still has everyone's events and records
    mount.cli("snapshot", "create", str(mount.path), "--name", "all")
    with zipfile.ZipFile(mount.store / "snapshots" / "all.zip") as zf:
        assert len(zip_lines(zf, "streams/chat/")) == 6
        assert len(zip_lines(zf, "streams/tasks/")) == 1
        assert len(zip_lines(zf, "vectors/memory/records.jsonl")) == 5
        assert len(zip_lines(zf, "vectors/others/records.jsonl")) == 1


def test_conversation_snapshot_has_chat_history_and_its_memory_window(kfs_mount: Callable[..., Mount]) -> None:
    mount = kfs_mount(config={**NO_WS, "snapshots.yaml": {"memory_window": 4}})
    publish(mount, "chat", [{"role": "user" if i % 2 else "assistant", "text": f"turn {i}"} for i in range(10)])
    mount.cli("snapshot", "create", str(mount.path), "--type", "conversation", "--name", "conv")
    with zipfile.ZipFile(mount.store / "snapshots" / "conv.zip") as zf:
        names = zf.namelist()
        chat = zip_lines(zf, "streams/chat/")
        window = json.loads(zf.read("memory_window.json"))
    assert [e["text"] for e in chat] == [f"turn {i}" for i in range(10)]    # the chat history, whole
    for builtin in ("system", "metrics", "logs"):
        assert not any(n.startswith(f"streams/{builtin}/") for n in names)
    assert window["size"] == 4 and window["count"] == 4
    events = window["events"]
    assert [e["record"]["text"] for e in events] == [f"turn {i}" for i in range(6, 10)]
    assert all(e["area"] == "streams" and e["source"] == "chat" for e in events)
    assert all(e["timestamp"] == e["record"]["timestamp"] and e["timestamp"].endswith("Z") for e in events)
    # browsable through the mount too
    browsed = json.loads((mount.path / "snapshots" / "conv" / "memory_window.json").read_text())
    assert browsed == window


# ---------------------------------------------------------------- fast tier: the filters themselves
def test_event_of_agent_top_level_and_metadata() -> None:
    assert event_of_agent({"agent_id": "a1"}, "a1")
    assert event_of_agent({"agent": "a1"}, "a1")
    assert event_of_agent({"metadata": {"agent_id": "a1"}}, "a1")
    assert event_of_agent({"metadata": {"agent": "a1"}}, "a1")
    assert event_of_agent({"agent_id": 42}, "42")
    assert not event_of_agent({"agent_id": True}, "True")
    assert not event_of_agent({"agent_id": "a2", "text": "a1"}, "a1")
    assert not event_of_agent({"metadata": "a1"}, "a1")
    assert not event_of_agent({"nested": {"agent_id": "a1"}}, "a1")


def test_filter_lines_keeps_whole_lines_in_order() -> None:
    data = (b'{"seq":1,"agent_id":"a\\"q"}\n'
            b'{"seq":2,"agent_id":"b"}\n'
            b'not json a"q\n'
            b'{"seq":3,"metadata":{"agent":"a\\"q"}}\n'
            b'{"seq":4,"agent_id":"a\\"q"}')             # torn last line: never acknowledged
    kept = filter_lines(data, 'a"q')
    assert [json.loads(line)["seq"] for line in kept.splitlines()] == [1, 3]
    assert kept.endswith(b"\n")


def test_conversation_streams_and_vector_keep() -> None:
    assert is_conversation_stream("chat") and is_conversation_stream("tasks")
    assert not any(is_conversation_stream(n) for n in ("system", "metrics", "logs"))
    keep = of_agent("a1")
    assert keep({"agent_id": "a1"}) and keep({"agent": "a1"})
    assert not keep({"agent_id": "a2"}) and not keep({})
    # another spelling of the same UUID still finds the canonical one vectors/ stores
    assert of_agent(MINE.upper().replace("-", ""))({"agent_id": MINE})
