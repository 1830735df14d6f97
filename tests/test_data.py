"""Tests of shapes.py (the built-in data) and data.py, the one image-text pipeline of train_ds.py and
eval.py: CSV rows (one reader for training and evaluation), the WebDataset training stream
(cross-shard shuffling, exactly-once epochs over ranks and workers, exact resume, bad shards),
uint8 transport against msclip.ImageTransform's float path, high-bit-depth images, and the
tokenizer's bounded caches. In-process, no DeepSpeed."""
import io
import itertools
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
import msclip
import shapes
from conftest import encoded_image, write_csv, write_shards, write_tar


def test_synthetic_contract():
    assert len(shapes.SHAPES) >= 6 and len(shapes.COLOURS) >= 8
    train = shapes.SyntheticCaptions("train", length=128, image_size=64, seed=0)
    image, caption, shape, colour = train.render(77)
    assert isinstance(image, Image.Image) and isinstance(caption, str) and caption
    assert shapes.SHAPES[shape] in caption or any(w in caption for w in shapes.SHAPE_WORDS[shapes.SHAPES[shape]])
    again = shapes.SyntheticCaptions("train", length=128, image_size=64, seed=0).render(77)
    assert again[1:] == (caption, shape, colour) and again[0].tobytes() == image.tobytes()
    other = shapes.SyntheticCaptions("heldout", length=128, image_size=64, seed=0).render(77)
    assert other[0].tobytes() != image.tobytes() and other[2:] == (shape, colour)  # new render, same classes
    assert train.labels(77) == (shape, colour)
    x, tokens = train[77]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert tokens.shape == (77,) and tokens.dtype == torch.long
    assert torch.equal(tokens, msclip.tokenize(caption)[0])
    assert torch.equal(train[(3, 77)][0], train[(3, 77)][0]) and not torch.equal(train[(3, 77)][0], train[(4, 77)][0])
    assert len(shapes.SyntheticCaptions()) == shapes.DEFAULT_SAMPLES == len(data.open_train_data("synthetic"))


def test_synthetic_variety():
    train = shapes.SyntheticCaptions("train", seed=0)
    renders = [train.render(i * 65) for i in range(640)]  # 640 variants, every (shape, colour)
    captions = {r[1] for r in renders}
    assert len(captions) > 400
    assert {(r[2], r[3]) for r in renders} == {(s, c) for s in range(len(shapes.SHAPES)) for c in range(len(shapes.COLOURS))}
    words = " ".join(captions).split()
    for word in ("two", "three", "small", "large", "background", "scarlet", "disc", "painted", "near"):
        assert word in words or any(word in c for c in captions), word


def test_heldout_prompt_wording_not_in_training_captions():
    prompts = shapes.heldout_prompts()
    assert prompts["shape"][0] == shapes.SHAPES and prompts["colour"][0] == shapes.COLOURS
    train = shapes.SyntheticCaptions("train", seed=0)
    vocabulary = {w.strip(",:") for i in range(4000) for w in train.render(i * 17)[1].split()}
    function_words = {"a", "an", "the", "of", "in", "on", "with"}
    for names, templates in prompts.values():
        for template in templates:
            assert "{}" in template
            words = {w.strip(".,") for w in template.replace("{}", " ").split()} - function_words
            assert words and not words & vocabulary, (template, words & vocabulary)


def test_heldout_evaluation_set_is_fixed():
    """eval.py's synthetic-shape / synthetic-colour: the same renders of the held-out split in every
    run (no training seed reaches them), --eval-samples of them, labelled by shape / colour."""
    transform = msclip.ImageTransform(64)
    sets = [data.open_dataset(name, eval_samples=24, image_size=64) for name in ("synthetic-shape", "synthetic-colour")]
    renders = shapes.SyntheticCaptions("heldout", length=24, image_size=64, seed=0)
    for column, dataset in enumerate(sets):
        split, images, _ = dataset.images("test", transform)
        assert split == "heldout" and len(images) == 24
        assert dataset.classnames == shapes.heldout_prompts()[dataset.attribute][0]
        for i in (0, 5, 23):
            image, meta = images[i]
            assert torch.equal(image, transform(renders.render(i)[0])) and meta["label"] == renders.labels(i)[column]
    assert len(data.open_dataset("synthetic-shape").images("test", transform)[1]) == shapes.EVAL_SAMPLES


def test_epoch_batches():
    batches = data.epoch_batches(640, 32, 0, 0)
    assert len(batches) == 20 and sorted(batches.flatten().tolist()) == list(range(640))
    assert (batches == data.epoch_batches(640, 32, 0, 0)).all() and (batches != data.epoch_batches(640, 32, 0, 1)).any()
    assert data.epoch_batches(650, 32, 0, 0).shape == (20, 32)  # the last partial batch dropped


def test_minimal_pair_batches():
    """Groups of 4 shapes x 2 colours of one variant: same layout and wording, only shape/colour differ."""
    train = shapes.SyntheticCaptions("train", length=640)
    batches = shapes.minimal_pair_batches(640, 32, 0, 0, 4, 2)
    assert len(batches) == 20 and sorted(i for b in batches for i in b) == list(range(640))
    assert batches == shapes.minimal_pair_batches(640, 32, 0, 0, 4, 2) != shapes.minimal_pair_batches(640, 32, 0, 1, 4, 2)
    for batch in batches:
        for g in range(0, 32, 8):
            group = batch[g: g + 8]
            assert len({i // 64 for i in group}) == 1
            labels = [train.labels(i) for i in group]
            assert len({s for s, _ in labels}) == 4 and len({c for _, c in labels}) == 2 and len(set(labels)) == 8
            renders = [train.render(i) for i in group]
            varying = {w for words in list(shapes.SHAPE_WORDS.values()) + list(shapes.COLOUR_WORDS.values())
                       for phrase in words for w in phrase.split() + shapes.plural(phrase).split()}
            strip = lambda r: [{"an": "a"}.get(w, w) for w in r[1].split() if w.strip(",:") not in varying]  # noqa: E731
            assert len({tuple(strip(r)) for r in renders}) == 1, [r[1] for r in renders]


def test_map_style_batches_rank_slices_and_resume():
    make = lambda e: data.epoch_batches(640, 32, 0, e)  # noqa: E731
    batches = make(0)
    slices = [next(data.map_style_batches(make, 0, r, 16)) for r in range(2)]
    assert [i for _, i in slices[0] + slices[1]] == batches[0].tolist()  # rank slices: disjoint, complete, in order
    stream = data.map_style_batches(make, 0, 0, 32)
    expected = [next(stream) for _ in range(26)][-1]  # micro-batch 25 = epoch 1, batch 5
    assert next(data.map_style_batches(make, 25, 0, 32)) == expected and expected[0][0] == 1


def test_missing_shards_lists_each_folder_once(tmp_path, monkeypatch):
    """Start-up's check: one directory listing per folder, not a stat per shard; pipe: commands unchecked."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            (tmp_path / folder / f"{i}.tar").write_bytes(b"")
    listings, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: listings.append(path) or scandir(path))
    monkeypatch.setattr(os, "stat", None)  # any stat would fail
    shards = data.expand_shards(f"{tmp_path}/a/{{0..3}}.tar::{tmp_path}/b/{{0..2}}.tar::pipe:false")
    assert data.missing_shards(shards) == [f"{tmp_path}/a/3.tar"]
    assert sorted(listings) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_expand_shards():
    assert data.expand_shards("d/{008..011}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert data.expand_shards("a/{x,y}-{0..1}.tar::b.tar") == ["a/x-0.tar", "a/x-1.tar", "a/y-0.tar", "a/y-1.tar",
                                                              "b.tar"]


def test_csv_bad_rows_replaced(tmp_path):
    path = write_csv(tmp_path)
    rows = data.CsvCaptions(str(path), image_size=64, seed=0, separator="\t", img_key="filepath",
                          caption_key="caption")
    image, tokens, skipped = rows[(0, 5)]
    assert skipped == [("missing", str(tmp_path / "images" / "005.png"))]
    assert torch.equal(tokens, rows[(0, 6)][1])  # row 5 is replaced by row 6
    assert rows[(0, 21)][2][0][0] == "empty_caption" and rows[(0, 13)][2][0][0] == "corrupt"
    with pytest.raises(ValueError, match="no column 'title'.*csv_caption_key"):
        data.CsvCaptions(str(path), caption_key="title")


def test_one_csv_reader_for_training_and_evaluation(tmp_path):
    """The same file gives training (CsvCaptions, OpenCLIP's separator and column options) and
    evaluation (eval.py's CSV layout: separator and columns found from the header) the same rows,
    as Python's csv module reads them; the rules: a tab for .tsv or a tab in the first line, header
    names in any case, no known image column = no header, named columns must exist."""
    import csv
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(encoded_image(Image.new("RGB", (8, 8), (200, 30, 30)), "PNG"))
    rows = [["a.png", "a red square, small"], [str(tmp_path / "b.png"), "another square\tagain"]]  # relative, absolute
    for name, separator, header in (("tab.tsv", "\t", ["FilePath", "Title"]), ("comma.csv", ",", ["image", "caption"]),
                                    ("bare.csv", ",", None)):
        with open(tmp_path / name, "w", newline="", encoding="utf-8-sig") as f:
            csv.writer(f, delimiter=separator).writerows(([header] if header else []) + rows)
        expected = [(str(tmp_path / image), caption) for image, caption in (("a.png", rows[0][1]), ("b.png", rows[1][1]))]
        found = [(path, caption) for _, path, caption, _ in data.read_csv(tmp_path / name)]
        assert found == expected, name
        evaluation = data.open_dataset(str(tmp_path / name))
        assert [(r["path"], r["captions"]) for r in evaluation.splits["test"]] == [(p, [c]) for p, c in expected]
        if header:
            training = data.CsvCaptions(str(tmp_path / name), 8, 0, separator, *header)
            assert [(os.path.join(training.root, p), c) for p, c in zip(training.paths, training.captions)] == expected
    with pytest.raises(data.DataError, match="no column 'title'"):
        data.read_csv(tmp_path / "comma.csv", ",", "image", "title")
    (tmp_path / "short.csv").write_text("filepath,label\na.png,0\nb.png\n")
    with pytest.raises(data.DataError, match="line 3"):  # rows are streamed: found when read
        list(data.read_csv(tmp_path / "short.csv"))


def test_csv_rows_packed_in_about_the_file_size(tmp_path):
    """CsvCaptions holds paths and captions as bytes + offsets (PackedStrings), not Python objects per
    row: what stays allocated after reading a 30,000-row TSV is within 1.25x the file's size (1.14x
    measured, 4-byte offsets of 68-byte rows included; Python lists of str took 2.9x), and rows read
    back as Python's csv module reads them."""
    import csv
    import tracemalloc
    rng = random.Random(0)
    words = "a photo of the red blue dog cat on beach at night with small large tree".split()
    rows = [[f"images/{i // 1000:05d}/{i:09d}.jpg", " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))]
            for i in range(30000)]
    rows[7][1] = "quoted, with a\ttab and a \"quote\""
    path = tmp_path / "cc.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([["filepath", "title"]] + rows)
    (tmp_path / rows[0][0]).parent.mkdir(parents=True)
    (tmp_path / rows[0][0]).write_bytes(b"")  # CsvCaptions refuses a file none of whose first images exists
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = data.CsvCaptions(str(path))
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert kept < 1.25 * path.stat().st_size, (kept, path.stat().st_size)
    assert table.paths.bytes.dtype == np.uint8 and table.paths.ends.dtype == np.uint32 and len(table) == 30000
    for i in (0, 7, 12345, 29999):
        assert (os.path.join(table.root, table.paths[i]), table.captions[i]) == (str(tmp_path / rows[i][0]), rows[i][1])


# ----------------------------------------------------------------------------------------------
# WebDataset training stream
# ----------------------------------------------------------------------------------------------

def write_tagged_shards(folder, shards=16, per_shard=64, side=8):
    """Tiny PNGs whose captions name their shard and sample: 'shard 3 sample 17'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        write_tar(folder / f"{s:05d}.tar", [
            [(f"{s:03d}{j:04d}.png", encoded_image(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "PNG")),
             (f"{s:03d}{j:04d}.txt", f"shard {s} sample {j}".encode())] for j in range(per_shard)])
    return [str(folder / f"{s:05d}.tar") for s in range(shards)]


def caption_of(tokens):
    """'shard 3 sample 17' back from token ids (the BPE splits numbers into digits: 'shard 3 sample 1 7')."""
    text = msclip.default_tokenizer().decode(tokens[1:(tokens == msclip.EOT).nonzero()[0, 0]])
    shard, sample = text.replace("shard", "").split("sample")
    return f"shard {int(shard.replace(' ', ''))} sample {int(sample.replace(' ', ''))}"


def shards_of(tokens):
    return {int(caption_of(t).split()[1]) for t in tokens}


def test_webdataset_batches_mix_shards(tmp_path):
    """16 shards of 64 samples, 2 DataLoader workers, default buffer and interleaving: every batch of
    64 draws from at least 8 shards (the old in-shard buffer gave batches from one or two)."""
    shards = write_tagged_shards(tmp_path)
    stream = data.open_train_data("webdataset", str(tmp_path / "{00000..00015}.tar"), image_size=8)
    loader = data.train_loader(stream, micro=64, rank=0, world_size=1, workers=2)
    batches = list(itertools.islice(loader, 16))  # one epoch
    assert all(len(shards_of(tokens)) >= 8 for _, tokens, _, _ in batches), [len(shards_of(b[1])) for b in batches]
    captions = [caption_of(t) for _, tokens, _, _ in batches for t in tokens]
    assert len(set(captions)) == len(captions) == len(shards) * 64


def test_webdataset_split_over_ranks_and_workers(tmp_path):
    """Each sample exactly once per epoch over 2 ranks x 2 workers; bad samples skipped and reported."""
    shards = data.expand_shards(write_shards(tmp_path / "shards", shards=4, per_shard=8, bad=True))
    assert len(shards) == 5

    def epoch0(rank, world, workers):
        stream = data.ShardStream(shards, image_size=64, seed=0, shuffle_buffer=4, interleave=2)
        loader = data.train_loader(stream, 4, rank, world, workers)
        seen, skipped = [], []
        for images, tokens, bad, positions in itertools.islice(loader, 40):
            assert images.shape[1:] == (3, 64, 64) and images.dtype == torch.uint8
            for j, (_, epoch, _) in enumerate(positions):
                if epoch == 0:
                    seen.append(hash(images[j].numpy().tobytes()) ^ hash(tuple(tokens[j][tokens[j] != 0].tolist())))
                    skipped += bad if j == 0 else []
        return seen, skipped

    whole, skipped = epoch0(0, 1, 0)
    assert len(set(whole)) == len(whole) >= 4 * 8 - 3  # the good samples, plus what the truncated shard holds
    split = [epoch0(rank, 2, 2) for rank in range(2)]
    parts = split[0][0] + split[1][0]
    assert sorted(parts) == sorted(whole)  # no sample twice, none lost
    reasons = sorted(r for r, _ in skipped)
    assert reasons.count("corrupt") == 2 and reasons.count("missing") == 1 and reasons.count("empty_caption") == 1


@pytest.mark.parametrize("workers, resampled", [(0, None), (2, None), (0, 20), (2, 20)])
def test_webdataset_resume_gives_the_same_stream(tmp_path, workers, resampled):
    """Stopped after k batches, a loader started from the saved positions (as the trainer saves them:
    the last consumed position of each worker) continues the uninterrupted stream exactly: inside a
    group of interleaved shards, at a group boundary, across an epoch boundary; shards read once per
    epoch, or resampled (epochs of 20 samples)."""
    write_tagged_shards(tmp_path, shards=8, per_shard=6)
    spec = str(tmp_path / "{00000..00007}.tar")
    stream = data.open_train_data("webdataset", spec, image_size=8, seed=5, shuffle_buffer=5, interleave=2,
                                  resampled_epoch=resampled)

    def batches(start_batch=0, start=None, count=30):
        loader = data.train_loader(stream, 4, 0, 1, workers, start_micro_batch=start_batch, stream_start=start)
        return list(itertools.islice(loader, count))

    whole = batches()
    assert {p[1] for b in whole for p in b[3]} >= {0, 1, 2}  # the stream crosses epochs
    for k in (1, 3, 6, 7, 12, 17):
        position = {}
        for _, _, _, positions in whole[:k]:
            position.update({worker: (epoch, place) for worker, epoch, place in positions})
        resumed = batches(k, position, 30 - k)
        assert [caption_of(t) for b in resumed for t in b[1]] == [caption_of(t) for b in whole[k:] for t in b[1]], k
        assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, whole[k:]))  # the same augmentation


def test_webdataset_start_of_another_layout(tmp_path):
    """A worker without a saved position (more workers, or another number of ranks, than when saved)
    starts the oldest saved epoch; (epoch, 0) is the epoch's start."""
    shards = write_tagged_shards(tmp_path, shards=4, per_shard=4)
    assert data.ShardStream(shards, start={0: (1, (2, 5))}).start_of(0) == (1, 2, 5, 0)
    assert data.ShardStream(shards, start={0: (1, (2, 5, 9))}).start_of(0) == (1, 2, 5, 9)  # resampled
    assert data.ShardStream(shards, start={0: (2, (0, 3)), 1: (1, (1, 0))}).start_of(3) == (1, 0, 0, 0)
    assert data.ShardStream(shards, start={-1: (1, 0)}).start_of(1) == (1, 0, 0, 0)
    first = next(iter(data.ShardStream(shards, image_size=8, start={-1: (1, 0)})))
    assert first[3][1] == 1


def test_webdataset_without_readable_samples_stops_with_the_shards_named(tmp_path):
    """One file that is not a tar (the stream used to hang); a long run of bad samples."""
    (tmp_path / "notatar.tar").write_bytes(b"this is not a tar file" * 100)
    stream = data.ShardStream([str(tmp_path / "notatar.tar")], image_size=8)
    with pytest.raises(RuntimeError, match="no readable sample.*notatar.tar"):
        next(iter(stream))
    shards = write_tagged_shards(tmp_path / "good", shards=2, per_shard=4)
    write_tar(tmp_path / "bad.tar", [[(f"{j:04d}.jpg", b"garbage")] for j in range(30)])
    stream = data.ShardStream([str(tmp_path / "bad.tar")] + shards, image_size=8, interleave=1, patience=20)
    with pytest.raises(RuntimeError, match="20 samples in a row unreadable.*bad.tar"):
        list(itertools.islice(stream, 100))


def test_one_sample_decoder_for_training_and_evaluation(tmp_path):
    """A shard sample the training stream cannot use, eval.py's CLIP_benchmark reader cannot either,
    and for the same reason (a corrupt image, no caption, a shard that breaks off); only an empty
    caption is fine to evaluate retrieval on and not to train on."""
    shards = data.expand_shards(write_shards(tmp_path, shards=4, per_shard=8, bad=True))
    training = data.ShardStream(shards, image_size=8)
    evaluation = data.BenchmarkShards(shards, msclip.ImageTransform(8), "retrieval")
    trained, evaluated = {}, {}
    for shard in shards:
        for key, files in data.read_tar(shard):
            where = f"{shard}:{key}"
            try:
                training.decode(0, shard, key, files)
                trained[where] = "ok"
            except data.SkippedSample as e:
                trained[where] = e.reason
            image, meta = evaluation.decode(where, files)
            evaluated[where] = "ok" if image is not None else meta["error"]
    bad = {where: reason for where, reason in trained.items() if reason != "ok"}
    assert sorted(bad.values()) == ["corrupt", "corrupt", "empty_caption", "missing"]
    assert {w for w, e in evaluated.items() if e != "ok"} == {w for w, r in bad.items() if r != "empty_caption"}
    assert evaluated[next(w for w, r in bad.items() if r == "missing")] == "no .txt"


# ----------------------------------------------------------------------------------------------
# Pixels: uint8 transport, normalisation in the training process, high bit depths
# ----------------------------------------------------------------------------------------------

def random_photo(rng, size):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).filter(__import__("PIL.ImageFilter").ImageFilter.SMOOTH)


@pytest.mark.parametrize("train", [True, False])
def test_uint8_transport_equals_the_float_transform(train):
    """normalize_images(PixelTransform(image)) == msclip.ImageTransform(image), bit for bit: the float
    path normalises the resized 8-bit pixels, so uint8 loses nothing; fp32 and bf16."""
    rng = np.random.default_rng(1)
    images = [random_photo(rng, (int(rng.integers(40, 120)), int(rng.integers(40, 120)))) for _ in range(6)]
    pixels = data.PixelTransform(64, train=train)
    reference = msclip.ImageTransform(64, train=train)
    uint8 = torch.stack([pixels(im, random.Random(i)) for i, im in enumerate(images)])
    floats = torch.stack([reference(im, random.Random(i)) for i, im in enumerate(images)])
    assert uint8.dtype == torch.uint8 and uint8.element_size() * 4 == floats.element_size()
    assert torch.equal(data.normalize_images(uint8), floats)
    assert torch.equal(data.normalize_images(uint8, dtype=torch.bfloat16), floats.to(torch.bfloat16))


def natural_photo(rng, width, height):
    """Colour noise with a 1/f amplitude spectrum, the spectrum of natural photographs (JPEG's DCT
    scaling drops the high frequencies, which such images hold in natural proportion)."""
    fx, fy = np.fft.fftfreq(width)[None, :], np.fft.fftfreq(height)[:, None]
    falloff = np.hypot(fx, fy)
    falloff[0, 0] = 1
    channels = [np.real(np.fft.ifft2((rng.normal(size=(height, width)) + 1j * rng.normal(size=(height, width))) / falloff))
                for _ in range(3)]
    pixels = np.stack([(c - c.mean()) / c.std() for c in channels], -1) * 40 + 128
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse) if mse else np.inf


def test_draft_decoded_training_crops(monkeypatch):
    """Training crops of JPEGs decode at a reduced DCT scale when the crop allows (1024 x 768 -> 1/2
    for a 224 px crop of >= 90% of the area): the same crop box (the same random draws) to the
    nearest whole pixel of the reduced image (each edge at most 1 px from the drawn one at full
    size: the granularity of the random draw itself), within 40 dB PSNR of the full decode of that
    box. Why 40 dB: a quality-90 JPEG of these images is itself 39.4 dB from its original at 224 px
    (measured), so the draft adds less error than the encoding the data came in. Where no reduced
    scale keeps 224 px (256 x 256), PNGs, and evaluation (the official transform): bit for bit the
    full decode."""
    from PIL import JpegImagePlugin
    drafts, draft = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or draft(self, mode, size))
    rng = np.random.default_rng(3)
    train, evaluation = data.PixelTransform(224, train=True), data.PixelTransform(224)
    for width, height, fmt, mode in ((1024, 768, "JPEG", "RGB"), (1024, 768, "JPEG", "L"), (256, 256, "JPEG", "RGB"),
                                     (1024, 768, "PNG", "RGB")):
        for i in range(4):
            encoded = encoded_image(natural_photo(rng, width, height).convert(mode), fmt,
                                    **({"quality": 90} if fmt == "JPEG" else {}))
            drafts.clear()
            draws, reference = random.Random(i), random.Random(i)
            fast = train.read(encoded, "x", draws).numpy()
            drawn = train.geometry._random_crop_box((width, height), random.Random(i))
            full = train(data.read_image(encoded, "x"), reference).numpy()
            assert draws.random() == reference.random()  # the crop box drawn as always
            if (width, fmt) == (1024, "JPEG"):
                snapped = tuple(2 * round(v / 2) for v in drawn)  # whole pixels of the half-size decode
                assert max(abs(a - b) for a, b in zip(snapped, drawn)) <= 1
                full = train(data.read_image(encoded, "x"), box=snapped).numpy()
                assert drafts == [(512, 384)] and psnr(fast, full) >= 40, (mode, psnr(fast, full))
            else:
                assert drafts == [] and np.array_equal(fast, full), (width, fmt)
            drafts.clear()
            official = msclip.ImageTransform(224).pixels(Image.open(io.BytesIO(encoded))).transpose(2, 0, 1)
            assert np.array_equal(evaluation.read(encoded, "x").numpy(), official) and drafts == []


def test_training_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    """A training item's random crop is drawn from (seed, epoch, index) only: a fresh dataset (a
    DataLoader worker's copy) gives it again, another epoch or seed another crop. The held-out split
    is not augmented: the eval transform of the render, in every epoch."""
    path = write_csv(tmp_path)
    for make in (lambda seed: shapes.SyntheticCaptions("train", length=128, image_size=64, seed=seed),
                 lambda seed: data.CsvCaptions(str(path), image_size=64, seed=seed, caption_key="caption")):
        item = make(4)[(1, 2)][0]
        assert torch.equal(make(4)[(1, 2)][0], item)
        assert not torch.equal(make(4)[(2, 2)][0], item) and not torch.equal(make(5)[(1, 2)][0], item)
    heldout = shapes.SyntheticCaptions("heldout", length=128, image_size=64)
    for epoch in (0, 3):
        expected = msclip.ImageTransform(64)(heldout.render(77)[0])
        assert torch.equal(data.normalize_images(heldout[(epoch, 77)][0][None])[0], expected)


def test_sixteen_bit_images_scale_to_eight_bits(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) becomes what a naive per-pixel round(v * 255 / 65535)
    gives; convert('RGB') alone made it almost white."""
    rng = np.random.default_rng(2)
    values = rng.integers(0, 65536, (20, 30)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(data.read_image(str(path), "deep.png"))
    naive = np.array([[round(int(v) * 255 / 65535) for v in row] for row in values], dtype=np.uint8)
    assert rgb.shape == (20, 30, 3) and all(np.array_equal(rgb[..., c], naive) for c in range(3))
    assert (rgb == 255).mean() < 0.05
    with pytest.raises(data.SkippedSample, match="corrupt"):
        data.read_image(b"\x89PNG garbage", "x")


# ----------------------------------------------------------------------------------------------
# Tokenizer caches: bounded, ids unchanged
# ----------------------------------------------------------------------------------------------

def test_tokenizer_caches_are_bounded_and_ids_unchanged():
    train = shapes.SyntheticCaptions("train", seed=0)
    captions = [train.render(i * 7)[1] for i in range(300)] + ["<|endoftext|> twice <|startoftext|>"]
    small = msclip.Tokenizer(word_cache_size=8, text_cache_size=4)
    uncached = msclip.Tokenizer(word_cache_size=1, text_cache_size=1)
    expected = torch.cat([msclip.tokenize(c) for c in captions])
    for _ in range(2):
        assert torch.equal(small(captions), expected) and torch.equal(uncached(captions), expected)
        assert len(small.word_cache) <= 8 and len(small.text_cache) <= 4
    again = pickle.loads(pickle.dumps(small))  # DataLoader workers get a copy
    assert again.word_cache.capacity == 8 and list(again.word_cache) == list(small.word_cache)
    assert torch.equal(again(captions), expected)


# ----------------------------------------------------------------------------------------------
# DataLoader workers by default: the rank's share of the node's cores
# ----------------------------------------------------------------------------------------------

def test_default_workers_from_the_node(monkeypatch):
    """An 8-GPU node: the rank's affinity split over the ranks that share it, less one for the rank,
    within 1..16; ranks pinned to their own cores (srun --cpus-per-task) share nothing; CPU training 1."""
    import distributed
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.node_cores() == (96, 8)
    assert data.default_workers(96, 8, True)[0] == 96 // 8 - 1
    assert data.default_workers(224, 8, True)[0] == 16 and "at most 16" in data.default_workers(224, 8, True)[1]
    assert data.default_workers(8, 8, True)[0] == 1 and data.default_workers(96, 8, False)[0] == 1
    # the gathered affinities: 8 ranks on this host and 8 on another, all on the same 96 cores (deepspeed)
    # or each pinned to 10 of its own (srun --cpus-per-task 10)
    host = __import__("socket").gethostname()
    for layout, mine, expected in (("shared", set(range(96)), (96, 8)), ("pinned", set(range(10, 20)), (10, 1))):
        everyone = [(h, list(range(96)) if layout == "shared" else list(range(10 * r, 10 * r + 10)))
                    for h in (host, "other-node") for r in range(8)]
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, mine=mine: mine)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: len(everyone))
        monkeypatch.setattr(torch.distributed, "all_gather_object",
                            lambda out, obj, group=None, everyone=everyone: out.__setitem__(slice(None), everyone))
        assert distributed.node_cores(group=object()) == expected, layout
    assert data.default_workers(10, 1, True)[0] == 9


def test_webdataset_resampled_draws_shards_with_replacement(tmp_path):
    """Resampled epochs: each worker yields epoch_samples / (ranks x workers) samples per epoch, from
    shards drawn with replacement (a shard's samples come twice within an epoch while others do not
    come at all: 8 shards, groups of 2, 60 samples per worker-epoch), differently per rank and epoch,
    the same for the same seed. Fewer shards than ranks x workers is fine."""
    write_tagged_shards(tmp_path, shards=8, per_shard=6)
    shards = [str(tmp_path / f"{s:05d}.tar") for s in range(8)]

    def epochs(rank, world=2, seed=0, count=120):
        stream = data.ShardStream(shards, image_size=8, seed=seed, rank=rank, world_size=world, shuffle_buffer=4,
                                  interleave=2, epoch_samples=240)
        loader = data.train_loader(stream, 4, rank, world, 2)
        out = {}
        for _, tokens, _, positions in itertools.islice(loader, count // 4):
            for t, (worker, epoch, place) in zip(tokens, positions):
                out.setdefault((epoch, worker), []).append(caption_of(t))
        return out

    first = epochs(0)
    assert sorted(first) == [(0, 0), (0, 1)] and all(len(v) == 60 for v in first.values())  # 240 / (2 x 2)
    captions = first[0, 0]
    assert len(set(captions)) < len(captions) or len({c.split()[1] for c in captions}) < 8  # drawn with replacement
    assert epochs(0) == first and epochs(1) != first and epochs(0, seed=1) != first
    loader = data.train_loader(data.ShardStream(shards[:1], image_size=8, interleave=2, epoch_samples=8), 4, 3, 4, 2)
    assert next(iter(loader))[0].shape == (4, 3, 8, 8)  # 1 shard, 4 ranks x 2 workers


def test_pipe_shards(tmp_path):
    """'pipe:cat FILE' gives the file's samples (read_tar: in the same order); a command that fails ('false', or a
    tar cut short by a non-zero exit) is an unreadable shard, skipped and counted as corrupt, and
    when no shard is readable the stream stops with the error naming them; a stream dropped midway
    kills its command."""
    shards = write_tagged_shards(tmp_path, shards=4, per_shard=5)
    piped = [f"pipe:cat {s}" for s in shards]
    assert data.expand_shards(f"pipe:cat {tmp_path}/{{00000..00003}}.tar") == piped
    assert [k for k, _ in data.read_tar(piped[2])] == [k for k, _ in data.read_tar(shards[2])]

    def captions(names, count=20, **options):
        stream = data.ShardStream(names, image_size=8, shuffle_buffer=3, interleave=2, **options)
        items = list(itertools.islice(stream, count))
        return [caption_of(item[1]) for item in items], [s for item in items for s in item[2]]

    assert sorted(captions(piped)[0]) == sorted(captions(shards)[0])  # the order follows the names: not compared
    good, skipped = captions(piped[:3] + ["pipe:false", f"pipe:cat {shards[3]}; exit 3"], count=30)
    # epoch 0: all but the sample being read when the command failed (it may lack members)
    assert sorted(good[:19]) == sorted(f"shard {s} sample {j}" for s in range(4) for j in range(5) if (s, j) != (3, 4))
    assert {where for _, where in skipped} == {"pipe:cat %s; exit 3:(unreadable)" % shards[3], "pipe:false:(unreadable)"}
    assert {reason for reason, _ in skipped} == {"corrupt"}
    with pytest.raises(RuntimeError, match="no readable sample.*pipe:false"):
        captions(["pipe:false", "pipe:exit 2"])
    with pytest.raises(RuntimeError, match="every one of the 2 shards"):
        captions(["pipe:false", "pipe:exit 2"], epoch_samples=10)
    # shards without a sample (an empty tar) end a resampled stream too, alone or beside unreadable ones
    empty = write_tar(tmp_path / "empty.tar", [])
    for names in ([empty], [empty, "pipe:false"]):
        with pytest.raises(RuntimeError, match=f"every one of the {len(names)} shards is empty or gave unreadable"):
            captions(names, epoch_samples=10)
    errors = [files["error"] for _, files in data.read_tar("pipe:false")]
    assert errors == ["pipe:false: exit status 1, ReadError: empty file"]
    reader = data.read_tar(f"pipe:cat {shards[0]}; sleep 31.7")
    next(reader)
    reader.close()
    for _ in range(50):  # the kill is synchronous; /proc may list the reaped process a moment longer
        running = [p for p in os.listdir("/proc") if p.isdigit() and "31.7" in _cmdline(p)]
        if not running:
            break
        __import__("time").sleep(0.1)
    assert not running


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""
