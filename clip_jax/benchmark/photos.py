"""The one generated photo corpus of the benchmarks: JPEG files + captions.csv.

Nothing can be downloaded, so the images are random crops of the two real photographs
bundled with scikit-learn (`sklearn.datasets.load_sample_images`: a temple in China and a
flower, 427x640 each), flipped, colour-shifted and resized so the short side is 256-512 px,
saved as JPEG (quality 90). Their decode cost is that of real photos, which flat synthetic
drawings would understate. Used by the `evaluate` mode (its default images) and by
benchmarks/photo_corpus.py (a corpus to ingest for the `data` mode).
"""
import csv
import os

import numpy as np
from PIL import Image

WORDS = ("temple", "roof", "tree", "flower", "petal", "garden", "sky", "leaf", "stone", "red",
         "yellow", "green", "old", "bright", "close-up", "view", "photo", "picture")


def make_corpus(out, n, seed=0):
    """Writes OUT/images/NNNNNN.jpg and OUT/captions.csv (filepath,caption); returns the CSV's path."""
    # Imported here: importing scikit-learn sets environment variables (KMP_*), and importing
    # a clip_jax module changes nothing (tests/test_imports.py).
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    captions = os.path.join(out, "captions.csv")
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i in range(n):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw = int(rng.integers(w // 2, w + 1))
            ch = int(np.clip(cw * rng.uniform(0.75, 1.33), h // 2, h))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = photo.crop((left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            short = int(rng.integers(256, 513))
            scale = short / min(img.size)
            img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
            shift = rng.integers(-20, 21, 3)
            img = Image.fromarray(np.clip(np.asarray(img, np.int16) + shift, 0, 255).astype(np.uint8))
            name = f"images/{i:06d}.jpg"
            img.save(os.path.join(out, name), "JPEG", quality=90)
            writer.writerow([name, "a " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))])
    return captions
