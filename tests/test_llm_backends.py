"""One contract, every backend: the same test body runs over each registered chat backend.

- moss / llama / baichuan: tiny random-weight models of the real architecture, built by tests/tiny_models.py
- default: the real bundled Qwen2.5 0.5B GGUF through llama-cpp-python
- openai: a real OpenAI-compatible server (llama-cpp-python's) started here on 127.0.0.1
- extractive: the fallback when no model is installed
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llms.base import (
    CUT_SHORT,
    ChatBackend,
    ContextOverflowError,
    CutShort,
    GenerationOptions,
    Message,
    fit_messages,
)
from llms.llamacpp import ExtractiveBackend, LlamaCppBackend, LlamaCppSettings, assemble_bundled_model
from llms.openai_backend import OpenAIBackend, OpenAISettings
from tests import tiny_models

GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=12, seed=7)


@pytest.fixture(scope="session")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return assemble_bundled_model(tmp_path_factory.mktemp("models"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def openai_server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on loopback, serving the bundled model."""
    port = _free_port()
    # a file, not a pipe: the server logs a lot, and a full pipe would block it
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            "zhiku-test",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--n_threads",
            str(os.cpu_count() or 1),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"llama_cpp.server did not start: {log}") from err
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log_file.close()


def _tiny(kind: str, root: Path) -> ChatBackend:
    from llms.transformers_backend import baichuan_factory, llama_factory, moss_factory

    builders = {"moss": tiny_models.tiny_moss, "llama": tiny_models.tiny_llama, "baichuan": tiny_models.tiny_baichuan}
    factories = {"moss": moss_factory, "llama": llama_factory, "baichuan": baichuan_factory}
    path = builders[kind](root / kind)
    return factories[kind]({"model": str(path), "device_map": None, "dtype": "float32", "context_window": 256})


BACKENDS = ["moss", "llama", "baichuan", "default", "openai"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ChatBackend:
    kind: str = request.param
    if kind in ("moss", "llama", "baichuan"):
        return _tiny(kind, tmp_path_factory.mktemp("tiny"))
    gguf_path: Path = request.getfixturevalue("gguf")
    if kind == "default":
        return LlamaCppBackend(LlamaCppSettings(model_path=str(gguf_path), n_ctx=2048))
    url: str = request.getfixturevalue("openai_server")
    return OpenAIBackend(OpenAISettings(base_url=url, model="zhiku-test", context_window=2048))


def conversation(question: str = "长江有多长？") -> list[Message]:
    return [
        Message("system", "你是一个有帮助的助手。"),
        Message("user", "你好"),
        Message("assistant", "你好！"),
        Message("user", question),
    ]


def collect(backend: ChatBackend, messages: list[Message], options: GenerationOptions) -> list[str]:
    return list(backend.stream(messages, options))


def test_backend_contract(backend: ChatBackend) -> None:
    msgs = conversation()
    # streaming: pieces arrive one by one and greedy decoding is reproducible
    pieces = collect(backend, msgs, GREEDY)
    text = "".join(pieces)
    assert text.strip() and len(pieces) >= 2
    assert "".join(collect(backend, msgs, GREEDY)) == text

    # a stop string cuts the answer where it first occurs, and is not emitted
    stop = text.strip()[len(text.strip()) // 2 :][:2]
    stopped = collect(backend, msgs, GREEDY.model_copy(update={"stop": [stop]}))
    assert "".join(stopped) == text[: text.find(stop)] and not isinstance(stopped[-1], CutShort)

    # max_new_tokens bounds the answer, and the reply says it was cut short there
    short = collect(backend, msgs, GREEDY.model_copy(update={"max_new_tokens": 2}))
    assert 0 < len("".join(short)) < len(text) and short[-1] is CUT_SHORT

    # token counting in the backend's own format: more history, more tokens
    assert backend.count_tokens(msgs) > backend.count_tokens(msgs[-1:]) > 0

    # trimming: the newest turn and the system prompt stay, the oldest turns go first
    long_history = [msgs[0]]
    i = 0
    while backend.count_tokens(long_history) < backend.context_window:  # overflow the window
        long_history += [Message("user", f"第{i}个问题：" + "很长的内容" * 8), Message("assistant", f"第{i}个回答")]
        i += 1
    long_history.append(Message("user", "最后的问题"))
    fitted = fit_messages(backend, long_history, max_new_tokens=64)
    assert fitted[0] == msgs[0] and fitted[-1].content == "最后的问题"
    assert len(fitted) < len(long_history) and fitted[1].role == "user"
    assert backend.count_tokens(fitted) + 64 <= backend.context_window
    assert fitted[1:] == long_history[len(long_history) - len(fitted) + 1 :]  # a contiguous newest tail

    with pytest.raises(ContextOverflowError, match="context"):
        fit_messages(backend, [Message("user", "字" * 50_000)], max_new_tokens=64)


def test_unknown_generation_option_is_an_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="temprature"):
        GenerationOptions.model_validate({"temprature": 0.5})


def test_default_backend_answers_from_the_passage(gguf: Path) -> None:
    backend = LlamaCppBackend(LlamaCppSettings(model_path=str(gguf), n_ctx=2048))
    msgs = [
        Message("system", "学习以下文段, 用中文回答用户问题。"),
        Message("user", "[1] 长江是中国最长的河流，全长约6300公里。\n\n问题：长江全长多少公里？"),
    ]
    answer = "".join(backend.stream(msgs, GenerationOptions(temperature=0, max_new_tokens=40)))
    assert "6300" in answer


def test_extractive_fallback_quotes_passages_and_says_so() -> None:
    backend = ExtractiveBackend("llama-cpp-python is not installed")
    msgs = [Message("user", "…问题：长江有多长？", context=("长江全长约6300公里。", "黄河是第二长河。"))]
    answer = "".join(backend.stream(msgs, GREEDY.model_copy(update={"max_new_tokens": 200})))
    assert "未加载语言模型" in answer and "> [1] 长江全长约6300公里。" in answer and "[2]" in answer
    empty = "".join(backend.stream([Message("user", "What?")], GREEDY))
    assert "No language model is loaded" in empty and "No relevant passage" in empty


def test_default_factory_falls_back_when_llama_cpp_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from llms.llamacpp import default_factory

    real = importlib.util.find_spec

    def no_llama(name: str, *args: Any) -> Any:
        return None if name == "llama_cpp" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_llama)
    assert isinstance(default_factory({}), ExtractiveBackend)
