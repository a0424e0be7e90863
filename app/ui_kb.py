"""The UI's knowledge-base page, as plain functions over :class:`app.services.KnowledgeBaseService` (the
service ``python -m app kb`` uses), tested without a browser; :mod:`app.ui` wires them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import kb_admin
from app.access import KbAccess
from app.jobs import IngestJobs, Job
from app.services import KnowledgeBaseService
from app.ui_handlers import md_cell, readable
from common.errors import ZhikuError


@dataclass(frozen=True)
class KbView:
    bases: list[list[Any]]  # name, files, chunks, embedding model, last change
    names: list[str]
    base: str | None  # the base whose files are listed
    files: list[list[Any]] = field(default_factory=list)  # file name, pages, chunks, encoding
    paths: list[tuple[str, str]] = field(default_factory=list)  # (label, path as the base stores it)
    status: str = ""
    warning: str | None = None


def _when(ts: Any) -> str:
    return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M") if ts else ""


def view(
    kbs: KnowledgeBaseService,
    access: KbAccess,
    owner: str,
    base: str | None,
    status: str = "",
    warning: str | None = None,
) -> KbView:
    """Every base ``owner`` may see, and ``base``'s files (the first base's when ``base`` is gone or not
    given); whose each base is."""
    try:
        infos = {name: kbs.info(name) for name in access.visible(owner, kbs.names())}
    except (ZhikuError, OSError) as err:
        return KbView([], [], None, warning=readable(err))
    names = list(infos)
    bases = [
        [name, i["files"], i["chunks"], i["embedding_model"], _when(i["updated_at"]), _whose(access, name)]
        for name, i in infos.items()
    ]
    base = base if base in infos else (names[0] if names else None)
    files: list[list[Any]] = []
    paths: list[tuple[str, str]] = []
    for src in infos[base]["sources"] if base is not None else []:
        name = Path(src["path"]).name
        files.append([name, src["pages"], src["chunks"], src.get("encoding") or ""])
        paths.append((f"{name}  ({src['path']})", src["path"]))
    return KbView(bases, names, base, files, paths, status, warning)


def _whose(access: KbAccess, kb: str) -> str:
    found = access.entry(kb)
    if found is None:
        return "共享 shared (CLI)"
    return f"{found[0]} · " + ("私有 private" if found[1] else "共享 shared")


def remove_file(kbs: KnowledgeBaseService, access: KbAccess, owner: str, base: str | None, path: str | None) -> KbView:
    if not base or not path:
        return view(kbs, access, owner, base, warning="pick a knowledge base and one of its files first")
    try:
        removed = kb_admin.remove_file(kbs, access, owner, base, path)
    except (ZhikuError, OSError) as err:
        return view(kbs, access, owner, base, warning=readable(err))
    return view(kbs, access, owner, base, status=f"已删除 removed {Path(path).name} ({removed} chunks) from {base}")


def delete_base(
    kbs: KnowledgeBaseService,
    access: KbAccess,
    owner: str,
    base: str | None,
    confirmed: bool,
    jobs: IngestJobs | None = None,
) -> KbView:
    if not base:
        return view(kbs, access, owner, None, warning="pick a knowledge base first")
    if not confirmed:
        warning = f"tick the box to confirm deleting the whole knowledge base {base!r}"
        return view(kbs, access, owner, base, warning=warning)
    try:
        kb_admin.delete_base(kbs, access, jobs, owner, base)
    except (ZhikuError, OSError) as err:
        return view(kbs, access, owner, base, warning=readable(err))
    return view(kbs, access, owner, None, status=f"已删除知识库 deleted knowledge base {base}")


def set_private(kbs: KnowledgeBaseService, access: KbAccess, owner: str, base: str | None, private: bool) -> KbView:
    if not base:
        return view(kbs, access, owner, None, warning="pick a knowledge base first")
    try:
        access.set_private(owner, base, private)
    except (ZhikuError, OSError) as err:
        return view(kbs, access, owner, base, warning=readable(err))
    state = "私有 private" if private else "共享 shared"
    return view(kbs, access, owner, base, status=f"{base}: {state}")


# ----- background ingest ---------------------------------------------------------------------------------
STATES = {
    "queued": "排队中 queued",
    "running": "导入中 running",
    "done": "完成 done",
    "failed": "失败 failed",
    "interrupted": "已中断 interrupted (the server stopped; upload the files again to finish)",
}


@dataclass(frozen=True)
class JobView:
    summary: str  # Markdown
    rows: list[list[Any]]  # file, status, chunks, reason
    active: bool  # still running: keep polling
    warning: str | None = None


def job_view(job: Job | None, warning: str | None = None) -> JobView:
    if job is None:
        return JobView("", [], False, warning)
    done = sum(1 for f in job.files if f["status"] not in ("waiting", "refused"))
    total = sum(1 for f in job.files if f["status"] != "refused")
    summary = f"**{md_cell(job.kb)}**：{done}/{total} 个文件 files · {STATES.get(job.state, job.state)}"
    if job.error:
        summary += f" — {md_cell(job.error)}"
    rows = [[f["file"], f["status"], f["chunks"], f["reason"]] for f in job.files]
    return JobView(summary, rows, job.active, warning)


def start_job(
    jobs: IngestJobs,
    kbs: KnowledgeBaseService,
    access: KbAccess,
    owner: str,
    files: Any,
    target: str | None,
    selected: str | None,
) -> JobView:
    """Ingest the chosen files in the background into ``target`` (a new name creates a base, the user's own
    and private when login is on) or the selected base; the page polls :func:`latest_job` while it runs."""
    paths = [f if isinstance(f, str) else getattr(f, "name", "") for f in (files or [])]
    kb = (target or "").strip() or (selected or "")
    if not kb:
        return job_view(_latest_or_none(jobs, owner), "name a knowledge base to ingest into (a new name creates it)")
    try:
        return job_view(kb_admin.start_ingest(kbs, access, jobs, owner, kb, [p for p in paths if p]))
    except (ZhikuError, OSError) as err:
        return job_view(_latest_or_none(jobs, owner), readable(err))


def reingest(jobs: IngestJobs, kbs: KnowledgeBaseService, access: KbAccess, owner: str, base: str | None) -> JobView:
    """Ingest the base's files again where they are (in the background, as an upload)."""
    if not base:
        return job_view(_latest_or_none(jobs, owner), "pick a knowledge base first")
    try:
        access.check_write(owner, base, exists=True)
        paths = [src["path"] for src in kbs.info(base)["sources"]]
        return job_view(jobs.start_reingest(owner, base, paths))
    except (ZhikuError, OSError) as err:
        return job_view(_latest_or_none(jobs, owner), readable(err))


def latest_job(jobs: IngestJobs, owner: str) -> JobView:
    try:
        return job_view(jobs.latest(owner))
    except (ZhikuError, OSError) as err:
        return job_view(None, readable(err))


def _latest_or_none(jobs: IngestJobs, owner: str) -> Job | None:
    try:
        return jobs.latest(owner)
    except (ZhikuError, OSError):
        return None
