"""Pre-train MS-CLIP with DeepSpeed: one CPU in minutes, or many GPUs with ZeRO.

The 5-minute CPU demo (built-in procedural shapes data, then held-out zero-shot accuracy):

    deepspeed train_ds.py

Same thing without the launcher (one process), or on 2 CPU ranks:

    python train_ds.py
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train_ds.py

Real data (CSV/TSV of image path + caption, or img2dataset WebDataset shards), ZeRO-3, 8 GPUs:

    deepspeed train_ds.py --preset msclip-s-b32 --train_data data/train.csv --csv_separator , \\
        --csv_img_key filepath --csv_caption_key title --zero_stage 3 --batch_size 256 --epochs 32
    deepspeed --hostfile hostfile train_ds.py --preset msclip-s-b16 \\
        --train_data "shards/{00000..01023}.tar" --train_samples 10000000 --zero_stage 3 --precision bf16

srun, mpirun and torchrun start it as well (one process per GPU; rank, world size and local rank
are read from whichever launcher's variables are set, see distributed.LAUNCHERS):

    srun python train_ds.py --preset msclip-s-b16 --train_data "shards/{00000..01023}.tar" ...
    mpirun -np 16 -H node1:8,node2:8 -x MASTER_ADDR=node1 python train_ds.py ...

Stop it any time and continue exactly where it was with --resume (same output folder); turn the
latest checkpoint into one fp32 file for msclip.load_checkpoint / eval.py with --export:

    deepspeed train_ds.py --out_dir out --resume
    python train_ds.py --out_dir out --export out/msclip.pt

Every default is in the parser below. ds_config.json holds only what DeepSpeed reads and this
trainer does not set (ZeRO tuning, monitors); --ds_set KEY=JSON changes any of it.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch

import data
import distributed
import eval as evaluation
import msclip
import shapes

# The CPU demo model when --preset is not given: MS-CLIP-S tiny with a 16-pixel grid (4 x 4 tokens
# at 64 px; the 32-pixel grid's 2 x 2 tokens learned shape about half as fast, measured) and the
# fewest layers that hold the five fusion points. Its logit scale starts at CLIP's ln(1 / 0.07):
# started at the ln(100) clamp, the random features' loss began far above ln(batch) and runs of
# 100-150 steps collapsed to identical embeddings, loss = ln(batch) (docs/MEASUREMENTS.md).
DEFAULT_PRESET = "msclip-s-tiny-b16"
DEMO_OVERRIDES = {"layers": 7, "fusion_layers": (2, 3, 4, 5, 6)}
DEMO_LOGIT_SCALE = math.log(1 / 0.07)
DEMO_STEPS = 600
HERE = os.path.dirname(os.path.abspath(__file__))

# DeepSpeed config keys this trainer sets from its own options. AdamW with MS-CLIP's parameter
# groups (the shared weights have their own learning rate and weight decay) and the warm-up +
# cosine schedule are built here, which DeepSpeed's optimizer and scheduler sections cannot express:
# a ds_config.json that sets any of these is refused rather than silently overridden.
TRAINER_KEYS = {"train_batch_size": "--global_batch_size", "train_micro_batch_size_per_gpu": "--batch_size",
                "gradient_accumulation_steps": "--grad_accum", "gradient_clipping": "--grad_clip",
                "zero_optimization.stage": "--zero_stage", "bf16": "--precision", "fp16": "--precision",
                "torch_autocast": "--precision", "optimizer": "--lr, --lr_shared, --wd, --wd_shared, --betas, --eps",
                "scheduler": "--warmup_steps, --warmup_fraction, --warmup_start_ratio, --min_lr_ratio"}


def build_parser():
    p = argparse.ArgumentParser(description="Pre-train MS-CLIP with DeepSpeed (launch commands: the module docstring).")
    a = p.add_argument_group("model").add_argument
    a("--preset", help=f"msclip.PRESETS name: {', '.join(msclip.PRESETS)}. Default: {DEFAULT_PRESET} with "
                       f"{DEMO_OVERRIDES} (the CPU demo)")
    a("--layers", type=int, help="override the preset's depth (then also --fusion_layers for MS-CLIP-S)")
    a("--fusion_layers", type=lambda t: tuple(int(v) for v in t.split(",")),
      help="comma-separated layers that get a parallel-branch adapter (5 values)")
    a("--image_size", type=int, help="override the preset's image size")
    a("--logit_scale_init", type=float, help="initial log inverse temperature (default: the model's, 1.0 as the "
                                             f"official code; the demo model CLIP's ln(1/0.07) = {DEMO_LOGIT_SCALE:.3f})")
    a("--grad_checkpointing", action="store_true", help="recompute transformer layers in backward (less memory)")
    a("--local_loss", action="store_true", help="each rank scores only its own rows against all columns (less memory)")
    a("--compile", nargs="?", const="inductor", metavar="BACKEND",
      help="torch.compile the model through DeepSpeed's engine.compile, with inductor or the torch.compile BACKEND "
           "named (e.g. aot_eager: graph capture without code generation); the first steps compile for minutes")
    a("--channels_last", action="store_true", help="images in channels-last (NHWC) memory order through the conv stem, "
                                                   "the parallel branch and the adapters (same values)")

    a = p.add_argument_group("data").add_argument
    a("--train_data", help="a .csv/.tsv file (image path, caption) or WebDataset shards ('dir/{00000..01023}.tar', "
                           "'::' joins patterns). Default: the built-in procedural shapes data (shapes.py)")
    a("--data_type", choices=["auto", "synthetic", "csv", "webdataset"], default="auto")
    a("--csv_separator", default="\t", help="column separator of a --train_data CSV (OpenCLIP's default: tab)")
    a("--csv_img_key", default="filepath", help="image-path column")
    a("--csv_caption_key", default="title", help="caption column")
    a("--train_samples", type=int, help="samples per epoch of WebDataset shards (needed with --epochs and "
                                        "--dataset_resampled)")
    a("--dataset_resampled", action="store_true",
      help="WebDataset: draw shards with replacement (seeded per epoch, rank and worker) for epochs of "
           "--train_samples samples, instead of each shard once per epoch (OpenCLIP's --dataset-resampled)")
    a("--synthetic_samples", type=int, default=shapes.DEFAULT_SAMPLES, help="size of the built-in data")
    a("--hard_negatives", default="none", metavar="SxC",
      help="built-in data: batches made of groups of S shapes x C colours drawn with the same layout and "
           "wording, so that pairs differ only in shape or colour ('none': uniformly random batches)")
    a("--workers", type=int, help="DataLoader workers per rank (default: on GPUs the rank's share of its node's CPU "
                                  "cores less one, at most 16; 1 on CPU; the start-up line says which and why)")
    a("--shuffle_buffer", type=int, default=5000, help="WebDataset: undecoded samples in each DataLoader worker's "
                                                        "shuffle buffer, which spans shard boundaries (OpenCLIP: 5000)")
    a("--interleave_shards", type=int, default=8, help="WebDataset: shards each worker reads at once, drawing samples "
                                                       "from them at random (a resume re-reads at most these)")

    a = p.add_argument_group("optimisation").add_argument
    a("--steps", type=int, help=f"optimizer steps in all (default: from --epochs, or {DEMO_STEPS} on the built-in data)")
    a("--epochs", type=int, help="passes over the data (default 1 for CSV and WebDataset)")
    a("--batch_size", type=int, default=64, help="micro-batch per rank")
    a("--global_batch_size", type=int, help="pairs per optimizer step over all ranks, each a negative of every other: "
                                            "--grad_accum follows from it")
    a("--grad_accum", type=int, help="micro-batches per rank and optimizer step (default 1); every pair of all of them "
                                     "is a negative of every other, at the cost of one extra forward per micro-batch")
    a("--plain_grad_accum", action="store_true",
      help="DeepSpeed's plain accumulation instead: each micro-batch is its own contrastive batch (negatives: "
           "micro-batch x ranks), the --grad_accum gradients averaged; no extra forward")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--lr_shared", type=float, help="peak learning rate of the weights images and text share (default: --lr)")
    a("--wd", type=float, default=0.05, help="weight decay (not on norms, biases, embeddings, logit scale)")
    a("--wd_shared", type=float, default=0.2, help="weight decay of the shared weight matrices")
    a("--betas", type=lambda t: tuple(float(v) for v in t.split(",")), default=(0.9, 0.98), help="AdamW betas")
    a("--eps", type=float, default=1e-6, help="AdamW eps")
    a("--scale_lr", action="store_true", help="multiply lr and lr_shared by the number of ranks (MS-CLIP's SCALE_LR)")
    a("--warmup_steps", type=int, help="linear warm-up steps (default: --warmup_fraction of the steps)")
    a("--warmup_fraction", type=float, default=0.1, help="warm-up steps as a fraction of the steps")
    a("--warmup_start_ratio", type=float, default=0.01, help="the warm-up starts at this fraction of the peak lr")
    a("--min_lr_ratio", type=float, default=0.1, help="the cosine ends at this fraction of the peak learning rate")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    a("--max_bad_steps", type=int, default=10,
      help="stop the run (exit 1) after this many optimizer steps in a row with a non-finite loss or gradient norm "
           "(checked at log steps; 0: never stop, only count them)")
    a("--zero_stage", type=int, choices=[0, 1, 2, 3], default=1, help="ZeRO stage")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="auto: bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPU")
    a("--grad_reduce_dtype", choices=["fp32", "bf16", "fp16"],
      help="the type in which ZeRO sums the gradients over ranks under bf16/fp16 (default: fp32 at ZeRO 0-2; at "
           "ZeRO-3 the half type, in which it also gathers the weights: fp32 there doubles that traffic)")
    a("--seed", type=int, default=0)

    a = p.add_argument_group("checkpoints").add_argument
    a("--out_dir", default="out", help="checkpoints, metrics.jsonl, DeepSpeed monitor files and the exported weights")
    a("--save_every", type=int, default=1000, help="checkpoint every N steps and at the end (0: only at the end; "
                                                     "-1: never, and no export: for benchmarks)")
    a("--keep", type=int, default=2, help="complete checkpoints kept")
    a("--resume", action="store_true", help="continue from the latest complete checkpoint in --out_dir (fresh start "
                                            "when there is none)")
    a("--stop_at", type=int, help="checkpoint and stop at this step, e.g. to fit a job's time limit (the schedule "
                                   "still spans --steps; --resume continues)")
    a("--export", metavar="PATH", help="only write the latest checkpoint of --out_dir (or --checkpoint) as one fp32 "
                                       "file for msclip.load_checkpoint / eval.py, then exit")
    a("--checkpoint", help="with --export: a checkpoint folder (out/checkpoints/step_00000600)")
    a("--export_nonfinite", action="store_true", help="with --export: write the weights even if some hold NaN or "
                                                      "infinity (refused otherwise)")

    a = p.add_argument_group("monitoring").add_argument
    a("--log_every", type=int, default=10, help="progress line and metrics.jsonl record every N steps")
    a("--eval_every", type=int, help="zero-shot evaluation every N steps (default: 100 on the built-in data, else "
                                     "0 = only at the end; -1 = never)")
    a("--eval_samples", type=int, default=shapes.EVAL_SAMPLES, help="held-out renders of the built-in data's evaluation")
    a("--eval_dataset", action="append", default=[], metavar="[NAME=]PATH",
      help="run eval.py's zero-shot on this dataset at every evaluation (repeatable; NAME picks eval.py's bundled "
           "class names and templates, e.g. CIFAR10=/data/cifar10)")

    a = p.add_argument_group("DeepSpeed").add_argument
    a("--deepspeed_config", default=os.path.join(HERE, "ds_config.json"))
    a("--ds_set", action="append", default=[], metavar="KEY=JSON",
      help="set any ds_config value, e.g. zero_optimization.stage3_param_persistence_threshold=0 (repeatable)")
    a("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    a("--timeout_minutes", type=float, default=float(os.environ.get("DEEPSPEED_TIMEOUT", 60)),
      help="how long a rank waits for the others in a collective before the job fails (default: $DEEPSPEED_TIMEOUT "
           "or 60; room for an ImageNet-size evaluation and for writing large checkpoints to a shared file system)")
    a("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    return p


def check_args(parser, args, world_size):
    """Refuse what cannot run and fill in what the options imply (data type, accumulation, precision,
    evaluation schedule) in `args`, before DeepSpeed starts (--workers: in main, from the node's
    cores). Returns the model config."""
    # Model
    preset = args.preset or DEFAULT_PRESET
    overrides = dict(DEMO_OVERRIDES) if args.preset is None else {}
    overrides.update({k: getattr(args, k) for k in ("layers", "fusion_layers", "image_size") if getattr(args, k)})
    try:
        model_config = msclip.preset_config(preset, **overrides)
    except (ValueError, TypeError) as e:
        parser.error(f"--preset {preset} {overrides or ''}: {e}")
    if args.logit_scale_init is None and args.preset is None:
        args.logit_scale_init = DEMO_LOGIT_SCALE

    # Data
    if args.data_type == "auto":
        args.data_type = "synthetic" if not args.train_data else \
            "csv" if args.train_data.lower().endswith((".csv", ".tsv", ".txt")) else "webdataset"
    if args.data_type != "synthetic" and not args.train_data:
        parser.error(f"--data_type {args.data_type} needs --train_data")
    if args.data_type == "csv" and not os.path.isfile(args.train_data):
        parser.error(f"--train_data {args.train_data}: no such file")
    if args.data_type == "webdataset":
        shards = data.expand_shards(args.train_data)
        missing = data.missing_shards(shards)
        if not shards:
            parser.error(f"--train_data {args.train_data}: the pattern matches no file")
        if missing:
            parser.error(f"--train_data {args.train_data}: {len(missing)} of {len(shards)} shards not found "
                         f"(first: {missing[0]})")
        if len(shards) < world_size and not args.dataset_resampled:
            parser.error(f"{len(shards)} WebDataset shards cannot be split over {world_size} ranks without "
                         "duplication: use more shards or fewer ranks")
        if args.shuffle_buffer < 1 or args.interleave_shards < 1:
            parser.error("--shuffle_buffer and --interleave_shards must be >= 1")
        if args.steps is None and args.train_samples is None:
            parser.error("WebDataset shards have no known length: give --train_samples (samples per epoch) or --steps")
        if args.dataset_resampled and not args.train_samples:
            parser.error("--dataset_resampled draws shards for epochs of --train_samples samples: give --train_samples")
    elif args.dataset_resampled:
        parser.error("--dataset_resampled is for WebDataset shards")

    # Batch: micro-batch per rank x accumulation x ranks = global batch
    micro = args.batch_size
    if args.global_batch_size:
        if args.global_batch_size % (micro * world_size):
            parser.error(f"--global_batch_size {args.global_batch_size} is not a multiple of --batch_size {micro} x "
                         f"{world_size} ranks")
        accum = args.global_batch_size // (micro * world_size)
        if args.grad_accum and args.grad_accum != accum:
            parser.error(f"--global_batch_size {args.global_batch_size} != --batch_size {micro} x --grad_accum "
                         f"{args.grad_accum} x {world_size} ranks: give only two of them")
        args.grad_accum = accum
    args.grad_accum = args.grad_accum or 1
    if micro < 1 or args.grad_accum < 1:
        parser.error(f"--batch_size {micro} and --grad_accum {args.grad_accum} must be >= 1")
    if args.max_bad_steps < 0:
        parser.error("--max_bad_steps must be >= 0 (0: never stop)")
    args.global_batch_size = micro * args.grad_accum * world_size
    groups = hard_negative_groups(args)
    if groups:
        s, c = groups
        if not (s and c and len(shapes.SHAPES) % s == 0 and len(shapes.COLOURS) % c == 0
                and (micro * world_size) % (s * c) == 0):
            parser.error(f"--hard_negatives {args.hard_negatives}: give SxC with S dividing {len(shapes.SHAPES)} "
                         f"shapes, C dividing {len(shapes.COLOURS)} colours and S*C dividing the micro-batch over all "
                         f"ranks ({micro} x {world_size} = {micro * world_size}), or 'none'")

    # Length (map-style data without --steps: known once the dataset is read, in main)
    args.lr_shared = args.lr if args.lr_shared is None else args.lr_shared
    if args.steps is None and args.data_type == "synthetic" and args.epochs is None:
        args.steps = DEMO_STEPS
    args.epochs = args.epochs or 1
    if args.steps is None and args.data_type == "webdataset":
        args.steps = args.epochs * args.train_samples // args.global_batch_size

    # Precision: fp32 on CPU; bf16/fp16 where the hardware has them
    cuda = torch.cuda.is_available()
    if args.precision == "auto":
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if not cuda and args.precision == "fp16":
        parser.error("--precision fp16 is for GPUs (fp16 has no speed on CPUs and needs loss scaling): use fp32, or "
                     "bf16 where the CPU has bf16 units")
    if not cuda and args.precision == "bf16" and not cpu_has_bf16() and os.environ.get("RANK", "0") == "0":
        print("warning: --precision bf16 on a CPU without bf16 matrix instructions (AMX / AVX512-BF16) runs up to "
              "~100x slower than fp32", file=sys.stderr, flush=True)
    if args.precision == "fp16" and args.zero_stage > 0 and args.grad_clip > 0:
        # Measured (0.19.7, 0.19.8): ZeRO 1-3 clip by the norm of the gradients still multiplied by
        # the GradScaler's scale (DeepSpeed divides by its own loss scale, 1 under torch_autocast), so
        # every update shrinks ~65536x and the loss does not move.
        parser.error("--precision fp16 with gradient clipping trains nothing at ZeRO 1-3 in DeepSpeed 0.19 (its "
                     "clipping ignores torch_autocast's loss scale): use --precision bf16, --zero_stage 0, or "
                     "--grad_clip 0")

    if args.save_every < -1 or (args.save_every == -1 and args.stop_at):
        parser.error(f"--save_every {args.save_every}: give N >= 1 (every N steps), 0 (only at the end) or -1 (never; "
                     "not with --stop_at, which stops at a checkpoint)")
    half = args.precision in ("bf16", "fp16")
    if args.grad_reduce_dtype in ("bf16", "fp16") and args.grad_reduce_dtype != args.precision:
        parser.error(f"--grad_reduce_dtype {args.grad_reduce_dtype} needs --precision {args.grad_reduce_dtype} "
                     f"(the precision is {args.precision}): use fp32")
    if args.grad_reduce_dtype in ("bf16", "fp16") and args.zero_stage == 0:
        parser.error(f"--grad_reduce_dtype {args.grad_reduce_dtype}: ZeRO-0 sums the gradients in fp32 (DeepSpeed's "
                     "communication_data_type); the half type needs ZeRO 1-3")
    if args.grad_reduce_dtype is None:
        args.grad_reduce_dtype = args.precision if half and args.zero_stage == 3 else "fp32"

    if args.eval_every is None:
        args.eval_every = 100 if args.data_type == "synthetic" else 0
    return model_config


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def deepspeed_config(parser, args):
    """ds_config.json with the --ds_set KEY=JSON overrides, then the values the trainer sets from its
    options. bf16 and fp16 run through DeepSpeed's torch_autocast: the weights, their gradients and
    the optimizer's master copy stay fp32 at every ZeRO stage; matmuls and convolutions run in half
    precision; BatchNorm, LayerNorm, softmax and the loss stay fp32. (DeepSpeed's bf16/fp16 engines
    cast the parameters but not BatchNorm's buffers: MS-CLIP-S's BatchNorm then fails.)
    The sums of the gradients over ranks (--grad_reduce_dtype): torch_autocast would reduce the
    gradients of every Linear and Conv weight in the half type at ZeRO 1-3, whatever
    communication_data_type says, and the rest in fp32. At ZeRO 1 and 2 the trainer marks no module
    (lower_precision_safe_modules = []): every gradient is summed in fp32, as DDP and OpenCLIP do,
    since a bf16 sum over 64+ ranks loses the low bits of each addend. ZeRO-0 sums in fp32 anyway.
    At ZeRO-3 the same mark also makes the weight gathers half precision (half their traffic), so
    the trainer keeps DeepSpeed's marks there unless --grad_reduce_dtype fp32 is given."""
    try:
        with open(args.deepspeed_config) as f:
            config = json.load(f)
    except OSError as e:
        parser.error(f"--deepspeed_config {args.deepspeed_config}: {e.strerror}")
    except json.JSONDecodeError as e:
        parser.error(f"--deepspeed_config {args.deepspeed_config} is not valid JSON: {e}")
    for item in args.ds_set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--ds_set {item!r}: expected KEY=JSON")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        *parents, last = key.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    for key, option in TRAINER_KEYS.items():
        section, _, name = key.partition(".")
        if section in config and (not name or name in config[section]):
            parser.error(f"{args.deepspeed_config} (or --ds_set) sets {key!r}, which this trainer sets from {option}: "
                         "remove it there and use the option (the trainer builds AdamW with MS-CLIP's parameter groups "
                         "and its warm-up + cosine schedule itself)")
    config.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                  train_batch_size=args.global_batch_size, gradient_clipping=args.grad_clip)
    config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(args.precision)
    config["torch_autocast"] = {"enabled": True, "dtype": half} if half else {"enabled": False}
    if half and args.zero_stage > 0 and args.grad_reduce_dtype == "fp32":
        # torch_autocast marks the weights of these module types to be reduced (and, at ZeRO-3, gathered)
        # in the half type, whatever communication_data_type says: none marked, one fp32 bucket
        config["torch_autocast"]["lower_precision_safe_modules"] = []
    # Overlap ZeRO-2's gradient reduce-scatter with the backward pass (DeepSpeed's advice for stage 2;
    # at ZeRO-3 it stays off, as before, unless ds_config.json or --ds_set turn it on)
    config["zero_optimization"].setdefault("overlap_comm", args.zero_stage == 2)
    for monitor in ("tensorboard", "csv_monitor", "wandb"):  # next to the checkpoints unless ds_config names a folder
        if config.get(monitor, {}).get("enabled"):
            config[monitor].setdefault("output_path", os.path.join(args.out_dir, "monitor"))
            config[monitor].setdefault("job_name", "train_ds")
    config.setdefault("steps_per_print", 10 ** 9)
    return config


def check_out_dir(args, model_config, world_size):
    """Problems with --out_dir found before DeepSpeed starts (every rank reads the folder): a live run
    holds it, it is not writable, it holds checkpoints but --resume is missing, or its latest
    checkpoint was saved with another model, ZeRO stage or precision. Returns (problem or None, notes
    naming the options changed since the checkpoint)."""
    out_dir = args.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        holder = distributed.out_dir_holder(out_dir)
    except OSError as e:
        return f"--out_dir {out_dir} is not writable: {distributed.write_error(e, out_dir)}", []
    # A live holder is refused even when it is this job's own rank 0: a job runs one training per process,
    # so that can only be an earlier training of the same processes still finishing (a test harness runs
    # several; tests/_train_runs.py waits at a barrier after each); ignoring it would let two runs share a folder.
    if holder:
        return (f"--out_dir {out_dir} is in use by another training ({holder}): wait for it to finish, stop it, "
                "or choose another --out_dir"), []
    root, tag = distributed.checkpoint_root(out_dir), distributed.latest_checkpoint(out_dir)
    if tag and not args.resume:
        return f"{root} already holds checkpoints: pass --resume to continue them or choose another --out_dir", []
    if not tag:
        return None, []
    with open(os.path.join(root, tag, distributed.MARKER)) as f:
        saved = json.load(f)
    model = json.loads(json.dumps(vars(model_config)))
    blocking = [f"model {k}: saved {saved['msclip_config'].get(k)}, requested {v}"
                for k, v in model.items() if saved["msclip_config"].get(k) != v]
    blocking += [f"{k}: saved {saved['args'][k]}, requested {getattr(args, k)}" for k in ("zero_stage", "precision")
                 if saved["args"][k] != getattr(args, k)]
    if blocking:
        return (f"--resume: {root}/{tag} was saved with other settings: " + "; ".join(blocking) +
                ". Resume with the saved settings or choose another --out_dir"), []
    ignored = {"resume", "stop_at", "timeout_minutes", "local_rank", "deepspeed", "export", "checkpoint", "out_dir",
               "deepspeed_config"}
    changed = [f"--{k} {saved['args'].get(k)} -> {v}" for k, v in vars(args).items()  # None: resolved later (--workers)
               if k not in ignored and k in saved["args"] and v is not None and json.loads(json.dumps(v)) != saved["args"][k]]
    if saved["world_size"] != world_size:
        changed.append(f"ranks {saved['world_size']} -> {world_size}" + (
            " (the checkpoint is converted to DeepSpeed's universal format to re-partition ZeRO's states)"
            if args.zero_stage > 0 else ""))
    return None, [f"--resume {tag}: options changed since the checkpoint: {', '.join(changed)}"] if changed else []


def lr_lambda(warmup, total, start, end):
    """Linear warm-up from start x peak, then cosine from peak to end x peak: a function of the step only,
    so a resumed run continues on the same curve."""
    def factor(step):
        if step < warmup:
            return start + (1 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume(engine, source, args, world_size, log):
    """The run's progress: from the checkpoint `source` = (folder, tag) names, or a fresh start when the
    tag is None. Progress is what a checkpoint saves besides DeepSpeed's state: the step, the
    micro-batches consumed (map-style data), each DataLoader worker's WebDataset stream position, the
    skipped-sample counts, the data manifest (data.Manifest: what the run trained on); each rank's
    random state is restored too. The optimizer continues with this command line's learning rates,
    weight decays and schedule (continue_schedule)."""
    progress = {"step": 0, "micro_batches": 0, "stream": {}, "skipped": {}, "examples": {}, "saved_step": None,
                "data_manifest": data.Manifest.merge()}
    if not source[1]:
        if args.resume:
            log(f"--resume: no checkpoint in {source[0]}, starting from scratch")
        return progress
    settings = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    _, client = engine.load_checkpoint(*source)
    if source[1] == "universal":
        distributed.repair_universal_load(engine.optimizer)
    progress.update(step=client["step"], micro_batches=client["micro_batches"], skipped=dict(client["skipped"]),
                    saved_step=client["step"], data_manifest=client.get("data_manifest", data.Manifest.merge()))
    # a universal load gives every group group 0's settings (DeepSpeed 0.19.7, 0.19.8): nothing to compare with
    continue_schedule(engine.optimizer, engine.lr_scheduler, settings, progress["step"], log,
                      saved=source[1] != "universal")
    global_micro = args.batch_size * world_size
    if client["world_size"] == world_size:
        set_rng_state(client["rng"][torch.distributed.get_rank()])
        progress["stream"] = dict(client["stream"][torch.distributed.get_rank()])
    elif args.data_type == "webdataset":
        log(f"resuming on {world_size} ranks a run saved on {client['world_size']}: WebDataset streams restart at "
            "the start of the saved epoch")
        epochs = [e for positions in client["stream"] for e, _ in positions.values()]
        progress["stream"] = {-1: (min(epochs), 0)} if epochs else {}  # no worker -1: all start that epoch
    if client["global_micro_batch"] != global_micro and args.data_type != "webdataset":
        log(f"warning: micro-batch over all ranks was {client['global_micro_batch']}, now {global_micro}: the data "
            "order differs from an uninterrupted run")
    log(f"resumed {source[0]}/{source[1]} at step {progress['step']}")
    return progress


def continue_schedule(optimizer, schedule, settings, step, log, saved=True):
    """After load_checkpoint, which restores each parameter group's learning rate, weight decay and
    AdamW constants and the schedule's peak learning rates as saved: this run's `settings` (each
    group's, as this command line built them) from `step` on, on this run's schedule function
    (lr_lambda of its warm-up and --steps; LambdaLR saves no function), so that a changed --lr,
    --lr_shared, --wd, --wd_shared, --betas, --eps, warm-up, --min_lr_ratio or --steps is used, not
    only printed. Logs the values that changed (`saved`: the groups hold the checkpoint's values)."""
    before = [dict(g) for g in optimizer.param_groups]
    for group, new in zip(optimizer.param_groups, settings):
        group.update({k: v for k, v in new.items() if k != "lr"})  # initial_lr: the peak LambdaLR scales
    schedule.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    schedule.last_epoch = step - 1
    schedule.step()  # lr = peak x factor(step) in every group
    changes = {}
    for key, what in (("lr", "learning rate"), ("weight_decay", "weight decay"), ("betas", "betas"), ("eps", "eps")):
        for i, (old, group) in enumerate(zip(before, optimizer.param_groups)):
            if saved and old[key] != group[key]:
                changes.setdefault((what, repr(old[key]), repr(group[key])), []).append(group.get("name", str(i)))
    if changes:
        log(f"--resume: from step {step} on, this command line's settings: " + "; ".join(
            f"{what} {old} -> {new} ({', '.join(names)})" for (what, old, new), names in changes.items()))


def save_checkpoint(engine, args, progress, model_config, control):
    """DeepSpeed's checkpoint with every rank's random state and stream position in its client state,
    the run's data manifest (every rank's batches since the last checkpoint added) there and in
    data_manifest.json, and trainer_state.json saying what the run was (for --resume's checks and --export)."""
    world_size = torch.distributed.get_world_size()
    everyone = [None] * world_size
    # host objects over the gloo group: no pickled bytes through the GPUs, no device sync
    torch.distributed.all_gather_object(everyone, {"rng": rng_state(), "stream": progress["stream"],
                                                   "manifest": progress["manifest"].take()}, group=control)
    progress["data_manifest"] = data.Manifest.merge(progress["data_manifest"], *[e["manifest"] for e in everyone])
    step = progress["step"]
    client = {"step": step, "micro_batches": progress["micro_batches"], "world_size": world_size,
              "global_micro_batch": args.batch_size * world_size, "skipped": progress["skipped"],
              "rng": [e["rng"] for e in everyone], "stream": [e["stream"] for e in everyone],
              "data_manifest": progress["data_manifest"]}
    trainer_state = {"msclip_config": json.loads(json.dumps(vars(model_config))), "step": step,
                     "zero_stage": args.zero_stage, "precision": args.precision, "world_size": world_size,
                     "global_batch": args.global_batch_size, "args": vars(args)}
    distributed.save(engine, args.out_dir, step, client, trainer_state, args.keep, control,
                     {"data_manifest.json": json.dumps(progress["data_manifest"], indent=1)})
    progress["saved_step"] = step


def evaluate(engine, eval_sets, args, control):
    """Zero-shot top-1 (%) on each evaluation dataset, every rank encoding its part, every rank getting
    the result: with ZeRO-3's parameters whole and rank 0's BatchNorm statistics (those --export
    writes) on every rank."""
    model = engine.module
    with distributed.gathered(model), distributed.rank0_buffers(model):
        return evaluation.zero_shot_top1(model, eval_sets, str(engine.device), args.precision, args.workers, control)


def train(args, engine, loader, progress, model_config, eval_sets, stop, metrics, log):
    """The training loop, until --steps (or --stop_at) or a stop request: each step reads --grad_accum
    micro-batches, feeds them forward and backward (contrastive_step; DeepSpeed averages the gradients
    over ranks, clips and applies them at the last), clamps the logit scale, counts a bad step, then
    logs, evaluates and checkpoints on their schedules. The loss stays on the device between log
    steps; --max_bad_steps bad steps in a row stop the run there. Any exception stops the DataLoader
    workers on its way out, so that the rank exits."""
    dist, device, world_size = torch.distributed, engine.device, torch.distributed.get_world_size()
    loss_fn = msclip.ContrastiveLoss(gather_with_grad=True, local_loss=args.local_loss)
    whole_batch_negatives = args.grad_accum > 1 and not args.plain_grad_accum
    clamp_logit_scale = distributed.logit_scale_clamp(engine)  # after load_checkpoint: views of the fp32 master
    guard = distributed.DivergenceGuard(engine)
    last = min(args.steps, args.stop_at) if args.stop_at else args.steps
    epoch_size = len(loader.dataset) if args.data_type != "webdataset" else (args.train_samples or math.inf)
    started, window_start = time.time(), time.time()
    loss_sum, window_steps, skipped, waited = 0.0, 0, {}, 0.0
    batches = distributed.LoaderBatches(loader)
    try:
        while progress["step"] < last and not stop.agreed():
            lr = engine.lr_scheduler.get_last_lr()[0]
            step_batches = []
            for _ in range(args.grad_accum):
                waiting = time.perf_counter()  # host time only: the data wait needs no device sync
                images, tokens, skips, positions = next(batches)
                waited += time.perf_counter() - waiting
                for reason, where in skips:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    progress["examples"].setdefault(reason, where)
                for worker, epoch, place in positions:
                    progress["stream"][worker] = (epoch, place)
                step_batches.append((images, tokens))
            step_loss = contrastive_step(engine, loss_fn, step_batches, whole_batch_negatives)
            progress["micro_batches"] += args.grad_accum
            clamp_logit_scale()
            guard.step(step_loss)
            loss_sum = loss_sum + step_loss
            progress["step"] += 1
            window_steps += 1
            step = progress["step"]

            if step % args.log_every == 0 or step == last:  # the loop's only host reads
                counts = torch.tensor([skipped.get(r, 0) for r in data.SKIP_REASONS], dtype=torch.float64, device=device)
                dist.all_reduce(counts)
                for reason, n in zip(data.SKIP_REASONS, counts.tolist()):
                    progress["skipped"][reason] = progress["skipped"].get(reason, 0) + int(n)
                if counts.sum():
                    log(f"skipped so far: {progress['skipped']} (e.g. {progress['examples']})")
                bad, in_a_row = guard.read()
                elapsed = time.time() - window_start
                scale = distributed.logit_scale_value(engine)
                entry = {"step": step, "loss": float(loss_sum) / (window_steps * args.grad_accum), "lr": lr,
                         "logit_scale": scale, "pairs_per_s": window_steps * args.global_batch_size / max(elapsed, 1e-9),
                         "memory_gb": memory_gb(device), "data_wait": min(1.0, waited / max(elapsed, 1e-9)),
                         "epoch": progress["micro_batches"] * args.batch_size * world_size / epoch_size,
                         "skipped": dict(progress["skipped"]), "bad_steps": bad, "time": time.time() - started}
                record(metrics, entry)
                eta = (args.steps - step) * elapsed / window_steps
                log(f"step {step:>6}/{args.steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | logit scale {scale:.3f} | "
                    f"{entry['pairs_per_s']:,.0f} pairs/s | data wait {entry['data_wait']:.0%} | "
                    f"mem {entry['memory_gb']:.2f} GB | eta {format_time(eta)}"
                    + (f" | {bad} bad steps (non-finite loss or gradient), {in_a_row} in a row" if bad else ""))
                if engine.monitor.enabled and metrics:
                    engine.monitor.write_events([("Train/loss", entry["loss"], step), ("Train/logit_scale", scale, step),
                                                 ("Train/pairs_per_s", entry["pairs_per_s"], step)])
                if args.max_bad_steps and in_a_row >= args.max_bad_steps:  # every rank read the same counts
                    raise SystemExit(diverged(args, step, in_a_row) if dist.get_rank() == 0 else 1)
                loss_sum, window_steps, skipped, waited, window_start = 0.0, 0, {}, 0.0, time.time()

            if eval_sets and args.eval_every > 0 and step % args.eval_every == 0 and step < last:
                accuracy = evaluate(engine, eval_sets, args, stop.group)
                record(metrics, {"step": step, "zero_shot": accuracy, "time": time.time() - started})
                log(f"step {step:>6} | zero-shot top-1: " + ", ".join(f"{k} {v:.1f}%" for k, v in accuracy.items()))
                window_start = time.time()

            if args.save_every > 0 and step % args.save_every == 0 and step < last:
                save_checkpoint(engine, args, progress, model_config, stop.group)
                window_start = time.time()
    finally:
        batches.close()
    if progress["saved_step"] != progress["step"] and args.save_every >= 0:
        save_checkpoint(engine, args, progress, model_config, stop.group)


def diverged(args, step, in_a_row):
    """Why a run stopped at `step` (--max_bad_steps), and the checkpoint to continue from."""
    latest = distributed.latest_checkpoint_folder(args.out_dir)
    return (f"step {step}: {in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (--max_bad_steps "
            f"{args.max_bad_steps}): the run diverged. " +
            (f"The last good checkpoint is {latest} (`latest`): --resume continues from it (with, e.g., a lower "
             "--lr or a longer warm-up)." if latest else
             "No checkpoint was written: start again with, e.g., a lower --lr or a longer warm-up."))


def channels_last_images(model, inputs):
    """--channels_last: a forward pre-hook giving the model its images in NHWC memory order. The conv
    stem's and the branch's feature maps follow the input's order, the adapters' token grid is a
    view in that order (msclip.Adapter), and the maps flatten to tokens without a transpose copy."""
    images, *rest = inputs
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def contrastive_step(engine, loss_fn, micro_batches, whole_batch_negatives):
    """One optimizer step over this rank's micro-batches (uint8 images and tokens as the loader gives
    them, kept on the host): forward and backward of each, DeepSpeed applying the gradients after the
    last. Returns the sum of the micro-batches' losses (on the device).

    whole_batch_negatives (--grad_accum K > 1 without --plain_grad_accum): every pair of the K
    micro-batches of every rank is a negative of every other, as in one batch of K x micro x ranks
    (OpenCLIP's --accum-freq). Pass 1 encodes each micro-batch without gradient and keeps only its
    features. Pass 2 encodes each again with gradient, puts its features in place of their cached
    copy and back-propagates the loss over the whole block (gathered over ranks), not divided by K:
    the K gradients sum to the gradient of that one loss, and each logged loss is that loss.
    BatchNorm normalises each micro-batch with its own statistics in both passes; its running
    statistics move in pass 2 only, once per micro-batch, as without accumulation. Otherwise each
    micro-batch is its own contrastive batch and DeepSpeed averages the K gradients."""
    device = engine.device

    def encode(images, tokens):
        # normalised in fp32 on the device (torch_autocast casts inside the model); the tokens are
        # trimmed to the longest caption by data.collate
        features = engine(data.normalize_images(images, device, torch.float32), tokens.to(device, non_blocking=True))
        return [f.float() for f in features]

    if whole_batch_negatives:
        with torch.no_grad(), batchnorm_statistics_frozen(engine.module):
            cached_images, cached_texts = zip(*(encode(images, tokens)[:2] for images, tokens in micro_batches))
    loss_sum = 0.0
    for j, (images, tokens) in enumerate(micro_batches):
        image_features, text_features, logit_scale = encode(images, tokens)
        if whole_batch_negatives:
            image_features = torch.cat([*cached_images[:j], image_features, *cached_images[j + 1:]])
            text_features = torch.cat([*cached_texts[:j], text_features, *cached_texts[j + 1:]])
            # The logit scale is live in all K losses (each micro-batch's features in one only): each
            # of its K gradients is already the whole one
            logit_scale.register_hook(lambda grad: grad / len(micro_batches))
        loss = loss_fn(image_features, text_features, logit_scale)
        engine.backward(loss, scale_wrt_gas=not whole_batch_negatives)
        engine.step()
        loss_sum = loss_sum + loss.detach()
    return loss_sum


@contextlib.contextmanager
def batchnorm_statistics_frozen(model):
    """BatchNorm in train mode normalises with the batch's own statistics but leaves its running
    statistics and num_batches_tracked as they are (PyTorch's behaviour with track_running_stats off)."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def record(metrics, entry):
    """One line of metrics.jsonl (rank 0 holds the file; other ranks None), strict JSON: a NaN or
    infinite value (a diverging run's loss) is written as null."""
    if metrics:
        metrics.write(json.dumps(finite_or_null(entry), allow_nan=False) + "\n")
        metrics.flush()


def read_metrics(out_dir):
    """A run's metrics.jsonl (as record wrote it): (step records, evaluation records), in order. A
    resumed run trims the file to its checkpoint first (distributed.trim_metrics): each step once."""
    steps, evals = [], []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            (evals if "zero_shot" in entry else steps).append(entry)
    return steps, evals


def finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS (KiB on Linux)


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def hard_negative_groups(args):
    """--hard_negatives SxC as (S, C), or None for uniformly random batches; (0, 0) when it is not of
    the form SxC (check_args refuses it, and any S or C that does not divide the data)."""
    if args.data_type != "synthetic" or args.hard_negatives in ("none", "0", ""):
        return None
    match = re.fullmatch(r"(\d+)x(\d+)", args.hard_negatives)
    return tuple(map(int, match.groups())) if match else (0, 0)


def export_only(parser, args):
    """--export: the latest (or the --checkpoint) complete checkpoint as one fp32 file, in this process
    (no process group, no DeepSpeed engine)."""
    folder = args.checkpoint or distributed.latest_checkpoint_folder(args.out_dir)
    if folder is None or not os.path.isfile(os.path.join(folder, distributed.MARKER)):
        parser.error("--export: no complete checkpoint in " +
                     (args.checkpoint or distributed.checkpoint_root(args.out_dir)))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        distributed.export(folder, args.export, allow_nonfinite=args.export_nonfinite)
    except ValueError as e:
        parser.error(f"--export: {e}")
    print(f"exported {folder} -> {args.export}")


def main(argv=None):
    started = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.export:
        return export_only(parser, args)
    try:  # srun / mpirun / PMI variables as torch.distributed's (set in os.environ before it starts)
        launcher, variables = distributed.launcher_environment(os.environ)
    except ValueError as e:
        parser.error(str(e))
    world_size = int(variables["WORLD_SIZE"])

    # Everything checked before DeepSpeed starts, so that a bad option, folder or file fails in seconds
    model_config = check_args(parser, args, world_size)
    ds_config = deepspeed_config(parser, args)
    problem, notes = check_out_dir(args, model_config, world_size)
    if problem:
        parser.error(problem)
    specs = (["synthetic-shape", "synthetic-colour"] if args.data_type == "synthetic" else []) + args.eval_dataset
    try:
        dataset = data.open_train_data(args.data_type, args.train_data, model_config.image_size, args.seed,
                                       args.synthetic_samples, args.csv_separator, args.csv_img_key,
                                       args.csv_caption_key, args.shuffle_buffer, args.interleave_shards,
                                       args.train_samples if args.dataset_resampled else None)
        eval_sets = [evaluation.open_named_dataset(s, args.eval_samples, model_config.image_size) for s in specs]
    except ValueError as e:
        parser.error(str(e))
    if args.data_type != "webdataset" and len(dataset) < args.batch_size * world_size:  # map-style data
        parser.error(f"--train_data: {len(dataset)} samples make no micro-batch of {args.batch_size} x {world_size} "
                     f"rank(s): use a smaller --batch_size or more data")
    if args.steps is None:  # map-style data: whole optimizer steps per epoch
        args.steps = args.epochs * (len(dataset) // (args.batch_size * world_size) // args.grad_accum)
        if args.steps < 1:
            parser.error(f"{len(dataset)} samples make no optimizer step of {args.global_batch_size} pairs")
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_fraction * args.steps)
    warnings.filterwarnings("ignore", category=FutureWarning)  # ZeRO-3 and all_gather deprecation notices

    # The process group; rank 0 takes --out_dir's lock and picks the checkpoint every rank resumes
    os.environ.update(variables)
    launchers = distributed.launcher_processes() if launcher else []
    deepspeed, device = distributed.init_distributed(args.timeout_minutes)
    rank = torch.distributed.get_rank()
    # host-side agreement, no device synchronisation; its collectives give up after --timeout_minutes
    # as the main group's do (a new group's default is torch's 30 minutes)
    control = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(minutes=args.timeout_minutes))
    lock, tag, problem = distributed.claim_out_dir(args.out_dir, args.resume, control)
    if problem:
        parser.error(problem) if rank == 0 else sys.exit(2)
    stop = distributed.StopRequests(control, launchers)
    workers_why = "--workers"
    if args.workers is None:
        args.workers, workers_why = data.default_workers(*distributed.node_cores(control), torch.cuda.is_available())
    log = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)
    for note in notes:
        log(note)

    # The model (the same initial weights on every rank), AdamW with MS-CLIP's parameter groups, the
    # warm-up + cosine schedule, DeepSpeed's engine around them, then the checkpoint to continue
    torch.manual_seed(args.seed)
    model = msclip.MSCLIP(model_config)
    if args.logit_scale_init is not None:
        model.logit_scale.data.fill_(args.logit_scale_init)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if args.zero_stage == 3:
        distributed.register_orphan_parameters(model)
    if args.channels_last:  # the images, and so every conv feature map after them (the weights stay as ZeRO holds them)
        model.register_forward_pre_hook(channels_last_images)
    scale = world_size if args.scale_lr else 1
    optimizer = model.configure_optimizers(args.lr * scale, args.wd, args.lr_shared * scale, args.wd_shared,
                                           betas=args.betas, eps=args.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup, args.steps, args.warmup_start_ratio, args.min_lr_ratio))
    source = distributed.resume_source(args.out_dir, tag, world_size, args.zero_stage, control, log)
    if source[1] == "universal":
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(args=argparse.Namespace(device_rank=device) if device is not None else None,
                                           model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    if args.compile:
        engine.compile(backend=args.compile)  # nn.Module.compile of the model: its call, hooks included
    if args.precision != "fp32" and not getattr(engine, "torch_autocast_enabled", lambda: False)():
        raise SystemExit(f"--precision {args.precision} needs DeepSpeed's torch_autocast with ZeRO (0.17.2 or later); "
                         f"DeepSpeed {deepspeed.__version__} would train in fp32")
    progress = resume(engine, source, args, world_size, log)

    loader = data.train_loader(dataset, args.batch_size, rank, world_size, args.workers, args.seed,
                               progress["micro_batches"], dict(progress["stream"]), hard_negative_groups(args),
                               pin_memory=engine.device.type == "cuda", log=log)
    progress["manifest"] = loader.manifest  # this rank's batches since the last checkpoint
    metrics = None
    if rank == 0:
        distributed.trim_metrics(os.path.join(args.out_dir, "metrics.jsonl"), progress["step"])
        metrics = open(os.path.join(args.out_dir, "metrics.jsonl"), "a")
    c = model_config
    negatives = ", plain: negatives within each micro-batch" if args.plain_grad_accum and args.grad_accum > 1 else ""
    log(f"MS-CLIP {args.preset or DEFAULT_PRESET}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, {c.layers} layers, width {c.vision_width}, {c.image_size} px | {args.data_type} data | ZeRO "
        f"{args.zero_stage}, {args.precision}, {world_size} rank(s) on {engine.device.type} | {args.steps} steps x "
        f"{args.global_batch_size} pairs ({args.batch_size} per rank x {args.grad_accum} accumulation{negatives}), "
        f"lr {args.lr:g} (shared {args.lr_shared:g}), warm-up {warmup} | {args.workers} DataLoader worker(s) per rank "
        f"({workers_why})")

    # Train; then export and the final evaluation, or, when asked to stop, only the checkpoint
    # (schedulers SIGKILL about 30 s after their notice)
    try:
        train(args, engine, loader, progress, model_config, eval_sets, stop, metrics, log)
        folder = distributed.latest_checkpoint_folder(args.out_dir) if args.save_every >= 0 else None
        result = {"steps": progress["step"], "checkpoint": folder, "skipped": progress["skipped"]}
        if progress["step"] < args.steps:
            if stop.reason:
                print(f"rank {rank}: {stop.reason}", flush=True)
            log(f"stopped at step {progress['step']} of {args.steps}: " +
                (f"checkpoint {folder}; continue with --resume" if folder else "no checkpoint (--save_every -1)"))
            return {**result, "stopped": True}
        result["export"] = os.path.join(args.out_dir, "msclip.pt") if folder else None
        if rank == 0 and folder:
            distributed.export(folder, result["export"])
        if eval_sets and args.eval_every >= 0:
            accuracy = result["zero_shot"] = evaluate(engine, eval_sets, args, control)
            record(metrics, {"step": progress["step"], "zero_shot": accuracy, "time": time.time() - started})
            log("zero-shot top-1 (eval.py's definition, %): " + ", ".join(f"{k} {v:.1f}" for k, v in accuracy.items())
                + (f" (chance: shape {100 / len(shapes.SHAPES):.1f}, colour {100 / len(shapes.COLOURS):.1f})"
                   if args.data_type == "synthetic" else ""))
        torch.distributed.barrier()
        log(f"done: {progress['step']} steps in {format_time(time.time() - started)}; " +
            (f"checkpoint {folder}; weights for msclip.load_checkpoint / eval.py: {result['export']}" if folder else
             "no checkpoint written (--save_every -1)"))
        return result
    finally:
        if metrics:
            metrics.close()
        if lock:
            lock.close()


if __name__ == "__main__":
    main()
