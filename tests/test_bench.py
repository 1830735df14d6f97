"""bench.py: its FLOP counter against an independent count, its optimised paths against the plain
ones, and a smoke run of every mode on tiny presets. Nothing here asserts a time."""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import msclip

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models need one thread; on a shared 2-core machine two threads spin-wait for each other
    (measured: this file's FLOP tests take 5 s instead of 31 s at load average 5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def counted_flops(fn, *args, **kwargs):
    """torch's own FLOP count; SDPA on the math backend so that QK^T and A·V are visible matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("preset, overrides", [("clip-tiny", {}), ("msclip-tiny", {}), ("msclip-s-tiny", {}),
                                               ("msclip-s-tiny-b16", {}),
                                               ("msclip-s-tiny", {"adapter_depthwise": False})])
def test_flops_match_torch_flop_counter(preset, overrides):
    model = msclip.create_model(preset, **overrides).eval()
    c = model.config
    assert bench.image_flops(c) == counted_flops(model.encode_image, torch.randn(1, 3, c.image_size, c.image_size))
    tokens = msclip.tokenize(["a photo of a cat on a red couch", "a dog"])[:1]   # one caption, padded to 77
    length = int(tokens.argmax()) + 1
    assert bench.text_flops(c, length) == counted_flops(model.encode_text, tokens)
    assert bench.text_flops(c, 77) == counted_flops(model.encode_text, tokens, trim=False)
    assert bench.model_flops(c, length)["total"] == bench.image_flops(c) + bench.text_flops(c, length)


def test_flops_by_hand():
    # one layer, 5 tokens of width 8: q|k|v 2·5·8·24, QK^T and A·V 2·(2·5·5·8), out 2·5·8·8, MLP 2·(2·5·8·32)
    assert bench.layer_flops(5, 8) == 1920 + 800 + 640 + 5120
    # clip-b32 image tower: 7x7 patches of 32x32x3 -> 768, 12 layers at 50 tokens, projection 768 -> 512
    c = msclip.MSCLIPConfig(**msclip.PRESETS["clip-b32"])
    expected = 2 * 49 * 768 * 3 * 32 * 32 + 12 * (24 * 50 * 768 ** 2 + 4 * 50 ** 2 * 768) + 2 * 768 * 512
    assert bench.image_flops(c) == expected
    assert bench.estimate_mfu(1e9, 10, 60e9) == pytest.approx(0.5)
    assert bench.zero_model_state_bytes(100, 0, 2) == 1600
    assert bench.zero_model_state_bytes(100, 3, 2) == 800


def test_fused_adamw_matches_plain():
    torch.manual_seed(0)
    models = [msclip.create_model("msclip-s-tiny")]
    models.append(copy.deepcopy(models[0]))
    optimizers = [bench.make_optimizer(model, fused) for model, fused in zip(models, (False, True))]
    assert [g["weight_decay"] for g in optimizers[0].param_groups] == [g["weight_decay"] for g in optimizers[1].param_groups]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name


def test_channels_last_images_give_the_same_function():
    torch.manual_seed(0)
    model = msclip.create_model("msclip-s-tiny-b16").train()
    plain, fast = bench.make_batch(model.config, 2, torch.device("cpu")), \
        bench.make_batch(model.config, 2, torch.device("cpu"), channels_last=True)
    assert fast[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(plain[0], fast[0])
    outputs, grads = [], []
    for images, _ in (plain, fast):
        model.zero_grad(set_to_none=True)
        out = model.encode_image(images, normalize=False)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for name, grad in grads[0].items():   # the loss is large: compare relative to each gradient's scale
        assert (grad - grads[1][name]).abs().max() <= 1e-5 * grad.abs().max(), name


def test_compare_mode_runs_train_mode_per_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                 # for the two bench.py processes it starts
    out = tmp_path / "compare.json"
    result = bench.main(["--compare", "--presets", "clip-tiny", "msclip-s-tiny", "--batch-size", "4", "--warmup", "0",
                         "--steps", "1", "--json", str(out)])
    assert [r["preset"] for r in result["results"]] == ["clip-tiny", "msclip-s-tiny"]
    assert "msclip-s-tiny / clip-tiny" in capsys.readouterr().out
    for r in json.loads(out.read_text())["results"]:
        config = msclip.MSCLIPConfig(**msclip.PRESETS[r["preset"]])
        assert r["batch_size"] == 4 and len(r["losses"]) == 1 and all(math.isfinite(x) for x in r["losses"])
        assert r["flops_per_pair"] == bench.model_flops(config, r["text_tokens"])
        assert r["peak_memory"] > r["memory_before_model"] > 0 and r["pairs_per_s"] > 0 and r["mfu"] > 0


def test_accumulated_step_is_the_whole_batch_step():
    """What --accum measures is train_ds.contrastive_step, and on a BatchNorm-free model its step over
    4 micro-batches is the step over the whole batch: the same loss and gradients (compared in AdamW's
    first moment, 0.1 x the gradient after one step, since the first update of each weight is about
    lr x the sign of its gradient, which amplifies the rounding of gradients near zero)."""
    args = bench.parse_args(["--preset", "clip-tiny", "--batch-size", "8", "--accum", "4"])
    torch.manual_seed(0)
    model = msclip.create_model("clip-tiny", layers=2)
    trainers = [bench.Trainer(model, args, torch.device("cpu")),
                bench.AccumulatingTrainer(copy.deepcopy(model), args, torch.device("cpu"))]
    images, tokens = bench.host_batch(model.config, 8, torch.device("cpu"))
    losses = [trainers[0].step(data.normalize_images(images), tokens), trainers[1].step(images, tokens)]
    assert losses[1].item() == pytest.approx(losses[0].item(), abs=1e-6)
    moments = [torch.cat([t.optimizer.state[p]["exp_avg"].flatten() for p in t.model.parameters()]) for t in trainers]
    assert (moments[0] - moments[1]).abs().max() <= 1e-4 * moments[0].abs().max()  # rounding: 3e-5 measured


def test_accumulation_mode(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                 # for the two bench.py processes it starts
    result = bench.main(["--mode", "accumulation", "--preset", "clip-tiny", "--batch-size", "8", "--warmup", "0",
                         "--steps", "1"])
    assert [r["batch_size"] for r in result["results"]] == [8, 8]
    assert "4 x 2 pairs" in capsys.readouterr().out


def test_largest_batch_search_is_for_cuda_only():
    with pytest.raises(SystemExit, match="CUDA"):
        bench.main(["--device", "cpu", "--batch-size", "max"])


def test_textlen_mode_losses_identical():
    result = bench.main(["--mode", "textlen", "--preset", "msclip-s-tiny", "--batch-size", "4", "--warmup", "0",
                         "--steps", "2"])
    assert result["text_tokens"] < 77
    assert result["max_loss_diff"] < 1e-5


def test_tokenizer_mode(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red bicycle leaning on a wall\n\nthe eiffel tower at night, paris\n")
    result = bench.main(["--mode", "tokenizer", "--captions", str(captions), "--tokenizer-seconds", "0"])
    assert result["captions"] == 2 and result["steady_captions_per_s"]["median"] > 0
    assert bench.main(["--mode", "tokenizer", "--tokenizer-seconds", "0"])["captions"] == len(bench.CAPTIONS)


def test_zero_mode_two_ranks(tmp_path):
    out = tmp_path / "zero.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--mode", "zero", "--preset", "msclip-s-tiny",
                           "--batch-size", "2", "--warmup", "0", "--steps", "1", "--zero-ranks", "2",
                           "--zero-stages", "3", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["stage"] == 3 and result["world"] == 2 and [r["rank"] for r in result["ranks"]] == [0, 1]
    assert all(r["peak_memory"] > 0 and math.isfinite(r["loss"]) for r in result["ranks"])


def test_data_mode_per_core_figures_and_data_wait():
    """The three kinds of shards with PIL's floor and this pipeline's rate per CPU-second, cores per
    GPU for an H200 at 40% MFU from this preset's FLOPs, and train_ds.py's data wait end to end."""
    result = bench.main(["--mode", "data", "--preset", "msclip-s-tiny", "--data-shards", "1", "--data-per-shard", "64",
                         "--data-rounds", "1", "--batch-size", "4", "--warmup", "1", "--steps", "1"])
    assert [k["kind"] for k in result["kinds"]] == [name for name, *_ in bench.DATA_KINDS]
    for kind in result["kinds"]:
        assert kind["floor_per_cpu_s"] > 0 and kind["msclip_per_cpu_s"] > 0 and kind["openclip_per_cpu_s"] is None
        assert kind["cores_per_gpu"] == pytest.approx(result["target_pairs_per_s"] / kind["msclip_per_cpu_s"] + 1)
    config = msclip.MSCLIPConfig(**msclip.PRESETS["msclip-s-tiny"])
    assert result["target_pairs_per_s"] == pytest.approx(0.4 * 989e12 / (3 * bench.model_flops(config, 17)["total"]))
    assert 0 <= result["data_wait"] <= 1 and result["train_ds_pairs_per_s"] > 0


def test_csv_mode():
    result = bench.main(["--mode", "csv", "--csv-rows", "20000"])
    assert result["rows"] == 20000 and result["seconds"] > 0 and result["retained"] > 0
    assert result["worker_copied"] < result["file_bytes"] / 2  # the rows stay shared with a forked worker
