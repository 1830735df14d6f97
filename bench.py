"""
How fast msclip trains, and what it costs in memory. A script, like nanoGPT's bench.py.

    python bench.py                                          # msclip-s-b32, batch 32, fp32, CPU
    python bench.py --compare                                # clip-b32 and msclip-s-b32, one run, their ratio
    python bench.py --mode textlen                           # text at caption length vs padded to 77 tokens
    python bench.py --mode tokenizer --captions caps.txt     # captions/s (built-in captions without a file)
    python bench.py --mode zero                              # ZeRO 0/1/2/3 on 1 and 2 CPU ranks: memory per rank
    python bench.py --mode data --preset msclip-s-b32 --batch-size 16   # data pipeline: samples per core on
                                        # three kinds of JPEG shards vs PIL's decode (and OpenCLIP), cores per
                                        # GPU; train_ds.py end to end vs the bare step, its data wait
    python bench.py --mode csv --csv-rows 12000000                   # a CC12M-size CSV: start-up, RSS per rank
    python bench.py --mode accumulation --batch-size 256 --accum 4   # memory and step time: 4 x 64 pairs
                                        # (train_ds.py --grad_accum 4, every pair a negative) vs 256 at once
    python bench.py --device cuda --precision bf16 --preset msclip-s-b16 --batch-size max

A training step is forward (both towers) + contrastive loss + backward + AdamW step, on one fixed
synthetic batch (random images, real captions), so the figures are the model's, not the data
loader's. The text is trimmed on the host to the longest caption of the batch, as in training.

FLOPs (`model_flops`) are counted analytically per image-text pair, forward: every matmul (q|k|v,
attention scores QK^T and A·V over the full L×L square, output projection, MLP, final projections)
and every convolution (patch embedding, conv stem, parallel branch, adapters, depthwise included),
as 2 × multiply-adds. Not counted: normalisations, activations, softmax, residual adds, embedding
lookups, the loss. The text tower is counted at the token length it actually runs at. A training
step is counted as 3 × forward (backward = 2 × forward), the usual convention for MFU.
"""
import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import msclip
import train_ds

# Web alt-text style captions (written for this benchmark): 10-17 tokens with SOT/EOT, mean 13.
CAPTIONS = [
    "a golden retriever puppy chewing on a red rubber ball in the backyard grass",
    "aerial view of a small fishing village on the coast at sunset",
    "woman in a yellow raincoat walking her dog through a rainy city street",
    "homemade margherita pizza with fresh basil on a wooden cutting board",
    "vintage 1960s convertible parked in front of a pastel blue diner",
    "close-up of a monarch butterfly resting on a purple coneflower",
    "the view from our hotel balcony in santorini, greece",
    "two kids building a sandcastle on the beach during summer vacation",
    "modern minimalist living room with a grey sofa and large windows",
    "snow-covered pine trees along a mountain trail in early morning light",
    "chocolate layer cake with raspberries and mint leaves on top",
    "portrait of an elderly fisherman mending his nets on the dock",
    "a cup of latte art coffee next to an open notebook and pen",
    "crowd cheering at an outdoor music festival with colorful stage lights",
    "stock photo: businessman shaking hands with a client in a bright office",
    "red fox standing in a field of tall dry grass, wildlife photography",
    "handmade ceramic mugs arranged on a rustic shelf",
    "night skyline of hong kong reflected in victoria harbour",
    "a cyclist riding up a steep country road surrounded by vineyards",
    "bowl of ramen with a soft boiled egg, scallions and pork belly",
    "black and white photo of a steam locomotive crossing a stone bridge",
    "tabby cat sleeping in a cardboard box by the window",
    "wedding couple dancing under string lights at a rustic barn reception",
    "colorful hot air balloons floating over cappadocia at dawn",
    "illustration of a cute cartoon robot holding a flower",
    "fresh vegetables for sale at a farmers market stall",
    "an old wooden rowboat tied to a pier on a misty lake",
    "young man playing acoustic guitar on a park bench",
    "interior of a gothic cathedral with stained glass windows",
    "surfer riding a large wave at pipeline, hawaii",
    "new york city taxi cabs in traffic on fifth avenue",
    "herd of elephants walking across the savanna at sunset in kenya",
    "close up of green tea leaves on a plantation in sri lanka",
    "the northern lights over a frozen lake in lapland, finland",
    "girl blowing out candles on her 5th birthday cake",
    "a bookshelf filled with old leather-bound books in a library",
    "mountain biker jumping over rocks on a forest trail",
    "watercolor painting of a lighthouse on a rocky shore",
    "plate of grilled salmon with asparagus and lemon wedges",
    "traditional japanese garden with a red bridge over a koi pond",
]


# ----------------------------------------------------------------------------------------------
# FLOPs, counted analytically for the MSCLIP family
# ----------------------------------------------------------------------------------------------

def conv_flops(out_side, cin, cout, kernel, groups=1):
    """A square convolution producing an out_side × out_side map."""
    return 2 * out_side ** 2 * cout * (cin // groups) * kernel ** 2


def layer_flops(tokens, width):
    """One transformer layer: q|k|v (6LW²), QK^T and A·V (4L²W), output (2LW²), MLP (16LW²)."""
    return 24 * tokens * width ** 2 + 4 * tokens ** 2 * width


def image_flops(config):
    """Forward FLOPs of the image tower for one image."""
    c, width, grid = config, config.vision_width, config.grid
    chans, strides = msclip.conv_channels(width), msclip.stage_strides(c.patch_size)
    flops = 2 * width * c.embed_dim                                     # final projection
    first = 1 if c.early_specialization else 0
    flops += (c.layers - first) * layer_flops(grid ** 2 + 1, width)
    side = c.image_size // 2                                            # after the stride-2 first conv
    if c.early_specialization:                                          # conv stem (Sec. 3.2)
        flops += conv_flops(side, 3, chans[0], 3)
        for cin, cout, s in zip(chans, chans[1:], strides):
            side //= s
            flops += conv_flops(side, cin, cout, 3) + conv_flops(side, cin, cout, 1)
        flops += conv_flops(grid, width, width, 1)
    else:                                                               # patch embedding
        flops += conv_flops(grid, 3, width, c.patch_size)
    if c.parallel_branch:                                               # branch + adapters (Sec. 3.3)
        side = c.image_size // 2
        flops += conv_flops(side, 3, chans[0], 3)
        sides = [side]
        for cin, cout, s in zip(chans, chans[1:], strides):
            mid = cout // 2
            flops += conv_flops(side, cin, mid, 1)                      # reduce, at the input side
            side //= s
            flops += conv_flops(side, mid, mid, 3) + conv_flops(side, mid, cout, 1) + conv_flops(side, cin, cout, 1)
            sides.append(side)
        for ch, side in zip(chans, sides):
            flops += conv_flops(grid, ch, width, 1)                     # branch_proj
            if c.adapter_depthwise:
                flops += conv_flops(grid, ch, ch, side // grid, groups=ch) + conv_flops(grid, width, width, 3, groups=width)
    return flops


def text_flops(config, tokens):
    """Forward FLOPs of the text tower for one caption run at `tokens` positions."""
    c = config
    return c.layers * layer_flops(tokens, c.text_width) + 2 * c.text_width * c.embed_dim


def model_flops(config, text_tokens):
    """Forward FLOPs per image-text pair, by tower."""
    image, text = image_flops(config), text_flops(config, text_tokens)
    return {"image": image, "text": text, "total": image + text}


# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' datasheets (SXM parts), TFLOP/s: the
# peak MFU figures in papers divide by. The matmul rate measured on the device is lower (about 790 on
# an H200), so bench.py reports MFU against both.
SPEC_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}


def spec_peak_flops(device, precision, override_tflops=None):
    """The datasheet's dense peak for this device and precision (FLOP/s), or None where unknown (CPUs,
    fp32, an unlisted GPU): `override_tflops` (bench.py's --spec-tflops) gives it by hand."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for chip, tflops in SPEC_BF16_TFLOPS.items() if chip in name), None)


def estimate_mfu(flops_per_pair, pairs_per_s, peak_flops):
    """Model FLOP utilisation: training FLOPs achieved (3 × forward per pair) over the peak rate."""
    return 3 * flops_per_pair * pairs_per_s / peak_flops


def measure_matmul_flops(device, dtype, seconds=0.5):
    """The rate of one large square matmul on this device and dtype: the peak that MFU divides by."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
            count += 1
        sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def matmul_rate(args, device):
    """The matmul rate, measured before and again after the timed steps (MFU takes the larger:
    on a shared machine one measurement can fall in a busy moment)."""
    rate = measure_matmul_flops(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    print(f"measured {args.precision} matmul rate: {rate / 1e12:.3f} TFLOP/s", flush=True)
    return rate


# ----------------------------------------------------------------------------------------------
# Memory and timing helpers
# ----------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(field):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")   # Linux: the peak RSS restarts from now
        except OSError:
            pass


def current_memory(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS") or 0


def peak_memory(device):
    """CUDA: peak bytes allocated by tensors. CPU: the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status("VmHWM")
    if peak is None:                                        # not Linux: no reset, lifetime peak
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def spread(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def fmt_spread(s, unit="s"):
    return f"{s['median']:.3f} {unit} (min {s['min']:.3f}, max {s['max']:.3f})"


def gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------

def caption_tokens(batch_size, captions=None, context_length=77):
    """[batch_size, 77] tokens: the captions cycled, padded with zeros after EOT."""
    captions = captions or CAPTIONS
    return msclip.tokenize([captions[i % len(captions)] for i in range(batch_size)], context_length)


def make_batch(config, batch_size, device, captions=None, trim=True, seed=0, channels_last=False):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size, generator=generator)
    if channels_last:                                        # the convs then run NHWC; same values
        images = images.contiguous(memory_format=torch.channels_last)
    tokens = caption_tokens(batch_size, captions, config.context_length)
    if trim:
        tokens = msclip.trim_padding(tokens)                 # on the host, before the copy
    if device.type == "cuda":
        images, tokens = images.pin_memory(), tokens.pin_memory()
    return images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)


def host_batch(config, batch_size, device, seed=0):
    """A batch as train_ds.py's loader gives it: uint8 images and trimmed tokens on the host (pinned
    for CUDA), normalised on the device when encoded."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch_size, 3, config.image_size, config.image_size)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    tokens = msclip.trim_padding(caption_tokens(batch_size, None, config.context_length))
    if device.type == "cuda":
        images, tokens = images.pin_memory(), tokens.pin_memory()
    return images, tokens


def make_optimizer(model, fused):
    """The project's AdamW groups (MSCLIP.configure_optimizers); fused=True runs one kernel per step."""
    optimizer = model.configure_optimizers(lr=5e-4, weight_decay=0.2)
    if not fused:
        return optimizer
    groups = [{k: g[k] for k in ("name", "params", "lr", "weight_decay")} for g in optimizer.param_groups]
    d = optimizer.defaults
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=True)


class Trainer:
    """A model, its optimizer, and a step that returns the loss without reading it (no host sync).
    The text runs at the width of the tokens passed in: make_batch trims them on the host."""

    def __init__(self, model, args, device):
        self.model, self.device = model.to(device).train(), device
        self.optimizer = make_optimizer(self.model, args.fused_adamw)
        self.loss_fn = msclip.ContrastiveLoss()
        self.encode_image, self.encode_text = self.model.encode_image, self.model.encode_text
        if args.compile:
            self.encode_image, self.encode_text = torch.compile(self.encode_image), torch.compile(self.encode_text)
        dtype = {"fp32": None, "bf16": torch.bfloat16}[args.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    def step(self, images, tokens):
        with self.autocast():
            loss = self.loss_fn(self.encode_image(images), self.encode_text(tokens, trim=False),
                                self.model.logit_scale.exp())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def time_steps(trainers, batches, warmup, steps):
    """Run warmup + steps steps of each trainer, interleaved (a shared machine's load hits them
    alike). Returns, per trainer, the timed step durations and every step's loss."""
    times, losses = [[] for _ in trainers], [[] for _ in trainers]
    device = trainers[0].device
    for i in range(warmup + steps):
        for t, (trainer, batch) in enumerate(zip(trainers, batches)):
            sync(device)
            start = time.perf_counter()
            losses[t].append(trainer.step(*batch))
            sync(device)
            if i >= warmup:
                times[t].append(time.perf_counter() - start)
    return times, [[float(x) for x in ls] for ls in losses]      # read the losses only now


class PlainEngine:
    """What train_ds.contrastive_step uses of DeepSpeed's engine, in plain PyTorch around a Trainer:
    the forward under its autocast, backward, and the optimizer step after every `accum` micro-batches."""

    def __init__(self, trainer, accum):
        self.trainer, self.accum, self.micro_batches = trainer, accum, 0
        self.module, self.device = trainer.model, trainer.device

    def __call__(self, images, tokens):
        with self.trainer.autocast():
            return self.module(images, tokens)

    def backward(self, loss, scale_wrt_gas=True):
        (loss / self.accum if scale_wrt_gas else loss).backward()

    def step(self):
        self.micro_batches += 1
        if self.micro_batches % self.accum == 0:
            self.trainer.optimizer.step()
            self.trainer.optimizer.zero_grad(set_to_none=True)


class AccumulatingTrainer(Trainer):
    """A Trainer whose step is train_ds.py's with --grad_accum: a host_batch in --accum micro-batches,
    every pair a negative of every other (train_ds.contrastive_step, PlainEngine in DeepSpeed's place)."""

    def __init__(self, model, args, device):
        super().__init__(model, args, device)
        self.engine = PlainEngine(self, args.accum)

    def step(self, images, tokens):
        micro_batches = list(zip(images.chunk(self.engine.accum), tokens.chunk(self.engine.accum)))
        return train_ds.contrastive_step(self.engine, self.loss_fn, micro_batches, True) / self.engine.accum


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------

def count_host_syncs(trainer, batch):
    """CUDA: how often one training step makes the host wait for the device (sync debug mode)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(*batch)
            sync(trainer.device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def is_oom(error):
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def largest_batch(trainer, config, device, start=64):
    """CUDA only: double the batch until a step runs out of memory, then bisect (to 1/16 of the
    result, a multiple of 8). Each try is one full training step, optimizer state included."""
    def fits(batch_size):
        try:
            trainer.step(*make_batch(config, batch_size, device))
            sync(device)
            return True
        except RuntimeError as error:
            if not is_oom(error):
                raise
        trainer.optimizer.zero_grad(set_to_none=True)     # out of the except block: the traceback,
        gc.collect()                                      # and the activations it holds, are gone
        torch.cuda.empty_cache()
        return False

    good, bad = 0, start
    while fits(bad):
        good, bad = bad, bad * 2
    while bad - good > max(8, good // 16):
        middle = (good + bad) // 2 // 8 * 8
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    if good == 0:
        raise SystemExit(f"not even batch {start} fits on {device}")
    return good


def report(name, config, batch_size, tokens, times, losses, peak, memory, base, precision, spec=None):
    """Print one preset's figures and return them as a dict. MFU is over the measured matmul rate
    `peak` ("mfu") and over the datasheet's `spec` peak where known ("mfu_spec", else None)."""
    pairs = batch_size / statistics.median(times)
    flops = model_flops(config, tokens)
    r = {"preset": name, "batch_size": batch_size, "text_tokens": tokens, "step_s": spread(times),
         "pairs_per_s": pairs, "pairs_per_s_min": batch_size / max(times), "pairs_per_s_max": batch_size / min(times),
         "flops_per_pair": flops, "achieved_flops": 3 * flops["total"] * pairs,
         "mfu": estimate_mfu(flops["total"], pairs, peak), "matmul_flops": peak,
         "mfu_spec": estimate_mfu(flops["total"], pairs, spec) if spec else None, "spec_flops": spec,
         "peak_memory": memory, "memory_before_model": base, "losses": losses}
    print(f"{name}: batch {batch_size}, text at {tokens} tokens, {precision}")
    print(f"  step            {fmt_spread(r['step_s'])}")
    print(f"  pairs/s         {pairs:.2f} (min {r['pairs_per_s_min']:.2f}, max {r['pairs_per_s_max']:.2f})")
    print(f"  forward GFLOPs  image {flops['image'] / 1e9:.2f} + text {flops['text'] / 1e9:.2f} "
          f"= {flops['total'] / 1e9:.2f} per pair (a training step: 3x)")
    print(f"  achieved        {r['achieved_flops'] / 1e12:.3f} TFLOP/s, MFU {100 * r['mfu']:.1f}% "
          f"of the measured {peak / 1e12:.3f} TFLOP/s matmul rate" +
          (f", {100 * r['mfu_spec']:.1f}% of the {spec / 1e12:.0f} TFLOP/s datasheet peak" if spec else ""))
    print(f"  peak memory     {gib(memory)} ({gib(memory - base)} above the {gib(base)} before the model "
          f"was built)", flush=True)
    return r


def bench_train(args, device, peak):
    """Time one preset: step time, pairs/s, FLOPs, MFU, peak memory."""
    name = args.preset
    torch.manual_seed(0)
    reset_peak_memory(device)
    base = current_memory(device)
    trainer = (AccumulatingTrainer if args.accum > 1 else Trainer)(msclip.create_model(name), args, device)
    config = trainer.model.config
    batch_size = args.batch_size
    if batch_size == "max":
        batch_size = largest_batch(trainer, config, device)
        print(f"{name}: largest batch that fits: {batch_size}")
        reset_peak_memory(device)
    if args.accum > 1:
        batch = host_batch(config, batch_size, device)
    else:
        batch = make_batch(config, batch_size, device, channels_last=args.channels_last)
    (times,), (losses,) = time_steps([trainer], [batch], args.warmup, args.steps)
    memory = peak_memory(device)
    if device.type == "cuda":
        print(f"  host syncs in one step: {count_host_syncs(trainer, batch)}")
    peak = max(peak, matmul_rate(args, device))
    r = report(name, config, batch_size, batch[1].shape[1], times, losses, peak, memory, base, args.precision,
               spec_peak_flops(device, args.precision, args.spec_tflops))
    return {"mode": "train", "results": [r]}


def run_alone(name, args, warmup, steps, quiet=False, accum=1):
    """bench.py --preset name in a fresh process (its peak memory is its own); its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--preset", name, "--batch-size", str(args.batch_size),
                   "--precision", args.precision, "--device", args.device, "--warmup", str(warmup),
                   "--steps", str(steps), "--fused-adamw", str(args.fused_adamw), "--accum", str(accum),
                   "--json", str(out)]
        command += ["--spec-tflops", str(args.spec_tflops)] if args.spec_tflops else []
        command += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL if quiet else None)
        return json.loads(out.read_text())["results"][0]


def bench_compare(args, device, peak):
    """clip-b32 and msclip-s-b32 (--presets). CUDA: each alone on the device, one after the other.
    CPU: timed step by step in turn in this process, so that the load of a shared machine hits both
    alike; each peak memory comes from a run of as many steps in a fresh process of its own."""
    if device.type == "cuda":
        results = [run_alone(name, args, args.warmup, args.steps) for name in args.presets]
    else:
        alone = {name: run_alone(name, args, args.warmup, args.steps, quiet=True) for name in args.presets}
        torch.manual_seed(0)
        trainers = [Trainer(msclip.create_model(name), args, device) for name in args.presets]
        batches = [make_batch(t.model.config, args.batch_size, device, channels_last=args.channels_last)
                   for t in trainers]
        times, losses = time_steps(trainers, batches, args.warmup, args.steps)
        peak = max(peak, matmul_rate(args, device))
        results = [report(name, t.model.config, args.batch_size, batch[1].shape[1], ts, ls, peak,
                          alone[name]["peak_memory"], alone[name]["memory_before_model"], args.precision,
                          spec_peak_flops(device, args.precision, args.spec_tflops))
                   for name, t, batch, ts, ls in zip(args.presets, trainers, batches, times, losses)]
    clip, ms = results
    print(f"{ms['preset']} / {clip['preset']}: {ms['pairs_per_s'] / clip['pairs_per_s']:.3f}x pairs/s, "
          f"{ms['peak_memory'] / clip['peak_memory']:.3f}x peak memory, "
          f"{ms['flops_per_pair']['total'] / clip['flops_per_pair']['total']:.3f}x FLOPs per pair")
    return {"mode": "compare", "results": results}


def bench_textlen(args, device):
    """The same training step with the text at the captions' own length (trimmed) and padded to 77
    tokens. Every step runs both ways from the same weights (saved before, restored in between), so
    the two losses of a step must agree to rounding; the run then continues from the trimmed step."""
    torch.manual_seed(0)
    trainer = Trainer(msclip.create_model(args.preset), args, device)
    config = trainer.model.config
    batch_size = int(args.batch_size)
    padded = make_batch(config, batch_size, device, captions=args.caption_list, trim=False)
    trimmed = (padded[0], msclip.trim_padding(padded[1].cpu()).to(device))
    t77, tcap, l77, lcap = [], [], [], []
    for i in range(args.warmup + args.steps):
        saved = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()))
        for batch, times, losses in ((padded, t77, l77), (trimmed, tcap, lcap)):
            if batch is trimmed:
                trainer.model.load_state_dict(saved[0])
                trainer.optimizer.load_state_dict(saved[1])
            sync(device)
            start = time.perf_counter()
            losses.append(trainer.step(*batch))
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    l77, lcap = [float(x) for x in l77], [float(x) for x in lcap]
    width = trimmed[1].shape[1]
    speedup = statistics.median(t77) / statistics.median(tcap)
    diff = max(abs(a - b) for a, b in zip(l77, lcap))
    print(f"{args.preset}: batch {batch_size}, {args.precision}, {device.type}")
    print(f"  77 tokens        step {fmt_spread(spread(t77))}")
    print(f"  {width} tokens        step {fmt_spread(spread(tcap))}")
    print(f"  speed-up         {speedup:.2f}x (the text tower alone: "
          f"{text_flops(config, 77) / text_flops(config, width):.2f}x fewer FLOPs)")
    print(f"  losses at 77     {' '.join(f'{x:.6f}' for x in l77)}")
    print(f"  losses at {width:<2d}     {' '.join(f'{x:.6f}' for x in lcap)}")
    print(f"  largest |difference| {diff:.2e}")
    return {"mode": "textlen", "preset": args.preset, "batch_size": batch_size, "text_tokens": width,
            "step_s_77": spread(t77), "step_s_trimmed": spread(tcap), "speedup": speedup,
            "losses_77": l77, "losses_trimmed": lcap, "max_loss_diff": diff}


def bench_tokenizer(args):
    """Captions/s of msclip.tokenize, one process: cold (fresh tokenizer, empty caches) and steady
    (the per-caption cache cleared before each pass, the per-word BPE cache kept: a large caption
    set repeats words, rarely captions). Also per CPU-second, which the load of a shared machine
    does not change: the tokenizer is single-threaded Python."""
    captions = args.caption_list or CAPTIONS
    tokenizer = msclip.Tokenizer()
    chunks = [captions[i: i + 256] for i in range(0, len(captions), 256)]

    def one_pass():
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = torch.cat([tokenizer(chunk) for chunk in chunks])
        return tokens, len(captions) / (time.perf_counter() - wall), len(captions) / (time.process_time() - cpu)

    tokens, cold, cold_cpu = one_pass()
    rates, cpu_rates, begin = [], [], time.perf_counter()
    while len(rates) < 5 or time.perf_counter() - begin < args.tokenizer_seconds:
        wall, cpu, count = time.perf_counter(), time.process_time(), 0
        while count == 0 or time.perf_counter() - wall < 0.25:     # rounds of >= 0.25 s: less jitter
            tokenizer.text_cache.clear()
            one_pass()
            count += len(captions)
        rates.append(count / (time.perf_counter() - wall))
        cpu_rates.append(count / (time.process_time() - cpu))
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    steady, steady_cpu = spread(rates), spread(cpu_rates)
    print(f"tokenizer on {len(captions)} captions ({args.captions or 'built-in list'}): "
          f"{statistics.mean(lengths):.1f} tokens mean, {max(lengths)} max (with SOT/EOT)")
    print(f"  cold    {cold:,.0f} captions/s, {cold_cpu:,.0f} per CPU-second")
    print(f"  steady  {steady['median']:,.0f} captions/s (min {steady['min']:,.0f}, max {steady['max']:,.0f}), "
          f"{steady_cpu['median']:,.0f} per CPU-second (min {steady_cpu['min']:,.0f}, max {steady_cpu['max']:,.0f}); "
          f"{len(rates)} rounds")
    return {"mode": "tokenizer", "captions": len(captions), "mean_tokens": statistics.mean(lengths),
            "cold_captions_per_s": cold, "cold_captions_per_cpu_s": cold_cpu, "steady_captions_per_s": steady,
            "steady_captions_per_cpu_s": steady_cpu}


# ----------------------------------------------------------------------------------------------
# ZeRO: one launch per (ranks, stage), each rank reports its peak memory and step time
# ----------------------------------------------------------------------------------------------

# JPEG shards the data mode reads: (name, width, height, JPEG quality)
DATA_KINDS = (("img2dataset's default, 256 x 256 q95", 256, 256, 95), ("480 x 360 photos, q90", 480, 360, 90),
              ("1024 x 768 originals, q90", 1024, 768, 90))
# The GPU the data mode sizes the cores for: an H200 SXM's dense bf16 peak (NVIDIA's datasheet) at 40% MFU
TARGET_MFU = 0.40


def write_photo_shards(folder, shards, per_shard, width, height, quality, seed=0):
    """img2dataset-style shards of width x height JPEGs: smoothed noise under a few filled shapes, so
    that the bytes and the decode cost are a photo's rather than a flat render's."""
    import io
    import random
    import tarfile
    from PIL import Image, ImageDraw, ImageFilter
    import shapes
    rng = random.Random(seed)
    noise = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                pixels = torch.randint(0, 256, (height // 4, width // 4, 3), generator=noise, dtype=torch.uint8).numpy()
                image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
                image = image.filter(ImageFilter.GaussianBlur(2))
                draw = ImageDraw.Draw(image)
                for _ in range(rng.randint(1, 4)):
                    r = rng.uniform(0.1, 0.3) * min(width, height)
                    colour = tuple(rng.randrange(256) for _ in range(3))
                    shapes.draw_shape(draw, rng.choice(shapes.SHAPES), rng.uniform(r, width - r),
                                      rng.uniform(r, height - r), r, rng.uniform(-0.3, 0.3), colour, (0, 0, 0))
                encoded = io.BytesIO()
                image.save(encoded, format="JPEG", quality=quality)
                for name, payload in ((f"{s:05d}{j:04d}.jpg", encoded.getvalue()),
                                      (f"{s:05d}{j:04d}.txt", CAPTIONS[(s + j) % len(CAPTIONS)].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / ("{00000..%05d}.tar" % (shards - 1)))


# OpenCLIP's training pipeline (get_wds_dataset, image_transform, tokenizer) on the same shards, one
# pass in this process after a warm-up pass: run by the interpreter --openclip-python names (OpenCLIP
# is no dependency of this project). argv: shards, samples, image size, batch. Prints samples/s per
# CPU-second and wall.
OPENCLIP_PASS = r"""
import sys, time, types, torch
import open_clip
from open_clip_train.data import get_wds_dataset
torch.set_num_threads(1)
spec, samples, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
args = types.SimpleNamespace(train_data=spec, val_data=None, dataset_resampled=False, train_num_samples=samples,
                             train_data_upsampling_factors=None, seed=0, batch_size=batch, world_size=1, workers=0)
transform = open_clip.image_transform(size, is_train=True)
loader = get_wds_dataset(args, transform, True, tokenizer=open_clip.get_tokenizer("ViT-B-32")).dataloader
sum(len(b[0]) for b in loader)
wall, cpu = time.perf_counter(), time.process_time()
count = sum(len(b[0]) for b in loader)
print(count / (time.process_time() - cpu), count / (time.perf_counter() - wall))
"""


def data_rates(spec, image_size, batch, samples):
    """(samples per CPU-second, per wall second) of this project's pipeline, one pass in this process
    after a warm-up pass: data.train_loader without workers (what each worker does: tar read,
    decode, random resized crop, uint8, tokenize, collate), one thread."""
    import itertools
    import data
    stream = data.open_train_data("webdataset", spec, image_size, shuffle_buffer=samples)
    for timed in (False, True):
        loader = data.train_loader(stream, batch, 0, 1, 0)
        wall, cpu = time.perf_counter(), time.process_time()
        count = sum(len(b[0]) for b in itertools.islice(loader, samples // batch))
        if timed:
            return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def decode_floor(spec):
    """JPEGs fully decoded by PIL per CPU-second, nothing else: the most a worker could deliver."""
    import io
    import data
    from PIL import Image
    jpegs = [files["jpg"] for shard in data.expand_shards(spec) for _, files in data.read_tar(shard)]
    cpu = time.process_time()
    for jpeg in jpegs:
        Image.open(io.BytesIO(jpeg)).load()
    return len(jpegs) / (time.process_time() - cpu)


def bench_data(args, device):
    """The data pipeline per core, on JPEG shards of DATA_KINDS: this project's samples per CPU-second
    (one worker's work, in this process), PIL's full-decode floor, and with --openclip-python
    OpenCLIP's pipeline on the same shards; --data-rounds rounds, the pipelines interleaved in each
    (the machine's load moves under a long run). Then the cores per GPU a pairs/s target needs (by
    default an H200's at 40% MFU, from this preset's FLOPs). With --steps > 0, train_ds.py end to end
    on the first kind against the bare training step: pairs/s and its data wait."""
    config = msclip.MSCLIPConfig(**msclip.PRESETS[args.preset])
    batch, total = 64, args.data_shards * args.data_per_shard
    torch.set_num_threads(1)                                     # as in a DataLoader worker
    msclip.default_tokenizer()
    flops = model_flops(config, 17)["total"]
    target = args.data_pairs_per_s or TARGET_MFU * SPEC_BF16_TFLOPS["H200"] * 1e12 / (3 * flops)
    print(f"target: {target:,.0f} pairs/s for {args.preset} ("
          + ("--data-pairs-per-s" if args.data_pairs_per_s else f"an H200's {SPEC_BF16_TFLOPS['H200']} TFLOP/s bf16 "
             f"at {TARGET_MFU:.0%} MFU, {flops / 1e9:.2f} GFLOP per pair forward at 17 tokens, x3 for training") + ")")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = [write_photo_shards(Path(tmp) / f"kind{i}", args.data_shards, args.data_per_shard, w, h, q)
                 for i, (_, w, h, q) in enumerate(DATA_KINDS)]
        rates = {name: {"msclip": [], "floor": [], "openclip": []} for name, *_ in DATA_KINDS}
        for _ in range(args.data_rounds):
            for (name, *_), spec in zip(DATA_KINDS, specs):
                rates[name]["msclip"].append(data_rates(spec, config.image_size, batch, total))
                if args.openclip_python:
                    proc = subprocess.run([args.openclip_python, "-c", OPENCLIP_PASS, spec, str(total),
                                           str(config.image_size), str(batch)], capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"OpenCLIP's pass failed:\n{proc.stderr[-3000:]}")
                    rates[name]["openclip"].append(tuple(float(v) for v in proc.stdout.split()[-2:]))
                rates[name]["floor"].append(decode_floor(spec))
        print(f"per core ({config.image_size} px train crop, {total} samples a pass, median of {args.data_rounds} "
              f"interleaved rounds; samples per CPU-second, wall in brackets; load average {os.getloadavg()[0]:.1f}):")
        for name, w, h, q in DATA_KINDS:
            r = rates[name]
            mine, floor = statistics.median(c for c, _ in r["msclip"]), statistics.median(r["floor"])
            line = (f"  {name}: PIL decode alone {floor:,.0f}/s | msclip {mine:,.0f}/s "
                    f"({statistics.median(w for _, w in r['msclip']):,.0f} wall, {mine / floor:.0%} of the floor)")
            theirs = statistics.median(c for c, _ in r["openclip"]) if r["openclip"] else None
            if theirs:
                line += (f" | OpenCLIP {theirs:,.0f}/s ({statistics.median(w for _, w in r['openclip']):,.0f} wall)"
                         f" | msclip / OpenCLIP {mine / theirs:.2f}x")
            print(line + f" | cores per GPU at {target:,.0f} pairs/s: {target / mine:.1f} workers + 1 for the rank")
            results.append({"kind": name, "width": w, "height": h, "quality": q, "floor_per_cpu_s": floor,
                            "msclip_per_cpu_s": mine, "openclip_per_cpu_s": theirs, "rounds": r,
                            "cores_per_gpu": target / mine + 1})
        result = {"mode": "data", "preset": args.preset, "image_size": config.image_size, "target_pairs_per_s": target,
                  "kinds": results}
        if args.steps > 0:
            result.update(end_to_end(args, device, specs[0]))
    return result


def end_to_end(args, device, spec):
    """train_ds.py on `spec` with --data-workers workers against the bare step of the same preset and
    batch: pairs/s, and the share of the time the loop waited for data (metrics.jsonl's data_wait)."""
    batch = args.batch_size
    torch.manual_seed(0)
    trainer = Trainer(msclip.create_model(args.preset), args, device)
    (times,), _ = time_steps([trainer], [make_batch(trainer.model.config, batch, device)], args.warmup, args.steps)
    bare = batch / statistics.median(times)
    del trainer
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train"
        command = [sys.executable, str(Path(__file__).with_name("train_ds.py")), "--preset", args.preset,
                   "--train_data", spec, "--batch_size", str(batch), "--steps", str(args.warmup + args.steps),
                   "--log_every", str(max(1, args.warmup)), "--eval_every", "-1", "--save_every", "0", "--zero_stage",
                   "0", "--precision", args.precision, "--workers", str(args.data_workers), "--lr", "1e-4",
                   "--out_dir", str(out)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        entries = train_ds.read_metrics(out)[0][1:]  # after the warm-up window
    end = statistics.mean(e["pairs_per_s"] for e in entries)
    wait = statistics.mean(e["data_wait"] for e in entries)
    print(f"{args.preset}, batch {batch}, {args.precision}: bare step {bare:.2f} pairs/s (median of {args.steps}); "
          f"train_ds.py with {args.data_workers} worker(s) {end:.2f} pairs/s ({end / bare:.0%}), data wait {wait:.0%}")
    return {"batch_size": batch, "bare_pairs_per_s": bare, "train_ds_pairs_per_s": end, "data_wait": wait,
            "workers": args.data_workers}


# One rank reading a CSV (argv: the file, this repository): start-up seconds, peak and retained RSS
# above the process before; then a forked child reads 200,000 random rows as a DataLoader worker
# does, and reports the memory it had to copy (Private_Dirty: pages the rank's objects shared until touched).
CSV_RANK = r"""
import json, os, random, resource, sys, time
sys.path.insert(0, sys.argv[2])
import data

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def private():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_Dirty"))

base = rss()
start = time.perf_counter()
table = data.CsvCaptions(sys.argv[1])
seconds = time.perf_counter() - start
out = {"rows": len(table), "seconds": seconds, "retained": rss() - base,
       "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}
reader, writer = os.pipe()
if os.fork() == 0:
    before, rows = private(), random.Random(0)
    for _ in range(200000):
        i = rows.randrange(len(table))
        table.paths[i], table.captions[i]
    os.write(writer, str(private() - before).encode())
    os._exit(0)
os.close(writer)
out["worker_copied"] = int(os.read(reader, 64))
os.wait()
print(json.dumps(out))
"""


def write_csv(path, rows, seed=0):
    """A CC12M-like TSV: img2dataset-style relative paths and captions of 6-30 words (mean ~105 characters).
    Only the first image exists, empty (data.CsvCaptions refuses a file none of whose first images exists)."""
    import random
    rng = random.Random(seed)
    words = " ".join(CAPTIONS).split()
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(4096)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("filepath\ttitle\n")
        for start in range(0, rows, 65536):
            f.write("".join(f"images/{i // 10000:05d}/{i:09d}.jpg\t{captions[(i * 7919) % 4096]}\n"
                            for i in range(start, min(rows, start + 65536))))
    first = Path(path).parent / "images" / "00000" / f"{0:09d}.jpg"
    first.parent.mkdir(parents=True, exist_ok=True)
    first.touch()


def bench_csv(args):
    """data.CsvCaptions on a generated --csv-rows-row TSV, in a fresh process as a rank: start-up time,
    peak and retained RSS against the file's size, and what a forked DataLoader worker copies."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.tsv"
        write_csv(path, args.csv_rows)
        size = path.stat().st_size
        proc = subprocess.run([sys.executable, "-c", CSV_RANK, str(path), str(Path(__file__).parent)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            raise SystemExit(f"reading the CSV failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.splitlines()[-1])
    print(f"{r['rows']:,} rows, {size / 2 ** 30:.2f} GiB file: start-up {r['seconds']:.1f} s; RSS above the process "
          f"before: peak {gib(r['peak'])} ({r['peak'] / size:.2f}x the file), retained {gib(r['retained'])} "
          f"({r['retained'] / size:.2f}x); a forked worker reading 200,000 random rows copied {r['worker_copied'] / 2 ** 20:.1f} MiB")
    return {"mode": "csv", "file_bytes": size, **r}


def bench_accumulation(args):
    """One batch of --batch-size pairs at once against --accum micro-batches of it, every pair a
    negative of every other (train_ds.py --grad_accum): peak memory and step time, each in a fresh
    process. The cache holds only features; the price is one forward more per micro-batch."""
    def above(r):
        return r["peak_memory"] - r["memory_before_model"]

    results = {}
    for accum in (1, args.accum):
        r = results[accum] = run_alone(args.preset, args, args.warmup, args.steps, quiet=True, accum=accum)
        print(f"{args.preset}, {accum} x {args.batch_size // accum} pairs, {args.precision}: step "
              f"{fmt_spread(r['step_s'])}; peak memory {gib(r['peak_memory'])}, {gib(above(r))} above the process "
              "before the model", flush=True)
    whole, accumulated = results[1], results[args.accum]
    print(f"{args.accum} micro-batches: {above(accumulated) / above(whole):.2f}x the memory above the model's start, "
          f"{accumulated['step_s']['median'] / whole['step_s']['median']:.2f}x the step time")
    return {"mode": "accumulation", "results": [whole, accumulated]}


def zero_model_state_bytes(params, stage, world):
    """fp32 AdamW model states per rank (ZeRO paper): weights 4, gradients 4, two moments 8 bytes
    per parameter; stage 1 partitions the moments, 2 also the gradients, 3 also the weights."""
    weights, grads, moments = 4 * params, 4 * params, 8 * params
    if stage >= 1:
        moments /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    return weights + grads + moments


def bench_zero(args):
    results = []
    for world in args.zero_ranks:
        for stage in args.zero_stages:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)),
                       "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "5", "PYTHONWARNINGS": "ignore"}
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           __file__, "--mode", "zero-worker", "--zero-stage", str(stage), "--preset", args.preset,
                           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
                           "--steps", str(args.steps), "--json", str(out)]
                proc = subprocess.run(command, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
                    raise SystemExit(f"ZeRO-{stage} on {world} rank(s) failed (exit {proc.returncode})")
                result = json.loads(out.read_text())
            results.append(result)
            ranks = result["ranks"]
            expected = zero_model_state_bytes(result["params"], stage, world)
            print(f"ZeRO-{stage}, {world} rank(s), batch {args.batch_size} per rank, {result['threads']} thread(s) "
                  f"per rank: step {fmt_spread(ranks[0]['step_s'])}; peak memory per rank "
                  f"{', '.join(gib(r['peak_memory']) for r in ranks)}, above the process before the model: "
                  f"{', '.join(gib(r['peak_memory'] - r['memory_before_model']) for r in ranks)} "
                  f"(model states by the ZeRO formula: {gib(expected)})", flush=True)
    return {"mode": "zero", "results": results}


def zero_worker(args):
    """One rank of a ZeRO launch (started by bench_zero through torchrun)."""
    import deepspeed
    import torch.distributed as dist
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # skip a JIT compile training never uses
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = current_memory(torch.device("cpu"))
    model = msclip.create_model(args.preset).train()
    params = sum(p.numel() for p in model.parameters())
    # Buckets of 5e7 elements (ds_config.json's); DeepSpeed's default 5e8-element fp32 buckets (2 GB)
    # would hide the saving of every stage. Clipping off, as when the README figures were measured.
    buckets = {"reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7,
               "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 1e8}
    ds_config = {"train_micro_batch_size_per_gpu": int(args.batch_size), "gradient_accumulation_steps": 1,
                 "gradient_clipping": 0.0, "zero_optimization": {"stage": args.zero_stage, **buckets},
                 "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=model.configure_optimizers(5e-4, 0.2), config=ds_config)
    images, tokens = make_batch(model.config, int(args.batch_size), torch.device("cpu"), seed=rank)
    gc.collect()
    try:                                       # give the freed full-size weights back to the OS (glibc)
        __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    reset_peak_memory(torch.device("cpu"))     # the peak of the training steps, not of building the model
    loss_fn, times = msclip.ContrastiveLoss(), []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loss_fn(*engine(images, tokens))
        engine.backward(loss)
        engine.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    mine = {"rank": rank, "step_s": spread(times), "peak_memory": peak_memory(torch.device("cpu")),
            "memory_before_model": base, "loss": float(loss)}
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps({"stage": args.zero_stage, "world": world, "params": params,
                                               "threads": torch.get_num_threads(), "ranks": ranks}))
    dist.barrier()


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="train", choices=["train", "textlen", "tokenizer", "zero", "zero-worker", "data",
                                                         "csv", "accumulation"])
    p.add_argument("--preset", default="msclip-s-b32", choices=list(msclip.PRESETS))
    p.add_argument("--compare", action="store_true", help="time clip-b32 and msclip-s-b32 and print their ratio")
    p.add_argument("--presets", nargs=2, default=["clip-b32", "msclip-s-b32"], help="what --compare compares")
    p.add_argument("--batch-size", help="pairs per step (default 32; per rank and default 4 for ZeRO); "
                                        "'max' searches for the largest that fits (CUDA)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median, min and max are printed)")
    p.add_argument("--compile", action="store_true", help="torch.compile both towers (off: slower on CPU)")
    p.add_argument("--channels-last", action="store_true", help="images in NHWC memory format (no gain on CPU)")
    p.add_argument("--fused-adamw", type=int, default=1, help="AdamW(fused=True): one kernel per step (1/0)")
    p.add_argument("--spec-tflops", type=float, help="the device's datasheet peak for MFU (default: bf16 of the GPUs in "
                                                     f"SPEC_BF16_TFLOPS, {SPEC_BF16_TFLOPS})")
    p.add_argument("--captions", help="a text file, one caption per line (tokenizer and textlen modes)")
    p.add_argument("--tokenizer-seconds", type=float, default=3.0)
    p.add_argument("--zero-ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--data-shards", type=int, default=4, help="data mode: JPEG shards written")
    p.add_argument("--data-per-shard", type=int, default=64, help="data mode: JPEGs per shard")
    p.add_argument("--data-workers", type=int, default=1, help="data mode: DataLoader workers of the train_ds.py run")
    p.add_argument("--data-rounds", type=int, default=2, help="data mode: interleaved rounds of the per-core figures")
    p.add_argument("--data-pairs-per-s", type=float, help="data mode: the rate to size cores per GPU for (default: "
                                                          "an H200 at 40%% MFU on this preset)")
    p.add_argument("--openclip-python", help="data mode: a Python with open_clip_torch and webdataset installed, to "
                                             "time OpenCLIP's pipeline on the same shards")
    p.add_argument("--csv-rows", type=int, default=12_000_000, help="csv mode: rows of the generated TSV (CC12M: 12M)")
    p.add_argument("--accum", type=int, help="train mode: the batch in this many micro-batches, every pair a "
                                             "negative of every other (train_ds.py --grad_accum; default 1); "
                                             "accumulation mode: against the batch at once (default 4)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 4 if args.mode.startswith("zero") else 32
    elif args.batch_size != "max":
        args.batch_size = int(args.batch_size)
    args.accum = args.accum or (4 if args.mode == "accumulation" else 1)
    if args.accum < 1 or args.accum > 1 and (args.batch_size == "max" or args.batch_size % args.accum):
        p.error(f"--accum {args.accum} must be >= 1 and divide --batch-size {args.batch_size}")
    args.caption_list = None
    if args.captions:
        args.caption_list = [line.strip() for line in open(args.captions, encoding="utf-8") if line.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "zero-worker":
        return zero_worker(args)
    device = torch.device(args.device)
    if args.batch_size == "max" and (device.type != "cuda" or args.mode != "train"):
        raise SystemExit("--batch-size max searches by running out of memory: CUDA and the train mode only")
    if args.precision == "bf16" and device.type == "cpu":
        print("warning: bf16 on a CPU without bf16 matrix units runs far slower than fp32")
    print(f"torch {torch.__version__}, {device.type}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {args.precision}, load average {os.getloadavg()[0]:.2f}")
    if args.mode == "tokenizer":
        result = bench_tokenizer(args)
    elif args.mode == "zero":
        result = bench_zero(args)
    elif args.mode == "textlen":
        result = bench_textlen(args, device)
    elif args.mode == "data":
        result = bench_data(args, device)
    elif args.mode == "csv":
        result = bench_csv(args)
    elif args.mode == "accumulation":
        result = bench_accumulation(args)
    else:
        result = (bench_compare if args.compare else bench_train)(args, device, matmul_rate(args, device))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
