"""Image-text data for msclip: every reader train_ds.py and eval.py use, in one place.

Sources (each a small class, as OpenCLIP's open_clip_train/data.py):
  SyntheticCaptions   the built-in procedural shapes data ("train" and "heldout" splits) + heldout_prompts()
  CsvCaptions         CSV/TSV rows of image path + caption (training)
  ShardStream         img2dataset WebDataset shards (training): shard-order shuffle per epoch, shards
                      interleaved and samples shuffled in a buffer of undecoded bytes across shard boundaries
  ImageFiles, BenchmarkShards, SyntheticImages
                      eval.py's image folders / CSV files, CLIP_benchmark shards and the held-out shapes
One tar reader (read_tar) and one image decoder (read_image: skip-and-count, high bit depths scaled
to 8 bits) serve them all. Training images travel from the DataLoader workers as uint8 [3, H, W]
(PixelTransform); normalize_images() makes the model input in the training process, on its device,
equal bit for bit to msclip.ImageTransform's float path. train_loader() is the training entry.
"""
import glob
import io
import math
import os
import random
import re
import tarfile

import numpy as np
import torch
from PIL import Image, ImageDraw

import msclip

# ----------------------------------------------------------------------------------------------
# Built-in data: procedurally drawn shapes with captions in varied wording
# ----------------------------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]

RGB = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 25), "green": (35, 160, 55),
       "blue": (35, 75, 215), "purple": (135, 45, 175), "pink": (250, 135, 195), "brown": (125, 75, 35)}
BACKGROUNDS = {"white": (246, 246, 246), "light grey": (200, 200, 200), "dark grey": (72, 72, 72),
               "black": (14, 14, 14), "cream": (242, 232, 208)}
# Caption vocabulary. Words the zero-shot templates use (photo, picture, thing, ...) never occur here.
SHAPE_WORDS = {"circle": ["circle", "circle", "circle", "disc"], "square": ["square"],
               "triangle": ["triangle"], "star": ["star", "star", "star", "five-pointed star"],
               "cross": ["cross", "cross", "cross", "plus sign"], "heart": ["heart"],
               "crescent": ["crescent", "crescent", "crescent", "crescent moon"], "arrow": ["arrow"]}
COLOUR_WORDS = {"red": ["red", "red", "red", "scarlet"], "orange": ["orange"], "yellow": ["yellow", "yellow", "yellow", "golden"],
                "green": ["green", "green", "green", "emerald"], "blue": ["blue", "blue", "blue", "navy"],
                "purple": ["purple", "purple", "purple", "violet"], "pink": ["pink"],
                "brown": ["brown", "brown", "brown", "chocolate"]}
COUNT_WORDS = {1: ["a", "one", "a single"], 2: ["two", "a pair of"], 3: ["three"]}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "medium": ["", "", "medium-sized"], "large": ["large", "big"]}
WHERE_WORDS = {"top": "near the top", "bottom": "near the bottom", "left": "on the left", "right": "on the right",
               "centre": "in the middle"}
# Captions mention the shape always and the other attributes only sometimes, as alt-text does:
# when every caption names colour, background, size and position, those easy attributes tell the
# pairs of a batch apart and the model never learns shape (see caption()).
MENTION = {"colour": 0.5, "size": 0.1, "background": 0.1, "where": 0.1}
COLOUR_AFTER = ["{np} painted {colour}", "{np}, all {colour}", "{colour}: {np}", "{np} in {colour}"]
WITH_BACKGROUND = ["{np} on a {bg} background", "a {bg} backdrop with {np}", "{np} on {bg}"]
WITH_WHERE = ["{np} {where}", "{where}, {np}"]
PLURAL = {"cross": "crosses", "plus sign": "plus signs"}


def plural(word):
    return PLURAL.get(word, word + "s")


def polygon_points(shape, cx, cy, r, angle):
    """Outline of `shape` centred at (cx, cy) with radius r, rotated by `angle` radians."""
    def star(n, inner):
        return [((1 if k % 2 == 0 else inner), math.pi / 2 + k * math.pi / n) for k in range(2 * n)]

    polar = {
        "square": [(1.0, math.pi / 4 + k * math.pi / 2) for k in range(4)],
        "triangle": [(1.0, math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)],
        "star": star(5, 0.42),
    }
    if shape in polar:
        pts = [(rho * r * math.cos(t), -rho * r * math.sin(t)) for rho, t in polar[shape]]
    elif shape == "cross":
        a, b = 0.33 * r, r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "arrow":
        pts = [(-r, -0.25 * r), (0.1 * r, -0.25 * r), (0.1 * r, -0.7 * r), (r, 0), (0.1 * r, 0.7 * r), (0.1 * r, 0.25 * r),
               (-r, 0.25 * r)]
    elif shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x, y = 16 * math.sin(t) ** 3, 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x * r / 16, -(y + 2.5) * r / 16))
    else:
        raise ValueError(shape)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def draw_shape(draw, shape, cx, cy, r, angle, fill, background):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        dx, dy = 0.55 * r * math.cos(angle), 0.55 * r * math.sin(angle)
        draw.ellipse([cx + dx - 0.85 * r, cy + dy - 0.85 * r, cx + dx + 0.85 * r, cy + dy + 0.85 * r], fill=background)
    else:
        draw.polygon(polygon_points(shape, cx, cy, r, angle), fill=fill)


class SyntheticCaptions(torch.utils.data.Dataset):
    """Procedural image-caption pairs: 1-3 shapes of one kind and one colour on a plain or noisy
    background, captioned in varied wording (synonyms, word order, size, count, position).

    Sample `index` has shape SHAPES[index % S] and colour COLOURS[(index // S) % C]; everything else
    (size, count, positions, rotation, background, colour jitter, caption wording) is drawn from a
    random.Random seeded by (seed, split, index), so a render never depends on worker state. The
    "heldout" split draws from other seeds: new renders of the same classes. Training
    augmentation (random resized crop) is drawn from (seed, epoch, index): index the dataset with
    an (epoch, index) pair to get a given epoch's augmentation; a plain int means epoch 0. Items are
    (uint8 image [3, image_size, image_size], token ids [77]).
    """

    def __init__(self, split="train", length=len(SHAPES) * len(COLOURS) * 1000, image_size=64, seed=0, train=None):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed
        self.train = split == "train" if train is None else train
        self.transform = PixelTransform(image_size, train=self.train)

    counts = [1, 1, 1, 1, 1, 1, 1, 2, 2, 3]
    sizes = ["small", "medium", "medium", "large", "large"]

    def __len__(self):
        return self.length

    def labels(self, index):
        """(shape label, colour label) of sample `index` without rendering it."""
        return index % len(SHAPES), (index // len(SHAPES)) % len(COLOURS)

    def render(self, index):
        """(PIL image at twice the model's size, caption, shape label, colour label).

        The layout (background, texture, count, size, positions, rotation, caption form) comes from
        the sample's variant, index // (shapes x colours): the 64 samples of a variant differ only
        in shape and colour (hard negatives for each other, see minimal_pair_batches). The colour
        jitter and the synonyms come from the index itself."""
        shape_label, colour_label = self.labels(index)
        shape, colour = SHAPES[shape_label], COLOURS[colour_label]
        variant = index // (len(SHAPES) * len(COLOURS))
        rng = random.Random(f"msclip-shapes/{self.seed}/{self.split}/{variant}")
        own = random.Random(f"msclip-shapes/{self.seed}/{self.split}/{variant}/{index}")
        side = 2 * self.image_size
        bg_name = rng.choice(list(BACKGROUNDS))
        bg = tuple(min(255, max(0, v + rng.randint(-10, 10))) for v in BACKGROUNDS[bg_name])
        image = Image.new("RGB", (side, side), bg)
        draw = ImageDraw.Draw(image)
        if rng.random() < 0.3:  # faint texture: lines of a slightly different grey
            for _ in range(rng.randint(3, 8)):
                shift = rng.choice((-28, 28))
                tone = tuple(min(255, max(0, v + shift)) for v in bg)
                draw.line([(rng.uniform(0, side), rng.uniform(0, side)), (rng.uniform(0, side), rng.uniform(0, side))],
                          fill=tone, width=rng.randint(1, 3))
        count = rng.choice(self.counts)
        size = rng.choice(self.sizes if count == 1 else ["small", "medium"] if count == 2 else ["small"])
        radius = {"small": (0.12, 0.17), "medium": (0.19, 0.25), "large": (0.28, 0.36)}[size]
        fill = tuple(min(255, max(0, v + own.randint(-18, 18))) for v in RGB[colour])
        centres = []
        for _ in range(count):
            r = rng.uniform(*radius) * side
            for _attempt in range(20):  # keep shapes apart when there are several
                cx, cy = rng.uniform(r, side - r), rng.uniform(r, side - r)
                if all(math.hypot(cx - x, cy - y) > r + q for x, y, q in centres):
                    break
            centres.append((cx, cy, r))
            turn = rng.uniform(-0.3, 0.3)
            draw_shape(draw, shape, cx, cy, r, turn if shape != "crescent" else turn * 10, fill, bg)
        if count == 1:
            cx, cy, _ = centres[0]
            dx, dy = cx / side - 0.5, cy / side - 0.5
            where = "centre" if max(abs(dx), abs(dy)) < 0.12 else \
                ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
            where = WHERE_WORDS[where]
        else:
            where = rng.choice(["scattered around", "side by side", "spread out"])
        caption = self.caption(rng, own, shape, colour, count, size, where, bg_name)
        return image, caption, shape_label, colour_label

    @staticmethod
    def caption(rng, own, shape, colour, count, size, where, background):
        """A caption naming the count and shape, and colour, size, background and position only
        sometimes (MENTION), in varied word order. Layout choices come from `rng`, synonyms from `own`."""
        said = {part: rng.random() < p for part, p in MENTION.items()}
        shape_word = own.choice(SHAPE_WORDS[shape])
        colour_word = own.choice(COLOUR_WORDS[colour])
        colour_first = rng.random() < 0.6
        words = [rng.choice(COUNT_WORDS[count]), rng.choice(SIZE_WORDS[size]) if said["size"] else "",
                 colour_word if said["colour"] and colour_first else "", shape_word if count == 1 else plural(shape_word)]
        text = " ".join(w for w in words if w)
        if said["colour"] and not colour_first:
            text = rng.choice(COLOUR_AFTER).format(np=text, colour=colour_word)
        if said["background"]:
            text = rng.choice(WITH_BACKGROUND).format(np=text, bg=background)
        if said["where"]:
            text = rng.choice(WITH_WHERE).format(np=text, where=where)
        return re.sub(r"\ba (?=[aeiou])", "an ", text)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, caption, _, _ = self.render(index)
        rng = random.Random(f"msclip-shapes-aug/{self.seed}/{self.split}/{epoch}/{index}")
        return self.transform(image, rng), msclip.tokenize(caption)[0]


def heldout_prompts():
    """Zero-shot prompts for the held-out split: (class names, templates) per task. No template
    word except articles and prepositions occurs in a training caption."""
    shape_templates = ["a photo of a {}.", "a picture of the {}.", "an illustration of a {}.", "a rendering of a {}.",
                       "clip art of a {}."]
    colour_templates = ["a photo of something {}.", "a picture of a {} object.", "an illustration of a {} thing.",
                        "a rendering of a {} item.", "clip art of a {} figure."]
    return {"shape": (list(SHAPES), shape_templates), "colour": (list(COLOURS), colour_templates)}


# ----------------------------------------------------------------------------------------------
# Decoding: images (with skip-and-count), captions, uint8 transport, normalisation on the device
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")  # image folders
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "0.webp")  # WebDataset extensions, first found is the image


class SkippedSample(Exception):
    """A sample that cannot be used: reason 'missing', 'corrupt' or 'empty_caption', where = file or
    shard:key, detail = what went wrong."""

    def __init__(self, reason, where, detail=None):
        super().__init__(f"{reason}: {where}" + (f" ({detail})" if detail else ""))
        self.reason, self.where, self.detail = reason, where, detail or reason


def to_rgb(image):
    """8-bit RGB. 16-bit images (modes I;16*, and I as PIL opens some 16-bit files) are scaled from
    0..65535 to 0..255 (value / 257, rounded): convert("RGB") alone clips them at 255, so a 16-bit
    photo turns almost white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def read_image(source, where):
    """An 8-bit RGB PIL image from a path or bytes; SkippedSample('missing' / 'corrupt') when it cannot be read."""
    try:
        with Image.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise SkippedSample("missing", where, "file not found") from None
    except Exception as e:  # truncated or garbage bytes, unknown format, decompression bomb, ...
        raise SkippedSample("corrupt", where, f"{type(e).__name__}: {e}") from None


def clean_caption(caption, where):
    caption = (caption or "").strip()
    if not caption:
        raise SkippedSample("empty_caption", where)
    return caption


class PixelTransform:
    """msclip.ImageTransform's crop and resize with uint8 [3, size, size] output: what training
    workers send, a quarter of fp32's shared memory, and none of the float work.
    normalize_images() of it equals ImageTransform's output (tested)."""

    def __init__(self, size=224, train=False):
        self.geometry = msclip.ImageTransform(size, train=train)

    def __call__(self, image, rng=None):
        return torch.from_numpy(self.geometry.pixels(image, rng).transpose(2, 0, 1).copy())


_NORMALISATION = {}


def normalize_images(images, device="cpu", dtype=torch.float32):
    """uint8 images [N, 3, H, W] -> the model input on `device`: (pixel - 255 mean) * 1 / (255 std) in
    fp32 with msclip.ImageTransform's own float32 constants, then cast to `dtype`. Elementwise IEEE
    operations on the same values: equal to ImageTransform's output bit for bit (tested)."""
    device = torch.device(device)
    if device not in _NORMALISATION:
        reference = msclip.ImageTransform()
        _NORMALISATION[device] = tuple(torch.from_numpy(v).view(1, 3, 1, 1).to(device)
                                       for v in (reference.mean, reference.inv_std))
    mean, inv_std = _NORMALISATION[device]
    pixels = images.to(device, non_blocking=True).float()
    return ((pixels - mean) * inv_std).to(dtype)


def collate(samples):
    """Stack images, stack token ids and trim them to the batch's longest caption (on the host),
    and gather the skipped-sample reports and stream positions."""
    images = torch.stack([s[0] for s in samples])
    tokens = msclip.trim_padding(torch.stack([s[1] for s in samples]))
    skipped = [item for s in samples if len(s) > 2 for item in s[2]]
    positions = [s[3] for s in samples if len(s) > 3]
    return images, tokens, skipped, positions


# ----------------------------------------------------------------------------------------------
# CSV/TSV files (image path + caption)
# ----------------------------------------------------------------------------------------------

class CsvCaptions(torch.utils.data.Dataset):
    """Rows of a CSV/TSV file: image path (relative to the file's folder or absolute) + caption.

    Column names and separator follow OpenCLIP's options. A row whose image is missing or corrupt,
    or whose caption is empty, is replaced by the next readable row (so every rank keeps its batch
    size) and reported in the sample's `skipped` list. Augmentation is drawn from (seed, epoch, index).
    """

    def __init__(self, path, image_size=224, seed=0, separator="\t", img_key="filepath", caption_key="title"):
        import csv
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            if img_key not in columns or caption_key not in columns:
                raise ValueError(f"{path}: no column {img_key!r} and {caption_key!r} with separator {separator!r} "
                                 f"(found {columns}); set --csv_img_key, --csv_caption_key, --csv_separator")
            rows = [(row[img_key], row[caption_key]) for row in reader]
        if not rows:
            raise ValueError(f"{path}: no rows")
        root = os.path.dirname(os.path.abspath(path))
        self.paths = [p if os.path.isabs(p) else os.path.join(root, p) for p, _ in rows]
        self.captions = [c for _, c in rows]
        self.seed = seed
        self.transform = PixelTransform(image_size, train=True)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for attempt in range(min(len(self), 1000)):
            row = (index + attempt) % len(self)
            try:
                caption = clean_caption(self.captions[row], self.paths[row])
                image = read_image(self.paths[row], self.paths[row])
            except SkippedSample as e:
                skipped.append((e.reason, e.where))
                continue
            rng = random.Random(f"msclip-csv-aug/{self.seed}/{epoch}/{index}")
            return self.transform(image, rng), msclip.tokenize(caption)[0], skipped
        raise RuntimeError(f"{len(skipped)} rows in a row from row {index} are unreadable ({skipped[:3]} ...): check the data")


# ----------------------------------------------------------------------------------------------
# WebDataset tar shards: one reader; the training stream (img2dataset); eval's CLIP_benchmark shards
# ----------------------------------------------------------------------------------------------

def expand_shards(spec):
    """'dir/{00000..01023}.tar' (zero-padded ranges), '{a,b}' alternatives, globs, '::'-separated lists."""
    def expand(pattern):
        match = re.search(r"\{([^{}]*)\}", pattern)
        if not match:
            return sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            first, last = numeric.groups()
            items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
        else:
            items = body.split(",")
        return [shard for item in items for shard in expand(head + item + tail)]
    return [shard for part in spec.split("::") for shard in expand(part)]


def read_tar(path):
    """(key, {extension: bytes}) per sample of a tar shard, streamed: consecutive members sharing a
    key (the path up to the file name's first dot) form a sample, a repeated extension starts the
    next one. A shard that cannot be opened or breaks off ends with (None, {"error": message})."""
    key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                stem, dot, extension = name.partition(".")
                if not dot:
                    continue
                extension = extension.lower()
                if os.path.join(folder, stem) != key or extension in files:
                    if files:
                        yield key, files
                    key, files = os.path.join(folder, stem), {}
                files[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield None, {"error": f"{path}: {type(e).__name__}: {e}"}
        return
    if files:
        yield key, files


class ShardStream(torch.utils.data.IterableDataset):
    """img2dataset WebDataset shards (KEY.jpg/png/webp + KEY.txt) for training, streamed forever.

    Every epoch shuffles the shard list from (seed, epoch); rank r takes every world-th shard and
    DataLoader worker w every workers-th of those, so each sample is read once per epoch over all
    ranks and workers. A worker reads its shards in groups of `interleave`, all open at once: the
    next sample comes from a random open shard into a buffer of `shuffle_buffer` undecoded samples,
    and the sample yielded is a random one of the buffer, which therefore holds samples of several
    shards and persists across shard boundaries; it drains at the group's end. Draws come from a
    random.Random seeded by (seed, epoch, the group's shards), so the stream up to any point is a
    function of the seed: a position (epoch, (group, n)) resumes by re-reading the group's shards
    and skipping its first n samples undecoded. Augmentation is drawn from (seed, epoch, sample key).

    The DataLoader takes batches from its workers in turn; a loader started after `first_batch`
    batches gives worker i the part of worker (i + first_batch) % workers, so that a resumed loader
    continues the turns where they were. Unreadable samples are skipped and reported with the next
    good sample; `patience` unreadable samples in a row, or a whole epoch of a worker without one
    readable sample, stop the stream with an error naming the shards. Each item: (uint8 image,
    tokens, skipped, (worker, epoch, (group, n))), the position at which a resumed stream continues
    once this sample is consumed.
    `start` maps worker -> such a position (worker -1: every worker; (epoch, 0): the epoch's start).
    """

    def __init__(self, shards, image_size=224, seed=0, rank=0, world_size=1, start=None, shuffle_buffer=5000,
                 interleave=8, patience=10000, first_batch=0):
        self.shards, self.seed, self.rank, self.world_size = list(shards), seed, rank, world_size
        self.start, self.first_batch = dict(start or {}), first_batch
        self.shuffle_buffer, self.interleave, self.patience = shuffle_buffer, interleave, patience
        self.image_size, self.transform = image_size, PixelTransform(image_size, train=True)

    def plan(self, epoch, worker, workers):
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [self.shards[i] for i in order.tolist()][self.rank:: self.world_size][worker:: workers]

    def mix(self, group, rng):
        """The group's raw samples (shard, key, files) in shuffled order."""
        readers, buffer = [(shard, read_tar(shard)) for shard in group], []
        while readers or buffer:
            while readers and len(buffer) < self.shuffle_buffer:
                k = rng.randrange(len(readers))
                item = next(readers[k][1], None)
                if item is None:
                    readers.pop(k)
                else:
                    buffer.append((readers[k][0], *item))
            if buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()

    def decode(self, epoch, shard, key, files):
        where = f"{shard}:{key}"
        if "error" in files:
            raise SkippedSample("corrupt", files["error"])
        extension = next((e for e in WDS_IMAGE_KEYS if e in files), None)
        if extension is None or "txt" not in files:
            raise SkippedSample("missing", where)
        caption = clean_caption(files["txt"].decode("utf-8", errors="replace"), where)
        rng = random.Random(f"msclip-wds-aug/{self.seed}/{epoch}/{where}")
        return self.transform(read_image(files[extension], where), rng), msclip.tokenize(caption)[0]

    def start_of(self, worker):
        """(epoch, group, n) to begin at. A worker without a saved position (more workers than when
        saved, or another number of ranks) starts the oldest saved epoch."""
        if worker in self.start or -1 in self.start:
            epoch, place = self.start.get(worker, self.start.get(-1))
        else:
            epoch, place = (min(e for e, _ in self.start.values()), 0) if self.start else (0, 0)
        group, done = place if isinstance(place, (tuple, list)) else (0, 0)
        return epoch, group, done

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = ((info.id + self.first_batch) % info.num_workers, info.num_workers) if info else (0, 1)
        epoch, first_group, done = self.start_of(worker)
        skipped, failures = [], 0
        while True:
            mine = self.plan(epoch, worker, workers)
            if not mine:
                return
            groups = [mine[i: i + self.interleave] for i in range(0, len(mine), self.interleave)]
            whole_epoch, readable = first_group == 0 and done == 0, False
            for g in range(first_group, len(groups)):
                rng = random.Random(f"msclip-wds/{self.seed}/{epoch}/{'|'.join(groups[g])}")
                for n, (shard, key, files) in enumerate(self.mix(groups[g], rng)):
                    if n < done:  # consumed before the checkpoint this stream resumes
                        continue
                    try:
                        image, tokens = self.decode(epoch, shard, key, files)
                    except SkippedSample as e:
                        skipped.append((e.reason, e.where))
                        failures += 1
                        if failures >= self.patience:
                            raise RuntimeError(f"WebDataset: {failures} samples in a row unreadable (e.g. "
                                               f"{skipped[-3:]}) in shards {', '.join(groups[g])}: check the data")
                        continue
                    failures, readable = 0, True
                    yield image, tokens, skipped, (worker, epoch, (g, n + 1))
                    skipped = []
                done = 0
            if whole_epoch and not readable:
                raise RuntimeError(f"WebDataset: no readable sample in epoch {epoch} of rank {self.rank} worker "
                                   f"{worker} ({len(skipped)} unreadable, e.g. {skipped[:2]}); its shards: "
                                   f"{', '.join(mine[:8])}{' ...' if len(mine) > 8 else ''}")
            epoch, first_group = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Evaluation datasets (eval.py): items are (image tensor or None, meta), meta["error"] says why None
# ----------------------------------------------------------------------------------------------

def transformed(source, transform, meta):
    """transform(image) or None with meta['error'] set: unreadable images are skipped, not fatal."""
    try:
        return transform(read_image(source, meta["id"]))
    except SkippedSample as e:
        meta["error"] = e.detail
        return None


class ImageFiles(torch.utils.data.Dataset):
    """Images read from files: records are dicts with "path" and "label" and/or "captions"."""

    def __init__(self, records, transform):
        self.records, self.transform = records, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        meta = {"id": str(record["path"]), "label": record.get("label"), "captions": record.get("captions")}
        return transformed(str(record["path"]), self.transform, meta), meta


class BenchmarkShards(torch.utils.data.IterableDataset):
    """CLIP_benchmark's WebDataset shards (read_tar): .webp/.png/.jpg image, .cls label, .txt
    captions (kind "retrieval"). Split over DataLoader workers by shard."""

    def __init__(self, shards, transform, kind):
        super().__init__()
        self.shards, self.transform, self.kind = shards, transform, kind

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in shards:
            for key, entries in read_tar(shard):
                yield self.decode(f"{os.path.basename(shard)}:{key}", entries)

    def decode(self, sample_id, entries):
        meta = {"id": sample_id, "label": None, "captions": None}
        if "error" in entries:
            meta["error"] = entries["error"]
            return None, meta
        data = next((entries[k] for k in WDS_IMAGE_KEYS if k in entries), None)
        if data is None:
            meta["error"] = f"no image among {sorted(entries)}"
            return None, meta
        if self.kind == "retrieval":
            if "txt" not in entries:
                meta["error"] = "no .txt captions"
                return None, meta
            meta["captions"] = [c.strip() for c in entries["txt"].decode("utf-8").splitlines() if c.strip()]
        else:
            if "cls" not in entries:
                meta["error"] = "no .cls label"
                return None, meta
            try:
                meta["label"] = int(entries["cls"].decode("utf-8").strip())
            except ValueError:
                meta["error"] = f".cls is not an integer: {entries['cls'][:20]!r}"
                return None, meta
        return transformed(data, self.transform, meta), meta


class SyntheticImages(torch.utils.data.Dataset):
    """SyntheticCaptions rendered through an eval transform; label = shape or colour."""

    def __init__(self, dataset, attribute, transform):
        self.dataset, self.attribute, self.transform = dataset, attribute, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, caption, shape, colour = self.dataset.render(index)
        label = shape if self.attribute == "shape" else colour
        return self.transform(image), {"id": str(index), "label": label, "captions": [caption]}


# ----------------------------------------------------------------------------------------------
# Batches of map-style data: a function of (seed, epoch) only
# ----------------------------------------------------------------------------------------------

def epoch_batches(num_samples, batch, seed, epoch):
    """One epoch's global micro-batches (lists of dataset indices): a permutation drawn from
    (seed, epoch) only, cut into batches (the last partial one dropped)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    return [order[i: i + batch] for i in range(0, num_samples - batch + 1, batch)]


def minimal_pair_batches(num_samples, batch, seed, epoch, group_shapes=4, group_colours=2):
    """One epoch's global micro-batches for SyntheticCaptions, a function of (seed, epoch) only.

    Each batch is made of groups of group_shapes x group_colours samples of one variant: same
    background, layout, size, count and caption wording, differing only in shape and colour.
    Within a group, a sample's same-colour partners can only be told apart by shape, so shape
    matters from the first step (with random batches colour alone separates most pairs and the
    model never learns shape). The epoch visits every sample once.
    """
    shapes, colours = len(SHAPES), len(COLOURS)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    groups = []
    for variant in range(num_samples // (shapes * colours)):
        first = variant * shapes * colours
        shape_order = torch.randperm(shapes, generator=generator).tolist()
        colour_order = torch.randperm(colours, generator=generator).tolist()
        for a in range(0, shapes - group_shapes + 1, group_shapes):
            for b in range(0, colours - group_colours + 1, group_colours):
                groups.append([first + c * shapes + s for c in colour_order[b: b + group_colours]
                               for s in shape_order[a: a + group_shapes]])
    order = torch.randperm(len(groups), generator=generator).tolist()
    per_batch = batch // (group_shapes * group_colours)
    return [[i for g in order[j: j + per_batch] for i in groups[g]] for j in range(0, len(order) - per_batch + 1, per_batch)]


def map_style_batches(make_epoch, start, rank, micro):
    """This rank's slices of the global micro-batches make_epoch(epoch) lists, from micro-batch
    number `start` on, forever; keys are (epoch, index) so that augmentation follows the epoch."""
    epoch = 0
    while True:
        batches = make_epoch(epoch)
        if not batches:
            raise ValueError("the dataset holds less than one global micro-batch")
        for batch in batches[start:]:
            yield [(epoch, i) for i in batch[rank * micro: (rank + 1) * micro]]
        start = max(0, start - len(batches))
        epoch += 1


# ----------------------------------------------------------------------------------------------
# Training entry: the dataset of a --train_data, and the DataLoader of one rank
# ----------------------------------------------------------------------------------------------

def open_train_data(kind, source=None, image_size=224, seed=0, synthetic_samples=None, csv_separator="\t",
                    csv_img_key="filepath", csv_caption_key="title", shuffle_buffer=5000, interleave=8):
    """The training dataset of one kind: 'synthetic' (SyntheticCaptions), 'csv' (CsvCaptions, which
    raises ValueError for a file without the columns) or 'webdataset' (a ShardStream of the shards
    `source` names; train_loader places it on its rank). Map-style datasets have a len()."""
    if kind == "synthetic":
        return SyntheticCaptions("train", length=synthetic_samples or len(SHAPES) * len(COLOURS) * 1000,
                                 image_size=image_size, seed=seed)
    if kind == "csv":
        return CsvCaptions(source, image_size, seed, csv_separator, csv_img_key, csv_caption_key)
    return ShardStream(expand_shards(source), image_size, seed, shuffle_buffer=shuffle_buffer, interleave=interleave)


def train_loader(dataset, micro, rank, world_size, workers, seed=0, start_micro_batch=0, stream_start=None,
                 groups=None, pin_memory=False, log=print):
    """This rank's DataLoader of uint8 batches (images, tokens, skipped, stream positions), endless.

    Map-style data: the global micro-batches of each epoch (epoch_batches, or minimal_pair_batches
    with `groups` = (shapes, colours)), this rank's slice, from micro-batch `start_micro_batch` on.
    WebDataset: the rank's share of the shards from `stream_start` (worker -> position) with the
    workers' turns continued from `start_micro_batch`, at most one DataLoader worker per shard of the rank."""
    if isinstance(dataset, ShardStream):
        per_rank = len(dataset.shards) // world_size
        if workers > per_rank:
            log(f"{len(dataset.shards)} shards over {world_size} ranks: {per_rank} DataLoader workers per rank")
            workers = max(1, per_rank)
        stream = ShardStream(dataset.shards, dataset.image_size, dataset.seed, rank, world_size,
                             stream_start, dataset.shuffle_buffer, dataset.interleave, dataset.patience,
                             start_micro_batch)
        return torch.utils.data.DataLoader(stream, batch_size=micro, num_workers=workers, collate_fn=collate,
                                           pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                                           persistent_workers=False)
    global_micro = micro * world_size
    if groups:
        make_epoch = lambda e: minimal_pair_batches(len(dataset), global_micro, seed, e, *groups)  # noqa: E731
    else:
        make_epoch = lambda e: epoch_batches(len(dataset), global_micro, seed, e)  # noqa: E731
    batches = map_style_batches(make_epoch, start_micro_batch, rank, micro)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin_memory, prefetch_factor=4 if workers else None)
