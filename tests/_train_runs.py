"""Helper of tests/test_train_ds.py: several trainings inside one process or one DeepSpeed launch,
so that a test pays the launcher's start-up (20-30 s on 2 CPU cores) once for many checks.

    python tests/_train_runs.py SPEC.json                           # one process
    deepspeed --num_gpus 2 tests/_train_runs.py SPEC.json           # two ranks

SPEC.json: {"result": PATH, "runs": [RUN, ...]}. A RUN is {"name", "argv"} (a train_ds.main call;
its per-step metrics are read back from its --out_dir; with "count_host_reads": true, also every
read of a tensor value to the host, see counting_host_reads; with "record_evaluation": true, what
each rank encoded in eval mode, see recording_evaluation; with "record_reductions": true, the
ZeRO 1/2 gradient buckets and the elements each reduces, by type, see recording_reductions; with
"record_lrs": true, the learning rates AdamW applied, see recording_lrs) or
{"name", "reference": {...}}: the same
training re-computed in plain PyTorch, one process holding the global batch, without DeepSpeed and
without train_ds's loop (only the definition of the data: shapes.SyntheticCaptions,
shapes.minimal_pair_batches or data.epoch_batches, data.normalize_images). Rank 0
writes {name: result} to PATH.
"""
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import data  # noqa: E402
import msclip  # noqa: E402
import shapes  # noqa: E402
import train_ds  # noqa: E402
from train_ds import read_metrics  # noqa: E402


def reference(o):
    """Plain-PyTorch training on the built-in data: AdamW with MS-CLIP's groups, linear warm-up +
    cosine, global-norm clipping, logit scale clamped to [0, ln(100)] after each step. A step reads
    o["accum"] global micro-batches of o["global_micro"] pairs, each cut into o["ranks"] (default 1)
    rank slices that BatchNorm normalises on their own, moving that rank's running statistics (the
    model ends with rank 0's, those the trainer exports). o["accumulation"]: "contrastive" (default)
    takes one loss over all the step's pairs; "plain" one loss per global micro-batch, the gradients
    averaged. o["save"]: write the final model there (msclip.save_checkpoint).
    o["pass1_moves_statistics"]: a wrong trainer, for blindness checks: every rank slice also goes
    through the model once without gradient before the step, moving the running statistics twice."""
    torch.manual_seed(o["seed"])
    model = msclip.create_model(o["preset"], **o.get("overrides", {}))
    if o.get("logit_scale_init") is not None:
        model.logit_scale.data.fill_(o["logit_scale_init"])
    optimizer = model.configure_optimizers(o["lr"], o["wd"], o["lr_shared"], o["wd_shared"], betas=(0.9, 0.98), eps=1e-6)
    steps, warmup, start, end = o["steps"], o["warmup"], o["warmup_start"], o["min_lr_ratio"]

    def factor(step):
        if step < warmup:
            return start + (1 - start) * step / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    renders = shapes.SyntheticCaptions("train", length=o["samples"], image_size=model.config.image_size, seed=o["seed"])
    def epoch_batches(epoch):  # train_ds's order: data.train_loader
        if o["hard_negatives"] == "none":
            return data.epoch_batches(len(renders), o["global_micro"], o["seed"], epoch)
        groups = tuple(int(v) for v in o["hard_negatives"].split("x"))
        return shapes.minimal_pair_batches(len(renders), o["global_micro"], o["seed"], epoch, *groups)

    order = ((epoch, batch) for epoch in range(1000) for batch in epoch_batches(epoch))
    ranks = o.get("ranks", 1)
    micro = o["global_micro"] // ranks
    statistics = [dict(model.named_buffers()) for _ in range(ranks)]

    def use_statistics(rank):
        """Rank `rank`'s BatchNorm statistics in the model, as copies: a forward moves them in place,
        and autograd checks that what an earlier forward read is unchanged."""
        for name, value in statistics[rank].items():
            module, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module), attribute, value.clone())

    def encode(epoch, indices, rank):
        """One rank slice through the model, moving that rank's BatchNorm statistics."""
        use_statistics(rank)
        samples = [renders[(epoch, i)] for i in indices]
        out = model(data.normalize_images(torch.stack([s[0] for s in samples])), torch.stack([s[1] for s in samples]))
        statistics[rank] = dict(model.named_buffers())
        return out

    loss_fn = msclip.ContrastiveLoss()
    losses, scales, norms = [], [], []
    for _ in range(steps):
        slices = [(epoch, batch[r * micro: (r + 1) * micro], r) for epoch, batch in
                  (next(order) for _ in range(o["accum"])) for r in range(ranks)]
        if o.get("pass1_moves_statistics"):
            with torch.no_grad():
                for piece in slices:
                    encode(*piece)
        outputs = [encode(*piece) for piece in slices]
        logit_scale = outputs[0][2]
        if o.get("accumulation", "contrastive") == "contrastive":
            loss = loss_fn(torch.cat([out[0] for out in outputs]), torch.cat([out[1] for out in outputs]), logit_scale)
        else:
            per_micro = [outputs[j: j + ranks] for j in range(0, len(outputs), ranks)]
            loss = sum(loss_fn(torch.cat([out[0] for out in part]), torch.cat([out[1] for out in part]), logit_scale)
                       for part in per_micro) / o["accum"]
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        scales.append(model.logit_scale.item())
    use_statistics(0)
    if o.get("save"):
        msclip.save_checkpoint(model, o["save"])
    return {"losses": losses, "logit_scales": scales, "grad_norms": norms}


HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__")


def counting_host_reads():
    """Patch the Tensor methods that copy a value to the host (on a GPU: wait for the device) and
    DeepSpeedEngine.step. Returns (counts, restore): counts maps "engine steps so far|file|function|method"
    to the number of reads, file relative to the repository or as package/module.py."""
    import deepspeed.runtime.engine as ds_engine
    counts, done, saved = {}, [0], {}

    def where(frame):
        path = os.path.abspath(frame.f_code.co_filename)
        root = os.path.dirname(HERE)
        name = os.path.relpath(path, root) if path.startswith(root + os.sep) else os.path.join(
            *path.split(os.sep)[-2:])
        return f"{name}|{frame.f_code.co_name}"

    def patch(owner, name, make):
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, make(saved[(owner, name)]))

    def reader(method):
        def make(original):
            def read(self, *args, **kwargs):
                key = f"{done[0]}|{where(sys._getframe(1))}|{method}"
                counts[key] = counts.get(key, 0) + 1
                return original(self, *args, **kwargs)
            return read
        return make

    def stepper(original):
        def step(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            done[0] += 1
            return result
        return step

    for method in HOST_READS:
        patch(torch.Tensor, method, reader(method))
    patch(ds_engine.DeepSpeedEngine, "step", stepper)
    return counts, lambda: [setattr(owner, name, value) for (owner, name), value in saved.items()]


def recording_evaluation():
    """Patch MSCLIP.encode_image / encode_text to record, in call order, what this rank encodes in
    eval mode: ["image", features as nested lists] and ["text", number of texts]. Returns (records, restore)."""
    records, saved = [], (msclip.MSCLIP.encode_image, msclip.MSCLIP.encode_text)

    def encode_image(self, images, *args, **kwargs):
        out = saved[0](self, images, *args, **kwargs)
        if not self.training:
            records.append(["image", out.detach().float().cpu().tolist()])
        return out

    def encode_text(self, tokens, *args, **kwargs):
        if not self.training:
            records.append(["text", len(tokens)])
        return saved[1](self, tokens, *args, **kwargs)

    msclip.MSCLIP.encode_image, msclip.MSCLIP.encode_text = encode_image, encode_text

    def restore():
        msclip.MSCLIP.encode_image, msclip.MSCLIP.encode_text = saved
    return records, restore


def recording_reductions():
    """Patch DeepSpeed to record the ZeRO 1/2 optimizer's gradient buckets (one per type it reduces
    in) and every reduction collective that engine.backward issues: elements by the tensor's type,
    summed over the run. Returns (records, restore)."""
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero
    records, inside = {"buckets": [], "reduced": {}}, [False]
    saved = {(Zero, "__init__"): Zero.__init__, (DeepSpeedEngine, "backward"): DeepSpeedEngine.backward}
    saved.update({(ds_comm, n): getattr(ds_comm, n) for n in ("all_reduce", "reduce", "reduce_scatter_tensor",
                                                              "reduce_scatter_fn", "all_reduce_coalesced")})

    def init(self, *args, **kwargs):
        saved[(Zero, "__init__")](self, *args, **kwargs)
        records["buckets"] = sorted(str(dtype).replace("torch.", "") for dtype in self.ipg_buckets)

    def backward(self, *args, **kwargs):
        inside[0] = True
        try:
            return saved[(DeepSpeedEngine, "backward")](self, *args, **kwargs)
        finally:
            inside[0] = False

    def collective(name):
        def call(tensor, *args, **kwargs):
            if inside[0]:
                for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                    key = f"{name}|{str(t.dtype).replace('torch.', '')}"
                    records["reduced"][key] = records["reduced"].get(key, 0) + t.numel()
            return saved[(ds_comm, name)](tensor, *args, **kwargs)
        return call

    Zero.__init__, DeepSpeedEngine.backward = init, backward
    for owner, name in saved:
        if owner is ds_comm:
            setattr(ds_comm, name, collective(name))

    def restore():
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
    return records, restore


def recording_lrs():
    """Patch torch.optim.AdamW.step to record, per call, [learning rate, weight decay] of every
    parameter group as the optimizer applies them (DeepSpeed calls it at every optimizer step it does
    not skip: at ZeRO 1-2 once per group, each call holding that group alone). Returns (records, restore)."""
    records, saved = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        records.append([[float(group["lr"]), group["weight_decay"]] for group in self.param_groups])
        return saved(self, *args, **kwargs)

    torch.optim.AdamW.step = step

    def restore():
        torch.optim.AdamW.step = saved
    return records, restore


def main():
    spec_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    with open(spec_path) as f:
        spec = json.load(f)
    results = {}
    for run in spec["runs"]:
        started = time.time()
        if "reference" in run:
            results[run["name"]] = reference(run["reference"])
        else:
            counts, restore = counting_host_reads() if run.get("count_host_reads") else (None, None)
            records, stop_recording = recording_evaluation() if run.get("record_evaluation") else (None, None)
            reductions, stop_reductions = recording_reductions() if run.get("record_reductions") else (None, None)
            lrs, stop_lrs = recording_lrs() if run.get("record_lrs") else (None, None)
            try:
                result = train_ds.main(run["argv"])
            finally:
                for undo in (restore, stop_recording, stop_reductions, stop_lrs):
                    if undo:
                        undo()
            if reductions is not None:
                result["reductions"] = reductions
            if lrs is not None:
                result["applied_lrs"] = lrs
            if counts is not None:
                import deepspeed
                result.update(host_reads=counts, deepspeed_version=deepspeed.__version__)
            import torch.distributed as dist
            dist.barrier()  # rank 0 has released --out_dir's lock before any rank starts the next run in it
            if records is not None:  # every rank's, in rank order
                everyone = [None] * dist.get_world_size()
                dist.all_gather_object(everyone, records)
                result["evaluation_encodes"] = everyone
            if dist.get_rank() == 0:
                out_dir = run["argv"][run["argv"].index("--out_dir") + 1]
                steps, evals = read_metrics(out_dir)
                result.update(losses=[e["loss"] for e in steps], steps=[e["step"] for e in steps],
                              logit_scales=[e["logit_scale"] for e in steps], lrs=[e["lr"] for e in steps],
                              data_waits=[e["data_wait"] for e in steps],
                              evals=evals, skipped_logged=steps[-1]["skipped"] if steps else {})
            results[run["name"]] = result
        results[run["name"]]["seconds"] = time.time() - started
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(spec["result"], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
