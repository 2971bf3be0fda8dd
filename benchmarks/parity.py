"""Parity of converted full-size paper models with the reference (OpenCLIP's CLIP).

    pip install -e '.[parity]'
    python benchmarks/parity.py [--models RN50,ViT-B-32] [--json]

For each model: a randomly initialised OpenCLIP model with random LayerNorm/BatchNorm
weights and statistics (as tests/test_parity.py builds them), its state_dict saved and
converted with `clip_jax.convert`, then image embeddings, text embeddings and logits
compared on the same inputs (max |ours - reference| / max |reference|, float32, CPU) and
token ids checked identical. The test suite runs the same comparison on tiny models of
both kinds; this script is the full-size measurement quoted in README.md (it takes about
a minute per model on 2 CPU cores, too long for the suite's budget).
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAMES = {"RN50": "rn50", "RN101": "rn101", "RN50x4": "rn50x4", "ViT-B-32": "vit_b32", "ViT-B-16": "vit_b16"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="RN50,ViT-B-32",
                        help=f"comma-separated OpenCLIP model names (of {', '.join(NAMES)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    import torch
    import open_clip
    import clip_jax
    from clip_jax import convert
    from tests.test_parity import TOLERANCE, compare, randomize_norms
    results = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        reference = randomize_norms(open_clip.create_model(name, pretrained=None, force_quick_gelu=True))
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(reference.state_dict(), os.path.join(tmp, "model.pt"))
            report = convert.import_checkpoint(os.path.join(tmp, "model.pt"), os.path.join(tmp, "out"))
            errors = compare(reference, clip_jax.load(os.path.join(tmp, "out"), batch_size=8), batch=2)
        results[name] = {"architecture": report["architecture"], **errors,
                         "within_tolerance": max(errors.values()) <= TOLERANCE}
        print(f"{name:10s} image {errors['image']:.1e}  text {errors['text']:.1e}  "
              f"logits {errors['logits']:.1e}  ({report['architecture']})", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0 if all(r["within_tolerance"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
