"""Writes a photo-like image corpus (JPEG files + captions.csv) for pipeline benchmarks.

The images: `clip_jax.benchmark.photos` (random crops of scikit-learn's two bundled
photographs, short side 256-512 px, JPEG quality 90).

    python benchmarks/photo_corpus.py --out /tmp/photos --n 4000
    python -m clip_jax.ingest csv /tmp/photos/captions.csv --out /tmp/photos_ingested
    python -m clip_jax.benchmark data --source=/tmp/photos_ingested --workers=0,1,2
"""
import argparse

from clip_jax.benchmark import photos


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (images/ and captions.csv)")
    parser.add_argument("--n", type=int, default=4000, help="number of images (default 4000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    captions = photos.make_corpus(args.out, args.n, args.seed)
    print(f"wrote {args.n} images and {captions}")


if __name__ == "__main__":
    main()
