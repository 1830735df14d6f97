"""The cluster machinery of train_ds.py: what a run needs to survive many ranks, shared file
systems and schedulers, kept out of the training loop (as OpenCLIP keeps distributed.py and
file_utils.py). Each function names the failure it guards against.

- Launchers: rank, world size and rendezvous from torchrun / deepspeed / srun / mpirun / PMI.
- ZeRO: parameters that forward never touches, the logit-scale clamp in every copy, rank 0's
  BatchNorm statistics for evaluation.
- Checkpoints: DeepSpeed's, published atomically and durably, pruned, agreed on by every rank;
  loaded with weights_only=True; exported as one fp32 file; converted to DeepSpeed's universal
  format to resume on another number of ranks.
- One run per --out_dir (a lock), stop signals and a launcher that vanished (preemption).
"""
import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import types

import numpy as np
import torch

import msclip


# ----------------------------------------------------------------------------------------------
# Launchers and the process group
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


def device_index(local_rank, visible):
    """This process's GPU among the `visible` ones (torch.cuda.device_count()): its local rank when
    every GPU of the node is visible (`deepspeed`, torchrun, srun --gpus-per-node), 0 when the
    launcher shows each process one GPU (srun --gpus-per-task=1 or --gpu-bind=single:1, a
    CUDA_VISIBLE_DEVICES per rank), else the local rank modulo the visible GPUs (several per task).
    OpenCLIP asks for --no-set-device-rank in the one-GPU case; here it follows from the count."""
    if visible < 1:
        raise ValueError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
    return local_rank % visible


def init_distributed(timeout_minutes):
    """Join (or, under plain `python`, create) the process group: nccl on GPUs, gloo on CPU. The
    launcher's variables are in os.environ already (main() sets them from launcher_environment).
    Returns (deepspeed, this process's GPU index, or None on CPU).

    On GPUs the index is device_index's, and the process group is created here, bound to that
    device: DeepSpeed's own creation would bind cuda:LOCAL_RANK ("invalid device ordinal" when each
    task sees one GPU). LOCAL_RANK stays the local rank, which DeepSpeed checks against
    OMPI_COMM_WORLD_LOCAL_RANK under mpirun; deepspeed.initialize must get the index as
    args.device_rank, or its engine calls set_device(LOCAL_RANK) too. cudnn.benchmark is turned on
    (as OpenCLIP and timm do: the conv shapes are fixed; cuDNN's choice of algorithm is not
    bit-reproducible across runs)."""
    os.environ.setdefault("MASTER_PORT", str(free_port()))  # one process: any free port
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import datetime
    import deepspeed
    from deepspeed.utils import logger
    logger.setLevel("WARNING")
    timeout, device = datetime.timedelta(minutes=timeout_minutes), None
    if not cuda:
        # The shared-memory all-reduce op is for inference; training never calls it. Without this the
        # first run on a machine sits 1-3 minutes compiling it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "OMP_NUM_THREADS" not in os.environ:  # launchers leave it unset: ranks would fight over cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    else:
        device = device_index(int(os.environ["LOCAL_RANK"]), torch.cuda.device_count())
        torch.cuda.set_device(device)  # one GPU per process
        torch.backends.cudnn.benchmark = True
        if not torch.distributed.is_initialized():  # bound to the device (NCCL's eager init), as DeepSpeed does
            bind = {"device_id": torch.device("cuda", device)} if int(os.environ["WORLD_SIZE"]) > 1 else {}
            torch.distributed.init_process_group("nccl", timeout=timeout, **bind)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    return deepspeed, device


def node_cores(group=None):
    """(CPU cores this rank may run on, ranks of its node that run on them too). The cores are the
    rank's affinity (what a cpuset, taskset or the launcher's binding leaves it, not os.cpu_count()).
    With `group` (the process group exists), the sharing ranks are those on the same host whose
    affinity overlaps this rank's: srun --cpus-per-task and mpirun --bind-to pin each rank to its
    own cores (nothing shared), deepspeed and torchrun leave every rank all the node's cores. Without
    it, every rank of the node (LOCAL_WORLD_SIZE) is taken to share them."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    if group is None:
        return len(mine), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (socket.gethostname(), sorted(mine)), group=group)
    host = socket.gethostname()
    return len(mine), sum(1 for h, cores in everyone if h == host and mine.intersection(cores))


def agree(error, group):
    """Every rank's error (a string or None) -> one message naming the failing ranks, or None."""
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, error, group=group)
    failed = [(r, e) for r, e in enumerate(everyone) if e]
    return "; ".join(f"rank {r}: {e}" for r, e in failed[:4]) + (" ..." if len(failed) > 4 else "") if failed else None


# ----------------------------------------------------------------------------------------------
# ZeRO: parameters that live partitioned, the logit-scale clamp, rank 0's buffers
# ----------------------------------------------------------------------------------------------

def register_orphan_parameters(model):
    """ZeRO-3 gathers a module's parameters when its forward runs. encode_image/encode_text read
    the class token, positions and projections of modules whose forward never runs: declare them
    as used by the model's own forward."""
    import deepspeed
    for module in (model.image, model.text):
        for parameter in module.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, parameter)


def logit_scale_clamp(engine, minimum=0.0, maximum=math.log(100)):
    """A function that clamps the logit scale to [0, ln(100)] after a step (OpenCLIP's bounds: below 0
    the logits shrink inside [-1, 1] and the softmax flattens towards chance) in every copy the
    engine keeps: the model's parameter (at ZeRO-3 its gathered copy and this rank's partition) and the optimizer's
    fp32 master (ZeRO 1-3; at ZeRO-0 under torch_autocast the parameter is the master). Clamping
    only the model's copy would be undone by the next step. It runs on the device: no value comes
    back to the host and no collective runs. Build it after load_checkpoint."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param
    param = engine.module.logit_scale
    zero3 = hasattr(param, "ds_id")
    # ZeRO-3: a view into this rank's fp32 partition (a copy when the optimizer is offloaded)
    master = safe_get_local_fp32_param(param) if zero3 else None
    offloaded = bool(engine.zero_offload_optimizer())

    @torch.no_grad()
    def clamp():
        param.data.clamp_(minimum, maximum)  # ZeRO-3: the gathered copy, or an empty tensor
        if not zero3:
            safe_set_full_fp32_param(param, param.data)  # ZeRO 1/2: copies into the local master fragment, if any
        elif offloaded:
            param.ds_tensor.clamp_(minimum, maximum)
            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(minimum, maximum))
        else:
            param.ds_tensor.clamp_(minimum, maximum)
            master.clamp_(minimum, maximum)
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


# ----------------------------------------------------------------------------------------------
# Checkpoints: DeepSpeed's, published atomically and durably
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


def latest_checkpoint_folder(out_dir):
    """The folder of latest_checkpoint(out_dir), or None."""
    tag = latest_checkpoint(out_dir)
    return os.path.join(checkpoint_root(out_dir), tag) if tag else None


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


def own_files(folder, rank):
    """The files of a DeepSpeed checkpoint folder that `rank` wrote: its zero_pp_rank_R_* shards; rank 0
    also the rank-less ones (mp_rank_00_model_states.pt, zero_to_fp32.py)."""
    names = sorted(os.listdir(folder))
    ranks = {n: re.search(r"zero_pp_rank_(\d+)_", n) for n in names}
    return [os.path.join(folder, n) for n, m in ranks.items() if (int(m.group(1)) if m else 0) == rank]


def owned_partition(param):
    """The elements of a parameter this rank holds: at ZeRO-3 its partition less the padding (a
    parameter of n elements is split into equal partitions of ceil(n / ranks), and DeepSpeed leaves
    the padding past element n uninitialised, so it may hold NaN: a 1-element logit scale on 2 ranks
    is all padding on rank 1), else the whole tensor."""
    if not hasattr(param, "ds_tensor"):
        return param
    import torch.distributed as dist
    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    return param.ds_tensor.narrow(0, 0, max(0, min(size, param.ds_numel - start)))


def nonfinite_tensors(module):
    """Names of the module's parameters and buffers (BatchNorm's running statistics) that hold a NaN
    or an infinity in this rank's copy: at ZeRO-3 a parameter's partition (what this rank saves)
    without its padding, else the whole tensor. One pass over the weights and one read back to the host."""
    named = [(n, owned_partition(p)) for n, p in module.named_parameters()] + list(module.named_buffers())
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    return [named[i][0] for i in (~finite).nonzero().flatten().tolist()]


def save(engine, out_dir, step, client_state, trainer_state, keep, group, files=None):
    """DeepSpeed checkpoint into checkpoints/step_N, made durable before it counts: rank 0 empties the
    tag folder (an older run's files of this step, e.g. from another world size, would otherwise
    stay), every rank writes and fsyncs its own files, then rank 0 writes `files` ({name: text}),
    trainer_state.json (the completion marker) and points `latest` at it, and prunes older
    checkpoints marker first. A crash or a failed write at any point leaves the previous complete
    checkpoint the resume point; a failed write stops every rank with a message that says why (full
    disk, read-only, ...). Weights or BatchNorm statistics that are not finite (a diverged run) are
    never written: every rank checks its own before anything is touched, and all stop, naming the
    last finite checkpoint, which stays `latest` (it is the newest complete one, so pruning never
    removes it)."""
    import torch.distributed as dist
    root, tag = checkpoint_root(out_dir), f"step_{step:08d}"
    folder, rank = os.path.join(root, tag), dist.get_rank()
    bad = nonfinite_tensors(engine.module)
    problem = agree(f"{len(bad)} tensors hold NaN or infinity, e.g. {', '.join(bad[:3])}" if bad else None, group)
    if problem:
        previous = latest_checkpoint_folder(out_dir)
        message = (f"step {step}: the weights or BatchNorm statistics are not finite ({problem}): the run diverged, "
                   f"and checkpoint {tag} is not written. " +
                   (f"The last finite checkpoint, {previous}, stays `latest`: --resume continues "
                    "from it (with, e.g., a lower --lr or a longer warm-up)." if previous else
                    "No checkpoint was written before: start again with, e.g., a lower --lr or a longer warm-up."))
        raise SystemExit(message if rank == 0 else 1)
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
            for name, text in (files or {}).items():
                write_atomic(os.path.join(folder, name), text)
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


# ----------------------------------------------------------------------------------------------
# Loading checkpoints someone hands us: weights only; export; universal conversion
# ----------------------------------------------------------------------------------------------

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


def export(folder, path, allow_nonfinite=False):
    """Write the checkpoint in `folder` as msclip.save_checkpoint does ({"msclip_config", "state_dict"}),
    checked by loading it strictly into the model. Returns the model. Weights or buffers holding NaN
    or infinity (a diverged run; eval.py would score them at chance) raise ValueError unless
    `allow_nonfinite`."""
    state, weights = consolidated_state_dict(folder)
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad and not allow_nonfinite:
        raise ValueError(f"{folder} holds NaN or infinity in {len(bad)} of {len(weights)} tensors (e.g. "
                         f"{', '.join(bad[:3])}): it was saved after the run diverged, and its weights score at "
                         "chance; refusing to export it (--export_nonfinite writes it anyway, e.g. to inspect it)")
    model = msclip.load_checkpoint({"msclip_config": state["msclip_config"], "state_dict": weights})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    msclip.save_checkpoint(model, path)
    return model


def convert_to_universal(folder, target):
    """DeepSpeed's own re-partitioning: ds_to_universal turns the ZeRO-1/2/3 checkpoint in `folder` into
    one file per parameter and optimizer state in `target` (written in `target`.tmp, then renamed),
    which an engine of any world size loads with "checkpoint": {"load_universal": true}."""
    from deepspeed.checkpoint import ds_to_universal
    partial = target + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # a conversion cut short before this code marked it (no marker): redone
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


def resume_source(out_dir, tag, world_size, zero_stage, group, log):
    """Where to load checkpoint `tag` of out_dir from: (checkpoints folder, tag) as saved, or, when it
    was saved at ZeRO >= 1 on another number of ranks (DeepSpeed's load_checkpoint refuses those), its
    universal conversion (rank 0 converts once, into the checkpoint's `universal` subfolder) as
    (checkpoint folder, "universal"): then the engine must be built with
    "checkpoint": {"load_universal": true}. Every rank hears of a failed conversion."""
    root = checkpoint_root(out_dir)
    if not tag:
        return root, tag
    folder = os.path.join(root, tag)
    with open(os.path.join(folder, MARKER)) as f:
        saved = json.load(f)["world_size"]
    if saved == world_size or zero_stage == 0:
        return root, tag
    problem = None
    if group.rank() == 0 and not os.path.isfile(os.path.join(folder, "universal", MARKER)):
        log(f"{folder} was saved on {saved} ranks, resuming on {world_size}: converting it to DeepSpeed's "
            f"universal checkpoint format in {folder}/universal")
        try:
            convert_to_universal(folder, os.path.join(folder, "universal"))
        except Exception as e:  # noqa: BLE001  every rank must hear of it, or they would wait in a collective
            problem = f"converting {folder} with deepspeed.checkpoint.ds_to_universal failed: {e!r}"
    problem = agree(problem, group)
    if problem:
        raise SystemExit(problem)
    return folder, "universal"


def repair_universal_load(optimizer):
    """DeepSpeed's ZeRO-3 universal load (0.19.7, 0.19.8) gives all parameter groups one Adam
    step-count tensor, which AdamW then increments in place once per group: each group its own.
    (It also gives every group group 0's settings: train_ds.resume sets every group's own again.)"""
    for state in optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# ----------------------------------------------------------------------------------------------
# One run per --out_dir
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


# ----------------------------------------------------------------------------------------------
# Preemption: stop signals, a vanished launcher
# ----------------------------------------------------------------------------------------------

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # schedulers' preemption notice; SLURM sends SIGUSR1 with --signal=USR1@SECONDS


def ignoring_stop_signals(closing, worker_init_fn=None):
    """A DataLoader worker_init_fn that makes workers ignore the stop signals until their rank ends
    them: SLURM and DeepSpeed's launch.py signal every process of a rank, and a worker killed mid-step
    would abort the rank (the rank checkpoints, then ends its workers: LoaderBatches.close). Once
    `closing` (a RawValue the rank shares) is set, a stop signal ends the worker with exit code 0, the
    one end PyTorch's SIGCHLD check in the rank does not report as a crashed DataLoader worker."""
    def init(worker_id):
        import signal

        def handler(signum, frame):
            if closing.value:
                os._exit(0)

        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), handler)
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


class StopRequests:
    """Preemption: SIGTERM / SIGUSR1 no longer kill the rank (a kill mid-step would lose the work since
    the last checkpoint); they, or a launcher process that vanished, set `reason`, and agreed() tells
    every rank at the next step boundary whether any rank wants to stop: one integer all-reduced over
    the CPU (gloo) `group`, no device synchronisation, so that every rank stops after the same step,
    checkpoints and exits 0."""

    def __init__(self, group, launchers=()):
        import signal
        self.group, self.launchers, self.reason = group, list(launchers), None

        def handler(signum, frame):
            self.reason = self.reason or signal.Signals(signum).name

        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), handler)

    def agreed(self):
        import torch.distributed as dist
        if self.reason is None:
            gone = [p.pid for p in self.launchers if launcher_gone(p)]
            self.reason = f"launcher process {gone[0]} is gone" if gone else None
        flag = torch.tensor([self.reason is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# Failures: DataLoader workers that must end with the rank, a diverging run
# ----------------------------------------------------------------------------------------------

class LoaderBatches:
    """The batches of a training DataLoader whose workers ignore the stop signals while the rank
    trains (ignoring_stop_signals), and that close() ends, also after an exception. Dropping the
    iterator is not enough then: the exception's traceback keeps it alive, and multiprocessing's exit
    handler, which SIGTERMs its daemon children and then joins them, would wait forever for workers
    that ignore SIGTERM: the rank printed its error and never exited."""

    def __init__(self, loader):
        import multiprocessing
        self.closing = multiprocessing.RawValue("b", 0)  # shared with the workers, forked from here on
        loader.worker_init_fn = ignoring_stop_signals(self.closing, loader.worker_init_fn)
        self.before = set(multiprocessing.active_children())
        self.iterator = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.iterator)

    def close(self, timeout=10):
        """End the child processes started since (the loader's workers; an evaluation's, when an
        exception cut it short). Without an exception holding the iterator, dropping it stops them in
        order; any still alive then gets a SIGTERM, at which it now exits 0, and a SIGKILL if that has
        not ended it within `timeout` s (a worker stuck in a read)."""
        import multiprocessing
        self.closing.value = 1
        getattr(self.iterator, "close", lambda: None)()  # a generator around the DataLoader's iterator
        self.iterator = None
        started = [p for p in multiprocessing.active_children() if p not in self.before]
        for worker in started:
            worker.terminate()
        for worker in started:
            worker.join(timeout)
            if worker.is_alive():
                worker.kill()
                worker.join()


class DivergenceGuard:
    """Counts bad optimizer steps on the device, with no read back to the host between log steps.
    A step is bad when its loss is not finite, or when DeepSpeed skipped it: at ZeRO >= 1 it skips a
    step whose gradient norm is not finite, silently, and leaves the learning-rate schedule where it
    was; the guard then advances the schedule, so that it stays a function of the trainer's step.
    (At ZeRO-0 a non-finite gradient is applied: the weights turn non-finite and the next step's
    loss is counted.) read() tells every rank the counts since the previous read."""

    def __init__(self, engine):
        self.engine, self.skipped = engine, engine.skipped_steps
        zero = torch.zeros((), dtype=torch.int64, device=engine.device)
        self.bad, self.streak, self.longest = zero, zero.clone(), zero.clone()

    def step(self, loss):
        """After each optimizer step, with the step's loss (a tensor on the device)."""
        skipped = self.engine.skipped_steps != self.skipped  # a Python int DeepSpeed keeps: no host read
        if skipped:
            self.skipped = self.engine.skipped_steps
            self.engine.lr_scheduler.step()
        bad = ~torch.isfinite(loss) | skipped
        self.bad = self.bad + bad
        self.streak = torch.where(bad, self.streak + 1, 0)
        self.longest = torch.maximum(self.longest, self.streak)

    def read(self):
        """(bad steps, the longest run of consecutive bad steps) since the previous read, the largest
        over the ranks: a collective and a read back to the host, so only at log steps."""
        import torch.distributed as dist
        values = torch.stack([self.bad, self.longest])
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        self.bad, self.longest = torch.zeros_like(self.bad), self.streak.clone()  # a run goes on into the next window
        bad, longest = values.tolist()
        return bad, longest
