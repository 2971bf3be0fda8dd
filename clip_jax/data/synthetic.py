"""The embedded procedural dataset: coloured shapes on plain backgrounds, with captions.

Nothing is downloaded. Every example is a pure function of `(seed, split, index)`:
a per-index `numpy` Generator draws the attributes (shape, colour, size, position,
background, caption phrasing) and small jitters; the image is rasterised with numpy
masks at pixel centres (hard edges, no antialiasing), so it is bit-for-bit
reproducible anywhere.

Some (shape, colour) combinations (`HELDOUT`, 8 of the 48) never occur in the
'train' split; the 'heldout' split draws only those. Every shape and every colour
still appears in training with other partners, so a model can learn each
attribute separately and `zeroshot_tasks()` can test whether it composes them.
"""
import re

import numpy as np

from clip_jax import cli

SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")

# Colour names a caption would use -> RGB. Saturated / bright, far from every background.
_COLOR_RGB = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 90, 255),
    "yellow": (245, 225, 30),
    "purple": (160, 60, 220),
    "orange": (255, 140, 0),
    "cyan": (0, 220, 230),
    "white": (245, 245, 245),
}
COLORS = tuple(_COLOR_RGB)

SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
# Dark / neutral backgrounds, each far (in RGB) from every shape colour.
_BACKGROUND_RGB = {"black": (0, 0, 0), "gray": (80, 80, 80), "brown": (90, 55, 25)}
BACKGROUNDS = tuple(_BACKGROUND_RGB)

# (shape, colour) pairs never seen in training: each colour once, shapes at most twice.
HELDOUT = (
    ("circle", "blue"), ("square", "orange"), ("triangle", "white"), ("cross", "red"),
    ("star", "cyan"), ("diamond", "yellow"), ("circle", "purple"), ("triangle", "green"),
)
_HELDOUT_IDS = tuple((SHAPES.index(s), COLORS.index(c)) for s, c in HELDOUT)
_TRAIN_IDS = tuple((s, c) for s in range(len(SHAPES)) for c in range(len(COLORS))
                   if (s, c) not in _HELDOUT_IDS)

_POSITION_PHRASE = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}

# Caption grammar. Every phrasing names the shape and the colour; others are optional.
CAPTION_TEMPLATES = (
    "a photo of a {color} {shape}.",
    "a photo of a {size} {color} {shape}.",
    "a {size} {color} {shape} on a {bg} background.",
    "there is a {color} {shape} {pos}.",
    "{color} {shape}, {size}, on {bg}.",
    "a {shape} that is {color}.",
    "a {shape}, colored {color}, {pos}.",
    "the shape is a {shape} and the color is {color}.",
    "shape: {shape}, color: {color}, size: {size}.",
    "an image of a {size} {color} {shape} {pos} on a {bg} background.",
    "there is a {color} {shape} in the image.",
    "a {color} {shape}.",
    "a {size} {shape} colored {color} on {bg}.",
    "a photo of something {color}: a {shape}.",
    "something colored {color}, shaped like a {shape}, {pos}.",
)

# Zero-shot prompts, phrased like the grammar (the colour slot never follows "a").
SHAPE_TEMPLATES = ("a photo of a {}.", "there is a {} in the image.", "the shape is a {}.",
                   "shape: {}.", "something shaped like a {}.")
COLOR_TEMPLATES = ("a photo of something {}.", "something colored {}.", "a shape that is {}.",
                   "the color is {}.", "color: {}.")

_SPLIT_TAG = {"train": 0, "heldout": 1}
_RADIUS = {"small": 0.19, "large": 0.31}   # fraction of the image size


def _article(text):
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _rng(seed, split, index):
    return np.random.default_rng(np.random.SeedSequence(
        [_SPLIT_TAG[split], int(seed) % 2**63, int(index)]))


def attributes(index, seed=0, split="train"):
    """Attributes of example `index` (ints into the name tuples), its caption and jitters.

    One vector of uniforms from the per-index Generator decides everything.
    """
    if split not in _SPLIT_TAG:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if index < 0:
        raise IndexError(f"index must be >= 0, got {index}")
    u = _rng(seed, split, index).random(14)
    pick = lambda k, n: min(int(u[k] * n), n - 1)
    if split == "train":
        shape, color = _TRAIN_IDS[pick(0, len(_TRAIN_IDS))]
    else:   # balanced over the held-out combinations
        shape, color = _HELDOUT_IDS[index % len(_HELDOUT_IDS)]
    size, position = pick(1, len(SIZES)), pick(2, len(POSITIONS))
    background, template = pick(3, len(BACKGROUNDS)), CAPTION_TEMPLATES[pick(4, len(CAPTION_TEMPLATES))]
    caption = _article(template.format(
        color=COLORS[color], shape=SHAPES[shape], size=SIZES[size],
        pos=_POSITION_PHRASE[POSITIONS[position]], bg=BACKGROUNDS[background]))
    return dict(shape=shape, color=color, size=size, position=position,
                background=background, caption=caption,
                scale=0.92 + 0.16 * u[5],                       # radius x [0.92, 1.08)
                jitter=(u[6:8] - 0.5) * 0.06,                   # centre +-3% of the image
                color_jitter=np.floor(u[8:11] * 31).astype(np.int64) - 15,   # +-15 per channel
                bg_jitter=np.floor(u[11:14] * 17).astype(np.int64) - 8)     # +-8


_STAR_OUTER, _STAR_INNER = 1.12, 0.48


def shape_mask(name, image_size, cx, cy, r):
    """Boolean [S, S] mask of shape `name` centred at (cx, cy) pixels, radius r (hard edges).

    Tested at pixel centres; every shape's extent stays within 1.12 r of the centre.
    """
    c = np.arange(image_size, dtype=np.float64) + 0.5
    x, y = (c[None, :] - cx) / r, (c[:, None] - cy) / r     # y grows downwards
    ax, ay = np.abs(x), np.abs(y)
    if name == "circle":
        return x * x + y * y <= 1.0
    if name == "square":
        return (ax <= 0.85) & (ay <= 0.85)
    if name == "diamond":
        return ax + ay <= 1.1
    if name == "triangle":   # apex up at y = -1.05, base at y = 0.75, half-width 1.05
        return (y <= 0.75) & (ax <= (y + 1.05) * (1.05 / 1.8))
    if name == "cross":
        return ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0))
    if name == "star":       # five points, one up; fold the angle into one half-spike
        y = y - 0.08
        rho = np.sqrt(x * x + y * y)
        phi = np.abs((np.arctan2(x, -y) + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)
        px, py = rho * np.cos(phi), rho * np.sin(phi)             # outer vertex on +px
        vx, vy = _STAR_INNER * np.cos(np.pi / 5), _STAR_INNER * np.sin(np.pi / 5)
        # inside iff on the origin side of the edge (OUTER, 0) -> (vx, vy)
        return (vx - _STAR_OUTER) * py - vy * (px - _STAR_OUTER) >= 0
    raise ValueError(f"unknown shape {name!r}")


def render(attrs, image_size):
    """uint8 [S, S, 3] image of the attributes from `attributes()`."""
    s = float(image_size)
    r = _RADIUS[SIZES[attrs["size"]]] * s * attrs["scale"]
    extent = 1.12 * r
    margin = extent + 0.04 * s
    cx = cy = s / 2
    pos = POSITIONS[attrs["position"]]
    if pos == "left":
        cx = margin
    elif pos == "right":
        cx = s - margin
    elif pos == "top":
        cy = margin
    elif pos == "bottom":
        cy = s - margin
    cx = min(max(cx + attrs["jitter"][0] * s, extent), s - extent)
    cy = min(max(cy + attrs["jitter"][1] * s, extent), s - extent)
    bg = np.clip(np.array(_BACKGROUND_RGB[BACKGROUNDS[attrs["background"]]]) + attrs["bg_jitter"], 0, 255)
    fg = np.clip(np.array(_COLOR_RGB[COLORS[attrs["color"]]]) + attrs["color_jitter"], 0, 255)
    mask = shape_mask(SHAPES[attrs["shape"]], image_size, cx, cy, r)
    return np.where(mask[..., None], fg.astype(np.uint8), bg.astype(np.uint8))


def example(index, seed=0, image_size=32, split="train"):
    """dict(image=uint8 [S, S, 3], caption=str, shape=int, color=int) of example `index`."""
    a = attributes(index, seed, split)
    return dict(image=render(a, image_size), caption=a["caption"], shape=a["shape"], color=a["color"])


class SyntheticSource:
    """Grain-compatible random-access source (`len`, `[]`) of synthetic examples.

    `presized`: images are drawn at the model's size and used as they are (no crop).
    """

    presized = True

    def __init__(self, split="train", image_size=32, num_records=100_000, seed=0):
        if split not in _SPLIT_TAG:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.split, self.image_size, self.num_records, self.seed = split, int(image_size), int(num_records), int(seed)

    def __len__(self):
        return self.num_records

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range [0, {self.num_records})")
        return example(index, self.seed, self.image_size, self.split)

    def tokenizer_corpus(self, n):
        """Tokenizer training text: the first n training captions of seed 0 (whatever this
        source's seed), so the tokenizer is a property of the dataset, not of the run."""
        return caption_corpus(n, 0)

    def __repr__(self):
        return (f"SyntheticSource(split={self.split!r}, image_size={self.image_size}, "
                f"num_records={self.num_records}, seed={self.seed})")


def caption_corpus(n, seed=0):
    """The captions of the first n training examples (no images drawn): tokenizer training text."""
    return [attributes(i, seed, "train")["caption"] for i in range(n)]


def zeroshot_tasks():
    """{attribute: (classnames, templates)} for zero-shot classification of held-out images."""
    return {"shape": (list(SHAPES), list(SHAPE_TEMPLATES)),
            "color": (list(COLORS), list(COLOR_TEMPLATES))}


def export_imagefolder(out, n, split="heldout", seed=0, image_size=64, label="shape"):
    """Writes n examples as an ImageFolder, OUT/<label value>/<other attribute>/<i>.png
    (label 'shape': shape folders with colour sub-folders; 'color': the reverse), and
    OUT/captions.csv (filepath, caption, shape, color, size, position, background): data
    to try the evaluation and search commands on without a download."""
    import csv
    import os

    from PIL import Image
    if label not in ("shape", "color"):
        raise ValueError(f"label must be 'shape' or 'color', got {label!r}")
    os.makedirs(out, exist_ok=True)
    names = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS,
             "background": BACKGROUNDS}
    other = "color" if label == "shape" else "shape"
    with open(os.path.join(out, "captions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption", *names])
        for i in range(n):
            a = attributes(i, seed, split)
            values = {k: names[k][a[k]] for k in names}
            path = f"{values[label]}/{values[other]}/{i:05d}.png"
            os.makedirs(os.path.join(out, os.path.dirname(path)), exist_ok=True)
            Image.fromarray(render(a, image_size)).save(os.path.join(out, path))
            writer.writerow([path, a["caption"], *values.values()])
    return out


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m clip_jax.data.synthetic",
                                description=export_imagefolder.__doc__)
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--n", type=int, default=512, help="how many images (default 512)")
    p.add_argument("--split", choices=("train", "heldout"), default="heldout",
                   help="train: the training combinations; heldout: the 8 shape/colour pairs "
                        "never seen in training (default)")
    p.add_argument("--seed", type=int, default=0, help="the data seed (a run's config.seed; default 0)")
    p.add_argument("--image-size", type=int, default=64, help="pixels per side (default 64)")
    p.add_argument("--label", choices=("shape", "color"), default="shape",
                   help="the class folders: shape (default) or color")
    args = p.parse_args(argv)
    with cli.stop_on(OSError):
        export_imagefolder(args.out, args.n, args.split, args.seed, args.image_size, args.label)
    print(f"wrote {args.n} images to {args.out}/<{args.label}>/... and {args.out}/captions.csv")


if __name__ == "__main__":
    main()
