"""What several vectors test files share: a real JSON-over-HTTP server on 127.0.0.1.

The embedding endpoint tests (OpenAI-compatible ``/v1/embeddings``) and the Qdrant server
backend's REST test each answer differently; the server around the answer is this one.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from email.message import Message
from typing import Any

#: (method, path, headers, the request's JSON body or None) -> (status, JSON answer or None: no body)
Answer = Callable[[str, str, Message, Any], tuple[int, Any]]


class JsonServer:
    """``with JsonServer(answer) as server:`` serves on a free port of 127.0.0.1 until the block ends
    (then it is gone: connections are refused, which tests use as "the server went down")."""

    def __init__(self, answer: Answer) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                status, out = answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                if out is None:
                    self.end_headers()
                    return
                data = json.dumps(out).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def address(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> JsonServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
