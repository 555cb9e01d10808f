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
