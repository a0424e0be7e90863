"""Accounts (issue 13): `python -m app users add|remove|list`, `serve` logging them in, and in Chromium two
users who each see only their own conversations and presets, with their name and a logout on the page."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from app.access import KbAccess
from app.auth import make_auth
from app.cli import cli
from app.container import Zhiku
from app.conversations import ConversationStore
from app.presets import PresetStore
from app.ui import TOAST_TITLES, launch
from app.ui_handlers import NO_QUESTION
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
def accounts_server(tmp_path: Path) -> Iterator[tuple[str, Path, Zhiku]]:
    data_dir = tmp_path / "data"
    users = UserStore(data_dir)
    for name, password in PASSWORDS.items():
        users.add(name, password)
    zhiku = echo_app(echo_config(tmp_path))
    shared = tmp_path / "shared.txt"
    shared.write_text("共享笔记：每个人都能读到。", encoding="utf-8")
    zhiku.ingest.ingest("shared-notes", [shared])  # made with the CLI's service: everyone reads it
    secret = tmp_path / "alice-secret.txt"
    secret.write_text("alice 的机密文档：口令是蓝鲸。", encoding="utf-8")
    zhiku.access.claim("alice", "alice-private")  # as her upload in the browser does, before the first file
    zhiku.ingest.ingest("alice-private", [secret])
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, auth=users.logins())
    try:
        yield f"http://127.0.0.1:{port}/", data_dir, zhiku
    finally:
        import gradio

        gradio.close_all(verbose=False)


def _login(browser: Any, url: str, name: str, locale: str = "zh-CN") -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale=locale)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("input[type=password]")
    assert ("用户名" if locale == "zh-CN" else "username") in page.inner_text("body")  # Gradio's login, translated
    page.locator("input[type=text]").first.fill(name)
    page.locator("input[type=password]").fill(PASSWORDS[name])
    page.locator("input[type=password]").press("Enter")
    page.wait_for_selector("#question textarea")
    page.wait_for_function("(n) => document.querySelector('#user')?.innerText.includes(n)", arg=name)
    return context, page


@pytest.mark.slow
def test_each_user_sees_only_their_own_conversations_and_presets(
    browser: Any, accounts_server: tuple[str, Path, Zhiku]
) -> None:
    url, data_dir, _ = accounts_server
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


@pytest.mark.slow
@pytest.mark.parametrize(("locale", "drop_files"), [("zh-CN", "将文件拖放到此处"), ("en-US", "Drop File Here")])
def test_gradios_own_strings_follow_the_browsers_language(
    browser: Any, accounts_server: tuple[str, Path, Zhiku], locale: str, drop_files: str
) -> None:
    context, page = _login(browser, accounts_server[0], "alice", locale)  # checks the login page's language
    page.get_by_role("tab", name="知识库 Knowledge bases").click()
    page.wait_for_function("(t) => document.querySelector('#kb-uploads').innerText.includes(t)", arg=drop_files)
    page.get_by_role("tab", name="对话 Chat").click()
    page.locator("#send").click()  # no question: a warning toast, its title in both languages as ours are
    toast = page.locator('[data-testid="toast-body"]').first
    toast.wait_for()
    assert NO_QUESTION in toast.inner_text()
    shown = toast.locator(".toast-title").evaluate("e => getComputedStyle(e, '::before').content")
    assert shown == f'"{TOAST_TITLES["warning"]}"'  # its header: Gradio's "Warning" relabelled
    context.close()


class PageRequests:
    """A logged-in user's page without a browser: the HTTP requests its events make, made by hand, with
    any values (what a user who reads the page's source can send). Events are found by the ``elem_id`` of
    the component that triggers them, their inputs by ``elem_id`` or, for the unnamed ones, by type."""

    def __init__(self, url: str, name: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120)
        assert self.http.post("/login", data={"username": name, "password": PASSWORDS[name]}).status_code == 200
        self.config = self.http.get("/config").json()
        self.components = {c["id"]: c for c in self.config["components"]}
        self.session = uuid.uuid4().hex[:11]
        self.shown: dict[str, Any] = {}  # the values the page's components hold now, as a browser keeps them

    def key(self, component_id: int) -> str:
        component = self.components[component_id]
        return str(component.get("props", {}).get("elem_id") or component["type"])

    def dependencies(self, elem_id: str | None, trigger: str) -> list[dict[str, Any]]:
        found = [
            d
            for d in self.config["dependencies"]
            if d["backend_fn"]
            and any(t[1] == trigger and (elem_id is None or self.key(t[0]) == elem_id) for t in d["targets"])
        ]
        assert found, f"no event {elem_id} {trigger}"
        return found

    def call(
        self, elem_id: str | None, trigger: str, event_data: Any = None, session: str | None = None, **values: Any
    ) -> tuple[dict[str, Any], str]:
        """Trigger the event (each of its handlers, in order): (the outputs by key, everything the session
        was sent, as one text)."""
        outputs: dict[str, Any] = {}
        sent: list[str] = []
        for dep in self.dependencies(elem_id, trigger):
            data = [
                values.get(k.replace("-", "_"), self.shown.get(k, self.components[i]["props"].get("value")))
                for k, i in zip(map(self.key, dep["inputs"]), dep["inputs"], strict=True)
            ]
            body = {"data": data, "fn_index": dep["id"], "session_hash": session or self.session}
            joined = self.http.post("/gradio_api/queue/join", json={**body, "event_data": event_data})
            joined.raise_for_status()
            outputs.update(zip(map(self.key, dep["outputs"]), self._result(body["session_hash"], sent), strict=False))
        for key, kind in (("browserstate", str), ("chat-view", str), ("chatbot", list)):  # what the page sends next
            if isinstance(outputs.get(key), kind):
                self.shown[key] = outputs[key]
        return outputs, "\n".join(sent)

    def _result(self, session: str, sent: list[str]) -> list[Any]:
        """The event's outputs (none when Gradio refused its inputs); what the session was sent goes to ``sent``,
        with the content of the files it was given."""
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            stream.raise_for_status()
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    sent.append(line[5:])
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        outputs = message["output"].get("data", []) if message.get("success") else []
                        for file in [o for o in outputs if isinstance(o, dict) and o.get("url")]:  # an export
                            sent.append(self.http.get(file["url"]).text)
                        return list(outputs)
        raise AssertionError("the event stream ended without a result")


# in alice's conversation, preset and private base, its file's name, and her preset and base as list choices
SECRETS = ("蓝鲸", "alice-secret", '["alice-preset"', '["alice-private"')


def reads(alice_id: str, kb_file: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    """Events that show a conversation, a preset or a base: alice's own, when she sends them."""
    return [
        ("conv-list", "input", {"conv_list": alice_id}),  # open the conversation
        # a reload with the conversation's id in the browser: a new session (the reopening leaves alone a chat
        # its session has begun)
        (None, "then", {"browserstate": alice_id, "session": uuid.uuid4().hex[:12]}),
        ("conv-search", "change", {"conv_search": "蓝鲸"}),
        ("conv-export-md", "click", {"browserstate": alice_id}),
        ("conv-export-json", "click", {"browserstate": alice_id}),
        (None, "load", {}),  # the presets and bases the page lists
        ("preset-list", "input", {"preset_list": "alice-preset"}),
        ("send", "click", {"question": "口令是什么？", "kb": "alice-private", "browserstate": ""}),  # a new chat
        ("kb-tab", "select", {}),  # the knowledge-base page lists the bases
        ("kb-pick", "input", {"kb_pick": "alice-private"}),
    ]


def writes(alice_id: str, kb_file: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    """Events that change them (alice's are sent last: they show the requests are the page's own)."""
    return [
        ("conv-rename", "click", {"browserstate": alice_id, "conv_title": "改过的名字"}),
        ("send", "click", {"question": "接着问", "browserstate": alice_id}),  # continue the conversation
        ("chatbot", "like", {"browserstate": alice_id, "event_data": {"index": 1, "value": "x", "liked": False}}),
        ("preset-save", "click", {"preset_name": "alice-preset", "system_prompt": "改过的提示"}),
        ("kb-private", "input", {"kb_pick": "alice-private", "kb_private": False}),
        ("kb-reingest", "click", {"kb_pick": "alice-private"}),
        ("kb-remove-file", "click", {"kb_pick": "alice-private", "kb_file": kb_file}),
        ("conv-delete", "click", {"browserstate": alice_id}),
        ("preset-delete", "click", {"preset_name": "alice-preset", "preset_list": "alice-preset"}),
    ]


@pytest.mark.slow
def test_one_user_cannot_reach_anothers_things_through_the_uis_http_routes(
    accounts_server: tuple[str, Path, Zhiku],
) -> None:
    url, data_dir, zhiku = accounts_server
    conversations, presets, access = ConversationStore(data_dir), PresetStore(data_dir, "alice"), KbAccess(data_dir)

    def files() -> list[str]:
        return [f["path"] for f in zhiku.kbs.info("alice-private")["sources"]]

    alice = PageRequests(url, "alice")
    alice.call(None, "load")  # what her page does first
    out, _ = alice.call("send", "click", question="alice 的秘密问题：蓝鲸")
    alice_id = out["browserstate"]  # the answer saved her conversation
    alice.call("preset-save", "click", preset_name="alice-preset", system_prompt="alice 的提示：蓝鲸")
    assert conversations.messages("alice", alice_id)[0].content == "alice 的秘密问题：蓝鲸"
    assert presets.list() == {"alice-preset": "alice 的提示：蓝鲸"}
    [kb_file] = files()
    for elem_id, trigger, values in reads(alice_id, kb_file):  # she sees her things through each of these
        _, sent = alice.call(elem_id, trigger, **values)
        assert any(secret in sent for secret in SECRETS), (elem_id, trigger, sent[-300:])
    kept = [(m.role, m.content, m.rating) for m in conversations.messages("alice", alice_id)]
    titles = [c.title for c in conversations.conversations("alice")]

    bob = PageRequests(url, "bob")
    bob.call(None, "load")
    uploads = []
    for button, box, target in [
        ("upload-button", "upload_files", "upload_kb"),
        ("kb-start", "kb_uploads", "kb_target"),
    ]:
        path = bob.http.post("/gradio_api/upload", files={"files": ("bob.txt", "bob 的文件".encode())}).json()[0]
        files_value = [{"path": path, "orig_name": "bob.txt", "meta": {"_type": "gradio.FileData"}}]
        uploads.append((button, "click", {box: files_value, target: "alice-private"}))
    for elem_id, trigger, values in reads(alice_id, kb_file):
        _, sent = bob.call(elem_id, trigger, **values)  # refused by Gradio (not a choice of his) or by Zhiku
        assert not any(secret in sent for secret in SECRETS), (elem_id, trigger, sent[-300:])
    for elem_id, trigger, values in [*writes(alice_id, kb_file), *uploads]:
        _, sent = bob.call(elem_id, trigger, **values)  # his preset may be called "alice-preset" too: his own
        assert not any(secret in sent for secret in SECRETS[:2]), (elem_id, trigger, sent[-300:])
    # nothing of hers changed
    assert [(m.role, m.content, m.rating) for m in conversations.messages("alice", alice_id)] == kept
    assert [c.title for c in conversations.conversations("alice")] == titles
    assert presets.list() == {"alice-preset": "alice 的提示：蓝鲸"}
    assert files() == [kb_file] and access.entry("alice-private") == ("alice", True)
    assert zhiku.jobs.latest("bob") is None  # no ingest of his ran

    # a session is its user's: bob can neither read alice's session's stream nor run an event in it
    with bob.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": alice.session}) as stream:
        assert stream.status_code == 403
    with pytest.raises(httpx.HTTPStatusError, match="403"):
        bob.call("send", "click", session=alice.session, question="在 alice 的会话里")

    def reingested() -> bool:
        job = zhiku.jobs.latest("alice")
        while job is not None and job.active:  # it runs in the background; removing a file waits for it
            time.sleep(0.1)
            job = zhiku.jobs.latest("alice")
        return job is not None and job.state == "done"

    changed = {  # the same requests from alice change her things: they are the page's own
        "conv-rename": lambda: "改过的名字" in [c.title for c in conversations.conversations("alice")],
        "send": lambda: conversations.messages("alice", alice_id)[-2].content == "接着问",
        "chatbot": lambda: conversations.messages("alice", alice_id)[1].rating == -1,
        "preset-save": lambda: presets.list() == {"alice-preset": "改过的提示"},
        "kb-private": lambda: access.entry("alice-private") == ("alice", False),
        "kb-reingest": reingested,
        "kb-remove-file": lambda: files() == [],
        "conv-delete": lambda: alice_id not in [c.id for c in conversations.conversations("alice")],
        "preset-delete": lambda: presets.list() == {},
    }
    alice.call("conv-list", "input", conv_list=alice_id)  # her page shows the conversation again
    for elem_id, trigger, values in writes(alice_id, kb_file):
        alice.call(elem_id, trigger, **values)
        assert changed[str(elem_id)](), (elem_id, trigger)
