"""A failing or diverging run stops cleanly and keeps its last good checkpoint (issue 17).

Real processes, each failing training on its own (it must end its process):
- 1 rank (`python train_ds.py`): unreadable WebDataset shards and a CSV whose images are all
  corrupt, both with a DataLoader worker (the error is raised in the loop); a CSV whose images
  are all missing (refused before DeepSpeed starts); a run driven to NaN by a huge learning rate
  at ZeRO-0 (the divergence guard stops it) and at ZeRO-1 (DeepSpeed skips the non-finite steps,
  the BatchNorm statistics turn NaN, the next checkpoint is refused).
- 2 ranks (`deepspeed --num_gpus 2`): two shards of which one is unreadable, so that one rank
  fails in the loop while its peer waits for it in a collective; the all-missing CSV.
Each must exit non-zero within a minute of its first error line, with the message.
One plain-python launch of tests/_train_runs.py: --stop_at, then --resume with a new --lr, --wd,
--steps, recording the learning rates AdamW applied, compared with the schedule re-computed here.
Everything else runs in this process without DeepSpeed.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, free_port, launch, trainer_env, write_shards

import data
import distributed
import eval as evaluation
import msclip
import shapes
import train_ds

TRAIN_DS = os.path.join(ROOT, "train_ds.py")
PROMPT = 60  # seconds from a run's first error line to the end of its last process


def write_image_csv(folder, rows, corrupt):
    """A tab-separated CSV of `rows` image paths with captions: every image corrupt, or none on disk."""
    folder.mkdir(parents=True)
    lines = ["filepath\ttitle"]
    for i in range(rows):
        if corrupt:
            (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        lines.append(f"{i}.png\ta red circle number {i}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "train.csv")


def failing(tmp, name, argv, ranks=1, timeout=300):
    """Run train_ds.py in its own process group (1 rank: python; 2: deepspeed) until it exits, or kill
    the group after `timeout` s. Returns {"rc", "seconds" from the first error line to the exit, "log"}."""
    env, _ = trainer_env(tmp, name)
    command = [sys.executable, TRAIN_DS] if ranks == 1 else \
        [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), TRAIN_DS]
    proc = subprocess.Popen(command + argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, first_error = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if not first_error and ("Error" in line or "error:" in line or "Traceback" in line or "diverged" in line):
                first_error.append(time.time())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "hung"
    ended = time.time()
    reader.join(10)
    log, seconds = "".join(lines), ended - first_error[0] if first_error else None
    (tmp / f"{name}.log").write_text(f"# exit code {rc}, {seconds} s from the first error line to the exit\n{log}")
    return {"rc": rc, "seconds": seconds, "log": log}


def nan_argv(out_dir, stage, *extra):
    """The demo model (BatchNorm in its stem, branch and adapters), 8 pairs a step: the learning rate
    warms up from 1e-4 (step 1) to 2.5e19 (step 2: the weights blow up), so the loss is NaN from
    step 3 on. Checkpoints at step 2 (finite) and 4."""
    return ["--steps", "12", "--batch_size", "8", "--synthetic_samples", "64", "--lr", "1e20", "--warmup_steps", "4",
            "--warmup_start_ratio", "1e-24", "--save_every", "2", "--keep", "1", "--log_every", "1",
            "--eval_every", "-1", "--zero_stage", str(stage), "--workers", "1", "--seed", "0", "--out_dir", out_dir,
            *extra]


RESUME = dict(steps=(10, 12), lr=(1e-3, 3e-3), wd=(0.05, 0.1), warmup=2, stop_at=4)


def resume_argv(out_dir, part):
    r = RESUME
    return ["--preset", "msclip-tiny", "--layers", "2", "--batch_size", "8", "--synthetic_samples", "64",
            "--steps", str(r["steps"][part]), "--lr", str(r["lr"][part]), "--wd", str(r["wd"][part]),
            "--warmup_steps", str(r["warmup"]), "--log_every", "1", "--eval_every", "-1", "--seed", "4",
            "--out_dir", out_dir] + (["--stop_at", str(r["stop_at"])] if part == 0 else ["--resume"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    bad = tmp / "bad_shards"
    bad.mkdir()
    for i in range(2):
        (bad / f"{i:05d}.tar").write_bytes(os.urandom(20000))
    half = tmp / "half_shards"
    write_shards(half, shards=1, per_shard=16)
    (half / "00001.tar").write_bytes(os.urandom(20000))  # the rank that draws it has no readable sample
    missing, corrupt = write_image_csv(tmp / "missing", 40, False), write_image_csv(tmp / "corrupt", 40, True)
    small = ["--preset", "msclip-tiny", "--layers", "2", "--steps", "6", "--batch_size", "4", "--workers", "1",
             "--eval_every", "-1", "--log_every", "1"]
    out = {"tmp": tmp}
    for name, argv, ranks in [
            ("shards", small + ["--train_data", str(bad / "{00000..00001}.tar")], 1),
            ("missing_csv", small + ["--train_data", missing], 1),
            ("corrupt_csv", small + ["--train_data", corrupt], 1),
            ("half_shards_2", small + ["--train_data", str(half / "{00000..00001}.tar")], 2),
            ("missing_csv_2", small + ["--train_data", missing], 2),
            ("nan0", nan_argv(str(tmp / "nan0"), 0, "--max_bad_steps", "2"), 1),
            ("nan1", nan_argv(str(tmp / "nan1"), 1, "--max_bad_steps", "3"), 1)]:
        out[name] = failing(tmp, name, argv + (["--out_dir", str(tmp / name)] if "--out_dir" not in argv else []), ranks)
    out["resume"], out["resume_log"], _ = launch(tmp, "resume", [
        {"name": "part1", "argv": resume_argv(str(tmp / "resume"), 0)},
        {"name": "part2", "argv": resume_argv(str(tmp / "resume"), 1), "record_lrs": True}], 1)
    return out


# ----------------------------------------------------------------------------------------------
# Errors end the job
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, rc, message", [
    ("shards", 1, "no readable sample in epoch 0"),
    ("corrupt_csv", 1, "rows in a row from row"),
    ("missing_csv", 2, "none of the images of its first 40 rows exists"),
    ("half_shards_2", 1, "no readable sample in epoch 0"),
    ("missing_csv_2", 2, "none of the images of its first 40 rows exists")])
def test_errors_end_every_rank_promptly(runs, name, rc, message):
    """The error is printed and every process exits non-zero within a minute (before issue 17 the
    DataLoader worker, which ignores SIGTERM, kept each rank alive forever)."""
    run = runs[name]
    assert run["rc"] != "hung", f"{name} did not exit:\n{run['log'][-3000:]}"
    assert run["rc"] == rc and message in run["log"], run["log"][-3000:]
    assert run["seconds"] is not None and run["seconds"] < PROMPT, run["seconds"]


def test_peer_of_a_failed_rank_fails_too(runs):
    """One rank's shard is unreadable: that rank raises in the loop; the other, waiting for it in a
    collective, raises as well (the closed connection) instead of waiting for the launcher's kill."""
    log = runs["half_shards_2"]["log"]
    assert "[rank0]: Traceback" in log and "[rank1]: Traceback" in log, log[-3000:]


def test_errors_before_deepspeed_have_no_traceback(runs):
    for name in ("missing_csv", "missing_csv_2"):
        assert "Traceback" not in runs[name]["log"] and "check --csv_img_key and the paths" in runs[name]["log"]


# ----------------------------------------------------------------------------------------------
# The divergence guard
# ----------------------------------------------------------------------------------------------

def strict_json_lines(path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in {path}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def all_finite(folder):
    """(every tensor of the checkpoint finite, its weights): consolidated as --export reads it, so
    BatchNorm's running statistics (buffers) are included."""
    _, weights = distributed.consolidated_state_dict(str(folder))
    assert any("running_var" in k for k in weights)
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), weights


@pytest.mark.parametrize("stage", [0, 1])
def test_diverged_run_stops_and_keeps_last_finite_checkpoint(runs, stage):
    run, out_dir = runs[f"nan{stage}"], runs["tmp"] / f"nan{stage}"
    assert run["rc"] == 1, run["log"][-3000:]
    assert run["seconds"] < PROMPT
    root = out_dir / "checkpoints"
    assert distributed.complete_checkpoints(str(out_dir)) == ["step_00000002"]
    assert (root / "latest").read_text() == "step_00000002"
    finite, _ = all_finite(root / "step_00000002")
    assert finite
    assert not (root / "step_00000004").exists()  # never written, not even in part
    records = strict_json_lines(out_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] is None for r in records] == [False, False, True, True]  # NaN written as null
    assert [r["bad_steps"] for r in records] == [0, 0, 1, 1]
    # the schedule follows the trainer's step, also over the steps DeepSpeed skipped at ZeRO-1
    factor = train_ds.lr_lambda(4, 12, 1e-24, 0.1)
    assert [r["lr"] for r in records] == pytest.approx([1e20 * factor(s - 1) for s in (1, 2, 3, 4)], rel=1e-9)
    if stage == 0:  # the guard: --max_bad_steps 2 bad steps in a row, at the log step of step 4
        assert (f"step 4: 2 optimizer steps in a row had a non-finite loss or gradient norm (--max_bad_steps 2): the "
                f"run diverged. The last good checkpoint is {root / 'step_00000002'} (`latest`)") in run["log"]
        assert records[1]["logit_scale"] == 0.0  # the huge step pushed it below 0: clamped at OpenCLIP's bound
    else:  # 2 < 3 bad steps: the checkpoint of step 4 is refused, its BatchNorm statistics being NaN
        assert "step 4: the weights or BatchNorm statistics are not finite (rank 0: " in run["log"]
        assert "running_var" in run["log"]
        assert f"The last finite checkpoint, {root / 'step_00000002'}, stays `latest`" in run["log"]
        assert "OVERFLOW! Skipping step" in run["log"]  # DeepSpeed did skip them


@pytest.mark.parametrize("numel, rank, partition, flagged", [
    (1, 1, [float("nan")], False),        # a 1-element logit scale on 2 ranks: rank 1 holds only padding
    (1, 0, [float("nan")], True),         # rank 0 holds the element itself
    (3, 1, [2.0, float("nan")], False),   # 3 elements on 2 ranks: rank 1 holds element 2 and 1 padding
    (3, 1, [float("inf"), 0.0], True),
])
def test_zero3_partition_padding_is_not_divergence(monkeypatch, numel, rank, partition, flagged):
    """ZeRO-3 splits a parameter of n elements into partitions of ceil(n / ranks) and leaves the
    padding past element n uninitialised (torch.empty): the checkpoint's finiteness check reads only
    the elements a rank owns, else a healthy run is stopped as diverged on whatever that memory holds."""
    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.empty(0))  # ZeRO-3 empties the module's copy
    model.scale.ds_tensor, model.scale.ds_numel, model.scale.ds_process_group = torch.tensor(partition), numel, None
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    assert distributed.nonfinite_tensors(model) == (["scale"] if flagged else [])


@pytest.mark.parametrize("stage, planted", [(0, "image.proj"), (1, "running_var")])
def test_export_refuses_nonfinite_weights(runs, tmp_path, capsys, stage, planted):
    """No checkpoint of this trainer holds NaN; one of an older version (or a damaged one) might:
    a NaN planted in a weight (ZeRO-0) or in BatchNorm statistics (ZeRO-1, stored in the model
    states file) is refused by --export; --export_nonfinite writes it, and eval.py then says so."""
    folder = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(runs["tmp"] / f"nan{stage}" / "checkpoints" / "step_00000002", folder)
    states = folder / "mp_rank_00_model_states.pt"
    content = torch.load(states, map_location="cpu", weights_only=False)
    key = next(k for k in content["module"] if planted in k)
    content["module"][key].view(-1)[0] = float("nan")
    torch.save(content, states)
    with pytest.raises(SystemExit) as refused:
        train_ds.main(["--export", str(tmp_path / "x.pt"), "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "holds NaN or infinity in 1 of" in err and key in err and "--export_nonfinite" in err
    assert not (tmp_path / "x.pt").exists()
    train_ds.main(["--export", str(tmp_path / "x.pt"), "--checkpoint", str(folder), "--export_nonfinite"])
    model = msclip.load_checkpoint(str(tmp_path / "x.pt"))
    assert math.isnan(model.state_dict()[key].view(-1)[0])
    with pytest.raises(evaluation.EvalError, match="hold NaN or infinity: the model's weights or BatchNorm"):
        evaluation.zero_shot_top1(model, [evaluation.open_named_dataset("synthetic-colour", 16, 64)])


# ----------------------------------------------------------------------------------------------
# Resume applies what it prints
# ----------------------------------------------------------------------------------------------

def test_resume_trains_at_the_new_learning_rate_and_weight_decay(runs):
    """--stop_at 4 of a 10-step run at lr 1e-3, wd 0.05; --resume with lr 3e-3, wd 0.1, 12 steps: from
    step 5 on, every group's learning rate is 3e-3 x the new schedule (2 warm-up steps, cosine to 12)
    re-computed here, in the log and as AdamW applies it, and the decaying groups use 0.1."""
    r, part1, part2 = RESUME, runs["resume"]["part1"], runs["resume"]["part2"]
    new = train_ds.lr_lambda(r["warmup"], r["steps"][1], 0.01, 0.1)
    old = train_ds.lr_lambda(r["warmup"], r["steps"][0], 0.01, 0.1)
    assert part1["lrs"] == pytest.approx([r["lr"][0] * old(s - 1) for s in range(1, 5)], rel=1e-12)
    assert part2["steps"] == list(range(1, 13))
    assert part2["lrs"][4:] == pytest.approx([r["lr"][1] * new(s - 1) for s in range(5, 13)], rel=1e-12)
    # [lr, weight decay] of each group per AdamW call after the resume: ZeRO-1 steps each group on its own
    applied = part2["applied_lrs"]
    calls = len(applied) // 8
    assert len(applied) == 8 * calls and calls >= 1
    for step in range(5, 13):
        groups = [g for call in applied[(step - 5) * calls: (step - 4) * calls] for g in call]
        assert [lr for lr, _ in groups] == pytest.approx([r["lr"][1] * new(step - 1)] * len(groups), rel=1e-12)
        assert sorted({wd for _, wd in groups}) == [0.0, r["wd"][1], 0.2]  # no decay, --wd, --wd_shared
    note = next(line for line in runs["resume_log"].splitlines() if line.startswith("--resume: from step 4 on"))
    assert f"learning rate {r['lr'][0] * old(4)!r} -> {r['lr'][1] * new(4)!r}" in note
    assert f"weight decay {r['wd'][0]!r} -> {r['wd'][1]!r} (decay)" in note
    assert "--lr 0.001 -> 0.003" in runs["resume_log"] and "--steps 10 -> 12" in runs["resume_log"]


# ----------------------------------------------------------------------------------------------
# The smaller items, in this process
# ----------------------------------------------------------------------------------------------

def test_stale_universal_folder_is_rebuilt(runs, tmp_path):
    """A universal/ folder without its marker (a conversion cut short by an older version) is
    converted again instead of blocking every later resume on another number of ranks."""
    folder = tmp_path / "step_00000002"
    shutil.copytree(runs["tmp"] / "nan1" / "checkpoints" / "step_00000002", folder)
    stale = folder / "universal"
    (stale / "zero").mkdir(parents=True)
    (stale / "zero" / "leftover.pt").write_bytes(b"half a conversion")
    distributed.convert_to_universal(str(folder), str(stale))
    assert (stale / distributed.MARKER).is_file() and not (stale / "zero" / "leftover.pt").exists()
    assert (stale / "zero" / "logit_scale" / "fp32.pt").is_file()


def test_csv_skips_count_each_bad_row_once_per_epoch(tmp_path):
    """Rows 3-5 unreadable: the rows drawn before them are fine, row 3 is replaced by row 6 and
    counted; rows 4 and 5, met again as replacements, are counted when the epoch draws them."""
    renders = shapes.SyntheticCaptions("train", length=10, seed=1)
    lines = ["filepath\ttitle"]
    for i in range(10):
        if i not in (3, 4, 5):
            renders.render(i)[0].save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png\t{renders.render(i)[1]}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    rows = data.CsvCaptions(str(tmp_path / "train.csv"), image_size=32)
    counted = {}
    for epoch in range(2):
        for index in torch.randperm(10, generator=torch.Generator().manual_seed(epoch)).tolist():
            for reason, where in rows[(epoch, index)][2]:
                counted[where] = counted.get(where, 0) + 1
    assert counted == {str(tmp_path / f"{i}.png"): 2 for i in (3, 4, 5)}
    assert torch.equal(rows[(0, 3)][1], rows[(0, 6)][1])  # replaced by the next readable row


def test_empty_templates_file_is_an_error(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    (tmp_path / "test" / "0.tar").write_bytes(b"")
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("\n")
    with pytest.raises(data.DataError, match="zeroshot_classification_templates.txt is empty"):
        data.open_dataset(str(tmp_path))


def test_dataset_smaller_than_one_global_micro_batch_is_refused(tmp_path, monkeypatch, capsys):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        train_ds.main(["--synthetic_samples", "12", "--batch_size", "8", "--steps", "3", "--out_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "12 samples make no micro-batch of 8 x 2 rank(s)" in capsys.readouterr().err
    assert "deepspeed.comm" not in sys.modules or not torch.distributed.is_initialized()
