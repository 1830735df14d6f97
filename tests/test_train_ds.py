"""Tests of train_ds.py with real DeepSpeed on CPU (gloo).

Two trainer launches cover the multi-process checks (each launch runs several trainings inside
the same processes, see tests/_train_runs.py): one plain `python` process (the 1-rank runs and a
plain-PyTorch re-computation), one 2-rank `deepspeed` launch (ZeRO 1, 2, 3 and a ZeRO-3 MS-CLIP-S
run with checkpoint, resume, export and an evaluation split over the ranks). Results are compared with independent references, never
with stored numbers. Everything else runs in this process without initialising DeepSpeed.
"""
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import eval as evaluation  # noqa: E402
import msclip  # noqa: E402
import train_ds  # noqa: E402

HELPER = os.path.join(ROOT, "tests", "_train_runs.py")
CLAMP = math.log(100)

# One optimisation setting, shared by the plain-PyTorch reference and every DeepSpeed run of the
# equality check: BatchNorm-free shared-weight preset, gradient accumulation, clipping that bites,
# warm-up + cosine, and a logit scale starting above ln(100) so that the clamp acts from step 1.
EQUAL = dict(preset="msclip-tiny", layers=3, steps=5, global_micro=16, accum=2, lr=5e-4, lr_shared=3e-4, wd=0.05,
             wd_shared=0.2, warmup=2, warmup_start=0.01, min_lr_ratio=0.1, grad_clip=0.5, logit_scale_init=4.7,
             hard_negatives="4x2", samples=640, seed=3)


def equal_argv(out_dir, ranks, stage):
    e = EQUAL
    return ["--preset", e["preset"], "--layers", str(e["layers"]), "--steps", str(e["steps"]),
            "--batch_size", str(e["global_micro"] // ranks), "--grad_accum", str(e["accum"]), "--lr", str(e["lr"]),
            "--lr_shared", str(e["lr_shared"]), "--wd", str(e["wd"]), "--wd_shared", str(e["wd_shared"]),
            "--warmup_steps", str(e["warmup"]), "--min_lr_ratio", str(e["min_lr_ratio"]),
            "--grad_clip", str(e["grad_clip"]), "--logit_scale_init", str(e["logit_scale_init"]),
            "--hard_negatives", e["hard_negatives"], "--synthetic_samples", str(e["samples"]),
            "--seed", str(e["seed"]), "--zero_stage", str(stage), "--log_every", "1", "--eval_every", "-1",
            "--ds_set", "zero_optimization.stage3_param_persistence_threshold=0",
            "--ds_set", "zero_optimization.stage3_max_reuse_distance=0", "--out_dir", out_dir]


def s_tiny_argv(out_dir, *extra):
    """MS-CLIP-S tiny (12 layers, BatchNorm) on 2 ranks under ZeRO-3, 12 steps over 64 samples (3 epochs)."""
    return ["--preset", "msclip-s-tiny", "--zero_stage", "3", "--steps", "12", "--batch_size", "8",
            "--synthetic_samples", "64", "--lr", "1e-3", "--warmup_steps", "2", "--logit_scale_init", "2.659",
            "--log_every", "1",
            "--eval_every", "0", "--eval_samples", "64", "--save_every", "5", "--seed", "1",
            "--ds_set", "zero_optimization.stage3_param_persistence_threshold=0", "--out_dir", out_dir, *extra]


def small_argv(out_dir, data, *extra):
    """A fast 1-rank setting for the CSV and WebDataset runs."""
    return ["--preset", "msclip-tiny", "--layers", "2", "--train_data", data, "--batch_size", "8", "--lr", "1e-3",
            "--zero_stage", "2", "--log_every", "1", "--eval_every", "-1", "--seed", "2", "--csv_caption_key", "caption",
            "--out_dir", out_dir, *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, name, runs, ranks):
    """Run the helper once (1 process with plain python, or `deepspeed` with `ranks` ranks)."""
    spec, result = tmp / f"{name}.json", tmp / f"{name}_result.json"
    spec.write_text(json.dumps({"result": str(result), "runs": runs}))
    extensions = tmp / f"{name}_torch_extensions"
    extensions.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "3",
           "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if ranks == 1:
        command = [sys.executable, HELPER, str(spec)]
    else:
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                   HELPER, str(spec)]
    proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    return json.loads(result.read_text()), log, extensions


# ----------------------------------------------------------------------------------------------
# Data fixtures: a CSV with bad rows, WebDataset shards
# ----------------------------------------------------------------------------------------------

BAD_ROWS = {5: "missing", 13: "corrupt", 21: "empty_caption", 29: "corrupt", 37: "missing", 45: "empty_caption"}


def write_csv(folder, rows=48):
    renders = data.SyntheticCaptions("train", length=rows, seed=7)
    (folder / "images").mkdir(parents=True)
    lines = ["filepath\tcaption"]
    for i in range(rows):
        image, caption, _, _ = renders.render(i)
        path = f"images/{i:03d}.png"
        reason = BAD_ROWS.get(i)
        if reason == "corrupt":
            (folder / path).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        elif reason != "missing":
            image.save(folder / path)
        lines.append(f"{path}\t{'' if reason == 'empty_caption' else caption}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return folder / "train.csv"


def write_shards(folder, shards=4, per_shard=8, bad=False):
    """img2dataset layout: KEY.jpg / KEY.png + KEY.txt. With bad=True shard 1 holds a corrupt image,
    a sample without caption and an empty caption, and a truncated shard follows."""
    renders = data.SyntheticCaptions("train", length=shards * per_shard, seed=8)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                image, caption, _, _ = renders.render(i)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG" if i % 2 else "PNG")
                files = {f"{i:09d}.{'jpg' if i % 2 else 'png'}": buffer.getvalue(), f"{i:09d}.txt": caption.encode()}
                if bad and s == 1 and j == 2:
                    files[f"{i:09d}.jpg" if i % 2 else f"{i:09d}.png"] = b"garbage"
                if bad and s == 1 and j == 4:
                    del files[f"{i:09d}.txt"]
                if bad and s == 1 and j == 6:
                    files[f"{i:09d}.txt"] = b"  "
                for name, payload in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    if bad:
        whole = (folder / "00000.tar").read_bytes()
        with tarfile.open(folder / "00000.tar") as tar:
            member = tar.getmembers()[6]  # cut the shard inside the 4th sample's image bytes
        (folder / f"{shards:05d}.tar").write_bytes(whole[: member.offset_data + member.size // 2])
    return str(folder / ("{00000..%05d}.tar" % (shards - 1 + bad)))


# ----------------------------------------------------------------------------------------------
# The two launches
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_rank")
    csv = str(write_csv(tmp / "csv"))
    shards = write_shards(tmp / "shards")
    ref = {k: EQUAL[k] for k in ("preset", "steps", "global_micro", "accum", "lr", "lr_shared", "wd", "wd_shared",
                                 "warmup", "warmup_start", "min_lr_ratio", "grad_clip", "logit_scale_init",
                                 "hard_negatives", "samples", "seed")}
    ref["overrides"] = {"layers": EQUAL["layers"]}
    csv_steps = ["--steps", "12"]  # 48 rows / 8 = 6 steps per epoch: two epochs
    wds_steps = ["--steps", "8", "--workers", "1"]  # 4 shards x 8 = 4 steps per pass
    runs = [{"name": "reference", "reference": ref},
            {"name": "stage0", "argv": equal_argv(str(tmp / "stage0"), 1, 0)},
            {"name": "csv_full", "argv": small_argv(str(tmp / "csv_full"), csv, *csv_steps, "--save_every", "4",
                                                    "--eval_every", "0", "--eval_samples", "64",
                                                    "--eval_dataset", "synthetic-colour")},
            {"name": "csv_part1", "argv": small_argv(str(tmp / "csv_part"), csv, *csv_steps, "--stop_at", "5")},
            {"name": "csv_part2", "argv": small_argv(str(tmp / "csv_part"), csv, *csv_steps, "--resume")},
            {"name": "wds_full", "argv": small_argv(str(tmp / "wds_full"), shards, *wds_steps)},
            {"name": "wds_part1", "argv": small_argv(str(tmp / "wds_part"), shards, *wds_steps, "--stop_at", "3")},
            {"name": "wds_part2", "argv": small_argv(str(tmp / "wds_part"), shards, *wds_steps, "--resume")}]
    results, log, extensions = launch(tmp, "one_rank", runs, 1)
    return tmp, results, log, extensions


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    runs = [{"name": f"stage{s}", "argv": equal_argv(str(tmp / f"stage{s}"), 2, s)} for s in (1, 2, 3)]
    runs += [{"name": "s_full", "argv": s_tiny_argv(str(tmp / "s_full"), "--eval_dataset", "synthetic-colour",
                                                    "--eval_every", "6"), "record_evaluation": True},
             {"name": "s_part1", "argv": s_tiny_argv(str(tmp / "s_part"), "--stop_at", "5", "--eval_every", "-1")},
             {"name": "s_part2", "argv": s_tiny_argv(str(tmp / "s_part"), "--resume")}]
    results, log, extensions = launch(tmp, "two_ranks", runs, 2)
    return tmp, results, log, extensions


def state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    a, b = state_dict(a), state_dict(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------------------
# Multi-process checks
# ----------------------------------------------------------------------------------------------

def test_reference_exercises_clipping_and_clamp(one_rank):
    ref = one_rank[1]["reference"]
    assert max(ref["grad_norms"]) > EQUAL["grad_clip"], "the gradient clipping never acted: the check would be blind"
    assert ref["logit_scales"][0] == pytest.approx(CLAMP, abs=1e-6), "the logit-scale clamp did not act"


def test_one_rank_deepspeed_matches_plain_pytorch(one_rank):
    results = one_rank[1]
    ref, ds = results["reference"], results["stage0"]
    assert ds["steps"] == list(range(1, EQUAL["steps"] + 1))
    assert ds["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert ds["logit_scales"] == pytest.approx(ref["logit_scales"], abs=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(one_rank, two_ranks, stage):
    """2 ranks x 8 pairs (features gathered with gradient) == 1 process holding the 16 pairs."""
    ref = one_rank[1]["reference"]
    run = two_ranks[1][f"stage{stage}"]
    assert len(run["losses"]) == EQUAL["steps"]
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert run["logit_scales"] == pytest.approx(ref["logit_scales"], abs=1e-5)
    assert run["losses"][-1] != pytest.approx(run["losses"][0], abs=1e-3), "the model did not move"


def test_zero3_msclip_s_loss_falls(two_ranks):
    losses = two_ranks[1]["s_full"]["losses"]
    assert len(losses) == 12
    last = sum(losses[-4:]) / 4
    assert last < sum(losses[:4]) / 4 - 0.3 and last < math.log(16) - 0.3, losses  # well below chance, ln(16)


def test_zero3_resume_is_exact(two_ranks):
    tmp, results = two_ranks[0], two_ranks[1]
    full, part1, part2 = results["s_full"], results["s_part1"], results["s_part2"]
    assert part1["steps"] == list(range(1, 6)) and part2["steps"] == list(range(1, 13))  # metrics.jsonl appends
    assert part2["losses"][5:] == full["losses"][5:]  # bit-identical continuation
    assert_same_weights(tmp / "s_full" / "msclip.pt", tmp / "s_part" / "msclip.pt")
    # rank 1's own BatchNorm statistics (ZeRO-3 saves each rank's) are the same although only s_full
    # evaluated at step 6 with rank 0's: the evaluation gave them back
    statistics = {}
    for run in ("s_full", "s_part"):
        for rank in (0, 1):
            path = tmp / run / "checkpoints" / "step_00000012" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            with train_ds.weights_only_loading():
                module = torch.load(path, map_location="cpu")["module"]
            statistics[run, rank] = torch.cat([v.flatten() for k, v in module.items() if "running_" in k])
    assert torch.equal(statistics["s_full", 1], statistics["s_part", 1])
    assert not torch.equal(statistics["s_full", 1], statistics["s_full", 0])  # else the check above is blind


def test_zero3_export_loads_and_matches_training_eval(two_ranks):
    """The consolidated fp32 file loads with msclip.load_checkpoint and scores the held-out split
    exactly as the gathered ZeRO-3 model did inside the run."""
    tmp, results = two_ranks[0], two_ranks[1]
    model = msclip.load_checkpoint(str(tmp / "s_full" / "msclip.pt"))
    assert model.config.parallel_branch and model.config.layers == 12
    assert model.logit_scale.item() == pytest.approx(results["s_full"]["logit_scales"][-1], abs=1e-6)
    accuracy = evaluation.zero_shot_heldout(model, 64, seed=1, samples=64)
    assert {k: results["s_full"]["zero_shot"][k] for k in accuracy} == accuracy
    # --export from the checkpoint folder, in this process (no distributed setup), gives the same file
    again = tmp / "again.pt"
    train_ds.main(["--out_dir", str(tmp / "s_full"), "--export", str(again)])
    assert_same_weights(again, tmp / "s_full" / "msclip.pt")
    # the ZeRO-3 shards hold the model each rank trained: checkpoints kept = --keep (2)
    assert len(train_ds.complete_checkpoints(str(tmp / "s_full"))) == 2


def test_evaluation_is_split_over_ranks(two_ranks):
    """The evaluations of the 2-rank ZeRO-3 MS-CLIP-S run (at step 6 and after step 12): each rank
    encoded one half of the held-out renders and of --eval_dataset's images and prompts; at the end
    with the weights (BatchNorm's running statistics included) of the exported file, and the gathered
    result is eval.py's on that file."""
    tmp, results = two_ranks[0], two_ranks[1]
    model = msclip.load_checkpoint(str(tmp / "s_full" / "msclip.pt"))
    heldout = data.SyntheticImages(data.SyntheticCaptions("heldout", length=64, seed=1), "shape",
                                   msclip.ImageTransform(64))
    colour = evaluation.apply_prompts(evaluation.open_dataset("synthetic-colour", None, 64, 64))
    _, colour_images, _ = evaluation.split_images(colour, "test", msclip.ImageTransform(64))
    encodes = results["s_full"]["evaluation_encodes"]
    for rank, records in enumerate(encodes):
        images = [torch.tensor(features) for kind, features in records if kind == "image"]
        assert [len(f) for f in images] == [32] * 4, f"rank {rank} did not encode its half of each image set"
        with torch.no_grad():
            for features, dataset in zip(images[2:], (heldout, colour_images)):
                own = torch.stack([dataset[i][0] for i in range(32 * rank, 32 * rank + 32)])
                torch.testing.assert_close(features, model.encode_image(own, normalize=False), atol=2e-5, rtol=1e-4)
    colour_prompts = len(colour.classnames) * len(colour.templates)
    heldout_prompts = sum(len(names) * len(templates) for names, templates in data.heldout_prompts().values())
    texts = [sum(n for kind, n in records if kind == "text") for records in encodes]
    assert texts == [2 * (heldout_prompts + colour_prompts // 2)] * 2  # held-out's few prompts: on every rank
    metrics = evaluation.run_zeroshot(model, "exported", colour, evaluation.Settings(tasks=["zeroshot"], quiet=True),
                                      {"splits": {}})
    assert results["s_full"]["zero_shot"]["synthetic-colour"] == pytest.approx(metrics["top1"], abs=1e-9)


def test_csv_resume_is_exact_and_bad_rows_counted(one_rank):
    tmp, results = one_rank[0], one_rank[1]
    full, part2 = results["csv_full"], results["csv_part2"]
    assert part2["losses"][5:] == full["losses"][5:]
    assert_same_weights(tmp / "csv_full" / "msclip.pt", tmp / "csv_part" / "msclip.pt")
    # two epochs over 48 rows: every bad row was met twice, replaced by the next row, and counted
    expected = {reason: 2 * list(BAD_ROWS.values()).count(reason) for reason in ("missing", "corrupt", "empty_caption")}
    assert full["skipped"] == expected
    assert part2["skipped"] == expected  # the count survives the resume
    assert "skipped so far" in one_rank[2]


def test_eval_py_dataset_during_training(one_rank):
    """--eval_dataset runs eval.py's zero-shot on the model in training: the same figure eval.py gives
    for the exported file, next to the built-in held-out accuracies."""
    result = one_rank[1]["csv_full"]["zero_shot"]
    assert set(result) == {"shape", "colour", "synthetic-colour"}
    model = msclip.load_checkpoint(str(one_rank[0] / "csv_full" / "msclip.pt"))
    dataset = evaluation.apply_prompts(evaluation.open_dataset("synthetic-colour", None, 64, 64))
    metrics = evaluation.run_zeroshot(model, "exported", dataset, evaluation.Settings(tasks=["zeroshot"], quiet=True),
                                      {"splits": {}})
    assert result["synthetic-colour"] == pytest.approx(metrics["top1"], abs=1e-9)


def test_webdataset_resume_is_exact(one_rank):
    """Stopped after 3 steps, inside the shuffle buffer's group of shards: the resumed stream re-reads
    the group, skips what was consumed, and the result is bit-identical to the uninterrupted run."""
    tmp, results = one_rank[0], one_rank[1]
    assert results["wds_part2"]["losses"][3:] == results["wds_full"]["losses"][3:]
    assert_same_weights(tmp / "wds_full" / "msclip.pt", tmp / "wds_part" / "msclip.pt")


def test_no_cpp_op_compiled(one_rank, two_ranks):
    """The first run on a fresh machine must not sit compiling C++ ops training does not use."""
    for launch_result in (one_rank, two_ranks):
        extensions = launch_result[3]
        assert not any(extensions.iterdir()), list(extensions.iterdir())
        assert "Building extension" not in launch_result[2] and "ninja" not in launch_result[2]


def test_stage0_export_loads(one_rank):
    model = msclip.load_checkpoint(str(one_rank[0] / "stage0" / "msclip.pt"))
    assert model.config.layers == EQUAL["layers"] and not model.config.parallel_branch
    assert model.logit_scale.item() == pytest.approx(one_rank[1]["stage0"]["logit_scales"][-1], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# In-process checks (no DeepSpeed initialisation)
# ----------------------------------------------------------------------------------------------

def test_import_does_not_load_deepspeed():
    code = "import sys, train_ds; assert 'deepspeed' not in sys.modules, 'imported deepspeed'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.parametrize("argv, message", [
    (["--preset", "msclip-huge"], "unknown"),
    (["--batch_size", "6", "--global_batch_size", "100"], "not a multiple"),
    (["--train_data", "/nonexistent/train.csv"], "no such file"),
    (["--train_data", "/nonexistent/{00000..00003}.tar"], "shards not found"),
    (["--train_data", "/nonexistent/*.tar"], "matches no file"),
    (["--precision", "fp16"], "fp16"),
    (["--batch_size", "16", "--hard_negatives", "3x2"], "hard_negatives"),
    (["--batch_size", "12", "--hard_negatives", "4x2"], "hard_negatives"),
    (["--preset", "msclip-s-tiny", "--layers", "4"], "fusion_layers"),
    (["--deepspeed_config", "/nonexistent.json"], "deepspeed_config"),
])
def test_bad_options_rejected_before_deepspeed(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exit_info:
        train_ds.main(argv + ["--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert "deepspeed.comm" not in sys.modules or not __import__("torch").distributed.is_initialized()


def test_batch_must_divide_over_ranks(capsys, monkeypatch, tmp_path):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "3"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit):
        train_ds.main(["--global_batch_size", "64", "--batch_size", "16", "--out_dir", str(tmp_path)])
    assert "3 ranks" in capsys.readouterr().err


def test_existing_checkpoints_need_resume(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    folder = tmp_path / "checkpoints" / "step_00000010"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(SystemExit):
        train_ds.main(["--out_dir", str(tmp_path)])
    assert "--resume" in capsys.readouterr().err


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for tag, complete in (("step_00000010", True), ("step_00000020", True), ("step_00000030", False)):
        (root / tag).mkdir(parents=True)
        if complete:
            (root / tag / "trainer_state.json").write_text("{}")
    (root / "latest").write_text("step_00000030")  # e.g. a hand-edited pointer to a half-written save
    assert train_ds.latest_checkpoint(str(tmp_path)) == "step_00000020"
    (root / "latest").write_text("step_00000010")
    assert train_ds.latest_checkpoint(str(tmp_path)) == "step_00000010"


def test_lr_schedule():
    f = train_ds.lr_lambda(10, 110, 0.01, 0.1)
    assert f(0) == pytest.approx(0.01) and f(5) == pytest.approx(0.505) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
