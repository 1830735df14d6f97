"""Evaluate an MS-CLIP checkpoint the way the paper does: zero-shot classification, linear probe, retrieval.

    # ImageNet zero-shot with a released MS-CLIP-S checkpoint (val/ holds one folder per wnid)
    python eval.py --checkpoint msclip-s-b32-yfcc.pth --dataset /data/imagenet --split val --dataset-name ImageNet

    # a folder dataset (train/<class>/*.jpg, test/<class>/*.jpg): zero-shot and linear probe,
    # image features cached so that a second run does not encode again
    python eval.py --checkpoint runs/x/final.pt --dataset /data/pets --dataset-name OxfordPets \\
        --task zeroshot --task linear-probe --cache-dir ~/.cache/msclip-eval

    # CLIP_benchmark WebDataset exports, several at once (the table ends with their mean, "Avg.")
    python eval.py --checkpoint ckpt.pth --dataset /data/wds_cifar10 --dataset /data/wds_cifar100

    # retrieval from a CSV/TSV with a header: filepath<TAB>caption, one row per caption
    python eval.py --checkpoint ckpt.pth --dataset /data/flickr30k/test.tsv --task retrieval

    # the built-in procedural shapes data, held-out split (data.py, what train_ds.py trains on by default)
    python eval.py --checkpoint runs/x/final.pt --dataset synthetic-colour --dataset synthetic-shape

Protocol (ARCHITECTURE.md §11): the official eval transform (bicubic resize of the shorter side,
centre crop, ImageNet statistics), fp32. Zero-shot: every template x every synonym of a class is
encoded and normalised, the class embedding is their mean, re-normalised; logits = 100 * cosine.
Linear probe (CLIP paper, appendix A.3): frozen unnormalised image features, L2-regularised
multinomial logistic regression fitted by L-BFGS; the regularisation strength is chosen on a
validation split held out from train by CLIP's log-spaced search (1e-6..1e6, refined to 8 steps per
decade), then the model is refitted on train + validation. Retrieval: image->text and text->image
recall@1/5/10, several captions per image. All accuracies and recalls are percentages.

Datasets (--dataset, repeatable):
  DIR with train/ test/ (or val/) holding one sub-folder per class   image folder
  DIR with {split}/nshards.txt and {split}/0.tar ...                 CLIP_benchmark WebDataset
  FILE.csv / FILE.tsv (the evaluated split), or DIR with train.csv, test.csv, ...
        a header names the columns: image (filepath/path/image/file), label (label/class/target)
        or caption (caption/title/text); without a known header: path, label-or-caption
  synthetic-shape, synthetic-colour                                  data.py's held-out shapes split
Class names and templates: --classnames/--templates files, else --dataset-name (the bundled
assets/zeroshot_prompts.json), else the dataset's own (classnames.txt, folder names, CSV labels),
with the 80 ImageNet templates when the dataset has none.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import msclip

SYNTHETIC = {"synthetic-shape": "shape", "synthetic-colour": "colour", "synthetic-color": "colour"}
TASKS = ("zeroshot", "linear-probe", "retrieval")
# Other spellings of the bundled prompt lists' names (assets/README.md, CLIP_benchmark names).
PROMPT_ALIASES = {"imagenet1k": "ImageNet", "food": "Food101", "cars": "StanfordCars", "aircraft": "FGVCAircraft",
                  "voc2007": "PascalVOC2007", "dtd": "DescribableTextures", "pets": "OxfordPets",
                  "flowers": "Flowers102", "fer2013": "FacialEmotionRecognition2013", "gtsrb": "GTSRB",
                  "pcam": "PatchCamelyon", "kittidistance": "KITTI", "renderedsst2": "SST2", "stl10": "STL10",
                  "hatefulmemes": "HatefulMemes", "eurosat": "EuroSAT", "resisc45": "RESISC45"}


class EvalError(Exception):
    """A problem with the inputs (checkpoint, dataset, prompts): main() prints it without a traceback."""


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def classification_metrics(logits, labels):
    """top1, top5 (with >= 5 classes), mean per-class recall (over the classes present in `labels`),
    and ROC AUC of logit[1] - logit[0] for two classes (HatefulMemes' metric). Percentages."""
    logits, labels = logits.float(), labels.long()
    num_classes = logits.shape[1]
    if labels.numel() == 0:
        raise EvalError("no labelled images to score")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise EvalError(f"label {int(bad[0])} out of range for {num_classes} classes")
    pred = logits.argmax(dim=1)
    out = {"top1": 100 * (pred == labels).double().mean().item()}
    if num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices
        out["top5"] = 100 * (top5 == labels[:, None]).any(dim=1).double().mean().item()
    present = labels.unique()
    recalls = [(pred[labels == c] == c).double().mean().item() for c in present.tolist()]
    out["mean_per_class"] = 100 * sum(recalls) / len(recalls)
    if num_classes == 2 and len(present) == 2:
        out["roc_auc"] = 100 * roc_auc(logits[:, 1] - logits[:, 0], labels == 1)
    return out


def roc_auc(scores, positive):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties
    counted half (Mann-Whitney U from average ranks)."""
    scores, positive = scores.double().cpu().numpy(), positive.cpu().numpy().astype(bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over runs of equal scores
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def retrieval_metrics(similarity, image_of_text, ks=(1, 5, 10)):
    """similarity[i, t] between image i and caption t; caption t describes image image_of_text[t].
    i2t recall@k: images with at least one of their captions among their k best captions.
    t2i recall@k: captions whose image is among their k best images. mean_recall: mean of all six."""
    similarity = similarity.float()
    n_images, n_texts = similarity.shape
    image_of_text = torch.as_tensor(image_of_text, dtype=torch.long)
    owns = torch.zeros(n_images, n_texts, dtype=torch.bool)
    owns[image_of_text, torch.arange(n_texts)] = True
    out = {}
    for k in ks:
        best_texts = similarity.topk(min(k, n_texts), dim=1).indices
        out[f"i2t_recall@{k}"] = 100 * owns.gather(1, best_texts).any(dim=1).double().mean().item()
    for k in ks:
        best_images = similarity.T.topk(min(k, n_images), dim=1).indices
        out[f"t2i_recall@{k}"] = 100 * (best_images == image_of_text[:, None]).any(dim=1).double().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


# ----------------------------------------------------------------------------------------------
# Linear probe: L2-regularised multinomial logistic regression, L-BFGS, CLIP's hyper-parameter search
# ----------------------------------------------------------------------------------------------

def fit_logistic_regression(features, labels, l2, num_classes=None, max_iter=1000, init=None, dtype=None):
    """Minimise  sum_i CE(x_i W + b, y_i) + l2/2 * ||W||^2  (sklearn's LogisticRegression with
    C = 1/l2; the bias is not penalised) with L-BFGS. Returns (W [D, C], b [C]) on features.device."""
    device = features.device
    dtype = dtype or (torch.float64 if device.type == "cpu" else torch.float32)
    x, y = features.to(dtype), labels.to(device).long()
    n, d = x.shape
    num_classes = num_classes or int(y.max()) + 1
    if init is None:
        w, b = torch.zeros(d, num_classes, dtype=dtype, device=device), torch.zeros(num_classes, dtype=dtype, device=device)
    else:
        w, b = (t.detach().to(device=device, dtype=dtype).clone() for t in init)
    w.requires_grad_(True)
    b.requires_grad_(True)
    # The mean loss (objective / n) has the same minimiser and better-scaled gradients.
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 / (2 * n) * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def holdout_split(labels, fraction=0.2, seed=0):
    """Stratified random split of range(len(labels)) into (train, validation) index tensors: each
    class with >= 2 samples gives round(fraction * count) (at least 1) of them to validation."""
    labels = torch.as_tensor(labels).cpu()
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def linear_probe(train_features, train_labels, test_features, test_labels, val_features=None, val_labels=None,
                 val_fraction=0.2, seed=0, select="top1", l2_range=(-6, 6), resolution=8, max_iter=1000,
                 device=None, dtype=None, log=None):
    """The CLIP linear probe on frozen features. Returns {"top1", "mean_per_class", ["top5"], "l2",
    "C", "val_score", "search", sizes}.

    l2 (= 1/C of sklearn) is searched on a validation split (given, or held out from train, stratified)
    as CLIP did: 10^-6, 10^-4, ..., 10^6 first, then the interval around the best is halved until the
    step is 1/resolution decade. Ties go to the lower validation loss. The final model is refitted
    on train + validation at the chosen l2 and scored on test.
    """
    device = torch.device(device) if device else train_features.device
    train_features, test_features = train_features.float(), test_features.float()
    train_labels, test_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if val_features is None:
        fit_idx, val_idx = holdout_split(train_labels, val_fraction, seed)
        if len(val_idx) == 0:
            raise EvalError("the linear probe needs a validation split: every class in train has a single sample")
        x_fit, y_fit, x_val, y_val = train_features[fit_idx], train_labels[fit_idx], train_features[val_idx], train_labels[val_idx]
    else:
        x_fit, y_fit = train_features, train_labels
        x_val, y_val = val_features.float(), torch.as_tensor(val_labels).long()
    num_classes = int(max(y_fit.max(), y_val.max(), test_labels.max())) + 1
    x_fit, y_fit, x_val, y_val = x_fit.to(device), y_fit.to(device), x_val.to(device), y_val.to(device)
    solutions, scores = {}, {}

    def score(exponent):
        exponent = round(exponent, 6)
        if exponent not in scores:
            nearest = min(solutions, key=lambda e: abs(e - exponent)) if solutions else None
            w, b = fit_logistic_regression(x_fit, y_fit, 10.0 ** exponent, num_classes, max_iter,
                                           init=solutions.get(nearest), dtype=dtype)
            solutions[exponent] = (w, b)
            logits = (x_val.to(w.dtype) @ w + b).cpu()
            scores[exponent] = (classification_metrics(logits, y_val.cpu())[select],
                                F.cross_entropy(logits, y_val.cpu()).item())
            if log:
                log(f" l2 = 1e{exponent:+.3f}: validation {select} {scores[exponent][0]:.2f}, "
                    f"loss {scores[exponent][1]:.4f}")
        return scores[exponent]

    def best_of(exponents):   # the best validation score; among equals, the lowest validation loss
        return max(exponents, key=lambda e: (score(e)[0], -score(e)[1]))

    lo, hi = l2_range
    best = best_of(range(lo, hi + 1, 2))
    step = 2.0
    while step > 1 / resolution:
        step /= 2
        best = best_of([e for e in (best - step, best, best + step) if lo <= e <= hi])
    best = round(best, 6)
    l2 = 10.0 ** best
    x_all = torch.cat([x_fit, x_val])
    y_all = torch.cat([y_fit, y_val])
    w, b = fit_logistic_regression(x_all, y_all, l2, num_classes, max_iter, init=solutions[best], dtype=dtype)
    test_logits = (test_features.to(device=device, dtype=w.dtype) @ w + b).cpu()
    out = classification_metrics(test_logits, test_labels)
    out.update(l2=l2, C=1 / l2, val_score=scores[best][0], select=select,
               search=[[10.0 ** e, s, loss] for e, (s, loss) in sorted(scores.items())],
               n_train=len(y_fit), n_val=len(y_val), n_test=len(test_labels))
    return out


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

def _name_key(name):
    return re.sub(r"[^a-z0-9]", "", name.lower())


def bundled_prompts(name):
    """(classes, templates) of a dataset in assets/zeroshot_prompts.json, looked up ignoring case and
    punctuation (Food-101 = Food101), with a few aliases (dtd, pets, fer2013, imagenet1k, ...)."""
    table = json.loads((msclip.ASSETS / "zeroshot_prompts.json").read_text(encoding="utf-8"))
    keys = {_name_key(k): k for k in table}
    keys.update({k: v for k, v in PROMPT_ALIASES.items()})
    key = keys.get(_name_key(name)) or keys.get(_name_key(re.sub(r"^wds_", "", name)))
    if key is None:
        raise EvalError(f"no bundled prompts for dataset name {name!r}; known: {', '.join(sorted(table))}")
    return key, table[key]["classes"], table[key]["templates"]


def read_list(path, what):
    """Class names or templates from a file: a JSON list (class entries may be lists of synonyms) or
    {"classes": [...], "templates": [...]}, or plain text with one entry per line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{what} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("classes" if what == "class names" else "templates")
        if not isinstance(data, list):
            raise EvalError(f"{path}: expected a JSON list of {what}")
        items = data
    else:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise EvalError(f"{path} holds no {what}")
    return items


def fill_template(template, name):
    """A prompt from a template: OpenAI's '{}' or CLIP_benchmark's '{c}' marks the class name."""
    if "{c}" in template:
        return template.replace("{c}", name)
    if "{}" in template:
        return template.replace("{}", name)
    raise EvalError(f"template {template!r} has no '{{}}' or '{{c}}' for the class name")


def synonyms(entry):
    return [entry] if isinstance(entry, str) else list(entry)


def display_name(entry):
    return synonyms(entry)[0]


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress report on stderr (redrawn on a terminal, every ~10 s otherwise)."""

    def __init__(self, what, total=None, quiet=False):
        self.what, self.total, self.quiet = what, total, quiet
        self.done = 0
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n):
        self.done += n
        now = time.time()
        if not self.quiet and (now - self.last > (0.2 if self.tty else 10)):
            self.last = now
            self._print("\r" if self.tty else "", "\n" if not self.tty else "")

    def close(self, note=""):
        if not self.quiet:
            self._print("\r" if self.tty else "", f"{note}\n")

    def _print(self, prefix, suffix):
        rate = self.done / max(time.time() - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"{prefix}{self.what}: {self.done}{of} ({rate:.0f}/s){suffix}")
        sys.stderr.flush()


def autocast(device, precision):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def encode_texts(model, texts, device="cpu", precision="fp32", batch_size=256, official_truncation=False, group=None):
    """Normalised text embeddings [N, D] (fp32, on the CPU). Tokens are trimmed on the host. With a
    process group, each rank encodes its block of the texts (see gather_from_ranks)."""
    start, stop = rank_block(len(texts), group)
    out = []
    for i in range(start, stop, batch_size):
        tokens = msclip.tokenize(texts[i:min(i + batch_size, stop)], model.config.context_length,
                                 eot_when_truncated=not official_truncation)
        tokens = msclip.trim_padding(tokens).to(device)
        with autocast(device, precision):
            out.append(model.encode_text(tokens, normalize=False).float().cpu())
    out = gather_from_ranks(out, group)
    return F.normalize(torch.cat(out), dim=-1)


def zeroshot_classifier(model, classnames, templates, device="cpu", precision="fp32", batch_size=256, group=None):
    """[C, D] class embeddings: per class, every template x every synonym encoded and normalised,
    averaged, re-normalised (ARCHITECTURE §11). Prompts are tokenised like the official eval."""
    prompts, owner = [], []
    for c, entry in enumerate(classnames):
        for name in synonyms(entry):
            for template in templates:
                prompts.append(fill_template(template, name))
                owner.append(c)
    embeddings = encode_texts(model, prompts, device, precision, batch_size, official_truncation=True, group=group)
    sums = torch.zeros(len(classnames), embeddings.shape[1]).index_add_(0, torch.tensor(owner), embeddings)
    counts = torch.bincount(torch.tensor(owner), minlength=len(classnames))
    return F.normalize(sums / counts[:, None], dim=-1)


@torch.no_grad()
def zero_shot_heldout(model, image_size, seed=0, samples=512, batch=128, device="cpu", workers=0, group=None):
    """The trainer's built-in check: zero-shot accuracy {task: fraction} on `samples` new renders of
    data.py's held-out split, classified with data.heldout_prompts() through the eval transform.
    With a process group, each rank encodes its block of the renders (see encode_images)."""
    was_training = model.training
    model.eval()
    renders = data.SyntheticCaptions("heldout", length=samples, image_size=image_size, seed=seed)
    classifiers = {}
    for task, (names, templates) in data.heldout_prompts().items():
        rows = []
        for name in names:
            tokens = msclip.trim_padding(msclip.tokenize([t.format(name) for t in templates]))
            features = model.encode_text(tokens.to(device))
            rows.append(F.normalize(features.float().mean(0), dim=-1))
        classifiers[task] = torch.stack(rows).cpu()
    images = data.SyntheticImages(renders, "shape", msclip.ImageTransform(image_size))
    features = encode_images(model, images, device, "fp32", batch, workers, "held-out renders", True, group)["features"]
    model.train(was_training)
    truth = torch.tensor([renders.labels(i) for i in range(samples)])  # (shape, colour): the features keep this order
    correct = {task: int(((features @ classifiers[task].T).argmax(-1) == truth[:, column]).sum())
               for task, column in (("shape", 0), ("colour", 1))}
    return {task: n / samples for task, n in correct.items()}


def _collate(batch):
    return batch


@torch.no_grad()   # not inference_mode: the linear probe differentiates through these features
def encode_images(model, dataset, device="cpu", precision="fp32", batch_size=64, workers=0, what="images",
                  quiet=False, group=None):
    """Unnormalised image features of a dataset yielding (image tensor or None, meta).

    Returns {"features" [N, D] fp32, "labels" LongTensor [N] or None, "captions" list or None,
    "skipped": count of images that could not be read, "skipped_examples": the first few, with why}.
    Map-style datasets keep their order. With a process group, each rank encodes its part (a block
    of a map-style dataset, every world-size-th shard of BenchmarkShards) and every rank returns the
    whole result, so that any error is raised on every rank alike.
    """
    part = rank_part(dataset, group)
    total = len(part) if hasattr(part, "__len__") else None
    # its own generator: the workers' seeds must not come from (and move) a training's random state
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         generator=torch.Generator())
    features, labels, captions, skipped = [], [], [], []
    progress = Progress(f"encoding {what}", total, quiet)
    for batch in loader:
        good = [(image, meta) for image, meta in batch if image is not None]
        skipped += [f"{meta['id']}: {meta['error']}" for image, meta in batch if image is None]
        if good:
            images = torch.stack([image for image, _ in good]).to(device)
            with autocast(device, precision):
                features.append(model.encode_image(images, normalize=False).float().cpu())
            labels += [meta.get("label") for _, meta in good]
            captions += [meta.get("captions") for _, meta in good]
        progress.update(len(batch))
    progress.close(f", {len(skipped)} skipped" if skipped else "")
    if group is not None:
        parts = gather_from_ranks([(features, labels, captions, skipped)], group)
        features, labels, captions, skipped = ([x for part in parts for x in part[i]] for i in range(4))
    if not features:
        raise EvalError(f"no image of {what} could be read ({len(skipped)} skipped"
                        + (f", e.g. {skipped[0]})" if skipped else ")"))
    return {"features": torch.cat(features),
            "labels": torch.tensor(labels, dtype=torch.long) if all(l is not None for l in labels) else None,
            "captions": captions if all(c is not None for c in captions) else None,
            "skipped": len(skipped), "skipped_examples": skipped[:10]}


# ----------------------------------------------------------------------------------------------
# Several processes (train_ds.py's ranks): each encodes its part, every one gets the whole result
# ----------------------------------------------------------------------------------------------

def rank_block(count, group):
    """[start, stop) of this rank's contiguous block of `count` items (all of them without a group):
    gathered in rank order, the blocks keep the items' order."""
    if group is None:
        return 0, count
    import torch.distributed as dist
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    return rank * count // world_size, (rank + 1) * count // world_size


def rank_part(dataset, group):
    """This rank's part of an evaluation dataset: every world-size-th shard of a shard stream (the
    shards are not split further), a block of a map-style dataset."""
    if group is None:
        return dataset
    if isinstance(dataset, data.BenchmarkShards):
        import torch.distributed as dist
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        return data.BenchmarkShards(dataset.shards[rank::world_size], dataset.transform, dataset.kind)
    return torch.utils.data.Subset(dataset, range(*rank_block(len(dataset), group)))


def gather_from_ranks(items, group):
    """The list `items` of every rank of `group` joined in rank order (`items` itself without a
    group). A gloo group: the items are sent from host memory, as CPU tensors and Python objects."""
    if group is None:
        return items
    import torch.distributed as dist
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, items, group=group)
    return [item for part in everyone for item in part]


# ----------------------------------------------------------------------------------------------
# Datasets on disk
# ----------------------------------------------------------------------------------------------

@dataclass
class EvalDataset:
    """What eval.py knows about one --dataset: where its splits are and what its classes are called."""
    name: str
    kind: str                        # folder | csv | wds | synthetic
    path: str
    splits: dict                     # split name -> folder / csv file / shard list / SyntheticCaptions
    classnames: list = None          # the dataset's own class names (entries may be synonym lists)
    templates: list = None
    label_names: list = None         # folder/csv: how the data names its classes (raw labels)
    wds_kind: str = "classification"
    records: dict = field(default_factory=dict)   # folder/csv: split -> records (label = class index)
    classnames_source: str = None
    templates_source: str = None
    label_mapping: str = None        # folder/csv with given class names: "by name" or "by sorted folder order"
    attribute: str = None            # synthetic: which label ("shape" or "colour")
    settings: dict = None            # synthetic: SyntheticCaptions arguments


def resolve_split(dataset, split):
    """The split as stored: 'test' falls back to 'val' for folders (and 'heldout' for synthetic)."""
    if split in dataset.splits:
        return split
    fallbacks = {"test": ["val", "heldout"], "heldout": ["test"]}.get(split, [])
    for other in fallbacks:
        if other in dataset.splits:
            return other
    raise EvalError(f"dataset {dataset.name} has no split {split!r} (it has: {', '.join(dataset.splits) or 'none'})")


def open_dataset(spec, name=None, synthetic_size=None, image_size=64):
    """An EvalDataset from a --dataset value (see the module docstring for the layouts)."""
    if spec in SYNTHETIC:
        return open_synthetic(spec, synthetic_size, image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise EvalError(f"dataset {spec!r} does not exist (and is not one of {', '.join(SYNTHETIC)})")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv"):
            raise EvalError(f"{path}: a dataset file must be .csv or .tsv")
        default = path.parent.name if path.stem in ("train", "val", "test") else path.stem
        return open_csv(path, {"test": path}, name or default)
    name = name or path.resolve().name
    wds_splits = {p.parent.name: p.parent for p in sorted(path.glob("*/nshards.txt"))}
    if wds_splits:
        return open_wds(path, wds_splits, name)
    csv_splits = {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() in (".csv", ".tsv")
                  and p.stem in ("train", "val", "test")}
    if csv_splits:
        return open_csv(path, csv_splits, name)
    folder_splits = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if folder_splits:
        return open_folder(path, folder_splits, name)
    raise EvalError(f"{path}: no dataset layout found (expected train/ test/ val/ class folders, "
                    "{split}/nshards.txt shards, or train.csv / test.csv)")


def open_folder(root, splits, name):
    """Image folders: {split}/{class}/image. Classes are the sorted sub-folder names; every split must
    have the same ones, each holding at least one image file."""
    label_names, records = None, {}
    for split, folder in splits.items():
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise EvalError(f"{folder} has no class sub-folders")
        if label_names is not None and classes != label_names:
            diff = sorted(set(classes) ^ set(label_names))
            raise EvalError(f"the class folders of {folder} differ from the other splits' ({', '.join(diff[:5])})")
        label_names = classes
        records[split] = []
        for label, cls in enumerate(classes):
            files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise EvalError(f"class folder {folder / cls} holds no image files ({', '.join(data.IMAGE_SUFFIXES)}); "
                                "remove it or add images")
            records[split] += [{"path": str(f), "label": label} for f in files]
    return EvalDataset(name, "folder", str(root), splits, label_names=label_names, records=records,
                       classnames=[c.replace("_", " ") for c in label_names], classnames_source="folder names")


IMAGE_COLUMNS = ("filepath", "path", "image", "image_path", "file", "filename", "img")
LABEL_COLUMNS = ("label", "class", "classname", "target", "category")
CAPTION_COLUMNS = ("caption", "title", "text", "captions", "sentence")


def read_csv_rows(path):
    """(image column, label column, caption column, rows with their line numbers) of a CSV/TSV file."""
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in text.split("\n", 1)[0]) else ","
    rows = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1) if row]
    if not rows:
        raise EvalError(f"{path} is empty")
    header = [h.strip().lower() for h in rows[0][1]]
    image_col = next((header.index(c) for c in IMAGE_COLUMNS if c in header), None)
    if image_col is None:
        return 0, 1, 1, rows   # no header: path, label-or-caption
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    caption_col = next((header.index(c) for c in CAPTION_COLUMNS if c in header), None)
    if label_col is None and caption_col is None:
        raise EvalError(f"{path}: the header {rows[0][1]} has an image column but no label "
                        f"({'/'.join(LABEL_COLUMNS)}) or caption ({'/'.join(CAPTION_COLUMNS)}) column")
    return image_col, label_col, caption_col, rows[1:]


def open_csv(root, splits, name):
    """CSV/TSV splits. Image paths are relative to the file's folder. Rows repeating an image add
    captions to it (retrieval); labels are class indices or class names (mapped once names are known)."""
    records, all_labels = {}, []
    for split, path in splits.items():
        image_col, label_col, caption_col, rows = read_csv_rows(path)
        by_path = {}
        for line, row in rows:
            if len(row) <= max(c for c in (image_col, label_col, caption_col) if c is not None):
                raise EvalError(f"{path}, line {line}: expected more columns, got {row}")
            image = (path.parent / row[image_col].strip()).resolve()
            record = by_path.setdefault(str(image), {"path": str(image), "where": f"{path.name}, line {line}"})
            if label_col is not None:
                label = row[label_col].strip()
                if record.get("raw_label", label) != label:
                    raise EvalError(f"{path}, line {line}: {row[image_col]} is listed with two labels, "
                                    f"{record['raw_label']!r} ({record['where']}) and {label!r}")
                record["raw_label"], record["where"] = label, f"{path.name}, line {line}"
                all_labels.append(label)
            if caption_col is not None:
                record.setdefault("captions", []).append(row[caption_col].strip())
        records[split] = list(by_path.values())
    integer = bool(all_labels) and all(re.fullmatch(r"-?\d+", l) for l in all_labels)
    label_names = None if integer or not all_labels else sorted(set(all_labels))
    for split_records in records.values():
        for r in split_records:
            if "raw_label" in r:
                r["label"] = int(r["raw_label"]) if integer else label_names.index(r["raw_label"])
    return EvalDataset(name, "csv", str(root), splits, label_names=label_names, records=records,
                       classnames=label_names, classnames_source="CSV labels" if label_names else None)


def open_wds(root, splits, name):
    shards = {}
    for split, folder in splits.items():
        try:
            n = int((folder / "nshards.txt").read_text().strip())
        except ValueError as e:
            raise EvalError(f"{folder / 'nshards.txt'} does not hold a number") from e
        shards[split] = [folder / f"{i}.tar" for i in range(n)]
        missing = [s for s in shards[split] if not s.is_file()]
        if missing:
            raise EvalError(f"{folder / 'nshards.txt'} says {n} shards but {missing[0]} is missing")
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise EvalError(f"{root}: dataset_type {kind!r} is not supported (classification or retrieval)")
    classnames = templates = None
    if (root / "classnames.txt").is_file():
        classnames = [l.strip() for l in (root / "classnames.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
    if (root / "zeroshot_classification_templates.txt").is_file():
        templates = [l.strip() for l in (root / "zeroshot_classification_templates.txt").read_text(encoding="utf-8").splitlines()
                     if l.strip()]
    return EvalDataset(name, "wds", str(root), shards, classnames=classnames, templates=templates, wds_kind=kind,
                       classnames_source="classnames.txt" if classnames else None,
                       templates_source="zeroshot_classification_templates.txt" if templates else None)


def open_synthetic(spec, size=None, image_size=64):
    """data.py's procedural shapes: 'heldout' is evaluated, 'train' serves the linear probe."""
    attribute = SYNTHETIC[spec]
    classnames, templates = data.heldout_prompts()[attribute]
    kwargs = {"image_size": image_size}
    if size:
        kwargs["length"] = size

    splits = {"heldout": lambda: data.SyntheticCaptions("heldout", **kwargs),
              "train": lambda: data.SyntheticCaptions("train", **kwargs)}
    return EvalDataset(spec, "synthetic", spec, splits, classnames=list(classnames), templates=list(templates),
                       classnames_source="data.heldout_prompts()", templates_source="data.heldout_prompts()",
                       attribute=attribute, settings=kwargs)


def apply_prompts(dataset, classnames=None, templates=None, prompt_name=None):
    """Decide the class names and templates (--classnames/--templates files > --dataset-name's bundled
    list > the dataset's own > the 80 ImageNet templates), then turn folder/CSV labels into indices
    of those class names."""
    names_source, templates_source = "--classnames" if classnames else None, "--templates" if templates else None
    if prompt_name:
        key, names, temps = bundled_prompts(prompt_name)
        if classnames is None:
            classnames, names_source = names, f"assets/zeroshot_prompts.json[{key}]"
        if templates is None:
            templates, templates_source = temps, f"assets/zeroshot_prompts.json[{key}]"
    if classnames is not None:
        if dataset.kind in ("folder", "csv") and dataset.label_names:
            remap = map_label_names(dataset, classnames)
            for records in dataset.records.values():
                for r in records:
                    if "label" in r:
                        r["label"] = remap[r["label"]]
        dataset.classnames, dataset.classnames_source = list(classnames), names_source
    if templates is not None:
        dataset.templates, dataset.templates_source = list(templates), templates_source
    elif not dataset.templates:
        dataset.templates = bundled_prompts("ImageNet")[2]
        dataset.templates_source = "ImageNet's 80 templates (default)"
    return dataset


def open_named_dataset(spec, synthetic_size=None, image_size=64):
    """An EvalDataset with its prompts from '[NAME=]PATH' (train_ds.py's and ablate.py's --eval_dataset):
    NAME picks the bundled class names and templates, as --dataset-name does."""
    name, _, path = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
    return apply_prompts(open_dataset(path, name or None, synthetic_size, image_size), prompt_name=name or None)


def map_label_names(dataset, classnames):
    """Old label index -> index in `classnames`. By name when every folder/CSV label names exactly one
    class; otherwise folders map by sorted order (torchvision's ImageFolder convention: ImageNet's wnid
    folders), which needs as many folders as classes. A CSV label that names no class is an error."""
    index = {}
    for i, entry in enumerate(classnames):
        for name in synonyms(entry):
            index.setdefault(_name_key(name), set()).add(i)
    found = [index.get(_name_key(n.replace("_", " ")), set()) for n in dataset.label_names]
    if all(len(f) == 1 for f in found):
        dataset.label_mapping = "by name"
        return [next(iter(f)) for f in found]
    if dataset.kind == "csv":
        bad = next(n for n, f in zip(dataset.label_names, found) if len(f) != 1)
        where = next(r["where"] for rs in dataset.records.values() for r in rs if r.get("raw_label") == bad)
        problem = "is not in the class names" if not index.get(_name_key(bad)) else "names several classes"
        raise EvalError(f"label {bad!r} ({where}) {problem} ({len(classnames)} classes: "
                        f"{', '.join(display_name(c) for c in classnames[:5])}, ...); use class indices instead")
    if len(dataset.label_names) != len(classnames):
        raise EvalError(f"{dataset.path} has {len(dataset.label_names)} class folders but there are "
                        f"{len(classnames)} class names; folders whose names are not class names map by sorted order")
    dataset.label_mapping = "by sorted folder order"
    return list(range(len(classnames)))


def split_images(dataset, split, transform):
    """The torch dataset yielding (image, meta) for one split, and a fingerprint of its content."""
    stored = resolve_split(dataset, split)
    if dataset.kind in ("folder", "csv"):
        records = dataset.records[stored]
        fingerprint = [(r["path"], r.get("label"), r.get("captions")) for r in records]
        return stored, data.ImageFiles(records, transform), fingerprint
    if dataset.kind == "wds":
        shards = dataset.splits[stored]
        fingerprint = [(str(s.resolve()), s.stat().st_size, s.stat().st_mtime_ns) for s in shards] + [dataset.wds_kind]
        return stored, data.BenchmarkShards([str(s) for s in shards], transform, dataset.wds_kind), fingerprint
    synthetic = dataset.splits[stored]()
    return stored, data.SyntheticImages(synthetic, dataset.attribute, transform), [dataset.settings, stored, len(synthetic)]


# ----------------------------------------------------------------------------------------------
# Models and the feature cache
# ----------------------------------------------------------------------------------------------

def load_model(checkpoint=None, preset=None, device="cpu", seed=0):
    """(model in eval mode on `device`, identity for the cache). A checkpoint is this project's
    {"msclip_config", "state_dict"} or a released MS-CLIP-S state dict (weights_only loading); with
    --model too, a bare state dict of this project's keys also loads into that preset."""
    if checkpoint is None:
        if preset is None:
            raise EvalError("give --checkpoint PATH (or --model PRESET for a randomly initialised model)")
        if preset not in msclip.PRESETS:
            raise EvalError(f"unknown preset {preset!r}; choose one of {', '.join(msclip.PRESETS)}")
        torch.manual_seed(seed)
        model = msclip.create_model(preset)
        identity = {"preset": preset, "seed": seed}
    else:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            raise EvalError(f"{path} is a directory (a DeepSpeed checkpoint?): export it to one file first, "
                            f"python train_ds.py --checkpoint {path} --export msclip.pt")
        if not path.is_file():
            raise EvalError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusals, zip errors, garbage: all mean "not a weights file"
            raise EvalError(f"{path} is not a checkpoint torch.load(weights_only=True) can read: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        model = model_from_state(state, path, preset)
        stat = path.stat()
        identity = {"checkpoint": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return model.to(device).eval(), identity


def model_from_state(state, path, preset=None):
    if isinstance(state, dict) and "msclip_config" not in state and "visual.positional_embedding" not in state:
        wrapped = [k for k in ("state_dict", "module", "model") if isinstance(state.get(k), dict)]
        if len(wrapped) == 1:   # {"state_dict": {...}}, DeepSpeed's {"module": {...}}, ...
            state = state[wrapped[0]]
        if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
    if isinstance(state, dict) and preset and "msclip_config" not in state and "visual.positional_embedding" not in state:
        model = msclip.create_model(preset)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[1:])
            raise EvalError(f"{path} does not fit preset {preset}: {detail[:300]}") from e
        return model
    try:
        return msclip.load_checkpoint(state)
    except (ValueError, TypeError, KeyError) as e:
        raise EvalError(f"{path}: {e}") from e


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(cache_dir, key, compute, quiet=False):
    """compute() once per key: results are torch.save'd under cache_dir/<hash>.pt and read back with
    weights_only=True. An unreadable or foreign cache file is recomputed."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir).expanduser() / f"{_digest(key)}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(stored, dict) and stored.get("key") == json.loads(json.dumps(key, default=str)):
                if not quiet:
                    sys.stderr.write(f"cached: {path}\n")
                return stored["value"]
        except Exception as e:
            sys.stderr.write(f"ignoring unreadable cache file {path}: {type(e).__name__}\n")
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"key": json.loads(json.dumps(key, default=str)), "value": value}, tmp)
    os.replace(tmp, path)
    return value


# ----------------------------------------------------------------------------------------------
# Running the tasks
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    tasks: list
    split: str = "test"
    train_split: str = "train"
    val_split: str = None
    val_fraction: float = 0.2
    probe_iterations: int = 1000  # L-BFGS iterations per linear-probe fit
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    cache_dir: str = None
    quiet: bool = False
    group: object = None  # a gloo process group whose ranks share the encoding (train_ds.py); None: this process
    memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.group is not None and self.cache_dir:
            raise EvalError("a feature cache with a process group: ranks that find different cache files "
                            "would wait for each other forever; give one or the other")


def features_of(model, model_id, dataset, split, settings):
    transform = msclip.ImageTransform(model.config.image_size)
    stored, images, fingerprint = split_images(dataset, split, transform)
    key = {"what": "image features", "model": model_id, "dataset": [dataset.kind, dataset.path, _digest(fingerprint)],
           "split": stored, "image_size": model.config.image_size, "precision": settings.precision}
    memo = _digest(key)
    if memo not in settings.memo:   # zero-shot and linear probe share the test split's features
        settings.memo[memo] = cached(settings.cache_dir, key, lambda: encode_images(
            model, images, settings.device, settings.precision, settings.batch_size, settings.workers,
            f"{dataset.name} {stored}", settings.quiet, settings.group), settings.quiet)
    return stored, settings.memo[memo]


def split_report(encoded):
    return {"images": len(encoded["features"]), "skipped": encoded["skipped"],
            "skipped_examples": encoded["skipped_examples"]}


def check_labels(encoded, num_classes, dataset, split):
    labels = encoded["labels"]
    if labels is None:
        raise EvalError(f"{dataset.name} {split}: not every image has a class label")
    bad = labels[(labels < 0) | (labels >= num_classes)] if num_classes is not None else labels[labels < 0]
    if len(bad):
        raise EvalError(f"{dataset.name} {split}: label {int(bad[0])} is out of range for {num_classes} class names")
    return labels


def run_zeroshot(model, model_id, dataset, settings, report):
    if not dataset.classnames:
        raise EvalError(f"{dataset.name}: zero-shot needs class names (--classnames FILE or --dataset-name NAME)")
    stored, encoded = features_of(model, model_id, dataset, settings.split, settings)
    labels = check_labels(encoded, len(dataset.classnames), dataset, stored)
    key = {"what": "zero-shot classifier", "model": model_id, "classnames": dataset.classnames,
           "templates": dataset.templates, "precision": settings.precision}
    weights = cached(settings.cache_dir, key, lambda: zeroshot_classifier(
        model, dataset.classnames, dataset.templates, settings.device, settings.precision, group=settings.group),
        settings.quiet)
    logits = 100 * F.normalize(encoded["features"], dim=-1) @ weights.T
    report["splits"][stored] = split_report(encoded)
    return {**classification_metrics(logits, labels), "split": stored, "n_test": len(labels)}


def run_linear_probe(model, model_id, dataset, settings, report):
    train_split, train = features_of(model, model_id, dataset, settings.train_split, settings)
    test_split, test = features_of(model, model_id, dataset, settings.split, settings)
    if train_split == test_split:
        raise EvalError(f"{dataset.name}: the linear probe needs a train split besides {test_split!r}")
    num_classes = len(dataset.classnames) if dataset.classnames else None
    val = {}
    if settings.val_split:
        val_split, encoded = features_of(model, model_id, dataset, settings.val_split, settings)
        val = {"val_features": encoded["features"], "val_labels": check_labels(encoded, num_classes, dataset, val_split)}
        report["splits"][val_split] = split_report(encoded)
    log = None if settings.quiet else lambda line: sys.stderr.write(f"{dataset.name} linear probe:{line}\n")
    result = linear_probe(train["features"], check_labels(train, num_classes, dataset, train_split), test["features"],
                          check_labels(test, num_classes, dataset, test_split), **val, val_fraction=settings.val_fraction,
                          seed=settings.seed, device=settings.device, max_iter=settings.probe_iterations, log=log)
    report["splits"][train_split] = split_report(train)
    report["splits"][test_split] = split_report(test)
    return {**result, "split": test_split, "train_split": train_split}


def run_retrieval(model, model_id, dataset, settings, report):
    stored, encoded = features_of(model, model_id, dataset, settings.split, settings)
    if encoded["captions"] is None:
        raise EvalError(f"{dataset.name} {stored}: retrieval needs captions for every image (a caption column, "
                        ".txt entries in the shards)")
    texts, image_of_text = [], []
    for i, captions in enumerate(encoded["captions"]):
        texts += captions
        image_of_text += [i] * len(captions)
    key = {"what": "caption embeddings", "model": model_id, "texts": _digest(texts), "precision": settings.precision}
    text_features = cached(settings.cache_dir, key, lambda: encode_texts(
        model, texts, settings.device, settings.precision, group=settings.group), settings.quiet)
    similarity = F.normalize(encoded["features"], dim=-1) @ text_features.T
    report["splits"][stored] = split_report(encoded)
    return {**retrieval_metrics(similarity, image_of_text), "split": stored, "n_images": similarity.shape[0],
            "n_captions": similarity.shape[1]}


RUNNERS = {"zeroshot": run_zeroshot, "linear-probe": run_linear_probe, "retrieval": run_retrieval}
COLUMNS = {"zeroshot": ["top1", "top5", "mean_per_class", "roc_auc"],
           "linear-probe": ["top1", "top5", "mean_per_class", "l2"],
           "retrieval": ["i2t_recall@1", "i2t_recall@5", "i2t_recall@10", "t2i_recall@1", "t2i_recall@5",
                         "t2i_recall@10", "mean_recall"]}


def averages(reports, tasks):
    """Per task, the mean of each metric over the datasets that report it for every dataset (Avg. row)."""
    out = {}
    for task in tasks:
        results = [r[task] for r in reports if task in r]
        if len(results) < 1:
            continue
        keys = [k for k in COLUMNS[task] if k != "l2" and all(k in r for r in results)]
        out[task] = {k: sum(r[k] for r in results) / len(results) for k in keys}
        out[task]["datasets"] = len(results)
    return out


def format_table(reports, average, tasks):
    lines = []
    for task in tasks:
        rows = [(r["name"], r[task]) for r in reports if task in r]
        if not rows:
            continue
        columns = [c for c in COLUMNS[task] if any(c in res for _, res in rows)]
        width = max(12, *(len(name) for name, _ in rows))
        title = {"zeroshot": "zero-shot classification", "linear-probe": "linear probe", "retrieval": "retrieval"}[task]
        lines.append(f"{title} (%)")
        lines.append(f"{'dataset':<{width}}  {'n':>7}  " + "  ".join(f"{c:>13}" for c in columns))
        for name, res in rows:
            n = res.get("n_test", res.get("n_images", ""))
            cells = [(f"{res[c]:.2e}" if c == "l2" else f"{res[c]:.2f}") if c in res else "-" for c in columns]
            lines.append(f"{name:<{width}}  {n:>7}  " + "  ".join(f"{v:>13}" for v in cells))
        if len(rows) > 1:
            avg = average.get(task, {})
            cells = [f"{avg[c]:.2f}" if c in avg else "" for c in columns]
            lines.append(f"{'Avg.':<{width}}  {'':>7}  " + "  ".join(f"{v:>13}" for v in cells))
        lines.append("")
    return "\n".join(lines)


def evaluate(model, model_id, datasets, settings):
    """Run settings.tasks on every dataset: a list of per-dataset reports (dicts with every metric)."""
    reports = []
    for dataset in datasets:
        report = {"name": dataset.name, "kind": dataset.kind, "path": dataset.path, "splits": {}}
        if dataset.classnames:
            report.update(num_classes=len(dataset.classnames), classnames_source=dataset.classnames_source,
                          num_templates=len(dataset.templates or []), templates_source=dataset.templates_source)
            if dataset.label_mapping:
                report["labels_mapped"] = dataset.label_mapping
        for task in settings.tasks:
            report[task] = RUNNERS[task](model, model_id, dataset, settings, report)
        reports.append(report)
    return reports


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--checkpoint", help="this project's checkpoint or a released MS-CLIP-S state dict")
    p.add_argument("--model", help=f"preset ({', '.join(msclip.PRESETS)}): random init without --checkpoint, "
                                   "or the architecture of a bare state dict")
    p.add_argument("--dataset", action="append", required=True, help="dataset folder, CSV/TSV file or synthetic-*; repeatable")
    p.add_argument("--dataset-name", action="append", help="bundled prompts by name (ImageNet, CIFAR10, ...); "
                                                           "once for all datasets or once per --dataset")
    p.add_argument("--classnames", action="append", help="class names file (.txt lines or .json list with synonyms)")
    p.add_argument("--templates", action="append", help="templates file ('{}' or '{c}' marks the class name)")
    p.add_argument("--task", action="append", choices=TASKS, help="zeroshot (default), linear-probe, retrieval; repeatable")
    p.add_argument("--split", default="test", help="evaluated split (default test; val when there is no test)")
    p.add_argument("--train-split", default="train", help="linear probe training split")
    p.add_argument("--val-split", help="linear probe validation split (default: hold out --val-fraction of train)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32 is the official protocol")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes")
    p.add_argument("--cache-dir", help="cache image features (and text embeddings) here")
    p.add_argument("--synthetic-size", type=int, help="images per split of the synthetic datasets")
    p.add_argument("--seed", type=int, default=0, help="random init of --model, validation hold-out")
    p.add_argument("--output", default="eval_results.json", help="JSON file with every metric and setting")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def per_dataset(values, n, flag):
    if not values:
        return [None] * n
    if len(values) not in (1, n):
        raise EvalError(f"{flag} is given {len(values)} times for {n} datasets: give it once or once per --dataset")
    return values * n if len(values) == 1 else values


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except EvalError as e:
        sys.stderr.write(f"eval.py: error: {e}\n")
        return 2


def run(args):
    start = time.time()
    tasks = list(dict.fromkeys(args.task or ["zeroshot"]))
    settings = Settings(tasks=tasks, split=args.split, train_split=args.train_split, val_split=args.val_split,
                        val_fraction=args.val_fraction, device=args.device, precision=args.precision,
                        batch_size=args.batch_size, workers=args.workers, seed=args.seed, cache_dir=args.cache_dir,
                        quiet=args.quiet)
    model, model_id = load_model(args.checkpoint, args.model, args.device, args.seed)
    n = len(args.dataset)
    datasets = []
    for spec, name, classnames, templates in zip(args.dataset, per_dataset(args.dataset_name, n, "--dataset-name"),
                                                 per_dataset(args.classnames, n, "--classnames"),
                                                 per_dataset(args.templates, n, "--templates")):
        dataset = open_dataset(spec, name, args.synthetic_size, model.config.image_size)
        datasets.append(apply_prompts(dataset, classnames and read_list(classnames, "class names"),
                                      templates and read_list(templates, "templates"), name))
    reports = evaluate(model, model_id, datasets, settings)
    average = averages(reports, tasks)
    result = {"checkpoint": args.checkpoint, "model": args.model, "config": asdict(model.config),
              "settings": {k: v for k, v in asdict(settings).items() if k not in ("quiet", "memo", "group")},
              "datasets": reports, "average": average, "elapsed_s": round(time.time() - start, 1)}
    print(format_table(reports, average, tasks))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
