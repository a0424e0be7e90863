"""Typed settings: the one place that reads config.yml.

Precedence, highest first: CLI flags (passed as overrides) > ``ZHIKU_*`` environment variables
(nested keys with ``__``, e.g. ``ZHIKU_EMBEDDING__DEVICE=cpu``) > config.yml > the defaults below.
Unknown keys anywhere in config.yml are an error that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from common.errors import ZhikuError
from knowledge.embedding import EmbeddingSettings
from knowledge.milvus import MilvusError, check_server_uri
from knowledge.retrieval import RetrievalSettings
from knowledge.stores import MilvusSettings, StoreName
from llms.base import GenerationOptions

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yml"


class ConfigError(ZhikuError, ValueError):
    """config.yml or an override is invalid; the message names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IngestSettings(_Section):
    workers: int = Field(
        0, ge=0, description="parser processes; 0 = one per CPU core, less a quarter of them from 4 cores up"
    )
    max_file_mb: float = Field(200.0, gt=0, description="larger files are reported and skipped")
    max_file_seconds: float = Field(120.0, ge=0, description="a file whose parsing takes longer fails; 0 = no limit")
    commit_every: int = Field(64, ge=1, description="files per checkpoint: an interrupted ingest keeps these")
    index_every_s: float = Field(30.0, ge=0, description="seconds between vector index file writes during an ingest")


class ChunkingSettings(_Section):
    chunk_size: int = Field(300, ge=20, description="characters per chunk")
    chunk_overlap: int = Field(50, ge=0, description="characters shared by neighbouring chunks")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError("chunking.chunk_overlap must be smaller than chunking.chunk_size")
        return self


class HnswSettings(_Section):
    m: int = Field(32, ge=4, le=128, description="faiss-hnsw: graph degree; fixed when the index is built")
    ef_search: int = Field(128, ge=1, description="faiss-hnsw: candidates per search (recall vs latency)")
    ef_construction: int = Field(80, ge=1, description="faiss-hnsw: candidates per insertion (quality vs build time)")


class StoreSettings(_Section):
    backend: StoreName = Field(
        "faiss", description="vector store of new knowledge bases: faiss (in process) | milvus; each base keeps its own"
    )
    uri: str = Field(
        "", description="milvus: empty = Milvus Lite in the base's folder; http://host:19530 = a Milvus server"
    )
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)

    @field_validator("uri")
    @classmethod
    def _server_uri(cls, uri: str) -> str:
        try:
            return check_server_uri(uri)
        except MilvusError as err:
            raise ValueError(str(err)) from None

    index: str = Field(
        "faiss", description="vector index: faiss (exact), faiss-hnsw (approximate, CPU), or a plugin's name"
    )
    gpu: Literal["auto", "on", "off"] = Field(
        "auto", description="search faiss on the GPU: faiss-gpu when installed, else torch fp16 on CUDA"
    )
    hnsw: HnswSettings = Field(default_factory=HnswSettings)


class SearchSettings(_Section):
    top_k: int = Field(5, ge=1, le=100)


class LLMSettings(_Section):
    """``llm:``. Every other key is a backend's own section (``llm.default``, ``llm.openai``, a plugin's
    name, ...), validated against the settings model that backend registered, when the app is built."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    backend: str = Field("default", description="default, openai, moss, llama, baichuan, or a plugin's name")
    max_concurrent: int = Field(2, ge=1, description="generations at once per process; more wait in a queue")

    def sections(self) -> dict[str, Any]:
        """Each backend section as written in the config (before validation)."""
        return dict(self.model_extra or {})


DEFAULT_SYSTEM_PROMPT_ZH = "你是知库的问答助手。用中文回答，准确、简洁。"
DEFAULT_SYSTEM_PROMPT_EN = "You are Zhiku's assistant. Answer in English, accurately and briefly."
# Answering from passages. The instruction comes after the passages, right before the question: a small
# model follows what it read last. No "say when it is not there": the service decides that before asking
# (chat.min_coverage), and asked to, the 0.5B model refused answerable questions (7 of 100 dev questions).
GROUNDED_TEMPLATE_ZH = (
    "资料：\n{passages}\n\n只根据上面的资料回答问题，不要使用资料以外的知识。从资料中找出回答问题的句子，原样摘录，"
    "不要改写，并在句末标注资料编号，如[1]。\n问题：{question}"
)
GROUNDED_TEMPLATE_EN = (
    "Sources:\n{passages}\n\nAnswer the question from the sources above only, not from other knowledge. Be "
    "brief, reuse the sources' own words, and end each sentence with the number of the source it comes from, "
    "e.g. [1].\nQuestion: {question}"
)


class ChatSettings(_Section):
    system_prompt_zh: str = DEFAULT_SYSTEM_PROMPT_ZH
    system_prompt_en: str = DEFAULT_SYSTEM_PROMPT_EN
    context_template_zh: str = GROUNDED_TEMPLATE_ZH
    context_template_en: str = GROUNDED_TEMPLATE_EN
    passage_template: str = "[{n}] {text}"
    top_k: int = Field(5, ge=0, le=50, description="passages retrieved per question; 0 = no retrieval")
    evidence_budget: int = Field(
        150, ge=0, description="tokens of the passages' best sentences the model reads; 0 = the whole passages"
    )
    min_coverage: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="share of the question's content words the best passage must contain, else the reply is "
        "'not in the knowledge base' without asking the model; 0 = always ask the model",
    )
    greedy_with_context: bool = Field(True, description="answer from passages with temperature 0")
    quote_evidence: bool = Field(True, description="end an answer with the source text that answers the question")
    quote_min_chars: int = Field(
        40, ge=0, description="a quote shorter than this takes the sentences after it (a heading alone says little)"
    )
    quotes: int = Field(2, ge=1, le=5, description="how many source sentences an answer ends with (quote_evidence)")
    generation: GenerationOptions = GenerationOptions(temperature=0.3)
    max_question_chars: int = Field(8000, ge=1, description="longer questions (and system prompts) are refused")
    max_history_messages: int = Field(64, ge=0, description="only the newest messages of a conversation are sent")
    max_history_chars: int = Field(100_000, ge=0, description="a longer conversation is refused")


class UserSettings(_Section):
    name: str = Field(min_length=1)
    password_hash: str = Field(description="scrypt$n$r$p$salt$hash, made with `python -m app.auth`")


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 exposes the UI to the network")
    port: int = Field(7860, ge=1, le=65535)
    max_upload_mb: float = Field(100.0, gt=0)
    users: list[UserSettings] = Field(default_factory=list, description="UI logins; empty: no login")


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
    retrieval: RetrievalSettings = RetrievalSettings()
    llm: LLMSettings = LLMSettings()
    chat: ChatSettings = ChatSettings()
    server: ServerSettings = ServerSettings()

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
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{path}{where} is not valid YAML ({problem})", "fix that line (indentation, quotes, a stray tab)"
        ) from None
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
