"""scripts/split_squad_articles.py: whole articles on one side, files the loaders read, the
refusals in one line. Runs on a small SQuAD file written here, and on the shared sample when
present."""

import json
import subprocess
import sys
from pathlib import Path

from latentwire import data

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "split_squad_articles.py"


def squad(path: Path, articles: int) -> Path:
    rows = [{"title": f"Article_{a}", "paragraphs": [
        {"context": f"Paragraph {p} of article {a} mentions the number {a * 10 + p}.",
         "qas": [{"id": f"{a}-{p}", "question": f"Which number does paragraph {p} mention?",
                  "answers": [{"text": str(a * 10 + p), "answer_start": 0}]}]}
        for p in range(3)]} for a in range(articles)]
    path.write_text(json.dumps({"version": "1.1", "data": rows}))
    return path


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True)


def test_split_holds_out_whole_articles_and_both_files_load(tmp_path):
    source = squad(tmp_path / "in.json", 6)
    r = run(source, "--held", 2, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    train = data.load_all(str(tmp_path / "out" / "squad-train.json"))
    held = data.load_all(str(tmp_path / "out" / "squad-held.json"))
    assert len({e.group for e in held}) == 2 and len({e.group for e in train}) == 4
    assert len(train) + len(held) == 18
    # The split the trainer makes from the two files refuses nothing: no article on both sides.
    assert data.split_apart(train, held, 4, 4, 0).describe()["shared_groups"] == 0
    # Seeded: the same command makes the same files; another seed holds out other articles.
    first = (tmp_path / "out" / "squad-held.json").read_bytes()
    assert run(source, "--held", 2, "--out", tmp_path / "again").returncode == 0
    assert (tmp_path / "again" / "squad-held.json").read_bytes() == first
    assert run(source, "--held", 2, "--seed", 5, "--out", tmp_path / "other").returncode == 0
    assert (tmp_path / "other" / "squad-held.json").read_bytes() != first


def test_split_of_the_shared_sample(tmp_path, squad_file):
    r = run(squad_file, "--held", 1, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    source = json.loads(squad_file.read_text())
    train = json.loads((tmp_path / "squad-train.json").read_text())
    held = json.loads((tmp_path / "squad-held.json").read_text())
    assert sorted(a["title"] for a in train["data"] + held["data"]) == sorted(
        a["title"] for a in source["data"])
    assert train["version"] == held["version"] == source["version"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    source = squad(tmp_path / "in.json", 3)
    for args, code, start in [((source, "--held", 3), 2, "error: --held must be between 1 and 2"),
                              ((tmp_path / "missing.json",), 1, "error: cannot read"),
                              ((tmp_path / "in.json", "--held", 0), 2, "error: --held")]:
        r = run(*args, "--out", tmp_path / "out")
        assert r.returncode == code and r.stderr.startswith(start), r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    (tmp_path / "bad.json").write_text("{not json")
    r = run(tmp_path / "bad.json", "--out", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot read")
