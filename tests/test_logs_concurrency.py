"""logs/ under concurrent appenders and a kill -9 of the daemon, through a real mount."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Mount

QUIET = {"streams.yaml": {"websocket": {"enabled": False}}}

# One writer process: N lines, sizes 10 B .. 200 KB, each line written in random pieces with
# os.write on an O_APPEND descriptor; after the last piece of a line returned, its number is
# recorded (unbuffered) in the ack file, outside the mount.
WRITER = r"""
import json, os, random, sys
path, worker, count, ack_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(worker)
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(count):
    roll = rng.random()
    if roll < 0.6:
        size = rng.randint(10, 200)
    elif roll < 0.95:
        size = rng.randint(200, 8000)
    else:
        size = rng.randint(100_000, 200_000)
    head = json.dumps({"w": worker, "i": i, "n": size, "p": ""})[:-2]
    line = (head + "x" * max(0, size - len(head) - 3) + '"}\n').encode()
    pos = 0
    while pos < len(line):
        step = rng.choice((1, 7, 100, 4096, 65536, len(line)))
        piece = line[pos:pos + step]
        try:
            written = os.write(fd, piece)
        except OSError as e:
            sys.exit(0 if worker >= 0 else 1)
        assert written == len(piece), (written, len(piece))
        pos += written
    os.write(ack, b"%d\n" % i)
"""


def start_writers(target: Path, workers: int, count: int, acks: Path) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(w), str(count), str(acks / f"{w}.ack")])
        for w in range(workers)
    ]


def parse_log(data: bytes) -> list[dict[str, object]]:
    assert data == b"" or data.endswith(b"\n"), "the log ends in a partial line"
    return [json.loads(line) for line in data.splitlines()]


def test_eight_appenders_lines_whole_and_once(kfs_mount: Callable[..., Mount], tmp_path: Path) -> None:
    mount = kfs_mount(config={**QUIET, "logging.yaml": {"rotate_size_mb": 1000}})
    target = mount.path / "logs" / "shared.log.jsonl"
    target.touch()
    procs = start_writers(target, 8, 500, tmp_path)
    for proc in procs:
        assert proc.wait(timeout=180) == 0
    records = parse_log(target.read_bytes())
    seen: dict[tuple[object, object], int] = {}
    for record in records:
        key = (record["w"], record["i"])
        assert key not in seen, f"line {key} stored twice"
        seen[key] = 1
        # whole: its padding is exactly as long as it was written
        head = json.dumps({"w": record["w"], "i": record["i"], "n": record["n"], "p": ""})[:-2]
        assert len(str(record["p"])) == max(0, int(str(record["n"])) - len(head) - 3)
    assert set(seen) == {(w, i) for w in range(8) for i in range(500)}
    assert max(len(json.dumps(r)) for r in records) > 100_000


def test_kill9_keeps_every_acknowledged_line(kfs_mount: Callable[..., Mount], tmp_path: Path) -> None:
    mount = kfs_mount(config={**QUIET, "logging.yaml": {"rotate_size_mb": 1000}})
    target = mount.path / "logs" / "crash.log.jsonl"
    target.touch()
    procs = start_writers(target, 4, 100_000, tmp_path)
    time.sleep(2.0)
    mount.kill9()
    for proc in procs:
        proc.wait(timeout=60)
    mount.start()
    records = parse_log(target.read_bytes())
    stored = {(r["w"], r["i"]) for r in records}
    assert len(stored) == len(records), "a line was stored twice"
    acked = 0
    for w in range(4):
        ack_file = tmp_path / f"{w}.ack"
        numbers = [int(x) for x in ack_file.read_text().split()] if ack_file.exists() else []
        acked += len(numbers)
        missing = [i for i in numbers if (w, i) not in stored]
        assert not missing, f"writer {w}: acknowledged lines lost: {missing[:10]}"
    assert acked > 50, "the writers did not get going before the kill"
    # The remounted log still takes lines.
    with open(target, "a") as f:
        f.write('{"after":"restart"}\n')
    assert json.loads(target.read_text().splitlines()[-1])["after"] == "restart"
