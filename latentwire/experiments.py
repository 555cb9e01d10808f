"""Which experiments exist: the seed's grid of named transformations, as data.

The names are the interface (result files, summaries, `--experiment`); keep them as they are.
The seed README's header says 35 experiments but its own category lists add up to 28, which is
the default grid (what `latentwire list` shows); `--grid full` runs the Cartesian products
(k x alpha, size x tau): 40 in all.
"""

import difflib
import fnmatch
from dataclasses import dataclass, field
from itertools import product

from .errors import UsageError
from .registry import Registry, load


@dataclass(frozen=True)
class Experiment:
    name: str
    category: str
    transform: str  # a key of TRANSFORMS
    config: dict = field(default_factory=dict, hash=False)
    description: str = ""


@dataclass(frozen=True)
class Transform:
    """One transformation of the embeddings, declared once: what every part of the tool needs to
    know about it. The parsers, the grid's listing, the trainer's flags, the analysis and the Ray
    sweep all read it from here; its code is imported only when it runs."""
    category: str  # the category of its experiments in results and the analysis
    function: str  # "package.module:name": fn(TransformInputs, **config) -> (output, diagnostics)
    description: str
    prefix: str  # its experiments' names start with this
    train_flags: dict = field(default_factory=dict)  # config key -> the TrainOptions field setting it
    trainable: bool = True  # can sit inside the training graph (--embed_transform)
    meaning: str = ""  # what a win means (the seed's interpretation table)
    action: str = ""  # and what to do about it
    # The Ray sweep runs a group's experiments in one unit: they share the costly neighbour
    # search. None: a group of its own.
    ray_group: str | None = None

    def load(self):
        return load(self.function)


CODE = "latentwire.embed_experiments"
TRANSFORMS = Registry("transform", Transform)
TRANSFORMS.add("identity", Transform(
    "baseline", f"{CODE}:identity",
    "no transformation: the reference every other experiment is compared with", "baseline",
    trainable=False, ray_group="anchor_offset"))
TRANSFORMS.add("rms_matching", Transform(
    "rms_matching", f"{CODE}:rms_matching",
    "rescale every position to a multiple of the vocabulary's mean RMS", "rms_scale",
    {"target_scale": "target_rms_scale"},
    meaning="Magnitude mismatch: the model needs embeddings at the vocabulary's scale.",
    action="Integrate RMS calibration after the adapter."))
TRANSFORMS.add("batch_distribution", Transform(
    "batch_distribution", f"{CODE}:batch_distribution",
    "per-feature mean/std of each example matched to the vocabulary's", "batch_dist",
    meaning="The per-feature distribution is off; matching its moments helps.",
    action="Normalise adapter outputs to the vocabulary's mean and std."))
TRANSFORMS.add("nearest_k", Transform(
    "nearest_k", f"{CODE}:nearest_k",
    "mix the input with a convex combination of its k nearest vocabulary rows", "nearest_k",
    {"k": "nearest_k", "alpha": "nearest_alpha"},
    meaning="Arbitrary embeddings fail; convex combinations of tokens work.",
    action="Force convex combinations of vocabulary embeddings in the adapter."))
TRANSFORMS.add("anchor_offset", Transform(
    "anchor_offset", f"{CODE}:anchor_offset",
    "nearest vocabulary row plus a residual clipped to eps x its norm", "anchor_eps",
    {"eps": "anchor_eps"},
    meaning="Embeddings must stay near real tokens.",
    action="Add manifold regularisation (anchor + small offset) to training."))
TRANSFORMS.add("soft_codebook", Transform(
    "soft_codebook", f"{CODE}:soft_codebook",
    "soft mixture of k-means codes of the vocabulary (VQ-style bottleneck)", "codebook_",
    {"size": "codebook_size", "tau": "codebook_tau"},
    meaning="A discrete bottleneck over the vocabulary helps.",
    action="Train with a soft codebook over vocabulary embeddings."))

# The tables below are read from the registry when they are used, so that a transform added to
# it is everywhere at once.


def categories() -> dict[str, str]:
    """Each category and what its transform does, in the registry's order."""
    return {t.category: t.description for t in TRANSFORMS.values()}


def of_category(category: str) -> tuple[str, Transform]:
    """(registry name, declaration) of the transform behind a category."""
    return next((name, t) for name, t in TRANSFORMS.items() if t.category == category)


def category_of(experiment: str) -> str:
    """The category an experiment's name belongs to (the longest matching prefix), or other."""
    matches = [t for t in TRANSFORMS.values() if experiment.startswith(t.prefix)]
    return max(matches, key=lambda t: len(t.prefix)).category if matches else "other"


def embed_transforms() -> dict[str, str]:
    """--embed_transform's names -> the registry's: none for no transform, else the transform's
    own name."""
    return {"none": "identity", **{name: name for name, t in TRANSFORMS.items() if t.trainable}}


def train_fields() -> tuple[str, ...]:
    """Every TrainOptions field a transform's config is set by, once each."""
    return tuple(dict.fromkeys(f for t in TRANSFORMS.values() for f in t.train_flags.values()))


def _baseline():
    return [Experiment("baseline", "baseline", "identity", {}, categories()["baseline"])]


def _rms(scales):
    return [Experiment(f"rms_scale{s}", "rms_matching", "rms_matching", {"target_scale": s},
                       f"RMS of every position set to {s} x the vocabulary's mean RMS")
            for s in scales]


def _batch():
    return [Experiment("batch_dist", "batch_distribution", "batch_distribution", {},
                       categories()["batch_distribution"])]


def _nearest(pairs):
    return [Experiment(f"nearest_k{k}_a{a}", "nearest_k", "nearest_k", {"k": k, "alpha": a},
                       f"{a} x input + {round(1 - a, 2)} x softmax-weighted mix of the {k} "
                       "nearest tokens")
            for k, a in pairs]


def _anchor(epsilons):
    return [Experiment(f"anchor_eps{e}", "anchor_offset", "anchor_offset", {"eps": e},
                       f"nearest token + residual clipped to {e} x the token's norm")
            for e in epsilons]


def _codebook(pairs):
    return [Experiment(f"codebook_{n}_t{t}", "soft_codebook", "soft_codebook",
                       {"size": n, "tau": t},
                       f"soft assignment to {n} k-means codes of the vocabulary, temperature {t}")
            for n, t in pairs]


def train_settings(exp: Experiment) -> dict:
    """The trainer's options (TrainOptions fields) that put this experiment's transform, with its
    config, inside the training graph; a key the config lacks (a summary from an older version)
    leaves the trainer's default."""
    name, t = of_category(exp.category)
    return {"embed_transform": name if t.trainable else "none",
            **{flag: exp.config[key] for key, flag in t.train_flags.items() if key in exp.config}}


RMS_SCALES = (0.8, 1.0, 1.2)
KS, ALPHAS = (3, 5, 7, 10), (0.2, 0.3, 0.5, 0.7, 0.9)
EPSILONS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
SIZES, TAUS = (128, 256, 512, 1024), (0.7, 1.0)

GRIDS = {
    "default": (_baseline() + _rms(RMS_SCALES) + _batch()
                + _nearest([(3, 0.2), (3, 0.5), (5, 0.3), (5, 0.5), (5, 0.7), (7, 0.5), (7, 0.7),
                            (10, 0.5), (10, 0.7), (10, 0.9)])
                + _anchor(EPSILONS)
                + _codebook([(128, 1.0), (256, 0.7), (256, 1.0), (512, 0.7), (512, 1.0),
                             (1024, 1.0)])),
    "full": (_baseline() + _rms(RMS_SCALES) + _batch() + _nearest(product(KS, ALPHAS))
             + _anchor(EPSILONS) + _codebook(product(SIZES, TAUS))),
}


def grid(name: str = "default") -> list[Experiment]:
    if name not in GRIDS:
        raise UsageError(f"unknown grid {name!r}; use one of: {', '.join(GRIDS)}")
    return GRIDS[name]


def select(pattern: str, grid_name: str = "default") -> list[Experiment]:
    """One name, a comma-separated list, or shell globs (`nearest_k*`); grid order is kept.

    Globs match within the chosen grid; an exact name from the full grid is accepted too, so any
    single configuration of the full grid can be run on its own.
    """
    chosen = grid(grid_name)
    if pattern.strip() == "all":
        return list(chosen)
    if not pattern.replace(",", "").strip():  # an empty or unset shell variable
        raise UsageError("--experiment is empty; name experiments (globs allowed, e.g. "
                         "'rms_*,baseline') or pass all; `latentwire list` shows every name")
    known = {e.name: e for e in chosen}
    for e in GRIDS["full"]:
        known.setdefault(e.name, e)
    picked: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        if any(ch in part for ch in "*?["):
            matches = fnmatch.filter([e.name for e in chosen], part)
            if not matches:
                raise UsageError(f"no experiment matches {part!r}; "
                                 "`latentwire list` shows every name")
        elif part in known:
            matches = [part]
        else:
            close = difflib.get_close_matches(part, list(known), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UsageError(f"unknown experiment {part!r}; {hint}"
                             f"valid names: {', '.join(e.name for e in chosen)}")
        picked += [m for m in matches if m not in picked]
    return [known[name] for name in picked]


def listing(grid_name: str = "default") -> str:
    rows = grid(grid_name)
    width = max(len(e.name) for e in rows)
    lines = [f"{len(rows)} experiments in the {grid_name} grid:"]
    for category, description in categories().items():
        members = [e for e in rows if e.category == category]
        lines.append(f"\n{category} ({len(members)}): {description}")
        lines += [f"  {e.name:<{width}}  {e.description}" for e in members]
    return "\n".join(lines)
