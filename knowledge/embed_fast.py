"""The fast path of a sentence-transformers model: its own weights, tokenizer and pooling, run by
:class:`~knowledge.embed_batches.BatchedEncoder` instead of ``SentenceTransformer.encode``.

Taken only for the models it can reproduce: a ``Transformer`` module (a torch encoder with a fast
tokenizer and nothing that changes its text input) followed by ``Pooling`` (mean or CLS) and optionally
``Normalize``, as m3e-base is. Whatever the modules say, the path must also give the vectors
sentence-transformers gives for a few probe texts (see PROBE_MIN_COSINE), checked at load; otherwise
:func:`fast_path` returns the reason and the caller keeps ``encode``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from knowledge.embed_batches import BatchedEncoder, Pooling, Progress, Tokenised, additive_mask, one_sequence_each

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)

Task = Literal["query", "document"]
PROBES = [
    "长江是中国最长的河流，全长约6300公里。",
    "Zhiku answers Questions about YOUR own documents.",
    "知识库的检索" * 200,  # longer than any max_seq_length: truncation must match
]
# In float32 the fast path and encode agree to rounding. In fp16/bf16, encode casts its pooled vector to
# that dtype before normalising (bf16: cosine ~0.998 to float32, where the fast path, pooling in float32,
# keeps ~0.99999), so the check there only catches a different recipe (prompt, pooling, truncation).
PROBE_MIN_COSINE = {"float32": 0.999, "low precision": 0.99}
GPU_LENGTH_MULTIPLE = 32  # padded lengths on CUDA: 16 shapes up to 512 tokens, all warmed up at load
# packed batches' token counts on CUDA: 16 shapes up to the 65,536-token budget, all warmed up at load. The
# matrix products run aligned shapes (M = 65,413 took 7 % longer than 65,536 in the q/k/v product on an
# H200), and a first pass meets no shape the warm-up did not; padding costs ~1 % of the tokens.
GPU_TOKEN_MULTIPLE = 4096


def packed_by_default(device: str) -> bool:
    """Packed batches where they pay: on CUDA (on a CPU, transformers' padded forward is faster)."""
    return device.startswith("cuda")


def _names(modules: Sequence[Any]) -> list[str]:
    return [type(m).__name__ for m in modules]


def plain_encoder(st_model: Any) -> tuple[Any, Pooling] | str:
    """(the Transformer module, its pooling) when the modules are Transformer + Pooling (+ Normalize)
    with nothing the fast path would have to imitate, else the reason it cannot be used."""
    modules = list(st_model)
    names = _names(modules)
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"modules {names}, not Transformer + Pooling (+ Normalize)"
    transformer, pooling = modules[0], modules[1]
    tokenizer = getattr(transformer, "tokenizer", None)
    if not getattr(tokenizer, "is_fast", False):
        return "no fast tokenizer"
    unsupported = {
        "backend": getattr(transformer, "backend", "torch") != "torch",
        "transformer_task": getattr(transformer, "transformer_task", "feature-extraction") != "feature-extraction",
        "processing_kwargs": bool(getattr(transformer, "processing_kwargs", None)),
        "query_length": getattr(transformer, "query_length", None) is not None,
        "document_length": getattr(transformer, "document_length", None) is not None,
        "query_expansion": getattr(transformer, "query_expansion", None) is not None,
    }
    if any(unsupported.values()):
        return "Transformer options " + ", ".join(k for k, v in unsupported.items() if v)
    mode = getattr(pooling, "pooling_mode", None)
    if mode not in ("mean", "cls"):
        return f"pooling {mode!r}"
    if not getattr(pooling, "include_prompt", True) and any(st_model.prompts.values()):
        return "pooling excludes the prompt"
    if len(modules) == 3 and getattr(modules[2], "module_input_name", "sentence_embedding") != "sentence_embedding":
        return "Normalize of token embeddings"
    return transformer, mode


def st_prompt(st_model: Any, task: Task) -> str:
    """The prompt ``encode_query`` / ``encode_document`` put before the text (sentence-transformers 6.2)."""
    prompts: dict[str, str] = st_model.prompts
    for name in ("query",) if task == "query" else ("document", "passage", "corpus"):
        if name in prompts:
            return prompts[name] or ""
    default = st_model.default_prompt_name
    return (prompts.get(default) or "") if default else ""


class FastSentenceTransformer:
    """A sentence-transformers model run from raw text by :class:`BatchedEncoder`.

    A BERT model runs packed (:mod:`knowledge.embed_packed`: no padding, fused layers) where it can:
    ``packed=None`` means on CUDA when torch has variable-length flash attention; True forces it (also on
    a CPU, for the tests), False keeps transformers' padded forward.
    """

    def __init__(
        self,
        st_model: Any,
        transformer: Any,
        pooling: Pooling,
        device: str,
        token_budget: int,
        packed: bool | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        from knowledge.bert_tokens import BertTokens
        from knowledge.embed_packed import PackedBert, packed_bert_unsupported

        self.st_model = st_model
        self.model = transformer.auto_model
        self.max_length = int(st_model.max_seq_length)
        self.lower = bool(getattr(transformer, "do_lower_case", False))
        self.prompts = {task: st_prompt(st_model, task) for task in ("query", "document")}
        hf_tokenizer = transformer.tokenizer
        # a copy: the model's own tokenizer keeps the padding/truncation state transformers sets per call
        self.tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        # Chinese BERT vocabularies (m3e, bge-zh): the same ids at a fifth of the tokenizer's CPU time
        self.bert_tokens = BertTokens.of(self.tokenizer, self.max_length)
        pad_id = hf_tokenizer.pad_token_id
        on_cuda = device.startswith("cuda")
        self.packed: PackedBert | None = None
        if packed is None and not packed_by_default(device):
            self.packed_reason = "not on CUDA"
        elif packed is False:
            self.packed_reason = "turned off"
        else:
            reason = packed_bert_unsupported(self.model, device)
            if reason is None:
                self.packed = PackedBert(self.model)
            elif packed:
                raise ValueError(f"the packed path cannot run this model: {reason}")
            self.packed_reason = reason or ""
        self.encoder = BatchedEncoder(
            self._forward,
            device=device,
            pad_id=0 if pad_id is None else int(pad_id),
            pooling=pooling,
            token_budget=token_budget,
            length_multiple=GPU_LENGTH_MULTIPLE if on_cuda else 1,
            packed=self.packed.forward if self.packed else None,
            token_multiple=min(GPU_TOKEN_MULTIPLE, token_budget) if on_cuda else 1,
            # one CUDA graph per token count: the Triton attention's grid is a fixed table (torch's is not)
            fixed_shapes=on_cuda and self.packed is not None and self.packed.attention == "triton",
        )

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        extended = None if mask is None else additive_mask(mask, self.model.dtype)
        return self.model(input_ids=ids, attention_mask=extended).last_hidden_state

    def tokenise(self, texts: list[str], task: Task) -> Tokenised:
        prompt = self.prompts[task]
        texts = [prompt + t for t in texts] if prompt else texts
        if self.lower:
            texts = [t.lower() for t in texts]
        if self.bert_tokens is not None:
            return one_sequence_each(self.bert_tokens(texts))
        encodings = self._encode_batch(texts)
        return one_sequence_each([np.asarray(e.ids, dtype=np.int64) for e in encodings])

    def encode(
        self,
        texts: Sequence[str],
        task: Task,
        dim: int,
        progress: Progress | None = None,
        ready: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``ready``: texts already tokenised (text -> ids, :meth:`tokenise`'s), taken as they are."""
        import torch

        def tokenise(batch: list[str]) -> Tokenised:
            if not ready:
                return self.tokenise(batch, task)
            todo = [t for t in batch if t not in ready]
            fresh = dict(zip(todo, self.tokenise(todo, task).ids, strict=True)) if todo else {}
            return one_sequence_each([ready[t] if t in ready else fresh[t] for t in batch])

        try:
            return self.encoder.encode(texts, tokenise, dim, progress)
        except torch.OutOfMemoryError as err:
            raise RuntimeError(
                f"the GPU ran out of memory embedding batches of {self.encoder.token_budget} tokens; "
                "set embedding.token_budget lower (e.g. 16384)"
            ) from err

    def matches_sentence_transformers(self, dim: int) -> float:
        """The lowest cosine between this path and ``encode_query``/``encode_document`` on the probes."""
        worst = 1.0
        for task in ("query", "document"):
            encode = self.st_model.encode_query if task == "query" else self.st_model.encode_document
            reference = encode(PROBES, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
            reference = np.asarray(reference, dtype=np.float32)
            mine = self.encode(PROBES, task, dim)
            worst = min(worst, float((reference * mine).sum(axis=1).min()))
        return worst


def fast_path(
    st_model: Any, device: str, token_budget: int, dim: int, packed: bool | None = None
) -> FastSentenceTransformer | str:
    """The fast path for ``st_model`` when it reproduces sentence-transformers' vectors, else the reason.

    A packed path whose Triton attention fails the probes runs torch's attention kernel instead. With
    ``packed=None`` a packed path that fails the probes anyway (an attention kernel this GPU lacks, say) falls
    back to padded batches, logged; only a padded path that fails too means ``encode``.
    """
    found = plain_encoder(st_model)
    if isinstance(found, str):
        return found
    transformer, pooling = found
    fast = FastSentenceTransformer(st_model, transformer, pooling, device, token_budget, packed)
    problem = _probe(fast, dim)
    if problem and fast.packed is not None and fast.packed.attention == "triton":
        _log.warning("embedding: Triton attention fails the probe texts, using torch's kernel: %s", problem)
        fast.packed.attention = "torch"
        assert fast.encoder.runner is not None
        fast.encoder.runner.eager_only()
        problem = _probe(fast, dim)
    if problem and packed is None and fast.packed is not None:
        _log.warning("embedding: packed batches fail the probe texts, running padded ones: %s", problem)
        fast = FastSentenceTransformer(st_model, transformer, pooling, device, token_budget, packed=False)
        fast.packed_reason = f"packed batches failed the probe texts: {problem}"
        problem = _probe(fast, dim)
    return problem or fast


def _probe(fast: FastSentenceTransformer, dim: int) -> str | None:
    """Why ``fast`` must not be used (None when it gives sentence-transformers' vectors on the probes)."""
    import torch

    try:
        cosine = fast.matches_sentence_transformers(dim)
    except Exception as err:  # noqa: BLE001 - e.g. a remote-code model whose forward wants its mask in another
        # form (encode knows how), or a Triton kernel that does not build here: any failure means another path
        return f"the fast path fails on the probe texts ({type(err).__name__}: {err})"
    precision = "float32" if fast.model.dtype == torch.float32 else "low precision"
    if cosine < PROBE_MIN_COSINE[precision]:
        return f"its vectors differ from sentence-transformers' (cosine {cosine:.4f} on the probe texts)"
    return None
