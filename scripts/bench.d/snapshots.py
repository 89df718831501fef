"""scripts/bench snapshots: create and restore a 200 MiB mixed state, beside zip -r, tar --zstd and unzip.

The state (logs JSONL, vault-like random ciphertext, vectors JSONL with
embeddings, stream segments) is built once in a temp dir; every tool then
reads the same, page-cached files.  kfs's figures are its real code paths:
`SnapshotWriter` through the sink (what ``mkdir snapshots/NAME`` runs after
the areas' exports) with fsync + rename, and the restore path (`check_for_restore`,
then `Source.copy_to` of every entry: sha256-checked and fsynced per file).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kfs.snapshots.reader import check_for_restore, open_snapshot
from kfs.snapshots.restore import Source, area_folders
from kfs.snapshots.writer import Sink, SnapshotWriter, build_manifest, commit, temp_name
from kfs.store import StoreDir

MIB = 1 << 20
AREAS = ["logs", "vault", "vectors", "streams"]


def build_state(root: Path, total_mib: int = 200) -> None:
    rng = random.Random(7)
    words = [w for w in "the agent wrote a patch for the parser and ran tests again then pushed to main "
             "while memory sync queued vectors of the conversation context retry timeout ok".split()]
    (root / "logs").mkdir(parents=True)
    for n in range(8):                                     # ~80 MiB of logs
        with open(root / "logs" / f"agent{n}.log.jsonl", "w") as f:
            size = 0
            i = 0
            while size < 10 * MIB:
                line = json.dumps({"timestamp": f"2026-12-01T10:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
                                   "level": rng.choice(["info", "debug", "warning"]), "agent_id": f"agent-{n}",
                                   "event": rng.choice(["tool_call", "reply", "plan"]), "seq": i,
                                   "message": " ".join(rng.choices(words, k=rng.randint(5, 25)))}) + "\n"
                f.write(line)
                size += len(line)
                i += 1
    (root / "vault").mkdir()
    for n in range(20):                                    # ~60 MiB of ciphertext
        (root / "vault" / f"secret{n}.json").write_bytes(os.urandom(3 * MIB))
    (root / "vectors" / "memory").mkdir(parents=True)
    with open(root / "vectors" / "memory" / "records.jsonl", "w") as f:   # ~30 MiB of embeddings
        size = 0
        i = 0
        while size < 30 * MIB:
            line = json.dumps({"id": f"r{i}", "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(384)],
                               "metadata": {"agent_id": f"agent-{i % 8}", "context": "conversation"}}) + "\n"
            f.write(line)
            size += len(line)
            i += 1
    for stream in ("chat", "system", "logs"):              # ~30 MiB of stream segments
        (root / "streams" / stream).mkdir(parents=True)
        for seg in range(5):
            with open(root / "streams" / stream / f"{seg:020d}.jsonl", "w") as f:
                size = 0
                i = 0
                while size < 2 * MIB:
                    line = json.dumps({"seq": seg * 100000 + i, "ts": 1796000000 + i, "stream": stream,
                                       "data": {"role": rng.choice(["user", "agent"]),
                                                "text": " ".join(rng.choices(words, k=rng.randint(3, 30)))}}) + "\n"
                    f.write(line)
                    size += len(line)
                    i += 1


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(fn, runs: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Median of ``runs`` runs: the machine is shared and noisy."""
    times = []
    for run in range(runs):
        start = time.perf_counter()
        fn(run)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def kfs_create(state: Path, out: Path, name: str) -> None:
    src = StoreDir.open(str(state))
    dst = StoreDir.open(str(out))
    fd = dst.open_fd(temp_name(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    zw = SnapshotWriter(fd, "auto")
    for area in AREAS:
        sink = Sink(zw, area)
        for rel in src.walk_files(area):
            sink.add_store_file(rel[len(area) + 1:], src, rel, compress=area != "vault")
    zw.write(lambda w: build_manifest({"name": name, "type": "full"}, w))
    commit(dst, fd, name)


def kfs_restore(out: Path, name: str, target: Path) -> None:
    snap = open_snapshot(StoreDir.open(str(out)), name)
    listed = check_for_restore(snap)
    for area in area_folders(snap):
        dest = StoreDir.open(str(target / area))
        source = Source(snap, area, listed)
        for entry in source.names():
            source.copy_to(entry, dest, entry)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="kfs-bench-snapshots-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        state = work / "state"
        build_state(state)
        out = work / "out"
        out.mkdir()
        for _ in range(2):   # warm the page cache for every tool alike
            subprocess.run(["cat", *[str(p) for p in state.rglob("*") if p.is_file()]], stdout=subprocess.DEVNULL)
        total = du(state)
        rows = []
        t = timed(lambda run: kfs_create(state, out, f"kfs{run}"))
        rows.append(("kfs snapshot create (zip, per-entry, 2 cores)", t, (out / "kfs0.zip").stat().st_size))
        t = timed(lambda run: subprocess.run(["zip", "-qr", str(out / "ziprf.zip"), *AREAS], cwd=state, check=True),
                  runs=1)
        rows.append(("zip -r (deflate 6)", t, (out / "ziprf.zip").stat().st_size))
        t = timed(lambda run: subprocess.run(["tar", "--zstd", "-cf", str(out / "tar.tar.zst"), *AREAS],
                                             cwd=state, check=True))
        rows.append(("tar --zstd", t, (out / "tar.tar.zst").stat().st_size))
        restore_rows = []
        t = timed(lambda run: kfs_restore(out, "kfs0", work / f"r-kfs{run}"))
        restore_rows.append(("kfs restore path (checks, sha256, fsync each file)", t))
        t = timed(lambda run: subprocess.run(["unzip", "-qo", str(out / "kfs0.zip"), "-d", str(work / f"r-u{run}")],
                                             check=True))
        restore_rows.append(("unzip of the kfs zip", t))
        t = timed(lambda run: subprocess.run(["unzip", "-qo", str(out / "ziprf.zip"), "-d",
                                              str(work / f"r-z{run}")], check=True))
        restore_rows.append(("unzip of the zip -r zip", t))
        t = timed(lambda run: subprocess.run(
            ["sh", "-c", f"unzip -qo {out / 'kfs0.zip'} -d {work / f'r-s{run}'} && sync"], check=True))
        restore_rows.append(("unzip + sync", t))
        print("medians of 3 runs (zip -r: 1 run), files page-cached for every tool")
        print(f"state: {total / MIB:.0f} MiB in {sum(1 for p in state.rglob('*') if p.is_file())} files "
              f"(logs 80, vault ciphertext 60, vectors 30, streams 30 MiB); {os.cpu_count()} cores")
        print(f"{'create':<52} {'seconds':>8} {'MiB':>8} {'x tar time':>11} {'x tar size':>11}")
        tar_t, tar_s = rows[2][1], rows[2][2]
        for label, t, size in rows:
            print(f"{label:<52} {t:8.2f} {size / MIB:8.1f} {t / tar_t:11.2f} {size / tar_s:11.2f}")
        print(f"{'restore':<52} {'seconds':>8} {'x unzip':>8}")
        unzip_t = restore_rows[1][1]
        for label, t in restore_rows:
            print(f"{label:<52} {t:8.2f} {t / unzip_t:8.2f}")
        end_to_end(state, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def end_to_end(state: Path, work: Path) -> None:
    """Through a real mount: the logs of the state in a store, mkdir snapshots/NAME, kfs snapshot restore."""
    mnt, store, cfg = work / "mnt", work / "store", work / "cfg"
    (store / "logs").mkdir(parents=True)
    cfg.mkdir()
    (cfg / "streams.yaml").write_text("websocket: {enabled: false}\n")
    (cfg / "vault_config.yaml").write_text("enabled: false\n")
    for p in (state / "logs").iterdir():
        shutil.copy(p, store / "logs" / p.name)
    size = du(store / "logs")
    kfs = [sys.executable, "-m", "kfs"]
    subprocess.run([*kfs, "mount", str(mnt), "--store", str(store), "--config", str(cfg)], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        t_create = timed(lambda run: os.mkdir(mnt / "snapshots" / f"e2e{run}"))
        zsize = (store / "snapshots" / "e2e0.zip").stat().st_size
        t_restore = timed(lambda run: subprocess.run([*kfs, "snapshot", "restore", str(mnt), "e2e0"], check=True,
                                                     stdout=subprocess.DEVNULL), runs=1)
        print(f"end to end on a real mount ({size / MIB:.0f} MiB of logs): mkdir snapshots/NAME {t_create:.2f} s "
              f"-> {zsize / MIB:.1f} MiB; kfs snapshot restore (safety snapshot + restore) {t_restore:.2f} s")
    finally:
        subprocess.run([*kfs, "umount", str(mnt)], check=False, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
