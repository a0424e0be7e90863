"""The knowledge-base page (issue 13): the handlers over the service the CLI uses, then in Chromium a file
removed from a base that stops appearing in the chat's sources."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import ui_kb
from app.container import Zhiku
from app.ui import launch
from app.ui_handlers import NO_KB
from tests.test_ui import _free_port, ask, browser, choose, echo_app, echo_config, readme_picture, wait_answered

__all__ = ["browser"]  # the module-scoped Chromium fixture of test_ui.py

FROGS = "青蛙笔记：池塘里的青蛙一共有七只，它们每天晚上都在荷叶上唱歌。"
RIVERS = "河流笔记：长江是中国最长的河流，全长约6300公里，流经十一个省级行政区。"


@pytest.fixture
def zhiku(tmp_path: Path) -> Zhiku:
    app = echo_app(echo_config(tmp_path, "chat:\n  top_k: 3\n  min_coverage: 0\n"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "frogs.txt").write_text(FROGS, encoding="utf-8")
    (docs / "rivers.txt").write_text(RIVERS, encoding="gb18030")
    app.ingest.ingest("notes", [docs])
    return app


def test_the_page_lists_bases_and_a_bases_files(zhiku: Zhiku) -> None:
    view = ui_kb.view(zhiku.kbs, zhiku.access, "", None)
    assert view.names == ["notes"] and view.base == "notes"
    assert view.bases[0][:3] == ["notes", 2, 2]
    assert sorted(row[0] for row in view.files) == ["frogs.txt", "rivers.txt"]
    assert {row[0]: row[3] for row in view.files}["rivers.txt"] == "gb18030"
    assert len(view.paths) == 2 and all(Path(path).is_absolute() for _, path in view.paths)


def test_removing_a_file_takes_its_chunks_out_of_retrieval(zhiku: Zhiku) -> None:
    frogs = next(path for label, path in ui_kb.view(zhiku.kbs, zhiku.access, "", "notes").paths if "frogs" in label)
    assert any("青蛙" in p.text for p in zhiku.chat.retrieve("notes", "青蛙有几只？", 3))
    after = ui_kb.remove_file(zhiku.kbs, zhiku.access, "", "notes", frogs)
    assert after.warning is None and "frogs.txt" in after.status
    assert [row[0] for row in after.files] == ["rivers.txt"]
    assert not any("青蛙" in p.text for p in zhiku.chat.retrieve("notes", "青蛙有几只？", 3))
    assert zhiku.kbs.check("notes") == []  # vectors and chunks still agree
    again = ui_kb.remove_file(zhiku.kbs, zhiku.access, "", "notes", frogs)
    assert again.warning is not None and "has no file" in again.warning


def test_deleting_a_base_needs_the_confirmation(zhiku: Zhiku) -> None:
    refused = ui_kb.delete_base(zhiku.kbs, zhiku.access, "", "notes", confirmed=False)
    assert refused.warning is not None and "confirm" in refused.warning
    assert zhiku.kbs.names() == ["notes"]
    deleted = ui_kb.delete_base(zhiku.kbs, zhiku.access, "", "notes", confirmed=True)
    assert deleted.warning is None and deleted.names == [] and deleted.base is None
    assert zhiku.kbs.names() == []


@pytest.fixture
def kb_server(zhiku: Zhiku) -> Iterator[str]:
    port = _free_port()
    launch(zhiku, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        import gradio

        gradio.close_all(verbose=False)


@pytest.mark.slow
def test_a_file_removed_in_the_browser_stops_appearing_in_sources(browser: Any, kb_server: str) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(kb_server)
    page.wait_for_selector("#question textarea")
    page.wait_for_function("() => document.querySelector('#kb input')?.value")
    choose(page, "kb", "notes")
    ask(page, "青蛙有几只？")
    wait_answered(page, 1)
    assert "frogs.txt" in page.locator("#sources").inner_text()

    page.get_by_role("tab", name="知识库 Knowledge bases").click()
    page.wait_for_function("() => document.querySelector('#kb-files')?.innerText.includes('frogs.txt')")
    readme_picture(page, "knowledge-bases.png")
    page.locator("#kb-file input").click()
    page.get_by_role("option", name="frogs.txt", exact=False).click()
    page.locator("#kb-remove-file").click()
    page.wait_for_function("() => !document.querySelector('#kb-files').innerText.includes('frogs.txt')")
    assert "rivers.txt" in page.locator("#kb-files").inner_text()

    page.get_by_role("tab", name="对话 Chat").click()
    assert page.locator("#kb input").input_value() in ("notes", NO_KB)
    choose(page, "kb", "notes")
    ask(page, "青蛙有几只？")
    wait_answered(page, 2)
    assert "frogs.txt" not in page.locator("#sources").inner_text()
    context.close()


def test_with_login_a_users_base_is_theirs_and_a_private_one_is_hidden(zhiku: Zhiku, tmp_path: Path) -> None:
    access = zhiku.access
    upload = tmp_path / "mine.txt"
    upload.write_text("alice 的笔记：只有 alice 能看到。", encoding="utf-8")
    # a base made with the CLI is shared read-only in the browser
    assert ui_kb.view(zhiku.kbs, access, "bob", None).names == ["notes"]
    refused = ui_kb.remove_file(
        zhiku.kbs, access, "bob", "notes", ui_kb.view(zhiku.kbs, access, "", "notes").paths[0][1]
    )
    assert refused.warning is not None and "shared read-only" in refused.warning
    # alice creates a base: hers and private
    started = ui_kb.start_job(zhiku.jobs, zhiku.kbs, access, "alice", [str(upload)], "alice-notes", None)
    assert started.warning is None
    assert access.entry("alice-notes") == ("alice", True)
    assert access.visible("bob", ["notes", "alice-notes"]) == ["notes"]
    assert access.visible("alice", ["notes", "alice-notes"]) == ["notes", "alice-notes"]
    with pytest.raises(PermissionError, match="no knowledge base 'alice-notes'"):  # as if it did not exist
        access.check_read("bob", "alice-notes")
    # bob cannot write into it, even by naming it
    for _ in range(1200):  # a hang guard: wait for alice's job to create the base
        if "alice-notes" in zhiku.kbs.names() and not zhiku.jobs.latest("alice").active:  # type: ignore[union-attr]
            break
        threading.Event().wait(0.05)
    denied = ui_kb.start_job(zhiku.jobs, zhiku.kbs, access, "bob", [str(upload)], "alice-notes", None)
    assert denied.warning is not None and "no knowledge base 'alice-notes'" in denied.warning
    assert ui_kb.delete_base(zhiku.kbs, access, "bob", "alice-notes", True).warning is not None
    assert "alice-notes" in zhiku.kbs.names()
    # shared, bob reads it but still cannot change it
    assert ui_kb.set_private(zhiku.kbs, access, "alice", "alice-notes", False).warning is None
    assert "alice-notes" in ui_kb.view(zhiku.kbs, access, "bob", None).names
    assert ui_kb.set_private(zhiku.kbs, access, "bob", "alice-notes", True).warning is not None
    denied = ui_kb.delete_base(zhiku.kbs, access, "bob", "alice-notes", True)
    assert denied.warning is not None and "belongs to another user" in denied.warning
    # deleted by alice, the name is free again
    assert ui_kb.delete_base(zhiku.kbs, access, "alice", "alice-notes", True).warning is None
    assert access.entry("alice-notes") is None


def test_a_name_someone_is_creating_is_not_anyone_elses(zhiku: Zhiku) -> None:
    access = zhiku.access
    access.claim("alice", "finance")  # alice's first upload is on its way: no base yet
    with pytest.raises(PermissionError, match="is taken"):
        access.check_write("bob", "finance", exists=False)
    access.check_write("alice", "finance", exists=False)  # hers to fill
    access.forget("finance")
    access.check_write("bob", "finance", exists=False)  # free again
