"""The GPU check of train_ds.py (issue 18): what it does on one CUDA GPU, measured. Started by
tests/gpu_check.sh, which installs the wheels of tests/gpu_wheels.sh first:

    bash tests/gpu_check.sh OUT_DIR              # one CUDA GPU (the lent H200): about 7 minutes
    bash tests/gpu_check.sh --dry-run OUT_DIR    # every part on CPU, tiny settings

Rows, in this order, each a subprocess with its own timeout; each row is written to
OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md as soon as it ends, with the logs and metrics of
every row so far in OUT_DIR/logs.tar.gz (the trainings run in a --work folder), so a run killed at
any point leaves the rows done. A row that would not fit in what is left of --budget seconds is
written as skipped, with why.

1. machine: torch, CUDA, the GPU, the measured bf16 rate of an 8192^3 matmul (bench.py's).
2-5. train_ds.py, bf16, msclip-s-b16 and clip-b16 at ZeRO-1 and ZeRO-3: --steps 150 of --batch_size
   128, logged every 10 steps; the windows until the DataLoader's prefetched batches (workers x
   prefetch_factor, read off the loader) are used up are dropped, the first at least (start-up,
   cuDNN's autotuning): the rate is the other windows' pairs over their time. Peak
   memory (torch.cuda.max_memory_allocated); the share of that time spent waiting for data
   (metrics.jsonl's data_wait); MFU against the datasheet's dense bf16 peak (989
   TFLOP/s on H100/H200) and against the measured matmul rate, from bench.py's FLOP count at the
   text length the built-in captions run at. --save_every -1: no checkpoint, no export.
6. the evaluation model: the CPU demo's run (default preset and data, 600 steps) in bf16, which
   learns colour in 100 steps and shape by 600 (README); its export is the one file written.
7. eval bf16 vs fp32 on that export, zero-shot on the held-out synthetic-shape and -colour sets:
   fp32 top-1 at least twice chance on a set (it learned something), prediction agreement >= 99.5%
   over the sets so learned (at chance every decision is a near-tie), cosine of every image and
   class embedding >= 0.999.
8. bench.py --compare: the bare training step (no data loader) of clip-b16 and msclip-s-b16 at
   the same batch: the model's own pairs/s and MFU against both peaks.
9-10. msclip-s-b16 ZeRO-1 with --channels_last, then with --compile: against row 2.

Exits 1 if a check failed, 2 if a row could not run. The dry run (--dry-run: CPU, msclip-s-tiny-b16
and clip-tiny-b16, 8 steps logged every 2, batch 8, 1 worker; the demo shortened, trained in fp32; --compile
aot_eager, since inductor's C++ build of a model takes 10 minutes on 2 cores) runs every row with
the same code; its figures say nothing about a GPU.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GPU = dict(device="cuda", presets=["msclip-s-b16", "clip-b16"], steps=150, log_every=10, batch=128,
           demo=["--steps", "600"], eval_samples=512, bench_steps=10, budget=450, timeout=240, compile=["--compile"],
           estimates={"machine": 20, "train": 60, "demo": 70, "eval": 40, "bench": 80, "compile": 180})
DRY = dict(device="cpu", presets=["msclip-s-tiny-b16", "clip-tiny-b16"], steps=8, log_every=2, batch=8,
           demo=["--steps", "200", "--batch_size", "32", "--lr", "5e-4", "--warmup_steps", "20", "--precision", "fp32"],
           eval_samples=256, bench_steps=2,
           budget=1500, timeout=600, compile=["--compile", "aot_eager"],
           estimates={"machine": 10, "train": 60, "demo": 240, "eval": 60, "bench": 90, "compile": 240})
SPEC_NOTE = "datasheet dense bf16 peak (bench.SPEC_BF16_TFLOPS)"


# ----------------------------------------------------------------------------------------------
# The parts, each run in its own process: `python tests/gpu_check.py --part NAME ...`
# ----------------------------------------------------------------------------------------------

def part_machine(args):
    import torch
    import bench
    device = torch.device(args.device)
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "cpus": os.cpu_count()}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=torch.cuda.get_device_properties(device)
                   .total_memory / 2 ** 30, cudnn=torch.backends.cudnn.version())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out["matmul_tflops"] = bench.measure_matmul_flops(device, dtype) / 1e12
    out["matmul_dtype"] = str(dtype).replace("torch.", "")
    spec = bench.spec_peak_flops(device, "bf16")
    out["spec_tflops"] = spec / 1e12 if spec else None
    import deepspeed
    out["deepspeed"] = deepspeed.__version__
    return out


def part_train(args):
    """train_ds.main(argv) in this process, and the batches its DataLoader prefetches before the first
    step (workers x prefetch_factor, read off the loader)."""
    import data
    import train_ds
    original, prefetched = data.train_loader, [0]

    def train_loader(*a, **k):
        loader = original(*a, **k)
        prefetched[0] = loader.num_workers * (loader.prefetch_factor or 0)
        return loader

    data.train_loader = train_loader
    return {"result": train_ds.main(args.argv), "prefetched": prefetched[0]}


def part_eval(args):
    """fp32 and bf16 zero-shot of one export on the held-out synthetic sets: predictions, top-1,
    image features and class embeddings side by side."""
    import torch.nn.functional as F
    import eval as evaluation
    import msclip
    model = msclip.load_checkpoint(args.checkpoint).to(args.device)
    out = {}
    for spec in ("synthetic-shape", "synthetic-colour"):
        dataset = evaluation.open_named_dataset(spec, args.eval_samples, model.config.image_size)
        _, images, _ = dataset.images("test", msclip.ImageTransform(model.config.image_size))
        got = {}
        for precision in ("fp32", "bf16"):
            classes = evaluation.zeroshot_classifier(model, dataset.classnames, dataset.templates, args.device, precision)
            encoded = evaluation.encode_images(model, images, args.device, precision, quiet=True)
            features = encoded["features"]
            predictions = (F.normalize(features, dim=-1) @ classes.T).argmax(dim=1)
            got[precision] = (features, classes, predictions, encoded["labels"])
        (f32, c32, p32, labels), (f16, c16, p16, _) = got["fp32"], got["bf16"]
        image_cos = F.cosine_similarity(f32, f16, dim=-1)
        class_cos = F.cosine_similarity(c32, c16, dim=-1)
        out[spec] = {"n": len(labels), "classes": len(dataset.classnames), "chance": 100 / len(dataset.classnames),
                     "top1_fp32": 100 * (p32 == labels).float().mean().item(),
                     "top1_bf16": 100 * (p16 == labels).float().mean().item(),
                     "agree": int((p32 == p16).sum()), "image_cos_min": image_cos.min().item(),
                     "image_cos_mean": image_cos.mean().item(), "class_cos_min": class_cos.min().item()}
    return out


PARTS = {"machine": part_machine, "train": part_train, "eval": part_eval}


# ----------------------------------------------------------------------------------------------
# The rows
# ----------------------------------------------------------------------------------------------

class Check:
    def __init__(self, results, work, settings, dry):
        self.results, self.out, self.s, self.dry = results, work, settings, dry
        self.started, self.rows, self.failed, self.broken = time.time(), [], [], []
        self.machine = {}

    def left(self):
        return self.s["budget"] - (time.time() - self.started)

    def part(self, name, log, *extra, argv=None):
        """Run a part in a fresh process; its JSON result (or an exception naming the log)."""
        result = os.path.join(self.out, f"{log}.json")
        command = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", result,
                   "--device", self.s["device"], *extra] + (["--argv", json.dumps(argv)] if argv else [])
        return run(command, os.path.join(self.out, f"{log}.log"), result, self.timeout())

    def timeout(self):
        """A part's time limit: --timeout, or what is left of the budget (row() skips a row that
        would not fit)."""
        return max(10, min(self.s["timeout"], self.left() - 5))

    def row(self, name, estimate, compute):
        """One row: skipped when its estimate does not fit in the budget left; else computed, checked,
        and written out with every row before it."""
        started = time.time()
        if self.left() < estimate:
            entry = {"row": name, "status": "skipped", "why": f"{self.left():.0f} s of the budget left, the row needs "
                                                               f"about {estimate} s"}
        else:
            try:
                entry = {"row": name, **compute()}
                entry["status"] = "failed" if entry.get("failed") else "ok"
            except RowError as e:
                entry = {"row": name, "status": "error", "why": str(e)}
        entry["seconds"] = round(time.time() - started, 1)
        self.rows.append(entry)
        (self.failed if entry["status"] == "failed" else self.broken if entry["status"] == "error" else []).append(name)
        self.write()
        print(format_row(entry), flush=True)
        return entry

    def write(self):
        """gpu_check.json and gpu_check.md, replaced atomically (a kill never leaves half a file)."""
        summary = {"dry_run": self.dry, "settings": {k: v for k, v in self.s.items() if k != "estimates"},
                   "machine": self.machine, "rows": self.rows, "seconds": round(time.time() - self.started, 1),
                   "failed": self.failed, "errors": self.broken}
        for name, text in (("gpu_check.json", json.dumps(summary, indent=1)), ("gpu_check.md", markdown(summary))):
            tmp = os.path.join(self.results, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.results, name))
        tmp = os.path.join(self.results, "logs.tar.gz.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for folder, _, files in os.walk(self.out):
                for name in files:
                    if name.endswith((".log", ".json", ".jsonl")):
                        path = os.path.join(folder, name)
                        tar.add(path, arcname=os.path.relpath(path, self.out))
        os.replace(tmp, os.path.join(self.results, "logs.tar.gz"))

    # -- the rows ------------------------------------------------------------------------------

    def machine_row(self):
        self.machine = self.part("machine", "machine")
        m = self.machine
        return {"what": f"{m.get('gpu', 'CPU')}, torch {m['torch']}, CUDA {m['cuda']}, DeepSpeed {m['deepspeed']}",
                "matmul_tflops": m["matmul_tflops"], "spec_tflops": m["spec_tflops"]}

    def train_argv(self, name, preset, stage, *extra):
        s = self.s
        return ["--preset", preset, "--precision", "bf16", "--zero_stage", str(stage), "--steps", str(s["steps"]),
                "--batch_size", str(s["batch"]), "--log_every", str(s["log_every"]), "--eval_every", "-1",
                "--save_every", "-1", "--lr", "5e-4", "--warmup_steps", str(max(1, s["steps"] // 10)),
                "--workers", str(s["workers"]), "--out_dir", os.path.join(self.out, name), *extra]

    def train_row(self, name, preset, stage, *extra):
        argv = self.train_argv(name, preset, stage, *extra)
        got = self.part("train", name, argv=argv)
        steps, _ = read_metrics(os.path.join(self.out, name))
        return throughput(steps, got["prefetched"], self.s, preset, self.machine)

    def demo_row(self):
        argv = ["--precision", "bf16", "--zero_stage", "1", "--eval_every", "0", "--save_every", "0",
                "--workers", str(self.s["workers"]), "--out_dir", os.path.join(self.out, "demo"), *self.s["demo"]]
        got = self.part("train", "demo", argv=argv)
        steps, _ = read_metrics(os.path.join(self.out, "demo"))
        losses = [e["loss"] for e in steps if "loss" in e]
        self.export = got["result"]["export"]
        return {"what": f"demo run {' '.join(self.s['demo'])}: export {os.path.relpath(self.export, self.out)}",
                "zero_shot": got["result"].get("zero_shot"), "first_loss": losses[0], "last_loss": losses[-1],
                "failed": None if all(map(math.isfinite, losses)) else "a loss is not finite"}

    def eval_row(self):
        if not getattr(self, "export", None):
            raise RowError("no export: the demo row did not run")
        got = self.part("eval", "eval", "--checkpoint", self.export, "--eval-samples", str(self.s["eval_samples"]))
        # Agreement counts on the sets the model learned (fp32 top-1 at least twice chance): on a set at
        # chance every decision is a near-tie, which any rounding flips, bf16's or another GPU's
        learned = [k for k, v in got.items() if v["top1_fp32"] >= 2 * v["chance"]]
        agree = sum(got[k]["agree"] for k in learned) / max(1, sum(got[k]["n"] for k in learned))
        cos = min(min(v["image_cos_min"], v["class_cos_min"]) for v in got.values())
        problems = ["the model learned nothing: top-1 below twice chance on every set"] * (not learned)
        problems += [f"prediction agreement {100 * agree:.2f}% < 99.5%"] * (bool(learned) and agree < 0.995)
        problems += [f"feature cosine {cos:.5f} < 0.999"] * (cos < 0.999)
        return {"what": "eval fp32 / bf16: " + ", ".join(
            f"{k} top-1 {v['top1_fp32']:.1f}% / {v['top1_bf16']:.1f}% (chance {v['chance']:.1f}), {v['agree']}/{v['n']} "
            f"agree" for k, v in got.items()) + f"; agreement on the learned sets {100 * agree:.2f}%, min cosine {cos:.6f}",
            "learned": learned, "agreement": agree, "min_cosine": cos, "sets": got,
            "failed": "; ".join(problems) or None}

    def bench_row(self):
        s, result = self.s, os.path.join(self.out, "bench.json")
        command = [sys.executable, os.path.join(ROOT, "bench.py"), "--device", s["device"], "--precision", "bf16",
                   "--compare", "--presets", s["presets"][1], s["presets"][0], "--batch-size", str(s["batch"]),
                   "--warmup", "3", "--steps", str(s["bench_steps"]), "--json", result]
        got = run(command, os.path.join(self.out, "bench.log"), result, self.timeout())
        rows = {r["preset"]: {k: r[k] for k in ("pairs_per_s", "mfu", "mfu_spec", "peak_memory", "text_tokens")}
                for r in got["results"]}
        return {"what": f"bench.py bare step, batch {s['batch']}, bf16: " + ", ".join(
            f"{p} {r['pairs_per_s']:.0f} pairs/s, MFU {pct(r['mfu_spec'])} of spec / {pct(r['mfu'])} of matmul"
            for p, r in rows.items()), "presets": rows}

    def compare_row(self, name, options, reference):
        entry = self.train_row(name, self.s["presets"][0], 1, *options)
        base = next((r for r in self.rows if r["row"] == reference and r["status"] == "ok"), None)
        if base:
            entry["vs_plain"] = entry["pairs_per_s"] / base["pairs_per_s"]
            entry["what"] += f"; {entry['vs_plain']:.2f}x the plain row's pairs/s"
        return entry


class RowError(Exception):
    pass


def run(command, log, result, timeout):
    """A subprocess with its output in `log`; its JSON `result`. RowError on failure or timeout."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    try:
        with open(log, "w") as f:
            proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RowError(f"timed out after {timeout:.0f} s (log: {log})") from None
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-1500:]
        raise RowError(f"exit {proc.returncode} (log: {log}): ...{tail}")
    with open(result) as f:
        return json.load(f)


def read_metrics(out_dir):
    import train_ds  # the trainer's own reader of its metrics.jsonl
    return train_ds.read_metrics(out_dir)


def text_flops(preset, batch, samples=8):
    """Mean forward FLOPs per pair (bench.py's count) at the text width the built-in data's batches run
    at: each batch trimmed to its longest caption (data.collate). Captions do not depend on the image
    size: rendered at 16 px."""
    import random
    import bench
    import msclip
    import shapes
    config = msclip.preset_config(preset)
    renders = shapes.SyntheticCaptions("train", image_size=16)
    rng = random.Random(0)
    flops, widths = [], []
    for _ in range(samples):
        tokens = msclip.tokenize([renders.render(rng.randrange(len(renders)))[1] for _ in range(batch)])
        width = int(tokens.argmax(dim=-1).max()) + 1
        widths.append(width)
        flops.append(bench.model_flops(config, width)["total"])
    return statistics.mean(flops), statistics.mean(widths)


def throughput(steps, prefetched, s, preset, machine):
    """Figures of one training from its metrics.jsonl windows. Dropped: the windows that may still
    draw on the `prefetched` batches the workers made ready before the first step, and the first
    window at least."""
    per_window = s["log_every"]
    dropped = max(1, math.ceil(prefetched / per_window))
    windows = steps[dropped:]
    if not windows:
        raise RowError(f"only {len(steps)} logged window(s), {dropped} dropped ({prefetched} batches prefetched): "
                       "no steady window")
    seconds = [per_window * s["batch"] / w["pairs_per_s"] for w in windows]
    pairs_per_s = per_window * s["batch"] * len(windows) / sum(seconds)
    wait = sum(w["data_wait"] * t for w, t in zip(windows, seconds)) / sum(seconds)  # the trainer's share per window
    flops, tokens = text_flops(preset, s["batch"])
    achieved = 3 * flops * pairs_per_s
    matmul = machine.get("matmul_tflops")
    spec = machine.get("spec_tflops")
    losses = [w["loss"] for w in steps]
    entry = {"pairs_per_s": pairs_per_s, "windows_dropped": dropped,
             "windows_pairs_per_s": [w["pairs_per_s"] for w in windows],
             "peak_memory_gb": max(w["memory_gb"] for w in steps), "data_wait": wait,
             "text_tokens": tokens, "gflops_per_pair": flops / 1e9, "achieved_tflops": achieved / 1e12,
             "mfu_spec": achieved / (spec * 1e12) if spec else None,
             "mfu_matmul": achieved / (matmul * 1e12) if matmul else None,
             "first_loss": losses[0], "last_loss": losses[-1]}
    entry["what"] = (f"{pairs_per_s:.0f} pairs/s, peak {entry['peak_memory_gb']:.1f} GiB, data wait {100 * wait:.0f}%, "
                     f"MFU {pct(entry['mfu_spec'])} of spec / {pct(entry['mfu_matmul'])} of matmul")
    entry["failed"] = None if all(map(math.isfinite, losses)) else "a loss is not finite"
    return entry


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_row(r):
    return f"{r['row']:<34} {r['status']:<8} {r['seconds']:>6.1f} s  {r.get('what') or r.get('why', '')}" + (
        f"  FAILED: {r['failed']}" if r.get("failed") else "")


def markdown(summary):
    m = summary["machine"]
    lines = [f"# tests/gpu_check.py{' --dry-run (CPU: no GPU figures)' if summary['dry_run'] else ''}", "",
             f"{m.get('gpu', 'CPU')}; torch {m.get('torch')}, CUDA {m.get('cuda')}, DeepSpeed {m.get('deepspeed')}, "
             f"Python {m.get('python')}, {m.get('cpus')} CPUs; measured matmul {m.get('matmul_tflops', 0):.3g} TFLOP/s "
             f"({m.get('matmul_dtype')}), {SPEC_NOTE} {m.get('spec_tflops')}; {summary['seconds']:.0f} s so far", "",
             "| row | status | s | pairs/s | peak GiB | data wait | MFU spec | MFU matmul | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        figures = [f"{r['pairs_per_s']:.0f}" if "pairs_per_s" in r else "",
                   f"{r['peak_memory_gb']:.2f}" if "peak_memory_gb" in r else "",
                   pct(r["data_wait"]) if "data_wait" in r else "", pct(r["mfu_spec"]) if "mfu_spec" in r else "",
                   pct(r["mfu_matmul"]) if "mfu_matmul" in r else ""]
        note = (r.get("what") or r.get("why", "")) + (f" FAILED: {r['failed']}" if r.get("failed") else "")
        lines.append(f"| {r['row']} | {r['status']} | {r['seconds']:.0f} | " + " | ".join(figures) +
                     f" | {note.replace('|', '/')} |")
    lines += ["", "FAILED: " + ", ".join(summary["failed"]) if summary["failed"] else
              "errors: " + ", ".join(summary["errors"]) if summary["errors"] else "every row that ran passed"]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="folder for the results (gpu_check.json, gpu_check.md, logs)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny settings")
    p.add_argument("--budget", type=float, help="seconds for all rows (default: 450 on a GPU, 1500 dry)")
    p.add_argument("--workers", type=int, help="DataLoader workers per training (default: CPUs - 2, at most 14; dry: 1)")
    p.add_argument("--work", help="folder for the trainings' outputs and logs (default: a new one in /tmp)")
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--eval-samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--argv", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:  # one part, in this process
        result = PARTS[args.part](args)
        with open(args.result, "w") as f:
            json.dump(result, f, default=str)
        return 0
    if not args.out:
        p.error("give OUT_DIR")
    s = dict(DRY if args.dry_run else GPU)
    s["workers"] = args.workers or (1 if args.dry_run else max(1, min(14, (os.cpu_count() or 4) - 2)))
    s["budget"] = args.budget or s["budget"]
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --dry-run for the CPU dry run")
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_work_")
    os.makedirs(work, exist_ok=True)
    print(f"results in {args.out} (gpu_check.json, gpu_check.md, logs.tar.gz); trainings in {work}", flush=True)
    check = Check(args.out, work, s, args.dry_run)
    check.row("machine", s["estimates"]["machine"], check.machine_row)
    first, second = s["presets"]
    for preset in (first, second):
        for stage in (1, 3):
            name = f"{preset} ZeRO-{stage}"
            check.row(name, s["estimates"]["train"],
                      lambda preset=preset, stage=stage, name=name: check.train_row(name.replace(" ", "_"), preset, stage))
    check.row("demo (evaluation model)", s["estimates"]["demo"], check.demo_row)
    check.row("eval bf16 vs fp32", s["estimates"]["eval"], check.eval_row)
    check.row("bench.py bare step", s["estimates"]["bench"], check.bench_row)
    reference = f"{first} ZeRO-1"
    check.row(f"{first} ZeRO-1 --channels_last", s["estimates"]["train"],
              lambda: check.compare_row("channels_last", ["--channels_last"], reference))
    check.row(f"{first} ZeRO-1 {' '.join(s['compile'])}", s["estimates"]["compile"],
              lambda: check.compare_row("compile", s["compile"], reference))
    print(markdown({"dry_run": args.dry_run, "machine": check.machine, "rows": check.rows,
                    "seconds": time.time() - check.started, "failed": check.failed, "errors": check.broken}))
    return 1 if check.failed else 2 if check.broken else 0


if __name__ == "__main__":
    sys.exit(main())
