"""A backend run in a child process, so that it cannot freeze the daemon.

Measured here: chromadb 1.5's embedded client holds the GIL for the whole of
``collection.upsert`` (a thread spinning beside an upsert of 1,000 384-dim
records got 0% of the time for 1.4–3.3 s).  In-process, every FUSE request of
every area waits that long whenever the sync agent applies a batch, and the
writes that the agent should overlap with are serialised behind it.  In a child
process Chroma runs on its own GIL (and core) while the daemon keeps answering.

Protocol: pickled ``(method, args)`` requests on one pipe, ``("ok", result)`` or
``("err", message)`` answers on another, one call at a time.  The child exits
on EOF (the daemon closed or died) and is also killed by the kernel the moment
the daemon dies (``PR_SET_PDEATHSIG``, tied to a keeper thread that lives as
long as the child), so a kill -9 of kfs never leaves an old child writing into
the store while the next mount opens it.  A child that dies is restarted at the
next call (the sync agent retries; nothing is lost: the queue holds the records).
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import Any

from kfs.vectors.backends.base import Backend, BackendError, StoredRecord

PR_SET_PDEATHSIG = 1
CLOSE_WAIT = 30.0  # seconds a closing child may take to close its database


class IsolatedBackend(Backend):
    def __init__(self, module: str, cls: str, config: Any, store_path: str, store_fd: int | None) -> None:
        self.spec = (module, cls, config, store_path)
        self.store_fd = store_fd
        local = getattr(importlib.import_module(module), cls)(config, store_path)  # cheap: no database
        self.name = local.name
        self.label = str(getattr(local, "label", local.name))
        self._proc: subprocess.Popen[bytes] | None = None
        self._keeper_stop: threading.Event | None = None
        self._requests: Any = None
        self._answers: Any = None
        self._lock = threading.Lock()  # one call at a time on the pipes

    # ------------------------------------------------------------------ the child
    def _spawn(self) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        fds = [req_r, ans_w] + ([self.store_fd] if self.store_fd is not None else [])
        started = threading.Event()
        stop = threading.Event()
        box: dict[str, Any] = {}

        def keeper() -> None:
            # The child's PDEATHSIG fires when the thread that forked it ends: this one, which
            # therefore waits until the child is done with.
            try:
                box["proc"] = subprocess.Popen(
                    [sys.executable, "-m", "kfs.vectors.backends.isolated", str(req_r), str(ans_w), str(os.getpid())],
                    pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
            except OSError as e:
                box["error"] = e
            started.set()
            stop.wait()

        threading.Thread(target=keeper, name="kfs-vectors-backend-keeper", daemon=True).start()
        started.wait()
        os.close(req_r)
        os.close(ans_w)
        if "error" in box:
            os.close(req_w)
            os.close(ans_r)
            stop.set()
            raise BackendError(f"{self.name}: cannot start the backend process: {box['error']}")
        self._proc, self._keeper_stop = box["proc"], stop
        self._requests = os.fdopen(req_w, "wb")
        self._answers = os.fdopen(ans_r, "rb")
        pickle.dump(self.spec, self._requests, protocol=pickle.HIGHEST_PROTOCOL)
        self._requests.flush()

    def _reap(self) -> None:
        """Forget the child (dead, or closed): the next call starts a new one."""
        for f in (self._requests, self._answers):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._requests = self._answers = None
        if self._proc is not None:
            try:
                self._proc.wait(CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._keeper_stop is not None:
            self._keeper_stop.set()
            self._keeper_stop = None

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._proc is None:
                self._spawn()
            try:
                pickle.dump((method, args), self._requests, protocol=pickle.HIGHEST_PROTOCOL)
                self._requests.flush()
                status, value = pickle.load(self._answers)
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                self._reap()
                raise BackendError(f"{self.name}: the backend process died ({type(e).__name__}); "
                                   "restarting it at the next call") from None
        if status == "err":
            raise BackendError(value)
        return value

    # ------------------------------------------------------------------ Backend
    def connect(self) -> None:
        self._call("connect")

    def close(self) -> None:
        with self._lock:
            if self._proc is None:
                return
            try:
                pickle.dump(("close", ()), self._requests)
                self._requests.flush()
                pickle.load(self._answers)
            except (OSError, EOFError, pickle.UnpicklingError):
                pass
            self._reap()

    def list_collections(self) -> list[str]:
        return list(self._call("list_collections"))

    def ensure_collection(self, name: str, distance: str, dimension: int | None) -> None:
        self._call("ensure_collection", name, distance, dimension)

    def drop_collection(self, name: str) -> None:
        self._call("drop_collection", name)

    def upsert(self, name: str, ids: Any, embeddings: Any, metadatas: Any, documents: Any) -> None:
        self._call("upsert", name, list(ids), list(embeddings), list(metadatas), list(documents))

    def delete(self, name: str, ids: Any) -> None:
        self._call("delete", name, list(ids))

    def count(self, name: str) -> int:
        return int(self._call("count", name))

    def page(self, name: str, cursor: Any, limit: int) -> tuple[list[StoredRecord], Any]:
        return self._call("page", name, cursor, limit)  # type: ignore[no-any-return]

    def query(self, name: str, embedding: Any, k: int) -> list[StoredRecord]:
        return self._call("query", name, list(embedding), k)  # type: ignore[no-any-return]


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # EOF on the request pipe still ends us, once the current call returns
    if os.getppid() != parent:  # the daemon died before prctl took effect
        os._exit(0)


def child_main(argv: list[str]) -> int:
    req_fd, ans_fd, parent = int(argv[0]), int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the daemon: it closes us itself
    requests = os.fdopen(req_fd, "rb")
    answers = os.fdopen(ans_fd, "wb")
    try:
        module, cls, config, store_path = pickle.load(requests)
    except (EOFError, OSError, pickle.UnpicklingError):
        return 0
    backend = getattr(importlib.import_module(module), cls)(config, store_path)
    while True:
        try:
            method, args = pickle.load(requests)
        except (EOFError, OSError, pickle.UnpicklingError):
            break
        try:
            answer: tuple[str, Any] = ("ok", getattr(backend, method)(*args))
        except BackendError as e:
            answer = ("err", str(e))
        except Exception as e:
            answer = ("err", f"{backend.name}: {type(e).__name__}: {e}")
        try:
            pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
        except OSError:
            break
        if method == "close":
            break
    try:
        backend.close()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
