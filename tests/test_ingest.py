"""clip_jax.data.ingest and `python -m clip_jax.ingest`: every format, every kind of broken row,
the repairs, worker-count independence, sharding, and the command line."""
import io
import itertools
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import ingest, ingest_rows, prompts, records
from clip_jax.data import images
from tests.helpers import build_tfds_dataset, deadline, encode_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = object()   # in a corpus: make a folder under this image name


# ----------------------------------------------------------------------------- images

def gradient(width, height):
    """A smooth RGB test image (JPEG keeps it within a few levels)."""
    x = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    return np.stack([x, y, np.full((height, width), 128.0)], -1).round().astype(np.uint8)


def resized(array, size):
    return np.asarray(Image.fromarray(array).resize(size, Image.BICUBIC))


def bomb(width=40000, height=40000):
    """A tiny PNG whose header claims width x height pixels (IHDR patched, CRC fixed)."""
    data = bytearray(encode_image(Image.new("RGB", (40, 40), "red"), "PNG"))
    data[16:24] = struct.pack(">II", width, height)                  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of type + data
    return bytes(data)


def good_images():
    """name -> (file bytes, the RGB pixels the record should hold, conversion counted)."""
    images = {}
    small = gradient(64, 48)
    images["small.jpg"] = encode_image(Image.fromarray(small), "JPEG", quality=95), small, None
    shape = gradient(100, 80)
    shape[20:60, 30:70] = (250, 40, 40)
    images["shape.png"] = encode_image(Image.fromarray(shape), "PNG"), shape, None
    wide = gradient(400, 300)     # short side 300 > 256: stored as 341 x 256
    images["wide.jpg"] = (encode_image(Image.fromarray(wide), "JPEG", quality=95),
                          resized(wide, (341, 256)), None)
    tall = gradient(270, 520)     # stored as 256 x 493
    images["tall.png"] = encode_image(Image.fromarray(tall), "PNG"), resized(tall, (256, 493)), None
    black = np.full((60, 80, 1), 30, np.uint8)
    cmyk = Image.fromarray(np.concatenate([gradient(80, 60), black], -1), "CMYK")
    images["cmyk.jpg"] = encode_image(cmyk, "JPEG", quality=95), np.asarray(cmyk.convert("RGB")), "cmyk"
    levels = gradient(72, 56)[..., 0]
    deep = Image.fromarray(levels.astype(np.uint16) * 257)      # 16-bit, up to 65535
    assert deep.mode == "I;16"
    grey_rgb = np.repeat(levels[..., None], 3, -1)
    images["gray16.png"] = encode_image(deep, "PNG"), grey_rgb, "16bit"       # scaled, not clipped
    images["gray8.png"] = encode_image(Image.fromarray(levels), "PNG"), grey_rgb, "grayscale"
    images["palette.png"] = palette_image(transparent=False) + ("palette",)
    images["palette_trns.png"] = palette_image(transparent=True) + ("alpha",)
    rgb, alpha = gradient(90, 70), np.linspace(0, 255, 70).round()[:, None, None]
    alpha_channel = np.broadcast_to(alpha, (70, 90, 1)).astype(np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha_channel], -1), "RGBA")
    on_white = (rgb * alpha / 255 + 255 * (1 - alpha / 255)).round().astype(np.uint8)
    images["rgba.png"] = encode_image(rgba, "PNG"), on_white, "alpha"
    return images


def palette_image(transparent):
    """A 64 x 64 palette PNG: left half colour 0 (transparent or red), right half blue."""
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (32, 0, 64, 64))
    expected = np.zeros((64, 64, 3), np.uint8)
    expected[:, :32] = (255, 255, 255) if transparent else (255, 0, 0)
    expected[:, 32:] = (0, 0, 255)
    options = {"transparency": 0} if transparent else {}
    return encode_image(img, "PNG", **options), expected


def bad_images():
    """name -> (file bytes, None for no file, or FOLDER; the reason it is skipped)."""
    jpeg = encode_image(Image.fromarray(gradient(200, 200)), "JPEG", quality=95)   # half: mid-scan
    return {
        "missing.jpg": (None, "missing_file"),
        "empty.jpg": (b"", "empty_file"),
        "truncated.jpg": (jpeg[:len(jpeg) // 2], "corrupt_image"),
        "text.jpg": (b"this is not an image\n", "not_an_image"),
        "tiny.png": (encode_image(Image.fromarray(gradient(8, 8)), "PNG"), "too_small"),
        "bomb.png": (bomb(), "too_large"),
        "folder.jpg": (FOLDER, "not_a_file"),
    }


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if data is FOLDER:
        os.makedirs(path)
    elif data is not None:
        with open(path, "wb") as f:
            f.write(data)


def assert_pixels(record, expected, tolerance=4.0):
    got = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"), np.float64)
    assert got.shape == expected.shape, record["key"]
    diff = np.abs(got - expected).mean()
    assert diff < tolerance, (record["key"], diff)


def read_back(out):
    source = records.IngestedSource(out)
    return source.manifest, [source[i] for i in range(len(source))]


def skipped_log(out):
    with open(os.path.join(out, records.SKIPPED_LOG)) as f:
        return [json.loads(line) for line in f]


def run(format, source, out, **options):
    return ingest.run(format, source, str(out), workers=options.pop("workers", 0), **options)


def assert_counts(manifest, skipped, repaired):
    assert manifest["skipped"] == skipped
    assert manifest["repaired"] == repaired
    assert manifest["num_records"] + sum(manifest["skipped"].values()) == manifest["rows"]


# ----------------------------------------------------------------------------- csv

LONG_CAPTION = " ".join(f"word{i}" for i in range(3000))


def write_csv_corpus(root):
    """data.csv + images/: every good and broken kind. Returns (csv path, expected rows)
    where each expected row is (key, stripped caption, meta group, pixels or skip reason)."""
    good, bad = good_images(), bad_images()
    for name, (data, _, _) in good.items():
        write_file(os.path.join(root, "images", name), data)
    for name, (data, _) in bad.items():
        write_file(os.path.join(root, "images", name), data)
    absolute = os.path.join(root, "images", "small.jpg")
    lines, expected = [], []

    def add(path, caption, group, outcome):
        lines.append(b",".join([path.encode(), caption, group.encode()]))
        expected.append((path, caption.decode("utf-8", "replace").strip(), group, outcome))

    for name, (_, pixels, _) in good.items():
        add(f"images/{name}", f"  a picture called {name}\t ".encode(), "good", pixels)
    add("images/small.jpg", LONG_CAPTION.encode(), "long", good["small.jpg"][1])
    add("images/shape.png", b"caf\xe9 au lait", "utf8", good["shape.png"][1])
    add(absolute, b"absolute", "abs", good["small.jpg"][1])
    for name, (_, reason) in bad.items():
        add(f"images/{name}", b"a broken one", "bad", reason)
    add("images/small.jpg", b"", "empty", "empty_caption")
    add("images/small.jpg", b" \t ", "blank", "empty_caption")
    for line, reason in ((b",no path,none", "missing_file"),
                         (b"images/small.jpg,too few fields", "bad_row")):
        lines.append(line)
        expected.append((f"data.csv, line {len(lines) + 1}", "", "", reason))
    path = os.path.join(root, "data.csv")
    with open(path, "wb") as f:
        f.write(b"filepath,caption,group\n" + b"\n".join(lines) + b"\n")
    return path, expected


def test_csv_every_kind_of_row(tmp_path):
    csv_path, expected = write_csv_corpus(tmp_path / "corpus")
    manifest = run("csv", csv_path, tmp_path / "out")
    assert_counts(manifest, skipped={
        "missing_file": 2, "empty_file": 1, "corrupt_image": 1, "not_an_image": 1,
        "too_small": 1, "too_large": 1, "not_a_file": 1, "empty_caption": 2, "bad_row": 1,
    }, repaired={"cmyk": 1, "16bit": 1, "grayscale": 1, "palette": 1, "alpha": 2,
                 "invalid_utf8": 1})
    assert manifest["rows"] == len(expected) == 24
    assert manifest["source"]["format"] == "csv" and manifest["max_size"] == 256

    kept = [row for row in expected if not isinstance(row[3], str)]
    manifest, got = read_back(tmp_path / "out")
    assert [r["key"] for r in got] == [key for key, *_ in kept]     # input-row order
    for record, (key, caption, group, pixels) in zip(got, kept):
        assert record["caption"] == caption
        assert record["meta"] == {"group": group}
        assert "label" not in record
        assert min(Image.open(io.BytesIO(record["image"])).size) <= 256
        assert_pixels(record, pixels)
    assert got[10]["caption"] == LONG_CAPTION                       # kept verbatim
    assert got[11]["caption"] == "caf\ufffd au lait"                # and the rows after survive

    log = skipped_log(tmp_path / "out")
    skipped_rows = [(i, row) for i, row in enumerate(expected) if isinstance(row[3], str)]
    assert [(entry["row"], entry["reason"]) for entry in log] == \
        [(i, row[3]) for i, row in skipped_rows]
    for entry, (_, (source, *_)) in zip(log, skipped_rows):
        assert entry["source"] == os.path.join(tmp_path, "corpus", source)
    assert log[-2]["detail"] == "empty image path" and "2 fields" in log[-1]["detail"]


def test_csv_output_is_independent_of_workers_and_splits_into_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_rows, "CHUNK_ROWS", 3)      # 8 chunks in flight on 2 workers
    csv_path, _ = write_csv_corpus(tmp_path / "corpus")
    outputs = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"out{workers}"
        manifest = run("csv", csv_path, out, workers=workers, records_per_shard=4)
        outputs[workers] = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
    assert [s["num_records"] for s in manifest["shards"]] == [4, 4, 4, 1]
    assert sorted(outputs[0]) == ["data-00000.array_record", "data-00001.array_record",
                                  "data-00002.array_record", "data-00003.array_record",
                                  "manifest.json", "skipped.jsonl"]
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]
    _, got = read_back(tmp_path / "out2")
    assert len(got) == 13 and got[0]["key"] == "images/small.jpg"


def test_csv_options_and_refusals(tmp_path):
    image = tmp_path / "pics" / "a.png"
    write_file(str(image), encode_image(Image.fromarray(gradient(50, 40)), "PNG"))
    tsv = tmp_path / "list.tsv"
    tsv.write_text("text\tfile\tsplit\na, b, and c\tpics/a.png\tval\n", encoding="utf-8")
    with pytest.raises(ingest.OptionError, match=r"'filepath'.*'text', 'file', 'split'"):
        run("csv", str(tsv), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = run("csv", str(tsv), tmp_path / "out", image_column="file", caption_column="text")
    _, got = read_back(tmp_path / "out")
    assert got[0]["caption"] == "a, b, and c" and got[0]["meta"] == {"split": "val"}
    assert manifest["source"]["delimiter"] == "\t"
    with pytest.raises(ingest.OptionError, match="--overwrite"):
        run("csv", str(tsv), tmp_path / "out", image_column="file", caption_column="text")
    with pytest.raises(ingest.OptionError, match="--max-size"):
        run("csv", str(tsv), tmp_path / "other", max_size=0)
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- captions

def test_captions_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_rows, "CHUNK_ROWS", 2)
    root = tmp_path / "tree"
    good = good_images()
    files = {
        "b.png": good["shape.png"][0], "b.txt": b"  a red square \n",
        "c.jpg": good["small.jpg"][0],                                   # no sidecar
        "d.txt": b"an orphan caption",                                   # no image
        "e.png": b"", "e.txt": b"empty file",
        "notes.md": b"not a row",
        "sub/A.JPG": good["cmyk.jpg"][0], "sub/A.txt": b"caf\xe9 noir",
        "sub/deeper/w.jpg": good["wide.jpg"][0], "sub/deeper/w.txt": b"wide",
        "sub/x.png": good["rgba.png"][0], "sub/x.txt": b" \n ",
        "locked/q.jpg": good["small.jpg"][0], "locked/q.txt": b"unlisted",
    }
    for name, data in files.items():
        write_file(os.path.join(root, name), data)
    locked, scandir = str(root / "locked"), os.scandir

    def refusing_scandir(path="."):   # as root, chmod cannot make a folder unreadable
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    manifest = run("captions", str(root), tmp_path / "out", workers=2)
    assert manifest["rows"] == 8
    assert_counts(manifest, skipped={"missing_caption": 1, "missing_image": 1, "empty_file": 1,
                                     "unreadable_file": 1, "empty_caption": 1},
                  repaired={"cmyk": 1, "invalid_utf8": 1})
    _, got = read_back(tmp_path / "out")
    assert [(r["key"], r["caption"]) for r in got] == [
        ("b.png", "a red square"), ("sub/A.JPG", "caf\ufffd noir"), ("sub/deeper/w.jpg", "wide")]
    for record, name in zip(got, ("shape.png", "cmyk.jpg", "wide.jpg")):
        assert_pixels(record, good[name][1])
    assert [(e["row"], e["reason"], os.path.relpath(e["source"], root))
            for e in skipped_log(tmp_path / "out")] == [
        (1, "missing_caption", "c.jpg"), (2, "missing_image", "d.txt"),
        (3, "empty_file", "e.png"), (4, "unreadable_file", "locked"),
        (6, "empty_caption", "sub/x.png")]   # a folder's files before its sub-folders


# ----------------------------------------------------------------------------- imagefolder

def test_imagefolder_labels_and_templates(tmp_path):
    root = tmp_path / "classes"
    good = good_images()
    files = {"golden_retriever/x.png": good["shape.png"][0],
             "golden_retriever/sub/y.jpg": good["wide.jpg"][0],
             "golden_retriever/bad.jpg": b"not an image",
             "golden_retriever/notes.txt": b"not a row",
             "tabby_cat/z.jpg": good["small.jpg"][0],
             "readme.txt": b"not a class"}
    for name, data in files.items():
        write_file(os.path.join(root, name), data)
    os.makedirs(root / "zebra")                                  # a class with no images
    manifest = run("imagefolder", str(root), tmp_path / "out")
    assert manifest["classes"] == ["golden_retriever", "tabby_cat", "zebra"]
    assert manifest["classnames"] == ["golden retriever", "tabby cat", "zebra"]
    assert_counts(manifest, skipped={"not_an_image": 1}, repaired={})
    _, got = read_back(tmp_path / "out")
    assert [(r["key"], r["label"]) for r in got] == [
        ("golden_retriever/x.png", 0), ("golden_retriever/sub/y.jpg", 0), ("tabby_cat/z.jpg", 1)]
    templates = prompts.DEFAULT_TEMPLATES
    for record in got:
        classname = manifest["classnames"][record["label"]]
        template = templates[zlib.crc32(record["key"].encode()) % len(templates)]
        assert record["caption"] == template.format(classname)
    assert len({r["caption"].replace("tabby cat", "golden retriever") for r in got}) > 1
    assert_pixels(got[1], good["wide.jpg"][1])

    (tmp_path / "t.txt").write_text("\nthis is {}\n\n  art of the {}.  \n")
    manifest = run("imagefolder", str(root), tmp_path / "out2", templates=str(tmp_path / "t.txt"))
    assert manifest["source"]["templates"] == ["this is {}", "art of the {}."]
    _, got = read_back(tmp_path / "out2")
    assert {r["caption"] for r in got} <= {
        "this is golden retriever", "art of the golden retriever.",
        "this is tabby cat", "art of the tabby cat."}


def test_load_templates_errors_name_file_and_line(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\nno placeholder here\n")
    with pytest.raises(ValueError, match=r"templates.txt, line 3: .*no '\{\}'"):
        prompts.load_templates(str(path))
    path.write_text("a {} with a { brace\n")
    with pytest.raises(ValueError, match="line 1"):
        prompts.load_templates(str(path))
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no templates"):
        prompts.load_templates(str(path))
    path.write_text("bad\n")
    os.makedirs(tmp_path / "some_class")
    with pytest.raises(ingest.OptionError, match="line 1"):
        run("imagefolder", str(tmp_path), tmp_path / "out", templates=str(path))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- wds

def tar_bytes(members, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_wds_corpus(tmp_path):
    """Three shards (plain, gzipped, truncated mid-sample) with broken samples; returns the
    patterns that name them (overlapping, so each shard is matched twice)."""
    good = good_images()
    small, shape, wide = good["small.jpg"][0], good["shape.png"][0], good["wide.jpg"][0]
    (tmp_path / "shards-00000.tar").write_bytes(tar_bytes([
        ("s0.jpg", small), ("s0.txt", b" first "),
        ("s1.png", shape), ("s1.json", b"{}"), ("s1.txt", b"caf\xe9"),
        ("s2.txt", b"caption only"),
        ("s3.jpg", small),
        ("dir/s4.seg.png", shape), ("dir/s4.jpg", wide), ("dir/s4.txt", b"in a folder"),
    ]))
    (tmp_path / "shards-00001.tar.gz").write_bytes(tar_bytes([
        ("t0.webp", encode_image(Image.fromarray(good["shape.png"][1]), "WEBP", lossless=True)),
        ("t0.txt", b"webp"), ("t1.JPG", small), ("t1.TXT", b"upper case"),
    ], mode="w:gz"))
    last = ("u2.jpg", wide)
    whole = tar_bytes([("u0.jpg", small), ("u0.txt", b"kept 1"), ("u1.jpg", shape),
                       ("u1.txt", b"kept 2"), last, ("u2.txt", b"lost")])
    cut = whole.index(wide) + len(wide) // 2
    (tmp_path / "shards-00002.tar").write_bytes(whole[:cut])
    return [str(tmp_path / "shards-{00000..00002}.tar*"), str(tmp_path / "*.tar")]


def test_wds_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "CHUNK_BYTES", 1)      # one sample per chunk
    good = good_images()
    patterns = write_wds_corpus(tmp_path)
    manifest = run("wds", patterns, tmp_path / "out", workers=2)
    assert manifest["source"]["files"] == [str(tmp_path / f"shards-0000{i}.tar{ext}")
                                           for i, ext in ((0, ""), (1, ".gz"), (2, ""))]
    assert manifest["rows"] == 10
    assert_counts(manifest, skipped={"missing_image": 1, "missing_caption": 1,
                                     "corrupt_archive": 1}, repaired={"invalid_utf8": 1})
    _, got = read_back(tmp_path / "out")
    assert [(r["key"], r["caption"]) for r in got] == [
        ("shards-00000.tar/s0", "first"), ("shards-00000.tar/s1", "caf\ufffd"),
        ("shards-00000.tar/dir/s4", "in a folder"), ("shards-00001.tar.gz/t0", "webp"),
        ("shards-00001.tar.gz/t1", "upper case"), ("shards-00002.tar/u0", "kept 1"),
        ("shards-00002.tar/u1", "kept 2")]
    for record, name in zip(got, ("small.jpg", "shape.png", "wide.jpg", "shape.png", "small.jpg",
                                  "small.jpg", "shape.png")):
        assert_pixels(record, good[name][1])
    log = skipped_log(tmp_path / "out")
    assert [(e["row"], e["reason"]) for e in log] == [
        (2, "missing_image"), (3, "missing_caption"), (9, "corrupt_archive")]
    assert log[0]["source"].endswith("shards-00000.tar:s2")
    assert str(tmp_path / "shards-00002.tar") in log[2]["detail"]


def test_fifos_devices_and_huge_files_are_skipped_unread(tmp_path):
    """A FIFO blocked the ingest forever, /dev/zero filled its memory, a 1 GB sparse file was
    read whole: now each is skipped with its reason, and nothing is opened or read."""
    small = good_images()["small.jpg"][0]
    root = tmp_path / "csv"
    write_file(str(root / "good.jpg"), small)
    os.mkfifo(root / "fifo.jpg")
    with open(root / "huge.png", "wb") as f:       # sparse: costs no disk
        f.truncate(images.DEFAULT_MAX_BYTES + 1)
    os.symlink("/dev/zero", root / "zero.jpg")
    (root / "data.csv").write_text("filepath,caption\nfifo.jpg,a fifo\n/dev/zero,zeros\n"
                                   "huge.png,huge\nzero.jpg,linked\ngood.jpg,good\n")
    folder = tmp_path / "captions"
    write_file(str(folder / "good.jpg"), small)
    (folder / "good.txt").write_text("good")
    os.mkfifo(folder / "fifo.jpg")                 # an image that is a FIFO
    (folder / "fifo.txt").write_text("fifo")
    write_file(str(folder / "pipe.jpg"), small)
    os.mkfifo(folder / "pipe.txt")                 # a caption sidecar that is one
    write_file(str(folder / "zero.jpg"), small)
    os.symlink("/dev/zero", folder / "zero.txt")
    (tmp_path / "shard.tar").write_bytes(tar_bytes([
        ("a.jpg", small), ("a.txt", b"kept"), ("b.jpg", small + bytes(4000)), ("b.txt", b"big"),
        ("c.jpg", small), ("c.txt", b"long " * 1000)]))
    with deadline(60):
        manifest = run("csv", str(root / "data.csv"), tmp_path / "out-csv")
        assert_counts(manifest, skipped={"not_a_file": 3, "file_too_large": 1}, repaired={})
        assert [(e["reason"], e["detail"]) for e in skipped_log(tmp_path / "out-csv")] == [
            ("not_a_file", "a FIFO (named pipe)"), ("not_a_file", "a character device"),
            ("file_too_large", f"{images.DEFAULT_MAX_BYTES + 1} bytes > max_bytes="
                               f"{images.DEFAULT_MAX_BYTES}"),
            ("not_a_file", "a character device")]
        assert manifest["max_bytes"] == images.DEFAULT_MAX_BYTES

        manifest = run("captions", str(folder), tmp_path / "out-captions", workers=1)
        assert_counts(manifest, skipped={"not_a_file": 3}, repaired={})
        assert [(e["source"].rsplit("/", 1)[1], e["detail"])
                for e in skipped_log(tmp_path / "out-captions")] == [
            ("fifo.jpg", "a FIFO (named pipe)"), ("pipe.jpg", "pipe.txt: a FIFO (named pipe)"),
            ("zero.jpg", "zero.txt: a character device")]

        manifest = run("wds", [str(tmp_path / "shard.tar")], tmp_path / "out-wds",
                       max_bytes=len(small) + 1000)
    assert_counts(manifest, skipped={"file_too_large": 2}, repaired={})
    assert [e["detail"] for e in skipped_log(tmp_path / "out-wds")] == [
        f"member b.jpg: {len(small) + 4000} bytes > max_bytes={len(small) + 1000}",
        f"member c.txt: 5000 bytes > max_bytes={len(small) + 1000}"]
    os.mkfifo(tmp_path / "piped.csv")              # read twice: a pipe would lose rows
    with deadline(60), pytest.raises(ingest.OptionError, match="piped.csv.*not a regular file"):
        run("csv", str(tmp_path / "piped.csv"), tmp_path / "out-pipe")


def test_read_file_reads_no_more_than_the_limit_of_a_file_that_grew(tmp_path, monkeypatch):
    path = tmp_path / "growing.jpg"
    path.write_bytes(bytes(5000))
    assert images.read_file(str(path), 5000) == bytes(5000)
    real_fstat = os.fstat

    def fstat_before_it_grew(fd):     # the size when stat ran; 5000 bytes by the read
        return os.stat_result(real_fstat(fd)[:6] + (100,) + real_fstat(fd)[7:])

    monkeypatch.setattr(os, "fstat", fstat_before_it_grew)
    reads = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Spy(real_fdopen(fd, mode), reads))
    with pytest.raises(images.BadImage, match="file_too_large: more than max_bytes=1000 bytes "
                                              r"\(it grew while read\)"):
        images.read_file(str(path), 1000)
    assert reads == [1001]


class Spy:
    """A file object that records the sizes asked of read()."""

    def __init__(self, f, reads):
        self.f, self.reads = f, reads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def read(self, n=-1):
        self.reads.append(n)
        return self.f.read(n)


def test_wds_pattern_without_match_is_refused_before_work(tmp_path):
    (tmp_path / "a-0.tar").write_bytes(tar_bytes([]))
    with pytest.raises(ingest.OptionError, match=r"a-1.tar.*from .*a-\{0..1\}.tar"):
        run("wds", [str(tmp_path / "a-{0..1}.tar")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tfds

TFDS_NAME = "ingest_tiny_images"
TFDS_EXAMPLES = [   # (image, caption, label)
    (gradient(64, 48), b"  a small ramp ", 0),
    (gradient(300, 400), b"a big one", 1),
    (gradient(8, 8), b"tiny", 0),
    (gradient(70, 50), b"", 1),
    (gradient(60, 60), b"caf\xe9", -1),
    (gradient(80, 40), b"plain", 0),
]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS dataset in array_record format, built without TensorFlow."""
    examples = [(encode_image(Image.fromarray(image), "PNG"), caption, label)
                for image, caption, label in TFDS_EXAMPLES]
    return build_tfds_dataset(tmp_path_factory.mktemp("tfds"), TFDS_NAME,
                              ["golden_retriever", "tabby_cat"], examples)


def tfds_examples(data_dir):
    """Example i as stored (TFDS shuffles the generation order): (pixels, caption, label)."""
    import tensorflow_datasets as tfds
    source = tfds.data_source(TFDS_NAME, split="train", data_dir=data_dir)
    examples = (source[i] for i in range(len(source)))
    return [(ex["image"], ex["caption"], ex["label"]) for ex in examples]


def stored_pixels(image):
    return resized(image, (256, 341)) if min(image.shape[:2]) > 256 else image


def test_tfds_captions(tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_rows, "CHUNK_ROWS", 2)
    manifest = run("tfds", f"{TFDS_NAME}:1.0.0", tmp_path / "out", data_dir=tfds_dir, workers=2)
    assert manifest["rows"] == 6 and "classes" not in manifest
    assert_counts(manifest, skipped={"too_small": 1, "empty_caption": 1},
                  repaired={"invalid_utf8": 1})
    examples = tfds_examples(tfds_dir)
    _, got = read_back(tmp_path / "out")
    for record in got:
        image, caption, _ = examples[int(record["key"].split("/")[1])]
        assert record["caption"] == caption.decode("utf-8", "replace").strip()
        assert "label" not in record
        assert_pixels(record, stored_pixels(image))
    assert sorted(r["caption"] for r in got) == ["a big one", "a small ramp", "caf\ufffd", "plain"]
    indices = [int(r["key"].split("/")[1]) for r in got]
    assert indices == sorted(indices)                                # example order


def test_tfds_labels(tfds_dir, tmp_path):
    manifest = run("tfds", TFDS_NAME, tmp_path / "out", data_dir=tfds_dir, label_key="label")
    assert manifest["classes"] == ["golden_retriever", "tabby_cat"]
    assert manifest["classnames"] == ["golden retriever", "tabby cat"]
    assert_counts(manifest, skipped={"too_small": 1, "missing_label": 1}, repaired={})
    examples = tfds_examples(tfds_dir)
    _, got = read_back(tmp_path / "out")
    assert len(got) == 4
    templates = prompts.DEFAULT_TEMPLATES
    for record in got:
        image, _, label = examples[int(record["key"].split("/")[1])]
        assert record["label"] == label
        template = templates[zlib.crc32(record["key"].encode()) % len(templates)]
        assert record["caption"] == template.format(manifest["classnames"][label])
        assert_pixels(record, stored_pixels(image))
    with pytest.raises(ingest.OptionError, match="no feature 'caption ' .*caption, image, label"):
        run("tfds", TFDS_NAME, tmp_path / "o", data_dir=tfds_dir, caption_key="caption ")
    with pytest.raises(ingest.OptionError, match="expected a tfds.features.ClassLabel"):
        run("tfds", TFDS_NAME, tmp_path / "o", data_dir=tfds_dir, label_key="caption")


def test_tfds_split_comes_from_the_data_spec_grammar(tfds_dir, tmp_path):
    """Without --split the command line reads the grammar's default split, train (as a
    training source tfds:NAME does); a split written into SOURCE is refused, naming it."""
    from clip_jax import ingest as ingest_cli
    common = ["--data-dir", tfds_dir, "--workers", "0", "--no-progress", "--min-size", "1"]
    ingest_cli.main(["tfds", TFDS_NAME, "--out", str(tmp_path / "a"), *common])
    manifest = records.read_manifest(str(tmp_path / "a"))
    assert manifest["source"]["split"] == "train" and manifest["rows"] == 6
    ingest_cli.main(["tfds", TFDS_NAME, "--split", "train[:2]", "--out", str(tmp_path / "b"), *common])
    assert records.read_manifest(str(tmp_path / "b"))["rows"] == 2
    with pytest.raises(SystemExit) as stopped:
        ingest_cli.main(["tfds", f"{TFDS_NAME}:train", "--out", str(tmp_path / "c"), *common])
    assert stopped.value.code.startswith(f"error: SOURCE '{TFDS_NAME}:train': expected NAME or NAME:VERSION")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- bounding

def test_in_flight_work_is_bounded():
    pulled = itertools.count()

    def chunks():   # endless input; counts how many chunks the pool asked for
        for i in range(10_000):
            next(pulled)
            yield [ingest.Row(f"row {i}", skip=("bad_row", "test"), index=i)]

    settings = ingest.Settings(256, 32, 10**8, 95)
    results = ingest._processed(chunks(), settings, workers=1)
    first = next(results)
    assert first[0].index == 0 and first[0].skip == ("bad_row", "test")
    assert next(pulled) <= ingest.CHUNKS_PER_WORKER + 1
    results.close()


# ----------------------------------------------------------------------------- command line

def cli(*args):
    return subprocess.run([sys.executable, "-m", "clip_jax.ingest", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    csv_path, _ = write_csv_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    proc = cli("csv", csv_path, "--out", str(out), "--workers", "2", "--records-per-shard", "5")
    assert proc.returncode == 0, proc.stderr
    assert "13 records from 24 rows in 3 shards; skipped 11 (bad_row 1," in proc.stdout
    assert f"manifest: {out / 'manifest.json'}" in proc.stdout
    assert records.read_manifest(str(out))["num_records"] == 13

    proc = cli("csv", csv_path, "--out", str(out))                   # existing output
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "--overwrite" in proc.stderr
    (out / "data-00009.array_record").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    proc = cli("csv", csv_path, "--out", str(out), "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["data-00000.array_record", "manifest.json", "notes.txt",
                                       "skipped.jsonl"]

    proc = cli("csv", csv_path, "--out", str(tmp_path / "new"), "--caption-column", "text")
    assert proc.returncode != 0
    assert "'text'" in proc.stderr and "'filepath', 'caption', 'group'" in proc.stderr
    assert not (tmp_path / "new").exists()

    proc = cli("csv", "--help")
    for option in ("--image-column", "--caption-column", "--delimiter", "--max-size",
                   "--min-size", "--max-pixels", "--max-bytes", "--quality", "--records-per-shard",
                   "--workers", "--overwrite", "--no-progress"):
        assert option in proc.stdout
