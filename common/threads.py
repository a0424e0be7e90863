"""How many threads the process's pools take, so that they leave cores to the threads that feed them.

A pool sized to every core (Hugging Face tokenizers' Rust thread pool, parser processes) starves the few
threads that keep the rest busy: the thread that launches the GPU's work, the ingest's commit thread. On an
H200 box (16 cores) the thread launching the embedder's batches ran several times slower while the
tokenizer's 16 threads ran, and the GPU waited (bench/README.md, embedding).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD", or "max PERIOD" for no quota


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota where one is set (a
    container's ``--cpus``). ``os.cpu_count()`` counts the host's cores, which a pool sized from it would
    oversubscribe."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one this does not understand: the affinity stands
        pass
    return max(1, cores)


def busy_cores(cores: int | None = None) -> int:
    """Threads or processes for a pool that should leave room: every core, less a quarter of them from 4 up."""
    cores = cores or usable_cores()
    return max(1, cores - cores // 4)


def limit_tokenizer_threads() -> None:
    """Size Hugging Face tokenizers' thread pool (Rust's rayon: one thread per core by default) to
    :func:`busy_cores`, unless ``RAYON_NUM_THREADS`` is set already. The pool is made at the first batch a
    tokenizer encodes in the process, so this runs first thing at start-up (``python -m app``, the benches).

    H200 box, 16 cores, 4,096 chunks from raw text (bench/README.md): in one run 1.85-1.98 M tokens/s with 12
    tokenizer threads against 1.64-1.82 M with 16 (8 passes each); in another, alternating, 1.77-1.92 M
    against 1.64-2.04 M (means 1.83 and 1.79 M). No loss, a gain in one run of two; and in an ingest the
    parser processes take those cores too.
    """
    os.environ.setdefault("RAYON_NUM_THREADS", str(busy_cores()))
