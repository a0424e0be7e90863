"""A base moved to another store answers the same: the top-5 of every question, and eval's recall, before and after.

    python bench/migrate_dev.py --kb dev --data-dir DIR [--questions ../shared/data/dev/questions.jsonl]
                                [--to milvus] [--uri URI]
    python bench/migrate_dev.py --tiny        (a small base it builds itself: the smoke test runs this)

The base is copied into a temporary data dir first (the original is not touched), searched with the configured
pipeline (hybrid: vectors from the store, BM25 from the docstore) and with plain vector search, migrated with
``kb migrate``'s code, and searched again. Prints how many questions keep the same top-5 (chunk ids; and, for
a tie between two passages of equal score, the same scores), the migration's own figures, and recall@1/5 and
MRR of both stores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.container import Zhiku  # noqa: E402
from app.settings import load_settings  # noqa: E402
from knowledge.evaluation import Question, evaluate, load_questions  # noqa: E402
from knowledge.migrate import migrate  # noqa: E402
from knowledge.retrieval import RetrievalSettings, Retriever  # noqa: E402

K = 5
PLAIN = RetrievalSettings(mode="vector", expand_window=0, min_similarity=0.0)


def tops(retriever: Retriever, questions: list[Question]) -> list[list[tuple[int, float]]]:
    return [[(h.chunk.id, round(h.score, 5)) for h in retriever.search(q.question, K)] for q in questions]


def same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    """The same ranking: equal ids, or (where scores tie) equal scores at every rank. Scores may differ in the
    5th decimal (an engine sums the inner product in its own order)."""
    close = len(a) == len(b) and all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True))
    return close and ([i for i, _ in a] == [i for i, _ in b] or len({round(x, 4) for _, x in a}) < len(a))


def recall(app: Zhiku, name: str, questions: list[Question]) -> dict[str, float]:
    retriever = app.library.retriever(name)
    top = app.settings.chat.top_k
    result = evaluate(
        questions,
        retriever.search,
        lambda q, b: [p.text for p in retriever.context(q, top, budget=b, measure=len)],
    ).to_json()
    return {k: result[k] for k in ("recall@1", "recall@5", "recall@budget", "mrr")}


def tiny_base(data_dir: Path) -> tuple[str, list[Question]]:
    sys.path.insert(0, str(REPO / "tests"))
    from tests.helpers import make_corpus

    make_corpus(data_dir / "docs")
    app = Zhiku(load_settings(None, data_dir=data_dir))
    with app.open_kb("tiny", create=True) as kb:
        app.ingestor(kb).run([data_dir / "docs"], progress=False)
    app.close()
    asked = ["黄河被称为什么？", "长江有多长？", "报告说了什么？"]
    questions = [Question(str(i), q, ("黄河",)) for i, q in enumerate(asked)]
    return "tiny", questions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kb", default="dev")
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--questions", type=Path, default=REPO.parent / "shared" / "data" / "dev" / "questions.jsonl")
    ap.add_argument("--to", default="milvus", choices=["milvus", "faiss"])
    ap.add_argument("--uri", default="", help="milvus: a server; empty: Milvus Lite")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zhiku-migrate-") as tmp:
        data = Path(tmp)
        if args.tiny:
            name, questions = tiny_base(data)
        else:
            name, questions = args.kb, load_questions(args.questions)
            shutil.copytree(args.data_dir / "kb" / name, data / "kb" / name)
        before = Zhiku(load_settings(None, data_dir=data)).check()
        source = before.library.get(name).manifest.store
        print(f"migrate bench: {name!r} ({before.kbs.info(name)['vectors']:,} vectors), {len(questions)} questions")
        first = {"pipeline": tops(before.library.retriever(name), questions)}
        first["vector"] = tops(before.library.retriever(name, PLAIN), questions)
        recall_before = recall(before, name, questions)
        before.close()

        app = Zhiku(load_settings(None, data_dir=data)).check()
        with app.open_kb(name) as kb:
            started = time.perf_counter()
            report = migrate(kb, app.stores, args.to, args.uri)
            print(
                f"migrated {source} -> {report.target}: {report.vectors:,} vectors in "
                f"{time.perf_counter() - started:.1f} s, {report.checked} checked"
            )
        for mode, settings in (("pipeline", None), ("vector", PLAIN)):
            after = tops(app.library.retriever(name, settings), questions)
            equal = sum(same(a, b) for a, b in zip(first[mode], after, strict=True))
            print(f"top-{K} {mode:8}  identical for {equal}/{len(questions)} questions")
            for q, a, b in zip(questions, first[mode], after, strict=True):
                if not same(a, b):
                    print(f"  {q.id}: {source} {a}\n  {' ' * len(q.id)}  {args.to:5} {b}")
        recall_after = recall(app, name, questions)
        for key in recall_before:
            print(f"{key:9} {source:7} {recall_before[key]:.4f}   {args.to:7} {recall_after[key]:.4f}")
        app.close()


if __name__ == "__main__":
    main()
