"""Helper of tests/test_preemption.py: several trainings in one launch, as tests/_train_runs.py, for
runs that are signalled or killed on purpose:

    deepspeed --num_gpus 2 tests/_preemption_runs.py SPEC.json

SPEC.json: {"result": PATH, "pids": FOLDER, "runs": [{"name", "argv", "expect_exit": bool}, ...]}.
Each rank writes {"pid", "parent"} to FOLDER/rank{R}.json at start (the test signals them), and
after every run its results so far to PATH.rank{R} (a later run may be killed). A run with
expect_exit records the SystemExit code and message (and what went to stderr) instead of failing.
"""
import contextlib
import io
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import conftest  # noqa: E402,F401  (puts the repository on sys.path)

import distributed  # noqa: E402
import train_ds  # noqa: E402
from train_ds import read_metrics  # noqa: E402


def write_json(path, value):
    distributed.write_atomic(path, json.dumps(value, indent=1))


def main():
    spec_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]
    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    write_json(os.path.join(spec["pids"], f"rank{rank}.json"), {"pid": os.getpid(), "parent": os.getppid()})
    results = {}
    for run in spec["runs"]:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr) if run.get("expect_exit") else contextlib.nullcontext():
                result = train_ds.main(run["argv"])
        except SystemExit as e:
            if not run.get("expect_exit"):
                raise
            result = {"exit": e.code, "stderr": stderr.getvalue()}
        else:
            if rank == 0:
                steps, _ = read_metrics(run["argv"][run["argv"].index("--out_dir") + 1])
                result["logged_steps"] = [e["step"] for e in steps]
        results[run["name"]] = result
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()  # rank 0 has released --out_dir's lock before any rank starts the next run in it
        write_json(f"{spec['result']}.rank{rank}", results)


if __name__ == "__main__":
    main()
