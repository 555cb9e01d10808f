import pytest

from latentwire.scoring import cut_answer, normalize_answer, score


def test_official_normalisation():
    assert normalize_answer("The  Norman-French, a people!") == "normanfrench people"


def test_max_over_all_gold_answers():
    em, f1 = score("the Normans", ["Franks", "Normans", "northmen of France"])
    assert (em, f1) == (1.0, 1.0)


def test_partial_f1():
    # prediction "river Seine valley" vs gold "Seine valley": P=2/3, R=1
    assert score("river Seine valley", ["Seine valley"])[1] == pytest.approx(0.8)
    assert score("nothing shared", ["Seine"]) == (0.0, 0.0)


def test_empty_prediction_scores_zero_against_an_answer():
    assert score("", ["Seine"]) == (0.0, 0.0)


def test_answer_is_first_line_stripped():
    assert cut_answer("  Rouen \nQuestion: next") == "Rouen"
    assert cut_answer("\nRouen") == ""
