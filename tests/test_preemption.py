"""train_ds.py never loses a run: preemption by real signals, kill -9 while a checkpoint is written,
a full disk, one run per --out_dir, clear start-up errors, and an export that never runs pickled code.

Three 2-rank `deepspeed` launches (tests/_preemption_runs.py runs several trainings per launch):
1. SIGTERM to every process of both ranks (as SLURM does) mid-run, then --resume; a full disk (a
   small tmpfs, when the test may mount one); kill -9 of both ranks while a checkpoint is written.
2. --resume of the killed run; SIGTERM to the `deepspeed` command alone (it returns, launch.py and
   the ranks stay: the ranks must notice and stop).
3. --resume of that run; SIGTERM to DeepSpeed's launch.py (it SIGTERMs rank 0 first, then rank 1).
Every resumed run is compared with an uninterrupted one: identical weights, each step logged once.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import ROOT, assert_same_weights, free_port, trainer_env

HELPER = os.path.join(ROOT, "tests", "_preemption_runs.py")
STEPS, SAVE_EVERY = 14, 4

import distributed
import msclip
import train_ds


def argv(out_dir, *extra, stage=1):
    return ["--preset", "msclip-tiny", "--layers", "2", "--steps", str(STEPS), "--batch_size", "8",
            "--synthetic_samples", "64", "--zero_stage", str(stage), "--lr", "1e-3", "--warmup_steps", "2",
            "--eval_every", "-1", "--log_every", "1", "--save_every", str(SAVE_EVERY), "--seed", "1",
            "--workers", "1", "--out_dir", str(out_dir), *extra]


class Launch:
    """A 2-rank `deepspeed` launch of the helper, watched and signalled from here."""

    def __init__(self, tmp, name, runs):
        self.tmp, self.name = tmp, name
        self.pids, self.result = tmp / f"{name}_pids", tmp / f"{name}_result.json"
        self.pids.mkdir()
        spec = tmp / f"{name}.json"
        spec.write_text(json.dumps({"result": str(self.result), "pids": str(self.pids), "runs": runs}))
        env, _ = trainer_env(tmp, name)
        self.log = open(tmp / f"{name}.log", "w")
        self.runner = subprocess.Popen([shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port",
                                        str(free_port()), HELPER, str(spec)], cwd=tmp, env=env, stdout=self.log,
                                       stderr=subprocess.STDOUT)

    def until(self, condition, what, timeout=600, interval=0.05):
        deadline = time.time() + timeout
        while not condition():
            assert time.time() < deadline, f"{self.name}: timed out waiting for {what}\n{self.text()[-4000:]}"
            time.sleep(interval)

    def ranks(self):
        """{rank: psutil.Process} once both ranks have started."""
        self.until(lambda: len(list(self.pids.glob("rank*.json"))) == 2, "the ranks to start")
        return {r: psutil.Process(json.loads((self.pids / f"rank{r}.json").read_text())["pid"]) for r in (0, 1)}

    def launch_py(self):
        return psutil.Process(json.loads((self.pids / "rank0.json").read_text())["parent"])

    def processes(self):
        """Both ranks and their DataLoader workers: what SLURM signals."""
        return [p for rank in self.ranks().values() for p in [rank] + rank.children(recursive=True)]

    def at_step(self, out_dir, step):
        def reached():
            try:
                return any(json.loads(line).get("step", 0) >= step for line in (out_dir / "metrics.jsonl").open())
            except (OSError, ValueError):
                return False
        self.until(reached, f"step {step} in {out_dir}")

    def wait(self, timeout=900):
        """The launcher's exit code; for a launcher killed on purpose, wait for the ranks to end instead."""
        try:
            return self.runner.wait(timeout=timeout)
        finally:
            self.log.close()

    def results(self, rank=0):
        path = f"{self.result}.rank{rank}"
        return json.loads(open(path).read()) if os.path.exists(path) else {}

    def text(self):
        if not self.log.closed:
            self.log.flush()
        return (self.tmp / f"{self.name}.log").read_text()


def mount_tmpfs(folder, size, read_only=False):
    """A tmpfs of `size` bytes at `folder` (needs root); False where this machine does not allow it."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


def unmount(folder):
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def checkpoint_bytes():
    """A ZeRO checkpoint of the test model holds fp32 weights, fp32 master weights and Adam's two moments."""
    return 16 * sum(p.numel() for p in msclip.create_model("msclip-tiny", layers=2).parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preemption")
    disk = tmp / "small_disk"
    full_disk = os.geteuid() == 0 and mount_tmpfs(disk, int(1.5 * checkpoint_bytes()))
    out = {"tmp": tmp, "full_disk": full_disk}
    try:
        # 1: SIGTERM to every process of both ranks, a full disk, kill -9 while a checkpoint is written
        first = Launch(tmp, "signals_to_ranks", [
            {"name": "full", "argv": argv(tmp / "full")},
            {"name": "term", "argv": argv(tmp / "term")},
            {"name": "term_resume", "argv": argv(tmp / "term", "--resume")}] +
            ([{"name": "disk_full", "argv": argv(disk / "run"), "expect_exit": True}] if full_disk else []) +
            [{"name": "kill9", "argv": argv(tmp / "kill9")}])
        first.at_step(tmp / "term", 6)
        for process in first.processes():
            process.send_signal(signal.SIGTERM)
        partial = tmp / "kill9" / "checkpoints" / f"step_{2 * SAVE_EVERY:08d}"
        first.until(lambda: partial.is_dir() and any(partial.glob("*.pt")), "the second checkpoint to begin",
                    interval=0.002)
        frozen = first.processes()
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        out["marker_when_killed"] = (partial / distributed.MARKER).exists()
        for process in frozen:
            process.send_signal(signal.SIGKILL)
        out["first_rc"] = first.wait()
        out["stale"] = partial / "zero_pp_rank_7_mp_rank_00_optim_states.pt"  # as an 8-rank run would leave
        out["stale"].write_bytes(b"optimizer shard of another world size")
        out["first"] = first.results(0), first.results(1)

        # 2: --resume of the killed run; SIGTERM to the `deepspeed` command alone
        second = Launch(tmp, "signal_to_runner", [
            {"name": "kill9_resume", "argv": argv(tmp / "kill9", "--resume", "--keep", "0")},
            {"name": "runner_term", "argv": argv(tmp / "runner_term")}])
        second.at_step(tmp / "runner_term", 6)
        launch_py = second.launch_py()
        second.runner.send_signal(signal.SIGTERM)
        out["runner_rc"] = second.wait(timeout=60)
        launch_py.wait(timeout=300)  # launch.py ends once its ranks end
        out["second"] = second.results(0), second.results(1)

        # 3: --resume of that run; SIGTERM to DeepSpeed's launch.py
        third = Launch(tmp, "signal_to_launch_py", [
            {"name": "runner_term_resume", "argv": argv(tmp / "runner_term", "--resume")},
            {"name": "launch_term", "argv": argv(tmp / "launch_term", stage=0)}])
        third.at_step(tmp / "launch_term", 6)
        third.launch_py().send_signal(signal.SIGTERM)
        out["third_rc"] = third.wait()
        out["third"] = third.results(0), third.results(1)
        out["logs"] = first.text() + second.text() + third.text()
    finally:
        if full_disk:
            unmount(disk)
    return out


def checkpoint_step(out_dir):
    return int(distributed.latest_checkpoint(str(out_dir)).split("_")[1])


def test_sigterm_to_ranks_checkpoints_and_resume_is_exact(runs):
    tmp, (rank0, rank1) = runs["tmp"], runs["first"]
    stopped = rank0["term"]["steps"]
    assert 6 <= stopped < STEPS and rank0["term"]["stopped"] and rank1["term"]["steps"] == stopped
    assert rank0["term"]["logged_steps"] == list(range(1, stopped + 1))
    assert rank0["term_resume"]["steps"] == STEPS
    assert_same_weights(tmp / "full" / "msclip.pt", tmp / "term" / "msclip.pt")
    assert rank0["term_resume"]["logged_steps"] == list(range(1, STEPS + 1))  # each step once
    assert "rank 0: SIGTERM" in runs["logs"] and "rank 1: SIGTERM" in runs["logs"]


def test_kill9_while_writing_resumes_from_previous_checkpoint(runs):
    tmp = runs["tmp"]
    assert runs["first_rc"] != 0 and not runs["marker_when_killed"], "the kill landed after the checkpoint was complete"
    resumed = runs["second"][0]["kill9_resume"]
    assert "resumed" in runs["logs"] and f"kill9/checkpoints/step_{SAVE_EVERY:08d} at step {SAVE_EVERY}" in runs["logs"]
    assert resumed["steps"] == STEPS and resumed["logged_steps"] == list(range(1, STEPS + 1))
    assert_same_weights(tmp / "full" / "msclip.pt", tmp / "kill9" / "msclip.pt")
    # the resumed run rewrote the interrupted checkpoint's folder from empty: no stale shard left in it
    assert (runs["stale"].parent / distributed.MARKER).exists() and not runs["stale"].exists()
    assert "--keep 2 -> 0" in runs["logs"]  # a changed option is named, not refused


def test_sigterm_to_deepspeed_command_stops_ranks(runs):
    """The `deepspeed` command dies of SIGTERM without passing it on: the ranks notice at the next step
    boundary, checkpoint and exit 0 (launch.py then exits 0); --resume is exact."""
    tmp, (rank0, rank1) = runs["tmp"], runs["second"]
    assert runs["runner_rc"] == -signal.SIGTERM
    stopped = rank0["runner_term"]["steps"]
    assert 6 <= stopped < STEPS and rank1["runner_term"]["stopped"]
    assert rank0["runner_term"]["checkpoint"].endswith(f"step_{stopped:08d}")
    assert f"resumed {tmp}/runner_term/checkpoints/step_{stopped:08d} at step {stopped}" in runs["logs"]
    assert "rank 0: launcher process" in runs["logs"] and "rank 1: launcher process" in runs["logs"]
    assert runs["third"][0]["runner_term_resume"]["steps"] == STEPS
    assert_same_weights(tmp / "full" / "msclip.pt", tmp / "runner_term" / "msclip.pt")


def test_sigterm_to_launch_py_stops_both_ranks(runs):
    """launch.py SIGTERMs rank 0 (and waits for it) before rank 1: rank 1 learns of the stop through the
    step-boundary all-reduce; both checkpoint the same step and exit 0 (launch.py itself exits 1)."""
    tmp, (rank0, rank1) = runs["tmp"], runs["third"]
    stopped = rank0["launch_term"]["steps"]
    assert 6 <= stopped < STEPS and rank1["launch_term"]["steps"] == stopped and rank1["launch_term"]["stopped"]
    assert checkpoint_step(tmp / "launch_term") == stopped
    assert runs["third_rc"] == 1


def test_full_disk_stops_with_message_and_keeps_previous_checkpoint(runs, tmp_path):
    """Simulated with a tmpfs 1.5 checkpoints large (mount needs root): the second checkpoint fails."""
    if not runs["full_disk"]:
        pytest.skip("mounting a small tmpfs needs root")
    for rank, results in enumerate(runs["first"]):
        assert results["disk_full"]["exit"] not in (0, None), results["disk_full"]
    message = str(runs["first"][0]["disk_full"]["exit"])
    assert "no space left" in message and f"step_{SAVE_EVERY:08d}, stays the resume point" in message, message
    assert "Traceback" not in runs["first"][0]["disk_full"]["stderr"]


def test_export_never_unpickles_code(runs, tmp_path):
    """A planted object whose unpickling would create a file: --export refuses the folder (ZeRO 0 and
    ZeRO 1), the file is never created; without the planted object the export works."""
    marker = tmp_path / "code_ran"
    for run, stage in (("launch_term", 0), ("full", 1)):
        source = runs["tmp"] / run / "checkpoints" / distributed.latest_checkpoint(str(runs["tmp"] / run))
        folder = tmp_path / run / "checkpoints" / source.name
        shutil.copytree(source, folder)
        assert json.loads((folder / distributed.MARKER).read_text())["zero_stage"] == stage
        clean = tmp_path / f"{run}.pt"
        train_ds.main(["--export", str(clean), "--checkpoint", str(folder)])
        assert msclip.load_checkpoint(str(clean)).config.layers == 2
        states = folder / "mp_rank_00_model_states.pt"
        content = torch.load(states, map_location="cpu", weights_only=False)  # our own file
        content["planted"] = Planted(str(marker))
        torch.save(content, states)
        with pytest.raises(SystemExit):
            train_ds.main(["--export", str(tmp_path / "x.pt"), "--checkpoint", str(folder)])
        assert not marker.exists() and not (tmp_path / "x.pt").exists()
    torch.load(states, map_location="cpu", weights_only=False)  # the plant is live: plain unpickling runs it
    assert marker.exists()


class Planted:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_export_message_names_the_object(runs, tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "step_1"
    shutil.copytree(runs["tmp"] / "full" / "checkpoints" / distributed.latest_checkpoint(str(runs["tmp"] / "full")), folder)
    content = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    content["planted"] = Planted(str(tmp_path / "never"))
    torch.save(content, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(SystemExit):
        train_ds.main(["--export", str(tmp_path / "x.pt"), "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert "refusing to load" in err and "open" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# Start-up checks, in this process (no DeepSpeed)
# ----------------------------------------------------------------------------------------------

def main_error(argv_, monkeypatch, capsys, world_size=2):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", str(world_size)),
                       ("MASTER_ADDR", "127.0.0.1")):  # as a launcher of world_size ranks sets them
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        train_ds.main(argv_)
    assert exit_info.value.code == 2
    assert "deepspeed.comm" not in sys.modules or not torch.distributed.is_initialized()
    return capsys.readouterr().err


def test_resume_with_other_settings_names_differences(runs, monkeypatch, capsys):
    folder = runs["tmp"] / "full"
    err = main_error(argv(folder, "--resume", "--layers", "3", "--zero_stage", "2"), monkeypatch, capsys)
    assert "saved with other settings" in err and "model layers: saved 2, requested 3" in err
    assert "zero_stage: saved 1, requested 2" in err and "Traceback" not in err
    # options that only change the rest of the run are named, not refused
    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = train_ds.build_parser()
    args = parser.parse_args(argv(folder, "--resume", "--lr", "2e-3", "--steps", "20"))
    model_config = train_ds.check_args(parser, args, 2)
    problem, notes = train_ds.check_out_dir(args, model_config, 2)
    assert problem is None and "--lr 0.001 -> 0.002" in notes[0] and "--steps 14 -> 20" in notes[0]
    problem, notes = train_ds.check_out_dir(args, model_config, 1)  # converted to a universal checkpoint (test_cluster.py)
    assert problem is None and "ranks 2 -> 1 (the checkpoint is converted" in notes[0]


def test_out_dir_held_by_live_run_then_released_by_its_crash(tmp_path, monkeypatch, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, distributed; lock, problem = "
                               "distributed.lock_out_dir(sys.argv[1]); print(problem, flush=True); time.sleep(600)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "None"
        err = main_error(["--out_dir", str(tmp_path)], monkeypatch, capsys)
        assert f"is in use by another training (pid {holder.pid} on host" in err
        assert distributed.lock_out_dir(str(tmp_path))[0] is None  # rank 0's lock, taken after init, refuses too
    finally:
        holder.kill()
        holder.wait()
    assert distributed.out_dir_holder(str(tmp_path)) is None  # the kill -9 released it
    lock, problem = distributed.lock_out_dir(str(tmp_path))
    assert lock is not None and problem is None
    lock.close()


def test_unwritable_out_dir_says_so(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        if not mount_tmpfs(folder, 2 ** 20, read_only=True):
            pytest.skip("cannot mount a read-only tmpfs here")
        expected = "read-only file system"
    else:
        folder.mkdir()
        folder.chmod(0o555)
        expected = "no permission"
    try:
        err = main_error(["--out_dir", str(folder / "run")], monkeypatch, capsys)
    finally:
        unmount(folder) if os.geteuid() == 0 else folder.chmod(0o755)
    assert "is not writable" in err and expected in err and "Traceback" not in err


def test_trim_metrics_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 4, "zero_shot": {}}, {"step": 5}]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 6, "lo')  # cut by a crash
    distributed.trim_metrics(str(path), 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 4]
    distributed.trim_metrics(str(path), 0)
    assert path.read_text() == ""


def test_load_checkpoint_of_a_folder_says_export_first(tmp_path):
    with pytest.raises(ValueError, match="--export"):
        msclip.load_checkpoint(str(tmp_path))
