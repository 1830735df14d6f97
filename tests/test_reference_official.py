"""Self-tests of the independent official-structure reference (tests/reference_official.py).

Does not import msclip.py. Reads the official key listings from the repo copies in
tests/reference/ (byte-identical copies of the shared listings).
"""

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from reference_official import (  # noqa: E402
    LayerNorm,
    build_official_msclip_s,
    randomize_batchnorm_stats,
)

REF_DIR = os.path.join(HERE, "reference")
EXPECTED_PARAMS = {32: 132_408_001, 16: 132_503_617}
EXPECTED_VIS_POS = {32: [50, 768], 16: [197, 768]}


def read_listing(patch):
    rows = []
    with open(os.path.join(REF_DIR, "official_keys_b%d.txt" % patch), encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t")
            assert len(parts) == 4, line
            key, shape, dtype, tied = parts
            rows.append((key, json.loads(shape), getattr(torch, dtype), tied or None))
    return rows


@pytest.fixture(scope="module", params=[32, 16], ids=["b32", "b16"])
def full(request):
    torch.manual_seed(0)
    model = build_official_msclip_s(patch_size=request.param)
    yield request.param, model, model.state_dict()
    del model


# ---------------------------------------------------------------------------------------------
# (a) + (b): full-size structure
# ---------------------------------------------------------------------------------------------
def test_full_size_state_dict_matches_listing(full):
    patch, model, sd = full
    rows = read_listing(patch)
    assert len(rows) == 521
    assert list(sd.keys()) == [r[0] for r in rows]  # same keys, same order
    for key, shape, dtype, _ in rows:
        assert list(sd[key].shape) == shape, key
        assert sd[key].dtype == dtype, key
    assert list(sd["visual.positional_embedding"].shape) == EXPECTED_VIS_POS[patch]

    # tied keys are the very same storage; nothing else is
    n_tied = 0
    for key, shape, _, tied in rows:
        if tied is not None:
            n_tied += 1
            assert sd[key].data_ptr() == sd[tied].data_ptr(), (key, tied)
    assert n_tied == 88
    assert len({t.data_ptr() for t in sd.values()}) == 433

    # the sharing is by module / Parameter identity, as in the official code
    for k in range(1, 12):
        t = model.transformer.resblocks[k]
        v = model.visual.transformer.resblocks[k]
        assert t.attn.in_proj_weight is v.attn.in_proj_weight
        assert t.attn.in_proj_bias is v.attn.in_proj_bias
        assert t.attn.out_proj is v.attn.out_proj
        assert t.mlp is v.mlp
        assert t.ln_1 is not v.ln_1 and t.ln_2 is not v.ln_2
    t0 = model.transformer.resblocks[0]
    shared = {id(p) for p in model.visual.parameters()}
    assert all(id(p) not in shared for p in t0.parameters())


def test_full_size_param_count_and_init(full):
    patch, model, sd = full
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[patch]
    assert sd["logit_scale"].shape == torch.Size([])
    assert sd["logit_scale"].item() == 1.0
    assert not model.training


# ---------------------------------------------------------------------------------------------
# (c) tiny configs run
# ---------------------------------------------------------------------------------------------
TINY = dict(width=128, heads=2, layers=12, image_size=64, embed_dim=32, vocab_size=1000, context_length=77)


def make_tokens(batch, ctx=77, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(batch, ctx, dtype=torch.long)
    for b in range(batch):
        n = 5 + 7 * b
        tok[b, 0] = vocab - 2  # "SOT"
        tok[b, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=g)
        tok[b, n] = vocab - 1  # "EOT" = largest id
    return tok


@pytest.mark.parametrize("patch,grid,kernels", [(32, 2, (16, 8, 4, 2, 1)), (16, 4, (8, 4, 2, 1, 1))])
def test_tiny_runs(patch, grid, kernels):
    torch.manual_seed(0)
    model = build_official_msclip_s(patch_size=patch, **TINY)
    randomize_batchnorm_stats(model, seed=1)
    assert model.visual.grid_size == grid
    assert model.visual.adapter_kernels == kernels
    assert list(model.visual.positional_embedding.shape) == [grid * grid + 1, 128]
    sd = model.state_dict()
    assert list(sd["visual.transformer.resblocks.0.resnet_stage.conv_0.conv1.weight"].shape) == [16, 8, 3, 3]
    for j, (c, k) in enumerate(zip((8, 16, 32, 64, 128), kernels)):
        w = sd["visual.transformer.parallel_lateral_adapter.%d.top2bottom_dw_conv.conv.weight" % j]
        assert list(w.shape) == [c, 1, k, k]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tokens = make_tokens(2)
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
        logits, logits_t = model(images, tokens)
    assert img.shape == (2, 32) and txt.shape == (2, 32)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert torch.isfinite(logits).all() and torch.equal(logits.t(), logits_t)
    # batch items are independent (BN in eval mode)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images[1:]), img[1:], atol=1e-5)


def test_text_refuses_other_lengths_and_is_causal():
    torch.manual_seed(0)
    model = build_official_msclip_s(**TINY)
    with pytest.raises(ValueError):
        model.encode_text(torch.zeros(2, 16, dtype=torch.long))
    tokens = make_tokens(2)
    changed = tokens.clone()
    changed[:, 40:] = 7  # only positions after every EOT (EOT at 5 and 12): pooled token unaffected
    with torch.no_grad():
        a = model.encode_text(tokens)
        b = model.encode_text(changed)
        changed[0, 3] = 11  # before EOT: must change row 0 only
        c = model.encode_text(changed)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a[0], c[0], atol=1e-4)
    assert torch.allclose(a[1], c[1], atol=1e-6)


def test_branch_and_adapters_are_used():
    torch.manual_seed(0)
    model = build_official_msclip_s(**TINY)
    randomize_batchnorm_stats(model, seed=1)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model.encode_image(images)
        bn = model.visual.transformer.parallel_branch_v[4].resnet_stage.conv_0.residual_bn
        assert bn.eps == 1e-6
        bn.running_mean.add_(1.0)
        moved = model.encode_image(images)
    assert not torch.allclose(base, moved, atol=1e-4)


def test_randomize_batchnorm_stats_deterministic_and_valid():
    torch.manual_seed(0)
    m1 = build_official_msclip_s(**TINY)
    m2 = build_official_msclip_s(**TINY)
    randomize_batchnorm_stats(m1, seed=5)
    randomize_batchnorm_stats(m2, seed=5)
    bns1 = [m for m in m1.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bns2 = [m for m in m2.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns1) == 1 + 4 * 2 + 1 + 4 * 4 + 5 * 2  # stem, branch, adapters
    for a, b in zip(bns1, bns2):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert (a.running_var > 0).all() and a.running_mean.abs().sum() > 0
    eps = {m.eps for m in bns1}
    assert eps == {1e-5, 1e-6}


def test_layernorm_numerics():
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = torch.nn.functional.layer_norm(x.float(), (16,), eps=1e-12).double()
    y = ln(x.float())
    assert torch.allclose(y, ref.float() * ln.weight + ln.bias, atol=1e-5)
    # half input: statistics in fp32, result cast back before the affine
    yh = ln(x.half())
    assert yh.dtype == torch.float32  # fp32 weight * half -> promoted, as in the official code
    refh = torch.nn.functional.layer_norm(x.half().float(), (16,), eps=1e-12).half()
    assert torch.allclose(yh, refh.float() * ln.weight + ln.bias, atol=1e-5)
    assert ln.variance_epsilon == 1e-12
