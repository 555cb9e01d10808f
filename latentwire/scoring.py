"""SQuAD exact match and F1 with the official answer normalisation (SQuAD v1.1/v2.0 evaluator)."""

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_in(text: str, answers: list[str]) -> bool:
    """Whether one gold answer reads in full, word for word, in `text` (what a compressor kept
    of a context); an unanswerable question's empty answer reads in nothing."""
    return any(a.strip() and a.strip() in text for a in answers)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    # The official script gives 1.0 when both are empty (unanswerable) and 0.0 when one is.
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the max over all gold answers, as the official evaluator does."""
    if not answers:
        answers = [""]
    return (max(exact_match(prediction, a) for a in answers), max(f1(prediction, a) for a in answers))


def cut_answer(generated: str) -> str:
    """The answer is the first line of the generation, stripped.

    Not stripped first: a generation that opens with a newline has answered nothing, and the
    engine stops at that newline, so both paths must read it as empty.
    """
    return generated.split("\n", 1)[0].strip()


def score_answers(examples, answers) -> tuple[list[dict], dict]:
    """Every example's prediction scored, and the means: (predictions, {f1, em, empty_rate}).
    `answers` holds (text, generated token count) per example, as the engine returns them."""
    predictions = []
    for ex, (text, n_gen) in zip(examples, answers):
        em, f1 = score(text, list(ex.answers))
        predictions.append({"id": ex.id, "prediction": text, "answers": list(ex.answers),
                            "f1": f1, "em": em, "generated_tokens": n_gen})
    n = len(predictions)
    return predictions, {"f1": sum(p["f1"] for p in predictions) / n,
                         "em": sum(p["em"] for p in predictions) / n,
                         "empty_rate": sum(not p["prediction"] for p in predictions) / n}
