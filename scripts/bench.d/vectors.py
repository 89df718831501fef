"""scripts/bench vectors: vectors/ on kfs beside direct use of the same Chroma, measured in one run.

(a) upsert of N 384-dim records through records.jsonl (writes of 100 lines), batched and
    streaming sync, until the queue is drained into Chroma; beside chromadb's own upsert of
    the same records in batches of 1,000 (PersistentClient on the same disk), run just before
    and just after each kfs run (their mean is that run's baseline): kfs hands Chroma
    batch_size=1000 records per call, so that is the like-for-like baseline and the ratios are
    against it; chromadb in batches of 100 (the size of one kfs write) is printed for reference.
    kfs runs embedded Chroma in a child process (``backend_process``, the default: chromadb holds
    the GIL for a whole upsert), so its parsing and queueing overlap Chroma's work.
(b) p50/p99 of a top-10 text search: ``cat search/<text>`` through the mount, beside the
    same embedder + ``collection.query`` called directly (same texts, k and includes, the same
    records, both warmed by one query, taken in turns query by query).

Not a test: it prints figures and ratios, and fails on nothing slow.
Usage: scripts/bench vectors [--records N] [--queries N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from kfs.cli import live_call  # noqa: E402
from kfs.vectors.embedder import MiniLMEmbedder  # noqa: E402

WORDS = ("agent plan memory user prefers dark mode deploy service friday invoice payment theme cat mat "
         "release production build test schedule meeting notes lisbon weather model vector search").split()


def records(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"id": f"00000000-0000-4000-8000-{i:012d}", "embedding": [rng.gauss(0, 1) for _ in range(384)],
               "text": " ".join(rng.choice(WORDS) for _ in range(8)), "metadata": {"context": "doc", "n": i}}
        out.append(json.dumps(rec).encode() + b"\n")
    return out


def kfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kfs", *args], capture_output=True, text=True, cwd=REPO, check=True)


def status(mnt: Path) -> dict:
    """The vectors area's status over the control socket, in-process: polling with `kfs status`
    would start a Python process every 20 ms, a core's worth of CPU taken from the daemon while it
    drains the queue (the direct baseline pays nothing like it)."""
    return live_call(str(mnt), "vectors.status")


def mount(root: Path, mode: str) -> Path:
    cfg = root / "config"
    cfg.mkdir(parents=True)
    (cfg / "vector_config.yaml").write_text(yaml.safe_dump(
        {"sync_mode": mode, "sync_interval": "1s", "batch_size": 1000}))
    (cfg / "streams.yaml").write_text(yaml.safe_dump({"websocket": {"enabled": False}}))
    mnt = root / "mnt"
    kfs("mount", str(mnt), "--store", str(root / "store"), "--config", str(cfg))
    return mnt


def through_kfs(root: Path, mode: str, lines: list[bytes]) -> tuple[float, float, Path]:
    mnt = mount(root, mode)
    col = mnt / "vectors" / "bench"
    col.mkdir()
    while status(mnt)["state"] != "ready":
        time.sleep(0.1)
    fd = os.open(col / "records.jsonl", os.O_WRONLY | os.O_APPEND)
    start = time.perf_counter()
    for i in range(0, len(lines), 100):
        os.write(fd, b"".join(lines[i:i + 100]))
    acked = time.perf_counter() - start
    os.close(fd)
    while status(mnt)["queue_depth"]:
        time.sleep(0.02)
    applied = time.perf_counter() - start
    if os.environ.get("KFS_BENCH_VERBOSE"):
        print(mode, status(mnt)["counters"], file=sys.stderr)
    return len(lines) / acked, len(lines) / applied, mnt


def direct_upsert(path: Path, lines: list[bytes], batch: int = 1000):  # type: ignore[no-untyped-def]
    """Chroma's own API on the same lines: kfs hands Chroma ``batch_size`` (1000) records per call,
    so that is the like-for-like baseline; batches of 100 (the size of one kfs write) for reference."""
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection("bench", metadata={"hnsw:space": "cosine"}, embedding_function=None)
    start = time.perf_counter()
    for i in range(0, len(lines), batch):
        recs = [json.loads(x) for x in lines[i:i + batch]]  # the same parsing work kfs does
        col.upsert(ids=[r["id"] for r in recs], embeddings=[r["embedding"] for r in recs],
                   metadatas=[r["metadata"] for r in recs], documents=[r["text"] for r in recs])
    return len(lines) / (time.perf_counter() - start), col


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=400)
    args = ap.parse_args()
    lines = records(args.records)
    rng = random.Random(9)
    queries = [" ".join(rng.choice(WORDS) for _ in range(4)) + f" q{i}" for i in range(args.queries)]
    mounts: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="kfs-bench-vectors-") as tmp:
        base = Path(tmp)
        try:
            # The baseline brackets each kfs run (before and after, averaged): on a shared machine
            # the load drifts over the minutes a run takes, and a ratio of figures taken minutes
            # apart measures the drift as much as kfs.
            direct_100, _ = direct_upsert(base / "direct100", lines, 100)
            direct_a, direct_col = direct_upsert(base / "direct", lines)
            b_ack, b_applied, mnt_b = through_kfs(base / "batched", "batched", lines)
            mounts.append(mnt_b)
            direct_b, _ = direct_upsert(base / "direct-b", lines)
            s_ack, s_applied, mnt_s = through_kfs(base / "streaming", "streaming", lines)
            mounts.append(mnt_s)
            direct_c, _ = direct_upsert(base / "direct-c", lines)

            # Search: the same query texts, k=10 and includes on both sides, against the same
            # records; each side warmed with one query first.  Taken in turns, query by
            # query (the side that goes first alternating), so drift in the machine's load over
            # the run falls on both alike.
            embedder = MiniLMEmbedder()
            search_dir = mnt_b / "vectors" / "bench" / "search"

            def direct_search(q: str) -> tuple[float, float]:
                t0 = time.perf_counter()
                vec = embedder.embed([q])[0]
                t1 = time.perf_counter()
                direct_col.query(query_embeddings=[vec], n_results=10, include=["metadatas", "documents", "distances"])
                t2 = time.perf_counter()
                return t2 - t0, t2 - t1

            def kfs_search(q: str) -> float:
                t0 = time.perf_counter()
                with open(search_dir / q, "rb", buffering=0) as f:
                    while f.read(1 << 16):
                        pass
                return time.perf_counter() - t0

            direct_search("warm up")
            kfs_search("warm up")
            direct_lat, chroma_only, kfs_lat = [], [], []
            for i, q in enumerate(queries):
                if i % 2:
                    kfs_lat.append(kfs_search(q))
                total, query_only = direct_search(q)
                direct_lat.append(total)
                chroma_only.append(query_only)
                if not i % 2:
                    kfs_lat.append(kfs_search(q))
        finally:
            for m in mounts:
                subprocess.run([sys.executable, "-m", "kfs", "umount", str(m)], capture_output=True, cwd=REPO)

    n = args.records
    print(f"vectors: {n:,} x 384-dim records (writes of 100 lines; kfs batch_size 1000), {args.queries} queries")
    print(f"{'upsert':<44} {'records/s':>10} {'vs direct':>10}")
    direct_rate = (direct_a + direct_b + direct_c) / 3
    print(f"{'direct chromadb upsert (batches of 1000)':<44} {direct_rate:>10,.0f} {1.0:>10.2f}"
          f"   (runs: {direct_a:,.0f} {direct_b:,.0f} {direct_c:,.0f})")
    print(f"{'direct chromadb upsert (batches of 100)':<44} {direct_100:>10,.0f} {direct_100 / direct_a:>10.2f}"
          "   (vs the first run)")
    for label, ack, applied, base_rate in (("batched", b_ack, b_applied, (direct_a + direct_b) / 2),
                                           ("streaming", s_ack, s_applied, (direct_b + direct_c) / 2)):
        print(f"{'  direct, before and after kfs ' + label:<44} {base_rate:>10,.0f} {1.0:>10.2f}")
        print(f"{'kfs ' + label + ': acknowledged (fsynced queue)':<44} {ack:>10,.0f} {ack / base_rate:>10.2f}")
        print(f"{'kfs ' + label + ': applied to Chroma':<44} {applied:>10,.0f} {applied / base_rate:>10.2f}")
    print(f"{'top-10 text search':<44} {'p50 ms':>10} {'p99 ms':>10}")
    print(f"{'direct: embed + collection.query':<44} {pct(direct_lat, 50):>10.2f} {pct(direct_lat, 99):>10.2f}")
    print(f"{'  of which collection.query':<44} {pct(chroma_only, 50):>10.2f} {pct(chroma_only, 99):>10.2f}")
    print(f"{'kfs: cat search/<text>':<44} {pct(kfs_lat, 50):>10.2f} {pct(kfs_lat, 99):>10.2f}")
    paired = [k - d for k, d in zip(kfs_lat, direct_lat, strict=True)]
    print(f"search p50 difference: {pct(kfs_lat, 50) - pct(direct_lat, 50):+.2f} ms (target: within 2 ms); "
          f"median of per-query differences {pct(paired, 50):+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
