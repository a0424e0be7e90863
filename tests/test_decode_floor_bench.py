"""bench/decode_floor.py runs end to end (a tiny shape on the CPU); its figures are not checked, only that
it prints every row it promises."""

from __future__ import annotations

from tests.helpers import run_bench


def test_decode_floor_bench_prints_the_gemv_and_step_rows() -> None:
    lines = run_bench("decode_floor.py", "--tiny")
    assert sum(line.startswith("gemv ") for line in lines) == 10  # 5 weight shapes x 1 and 8 rows
    steps = [line for line in lines if line.startswith("step eager")]
    assert len(steps) == 2 and all("tokens/s" in line for line in steps), lines
