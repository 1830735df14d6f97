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
import torch

from conftest import EQUAL, ROOT, equal_argv, free_port, reference_spec, trainer_env

import _train_runs
import distributed
import msclip

HELPER = os.path.join(ROOT, "tests", "_cluster_runs.py")


# ----------------------------------------------------------------------------------------------
# Launcher variables -> torch.distributed's (no processes)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [("gpu[003-010,017],cpu1", "gpu003"), ("node7", "node7"),
                                             ("a[1-2]-ib[5,6],x[1-3]", "a1-ib5"), ("n[09,10]", "n09")])
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert distributed.first_host(nodelist) == first


def test_srun_variables():
    name, v = distributed.launcher_environment(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert name == "srun"
    assert v == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                 "MASTER_PORT": str(distributed.DEFAULT_MASTER_PORT)}


def test_launcher_order_and_exported_address():
    """torchrun/deepspeed's RANK wins over SLURM's (a torchrun inside an sbatch job); an exported
    MASTER_ADDR/PORT wins over the derived one."""
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "h[5-6]"}
    assert distributed.launcher_environment(env) == (
        "torchrun or deepspeed",
        {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
         "MASTER_PORT": "1234"})


def test_mpi_variables_and_missing_address():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(ValueError, match="export MASTER_ADDR"):  # two nodes, nobody said where rank 0 is
        distributed.launcher_environment(ompi)
    name, v = distributed.launcher_environment({**ompi, "MASTER_ADDR": "h0"})
    assert (name, v["RANK"], v["WORLD_SIZE"], v["LOCAL_RANK"], v["MASTER_ADDR"]) == ("mpirun", "3", "4", "1", "h0")
    one_node = {**ompi, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}
    assert distributed.launcher_environment(one_node)[1]["MASTER_ADDR"] == "127.0.0.1"
    pmi = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
    assert distributed.launcher_environment(pmi) == ("MPI (PMI)", {
        "RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(distributed.DEFAULT_MASTER_PORT)})
    with pytest.raises(ValueError, match="export LOCAL_RANK"):
        distributed.launcher_environment({"PMI_RANK": "0", "PMI_SIZE": "2"})


def test_plain_python_is_one_process():
    name, v = distributed.launcher_environment({"PATH": "/bin"})
    assert name is None and v["RANK"] == "0" and v["WORLD_SIZE"] == "1" and v["LOCAL_RANK"] == "0"


# ----------------------------------------------------------------------------------------------
# Three 2-rank launches
# ----------------------------------------------------------------------------------------------

def start(tmp, name, per_process, runs):
    """Start one process per entry of per_process ((command, extra environment)), all running the same
    runs; wait for all. Returns (rank 0's results, {rank: variables it used}, [each process's output])."""
    spec, result = tmp / f"{name}.json", tmp / f"{name}_result.json"
    spec.write_text(json.dumps({"result": str(result), "runs": runs}))
    procs = [subprocess.Popen([*command, HELPER, str(spec)], cwd=tmp, env={**trainer_env(tmp, name)[0], **extra},
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
    seen = {r: json.loads((tmp / f"{name}_result.json.env{r}").read_text()) for r in range(len(per_process))}
    return json.loads(result.read_text()), seen, outputs


def resized(tmp, stage):
    return str(tmp / f"resize{stage}")


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
    # Besides the 5-step run, the srun and mpirun jobs save ZeRO-1/2/3 checkpoints at step 2 of the same
    # training, which one process then resumes (with the same 16 pairs per micro-batch: 16 x 1 rank)
    run = lambda name: {"name": "run", "argv": equal_argv(str(tmp / name), 2, 2)}  # noqa: E731
    part = lambda s: {"name": f"resize{s}", "argv": equal_argv(resized(tmp, s), 2, s) + ["--stop_at", "2"]}  # noqa: E731
    launched = {"srun": start(tmp, "srun", slurm, [run("srun"), part(1), part(2)]),
                "mpirun": start(tmp, "mpirun", ompi, [run("mpirun"), part(3)]),
                "two_nodes": start(tmp, "two_nodes", nodes, [run("two_nodes")])}
    saved = {s: distributed.consolidated_state_dict(os.path.join(resized(tmp, s), "checkpoints", "step_00000002"))[1]
             for s in (1, 2, 3)}  # before the resumed runs add their checkpoints
    one = [{"name": f"resize{s}", "argv": equal_argv(resized(tmp, s), 1, s) + ["--resume"]} for s in (1, 2, 3)]
    launched["one_rank"] = start(tmp, "one_rank", [(python, {})], one)
    return launched, saved


@pytest.fixture(scope="module")
def reference():
    return _train_runs.reference(reference_spec())


@pytest.mark.parametrize("launcher", ["srun", "mpirun", "two_nodes"])
def test_launcher_gives_one_two_rank_job(launches, reference, launcher):
    """One process group of 2 ranks, each rank on its own data shard: the losses and logit scales of
    plain PyTorch holding the global batch of 16 pairs."""
    results, seen, outputs = launches[0][launcher]
    run = results["run"]
    assert [seen[r]["WORLD_SIZE"] for r in range(2)] == ["2", "2"]
    assert run["steps"] == list(range(1, EQUAL["steps"] + 1))
    assert run["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert run["logit_scales"] == pytest.approx(reference["logit_scales"], abs=1e-5)
    assert run["losses"][-1] != pytest.approx(run["losses"][0], abs=1e-3), "the model did not move"


def test_srun_derives_master_addr_from_nodelist(launches):
    _, seen, _ = launches[0]["srun"]
    assert seen[0]["MASTER_ADDR"] == seen[1]["MASTER_ADDR"] == "127.0.0.1"  # first host of 127.0.0.[1-2]
    assert [seen[r]["LOCAL_RANK"] for r in range(2)] == ["0", "1"]


def test_two_nodes_use_local_and_global_rank(launches):
    """Each "node" runs local rank 0 (the device index: cuda:LOCAL_RANK on GPUs) while the global ranks
    are 0 and 1; the checkpoint holds both ranks' ZeRO shards; only global rank 0 logs."""
    results, seen, outputs = launches[0]["two_nodes"]
    run = results["run"]
    assert [(seen[r]["RANK"], seen[r]["LOCAL_RANK"], seen[r]["LOCAL_WORLD_SIZE"]) for r in range(2)] == [
        ("0", "0", "1"), ("1", "0", "1")]
    folder = run["checkpoint"]
    shards = sorted(f for f in os.listdir(folder) if f.endswith("optim_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert sum(line.startswith("step ") for line in outputs[0].splitlines()) == EQUAL["steps"]
    assert not [line for line in outputs[1].splitlines() if line.startswith(("step ", "done:", "MS-CLIP"))]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_fewer_ranks(launches, reference, stage):
    """A ZeRO checkpoint of 2 ranks resumed by 1 (DeepSpeed refuses this without the universal
    conversion): the converted fp32 weights are the consolidated checkpoint's, and steps 3-5 continue
    plain PyTorch's uninterrupted run (weights, Adam moments, schedule, logit scale and data position
    all carried over: a sample seen twice or a restarted schedule would change the losses)."""
    launched, saved = launches
    results, _, outputs = launched["one_rank"]
    run = results[f"resize{stage}"]
    assert "converting it to DeepSpeed's universal checkpoint format" in outputs[0]
    assert run["steps"] == list(range(1, EQUAL["steps"] + 1))
    assert run["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert run["logit_scales"] == pytest.approx(reference["logit_scales"], abs=1e-5)
    assert run["losses"][2:] != pytest.approx(run["losses"][1:-1], abs=1e-3), "the resumed run did not train"
    universal = os.path.join(launched["one_rank"][0][f"resize{stage}"]["checkpoint"], "..", "step_00000002",
                             "universal", "zero")
    with open(os.path.join(universal, "..", "..", "latest_universal")) as f:
        assert f.read() == "universal"  # DeepSpeed's own pointer, for load_checkpoint(tag=None)
    parameters = [n for n, _ in msclip.create_model(EQUAL["preset"], layers=EQUAL["layers"]).named_parameters()]
    for name in parameters:
        converted = torch.load(os.path.join(universal, name, "fp32.pt"), weights_only=True)
        converted = converted["param"] if isinstance(converted, dict) else converted  # ZeRO-3: the tensor alone
        assert torch.equal(converted.reshape(saved[stage][name].shape), saved[stage][name]), name
