"""Helper of tests/test_cluster.py: tests/_train_runs.py's trainings, then this rank's view of the
launcher (the variables train_ds.py derived) written to RESULT.env{RANK}:

    SLURM_PROCID=0 SLURM_NTASKS=2 ... python tests/_cluster_runs.py SPEC.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _train_runs  # noqa: E402


def main():
    _train_runs.main()
    with open([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]) as f:
        result = json.load(f)["result"]
    seen = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    with open(f"{result}.env{seen['RANK']}", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
