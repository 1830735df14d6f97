"""Run the paper's comparisons and ablations: train every variant the same way with train_ds.py,
evaluate every export the same way with eval.py's functions, and write one table.

The micro-scale sweep on one CPU (built-in shapes data, the demo's model size: 64 px, patch 16,
7 layers, width 128), 8 variants x 3 seeds; everything after `--` goes to every train_ds.py run:

    python ablate.py --out_dir runs/ablate -- --steps 200
    python ablate.py --variants clip msclip msclip-s --seeds 0 1 --out_dir runs/small -- --steps 100

On a cluster, B/32 (or b16) on real data, each run launched by DeepSpeed, evaluated on ImageNet:

    python ablate.py --size b32 --launcher "deepspeed --num_gpus 8" --seeds 0 \\
        --eval_dataset ImageNet=/data/imagenet --out_dir runs/ablate-b32 -- \\
        --train_data "shards/{00000..01023}.tar" --train_samples 10000000 --epochs 32 --batch_size 256

Every (variant, seed) run gets the same train_ds.py options, so for one seed all variants see the
same data in the same order under the same schedule (the seed also draws the initial weights).
Runs live in OUT_DIR/runs/VARIANT/seedN (train_ds.py's --out_dir, with its log in train.log); a
run that finished is not redone when the command is repeated, and an interrupted one continues
from its last checkpoint (train_ds.py --resume). Results: OUT_DIR/ablation.md (Markdown table),
OUT_DIR/ablation.json (every number, per seed and mean ± standard deviation over seeds, with the
zero-shot curves train_ds.py logged in each run's metrics.jsonl) and, when matplotlib is installed,
OUT_DIR/curves.png (zero-shot top-1 against step, one panel per evaluation dataset).

Variants (presets "<variant>-<size>" in msclip.PRESETS): clip (separate towers), msclip
(attention + FFN shared), msclip-es / msclip-pb (MS-CLIP + Early Specialization / + Parallel
Branch only), msclip-s (both), msclip-attn / msclip-ffn (attention / FFN shared alone, supplement
Table 5), msclip-s-avgpool (adapters with average pooling instead of depthwise convs, Table 6).
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import distributed
import msclip
import shapes
# The pieces of the other scripts this one uses, all here: the demo model's settings, the FLOP
# count, and eval.py's datasets and tasks (run in this process on each run's export).
from bench import caption_tokens, model_flops
from eval import EvalError, Settings, evaluate, load_model, open_named_dataset, renamed
from train_ds import DEMO_LOGIT_SCALE, DEMO_OVERRIDES, read_metrics

HERE = Path(__file__).resolve().parent
TRAIN_DS = str(HERE / "train_ds.py")

# name: (what it is, the paper's ImageNet zero-shot top-1 % for ViT-B/32 on YFCC-22M, where).
# The supplement (Tables 4-6) has no figure for Early Specialization or the Parallel Branch alone.
VARIANTS = {
    "clip": ("CLIP: separate towers", 32.2, "suppl. Table 4"),
    "msclip": ("MS-CLIP: attention + FFN shared", 32.99, "suppl. Table 5"),
    "msclip-es": ("MS-CLIP + Early Specialization", None, None),
    "msclip-pb": ("MS-CLIP + Parallel Branch", None, None),
    "msclip-s": ("MS-CLIP-S: + both", 36.66, "suppl. Table 6"),
    "msclip-attn": ("attention shared, FFN not", 26.12, "suppl. Table 5"),
    "msclip-ffn": ("FFN shared, attention not", 30.40, "suppl. Table 5"),
    "msclip-s-avgpool": ("MS-CLIP-S, adapters average-pool", 33.94, "suppl. Table 6"),
}
# Base sizes: the preset suffix and the train_ds.py options every variant gets on top of it.
# tiny-b16 is the CPU demo's model (train_ds.py without --preset): 7 layers, fusion at 2-6.
SIZES = {
    "tiny-b16": ["--layers", str(DEMO_OVERRIDES["layers"]),
                 "--fusion_layers", ",".join(map(str, DEMO_OVERRIDES["fusion_layers"])),
                 "--logit_scale_init", repr(DEMO_LOGIT_SCALE)],
    "b32": [],
    "b16": [],
}
OWN_OPTIONS = ("--preset", "--seed", "--out_dir", "--resume", "--export", "--checkpoint")
SYNTHETIC = ["synthetic-shape", "synthetic-colour"]


def build_parser():
    p = argparse.ArgumentParser(
        usage="python ablate.py [options] [-- train_ds.py options]",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                   help=f"default: all of {', '.join(VARIANTS)}")
    p.add_argument("--size", choices=list(SIZES), default="tiny-b16",
                   help="every variant at this size: tiny-b16 (the CPU demo's model, default), b32, b16")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out_dir", default="runs/ablate")
    p.add_argument("--launcher", default=f"{shlex.quote(sys.executable)}",
                   help="command that runs train_ds.py, e.g. 'deepspeed --num_gpus 8' (default: this Python)")
    p.add_argument("--eval_dataset", action="append", metavar="[NAME=]PATH",
                   help="eval.py dataset, repeatable (NAME picks eval.py's bundled prompts, e.g. ImageNet=/data/in1k); "
                        "default with the built-in data: its held-out shape and colour splits")
    p.add_argument("--task", action="append", choices=["zeroshot", "linear-probe"],
                   help="evaluation tasks, repeatable (default: both; the linear probe needs a train split)")
    p.add_argument("--eval_samples", type=int, default=shapes.EVAL_SAMPLES,
                   help="synthetic-shape / synthetic-colour: renders of the held-out split (and of the train split, "
                        "for the linear probe)")
    p.add_argument("--synthetic_size", dest="eval_samples", type=int, action=renamed("--eval_samples"),
                   help=argparse.SUPPRESS)
    p.add_argument("--probe_iterations", type=int, default=1000,
                   help="L-BFGS iterations per linear-probe fit (eval.py's default: 1000; a probe searches ~15 "
                        "regularisation strengths, which takes minutes per run on a loaded CPU)")
    p.add_argument("--report_only", action="store_true",
                   help="train and evaluate nothing: tabulate the runs finished so far (a sweep still running, "
                        "or one stopped before its end); the table says how many seeds each variant has")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda when available, else cpu)")
    return p


def parse_args(argv):
    """(ablate.py's options, train_ds.py's options): the two sides of `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args, train_args = parser.parse_args(argv[:cut]), argv[cut + 1:]
    reserved = [a for a in train_args if a.split("=")[0] in OWN_OPTIONS]
    if reserved:
        parser.error(f"{', '.join(reserved)} after '--': ablate.py sets --preset, --seed, --out_dir and --resume "
                     "of every run itself (use --variants, --size, --seeds, --out_dir)")
    if args.eval_dataset is None:
        if "--train_data" in [a.split("=")[0] for a in train_args]:
            parser.error("with --train_data, say what to evaluate on: --eval_dataset [NAME=]PATH")
        args.eval_dataset = list(SYNTHETIC)
    args.task = list(dict.fromkeys(args.task or ["zeroshot", "linear-probe"]))
    return args, train_args


# ----------------------------------------------------------------------------------------------
# One run: train (a train_ds.py process), then evaluate its export (eval.py's functions)
# ----------------------------------------------------------------------------------------------

def train(run, preset, seed, args, train_args):
    """Train one run to its end with train_ds.py (continuing a checkpoint left by an interrupted
    attempt); returns the wall time of the launch that finished it, start-up included."""
    command = shlex.split(args.launcher) + [TRAIN_DS, "--preset", preset, "--seed", str(seed), "--out_dir", str(run),
                                            "--resume", *SIZES[args.size], *train_args]
    run.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(run / "train.log", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=HERE).returncode
    if code != 0 or not (run / "msclip.pt").is_file():
        tail = (run / "train.log").read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"ablate.py: training {run} failed (exit code {code}); the end of {run / 'train.log'}:\n"
                 + "\n".join(tail) + "\nfix it and run the same command again: finished runs are kept")
    return time.time() - started


def evaluate_run(run, args):
    """eval.py's zero-shot and linear probe on the run's export: {"TASK/DATASET": top-1 %}, the reports."""
    model, identity = load_model(str(run / "msclip.pt"))
    settings = Settings(tasks=args.task, device=args.device, quiet=True,  # its memo: each split encoded once
                        probe_iterations=args.probe_iterations)
    datasets = [open_named_dataset(spec, args.eval_samples, model.config.image_size) for spec in args.eval_dataset]
    reports = evaluate(model.to(args.device), identity, datasets, settings)
    metrics = {f"{task}/{r['name']}": r[task]["top1"] for r in reports for task in args.task}
    return metrics, reports, model.config, sum(p.numel() for p in model.parameters())


def run_once(variant, seed, args, train_args):
    """The result of one (variant, seed): from its result.json when it is complete, else trained
    (or continued) and evaluated now. A folder holding runs of other settings is an error."""
    run = Path(args.out_dir) / "runs" / variant / f"seed{seed}"
    preset = f"{variant}-{args.size}"
    settings = {"preset": preset, "seed": seed, "size_options": SIZES[args.size], "train_args": train_args,
                "launcher": args.launcher}
    evaluation = evaluation_settings(args)
    done = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else None
    trained = json.loads((run / "trained.json").read_text()) if (run / "trained.json").is_file() else None
    for old in (done, trained):
        if old and old["settings"] != settings:
            sys.exit(f"ablate.py: {run} holds a run with other settings ({old['settings']}); use another --out_dir")
    if done and done["evaluation"] == evaluation:
        print(f"{variant:>16} seed {seed}: done before, kept ({run / 'result.json'})", flush=True)
        return done
    if args.report_only:
        print(f"{variant:>16} seed {seed}: not finished, left out of the table", flush=True)
        return None
    if trained is None:
        print(f"{variant:>16} seed {seed}: training {preset} (log: {run / 'train.log'})", flush=True)
        trained = {"settings": settings, "train_s": round(train(run, preset, seed, args, train_args), 1)}
        write_json(run / "trained.json", trained)
    metrics, reports, config, parameters = evaluate_run(run, args)
    steps, evals = read_metrics(run)
    last, curve = steps[-1] if steps else {}, [{"step": e["step"], **e["zero_shot"]} for e in evals]
    text_tokens = msclip.trim_padding(caption_tokens(64)).shape[1]
    result = {"settings": settings, "evaluation": evaluation, "metrics": metrics, "train_s": trained["train_s"],
              "steps": last.get("step"), "final_loss": last.get("loss"), "train_loop_s": last.get("time"),
              "parameters": parameters,
              "flops_per_pair": model_flops(config, text_tokens)["total"], "text_tokens": text_tokens,
              "curve": curve, "reports": reports}
    write_json(run / "result.json", result)
    shown = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items())
    print(f"{variant:>16} seed {seed}: {result['steps']} steps, {result['train_s']:.0f} s; {shown}", flush=True)
    return result


def evaluation_settings(args):
    """What a run's evaluation was: a result.json with other settings is evaluated again."""
    return {"datasets": args.eval_dataset, "tasks": args.task, "eval_samples": args.eval_samples,
            "probe_iterations": args.probe_iterations}


def write_json(path, value):
    distributed.write_atomic(str(path), json.dumps(value, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def spread(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(results):
    """Per variant: parameters, FLOPs, and mean ± std over seeds of every metric and of the training time."""
    summary = {}
    for variant, by_seed in results.items():
        runs = list(by_seed.values())
        what, paper, source = VARIANTS[variant]
        summary[variant] = {
            "what": what, "preset": runs[0]["settings"]["preset"], "seeds": list(by_seed),
            "parameters": runs[0]["parameters"], "flops_per_pair": runs[0]["flops_per_pair"],
            "steps": runs[0]["steps"], "train_s": spread([r["train_s"] for r in runs]),
            "final_loss": spread([r["final_loss"] for r in runs]),
            "metrics": {k: spread([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]},
            "paper_imagenet_zeroshot": paper, "paper_source": source,
            "curves": {seed: r["curve"] for seed, r in by_seed.items()}}
    return summary


def markdown_table(summary):
    metrics = list(next(iter(summary.values()))["metrics"])
    header = ["variant", "seeds", "params", "MFLOPs/pair", "train s", "final loss", *[m.replace("synthetic-", "") for m in metrics],
              "paper: IN zero-shot"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, s in summary.items():
        cells = [f"`{variant}` {s['what']}", str(len(s["seeds"])), f"{s['parameters'] / 1e6:.2f}M", f"{s['flops_per_pair'] / 1e6:.0f}",
                 f"{s['train_s']['mean']:.0f}", f"{s['final_loss']['mean']:.2f} ± {s['final_loss']['std']:.2f}"]
        cells += [f"{s['metrics'][m]['mean']:.1f} ± {s['metrics'][m]['std']:.1f}" for m in metrics]
        paper = s["paper_imagenet_zeroshot"]
        cells.append(f"{paper:.2f} ({s['paper_source']})" if paper is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summary, path):
    """Zero-shot top-1 against step, mean over seeds: a panel per dataset, a line per variant."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(k for s in summary.values() for c in s["curves"].values() for p in c for k in p
                               if k != "step"))
    if not names:
        return None
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names):
        for variant, s in summary.items():
            points = {}
            for curve in s["curves"].values():
                for p in curve:
                    if name in p:
                        points.setdefault(p["step"], []).append(p[name])
            steps = sorted(points)
            axis.plot(steps, [statistics.fmean(points[x]) for x in steps], marker="o", label=variant)
        axis.set(title=f"zero-shot {name}", xlabel="step", ylabel="top-1 %")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main(argv=None):
    args, train_args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"ablate.py: {len(args.variants)} variants x seeds {args.seeds} at size {args.size}; train_ds.py options: "
          f"{shlex.join(train_args) or '(defaults)'}; results in {out}", flush=True)
    results = {v: {} for v in args.variants}
    try:
        for seed in args.seeds:        # seed by seed: an interrupted sweep still compares every variant
            for variant in args.variants:
                result = run_once(variant, seed, args, train_args)
                if result:
                    results[variant][seed] = result
    except EvalError as e:
        sys.exit(f"ablate.py: evaluation failed: {e}")
    results = {v: by_seed for v, by_seed in results.items() if by_seed}
    if not results:
        sys.exit(f"ablate.py: no finished runs in {out / 'runs'} with these settings")
    summary = summarise(results)
    table = markdown_table(summary)
    command = shlex.join(["python", "ablate.py", *(sys.argv[1:] if argv is None else argv)])
    write_json(out / "ablation.json", {"command": command, "size": args.size, "train_args": train_args,
                                       "evaluation": evaluation_settings(args),
                                       "variants": summary})
    (out / "ablation.md").write_text(f"`{command}`\n\n{table}")
    plot = plot_curves(summary, out / "curves.png")
    print("\n" + table + f"\n{out / 'ablation.md'}, {out / 'ablation.json'}"
          + (f", {plot}" if plot else " (no plot: matplotlib is not installed)"))
    return summary


if __name__ == "__main__":
    main()
