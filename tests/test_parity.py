"""Parity with the reference implementation (OpenCLIP's `CLIP`, the OpenAI architecture).

Needs the `parity` extra (torch, torchvision, open_clip_torch; DEVELOPERS.md); CI installs
it. Reference models are randomly initialised, with every LayerNorm / BatchNorm weight,
bias and running statistic drawn at random (so a swapped or untransposed tensor cannot
hide behind an identity), saved as the reference saves them, converted with
`python -m clip_jax.convert`'s code path and compared on the same inputs: image and text
embeddings and logits within 1e-3 of the output scale (max |ours - ref| / max |ref|),
token ids identical.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
torch.set_num_threads(1)   # the suite runs two test workers on two cores: no oversubscription

import clip_jax  # noqa: E402
from clip_jax import checkpoint, config_lib, convert  # noqa: E402
from clip_jax.models import count_params  # noqa: E402
from tests.helpers import REPO, run_cli, tiny_flags, write_model_dir  # noqa: E402

TOLERANCE = 1e-3
TEXTS = ["a photo of a cat.", "A DOG, running!!", "", "   ", "emoji 🙂🐶 and café",
         "a very long caption " * 40]
TINY = {   # name: (vision_cfg, quick_gelu); text: width 128, 2 heads (= width / 64), 2 layers
    "vit": (dict(layers=2, width=128, patch_size=8, image_size=32), True),
    "resnet": (dict(layers=[1, 2, 1, 1], width=16, image_size=64), True),
    "vit_gelu": (dict(layers=2, width=128, patch_size=8, image_size=32), False),
}


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def tiny_reference(kind, seed=0):
    torch.manual_seed(seed)
    vision, quick = TINY[kind]
    model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, quick_gelu=quick,
                           text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
    return randomize_norms(model, seed)


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def compare(reference, converted, batch=3, seed=0):
    """{'image', 'text', 'logits'}: relative errors of ours against the reference."""
    size = converted.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ids = open_clip.tokenize(TEXTS, context_length=converted.context_length)
    assert np.array_equal(converted.tokenize(TEXTS), ids.numpy())
    with torch.no_grad():
        ref_image, ref_text = reference.encode_image(images).numpy(), reference.encode_text(ids).numpy()
        ref_logits = (reference.logit_scale.exp() * torch.nn.functional.normalize(torch.from_numpy(ref_image))
                      @ torch.nn.functional.normalize(torch.from_numpy(ref_text)).T).numpy()
    image = converted.encode_image(images.permute(0, 2, 3, 1).numpy())
    text = converted.encode_text(ids.numpy())
    logits = converted.logit_scale * converted.encode_image(images.permute(0, 2, 3, 1).numpy(), normalize=True) \
        @ converted.encode_text(ids.numpy(), normalize=True).T
    return {"image": relative_error(image, ref_image), "text": relative_error(text, ref_text),
            "logits": relative_error(logits, ref_logits)}


def _state_dict_numpy(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("kind", list(TINY))
def test_converted_tiny_model_matches_the_reference(kind, tmp_path):
    reference = tiny_reference(kind)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    args = [str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]
    convert.main(args + (["--activation", "gelu"] if kind.endswith("gelu") else []))
    errors = compare(reference, clip_jax.load(str(tmp_path / "out")))
    assert max(errors.values()) <= TOLERANCE, errors


def _save(fmt, reference, path):
    """The reference's weights at `path` in one of the formats users meet."""
    sd = reference.state_dict()
    if fmt == "torchscript":            # OpenAI's released .pt files are TorchScript archives
        torch.jit.script(reference).save(str(path))
    elif fmt == "fp16_state_dict":      # OpenAI's weights are float16
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path)
    elif fmt == "open_clip_checkpoint":   # a training checkpoint from OpenCLIP's DDP training
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                    "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("fmt", ["torchscript", "fp16_state_dict", "open_clip_checkpoint", "safetensors"])
def test_every_checkpoint_format_converts_to_the_same_arrays(kind, fmt, tmp_path, plain_conversions={}):
    reference = tiny_reference(kind)
    if kind not in plain_conversions:   # the plain state_dict's conversion, once per kind
        torch.save(reference.state_dict(), tmp_path / "plain.pt")
        convert.import_checkpoint(str(tmp_path / "plain.pt"), str(tmp_path / "plain"))
        plain_conversions[kind] = checkpoint.read_arrays(str(tmp_path / "plain"))
    suffix = ".safetensors" if fmt == "safetensors" else ".pt"
    src = _save(fmt, reference, tmp_path / f"model{suffix}")
    convert.import_checkpoint(str(src), str(tmp_path / "out"))
    want, got = plain_conversions[kind], checkpoint.read_arrays(str(tmp_path / "out"))
    for (path, a), (_, b) in zip(_leaves(want), _leaves(got)):
        if fmt == "fp16_state_dict":
            a = np.asarray(a, np.float16).astype(np.float32)
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def _leaves(tree, prefix=()):
    for k in sorted(tree):
        if isinstance(tree[k], dict):
            yield from _leaves(tree[k], prefix + (k,))
        else:
            yield prefix + (k,), tree[k]


# ----------------------------------------------------------------------------- export

def test_export_loads_in_open_clip_with_identical_outputs(tmp_path):
    reference = tiny_reference("resnet", seed=1)     # BatchNorm statistics travel too
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    convert.import_checkpoint(str(tmp_path / "model.pt"), str(tmp_path / "converted"))
    out = tmp_path / "hub" / "open_clip_model.safetensors"
    convert.main([str(tmp_path / "converted"), "--to", "open_clip", "--out", str(out)])
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    ids = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        for fn, x in ((lambda m, x: m.encode_image(x), images), (lambda m, x: m.encode_text(x), ids)):
            torch.testing.assert_close(fn(model, x), fn(reference, x), rtol=0, atol=0)
    # .pt export: OpenCLIP's own loader, strict
    convert.main([str(tmp_path / "converted"), "--to", "open_clip", "--out", str(tmp_path / "pt" / "model.pt")])
    fresh = open_clip.CLIP(embed_dim=64, vision_cfg=TINY["resnet"][0], quick_gelu=True,
                           text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
    assert not open_clip.load_checkpoint(fresh, str(tmp_path / "pt" / "model.pt"), strict=True).missing_keys
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(images), reference.encode_image(images), rtol=0, atol=0)


def test_a_clip_jax_siglip_model_with_its_own_head_width_runs_in_open_clip(tmp_path):
    # The tiny test model: 2 heads of 16 in both towers, a SentencePiece vocabulary of 256,
    # trained with the SigLIP loss: OpenCLIP loads its learned logit bias as its own.
    src = write_model_dir(tmp_path / "model", seed=2, loss__name="siglip")
    ours = clip_jax.load(src)
    out = tmp_path / "hub" / "open_clip_model.safetensors"
    convert.main([src, "--to", "open_clip", "--out", str(out)])
    model = open_clip.create_model(f"local-dir:{tmp_path / 'hub'}").eval()
    ids = ours.tokenize(["a photo of a red circle.", "a blue square"])
    images = np.random.default_rng(0).standard_normal((2, ours.image_size, ours.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        ref_text = model.encode_text(torch.from_numpy(ids).long()).numpy()
        ref_image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert relative_error(ours.encode_text(ids), ref_text) <= TOLERANCE
    assert relative_error(ours.encode_image(images), ref_image) <= TOLERANCE
    assert model.logit_bias is not None and model.logit_bias.item() == ours.logit_bias
    assert model.logit_scale.exp().item() == pytest.approx(ours.logit_scale, rel=1e-6)


# ----------------------------------------------------------------------------- fine-tuning

@pytest.mark.slow
def test_a_converted_model_fine_tunes_from_the_command_line(tmp_path):
    reference = tiny_reference("vit", seed=3)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    run_cli(["clip_jax.convert", str(tmp_path / "model.pt"), "--out", str(tmp_path / "converted")])
    wd = tmp_path / "ft"
    flags = [f for f in tiny_flags(total_steps=3, batch_size=16, **{"data.synthetic.num_eval": 32})
             if f.startswith(("--config.batch_size", "--config.total_steps", "--config.log_every",
                              "--config.progress", "--config.data.synthetic"))]
    proc = run_cli(["clip_jax.train", f"--config={REPO}/configs/finetune.py:{tmp_path / 'converted'}",
                    f"--workdir={wd}", "--config.model.dtype=float32", "--config.model.remat=False",
                    "--config.optim.warmup_steps=1", *flags])
    out = proc.stdout + proc.stderr
    assert "init_from" in out and "arrays loaded" in out, out[-3000:]
    saved = json.loads((wd / "config.json").read_text())
    assert saved["data"]["tokenizer"] == "clip_bpe" and saved["init_from"] == str(tmp_path / "converted")
    losses = [json.loads(line)["loss"] for line in (wd / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    before, after = checkpoint.read_arrays(str(tmp_path / "converted")), checkpoint.read_arrays(str(wd))
    moved = [float(np.abs(a - b).max()) for (_, a), (_, b) in zip(_leaves(before["params"]), _leaves(after["params"]))]
    assert 0 < max(moved) < 1e-3, max(moved)      # fine-tuned from the weights, not from scratch


# ----------------------------------------------------------------------------- real shapes

# Full-size RN50 and ViT-B/32 through the same comparison: benchmarks/parity.py (about a
# minute per model, the figures quoted in README.md).


OPEN_CLIP_NAMES = {"rn50": "RN50", "rn101": "RN101", "rn50x4": "RN50x4", "rn50x16": "RN50x16",
                   "rn50x64": "RN50x64", "vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16",
                   "vit_l14": "ViT-L-14", "vit_l14_336": "ViT-L-14-336"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPEN_CLIP_NAMES))
def test_each_paper_architecture_converts_from_a_reference_state_dict(name):
    oc_name = OPEN_CLIP_NAMES[name]
    torch.manual_seed(0)
    reference = open_clip.create_model(oc_name, pretrained=None, force_quick_gelu=True)
    tensors = _state_dict_numpy(reference)
    model_cfg = convert.infer_model_config(tensors, oc_name)
    assert convert.paper_name(model_cfg) == name
    assert convert._shape_dict(model_cfg) == convert._shape_dict(config_lib.model_config(name))
    variables = convert.from_torch(tensors, convert.converted_config(model_cfg), oc_name)
    counts = count_params(variables["params"])
    assert counts["total"] == sum(p.numel() for p in reference.parameters())
    assert counts["image"] == sum(p.numel() for p in reference.visual.parameters())
    # (Every tensor was consumed and every array filled with the right shape, or from_torch
    # would have raised; the layouts' values are checked by the full-size parity tests.)


# ----------------------------------------------------------------------------- preprocessing

def _photo(width, height, seed):
    """A photo-like image: scikit-learn's bundled photograph, resized and shifted."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photo = load_sample_images().images[seed % 2]
    return Image.fromarray(np.roll(photo, 37 * seed, axis=1)).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("size", [224, 336])
def test_evaluation_view_equals_the_reference_preprocessing(size):
    """`preprocess` (resize the short side, centre crop, normalise) gives the reference's
    input tensor: OpenCLIP's eval transform (OpenAI's Resize + CenterCrop, bicubic)."""
    import io
    from PIL import Image
    from clip_jax.data import images as images_lib
    from clip_jax.data.pipeline import CLIP_STD, normalize_images
    reference = open_clip.image_transform(size, is_train=False)
    diffs = []
    for i, (w, h) in enumerate([(640, 427), (500, 375), (333, 500), (1280, 853), (size + 1, size), (300, 900)]):
        buf = io.BytesIO()
        _photo(w, h, i).save(buf, "JPEG", quality=95)
        ref = reference(Image.open(io.BytesIO(buf.getvalue()))).permute(1, 2, 0).numpy()
        ours = normalize_images(images_lib.center_crop(buf.getvalue(), size))
        diffs.append(np.abs(ours - ref) * np.asarray(CLIP_STD) * 255)   # in 8-bit levels
    levels = np.concatenate([d.ravel() for d in diffs])
    print(f"preprocess {size}: max {levels.max():.2f} levels, mean {levels.mean():.4f}, "
          f">=1.5 levels: {(levels >= 1.5).mean():.2e}")
    assert levels.mean() < 0.05 and (levels >= 1.5).mean() < 1e-3 and levels.max() <= 8


# ----------------------------------------------------------------------------- CLIP_benchmark

def _clip_benchmark_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy`, whose float() of a 1-element array numpy 2.4 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_zero_shot_equals_clip_benchmarks_on_the_same_model_and_data(kind, tmp_path, monkeypatch):
    """The suite's zero-shot classification of a converted OpenCLIP model on an ImageFolder
    equals CLIP_benchmark's own evaluation of the reference model (its preprocessing, its
    tokenizer, its prompt ensembling) on the same folder with the same templates: acc1, acc5
    and mean per-class recall."""
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    import torchvision
    from clip_jax import evaluate
    from clip_jax.data import zeroshot_metadata
    from tests.helpers import drawn_image
    monkeypatch.setattr(zc, "accuracy", _clip_benchmark_accuracy)
    root = tmp_path / "data" / "cifar10"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog"]
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            drawn_image(10 * c + i, 40 + 3 * i, 30 + 2 * i).save(root / cls / f"{i}.png")
    reference = tiny_reference(kind)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    convert.main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "converted")])
    rows = evaluate.main(["suite", "--checkpoint", str(tmp_path / "converted"), "--datasets=cifar10",
                          f"--data-root={tmp_path / 'data'}", f"--out={tmp_path / 'out'}", "--no-progress"])["rows"]
    ours = {k: rows[0][k] for k in ("acc1", "acc5", "mean_per_class_recall")}
    size = reference.visual.image_size
    folder = torchvision.datasets.ImageFolder(str(root), transform=open_clip.image_transform(
        size[0] if isinstance(size, tuple) else size, is_train=False))
    templates = [t.replace("{}", "{c}") for t in zeroshot_metadata.templates("cifar10")]
    theirs = zc.evaluate(reference, torch.utils.data.DataLoader(folder, batch_size=8),
                         open_clip.get_tokenizer("ViT-B-32"), folder.classes, templates, "cpu", amp=False)
    assert 0 < theirs["acc1"] < 1 and theirs["acc5"] < 1          # not a degenerate case
    assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_webdataset_zero_shot_and_retrieval_equal_clip_benchmarks(kind, tmp_path, monkeypatch):
    """CLIP_benchmark's WebDataset form, read by CLIP_benchmark's own `build_wds_dataset`: the
    suite's zero-shot classification (the shards' class names and templates) and image-text
    retrieval (several captions per image) of a converted OpenCLIP model equal
    CLIP_benchmark's evaluation of the reference model on the same shards."""
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval
    from clip_jax import evaluate
    from tests.helpers import drawn_image, write_wds
    monkeypatch.setattr(zc, "accuracy", _clip_benchmark_accuracy)
    classes = ["circle", "square", "triangle", "star", "cross", "ring"]
    write_wds(tmp_path / "wds_shapes", "test",
              [(drawn_image(7 * i, 36 + 3 * (i % 4), 30 + 2 * (i % 3)), i % 6) for i in range(30)],
              classnames=classes, templates=["a photo of a {c}.", "a drawing of the {c}."],
              image_format=("webp", "png", "jpg"), per_shard=8)
    words = ["red", "green", "blue", "small", "large", "round", "sharp", "dark"]
    write_wds(tmp_path / "wds_captions", "test",
              [(drawn_image(5 * i + 1, 32 + i % 5, 28), [f"a {words[i % 8]} shape {i}", f"picture {words[(3 * i) % 8]}"])
               for i in range(20)], dataset_type="retrieval", per_shard=6)
    reference = tiny_reference(kind)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    convert.main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "converted")])
    result = evaluate.main(["suite", "--checkpoint", str(tmp_path / "converted"), "--no-progress",
                            f"--datasets={tmp_path / 'wds_shapes'},{tmp_path / 'wds_captions'}",
                            f"--out={tmp_path / 'out'}"])
    assert [(r["dataset"], r["task"]) for r in result["rows"]] == [
        ("wds_shapes", "zeroshot_classification"), ("wds_captions", "zeroshot_retrieval")]
    size = reference.visual.image_size
    transform = open_clip.image_transform(size[0] if isinstance(size, tuple) else size, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    shapes = build_wds_dataset("shapes", transform, data_dir=str(tmp_path / "wds_shapes"))
    theirs = zc.evaluate(reference, torch.utils.data.DataLoader(shapes.batched(8), batch_size=None),
                         tokenizer, shapes.classes, shapes.templates, "cpu", amp=False)
    assert 0 < theirs["acc1"] < 1                                    # not a degenerate case
    assert {k: result[f"wds_shapes/{k}"] for k in theirs} == pytest.approx(theirs, abs=1e-12)
    captions = build_wds_dataset("captions", transform, data_dir=str(tmp_path / "wds_captions"))
    loader = torch.utils.data.DataLoader(captions, batch_size=8, collate_fn=image_captions_collate_fn)
    theirs = zeroshot_retrieval.evaluate(reference, loader, tokenizer, "cpu", amp=False, recall_k_list=[5])
    assert 0 < theirs["image_retrieval_recall@5"] < 1 and 0 < theirs["text_retrieval_recall@5"] < 1
    # CLIP_benchmark averages in float32: equal to its rounding (one query is 1/40 or 1/20)
    assert {k: result[f"wds_captions/{k}"] for k in theirs} == pytest.approx(theirs, abs=1e-6)
