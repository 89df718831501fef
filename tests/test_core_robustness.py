"""One bad request never kills the daemon: random syscalls over every area.

Like fsstress against the pyfuse3 passthrough example (which dies from one
uncaught OSError): several processes throw random operations, flags and data at
the mount; afterwards the daemon must still answer and must not have hit a
single unexpected exception (errnos are fine, EIO-from-a-bug is not).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import Mount

STRESS = textwrap.dedent(
    r'''
    import errno, json, os, random, sys
    root, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    areas = sorted(os.listdir(root))
    names = ["a.log.jsonl", "b.log.jsonl", "secret.json", "chat", "c1", "x", "d/e", "records.jsonl", "k" * 300]
    flags_pool = [os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_WRONLY | os.O_TRUNC,
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, os.O_RDWR | os.O_CREAT, os.O_RDONLY | os.O_NONBLOCK,
                  os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.O_RDONLY | os.O_DIRECT,
                  os.O_WRONLY | os.O_DIRECT | os.O_CREAT]
    payloads = [b"", b"\n", b"{}\n", b'{"event":"x","level":"info"}\n', b"not json\n", b"\xff\xfe\x00",
                b'{"a":1}', b'{"id":"r1","embedding":[0.1,0.2]}\n', os.urandom(5000)]
    eio = 0
    for i in range(count):
        path = os.path.join(root, rng.choice(areas), rng.choice(names))
        op = rng.randrange(9)
        try:
            if op == 0:
                fd = os.open(path, rng.choice(flags_pool) | os.O_NONBLOCK, 0o644)
                try:
                    for _ in range(rng.randrange(3)):
                        if rng.random() < 0.5:
                            os.write(fd, rng.choice(payloads))
                        else:
                            os.pread(fd, rng.choice([1, 4096, 65536]), rng.choice([0, 1, 10**6]))
                finally:
                    os.close(fd)
            elif op == 1:
                os.stat(path)
            elif op == 2:
                os.listdir(os.path.dirname(path))
            elif op == 3:
                os.mkdir(path, 0o755)
            elif op == 4:
                os.rmdir(path)
            elif op == 5:
                os.unlink(path)
            elif op == 6:
                os.rename(path, os.path.join(root, rng.choice(areas), rng.choice(names)))
            elif op == 7:
                os.truncate(path, rng.choice([0, 3, 10**5]))
            else:
                os.utime(path)
        except OSError as e:
            if e.errno == errno.EIO:
                eio += 1
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                print(json.dumps({"dead": True, "op": op, "path": path}))
                sys.exit(3)
    print(json.dumps({"eio": eio}))
    '''
)


def test_random_syscalls_never_kill_the_daemon(kfs_mount) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = kfs_mount()
    procs = [
        subprocess.Popen([sys.executable, "-c", STRESS, str(mount.path), str(seed), "400"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(4)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, (out, err)
    status = mount.status()
    assert status["fuse"]["errors"] == 0, "an area raised an unexpected exception (see kfsd.log.jsonl)"
    assert {"logs", "vault", "streams"} & set(os.listdir(mount.path))
    # and the mount still works for a plain tool
    assert subprocess.run(["ls", "-la", str(mount.path)], capture_output=True).returncode == 0
