"""Milvus as a knowledge base's vector index: Milvus Lite in the base's folder, or a Milvus server or cluster.

The SQLite docstore stays the source of truth, as with FAISS: it holds the texts, the BM25 index and every
vector, so the lexical half of hybrid search and a migration back to FAISS read the same rows whichever
store is used, and a lost collection is rebuilt without embedding again. Milvus holds one row per text:
``tid`` (the docstore's text id), ``gen`` (the generation that added it) and the vector.

Snapshots without copies: a search at generation G sees the rows with ``gen <= G``, so the rows of a
transaction that has not committed (inserted before the SQLite commit) stay hidden, and a crashed
transaction's rows are purged when the next one begins. Removals are not applied at once: until the index is
saved they are hidden by the filter (``not (tid in [...] and gen <= R)``, R the removing generation, since a
text id may be given out again later), so a rolled-back transaction loses nothing. Saving applies them,
flushes, and writes a small JSON marker (``index-G.milvus.json``, collection and generation) where FAISS
writes its file; readers of a newer generation hide what the docstore removed since the marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ZhikuError
from common.files import atomic_write_bytes
from common.retry import one_line
from knowledge.vectors import VectorIndexError

MARKER_FORMAT = "zhiku-milvus-index/1"
SERVER_SCHEMES = ("http://", "https://", "tcp://")  # what pymilvus takes for a server; anything else: a Lite folder
LITE_FILE = "milvus-{id}.db"  # Milvus Lite's data folder inside the base (named per base: see lite_path)
_MAX_K = 16384  # Milvus's largest limit per search
_INSERT_ROWS = 1000  # rows per insert call: bounded request size on a server, and progress for Lite
_MAX_IDS_IN_FILTER = 4096  # physical deletes by filter, in slices of this many text ids


class MilvusError(ZhikuError, RuntimeError):
    """Milvus cannot be reached or refused a request; the message says what to do."""


def check_server_uri(uri: str) -> str:
    """``store.uri`` / ``kb migrate --uri``: empty (Milvus Lite) or a server's http(s):// or tcp:// URI."""
    if uri and not uri.startswith(SERVER_SCHEMES):
        raise MilvusError(
            f"Milvus URI {uri!r} is neither empty (Milvus Lite in the base's folder) nor a server's",
            "write it as http://host:19530 (or https://, tcp://), or leave it empty",
        )
    return uri


def collection_prefix(base_id: str) -> str:
    """Collection names are ASCII letters, digits and '_': a base (any name, any script) is known by its id."""
    return "zhiku_" + hashlib.sha256(base_id.encode()).hexdigest()[:16]


def lite_path(root: Path, base_id: str) -> Path:
    """Milvus Lite's folder for a base. Named by the base id: a base deleted and made again under the same name
    never meets the old one's Lite server, which this process may still hold open."""
    return root / LITE_FILE.format(id=collection_prefix(base_id)[6:])


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as err:
        raise MilvusError(
            "store.backend milvus needs pymilvus", "pip install -r requirements.txt (pymilvus and milvus-lite)"
        ) from err
    return pymilvus


class MilvusKind:
    """Makes and loads the Milvus indexes of one knowledge base. ``uri``: a Milvus Lite folder, or a server's
    ``http://host:19530``. One client per kind, opened on first use, shared by every index it makes."""

    name = "milvus"
    shared = True  # the index lives outside this process: readers never rebuild it (see KnowledgeBase)

    def __init__(self, uri: str, prefix: str, *, token: str = "", index_type: str = "auto", timeout: float = 30.0):
        self.uri = uri
        self.prefix = prefix
        self.token = token
        self.lite = not uri.startswith(SERVER_SCHEMES)
        self.index_type = ("FLAT" if self.lite else "AUTOINDEX") if index_type == "auto" else index_type
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def where(self) -> str:
        return "Milvus Lite in the knowledge base's folder" if self.lite else f"the Milvus server at {self.uri}"

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        pymilvus = _pymilvus()
        try:
            if self.lite:
                Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            return pymilvus.MilvusClient(self.uri, token=self.token, timeout=self.timeout)
        except Exception as err:  # pymilvus wraps every connection failure in its own exception types
            if self.lite and _locked(Path(self.uri) / "LOCK"):
                raise MilvusError(
                    f"another process has this knowledge base's Milvus Lite store open ({self.uri})",
                    "Milvus Lite serves one process at a time: ingest from the running app's knowledge-base page "
                    "or stop it first, or run a Milvus server and set store.uri",
                ) from err
            raise MilvusError(
                f"cannot connect to {self.where()}: {one_line(str(err))}",
                "start Milvus (or check store.uri and store.milvus.token), then run the same command again",
            ) from err

    def call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        """A client call; a failure becomes one clear line that says where and what."""
        try:
            return getattr(self.client, fn)(*args, **kwargs)
        except MilvusError:
            raise
        except Exception as err:  # pymilvus raises MilvusException and grpc errors alike
            raise MilvusError(
                f"{self.where()} failed to {what}: {one_line(str(err))}",
                "check that Milvus is running and reachable, then run the same command again; what the docstore "
                "holds is intact",
            ) from err

    # ----- the VectorIndexKind protocol ----------------------------------------------------------------
    def create(self, dim: int) -> MilvusIndex:
        collection = f"{self.prefix}_{uuid.uuid4().hex[:8]}"
        self.create_collection(collection, dim)
        return MilvusIndex(self, collection, dim, generation=0)

    def create_collection(self, collection: str, dim: int) -> None:
        data_type = _pymilvus().DataType
        schema = self.call("describe a schema", "create_schema", auto_id=True, enable_dynamic_field=False)
        schema.add_field("pk", data_type.INT64, is_primary=True)
        schema.add_field("tid", data_type.INT64)
        schema.add_field("gen", data_type.INT64)
        schema.add_field("vec", data_type.FLOAT_VECTOR, dim=dim)
        params = self.call("describe an index", "prepare_index_params")
        params.add_index(field_name="vec", index_type=self.index_type, metric_type="IP")
        # Strong: a search sees every row inserted before it (a server's default, Bounded, may not)
        self.call(
            "create a collection",
            "create_collection",
            collection,
            schema=schema,
            index_params=params,
            consistency_level="Strong",
        )

    def load(self, path: Path) -> MilvusIndex:
        marker = read_marker(path)
        collection, dim, generation = marker["collection"], marker["dim"], marker["generation"]
        if not self.call("list collections", "has_collection", collection):
            raise VectorIndexError(f"{path.name}: collection {collection} is not in {self.where()}")
        with contextlib.suppress(MilvusError):  # a server restarted with the collection released
            self.call("load a collection", "load_collection", collection)
        return MilvusIndex(self, collection, dim, generation=generation)

    def file_name(self, generation: int) -> str:
        return f"index-{generation}.milvus.json"

    def discard(self, path: Path, keep: Path) -> None:
        """Remove an older marker; drop the collections of this base that the kept marker does not use."""
        path.unlink(missing_ok=True)
        # best effort, after a commit that already succeeded: a collection left here goes at the next save
        with contextlib.suppress(VectorIndexError, MilvusError):
            kept = read_marker(keep)["collection"]
            for name in self.collections():
                if name != kept:
                    self.call("drop an old collection", "drop_collection", name)

    # ----- housekeeping ------------------------------------------------------------------------------------
    def collections(self) -> list[str]:
        """This base's collections (the current one, an unfinished migration's, a rebuilt one's)."""
        return [c for c in self.call("list collections", "list_collections") if c.startswith(self.prefix + "_")]

    def drop_all(self) -> None:
        for name in self.collections():
            self.call("drop a collection", "drop_collection", name)

    def close(self) -> None:
        """Close the client; for Milvus Lite also stop this process's server of the folder, which gives its lock
        back to other processes (it would otherwise run until the process exits)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a connection that is already gone is no error
                client.close()
        if self.lite:
            with contextlib.suppress(ImportError):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)


def read_marker(path: Path) -> dict[str, Any]:
    """The marker JSON of a saved Milvus index; VectorIndexError when missing or damaged."""
    try:
        marker = json.loads(path.read_bytes())
    except OSError as err:
        raise VectorIndexError(f"{path.name}: {err.strerror or err}") from err
    except ValueError as err:
        raise VectorIndexError(f"{path.name} is damaged") from err
    if (
        not isinstance(marker, dict)
        or marker.get("format") != MARKER_FORMAT
        or not isinstance(marker.get("collection"), str)
        or not all(isinstance(marker.get(k), int) for k in ("dim", "generation"))
    ):
        raise VectorIndexError(f"{path.name} is not a Milvus index marker")
    return marker


class MilvusIndex:
    """One collection, seen at one generation. The writer's working index also tags what it adds with the
    transaction's generation (:meth:`begin`) and applies removals when saved; readers' views only search."""

    def __init__(self, kind: MilvusKind, collection: str, dim: int, *, generation: int) -> None:
        self.kind = kind
        self.collection = collection
        self._dim = dim
        self._generation = generation  # rows with gen <= this are visible, and adds are tagged with it
        self._hidden: dict[int, set[int]] = {}  # removing generation -> text ids removed then, not yet deleted
        self._count: int | None = None

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def generation(self) -> int:
        return self._generation

    # ----- generations ---------------------------------------------------------------------------------
    def begin(self, generation: int) -> None:
        """A write transaction of ``generation`` starts: rows a crashed one of that generation or later left are
        purged, and what is added from now on is tagged with it."""
        self.kind.call("purge an unfinished transaction", "delete", self.collection, filter=f"gen >= {generation}")
        self._generation = generation
        self._count = None

    def catch_up(self, generation: int, removals: Iterable[tuple[int, int]]) -> None:
        """See ``generation``: the rows it added are in the collection already (inserted before their commit);
        hide the texts the docstore removed after the marker, as (text id, removing generation)."""
        self._generation = generation
        for tid, removed_in in removals:
            self._hidden.setdefault(int(removed_in), set()).add(int(tid))
        self._count = None

    def _filter(self) -> str:
        parts = [f"gen <= {self._generation}"]
        for removed_in, tids in sorted(self._hidden.items()):
            parts.append(f"not ({_tid_in(tids)} and gen <= {removed_in})")
        return " and ".join(parts)

    # ----- the VectorIndex protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        if self._count is None:
            rows = self.kind.call(
                "count vectors", "query", self.collection, filter=self._filter(), output_fields=["count(*)"]
            )
            self._count = int(rows[0]["count(*)"])
        return self._count

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if vectors.shape[1] != self._dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dimensions, the index {self._dim}")
        # an id removed in this same generation and added again (the docstore frees ids only when a transaction
        # ends): its uncommitted rows go now, its committed ones stay hidden (bound one generation lower, so the
        # new row is not) until the save deletes them; a rollback then loses nothing committed
        again = self._hidden.get(self._generation, set()) & set(ids.tolist())
        if again:
            for part in _slices(sorted(again), _MAX_IDS_IN_FILTER):
                where = f"{_tid_in(part)} and gen >= {self._generation}"
                self.kind.call("delete uncommitted vectors", "delete", self.collection, filter=where)
            self._hidden[self._generation] -= again
            self._hidden.setdefault(self._generation - 1, set()).update(again)
        for start in range(0, len(ids), _INSERT_ROWS):
            rows = [
                {"tid": int(t), "gen": self._generation, "vec": v}
                for t, v in zip(ids[start : start + _INSERT_ROWS], vectors[start : start + _INSERT_ROWS], strict=True)
            ]
            self.kind.call("insert vectors", "insert", self.collection, rows)
        self._count = None

    def remove(self, ids: np.ndarray) -> None:
        tids = {int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)}
        if tids:
            self._hidden.setdefault(self._generation, set()).update(tids)
            self._count = None

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        return self._search(query, k, self._filter())

    def search_among(self, query: np.ndarray, k: int, tids: np.ndarray) -> list[tuple[int, float]] | None:
        """The same, among these text ids only (a metadata filter: the texts of some files), in Milvus; None
        for more ids than one filter expression should carry (the caller scores them exactly instead)."""
        if len(tids) > _MAX_IDS_IN_FILTER:
            return None
        if len(tids) == 0:
            return []
        return self._search(query, k, f"({self._filter()}) and {_tid_in(tids)}")

    def _search(self, query: np.ndarray, k: int, where: str) -> list[tuple[int, float]]:
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self._dim:
            raise ValueError(f"query vector has {q.shape[0]} dimensions, the index {self._dim}")
        if k <= 0:
            return []
        found = self.kind.call(
            "search",
            "search",
            self.collection,
            data=[q.tolist()],
            limit=min(k, _MAX_K),
            filter=where,
            output_fields=["tid"],
            search_params={"metric_type": "IP"},
        )
        return [(int(hit["entity"]["tid"]), float(hit["distance"])) for hit in found[0]]

    def save(self, path: Path) -> None:
        """Apply the pending removals, flush, and write the marker of this generation atomically."""
        for removed_in, tids in sorted(self._hidden.items()):
            self._delete_rows(sorted(tids), removed_in)
        self._hidden.clear()
        self.kind.call("flush", "flush", self.collection)
        marker = {
            "format": MARKER_FORMAT,
            "collection": self.collection,
            "dim": self._dim,
            "generation": self._generation,
            "count": len(self),
        }
        atomic_write_bytes(path, json.dumps(marker, indent=1).encode())

    def _delete_rows(self, tids: list[int], removed_in: int) -> None:
        for part in _slices(tids, _MAX_IDS_IN_FILTER):
            self.kind.call(
                "delete removed vectors",
                "delete",
                self.collection,
                filter=f"{_tid_in(part)} and gen <= {removed_in}",
            )
        self._count = None

    def vectors(self, tids: list[int]) -> dict[int, np.ndarray]:
        """The stored vectors of these text ids, as this index sees them (a migration's check)."""
        out: dict[int, np.ndarray] = {}
        for part in _slices(tids, _MAX_IDS_IN_FILTER):
            rows = self.kind.call(
                "read vectors",
                "query",
                self.collection,
                filter=f"({self._filter()}) and {_tid_in(part)}",
                output_fields=["tid", "vec"],
            )
            out.update({int(r["tid"]): np.asarray(r["vec"], dtype=np.float32) for r in rows})
        return out


def _locked(lock: Path) -> bool:
    """Whether another process holds Milvus Lite's lock on its folder (an advisory flock on LOCK in it)."""
    import fcntl

    try:
        with lock.open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _tid_in(tids: Iterable[int]) -> str:
    """A filter expression: the row's text id is one of these."""
    return f"tid in [{','.join(map(str, sorted(map(int, tids))))}]"


def _slices(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
