import pytest

from latentwire.errors import UsageError
from latentwire.experiments import grid, listing, select

SEED_NAMES = """baseline rms_scale0.8 rms_scale1.0 rms_scale1.2 batch_dist nearest_k3_a0.2
nearest_k3_a0.5 nearest_k5_a0.3 nearest_k5_a0.5 nearest_k5_a0.7 nearest_k7_a0.5 nearest_k7_a0.7
nearest_k10_a0.5 nearest_k10_a0.7 nearest_k10_a0.9 anchor_eps0.01 anchor_eps0.02 anchor_eps0.05
anchor_eps0.1 anchor_eps0.15 anchor_eps0.2 anchor_eps0.3 codebook_128_t1.0 codebook_256_t0.7
codebook_256_t1.0 codebook_512_t0.7 codebook_512_t1.0 codebook_1024_t1.0""".split()


def test_default_grid_is_the_seed_names_exactly():
    assert [e.name for e in grid()] == SEED_NAMES


def test_full_grid_is_the_cartesian_products():
    full = grid("full")
    assert len(full) == 40
    assert sum(e.category == "nearest_k" for e in full) == 20
    assert sum(e.category == "soft_codebook" for e in full) == 8
    assert set(SEED_NAMES) <= {e.name for e in full}


def test_select_name_list_and_glob():
    assert [e.name for e in select("rms_scale1.0")] == ["rms_scale1.0"]
    assert [e.name for e in select("baseline, batch_dist")] == ["baseline", "batch_dist"]
    assert len(select("nearest_k*")) == 10
    assert len(select("nearest_k*", "full")) == 20
    assert [e.name for e in select("nearest_k3_a0.9")] == ["nearest_k3_a0.9"]  # full-grid name


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UsageError, match="did you mean nearest_k5_a0.5"):
        select("nearst_k5_a0.5")
    with pytest.raises(UsageError, match="no experiment matches"):
        select("zzz*")


def test_listing_names_every_experiment_with_its_category():
    text = listing()
    for name in SEED_NAMES:
        assert f"  {name} " in text
    assert "soft_codebook (6)" in text and "28 experiments" in text


def clip_norm(inp, scale):
    """A transform that exists only in this test: every row scaled to `scale` x its norm."""
    return inp.x * scale, {}


def test_a_transform_is_one_registry_entry_found_everywhere(monkeypatch):
    """One declaration reaches the command's choices, the training flags, the analysis's
    categories (and its next command) and the Ray sweep's grouping."""
    from pathlib import Path

    from latentwire import embed_experiments, experiments
    from latentwire.analysis import insights
    from latentwire.cli import parser
    from latentwire.options import from_args
    from latentwire.registry import Registry
    from latentwire.sweep import on_ray
    from latentwire.sweep.options import Plan
    from latentwire.training.options import TrainOptions

    tiny = Registry("transform", experiments.Transform)
    tiny.add("identity", experiments.TRANSFORMS["identity"])
    tiny.add("clip_norm", experiments.Transform(
        "clip_norm", f"{__name__}:clip_norm", "every row scaled", "clipnorm",
        {"scale": "target_rms_scale"}, meaning="Norms matter.", action="Clip them."))
    monkeypatch.setattr(experiments, "TRANSFORMS", tiny)
    exp = experiments.Experiment("clipnorm0.5", "clip_norm", "clip_norm", {"scale": 0.5})

    parsed = from_args(TrainOptions, parser().parse_args(["train", "--embed_transform", "clip_norm"]))
    assert parsed.embed_transform == "clip_norm"
    assert experiments.train_settings(exp) == {"embed_transform": "clip_norm",
                                               "target_rms_scale": 0.5}
    assert experiments.category_of("clipnorm0.5") == "clip_norm"
    assert experiments.categories() == {"baseline": experiments.TRANSFORMS["identity"].description,
                                        "clip_norm": "every row scaled"}
    row = {"experiment": "clipnorm0.5", "category": "clip_norm", "config": {"scale": 0.5}}
    assert insights.train_command(row).startswith(
        "latentwire train --embed_transform clip_norm --target_rms_scale 0.5")
    plan = Plan([experiments.Experiment("baseline", "baseline", "identity"), exp], ["text"],
                Path("out"))
    groups = {u.group: u.names for u in on_ray.units([(None, plan)])}
    assert groups == {"anchor_offset": ("baseline",), "clip_norm": ("clipnorm0.5",)}
    assert embed_experiments.code_version("clip_norm") != embed_experiments.code_version("identity")


def test_a_registry_refuses_a_second_entry_of_a_name_and_an_entry_of_another_type():
    from latentwire.experiments import TRANSFORMS, Transform
    from latentwire.registry import Registry
    from latentwire.training.registry import ENCODERS

    with pytest.raises(ValueError, match="registered twice"):
        TRANSFORMS.add("rms_matching", TRANSFORMS["rms_matching"])
    with pytest.raises(TypeError, match="must be of type Transform"):
        Registry("transform", Transform).add("x", lambda inp: (inp.x, {}))
    with pytest.raises(ValueError, match="encoder 'lm' is registered twice"):
        ENCODERS.add("lm", ENCODERS["lm"])
    with pytest.raises(TypeError, match="must be of type EncoderEntry"):
        ENCODERS.add("mlp", "latentwire.training.encoders:Pool")
    assert "mlp" not in ENCODERS


def test_every_declaration_names_real_code_and_real_training_flags():
    from dataclasses import fields

    from torch import nn

    from latentwire.experiments import TRANSFORMS
    from latentwire.training.options import TrainOptions
    from latentwire.training.registry import ENCODERS

    options = {f.name for f in fields(TrainOptions)}
    for t in TRANSFORMS.values():
        assert callable(t.load()) and set(t.train_flags.values()) <= options
    for e in ENCODERS.values():
        assert issubclass(e.load(), nn.Module)
