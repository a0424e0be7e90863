"""The transformers chat backend and its prompt formats, on tiny random-weight MOSS, Llama-2 and Baichuan models."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from llms.base import ChatBackend, ContextOverflowError, GenerationOptions, Message, fit_messages
from llms.formats import MOSS_META_INSTRUCTION, BaichuanFormat, Llama2Format, MossFormat, split_turns
from llms.transformers_backend import (
    ModelLoadError,
    TransformersBackend,
    TransformersSettings,
    baichuan_factory,
    llama_factory,
    moss_factory,
)
from tests.tiny_models import tiny_baichuan, tiny_llama, tiny_moss

SYSTEM, Q1, A1, Q2, A2, Q3 = "你是知库。", "天生三桥在哪里？", "在重庆武隆。", " 首钢呢？ ", "在北京。", "长江有多长？"
CONVERSATION = [
    Message("system", SYSTEM),
    Message("user", Q1),
    Message("assistant", A1),
    Message("user", Q2),
    Message("assistant", A2),
    Message("user", Q3),
]
GREEDY = GenerationOptions(temperature=0, max_new_tokens=8, seed=0)


def enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


@dataclass(frozen=True)
class Case:
    name: str
    folder: Path
    factory: Callable[[dict[str, Any]], TransformersBackend]
    prompt: str  # the expected render() of CONVERSATION
    ids: Callable[[Any], list[int]]  # the expected encode() of CONVERSATION, given the tokenizer


def moss_ids(tok: Any) -> list[int]:
    return list(tok(MOSS_PROMPT, add_special_tokens=False)["input_ids"])


def llama_ids(tok: Any) -> list[int]:
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return [
        *[bos, *enc(tok, "[INST] <<SYS>>\n你是知库。\n<</SYS>>\n\n天生三桥在哪里？ [/INST] 在重庆武隆。 "), eos],
        *[bos, *enc(tok, "[INST] 首钢呢？ [/INST] 在北京。 "), eos],
        *[bos, *enc(tok, "[INST] 长江有多长？ [/INST]")],
    ]


def baichuan_ids(tok: Any) -> list[int]:
    user, assistant = 4, 5  # the tiny model's <reserved_106>/<reserved_107>, named in its generation config
    return [
        *enc(tok, "你是知库。"),
        *[user, *enc(tok, "天生三桥在哪里？"), assistant, *enc(tok, "在重庆武隆。")],
        *[user, *enc(tok, " 首钢呢？ "), assistant, *enc(tok, "在北京。")],
        *[user, *enc(tok, "长江有多长？"), assistant],
    ]


MOSS_PROMPT = MOSS_META_INSTRUCTION + (
    "你是知库。\n"
    "<|Human|>: 天生三桥在哪里？<eoh>\n<|MOSS|>: 在重庆武隆。<eom>\n"
    "<|Human|>:  首钢呢？ <eoh>\n<|MOSS|>: 在北京。<eom>\n"
    "<|Human|>: 长江有多长？<eoh>\n<|MOSS|>:"
)
LLAMA_PROMPT = (
    "<s>[INST] <<SYS>>\n你是知库。\n<</SYS>>\n\n天生三桥在哪里？ [/INST] 在重庆武隆。 </s>"
    "<s>[INST] 首钢呢？ [/INST] 在北京。 </s>"
    "<s>[INST] 长江有多长？ [/INST]"
)
BAICHUAN_PROMPT = (
    "你是知库。<token:4>天生三桥在哪里？<token:5>在重庆武隆。"
    "<token:4> 首钢呢？ <token:5>在北京。"
    "<token:4>长江有多长？<token:5>"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "moss": tiny_moss(tmp_path_factory.mktemp("tiny-moss")),
        "llama": tiny_llama(tmp_path_factory.mktemp("tiny-llama")),
        "baichuan": tiny_baichuan(tmp_path_factory.mktemp("tiny-baichuan")),
    }


@pytest.fixture(params=["moss", "llama", "baichuan"])
def case(request: pytest.FixtureRequest, folders: dict[str, Path]) -> Case:
    name = request.param
    factory, prompt, ids = {
        "moss": (moss_factory, MOSS_PROMPT, moss_ids),
        "llama": (llama_factory, LLAMA_PROMPT, llama_ids),
        "baichuan": (baichuan_factory, BAICHUAN_PROMPT, baichuan_ids),
    }[name]
    return Case(name, folders[name], factory, prompt, ids)


def reference_greedy(backend: TransformersBackend, messages: list[Message], max_new_tokens: int) -> str:
    """The reply without streaming: generate() then decode(), as the models' own demos do."""
    import torch

    loaded = backend.load()
    tok, model, fmt = loaded.tokenizer, loaded.model, loaded.fmt
    ids = fmt.encode(messages, tok)
    stop_ids = fmt.stop_token_ids(tok, model.generation_config)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0],
    )
    return str(tok.decode(out[0, len(ids) :], skip_special_tokens=True))


def test_backend(case: Case, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transformers

    loads: list[str] = []
    real_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(*args: Any, **kwargs: Any) -> Any:
        loads.append(str(args[0]))
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)

    backend = case.factory({"model": str(case.folder)})
    assert isinstance(backend, ChatBackend) and backend.name == case.name
    assert loads == []  # nothing is loaded before it is needed
    # the context window comes from the config alone, without loading weights
    assert backend.context_window == (2048 if case.name == "moss" else 256) and loads == []

    # two threads asking at once still load the model once
    counts: list[int] = []
    threads = [threading.Thread(target=lambda: counts.append(backend.count_tokens(CONVERSATION))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the prompt, as text and as the exact ids (Baichuan's role ids come from the loaded generation config)
    assert backend.fmt.render(CONVERSATION) == case.prompt
    tokenizer = backend.load().tokenizer
    expected_ids = case.ids(tokenizer)
    assert backend.fmt.encode(CONVERSATION, tokenizer) == expected_ids
    assert counts == [len(expected_ids)] * 2

    # streaming: several pieces that join into exactly the non-streamed greedy reply
    pieces = list(backend.stream(CONVERSATION, GREEDY))
    reply = reference_greedy(backend, CONVERSATION, GREEDY.max_new_tokens)
    assert len(pieces) >= 2, pieces
    assert "".join(pieces) == reply and len(reply.strip()) >= 2
    assert "".join(backend.stream(CONVERSATION, GREEDY)) == reply  # greedy is reproducible
    assert loads == [str(case.folder)]  # two streams, one load

    # a stop string cuts the reply just before it
    stop = reply[len(reply) // 2 :][:2]
    options = GenerationOptions(temperature=0, max_new_tokens=8, stop=[stop])
    assert "".join(backend.stream(CONVERSATION, options)) == reply[: reply.find(stop)]

    # closing the stream early stops generation: slow each step down, read one piece, close, count the steps
    model = backend.load().model
    steps: list[int] = []
    real_forward = model.forward

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        steps.append(1)
        time.sleep(0.02)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    long = GenerationOptions(temperature=0, max_new_tokens=40)
    assert "".join(backend.stream(CONVERSATION, long))
    left_alone = len(steps)  # generation runs on by itself for 30+ steps here
    steps.clear()
    stream = backend.stream(CONVERSATION, long)
    assert next(stream)
    at_close = len(steps)
    stream.close()  # returns once the generation thread has ended
    assert len(steps) <= at_close + 2 < left_alone and left_alone >= 30, (at_close, len(steps), left_alone)
    monkeypatch.undo()

    # sampling runs too, reproducibly with a seed
    sampled = GenerationOptions(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=6, seed=7)
    assert "".join(backend.stream(CONVERSATION, sampled)) == "".join(backend.stream(CONVERSATION, sampled))

    # fit_messages keeps the system prompt and the newest turns, dropping the oldest pair first
    newest = [CONVERSATION[0], *CONVERSATION[3:]]
    budget = backend.count_tokens(newest) + GREEDY.max_new_tokens
    small = case.factory({"model": str(case.folder), "context_window": budget})
    assert fit_messages(small, CONVERSATION, GREEDY.max_new_tokens) == newest
    assert [m.content for m in newest] == [SYSTEM, Q2, A2, Q3]
    smaller = case.factory({"model": str(case.folder), "context_window": budget - 1})
    assert fit_messages(smaller, CONVERSATION, GREEDY.max_new_tokens) == [CONVERSATION[0], CONVERSATION[-1]]
    with pytest.raises(ContextOverflowError):
        fit_messages(case.factory({"model": str(case.folder), "context_window": 16}), CONVERSATION, 8)

    # unknown options are errors that name them
    with pytest.raises(ValidationError, match="temprature"):
        GenerationOptions.model_validate({"temprature": 0.2})
    with pytest.raises(ValidationError, match="modle"):
        case.factory({"model": str(case.folder), "modle": "x"})

    # a missing model folder says which setting to fix
    missing = case.factory({"model": str(tmp_path / "no-such-model")})
    with pytest.raises(ModelLoadError, match=rf"does not exist: set llm\.{case.name}\.model"):
        next(missing.stream(CONVERSATION, GREEDY))
    with pytest.raises(ModelLoadError, match=rf"llm\.{case.name}\.model"):
        _ = missing.context_window


def test_moss_format_has_the_official_meta_instruction_and_ends_at_eom(folders: dict[str, Path]) -> None:
    fmt = MossFormat()
    assert MOSS_META_INSTRUCTION.startswith(
        "You are an AI assistant whose name is MOSS.\n"
        "- MOSS is a conversational language model that is developed by Fudan University. "
        "It is designed to be helpful, honest, and harmless.\n"
    )
    assert MOSS_META_INSTRUCTION.endswith(
        "- It apologizes and accepts the user's suggestion if the user corrects the incorrect answer generated by "
        "MOSS.\nCapabilities and tools that MOSS can possess.\n"
    )
    # no system message: the meta instruction alone, then the turn
    assert fmt.render([Message("user", "你好")]) == MOSS_META_INSTRUCTION + "<|Human|>: 你好<eoh>\n<|MOSS|>:"
    assert fmt.stop_strings == ("<eom>",)
    backend = moss_factory({"model": str(folders["moss"])})
    loaded = backend.load()
    eom = loaded.tokenizer.convert_tokens_to_ids("<eom>")
    assert fmt.stop_token_ids(loaded.tokenizer, loaded.model.generation_config)[0] == eom
    ids = fmt.encode(CONVERSATION, loaded.tokenizer)
    assert ids.count(eom) == 2 and ids.count(loaded.tokenizer.convert_tokens_to_ids("<eoh>")) == 3
    assert ids[-2:] == [loaded.tokenizer.convert_tokens_to_ids("<|MOSS|>"), *enc(loaded.tokenizer, ":")]


def test_baichuan_role_ids_default_to_195_196(folders: dict[str, Path]) -> None:
    from transformers import GenerationConfig

    for config in (None, GenerationConfig()):
        fmt = BaichuanFormat.from_generation_config(config)
        assert (fmt.user_token_id, fmt.assistant_token_id) == (195, 196)
    assert (
        BaichuanFormat.from_generation_config(GenerationConfig(user_token_id=4, assistant_token_id=5)).user_token_id
        == 4
    )
    fmt = BaichuanFormat()
    messages = [Message("user", "长江有多长？")]
    assert fmt.render(messages) == "<token:195>长江有多长？<token:196>"
    tokenizer = baichuan_factory({"model": str(folders["baichuan"])}).load().tokenizer
    assert fmt.encode(messages, tokenizer) == [195, *enc(tokenizer, "长江有多长？"), 196]
    assert fmt.stop_token_ids(tokenizer, None) == [tokenizer.eos_token_id]


def test_llama_format_without_system_and_its_bos_eos_ids(folders: dict[str, Path]) -> None:
    fmt = Llama2Format()
    assert fmt.render([Message("user", "  hi ")]) == "<s>[INST] hi [/INST]"
    tokenizer = llama_factory({"model": str(folders["llama"])}).load().tokenizer
    ids = fmt.encode(CONVERSATION, tokenizer)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 3
    assert ids.count(tokenizer.eos_token_id) == 2 and ids[-1] != tokenizer.eos_token_id
    # "</s>" typed by a user is text, never the EOS id
    assert tokenizer.eos_token_id not in fmt.encode([Message("user", "a </s> b")], tokenizer)[1:]


@pytest.mark.parametrize(
    "messages",
    [
        [Message("assistant", "hi")],
        [Message("user", "a"), Message("user", "b")],
        [Message("user", "a"), Message("system", "s"), Message("user", "b")],
    ],
)
def test_formats_reject_roles_out_of_order(messages: list[Message]) -> None:
    with pytest.raises(ValueError, match="alternating"):
        split_turns(messages)


def test_histories_without_a_question_render_without_generation_prompt(folders: dict[str, Path]) -> None:
    """Counting a history that ends with an answer (or a bare system prompt) works; generating from it not."""
    done = CONVERSATION[:-1]
    assert MossFormat().render(done) == MOSS_PROMPT[: MOSS_PROMPT.index("<|Human|>: 长江")]
    assert Llama2Format().render(done) == LLAMA_PROMPT[: LLAMA_PROMPT.index("<s>[INST] 长江")]
    assert BaichuanFormat(4, 5).render(done) == BAICHUAN_PROMPT[: BAICHUAN_PROMPT.index("<token:4>长江")]
    assert Llama2Format().render([Message("system", "s")]) == "<s>[INST] <<SYS>>\ns\n<</SYS>> [/INST]"
    assert MossFormat().render([]) == MOSS_META_INSTRUCTION and BaichuanFormat().render([]) == ""
    backend = llama_factory({"model": str(folders["llama"])})
    assert 0 < backend.count_tokens(done[:1]) < backend.count_tokens(done) < backend.count_tokens(CONVERSATION)
    with pytest.raises(ValueError, match="last message must be the user's"):
        next(backend.stream(done, GREEDY))


def test_settings_validate() -> None:
    with pytest.raises(ValidationError, match="choose one"):
        TransformersSettings(model="m", load_in_8bit=True, load_in_4bit=True)
    assert TransformersSettings(model="m").device_map == "auto"


def test_quantization_without_bitsandbytes_says_how_to_fix(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "bitsandbytes" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    backend = llama_factory({"model": str(folders["llama"]), "load_in_4bit": True})
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
        backend.load()


def test_generation_errors_reach_the_consumer(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    backend = llama_factory({"model": str(folders["llama"])})
    model = backend.load().model

    def broken_forward(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    # the decode worker runs the model; its error reaches the consumer's thread, and the backend serves on
    monkeypatch.setattr(model, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="simulated"):
        list(backend.stream(CONVERSATION, GREEDY))
    monkeypatch.undo()
    assert "".join(backend.stream(CONVERSATION, GREEDY))


def test_concurrent_chats_share_decode_steps(case: Case) -> None:
    """Two chats at once are decoded in the same batched steps, each gets the reply it gets alone, and one
    closed early leaves the batch without changing the other's reply."""
    backend = case.factory({"model": str(case.folder)})
    other = [Message("user", Q1)]
    long = GenerationOptions(temperature=0, max_new_tokens=30)
    alone = ["".join(backend.stream(CONVERSATION, long)), "".join(backend.stream(other, long))]
    engine = backend.engine()
    replies: dict[str, str] = {}

    def chat(key: str, messages: list[Message], pieces: int | None) -> None:
        stream = backend.stream(messages, long)
        replies[key] = "".join(p for _, p in zip(range(pieces or 10**6), stream, strict=False))
        stream.close()  # a no-op when the reply has ended

    threads = [
        threading.Thread(target=chat, args=("a", CONVERSATION, None)),
        threading.Thread(target=chat, args=("b", other, None)),
        threading.Thread(target=chat, args=("closed", other, 2)),
    ]
    with engine.hold():  # all three join the batch at the same step
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(engine._pending) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert replies["a"] == alone[0] and replies["b"] == alone[1]
    assert alone[1].startswith(replies["closed"]) and len(replies["closed"]) < len(alone[1])
    assert engine.stats.most_rows == 3
