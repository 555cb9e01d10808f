"""Where the QA examples come from: the built-in offline set, local files, or Hugging Face `datasets`.

Every loader returns a list of `Example`; `load_examples` picks the loader from the spec and then
takes a seeded shuffle and the first N, so the same command always sees the same examples.
"""

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .files import why_not_a_file


@dataclass(frozen=True)
class Example:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    # What the example is about (an entity, an article): training splits by it, so no context
    # and no name is in both the training and the evaluation split.
    group: str = ""


# ---------------------------------------------------------------------------------------------
# Built-in offline set: invented entities, so no model can answer from memory, and every answer
# is a span of its context (extractive QA, scored like SQuAD).

_SYLLABLES = ["ka", "lo", "mir", "ta", "ven", "dor", "sil", "qua", "ber", "ni", "zo", "rel",
              "mon", "fa", "tis", "gal", "ur", "pe", "dri", "hol"]
_PROFESSIONS = ["painter", "engineer", "botanist", "architect", "cartographer", "violinist",
                "chemist", "sculptor", "astronomer", "translator"]
_SUBJECTS = ["mathematics", "geology", "music theory", "marine biology", "economics", "philosophy",
             "astronomy", "linguistics", "medicine", "chemistry"]
_PRODUCTS = ["copper kettles", "wooden bicycles", "solar lanterns", "paper kites", "glass beads",
             "wool blankets", "clay tiles", "silver spoons", "rope ladders", "leather boots"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_FESTIVALS = ["Lantern Fair", "Harvest Parade", "Salt Festival", "River Race", "Bell Night",
              "Apple Week", "Kite Day", "Fire Dance"]


def _name(rng: random.Random, parts: int, used: set[str] | None = None) -> str:
    """A name from syllables; with `used`, never one drawn before. People, towns and places are
    unique: an entity in both splits would let a memorised fact cross from training to
    evaluation. (The default 270 examples had no such repeat, so the sweep's set is unchanged.)"""
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()
        if used is None or name not in used:
            if used is not None:
                used.add(name)
            return name


def builtin_examples(n_people: int = 50, n_towns: int = 40) -> list[Example]:
    """Three extractive QA examples per invented person or town, generated deterministically from
    templates: 270 with the defaults (the sweep's set), as many as training asks for otherwise."""
    rng = random.Random(20251124)
    names: set[str] = set()  # every three-syllable name: surnames, birthplaces, towns, provinces
    examples: list[Example] = []
    for i in range(n_people):
        person = f"{_name(rng, 2)} {_name(rng, 3, names)}"
        city, city2, company = _name(rng, 3, names), _name(rng, 2), _name(rng, 2) + " Works"
        year = str(rng.randint(1850, 1990))
        profession, subject, product = (rng.choice(_PROFESSIONS), rng.choice(_SUBJECTS),
                                        rng.choice(_PRODUCTS))
        context = (f"{person} is a {profession} who was born in {city} in {year}. "
                   f"After studying {subject} at the University of {city2}, {person.split()[0]} "
                   f"founded a company called {company}. {company} is best known for making "
                   f"{product}.")
        qas = [(f"Where was {person} born?", (city,)),
               (f"In what year was {person} born?", (year,)),
               (f"What did {person} study?", (subject,)),
               (f"What company did {person} found?", (company,)),
               (f"What is {company} best known for making?", (product,)),
               (f"What is the profession of {person}?", (profession, f"a {profession}"))]
        for j, (question, answers) in enumerate(rng.sample(qas, 3)):
            examples.append(Example(f"builtin-person{i}-q{j}", context, question, answers,
                                    f"person{i}"))
    for i in range(n_towns):
        town, river, province = _name(rng, 3, names), _name(rng, 2), _name(rng, 3, names)
        population = f"{rng.randint(2, 95)},{rng.randint(100, 999)}"
        festival, month = rng.choice(_FESTIVALS), rng.choice(_MONTHS)
        context = (f"{town} is a small town on the {river} River in the province of {province}. "
                   f"It has about {population} inhabitants. Its main festival, the {festival}, "
                   f"is held every {month}.")
        qas = [(f"On which river is {town}?", (river, f"the {river} River", f"{river} River")),
               (f"In which province is {town}?", (province,)),
               (f"How many inhabitants does {town} have?", (population, f"about {population}")),
               (f"When is the {festival} of {town} held?", (month, f"every {month}")),
               (f"What is the main festival of {town}?", (festival, f"the {festival}"))]
        for j, (question, answers) in enumerate(rng.sample(qas, 3)):
            examples.append(Example(f"builtin-town{i}-q{j}", context, question, answers,
                                    f"town{i}"))
    return examples


# ---------------------------------------------------------------------------------------------
# Local files.

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"dataset file {path} is not valid JSON ({err}); "
                         "pass a SQuAD-format .json or a .jsonl of {context, question, answers}")
    except UnicodeDecodeError:
        raise UsageError(f"dataset file {path} is not UTF-8 text")


def squad_json_examples(path: Path) -> list[Example]:
    """A file in the official SQuAD v1.1/v2.0 format; unanswerable questions are left out."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UsageError(f"dataset file {path} has no top-level 'data' list, so it is not in "
                         "SQuAD format; use a .jsonl of {context, question, answers} instead")
    examples = []
    try:
        for article in doc["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    if qa.get("is_impossible") or not qa.get("answers"):
                        continue
                    answers = tuple(a["text"] for a in qa["answers"])
                    examples.append(Example(str(qa["id"]), para["context"], qa["question"],
                                            answers, str(article.get("title", para["context"]))))
    except (KeyError, TypeError) as err:
        raise UsageError(f"dataset file {path} breaks the SQuAD format (missing or wrong field "
                         f"{err}); each paragraph needs 'context' and 'qas' with 'id', "
                         "'question' and 'answers'")
    return examples


def _answers(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict) and "text" in value:  # the `datasets` SQuAD layout
        return tuple(value["text"])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError("answers must be a string, a list of strings, or {'text': [...]}")


def jsonl_examples(path: Path) -> list[Example]:
    """One JSON object per line with context, question, answers (and optionally id)."""
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ex = Example(str(row.get("id", f"{path.stem}-{lineno}")), row["context"],
                         row["question"], _answers(row["answers"]),
                         str(row.get("title", row["context"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UsageError(f"dataset file {path}, line {lineno}: {type(err).__name__}: {err}; "
                             "each line must be an object with context, question and answers")
        if ex.answers:
            examples.append(ex)
    return examples


# ---------------------------------------------------------------------------------------------
# Hugging Face `datasets` (needs the network, or a warm local cache).

def _hub(path: str, name: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise UsageError("the `datasets` package is not installed; `pip install datasets`, "
                         "or pass a local SQuAD .json / .jsonl file with --dataset")
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # the hub raises many types; all mean "could not get it"
        raise UsageError(f"could not load dataset {path!r} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); offline? use the "
                         "built-in set (--dataset builtin) or a local file")


def hub_squad(version: str) -> list[Example]:
    rows = _hub("rajpurkar/squad_v2" if version == "v2" else "rajpurkar/squad", None, "validation")
    return [Example(r["id"], r["context"], r["question"], tuple(r["answers"]["text"]), r["title"])
            for r in rows if r["answers"]["text"]]


def hub_hotpot() -> list[Example]:
    rows = _hub("hotpotqa/hotpot_qa", "distractor", "validation")
    out = []
    for r in rows:
        paragraphs = [f"{title}: {' '.join(sents)}"
                      for title, sents in zip(r["context"]["title"], r["context"]["sentences"])]
        out.append(Example(r["id"], "\n".join(paragraphs), r["question"], (r["answer"],), r["id"]))
    return out


NAMED = {
    "builtin": ("built-in offline set (invented entities, extractive)", builtin_examples),
    "squad": ("SQuAD v1.1 validation via `datasets`", lambda: hub_squad("v1")),
    "squad_v2": ("SQuAD v2.0 validation, answerable questions, via `datasets`",
                 lambda: hub_squad("v2")),
    "hotpot": ("HotpotQA distractor validation via `datasets`", hub_hotpot),
}


def check_spec(spec: str) -> None:
    """Fail fast, before any model is loaded, on a dataset that cannot exist."""
    if spec in NAMED:
        return
    path = Path(spec)
    if path.is_dir():
        raise UsageError(f"dataset {spec} is a folder; pass a SQuAD .json or a .jsonl file (a "
                         f"file inside it), or one of: {', '.join(NAMED)}")
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise UsageError(f"dataset file {spec} {why_not_a_file(path)}; pass an existing .json/.jsonl "
                             f"file or one of: {', '.join(NAMED)}")
        return
    raise UsageError(f"unknown dataset {spec!r}; use one of {', '.join(NAMED)}, "
                     "or a path to a SQuAD .json or a .jsonl file")


def load_all(spec: str, at_least: int = 0) -> list[Example]:
    """Every example of the dataset; the built-in set is generated with at least `at_least`."""
    check_spec(spec)
    if spec == "builtin" and at_least > 270:
        entities = -(-at_least // 3)
        examples = builtin_examples(n_people=-(-entities // 2), n_towns=entities // 2 + 1)
    elif spec in NAMED:
        examples = NAMED[spec][1]()
    else:
        path = Path(spec)
        examples = jsonl_examples(path) if path.suffix == ".jsonl" else squad_json_examples(path)
    if not examples:
        raise UsageError(f"dataset {spec} holds no answerable questions; nothing to evaluate")
    return examples


def sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """Seeded shuffle, then the first n (None: all): the same n always gives the same examples,
    and a smaller n the first of them."""
    if n is None:
        n = len(examples)
    if n < 0:
        raise UsageError(f"--samples must be at least 0 (got {n})")
    if n > len(examples):
        print(f"warning: asked for {n} samples but the dataset holds {len(examples)}; "
              "using all of them", file=sys.stderr)
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:n]


def grouped(things, key) -> dict:
    """`things` by `key(thing)`, each group in the given order and the groups in the order of
    their first member: a paragraph's questions brought together without reordering the rest
    (a seeded epoch, a press's fit, a batch read behind one pruned cache)."""
    groups = {}
    for thing in things:
        groups.setdefault(key(thing), []).append(thing)
    return groups


@dataclass
class Split:
    train: list[Example]
    eval: list[Example]
    by: str = "entity or article (Example.group): no context or name is in both splits"

    def describe(self) -> dict:
        train_groups = {e.group for e in self.train}
        eval_groups = {e.group for e in self.eval}
        return {"by": self.by,
                "train_examples": len(self.train), "eval_examples": len(self.eval),
                "train_groups": len(train_groups), "eval_groups": len(eval_groups),
                "shared_groups": len(train_groups & eval_groups),
                "shared_contexts": len({e.context for e in self.train}
                                       & {e.context for e in self.eval})}


def split(examples: list[Example], n_train: int | None, n_eval: int, seed: int) -> Split:
    """Whole groups go to evaluation (seeded order) until it holds n_eval examples; the training
    split is a seeded sample of n_train from the other groups. Examples without a group form a
    group of their own context, so a context is never on both sides."""
    groups = grouped(examples, lambda e: e.group or e.context)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    held, rest = [], []
    for key in order:
        (held if len(held) < n_eval else rest).extend(groups[key])
    if not held:
        raise UsageError("the evaluation split is empty: ask for --eval_samples of at least 1")
    if not rest and n_train:
        raise UsageError(f"no example is left for training after {len(held)} evaluation "
                         "examples; lower --eval_samples or use a larger --dataset")
    return Split(sample(rest, n_train, seed), held)


def split_apart(train: list[Example], evaluation: list[Example], n_train: int | None,
                n_eval: int, seed: int) -> Split:
    """Training from one dataset, evaluation from another (--eval_dataset): refused when the two
    share an article or a context. The evaluation is a seeded sample of n_eval questions drawn
    across all of its articles, not whole articles: one article is one topic."""
    shared = sorted({e.group for e in train} & {e.group for e in evaluation})
    contexts = {e.context for e in train} & {e.context for e in evaluation}
    if shared or contexts:
        example = f" (e.g. {shared[0]!r})" if shared else ""
        raise UsageError(f"--eval_dataset shares {len(shared)} article(s){example} and "
                         f"{len(contexts)} context(s) with --dataset; evaluate on articles the "
                         "run never trains on")
    return Split(sample(train, n_train, seed), sample(evaluation, n_eval, seed),
                 by="two datasets (--dataset, --eval_dataset): no article or context in both")
