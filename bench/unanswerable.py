"""Build the unanswerable dev set: a knowledge base of half the dev documents, asked the questions of all
of them. Questions about the other half have an empty ``answers`` list: the right reply is "not in the
knowledge base" (``not_found_rate``); the rest measure ``answer_acc`` and ``false_not_found``.

    .venv/bin/python bench/unanswerable.py ../shared/data/dev OUT [--n-per-doc 10]
    .venv/bin/python -m app ingest OUT/corpus --kb half --data-dir OUT/data
    .venv/bin/python -m app eval OUT/questions.jsonl --kb half --data-dir OUT/data --answers --json

The documents in the base are every other file in name order, so both halves mix encodings and PDFs.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dev", type=Path, help="the dev folder: corpus/ and questions.jsonl")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-per-doc", type=int, default=0, help="questions per document (0: all)")
    args = ap.parse_args()
    files = sorted((args.dev / "corpus").iterdir())
    kept = {f.name for f in files[::2]}
    (args.out / "corpus").mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.name in kept:
            shutil.copy2(f, args.out / "corpus" / f.name)
    per_doc: dict[str, int] = defaultdict(int)
    rows = []
    for line in (args.dev / "questions.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        if args.n_per_doc and per_doc[q["doc"]] >= args.n_per_doc:
            continue
        per_doc[q["doc"]] += 1
        if q["doc"] not in kept:
            q["answers"] = []
        rows.append(json.dumps(q, ensure_ascii=False))
    (args.out / "questions.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    answerable = sum(1 for r in rows if '"answers": []' not in r)
    print(f"{len(kept)} of {len(files)} documents in the base; {answerable} answerable, {len(rows) - answerable} not")


if __name__ == "__main__":
    main()
