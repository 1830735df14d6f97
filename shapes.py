"""The built-in data: procedurally drawn shapes with captions in varied wording.

A small world in which contrastive pre-training can be watched on a CPU: 8 shapes x 8 colours,
1-3 of them on a plain or textured background, captioned the way alt-text is (the shape always,
colour, size, background and position only sometimes). train_ds.py trains on the "train" split
(data.open_train_data); eval.py's synthetic-shape / synthetic-colour datasets are the "heldout"
split, classified zero-shot with heldout_prompts(). It imports msclip only, so that data.py can import it.
"""
import math
import random
import re

import torch
from PIL import Image, ImageDraw

import msclip

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "crescent", "arrow"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
DEFAULT_SAMPLES = len(SHAPES) * len(COLOURS) * 1000  # the training set: 1000 layouts of every class
EVAL_SAMPLES = 512  # held-out renders per evaluation (train_ds.py's --eval_samples, eval.py's --eval-samples)

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

    def __init__(self, split="train", length=DEFAULT_SAMPLES, image_size=64, seed=0):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.split, self.length, self.image_size, self.seed = split, length, image_size, seed
        self.crop = msclip.ImageTransform(image_size, train=split == "train")

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
        pixels = self.crop.pixels(image, rng).transpose(2, 0, 1)  # uint8, as data.py's training loaders ship images
        return torch.from_numpy(pixels.copy()), msclip.tokenize(caption)[0]


def heldout_prompts():
    """Zero-shot prompts for the held-out split: (class names, templates) per task. No template
    word except articles and prepositions occurs in a training caption."""
    shape_templates = ["a photo of a {}.", "a picture of the {}.", "an illustration of a {}.", "a rendering of a {}.",
                       "clip art of a {}."]
    colour_templates = ["a photo of something {}.", "a picture of a {} object.", "an illustration of a {} thing.",
                        "a rendering of a {} item.", "clip art of a {} figure."]
    return {"shape": (list(SHAPES), shape_templates), "colour": (list(COLOURS), colour_templates)}


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
