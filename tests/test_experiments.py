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
