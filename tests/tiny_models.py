"""Tiny random-weight models with real architectures, built offline for tests.

Each builder writes a folder that ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained(folder)`` load:
- :func:`tiny_llama` — ``LlamaForCausalLM`` (the Llama-2-chat architecture), tokenizer with ``<s>``/``</s>``;
- :func:`tiny_baichuan` — ``LlamaForCausalLM`` too (Baichuan-7B and Baichuan2-7B are Llama-shaped) with
  Baichuan2's ``<reserved_106>``/``<reserved_107>`` role tokens and a ``generation_config.json`` naming their
  ids as ``user_token_id``/``assistant_token_id``;
- :func:`tiny_moss` — ``CodeGenForCausalLM`` (MOSS-003 is CodeGen-shaped), a byte-level BPE tokenizer like
  MOSS's with ``<eoh>``, ``<eom>``, ``<|Human|>`` and ``<|MOSS|>`` added;
- :func:`tiny_bert` — ``BertModel`` (m3e-base's architecture class), for the embedders, and
  :func:`tiny_cross_encoder` — ``BertForSequenceClassification``, a reranker; WordPiece vocabularies written here.

Tokenizers are trained here with the ``tokenizers`` library on a small Chinese and English text, and weights
come from a fixed seed, so every build is identical. Each builder takes well under two seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llms.formats import MOSS_META_INSTRUCTION

# Mostly Chinese with some English, like the documents Zhiku serves; the tokenizers learn their merges here.
CORPUS = (
    "天生三桥位于重庆武隆县仙女山镇，是重庆直辖市级风景名胜区。"
    "2007年6月作为中国南方喀斯特的组成部分被列入联合国世界自然遗产。"
    "从天龙桥上端到黑龙桥下端，直线距离仅有1500米，全世界仅此一例。"
    "首钢集团是中国的一家大型钢铁企业，总部位于北京市石景山区。"
    "首钢的前身是1919年建立的龙烟铁矿公司石景山炼厂。"
    "长江是中国最长的河流，全长约6300公里。黄河是中国第二长河，被称为母亲河。"
    "晋太元中，武陵人捕鱼为业。缘溪行，忘路之远近。忽逢桃花林，夹岸数百步。"
    "你是知库，一个根据文档回答问题的助手。请用中文回答，并给出出处。"
    "天生三桥在哪里？在重庆武隆。首钢呢？在北京。长江有多长？约6300公里。"
    "The Yangtze is the longest river in China. The Yellow River is the second longest river. "
    "Zhiku answers questions about your own documents and shows the source of every answer. "
    "Please answer in English when the user writes in English."
)
# Every printable ASCII character and the newline are in every vocabulary, so prompts never hit <unk>.
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]


def _seed() -> None:
    import torch

    torch.manual_seed(0)


def _sentencepiece_like(vocab_size: int, special: list[str]) -> Any:
    """A BPE with Llama's metaspace handling (``▁`` for spaces, one prepended at the start)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=ALPHABET, show_progress=False
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


def _llama_shaped(folder: Path, tokenizer: Any, generation: dict[str, Any]) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    _seed()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **generation,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama_gqa() -> Any:
    """A random LlamaForCausalLM in memory with grouped kv heads (4 query heads share 2) and llama3-scaled rope:
    the shapes Llama-3-style checkpoints have, which the fused decode step must index right."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters=rope,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama(folder: Path) -> Path:
    """A Llama-2-chat-shaped model: ``<s>``/``</s>`` as BOS/EOS ids, ``<unk>``, ``<pad>``."""
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_sentencepiece_like(300, special),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    return _llama_shaped(folder, tokenizer, {})


def tiny_baichuan(folder: Path) -> Path:
    """A Baichuan2-chat-shaped model: role tokens are reserved tokens whose ids the generation config names."""
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<reserved_106>", "<reserved_107>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_sentencepiece_like(300, special),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<reserved_106>", "<reserved_107>"],
    )
    vocab = tokenizer.get_vocab()
    user, assistant = vocab["<reserved_106>"], vocab["<reserved_107>"]
    return _llama_shaped(folder, tokenizer, {"user_token_id": user, "assistant_token_id": assistant})


def tiny_moss(folder: Path) -> Path:
    """A MOSS-003-shaped model: CodeGen architecture, GPT-2-style byte-level BPE, MOSS's turn markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CodeGenConfig, CodeGenForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level like MOSS's (GPT-2's) tokenizer, but merges may cross spaces and the meta instruction is
    # learned ten times over: MOSS's long English preamble then takes ~60 tokens, not ~600, so MOSS prompts
    # fit the small context windows tests use.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS, *[MOSS_META_INSTRUCTION] * 10], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=["<eoh>", "<eom>"],
    )
    # like MOSS's vocabulary: the role markers are plain added tokens, the end markers special ones
    tokenizer.add_tokens(["<|Human|>", "<|MOSS|>"])
    eom = tokenizer.convert_tokens_to_ids("<eom>")
    _seed()
    config = CodeGenConfig(
        vocab_size=len(tokenizer),
        n_positions=2048,  # as MOSS's
        n_ctx=2048,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eom,  # MOSS's config ends a reply at <eom> (106068)
        tie_word_embeddings=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model = CodeGenForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eom, pad_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bert_vocab(folder: Path, chars: str, extra: str = "") -> list[str]:
    """A WordPiece vocabulary of BERT's special tokens and these characters, written to ``folder/vocab.txt``."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(chars)), *extra]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab


def tiny_bert(folder: Path) -> Path:
    """A random-weight BertModel with m3e-base's architecture class and a vocabulary written here."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = _bert_vocab(
        folder,
        "长江黄河中国最长的河流第二北京上海天气很好今天我们你他是在有和了一个人大小山水",
        "abcdefghijklmnopqrstuvwxyz",
    )
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_cross_encoder(folder: Path) -> Path:
    """A random-weight BERT cross-encoder (a reranker) with a vocabulary written here."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = _bert_vocab(folder, "长江黄河中国最长的河流第二天气很好今")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder
