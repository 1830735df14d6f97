"""Tests of train_ds.py with real DeepSpeed on CPU (gloo).

Two trainer launches cover the multi-process checks (each launch runs several trainings inside
the same processes, see tests/_train_runs.py): one plain `python` process (the 1-rank runs and a
plain-PyTorch re-computation), one 2-rank `deepspeed` launch (ZeRO 1, 2, 3 and a ZeRO-3 MS-CLIP-S
run with checkpoint, resume, export and an evaluation split over the ranks). Results are compared with independent references, never
with stored numbers. Everything else runs in this process without initialising DeepSpeed.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import BAD_ROWS, EQUAL, reference_spec, ROOT, assert_same_weights, equal_argv, launch, write_csv, write_shards

import distributed
import eval as evaluation
import msclip
import train_ds

CLAMP = math.log(100)


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


# ----------------------------------------------------------------------------------------------
# The two launches
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_rank")
    csv = str(write_csv(tmp / "csv"))
    shards = write_shards(tmp / "shards", bad=True)
    csv_steps = ["--steps", "12"]  # 48 rows / 8 = 6 steps per epoch: two epochs
    wds_steps = ["--steps", "8", "--workers", "1"]  # 32 good samples in 5 shards = 4 steps per pass
    resampled = ["--steps", "8", "--workers", "1", "--dataset_resampled", "--train_samples", "20"]
    runs = [{"name": "reference", "reference": reference_spec()},
            {"name": "stage0", "argv": equal_argv(str(tmp / "stage0"), 1, 0)},
            {"name": "csv_full", "argv": small_argv(str(tmp / "csv_full"), csv, *csv_steps, "--save_every", "4",
                                                    "--eval_every", "0", "--eval_samples", "64",
                                                    "--eval_dataset", "synthetic-colour")},
            {"name": "csv_part1", "argv": small_argv(str(tmp / "csv_part"), csv, *csv_steps, "--stop_at", "5")},
            {"name": "csv_part2", "argv": small_argv(str(tmp / "csv_part"), csv, *csv_steps, "--resume")},
            {"name": "wds_full", "argv": small_argv(str(tmp / "wds_full"), shards, *wds_steps)},
            {"name": "wds_part1", "argv": small_argv(str(tmp / "wds_part"), shards, *wds_steps, "--stop_at", "3")},
            {"name": "wds_part2", "argv": small_argv(str(tmp / "wds_part"), shards, *wds_steps, "--resume")},
            {"name": "wdsr_full", "argv": small_argv(str(tmp / "wdsr_full"), shards, *resampled)},
            {"name": "wdsr_part1", "argv": small_argv(str(tmp / "wdsr_part"), shards, *resampled, "--stop_at", "3")},
            {"name": "wdsr_part2", "argv": small_argv(str(tmp / "wdsr_part"), shards, *resampled, "--resume")}]
    results, log, extensions = launch(tmp, "one_rank", runs, 1)
    return tmp, results, log, extensions


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    runs = [{"name": f"stage{s}", "argv": equal_argv(str(tmp / f"stage{s}"), 2, s)} for s in (1, 2, 3)]
    runs += [{"name": "s_full", "argv": s_tiny_argv(str(tmp / "s_full"), "--eval_every", "6"),
              "record_evaluation": True},
             {"name": "s_part1", "argv": s_tiny_argv(str(tmp / "s_part"), "--stop_at", "5", "--eval_every", "-1")},
             {"name": "s_part2", "argv": s_tiny_argv(str(tmp / "s_part"), "--resume")}]
    results, log, extensions = launch(tmp, "two_ranks", runs, 2)
    return tmp, results, log, extensions


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
    # the data manifest sums both ranks' batches, across the resume too
    assert manifest(tmp / "s_part") == manifest(tmp / "s_full") == {
        "samples": 12 * 16, "sources": {"built-in data": 12 * 16}, "skipped": {}}
    assert_same_weights(tmp / "s_full" / "msclip.pt", tmp / "s_part" / "msclip.pt")
    # rank 1's own BatchNorm statistics (ZeRO-3 saves each rank's) are the same although only s_full
    # evaluated at step 6 with rank 0's: the evaluation gave them back
    statistics = {}
    for run in ("s_full", "s_part"):
        for rank in (0, 1):
            path = tmp / run / "checkpoints" / "step_00000012" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            with distributed.weights_only_loading():
                module = torch.load(path, map_location="cpu")["module"]
            statistics[run, rank] = torch.cat([v.flatten() for k, v in module.items() if "running_" in k])
    assert torch.equal(statistics["s_full", 1], statistics["s_part", 1])
    assert not torch.equal(statistics["s_full", 1], statistics["s_full", 0])  # else the check above is blind


def held_out_sets(samples=64, image_size=64):
    return [evaluation.open_named_dataset(name, samples, image_size) for name in ("synthetic-shape", "synthetic-colour")]


def test_zero3_export_loads_and_matches_training_eval(two_ranks):
    """The consolidated fp32 file loads with msclip.load_checkpoint and scores the held-out sets
    exactly as the gathered ZeRO-3 model did inside the run (2 ranks, each encoding half)."""
    tmp, results = two_ranks[0], two_ranks[1]
    model = msclip.load_checkpoint(str(tmp / "s_full" / "msclip.pt"))
    assert model.config.parallel_branch and model.config.layers == 12
    assert model.logit_scale.item() == pytest.approx(results["s_full"]["logit_scales"][-1], abs=1e-6)
    accuracy = evaluation.zero_shot_top1(model, held_out_sets())
    assert set(accuracy) == {"synthetic-shape", "synthetic-colour"}
    assert results["s_full"]["zero_shot"] == pytest.approx(accuracy, abs=1e-9)
    assert [e["zero_shot"] for e in results["s_full"]["evals"]][-1] == results["s_full"]["zero_shot"]
    # --export from the checkpoint folder, in this process (no distributed setup), gives the same file
    again = tmp / "again.pt"
    train_ds.main(["--out_dir", str(tmp / "s_full"), "--export", str(again)])
    assert_same_weights(again, tmp / "s_full" / "msclip.pt")
    # the ZeRO-3 shards hold the model each rank trained: checkpoints kept = --keep (2)
    assert len(distributed.complete_checkpoints(str(tmp / "s_full"))) == 2


def test_evaluation_is_split_over_ranks(two_ranks):
    """The evaluations of the 2-rank ZeRO-3 MS-CLIP-S run (at step 6 and after step 12): each rank
    encoded one half of each held-out set's renders and of its prompts; at the end with the weights
    (BatchNorm's running statistics included) of the exported file."""
    tmp, results = two_ranks[0], two_ranks[1]
    model = msclip.load_checkpoint(str(tmp / "s_full" / "msclip.pt"))
    datasets = held_out_sets()
    renders = [dataset.images("test", msclip.ImageTransform(64))[1] for dataset in datasets]
    encodes = results["s_full"]["evaluation_encodes"]
    for rank, records in enumerate(encodes):
        images = [torch.tensor(features) for kind, features in records if kind == "image"]
        assert [len(f) for f in images] == [32] * 4, f"rank {rank} did not encode its half of each image set"
        with torch.no_grad():
            for features, dataset in zip(images[2:], renders):
                own = torch.stack([dataset[i][0] for i in range(32 * rank, 32 * rank + 32)])
                torch.testing.assert_close(features, model.encode_image(own, normalize=False), atol=2e-5, rtol=1e-4)
    prompts = sum(len(d.classnames) * len(d.templates) for d in datasets)
    texts = [sum(n for kind, n in records if kind == "text") for records in encodes]
    assert sum(texts) == 2 * prompts and abs(texts[0] - texts[1]) <= 4  # two evaluations, the prompts halved


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


def test_eval_dataset_during_training(one_rank):
    """On real data the trainer evaluates only --eval_dataset, with eval.py's zero-shot: the same
    figure (%) eval.py gives for the exported file."""
    result = one_rank[1]["csv_full"]["zero_shot"]
    assert set(result) == {"synthetic-colour"}
    model = msclip.load_checkpoint(str(one_rank[0] / "csv_full" / "msclip.pt"))
    expected = evaluation.zero_shot_top1(model, [evaluation.open_named_dataset("synthetic-colour", 64, 64)])
    assert result["synthetic-colour"] == pytest.approx(expected["synthetic-colour"], abs=1e-9)


@pytest.mark.parametrize("run", ["wds", "wdsr"])
def test_webdataset_resume_is_exact(one_rank, run):
    """Stopped after 3 steps, inside the shuffle buffer's group of shards: the resumed stream re-reads
    the group, skips what was consumed, and the result is bit-identical to the uninterrupted run;
    shards read once per epoch (wds) or resampled with epochs of 20 samples (wdsr)."""
    tmp, results = one_rank[0], one_rank[1]
    assert results[f"{run}_part2"]["losses"][3:] == results[f"{run}_full"]["losses"][3:]
    assert_same_weights(tmp / f"{run}_full" / "msclip.pt", tmp / f"{run}_part" / "msclip.pt")
    assert all(0 <= w <= 1 for w in results[f"{run}_full"]["data_waits"])


def manifest(out_dir, step=None):
    root = distributed.checkpoint_root(str(out_dir))
    tag = f"step_{step:08d}" if step else distributed.latest_checkpoint(str(out_dir))
    with open(os.path.join(root, tag, "data_manifest.json")) as f:
        return json.load(f)


def test_data_manifest(one_rank):
    """Each checkpoint's data_manifest.json: the samples trained on add up to steps x batch, per shard
    at most the shard's readable samples per pass; the skipped samples are the fixtures' bad ones
    with their reasons; a resumed run's manifest is the uninterrupted run's."""
    tmp = one_rank[0]
    wds = manifest(tmp / "wds_full")
    assert wds["samples"] == sum(wds["sources"].values()) == 8 * 8
    assert manifest(tmp / "wds_part", 3)["samples"] == 3 * 8
    readable = {"00000.tar": 8, "00001.tar": 5, "00002.tar": 8, "00003.tar": 8, "00004.tar": 3}  # conftest.write_shards
    assert {os.path.basename(s): n for s, n in wds["sources"].items()} == {s: 2 * n for s, n in readable.items()}
    found = {(reason, os.path.basename(where)) for reason, seen in wds["skipped"].items() for where in seen}
    assert found == {("corrupt", "00001.tar:000000010"), ("missing", "00001.tar:000000012"),
                     ("empty_caption", "00001.tar:000000014"), ("corrupt", "00004.tar:(unreadable)")}
    # met twice, once per pass, but a skip is reported with the next readable sample, which may come after step 8
    assert all(n in (1, 2) for seen in wds["skipped"].values() for n in seen.values())
    csv = manifest(tmp / "csv_full")
    assert csv["samples"] == 12 * 8 and list(csv["sources"].values()) == [12 * 8]
    assert {reason: sorted(seen.items()) for reason, seen in csv["skipped"].items()} == {
        reason: sorted((str(tmp / "csv" / "images" / f"{row:03d}.png"), 2) for row, r in BAD_ROWS.items() if r == reason)
        for reason in set(BAD_ROWS.values())}
    for run in ("wds", "csv", "wdsr"):
        assert manifest(tmp / f"{run}_part") == manifest(tmp / f"{run}_full"), run
    assert manifest(tmp / "wdsr_full")["samples"] == 8 * 8


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
    (["--train_data", "pipe:cat /nonexistent/{0..3}.tar", "--dataset_resampled", "--steps", "5"], "--train_samples"),
    (["--dataset_resampled"], "for WebDataset"),
    (["--precision", "fp16"], "fp16"),
    (["--batch_size", "16", "--hard_negatives", "3x2"], "hard_negatives"),
    (["--batch_size", "12", "--hard_negatives", "4x2"], "hard_negatives"),
    (["--preset", "msclip-s-tiny", "--layers", "4"], "fusion_layers"),
    (["--deepspeed_config", "/nonexistent.json"], "deepspeed_config"),
    (["--ds_set", "optimizer.params.lr=0.1"], "--lr"),  # DeepSpeed would not build this trainer's optimizer
    (["--ds_set", "zero_optimization.stage=3"], "--zero_stage"),
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
    assert distributed.latest_checkpoint(str(tmp_path)) == "step_00000020"
    (root / "latest").write_text("step_00000010")
    assert distributed.latest_checkpoint(str(tmp_path)) == "step_00000010"


def test_lr_schedule():
    f = train_ds.lr_lambda(10, 110, 0.01, 0.1)
    assert f(0) == pytest.approx(0.01) and f(5) == pytest.approx(0.505) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
