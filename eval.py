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

    # the held-out evaluation of the built-in shapes data (the figures train_ds.py logs)
    python eval.py --checkpoint runs/x/msclip.pt --dataset synthetic-shape --dataset synthetic-colour

Protocol (docs/ARCHITECTURE.md §11), fp32, the official eval transform. Zero-shot: a class embedding is the
re-normalised mean of its every template x synonym, logits = 100 * cosine. Linear probe (CLIP paper,
appendix A.3): L2-regularised logistic regression on frozen features by L-BFGS, its strength chosen
on a validation split by CLIP's search (1e-6..1e6, refined to 1/8 decade), then refitted on train +
validation. Retrieval: recall@1/5/10 both ways, several captions per image. Results in percent.

--dataset (repeatable; data.open_dataset reads it):
  DIR with train/ test/ (or val/) holding one sub-folder per class   image folder
  DIR with {split}/nshards.txt and {split}/0.tar ...                 CLIP_benchmark WebDataset
  FILE.csv / FILE.tsv (the evaluated split), or DIR with train.csv, test.csv, ...; a header names
        the image (filepath/path/image/file), label (label/class/target) or caption (caption/title/text)
        columns; without a known header: path, label-or-caption
  synthetic-shape, synthetic-colour        --eval-samples fixed renders of shapes.py's held-out split
Class names and templates: --classnames/--templates files, else --dataset-name (the bundled
assets/zeroshot_prompts.json), else the dataset's own, with the 80 ImageNet templates by default.
"""
import argparse
import hashlib
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
from tqdm import tqdm

import data
import msclip
import shapes

TASKS = ("zeroshot", "linear-probe", "retrieval")
# Other spellings of the bundled prompt lists' names (assets/README.md, CLIP_benchmark names).
PROMPT_ALIASES = {"imagenet1k": "ImageNet", "food": "Food101", "cars": "StanfordCars", "aircraft": "FGVCAircraft",
                  "voc2007": "PascalVOC2007", "dtd": "DescribableTextures", "pets": "OxfordPets",
                  "flowers": "Flowers102", "fer2013": "FacialEmotionRecognition2013", "gtsrb": "GTSRB",
                  "pcam": "PatchCamelyon", "kittidistance": "KITTI", "renderedsst2": "SST2", "stl10": "STL10",
                  "hatefulmemes": "HatefulMemes", "eurosat": "EuroSAT", "resisc45": "RESISC45"}
# A problem with the inputs (checkpoint, dataset, prompts), a ValueError: main() prints it without a traceback.
EvalError = data.DataError


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
    counted half: the Mann-Whitney U statistic from the scores' average ranks."""
    scores, positive = scores.double().cpu().numpy(), positive.cpu().numpy().astype(bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, the mean rank of equal scores
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

def bundled_prompts(name):
    """(key, classes, templates) of a dataset in assets/zeroshot_prompts.json, looked up ignoring case
    and punctuation (Food-101 = Food101), with a few aliases (dtd, pets, fer2013, imagenet1k, ...)."""
    table = json.loads((msclip.ASSETS / "zeroshot_prompts.json").read_text(encoding="utf-8"))
    keys = {**{data.name_key(k): k for k in table}, **PROMPT_ALIASES}
    key = keys.get(data.name_key(name)) or keys.get(data.name_key(re.sub(r"^wds_", "", name)))
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
        items = json.loads(text)
        if isinstance(items, dict):
            items = items.get("classes" if what == "class names" else "templates")
        if not isinstance(items, list):
            raise EvalError(f"{path}: expected a JSON list of {what}")
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


def apply_prompts(dataset, classnames=None, templates=None, prompt_name=None):
    """Decide the dataset's class names and templates: --classnames/--templates files > prompt_name's
    bundled lists > the dataset's own > the 80 ImageNet templates."""
    names_source, templates_source = "--classnames", "--templates"
    if prompt_name:
        key, names, bundled = bundled_prompts(prompt_name)
        where = f"assets/zeroshot_prompts.json[{key}]"
        classnames, names_source = (classnames, names_source) if classnames else (names, where)
        templates, templates_source = (templates, templates_source) if templates else (bundled, where)
    if classnames:
        dataset.set_classnames(classnames, names_source)
    if templates:
        dataset.templates, dataset.templates_source = list(templates), templates_source
    elif not dataset.templates:
        dataset.templates, dataset.templates_source = bundled_prompts("ImageNet")[2], "ImageNet's 80 templates (default)"
    return dataset


def open_named_dataset(spec, eval_samples=None, image_size=64):
    """The dataset of '[NAME=]PATH' (train_ds.py's and ablate.py's --eval_dataset) with its prompts:
    NAME picks the bundled class names and templates, as --dataset-name does. PATH may be
    synthetic-shape / synthetic-colour: eval_samples renders of the held-out shapes."""
    name, _, path = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
    return apply_prompts(data.open_dataset(path, name or None, eval_samples, image_size), prompt_name=name or None)


# ----------------------------------------------------------------------------------------------
# Encoding, shared by the ranks of a process group (train_ds.py's): each encodes its part, every
# rank gets the whole result, so that any error is raised on every rank alike
# ----------------------------------------------------------------------------------------------

def autocast(device, precision):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def encode_texts(model, texts, device="cpu", precision="fp32", batch_size=256, official_truncation=False, group=None):
    """Normalised text embeddings [N, D] (fp32, on the CPU). Tokens are trimmed on the host. With a
    process group, each rank encodes its block of the texts."""
    start, stop = rank_block(len(texts), group)
    out = []
    for i in range(start, stop, batch_size):
        tokens = msclip.tokenize(texts[i:min(i + batch_size, stop)], model.config.context_length,
                                 eot_when_truncated=not official_truncation)
        with autocast(device, precision):
            out.append(model.encode_text(msclip.trim_padding(tokens).to(device), normalize=False).float().cpu())
    return F.normalize(finite(torch.cat(gather_from_ranks(out, group)), "text embeddings"), dim=-1)


def finite(features, what):
    """`features`, or EvalError when some are NaN or infinite: a model whose weights (or BatchNorm
    statistics) are not finite, which would otherwise score at chance without a word."""
    bad = int((~torch.isfinite(features).all(dim=-1)).sum()) if features.numel() else 0
    if bad:
        raise EvalError(f"{bad} of {len(features)} {what} hold NaN or infinity: the model's weights or BatchNorm "
                        "statistics are not finite (a checkpoint of a diverged training?)")
    return features


def zeroshot_classifier(model, classnames, templates, device="cpu", precision="fp32", batch_size=256, group=None):
    """[C, D] class embeddings: per class, every template x every synonym encoded and normalised,
    averaged, re-normalised (ARCHITECTURE §11). Prompts are tokenised like the official eval."""
    prompts, owner = [], []
    for c, entry in enumerate(classnames):
        for name in data.synonyms(entry):
            prompts += [fill_template(template, name) for template in templates]
            owner += [c] * len(templates)
    embeddings = encode_texts(model, prompts, device, precision, batch_size, official_truncation=True, group=group)
    sums = torch.zeros(len(classnames), embeddings.shape[1]).index_add_(0, torch.tensor(owner), embeddings)
    counts = torch.bincount(torch.tensor(owner), minlength=len(classnames))
    return F.normalize(sums / counts[:, None], dim=-1)


@torch.no_grad()   # not inference_mode: the linear probe differentiates through these features
def encode_images(model, dataset, device="cpu", precision="fp32", batch_size=64, workers=0, what="images",
                  quiet=False, group=None):
    """Unnormalised image features of a dataset yielding (image tensor or None, meta).

    Returns {"features" [N, D] fp32, "labels" LongTensor [N] or None, "captions" list or None,
    "skipped": count of images that could not be read, "skipped_examples": the first few, with why}.
    Map-style datasets keep their order. With a process group, each rank encodes its part (rank_part).
    """
    part = rank_part(dataset, group)
    # its own generator: the workers' seeds must not come from (and move) a training's random state
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=list,
                                         generator=torch.Generator())
    features, labels, captions, skipped = [], [], [], []
    with tqdm(total=len(part) if hasattr(part, "__len__") else None, desc=f"encoding {what}", unit="image",
              disable=quiet) as progress:
        for batch in loader:
            good = [(image, meta) for image, meta in batch if image is not None]
            skipped += [f"{meta['id']}: {meta['error']}" for image, meta in batch if image is None]
            if good:
                with autocast(device, precision):
                    images = torch.stack([image for image, _ in good]).to(device)
                    features.append(model.encode_image(images, normalize=False).float().cpu())
                labels += [meta["label"] for _, meta in good]
                captions += [meta["captions"] for _, meta in good]
            progress.update(len(batch))
            if skipped:
                progress.set_postfix(skipped=len(skipped))
    if group is not None:
        parts = gather_from_ranks([(features, labels, captions, skipped)], group)
        features, labels, captions, skipped = ([x for part in parts for x in part[i]] for i in range(4))
    if not features:
        raise EvalError(f"no image of {what} could be read ({len(skipped)} skipped"
                        + (f", e.g. {skipped[0]})" if skipped else ")"))
    return {"features": finite(torch.cat(features), f"image features of {what}"),
            "labels": torch.tensor(labels, dtype=torch.long) if None not in labels else None,
            "captions": captions if None not in captions else None,
            "skipped": len(skipped), "skipped_examples": skipped[:10]}


def rank_block(count, group):
    """[start, stop) of this rank's contiguous block of `count` items (all of them without a group):
    gathered in rank order, the blocks keep the items' order."""
    if group is None:
        return 0, count
    rank, world_size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    return rank * count // world_size, (rank + 1) * count // world_size


def rank_part(dataset, group):
    """This rank's part of an evaluation dataset: every world-size-th shard of CLIP_benchmark shards
    (a shard is not split further), a block of a map-style dataset."""
    if group is None:
        return dataset
    if isinstance(dataset, data.BenchmarkShards):
        rank, world_size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        return data.BenchmarkShards(dataset.shards[rank::world_size], dataset.transform, dataset.kind)
    return torch.utils.data.Subset(dataset, range(*rank_block(len(dataset), group)))


def gather_from_ranks(items, group):
    """The list `items` of every rank of `group` joined in rank order (`items` itself without a
    group). A gloo group: the items are sent from host memory, as CPU tensors and Python objects."""
    if group is None:
        return items
    everyone = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, items, group=group)
    return [item for part in everyone for item in part]


# ----------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """How evaluate() runs: eval.py's options; train_ds.py's ranks share the encoding over `group`."""
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
    group: object = None  # a gloo process group whose ranks share the encoding; None: this process alone
    memo: dict = field(default_factory=dict, repr=False)  # what this evaluation computed, by cache key

    def __post_init__(self):
        if self.group is not None and self.cache_dir:
            raise EvalError("a feature cache with a process group: ranks that find different cache files "
                            "would wait for each other forever; give one or the other")


def digest(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached(settings, key, compute):
    """compute() once per key and Settings (zero-shot and the linear probe share the test split's
    features); with a cache_dir also torch.save'd there and read back with weights_only=True, where
    an unreadable or foreign file is recomputed."""
    name, key = digest(key), json.loads(json.dumps(key, default=str))
    path = Path(settings.cache_dir or ".").expanduser() / f"{name}.pt"
    if name not in settings.memo and settings.cache_dir and path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(stored, dict) and stored.get("key") == key:
                settings.memo[name] = stored["value"]
                if not settings.quiet:
                    sys.stderr.write(f"cached: {path}\n")
        except Exception as e:
            sys.stderr.write(f"ignoring unreadable cache file {path}: {type(e).__name__}\n")
    if name not in settings.memo:
        settings.memo[name] = compute()
        if settings.cache_dir:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({"key": key, "value": settings.memo[name]}, tmp)
            os.replace(tmp, path)
    return settings.memo[name]


def features_of(model, model_id, dataset, split, settings, report):
    """(the split as stored, encode_images' result for it), its image counts noted in the report."""
    stored, images, fingerprint = dataset.images(split, msclip.ImageTransform(model.config.image_size))
    key = {"what": "image features", "model": model_id, "dataset": [dataset.kind, dataset.path, digest(fingerprint)],
           "split": stored, "image_size": model.config.image_size, "precision": settings.precision}
    encoded = cached(settings, key, lambda: encode_images(model, images, settings.device, settings.precision,
                                                          settings.batch_size, settings.workers, f"{dataset.name} {stored}",
                                                          settings.quiet, settings.group))
    report["splits"][stored] = {"images": len(encoded["features"]), "skipped": encoded["skipped"],
                                "skipped_examples": encoded["skipped_examples"]}
    return stored, encoded


def labels_of(encoded, dataset, split):
    labels, num_classes = encoded["labels"], len(dataset.classnames or [])
    if labels is None:
        raise EvalError(f"{dataset.name} {split}: not every image has a class label")
    bad = labels[(labels < 0) | (labels >= num_classes)] if num_classes else labels[labels < 0]
    if len(bad):
        raise EvalError(f"{dataset.name} {split}: label {int(bad[0])} is out of range for {num_classes} class names")
    return labels


def run_zeroshot(model, model_id, dataset, settings, report):
    if not dataset.classnames:
        raise EvalError(f"{dataset.name}: zero-shot needs class names (--classnames FILE or --dataset-name NAME)")
    stored, encoded = features_of(model, model_id, dataset, settings.split, settings, report)
    labels = labels_of(encoded, dataset, stored)
    key = {"what": "zero-shot classifier", "model": model_id, "classnames": dataset.classnames,
           "templates": dataset.templates, "precision": settings.precision}
    weights = cached(settings, key, lambda: zeroshot_classifier(model, dataset.classnames, dataset.templates,
                                                                settings.device, settings.precision, group=settings.group))
    logits = 100 * F.normalize(encoded["features"], dim=-1) @ weights.T
    return {**classification_metrics(logits, labels), "split": stored, "n_test": len(labels)}


def run_linear_probe(model, model_id, dataset, settings, report):
    train_split, train = features_of(model, model_id, dataset, settings.train_split, settings, report)
    test_split, test = features_of(model, model_id, dataset, settings.split, settings, report)
    if train_split == test_split:
        raise EvalError(f"{dataset.name}: the linear probe needs a train split besides {test_split!r}")
    val = {}
    if settings.val_split:
        val_split, encoded = features_of(model, model_id, dataset, settings.val_split, settings, report)
        val = {"val_features": encoded["features"], "val_labels": labels_of(encoded, dataset, val_split)}
    log = None if settings.quiet else lambda line: sys.stderr.write(f"{dataset.name} linear probe:{line}\n")
    result = linear_probe(train["features"], labels_of(train, dataset, train_split), test["features"],
                          labels_of(test, dataset, test_split), **val, val_fraction=settings.val_fraction,
                          seed=settings.seed, device=settings.device, max_iter=settings.probe_iterations, log=log)
    return {**result, "split": test_split, "train_split": train_split}


def run_retrieval(model, model_id, dataset, settings, report):
    stored, encoded = features_of(model, model_id, dataset, settings.split, settings, report)
    if encoded["captions"] is None:
        raise EvalError(f"{dataset.name} {stored}: retrieval needs captions for every image (a caption column, "
                        ".txt entries in the shards)")
    texts = [caption for captions in encoded["captions"] for caption in captions]
    image_of_text = [i for i, captions in enumerate(encoded["captions"]) for _ in captions]
    key = {"what": "caption embeddings", "model": model_id, "texts": digest(texts), "precision": settings.precision}
    text_features = cached(settings, key, lambda: encode_texts(model, texts, settings.device, settings.precision,
                                                               group=settings.group))
    similarity = F.normalize(encoded["features"], dim=-1) @ text_features.T
    return {**retrieval_metrics(similarity, image_of_text), "split": stored, "n_images": similarity.shape[0],
            "n_captions": similarity.shape[1]}


RUNNERS = {"zeroshot": run_zeroshot, "linear-probe": run_linear_probe, "retrieval": run_retrieval}
COLUMNS = {"zeroshot": ["top1", "top5", "mean_per_class", "roc_auc"],
           "linear-probe": ["top1", "top5", "mean_per_class", "l2"],
           "retrieval": ["i2t_recall@1", "i2t_recall@5", "i2t_recall@10", "t2i_recall@1", "t2i_recall@5",
                         "t2i_recall@10", "mean_recall"]}


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


def zero_shot_top1(model, datasets, device="cpu", precision="fp32", workers=0, group=None):
    """{dataset name: zero-shot top-1 %} of a model in training (train_ds.py), in eval mode while
    measured. With a process group, each rank encodes its part and every rank gets the result."""
    was_training = model.training
    model.eval()
    try:
        settings = Settings(tasks=["zeroshot"], device=str(device), precision=precision, workers=workers,
                            quiet=True, group=group)
        return {r["name"]: r["zeroshot"]["top1"] for r in evaluate(model, "in training", datasets, settings)}
    finally:
        model.train(was_training)


def averages(reports, tasks):
    """Per task, the mean of each metric over the datasets that report it for every dataset (Avg. row)."""
    out = {}
    for task in tasks:
        results = [r[task] for r in reports if task in r]
        if results:
            keys = [k for k in COLUMNS[task] if k != "l2" and all(k in r for r in results)]
            out[task] = {**{k: sum(r[k] for r in results) / len(results) for k in keys}, "datasets": len(results)}
    return out


def format_table(reports, average, tasks):
    lines = []
    for task in tasks:
        rows = [(r["name"], r[task]) for r in reports if task in r]
        columns = [c for c in COLUMNS[task] if any(c in res for _, res in rows)]
        width = max(12, *(len(name) for name, _ in rows))
        title = {"zeroshot": "zero-shot classification", "linear-probe": "linear probe", "retrieval": "retrieval"}[task]
        lines += [f"{title} (%)", f"{'dataset':<{width}}  {'n':>7}  " + "  ".join(f"{c:>13}" for c in columns)]
        for name, res in rows:
            n = res.get("n_test", res.get("n_images", ""))
            cells = [(f"{res[c]:.2e}" if c == "l2" else f"{res[c]:.2f}") if c in res else "-" for c in columns]
            lines.append(f"{name:<{width}}  {n:>7}  " + "  ".join(f"{v:>13}" for v in cells))
        if len(rows) > 1:
            cells = [f"{average[task][c]:.2f}" if c in average[task] else "" for c in columns]
            lines.append(f"{'Avg.':<{width}}  {'':>7}  " + "  ".join(f"{v:>13}" for v in cells))
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def renamed(new):
    """The argparse action of an option's old name: it sets the new option, with a note on stderr."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            sys.stderr.write(f"{parser.prog}: {option_string} is renamed {new}\n")
            setattr(namespace, self.dest, values)
    return Renamed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--checkpoint", help="msclip.load_checkpoint's file (this project's, or a released MS-CLIP-S "
                                        "state dict); with --model, a bare state dict of that architecture")
    p.add_argument("--model", help="preset (msclip.PRESETS): randomly initialised without --checkpoint")
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
    p.add_argument("--eval-samples", type=int, default=shapes.EVAL_SAMPLES,
                   help="renders of the synthetic datasets' held-out split (and train split, for the linear probe)")
    p.add_argument("--synthetic-size", dest="eval_samples", type=int, action=renamed("--eval-samples"),
                   help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help="random init of --model, validation hold-out")
    p.add_argument("--output", default="eval_results.json", help="JSON file with every metric and setting")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def load_model(checkpoint, preset=None, seed=0):
    """(model, its identity for the feature cache): msclip.load_checkpoint's; with a preset, a bare
    state dict (DeepSpeed's {"module": ...}, DDP's "module." keys) in its architecture; without a
    checkpoint, the preset randomly initialised."""
    if checkpoint is None and preset is None:
        raise EvalError("give --checkpoint PATH (or --model PRESET for a randomly initialised model)")
    try:
        if checkpoint is None:
            torch.manual_seed(seed)
            return msclip.create_model(preset), {"preset": preset, "seed": seed}
        if preset is None:
            model = msclip.load_checkpoint(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = {re.sub(r"^module\.", "", k): v for k, v in state.get("module", state.get("state_dict", state)).items()}
            model = msclip.load_checkpoint({"msclip_config": asdict(msclip.preset_config(preset)), "state_dict": state})
    except (ValueError, OSError) as e:  # msclip's checks, a missing file
        raise EvalError(f"{checkpoint or '--model'}: {e}") from e
    except Exception as e:  # what torch.load(weights_only=True) refuses: pickled objects, text, garbage
        raise EvalError(f"{checkpoint} is not a weights file torch.load(weights_only=True) reads: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    stat = Path(checkpoint).stat()
    return model, {"checkpoint": str(Path(checkpoint).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def main(argv=None):
    args = parse_args(argv)
    start, tasks, n = time.time(), list(dict.fromkeys(args.task or ["zeroshot"])), len(args.dataset)
    try:
        for option in ("dataset_name", "classnames", "templates"):  # given once for all datasets, or once each
            values = getattr(args, option) or [None]
            if len(values) not in (1, n):
                raise EvalError(f"--{option.replace('_', '-')} is given {len(values)} times for {n} datasets: "
                                "give it once or once per --dataset")
            setattr(args, option, values * n if len(values) == 1 else values)
        settings = Settings(tasks=tasks, split=args.split, train_split=args.train_split, val_split=args.val_split,
                            val_fraction=args.val_fraction, device=args.device, precision=args.precision,
                            batch_size=args.batch_size, workers=args.workers, seed=args.seed, cache_dir=args.cache_dir,
                            quiet=args.quiet)
        model, model_id = load_model(args.checkpoint, args.model, args.seed)
        model = model.to(args.device).eval()
        datasets = [apply_prompts(data.open_dataset(spec, name, args.eval_samples, model.config.image_size),
                                  classnames and read_list(classnames, "class names"),
                                  templates and read_list(templates, "templates"), name)
                    for spec, name, classnames, templates in zip(args.dataset, args.dataset_name, args.classnames,
                                                                 args.templates)]
        reports = evaluate(model, model_id, datasets, settings)
    except EvalError as e:
        sys.stderr.write(f"eval.py: error: {e}\n")
        return 2
    average = averages(reports, tasks)
    print(format_table(reports, average, tasks))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        result = {"checkpoint": args.checkpoint, "model": args.model, "config": asdict(model.config),
                  "settings": {k: v for k, v in vars(settings).items() if k not in ("quiet", "memo", "group")},
                  "datasets": reports, "average": average, "elapsed_s": round(time.time() - start, 1)}
        output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
