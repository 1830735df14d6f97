"""Helpers shared by the test modules (no test module imports another): ports, tar and CSV
writers for the data layouts, weight comparison, one-thread fixtures."""
import io
import json
import os
import sys
import shutil
import subprocess
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distributed import free_port  # noqa: E402,F401  (the tests' ports: the trainer's own helper)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead (and contention on shared CI machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tar(path, samples):
    """A tar file of samples, each a list of (member name, bytes) in the order written."""
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def encoded_image(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# The CSV fixture's unreadable rows: row -> reason the trainer counts it under
BAD_ROWS = {5: "missing", 13: "corrupt", 21: "empty_caption", 29: "corrupt", 37: "missing", 45: "empty_caption"}


def write_csv(folder, rows=48):
    """OpenCLIP's CSV layout (tab-separated, filepath + caption, paths relative to the file) of
    built-in renders, with the BAD_ROWS broken."""
    import shapes
    renders = shapes.SyntheticCaptions("train", length=rows, seed=7)
    (folder / "images").mkdir(parents=True)
    lines = ["filepath\tcaption"]
    for i in range(rows):
        image, caption, _, _ = renders.render(i)
        path = f"images/{i:03d}.png"
        reason = BAD_ROWS.get(i)
        if reason == "corrupt":
            (folder / path).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        elif reason != "missing":
            image.save(folder / path)
        lines.append(f"{path}\t{'' if reason == 'empty_caption' else caption}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return folder / "train.csv"


def write_shards(folder, shards=4, per_shard=8, bad=False):
    """img2dataset's layout (KEY.jpg / KEY.png + KEY.txt) of built-in renders. With bad=True shard 1
    holds a corrupt image, a sample without caption and an empty caption, and a truncated shard
    follows. Returns the brace pattern naming the shards."""
    import shapes
    renders = shapes.SyntheticCaptions("train", length=shards * per_shard, seed=8)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            image, caption, _, _ = renders.render(i)
            image_name = f"{i:09d}.{'jpg' if i % 2 else 'png'}"
            files = {image_name: encoded_image(image, "JPEG" if i % 2 else "PNG"), f"{i:09d}.txt": caption.encode()}
            if bad and s == 1 and j == 2:
                files[image_name] = b"garbage"
            if bad and s == 1 and j == 4:
                del files[f"{i:09d}.txt"]
            if bad and s == 1 and j == 6:
                files[f"{i:09d}.txt"] = b"  "
            samples.append(list(files.items()))
        write_tar(folder / f"{s:05d}.tar", samples)
    if bad:
        whole = (folder / "00000.tar").read_bytes()
        with tarfile.open(folder / "00000.tar") as tar:
            member = tar.getmembers()[6]  # cut the shard inside the 4th sample's image bytes
        (folder / f"{shards:05d}.tar").write_bytes(whole[: member.offset_data + member.size // 2])
    return str(folder / ("{00000..%05d}.tar" % (shards - 1 + bad)))


def state_dict(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    """Two msclip.save_checkpoint files hold bit-identical tensors."""
    a, b = state_dict(a), state_dict(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------------------
# Trainer launches (tests/_train_runs.py runs several trainings per launch)
# ----------------------------------------------------------------------------------------------

TRAIN_RUNS = os.path.join(ROOT, "tests", "_train_runs.py")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")

# One optimisation setting, shared by the plain-PyTorch reference and every DeepSpeed run of the
# equality check: BatchNorm-free shared-weight preset, gradient accumulation (every pair of the 32
# a negative of every other), clipping that bites, warm-up + cosine, and a logit scale starting
# above ln(100) so that the clamp acts from step 1.
EQUAL = dict(preset="msclip-tiny", layers=3, steps=5, global_micro=16, accum=2, lr=5e-4, lr_shared=3e-4, wd=0.05,
             wd_shared=0.2, warmup=2, warmup_start=0.01, min_lr_ratio=0.1, grad_clip=0.5, logit_scale_init=4.7,
             hard_negatives="4x2", samples=640, seed=3)
MODEL_OVERRIDES = ("layers", "fusion_layers")  # keys of a setting that change the preset's model


def setting_argv(setting, out_dir, ranks, stage):
    """train_ds.py's options for a setting like EQUAL, its global micro-batch split over `ranks`."""
    e, model = setting, []
    for key in MODEL_OVERRIDES:
        if key in e:
            model += [f"--{key}", ",".join(map(str, e[key])) if isinstance(e[key], tuple) else str(e[key])]
    return ["--preset", e["preset"], *model, "--steps", str(e["steps"]),
            "--batch_size", str(e["global_micro"] // ranks), "--grad_accum", str(e["accum"]), "--lr", str(e["lr"]),
            "--lr_shared", str(e["lr_shared"]), "--wd", str(e["wd"]), "--wd_shared", str(e["wd_shared"]),
            "--warmup_steps", str(e["warmup"]), "--warmup_start_ratio", str(e["warmup_start"]),
            "--min_lr_ratio", str(e["min_lr_ratio"]),
            "--grad_clip", str(e["grad_clip"]), "--logit_scale_init", str(e["logit_scale_init"]),
            "--hard_negatives", e["hard_negatives"], "--synthetic_samples", str(e["samples"]),
            "--seed", str(e["seed"]), "--zero_stage", str(stage), "--log_every", "1", "--eval_every", "-1",
            "--ds_set", "zero_optimization.stage3_param_persistence_threshold=0",
            "--ds_set", "zero_optimization.stage3_max_reuse_distance=0", "--out_dir", out_dir]


def equal_argv(out_dir, ranks, stage):
    return setting_argv(EQUAL, out_dir, ranks, stage)


def reference_spec(setting=EQUAL, **options):
    """A setting as tests/_train_runs.py's plain-PyTorch reference takes it, with its other options
    (ranks, accumulation, save, ...)."""
    ref = {k: v for k, v in setting.items() if k not in MODEL_OVERRIDES}
    return {**ref, "overrides": {k: setting[k] for k in MODEL_OVERRIDES if k in setting}, **options}


def trainer_env(tmp, name):
    """The environment of a trainer launch: one thread per rank, collectives that give up after 3
    minutes, a fresh torch extensions folder (to see that nothing compiles), no launcher variables."""
    extensions = tmp / f"{name}_torch_extensions"
    extensions.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "3",
           "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONWARNINGS": "ignore"}
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    return env, extensions


def launch(tmp, name, runs, ranks):
    """Run the helper once (1 process with plain python, or `deepspeed` with `ranks` ranks)."""
    spec, result = tmp / f"{name}.json", tmp / f"{name}_result.json"
    spec.write_text(json.dumps({"result": str(result), "runs": runs}))
    env, extensions = trainer_env(tmp, name)
    if ranks == 1:
        command = [sys.executable, TRAIN_RUNS, str(spec)]
    else:
        command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                   TRAIN_RUNS, str(spec)]
    proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    return json.loads(result.read_text()), log, extensions
