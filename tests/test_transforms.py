"""Every transform's maths against a direct, slow computation on a tiny random model."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from latentwire import embed_experiments as T
from latentwire import vocab as V
from latentwire.vocab import VocabSpace

from .conftest import ROOT, tiny_llama


@pytest.fixture(scope="module")
def space():
    return VocabSpace.from_model(tiny_llama())


def packed(space, lengths=(5, 1, 9), seed=1, noise=0.3):
    """Token embeddings with noise (so nothing sits exactly on a vocabulary row), packed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, space.size, (sum(lengths),), generator=g)
    x = space.table[ids] + noise * space.table.std() * torch.randn(len(ids), space.table.shape[1], generator=g)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return T.TransformInputs(x, offsets, space)


def test_statistics_live_in_inputs_embeds_space():
    model = tiny_llama(embed_scale=20.0)
    space = VocabSpace.from_model(model)
    direct = model.get_input_embeddings()(torch.arange(512)).detach()
    raw = model.get_input_embeddings().weight.detach()
    assert torch.allclose(space.table, direct)
    assert space.mean_rms == pytest.approx(float(direct.pow(2).mean(1).sqrt().mean()), rel=1e-5)
    assert space.mean_rms == pytest.approx(20 * float(raw.pow(2).mean(1).sqrt().mean()), rel=1e-4)


def test_rms_scale_keeps_scale_on_a_rescaling_embedding_module():
    """rms_scale1.0 must leave real token embeddings near where they were (as the baseline),
    which only holds when the statistics come from the module's output, not the raw table."""
    model = tiny_llama(embed_scale=20.0)
    space = VocabSpace.from_model(model)
    ids = torch.arange(0, 512, 7)
    x = model.get_input_embeddings()(ids).detach()
    inp = T.TransformInputs(x, torch.tensor([0, len(ids)]), space)
    _, diag = T.apply("rms_matching", inp, {"target_scale": 1.0})
    assert 0.8 < diag["norm_ratio"] < 1.25
    assert diag["cosine_to_input"] > 0.9999


def test_rms_matching_matches_direct(space):
    inp = packed(space)
    out, _ = T.apply("rms_matching", inp, {"target_scale": 0.8})
    for row_in, row_out in zip(inp.x, out):
        rms = (sum(float(v) ** 2 for v in row_in) / len(row_in)) ** 0.5
        expected = row_in * (0.8 * float(space.mean_rms) / rms)
        assert torch.allclose(row_out, expected, rtol=1e-4, atol=1e-6)


def test_batch_distribution_matches_direct_per_example(space):
    inp = packed(space)
    out, _ = T.apply("batch_distribution", inp, {})
    for i in range(len(inp.offsets) - 1):
        seg = inp.x[inp.offsets[i]:inp.offsets[i + 1]].double()
        mean = seg.mean(0)
        std = seg.std(0, unbiased=False)
        expected = (seg - mean) / (std + 1e-5) * space.std.double() + space.mean.double()
        assert torch.allclose(out[inp.offsets[i]:inp.offsets[i + 1]].double(), expected, atol=1e-4)


def test_batch_distribution_does_not_depend_on_batching(space):
    inp = packed(space, lengths=(4, 6))
    together, _ = T.apply("batch_distribution", inp, {})
    alone = T.TransformInputs(inp.x[4:], torch.tensor([0, 6]), space)
    assert torch.allclose(T.apply("batch_distribution", alone, {})[0], together[4:], atol=1e-6)


def brute_topk(space, x, k):
    sims = F.normalize(x, dim=1) @ F.normalize(space.table, dim=1).T
    return sims.topk(k, dim=1)


def test_topk_is_exact_when_chunked(space, monkeypatch):
    inp = packed(space, lengths=(40, 33))
    monkeypatch.setattr(V, "BLOCK_ELEMENTS", 700)  # forces many query and vocabulary blocks
    sims, ids = space.topk(inp.x, 10)
    ref_sims, ref_ids = brute_topk(space, inp.x, 10)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(sims, ref_sims, atol=1e-5)


def test_nearest_k_matches_direct(space):
    inp = packed(space)
    out, _ = T.apply("nearest_k", inp, {"k": 5, "alpha": 0.3})
    ref_sims, ref_ids = brute_topk(space, inp.x, 5)
    for n in range(inp.x.shape[0]):
        w = torch.exp(ref_sims[n] / 0.1)
        w = w / w.sum()
        proj = sum(w[j] * space.table[ref_ids[n, j]] for j in range(5))
        assert torch.allclose(out[n], 0.3 * inp.x[n] + 0.7 * proj, atol=1e-5)


def test_one_search_serves_every_depth(space):
    inp = packed(space)
    T.apply("nearest_k", inp, {"k": 10, "alpha": 0.5})
    cached = inp._neighbours
    T.apply("nearest_k", inp, {"k": 3, "alpha": 0.5})
    T.apply("anchor_offset", inp, {"eps": 0.1})
    assert inp._neighbours is cached


def test_anchor_offset_matches_direct_and_clips(space):
    inp = packed(space, noise=1.0)
    out, extra = T.apply("anchor_offset", inp, {"eps": 0.05})
    _, ref_ids = brute_topk(space, inp.x, 1)
    for n in range(inp.x.shape[0]):
        anchor = space.table[ref_ids[n, 0]]
        delta = inp.x[n] - anchor
        bound = 0.05 * anchor.norm()
        expected = inp.x[n] if delta.norm() <= bound else anchor + delta * bound / delta.norm()
        assert torch.allclose(out[n], expected, atol=1e-5)
        assert (out[n] - anchor).norm() <= bound * (1 + 1e-4)
    assert extra["fraction_clipped"] == 1.0


def test_anchor_offset_on_real_tokens_is_an_exact_no_op(space):
    x = space.table[torch.tensor([3, 17, 17, 400])]
    inp = T.TransformInputs(x.clone(), torch.tensor([0, 4]), space)
    out, diag = T.apply("anchor_offset", inp, {"eps": 0.1})
    assert torch.equal(out, x)
    assert diag["identical_to_input"] is True
    assert diag["fraction_changed"] == 0.0


def test_codebook_is_seeded_kmeans_of_the_vocabulary(space):
    codes, scale = space.codebook(16, seed=3, iterations=5)
    # Direct Lloyd iterations from the same seeded start.
    start = torch.randperm(space.size, generator=torch.Generator().manual_seed(3))[:16]
    c = space.table[start].clone()
    for _ in range(5):
        assign = torch.cdist(space.table.double(), c.double()).argmin(1)
        c = torch.stack([space.table[assign == j].mean(0) if (assign == j).any() else c[j]
                         for j in range(16)])
    assert torch.allclose(codes, c, atol=1e-4)
    d2 = torch.cdist(space.table.double(), codes.double()).pow(2).sort(1).values
    assert float(scale) == pytest.approx(float((d2[:, 1] - d2[:, 0]).median()), rel=1e-3)
    assert space.codebook(16, seed=3, iterations=5)[0] is codes  # cached


def test_soft_codebook_matches_direct(space):
    inp = packed(space)
    out, extra = T.apply("soft_codebook", inp, {"size": 32, "tau": 0.7})
    codes, scale = space.codebook(32, 0)
    w = torch.softmax(-torch.cdist(inp.x.double(), codes.double()).pow(2) / (0.7 * float(scale)), 1)
    assert torch.allclose(out.double(), w @ codes.double(), atol=1e-4)
    ppl = torch.exp(-(w * w.log()).sum(1)).mean()
    assert extra["assignment_perplexity"] == pytest.approx(float(ppl), rel=1e-3)
    assert 1.0 < extra["assignment_perplexity"] < 32


def test_diagnostics_match_direct(space):
    inp = packed(space)
    out, diag = T.apply("rms_matching", inp, {"target_scale": 1.2})
    ratio = (out.norm(dim=1) / inp.x.norm(dim=1)).mean()
    cos = F.cosine_similarity(out, inp.x, dim=1).mean()
    assert diag["norm_ratio"] == pytest.approx(float(ratio), rel=1e-5)
    assert diag["cosine_to_input"] == pytest.approx(float(cos), rel=1e-5)
    assert diag["max_abs_delta"] == pytest.approx(float((out - inp.x).abs().max()), rel=1e-5)
    assert diag["fraction_changed"] == 1.0 and diag["identical_to_input"] is False


def test_non_finite_output_fails_before_generation(space, monkeypatch):
    inp = packed(space)
    monkeypatch.setattr(T, "identity", lambda i: (i.x * float("nan"), {}))
    with pytest.raises(T.NonFiniteError, match="non-finite"):
        T.apply("identity", inp, {})


def test_search_memory_is_bounded_on_a_256k_vocabulary():
    """100 SQuAD-sized samples (20,000 positions) against 262,144 rows: a dense similarity
    matrix would need 21 GB; the chunked search must stay within a few hundred MB."""
    script = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(2)
        from tests.conftest import tiny_llama
        from latentwire.vocab import VocabSpace
        space = VocabSpace.from_model(tiny_llama(vocab_size=262144, hidden=64))
        x = torch.randn(20000, 64) * float(space.table.std())
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sims, ids = space.topk(x, 10)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert ids.shape == (20000, 10)
        print((after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    extra_mb = int(out.stdout.strip().splitlines()[-1])
    assert extra_mb < 600, f"search grew peak memory by {extra_mb} MB"
