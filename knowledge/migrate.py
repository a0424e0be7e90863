"""``kb migrate``: move a knowledge base's vectors to another store (FAISS <-> Milvus) in place.

Nothing is embedded again: the docstore holds every vector. The copy is written beside the live index while
readers go on searching the old one; a copy into Milvus records its progress after each batch, so a run that
stops goes on where it stopped. The copy is checked (counts, and a sample of ids whose stored vectors must
match and find themselves) before one commit switches the base; the old copy stays until ``--drop-source``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from knowledge.docstore import Docstore
from knowledge.milvus import MilvusError, MilvusIndex, MilvusKind, check_server_uri
from knowledge.store import PREVIOUS_STORE, KnowledgeBase, StoreError
from knowledge.stores import VectorStores
from knowledge.vectors import VectorIndex

_BATCH = 4096  # rows per copied batch (and per progress record)
_STATE = "migration"  # meta key: the copy in progress (store, uri, collection, generation, last id copied)


@dataclass
class Migration:
    """What ``kb migrate --json`` prints."""

    name: str
    source: str
    target: str
    uri: str
    vectors: int = 0
    copied: int = 0  # copied by this run (less than vectors when it went on from an earlier one)
    checked: int = 0  # sampled ids whose vectors were compared and searched
    seconds: float = 0.0
    switched: bool = False  # False: the base was in that store already
    dropped: list[str] = field(default_factory=list)  # what --drop-source removed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def migrate(
    kb: KnowledgeBase,
    stores: VectorStores,
    target: str,
    uri: str = "",
    *,
    sample: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> Migration:
    """Copy ``kb``'s vectors into ``target`` (faiss | milvus at ``uri``), check the copy, switch the base."""
    uri = check_server_uri(uri) if target == "milvus" else ""
    started = time.monotonic()
    try:
        with kb.exclusive() as docstore:
            return _migrate(kb, docstore, stores, target, uri, sample, progress, started)
    except sqlite3.Error as err:  # a full disk while recording progress or switching: the base is unchanged
        raise StoreError(
            f"could not migrate knowledge base {kb.name!r} ({err}); it still uses its old store",
            "free disk space, then run the same command again: the copy goes on where it stopped",
        ) from err


def _migrate(
    kb: KnowledgeBase,
    docstore: Docstore,
    stores: VectorStores,
    target: str,
    uri: str,
    sample: int,
    progress: Callable[[int, int], None] | None,
    started: float,
) -> Migration:
    if not kb.manifest.base_id:  # a base from before base ids: its collections get a name of their own
        with docstore.conn:
            docstore.set_meta([("base_id", uuid.uuid4().hex)])
        kb.manifest = replace(kb.manifest, base_id=docstore.meta()["base_id"])
    m = kb.manifest
    report = Migration(kb.name, _where(m.store, m.store_uri), _where(target, uri), uri)
    report.vectors = docstore.vector_count()
    if (m.store, m.store_uri) == (target, uri):
        return report
    kind = stores.kind(kb.root, target, uri, m.base_id)
    index: VectorIndex
    if isinstance(kind, MilvusKind):
        index, report.copied = _copy_to_milvus(docstore, kind, m.dim, m.generation, progress)
    else:
        index = kind.create(m.dim)
        for ids, vecs in docstore.vector_batches(_BATCH):
            index.add(ids, vecs)
            report.copied += len(ids)
            if progress:
                progress(report.copied, report.vectors)
    problems, report.checked = check_copy(index, docstore, sample)
    if problems:
        with docstore.conn:
            docstore.delete_meta(_STATE)  # the next run starts the copy anew
        if isinstance(index, MilvusIndex):
            with contextlib.suppress(MilvusError):
                index.kind.call("drop a failed copy", "drop_collection", index.collection)
        raise StoreError(
            f"the copy of knowledge base {kb.name!r} in {report.target} failed its check: {'; '.join(problems)}",
            "the base still uses its old store; run the same command again to copy anew",
        )
    previous = {
        "store": m.store,
        "uri": m.store_uri,
        "base_id": m.base_id,
        "collections": [c for c in _collections(kb) if c != getattr(index, "collection", None)],
    }
    kb.move_to(target, uri, kind, index, previous)
    report.switched = True
    report.seconds = round(time.monotonic() - started, 3)
    return report


def drop_source(kb: KnowledgeBase, stores: VectorStores) -> list[str]:
    """Remove the copy a migration left in the old store: its index files, its Milvus collections (not ones
    the base uses now) or its Milvus Lite folder. Returns what went."""
    with kb.exclusive() as docstore:
        raw = docstore.meta().get("previous_store")
        if not raw:
            return []
        previous = json.loads(raw)
        dropped: list[str] = []
        folder = kb.root / PREVIOUS_STORE
        if folder.exists():
            shutil.rmtree(folder)
            dropped.append(f"{PREVIOUS_STORE}/")
        if previous.get("store") == "milvus":
            kind = stores.milvus_kind(kb.root, previous.get("uri", ""), previous.get("base_id", ""))
            in_use = getattr(kb.kind, "prefix", None) == kind.prefix and getattr(kb.kind, "uri", None) == kind.uri
            if kind.lite and not in_use:
                kind.close()
                shutil.rmtree(kind.uri, ignore_errors=True)
                dropped.append(f"{kind.uri.rsplit('/', 1)[-1]} (Milvus Lite)")
            elif not kind.lite:
                current = _current_collection(kb)
                for name in previous.get("collections", []):
                    if name != current and name in kind.collections():
                        kind.call("drop a collection", "drop_collection", name)
                        dropped.append(f"collection {name}")
        with docstore.conn:
            docstore.delete_meta("previous_store")
        return dropped


def _copy_to_milvus(
    docstore: Docstore,
    kind: MilvusKind,
    dim: int,
    generation: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[MilvusIndex, int]:
    """Rows go in id order; after each batch the last id copied is committed to the docstore, so a stopped
    copy goes on from there (rows past it, from a batch cut short, are deleted first)."""
    total = docstore.vector_count()
    state = json.loads(docstore.meta().get(_STATE) or "null")
    fresh = {"store": "milvus", "uri": kind.uri, "generation": generation, "dim": dim}
    after: int | None = None
    if (
        isinstance(state, dict)
        and all(state.get(k) == v for k, v in fresh.items())
        and state.get("collection") in kind.collections()
    ):
        index = MilvusIndex(kind, state["collection"], dim, generation=0)
        after = state.get("after")
        # rows past the last recorded id are from a batch cut short (the first one too): they go again
        cut = -1 if after is None else int(after)
        kind.call("drop a cut-short batch", "delete", index.collection, filter=f"tid > {cut}")
    else:
        index = kind.create(dim)  # tagged generation 0: visible at every generation the base reaches
        state = {**fresh, "collection": index.collection, "after": None}
        _save_state(docstore, state)
    done = len(index) if after is not None else 0
    copied = 0
    for ids, vecs in docstore.vector_batches(_BATCH, after_id=after):
        index.add(ids, vecs)
        copied += len(ids)
        state["after"] = int(ids[-1])
        _save_state(docstore, state)
        if progress:
            progress(done + copied, total)
    kind.call("flush", "flush", index.collection)
    return index, copied


def _save_state(docstore: Docstore, state: dict[str, Any]) -> None:
    with docstore.conn:
        docstore.set_meta([(_STATE, json.dumps(state))])


def check_copy(index: VectorIndex, docstore: Docstore, sample: int) -> tuple[list[str], int]:
    """Problems with a copied index: its count, and for a sample of ids spread over the base, the stored vector
    (where the index can return it) and a search that must find the id itself."""
    problems: list[str] = []
    total = docstore.vector_count()
    if len(index) != total:
        problems.append(f"it holds {len(index)} vectors, the docstore {total}")
    ids = docstore.sample_text_ids(sample)
    expected = docstore.vectors(ids)
    stored = index.vectors(ids) if isinstance(index, MilvusIndex) else None
    for tid in ids:
        vector = expected[tid]
        if stored is not None:
            got = stored.get(tid)
            if got is None or float(np.dot(got, vector)) < 0.9999 * float(np.dot(vector, vector)):
                problems.append(f"text {tid}: its vector differs")
                continue
        # its own id near the top with its own score; or another text with the same vector (an approximate
        # index, or two texts embedded alike, may rank that one first)
        own = 0.999 * float(np.dot(vector, vector))
        if not any(i == tid or s >= own for i, s in index.search(vector, 10)):
            problems.append(f"text {tid}: a search for its own vector does not find it")
        if len(problems) >= 5:
            break
    return problems, len(ids)


def _collections(kb: KnowledgeBase) -> list[str]:
    """The old store's collections on a Milvus server, for --drop-source. Not asked of Milvus Lite, whose whole
    folder goes (and which another process, the running app, may hold: the copy never needs it)."""
    kind = kb.kind
    if not isinstance(kind, MilvusKind) or kind.lite:
        return []
    try:
        return kind.collections()
    except MilvusError:  # a server that is gone: leaving it is why one migrates; nothing there to drop later
        return []


def _current_collection(kb: KnowledgeBase) -> str | None:
    with kb.snapshot() as snap:
        return getattr(snap.index, "collection", None)


def _where(store: str, uri: str) -> str:
    return f"milvus ({uri})" if store == "milvus" and uri else ("milvus (Lite)" if store == "milvus" else store)
