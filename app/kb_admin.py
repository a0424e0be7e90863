"""Changes to a knowledge base on a user's behalf, with the access rules checked first: what the UI's
knowledge-base page and the HTTP API both do (one place for the order of check and change)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ZhikuError

if TYPE_CHECKING:
    from app.access import KbAccess
    from app.jobs import IngestJobs, Job
    from app.services import KnowledgeBaseService


class KbBusyError(ZhikuError):
    """The base cannot be changed now: an ingest into it is running."""


def remove_file(kbs: KnowledgeBaseService, access: KbAccess, owner: str, kb: str, path: str) -> int:
    """Remove one of ``kb``'s files (as ``kbs.info`` lists it); the chunks removed."""
    access.check_write(owner, kb, exists=True)
    return kbs.remove_file(kb, path)


def delete_base(kbs: KnowledgeBaseService, access: KbAccess, jobs: IngestJobs | None, owner: str, kb: str) -> None:
    access.check_write(owner, kb, exists=True)
    if jobs is not None and jobs.active_for(kb):  # the job would bring the base back, ownerless
        raise KbBusyError(f"an ingest into {kb!r} is running: delete the base when it has finished")
    kbs.delete(kb)
    access.forget(kb)


def start_ingest(
    kbs: KnowledgeBaseService, access: KbAccess, jobs: IngestJobs, owner: str, kb: str, paths: Sequence[str | Path]
) -> Job:
    """Ingest ``paths`` into ``kb`` in the background (a new name becomes ``owner``'s base)."""
    access.reserve(owner, kb, exists=kb in kbs.names())
    return jobs.start(owner, kb, paths)
