"""Which vector store each knowledge base uses. A base records its own (``store``, ``store_uri`` in its
manifest), so ``store.backend`` in config.yml only decides for new bases, and ``kb migrate`` moves one."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from knowledge.docstore import Manifest
from knowledge.milvus import MilvusKind, collection_prefix, lite_path
from knowledge.store import StoreError
from knowledge.vectors import VectorIndexKind

STORES = ("faiss", "milvus")
StoreName = Literal["faiss", "milvus"]


class MilvusSettings(BaseModel):
    """The ``store.milvus`` section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    token: SecretStr = Field(
        SecretStr(""), description="a server's 'user:password' or API key; better: env ZHIKU_STORE__MILVUS__TOKEN"
    )
    index_type: str = Field(
        "auto", description="auto: FLAT (exact) on Milvus Lite, AUTOINDEX on a server; or HNSW, IVF_FLAT, ..."
    )
    timeout: float = Field(30.0, gt=0, description="seconds to wait for Milvus")


class VectorStores:
    """Resolves a base's vector index kind from its manifest (``KnowledgeBase.open(kind_for=...)``). Keeps one
    Milvus kind (and so one client) per collection prefix and URI: opening a client costs a connection, and
    Milvus Lite lets one client per process hold its folder anyway."""

    def __init__(self, faiss: VectorIndexKind, milvus: MilvusSettings) -> None:
        self.faiss = faiss
        self.milvus = milvus
        self._milvus: dict[tuple[str, str], MilvusKind] = {}
        self._lock = threading.Lock()

    def __call__(self, root: Path, manifest: Manifest) -> VectorIndexKind:
        return self.kind(root, manifest.store, manifest.store_uri, manifest.base_id)

    def kind(self, root: Path, store: str, uri: str, base_id: str) -> VectorIndexKind:
        if store == "faiss":
            return self.faiss
        if store == "milvus":
            return self.milvus_kind(root, uri, base_id)
        raise StoreError(
            f"knowledge base {root.name!r} uses vector store {store!r}, which this Zhiku does not know",
            "open it with the Zhiku version (or plugin) that made it; stores known here: " + ", ".join(STORES),
        )

    def milvus_kind(self, root: Path, uri: str, base_id: str) -> MilvusKind:
        prefix = collection_prefix(base_id or root.name)
        where = uri or str(lite_path(root, base_id or root.name))
        with self._lock:
            kind = self._milvus.get((prefix, where))
            if kind is None:
                kind = MilvusKind(
                    where,
                    prefix,
                    token=self.milvus.token.get_secret_value(),
                    index_type=self.milvus.index_type,
                    timeout=self.milvus.timeout,
                )
                self._milvus[(prefix, where)] = kind
            return kind

    def forget(self, root: Path, manifest: Manifest, *, drop: bool = False) -> None:
        """A base is being deleted: close its Milvus client (Lite: let go of its folder); with ``drop`` also drop
        its collections on a server (a Lite folder goes with the base's folder)."""
        if manifest.store != "milvus":
            return
        kind = self.milvus_kind(root, manifest.store_uri, manifest.base_id)
        if drop and not kind.lite:
            kind.drop_all()
        kind.close()
        with self._lock:
            self._milvus = {k: v for k, v in self._milvus.items() if v is not kind}

    def close(self) -> None:
        with self._lock:
            kinds, self._milvus = list(self._milvus.values()), {}
        for kind in kinds:
            kind.close()
