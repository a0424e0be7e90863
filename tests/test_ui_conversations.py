"""Saved conversations in the UI (issue 13): the sidebar's handlers without a browser, then in Chromium a
conversation that survives a reload and a server restart, renamed, exported and deleted; and the input box
during an answer (a draft stays, a question sent meanwhile is answered next)."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app import ui_conversations as uc
from app import ui_handlers as h
from app.conversations import ConversationStore
from app.ui import launch
from app.ui_handlers import NO_KB, STOPPED_MARK, ChatControls
from llms.base import GenerationOptions, Message
from plugins.hookspecs import hookimpl
from tests.test_ui import (
    TIMEOUT_MS,
    _free_port,
    ask,
    browser,
    echo_app,
    echo_config,
    messages,
    readme_picture,
    wait_answered,
)

__all__ = ["browser"]  # the module-scoped Chromium fixture of test_ui.py

CHAT = [
    {"role": "user", "content": "长江有多长？"},
    {"role": "assistant", "content": "约6300公里[1]"},
]


# ----- handlers -------------------------------------------------------------------------------------
def test_an_answered_chat_is_saved_and_opens_with_its_settings(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    controls = ChatControls(kb="samples", system_prompt="只用中文回答。", temperature=0.3, seed=7.0, retrieval_k=4.0)
    assert uc.save(store, "", "", [], controls) == uc.Saved("", None)  # nothing to save yet
    saved = uc.save(store, "", "", CHAT, controls)
    assert saved.warning is None and saved.conversation_id
    assert saved.choices == [("今天 Today · 长江有多长？", saved.conversation_id)]
    more = [*CHAT, {"role": "user", "content": "黄河呢？"}, {"role": "assistant", "content": "约5464公里"}]
    assert uc.save(store, "", saved.conversation_id, more, controls).conversation_id == saved.conversation_id

    opened = uc.open_conversation(store, "", saved.conversation_id)
    assert [(m["role"], m["content"]) for m in opened.chat] == [(m["role"], m["content"]) for m in more]
    assert opened.controls == ChatControls(
        kb="samples", system_prompt="只用中文回答。", temperature=0.3, seed=7.0, retrieval_k=4.0
    )
    assert uc.open_conversation(store, "", "").chat == []


def test_a_chat_without_a_knowledge_base_reopens_without_one(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    saved = uc.save(store, "", "", CHAT, ChatControls(kb=NO_KB))
    assert uc.open_conversation(store, "", saved.conversation_id).controls.kb == NO_KB


def test_a_conversation_deleted_elsewhere_is_saved_as_a_new_one(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    first = uc.save(store, "", "", CHAT, ChatControls()).conversation_id
    assert uc.delete(store, "", first).conversation_id == ""
    again = uc.save(store, "", first, CHAT, ChatControls())
    assert again.conversation_id not in ("", first)
    gone = uc.open_conversation(store, "", first)
    assert gone.chat == [] and gone.warning and "no conversation" in gone.warning


def test_two_tabs_going_on_with_one_conversation_never_overwrite_each_other(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    cid = uc.save(store, "", "", CHAT, ChatControls()).conversation_id
    shown = uc.open_conversation(store, "", cid).chat  # both tabs show it
    first = [*shown, {"role": "user", "content": "A 问"}, {"role": "assistant", "content": "A 答"}]
    assert uc.save(store, "", cid, first, ChatControls(), based_on=shown) == uc.Saved(cid, uc.choices(store, ""))
    second = [*shown, {"role": "user", "content": "B 问"}, {"role": "assistant", "content": "B 答"}]
    forked = uc.save(store, "", cid, second, ChatControls(), based_on=shown)  # the other tab had not seen A's
    assert forked.warning == uc.CHANGED_ELSEWHERE and forked.conversation_id not in ("", cid)
    assert [m.content for m in store.messages("", cid)][-2:] == ["A 问", "A 答"]
    assert [m.content for m in store.messages("", forked.conversation_id)][-2:] == ["B 问", "B 答"]
    # a regenerated answer is made from the chat that holds the answer it replaces: no conflict
    regenerated = [*first[:-1], {"role": "assistant", "content": "A 的新答"}]
    assert uc.save(store, "", cid, regenerated, ChatControls(), based_on=first).warning is None
    assert store.messages("", cid)[-1].content == "A 的新答"


def test_a_reopened_conversation_goes_on_in_place_whatever_its_text_holds(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    tricky = "<b>粗</b> ![x](http://e/x.png) `a<b` *斜* \\ [1]\n```html\n<i>代码</i>\n```\n（已停止 / stopped）"
    chat = [{"role": "user", "content": "问 <script>"}, {"role": "assistant", "content": h.safe_markdown(tricky)}]
    cid = uc.save(store, "", "", chat, ChatControls()).conversation_id
    stored = [m.content for m in store.messages("", cid)]
    shown = uc.open_conversation(store, "", cid).chat  # as the reopened chat shows it, and sends it back
    more = [*shown, {"role": "user", "content": "再问"}, {"role": "assistant", "content": "再答"}]
    saved = uc.save(store, "", cid, more, ChatControls(), based_on=shown)
    assert saved.warning is None and saved.conversation_id == cid
    assert [m.content for m in store.messages("", cid)] == [*stored, "再问", "再答"]
    assert stored[1].replace("\n\n```", "\n```") == tricky  # stored as the model wrote it (a blank line added)


def test_users_reach_only_their_own_conversations(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    alice = uc.save(store, "alice", "", CHAT, ChatControls()).conversation_id
    assert uc.choices(store, "bob") == []
    assert uc.open_conversation(store, "bob", alice).chat == []
    assert uc.rename(store, "bob", alice, "mine").warning
    assert uc.delete(store, "bob", alice).warning
    assert uc.export(store, "bob", alice, "json") == (None, f"no conversation {alice}; pick one from the list")
    # bob's answer to alice's id is saved as bob's own new conversation, never into alice's
    bobs = uc.save(store, "bob", alice, CHAT, ChatControls()).conversation_id
    assert bobs != alice
    assert len(store.messages("alice", alice)) == 2


def test_thumbs_on_an_answer_are_stored_with_it(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    cid = uc.save(store, "", "", CHAT, ChatControls()).conversation_id
    assert uc.feedback(store, "", cid, 1, False) is None
    assert store.messages("", cid)[1].rating == -1
    assert uc.feedback(store, "", cid, 1, True) is None
    assert store.messages("", cid)[1].rating == 1
    assert uc.feedback(store, "", cid, 0, True) == "only answers can be rated"
    assert uc.feedback(store, "", cid, 5, True) == "the conversation has no message 6; rate an answer it shows"
    assert uc.feedback(store, "", "", 1, True) == "this answer is not saved yet: wait until it is complete"
    assert uc.feedback(store, "intruder", cid, 1, False) is not None
    assert store.messages("", cid)[1].rating == 1


def test_sidebar_labels_group_by_day() -> None:
    today = dt.date(2026, 12, 2)
    noon = dt.datetime(2026, 12, 2, 12).timestamp()
    assert uc.day_label(noon, today) == "今天 Today"
    assert uc.day_label(noon - 86_400, today) == "昨天 Yesterday"
    assert uc.day_label(noon - 5 * 86_400, today) == "2026-11-27"


def test_export_writes_markdown_and_json(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    cid = uc.save(store, "", "", CHAT, ChatControls(kb="samples")).conversation_id
    md, warning = uc.export(store, "", cid, "md")
    assert warning is None and md is not None and md.name == f"conversation-{cid}.md"
    assert "**问 Q:** 长江有多长？" in md.read_text(encoding="utf-8")
    js, _ = uc.export(store, "", cid, "json")
    assert js is not None
    data = json.loads(js.read_text(encoding="utf-8"))
    assert [m["content"] for m in data["messages"]] == ["长江有多长？", "约6300公里[1]"]
    assert data["kb"] == "samples"
    assert uc.export(store, "", "", "md")[0] is None


# ----- in the browser -------------------------------------------------------------------------------
class Slow:
    """An LLM backend whose answer takes a few seconds to stream: time to type while it answers."""

    name = "slow"
    context_window = 100_000

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content) for m in messages)

    def stream(self, messages: Sequence[Message], options: GenerationOptions) -> Generator[str, None, None]:
        for n in range(30):
            time.sleep(0.1)
            yield f"{n} "


class SlowPlugin:
    @hookimpl
    def register_llms(self, register: Any) -> None:
        register("slow", lambda options: Slow())


def _start(data_dir: Path, config: Path) -> str:
    zhiku = echo_app(config, SlowPlugin())
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def config(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    path = echo_config(tmp_path)
    yield tmp_path / "data", path
    import gradio

    gradio.close_all(verbose=False)


def _page(browser: Any, url: str) -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#question textarea")
    return context, page


def _listed(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#conv-list label").all_inner_texts()]


@pytest.mark.slow
def test_a_conversation_survives_reload_and_restart(browser: Any, config: tuple[Path, Path]) -> None:
    import gradio

    data_dir, path = config
    url = _start(data_dir, path)
    context, page = _page(browser, url)
    ask(page, "第一个问题：长江有多长？")
    wait_answered(page, 1)
    page.wait_for_function("() => document.querySelectorAll('#conv-list label').length === 1")
    assert _listed(page) == ["今天 Today · 第一个问题：长江有多长？"]
    answered = messages(page)

    page.reload()  # the browser remembers which conversation it had open
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 1")
    assert messages(page) == answered
    context.close()

    gradio.close_all(verbose=False)
    url = _start(data_dir, path)  # a new server process over the same data dir
    context, page = _page(browser, url)  # and a new browser: nothing remembered there
    page.wait_for_function("() => document.querySelectorAll('#conv-list label').length === 1")
    assert messages(page) == []
    page.locator("#conv-list label").first.click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 1")
    assert messages(page) == answered

    readme_picture(page, "conversations.png")  # the README's picture of the sidebar

    # 👍 on the answer is stored with it
    page.locator('#chatbot [data-testid="bot"]').first.hover()
    page.locator('#chatbot button[aria-label="赞"], #chatbot button[aria-label="Like"]').first.click()  # zh-CN: 赞
    store = ConversationStore(data_dir)
    (conv,) = store.conversations("")
    for _ in range(600):  # the event is asynchronous: wait for it (a hang guard, not a timing check)
        if store.messages("", conv.id)[1].rating == 1:
            break
        page.wait_for_timeout(100)
    assert store.messages("", conv.id)[1].rating == 1
    ask(page, "第二个问题：黄河呢？")  # going on with the reopened conversation adds to it (not to a copy)
    wait_answered(page, 2)
    assert [c.id for c in store.conversations("")] == [conv.id] and len(store.messages("", conv.id)) == 4

    page.get_by_text("当前对话 This conversation").click()
    title = page.locator("#conv-title").locator("input, textarea").first
    assert title.input_value() == "第一个问题：长江有多长？"
    title.fill("长江")
    page.locator("#conv-rename").click()
    page.wait_for_function("() => document.querySelector('#conv-list').innerText.includes('今天 Today · 长江')")

    page.locator("#conv-export-json").click()
    link = page.locator("#conv-export-file a").first
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    exported = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
    assert exported["title"] == "长江"
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"] * 2

    page.locator("#conv-delete").click()
    page.wait_for_function("() => document.querySelectorAll('#conv-list label').length === 0")
    assert messages(page) == []
    assert ConversationStore(data_dir).conversations("") == []
    context.close()


@pytest.mark.slow
def test_a_draft_stays_and_a_question_sent_during_an_answer_is_answered_next(
    browser: Any, config: tuple[Path, Path]
) -> None:
    data_dir, path = config
    path.write_text(path.read_text(encoding="utf-8").replace("backend: echo", "backend: slow"), encoding="utf-8")
    context, page = _page(browser, _start(data_dir, path))
    box = page.locator("#question textarea")
    streaming = (
        "() => /\\d+ \\d+/.test([...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')].pop()?.innerText"
        " ?? '')"
    )

    ask(page, "第一个问题")
    page.wait_for_function(streaming)  # the answer is streaming: the question was taken
    box.fill("还没写完的草稿")
    wait_answered(page, 1)
    assert box.input_value() == "还没写完的草稿"  # the finished answer left the draft alone

    box.fill("第二个问题")
    page.locator("#send").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 2")
    page.wait_for_function(streaming)
    box.fill("第三个问题")  # sent while the second answer streams: it waits, then is answered
    page.locator("#send").click()
    wait_answered(page, 3)
    chat = messages(page)
    assert [text for role, text in chat if role == "user"] == ["第一个问题", "第二个问题", "第三个问题"]
    assert all(text.startswith("0 1 2") for role, text in chat if role == "bot")
    context.close()


@pytest.mark.slow
def test_opening_the_generation_settings_changes_nothing(browser: Any, config: tuple[Path, Path]) -> None:
    """An empty seed (random) used to become 0 when the accordion first rendered it."""
    data_dir, path = config
    context, page = _page(browser, _start(data_dir, path))
    page.get_by_text("生成设置 Generation settings").click()
    seed = page.locator("#seed").locator("input, textarea").first
    seed.wait_for()
    page.locator("#max-new-tokens input[type=number]").wait_for()
    assert seed.input_value() == ""
    context.close()


@pytest.mark.slow
def test_the_phone_viewport_has_no_horizontal_overflow(browser: Any, config: tuple[Path, Path]) -> None:
    data_dir, path = config
    context = browser.new_context(viewport={"width": 390, "height": 844}, locale="zh-CN")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(_start(data_dir, path))
    page.wait_for_selector("#question textarea")
    # the sidebar starts closed on a phone: it would cover the chat (a click on Send would hit it)
    page.wait_for_function("() => !document.querySelector('#conversations').classList.contains('open')")
    ask(page, "手机上的一个很长的问题，" * 8)  # clicks Send: nothing covers it
    wait_answered(page, 1)
    page.locator("#sources").scroll_into_view_if_needed()
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"
    box = page.locator("#chatbot").bounding_box()
    assert box is not None and box["width"] >= 300  # the chat, not a sliver
    page.locator("#theme-toggle").click()
    page.wait_for_function("() => document.body.classList.contains('dark')")
    context.close()


@pytest.mark.slow
def test_opening_a_new_chat_during_an_answer_ends_it_and_keeps_both_apart(
    browser: Any, config: tuple[Path, Path]
) -> None:
    data_dir, path = config
    path.write_text(path.read_text(encoding="utf-8").replace("backend: echo", "backend: slow"), encoding="utf-8")
    context, page = _page(browser, _start(data_dir, path))
    streaming = "() => /\\d+ \\d+/.test(document.querySelector('#chatbot [data-testid=\"bot\"]')?.innerText ?? '')"
    ask(page, "第一个对话的问题")
    page.wait_for_function(streaming)
    page.locator("#conv-new").click()  # while the answer streams
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"user\"]')")
    page.wait_for_timeout(3500)  # longer than the rest of the slow answer: a late update would show by now
    assert messages(page) == []  # nothing of the first answer landed in the new chat
    store = ConversationStore(data_dir)
    [first] = store.conversations("")  # the first chat was saved as far as it went, as its own conversation
    assert store.messages("", first.id)[0].content == "第一个对话的问题"
    assert store.messages("", first.id)[-1].content.endswith(STOPPED_MARK)
    ask(page, "第二个对话的问题")  # the new chat is a conversation of its own, not the first one continued
    wait_answered(page, 1)
    firsts = sorted(store.messages("", conv.id)[0].content for conv in store.conversations(""))
    assert firsts == ["第一个对话的问题", "第二个对话的问题"]
    assert store.messages("", first.id)[0].content == "第一个对话的问题"
    context.close()
