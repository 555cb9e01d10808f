#!/usr/bin/env python3
"""Split a SQuAD-format JSON file by article into a training file and a held-out file.

    python scripts/split_squad_articles.py ../shared/data/squad-v1.1-dev-40-articles.json \
        --held 10 --out runs/data

writes runs/data/squad-train.json and runs/data/squad-held.json, each in the official format (so
`--dataset` and `--eval_dataset` read them as they read the original), and prints which articles
went where. An article is never on both sides: a question about Warsaw is not evaluated on a
model trained on Warsaw's paragraphs. The held-out articles are a seeded draw (--seed), so the
same command always makes the same two files. Standard library only; the input is never modified.
Exit codes: 0 written, 1 the input could not be read or the files not written, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path


def split(data: dict, held: int, seed: int) -> tuple[dict, dict]:
    """Seeded draw of `held` whole articles for the held-out file; the rest train, in the input's
    order. Each output keeps the input's version."""
    articles = data["data"]
    titles = sorted(a["title"] for a in articles)
    if len(set(titles)) != len(titles):
        raise ValueError("two articles share a title; the split is by title")
    random.Random(seed).shuffle(titles)
    held_titles = set(titles[:held])
    version = data.get("version", "")
    return ({"version": version, "data": [a for a in articles if a["title"] not in held_titles]},
            {"version": version, "data": [a for a in articles if a["title"] in held_titles]})


def questions(data: dict) -> int:
    return sum(len(p["qas"]) for a in data["data"] for p in a["paragraphs"])


def write(path: Path, data: dict) -> None:
    """Beside the target, then renamed: a failure never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Split a SQuAD JSON file by article: whole articles held out for evaluation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("input", type=Path, help="a SQuAD-format .json file")
    parser.add_argument("--held", type=int, default=10, help="articles to hold out")
    parser.add_argument("--seed", type=int, default=0, help="seeds which articles are held out")
    parser.add_argument("--out", type=Path, default=Path("runs/data"),
                        help="folder for squad-train.json and squad-held.json")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.input.read_text())
        n = len(data["data"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read {args.input} as SQuAD JSON ({e}); pass the path of a SQuAD "
              "file such as ../shared/data/squad-v1.1-dev-40-articles.json", file=sys.stderr)
        return 1
    if not 1 <= args.held < n:
        print(f"error: --held must be between 1 and {n - 1} ({args.input} holds {n} articles)",
              file=sys.stderr)
        return 2
    try:
        train, held = split(data, args.held, args.seed)
    except (ValueError, KeyError, TypeError) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 1
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, part in (("squad-train.json", train), ("squad-held.json", held)):
            write(args.out / name, part)
    except OSError as e:
        print(f"error: cannot write into {args.out} ({e.strerror or e}); pass a writable --out",
              file=sys.stderr)
        return 1
    for name, part in (("squad-train.json", train), ("squad-held.json", held)):
        titles = ", ".join(a["title"] for a in part["data"])
        print(f"{args.out / name}: {len(part['data'])} articles, {questions(part)} questions"
              + (f" ({titles})" if part is held else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
