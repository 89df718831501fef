"""The Logstash forwarder against a real TCP json_lines receiver: Debian's rsyslog (imptcp + mmjsonparse).

The receiver is down at first, comes up, is stopped mid-run and started again, and kfs itself
is killed with -9 while the receiver is down: every line arrives, in order (lines sent just
before a connection dropped may arrive twice: delivery is at least once).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount
from local_peers import free_port, wait_until_listening

pytestmark = pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="rsyslog is not installed")

RSYSLOG_CONF = """
global(workDirectory="{work}" maxMessageSize="1m")
module(load="imptcp")
module(load="mmjsonparse")
template(name="json" type="string" string="%$!all-json-plain%\\n")
ruleset(name="kfs") {{
  action(type="mmjsonparse" cookie="")
  action(type="omfile" file="{out}" template="json")
}}
input(type="imptcp" port="{port}" address="127.0.0.1" ruleset="kfs")
"""


class Rsyslog:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.out = root / "received.jsonl"
        self.conf = root / "rsyslog.conf"
        (root / "work").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(RSYSLOG_CONF.format(work=root / "work", out=self.out, port=port))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.root / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "rsyslogd.err", "ab"),
        )
        wait_until_listening(self.proc, self.port, "rsyslogd", timeout=10,
                             why_exited=(self.root / "rsyslogd.err").read_text)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # by PID (Popen knows it)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def sequence(self) -> list[int]:
        if not self.out.exists():
            return []
        seqs = []
        for line in self.out.read_text().splitlines():
            try:
                seqs.append(json.loads(line)["seq"])
            except (ValueError, KeyError):
                continue  # an empty record from the readiness probe
        return seqs


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    receiver = Rsyslog(tmp_path / "rsyslog", free_port())
    yield receiver
    receiver.stop()


def write_lines(path: Path, first: int, last: int, pause: float = 0.0) -> None:
    with open(path, "a") as f:
        for seq in range(first, last):
            f.write(json.dumps({"seq": seq, "agent": "t", "pad": "y" * (seq % 300)}) + "\n")
            if pause:
                f.flush()
                time.sleep(pause)


def wait_for_all(receiver: Rsyslog, total: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        seqs = receiver.sequence()
        if set(seqs) >= set(range(total)) or time.monotonic() > deadline:
            return seqs
        time.sleep(0.2)


def test_logstash_outages_and_kfs_kill9_lose_nothing(kfs_mount: Callable[..., Mount], rsyslog: Rsyslog) -> None:
    mount = kfs_mount(config={
        "streams.yaml": {"websocket": {"enabled": False}},
        "logging.yaml": {"logstash": {"host": "127.0.0.1", "port": rsyslog.port, "reconnect_max": "0.5s",
                                      "replay_window": "3s"}},
    })
    log = mount.path / "logs" / "fwd.log.jsonl"
    # 1. Logstash down: writers are not blocked, lines are spooled.
    started = time.monotonic()
    write_lines(log, 0, 200)
    assert time.monotonic() - started < 20
    state = mount.status()["areas"]["logs"]["logstash"]
    assert state["state"] != "connected" and state["spool_bytes"] > 0
    # 2. Up: the backlog and new lines flow.
    rsyslog.start()
    write_lines(log, 200, 400, pause=0.002)
    # 3. Stopped mid-run, lines keep being accepted.
    rsyslog.stop()
    write_lines(log, 400, 600)
    # 4. kfs dies hard while Logstash is down; the spool survives in the store.
    mount.kill9()
    mount.start()
    write_lines(log, 600, 700)
    # 5. Logstash back: everything arrives, in order.
    rsyslog.start()
    write_lines(log, 700, 800, pause=0.001)
    seqs = wait_for_all(rsyslog, 800)
    missing = sorted(set(range(800)) - set(seqs))
    assert not missing, f"lines never delivered: {missing[:20]} ({len(missing)})"
    assert list(dict.fromkeys(seqs)) == list(range(800)), "lines arrived out of order"
    assert len(log.read_text().splitlines()) == 800
    assert ".logstash-spool" not in {p.name for p in log.parent.iterdir()}  # kfs's own, hidden
    assert (mount.store / "logs" / ".logstash-spool").is_dir()
    deadline = time.monotonic() + 10
    while mount.status()["areas"]["logs"]["logstash"]["spool_bytes"] > 0:
        assert time.monotonic() < deadline, "the spool was never committed"
        time.sleep(0.2)
