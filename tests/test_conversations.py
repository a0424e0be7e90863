"""Saved conversations (app/conversations.py): what the sidebar, export and feedback of issue 13 stand on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from app.conversations import FILE_NAME, ConversationError, ConversationStore, title_from

SOURCE = {"file": "长江.txt", "page": 2, "snippet": "长江全长6300公里", "score": 0.91}


def test_a_conversation_survives_a_restart_with_its_turns_settings_and_sources(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = store.create("", kb="samples", system_prompt="只用中文回答。", settings={"temperature": 0.2, "seed": 7})
    store.add_exchange("", conv.id, "长江有多长？", "约6300公里[1]", [SOURCE])
    store.add_exchange("", conv.id, "它流经哪些省？", "青海、西藏……", [])

    again = ConversationStore(tmp_path)  # a new process would build exactly this
    (saved,) = again.conversations("")
    assert saved.id == conv.id
    assert saved.title == "长江有多长？"  # named after its first question
    assert (saved.kb, saved.system_prompt) == ("samples", "只用中文回答。")
    assert saved.settings == {"temperature": 0.2, "seed": 7}
    turns = again.messages("", conv.id)
    assert [(m.role, m.content) for m in turns] == [
        ("user", "长江有多长？"),
        ("assistant", "约6300公里[1]"),
        ("user", "它流经哪些省？"),
        ("assistant", "青海、西藏……"),
    ]
    assert turns[1].sources == [SOURCE]
    assert (tmp_path / FILE_NAME).is_file()


def test_list_is_newest_first_and_search_finds_titles_and_message_text(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    first = store.create("")
    store.add_exchange("", first.id, "诸葛亮是谁？", "三国时期蜀汉丞相。")
    second = store.create("")
    store.add_exchange("", second.id, "What is 100% recall?", "All relevant passages are found.")
    assert [c.id for c in store.conversations("")] == [second.id, first.id]

    store.add_exchange("", first.id, "他为什么要出山？", "刘备三顾茅庐。")  # used again: back on top
    assert [c.id for c in store.conversations("")] == [first.id, second.id]
    assert [c.id for c in store.conversations("", "三顾茅庐")] == [first.id]  # in an answer, not the title
    assert [c.id for c in store.conversations("", "recall")] == [second.id]
    assert [c.id for c in store.conversations("", "100%")] == [second.id]  # % is text, not a wildcard
    assert [c.id for c in store.conversations("", "1_0")] == []  # _ too
    assert store.conversations("", "赤壁") == []


def test_rename_change_settings_and_delete(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = store.create("", kb="a")
    store.add_exchange("", conv.id, "问题", "回答")
    renamed = store.update("", conv.id, title="  我的  对话 ")
    assert renamed.title == "我的 对话"
    assert store.update("", conv.id, settings={"top_k": 3}).kb == "a"  # only what is given changes
    assert store.update("", conv.id, clear_kb=True).kb is None
    assert store.get("", conv.id).settings == {"top_k": 3}
    store.add_exchange("", conv.id, "第二个问题", "回答")
    assert store.get("", conv.id).title == "我的 对话"  # a chosen name is kept
    store.delete("", conv.id)
    assert store.conversations("") == []
    with pytest.raises(ConversationError, match="no conversation"):
        store.messages("", conv.id)


def test_one_owner_never_reaches_anothers_conversations(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    alice = store.create("alice")
    _, answer = store.add_exchange("alice", alice.id, "私密问题", "私密回答")
    bob = store.create("bob")
    assert [c.id for c in store.conversations("bob")] == [bob.id]
    assert store.conversations("bob", "私密") == []
    for call in (
        lambda: store.get("bob", alice.id),
        lambda: store.messages("bob", alice.id),
        lambda: store.update("bob", alice.id, title="mine"),
        lambda: store.delete("bob", alice.id),
        lambda: store.add_exchange("bob", alice.id, "q", "a"),
        lambda: store.export_json("bob", alice.id),
        lambda: store.rate("bob", answer, -1),
    ):
        with pytest.raises(ConversationError, match="no "):  # the same answer as for a missing one
            call()
    assert store.get("alice", alice.id).title == "私密问题"
    assert store.messages("alice", alice.id)[1].rating is None


def test_feedback_on_answers_is_stored_and_exported(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = store.create("")
    asked, answered = store.add_exchange("", conv.id, "长江有多长？", "约6300公里[1]", [SOURCE])
    store.rate("", answered, -1, "应该是6300公里左右，来源不对")
    with pytest.raises(ConversationError, match="only answers"):
        store.rate("", asked, 1)
    with pytest.raises(ConversationError, match="rating"):
        store.rate("", answered, 5)
    data = store.export_json("", conv.id)
    assert json.loads(json.dumps(data, ensure_ascii=False)) == data  # plain JSON all the way down
    assert data["messages"][1]["rating"] == -1
    assert data["messages"][1]["comment"] == "应该是6300公里左右，来源不对"
    markdown = store.export_markdown("", conv.id)
    assert "# 长江有多长？" in markdown
    assert "**答 A:** 约6300公里[1]" in markdown
    assert "> [1] 长江.txt p.2" in markdown
    assert "👎 — 应该是6300公里左右，来源不对" in markdown
    store.rate("", answered, None)
    assert store.messages("", conv.id)[1].rating is None


def test_saving_the_chat_as_shown_keeps_what_did_not_change(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = store.create("")
    store.save_messages("", conv.id, [("user", "长江有多长？"), ("assistant", "不知道")])
    first_answer = store.messages("", conv.id)[1]
    store.rate("", first_answer.id, -1)
    # the next question: the first exchange stays as it was, feedback included
    store.save_messages(
        "",
        conv.id,
        [("user", "长江有多长？"), ("assistant", "不知道"), ("user", "黄河呢？"), ("assistant", "5464公里")],
    )
    stored = store.messages("", conv.id)
    assert [m.content for m in stored] == ["长江有多长？", "不知道", "黄河呢？", "5464公里"]
    assert stored[1].id == first_answer.id and stored[1].rating == -1
    # regenerate: only the last answer is replaced
    store.save_messages(
        "",
        conv.id,
        [("user", "长江有多长？"), ("assistant", "不知道"), ("user", "黄河呢？"), ("assistant", "约5464公里")],
    )
    again = store.messages("", conv.id)
    assert [m.id for m in again[:3]] == [m.id for m in stored[:3]]
    assert again[3].content == "约5464公里" and again[3].id != stored[3].id
    assert store.get("", conv.id).title == "长江有多长？"
    store.save_messages("", conv.id, [], settings={"temperature": 0.1})
    assert store.messages("", conv.id) == []
    assert store.get("", conv.id).settings == {"temperature": 0.1}


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "0123456789ABCDEF", "x" * 16, "0123456789abcdef0"])
def test_ids_from_outside_are_checked(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConversationError, match="not a conversation id"):
        ConversationStore(tmp_path).get("", bad)


def test_concurrent_exchanges_lose_nothing(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = store.create("")
    errors: list[BaseException] = []

    def talk(n: int) -> None:
        try:
            for i in range(10):
                store.add_exchange("", conv.id, f"q{n}-{i}", f"a{n}-{i}")
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=talk, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    messages = store.messages("", conv.id)
    assert len(messages) == 80
    # each question is directly followed by its own answer
    assert all(q.content[1:] == a.content[1:] for q, a in zip(messages[::2], messages[1::2], strict=True))


def test_a_damaged_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConversationError, match=r"move .* aside"):
        ConversationStore(tmp_path).conversations("")


def test_titles() -> None:
    assert title_from("  长江\n有多长？ ") == "长江 有多长？"
    assert len(title_from("问" * 100)) == 40
    assert title_from("问" * 100).endswith("…")
