"""scripts/bench logs: logs/ on kfs beside the store's own disk and gocryptfs, measured in one run.

(a) 200,000 120-byte JSON lines through one open file, Python's default buffering
(b) 5,000 open-append-close cycles of one line
(c) cat of a 256 MiB log to /dev/null (backing file in the page cache; best of 3)

Not a test: it prints figures and ratios to the disk, and fails on nothing slow.
Usage: scripts/bench logs [--lines N] [--cycles N] [--cat-mb N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def line(seq: int, width: int = 120) -> str:
    base = json.dumps({"agent": "bench.agent", "event": "step", "seq": seq, "msg": ""}, separators=(",", ":"))
    pad = width - len(base) - 1
    return base[:-2] + "x" * pad + '"}\n'


def bench_lines(path: Path, count: int) -> float:
    lines = [line(i) for i in range(count)]
    start = time.perf_counter()
    with open(path, "a") as f:
        for text in lines:
            f.write(text)
    return count / (time.perf_counter() - start)


def bench_cycles(path: Path, count: int) -> float:
    text = line(0)
    start = time.perf_counter()
    for _ in range(count):
        with open(path, "a") as f:
            f.write(text)
    return count / (time.perf_counter() - start)


def make_big(path: Path, mib: int) -> None:
    block = "".join(line(i) for i in range(8192)).encode()
    with open(path, "ab", buffering=0) as f:
        written = 0
        while written < mib << 20:
            f.write(block)
            written += len(block)


def bench_cat(path: Path) -> float:
    size = path.stat().st_size
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        best = max(best, size / (1 << 20) / (time.perf_counter() - start))
    return best


def run_set(target: Path, args: argparse.Namespace, big: Path | None = None,
            prepare_big: Callable[[Path], None] | None = None) -> dict[str, float]:
    results = {
        "a": bench_lines(target / "a.log.jsonl", args.lines),
        "b": bench_cycles(target / "b.log.jsonl", args.cycles),
    }
    big = big or target / "big.log.jsonl"
    (prepare_big or (lambda p: make_big(p, args.cat_mb)))(big)
    results["c"] = bench_cat(big)
    return results


#: a kfs whose only area is logs/: shows what the other areas' bus subscribers cost (--logs-only)
LOGS_ONLY = (
    "import sys, kfs.daemon as d; d.AREAS[:] = [a for a in d.AREAS if a[0] == 'logs']; "
    "from kfs.cli import main; sys.exit(main(sys.argv[1:]))"
)


def start_kfs(command: list[str], mnt: Path, store: Path, conf: Path) -> int:
    if command[1] == "-m":
        out = subprocess.run([*command, "mount", str(mnt), "--store", str(store), "--config", str(conf)],
                             cwd=REPO, capture_output=True, text=True, check=True)
        return int(out.stdout.rsplit("pid ", 1)[1].split(")")[0])
    # The patched variant must stay in this interpreter: run it in the foreground, in the background.
    proc = subprocess.Popen([*command, "mount", str(mnt), "--foreground", "--store", str(store), "--config",
                             str(conf)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the logs-only kfs did not mount")
        time.sleep(0.05)
    return proc.pid


def unmount_kfs(mnt: Path, pid: int | None) -> None:
    subprocess.run([sys.executable, "-m", "kfs", "umount", str(mnt)], cwd=REPO, capture_output=True)
    for _ in range(200):
        if pid is None:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--cycles", type=int, default=5_000)
    parser.add_argument("--cat-mb", type=int, default=256)
    parser.add_argument("--logs-only", action="store_true",
                        help="also measure a kfs whose only area is logs/ (no streams subscriber on the bus)")
    parser.add_argument("--dir", default=os.environ.get("KFS_BENCH_DIR", "/var/tmp"),
                        help="where the temp dirs go (the disk being compared)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kfs-bench-logs-", dir=args.dir))
    mounts: list[Path] = []
    kfs_pid = None
    try:
        disk = work / "disk"
        disk.mkdir()
        results = {"disk": run_set(disk, args)}

        # kfs: logs/ of a fresh mount; the big file is written into the store directly (as a log would be).
        conf = work / "config"
        conf.mkdir()
        (conf / "streams.yaml").write_text("websocket:\n  enabled: false\n")
        (conf / "logging.yaml").write_text("rotate_size_mb: 100000\n")
        variants = [("kfs", [sys.executable, "-m", "kfs"])]
        if args.logs_only:
            variants.append(("kfs logs-only", [sys.executable, "-c", LOGS_ONLY]))
        status: dict[str, object] = {}
        for label, command in variants:
            store, mnt = work / f"store-{len(mounts)}", work / "mnt"
            mnt.mkdir(exist_ok=True)
            kfs_pid = start_kfs(command, mnt, store, conf)
            mounts.append(mnt)
            results[label] = run_set(mnt / "logs", args, mnt / "logs" / "big.log.jsonl",
                                     lambda p, store=store: make_big(store / "logs" / p.name, args.cat_mb))
            if label == "kfs":
                status = json.loads(subprocess.run([sys.executable, "-m", "kfs", "status", str(mnt), "--json"],
                                                   cwd=REPO, capture_output=True, text=True, check=True).stdout)
            unmount_kfs(mnt, kfs_pid)
            mounts.remove(mnt)
            kfs_pid = None

        if shutil.which("gocryptfs"):
            cipher, plain, pw = work / "cipher", work / "plain", work / "pw"
            cipher.mkdir()
            plain.mkdir()
            pw.write_text("bench-password\n")
            subprocess.run(["gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", str(pw), str(cipher)],
                           check=True, capture_output=True)
            subprocess.run(["gocryptfs", "-q", "-passfile", str(pw), str(cipher), str(plain)],
                           check=True, capture_output=True)
            mounts.append(plain)
            results["gocryptfs"] = run_set(plain, args)
        else:
            print("gocryptfs not installed: skipped", file=sys.stderr)

        names = {"a": f"(a) {args.lines:,} lines, one handle  [lines/s]",
                 "b": f"(b) {args.cycles:,} open-append-close  [cycles/s]",
                 "c": f"(c) cat {args.cat_mb} MiB log        [MiB/s]"}
        columns = list(results)
        print(f"{'workload':44}" + "".join(f"{c:>24}" for c in columns))
        for key, label in names.items():
            base = results["disk"][key]
            cells = "".join(f"{results[c][key]:>15,.0f} ({results[c][key] / base:5.3f})" for c in columns)
            print(f"{label:44}{cells}")
        print("(ratio to the disk in brackets)")
        fuse: dict[str, object] = status.get("fuse", {})  # type: ignore[assignment]
        print(f"kfs FUSE requests: {fuse.get('requests')}  ({fuse.get('requests_per_s')}/s over the mount's life)")
        if fuse.get("waits"):  # how the FUSE loop waited for them (kfs/fs/fuse_loop.py)
            print(f"kfs FUSE waits: {fuse['waits']}")
        return 0
    finally:
        for mnt in reversed(mounts):
            if mnt.name == "mnt":
                unmount_kfs(mnt, kfs_pid)
            else:
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
