"""A backend run in a child process, so that it cannot freeze the daemon.

Measured here: chromadb 1.5's embedded client holds the GIL for the whole of
``collection.upsert`` (a thread spinning beside an upsert of 1,000 384-dim
records got 0% of the time for 1.4–3.3 s).  In-process, every FUSE request of
every area waits that long whenever the sync agent applies a batch, and the
writes that the agent should overlap with are serialised behind it.  In a child
process Chroma runs on its own GIL (and core) while the daemon keeps answering.

Protocol: length-prefixed pickled ``(method, args)`` requests, ``("ok", result)``,
``("err", message)`` or ``("bad", message)`` (a bad query) answers, on two channels
(a pipe each way): ``calls``, used from worker threads one call at a time (the sync
agent's upserts, exports, counts), and ``searches``, awaited by the trio loop itself
(`IsolatedBackend.asearch`: no worker-thread hop; the child embeds the query text
too, so a text search is one round trip, as in-process use is one call).  The child
serves searches first, and between slices of an upsert (`READ_SLICE` records), so a
search waits for at most one slice, not for the sync agent's whole batch: Chroma
holds the GIL through an upsert, so threads in the child could not overlap them, and
a second process opening the same database would not see the first one's writes.
A search served mid-batch sees part of the batch; the area's queue overlay still
holds the whole batch until the upsert returns, so results stay read-your-writes.
The child exits
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
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import Any

from kfs.vectors.backends.base import Backend, BackendError, StoredRecord

PR_SET_PDEATHSIG = 1
CLOSE_WAIT = 30.0  # seconds a closing child may take to close its database
#: records per Chroma upsert call in the child; searches are served between slices.  Measured
#: here (5,000 x 384-dim, against calls of 1,000): slices of 500 cost ~4% of the upsert rate, 250
#: ~9%, 100 ~22%; a search waits for one slice (0.2-0.5 s) instead of the whole batch.
READ_SLICE = 500
_LENGTH = struct.Struct("<I")


class BadQuery(Exception):
    """The child refused a search (the query's dimension is not the collection's)."""


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _receive(fd: int) -> Any:
    (n,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
    return pickle.loads(_read_exactly(fd, n))


def _answer(status: str, value: Any) -> Any:
    if status == "err":
        raise BackendError(value)
    if status == "bad":
        raise BadQuery(value)
    return value


class IsolatedBackend(Backend):
    def __init__(self, module: str, cls: str, config: Any, store_path: str, store_fd: int | None) -> None:
        self.spec = (module, cls, config, store_path)
        self.store_fd = store_fd
        local = getattr(importlib.import_module(module), cls)(config, store_path)  # cheap: no database
        self.name = local.name
        self.label = str(getattr(local, "label", local.name))
        self._proc: subprocess.Popen[bytes] | None = None
        self._keeper_stop: threading.Event | None = None
        self._requests = -1  # the calls channel (worker threads, under _lock)
        self._answers = -1
        self._lock = threading.Lock()  # one call at a time on the calls channel
        # The searches channel: (generation, request fd, answer fd) of the current child, handed
        # to the trio side (`_SearchChannel`), which owns and closes them once it has taken them.
        self._search_fds: tuple[int, int, int] | None = None
        self._generation = 0
        self._handover = threading.Lock()  # _search_fds between a respawning thread and trio
        self._channel: _SearchChannel | None = None

    # ------------------------------------------------------------------ the child
    def _spawn(self) -> None:
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        sreq_r, sreq_w = os.pipe()
        sans_r, sans_w = os.pipe()
        child_ends = [req_r, ans_w, sreq_r, sans_w]
        fds = child_ends + ([self.store_fd] if self.store_fd is not None else [])
        started = threading.Event()
        stop = threading.Event()
        box: dict[str, Any] = {}

        def keeper() -> None:
            # The child's PDEATHSIG fires when the thread that forked it ends: this one, which
            # therefore waits until the child is done with.
            try:
                box["proc"] = subprocess.Popen(
                    [sys.executable, "-m", "kfs.vectors.backends.isolated",
                     *(str(fd) for fd in child_ends), str(os.getpid())],
                    pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
            except OSError as e:
                box["error"] = e
            started.set()
            stop.wait()

        threading.Thread(target=keeper, name="kfs-vectors-backend-keeper", daemon=True).start()
        started.wait()
        for fd in child_ends:
            os.close(fd)
        if "error" in box:
            for fd in (req_w, ans_r, sreq_w, sans_r):
                os.close(fd)
            stop.set()
            raise BackendError(f"{self.name}: cannot start the backend process: {box['error']}")
        self._proc, self._keeper_stop = box["proc"], stop
        self._requests, self._answers = req_w, ans_r
        self._set_search_fds((sreq_w, sans_r))
        _write_all(self._requests, _frame(self.spec))

    def _set_search_fds(self, fds: tuple[int, int] | None) -> None:
        with self._handover:
            old, self._generation = self._search_fds, self._generation + 1
            self._search_fds = (self._generation, *fds) if fds is not None else None
        if old is not None:  # never taken by the trio side: ours to close
            os.close(old[1])
            os.close(old[2])

    def take_search_fds(self, generation: int) -> tuple[int, int, int] | None:
        """The current child's searches channel, if newer than ``generation`` (the trio side owns it then)."""
        with self._handover:
            fds = self._search_fds
            if fds is None or fds[0] <= generation:
                return None
            self._search_fds = None
            return fds

    @property
    def generation(self) -> int:
        return self._generation

    def _reap(self) -> None:
        """Forget the child (dead, or closed): the next call starts a new one."""
        for fd in (self._requests, self._answers):
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass
        self._requests = self._answers = -1
        self._set_search_fds(None)  # a searcher holding the old one gets EOF from the dead child
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
                _write_all(self._requests, _frame((method, args)))
                status, value = _receive(self._answers)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error) as e:
                self._reap()
                raise BackendError(f"{self.name}: the backend process died ({type(e).__name__}); "
                                   "restarting it at the next call") from None
        return _answer(status, value)

    # ------------------------------------------------------------------ Backend
    def connect(self) -> None:
        self._call("connect")

    def close(self) -> None:
        with self._lock:
            if self._proc is None:
                return
            try:
                _write_all(self._requests, _frame(("close", ())))
                _receive(self._answers)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error):
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

    async def asearch(self, name: str, vector: list[float] | None, text: str | None, k: int,
                      dimension: int | None, model: str | None, texts: list[str]) -> Any:
        """One search on the searches channel, awaited on the trio loop (see `child_search`).

        Raises `ChannelUnavailable` when there is no child yet (or it just died): the caller
        takes the thread path, whose call starts a new one."""
        if self._channel is None:
            self._channel = _SearchChannel(self)
        return await self._channel.call(("search", (name, vector, text, k, dimension, model, texts)))


class ChannelUnavailable(Exception):
    """No child process to search in right now (not started yet, or dead): use the calls channel."""


class _SearchChannel:
    """The trio side of the searches channel: frames written and read on the loop, one search at a time."""

    def __init__(self, backend: IsolatedBackend) -> None:
        import trio

        self.backend = backend
        self.lock = trio.Lock()
        self.generation = 0
        self.send: Any = None
        self.recv: Any = None
        self.buf = b""

    def _drop(self) -> None:
        for stream in (self.send, self.recv):
            if stream is not None:
                stream.close()
        self.send = self.recv = None
        self.buf = b""

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.recv.receive_some(max(n - len(self.buf), 1 << 16))
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def call(self, request: Any) -> Any:
        import trio

        async with self.lock:
            fresh = self.backend.take_search_fds(self.generation)
            if fresh is not None:  # a new child: leave the old one's pipes
                self._drop()
                self.generation, req_w, ans_r = fresh
                self.send, self.recv = trio.lowlevel.FdStream(req_w), trio.lowlevel.FdStream(ans_r)
            elif self.generation != self.backend.generation:  # the child was closed or reaped
                self._drop()
            if self.send is None:
                raise ChannelUnavailable
            try:
                await self.send.send_all(_frame(request))
                (n,) = _LENGTH.unpack(await self._read_exactly(_LENGTH.size))
                status, value = pickle.loads(await self._read_exactly(n))
            except (OSError, EOFError, pickle.UnpicklingError, struct.error, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                self._drop()  # the calls channel notices the death too, and restarts the child
                raise ChannelUnavailable from None
            except BaseException:
                # Cancelled mid-call (the daemon is stopping): the channel is out of step with
                # the child; drop it, searches take the calls channel until the next child.
                self._drop()
                raise
        return _answer(status, value)


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # EOF on the request pipe still ends us, once the current call returns
    if os.getppid() != parent:  # the daemon died before prctl took effect
        os._exit(0)


class _Child:
    """The child's side: serves the calls channel, and the searches channel first."""

    def __init__(self, backend: Any, config: Any, calls: tuple[int, int], searches: tuple[int, int]) -> None:
        self.backend = backend
        self.config = config
        self.calls = calls
        self.searches: tuple[int, int] | None = searches
        self.embedder: Any = None

    def run(self) -> None:
        while True:
            watch = [self.calls[0]] + ([self.searches[0]] if self.searches else [])
            ready, _, _ = select.select(watch, [], [])
            if self.searches and self.searches[0] in ready:
                self.serve_search()
                continue  # searches first
            try:
                method, args = _receive(self.calls[0])
            except (EOFError, OSError, pickle.UnpicklingError, struct.error):
                return
            answer = self.perform(method, args)
            try:
                _write_all(self.calls[1], _frame(answer))
            except OSError:
                return
            if method == "close":
                return

    def serve_pending_searches(self) -> None:
        while self.searches:
            ready, _, _ = select.select([self.searches[0]], [], [], 0)
            if not ready:
                return
            self.serve_search()

    def serve_search(self) -> None:
        assert self.searches is not None
        try:
            method, args = _receive(self.searches[0])
            _write_all(self.searches[1], _frame(self.perform(method, args)))
        except (EOFError, OSError, pickle.UnpicklingError, struct.error):
            # The daemon dropped this channel (stopping, or a cancelled search): searches go
            # through the calls channel from now on.
            for fd in self.searches:
                os.close(fd)
            self.searches = None

    def perform(self, method: str, args: Any) -> tuple[str, Any]:
        try:
            if method == "upsert":
                return "ok", self.upsert(*args)
            if method == "search":
                return "ok", self.search(*args)
            return "ok", getattr(self.backend, method)(*args)
        except BadQuery as e:
            return "bad", str(e)
        except BackendError as e:
            return "err", str(e)
        except Exception as e:
            return "err", f"{self.backend.name}: {type(e).__name__}: {e}"

    def upsert(self, name: str, ids: list[str], embeddings: list[Any], metadatas: list[Any],
               documents: list[Any]) -> None:
        """In slices, serving the searches that came meanwhile between them (see READ_SLICE)."""
        for start in range(0, len(ids), READ_SLICE):
            end = start + READ_SLICE
            self.backend.upsert(name, ids[start:end], embeddings[start:end], metadatas[start:end],
                                documents[start:end])
            if end < len(ids):
                self.serve_pending_searches()

    def search(self, name: str, vector: list[float] | None, text: str | None, k: int, dimension: int | None,
               model: str | None, texts: list[str]) -> tuple[list[float], list[list[float]], list[StoredRecord]]:
        """Embed ``text`` (if no ``vector``) and ``texts`` (queued text-only records) in one run of
        the model, then query: what in-process use does in one call.  Returns the query vector, the
        vectors of ``texts`` and the nearest ``k`` records."""
        wanted = ([] if vector is not None else [text or ""]) + texts
        vectors: list[list[float]] = []
        if wanted:
            if self.embedder is None or self.embedder.model != model:
                from kfs.vectors.embedder import MiniLMEmbedder

                self.embedder = MiniLMEmbedder(model or "all-MiniLM-L6-v2")
            vectors = self.embedder.embed(wanted)
        if vector is None:
            vector = vectors.pop(0)
        if dimension is not None and len(vector) != dimension:
            raise BadQuery(f"the query has {len(vector)} dimensions, the collection has {dimension}")
        found = self.backend.query(name, vector, k) if dimension is not None else []
        return vector, vectors, found


def child_main(argv: list[str]) -> int:
    calls = (int(argv[0]), int(argv[1]))
    searches = (int(argv[2]), int(argv[3]))
    parent = int(argv[4])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the daemon: it closes us itself
    try:
        module, cls, config, store_path = _receive(calls[0])
    except (EOFError, OSError, pickle.UnpicklingError, struct.error):
        return 0
    backend = getattr(importlib.import_module(module), cls)(config, store_path)
    try:
        _Child(backend, config, calls, searches).run()
    finally:
        try:
            backend.close()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
