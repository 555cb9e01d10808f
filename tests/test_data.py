import json

import pytest

from latentwire import data
from latentwire.errors import UsageError


def test_builtin_set_is_large_extractive_and_deterministic():
    examples = data.builtin_examples()
    assert len(examples) >= 200
    assert len({e.id for e in examples}) == len(examples)
    for e in examples:
        assert any(a in e.context for a in e.answers), e
    assert examples == data.builtin_examples()


def test_sampling_is_a_seeded_shuffle_then_the_first_n():
    examples = data.builtin_examples()
    a = data.sample(examples, 50, 42)
    assert a == data.sample(examples, 50, 42)
    assert a[:10] == data.sample(examples, 10, 42)
    assert a != data.sample(examples, 50, 7)


def test_more_samples_than_examples_uses_all_and_warns(capsys):
    examples = data.builtin_examples()[:5]
    assert len(data.sample(examples, 100, 42)) == 5
    assert "using all of them" in capsys.readouterr().err


def test_shared_squad_file_loads_answerable_questions(squad_file):
    examples = data.load_all(str(squad_file))
    assert len(examples) == 705
    assert all(e.answers and e.context and e.question for e in examples)


def test_jsonl_of_context_question_answers(tmp_path):
    f = tmp_path / "qa.jsonl"
    rows = [{"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]},
            {"id": "x", "context": "c", "question": "q", "answers": {"text": ["a", "b"]}}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = data.load_all(str(f))
    assert examples[0].answers == ("France",) and examples[1].id == "x"
    assert examples[1].answers == ("a", "b")


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"version": 1}', "no top-level 'data' list"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": [{"text": "a"}]}]}]}]}',
     "breaks the SQuAD format"),
])
def test_malformed_squad_file(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        data.load_all(str(f))


def test_empty_dataset(tmp_path):
    f = tmp_path / "empty.json"
    f.write_text('{"data": []}')
    with pytest.raises(UsageError, match="no answerable questions"):
        data.load_all(str(f))


def test_bad_jsonl_line_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n{"context": "c"}\n')
    with pytest.raises(UsageError, match="line 2"):
        data.load_all(str(f))


def test_missing_file_and_unknown_name():
    with pytest.raises(UsageError, match="does not exist"):
        data.check_spec("no/such/file.json")
    with pytest.raises(UsageError, match="unknown dataset"):
        data.check_spec("sqaud")


def test_builtin_set_scales_to_ten_thousand_distinct_examples():
    examples = data.load_all("builtin", at_least=10_100)
    assert len({(e.context, e.question) for e in examples}) >= 10_100
    assert data.builtin_examples()[:270] == data.builtin_examples(50, 40)  # the sweep's set


def test_split_shares_no_entity_or_context_between_training_and_evaluation():
    examples = data.load_all("builtin", at_least=2_100)
    s = data.split(examples, 2000, 100, seed=42)
    assert len(s.train) == 2000 and 100 <= len(s.eval) < 103  # whole entities, 3 questions each
    assert not {e.group for e in s.train} & {e.group for e in s.eval}
    assert not {e.context for e in s.train} & {e.context for e in s.eval}
    # Names too: no person or town of the evaluation split appears in a training context.
    names = {e.context.split(" is a")[0] for e in s.eval}
    assert not [n for n in names if any(n in t.context for t in s.train)]
    assert s.describe()["shared_groups"] == 0
    assert data.split(examples, 2000, 100, seed=42).eval == s.eval  # seeded


def test_squad_is_split_by_article(squad_file):
    s = data.split(data.load_all(str(squad_file)), 300, 100, seed=0)
    assert not {e.group for e in s.train} & {e.group for e in s.eval}
    assert {e.group for e in s.eval} <= {"Normans", "Computational_complexity_theory",
                                         "Southern_California", "Sky_(United_Kingdom)",
                                         "Victoria_(Australia)"}


def test_an_empty_evaluation_split_is_refused():
    with pytest.raises(UsageError, match="evaluation split is empty"):
        data.split(data.builtin_examples(), 10, 0, seed=0)
    with pytest.raises(UsageError, match="no example is left for training"):
        data.split(data.builtin_examples(), 10, 10_000, seed=0)
