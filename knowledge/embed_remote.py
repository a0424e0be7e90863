"""Embeddings from any OpenAI-compatible ``/v1/embeddings`` server: vLLM, text-embeddings-inference, OpenAI, or
another Zhiku (``python -m app serve`` answers ``POST /v1/embeddings``).

Texts go out in length-sorted batches of ``embedding.batch_size``, at most ``embedding.openai.concurrency`` requests in
flight per embedder (across all its callers), and come back in the input order, L2-normalised float32. A
request that cannot connect, times out, or gets 408, 429 or 5xx is retried ``embedding.openai.retries`` times with
exponential backoff and jitter, or after the server's ``Retry-After``; any other refusal fails at once. Every
failure is a :class:`RemoteEmbeddingError` naming the URL and what to change.

The model id is ``openai:<model>@<base_url>`` (the URL without credentials or a trailing slash). The
served name alone is not enough: two servers can serve two models under one name (vLLM's
``--served-model-name default``), so a knowledge base records the server too, and with ``backend: auto`` it is
searched through the server it was built with (:meth:`RemoteEmbedderFactory.settings_for_model`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from common.errors import BackendUnavailableError, ZhikuError
from common.retry import RETRY_STATUSES, retry_delay, server_error_message
from knowledge.embedding import EmbedderUnavailableError, EmbeddingSettings, Progress, normalise

BACKEND = "openai"
MAX_RETRY_DELAY_S = 60.0  # a longer Retry-After is cut to this: a run should fail visibly, not hang
_FIX_SERVER = (
    "check that the server (vLLM, text-embeddings-inference, ...) is running and reachable from here and that "
    "embedding.openai.base_url is its /v1 address; for a slow or busy server raise embedding.openai.timeout or "
    "embedding.openai.retries, or lower embedding.openai.concurrency"
)


class RemoteEmbeddingError(ZhikuError):
    """The embedding server refused or mangled a request; the message names its URL. On its own (a 400 for one
    text, say) it concerns that request: an ingest fails the file and goes on."""

    def __init__(self, message: str, fix: str = "", status: int | None = None) -> None:
        super().__init__(message, fix)
        self.status = status  # the HTTP status that ended it; None: no answer


class RemoteEmbedderUnavailable(RemoteEmbeddingError, BackendUnavailableError):
    """No request can succeed: the server is down or kept failing, or it refuses the key, the URL or the model.
    An ingest stops (what it committed stays) instead of failing every file after the same retries."""


class _Stopped(Exception):
    """Another batch of the same call failed (or its caller cancelled): this one gives up quietly."""


def public_url(url: str) -> str:
    """``url`` as a model id may hold it: no user:password, no trailing slash, scheme and host lower-cased."""
    parts = urlsplit(url.strip())
    netloc = parts.netloc.rpartition("@")[2].lower()
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), parts.query, parts.fragment))


def remote_model_id(base_url: str, model: str) -> str:
    return f"{BACKEND}:{model}@{public_url(base_url)}"


def _detail(response: httpx.Response) -> str:
    """The server's own words about an error, short and on one line (OpenAI's, TEI's or FastAPI's shape)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return server_error_message(body, response.text) or response.reason_phrase


class RemoteEmbedder:
    """An OpenAI-compatible embeddings server. Thread-safe; the HTTP connections open on first use."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "",
        dim: int | None = None,
        batch_size: int = 64,
        concurrency: int = 4,
        retries: int = 3,
        retry_backoff: float = 0.5,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        query_prefix: str = "",
        passage_prefix: str = "",
    ) -> None:
        if not model:
            raise EmbedderUnavailableError(
                "embedding.backend is openai but embedding.openai.model is empty",
                "set embedding.openai.model to the name the server serves the model under (vLLM: "
                "--served-model-name; text-embeddings-inference: its model id)",
            )
        self.base_url = base_url.strip().rstrip("/")
        self.endpoint = f"{self.base_url}/embeddings"
        self.model = model
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self._api_key = api_key
        self._configured_dim = dim
        self._dim = dim
        # the limit holds for every caller of this embedder together (an ingest and API requests, say)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    @classmethod
    def from_settings(cls, settings: EmbeddingSettings) -> RemoteEmbedder:
        remote = settings.openai
        return cls(
            remote.base_url,
            remote.model,
            api_key=remote.api_key.get_secret_value(),
            dim=remote.dim,
            batch_size=settings.batch_size,
            concurrency=remote.concurrency,
            retries=remote.retries,
            retry_backoff=remote.retry_backoff,
            timeout=remote.timeout,
            connect_timeout=remote.connect_timeout,
            query_prefix=remote.query_prefix,
            passage_prefix=remote.passage_prefix,
        )

    @property
    def model_id(self) -> str:
        return remote_model_id(self.base_url, self.model)

    @property
    def dim(self) -> int:
        """The vectors' length: configured, or learned from the server's first answer (asked now if needed)."""
        if self._dim is None:
            self._post([self.passage_prefix + "dim"], threading.Event())
        if self._dim is None:  # unreachable: every answer _post accepts sets it
            raise RemoteEmbeddingError(f"the server at {self.endpoint} did not tell the vectors' length")
        return self._dim

    def embed_documents(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # similar lengths together: less padding on servers that batch a request as one tensor
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        payloads = [[self.passage_prefix + texts[i] for i in idx] for idx in batches]
        results: list[np.ndarray] = [np.zeros(0, np.float32)] * len(batches)
        stop = threading.Event()
        if len(batches) == 1 or self.concurrency == 1:
            for b, payload in enumerate(payloads):
                results[b] = self._post(payload, stop)
                if progress:
                    progress(len(payload))
        else:
            pool = ThreadPoolExecutor(min(self.concurrency, len(batches)), thread_name_prefix="zhiku-embed")
            try:
                futures = {pool.submit(self._post, payload, stop): b for b, payload in enumerate(payloads)}
                for future in as_completed(futures):
                    b = futures[future]
                    results[b] = future.result()
                    if progress:  # called in the caller's thread, as the other embedders do
                        progress(len(payloads[b]))
            finally:
                # on a failure, or a progress callback that cancels: the other batches end at their next attempt
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for idx, matrix in zip(batches, results, strict=True):
            out[idx] = matrix
        return out

    def embed_query(self, text: str) -> np.ndarray:
        return self._post([self.query_prefix + text], threading.Event())[0]

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ----- one request ------------------------------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"User-Agent": "zhiku"}
                if self._api_key:
                    headers["Authorization"] = f"Bearer {self._api_key}"
                self._client = httpx.Client(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                    # one connection per slot: a request never waits for the pool, only for a slot
                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                )
            return self._client

    def _post(self, texts: list[str], stop: threading.Event) -> np.ndarray:
        """(len(texts), dim) normalised vectors for one batch, retried as the module docstring says."""
        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        problem, status = "", None
        for attempt in range(self.retries + 1):
            retry_after: str | None = None
            status = None
            with self._slots:
                if stop.is_set():
                    raise _Stopped
                try:
                    response = self._http().post(self.endpoint, json=body)
                except httpx.ConnectTimeout:
                    problem = f"no connection within embedding.openai.connect_timeout = {self.connect_timeout:g} s"
                except httpx.TimeoutException:
                    problem = f"no answer within embedding.openai.timeout = {self.timeout:g} s"
                except httpx.TransportError as err:
                    problem = f"cannot connect: {' '.join(str(err).split()) or type(err).__name__}"
                except (httpx.HTTPError, httpx.InvalidURL) as err:  # not a network problem: another try fails alike
                    raise RemoteEmbeddingError(
                        f"cannot send a request to the embedding server at {self.endpoint} ({err})",
                        "check embedding.openai.base_url",
                    ) from err
                else:
                    if response.status_code == 200:
                        return self._vectors(response, len(texts))
                    status = response.status_code
                    problem = f"HTTP {status}: {_detail(response)}"
                    if status not in RETRY_STATUSES:
                        raise self._refused(status, problem)
                    retry_after = response.headers.get("Retry-After")
            if attempt < self.retries and stop.wait(
                retry_delay(attempt, self.retry_backoff, retry_after, cap=MAX_RETRY_DELAY_S)
            ):
                raise _Stopped
        tries = "once" if self.retries == 0 else f"{self.retries + 1} times"
        raise RemoteEmbedderUnavailable(
            f"the embedding server at {self.endpoint} failed {tries} ({problem})", _FIX_SERVER, status=status
        )

    def _refused(self, status: int, problem: str) -> RemoteEmbeddingError:
        if status in (401, 403):
            fix = "check embedding.openai.api_key (or env ZHIKU_EMBEDDING__OPENAI__API_KEY)"
        elif status in (404, 405):
            fix = (
                "check embedding.openai.base_url (the server's /v1 address, without /embeddings) and "
                "embedding.openai.model (the name the server serves the model under)"
            )
        else:
            fix = (
                "check embedding.openai.model; if the texts are too long or too many for the server, lower "
                "chunking.chunk_size or embedding.batch_size"
            )
            return RemoteEmbeddingError(
                f"the embedding server at {self.endpoint} refused the request ({problem})", fix, status=status
            )
        return RemoteEmbedderUnavailable(
            f"the embedding server at {self.endpoint} refused the request ({problem})", fix, status=status
        )

    def _vectors(self, response: httpx.Response, n: int) -> np.ndarray:
        try:
            rows = response.json()["data"]
            if all(isinstance(row, dict) and "index" in row for row in rows):
                rows = sorted(rows, key=lambda row: int(row["index"]))  # OpenAI's order is by index
            matrix = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as err:
            raise RemoteEmbeddingError(
                f"the server at {self.endpoint} did not answer with OpenAI-style embeddings ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]})",
                "check that embedding.openai.base_url is the /v1 address of an OpenAI-compatible embeddings server",
                status=response.status_code,
            ) from err
        if matrix.ndim != 2 or matrix.shape[0] != n or matrix.shape[1] == 0:
            raise RemoteEmbeddingError(
                f"the server at {self.endpoint} answered {n} texts with an array of shape {matrix.shape}",
                "check that embedding.openai.base_url is the /v1 address of an OpenAI-compatible embeddings server",
                status=response.status_code,
            )
        self._learn_dim(int(matrix.shape[1]))
        return normalise(matrix)

    def _learn_dim(self, dim: int) -> None:
        with self._lock:
            if self._dim is None:
                self._dim = dim
            elif dim != self._dim:
                where = "embedding.openai.dim says" if self._configured_dim else "its first answer had"
                raise RemoteEmbeddingError(
                    f"the server at {self.endpoint} answered with {dim}-d vectors but {where} {self._dim}",
                    "set embedding.openai.dim to the model's vector length (or null to learn it), and check that the "
                    "server still serves the same model",
                )


class RemoteEmbedderFactory:
    """The ``openai`` backend as registered: builds a :class:`RemoteEmbedder` from the ``embedding:`` section,
    and turns a stored model id back into the settings that reach the same model on the same server."""

    def __call__(self, settings: EmbeddingSettings) -> RemoteEmbedder:
        return RemoteEmbedder.from_settings(settings)

    @staticmethod
    def settings_for_model(settings: EmbeddingSettings, model: str) -> EmbeddingSettings:
        """``model``: what follows ``openai:`` in a model id, i.e. ``<model>@<base_url>``."""
        found = re.fullmatch(r"(.+?)@(https?://[^@\s]+)", model)
        if not found:
            raise EmbedderUnavailableError(
                f"{BACKEND}:{model} is not a remote embedding model id ({BACKEND}:MODEL@URL)",
                "rebuild the knowledge base: `python -m app kb delete NAME`, then ingest again",
            )
        return settings.model_copy(
            update={"openai": settings.openai.model_copy(update={"model": found[1], "base_url": found[2]})}
        )
