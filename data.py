"""The image-text pipeline of train_ds.py and eval.py: every source, one reader per format.

Training (train_loader() is the entry, a TrainLoader that records what the training loop takes in
a Manifest; items are uint8 images, token ids, skipped-sample reports):
  shapes.SyntheticCaptions  the built-in procedural shapes data (shapes.py)
  CsvCaptions               CSV/TSV rows of image path + caption, packed in numpy bytes
  ShardStream               img2dataset WebDataset shards (files or pipe: commands): shard order
                            shuffled per epoch or shards resampled, shards interleaved and samples
                            shuffled in a buffer across shard boundaries
Evaluation (open_dataset() is the entry; an EvalDataset's splits yield (image, meta)):
  open_folder, open_csv, open_wds, open_synthetic
                            class folders, CSV/TSV files, CLIP_benchmark shards, the held-out shapes
One CSV reader (read_csv), one tar reader (read_tar) with one sample decoder (image_and_text), one
image decoder (read_image: skip-and-count, high bit depths scaled to 8 bits; PixelTransform.read
decodes training JPEGs at a reduced scale where the crop allows) serve them all.
Training images travel from the DataLoader workers as uint8; normalize_images() makes the model
input on the device, equal bit for bit to msclip.ImageTransform's float path.
"""
import contextlib
import csv
import glob
import io
import itertools
import os
import random
import re
import signal
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import msclip
import shapes

# ----------------------------------------------------------------------------------------------
# Decoding: images (with skip-and-count), captions, uint8 transport, normalisation on the device
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")  # image folders
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "0.webp")  # WebDataset extensions, first found is the image
SKIP_REASONS = ("missing", "corrupt", "empty_caption")


class DataError(ValueError):
    """Data that cannot be read as given (a layout, a column, a label): the scripts print the message
    without a traceback (eval.EvalError is this class)."""


class SkippedSample(Exception):
    """A sample that cannot be used: reason one of SKIP_REASONS, where = file or shard:key, detail =
    what went wrong."""

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
    if image.mode == "RGB":  # convert() would decode into a copy
        image.load()
        return image
    return image.convert("RGB")


def read_image(source, where, before_decoding=None):
    """An 8-bit RGB PIL image from a path or bytes; SkippedSample('missing' / 'corrupt') when it cannot
    be read. before_decoding(image) sees the opened image before its pixels are decoded (its size is
    known, Image.draft still possible)."""
    try:
        with Image.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)) as image:
            if before_decoding:
                before_decoding(image)
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

    def __call__(self, image, rng=None, box=None):
        return torch.from_numpy(self.geometry.pixels(image, rng, box).transpose(2, 0, 1).copy())

    def read(self, source, where, rng=None):
        """read_image(source, where), transformed. A training crop of a JPEG is decoded at the
        smallest DCT scale of libjpeg (1/2, 1/4, 1/8: PIL's Image.draft) at which the random crop
        box, drawn on the full size as for any image, still spans `size` pixels each way, and the box
        is mapped into the reduced image, to its nearest whole pixels (at most half a reduced pixel
        off, under 0.25% of the crop's side): 1.6x faster on 1024 x 768 photos, within 40 dB PSNR of
        the full decode (tested). Other formats, and evaluation (the official transform), decode in full."""
        found = {}

        def draft(image):
            if self.geometry.train and image.format == "JPEG":
                box = found["box"] = self.geometry._random_crop_box(image.size, rng or random.Random())
                side = min(box[2] - box[0], box[3] - box[1])
                scale = next((s for s in (8, 4, 2) if side // s >= self.geometry.size), 1)
                if scale > 1:  # PIL picks the largest scale whose image is at least the size asked for
                    image.draft(image.mode, (image.width // scale, image.height // scale))
                    found["box"] = tuple(round(v / scale) for v in box)
        image = read_image(source, where, draft)
        return self(image, rng, found.get("box"))


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
    and gather the skipped-sample reports, stream positions and sources (a sample's shard; None:
    the dataset's only source)."""
    images = torch.stack([s[0] for s in samples])
    tokens = msclip.trim_padding(torch.stack([s[1] for s in samples]))
    skipped = [item for s in samples if len(s) > 2 for item in s[2]]
    positions = [s[3] for s in samples if len(s) > 3]
    return images, tokens, skipped, positions, [s[4] if len(s) > 4 else None for s in samples]


class Manifest:
    """What a run trained on, so that two runs can be compared on the data they actually saw (under
    link rot "the same" shards differ): the samples taken from each source (a shard, the CSV file,
    the built-in data) and the samples skipped, by reason, with how often. A rank's TrainLoader adds
    the batches its training loop takes (not what the workers prefetched); a checkpoint sums every
    rank's additions since the last one into the run's record (merge), saved as data_manifest.json."""

    def __init__(self):
        self.sources, self.skipped = {}, {}

    def add(self, sources, skipped):
        for source in sources:
            self.sources[source] = self.sources.get(source, 0) + 1
        for reason, where in skipped:
            seen = self.skipped.setdefault(reason, {})
            seen[where] = seen.get(where, 0) + 1

    def take(self):
        """The additions since the last take, as a record for merge."""
        record = {"samples": sum(self.sources.values()), "sources": self.sources, "skipped": self.skipped}
        self.sources, self.skipped = {}, {}
        return record

    @staticmethod
    def merge(*records):
        """One record of several: samples per source and skips per reason and sample added up."""
        total = {"samples": 0, "sources": {}, "skipped": {}}
        for record in records:
            total["samples"] += record.get("samples", 0)
            for source, n in record.get("sources", {}).items():
                total["sources"][source] = total["sources"].get(source, 0) + n
            for reason, seen in record.get("skipped", {}).items():
                mine = total["skipped"].setdefault(reason, {})
                for where, n in seen.items():
                    mine[where] = mine.get(where, 0) + n
        return total


class TrainLoader(torch.utils.data.DataLoader):
    """The training DataLoader (train_loader): batches (images, tokens, skipped, positions), each
    added to `manifest` as the training loop takes it; samples without a source of their own count
    under `source`."""

    def __iter__(self):
        for images, tokens, skipped, positions, sources in super().__iter__():
            self.manifest.add([self.source if s is None else s for s in sources], skipped)
            yield images, tokens, skipped, positions


# ----------------------------------------------------------------------------------------------
# CSV/TSV files: one reader; training's image-caption rows
# ----------------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("filepath", "path", "image", "image_path", "file", "filename", "img")
CAPTION_COLUMNS = ("title", "caption", "text", "captions", "sentence")
LABEL_COLUMNS = ("label", "class", "classname", "target", "category")


def read_csv(path, separator=None, img_key=None, caption_key=None):
    """(line number, image path, caption, label) per row of a CSV/TSV file, streamed (a CC12M-size
    file is never held as Python rows); the header is checked when called. The image path is joined
    to the file's folder unless absolute, caption and label are None without such a column.

    Separator: `separator`, else a tab for .tsv files and files whose first line holds one, else a
    comma. Columns, their names compared ignoring case: img_key / caption_key when given (an error
    if missing), else the first of IMAGE_COLUMNS / CAPTION_COLUMNS in the header; the label is the
    first of LABEL_COLUMNS. A first row without an image column is no header: then each row is an
    image path and a label-or-caption (eval.py's image,label files)."""
    f = open(path, encoding="utf-8-sig", newline="")
    try:
        if separator is None:
            separator = "\t" if str(path).lower().endswith(".tsv") or "\t" in f.readline() else ","
            f.seek(0)
        rows = ((n, row) for n, row in enumerate(csv.reader(f, delimiter=separator), start=1) if row)
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path} is empty")
        header = [name.strip().lower() for name in first[1]]

        def column(key, known):
            if key is None:
                return next((header.index(name) for name in known if name in header), None)
            if key.lower() not in header:
                raise DataError(f"{path}: no column {key!r} with separator {separator!r} (the header: {first[1]}); "
                                "set --csv_img_key, --csv_caption_key, --csv_separator")
            return header.index(key.lower())

        image, caption, label = column(img_key, IMAGE_COLUMNS), column(caption_key, CAPTION_COLUMNS), column(None, LABEL_COLUMNS)
        if image is None:
            image, caption, label = 0, 1, 1
            rows = itertools.chain([first], rows)
        elif caption is None and label is None:
            raise DataError(f"{path}: the header {header} has an image column but no caption "
                            f"({'/'.join(CAPTION_COLUMNS)}) or label ({'/'.join(LABEL_COLUMNS)}) column")
    except BaseException:
        f.close()
        raise
    root, width = os.path.dirname(os.path.abspath(path)), max(c for c in (image, caption, label) if c is not None)

    def records():
        with f:
            for line, row in rows:
                if len(row) <= width:
                    raise DataError(f"{path}, line {line}: expected {len(header)} columns, got {row}")
                yield (line, os.path.join(root, row[image].strip()), None if caption is None else row[caption].strip(),
                       None if label is None else row[label].strip())
    return records()


class PackedStrings:
    """Strings in one numpy byte array with end offsets. A Python list of 12M str costs ~60 bytes of
    objects per string beyond its text, and DataLoader workers forked from the rank copy the pages
    those objects live on as they touch their reference counts; numpy buffers stay shared.
    extend() appends to a bytearray (large reallocations remap pages rather than copy them: the peak
    is the text once, not twice), close() makes the arrays."""

    def __init__(self):
        self.text, self.parts = bytearray(), []

    def extend(self, strings):
        encoded = list(map(str.encode, strings))
        self.parts.append(len(self.text) + np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded))))
        self.text += b"".join(encoded)

    def close(self):
        self.bytes = np.frombuffer(self.text, np.uint8)
        ends = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        self.ends = ends.astype(np.uint32) if len(self.text) < 2 ** 32 else ends  # half the memory when it fits
        del self.parts
        return self

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        start = int(self.ends[i - 1]) if i else 0
        return self.bytes[start: int(self.ends[i])].tobytes().decode()


class CsvCaptions(torch.utils.data.Dataset):
    """Rows of a CSV/TSV file (read_csv): image path + caption, for training.

    Separator and column names follow OpenCLIP's options. A row whose image is missing or corrupt,
    or whose caption is empty, is replaced by the next readable row (so every rank keeps its batch
    size) and reported in the sample's `skipped` list, once each time the epoch's order draws that
    row (each row is drawn at most once per epoch), not again when it is met as another row's
    replacement. Augmentation is drawn from (seed, epoch, index). A file none of whose first
    `CHECKED_ROWS` images exists is refused at once (DataError), before any training starts.
    Paths (relative to the file's folder when inside it) and captions are PackedStrings, read
    65,536 rows at a time: about the file's size per rank, shared by its DataLoader workers.
    """
    CHECKED_ROWS = 1000  # also the most rows a sample looks through for a readable one

    def __init__(self, path, image_size=224, seed=0, separator="\t", img_key="filepath", caption_key="title"):
        self.path, self.root = str(path), os.path.dirname(os.path.abspath(path)) + os.sep
        rows = read_csv(path, separator, img_key, caption_key)
        self.paths, self.captions = PackedStrings(), PackedStrings()
        while chunk := list(itertools.islice(rows, 1 << 16)):
            self.paths.extend([image[len(self.root):] if image.startswith(self.root) else image
                               for _, image, _, _ in chunk])
            self.captions.extend([caption for _, _, caption, _ in chunk])
        self.paths.close(), self.captions.close()
        if not len(self.paths):
            raise DataError(f"{path}: no rows")
        # the first existing image is usually the first row's: one stat; a wrong path column costs at most 1000
        first = [os.path.join(self.root, self.paths[i]) for i in range(min(len(self.paths), self.CHECKED_ROWS))]
        if not any(os.path.isfile(image) for image in first):
            raise DataError(f"{path}: none of the images of its first {len(first)} rows exists (e.g. {first[0]}; "
                            "relative paths are read from the file's folder): check --csv_img_key and the paths")
        self.seed = seed
        self.transform = PixelTransform(image_size, train=True)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        failed = []
        for attempt in range(min(len(self), self.CHECKED_ROWS)):
            row = (index + attempt) % len(self)
            path = os.path.join(self.root, self.paths[row])
            try:
                caption = clean_caption(self.captions[row], path)
                image = self.transform.read(path, path, random.Random(f"msclip-csv-aug/{self.seed}/{epoch}/{index}"))
            except SkippedSample as e:
                failed.append((e.reason, e.where))
                continue
            return image, msclip.tokenize(caption)[0], failed[:1]  # row `index`'s own, if it is bad
        raise RuntimeError(f"{len(failed)} rows in a row from row {index} are unreadable ({failed[:3]} ...): check the data")


# ----------------------------------------------------------------------------------------------
# WebDataset tar shards: one reader, one sample decoder; the training stream (img2dataset)
# ----------------------------------------------------------------------------------------------

def expand_shards(spec):
    """'dir/{00000..01023}.tar' (zero-padded ranges), '{a,b}' alternatives, globs, '::'-separated lists.
    'pipe:COMMAND' specs (read_tar runs the command) get the braces expanded and no glob: '*' and
    '?' in a command are the command's."""
    def expand(pattern):
        match = re.search(r"\{([^{}]*)\}", pattern)
        if not match:
            glob_it = not pattern.startswith("pipe:") and any(c in pattern for c in "*?[")
            return sorted(glob.glob(pattern)) if glob_it else [pattern]
        head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            first, last = numeric.groups()
            items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
        else:
            items = body.split(",")
        return [shard for item in items for shard in expand(head + item + tail)]
    return [shard for part in spec.split("::") for shard in expand(part)]


def missing_shards(shards):
    """The local shards (not pipe:) that are not files, found with one directory listing per folder
    instead of a stat per shard: every rank checks at start, and 64 ranks x 41k shards would be
    2.6 M stats of a shared file system. A pipe: command's failure shows when it is read."""
    listed, missing = {}, []
    for shard in shards:
        if shard.startswith("pipe:"):
            continue
        folder, name = os.path.split(shard)
        if folder not in listed:
            try:
                with os.scandir(folder or ".") as entries:
                    listed[folder] = {e.name for e in entries if e.is_file()}
            except OSError:
                listed[folder] = set()
        if name not in listed[folder]:
            missing.append(shard)
    return missing


def read_tar(path):
    """(key, {extension: bytes}) per sample of a tar shard, streamed: consecutive members sharing a
    key (the path up to the file name's first dot) form a sample, a repeated extension starts the
    next one. A shard that cannot be opened or breaks off ends with ("(unreadable)", {"error": why}).

    'pipe:COMMAND' reads the tar from the command's standard output (OpenCLIP's and webdataset's
    convention: 'pipe:aws s3 cp s3://bucket/00000.tar -'); its standard error goes to the log. A
    command that exits non-zero breaks the shard off; the command is killed when the reader is
    closed or dropped before the end (a resumed or stopped stream)."""
    key, files, process = None, {}, None
    try:
        if path.startswith("pipe:"):
            # its own process group: killing the shell alone would leave `a | b` or `a; b` running
            process = subprocess.Popen(path[len("pipe:"):], shell=True, stdout=subprocess.PIPE, start_new_session=True)
        with tarfile.open(path if process is None else None, mode="r|*",
                          fileobj=None if process is None else process.stdout) as tar:
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
        if process is not None:
            while process.stdout.read(1 << 16):  # what follows the end-of-archive blocks: let the command finish
                pass
            if process.wait():
                raise OSError("the command failed")
    except (tarfile.TarError, OSError, EOFError) as e:
        why = f"{type(e).__name__}: {e}"
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1)  # a command whose output broke off has usually ended: its status says why
            status = "still running" if process.returncode is None else f"exit status {process.returncode}"
            why = f"{path}: {status}, {why}"
        yield "(unreadable)", {"error": why}
        return
    finally:
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.stdout.close()
            process.wait()
    if files:
        yield key, files


def image_and_text(files, where, text="txt"):
    """The image bytes and the `text` entry (a caption, a .cls label), decoded and stripped, of a
    read_tar sample. SkippedSample 'corrupt' where the shard broke off, 'missing' without either."""
    if "error" in files:
        raise SkippedSample("corrupt", where, files["error"])
    image = next((files[k] for k in WDS_IMAGE_KEYS if k in files), None)
    if image is None:
        raise SkippedSample("missing", where, f"no image among {sorted(files)}")
    if text not in files:
        raise SkippedSample("missing", where, f"no .{text}")
    return image, files[text].decode("utf-8", errors="replace").strip()


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
    tokens, skipped, (worker, epoch, (group, n)), shard): the position is where a resumed stream
    continues once this sample is consumed, the shard its source (data.Manifest).
    `start` maps worker -> such a position (worker -1: every worker; (epoch, 0): the epoch's start).

    Resampled (`epoch_samples` given; OpenCLIP's --dataset-resampled): each group is `interleave`
    shards drawn with replacement from all the shards by a random.Random of (seed, epoch, rank,
    worker, group), and a worker's epoch ends after epoch_samples / (world_size x workers) samples,
    so epochs have any length and need not divide into shards. Positions are (group, n, samples
    of the epoch so far); augmentation is drawn from the draw as well, so that a shard drawn twice is
    cropped anew.
    """

    def __init__(self, shards, image_size=224, seed=0, rank=0, world_size=1, start=None, shuffle_buffer=5000,
                 interleave=8, patience=10000, first_batch=0, epoch_samples=None):
        self.shards, self.seed, self.rank, self.world_size = list(shards), seed, rank, world_size
        self.start, self.first_batch = dict(start or {}), first_batch
        self.shuffle_buffer, self.interleave, self.patience = shuffle_buffer, interleave, patience
        self.image_size, self.transform = image_size, PixelTransform(image_size, train=True)
        self.epoch_samples = epoch_samples

    def draw(self, epoch, worker, group):
        """Resampled: the shards of a worker's group, drawn with replacement, and the Random that mixes them."""
        rng = random.Random(f"msclip-wds-resampled/{self.seed}/{epoch}/{self.rank}/{worker}/{group}")
        return [self.shards[rng.randrange(len(self.shards))] for _ in range(self.interleave)], rng

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

    def decode(self, turn, shard, key, files):
        """(uint8 image, tokens) of a raw sample; `turn` (the epoch, or a resampled draw) seeds the crop."""
        where = f"{shard}:{key}"
        image, caption = image_and_text(files, where)
        caption = clean_caption(caption, where)
        rng = random.Random(f"msclip-wds-aug/{self.seed}/{turn}/{where}")
        return self.transform.read(image, where, rng), msclip.tokenize(caption)[0]

    def start_of(self, worker):
        """(epoch, group, n, samples of the epoch so far) to begin at. A worker without a saved
        position (more workers than when saved, or another number of ranks) starts the oldest saved epoch."""
        if worker in self.start or -1 in self.start:
            epoch, place = self.start.get(worker, self.start.get(-1))
        else:
            epoch, place = (min(e for e, _ in self.start.values()), 0) if self.start else (0, 0)
        group, done, taken = (tuple(place) + (0,))[:3] if isinstance(place, (tuple, list)) else (0, 0, 0)
        return epoch, group, done, taken

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = ((info.id + self.first_batch) % info.num_workers, info.num_workers) if info else (0, 1)
        epoch, g, done, taken = self.start_of(worker)
        resampled = self.epoch_samples is not None
        quota = max(1, self.epoch_samples // (self.world_size * workers)) if resampled else None
        skipped, failures, failed_shards, shard_count = [], 0, set(), len(set(self.shards))

        def no_readable_shard():
            return RuntimeError(f"WebDataset: every one of the {len(failed_shards)} shards is empty or gave unreadable "
                                f"samples and none a readable one (e.g. {skipped[-2:]})")
        while True:
            if not resampled:
                mine = self.plan(epoch, worker, workers)
                if not mine:
                    return
                groups = [mine[i: i + self.interleave] for i in range(0, len(mine), self.interleave)]
            whole_epoch, readable = g == 0 and done == 0, False
            while taken < quota if resampled else g < len(groups):
                if resampled:
                    group, rng = self.draw(epoch, worker, g)
                    turn = f"{epoch}/{self.rank}/{worker}/{g}"
                else:
                    group, turn = groups[g], epoch
                    rng = random.Random(f"msclip-wds/{self.seed}/{epoch}/{'|'.join(group)}")
                n = -1
                for n, (shard, key, files) in enumerate(self.mix(group, rng)):
                    if n < done:  # consumed before the checkpoint this stream resumes
                        continue
                    try:
                        image, tokens = self.decode(turn, shard, key, files)
                    except SkippedSample as e:
                        skipped.append((e.reason, e.where))
                        failures += 1
                        failed_shards.add(shard)
                        if failures >= self.patience:
                            raise RuntimeError(f"WebDataset: {failures} samples in a row unreadable (e.g. "
                                               f"{skipped[-3:]}) in shards {', '.join(group)}: check the data")
                        if resampled and len(failed_shards) == shard_count:
                            raise no_readable_shard()
                        continue
                    failures, readable, taken = 0, True, taken + 1
                    failed_shards.clear()
                    yield image, tokens, skipped, (worker, epoch, (g, n + 1, taken) if resampled else (g, n + 1)), shard
                    skipped = []
                    if resampled and taken >= quota:
                        break
                if resampled and n < 0:  # only empty shards drawn (no sample at all): else this draws forever
                    failed_shards.update(group)
                    if len(failed_shards) == shard_count:
                        raise no_readable_shard()
                g, done = g + 1, 0
            if whole_epoch and not readable and not resampled:
                raise RuntimeError(f"WebDataset: no readable sample in epoch {epoch} of rank {self.rank} worker "
                                   f"{worker} ({len(skipped)} unreadable, e.g. {skipped[:2]}); its shards: "
                                   f"{', '.join(mine[:8])}{' ...' if len(mine) > 8 else ''}")
            epoch, g, taken = epoch + 1, 0, 0


# ----------------------------------------------------------------------------------------------
# Training: the batches of map-style data, the dataset of a --train_data, the DataLoader of one rank
# ----------------------------------------------------------------------------------------------

def epoch_batches(num_samples, batch, seed, epoch):
    """One epoch's global micro-batches, rows of dataset indices: a permutation drawn from (seed, epoch)
    only, cut into batches (the last partial one dropped). A numpy view of the permutation, 8 bytes
    per sample: as Python lists, 12M indices took ~0.5 GB per rank every epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).numpy()
    return order[: num_samples // batch * batch].reshape(-1, batch)


def map_style_batches(make_epoch, start, rank, micro):
    """This rank's slices of the global micro-batches make_epoch(epoch) lists, from micro-batch
    number `start` on, forever; keys are (epoch, index) so that augmentation follows the epoch."""
    epoch = 0
    while True:
        batches = make_epoch(epoch)
        if not len(batches):
            raise ValueError("the dataset holds less than one global micro-batch")
        for batch in batches[start:]:
            mine = batch[rank * micro: (rank + 1) * micro]
            yield [(epoch, i) for i in (mine.tolist() if isinstance(mine, np.ndarray) else mine)]
        start = max(0, start - len(batches))
        epoch += 1


def open_train_data(kind, source=None, image_size=224, seed=0, synthetic_samples=None, csv_separator="\t",
                    csv_img_key="filepath", csv_caption_key="title", shuffle_buffer=5000, interleave=8,
                    resampled_epoch=None):
    """The training dataset of one kind: 'synthetic' (shapes.SyntheticCaptions), 'csv' (CsvCaptions, which
    raises DataError for a file without the columns) or 'webdataset' (a ShardStream of the shards
    `source` names, resampled with epochs of `resampled_epoch` samples when given; train_loader
    places it on its rank). Map-style datasets have a len()."""
    if kind == "synthetic":
        return shapes.SyntheticCaptions("train", synthetic_samples or shapes.DEFAULT_SAMPLES, image_size, seed)
    if kind == "csv":
        return CsvCaptions(source, image_size, seed, csv_separator, csv_img_key, csv_caption_key)
    return ShardStream(expand_shards(source), image_size, seed, shuffle_buffer=shuffle_buffer, interleave=interleave,
                       epoch_samples=resampled_epoch)


MAX_DEFAULT_WORKERS = 16  # beyond this a rank's loader adds memory (buffers, batches in flight) more than data


def default_workers(cores, sharing, accelerator):
    """(DataLoader workers per rank, why) when --workers is not given: on an accelerator, this rank's
    part of the cores (`cores` shared by `sharing` ranks, distributed.node_cores), less one for the
    rank's own process, between 1 and MAX_DEFAULT_WORKERS. On CPU, 1: the rank's compute threads use
    its cores, and a CPU training step (0.25 pairs/s for msclip-s-b32 on 2 cores, docs/MEASUREMENTS.md)
    is far slower than one worker's decoding (hundreds of samples/s), so more workers only take
    cores from the model."""
    if not accelerator:
        return 1, "CPU training: the model's threads take the cores, one worker outpaces a CPU step"
    share = cores // max(1, sharing)
    workers = max(1, min(MAX_DEFAULT_WORKERS, share - 1))
    return workers, (f"{cores} cores / {sharing} rank(s) sharing them = {share} per rank, less 1 for the rank"
                     + (f", at most {MAX_DEFAULT_WORKERS}" if share - 1 > MAX_DEFAULT_WORKERS else ""))


def train_loader(dataset, micro, rank, world_size, workers, seed=0, start_micro_batch=0, stream_start=None,
                 groups=None, pin_memory=False, log=print):
    """This rank's TrainLoader of uint8 batches (images, tokens, skipped, stream positions), endless,
    recording what the training loop takes in its `manifest`.

    Map-style data: the global micro-batches of each epoch (epoch_batches, or shapes.minimal_pair_batches
    with `groups` = (shapes, colours)), this rank's slice, from micro-batch `start_micro_batch` on.
    WebDataset: the rank's share of the shards from `stream_start` (worker -> position) with the
    workers' turns continued from `start_micro_batch`, at most one DataLoader worker per shard of the
    rank unless resampled."""
    if isinstance(dataset, ShardStream):
        per_rank = len(dataset.shards) // world_size
        if workers > per_rank and dataset.epoch_samples is None:
            log(f"{len(dataset.shards)} shards over {world_size} ranks: {per_rank} DataLoader workers per rank")
            workers = max(1, per_rank)
        stream = ShardStream(dataset.shards, dataset.image_size, dataset.seed, rank, world_size,
                             stream_start, dataset.shuffle_buffer, dataset.interleave, dataset.patience,
                             start_micro_batch, dataset.epoch_samples)
        loader = TrainLoader(stream, batch_size=micro, num_workers=workers, collate_fn=collate,
                             pin_memory=pin_memory, prefetch_factor=4 if workers else None, persistent_workers=False)
    else:
        global_micro = micro * world_size
        if groups:
            make_epoch = lambda e: shapes.minimal_pair_batches(len(dataset), global_micro, seed, e, *groups)  # noqa: E731
        else:
            make_epoch = lambda e: epoch_batches(len(dataset), global_micro, seed, e)  # noqa: E731
        batches = map_style_batches(make_epoch, start_micro_batch, rank, micro)
        loader = TrainLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                             pin_memory=pin_memory, prefetch_factor=4 if workers else None)
    loader.manifest, loader.source = Manifest(), getattr(dataset, "path", "built-in data")
    return loader

# ----------------------------------------------------------------------------------------------
# Evaluation datasets (eval.py): the layouts on disk and the held-out shapes
# ----------------------------------------------------------------------------------------------

SYNTHETIC = {"synthetic-shape": "shape", "synthetic-colour": "colour", "synthetic-color": "colour"}


@dataclass
class EvalDataset:
    """One evaluation dataset: where its splits are and what its classes are called. Its images
    (images()) are items (image tensor or None, meta); meta["error"] says why an image is None."""
    name: str
    kind: str                        # folder | csv | wds | synthetic
    path: str
    splits: dict                     # split -> records (folder, csv), shard paths (wds), shapes.SyntheticCaptions
    classnames: list = None          # entries may be lists of synonyms
    templates: list = None
    classnames_source: str = None
    templates_source: str = None
    label_names: list = None         # folder, csv: how the files name the classes that labels index
    label_mapping: str = None        # after set_classnames: "by name" or "by sorted folder order"
    wds_kind: str = "classification"  # CLIP_benchmark's dataset_type: classification | retrieval
    attribute: str = None            # synthetic: the label, "shape" or "colour"

    def split(self, split):
        """The split as stored: 'test' falls back to 'val' (folders) and 'heldout' (synthetic)."""
        for stored in [split] + {"test": ["val", "heldout"], "heldout": ["test"]}.get(split, []):
            if stored in self.splits:
                return stored
        raise DataError(f"dataset {self.name} has no split {split!r} (it has: {', '.join(self.splits) or 'none'})")

    def images(self, split, transform):
        """(the split as stored, a torch dataset of its (image, meta) items, a fingerprint of its content)."""
        stored = self.split(split)
        source = self.splits[stored]
        if self.kind == "wds":
            fingerprint = [(str(s.resolve()), s.stat().st_size, s.stat().st_mtime_ns) for s in source] + [self.wds_kind]
            return stored, BenchmarkShards([str(s) for s in source], transform, self.wds_kind), fingerprint
        if self.kind == "synthetic":
            fingerprint = [stored, len(source), source.image_size, source.seed]
            return stored, SyntheticImages(source, self.attribute, transform), fingerprint
        fingerprint = [(r["path"], r.get("label"), r.get("captions")) for r in source]
        return stored, ImageFiles(source, transform), fingerprint

    def set_classnames(self, classnames, source):
        """Classify into `classnames`: folder and CSV labels become indices of them by name when every
        label names exactly one class (map_label_names); otherwise folders map by sorted order
        (torchvision's ImageFolder convention: ImageNet's wnid folders), CSV labels are an error."""
        if self.label_names:
            mapping, self.label_mapping = map_label_names(self.label_names, classnames), "by name"
            if None in mapping and self.kind == "csv":
                bad = self.label_names[mapping.index(None)]
                where = next(r["where"] for rs in self.splits.values() for r in rs if r.get("raw_label") == bad)
                raise DataError(f"label {bad!r} ({where}) is not in the class names or names several "
                                f"({len(classnames)} classes: {', '.join(synonyms(c)[0] for c in classnames[:5])}, ...); "
                                "use class indices instead")
            if None in mapping:
                if len(self.label_names) != len(classnames):
                    raise DataError(f"{self.path} has {len(self.label_names)} class folders but there are "
                                    f"{len(classnames)} class names; folders whose names are not class names "
                                    "map by sorted order")
                mapping, self.label_mapping = list(range(len(classnames))), "by sorted folder order"
            for records in self.splits.values():
                for r in records:
                    if "label" in r:
                        r["label"] = mapping[r["label"]]
        self.classnames, self.classnames_source = list(classnames), source


def name_key(name):
    """A class or dataset name compared ignoring case and punctuation: Food-101 = food101."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def synonyms(entry):
    """The names of a class: an entry of a class-name list is a name or a list of synonyms."""
    return [entry] if isinstance(entry, str) else list(entry)


def map_label_names(label_names, classnames):
    """The index in `classnames` of each label name ('_' read as a space, name_key, any synonym);
    None where it names no class or several."""
    index = {}
    for i, entry in enumerate(classnames):
        for name in synonyms(entry):
            index.setdefault(name_key(name), set()).add(i)
    found = [index.get(name_key(name.replace("_", " ")), set()) for name in label_names]
    return [next(iter(f)) if len(f) == 1 else None for f in found]


class ImageFiles(torch.utils.data.Dataset):
    """Images read from files: records are dicts with "path" and "label" and/or "captions"."""

    def __init__(self, records, transform):
        self.records, self.transform = records, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        meta = {"id": record["path"], "label": record.get("label"), "captions": record.get("captions")}
        try:
            return self.transform(read_image(record["path"], meta["id"])), meta
        except SkippedSample as e:
            return None, {**meta, "error": e.detail}


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
            for key, files in read_tar(shard):
                yield self.decode(f"{os.path.basename(shard)}:{key}", files)

    def decode(self, where, files):
        meta = {"id": where, "label": None, "captions": None}
        try:
            image, text = image_and_text(files, where, "txt" if self.kind == "retrieval" else "cls")
            if self.kind == "retrieval":
                meta["captions"] = [line.strip() for line in text.splitlines() if line.strip()]
            elif re.fullmatch(r"-?\d+", text):
                meta["label"] = int(text)
            else:
                raise SkippedSample("corrupt", where, f".cls is not an integer: {text[:20]!r}")
            return self.transform(read_image(image, where)), meta
        except SkippedSample as e:
            return None, {**meta, "error": e.detail}


class SyntheticImages(torch.utils.data.Dataset):
    """shapes.SyntheticCaptions rendered through an eval transform; label = shape or colour."""

    def __init__(self, renders, attribute, transform):
        self.renders, self.attribute, self.transform = renders, attribute, transform

    def __len__(self):
        return len(self.renders)

    def __getitem__(self, index):
        image, caption, shape, colour = self.renders.render(index)
        label = shape if self.attribute == "shape" else colour
        return self.transform(image), {"id": str(index), "label": label, "captions": [caption]}


def open_dataset(spec, name=None, eval_samples=None, image_size=64):
    """The EvalDataset of an eval.py --dataset: a synthetic-* name, a CSV/TSV file, or a folder
    holding CLIP_benchmark shards ({split}/nshards.txt), train.csv / test.csv ..., or class folders."""
    if spec in SYNTHETIC:
        return open_synthetic(spec, eval_samples, image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"dataset {spec!r} does not exist (and is not one of {', '.join(SYNTHETIC)})")
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".tsv"):
            raise DataError(f"{path}: a dataset file must be .csv or .tsv")
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
    raise DataError(f"{path}: no dataset layout found (expected train/ test/ val/ class folders, "
                    "{split}/nshards.txt shards, or train.csv / test.csv)")


def open_folder(root, folders, name):
    """Image folders: {split}/{class}/image. Classes are the sorted sub-folder names; every split must
    have the same ones, each holding at least one image file."""
    label_names, splits = None, {}
    for split, folder in folders.items():
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{folder} has no class sub-folders")
        if label_names is not None and classes != label_names:
            diff = sorted(set(classes) ^ set(label_names))
            raise DataError(f"the class folders of {folder} differ from the other splits' ({', '.join(diff[:5])})")
        label_names, splits[split] = classes, []
        for label, cls in enumerate(classes):
            files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise DataError(f"class folder {folder / cls} holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
                                "remove it or add images")
            splits[split] += [{"path": str(f), "label": label} for f in files]
    return EvalDataset(name, "folder", str(root), splits, classnames=[c.replace("_", " ") for c in label_names],
                       classnames_source="folder names", label_names=label_names)


def open_csv(root, files, name):
    """CSV/TSV splits (read_csv). Rows repeating an image add captions to it (retrieval); labels are
    class indices, or class names (label_names: sorted, until set_classnames maps them)."""
    splits, labels = {}, []
    for split, path in files.items():
        by_path = {}
        for line, image, caption, label in read_csv(path):
            where = f"{path.name}, line {line}"
            record = by_path.setdefault(image, {"path": image, "where": where})
            if label is not None:
                if record.get("raw_label", label) != label:
                    raise DataError(f"{path}, line {line}: {image} is listed with two labels, "
                                    f"{record['raw_label']!r} ({record['where']}) and {label!r}")
                record["raw_label"], record["where"] = label, where
                labels.append(label)
            if caption is not None:
                record.setdefault("captions", []).append(caption)
        splits[split] = list(by_path.values())
    integer = bool(labels) and all(re.fullmatch(r"-?\d+", label) for label in labels)
    label_names = None if integer or not labels else sorted(set(labels))
    index = {name: i for i, name in enumerate(label_names or [])}
    for records in splits.values():
        for r in records:
            if "raw_label" in r:
                r["label"] = int(r["raw_label"]) if integer else index[r["raw_label"]]
    return EvalDataset(name, "csv", str(root), splits, classnames=label_names,
                       classnames_source="CSV labels" if label_names else None, label_names=label_names)


def open_wds(root, folders, name):
    """CLIP_benchmark's export: {split}/nshards.txt and {split}/0.tar ..., with classnames.txt,
    zeroshot_classification_templates.txt and dataset_type.txt (classification, retrieval) beside."""
    splits = {}
    for split, folder in folders.items():
        try:
            n = int((folder / "nshards.txt").read_text().strip())
        except ValueError as e:
            raise DataError(f"{folder / 'nshards.txt'} does not hold a number") from e
        splits[split] = [folder / f"{i}.tar" for i in range(n)]
        missing = [s for s in splits[split] if not s.is_file()]
        if missing:
            raise DataError(f"{folder / 'nshards.txt'} says {n} shards but {missing[0]} is missing")

    def lines(file):
        path = root / file
        if not path.is_file():
            return None
        found = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        if not found:  # rather than a silent fall-back (ImageNet's templates, no class names)
            raise DataError(f"{path} is empty: fill it, or remove it to use the defaults")
        return found

    kind = (lines("dataset_type.txt") or ["classification"])[0].lower()
    if kind not in ("classification", "retrieval"):
        raise DataError(f"{root}: dataset_type {kind!r} is not supported (classification or retrieval)")
    classnames, templates = lines("classnames.txt"), lines("zeroshot_classification_templates.txt")
    return EvalDataset(name, "wds", str(root), splits, classnames=classnames, templates=templates,
                       classnames_source="classnames.txt" if classnames else None,
                       templates_source="zeroshot_classification_templates.txt" if templates else None, wds_kind=kind)


def open_synthetic(spec, eval_samples=None, image_size=64):
    """The held-out evaluation of the built-in data: eval_samples (shapes.EVAL_SAMPLES) renders of
    shapes.py's "heldout" split, labelled by shape or colour, and as many of "train" for a linear probe.
    Seed 0 always: every training run, whatever its --seed, is measured on the same images."""
    attribute = SYNTHETIC[spec]
    classnames, templates = shapes.heldout_prompts()[attribute]
    length = eval_samples or shapes.EVAL_SAMPLES
    splits = {split: shapes.SyntheticCaptions(split, length, image_size, seed=0) for split in ("heldout", "train")}
    return EvalDataset(spec, "synthetic", spec, splits, classnames=classnames, templates=templates,
                       classnames_source="shapes.heldout_prompts()", templates_source="shapes.heldout_prompts()",
                       attribute=attribute)
