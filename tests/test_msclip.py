"""msclip.py against independent references: ARCHITECTURE.md's parameter counts and key listings,
the official tokenizer's ids, the official-layout reference model (tests/reference_official.py),
naive re-computations of the loss and the preprocessing, and a 2-process gloo run of the loss."""
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import msclip
from conftest import free_port
from reference_official import build_official_msclip_s, randomize_batchnorm_stats

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference"


def count(module):
    return sum(p.numel() for p in module.parameters())


def listing(patch):
    rows = [line.rstrip("\n").split("\t") for line in open(REFERENCE / f"official_keys_b{patch}.txt", encoding="utf-8")
            if line.strip() and not line.startswith("#")]
    return [(key, json.loads(shape)) for key, shape, _dtype, _tied in rows]


# ---------------------------------------------------------------------------------------------
# Model family: parameter counts from ARCHITECTURE.md §9 and supplement Tables 5-6
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, overrides, expected", [
    ("msclip-s-b32", {}, 132_408_001),
    ("msclip-s-b16", {}, 132_503_617),
    ("clip-b32", {}, 151_277_313),
    ("clip-b16", {}, 149_620_737),
    ("msclip-b32", {}, 126_285_313),                          # Table 5 row 1
    ("msclip-b32", {"share_layernorms": True}, 126_248_449),
    ("msclip-b32", {"share_mlp": False}, 182_954_497),        # attention shared only
    ("msclip-b32", {"share_attention": False}, 154_633_729),  # FFN shared only
    ("msclip-b32", {"share_attention": False, "share_mlp": False}, 211_302_913),  # separate 768-wide towers
    ("msclip-s-b32", {"parallel_branch": False}, 128_436_721),
])
def test_parameter_counts(name, overrides, expected):
    assert count(msclip.create_model(name, **overrides)) == expected


def test_auxiliary_module_counts():
    b32, b16 = msclip.create_model("msclip-s-b32"), msclip.create_model("msclip-s-b16")
    assert count(b32.image.stem) == count(b16.image.stem) == 4_513_776
    assert count(b32.image.branch) == count(b16.image.branch) == 2_751_792
    assert count(b32.image.adapters) == 1_219_488 and count(b16.image.adapters) == 1_202_208
    assert count(b32.image.branch) + count(b32.image.adapters) == 3_971_280
    assert count(b16.image.branch) + count(b16.image.adapters) == 3_954_000


def test_adapters_without_depthwise_conv():
    """Table 6 ablation: each depthwise conv + BN becomes average pooling (same kernel, stride,
    padding); the 1x1 projection stays. The count drops by exactly those convs and BNs."""
    full = msclip.create_model("msclip-s-b32")
    ablated = msclip.create_model("msclip-s-b32", adapter_depthwise=False)
    dw = sum(c * k * k + 2 * c + 768 * 9 + 2 * 768 for c, k in zip([48, 96, 192, 384, 768], [16, 8, 4, 2, 1]))
    assert count(full) - count(ablated) == dw
    adapter = ablated.image.adapters[0]
    assert isinstance(adapter.branch_pool, torch.nn.AvgPool2d) and adapter.branch_pool.kernel_size == 16
    assert adapter.branch_pool.stride == 16 and adapter.branch_pool.padding == 0
    assert (adapter.token_mix.kernel_size, adapter.token_mix.stride, adapter.token_mix.padding) == (3, 1, 1)
    tiny = msclip.create_model("msclip-s-tiny", adapter_depthwise=False).eval()
    with torch.no_grad():
        out = tiny.encode_image(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, expected", [
    ("msclip-attn-b32", 182_954_497),                  # Table 5: attention shared only
    ("msclip-ffn-b32", 154_633_729),                   # Table 5: FFN shared only
    ("msclip-es-b32", 128_436_721),                    # MS-CLIP-S without the parallel branch
    ("msclip-pb-b32", 126_285_313 + 3_971_280),        # MS-CLIP + branch and adapters (§9 table)
])
def test_ablation_presets_b32(name, expected):
    assert count(msclip.create_model(name)) == expected


def test_ablation_presets_tiny_b16():
    """The micro-scale presets of ablate.py, from the tiny models by analytic differences."""
    n = {name: count(msclip.create_model(name)) for name in msclip.PRESETS if "tiny" in name}
    width, grid16, grid32 = 128, 4, 2
    patch_and_positions = 3 * width * (16 ** 2 - 32 ** 2) + width * (grid16 ** 2 - grid32 ** 2)
    assert n["clip-tiny-b16"] - n["clip-tiny"] == n["msclip-tiny-b16"] - n["msclip-tiny"] == patch_and_positions
    mlp = width * 4 * width + 4 * width + 4 * width * width + width
    attention = 3 * width * width + 3 * width + width * width + width
    assert n["msclip-attn-tiny-b16"] - n["msclip-tiny-b16"] == 12 * mlp      # text keeps its own MLPs
    assert n["msclip-ffn-tiny-b16"] - n["msclip-tiny-b16"] == 12 * attention
    # Early Specialization and the parallel branch add independent modules.
    assert n["msclip-es-tiny-b16"] + n["msclip-pb-tiny-b16"] == n["msclip-tiny-b16"] + n["msclip-s-tiny-b16"]
    depthwise = sum(c * k * k + 2 * c + width * 9 + 2 * width for c, k in zip([8, 16, 32, 64, 128], [8, 4, 2, 1, 1]))
    assert n["msclip-s-tiny-b16"] - n["msclip-s-avgpool-tiny-b16"] == depthwise
    c = msclip.create_model("msclip-s-avgpool-tiny-b16").config
    assert (c.patch_size, c.image_size, c.vision_width, c.early_specialization, c.parallel_branch,
            c.adapter_depthwise) == (16, 64, 128, True, True, False)


def test_sharing_is_in_the_structure():
    model = msclip.create_model("msclip-s-b32")
    assert len(model.layers) == 11
    for layer in model.layers:
        assert set(layer.shared) == {"attn", "mlp"}
        assert set(layer.image) == set(layer.text) == {"ln_1", "ln_2"}
    assert hasattr(model.image, "stem") and hasattr(model.text, "first_layer")
    clip = msclip.create_model("clip-b32")
    assert all(len(layer.shared) == 0 for layer in clip.layers) and len(clip.layers) == 12
    assert clip.layers[0].text["attn"].qkv.weight.shape == (1536, 512)
    # A shared weight is one tensor: both modalities' gradients land in it.
    tiny = msclip.create_model("msclip-s-tiny")
    qkv = tiny.layers[3].shared["attn"].qkv.weight
    tiny.encode_image(torch.randn(2, 3, 64, 64)).sum().backward()
    from_image = qkv.grad.clone()
    tiny.zero_grad()
    tiny.encode_text(msclip.tokenize(["a cat", "a dog"])).sum().backward()
    assert from_image.abs().sum() > 0 and qkv.grad.abs().sum() > 0


def test_tiny_presets_cover_every_path():
    model = msclip.create_model("msclip-s-tiny")
    c = model.config
    assert (c.vision_width, c.vision_heads, c.layers, c.image_size, c.grid) == (128, 2, 12, 64, 2)
    assert [s.conv.conv.out_channels for s in model.image.stem.stages] == [16, 32, 64, 128]  # 48:96:192:384:768
    assert [a.branch_pool.conv.kernel_size[0] for a in model.image.adapters] == [16, 8, 4, 2, 1]
    b16 = msclip.create_model("msclip-s-tiny-b16")
    assert b16.config.grid == 4 and [a.branch_pool.conv.kernel_size[0] for a in b16.image.adapters] == [8, 4, 2, 1, 1]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset"):
        msclip.create_model("msclip-xl")
    with pytest.raises(ValueError, match="text_width"):
        msclip.create_model("msclip-b32", text_width=512, text_heads=8)
    with pytest.raises(ValueError, match="fusion_layers"):
        msclip.create_model("msclip-s-tiny", fusion_layers=(1, 2, 3, 4, 5))


def test_layernorm_numerics():
    """eps 1e-12 inside the sqrt, biased variance, fp32 statistics (ARCHITECTURE §2)."""
    ln = msclip.LayerNorm(16)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(4, 16) * 1e-5  # tiny variance: eps 1e-5 would visibly change the result
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    naive = (x - mean) / torch.sqrt(var + 1e-12) * ln.weight + ln.bias
    torch.testing.assert_close(ln(x), naive, rtol=1e-4, atol=1e-4)
    assert ln(x.bfloat16()).dtype == torch.bfloat16


def test_bf16_autocast_forward_is_finite():
    model = msclip.create_model("msclip-s-tiny").eval()
    images, tokens = torch.randn(2, 3, 64, 64), msclip.tokenize(["a red square", "two blue circles"])
    with torch.no_grad():
        reference = model(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image_features, text_features, scale = model(images, tokens)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    assert (image_features.float() - reference[0]).abs().max() < 0.1


def test_initialisation_follows_the_spec():
    model = msclip.create_model("msclip-s-b32")
    assert model.logit_scale.item() == 1.0
    # the official layout: shape [] in the state dict, in the official export and on load (the
    # parameter itself has shape [1]: DeepSpeed 0.19.8 cannot broadcast 0-dim parameters)
    assert model.state_dict()["logit_scale"].shape == () and model.logit_scale.shape == (1,)
    assert msclip.export_official_state_dict(model)["logit_scale"].shape == ()
    assert model(torch.zeros(1, 3, 224, 224), msclip.tokenize(["a"]))[2].shape == ()
    for stored in (torch.tensor(2.5), torch.tensor([2.5])):  # official [], DeepSpeed's fp32 consolidation [1]
        loaded = msclip.load_checkpoint({"msclip_config": vars(model.config),
                                         "state_dict": {**model.state_dict(), "logit_scale": stored}})
        assert loaded.logit_scale.shape == (1,) and loaded.logit_scale.item() == 2.5
    assert 0.9 < model.text.token_embedding.weight.std() < 1.1
    qkv = model.layers[0].shared["attn"].qkv.weight
    bound = math.sqrt(6 / (768 + 3 * 768))                  # xavier-uniform over the packed [3D, D] matrix
    assert 0.99 * bound < qkv.abs().max() <= bound and abs(qkv.std() - bound / math.sqrt(3)) < 1e-3
    assert abs(model.image.positions.std() - 768 ** -0.5) < 0.002
    assert abs(model.layers[0].shared["mlp"].expand.weight.std() - 0.02) < 1e-3


# ---------------------------------------------------------------------------------------------
# Official checkpoints: layout, parity with the official-structure reference, errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[32, 16], ids=["b32", "b16"])
def official(request):
    torch.manual_seed(request.param)
    reference = build_official_msclip_s(patch_size=request.param)
    randomize_batchnorm_stats(reference, seed=request.param)
    return request.param, reference, reference.state_dict()


def test_official_load_matches_reference_and_exports_back(official):
    patch, reference, state_dict = official
    model = msclip.load_checkpoint(state_dict)
    assert not model.training and model.config.patch_size == patch
    assert model.config == msclip.MSCLIPConfig(**msclip.PRESETS[f"msclip-s-b{patch}"])
    exported = msclip.export_official_state_dict(model)
    assert [(k, list(v.shape)) for k, v in exported.items()] == listing(patch)
    assert all(torch.equal(exported[k], state_dict[k]) for k in state_dict)
    images = torch.randn(2, 3, 224, 224)
    tokens = msclip.tokenize(["a photo of a cat.", "a diagram", "", "a very long caption " * 30])
    with torch.no_grad():
        for ours, theirs in [(model.encode_image(images, normalize=False), reference.encode_image(images)),
                             (model.encode_text(tokens, normalize=False), reference.encode_text(tokens))]:
            assert (ours - theirs).abs().max() < 1e-5
        torch.testing.assert_close(model.encode_image(images), F.normalize(reference.encode_image(images), dim=-1),
                                   atol=1e-6, rtol=0)


def test_official_load_errors(official):
    patch, _, state_dict = official
    broken = dict(state_dict)
    key = "transformer.resblocks.3.attn.in_proj_weight"
    broken[key] = broken[key].clone()
    broken[key][0, 0] += 1
    with pytest.raises(ValueError, match="differs from its twin"):
        msclip.load_checkpoint(broken)
    extra = {**state_dict, "visual.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="visual.extra.weight"):
        msclip.load_checkpoint(extra)
    missing = {k: v for k, v in state_dict.items() if k != "ln_final.bias"}
    with pytest.raises(ValueError, match="ln_final.bias"):
        msclip.load_checkpoint(missing)
    wrong_shape = {**state_dict, "visual.transformer.resblocks.0.last_conv.weight": torch.zeros(768, 768, 3, 3)}
    with pytest.raises(ValueError, match="last_conv"):
        msclip.load_checkpoint(wrong_shape)


def test_own_checkpoint_round_trip_and_safety(tmp_path):
    model = msclip.create_model("msclip-s-tiny", fusion_layers=(2, 3, 5, 7, 9))
    path = tmp_path / "model.pt"
    msclip.save_checkpoint(model, path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = msclip.load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # Another architecture's weights: the error names the first key that does not fit.
    other = msclip.create_model("clip-tiny")
    with pytest.raises(ValueError, match="image.stem|image.patch_embed"):
        msclip.load_checkpoint({"msclip_config": {**model.config.__dict__}, "state_dict": other.state_dict()})
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        msclip.load_checkpoint(tmp_path / "list.pt")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foo.weight"):
        msclip.load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"payload": Path("/")}, tmp_path / "pickled.pt")  # arbitrary objects need full unpickling
    with pytest.raises(Exception, match="[Ww]eights only"):
        msclip.load_checkpoint(tmp_path / "pickled.pt")


# ---------------------------------------------------------------------------------------------
# Exact text trimming
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["msclip-s-tiny", "clip-tiny"])
def test_trimmed_text_equals_all_77_positions(name):
    model = msclip.create_model(name).eval()
    tokens = msclip.tokenize(["a cat", "a red circle and a blue square on a grey background", "", "dog " * 100])
    with torch.no_grad():
        trimmed = model.encode_text(tokens, normalize=False)
        full = model.encode_text(tokens, normalize=False, trim=False)
    assert msclip.trim_padding(tokens).shape[1] < 77 or tokens[3, -1] == msclip.EOT
    assert (trimmed - full).abs().max() <= 1e-5
    short = msclip.tokenize(["a cat", "a dog on a mat"])
    assert msclip.trim_padding(short).shape == (2, 7)
    with torch.no_grad():
        assert (model.encode_text(short, normalize=False) - model.encode_text(short, normalize=False, trim=False)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Tokenizer: the official ids
# ---------------------------------------------------------------------------------------------

def test_tokenizer_matches_official_ids():
    cases = json.loads((REFERENCE / "tokenizer_cases.json").read_text(encoding="utf-8"))["cases"]
    assert len(cases) >= 30
    tokenizer = msclip.Tokenizer()
    for case in cases:
        assert [msclip.SOT, *tokenizer.encode(case["text"]), msclip.EOT] == case["ids"], case["text"]


def test_tokenize_padding_truncation_and_decode():
    tokens = msclip.tokenize(["a photo of a cat.", "word " * 100])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407] and tokens[0, 8:].eq(0).all()
    assert tokens[1, 0] == msclip.SOT and tokens[1, -1] == msclip.EOT           # EOT kept last
    official = msclip.tokenize("word " * 100, eot_when_truncated=False)
    assert official[0, -1] != msclip.EOT and official[0, :76].equal(tokens[1, :76])  # official eval: plain cut
    assert msclip.tokenize("hello", context_length=10).shape == (1, 10)
    tokenizer = msclip.default_tokenizer()
    assert tokenizer.decode(tokenizer.encode("A Photo of a CAT!")).strip() == "a photo of a cat !"
    # ftfy and the double unescape run even on ASCII: control characters go, nested entities unfold.
    assert tokenizer.encode("a\x07b") == tokenizer.encode("ab") and tokenizer.encode("&amp;amp;") == tokenizer.encode("&amp;")
    assert tokenizer.encode("&amp;") == tokenizer.encode("&") != tokenizer.encode("amp")


# ---------------------------------------------------------------------------------------------
# Loss: naive re-computation, and across 2 processes
# ---------------------------------------------------------------------------------------------

def naive_clip_loss(image_features, text_features, scale):
    n, total = image_features.shape[0], 0.0
    logits = scale * image_features @ text_features.T
    for i in range(n):
        total = total - torch.log(torch.exp(logits[i, i]) / torch.exp(logits[i]).sum())
        total = total - torch.log(torch.exp(logits[i, i]) / torch.exp(logits[:, i]).sum())
    return total / (2 * n)


def test_loss_matches_naive_computation():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(1.0).exp()
    loss = msclip.ContrastiveLoss()(image, text, scale)
    torch.testing.assert_close(loss, naive_clip_loss(image, text, scale), rtol=1e-6, atol=1e-6)
    assert msclip.ContrastiveLoss()(image, image, torch.tensor(100.0)) < 1e-3  # perfect pairs


DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    import msclip
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = msclip.create_model("msclip-tiny", layers=2)       # no BatchNorm: ranks see the same function
    images = torch.randn(8, 3, 64, 64)
    tokens = msclip.tokenize([f"caption number {i} " * (i + 1) for i in range(8)])
    result = {}
    for local_loss in (False, True):
        model.zero_grad()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        image_features, text_features, scale = model(images[rows], tokens[rows])
        loss = msclip.ContrastiveLoss(gather_with_grad=True, local_loss=local_loss)(image_features, text_features, scale)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        if world > 1:                                  # what DDP / DeepSpeed do: average over ranks
            dist.all_reduce(grads); grads /= world
            loss = loss.detach().clone(); dist.all_reduce(loss); loss /= world
        result[str(local_loss)] = {"loss": loss.item(), "grads": grads.tolist()}
    if rank == 0:
        json.dump(result, open(out, "w"))
    dist.destroy_process_group()
""")


def test_loss_across_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    script = tmp_path / "dist_loss.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    results = {}
    for world in (1, 2):
        port, out = free_port(), tmp_path / f"world{world}.json"
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port), str(out)], env=env)
                 for r in range(world)]
        assert all(p.wait(timeout=180) == 0 for p in procs)
        results[world] = json.loads(out.read_text())
    for local_loss in ("False", "True"):
        one, two = results[1][local_loss], results[2][local_loss]
        assert abs(one["loss"] - two["loss"]) < 1e-6
        assert np.abs(np.array(one["grads"]) - np.array(two["grads"])).max() < 1e-6
        assert np.abs(np.array(one["grads"])).max() > 1e-4  # the comparison is not of zeros


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def test_eval_transform_matches_naive_pipeline():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 250, 3), dtype=np.uint8))  # portrait: w 250, h 300
    out = msclip.ImageTransform(224)(image)
    resized = image.resize((224, int(224 * 300 / 250)), Image.BICUBIC)        # shorter side -> 224
    top = int(round((resized.size[1] - 224) / 2.0))
    crop = np.asarray(resized.crop((0, top, 224, top + 224)), dtype=np.float64) / 255
    naive = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), naive.transpose(2, 0, 1), atol=1e-5)
    grey = Image.fromarray(rng.integers(0, 256, (100, 400), dtype=np.uint8))     # mode L, landscape
    assert msclip.ImageTransform(64).batch([grey, image.convert("RGBA")]).shape == (2, 3, 64, 64)


def test_train_transform_is_a_function_of_the_rng():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    transform = msclip.ImageTransform(64, train=True)
    a, b = transform(image, random.Random(7)), transform(image, random.Random(7))
    c = transform(image, random.Random(8))
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # A crop covers 90-100% of the area: never far from the plain resize.
    for seed in range(20):
        left, top, right, bottom = transform._random_crop_box((160, 120), random.Random(seed))
        assert 0 <= left < right <= 160 and 0 <= top < bottom <= 120
        assert 0.9 * 160 * 120 - 300 <= (right - left) * (bottom - top) <= 160 * 120
    # No crop of 90-100% area fits a 10:1 strip's aspect range: the fallback clamps to 4/3.
    assert transform._random_crop_box((400, 40), random.Random(0)) == (173, 0, 226, 40)


def test_train_crop_resize_matches_pil_within_two_levels():
    """The training crop is cut, then resized by torch's uint8 antialiased bicubic; what torchvision's
    RandomResizedCrop does to a PIL image (OpenCLIP's training transform) is PIL's crop, then PIL's
    bicubic resize. torch's filter is PIL's (a = -0.5, support scaled with the reduction) in another
    fixed-point rounding, and for some crop shapes PIL runs its two passes (one per axis, each
    rounded to 0..255) in the other order: on photo-like content at most 2 levels of 255 apart and
    under 0.2 on average (over 50 dB PSNR). Down- and up-scaling, odd crop sizes, tall and wide
    crops. (On white noise, whose overshoot is clipped between the passes, the order can move a
    pixel by up to 20 levels.)"""
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    for box, size in (((13, 7, 611, 470), 224), ((0, 0, 640, 480), 224), ((31, 40, 150, 139), 224),
                      ((100, 50, 333, 301), 64), ((200, 10, 457, 310), 224), ((5, 5, 405, 305), 224)):
        ours = msclip.ImageTransform(size, train=True).pixels(photo, box=box).astype(int)
        pil = np.asarray(photo.crop(box).resize((size, size), Image.BICUBIC)).astype(int)
        difference = np.abs(ours - pil)
        assert ours.shape == (size, size, 3) and difference.max() <= 2 and difference.mean() < 0.2, (box, difference.mean())


# ---------------------------------------------------------------------------------------------
# Training helpers
# ---------------------------------------------------------------------------------------------

def test_optimizer_groups():
    model = msclip.create_model("msclip-s-tiny")
    optimizer = model.configure_optimizers(lr=1e-4, weight_decay=0.05, lr_shared=2e-4, weight_decay_shared=0.2)
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(names) and len(set(in_groups)) == len(in_groups)  # each exactly once
    assert (groups["shared_decay"]["lr"], groups["shared_decay"]["weight_decay"]) == (2e-4, 0.2)
    assert (groups["shared_no_decay"]["lr"], groups["shared_no_decay"]["weight_decay"]) == (2e-4, 0.0)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    shared_decay = {names[id(p)] for p in groups["shared_decay"]["params"]}
    assert shared_decay == {n for n, p in model.named_parameters() if ".shared." in n and p.ndim == 2}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert {"logit_scale", "text.token_embedding.weight", "text.positions", "image.positions",
            "image.class_token", "image.ln_pre.weight", "image.stem.first.bn.weight"} <= no_decay
    assert all(names[id(p)].endswith("bias") or "ln" in names[id(p)] or "norm" in names[id(p)]
               for p in groups["shared_no_decay"]["params"])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = msclip.create_model("msclip-tiny", layers=3)
    images, tokens = torch.randn(4, 3, 64, 64), msclip.tokenize(["a", "b c", "d e f", "g"])
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        msclip.ContrastiveLoss()(*model(images, tokens)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_batch8_b32_forward_on_cpu():
    model = msclip.create_model("msclip-s-b32").eval()
    with torch.no_grad():
        image_features, text_features, scale = model(torch.randn(8, 3, 224, 224), msclip.tokenize(["a cat"] * 8))
    assert image_features.shape == text_features.shape == (8, 512)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(8))
    assert abs(scale.item() - math.e) < 1e-6
