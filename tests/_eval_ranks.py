"""Helper of tests/test_eval.py: eval.py's evaluate() in one of two processes that share the
encoding over a gloo process group, as train_ds.py's ranks do (no DeepSpeed):

    python tests/_eval_ranks.py SPEC.json RANK PORT

SPEC.json: {"checkpoint", "result": PATH, "evaluations": [{"datasets": [PATH, ...], "tasks": [...]}]}.
Rank r writes PATH.r: per evaluation, {"reports"} or {"error": the EvalError's message}, with the
numbers of images and texts this rank encoded.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import eval as ev  # noqa: E402


def main():
    spec_path, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, model_id = ev.load_model(spec["checkpoint"])
    counts = {}
    encode_image, encode_text = model.encode_image, model.encode_text

    def counting_image(images, *args, **kwargs):
        counts["images"] += len(images)
        return encode_image(images, *args, **kwargs)

    def counting_text(tokens, *args, **kwargs):
        counts["texts"] += len(tokens)
        return encode_text(tokens, *args, **kwargs)

    model.encode_image, model.encode_text = counting_image, counting_text
    out = []
    for evaluation in spec["evaluations"]:
        counts.update(images=0, texts=0)
        datasets = [ev.open_named_dataset(path, image_size=model.config.image_size) for path in evaluation["datasets"]]
        settings = ev.Settings(tasks=evaluation["tasks"], workers=1, quiet=True, group=dist.group.WORLD)
        try:
            out.append({"reports": ev.evaluate(model, model_id, datasets, settings), **counts})
        except ev.EvalError as e:
            out.append({"error": str(e), **counts})
    with open(f"{spec['result']}.{rank}", "w") as f:
        json.dump(out, f)
    dist.barrier()  # neither rank tears its group down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
