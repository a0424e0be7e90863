"""Accounts (issue 13): `python -m app users add|remove|list`, `serve` logging them in, and in Chromium two
users who each see only their own conversations and presets, with their name and a logout on the page."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from app.auth import make_auth
from app.cli import cli
from app.conversations import ConversationStore
from app.presets import PresetStore
from app.ui import launch
from app.users import FILE_NAME, UserStore
from tests.test_ui import _free_port, ask, browser, echo_app, echo_config, messages, wait_answered

__all__ = ["browser"]  # the module-scoped Chromium fixture of test_ui.py

PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


def test_users_are_added_listed_and_removed_with_hashes_only(tmp_path: Path) -> None:
    config = echo_config(tmp_path)
    run = CliRunner().invoke
    added = run(cli, ["users", "add", "alice", "--password-stdin", "--config", str(config)], input="s3cret-pw\n")
    assert added.exit_code == 0, added.output
    stored = (tmp_path / "data" / FILE_NAME).read_text(encoding="utf-8")
    assert "s3cret-pw" not in stored and json.loads(stored)["alice"].startswith("scrypt$")
    assert asyncio.run(make_auth(UserStore(tmp_path / "data").logins())("alice", "s3cret-pw"))

    again = run(cli, ["users", "add", "alice", "--password-stdin", "--config", str(config)], input="other\n")
    assert again.exit_code == 2 and "--replace" in again.output
    listed = run(cli, ["users", "list", "--json", "--config", str(config)])
    assert json.loads(listed.output) == [{"name": "alice", "source": "users.json"}]
    assert run(cli, ["users", "remove", "alice", "--config", str(config)]).exit_code == 0
    assert run(cli, ["users", "list", "--config", str(config)]).output.strip() == "no users: login is off"
    missing = run(cli, ["users", "remove", "alice", "--config", str(config)])
    assert missing.exit_code == 2 and "no user 'alice'" in missing.output
    empty = run(cli, ["users", "add", "bob", "--password-stdin", "--config", str(config)], input="\n")
    assert empty.exit_code == 2 and "password is empty" in empty.output


def test_serve_logs_in_the_users_of_both_places_and_refuses_a_name_in_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradio

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: calls.append(kwargs))
    UserStore(tmp_path / "data").add("bob", PASSWORDS["bob"])
    result = CliRunner().invoke(cli, ["serve", "--config", str(echo_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert asyncio.run(calls[-1]["auth"]("bob", PASSWORDS["bob"]))

    UserStore(tmp_path / "data").add("carol", "pw")
    carol = "server:\n  users:\n    - {name: carol, password_hash: 'scrypt$16384$8$1$AAAA$AAAA'}\n"
    twice = echo_config(tmp_path, carol)
    result = CliRunner().invoke(cli, ["serve", "--config", str(twice)])
    assert result.exit_code == 2 and "'carol' is both in server.users" in result.output


@pytest.fixture
def accounts_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path / "data"
    users = UserStore(data_dir)
    for name, password in PASSWORDS.items():
        users.add(name, password)
    zhiku = echo_app(echo_config(tmp_path))
    shared = tmp_path / "shared.txt"
    shared.write_text("共享笔记：每个人都能读到。", encoding="utf-8")
    zhiku.ingest.ingest("shared-notes", [shared])  # made with the CLI's service: everyone reads it
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, auth=users.logins())
    try:
        yield f"http://127.0.0.1:{port}/", data_dir
    finally:
        import gradio

        gradio.close_all(verbose=False)


def _login(browser: Any, url: str, name: str) -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("input[type=text]").first.fill(name)
    page.locator("input[type=password]").fill(PASSWORDS[name])
    page.locator("input[type=password]").press("Enter")
    page.wait_for_selector("#question textarea")
    page.wait_for_function("(n) => document.querySelector('#user')?.innerText.includes(n)", arg=name)
    return context, page


@pytest.mark.slow
def test_each_user_sees_only_their_own_conversations_and_presets(
    browser: Any, accounts_server: tuple[str, Path]
) -> None:
    url, data_dir = accounts_server
    alice, page = _login(browser, url, "alice")
    assert page.locator("#logout").is_visible()
    ask(page, "alice 的私密问题")
    wait_answered(page, 1)
    page.wait_for_function("() => document.querySelectorAll('#conv-list label').length === 1")
    page.locator("#system-prompt textarea").fill("alice 的提示")
    page.locator("#preset-name").locator("input, textarea").first.fill("alice-preset")
    page.locator("#preset-save").click()
    page.wait_for_function("() => document.querySelector('#preset-list input')?.value === 'alice-preset'")

    # alice makes a knowledge base of her own in the browser: private
    doc = data_dir.parent / "alice-doc.txt"
    doc.write_text("alice 的文档：只有她能看到。", encoding="utf-8")
    page.get_by_role("tab", name="知识库 Knowledge bases").click()
    page.locator("#kb-uploads input[type=file]").set_input_files(str(doc))
    page.wait_for_function("() => document.querySelector('#kb-uploads').innerText.includes('alice-doc')")
    page.locator("#kb-target").locator("input, textarea").first.fill("alice-docs")
    page.locator("#kb-start").click()
    page.wait_for_function("() => document.querySelector('#kb-job').innerText.includes('完成 done')")
    page.wait_for_function("() => document.querySelector('#kb-bases').innerText.includes('alice · 私有 private')")

    bob, other = _login(browser, url, "bob")
    other.locator("#kb input").click()
    other.get_by_role("option", name="shared-notes").wait_for()
    assert other.get_by_role("option", name="alice-docs").count() == 0
    other.keyboard.press("Escape")
    other.get_by_role("tab", name="知识库 Knowledge bases").click()
    other.wait_for_function("() => document.querySelector('#kb-bases').innerText.includes('shared-notes')")
    assert "alice-docs" not in other.locator("#kb-bases").inner_text()
    other.get_by_role("tab", name="对话 Chat").click()
    other.locator("#preset-list input").click()
    assert other.get_by_role("option", name="alice-preset").count() == 0
    assert other.locator("#conv-list label").count() == 0
    ask(other, "bob 的问题")
    wait_answered(other, 1)
    other.wait_for_function("() => document.querySelectorAll('#conv-list label').length === 1")
    assert "bob 的问题" in other.locator("#conv-list").inner_text()
    assert "alice" not in other.locator("#conv-list").inner_text()
    assert messages(other)[0] == ("user", "bob 的问题")

    store = ConversationStore(data_dir)
    assert [c.title for c in store.conversations("alice")] == ["alice 的私密问题"]
    assert [c.title for c in store.conversations("bob")] == ["bob 的问题"]
    assert PresetStore(data_dir, "alice").list() == {"alice-preset": "alice 的提示"}
    assert PresetStore(data_dir, "bob").list() == {}
    assert PresetStore(data_dir).list() == {}  # nothing leaked into the shared (no-login) presets
    alice.close()
    bob.close()
