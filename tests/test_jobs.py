"""Background ingests (issue 13): per-file progress in SQLite, seen after a reload; jobs a stopped server left
running are marked interrupted; each user sees their own. Then in Chromium: a reload in the middle of a
background ingest shows its progress, and the base when it is done."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.container import Zhiku
from app.jobs import IngestJobs, Job, JobError
from app.ui import launch
from tests.conftest import HashingEmbedder, HashingPlugin
from tests.test_ui import _free_port, browser, echo_app, echo_config

__all__ = ["browser"]  # the module-scoped Chromium fixture of test_ui.py

TEXTS = {
    "frogs.txt": "青蛙笔记：池塘里的青蛙一共有七只。",
    "rivers.txt": "河流笔记：长江是中国最长的河流。",
    "birds.txt": "鸟类笔记：燕子每年春天飞回北方。",
}


class GatedEmbedder(HashingEmbedder):
    """Embeds only once the test opens the gate: the job is running for as long as the test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def embed_documents(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        self.waiting.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return super().embed_documents(texts, progress)


@pytest.fixture
def gated(tmp_path: Path) -> tuple[Zhiku, GatedEmbedder, Path]:
    plugin = HashingPlugin()
    plugin.embedder = embedder = GatedEmbedder()
    app = echo_app(echo_config(tmp_path), plugin)
    uploads = tmp_path / "picked"  # what Gradio hands over: temp copies of the chosen files
    uploads.mkdir()
    for name, text in TEXTS.items():
        (uploads / name).write_text(text, encoding="utf-8")
    (uploads / "notes.exe").write_bytes(b"MZ")
    return app, embedder, uploads


def _finished(jobs: IngestJobs, owner: str, job_id: str) -> Job:
    for _ in range(1200):  # a hang guard, not a timing check
        job = jobs.get(owner, job_id)
        if not job.active:
            return job
        threading.Event().wait(0.05)
    raise AssertionError(f"job {job_id} never finished")


def test_a_background_ingest_reports_each_file_and_fills_the_base(gated: tuple[Zhiku, GatedEmbedder, Path]) -> None:
    app, embedder, uploads = gated
    job = app.jobs.start("alice", "notes", sorted(uploads.iterdir()))
    assert job.active and job.kb == "notes"
    refused = [f for f in job.files if f["status"] == "refused"]
    assert [f["file"] for f in refused] == ["notes.exe"] and refused[0]["reason"]
    assert embedder.waiting.wait(60)
    running = app.jobs.latest("alice")
    assert running is not None and running.state == "running" and running.done_files < len(running.files)
    assert app.jobs.latest("bob") is None  # another user sees nothing of it
    with pytest.raises(JobError):
        app.jobs.get("bob", job.id)

    embedder.gate.set()
    done = _finished(app.jobs, "alice", job.id)
    assert done.state == "done" and done.finished is not None
    statuses = {f["file"]: (f["status"], f["chunks"]) for f in done.files}
    assert statuses == {
        "frogs.txt": ("added", 1),
        "rivers.txt": ("added", 1),
        "birds.txt": ("added", 1),
        "notes.exe": ("refused", 0),
    }
    assert app.kbs.info("notes")["files"] == 3


def test_a_job_a_stopped_server_left_running_is_marked_interrupted(
    gated: tuple[Zhiku, GatedEmbedder, Path],
) -> None:
    app, embedder, uploads = gated
    job = app.jobs.start("", "notes", [uploads / "frogs.txt"])
    assert embedder.waiting.wait(60)
    restarted = IngestJobs(app.settings.data_dir, app.ingest)  # what the next server start builds
    assert restarted.get("", job.id).state == "interrupted"
    embedder.gate.set()


def test_nothing_to_ingest_is_an_error(gated: tuple[Zhiku, GatedEmbedder, Path]) -> None:
    app, _, _ = gated
    with pytest.raises(JobError, match="no files"):
        app.jobs.start("", "notes", [])


def test_a_failing_ingest_ends_the_job_with_its_reason(
    gated: tuple[Zhiku, GatedEmbedder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _, uploads = gated

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app.ingest, "ingest", broken)
    job = app.jobs.start("", "notes", [uploads / "frogs.txt"])
    done = _finished(app.jobs, "", job.id)
    assert done.state == "failed" and "No space left on device" in done.error


@pytest.fixture
def jobs_server(gated: tuple[Zhiku, GatedEmbedder, Path]) -> Iterator[tuple[str, GatedEmbedder, Path]]:
    app, embedder, uploads = gated
    port = _free_port()
    launch(app, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", embedder, uploads
    finally:
        embedder.gate.set()
        import gradio

        gradio.close_all(verbose=False)


@pytest.mark.slow
def test_a_reload_during_a_background_ingest_shows_its_progress(
    browser: Any, jobs_server: tuple[str, GatedEmbedder, Path]
) -> None:
    url, embedder, uploads = jobs_server
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN")
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#question textarea")
    page.get_by_role("tab", name="知识库 Knowledge bases").click()
    page.locator("#kb-uploads input[type=file]").set_input_files([str(uploads / n) for n in TEXTS])
    page.wait_for_function("() => document.querySelector('#kb-uploads').innerText.includes('birds')")  # uploaded
    page.locator("#kb-target").locator("input, textarea").first.fill("notes")
    page.locator("#kb-start").click()
    assert embedder.waiting.wait(60)  # the job is running, held at its first embedding

    page.reload()
    page.wait_for_selector("#question textarea")
    page.get_by_role("tab", name="知识库 Knowledge bases").click()
    page.wait_for_function("() => document.querySelector('#kb-job').innerText.includes('导入中 running')")
    assert "0/3" in page.locator("#kb-job").inner_text()
    assert "frogs.txt" in page.locator("#kb-job-files").inner_text()

    embedder.gate.set()  # the page follows the job to its end, then shows the new base
    page.wait_for_function("() => document.querySelector('#kb-job').innerText.includes('完成 done')")
    assert "3/3" in page.locator("#kb-job").inner_text()
    page.wait_for_function("() => document.querySelector('#kb-bases').innerText.includes('notes')")
    context.close()


def test_ingesting_a_bases_files_again_updates_the_changed_and_reports_the_gone(
    gated: tuple[Zhiku, GatedEmbedder, Path], tmp_path: Path
) -> None:
    from app import ui_kb

    app, embedder, _ = gated
    embedder.gate.set()
    folder = tmp_path / "own"
    folder.mkdir()
    for name, text in TEXTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    app.ingest.ingest("notes", [folder])
    (folder / "frogs.txt").write_text("青蛙笔记：池塘里的青蛙现在有九只。", encoding="utf-8")
    (folder / "birds.txt").unlink()

    started = ui_kb.reingest(app.jobs, app.kbs, app.access, "", "notes")
    assert started.warning is None
    job = app.jobs.latest("")
    assert job is not None
    done = _finished(app.jobs, "", job.id)
    statuses = {f["file"]: f["status"] for f in done.files}
    assert statuses == {"frogs.txt": "updated", "rivers.txt": "unchanged", "birds.txt": "failed"}
    assert next(f for f in done.files if f["file"] == "birds.txt")["reason"]
    assert any("九只" in p.text for p in app.chat.retrieve("notes", "青蛙有几只？", 3))
    assert ui_kb.reingest(app.jobs, app.kbs, app.access, "", None).warning == "pick a knowledge base first"


def test_a_base_is_not_deleted_while_an_ingest_into_it_runs(gated: tuple[Zhiku, GatedEmbedder, Path]) -> None:
    from app import ui_kb

    app, embedder, uploads = gated
    embedder.gate.set()
    app.ingest.ingest("notes", [uploads / "rivers.txt"])
    embedder.gate.clear()
    embedder.waiting.clear()
    job = app.jobs.start("", "notes", [uploads / "frogs.txt"])
    assert embedder.waiting.wait(60)
    refused = ui_kb.delete_base(app.kbs, app.access, "", "notes", True, app.jobs)
    assert refused.warning is not None and "is running" in refused.warning
    assert "notes" in app.kbs.names()
    embedder.gate.set()
    _finished(app.jobs, "", job.id)
    assert ui_kb.delete_base(app.kbs, app.access, "", "notes", True, app.jobs).warning is None
    assert "notes" not in app.kbs.names()
