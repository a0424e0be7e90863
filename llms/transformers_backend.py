"""Chat with a Hugging Face ``transformers`` causal LM (MOSS, Llama-2-chat, Baichuan) on a GPU or the CPU.

The backend loads nothing until first used, then loads the tokenizer and model once for all threads. Replies
are decoded by :class:`llms.decode.DecodeEngine`: one worker thread owns the model and advances every open chat
in one batched step (a static KV cache, a CUDA graph per step on a GPU); each chat's tokens are turned into text
in the caller's thread. When the consumer stops reading (closes the stream, or a stop string ends the reply)
its request leaves the batch before the next step, so an abandoned answer does not keep the GPU busy. The prompt
format (``llms.formats``) decides the token ids.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import BackendUnavailableError
from llms.base import ContextOverflowError, GenerationOptions, Message, stream_with_stops
from llms.decode import DecodeEngine, Sampling, detokenize
from llms.formats import BaichuanFormat, Llama2Format, MossFormat, PromptFormat

__all__ = [
    "BaichuanSettings",
    "LlamaSettings",
    "LoadedModel",
    "ModelLoadError",
    "MossSettings",
    "TransformersBackend",
    "TransformersSettings",
    "baichuan_factory",
    "llama_factory",
    "moss_factory",
]

log = logging.getLogger(__name__)


class ModelLoadError(BackendUnavailableError):
    """The model, its tokenizer or its config could not be loaded; the message says how to fix it."""


class TransformersSettings(BaseModel):
    """One ``llm.<name>`` section for a transformers model. Unknown keys are an error that names them."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="hub id (e.g. fnlp/moss-moon-003-sft) or a local folder from save_pretrained")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a CUDA GPU that supports it, else float16; float32 on the CPU"
    )
    load_in_8bit: bool = Field(False, description="bitsandbytes 8-bit weights (pip install bitsandbytes)")
    load_in_4bit: bool = Field(False, description="bitsandbytes 4-bit NF4 weights (pip install bitsandbytes)")
    device_map: str | None = Field(
        "auto", description="passed to from_pretrained on a CUDA machine with accelerate; ignored on the CPU"
    )
    trust_remote_code: bool = Field(
        False, description="run the model's own Python code; real MOSS and Baichuan need it, so users opt in"
    )
    context_window: int | None = Field(
        None, ge=16, description="default: the model config's max_position_embeddings / n_positions"
    )
    max_batch_size: int = Field(
        8, ge=1, description="chats decoded together in one batched step (fewer if the KV cache does not fit)"
    )
    cuda_graphs: bool = Field(
        True, description="replay each decode step as a CUDA graph (one GPU, no 8/4-bit); false: plain steps"
    )
    fused_step: bool = Field(
        True,
        description="with CUDA graphs, a LlamaForCausalLM model decodes through one fused step (q/k/v and "
        "gate/up each one matrix product, Triton kernels for the small work and for the products at up to 16 "
        "rows, launched with programmatic dependent launch on Hopper GPUs and later; llms/llama_step.py); false: "
        "through the model's own forward",
    )

    @model_validator(mode="after")
    def _one_quantization(self) -> TransformersSettings:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are both true; choose one")
        return self


class MossSettings(TransformersSettings):
    """``llm.moss``: moss-moon-003-sft (the real one needs trust_remote_code: true)."""

    model: str = "fnlp/moss-moon-003-sft"
    context_window: int | None = Field(2048, ge=16)


class LlamaSettings(TransformersSettings):
    """``llm.llama``: Llama-2-*-chat-hf."""

    model: str = "meta-llama/Llama-2-7b-chat-hf"
    context_window: int | None = Field(4096, ge=16)


class BaichuanSettings(TransformersSettings):
    """``llm.baichuan``: Baichuan-13B-Chat / Baichuan2-*-Chat."""

    model: str = "baichuan-inc/Baichuan2-7B-Chat"
    context_window: int | None = Field(4096, ge=16)


@dataclass(frozen=True)
class LoadedModel:
    tokenizer: Any
    model: Any
    fmt: PromptFormat


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a folder on this machine."""
    return (
        Path(model).expanduser().is_absolute()
        or model.startswith((".", "~"))
        or "\\" in model
        or len(PurePosixPath(model).parts) > 2
    )


def _window_from_config(config: Any) -> int | None:
    # Llama/Baichuan2: max_position_embeddings; CodeGen (MOSS): n_positions; Baichuan-13B: model_max_length
    for attr in ("max_position_embeddings", "n_positions", "model_max_length", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class TransformersBackend:
    """A :class:`llms.base.ChatBackend` over ``AutoModelForCausalLM``. Construction loads nothing."""

    def __init__(
        self,
        name: str,
        settings: TransformersSettings,
        fmt: PromptFormat,
        *,
        bind_format: Callable[[Any], PromptFormat] | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        """``bind_format(generation_config)``, when given, replaces ``fmt`` once the model is loaded: some
        formats (Baichuan's role token ids) are defined by the model's generation config. ``loaded``: a model
        already in memory (benchmarks), used instead of loading ``settings.model``."""
        self.name = name
        self.settings = settings
        self._fmt = fmt
        self._bind_format = bind_format
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = loaded
        self._engine: DecodeEngine | None = None
        self._window: int | None = settings.context_window

    @property
    def fmt(self) -> PromptFormat:
        return self._loaded.fmt if self._loaded else self._fmt

    # --- loading -------------------------------------------------------------------------------------------

    def _source(self) -> tuple[str, bool]:
        """(what to pass to from_pretrained, whether it is a local folder)."""
        model = self.settings.model
        path = Path(model).expanduser()
        if path.is_dir():
            return str(path), True
        if path.exists():
            raise ModelLoadError(
                f"llm.{self.name}.model is {model!r}, a file; it must be a model folder (config.json, weights, "
                "tokenizer files, as save_pretrained writes them) or a Hugging Face hub id"
            )
        if _looks_like_path(model):
            raise ModelLoadError(
                f"model folder {model!r} does not exist: set llm.{self.name}.model to a local folder holding the "
                "model (config.json, weights, tokenizer files) or to a Hugging Face hub id"
            )
        return model, False

    def _load_error(self, exc: BaseException, source: str, local: bool) -> ModelLoadError:
        key = f"llm.{self.name}"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "trust_remote_code" in str(exc):
            return ModelLoadError(
                f"{source} ships its own model code, which runs only if you allow it: review it, then set "
                f"{key}.trust_remote_code: true"
            )
        if isinstance(exc, ImportError):
            return ModelLoadError(f"loading {source} needs a package that is not installed: {reason}")
        if local:
            return ModelLoadError(
                f"could not load the model in {source} ({reason}); {key}.model must be a folder written by "
                "save_pretrained (config.json, weights, tokenizer files)"
            )
        return ModelLoadError(
            f"model {source!r} not found locally and no hub access ({reason}): download it where there is "
            f"internet (hf download {source} --local-dir DIR), then set {key}.model to DIR"
        )

    def load(self) -> LoadedModel:
        """Load tokenizer and model once (thread-safe); later calls return the same objects."""
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_now()
            return self._loaded

    def _load_now(self) -> LoadedModel:
        import torch
        import transformers

        s = self.settings
        source, local = self._source()
        cuda = torch.cuda.is_available()
        if s.dtype != "auto":
            dtype = getattr(torch, s.dtype)
        elif cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32  # CPUs have no fast half-precision matmul
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": s.trust_remote_code, "local_files_only": local}
        quantized = s.load_in_8bit or s.load_in_4bit
        if quantized:
            if importlib.util.find_spec("bitsandbytes") is None:
                bits = 8 if s.load_in_8bit else 4
                raise ModelLoadError(
                    f"llm.{self.name}.load_in_{bits}bit needs bitsandbytes: pip install bitsandbytes "
                    f"(or set load_in_{bits}bit: false)"
                )
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_8bit=s.load_in_8bit,
                load_in_4bit=s.load_in_4bit,
                bnb_4bit_compute_dtype=dtype if s.load_in_4bit else None,
                bnb_4bit_quant_type="nf4",
            )
        # device_map needs accelerate and only makes sense with GPUs; on the CPU the model simply stays there
        has_accelerate = importlib.util.find_spec("accelerate") is not None
        if cuda and has_accelerate and s.device_map is not None:
            kwargs["device_map"] = s.device_map
        log.info("loading %s model %s (%s)", self.name, source, dtype)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                source, trust_remote_code=s.trust_remote_code, local_files_only=local
            )
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise self._load_error(exc, source, local) from exc
        if cuda and "device_map" not in kwargs and not quantized:
            model = model.to("cuda")
        model.eval()
        fmt = self._bind_format(model.generation_config) if self._bind_format else self._fmt
        return LoadedModel(tokenizer=tokenizer, model=model, fmt=fmt)

    # --- ChatBackend ---------------------------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        """From settings, else the model's config (read with AutoConfig: no weights are loaded for this)."""
        if self._window is None:
            # a benign race: two threads may both read the config and store the same number
            if self._loaded is not None:
                config = self._loaded.model.config
            else:
                from transformers import AutoConfig

                source, local = self._source()
                try:
                    config = AutoConfig.from_pretrained(
                        source, trust_remote_code=self.settings.trust_remote_code, local_files_only=local
                    )
                except (OSError, ValueError, KeyError, ImportError) as exc:
                    raise self._load_error(exc, source, local) from exc
            window = _window_from_config(config)
            if window is None:
                raise ModelLoadError(
                    f"cannot tell the context window of {self.settings.model} from its config: "
                    f"set llm.{self.name}.context_window"
                )
            self._window = window
        return self._window

    def count_tokens(self, messages: Sequence[Message]) -> int:
        loaded = self.load()
        return len(loaded.fmt.encode(messages, loaded.tokenizer))

    def engine(self) -> DecodeEngine:
        """The decode engine over the loaded model (created once, on first use)."""
        engine = self._engine
        if engine is not None:
            return engine
        loaded = self.load()
        with self._lock:
            if self._engine is None:
                self._engine = DecodeEngine(
                    loaded.model,
                    window=self.context_window,
                    max_batch=self.settings.max_batch_size,
                    cuda_graphs=self.settings.cuda_graphs,
                    name=self.name,
                    fused_step=None if self.settings.fused_step else False,
                )
            return self._engine

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        """Yield the reply in pieces. The history must already fit (``llms.base.fit_messages``). Nothing runs
        until the first piece is asked for; closing the generator drops the request from the batch at once."""
        if not messages or messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        loaded = self.load()
        tokenizer, model, fmt = loaded.tokenizer, loaded.model, loaded.fmt
        ids = fmt.encode(messages, tokenizer)
        room = self.context_window - len(ids)
        if room < 1:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens and {self.name} attends to {self.context_window}; "
                "trim the history with fit_messages first"
            )
        if options.temperature == 0:
            sampling = Sampling(seed=options.seed)  # greedy: the argmax, as generate(do_sample=False)
        else:
            sampling = Sampling(options.temperature, options.top_p, options.top_k, options.seed)
        tokens = self.engine().submit(
            ids,
            max_new_tokens=min(options.max_new_tokens, room),  # never past the position embeddings
            stop_ids=fmt.stop_token_ids(tokenizer, model.generation_config),
            sampling=sampling,
        )
        try:
            stops = [*fmt.stop_strings, *options.stop]
            yield from stream_with_stops(detokenize(tokens, tokenizer), stops, lambda: tokens.cut_short)
        finally:
            # reached on the end of the reply, a stop string, an error or the consumer closing the stream
            tokens.close()


def _settings(options: TransformersSettings | dict[str, Any]) -> TransformersSettings:
    """The app passes the validated ``llm.<name>`` section; a plain dict (scripts, tests) is validated here."""
    return options if isinstance(options, TransformersSettings) else TransformersSettings.model_validate(options)


def moss_factory(options: TransformersSettings | dict[str, Any]) -> TransformersBackend:
    """``llm.moss``: moss-moon-003-sft (the real one needs trust_remote_code: true)."""
    return TransformersBackend("moss", _settings(options), MossFormat())


def llama_factory(options: TransformersSettings | dict[str, Any]) -> TransformersBackend:
    """``llm.llama``: Llama-2-*-chat-hf."""
    return TransformersBackend("llama", _settings(options), Llama2Format())


def baichuan_factory(options: TransformersSettings | dict[str, Any]) -> TransformersBackend:
    """``llm.baichuan``: Baichuan-13B-Chat / Baichuan2-*-Chat; role ids come from the loaded generation config."""
    return TransformersBackend(
        "baichuan", _settings(options), BaichuanFormat(), bind_format=BaichuanFormat.from_generation_config
    )
