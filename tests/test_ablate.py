"""ablate.py end to end: two variants x one seed x 3 training steps (two train_ds.py launches).

The table and the JSON must hold the numbers each run produced itself (its result.json, its
metrics.jsonl, its export), the zero-shot figures must equal eval.py's command line on the same
export and the trainer's own last held-out evaluation (one evaluation, one set of renders), and
repeating the command must train and evaluate nothing again."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

import ablate
import bench
import msclip
import train_ds

VARIANTS = ["clip", "msclip-s"]
TRAIN = ["--steps", "3", "--batch_size", "16", "--synthetic_samples", "640", "--eval_every", "2",
         "--eval_samples", "32", "--log_every", "1"]


def argv(out_dir, train=TRAIN, seeds=("1",)):
    return ["--variants", *VARIANTS, "--seeds", *seeds, "--out_dir", str(out_dir), "--eval_samples", "32",
            "--probe_iterations", "50", "--", *train]


def test_reserved_options_are_refused():
    with pytest.raises(SystemExit):
        ablate.parse_args(["--", "--steps", "3", "--seed", "4"])
    with pytest.raises(SystemExit):
        ablate.parse_args(["--", "--train_data", "x.csv"])   # real data without --eval_dataset


def test_sweep_reports_each_runs_own_numbers_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "ablate"
    summary = ablate.main(argv(out))
    first = capsys.readouterr().out
    stored = json.loads((out / "ablation.json").read_text())
    table = (out / "ablation.md").read_text()
    assert list(stored["variants"]) == VARIANTS and first.count("training ") == 2

    for variant in VARIANTS:
        run = out / "runs" / variant / "seed1"
        result = json.loads((run / "result.json").read_text())
        s = stored["variants"][variant]
        assert s["preset"] == f"{variant}-tiny-b16" and s["seeds"] == [1]
        # Every metric: the run's own evaluation, mean of one seed, std 0; the table shows it.
        assert set(s["metrics"]) == {f"{t}/synthetic-{a}" for t in ("zeroshot", "linear-probe") for a in ("shape", "colour")}
        row = next(line for line in table.splitlines() if line.startswith(f"| `{variant}`"))
        for name, value in result["metrics"].items():
            assert s["metrics"][name] == {"mean": value, "std": 0.0, "values": [value]}
            assert f"{value:.1f} ± 0.0" in row
        # Training: train_ds.py's own records, 3 steps at the demo size; the curve is its held-out evaluations.
        steps, evals = train_ds.read_metrics(run)
        assert result["steps"] == s["steps"] == steps[-1]["step"] == 3
        assert result["final_loss"] == steps[-1]["loss"] and s["final_loss"]["values"] == [steps[-1]["loss"]]
        assert f"{steps[-1]['loss']:.2f} ± 0.00" in row
        assert s["curves"]["1"] == result["curve"] == [{"step": e["step"], **e["zero_shot"]} for e in evals]
        assert [p["step"] for p in result["curve"]] == [2, 3]
        # the trainer's held-out evaluation after its last step (32 renders) is ablate's (eval.py's) of the export
        assert set(result["curve"][-1]) == {"step", "synthetic-shape", "synthetic-colour"}
        for name in ("synthetic-shape", "synthetic-colour"):
            assert result["curve"][-1][name] == pytest.approx(result["metrics"][f"zeroshot/{name}"], abs=1e-9)
        # Size and compute of the exported model.
        model = msclip.load_checkpoint(str(run / "msclip.pt"))
        assert (model.config.layers, model.config.patch_size, model.config.image_size) == (7, 16, 64)
        assert s["parameters"] == sum(p.numel() for p in model.parameters())
        assert s["flops_per_pair"] == bench.model_flops(model.config, result["text_tokens"])["total"]
        assert f"{s['parameters'] / 1e6:.2f}M" in row and s["train_s"]["values"] == [result["train_s"]]
        probe = next(r for r in result["reports"] if r["name"] == "synthetic-shape")["linear-probe"]
        assert (probe["n_train"] + probe["n_val"], probe["n_test"]) == (32, 32)
    assert stored["variants"]["clip"]["paper_imagenet_zeroshot"] == 32.2
    try:   # the plot of the curves needs matplotlib; without it there is none
        import matplotlib  # noqa: F401
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not (out / "curves.png").exists()
    assert summary["msclip-s"]["parameters"] < summary["clip"]["parameters"]

    # eval.py's command line on one export gives the same zero-shot figures.
    run = out / "runs" / "msclip-s" / "seed1"
    subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", str(run / "msclip.pt"),
                    "--dataset", "synthetic-shape", "--dataset", "synthetic-colour", "--eval-samples", "32",
                    "--output", str(tmp_path / "eval.json"), "--quiet", "--workers", "0"], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    cli = {d["name"]: d["zeroshot"]["top1"] for d in json.loads((tmp_path / "eval.json").read_text())["datasets"]}
    for name, top1 in cli.items():
        assert stored["variants"]["msclip-s"]["metrics"][f"zeroshot/{name}"]["values"] == [pytest.approx(top1, abs=1e-9)]

    # Again: nothing is trained or evaluated; a run whose evaluation is missing is evaluated only.
    logs = {v: (out / "runs" / v / "seed1" / "train.log").read_text() for v in VARIANTS}
    clip_result = out / "runs" / "clip" / "seed1" / "result.json"
    kept = (out / "runs" / "msclip-s" / "seed1" / "result.json").stat().st_mtime_ns
    before = clip_result.read_text()
    clip_result.unlink()
    again = ablate.main(argv(out))
    second = capsys.readouterr().out
    assert "training " not in second and second.count("done before, kept") == 1
    assert {v: (out / "runs" / v / "seed1" / "train.log").read_text() for v in VARIANTS} == logs
    assert (out / "runs" / "msclip-s" / "seed1" / "result.json").stat().st_mtime_ns == kept
    assert json.loads(clip_result.read_text())["metrics"] == json.loads(before)["metrics"]
    assert again == summary

    # --report_only tabulates the finished runs and trains nothing: seed 2 was never run.
    partial = ablate.main(["--report_only", *argv(out, seeds=("1", "2"))])
    assert "training " not in capsys.readouterr().out and partial == summary
    assert "| `msclip-s` MS-CLIP-S: + both | 1 |" in (out / "ablation.md").read_text()

    # Other training options in the same folder: refused, not mixed into the table.
    with pytest.raises(SystemExit, match="other settings"):
        ablate.main(argv(out, [*TRAIN[:1], "4", *TRAIN[2:]]))
