"""Typed settings: the one place that reads config.yml.

Precedence, highest first: CLI flags (passed as overrides) > ``ZHIKU_*`` environment variables
(nested keys with ``__``, e.g. ``ZHIKU_EMBEDDING__DEVICE=cpu``) > config.yml > the defaults below.
Unknown keys anywhere in config.yml are an error that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from knowledge.embedding import EmbeddingSettings

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yml"


class ConfigError(ValueError):
    """config.yml or an override is invalid; the message names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestSettings(_Section):
    workers: int = Field(0, ge=0, description="parser processes; 0 = one per CPU core")
    max_file_mb: float = Field(200.0, gt=0, description="larger files are reported and skipped")
    commit_every: int = Field(64, ge=1, description="files per checkpoint: an interrupted ingest keeps these")


class ChunkingSettings(_Section):
    chunk_size: int = Field(300, ge=20, description="characters per chunk")
    chunk_overlap: int = Field(50, ge=0, description="characters shared by neighbouring chunks")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunking.chunk_overlap must be smaller than chunking.chunk_size")
        return self


class StoreSettings(_Section):
    gpu: Literal["auto", "on", "off"] = Field("auto", description="search on the GPU with faiss-gpu")


class SearchSettings(_Section):
    top_k: int = Field(5, ge=1, le=100)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ZHIKU_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        yaml_file=None,
    )

    data_dir: Path = Field(Path("memory"), description="knowledge bases and chat history live here")
    ingest: IngestSettings = IngestSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    store: StoreSettings = StoreSettings()
    search: SearchSettings = SearchSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @property
    def kb_root(self) -> Path:
        return self.data_dir / "kb"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a YAML file (default: $ZHIKU_CONFIG or the repo's config.yml).

    ``overrides`` are top-level keys set by CLI flags; ``None`` values are ignored. A relative
    ``data_dir`` is resolved against the config file's folder, so the app works from any cwd.
    """
    path = Path(config or os.environ.get("ZHIKU_CONFIG") or DEFAULT_CONFIG).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config PATH or set ZHIKU_CONFIG")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=path, yaml_file_encoding="utf-8")

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings: Settings = _FromFile(**given)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {_explain(e)}" for e in err.errors()
        )
        raise ConfigError(f"invalid configuration in {path}: {problems}") from None
    if not settings.data_dir.is_absolute():
        base = Path.cwd() if "data_dir" in given or "ZHIKU_DATA_DIR" in os.environ else path.parent
        settings.data_dir = (base / settings.data_dir).resolve()
    return settings


def _explain(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling against config.yml)"
    return str(error["msg"])
