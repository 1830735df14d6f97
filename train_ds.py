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

srun, mpirun and torchrun start it as well (one process per GPU; rank, world size and local rank are
read from whichever launcher's variables are set, see LAUNCHERS):

    srun python train_ds.py --preset msclip-s-b16 --train_data "shards/{00000..01023}.tar" ...
    mpirun -np 16 -H node1:8,node2:8 -x MASTER_ADDR=node1 python train_ds.py ...

Stop it any time and continue exactly where it was with --resume (same output folder); turn the
latest checkpoint into one fp32 file for msclip.load_checkpoint / eval.py with --export:

    deepspeed train_ds.py --out_dir out --resume
    python train_ds.py --out_dir out --export out/msclip.pt

ds_config.json holds the DeepSpeed settings (ZeRO stage, precision, clipping, accumulation,
monitors); every value the trainer sets there can be overridden from the command line (--help).
"""
import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
import types
import warnings

import numpy as np
import torch

import data
import eval as evaluation
import msclip


# ----------------------------------------------------------------------------------------------
# Options: command line > ds_config.json > built-in defaults
# ----------------------------------------------------------------------------------------------

# The CPU demo model when --preset is not given: MS-CLIP-S tiny with a 16-pixel grid (4 x 4 tokens
# at 64 px; the 32-pixel grid's 2 x 2 tokens learned shape about half as fast, measured) and the
# fewest layers that hold the five fusion points. Its logit scale starts at the ln(100) clamp.
DEFAULT_PRESET = "msclip-s-tiny-b16"
DEMO_OVERRIDES = {"layers": 7, "fusion_layers": (2, 3, 4, 5, 6)}
DEMO_LOGIT_SCALE = math.log(100)
DEMO_STEPS = 600
HERE = os.path.dirname(os.path.abspath(__file__))


def int_list(text):
    return tuple(int(v) for v in text.split(","))


def build_parser():
    p = argparse.ArgumentParser(description="Pre-train MS-CLIP with DeepSpeed (see the module docstring for launch "
                                            "commands). Options left unset come from ds_config.json, then from defaults.")
    add_model_and_data_options(p)
    add_optimisation_options(p)
    add_run_options(p)
    return p


def add_model_and_data_options(p):
    a = p.add_argument_group("model").add_argument
    a("--preset", default=None, help=f"msclip.PRESETS name: {', '.join(msclip.PRESETS)}. Default: {DEFAULT_PRESET} "
                                     f"with {DEMO_OVERRIDES} (the CPU demo)")
    a("--layers", type=int, help="override the preset's depth (then also --fusion_layers for MS-CLIP-S)")
    a("--fusion_layers", type=int_list, help="comma-separated layers that get a parallel-branch adapter (5 values)")
    a("--image_size", type=int, help="override the preset's image size")
    a("--logit_scale_init", type=float, help="initial log inverse temperature (default: the model's, 1.0 as the "
                                             f"official code; CLIP used 2.659; the demo model {DEMO_LOGIT_SCALE:.3f})")
    a("--grad_checkpointing", action="store_true", help="recompute transformer layers in backward (less memory)")
    a("--local_loss", action="store_true", help="each rank scores only its own rows against all columns (less memory)")

    a = p.add_argument_group("data").add_argument
    a("--train_data", help="a .csv/.tsv file (image path, caption) or WebDataset shards ('dir/{00000..01023}.tar', "
                           "'::' joins patterns). Default: the built-in procedural shapes data")
    a("--data_type", choices=["auto", "synthetic", "csv", "webdataset"], default="auto")
    a("--csv_separator", default="\t", help="column separator of --train_data CSV (OpenCLIP's default: tab)")
    a("--csv_img_key", default="filepath", help="image-path column")
    a("--csv_caption_key", default="title", help="caption column")
    a("--train_samples", type=int, help="samples per epoch of WebDataset shards (needed with --epochs)")
    a("--synthetic_samples", type=int, default=len(data.SHAPES) * len(data.COLOURS) * 1000,
      help="size of the built-in data")
    a("--hard_negatives", default="none", metavar="SxC",
      help="built-in data: batches made of groups of S shapes x C colours drawn with the same layout and "
           "wording, so that pairs differ only in shape or colour ('none': uniformly random batches)")
    a("--workers", type=int, help="DataLoader workers per rank (default: 1 on CPU, 4 on GPU)")
    a("--shuffle_buffer", type=int, default=5000, help="WebDataset: undecoded samples in each DataLoader worker's "
                                                        "shuffle buffer, which spans shard boundaries (OpenCLIP: 5000)")
    a("--interleave_shards", type=int, default=8, help="WebDataset: shards each worker reads at once, drawing samples "
                                                       "from them at random (a resume re-reads at most these)")


def add_optimisation_options(p):
    a = p.add_argument_group("optimisation (unset values come from ds_config.json)").add_argument
    a("--steps", type=int, help=f"optimizer steps in all (default: --epochs, or {DEMO_STEPS} on the built-in data)")
    a("--epochs", type=int, help="passes over the data (default 1 for CSV and WebDataset)")
    a("--batch_size", type=int, help="micro-batch per rank (train_micro_batch_size_per_gpu)")
    a("--global_batch_size", type=int, help="pairs per optimizer step over all ranks (train_batch_size); the "
                                            "gradient accumulation follows from it")
    a("--grad_accum", type=int, help="gradient accumulation steps")
    a("--lr", type=float, help="peak learning rate")
    a("--lr_shared", type=float, help="peak learning rate of the weights images and text share")
    a("--wd", type=float, help="weight decay (not on norms, biases, embeddings, logit scale)")
    a("--wd_shared", type=float, help="weight decay of the shared weight matrices")
    a("--betas", type=lambda t: tuple(float(v) for v in t.split(",")), help="AdamW betas, e.g. 0.9,0.98")
    a("--eps", type=float, help="AdamW eps")
    a("--scale_lr", action="store_true", help="multiply lr and lr_shared by the number of ranks (MS-CLIP's SCALE_LR)")
    a("--warmup_steps", type=int, help="linear warm-up steps (default: warmup_fraction of the steps)")
    a("--min_lr_ratio", type=float, help="the cosine ends at this fraction of the peak learning rate")
    a("--grad_clip", type=float, help="clip the global gradient norm (gradient_clipping)")
    a("--zero_stage", type=int, choices=[0, 1, 2, 3], help="ZeRO stage")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="auto: bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPU")
    a("--ds_set", action="append", default=[], metavar="KEY=JSON",
      help="set any ds_config value, e.g. zero_optimization.stage3_param_persistence_threshold=0 (repeatable)")
    a("--seed", type=int, default=0)


def add_run_options(p):
    """Checkpoints, monitoring, DeepSpeed."""
    a = p.add_argument_group("checkpoints").add_argument
    a("--out_dir", default="out", help="checkpoints, metrics.jsonl, DeepSpeed monitor files and the exported weights")
    a("--save_every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    a("--keep", type=int, default=2, help="complete checkpoints kept")
    a("--resume", action="store_true", help="continue from the latest complete checkpoint in --out_dir (fresh start "
                                            "when there is none)")
    a("--stop_at", type=int, help="checkpoint and stop at this step, e.g. to fit a job's time limit (the schedule "
                                   "still spans --steps; --resume continues)")
    a("--export", metavar="PATH", help="only write the latest checkpoint of --out_dir (or --checkpoint) as one fp32 "
                                       "file for msclip.load_checkpoint / eval.py, then exit")
    a("--checkpoint", help="with --export: a checkpoint folder (out/checkpoints/step_00000600)")

    a = p.add_argument_group("monitoring").add_argument
    a("--log_every", type=int, default=10, help="progress line and metrics.jsonl record every N steps")
    a("--eval_every", type=int, help="zero-shot on the built-in held-out split every N steps (default: 100 on the "
                                     "built-in data, 0 = only at the end, -1 = never)")
    a("--eval_samples", type=int, default=512, help="held-out renders per evaluation")
    a("--eval_dataset", action="append", default=[], metavar="[NAME=]PATH",
      help="also run eval.py's zero-shot on this dataset at every evaluation (repeatable; NAME picks eval.py's "
           "bundled class names and templates, e.g. CIFAR10=/data/cifar10; eval.py's synthetic-shape and "
           "synthetic-colour use --eval_samples renders)")

    a = p.add_argument_group("DeepSpeed").add_argument
    a("--deepspeed_config", default=os.path.join(HERE, "ds_config.json"))
    a("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    a("--timeout_minutes", type=float, default=float(os.environ.get("DEEPSPEED_TIMEOUT", 60)),
      help="how long a rank waits for the others in a collective before the job fails (default: $DEEPSPEED_TIMEOUT "
           "or 60; room for an ImageNet-size evaluation and for writing large checkpoints to a shared file system)")
    a("--deepspeed", action="store_true", help=argparse.SUPPRESS)


def set_path(config, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def set_precision(config, precision):
    """bf16 and fp16 through DeepSpeed's torch_autocast: the weights, their gradients and the optimizer's
    master copy stay fp32 at every ZeRO stage; matmuls and convolutions run in half precision; BatchNorm,
    LayerNorm (msclip.LayerNorm), softmax and the loss stay fp32. DeepSpeed's bf16/fp16 engines instead
    cast the parameters, not the buffers, to half precision: BatchNorm then fails (README, Precision).
    fp16 scales the loss with torch's GradScaler (inside DeepSpeed)."""
    for mode in ("bf16", "fp16"):
        config.setdefault(mode, {})["enabled"] = False
    autocast = config.setdefault("torch_autocast", {})
    autocast["enabled"] = precision in ("bf16", "fp16")
    if autocast["enabled"]:
        autocast["dtype"] = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    return config


def read_ds_config(fail, args):
    """ds_config.json with the --ds_set KEY=JSON overrides applied."""
    try:
        with open(args.deepspeed_config) as f:
            config = json.load(f)
    except OSError as e:
        fail(f"--deepspeed_config {args.deepspeed_config}: {e.strerror}")
    except json.JSONDecodeError as e:
        fail(f"--deepspeed_config {args.deepspeed_config} is not valid JSON: {e}")
    for item in args.ds_set:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--ds_set {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        set_path(config, key, value)
    return config


def model_plan(fail, args):
    preset = args.preset or DEFAULT_PRESET
    if preset not in msclip.PRESETS:
        fail(f"--preset {preset!r} is unknown; choose one of: {', '.join(msclip.PRESETS)}")
    overrides = dict(DEMO_OVERRIDES) if args.preset is None else {}
    for name in ("layers", "fusion_layers", "image_size"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    try:
        model_config = msclip.MSCLIPConfig(**{**msclip.PRESETS[preset], **overrides})
    except (ValueError, TypeError) as e:
        fail(f"model {preset} with {overrides}: {e}")
    return {"preset": preset, "overrides": overrides, "model_config": model_config}


def data_plan(fail, args, world_size):
    kind = args.data_type
    if kind == "auto":
        kind = "synthetic" if not args.train_data else \
            "csv" if args.train_data.lower().endswith((".csv", ".tsv", ".txt")) else "webdataset"
    if kind != "synthetic" and not args.train_data:
        fail(f"--data_type {kind} needs --train_data")
    if kind == "csv" and not os.path.isfile(args.train_data):
        fail(f"--train_data {args.train_data}: no such file")
    shards = []
    if kind == "webdataset":
        shards = data.expand_shards(args.train_data)
        missing = [s for s in shards if not os.path.isfile(s)]
        if not shards:
            fail(f"--train_data {args.train_data}: the pattern matches no file")
        if missing:
            fail(f"--train_data {args.train_data}: {len(missing)} of {len(shards)} shards not found "
                 f"(first: {missing[0]})")
        if len(shards) < world_size:
            fail(f"{len(shards)} WebDataset shards cannot be split over {world_size} ranks without duplication: "
                 "use more shards or fewer ranks")
        if args.shuffle_buffer < 1 or args.interleave_shards < 1:
            fail("--shuffle_buffer and --interleave_shards must be >= 1")
        if args.steps is None and args.train_samples is None:
            fail("WebDataset shards have no known length: give --train_samples (samples per epoch) or --steps")
    return {"kind": kind, "shards": shards}


def batch_plan(fail, args, config, world_size, kind):
    """Micro-batch per rank x accumulation x ranks = global batch, written into the DeepSpeed config;
    the hard-negative groups of the built-in data."""
    micro = args.batch_size or config.get("train_micro_batch_size_per_gpu") or 64
    global_batch = args.global_batch_size or config.get("train_batch_size")
    accum = args.grad_accum or (None if global_batch else config.get("gradient_accumulation_steps") or 1)
    if global_batch:
        if global_batch % (micro * world_size):
            fail(f"global batch {global_batch} is not a multiple of batch_size {micro} x {world_size} ranks: change "
                 "--global_batch_size (train_batch_size), --batch_size or the number of ranks")
        if accum and accum * micro * world_size != global_batch:
            fail(f"global batch {global_batch} != batch_size {micro} x grad_accum {accum} x {world_size} ranks: "
                 "give only two of them")
        accum = global_batch // (micro * world_size)
    if micro < 1 or accum < 1:
        fail(f"batch_size {micro} and grad_accum {accum} must be >= 1")
    groups = None
    if kind == "synthetic" and args.hard_negatives not in ("none", "0", ""):
        match = re.fullmatch(r"(\d+)x(\d+)", args.hard_negatives)
        shapes, colours = map(int, match.groups()) if match else (0, 0)
        if not (shapes and colours and len(data.SHAPES) % shapes == 0 and len(data.COLOURS) % colours == 0
                and (micro * world_size) % (shapes * colours) == 0):
            fail(f"--hard_negatives {args.hard_negatives}: give SxC with S dividing {len(data.SHAPES)} shapes, C dividing "
                 f"{len(data.COLOURS)} colours and S*C dividing the micro-batch over all ranks ({micro} x {world_size} = "
                 f"{micro * world_size}), or 'none'")
        groups = (shapes, colours)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        config.pop(key, None)
    config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                  train_batch_size=micro * accum * world_size)
    return {"micro": micro, "accum": accum, "global_batch": micro * accum * world_size, "groups": groups}


def optimization_plan(args, config, world_size, kind, global_batch):
    """AdamW and the schedule (the trainer builds both: MS-CLIP's parameter groups, no op compiles)
    and the length of the run."""
    opt = (config.pop("optimizer", None) or {}).get("params", {})
    sched = (config.pop("scheduler", None) or {}).get("params", {})
    pick = lambda cli, key, default: cli if cli is not None else opt.get(key, default)  # noqa: E731
    lr = pick(args.lr, "lr", 1e-3)
    lr_shared = pick(args.lr_shared, "lr_shared", lr)
    scale = world_size if args.scale_lr else 1
    plan = dict(lr=lr * scale, lr_shared=lr_shared * scale, wd=pick(args.wd, "weight_decay", 0.05),
                wd_shared=pick(args.wd_shared, "weight_decay_shared", 0.2),
                betas=tuple(pick(args.betas, "betas", (0.9, 0.98))), eps=pick(args.eps, "eps", 1e-6),
                warmup_start=sched.get("warmup_min_ratio", 0.01),
                min_lr_ratio=args.min_lr_ratio if args.min_lr_ratio is not None else sched.get("cos_min_ratio", 0.1))
    if args.grad_clip is not None:
        config["gradient_clipping"] = args.grad_clip
    if args.steps is not None:
        steps = args.steps
    elif kind == "synthetic" and args.epochs is None:
        steps = DEMO_STEPS
    else:
        per_epoch = (args.train_samples if kind == "webdataset" else None)
        plan["epochs"] = args.epochs or 1
        steps = None if per_epoch is None else plan["epochs"] * per_epoch // global_batch
    plan["steps"] = steps  # None: map-style data, known once the dataset is read
    plan["warmup_steps"] = args.warmup_steps if args.warmup_steps is not None else sched.get("warmup_num_steps")
    plan["warmup_fraction"] = sched.get("warmup_fraction", 0.1)
    return plan


def precision_plan(fail, args, config):
    """Precision (fp32 on CPU; bf16/fp16 where the hardware has them) and the ZeRO stage."""
    cuda = torch.cuda.is_available()
    precision = args.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if not cuda and precision == "fp16":
        fail("--precision fp16 is for GPUs (fp16 has no speed on CPUs and needs loss scaling): use fp32, or bf16 "
             "where the CPU has bf16 units")
    if not cuda and precision == "bf16" and not cpu_has_bf16() and os.environ.get("RANK", "0") == "0":
        print("warning: --precision bf16 on a CPU without bf16 matrix instructions (AMX / AVX512-BF16) runs up to "
              "~100x slower than fp32", file=sys.stderr, flush=True)
    set_precision(config, precision)
    zero = config.setdefault("zero_optimization", {})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero_stage = zero.setdefault("stage", 0)
    config.setdefault("gradient_clipping", 1.0)  # DeepSpeed's default
    if precision == "fp16" and zero_stage > 0 and config["gradient_clipping"] > 0:
        # Measured (0.19.7, 0.19.8): ZeRO 1-3 clip by the norm of the gradients still multiplied by
        # the GradScaler's scale (DeepSpeed divides by its own loss scale, 1 under torch_autocast), so
        # every update shrinks ~65536x and the loss does not move.
        fail("--precision fp16 with gradient clipping trains nothing at ZeRO 1-3 in DeepSpeed 0.19 (its clipping "
             "ignores torch_autocast's loss scale): use --precision bf16, --zero_stage 0, or --grad_clip 0")
    return {"precision": precision, "zero_stage": zero_stage}


def resolve(parser, args, world_size):
    """Check the options and merge them with ds_config.json. Returns (plan dict, DeepSpeed config)
    or exits with a message that says what to change. Runs before DeepSpeed is imported."""
    fail = parser.error
    config = read_ds_config(fail, args)
    plan = {**model_plan(fail, args), **data_plan(fail, args, world_size)}
    plan.update(batch_plan(fail, args, config, world_size, plan["kind"]))
    plan.update(optimization_plan(args, config, world_size, plan["kind"], plan["global_batch"]))
    plan.update(precision_plan(fail, args, config))
    # Monitors write next to the checkpoints unless ds_config names a folder
    for monitor in ("tensorboard", "csv_monitor", "wandb"):
        if config.get(monitor, {}).get("enabled"):
            config[monitor].setdefault("output_path", os.path.join(args.out_dir, "monitor"))
            config[monitor].setdefault("job_name", "train_ds")
    config.setdefault("steps_per_print", 10 ** 9)
    plan["eval_every"] = args.eval_every if args.eval_every is not None else (100 if plan["kind"] == "synthetic" else 0)
    plan["workers"] = args.workers if args.workers is not None else (4 if torch.cuda.is_available() else 1)
    return plan, config


def lr_lambda(warmup, total, start, end):
    """Linear warm-up from start x peak, then cosine from peak to end x peak: a function of the step only,
    so a resumed run continues on the same curve."""
    def factor(step):
        if step < warmup:
            return start + (1 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------------------------
# DeepSpeed: process group, engine, logit-scale clamp
# ----------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where each launcher puts (global rank, world size, local rank, processes on this node), in
# OpenCLIP's order: torchrun / deepspeed / torch.distributed.launch, then srun, mpirun (OpenMPI),
# and other PMI-based MPIs (MPICH, Intel MPI).
LAUNCHERS = (("torchrun or deepspeed", ("RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))),
             ("srun", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                       ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"))),
             ("mpirun", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                         ("OMPI_COMM_WORLD_LOCAL_SIZE",))),
             ("MPI (PMI)", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS",))))
DEFAULT_MASTER_PORT = 29500


def first_host(nodelist):
    """The first host of a SLURM node list in its compressed form: 'gpu[003-010,017],cpu1' -> 'gpu003'
    (every bracket of the first entry replaced by its first number, zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end].strip())


def launcher_environment(env):
    """(launcher name or None, the variables torch.distributed reads: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR and, when known, MASTER_PORT) for this process, from whichever
    launcher started it (see LAUNCHERS), or one process when none did. Raises ValueError saying what
    to export when the rendezvous address cannot be known."""
    found = next(((name, keys) for name, keys in LAUNCHERS if keys[0] in env and keys[1] in env), None)
    if found is None:  # plain `python train_ds.py`: one process, on a free port
        alone = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1")}
        return None, {**alone, **({"MASTER_PORT": env["MASTER_PORT"]} if "MASTER_PORT" in env else {})}
    name, (rank, world, local, local_size) = found
    if local not in env:
        raise ValueError(f"{name} gave {rank} but not {local}: export LOCAL_RANK (this process's index on its node)")
    out = {"RANK": env[rank], "WORLD_SIZE": env[world], "LOCAL_RANK": env[local]}
    per_node = re.match(r"\d+", next((env[k] for k in local_size if env.get(k)), ""))  # SLURM: '4(x2)' -> 4
    out["LOCAL_WORLD_SIZE"] = per_node.group(0) if per_node else "1"
    address = env.get("MASTER_ADDR")
    if not address and name == "srun":
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        address = first_host(nodes) if nodes else None
    if not address and out["LOCAL_WORLD_SIZE"] == out["WORLD_SIZE"]:  # every rank on this node
        address = "127.0.0.1"
    if not address:
        raise ValueError(f"started by {name} on several nodes without MASTER_ADDR: export MASTER_ADDR=<first node's "
                         "hostname> (and MASTER_PORT, default " f"{DEFAULT_MASTER_PORT}) to every process, e.g. "
                         "`mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...`")
    out.update(MASTER_ADDR=address, MASTER_PORT=env.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)))
    return name, out


def init_distributed(timeout_minutes):
    """Join (or, under plain `python`, create) the process group: nccl on GPUs, gloo on CPU. The
    launcher's variables are in os.environ already (main() sets them from launcher_environment)."""
    os.environ.setdefault("MASTER_PORT", str(free_port()))  # one process: any free port
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import datetime
    import deepspeed
    from deepspeed.utils import logger
    logger.setLevel("WARNING")
    if not cuda:
        # The shared-memory all-reduce op is for inference; training never calls it. Without this the
        # first run on a machine sits 1-3 minutes compiling it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "OMP_NUM_THREADS" not in os.environ:  # launchers leave it unset: ranks would fight over cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process on its node
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return deepspeed


def register_orphan_parameters(model):
    """ZeRO-3 gathers a module's parameters when its forward runs. encode_image/encode_text read
    the class token, positions and projections of modules whose forward never runs: declare them
    as used by the model's own forward."""
    import deepspeed
    for module in (model.image, model.text):
        for parameter in module.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, parameter)


def logit_scale_clamp(engine, maximum=math.log(100)):
    """A function that clamps the logit scale at ln(100) after a step in every copy the engine
    keeps: the model's parameter (at ZeRO-3 its gathered copy and this rank's partition) and the
    optimizer's fp32 master (ZeRO 1-3; at ZeRO-0 under torch_autocast the parameter is the master).
    Clamping only the model's copy would be undone by the next step. It runs on the device: no
    value comes back to the host and no collective runs. Build it after load_checkpoint."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param
    param = engine.module.logit_scale
    zero3 = hasattr(param, "ds_id")
    # ZeRO-3: a view into this rank's fp32 partition (a copy when the optimizer is offloaded)
    master = safe_get_local_fp32_param(param) if zero3 else None
    offloaded = bool(engine.zero_offload_optimizer())

    @torch.no_grad()
    def clamp():
        param.data.clamp_(max=maximum)  # ZeRO-3: the gathered copy, or an empty tensor
        if not zero3:
            safe_set_full_fp32_param(param, param.data)  # ZeRO 1/2: copies into the local master fragment, if any
        elif offloaded:
            param.ds_tensor.clamp_(max=maximum)
            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(max=maximum))
        else:
            param.ds_tensor.clamp_(max=maximum)
            master.clamp_(max=maximum)
    return clamp


def logit_scale_value(engine):
    """The logit scale as the optimizer holds it (its fp32 master where it keeps one), for the log:
    a collective and a read back to the host, so only at log steps."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    param = engine.module.logit_scale
    master = safe_get_full_fp32_param(param)
    if master is not None:
        return master.item()
    with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
        return param.item()


def gathered(model):
    """Context in which every parameter is whole on every rank (ZeRO-3), e.g. for evaluation."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(model.parameters()))


# ----------------------------------------------------------------------------------------------
# Checkpoints: DeepSpeed's, published atomically and durably; export to one fp32 file
# ----------------------------------------------------------------------------------------------

MARKER = "trainer_state.json"  # written last, after every rank's files are on disk: a checkpoint is complete
LOCK = "train.lock"  # flock-ed by rank 0 for the run's life: one run per --out_dir


def checkpoint_root(out_dir):
    return os.path.join(out_dir, "checkpoints")


def complete_checkpoints(out_dir):
    """Tags of complete checkpoints (trainer_state.json is written after every rank finished), oldest first."""
    root = checkpoint_root(out_dir)
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else [])
            if os.path.isfile(os.path.join(root, t, MARKER))]
    return sorted(tags)


def latest_checkpoint(out_dir):
    """The tag the `latest` file names if it is complete, else the newest complete one (or None)."""
    root, tags = checkpoint_root(out_dir), complete_checkpoints(out_dir)
    try:
        with open(os.path.join(root, "latest")) as f:
            tag = f.read().strip()
        if tag in tags:
            return tag
    except OSError:
        pass
    return tags[-1] if tags else None


def fsync_path(path):
    """Flush a file's or a folder's (its entries') data to the disk, not just to the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))  # the rename itself survives a power cut


def remove_checkpoint(folder):
    """Marker first (and flushed), so that a deletion cut short never leaves a 'complete' partial folder."""
    marker = os.path.join(folder, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
        fsync_path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def write_error(error, folder):
    """What went wrong writing into `folder`, in words a user acts on (torch.save reports a full disk
    as 'file write failed' or 'basic_ios::clear: iostream error')."""
    import errno
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {folder} (or the disk quota is used up)"
    if isinstance(error, OSError) and error.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {folder}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2 ** 20:
        return f"no space left on the device of {folder} ({free / 2 ** 20:.1f} MiB free)"
    return f"{type(error).__name__}: {error}" if error is not None else "unknown error"


def agree(error, group):
    """Every rank's error (a string or None) -> one message naming the failing ranks, or None."""
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, error, group=group)
    failed = [(r, e) for r, e in enumerate(everyone) if e]
    return "; ".join(f"rank {r}: {e}" for r, e in failed[:4]) + (" ..." if len(failed) > 4 else "") if failed else None


def own_files(folder, rank):
    """The files of a DeepSpeed checkpoint folder that `rank` wrote: its zero_pp_rank_R_* shards; rank 0
    also the rank-less ones (mp_rank_00_model_states.pt, zero_to_fp32.py)."""
    names = sorted(os.listdir(folder))
    ranks = {n: re.search(r"zero_pp_rank_(\d+)_", n) for n in names}
    return [os.path.join(folder, n) for n, m in ranks.items() if (int(m.group(1)) if m else 0) == rank]


def save(engine, out_dir, step, client_state, trainer_state, keep, group):
    """DeepSpeed checkpoint into checkpoints/step_N, made durable before it counts: rank 0 empties the
    tag folder (an older run's files of this step, e.g. from another world size, would otherwise
    stay), every rank writes and fsyncs its own files, then rank 0 writes trainer_state.json (the
    completion marker) and points `latest` at it, and prunes older checkpoints marker first. A crash
    or a failed write at any point leaves the previous complete checkpoint the resume point; a
    failed write stops every rank with a message that says why (full disk, read-only, ...)."""
    import torch.distributed as dist
    root, tag = checkpoint_root(out_dir), f"step_{step:08d}"
    folder, rank = os.path.join(root, tag), dist.get_rank()
    error = None
    if rank == 0:
        try:
            remove_checkpoint(folder)
            os.makedirs(folder)
        except OSError as e:
            error = write_error(e, root)
    problem = agree(error, group)
    if problem is None:
        try:
            engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:  # raised while writing, after DeepSpeed's collectives but its last
            dist.barrier()  # ... barrier, which the ranks that wrote their files wait in
            error = write_error(e, root)
        if error is None:
            try:
                for path in own_files(folder, rank):
                    fsync_path(path)
                fsync_path(folder)
            except OSError as e:
                error = write_error(e, root)
        problem = agree(error, group)
    if problem is None and rank == 0:
        try:
            write_atomic(os.path.join(folder, MARKER), json.dumps(trainer_state, indent=1))
            write_atomic(os.path.join(root, "latest"), tag)
        except OSError as e:
            error = write_error(e, root)
        for old in complete_checkpoints(out_dir)[:-keep] if keep > 0 and error is None else []:
            try:
                remove_checkpoint(os.path.join(root, old))
            except OSError as e:  # the new checkpoint is complete: an old one left behind is no loss
                print(f"warning: could not remove old checkpoint {old}: {e}", flush=True)
    problem = problem or agree(error, group)
    if problem:
        if rank == 0:
            with contextlib.suppress(OSError):
                remove_checkpoint(folder)  # frees the space a partial checkpoint holds
        previous = latest_checkpoint(out_dir)
        message = (f"checkpoint {tag} could not be written ({problem}). " +
                   (f"The last complete checkpoint, {previous}, stays the resume point: fix this and run again with "
                    "--resume." if previous else "No complete checkpoint exists yet."))
        raise SystemExit(message if rank == 0 else 1)
    return tag


def checkpoint_globals():
    """The only non-tensor types a checkpoint of this trainer holds, for torch.load(weights_only=True):
    numpy arrays (the saved numpy RNG state), and DeepSpeed's ZeRO stage enum, loss scalers and
    fragment addresses (ZeRO optimizer files). Found with torch.serialization.get_unsafe_globals_in_checkpoint
    on checkpoints of ZeRO 0-3, fp32 and bf16; fp16 (GPUs only) keeps a DynamicLossScaler there."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    uint32 = np.zeros(1, dtype=np.uint32)
    return [uint32.__reduce__()[0], np.ndarray, np.dtype, type(uint32.dtype), ZeroStageEnum, LossScaler,
            DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loading():
    """Inside, every torch.load loads with weights_only=True and only checkpoint_globals() besides
    tensors, DeepSpeed's consolidation (which asks for weights_only=False) included: a checkpoint
    folder someone hands us cannot run code."""
    load = torch.load

    def safe_load(*args, **kwargs):
        return load(*args, **{**kwargs, "weights_only": True})

    with torch.serialization.safe_globals(checkpoint_globals()):
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = load


def consolidated_state_dict(folder):
    """One fp32 state dict from a checkpoint folder: ZeRO-1/2/3 shards merged from their fp32 master
    partitions by DeepSpeed's zero_to_fp32; stage 0 read from the model states file. Every file is
    loaded with weights_only=True (see weights_only_loading); a file holding any other Python
    object is refused with a message that names it."""
    with open(os.path.join(folder, MARKER)) as f:
        state = json.load(f)
    try:
        with weights_only_loading():
            if state["zero_stage"] == 0:  # DeepSpeed's consolidation raises TypeError at stage 0
                weights = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    weights = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder),
                                                                       tag=os.path.basename(folder))
    except __import__("pickle").UnpicklingError as e:
        found = re.search(r"(?:GLOBAL |got <class ')([\w.]+)", str(e))
        raise ValueError(f"{folder} holds a Python object that is not a tensor or one of the types DeepSpeed "
                         f"checkpoints hold ({found.group(1) if found else 'unknown type'}): refusing to load it, "
                         "since unpickling it could run code") from None
    return state, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def convert_to_universal(folder, target):
    """DeepSpeed's own re-partitioning: ds_to_universal turns the ZeRO-1/2/3 checkpoint in `folder` into
    one file per parameter and optimizer state in `target` (written in `target`.tmp, then renamed),
    which an engine of any world size loads with "checkpoint": {"load_universal": true}."""
    from deepspeed.checkpoint import ds_to_universal
    partial = target + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))  # processes; 1 = in this process
    options = types.SimpleNamespace(input_folder=folder, output_folder=partial, num_extract_workers=workers,
                                    num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                                    inject_missing_state=True)  # msclip is not Megatron: no universal info saved
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(options)
    shutil.copy2(os.path.join(folder, MARKER), partial)  # marks the conversion complete
    fsync_path(partial)
    os.replace(partial, target)
    write_atomic(os.path.join(folder, "latest_universal"), os.path.basename(target))  # it named the .tmp folder


def export(folder, path):
    """Write the checkpoint in `folder` as msclip.save_checkpoint does ({"msclip_config", "state_dict"}),
    checked by loading it strictly into the model. Returns the model."""
    state, weights = consolidated_state_dict(folder)
    model = msclip.load_checkpoint({"msclip_config": state["msclip_config"], "state_dict": weights})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    msclip.save_checkpoint(model, path)
    return model


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


# ----------------------------------------------------------------------------------------------
# One run per --out_dir, checks before DeepSpeed starts, preemption (signals, a vanished launcher)
# ----------------------------------------------------------------------------------------------

def out_dir_holder(out_dir):
    """Who holds --out_dir's lock ('pid P on host H since T'), or None when no live run does.
    A shared (probe) lock conflicts only with a live holder's exclusive one: a crashed run's lock
    is gone with its process (on NFS once the server notices, see the README)."""
    import fcntl
    path = os.path.join(out_dir, LOCK)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read())
                return f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
            except (ValueError, KeyError):
                return "another process"
        except OSError:  # no flock on this file system (e.g. Lustre without -o flock): nothing to learn
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def lock_out_dir(out_dir):
    """Rank 0 takes --out_dir's lock for the run's life. Returns (open lock file or None, problem or None)."""
    import fcntl
    f = open(os.path.join(out_dir, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None, f"--out_dir {out_dir} is in use by another training ({out_dir_holder(out_dir)})"
    except OSError as e:
        print(f"warning: cannot lock {f.name} ({e.strerror}): make sure no other run writes to {out_dir}", flush=True)
        return f, None
    f.truncate(0)
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv}))
    f.flush()
    return f, None


def resume_differences(saved, plan, world_size, args):
    """(differences that make --resume fail, changed options that only change the rest of the run)."""
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan["model_config"]).items()}
    blocking = [f"model {k}: saved {saved['msclip_config'].get(k)}, requested {v}"
                for k, v in model.items() if saved["msclip_config"].get(k) != v]
    for key in ("zero_stage", "precision"):
        if saved[key] != plan[key]:
            blocking.append(f"{key}: saved {saved[key]}, requested {plan[key]}")
    ignored = {"resume", "stop_at", "timeout_minutes", "local_rank", "deepspeed", "export", "checkpoint", "out_dir",
               "deepspeed_config"}
    changed = [f"--{k} {saved['args'].get(k)} -> {v}" for k, v in vars(args).items()
               if k not in ignored and k in saved.get("args", {}) and json.loads(json.dumps(v)) != saved["args"][k]]
    if saved["world_size"] != world_size:
        changed.append(f"ranks {saved['world_size']} -> {world_size}" + (
            " (the checkpoint is converted to DeepSpeed's universal format to re-partition ZeRO's states)"
            if plan["zero_stage"] > 0 else ""))
    return blocking, changed


def check_out_dir(args, plan, world_size):
    """Problems with --out_dir found before DeepSpeed starts (every rank reads the folder): a live run
    holds it, it is not writable, it holds checkpoints but --resume is missing, or its latest
    checkpoint cannot be resumed with the requested settings. Returns (problem or None, notes)."""
    out_dir = args.out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
        holder = out_dir_holder(out_dir)
    except OSError as e:
        return f"--out_dir {out_dir} is not writable: {write_error(e, out_dir)}", []
    if holder:
        return (f"--out_dir {out_dir} is in use by another training ({holder}): wait for it to finish, stop it, "
                "or choose another --out_dir"), []
    tag = latest_checkpoint(out_dir)
    if tag and not args.resume:
        return (f"{checkpoint_root(out_dir)} already holds checkpoints: pass --resume to continue them or choose "
                "another --out_dir"), []
    if not tag:
        return None, []
    with open(os.path.join(checkpoint_root(out_dir), tag, MARKER)) as f:
        saved = json.load(f)
    blocking, changed = resume_differences(saved, plan, world_size, args)
    if blocking:
        return (f"--resume: {checkpoint_root(out_dir)}/{tag} was saved with other settings: " + "; ".join(blocking)
                + ". Resume with the saved settings or choose another --out_dir"), []
    return None, [f"--resume {tag}: options changed since the checkpoint: {', '.join(changed)}"] if changed else []


def claim_out_dir(out_dir, resume, group):
    """After DeepSpeed's process group exists: rank 0 takes the lock (closing the window in which two
    runs started at once both passed check_out_dir) and picks the checkpoint to resume; every rank
    gets rank 0's answer (ranks on a shared file system may see different listings). Returns (lock
    file on rank 0, tag or None, problem or None)."""
    import torch.distributed as dist
    lock, answer = None, [None, None]
    if dist.get_rank() == 0:
        lock, problem = lock_out_dir(out_dir)
        answer = [latest_checkpoint(out_dir) if resume and not problem else None, problem]
    dist.broadcast_object_list(answer, src=0, group=group)
    return lock, answer[0], answer[1]


def trim_metrics(path, step):
    """Keep the records of steps <= `step` (the resume point; 0 for a fresh start): after a resume
    metrics.jsonl holds each step once. A line cut by a crash is dropped."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    write_atomic(path, "".join(kept))


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # schedulers' preemption notice; SLURM sends SIGUSR1 with --signal=USR1@SECONDS


def catch_stop_signals():
    """SIGTERM / SIGUSR1 no longer kill the rank: they set a flag that the loop reads at the next step
    boundary (then checkpoint, exit 0). Returns the flag: {"reason": None or what asked to stop}."""
    import signal
    requested = {"reason": None}

    def handler(signum, frame):
        requested["reason"] = requested["reason"] or signal.Signals(signum).name

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), handler)
    return requested


def ignoring_stop_signals(worker_init_fn=None):
    """A DataLoader worker_init_fn that makes workers ignore the stop signals: SLURM and DeepSpeed's
    launch.py signal every process of a rank, and a worker killed mid-step would abort the rank
    (the rank stops its workers itself after the checkpoint)."""
    def init(worker_id):
        import signal
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        if worker_init_fn is not None:
            worker_init_fn(worker_id)
    return init


def launcher_processes():
    """The processes that launched this rank, to watch: its parent (deepspeed's launch.py, torchrun,
    srun, mpirun), and above launch.py the `deepspeed` command, which on one node dies of a SIGTERM
    without passing it on. Only called when a launcher started this process: plain `python` watches
    nothing (a closed terminal must not stop a nohup-ed run)."""
    import psutil
    try:
        parent = psutil.Process().parent()
        watched = [parent] if parent else []
        above = parent.parent() if parent and "deepspeed.launcher.launch" in " ".join(parent.cmdline()) else None
        if above and "deepspeed" in " ".join(above.cmdline()):
            watched.append(above)
        return watched
    except psutil.Error:
        return []


def launcher_gone(process):
    import psutil
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def stop_requested(requested, launchers, group):
    """At a step boundary: does any rank want to stop (a stop signal, or a launcher of its gone)? One
    integer all-reduced over a CPU (gloo) group: no device synchronisation, and every rank stops after
    the same step."""
    import torch.distributed as dist
    if requested["reason"] is None:
        gone = [p.pid for p in launchers if launcher_gone(p)]
        requested["reason"] = f"launcher process {gone[0]} is gone" if gone else None
    flag = torch.tensor([requested["reason"] is not None], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def open_eval_datasets(parser, specs, image_size, synthetic_size):
    """eval.py datasets ('[NAME=]PATH', or eval.py's synthetic-shape / synthetic-colour with
    synthetic_size renders) for the in-training zero-shot evaluation."""
    datasets = []
    for spec in specs or []:
        try:
            datasets.append(evaluation.open_named_dataset(spec, synthetic_size, image_size))
        except evaluation.EvalError as e:
            parser.error(f"--eval_dataset {spec}: {e}")
    return datasets


@contextlib.contextmanager
def rank0_buffers(model):
    """Rank 0's buffers (BatchNorm's running statistics) on every rank while inside, each rank's own
    again after. Ranks update theirs on their own batches and the exported file holds rank 0's, so
    every rank evaluates the model eval.py will load, and the evaluation changes no rank's state."""
    import torch.distributed as dist
    own = [buffer.clone() for buffer in model.buffers()]
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    try:
        yield
    finally:
        for buffer, saved in zip(model.buffers(), own):
            buffer.copy_(saved)


def zero_shot(run, step):
    """Held-out zero-shot accuracy {task: fraction} and eval.py's --eval_dataset top-1 (%), every rank
    encoding its part of the images and prompts with --workers DataLoader workers, the features
    gathered over the control group. Every rank takes part and gets the result."""
    model, plan, args = run.engine.module, run.plan, run.args
    was_training = model.training
    model.eval()
    with gathered(model), rank0_buffers(model):  # gathered: ZeRO-3's parameters whole on every rank
        accuracy = evaluation.zero_shot_heldout(model, plan["model_config"].image_size, seed=args.seed,
                                                samples=args.eval_samples, device=run.device,
                                                workers=plan["workers"], group=run.control)
        settings = evaluation.Settings(tasks=["zeroshot"], device=str(run.device), precision=plan["precision"],
                                       workers=plan["workers"], quiet=True, group=run.control)
        for dataset in run.eval_sets:
            report = evaluation.run_zeroshot(model, f"train_ds step {step}", dataset, settings, {"splits": {}})
            accuracy[dataset.name] = report["top1"]
    model.train(was_training)
    return accuracy


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # peak RSS (KiB on Linux)


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def export_only(parser, args):
    """--export: the latest (or the --checkpoint) complete checkpoint as one fp32 file, every file
    loaded with weights_only=True."""
    latest = latest_checkpoint(args.out_dir)
    folder = args.checkpoint or (os.path.join(checkpoint_root(args.out_dir), latest) if latest else None)
    if folder is None or not os.path.isfile(os.path.join(folder, MARKER)):
        parser.error(f"--export: no complete checkpoint in {args.checkpoint or checkpoint_root(args.out_dir)}")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        export(folder, args.export)
    except ValueError as e:
        parser.error(f"--export: {e}")
    print(f"exported {folder} -> {args.export}")


def prepare(parser, args, world_size):
    """Everything checked before DeepSpeed starts, so that a bad option, folder or file fails in
    seconds: (plan, DeepSpeed config, notes for the log, training data, eval.py datasets)."""
    plan, ds_config = resolve(parser, args, world_size)
    problem, notes = check_out_dir(args, plan, world_size)
    if problem:
        parser.error(problem)
    image_size = plan["model_config"].image_size
    try:
        dataset = data.open_train_data(plan["kind"], args.train_data, image_size, args.seed, args.synthetic_samples,
                                       args.csv_separator, args.csv_img_key, args.csv_caption_key, args.shuffle_buffer,
                                       args.interleave_shards)
    except ValueError as e:
        parser.error(str(e))
    eval_sets = open_eval_datasets(parser, args.eval_dataset, image_size, args.eval_samples)
    return plan, ds_config, notes, dataset, eval_sets


def build_engine(run, deepspeed, ds_config, dataset):
    """The model (identical initial weights on every rank), MS-CLIP's optimizer groups, the warm-up +
    cosine schedule, and DeepSpeed's engine around them. Sets run.engine, run.schedule, run.steps."""
    args, plan = run.args, run.plan
    torch.manual_seed(args.seed)
    model = msclip.MSCLIP(plan["model_config"])
    run.parameters = sum(p.numel() for p in model.parameters())
    logit_scale_init = args.logit_scale_init if args.logit_scale_init is not None or args.preset else DEMO_LOGIT_SCALE
    if logit_scale_init is not None:
        model.logit_scale.data.fill_(logit_scale_init)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if plan["zero_stage"] == 3:
        register_orphan_parameters(model)

    run.steps = plan["steps"]
    if run.steps is None:  # map-style data: epochs x whole optimizer steps per epoch
        run.steps = plan["epochs"] * (len(dataset) // run.global_micro // plan["accum"])
        if run.steps < 1:
            run.parser.error(f"{len(dataset)} samples make no optimizer step of {plan['global_batch']} pairs")
    run.warmup = plan["warmup_steps"] if plan["warmup_steps"] is not None else int(plan["warmup_fraction"] * run.steps)

    optimizer = model.configure_optimizers(plan["lr"], plan["wd"], plan["lr_shared"], plan["wd_shared"],
                                           betas=plan["betas"], eps=plan["eps"])
    run.schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(run.warmup, run.steps, plan["warmup_start"], plan["min_lr_ratio"]))
    run.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=run.schedule,
                                               config=ds_config)
    if plan["precision"] != "fp32" and not getattr(run.engine, "torch_autocast_enabled", lambda: False)():
        raise SystemExit(f"--precision {plan['precision']} needs DeepSpeed's torch_autocast with ZeRO (0.17.2 or "
                         f"later); DeepSpeed {deepspeed.__version__} would train in fp32")


def resume_source(run, tag, ds_config):
    """Where resume() loads checkpoint `tag` from: (folder, tag) as saved, or, when it was saved at
    ZeRO >= 1 on another number of ranks (DeepSpeed's load_checkpoint refuses those), its universal
    conversion (rank 0 converts once, into the checkpoint's `universal` subfolder), with ds_config
    set to load it. Call before build_engine."""
    root = checkpoint_root(run.args.out_dir)
    if not tag:
        return root, tag
    folder = os.path.join(root, tag)
    with open(os.path.join(folder, MARKER)) as f:
        saved = json.load(f)["world_size"]
    if saved == run.world_size or run.plan["zero_stage"] == 0:
        return root, tag
    problem = None
    if run.master and not os.path.isfile(os.path.join(folder, "universal", MARKER)):
        run.log(f"{folder} was saved on {saved} ranks, resuming on {run.world_size}: converting it to DeepSpeed's "
                f"universal checkpoint format in {folder}/universal")
        try:
            convert_to_universal(folder, os.path.join(folder, "universal"))
        except Exception as e:  # noqa: BLE001  every rank must hear of it, or they would wait in a collective
            problem = f"converting {folder} with deepspeed.checkpoint.ds_to_universal failed: {e!r}"
    problem = agree(problem, run.control)
    if problem:
        raise SystemExit(problem)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return folder, "universal"


def resume(run, tag, source):
    """The run's progress: from checkpoint `tag`, or a fresh start when it is None. Progress is what
    a checkpoint saves besides DeepSpeed's state: the step, the micro-batches consumed (map-style
    data), each DataLoader worker's WebDataset stream position and the skipped-sample counts."""
    progress = {"step": 0, "micro_batches": 0, "stream": {}, "skipped": {}, "examples": {}, "saved_step": None}
    out = checkpoint_root(run.args.out_dir)
    if not tag:
        if run.args.resume:
            run.log(f"--resume: no checkpoint in {out}, starting from scratch")
        return progress
    groups = [{k: v for k, v in g.items() if k != "params"} for g in run.engine.optimizer.param_groups]
    _, client = run.engine.load_checkpoint(*source)
    if source[1] == "universal":  # two repairs after DeepSpeed's ZeRO-3 universal load (0.19.7, 0.19.8):
        # it gives every group group 0's settings (MS-CLIP's differ in weight decay and lr; lr as scheduled)
        for group, settings, lr in zip(run.engine.optimizer.param_groups, groups, run.schedule.get_last_lr()):
            group.update(settings, lr=lr)
        # and one Adam step-count tensor to all groups, which AdamW increments in place once per group
        for state in run.engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    progress.update(step=client["step"], micro_batches=client["micro_batches"], skipped=dict(client.get("skipped", {})),
                    saved_step=client["step"])
    if client["world_size"] == run.world_size:
        set_rng_state(client["rng"][run.rank])
        progress["stream"] = dict(client["stream"][run.rank])
    elif run.plan["kind"] == "webdataset":
        run.log(f"resuming on {run.world_size} ranks a run saved on {client['world_size']}: WebDataset streams "
                "restart at the start of the saved epoch")
        epochs = [e for positions in client["stream"] for e, _ in positions.values()]
        progress["stream"] = {-1: (min(epochs), 0)} if epochs else {}  # no worker -1: all start that epoch
    if client["global_micro_batch"] != run.global_micro and run.plan["kind"] != "webdataset":
        run.log(f"warning: micro-batch over all ranks was {client['global_micro_batch']}, now {run.global_micro}: "
                "the data order differs from an uninterrupted run")
    run.log(f"resumed {out}/{tag} at step {progress['step']}")
    return progress


def record(run, entry):
    """One line of metrics.jsonl (rank 0)."""
    if run.metrics:
        run.metrics.write(json.dumps(entry) + "\n")
        run.metrics.flush()


def checkpoint(run, progress):
    """Every rank's RNG and stream position gathered into DeepSpeed's client state, saved by save()."""
    import torch.distributed as dist
    everyone = [None] * run.world_size
    dist.all_gather_object(everyone, {"rng": rng_state(), "stream": progress["stream"]})
    step, plan = progress["step"], run.plan
    client = {"step": step, "micro_batches": progress["micro_batches"], "world_size": run.world_size,
              "global_micro_batch": run.global_micro, "skipped": progress["skipped"],
              "rng": [e["rng"] for e in everyone], "stream": [e["stream"] for e in everyone]}
    trainer_state = {"msclip_config": {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in vars(plan["model_config"]).items()},
                     "step": step, "zero_stage": plan["zero_stage"], "precision": plan["precision"],
                     "world_size": run.world_size, "global_batch": plan["global_batch"], "args": vars(run.args)}
    save(run.engine, run.args.out_dir, step, client, trainer_state, run.args.keep, run.control)
    progress["saved_step"] = step


def train_step(run, batches, loss_fn, progress, window):
    """One optimizer step: `accum` micro-batches forward and backward, DeepSpeed's step (gradients
    averaged over ranks, clipped, applied at the last one). The loss stays on the device."""
    for _ in range(run.plan["accum"]):
        images, tokens, skipped, positions = next(batches)
        for reason, where in skipped:
            window["skipped"][reason] = window["skipped"].get(reason, 0) + 1
            progress["examples"].setdefault(reason, where)
        for worker, epoch, place in positions:
            progress["stream"][worker] = (epoch, place)
        # uint8 from the workers, normalised in fp32 on the device: torch_autocast casts inside the model
        images = data.normalize_images(images, run.device, torch.float32)
        tokens = tokens.to(run.device, non_blocking=True)  # trimmed on the host by data.collate
        image_features, text_features, logit_scale = run.engine(images, tokens)
        loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        run.engine.backward(loss)
        run.engine.step()
        window["loss"] = window["loss"] + loss.detach()
        window["n"] += 1
        progress["micro_batches"] += 1
    progress["step"] += 1
    window["steps"] += 1


def new_window():
    """What a progress line averages over: loss (a device tensor), micro-batches, steps, skipped samples."""
    return {"loss": 0.0, "n": 0, "time": time.time(), "steps": 0, "skipped": {}}


def log_step(run, progress, window, lr):
    """At a log step (the only host reads of the loop): skipped samples summed over ranks, the
    progress line, metrics.jsonl and DeepSpeed's monitors."""
    import torch.distributed as dist
    reasons = ("missing", "corrupt", "empty_caption")
    counts = torch.tensor([window["skipped"].get(r, 0) for r in reasons], dtype=torch.float64, device=run.device)
    dist.all_reduce(counts)
    skipped = progress["skipped"]
    for reason, n in zip(reasons, counts.tolist()):
        skipped[reason] = skipped.get(reason, 0) + int(n)
    if counts.sum() and run.master:
        print(f"skipped so far: {skipped} (e.g. {progress['examples']})", flush=True)
    step, plan, args = progress["step"], run.plan, run.args
    elapsed = time.time() - window["time"]
    pairs_per_s = window["steps"] * plan["global_batch"] / max(elapsed, 1e-9)
    scale = logit_scale_value(run.engine)
    epoch_size = run.dataset_size if plan["kind"] != "webdataset" else (args.train_samples or float("inf"))
    entry = {"step": step, "loss": float(window["loss"]) / window["n"], "lr": lr, "logit_scale": scale,
             "pairs_per_s": pairs_per_s, "memory_gb": memory_gb(run.device),
             "epoch": progress["micro_batches"] * run.global_micro / epoch_size,
             "skipped": dict(skipped), "time": time.time() - run.started}
    record(run, entry)
    eta = (run.steps - step) * elapsed / window["steps"]
    run.log(f"step {step:>6}/{run.steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | logit scale {scale:.3f} | "
            f"{pairs_per_s:,.0f} pairs/s | mem {entry['memory_gb']:.2f} GB | eta {format_time(eta)}")
    if run.engine.monitor.enabled and run.master:
        run.engine.monitor.write_events([("Train/loss", entry["loss"], step), ("Train/logit_scale", scale, step),
                                         ("Train/pairs_per_s", pairs_per_s, step)])


def train(run, loader, progress):
    """The loop: optimizer steps until --steps (or --stop_at), a stop request, with progress lines,
    evaluations and checkpoints on their schedules. Returns the step it stopped at."""
    args, plan = run.args, run.plan
    loss_fn = msclip.ContrastiveLoss(gather_with_grad=True, local_loss=args.local_loss)
    clamp_logit_scale = logit_scale_clamp(run.engine)  # after load_checkpoint: it holds views of the fp32 master
    stop = min(run.steps, args.stop_at) if args.stop_at else run.steps
    window, batches = new_window(), iter(loader)
    try:
        while progress["step"] < stop:
            if stop_requested(run.stop_signal, run.launchers, run.control):
                break
            lr = run.schedule.get_last_lr()[0]
            train_step(run, batches, loss_fn, progress, window)
            clamp_logit_scale()
            step = progress["step"]
            if step % args.log_every == 0 or step == stop:
                log_step(run, progress, window, lr)
                window = new_window()
            if plan["eval_every"] > 0 and step % plan["eval_every"] == 0 and step < stop:
                accuracy = zero_shot(run, step)
                record(run, {"step": step, "zero_shot": accuracy, "time": time.time() - run.started})
                others = "".join(f", {k} {v:.1f}%" for k, v in accuracy.items() if k not in ("colour", "shape"))
                run.log(f"step {step:>6} | held-out zero-shot: colour {accuracy['colour']:.1%}, shape "
                        f"{accuracy['shape']:.1%}{others}")
                window["time"] = time.time()
            if args.save_every and step % args.save_every == 0 and step < stop:
                checkpoint(run, progress)
                window["time"] = time.time()
    finally:
        del batches  # stops the DataLoader workers
    if progress["saved_step"] != progress["step"]:
        checkpoint(run, progress)
    return stop


def finish(run, progress):
    """After the last step: export the weights (rank 0) and the final evaluation. Returns the result."""
    step, args = progress["step"], run.args
    folder = os.path.join(checkpoint_root(args.out_dir), latest_checkpoint(args.out_dir))
    exported = os.path.join(args.out_dir, "msclip.pt")
    if run.master:
        export(folder, exported)
    result = {"steps": step, "checkpoint": folder, "export": exported, "skipped": progress["skipped"]}
    if run.plan["eval_every"] >= 0:
        accuracy = result["zero_shot"] = zero_shot(run, step)
        record(run, {"step": step, "zero_shot": accuracy, "time": time.time() - run.started})
        chance = 1 / len(data.SHAPES), 1 / len(data.COLOURS)
        run.log(f"held-out zero-shot accuracy ({args.eval_samples} new renders): colour {accuracy['colour']:.1%} "
                f"(chance {chance[1]:.1%}), shape {accuracy['shape']:.1%} (chance {chance[0]:.1%})")
        for name, top1 in accuracy.items():
            if name not in ("colour", "shape"):
                run.log(f"zero-shot top-1 on {name} (eval.py): {top1:.1f}%")
    import torch.distributed as dist
    dist.barrier()
    run.log(f"done: {step} steps in {format_time(time.time() - run.started)}; checkpoint {folder}; weights for "
            f"msclip.load_checkpoint / eval.py: {exported}")
    return result


def main(argv=None):
    started = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.export:
        return export_only(parser, args)
    try:  # srun / mpirun / PMI variables as torch.distributed's (set in os.environ just before it starts)
        launcher, variables = launcher_environment(os.environ)
    except ValueError as e:
        parser.error(str(e))
    plan, ds_config, notes, dataset, eval_sets = prepare(parser, args, int(variables["WORLD_SIZE"]))
    warnings.filterwarnings("ignore", category=FutureWarning)  # ZeRO-3 and all_gather deprecation notices

    # Process group, then the out_dir lock and the checkpoint to resume, both decided by rank 0
    os.environ.update(variables)
    launchers = launcher_processes() if launcher else []
    deepspeed = init_distributed(args.timeout_minutes)
    import torch.distributed as dist
    rank, world_size = dist.get_rank(), dist.get_world_size()
    control = dist.new_group(backend="gloo")  # host-side agreement (stop, checkpoint errors) without device syncs
    lock, resume_tag, problem = claim_out_dir(args.out_dir, args.resume, control)
    if problem:
        if rank == 0:
            parser.error(problem)
        sys.exit(2)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    master = rank == 0
    run = types.SimpleNamespace(
        args=args, parser=parser, plan=plan, started=started, rank=rank, world_size=world_size, master=master,
        device=device, control=control, launchers=launchers, stop_signal=catch_stop_signals(), eval_sets=eval_sets,
        global_micro=plan["micro"] * world_size, dataset_size=len(dataset) if plan["kind"] != "webdataset" else None,
        log=lambda message: print(message, flush=True) if master else None)
    for note in notes:
        run.log(note)

    # Model and engine, resume, data
    source = resume_source(run, resume_tag, ds_config)
    build_engine(run, deepspeed, ds_config, dataset)
    progress = resume(run, resume_tag, source)
    loader = data.train_loader(dataset, plan["micro"], rank, world_size, plan["workers"], args.seed,
                               progress["micro_batches"], dict(progress["stream"]), plan["groups"],
                               pin_memory=device.type == "cuda", log=run.log)
    loader.worker_init_fn = ignoring_stop_signals(loader.worker_init_fn)
    if master:
        trim_metrics(os.path.join(args.out_dir, "metrics.jsonl"), progress["step"])
    run.metrics = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if master else None
    c = plan["model_config"]
    run.log(f"MS-CLIP {plan['preset']} {plan['overrides'] or ''}: {run.parameters / 1e6:.2f}M parameters, {c.layers} "
            f"layers, width {c.vision_width}, {c.image_size} px | {plan['kind']} data | ZeRO {plan['zero_stage']}, "
            f"{plan['precision']}, {world_size} rank(s) on {device.type} | {run.steps} steps x {plan['global_batch']} "
            f"pairs ({plan['micro']} per rank x {plan['accum']} accumulation), lr {plan['lr']:g} "
            f"(shared {plan['lr_shared']:g}), warm-up {run.warmup}")

    # Train, then export and evaluate (or, when asked to stop, only the checkpoint: schedulers
    # SIGKILL about 30 s after their notice)
    try:
        stop = train(run, loader, progress)
        if progress["step"] < stop:
            folder = os.path.join(checkpoint_root(args.out_dir), latest_checkpoint(args.out_dir))
            if run.stop_signal["reason"]:
                print(f"rank {rank}: {run.stop_signal['reason']}", flush=True)
            run.log(f"stopped at step {progress['step']} of {run.steps}: checkpoint {folder}; continue with --resume")
            return {"steps": progress["step"], "checkpoint": folder, "stopped": True, "skipped": progress["skipped"]}
        return finish(run, progress)
    finally:
        if run.metrics:
            run.metrics.close()
        if lock:
            lock.close()


if __name__ == "__main__":
    main()
