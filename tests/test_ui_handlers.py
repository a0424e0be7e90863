"""The web UI's handlers (app/ui_handlers.py) without Gradio or a browser: the real chat, ingest and preset
services over a temp data dir, with a scripted LLM backend registered as a plugin and the hashing embedder."""

from __future__ import annotations

import copy
import errno
import html
import logging
import re
import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app import presets, services, ui_handlers
from app.chat import ChatService, Source, StatusEvent
from app.container import Zhiku
from app.presets import PresetStore
from app.ui_handlers import (
    ABANDONED,
    CUT_SHORT_MARK,
    EMPTY_ANSWER,
    ERROR_MARK,
    INTERNAL_ERROR,
    NO_KB,
    NO_QUESTION,
    NOT_SEARCHED,
    NOTHING_TO_REGENERATE,
    SEARCHING,
    STOPPED_MARK,
    ChatControls,
    ChatUpdate,
    PageRef,
    Stopper,
    ask,
    delete_preset,
    history_of,
    md_cell,
    model_text,
    parse_seed,
    pick_preset,
    preset_names,
    refresh,
    regenerate,
    retrieval_off_html,
    safe_markdown,
    save_preset,
    show_page,
    sources_html,
    status_text,
    until_stopped,
    upload,
)
from common.errors import BackendUnavailableError
from llms.base import CUT_SHORT, GenerationOptions, Message
from plugins.hookspecs import hookimpl
from tests.helpers import make_pdf


class Scripted:
    """Streams ``pieces``, then raises ``error`` if set; records what it was asked and whether it was closed."""

    name = "scripted"
    context_window = 100_000

    def __init__(self) -> None:
        self.pieces = ["Hello", ", ", "world"]
        self.error: BaseException | None = None
        self.seen: list[list[Message]] = []
        self.closed = 0

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content) for m in messages)

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        self.seen.append(list(messages))
        try:
            yield from self.pieces
            if self.error is not None:
                raise self.error
        finally:
            self.closed += 1


class ScriptedPlugin:
    def __init__(self, backend: Scripted) -> None:
        self.backend = backend

    @hookimpl
    def register_llms(self, register: Any) -> None:
        register("scripted", lambda options: self.backend)


@pytest.fixture
def backend(app: Zhiku) -> Scripted:
    scripted = Scripted()
    app.plugins.register(ScriptedPlugin(scripted))
    app.settings.llm.backend = "scripted"
    return scripted


@pytest.fixture
def service(app: Zhiku, backend: Scripted, tmp_path: Path) -> ChatService:
    note = tmp_path / "frogs.txt"
    note.write_text("池塘里的青蛙每天傍晚在荷叶上唱歌，一共有七只。", encoding="utf-8")
    app.ingest.ingest("notes", [note])
    return app.chat


@pytest.fixture
def store(app: Zhiku) -> PresetStore:
    return PresetStore(app.settings.data_dir)


def texts(update: ChatUpdate) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in update.chat or []]


# ----- answering ---------------------------------------------------------------------------------------------
def test_answer_streams_sources_then_a_growing_answer(service: ChatService, backend: Scripted) -> None:
    updates = list(ask(service, " 青蛙有几只？ ", [], ChatControls(kb="notes", temperature=0, retrieval_k=2)))
    first, searching, with_sources, reading, *growing, final = updates
    assert texts(first) == [("user", "青蛙有几只？")] and first.sources == SEARCHING
    assert first.effective == service.settings.chat.system_prompt_zh
    # something on screen at once, before the first word of the answer
    assert texts(searching)[-1] == ("assistant", status_text(StatusEvent("searching")))
    assert "frogs.txt" in (with_sources.sources or "") and texts(with_sources) == texts(first)
    assert texts(reading)[-1] == ("assistant", status_text(StatusEvent("reading", 1))) and "1 passages" in status_text(
        StatusEvent("reading", 1)
    )
    assert [texts(u)[-1][1] for u in growing] == ["Hello", "Hello, ", "Hello, world"]
    # the answer as shown: the sentence that supports it, with its source number
    assert texts(final)[-1][1].startswith("Hello, world") and "七只" in texts(final)[-1][1]
    assert "[1]" in texts(final)[-1][1]
    assert all(u.warning is None for u in updates)
    assert "七只" in backend.seen[0][-1].content  # the retrieved passage reached the model


def test_answer_without_a_knowledge_base_and_an_empty_answer(service: ChatService, backend: Scripted) -> None:
    backend.pieces = []
    *_, last = ask(service, "hi", [], ChatControls(kb=NO_KB, system_prompt="  Be brief.  "))
    assert "no knowledge base" in (last.sources or "")
    assert texts(last) == [("user", "hi"), ("assistant", EMPTY_ANSWER)] and last.effective == "Be brief."


def test_an_empty_question_is_a_warning_and_changes_nothing(service: ChatService, backend: Scripted) -> None:
    assert list(ask(service, "   ", [{"role": "user", "content": "q"}], ChatControls())) == [
        ChatUpdate(None, warning=NO_QUESTION)
    ]
    assert backend.seen == []


def test_a_zhiku_error_mid_answer_keeps_the_partial_answer_and_adds_an_error_bubble(
    service: ChatService, backend: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    backend.error = BackendUnavailableError("the model server went away", "start it again")
    *_, last = ask(service, "青蛙有几只？", [], ChatControls(kb="notes"))
    message = "the model server went away; start it again"
    assert texts(last)[1:] == [("assistant", "Hello, world"), ("assistant", f"{ERROR_MARK} {message}")]
    assert last.warning == message and last.sources not in (None, SEARCHING)
    assert not [r for r in caplog.records if r.exc_info]  # a user's problem, not a bug: no traceback


def test_a_missing_knowledge_base_is_an_error_bubble_naming_it(service: ChatService) -> None:
    updates = list(ask(service, "hi", [], ChatControls(kb="gone")))
    last = updates[-1]
    assert texts(last)[-1][1].startswith(ERROR_MARK) and "gone" in texts(last)[-1][1]
    assert last.sources == NOT_SEARCHED  # not "searching…" forever
    assert last.warning and "gone" in last.warning and "\n" not in last.warning


def test_invalid_generation_settings_are_one_readable_line(service: ChatService, backend: Scripted) -> None:
    (last,) = list(ask(service, "hi", [], ChatControls(temperature=7.5)))
    assert last.warning and "temperature" in last.warning and "\n" not in last.warning
    assert texts(last)[-1][1] == f"{ERROR_MARK} {safe_markdown(last.warning)}"
    assert backend.seen == []


def test_an_unexpected_exception_is_logged_with_its_traceback_and_shown_as_internal(
    service: ChatService, backend: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    backend.error = KeyError("boom")
    with caplog.at_level(logging.ERROR, logger="app.ui_handlers"):
        *_, last = ask(service, "hi", [], ChatControls())
    assert last.warning == f"{INTERNAL_ERROR}: KeyError: 'boom'"
    assert texts(last)[-1][1].startswith(f"{ERROR_MARK} {INTERNAL_ERROR}")
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_closing_the_stream_ends_the_generation(service: ChatService, backend: Scripted) -> None:
    updates = ask(service, "hi", [], ChatControls())
    for update in updates:
        if texts(update)[-1] == ("assistant", "Hello"):
            break
    assert backend.closed == 0
    updates.close()  # what Stop does
    assert backend.closed == 1


def test_an_answer_the_model_cut_at_max_new_tokens_says_so(service: ChatService, backend: Scripted) -> None:
    backend.pieces = ["Hello", ", wor", CUT_SHORT]
    *_, last = ask(service, "hi", [], ChatControls())
    assert texts(last)[-1] == ("assistant", f"Hello, wor\n\n{CUT_SHORT_MARK}")
    assert [m.content for m in history_of(last.chat or [])] == ["hi", "Hello, wor"]  # the mark is the UI's
    backend.pieces = ["Hello", ", world"]  # a reply that ended by itself has no mark
    *_, last = ask(service, "hi", [], ChatControls())
    assert texts(last)[-1] == ("assistant", "Hello, world")


def run(stopper: Stopper, updates: Any, view: str | None = None) -> list[str]:
    """An answer as the UI runs it: begun, shown unless abandoned, ended."""
    ticket = stopper.begin(view)
    try:
        return [texts(u)[-1][1] for u in until_stopped(updates, stopper, ticket) if stopper.state(ticket) != ABANDONED]
    finally:
        stopper.end(ticket)


def test_stop_ends_the_sessions_answer_in_progress_and_not_the_next_one(
    service: ChatService, backend: Scripted
) -> None:
    stopper = copy.deepcopy(Stopper())  # what gr.State gives each session
    other = copy.deepcopy(stopper)
    assert other is not stopper

    def stopped_at_hello() -> Generator[ChatUpdate, None, None]:
        for update in ask(service, "hi", [], ChatControls()):
            yield update
            if texts(update)[-1][1] == "Hello":
                other.stop()  # another session's Stop changes nothing here
                stopper.stop()

    shown = run(stopper, stopped_at_hello())
    # the generation ended at once, and the answer shown so far says it was stopped
    assert shown[-2:] == ["Hello", f"Hello\n\n{STOPPED_MARK}"] and backend.closed == 1
    stopper.stop()  # with no answer in progress
    assert run(stopper, ask(service, "hi", [], ChatControls()))[-1] == "Hello, world"  # it does not end the next
    # the mark is the UI's: a follow-up gives the model the answer without it
    stopped = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"Hello\n\n{STOPPED_MARK}"}]
    assert [m.content for m in history_of(stopped)] == ["hi", "Hello"]


def test_switching_chats_abandons_the_answer_and_returns_once_it_has_ended(
    service: ChatService, backend: Scripted
) -> None:
    stopper = copy.deepcopy(Stopper())
    ticket = stopper.begin("")
    first_piece, go_on, ended = threading.Event(), threading.Event(), threading.Event()
    shown: list[str] = []
    produced: list[str] = []

    def answer() -> None:
        try:
            for update in until_stopped(ask(service, "hi", [], ChatControls()), stopper, ticket):
                produced.append(texts(update)[-1][1])
                if stopper.state(ticket) != ABANDONED:
                    shown.append(produced[-1])
                if produced[-1] == "Hello":
                    first_piece.set()
                    go_on.wait()
        finally:
            ended.set()
            stopper.end(ticket)

    worker = threading.Thread(target=answer)
    worker.start()
    first_piece.wait()
    views: list[str] = []
    switching = threading.Thread(target=lambda: views.append(stopper.switch(timeout=120)))
    switching.start()
    while stopper.state(ticket) != ABANDONED:  # the switch has marked the answer; it now waits for its end
        switching.join(0.01)
    assert not views  # still waiting: the answer has not ended
    go_on.set()
    switching.join()
    assert ended.is_set() and views and views[0]  # it returned once the answer had ended, with a new view
    worker.join()
    # nothing after the switch was shown; the answer (for its own conversation) says where it was cut short
    assert shown[-1] == "Hello" and not [t for t in shown if "world" in t or STOPPED_MARK in t]
    assert produced[-1] == f"Hello\n\n{STOPPED_MARK}" and backend.closed == 1
    # a question asked from the chat before the switch (it waited for a model slot) shows nothing
    assert run(stopper, ask(service, "hi", [], ChatControls()), view="") == []
    assert run(stopper, ask(service, "hi", [], ChatControls()), view=views[0])[-1] == "Hello, world"


def test_an_abandoned_answers_last_outputs_change_nothing(app: Zhiku, service: ChatService) -> None:
    # Gradio completes a streamed event by sending its last outputs again, after the generator has ended: that
    # is after the switch waiting for the end may have opened another chat, which those outputs would overwrite
    import gradio as gr

    from app.conversations import ConversationStore
    from app.ui import Adapters

    conversations = ConversationStore(app.settings.data_dir)
    on = Adapters(gr, app, PresetStore(app.settings.data_dir), conversations)
    stopper = copy.deepcopy(Stopper())
    answer = on.respond("hi", [], stopper, None, None)
    while not any(isinstance(out, list) and out and "Hello" in str(out[-1]) for out in next(answer)):
        pass  # up to the first words on screen
    stopper.switch(timeout=0)  # "New chat" while it answers (it would wait for the end; here the test drives it)
    rest = list(answer)
    assert rest and all(out == gr.skip() for out in rest[-1])
    [saved] = conversations.conversations("")  # the answer still went to its own conversation, marked
    assert conversations.messages("", saved.id)[-1].content.endswith(STOPPED_MARK)


@pytest.mark.parametrize(("box", "seed"), [("", None), ("  ", None), (" 42 ", 42), ("-3", -3), (None, None), (7.0, 7)])
def test_the_seed_box_is_empty_for_random_or_a_whole_number(box: float | str | None, seed: int | None) -> None:
    assert parse_seed(box) == seed


def test_a_seed_that_is_not_a_number_is_a_warning(service: ChatService) -> None:
    with pytest.raises(ValueError, match="leave it empty for a random seed"):
        parse_seed("1.5")
    *_, last = ask(service, "hi", [], ChatControls(seed="abc"))
    assert last.warning is not None and "'abc' is not a whole number" in last.warning


def test_retrieval_top_k_zero_says_it_did_not_search(service: ChatService) -> None:
    *_, last = ask(service, "青蛙有几只？", [], ChatControls(kb="notes", retrieval_k=0))
    assert last.sources == retrieval_off_html()
    assert texts(last)[-1][0] == "assistant" and not texts(last)[-1][1].startswith(ERROR_MARK)


def test_history_keeps_only_answered_turns_as_the_model_wrote_them() -> None:
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": safe_markdown("a1 <b>bold</b> ![x](u)")},
        {"role": "user", "content": "q2"},  # stopped before any answer
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": f"{ERROR_MARK} the knowledge base is gone"},
        {"role": "user", "content": safe_markdown("q4 `<div>`")},
        {"role": "assistant", "content": "a4"},
    ]
    assert history_of(chat) == [
        Message("user", "q1"),
        Message("assistant", "a1 <b>bold</b> ![x](u)"),
        Message("user", "q4 `<div>`"),
        Message("assistant", "a4"),
    ]


# ----- regenerate --------------------------------------------------------------------------------------------
def test_regenerate_answers_the_last_question_again_in_place_of_its_answer(
    service: ChatService, backend: Scripted
) -> None:
    chat = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": safe_markdown("what does <div> do?")},
        {"role": "assistant", "content": f"{ERROR_MARK} the model server went away"},
    ]
    *_, last = regenerate(service, chat, ChatControls())
    assert texts(last) == [*[(m["role"], m["content"]) for m in chat[:3]], ("assistant", "Hello, world")]
    asked = backend.seen[-1]
    assert [m.content for m in asked[1:3]] == ["q1", "a1"]
    assert asked[-1].content == "what does <div> do?"  # the question itself, not its escaped display


@pytest.mark.parametrize(
    "chat", [None, [], [{"role": "assistant", "content": "hello"}], [{"role": "user", "content": " "}]]
)
def test_regenerate_with_nothing_to_regenerate_is_a_warning(service: ChatService, chat: Any) -> None:
    assert list(regenerate(service, chat, ChatControls())) == [ChatUpdate(None, warning=NOTHING_TO_REGENERATE)]


def test_a_malformed_chat_from_the_client_is_ignored_not_a_crash(service: ChatService) -> None:
    *_, last = ask(service, "hi", ["junk", {"role": "system", "content": "x"}, 3], ChatControls())
    assert texts(last) == [("user", "hi"), ("assistant", "Hello, world")]


# ----- presets -----------------------------------------------------------------------------------------------
def test_save_pick_and_delete_a_preset(store: PresetStore) -> None:
    saved = save_preset(store, "  简短 ", "Answer briefly.")
    assert (saved.choices, saved.selected, saved.name, saved.warning) == (["简短"], "简短", "简短", None)
    assert saved.info and "简短" in saved.info
    picked = pick_preset(store, "简短")
    assert (picked.prompt, picked.name) == ("Answer briefly.", "简短")
    deleted = delete_preset(store, "", "简短")  # the selected one, the name box being empty
    assert (deleted.choices, deleted.selected, deleted.name, deleted.warning) == ([], None, "", None)
    assert pick_preset(store, None) == ui_handlers.PresetUpdate()


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [("../x", "text", "must not contain '/'"), ("ok", "  ", "preset text is empty"), ("", "text", "name is empty")],
)
def test_an_invalid_preset_is_not_saved_and_says_why(store: PresetStore, name: str, text: str, expected: str) -> None:
    update = save_preset(store, name, text)
    assert update.choices is None and update.name is None  # the components keep their values
    assert (
        update.warning and update.warning.startswith("预设未保存 / preset not saved: ") and expected in update.warning
    )
    assert store.list() == {}


def test_a_read_only_data_dir_is_named_when_a_preset_is_saved_or_deleted(
    store: PresetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile use: with a read-only data dir, saving a preset showed Gradio's blank "Error"."""
    save_preset(store, "kept", "an older preset")

    def read_only(path: Path, data: bytes) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(presets, "atomic_write_bytes", read_only)
    for update, prefix in (
        (save_preset(store, "new", "text"), "预设未保存 / preset not saved: "),
        (delete_preset(store, "kept", None), "预设未删除 / preset not deleted: "),
    ):
        assert update.warning and update.warning.startswith(prefix), update.warning
        for why in ("presets.json", "Permission denied", "write access to", str(store.path.parent)):
            assert why in update.warning
        assert update.choices is None and update.name is None  # the components keep their values
    assert store.list() == {"kept": "an older preset"}


@pytest.mark.parametrize(
    ("err", "fix"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "give the user running Zhiku write access to"),
        (OSError(errno.EROFS, "Read-only file system"), "give the user running Zhiku write access to"),
        (OSError(errno.ENOSPC, "No space left on device"), "free some disk space for"),
    ],
)
def test_a_raw_os_error_from_the_preset_store_says_why_and_what_to_do(
    store: PresetStore, monkeypatch: pytest.MonkeyPatch, err: OSError, fix: str
) -> None:
    """The handlers' own net, for an OSError that the store does not turn into a ZhikuError itself."""
    save_preset(store, "kept", "an older preset")

    def fail(self: PresetStore, data: dict[str, str]) -> None:
        raise err

    monkeypatch.setattr(PresetStore, "_write", fail)
    why = f"cannot write presets.json ({err.strerror}); {fix} {store.path.parent}"
    saved, deleted = save_preset(store, "new", "text"), delete_preset(store, "kept", None)
    assert saved.warning == f"预设未保存 / preset not saved: {why}"
    assert deleted.warning == f"预设未删除 / preset not deleted: {why}"
    assert saved.choices is None and saved.name is None and deleted.choices is None and deleted.name is None
    assert store.list() == {"kept": "an older preset"}


def test_delete_and_pick_of_a_missing_preset_are_warnings(store: PresetStore) -> None:
    deleted = delete_preset(store, "nope", None).warning or ""
    assert deleted.startswith("预设未删除 / preset not deleted: no preset named 'nope'")
    assert (pick_preset(store, "nope").warning or "").startswith("no preset named 'nope'")


def test_an_unreadable_presets_file_is_a_warning_everywhere(store: PresetStore, app: Zhiku) -> None:
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("{not json", encoding="utf-8")
    assert preset_names(store)[0] == [] and "presets.json is not valid JSON" in (preset_names(store)[1] or "")
    fresh = refresh(app.kbs, store, None, "gone")
    assert fresh.presets == [] and fresh.preset is None and "not valid JSON" in (fresh.warning or "")
    assert "not valid JSON" in (save_preset(store, "a", "b").warning or "")


def test_an_unexpected_preset_failure_is_logged_and_internal(
    store: PresetStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: PresetStore) -> dict[str, str]:
        raise TypeError("bug")

    monkeypatch.setattr(PresetStore, "_read", broken)
    update = save_preset(store, "a", "b")
    assert update.warning == f"预设未保存 / preset not saved: {INTERNAL_ERROR}: TypeError: bug"
    assert any(r.exc_info for r in caplog.records)


def test_refresh_picks_an_existing_knowledge_base(service: ChatService, app: Zhiku, store: PresetStore) -> None:
    save_preset(store, "p", "text")
    fresh = refresh(app.kbs, store, "deleted meanwhile", "p")
    assert (fresh.kbs, fresh.kb, fresh.presets, fresh.preset, fresh.warning) == (
        [NO_KB, "notes"],
        "notes",
        ["p"],
        "p",
        None,
    )
    assert refresh(app.kbs, store, NO_KB, None).kb == NO_KB


# ----- upload ------------------------------------------------------------------------------------------------
def test_upload_summary_counts_and_lists_the_refused_files(app: Zhiku, tmp_path: Path) -> None:
    good, bad = tmp_path / "青蛙笔记.txt", tmp_path / "tool.exe"
    good.write_text("池塘里的青蛙一共有七只。", encoding="utf-8")
    bad.write_bytes(b"MZ")
    calls: list[tuple[int, int, str]] = []
    update = upload(app.ingest, app.kbs, [str(good), str(bad)], " 上传测试 ", NO_KB, lambda *a: calls.append(a))
    assert update.summary is not None
    lines = update.summary.splitlines()
    assert lines[0] == "**知识库 knowledge base: 上传测试**"
    assert "新增 added 1 · 更新 updated 0 · 未变 unchanged 0 · 失败 failed 0" in lines[2]
    assert lines[3].startswith("- ❌ tool.exe: ") and "unsupported type" in lines[3]
    assert update.warning == "部分文件未导入 / some files were not ingested"
    assert (update.kbs, update.kb, update.clear_files) == ([NO_KB, "上传测试"], "上传测试", True)
    assert calls[0][:2] == (0, 2) and calls[-1][:2] == (1, 2) and "青蛙笔记.txt" in calls[-1][2]

    again = upload(app.ingest, app.kbs, str(good), "", "上传测试")  # into the selected one; nothing new
    assert again.warning is None and "未变 unchanged 1" in (again.summary or "")


@pytest.mark.parametrize(
    ("files", "target", "selected", "expected"),
    [([], "kb", None, "Choose files"), (["x.txt"], "", NO_KB, "Pick a knowledge base")],
)
def test_upload_needs_files_and_a_knowledge_base(
    app: Zhiku, files: list[str], target: str, selected: str | None, expected: str
) -> None:
    update = upload(app.ingest, app.kbs, files, target, selected)
    assert update.summary is None and update.kbs is None and not update.clear_files
    assert update.warning and expected in update.warning


def test_upload_into_an_invalid_name_is_refused_in_the_result_box(app: Zhiku, tmp_path: Path) -> None:
    note = tmp_path / "a.txt"
    note.write_text("text", encoding="utf-8")
    update = upload(app.ingest, app.kbs, [str(note)], "../evil", None)
    assert update.summary and update.summary.startswith(ERROR_MARK) and update.warning
    assert "evil" in update.warning and update.kbs is None and not update.clear_files
    assert not (app.settings.data_dir / "evil").exists()


def test_upload_that_cannot_be_stored_says_why(app: Zhiku, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    note = tmp_path / "a.txt"
    note.write_text("text", encoding="utf-8")

    def read_only(src: Path, dest: Path) -> Path:
        raise OSError(errno.EROFS, "Read-only file system", str(dest))

    monkeypatch.setattr(services, "_copy_atomically", read_only)
    update = upload(app.ingest, app.kbs, [str(note)], "kb", None)
    folder = app.settings.data_dir / "uploads"
    assert update.warning == (
        f"cannot write the uploaded files (Read-only file system); give the user running Zhiku write access to {folder}"
    )
    assert update.summary == f"{ERROR_MARK} {md_cell(update.warning)}"


# ----- Markdown that fetches nothing -------------------------------------------------------------------------
_CODE_FENCE = re.compile(r"^(`{3,}|~{3,}) ?[\w+#.-]*$")


def assert_inert(shown: str) -> None:
    """What safe_markdown promises the browser's Markdown parser: code blocks only in the canonical form (a
    column-0 fence after a blank line, closed by the same fence, which no body line starts with, never
    "```mermaid"), and outside them no "<" that starts a tag (but the <code> elements it writes) and no "![".
    """
    assert "\r" not in shown
    lines = shown.split("\n")
    fence = ""
    for n, line in enumerate(lines):
        if fence:
            assert not line.lstrip().startswith(fence) or line == fence, (n, line)
            fence = "" if line == fence else fence
        elif _CODE_FENCE.match(line):
            fence = re.match(r"`+|~+", line)[0]
            assert n == 0 or lines[n - 1] == "", (n, lines[n - 1])
            assert not line.startswith("```mermaid")
        else:
            assert not re.match(r"[ \t]*(```|~~~)", line), line
            prose = re.sub(r"</?code>", "", line)
            assert not re.search(r"<[A-Za-z/!?]", prose) and "![" not in prose and "```mermaid" not in prose, line
    assert not fence, "an unclosed code block"


HOSTILE = [
    "![x](http://127.0.0.1:9/pixel.png)",
    "![x][ref]\n\n[ref]: http://127.0.0.1:9/ref.png",
    "<img src=http://127.0.0.1:9/p2.png>",
    "<IMG SRC=//127.0.0.1:9/p.png>",
    '<iframe src="http://127.0.0.1:9/f"></iframe>',
    "<video src=http://h/v.mp4></video><audio src=a.mp3><source src=s.mp3></audio>",
    '<link rel=stylesheet href="http://h/s.css"><object data="http://h/o"></object>',
    "<style>body { background: url(http://h/b.png) }</style>",
    '<div style="background:url(http://h/x.png)">x</div>',
    "<!-- comment --><?php ?><!DOCTYPE x>",
    "`<img src=http://h/code.png>` in inline code",
    "\\`<img src=http://h/esc.png>`",
    "```\n```~\n<img src=http://h/quirk.png>\n```",
    "  ```\nfoo\n```\n<img src=http://h/indented.png>",
    "- item\n  ```\n<img src=http://h/list.png>\n  ```",
    "[a]:\n```\n<img src=http://h/def.png>\n```",
    "```a`b\n<img src=http://h/bad-fence.png>\n```",
    "```mermaid\ngraph TD\nA@{ img: 'http://h/m.png' }\n```",
    "> ```mermaid\n> A@{ img: 'http://h/m.png' }\n> ```",
    "| a | `x | <img src=http://h/cell.png> ` |\n|---|---|",
    "http://h/`x`<img src=http://h/url.png>`",
    "**bold ![x](http://h/b.png)**",
    "```python\nunclosed <img src=http://h/u.png>",
    "x\r```\n```\n<img src=http://h/cr.png>\n```",  # marked reads a lone CR as a line break
    "```\nx\r````\n<img src=http://h/cr2.png>\n```",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_markdown_leaves_nothing_that_fetches(text: str) -> None:
    shown = safe_markdown(text)
    assert_inert(shown)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=list("<>![]()`~ \n\r\t-*>|\\$/aimg:=\"'#"), max_size=60))
def test_safe_markdown_is_inert_for_any_text(text: str) -> None:
    assert_inert(safe_markdown(text))


@pytest.mark.parametrize(
    "text",
    [
        "**粗体** and _italic_, a [link](https://example.com) and https://example.com",
        "- one\n- two\n\n1. first\n2. second",
        "inline `code` and ``a`b``",
        "```python\nprint(1 < 2)\n```",
        "# 标题\n\n> quoted\n\n| a | b |\n|---|---|\n| 1 | 2 |",
        "a < b and x<5",
    ],
)
def test_safe_markdown_keeps_ordinary_markdown(text: str) -> None:
    assert safe_markdown(text) == text


def test_safe_markdown_keeps_code_blocks_as_code() -> None:
    text = "Run:\n1. install\n   ```bash\n   echo '<b>' && cat <file>\n   ```\n2. done"
    shown = safe_markdown(text)
    assert "\n\n```bash\necho '<b>' && cat <file>\n```\n" in shown  # untouched, at column 0, after a blank line
    assert safe_markdown("use `List<int>` here") == "use <code>List&#60;int&#62;</code> here"
    assert safe_markdown("~~~\n````\n~~~") == "~~~\n````\n~~~"
    assert safe_markdown("```\n````x\n```") == "`````\n````x\n`````"  # no body line can close it


@pytest.mark.parametrize("text", [*HOSTILE[:12], "plain", "a `<b>` c", "![a](b) and <c>"])
def test_model_text_undoes_safe_markdown_outside_code_blocks(text: str) -> None:
    assert model_text(safe_markdown(text)) == text


# ----- the sources panel and the page view -------------------------------------------------------------------
def test_sources_are_rows_with_the_whole_passage_marked_at_the_answer(service: ChatService, backend: Scripted) -> None:
    backend.pieces = ["池塘里一共有七只青蛙。"]
    updates = list(ask(service, "青蛙有几只？", [], ChatControls(kb="notes", retrieval_k=2)))
    with_sources = next(u for u in updates if u.sources and "<details" in u.sources)
    assert "<mark>" not in (with_sources.sources or "")  # before the answer: nothing marked yet
    assert updates[0].pages == []  # a new answer clears the last one's pages
    final = updates[-1]
    panel = final.sources or ""
    assert re.search(r"<summary>\[1\] frogs\.txt · \d\.\d{3}</summary>", panel), panel
    # the whole passage, its cited sentence marked
    assert "<mark>池塘里的青蛙每天傍晚在荷叶上唱歌，一共有七只。</mark>" in panel
    assert final.pages == []  # no PDF among the sources


def test_not_found_shows_no_sources(service: ChatService, backend: Scripted) -> None:
    *_, final = ask(service, "2022年世界杯冠军是谁？", [], ChatControls(kb="notes"))
    assert texts(final)[-1] == ("assistant", "知识库中没有找到这个问题的答案。")
    assert "nothing in the knowledge base answers this" in (final.sources or "")
    assert "<details" not in (final.sources or "") and final.pages == []
    assert backend.seen == []


def test_sources_html_escapes_everything_from_documents() -> None:
    hostile = "<img src=x onerror=alert(1)>"
    passage = f"第一句。{hostile} 七只青蛙。![x](http://h/p.png)"
    source = Source(f"{hostile}.txt", f"/x/{hostile}.txt", None, passage, 0.87654)
    panel = sources_html([source], "kb", [[(4, len(passage))]])
    body = panel[panel.index("</summary>") :]
    assert "<img" not in panel and "onerror=alert(1)&gt;" in body
    assert "<mark>&lt;img src=x onerror=alert(1)&gt; 七只青蛙。![x](http://h/p.png)</mark>" in body
    assert f"<summary>[1] {html.escape(hostile)}.txt · 0.877</summary>" in panel
    assert "<img" not in sources_html([], f"{hostile}") and "no knowledge base" in sources_html([], None)


@pytest.fixture
def pdf_service(app: Zhiku, backend: Scripted, tmp_path: Path) -> ChatService:
    pages = ["第一页\n长江是中国最长的河流，全长约6300公里。", "第二页\n黄河是中国第二长河。"]
    pdf = make_pdf(tmp_path / "report.pdf", pages)
    app.ingest.ingest("pdfs", [pdf])
    return app.chat


def test_pdf_sources_can_be_shown_as_their_page(pdf_service: ChatService, backend: Scripted, tmp_path: Path) -> None:
    backend.pieces = ["长江全长约6300公里。"]
    *_, final = ask(pdf_service, "长江全长多少公里？", [], ChatControls(kb="pdfs", retrieval_k=2))
    refs = final.pages or []
    first = next(r for r in refs if r.page == 1)
    assert first.label.endswith("report.pdf p.1") and "6300" in first.highlight
    view = show_page(refs, first.label, resolution=50)
    assert view.warning is None and abs(view.image.size[0] - 595 * 50 / 72) < 2  # A4 at 50 dpi
    # only the answer's own sources: a path typed by the user is not one
    assert show_page(refs, str(tmp_path / "report.pdf")).warning
    assert show_page([], first.label).image is None
    assert show_page(refs, None) == show_page(refs, "")
    gone = show_page([PageRef("[1] x.pdf p.1", str(tmp_path / "x.pdf"), 1, "")], "[1] x.pdf p.1")
    assert gone.image is None and "no longer there" in (gone.warning or "")
    text = tmp_path / "t.pdf"
    text.write_text("not a pdf", encoding="utf-8")
    assert "not a PDF" in (show_page([PageRef("t", str(text), 1, "")], "t").warning or "")
    assert "no page 9" in (show_page([PageRef("p", first.path, 9, "")], "p").warning or "")


def test_the_page_loads_reopening_never_replaces_a_chat_the_user_has_begun(app: Zhiku, service: ChatService) -> None:
    # on a busy server the load's reopening can run after the first question was answered: it must leave it
    import gradio as gr

    from app.conversations import ConversationStore
    from app.ui import Adapters

    conversations = ConversationStore(app.settings.data_dir)
    on = Adapters(gr, app, PresetStore(app.settings.data_dir), conversations)
    stopper = copy.deepcopy(Stopper())
    fresh = on.reopen("", stopper, "")
    assert fresh[2] == [] and not any(out == gr.skip() for out in fresh[:3])  # a fresh page: the empty chat
    *_, answered = on.respond("hi", [], stopper, None, None)
    assert answered[1] and "Hello" in str(answered[1][-1])
    assert on.reopen("", stopper, "") == gr.skip()  # Gradio: one skip for all of an event's outputs
    switched = copy.deepcopy(Stopper())
    switched.switch(timeout=0)  # another chat opened from the list before the load's reopening ran
    assert on.reopen("", switched, "") == gr.skip()
