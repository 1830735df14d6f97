"""The GPU check of train_ds.py's mixed precision (issue 12), for a machine with one CUDA GPU:

    python tests/gpu_check.py --out /tmp/gpu_check            # one CUDA GPU (time not yet measured)
    python tests/gpu_check.py --device cpu --out /tmp/dry      # dry run, tiny models (6.5 min on 2 busy cores)

1. train_ds.py, 20 steps, bf16 (torch_autocast), ZeRO-1 and ZeRO-3, msclip-s-b16 and clip-b16 on the
   built-in data: the loss must be finite and fall (mean of the last 5 steps below the first 5);
   pairs/s, image tokens/s and peak memory are printed.
2. eval.py zero-shot on a synthetic set with the weights of the msclip-s-b16 ZeRO-1 run, bf16 vs
   fp32: top-1 within 0.5 points.
3. bench.py: MFU of msclip-s-b16 in bf16 at the largest batch that fits.

Prints a table (and writes OUT/gpu_check.json); exits 1 if a check fails. Not collected by pytest
(no test_ prefix): it needs a GPU. The dry run (--device cpu) uses msclip-s-tiny / clip-tiny,
3 steps and tiny batches, checks that every step runs and that the figures are read, and skips the
"falls" and MFU checks (3 steps of a tiny model prove nothing about them).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command, log, env=None, timeout=900):
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                              timeout=timeout)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n" + open(log).read()[-3000:])
    return time.time() - started


def train(args, preset, stage, out):
    """20 steps of train_ds.py; returns the figures read back from metrics.jsonl."""
    folder = os.path.join(out, f"{preset}_zero{stage}")
    command = [sys.executable, "train_ds.py", "--preset", preset, "--precision", "bf16", "--zero_stage", str(stage),
               "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--log_every", "1",
               "--eval_every", "-1", "--save_every", "0", "--lr", "5e-4", "--warmup_steps", "2",
               "--synthetic_samples", str(args.steps * args.batch_size), "--out_dir", folder]
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    seconds = run(command, folder + ".log", env)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"zero_shot"' not in line]
    losses = [s["loss"] for s in steps]
    sys.path.insert(0, ROOT)
    import msclip
    config = msclip.MSCLIPConfig(**msclip.PRESETS[preset])
    grid = (config.image_size // config.patch_size) ** 2
    timed = steps[2:] or steps  # the first steps include start-up and allocator warm-up
    pairs_per_s = sum(s["pairs_per_s"] for s in timed) / len(timed)
    k = min(5, len(losses) // 2) or 1
    return {"run": f"train {preset} ZeRO-{stage} bf16", "finite": all(map(math.isfinite, losses)),
            "falls": sum(losses[-k:]) / k < sum(losses[:k]) / k, "first_loss": losses[0], "last_loss": losses[-1],
            "pairs_per_s": pairs_per_s, "image_tokens_per_s": pairs_per_s * (grid + 1),
            "peak_memory_gb": max(s["memory_gb"] for s in steps), "seconds": seconds,
            "export": os.path.join(folder, "msclip.pt")}


def zero_shot(args, checkpoint, out):
    """eval.py's zero-shot top-1 on a synthetic set, fp32 and bf16, on the same weights."""
    top1 = {}
    for precision in ("fp32", "bf16"):
        result = os.path.join(out, f"eval_{precision}.json")
        run([sys.executable, "eval.py", "--checkpoint", checkpoint, "--dataset", "synthetic-shape",
             "--synthetic-size", str(args.eval_size), "--precision", precision, "--device", args.device,
             "--output", result, "--quiet"], result + ".log")
        with open(result) as f:
            top1[precision] = json.load(f)["datasets"][0]["zeroshot"]["top1"]
    return {"run": "eval.py zero-shot bf16 vs fp32", "fp32_top1": top1["fp32"], "bf16_top1": top1["bf16"],
            "within_0.5": abs(top1["fp32"] - top1["bf16"]) <= 0.5}


def bench(args, out):
    result = os.path.join(out, "bench.json")
    run([sys.executable, "bench.py", "--device", args.device, "--precision", "bf16", "--preset", args.bench_preset,
         "--batch-size", args.bench_batch, "--json", result], result + ".log")
    with open(result) as f:
        found = json.load(f)["results"][-1]
    return {"run": f"bench.py {args.bench_preset} bf16 batch {found.get('batch_size', args.bench_batch)}",
            "mfu": found.get("mfu"), "pairs_per_s": found.get("pairs_per_s"), "peak_memory": found.get("peak_memory")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="gpu_check")
    p.add_argument("--only", choices=["train", "eval", "bench"], action="append", help="run only these parts")
    args = p.parse_args()
    dry = args.device == "cpu"
    args.steps, args.batch_size = (3, 4) if dry else (20, 128)
    args.eval_size = 64 if dry else 2000
    args.bench_preset, args.bench_batch = ("msclip-s-tiny", "4") if dry else ("msclip-s-b16", "max")
    presets = ["msclip-s-tiny", "clip-tiny"] if dry else ["msclip-s-b16", "clip-b16"]
    parts = args.only or ["train", "eval", "bench"]
    os.makedirs(args.out, exist_ok=True)
    rows, failed = [], []
    if "train" in parts or "eval" in parts:
        for preset in presets:
            for stage in (1, 3) if "train" in parts else (1,):
                rows.append(train(args, preset, stage, args.out))
                print(json.dumps(rows[-1]), flush=True)
                if not rows[-1]["finite"] or not (rows[-1]["falls"] or dry):
                    failed.append(rows[-1]["run"])
            if "train" not in parts:
                break
    if "eval" in parts:
        rows.append(zero_shot(args, rows[0]["export"], args.out))
        print(json.dumps(rows[-1]), flush=True)
        if not rows[-1]["within_0.5"] and not dry:
            failed.append(rows[-1]["run"])
    if "bench" in parts:
        rows.append(bench(args, args.out))
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1]["mfu"] is None:
            failed.append(rows[-1]["run"])
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "export"))
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
