"""Mixed precision in train_ds.py: bf16 through DeepSpeed's torch_autocast at ZeRO 0, 1 and 3 on
2 CPU ranks against an fp32 run from the same seed, the logit-scale clamp on the fp32 master copy,
no reads of device values to the host in non-log steps, export of a bf16 run, and the fp16 setup.

One 2-rank DeepSpeed launch covers the trainings (tests/_train_runs.py). The model is MS-CLIP-S
tiny (BatchNorm in the stem, the parallel branch and the adapters: the models DeepSpeed's bf16
engine cannot train), 4 steps of 2 micro-batches of 4 pairs per rank, so that a CPU without bf16
matrix units (bf16 ~100x slower than fp32 there) still runs it in seconds.
"""
import math

import pytest
import torch

from conftest import launch

import msclip
import train_ds

CLAMP = math.log(100)
STEPS, ACCUM, LOG_EVERY = 4, 2, 2
# Functions whose reads of a tensor value are host-side by design: torch's AdamW keeps its step
# count in a CPU tensor (unless capturable/fused) and reads it every step; the trainer trims the
# caption padding on the host before the tokens go to the device; the samplers draw each epoch's
# order with a CPU generator.
HOST_SIDE = {"_get_value", "trim_padding", "epoch_batches", "minimal_pair_batches",
             "agreed"}  # distributed.StopRequests.agreed: a CPU int all-reduced over the gloo control group
# DeepSpeed's own reads in its step: 0.19.8 checks at ZeRO 1-3 that the gradient norm is finite
# (`if` on a device tensor, once per optimizer step; 0.19.7 does not). Not the trainer's to remove.
DEEPSPEED_STEP = {"is_invalid_grad_norm"}


def argv(out_dir, precision, stage):
    """The logit scale starts at 4.7 > ln(100): the clamp acts at the first step."""
    return ["--preset", "msclip-s-tiny", "--precision", precision, "--zero_stage", str(stage), "--steps", str(STEPS),
            "--batch_size", "4", "--grad_accum", str(ACCUM), "--synthetic_samples", "64", "--lr", "2e-4",
            "--warmup_steps", "1", "--logit_scale_init", "4.7", "--grad_clip", "1.0", "--log_every", str(LOG_EVERY),
            "--eval_every", "-1", "--save_every", "0", "--seed", "5",
            "--ds_set", "zero_optimization.stage3_param_persistence_threshold=0", "--out_dir", out_dir]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    specs = [{"name": "fp32_zero1", "argv": argv(str(tmp / "fp32_zero1"), "fp32", 1)}]
    specs += [{"name": f"bf16_zero{s}", "argv": argv(str(tmp / f"bf16_zero{s}"), "bf16", s), "count_host_reads": True}
              for s in (0, 1, 3)]
    results, log, _ = launch(tmp, "precision", specs, 2)
    return tmp, results, log


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_trains_msclip_s_close_to_fp32(runs, stage):
    """bf16 (autocast, fp32 weights) follows the fp32 run from the same seed. Each logged loss is the
    mean of 2 steps' losses, each over the 16 pairs of 2 micro-batches x 2 ranks (3.75 then 3.55: the
    logit scale sits at 100, where a bf16 rounding of the features, 2^-9 relative, moves a logit by up
    to ~0.2). Measured gaps to fp32: 0.008 to 0.027 over ZeRO 0, 1 and 3 (ZeRO 1 and 3 also reduce the
    gradients of linear and convolution weights in bf16). The tolerance, 0.08, is 3x the largest gap
    and under half of what the loss moves between the two logs (0.2): a run that diverges, stalls or
    trains on other data falls outside it."""
    fp32, bf16 = runs[1]["fp32_zero1"], runs[1][f"bf16_zero{stage}"]
    assert bf16["steps"] == fp32["steps"] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert all(math.isfinite(v) for v in bf16["losses"])
    assert bf16["losses"] == pytest.approx(fp32["losses"], abs=0.08)
    assert bf16["losses"] != fp32["losses"]  # autocast did run in bf16
    assert bf16["lrs"] == fp32["lrs"]


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_master_logit_scale_clamped(runs, stage):
    """The logged value is the optimizer's fp32 master (gathered over ranks). It started at 4.7: had
    the clamp missed the master, the next step would start from 4.7 again and the log would show it."""
    run = runs[1][f"bf16_zero{stage}"]
    assert max(run["logit_scales"]) <= CLAMP + 1e-6
    assert run["logit_scales"][0] == pytest.approx(CLAMP, abs=0.01)
    assert run["logit_scales"] == pytest.approx(runs[1]["fp32_zero1"]["logit_scales"], abs=1e-3)


def non_log_reads(counts):
    """Host reads made from the second engine step of step 2 on, other than at a log step (engine
    steps counted in micro-batches). ZeRO-3 records its parameter trace before, once: its first trace,
    of step 1's forwards without gradient (contrastive accumulation), ends at the first backward, and
    the next, of a forward and backward, is checked over the ranks as step 2 starts."""
    out = {}
    for key, n in counts.items():
        done, file, function, method = key.split("|")
        done = int(done)
        at_log = done % ACCUM == 0 and (done // ACCUM) % LOG_EVERY == 0
        if done > ACCUM and not at_log:
            where = f"{file}|{function}|{method}"
            out[where] = out.get(where, 0) + n
    return out


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_no_host_reads_outside_log_steps(runs, stage):
    """Between log steps nothing reads a tensor value back to the host (on a GPU, a wait for the
    device): not the loss, not the logit-scale clamp, nothing else in the trainer or the model
    except the reads of host tensors listed in HOST_SIDE, and nothing in DeepSpeed's step except
    DEEPSPEED_STEP."""
    counts = runs[1][f"bf16_zero{stage}"]["host_reads"]
    reads = non_log_reads(counts)
    assert sum(reads.values()) > 0  # the counter saw the host-side reads: it was in place
    assert {k: n for k, n in reads.items() if k.split("|")[1] not in HOST_SIDE | DEEPSPEED_STEP} == {}
    logged = {k for k in counts if "train_ds.py|train|" in k}
    assert logged  # the loss is read, at the log steps only


def test_bf16_export_is_fp32_and_eval_reads_it(runs):
    """The exported file of a bf16 ZeRO-3 run is an fp32 model with the official [] logit scale,
    holding the master weights; eval.py's zero-shot reads it."""
    import eval as evaluation
    tmp, results = runs[0], runs[1]
    path = tmp / "bf16_zero3" / "msclip.pt"
    stored = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert stored["logit_scale"].shape == ()
    assert all(v.dtype == torch.float32 for k, v in stored.items() if v.is_floating_point())
    model = msclip.load_checkpoint(str(path))
    assert model.config.parallel_branch
    assert model.logit_scale.item() == pytest.approx(results["bf16_zero3"]["logit_scales"][-1], abs=1e-6)
    top1 = evaluation.zero_shot_top1(model, [evaluation.open_named_dataset("synthetic-colour", 32, 64)])
    assert 0.0 <= top1["synthetic-colour"] <= 100.0


def deepspeed_config(argv, world_size=1):
    """The DeepSpeed config train_ds.main would build from argv (nothing started)."""
    parser = train_ds.build_parser()
    args = parser.parse_args(argv)
    train_ds.check_args(parser, args, world_size)
    return args, train_ds.deepspeed_config(parser, args)


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_half_precision_is_autocast_with_fp32_weights(precision, dtype, monkeypatch, capsys, tmp_path):
    """bf16 and fp16 are DeepSpeed's torch_autocast; its bf16/fp16 engines (which cast the parameters
    but not BatchNorm's statistics) stay off, and a ds_config.json that turns one on is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, config = deepspeed_config(["--precision", precision, "--zero_stage", "0", "--out_dir", str(tmp_path)])
    assert config["torch_autocast"] == {"enabled": True, "dtype": dtype}
    assert not config.get("bf16", {}).get("enabled") and not config.get("fp16", {}).get("enabled")
    assert deepspeed_config(["--precision", "fp32"])[1]["torch_autocast"] == {"enabled": False}
    with pytest.raises(SystemExit):
        deepspeed_config(["--precision", precision, "--zero_stage", "0", "--ds_set", f"{precision}.enabled=true"])
    assert f"sets '{precision}', which this trainer sets from --precision" in capsys.readouterr().err


def test_autocast_batchnorm_runs_fp32_statistics():
    """What torch_autocast gives MS-CLIP-S: BatchNorm takes the half-precision convolution output with
    its fp32 weights and statistics (the bf16 engine fails here), LayerNorm computes in fp32, and the
    features match fp32 within bf16's rounding."""
    torch.manual_seed(0)
    model = msclip.create_model("msclip-s-tiny")
    images, tokens = torch.randn(2, 3, 64, 64), msclip.tokenize(["a red circle", "two blue squares"])
    reference = model(images, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(images, tokens)
    bn = model.image.stem.first.bn
    assert bn.running_mean.dtype == bn.weight.dtype == torch.float32
    for a, b in zip(half[:2], reference[:2]):
        assert (a.float() - b).abs().max() < 0.05  # unit vectors: bf16 rounding is ~4e-3 per element
        assert not torch.equal(a.float(), b)
    with pytest.raises(RuntimeError):  # the failure of the engine's design: bf16 weights, fp32 buffers
        model.image.stem.to(torch.bfloat16)
        for m in model.image.stem.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.data, m.running_var.data = m.running_mean.float(), m.running_var.float()
        model.image.stem(images.to(torch.bfloat16))


def test_fp16_on_cpu_refused_with_reason(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_ds.main(["--precision", "fp16", "--out_dir", str(tmp_path)])
    assert "fp16 is for GPUs" in capsys.readouterr().err


def test_fp16_config_on_a_gpu(capsys, monkeypatch, tmp_path):
    """On a GPU (pretended: check_args runs before anything touches CUDA) fp16 is autocast with
    GradScaler at ZeRO-0; at ZeRO 1-3 with clipping it is refused: DeepSpeed 0.19 clips the still
    scaled gradients there (measured on CPU with autocast fp16 and msclip-tiny: the loss stays at
    2.079 for 6 steps where fp32 and fp16 at ZeRO-0 fall to 2.070)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args, config = deepspeed_config(["--precision", "fp16", "--zero_stage", "0", "--out_dir", str(tmp_path)])
    assert args.precision == "fp16" and config["zero_optimization"]["stage"] == 0 and config["gradient_clipping"] == 1.0
    assert config["torch_autocast"] == {"enabled": True, "dtype": "float16"}
    for extra in (["--zero_stage", "1", "--grad_clip", "0"], ["--zero_stage", "3", "--grad_clip", "0"]):
        _, config = deepspeed_config(["--precision", "fp16", *extra])
        assert config["torch_autocast"]["dtype"] == "float16" and config["gradient_clipping"] == 0
    with pytest.raises(SystemExit):
        deepspeed_config(["--precision", "fp16", "--zero_stage", "1"])
    assert "--grad_clip 0" in capsys.readouterr().err
