"""train_ds.py under cluster launchers, on CPU: srun's and mpirun's variables (set by hand on 2
processes, since neither is installed here) and two nodes simulated on this machine by two
`torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1` commands sharing one rendezvous, so that
LOCAL_RANK is 0 on both "nodes" while RANK differs. Each of the three launches trains the same
2-rank ZeRO-2 run, checked against plain PyTorch holding the global batch (tests/_train_runs.py's
reference): a rank that took its data shard from the local rank, or a process group of the wrong
size, would change the losses. Everything else runs in this process without DeepSpeed.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train_ds import EQUAL, equal_argv, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_ds  # noqa: E402
import _train_runs  # noqa: E402

HELPER = os.path.join(ROOT, "tests", "_cluster_runs.py")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# Launcher variables -> torch.distributed's (no processes)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [("gpu[003-010,017],cpu1", "gpu003"), ("node7", "node7"),
                                             ("a[1-2]-ib[5,6],x[1-3]", "a1-ib5"), ("n[09,10]", "n09")])
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert train_ds.first_host(nodelist) == first


def test_srun_variables():
    name, v = train_ds.launcher_environment(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert name == "srun"
    assert v == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                 "MASTER_PORT": str(train_ds.DEFAULT_MASTER_PORT)}


def test_launcher_order_and_exported_address():
    """torchrun/deepspeed's RANK wins over SLURM's (a torchrun inside an sbatch job); an exported
    MASTER_ADDR/PORT wins over the derived one."""
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "h[5-6]"}
    assert train_ds.launcher_environment(env) == (
        "torchrun or deepspeed",
        {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
         "MASTER_PORT": "1234"})


def test_mpi_variables_and_missing_address():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ValueError, match="export MASTER_ADDR"):  # two nodes, nobody said where rank 0 is
        train_ds.launcher_environment(ompi)
    name, v = train_ds.launcher_environment({**ompi, "MASTER_ADDR": "h0"})
    assert (name, v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"], v["MASTER_ADDR"]) == ("mpirun", "3", "4", "1", "h0")
    one_node = {**ompi, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}
    assert train_ds.launcher_environment(one_node)[1]["MASTER_ADDR"] == "127.0.0.1"
    pmi = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
    assert train_ds.launcher_environment(pmi) == ("MPI (PMI)", {
        "RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(train_ds.DEFAULT_MASTER_PORT)})
    with pytest.raises(ValueError, match="export LOCAL_RANK"):
        train_ds.launcher_environment({"PMI_RANK": "0", "PMI_SIZE": "2"})


def test_plain_python_is_one_process():
    name, v = train_ds.launcher_environment({"PATH": "/bin"})
    assert name is None and v["RANK"] == "0" and v["WORLD_SIZE"] == "1" and v["LOCAL_RANK"] == "0"


# ----------------------------------------------------------------------------------------------
# Three 2-rank launches
# ----------------------------------------------------------------------------------------------

def base_env(tmp):
    extensions = tmp / "torch_extensions"
    extensions.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "3",
           "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONWARNINGS": "ignore"}
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    return env


def start(tmp, name, per_process):
    """Start one process per entry of per_process ((command, extra environment)), all running the same
    spec; wait for all. Returns (rank 0's results, {rank: variables it used}, [each process's output])."""
    out_dir = str(tmp / name)
    spec, result = tmp / f"{name}.json", tmp / f"{name}_result.json"
    spec.write_text(json.dumps({"result": str(result), "runs": [{"name": "run", "argv": equal_argv(out_dir, 2, 2)}]}))
    procs = [subprocess.Popen([*command, HELPER, str(spec)], cwd=tmp, env={**base_env(tmp), **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command, extra in per_process]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        (tmp / f"{name}_{i}.log").write_text(output)
        assert proc.returncode == 0, f"process {i} of {name}:\n{output[-5000:]}"
    seen = {r: json.loads((tmp / f"{name}_result.json.env{r}").read_text()) for r in range(2)}
    return json.loads(result.read_text())["run"], seen, outputs, out_dir


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    python = [sys.executable]
    slurm = [(python, {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                       "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
                       "SLURM_JOB_ID": "4242", "MASTER_PORT": str(free_port())}) for r in range(2)]
    port = str(free_port())
    ompi = [(python, {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2",
                      "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": port})
            for r in range(2)]
    slurm[1][1]["MASTER_PORT"] = slurm[0][1]["MASTER_PORT"]
    port = str(free_port())
    torchrun = shutil.which("torchrun") or "torchrun"
    nodes = [([torchrun, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", port], {}) for n in range(2)]
    return {name: start(tmp, name, spec) for name, spec in (("srun", slurm), ("mpirun", ompi), ("two_nodes", nodes))}


@pytest.fixture(scope="module")
def reference():
    ref = {k: EQUAL[k] for k in ("preset", "steps", "global_micro", "accum", "lr", "lr_shared", "wd", "wd_shared",
                                 "warmup", "warmup_start", "min_lr_ratio", "grad_clip", "logit_scale_init",
                                 "hard_negatives", "samples", "seed")}
    ref["overrides"] = {"layers": EQUAL["layers"]}
    return _train_runs.reference(ref)


@pytest.mark.parametrize("launcher", ["srun", "mpirun", "two_nodes"])
def test_launcher_gives_one_two_rank_job(launches, reference, launcher):
    """One process group of 2 ranks, each rank on its own data shard: the losses and logit scales of
    plain PyTorch holding the global batch of 16 pairs."""
    run, seen, outputs, out_dir = launches[launcher]
    assert [seen[r]["WORLD_SIZE"] for r in range(2)] == ["2", "2"]
    assert run["steps"] == list(range(1, EQUAL["steps"] + 1))
    assert run["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert run["logit_scales"] == pytest.approx(reference["logit_scales"], abs=1e-5)
    assert run["losses"][-1] != pytest.approx(run["losses"][0], abs=1e-3), "the model did not move"


def test_srun_derives_master_addr_from_nodelist(launches):
    _, seen, _, _ = launches["srun"]
    assert seen[0]["MASTER_ADDR"] == seen[1]["MASTER_ADDR"] == "127.0.0.1"  # first host of 127.0.0.[1-2]
    assert [seen[r]["LOCAL_RANK"] for r in range(2)] == ["0", "1"]


def test_two_nodes_use_local_and_global_rank(launches):
    """Each "node" runs local rank 0 (the device index: cuda:LOCAL_RANK on GPUs) while the global ranks
    are 0 and 1; the checkpoint holds both ranks' ZeRO shards; only global rank 0 logs."""
    run, seen, outputs, out_dir = launches["two_nodes"]
    assert [(seen[r]["RANK"], seen[r]["LOCAL_RANK"], seen[r]["LOCAL_WORLD_SIZE"]) for r in range(2)] == [
        ("0", "0", "1"), ("1", "0", "1")]
    folder = run["checkpoint"]
    shards = sorted(f for f in os.listdir(folder) if f.endswith("optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert sum(line.startswith("step ") for line in outputs[0].splitlines()) == EQUAL["steps"]
    assert not [line for line in outputs[1].splitlines() if line.startswith(("step ", "done:", "MS-CLIP"))]
