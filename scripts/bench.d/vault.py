"""scripts/bench vault: vault/ on kfs beside the store's own disk and gocryptfs, measured in one run.

(a) sequential write of 256 MiB in 1 MiB writes + fsync (best of 3: one run moves with the disk's
    flushes and with page allocation on this VM, as much as 0.8-1.3x between runs)
(b) sequential read of it through the daemon (the FUSE file's kernel pages dropped with
    POSIX_FADV_DONTNEED first; the backing file stays in the page cache; best of 3),
    and re-read without dropping (kfs keeps the kernel cache for read-only opens)
(c) 40,000 4 KiB reads at seeded random offsets (POSIX_FADV_RANDOM, kernel pages dropped first):
    the same sequence of offsets on every file system, so the kernel's page cache holds the same
    pages at every step (a fixed time would let the faster one reach more repeated offsets);
    the vault hands the rest of each chunk it decrypts to the page cache when the core allows it
(c') the same, cold: one read in each 64 KiB block, blocks in random order, so no read is
    helped by any earlier one (nor by chunk-sized caching): the per-request cost alone
(d) open + read + close of a 200-byte secret, repeated

The vault is measured at several chunk sizes (the shipped default is 16 KiB) to
justify the default.  gocryptfs is `gocryptfs -init -scryptn 10` over the same disk.
Not a test: it prints figures and ratios, and fails on nothing slow.
Usage: scripts/bench vault [--mib N] [--seconds S] [--rand-ops N] [--chunks 4096,16384,65536] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PASS = "bench passphrase"
DEFAULT_CHUNK = 16384


def seq_write(path: Path, mib: int, runs: int = 3) -> float:
    """MiB/s of writing ``mib`` MiB in 1 MiB writes and fsyncing them, the best of ``runs``."""
    block = os.urandom(1 << 20)
    best = 0.0
    for _ in range(runs):
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(mib):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        best = max(best, mib / (time.perf_counter() - start))
    return best


def drop_pages(path: Path) -> None:
    """Forget the kernel's cached pages of this file (not the backing file's): reads reach the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seq_read(path: Path, runs: int, drop: bool) -> float:
    best = 0.0
    for _ in range(runs):
        if drop:
            drop_pages(path)
        start = time.perf_counter()
        total = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1 << 20):
                total += len(chunk)
        finally:
            os.close(fd)
        best = max(best, total / (1 << 20) / (time.perf_counter() - start))
    return best


def random_reads(path: Path, ops: int, drop: bool) -> float:
    """``ops`` 4 KiB reads at seeded random offsets: the same sequence on every file system.

    A fixed count, not a fixed time: with a time limit the faster file system gets further
    into the sequence, where more offsets repeat and the kernel's page cache answers more
    of them, so the ratio would mix per-request cost with a different cache state.
    """
    if drop:
        drop_pages(path)
    size = os.stat(path).st_size
    rng = random.Random(1)
    offsets = [rng.randrange(0, size - 4096) & ~4095 for _ in range(ops)]
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    start = time.perf_counter()
    try:
        for offset in offsets:
            os.pread(fd, 4096, offset)
    finally:
        os.close(fd)
    return ops / (time.perf_counter() - start)


def cold_random_reads(path: Path, seconds: float, drop: bool) -> float:
    if drop:
        drop_pages(path)
    size = os.stat(path).st_size
    rng = random.Random(2)
    blocks = list(range(size // 65536))
    rng.shuffle(blocks)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    count = 0
    start = time.perf_counter()
    try:
        for block in blocks:
            os.pread(fd, 4096, block * 65536 + rng.randrange(16) * 4096)
            count += 1
            if count % 200 == 0 and time.perf_counter() - start > seconds:
                break
    finally:
        os.close(fd)
    return count / (time.perf_counter() - start)


def small_secret(directory: Path, seconds: float) -> float:
    path = directory / "secret.json"
    path.write_bytes(b'{"openai_api_key":"sk-' + b"x" * 170 + b'"}\n')
    count = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            fd = os.open(path, os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)
        count += 50
    return count / elapsed


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (the FUSE daemon): its own cost, whatever else the machine runs."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_all(directory: Path, mib: int, seconds: float, rand_ops: int, fuse: bool = True,
            pid: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Rates per workload, and the daemon's CPU time per operation (per MiB for sequential I/O).

    On a shared machine the rates move by 2-3x between runs; the daemon's CPU per
    operation is much steadier, and it is what the request path costs.
    """
    big = directory / "bench.bin"
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(key: str, func: Callable[[], float], ops: Callable[[float, float], float]) -> None:
        before, start = cpu_seconds(pid), time.perf_counter()
        rates[key] = func()
        elapsed = time.perf_counter() - start
        cpu[key] = (cpu_seconds(pid) - before) / max(1.0, ops(rates[key], elapsed)) * 1e6

    timed("write", lambda: seq_write(big, mib), lambda rate, t: 3 * mib)
    timed("read", lambda: seq_read(big, 3, drop=fuse), lambda rate, t: 3 * mib)
    timed("reread", lambda: seq_read(big, 3, False), lambda rate, t: 3 * mib)
    timed("rand", lambda: random_reads(big, rand_ops, drop=fuse), lambda rate, t: rand_ops)
    timed("cold", lambda: cold_random_reads(big, seconds, drop=fuse), lambda rate, t: rate * t)
    timed("small", lambda: small_secret(directory, seconds), lambda rate, t: rate * t)
    big.unlink()
    return rates, cpu


def kfs_mount(root: Path, chunk_size: int) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "config" / "streams.yaml").write_text("websocket:\n  enabled: false\n")
    (root / "config" / "vault_config.yaml").write_text(f"chunk_size: {chunk_size}\nauto_lock_timeout: 0\n")
    env = {**os.environ, "KFS_VAULT_PASSPHRASE": PASS}
    subprocess.run([sys.executable, "-m", "kfs", "mount", str(root / "mnt"), "--store", str(root / "store"),
                    "--config", str(root / "config")], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wait_idle(daemon_pid(root / "store"))
    return root / "mnt"


def daemon_pid(store: Path) -> int | None:
    """The kfs daemon serving ``store`` (found through /proc: the bench only knows its paths)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(store).encode() in cmdline and b"kfs" in b" ".join(cmdline):
                return int(entry.name)
    return None


def wait_idle(pid: int | None, quiet_for: float = 1.0, limit: float = 30.0) -> None:
    """Wait until the daemon stops burning CPU: other areas start up in the background
    (the vectors backend imports chromadb for seconds), which would be charged to the vault."""
    if pid is None:
        time.sleep(3)
        return

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    deadline = time.monotonic() + limit
    last, quiet_since = cpu_ticks(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_ticks()
        if now - last > 2:  # more than ~20 ms of CPU in 250 ms: still busy
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_for:
            return
        last = now


def kfs_umount(mnt: Path) -> None:
    subprocess.run([sys.executable, "-m", "kfs", "umount", str(mnt)], check=False, cwd=REPO)


def gocryptfs_mount(root: Path) -> Path | None:
    if not shutil.which("gocryptfs"):
        return None
    cipher, plain = root / "cipher", root / "plain"
    cipher.mkdir(parents=True)
    plain.mkdir()
    extpass = ["-extpass", f"echo {PASS}"]
    subprocess.run(["gocryptfs", "-q", "-init", "-scryptn", "10", *extpass, str(cipher)], check=True)
    subprocess.run(["gocryptfs", "-q", *extpass, str(cipher), str(plain)], check=True)
    return plain


def gocryptfs_pid(plain: Path) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"gocryptfs.* {plain}$"], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rand-ops", type=int, default=40_000, help="4 KiB random reads per file system")
    parser.add_argument("--chunks", default="4096,16384,65536", help="vault chunk sizes to measure (bytes, a,b,c)")
    parser.add_argument("--dir", default=None, help="where to put stores (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kfs-bench-vault-", dir=args.dir))
    results: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    cleanups: list[Callable[[], None]] = []
    try:
        disk = base / "disk"
        disk.mkdir()
        results["disk"] = run_all(disk, args.mib, args.seconds, args.rand_ops, fuse=False)[0]
        go = gocryptfs_mount(base / "gocryptfs")
        if go is not None:
            cleanups.append(lambda: subprocess.run(["fusermount3", "-u", str(go)], check=False))
            results["gocryptfs"], cpu["gocryptfs"] = run_all(go, args.mib, args.seconds, args.rand_ops,
                                                          pid=gocryptfs_pid(go))
        for chunk in [int(c) for c in args.chunks.split(",")]:
            mnt = kfs_mount(base / f"kfs{chunk}", chunk)
            try:  # one daemon at a time: an idle one still has timers
                name = f"kfs vault {chunk // 1024}K"
                results[name], cpu[name] = run_all(mnt / "vault", args.mib, args.seconds, args.rand_ops,
                                                   pid=daemon_pid(base / f"kfs{chunk}" / "store"))
            finally:
                kfs_umount(mnt)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        shutil.rmtree(base, ignore_errors=True)
    rows = [("write", f"seq write {args.mib} MiB + fsync", "MiB/s"), ("read", "seq read, via the daemon", "MiB/s"),
            ("reread", "seq re-read, kernel cache", "MiB/s"),
            ("rand", "4 KiB random reads", "/s"), ("cold", "4 KiB random reads, cold", "/s"),
            ("small", "open+read+close 200 B", "/s")]
    names = list(results)
    default = f"kfs vault {DEFAULT_CHUNK // 1024}K"
    print(f"{'workload':<30}" + "".join(f"{n:>16}" for n in names) + f"   {default[4:]} / gocryptfs")
    for key, label, unit in rows:
        cells = "".join(f"{results[n][key]:>12,.0f} {unit:<3}" for n in names)
        ratio = ""
        if "gocryptfs" in results and default in results:
            ratio = f"   {results[default][key] / results['gocryptfs'][key]:.2f}"
        print(f"{label:<30}{cells}{ratio}")
    if cpu:
        print(f"\n{'daemon CPU per op (us)':<30}" + "".join(f"{n:>16}" for n in cpu) + "   per MiB for seq rows")
        for key, label, _unit in rows:
            if key == "reread":
                continue
            print(f"{label:<30}" + "".join(f"{cpu[n][key]:>16,.0f}" for n in cpu))
        if os.environ.get("KFS_FUSE_SPIN_US", "") != "0":
            print("(kfs's figures include its poll for the next request; KFS_FUSE_SPIN_US=0 shows the work alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
