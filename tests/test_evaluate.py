"""Evaluators (clip_jax/evals), their data, the command line and the training-time evals.

Figures are checked against brute-force numpy on the same embeddings: a fake model with
known embeddings for the pure logic, a real (randomly initialised) tiny CLIP for the
whole path from image files to figures.
"""
import csv
import dataclasses
import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clip_jax import config_lib, evaluate, metrics, train, validation
from clip_jax.data import pipeline, synthetic
from clip_jax.evals import data as data_lib, training as training_evals
from clip_jax.evals import features, linear_probe, registry, report, retrieval, suite, zeroshot
from clip_jax.evals.evaluator import Evaluator, Option
from tests.helpers import (REPO, deadline, device_env, drawn_image, encode_image, free_port,
                           run_python, run_scripts_together, tar_add, tiny_config, write_ingested,
                           write_model_dir, write_wds)


# ----------------------------------------------------------------------------- fake model

class FakeModel:
    """Known embeddings: image i (a presized image filled with value i) -> image_vecs[i];
    text t -> text_vecs[t]. The CLIPModel interface the evaluators use."""

    image_size = 4
    batch_size = 8
    source = ""

    def __init__(self, image_vecs, text_vecs):
        self.image_vecs, self.text_vecs = np.asarray(image_vecs, np.float32), dict(text_vecs)
        self.texts = list(self.text_vecs)
        self.config = ml_collections.ConfigDict({"model": {"embed_dim": self.image_vecs.shape[1]}})

    def tokenize(self, texts):
        return np.array([[self.texts.index(t)] for t in texts], np.int32)

    def encode_text(self, ids):
        return np.stack([self.text_vecs[self.texts[i]] for i in ids[:, 0]]).astype(np.float32)

    def encode_image(self, images):
        value = (images[:, 0, 0, 0] * pipeline.CLIP_STD[0] + pipeline.CLIP_MEAN[0]) * 255
        return self.image_vecs[np.round(value).astype(int)]

    def local_rows(self, n):        # one process: every row, in batches
        return [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]

    def encode_image_rows(self, n, rows):
        out = [self.encode_image(rows(batch)) for batch in self.local_rows(n)]
        return np.concatenate(out) if out else np.zeros((0, self.image_vecs.shape[1]), np.float32)


class ValueReader:
    def __getitem__(self, i):
        return np.full((4, 4, 3), i, np.uint8)


def fake_data(n, labels=None, classnames=None, captions=None, attributes=None):
    return data_lib.EvalData("fake", ValueReader(), [f"img{i}" for i in range(n)],
                             None if labels is None else np.asarray(labels), classnames, captions,
                             attributes or {}, presized=True, fingerprint="fake")


def brute_force_topk(logits, labels, k):
    hits = 0
    for row, label in zip(logits, labels):
        ranked = sorted(range(len(row)), key=lambda c: -row[c])
        hits += label in ranked[:k]
    return hits / len(labels)


def test_zeroshot_figures_equal_brute_force():
    rng = np.random.default_rng(0)
    classes, templates, n, dim = ["cat", "dog", "car", "tree", "ship", "bird", "fish"], ("a {}.", "the {}!"), 120, 6
    texts = {t.format(c): rng.normal(size=dim) for c in classes for t in templates}
    labels = rng.integers(0, len(classes) - 1, n)          # the last class has no image
    model = FakeModel(rng.normal(size=(n, dim)) * rng.uniform(0.5, 3, (n, 1)), texts)
    result = zeroshot.evaluate(model, fake_data(n, labels, classes), templates, progress=False)

    norm = lambda v: np.asarray(v) / np.linalg.norm(v)
    classifier = np.stack([norm(np.mean([norm(texts[t.format(c)]) for t in templates], 0)) for c in classes])
    logits = np.stack([norm(v) for v in model.image_vecs]) @ classifier.T
    assert result["top1"] == brute_force_topk(logits, labels, 1)
    assert result["top5"] == brute_force_topk(logits, labels, 5)
    per_class = {c: np.mean(np.argmax(logits[labels == i], 1) == i) for i, c in enumerate(classes[:-1])}
    assert {r["class"]: r["top1"] for r in result["per_class"]} == pytest.approx(per_class)
    assert result["mean_per_class"] == pytest.approx(np.mean(list(per_class.values())))
    assert [r["n"] for r in result["per_class"]] == [int(np.sum(labels == i)) for i in range(len(classes) - 1)]
    assert result["n"] == n and result["templates"] == 2


def test_prompt_ensembling_normalises_each_prompt_then_the_mean():
    # Unnormalised, "a {}" would dominate class x's mean (length 10 vs 1).
    texts = {"a x": [10.0, 0.0, 0.0], "the x": [0.0, 1.0, 0.0],
             "a y": [0.0, 0.0, 2.0], "the y": [0.0, 0.0, 5.0]}
    model = FakeModel(np.zeros((1, 3)), texts)
    clf = zeroshot.text_classifier(model, ["x", "y"], ["a {}", "the {}"])
    np.testing.assert_allclose(clf, [[2 ** -0.5, 2 ** -0.5, 0], [0, 0, 1]], atol=1e-7)
    # An image along (1, 2, 0): by the ensembled weights class x; by the prompts as given
    # (unnormalised sum) it would still be x, but its cosine must be (1+2)/sqrt(2)/sqrt(5).
    model = FakeModel([[1.0, 2.0, 0.0]], texts)
    result = zeroshot.evaluate(model, fake_data(1, [0], ["x", "y"]), ["a {}", "the {}"], progress=False)
    assert result["top1"] == 1.0


def test_group_report_by_hand():
    correct = [True, True, False, True, False, False]
    out = report.group_report(correct, ["a", "a", "a", "b", "b", "c"])
    assert out["groups"] == {"a": {"n": 3, "top1": 2 / 3}, "b": {"n": 2, "top1": 0.5}, "c": {"n": 1, "top1": 0.0}}
    assert out["group_gap"] == pytest.approx(2 / 3) and out["worst_group"] == "c"


def test_zeroshot_group_by_attribute_and_path_level():
    # 6 images, 2 classes; images 0-2 in group 'in', 3-5 in 'out'. Class weights are the axes;
    # images 0,1 and 3 point to their class, the others to the other class.
    texts = {"x": [1.0, 0.0], "y": [0.0, 1.0]}
    labels = [0, 1, 0, 0, 1, 1]
    vecs = [[1, 0], [0, 1], [0, 1], [1, 0], [1, 0], [1, 0]]
    data = fake_data(6, labels, ["x", "y"], attributes={"place": ["in"] * 3 + ["out"] * 3})
    data.keys = [f"{'xy'[lab]}/{p}/img{i}.png" for i, (lab, p) in enumerate(zip(labels, data.attributes["place"]))]
    model = FakeModel(vecs, texts)
    by_column = zeroshot.evaluate(model, data, ["{}"], group_by="place", progress=False)
    assert by_column["groups"] == {"in": {"n": 3, "top1": 2 / 3}, "out": {"n": 3, "top1": 1 / 3}}
    assert by_column["group_gap"] == pytest.approx(1 / 3) and by_column["worst_group"] == "out"
    by_level = zeroshot.evaluate(model, data, ["{}"], group_by="level:1", progress=False)
    assert by_level["groups"] == by_column["groups"]
    by_class_folder = zeroshot.evaluate(model, data, ["{}"], group_by="level:0", progress=False)
    assert by_class_folder["groups"]["x"]["top1"] == pytest.approx(2 / 3)   # images 0, 2, 3
    with pytest.raises(ValueError, match="no such attribute.*place, level:N"):
        zeroshot.evaluate(model, data, ["{}"], group_by="colour", progress=False)
    with pytest.raises(ValueError, match="has no folder at level 2"):
        data.group_values("level:2")


def brute_force_recall(image_vecs, text_vecs, text_image, k):
    sims = image_vecs @ text_vecs.T
    i2t = np.mean([any(text_image[j] == i for j in np.argsort(-sims[i])[:k]) for i in range(len(sims))])
    t2i = np.mean([text_image[j] in np.argsort(-sims[:, j])[:k] for j in range(sims.shape[1])])
    return i2t, t2i


def test_retrieval_recall_equals_brute_force(monkeypatch):
    monkeypatch.setattr(retrieval, "BLOCK", 7)      # several blocks
    rng = np.random.default_rng(1)
    n, dim = 40, 5
    captions = [[f"caption {i}.{j}" for j in range(rng.integers(1, 4))] for i in range(n)]
    texts = {c: rng.normal(size=dim) for cs in captions for c in cs}
    # Each image near its captions' mean, so that the recalls are neither 0 nor 1.
    image_vecs = [np.mean([texts[c] for c in cs], 0) + rng.normal(size=dim) for cs in captions]
    model = FakeModel(image_vecs, texts)
    result = retrieval.evaluate(model, fake_data(n, captions=captions), progress=False)
    norm = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
    text_image = np.repeat(np.arange(n), [len(c) for c in captions])
    text_vecs = norm(np.stack([texts[c] for cs in captions for c in cs]))
    for k in (1, 5, 10):
        i2t, t2i = brute_force_recall(norm(model.image_vecs), text_vecs, text_image, k)
        assert result[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert result[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert result["texts"] == len(text_image) and result["images"] == n
    assert 0 < result["image_to_text_R@1"] < result["image_to_text_R@10"] < 1


def test_retrieval_ties_count_against_the_query():
    # Image 0's own caption scores exactly as high as image 1's caption: not a top-1 hit.
    out = retrieval.recall_at_k(np.array([[1.0, 0.0], [0.0, 1.0]]),
                                np.array([[1.0, 1.0], [1.0, 1.0]]), [0, 1])
    assert out["image_to_text_R@1"] == 0.0 and out["image_to_text_R@5"] == 1.0


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16.0
    return x[:600], y[:600], x[600:900], y[600:900]


def test_linear_probe_equals_a_brute_force_fit(digits):
    """The scikit-learn solver (the paper's tool, the reference): C is the best held-out
    accuracy among those tried, and the top-1 is that of the refitted weights."""
    train_x, train_y, test_x, test_y = digits
    names = [str(d) for d in range(10)]
    out, top1 = linear_probe.probe(train_x, train_y, test_x, test_y, names, val_fraction=0.25, seed=3,
                                   solver="sklearn")
    # The chosen C is the best held-out accuracy among those tried (ties: the smaller C) ...
    tr, va = linear_probe.split_train_val(len(train_x), 0.25, 3)
    assert len(va) == 150 and not set(tr) & set(va)
    sweep = {}
    for c in (out["C"], out["C"] * 10 ** (1 / 8), out["C"] / 10 ** (1 / 8)):
        sweep[c] = np.mean(linear_probe.fit(train_x[tr], train_y[tr], c).predict(train_x[va]) == train_y[va])
    assert out["val_top1"] == pytest.approx(sweep[out["C"]])
    assert all(sweep[out["C"]] >= s for s in sweep.values())
    # ... and the reported top-1 is that of the refitted probe's weights, by numpy.
    ref = linear_probe.fit(train_x, train_y, out["C"])
    pred = np.argmax(test_x @ ref.coef_.T + ref.intercept_, axis=1)
    assert out["top1"] == pytest.approx(np.mean(pred == test_y))
    assert top1.tolist() == (pred == test_y).tolist()
    assert out["top1"] > 0.85


@pytest.fixture(scope="module")
def noisy_digits():
    """The digits with Gaussian noise (sd 0.3) on every pixel: held-out accuracy then peaks at
    one C instead of the plateau of the clean digits, where the search's choice among equal
    scores would hang on the last digit of a solver's stopping point."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 + 0.3 * np.random.default_rng(0).standard_normal(x.shape)).astype(np.float32)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def _labels_variants(digits):
    """(name, train_x, train_y, test_x, test_y, classnames): ten classes; two (scikit-learn's
    binary model); ten named of which one never occurs in training."""
    x, y, tx, ty = digits
    keep = y != 7
    return [("ten", x, y, tx, ty, [str(d) for d in range(10)]),
            ("two", x, y % 2, tx, ty % 2, ["even", "odd"]),
            ("absent", x[keep], y[keep], tx, ty, [str(d) for d in range(10)])]


@pytest.mark.parametrize("variant", ["ten", "two", "absent"])
def test_the_jax_solver_finds_scikit_learns_solution(digits, variant):
    """Same objective: at a fixed C the JAX L-BFGS weights equal scikit-learn's solved tightly,
    over several blocks of rows (block of 64 rows, 600 rows)."""
    from sklearn.linear_model import LogisticRegression
    _, x, y, _, _, _ = next(v for v in _labels_variants(digits) if v[0] == variant)
    solver = linear_probe.JaxSolver(x, y, block=64, max_iter=2000, tol=1e-6)
    assert list(solver.classes_) == sorted(set(y))
    for c in (0.01, 1.0):
        (w, b), iterations = solver.fit(c)
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x, y)
        assert 1 < iterations < 2000 and list(ref.classes_) == list(solver.classes_)
        ours, theirs = x @ np.asarray(w) + np.asarray(b), ref.decision_function(x)
        if theirs.ndim == 1:      # binary: scikit-learn's one logit is our difference of two
            ours = ours[:, 1] - ours[:, 0]
        else:                     # multinomial logits are known up to a shift per row
            ours, theirs = (a - a.mean(1, keepdims=True) for a in (ours, theirs))
        assert np.abs(ours - theirs).max() < 2e-3 * np.abs(theirs).max()


@pytest.mark.parametrize("variant", ["ten", "two", "absent"])
def test_the_jax_probe_equals_scikit_learns_accuracy(noisy_digits, variant):
    """The whole probe (C search, refit, scores) with each solver, each solved tightly (float32
    on the devices, float64 on the host): the same C and the same accuracy to 1e-3; a class
    absent from training is never predicted, as scikit-learn. (At scikit-learn's default
    stopping rule the two stop at different points and the search's choice among C of near-equal
    held-out accuracy moves: BUILD_NOTES "Linear probe in JAX".)"""
    _, x, y, tx, ty, names = next(v for v in _labels_variants(noisy_digits) if v[0] == variant)
    ref, ref_top1 = linear_probe.probe(x, y, tx, ty, names, solver="sklearn", tol=1e-8)
    out, top1 = linear_probe.probe(x, y, tx, ty, names, solver="jax", tol=1e-6, max_iter=3000)
    assert out["solver"] == "jax" and ref["solver"] == "sklearn"
    assert out["C"] == pytest.approx(ref["C"]) and out["C_tried"] == ref["C_tried"]
    for key in ("top1", "top5", "mean_per_class", "val_top1"):
        assert abs(out[key] - ref[key]) <= 1e-3, key
    assert out["top1"] > (0.75 if variant != "absent" else 0.7)
    if variant == "absent":
        assert out["per_class"][7]["top1"] == 0.0


def test_the_jax_probe_on_8_devices_equals_one():
    """Rows laid over 8 devices (600 rows: padded, masked) give the one-device fit."""
    code = """
        import json, jax, numpy as np
        from sklearn.datasets import load_digits
        from clip_jax.evals import linear_probe
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)[:601]
        s = linear_probe.JaxSolver(x, y[:601], block=16, tol=1e-6)
        rows = np.arange(601) % 5 != 0
        (w, b), it = s.fit(1.0, rows)
        z = s.logits((w, b), x)
        print(json.dumps({"devices": len(s.mesh.devices.flat), "z": (z - z.mean(1, keepdims=True)).tolist(),
                          "acc": s.accuracy((w, b), ~rows), "it": it}))
    """
    one, eight = run_python(code, 1), run_python(code, 8)
    assert (one["devices"], eight["devices"]) == (1, 8)
    np.testing.assert_allclose(eight["z"], one["z"], atol=2e-3 * np.abs(one["z"]).max())
    assert eight["acc"] == pytest.approx(one["acc"], abs=1 / 120)
    assert one["acc"] > 0.9


def test_linear_probe_search_refines_to_an_eighth_of_a_decade(digits):
    train_x, train_y, _, _ = digits
    tried = []

    def score(c, nearest):      # scikit-learn's fit, as the probe's; nearest: a C tried before
        assert (nearest is None) == (not tried) and (nearest is None or nearest in tried)
        tried.append(c)
        clf = linear_probe.fit(train_x[:300], train_y[:300], c, 200)
        return float(np.mean(clf.predict(train_x[300:]) == train_y[300:]))

    best, sweep = linear_probe.search_c(score)
    logs = sorted(round(np.log10(c) * 8) for c in tried)
    assert logs[:7] == [-48, -32, -16, 0, 16, 32, 48] or set(range(-48, 49, 16)) <= set(logs)
    assert len(tried) == len(set(logs)) <= 7 + 8            # no C fitted twice
    e = round(np.log10(best) * 8)
    assert {e - 1, e + 1} & set(logs) == {x for x in (e - 1, e + 1) if -48 <= x <= 48}
    assert sweep[best] == max(sweep.values())


def test_linear_probe_evaluate_checks_classes(digits):
    x, y, _, _ = digits
    model = FakeModel(x[:40], {})
    train_data = fake_data(30, y[:30] % 2, ["even", "odd"])
    other = fake_data(10, y[30:40] % 2, ["odd", "even"])
    with pytest.raises(ValueError, match="different classes"):
        linear_probe.evaluate(model, train_data, other, progress=False)


# ----------------------------------------------------------------------------- registry

def _set_value(option, tmp_path, key=""):
    """A value other than the option's default, of its type (a file that exists for a file)."""
    if option.is_file:
        path = tmp_path / "a file.txt"
        path.write_text("a photo of a {}.\n")
        return str(path)
    if key == "train_data":          # data specs are parsed at validation
        return "synthetic"
    if key == "tasks":               # the suite's, checked when it is built
        return "zeroshot"
    return {int: 3, float: 0.5, str: "x"}[type(option.default)]


def _validate_entry(**entry):
    config = tiny_config()
    config.evals = ml_collections.ConfigDict({"entry": entry})
    validation.validate(config)


def test_every_registered_option_is_a_flag_and_an_entry_key_of_its_tasks_only(tmp_path):
    """The evaluators' declared options are what the command line and config validation
    take: each, set, is accepted for the tasks that declare it and refused, naming it, for
    the others."""
    assert list(registry.REGISTRY) == ["zeroshot", "retrieval", "linear_probe", "suite"]
    assert {k for k, o in registry.all_options().items() if o.is_file} == {"templates", "classnames"}
    for task, cls in registry.REGISTRY.items():
        assert cls.task == task and cls.logged
        required = {key: "synthetic" for key in cls.required}
        for key, option in registry.all_options().items():
            value = _set_value(option, tmp_path, key)
            args = evaluate.parse_args([task, "--checkpoint", "ckpt", "--data", "d",
                                        registry.flag(key), str(value)])
            assert getattr(args, key) == value
            entry = dict(task=task, data="synthetic", **{**required, key: value})
            if key in cls.options:
                _validate_entry(**entry)
                checked = registry.check(task, {**required, key: value}, evaluate.COMMAND_LINE, flags=True)
                assert checked[key] == value
            else:
                with pytest.raises(config_lib.ConfigError, match=f"config.evals.entry: {key} does not apply to {task}"):
                    _validate_entry(**entry)
                with pytest.raises(ValueError, match=f"{registry.flag(key)} does not apply to {task}"):
                    registry.check(task, {key: value}, evaluate.COMMAND_LINE, flags=True)
            if option.is_file and key in cls.options:
                with pytest.raises(config_lib.ConfigError, match=f"config.evals.entry.{key}: no such file"):
                    _validate_entry(**{**entry, key: str(tmp_path / "missing.txt")})
        for key in cls.required:
            with pytest.raises(config_lib.ConfigError, match=f"config.evals.entry: {task} needs {key}"):
                _validate_entry(task=task, data="synthetic")
            with pytest.raises(ValueError, match=f"{task} needs {registry.flag(key)}"):
                registry.check(task, {}, evaluate.COMMAND_LINE, flags=True)


def test_unknown_tasks_and_options_are_named():
    with pytest.raises(config_lib.ConfigError, match="config.evals.entry: unknown option 'temperature' "
                                                     "\\(options: templates, "):
        _validate_entry(task="zeroshot", data="synthetic", temperature=0.5)
    with pytest.raises(config_lib.ConfigError, match="config.evals.entry: unknown task 'captioning' "
                                                     "\\(available: zeroshot, retrieval, linear_probe, suite\\)"):
        _validate_entry(task="captioning", data="synthetic")
    with pytest.raises(TypeError, match="no option"):
        zeroshot.ZeroShot("synthetic", tiny_config(), temperature=0.5)


class Echo(Evaluator):
    """A task added by registering it: figures from its option, no model or data needed."""
    task = "echo"
    options = {"level": Option(1.0, "the figure it reports"), **Evaluator.options}
    logged = ("level",)
    averaged = ("level",)

    def open_data(self, spec):
        return spec

    def run(self, model, cache_dir="", progress=True):
        return {"task": self.task, "data": self.data, "level": self.settings["level"], "other": 1.0}


def test_a_registered_evaluator_is_a_task_of_the_command_line_config_and_training(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "echo", Echo)
    args = evaluate.parse_args(["echo", "--checkpoint", "ckpt", "--data", "d", "--level", "0.25"])
    assert (args.task, args.level) == ("echo", 0.25)
    _validate_entry(task="echo", data="synthetic", level=0.5)
    with pytest.raises(config_lib.ConfigError, match="config.evals.entry: level does not apply to zeroshot"):
        _validate_entry(task="zeroshot", data="synthetic", level=0.5)
    # Training logs its `logged` figures per entry and its `averaged` ones over the entries.
    config = tiny_config()
    config.evals = ml_collections.ConfigDict({"a": dict(task="echo", data="x", level=0.5),
                                              "b": dict(task="echo", data="y", level=0.25)})
    runner = training_evals.TrainingEvaluators.__new__(training_evals.TrainingEvaluators)
    runner.evaluators = training_evals.training_evaluators(config)
    runner.model = type("Model", (), {"variables": None})()
    state = type("State", (), {"params": {}, "batch_stats": {}})()
    assert runner(state) == {"echo/a/level": 0.5, "echo/b/level": 0.25, "echo/level": 0.375}


def test_an_option_shared_by_evaluators_must_be_declared_alike(monkeypatch):
    class Other(Echo):
        task = "other"
        options = {"level": Option(2.0, "another default"), **Evaluator.options}
    monkeypatch.setitem(registry.REGISTRY, "echo", Echo)
    monkeypatch.setitem(registry.REGISTRY, "other", Other)
    with pytest.raises(TypeError, match="option 'level': other declares it unlike another"):
        registry.all_options()


def test_reports_as_printed():
    per_class = [{"class": "cat", "n": 2, "top1": 0.5}, {"class": "dog", "n": 1, "top1": 1.0}]
    zs = {"task": "zeroshot", "data": "d", "n": 3, "classes": 2, "templates": 2, "top1": 2 / 3, "top5": 1.0,
          "mean_per_class": 0.75, "per_class": per_class, "group_by": "level:1", "group_gap": 0.5,
          "worst_group": "a", "groups": {"a": {"n": 2, "top1": 0.5}, "b": {"n": 1, "top1": 1.0}}}
    assert zeroshot.ZeroShot.format_result(zs).splitlines() == [
        "zeroshot on d: 3 images, 2 classes, 2 prompt templates",
        "  top-1 66.67%  top-5 100.00%  mean per-class 75.00%",
        "class  n    top1", "cat    2   50.00", "dog    1  100.00",
        "by level:1: gap 50.00 points (worst: a)",
        "group  n    top1", "a      2   50.00", "b      1  100.00"]
    # The header counts every class of the classifier, saying so when some have no image.
    assert zeroshot.ZeroShot.format_result({**zs, "classes": 3}).splitlines()[0] == (
        "zeroshot on d: 3 images, 3 classes (2 with images), 2 prompt templates")
    lp = {**zs, "task": "linear_probe", "train_data": "t", "train_n": 10, "C": 0.1, "val_top1": 0.9,
          "C_tried": 15, "solver": "jax"}
    del lp["groups"]
    assert linear_probe.LinearProbe.format_result(lp).splitlines()[0] == (
        "linear_probe on d: 3 images, 2 classes; trained on t (10 images), C=0.1 "
        "(held-out top-1 90.00%, 15 values tried, jax solver)")
    assert len(linear_probe.LinearProbe.format_result(lp).splitlines()) == 5
    ret = {"task": "retrieval", "data": "d", "images": 4, "texts": 8,
           **{f"{w}_R@{k}": k / 10 for w in ("image_to_text", "text_to_image") for k in (1, 5, 10)}}
    assert retrieval.Retrieval.format_result(ret).splitlines() == [
        "retrieval on d: 4 images, 8 captions",
        "  image to text R@1  10.00%  R@5  50.00%  R@10 100.00%",
        "  text to image R@1  10.00%  R@5  50.00%  R@10 100.00%"]


# ----------------------------------------------------------------------------- data

def write_imagefolder(root, classes=("red_circle", "blue_square"), per_class=3, groups=("a", "b")):
    for c, cls in enumerate(classes):
        for g in groups:
            os.makedirs(os.path.join(root, cls, g), exist_ok=True)
            for i in range(per_class):
                drawn_image(10 * c + i, 20 + i, 18).save(os.path.join(root, cls, g, f"{i}.png"))
    with open(os.path.join(root, classes[0], "notes.txt"), "w") as f:
        f.write("not an image: ignored")
    return str(root)


def test_imagefolder_and_csv_data(tmp_path):
    data = data_lib.open_eval_data(write_imagefolder(tmp_path / "folder"))
    assert data.classnames == ["blue square", "red circle"] and len(data) == 12
    assert data.labels.tolist() == [0] * 6 + [1] * 6
    assert data.keys[0] == "blue_square/a/0.png" and data.group_values("level:1")[:4] == ["a", "a", "a", "b"]
    names = tmp_path / "names.txt"
    names.write_text("square\ncircle\n")
    assert data_lib.open_eval_data(str(tmp_path / "folder"), classnames=str(names)).classnames == ["square", "circle"]
    names.write_text("just one\n")
    with pytest.raises(ValueError, match="1 names for the 2 classes"):
        data_lib.open_eval_data(str(tmp_path / "folder"), classnames=str(names))

    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "source"])
        w.writerow(["folder/red_circle/a/0.png", "a red circle", "web"])
        w.writerow(["folder/blue_square/a/1.png", "a blue square", "book"])
        w.writerow(["folder/red_circle/a/0.png", "a round red thing", "web"])
    data = data_lib.open_eval_data(str(path))
    assert data.captions == [["a red circle", "a round red thing"], ["a blue square"]]
    assert data.group_values("source") == ["web", "book"] and data.labels is None
    with pytest.raises(ValueError, match="has no labels"):
        data.need_labels("zeroshot")
    labelled = data_lib.open_eval_data(str(path), label_column="source")
    assert labelled.classnames == ["book", "web"] and labelled.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="no column 'path' \\(--image-column\\)"):
        data_lib.open_eval_data(str(path), image_column="path")
    with pytest.raises(ValueError, match="no such file or directory"):
        data_lib.open_eval_data(str(tmp_path / "nowhere"))


def decoded(data):
    return [np.asarray(Image.open(io.BytesIO(data.image(i))).convert("RGB")) for i in range(len(data))]


def test_clip_benchmark_webdataset_shards(tmp_path):
    """CLIP_benchmark's WebDataset layout (nshards.txt, {0..N-1}.tar, the metadata files):
    labels from cls, class names and templates ({c} read as {}) from the dataset folder or
    the split folder, captions of a retrieval set from txt, images read lazily from the tar
    byte for byte, in webp, png and jpg."""
    formats = ("webp", "png", "jpg")
    pictures = [drawn_image(i, 22 + i, 18) for i in range(8)]
    split = write_wds(tmp_path / "pets", "test", [(p, i % 3) for i, p in enumerate(pictures)],
                      classnames=["cat", "dog", "golden retriever", "unused"],
                      templates=["a photo of a {c}.", "{c}!"], image_format=formats)
    data = data_lib.open_eval_data(str(tmp_path / "pets"))
    assert data.name == split and len(data) == 8
    assert data.keys[:4] == ["0.tar/s0000000", "0.tar/s0000001", "0.tar/s0000002", "1.tar/s0000003"]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [i % 3 for i in range(8)]
    assert data.classnames == ["cat", "dog", "golden retriever", "unused"] and data.captions is None
    assert data.templates == ("a photo of a {}.", "{}!")
    templates_file = str(tmp_path / "pets" / "zeroshot_classification_templates.txt")
    assert data.metadata == templates_file
    for i, (got, picture) in enumerate(zip(decoded(data), pictures)):
        lossless = formats[i % 3] != "jpg"
        want = picture if lossless else Image.open(io.BytesIO(encode_image(picture, "JPEG")))
        np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))
    assert features.Views(data, 16)[5].shape == (16, 16, 3)
    assert data_lib.open_eval_data(split).keys == data.keys          # the split folder itself

    with open(os.path.join(split, "classnames.txt"), "w") as f:      # the split folder's first
        f.write("kitten\npuppy\nretriever\n")
    os.remove(templates_file)
    own = data_lib.open_eval_data(split)
    assert own.classnames == ["kitten", "puppy", "retriever"] and own.templates is None and own.metadata == ""
    assert own.fingerprint == data.fingerprint
    os.utime(os.path.join(split, "2.tar"), (0, 0))
    assert data_lib.open_eval_data(split).fingerprint != data.fingerprint

    captions = [[f"picture {i}", f"drawing {i}"] for i in range(5)]
    coco = write_wds(tmp_path / "coco", "test", list(zip(pictures, captions)), dataset_type="retrieval",
                     image_format="png", per_shard=2)
    data = data_lib.open_eval_data(coco)
    assert data.captions == captions and data.labels is None and data.templates is None
    assert data.keys[-1] == "2.tar/s0000004"
    np.testing.assert_array_equal(decoded(data)[4], np.asarray(pictures[4]))
    with pytest.raises(ValueError, match="has no labels"):
        data.need_labels("zeroshot")


def test_clip_benchmark_webdataset_errors_name_the_shard_sample_or_file(tmp_path):
    picture = encode_image(drawn_image(0, 20, 18), "PNG")

    def shards(name, *members, nshards=1, dataset_type=None):
        """A dataset with one shard 0.tar of `members` (name, bytes or str)."""
        root = tmp_path / name
        split = write_wds(root, "test", [], classnames=["cat", "dog"], dataset_type=dataset_type)
        with tarfile.open(os.path.join(split, "0.tar"), "w") as tar:
            for member, value in members:
                tar_add(tar, member, value)
        with open(os.path.join(split, "nshards.txt"), "w") as f:
            f.write(f"{nshards}\n")
        return str(root)

    good = [("a.png", picture), ("a.cls", "1"), ("b.png", picture), ("b.cls", "0")]
    assert data_lib.open_eval_data(shards("good", *good)).labels.tolist() == [1, 0]
    cases = [
        (shards("missing", *good, nshards=2), r"--data .*missing/test: shard .*missing/test/1.tar "
                                              r"does not exist \(.*nshards.txt says 2\)"),
        (shards("no_image", *good, ("c.cls", "1")),
         r"no_image/test/0.tar, sample 'c': no image \(webp, png, jpg, jpeg\) member; it has: cls"),
        (shards("no_cls", ("x.png", picture), *good),
         r"no_cls/test/0.tar, sample 'x': no cls member; it has: png"),
        (shards("bad_cls", *good, ("c.png", picture), ("c.cls", "cat")),
         r"bad_cls/test/0.tar, sample 'c': its cls member b'cat' is not a label"),
        (shards("negative", *good, ("c.png", picture), ("c.cls", "-1")),
         r"negative/test/0.tar, sample 'c': its cls member b'-1' is not a label"),
        (shards("no_txt", *good, dataset_type="retrieval"),
         r"no_txt/test/0.tar, sample 'a': no txt member; it has: cls, png"),
        (shards("few_names", *good, ("c.png", picture), ("c.cls", "2")),
         r"few_names/classnames.txt: 2 class names, but sample 0.tar/c has label 2"),
        (shards("multilabel", *good, dataset_type="multilabel"),
         r"multilabel/dataset_type.txt: dataset type 'multilabel' is not supported"),
    ]
    no_names = shards("no_names", *good)
    os.remove(os.path.join(no_names, "classnames.txt"))
    cases.append((no_names, r"no_names/test: no classnames.txt in it or in .*no_names \(the class names"))
    bad_template = shards("bad_template", *good)
    with open(os.path.join(bad_template, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("a photo of a {c}.\na photo.\n")
    cases.append((bad_template, r"bad_template/zeroshot_classification_templates.txt, line 2: "
                                r"template 'a photo.' has no '\{\}'"))
    not_a_tar = shards("not_a_tar", *good)
    with open(os.path.join(not_a_tar, "test", "0.tar"), "wb") as f:
        f.write(b"not a tar " * 100)
    cases.append((not_a_tar, r"not_a_tar/test/0.tar: not a readable \(uncompressed\) tar file"))
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            data_lib.open_eval_data(spec)


def test_clip_benchmark_webdataset_shards_on_gcs_equal_local_ones(tmp_path):
    """Shards in a bucket (a local GCS emulator) are indexed and read as the same local ones."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    from clip_jax import paths
    from tests.helpers import GCS_BUCKET, gcs_emulator
    local = tmp_path / "pets"
    write_wds(local, "test", [(drawn_image(i, 20, 18), i % 2) for i in range(5)], classnames=["cat", "dog"],
              templates=["a {c}."], image_format=("webp", "jpg"), per_shard=2)
    with gcs_emulator():
        remote = f"gs://{GCS_BUCKET}/clip_benchmark/pets"
        for rel in paths.walk_files(str(local)):
            paths.write_bytes(f"{remote}/{rel}", (local / rel).read_bytes())
        want, got = data_lib.open_eval_data(str(local)), data_lib.open_eval_data(remote)
        assert got.name == f"{remote}/test" and got.keys == want.keys and len(got) == 5
        assert got.labels.tolist() == want.labels.tolist() and got.classnames == want.classnames
        assert got.templates == want.templates == ("a {}.",)
        assert [got.image(i) for i in range(5)] == [want.image(i) for i in range(5)]


def test_an_evaluation_image_that_is_a_fifo_is_an_error_not_a_hang(tmp_path):
    root = write_imagefolder(tmp_path / "folder", per_class=1, groups=("a",))
    os.mkfifo(os.path.join(root, "red_circle", "a", "1.png"))
    data = data_lib.open_eval_data(root)
    views = features.Views(data, 16)
    with deadline(60), pytest.raises(ValueError, match=r"image 'red_circle/a/1.png' is unusable "
                                                       r"\(not_a_file: a FIFO"):
        [views[i] for i in range(len(data))]


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    """As torchvision's ImageFolder: a class folder without an image would be an extra class
    of the zero-shot classifier that no image belongs to (changing top-1 silently)."""
    root = write_imagefolder(tmp_path / "folder")
    os.makedirs(os.path.join(root, "green_star", "a"))
    with open(os.path.join(root, "green_star", "a", "readme.txt"), "w") as f:
        f.write("no image")
    with pytest.raises(ValueError, match=r"folder: 1 class folder\(s\) hold no images .*: green_star;"):
        data_lib.open_eval_data(root)
    fake = data_lib.EvalData("d", ValueReader(), ["a", "b"], np.array([0, 0]), ["x", "y"])
    result = report.classification_report(np.array([[1.0, 0.0], [0.0, 1.0]]), fake.labels, fake.classnames)[0]
    assert result["classes"] == 2 and len(result["per_class"]) == 1


def test_ingested_imagefolder_keeps_labels_and_groups(tmp_path):
    from clip_jax import ingest
    src = write_imagefolder(tmp_path / "folder")
    ingest.main(["imagefolder", src, "--out", str(tmp_path / "ingested"), "--workers", "0", "--min-size", "8", "--no-progress"])
    data = data_lib.open_eval_data(str(tmp_path / "ingested"))
    direct = data_lib.open_eval_data(src)
    assert data.classnames == direct.classnames and data.labels.tolist() == direct.labels.tolist()
    assert data.keys == direct.keys and data.group_values("level:1") == direct.group_values("level:1")
    assert all(len(c) == 1 and c[0].endswith(".") for c in data.captions)   # prompt captions


def test_tfds_data_labels_captions_and_images(tmp_path):
    import tensorflow_datasets as tfds
    from tests.helpers import build_tfds_dataset, encode_image
    examples = [(encode_image(drawn_image(i, 24, 20), "PNG"), f"picture {i}", i % 3) for i in range(7)]
    build_tfds_dataset(tmp_path, "eval_pictures", ["golden_retriever", "cat", "car"], examples)
    data = data_lib.open_eval_data("tfds:eval_pictures:train", data_dir=str(tmp_path))
    stored = tfds.data_source("eval_pictures", split="train", data_dir=str(tmp_path))   # TFDS's order
    assert data.classnames == ["golden retriever", "cat", "car"] and len(data) == 7
    assert data.labels.tolist() == [int(stored[i]["label"]) for i in range(7)]
    assert data.captions == [[stored[i]["caption"].decode()] for i in range(7)]
    view = features.Views(data, 16)[3]
    assert view.shape == (16, 16, 3) and view.dtype == np.uint8
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'eval_pictures' split 'test'"):
        data_lib.open_eval_data("tfds:eval_pictures:test", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="tfds:eval_pictures needs a split for evaluation"):
        data_lib.open_eval_data("tfds:eval_pictures", data_dir=str(tmp_path))   # no default split


def test_a_broken_image_stops_the_evaluation_naming_it(tmp_path):
    root = write_imagefolder(tmp_path / "folder")
    with open(os.path.join(root, "red_circle", "b", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    model = FakeModel(np.zeros((256, 2)), {})
    with pytest.raises(ValueError, match="red_circle/b/broken.jpg.*not_an_image"):
        features.image_features(model, data_lib.open_eval_data(root), progress=False)


# ----------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("model") / "weights")


@pytest.fixture(scope="module")
def loaded(model_dir):
    import clip_jax
    return clip_jax.load(model_dir, batch_size=8)


def test_zeroshot_on_image_files_equals_manual_computation(loaded, tmp_path):
    root = write_imagefolder(tmp_path / "folder", classes=("circle", "square", "star"), per_class=4)
    data = data_lib.open_eval_data(root)
    templates = ("a photo of a {}.", "a {} shape.")
    result = zeroshot.evaluate(loaded, data, templates, group_by="level:1", progress=False,
                               cache_dir=str(tmp_path / "cache"))
    # By hand: decode + centre crop each file, the public encoders, numpy.
    images = np.stack([loaded.preprocess(Image.open(os.path.join(root, k))) for k in data.keys])
    image = loaded.encode_image(images, normalize=True)
    weights = []
    for c in data.classnames:
        t = loaded.encode_text(loaded.tokenize([tp.format(c) for tp in templates]), normalize=True)
        weights.append(t.mean(0) / np.linalg.norm(t.mean(0)))
    pred = np.argmax(image @ np.stack(weights).T, axis=1)
    assert result["top1"] == pytest.approx(np.mean(pred == data.labels))
    for g in ("a", "b"):
        mask = np.array(data.group_values("level:1")) == g
        assert result["groups"][g]["top1"] == pytest.approx(np.mean(pred[mask] == data.labels[mask]))
    # The cached features are reused: the image tower is not run again.
    cached = features.image_features(loaded, data, str(tmp_path / "cache"))
    np.testing.assert_allclose(cached, loaded.encode_image(images), rtol=1e-5, atol=1e-6)
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_loaded_model_api(loaded, model_dir):
    import clip_jax
    ids = loaded.tokenize(["a red circle.", "a blue square on a gray background."])
    assert ids.dtype == np.int32 and ids.shape == (2, loaded.context_length)
    together = loaded.encode_text(np.concatenate([ids] * 6))            # 12 texts: 2 batches of 8
    one = loaded.encode_text(ids[:1])
    np.testing.assert_allclose(together[0], one[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[7], one[0] if 7 % 2 == 0 else together[1], rtol=1e-5, atol=1e-6)
    assert [loaded.padded_size(n) for n in (1, 3, 8, 9)] == [1, 4, 8, 8]
    pil = drawn_image(3, 30, 20)
    as_array = loaded.preprocess(np.asarray(pil))
    np.testing.assert_array_equal(loaded.preprocess(pil), as_array)
    assert as_array.shape == (16, 16, 3) and as_array.dtype == np.float32
    emb = loaded.encode_image(as_array[None], normalize=True)
    assert emb.shape == (1, 32) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="expects float32 \\[n, 16, 16, 3\\]"):
        loaded.encode_image(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="see `tokenize`"):
        loaded.encode_text(np.zeros((1, 5), np.int32))
    raw = float(np.asarray(loaded.variables["params"]["logit_scale"]))
    assert loaded.logit_scale == pytest.approx(np.exp(raw))
    with pytest.raises(ValueError, match="no checkpoint found"):
        clip_jax.load(os.path.dirname(model_dir))


def _with_nan_projection(model):
    """`model` (a loaded CLIPModel) whose image projection is NaN: every image embedding is."""
    import copy
    nan = copy.copy(model)
    params = dict(model.variables["params"])
    params["visual"] = {**params["visual"], "proj": params["visual"]["proj"] * np.nan}
    nan.variables = {**model.variables, "params": params}
    return nan


def test_non_finite_embeddings_are_refused_naming_the_checkpoint(loaded, model_dir, tmp_path):
    """NaN features would still give figures (argmax over NaN logits picks class 0): the
    encoders refuse them, so evaluation, search and training's evals never score them."""
    import clip_jax
    from clip_jax.apps import search
    nan = _with_nan_projection(loaded)
    data = data_lib.open_eval_data("synthetic", loaded.config)
    with pytest.raises(clip_jax.inference.NonFiniteEmbeddings,
                       match=rf"checkpoint {model_dir}: non-finite image embeddings \(NaN or infinity\) "
                             r"for 8 of 8 inputs \(rows 0-7 of 32\)"):
        zeroshot.evaluate(nan, data, progress=False)
    with pytest.raises(ValueError, match="1 of the 2 images hold NaN or infinite values"):
        loaded.encode_image(np.stack([np.zeros((16, 16, 3)), np.full((16, 16, 3), np.nan)]))
    images = tmp_path / "images"
    images.mkdir()
    drawn_image(1, 20, 20).save(images / "a.png")
    with pytest.raises(clip_jax.inference.NonFiniteEmbeddings):
        search.build_index(nan, str(images), str(tmp_path / "index"), progress=False)
    assert search.Index.open(str(tmp_path / "index")).count == 0          # nothing indexed


def test_training_evals_log_nan_figures_and_a_warning_for_non_finite_embeddings(loaded, capsys):
    import types
    config = loaded.config
    evaluators = training_evals.TrainingEvaluators(config, loaded.tokenizer, loaded.mesh, loaded.rules)
    nan = _with_nan_projection(loaded).variables
    out = evaluators(types.SimpleNamespace(params=nan["params"], batch_stats={}))
    assert set(out) == {f"zeroshot/{a}/{k}" for a in ("shape", "color")
                        for k in ("top1", "top5", "mean_per_class")} | {"zeroshot/top1"}
    assert all(np.isnan(v) for v in out.values())
    printed = capsys.readouterr().out
    assert "WARNING: evaluation zeroshot/shape logged as NaN: the current weights: non-finite image" in printed
    out = evaluators(types.SimpleNamespace(params=loaded.variables["params"], batch_stats={}))
    assert all(np.isfinite(v) for v in out.values())


def test_training_evals_equal_the_command_line_on_the_saved_checkpoint(tmp_path, capsys):
    """config.evals during training and `python -m clip_jax.evaluate` on the saved checkpoint
    (loaded from disk, other batch size) give the same figures; also from a step directory."""
    wd = str(tmp_path / "run")
    config = tiny_config(total_steps=6, batch_size=16)
    config.evals.caps = ml_collections.ConfigDict(dict(task="retrieval", data="synthetic"))
    config.evals.bench = ml_collections.ConfigDict(dict(task="suite", data="synthetic,synthetic:color",
                                                        out=str(tmp_path / "suite")))
    train.train(config, wd)
    logged = metrics.read_metrics(wd)[-1]
    # The suite's figures are those of the single tasks, logged under its entry, its files written.
    assert logged["suite/bench/synthetic/acc1"] == logged["zeroshot/shape/top1"]
    assert logged["suite/bench/synthetic_color/mean_per_class_recall"] == logged["zeroshot/color/mean_per_class"]
    assert logged["suite/bench/synthetic/image_retrieval_recall@5"] == logged["retrieval/caps/text_to_image_R@5"]
    assert sorted(os.listdir(tmp_path / "suite")) == sorted(
        ["suite.csv", "suite.md"] + [f"synthetic{c}__clip_jax_en_zeroshot_{t}.json" for c, t in
                                     (("", "classification"), ("", "retrieval"), ("_color", "classification"),
                                      ("_color", "retrieval"))])
    out = evaluate.main(["suite", "--workdir", wd, "--datasets=synthetic:color", "--tasks=zeroshot",
                         f"--out={tmp_path / 'cli'}", "--no-progress"])
    assert [r["task"] for r in out["rows"]] == ["zeroshot_classification"]
    assert out["synthetic_color/acc1"] == logged["suite/bench/synthetic_color/acc1"]
    assert logged["zeroshot/top1"] == pytest.approx(
        (logged["zeroshot/shape/top1"] + logged["zeroshot/color/top1"]) / 2)
    for attr in ("shape", "color"):
        out = evaluate.main(["zeroshot", "--workdir", wd, "--data", f"synthetic:{attr}",
                             "--no-progress", "--json"])
        assert out["top1"] == logged[f"zeroshot/{attr}/top1"]
        assert out["n"] == config.data.synthetic.num_eval
    out = evaluate.main(["retrieval", "--checkpoint", os.path.join(wd, "checkpoints", "6"),
                         "--data", "synthetic", "--no-progress", "--json"])
    assert out["text_to_image_R@5"] == logged["retrieval/caps/text_to_image_R@5"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "retrieval"


def test_bad_evals_stop_training_before_any_step(tmp_path):
    config = tiny_config()
    config.evals.bad = ml_collections.ConfigDict(dict(task="zeroshot", data="synthetic", train_data="x"))
    with pytest.raises(config_lib.ConfigError, match="config.evals.bad: train_data does not apply to zeroshot"):
        validation.validate(config)
    config.evals.bad = ml_collections.ConfigDict(dict(task="zeroshot", data="tfds:cifar10"))
    with pytest.raises(config_lib.ConfigError, match="config.evals.bad.data 'tfds:cifar10'.*needs a split"):
        validation.validate(config)
    config.evals.bad = ml_collections.ConfigDict(dict(task="zeroshot", data=str(tmp_path / "missing")))
    with pytest.raises(config_lib.ConfigError, match="config.evals.bad.data.*missing.*no such file or directory"):
        train.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_image_features_sharded_over_8_devices_equal_one_device(model_dir, tmp_path):
    root = write_imagefolder(tmp_path / "folder", per_class=5)
    code = f"""
        import json, jax, numpy as np, clip_jax
        from clip_jax.evals import data, features
        m = clip_jax.load({model_dir!r}, batch_size=8)
        f = features.image_features(m, data.open_eval_data({root!r}), progress=False)
        print(json.dumps({{"devices": jax.device_count(), "shards": m._shards, "f": f.tolist()}}))
    """
    one, eight = run_python(code, 1), run_python(code, 8)
    assert (one["devices"], eight["devices"], eight["shards"]) == (1, 8, 8)
    np.testing.assert_allclose(eight["f"], one["f"], rtol=1e-5, atol=1e-6)


def test_cli_errors_name_the_problem(model_dir):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "clip_jax.evaluate", "zeroshot", "--checkpoint", model_dir,
                           "--data", "synthetic:size"], cwd=REPO, env=device_env(1),
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "error: --data 'synthetic:size': the synthetic data has no label 'size'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "clip_jax.evaluate", "linear_probe", "--checkpoint",
                           model_dir, "--data", "synthetic", "--train-data", "tfds:cifar10"],
                          cwd=REPO, env=device_env(1), capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: --train-data 'tfds:cifar10': tfds:cifar10 needs a split" in proc.stderr


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_smoke_model_trained_on_an_ingested_imagefolder_evaluated_from_the_command_line(tmp_path):
    """ImageFolder corpus -> ingest -> smoke training -> the three evaluators from the CLI."""
    import subprocess
    import sys
    train_dir = synthetic.export_imagefolder(str(tmp_path / "train"), 960, "train", seed=1, image_size=48)
    test_dir = synthetic.export_imagefolder(str(tmp_path / "test"), 192, "train", seed=2, image_size=48)
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=device_env(1),
                                       capture_output=True, text=True, timeout=600)
    proc = run("clip_jax.ingest", "imagefolder", train_dir, "--out", str(tmp_path / "ingested"),
               "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    wd = str(tmp_path / "run")
    proc = run("clip_jax.train", "--config=configs/smoke.py", f"--workdir={wd}",
               f"--config.data.source={tmp_path / 'ingested'}", "--config.total_steps=200",
               "--config.log_every=50", "--config.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zeroshot/top1" not in metrics.read_metrics(wd)[-1]   # the synthetic evals are not run

    proc = run("clip_jax.evaluate", "zeroshot", f"--workdir={wd}", f"--data={test_dir}",
               "--group-by=level:1", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top-1" in proc.stdout and "by level:1" in proc.stdout
    zs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert zs["n"] == 192 and [r["class"] for r in zs["per_class"]] == sorted(synthetic.SHAPES)
    assert set(zs["groups"]) <= set(synthetic.COLORS) and sum(g["n"] for g in zs["groups"].values()) == 192
    assert zs["top1"] > 0.5, zs["top1"]              # 6 shapes: chance is 1/6

    # The same command line, in process: retrieval over a CSV of the test images with their
    # own captions (the ingested ones are a few class prompts, shared by many images), and
    # the linear probe on the ingested training images.
    ret = evaluate.main(["retrieval", f"--workdir={wd}", f"--data={test_dir}/captions.csv",
                         "--no-progress", "--json"])
    assert ret["images"] == ret["texts"] == 192
    assert ret["text_to_image_R@10"] > 0.15, ret      # chance: 10/192
    probe = evaluate.main(["linear_probe", f"--workdir={wd}", f"--train-data={tmp_path / 'ingested'}",
                           f"--data={test_dir}", "--no-progress", "--json"])
    assert probe["train_n"] == 960 and probe["n"] == 192
    assert probe["top1"] > 0.5, probe["top1"]


def test_cli_option_errors_name_the_flag(model_dir):
    with pytest.raises(SystemExit, match="linear_probe needs --train-data"):
        evaluate.main(["linear_probe", "--checkpoint", model_dir, "--data", "synthetic"])
    with pytest.raises(SystemExit, match="--templates does not apply to retrieval"):
        evaluate.main(["retrieval", "--checkpoint", model_dir, "--data", "synthetic", "--templates", "t.txt"])
    with pytest.raises(SystemExit, match="--group-by 'colour': synthetic:shape has no such attribute "
                                         "\\(it has: background, position, size, level:N\\)"):
        evaluate.main(["zeroshot", "--checkpoint", model_dir, "--data", "synthetic:shape", "--group-by", "colour"])


# ----------------------------------------------------------------------------- processes

_EVAL_ON_PROCESSES = r'''
import dataclasses, json, sys

def main():
    import jax
    nproc, pid, port, model_dir, folder = sys.argv[1:6]
    if int(nproc) > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=int(nproc), process_id=int(pid))
    import clip_jax
    from clip_jax.evals import data as data_lib, features, zeroshot
    model = clip_jax.load(model_dir, batch_size=8)
    data = data_lib.open_eval_data(folder)
    read = []

    class Counting:                      # the rows this process decodes
        def __init__(self, reader):
            self.reader = reader

        def __getitem__(self, i):
            read.append(int(i))
            return self.reader[i]

    data = dataclasses.replace(data, reader=Counting(data.reader))
    image = features.image_features(model, data, progress=False)
    share = sorted(read)
    result = zeroshot.evaluate(model, data, ("a photo of a {}.", "a {} shape."), progress=False)
    print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                      "read": share, "features": image.tolist(), "zeroshot": result}))

if __name__ == "__main__":
    main()
'''


def test_two_processes_each_decode_their_share_and_equal_one_process(model_dir, tmp_path):
    """2 processes x 1 device against 1 process x 2 devices: each of the two decodes only
    the rows its device embeds (disjoint, together all), and the features and zero-shot
    figures are those of the one process."""
    folder = write_imagefolder(tmp_path / "folder", classes=("circle", "square", "star"))
    script = tmp_path / "eval_processes.py"
    script.write_text(_EVAL_ON_PROCESSES)
    port = free_port()
    outs = run_scripts_together(script, [(2, (1, 0, 0, model_dir, folder)),
                                         (1, (2, 0, port, model_dir, folder)),
                                         (1, (2, 1, port, model_dir, folder))])
    one, first, second = outs
    n = 3 * 3 * 2
    assert [o["processes"] for o in outs] == [1, 2, 2] and {o["devices"] for o in outs} == {2}
    # 18 rows in batches of 8, 8 and 2 over 2 devices: each process decodes its half of
    # each batch (process 0 the first); nothing twice, nothing left out.
    assert one["read"] == list(range(n))
    assert not set(first["read"]) & set(second["read"])
    assert sorted(first["read"] + second["read"]) == list(range(n))
    assert first["read"] == [0, 1, 2, 3, 8, 9, 10, 11, 16]
    np.testing.assert_allclose(first["features"], one["features"], rtol=0, atol=1e-6)
    assert first["features"] == second["features"]
    for key in ("top1", "top5", "mean_per_class", "per_class"):
        assert first["zeroshot"][key] == second["zeroshot"][key] == one["zeroshot"][key]


_OPEN_ON_PROCESSES = r'''
import json, sys

def main():
    import jax
    nproc, pid, port, specs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if int(nproc) > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=int(nproc), process_id=int(pid))
    from clip_jax import paths
    from clip_jax.data import records
    from clip_jax.evals import data as data_lib
    read = {"classes": [], "records": [], "shards": []}     # what this process looked into
    walk, get, index = paths.walk_files, records.IngestedSource.__getitem__, data_lib.index_wds_shard
    paths.walk_files = lambda d: read["classes"].append(d.rsplit("/", 1)[-1]) or walk(d)
    records.IngestedSource.__getitem__ = lambda self, i: read["records"].append(int(i)) or get(self, i)
    data_lib.index_wds_shard = lambda p, *a: read["shards"].append(p.rsplit("/", 1)[-1]) or index(p, *a)
    out = {}
    for name, spec in specs.items():
        try:
            d = data_lib.open_eval_data(spec)
            out[name] = [d.keys, None if d.labels is None else d.labels.tolist(), d.captions,
                         d.classnames, d.fingerprint]
        except ValueError as e:
            out[name] = str(e)
    print(json.dumps({"data": out, "read": read}))

if __name__ == "__main__":
    main()
'''


def test_two_processes_each_read_their_share_of_the_index(tmp_path):
    """An ImageFolder's class folders, an ingested directory's records and CLIP_benchmark's
    shards: with 2 processes each reads only its share (disjoint, together all) and both get
    the data one process opens; a bad shard in the second process's share is the same error
    on both (no process left waiting)."""
    folder = write_imagefolder(tmp_path / "folder", classes=("circle", "square", "star", "ring"))
    ingested = write_ingested(tmp_path / "ingested", 9, records_per_shard=4)
    samples = [(drawn_image(i, 20, 18), i % 3) for i in range(10)]
    shards = write_wds(tmp_path / "wds", "test", samples, classnames=["a", "b", "c"], per_shard=3)
    bad = write_wds(tmp_path / "bad", "test", samples, classnames=["a", "b", "c"], per_shard=3)
    with open(os.path.join(bad, "3.tar"), "wb") as f:
        f.write(b"not a tar " * 100)
    specs = json.dumps({"folder": folder, "ingested": ingested, "wds": str(tmp_path / "wds"),
                        "bad": str(tmp_path / "bad")})
    script = tmp_path / "open_processes.py"
    script.write_text(_OPEN_ON_PROCESSES)
    port = free_port()
    one, first, second = run_scripts_together(script, [(1, (1, 0, 0, specs)), (1, (2, 0, port, specs)),
                                                       (1, (2, 1, port, specs))])
    assert first["data"] == second["data"] == one["data"]
    assert "bad/test/3.tar: not a readable (uncompressed) tar file" in one["data"]["bad"]
    assert one["read"]["classes"] == ["circle", "ring", "square", "star"]
    assert (first["read"]["classes"], second["read"]["classes"]) == (["circle", "ring"], ["square", "star"])
    assert one["read"]["records"] == list(range(9))
    assert (first["read"]["records"], second["read"]["records"]) == ([0, 1, 2, 3], [4, 5, 6, 7, 8])
    wds_shards = ["0.tar", "1.tar", "2.tar", "3.tar"]
    assert one["read"]["shards"] == wds_shards * 2          # wds, then bad (it reads all four)
    assert first["read"]["shards"] == ["0.tar", "1.tar"] * 2
    assert second["read"]["shards"] == ["2.tar", "3.tar"] * 2
    assert len(shards) and one["data"]["wds"][1] == [i % 3 for i in range(10)]


# ----------------------------------------------------------------------------- shipped metadata

def test_shipped_zero_shot_metadata():
    """The paper's 80 ImageNet templates and its 7-template subset, OpenAI's 1,000 curated
    ImageNet names in wnid order, and CLIP_benchmark's templates and names of other datasets,
    each by name; an unknown name is refused with the list."""
    from clip_jax.data import prompts, zeroshot_metadata as zm
    eighty, seven = zm.templates("imagenet1k"), zm.templates("imagenet1k_7")
    assert len(eighty) == 80 and len(seven) == 7 and set(seven) <= set(eighty)
    for name in zm.template_names():
        for t in zm.templates(name):
            prompts.check_template(t)                  # '{}' for the class name, nothing else
    names, wnids = zm.classnames("imagenet1k"), zm.imagenet_wnids()
    assert len(names) == len(wnids) == 1000 and wnids == sorted(wnids)
    assert (names[0], wnids[0]) == ("tench", "n01440764") and names[-1] == "toilet paper"
    assert {"cifar10", "food101", "sun397", "cars", "dtd", "pets"} <= set(zm.template_names())
    assert len(zm.templates("cifar10")) == 18 and len(zm.classnames("pets")) == 37
    # Wnid class folders (any subset, in sorted order) get their own names; others by count.
    assert zm.classnames_for("imagenet1k", ["n01443537", "n15075141"]) == ["goldfish", "toilet paper"]
    with pytest.raises(ValueError, match="1000 names for the 2 classes"):
        zm.classnames_for("imagenet1k", ["cat", "dog"])
    with pytest.raises(ValueError, match=r"not ImageNet-1k wnids"):
        zm.classnames_for("imagenet1k", ["n01443537", "n99999999"])
    with pytest.raises(ValueError, match="no templates named 'imagenet'; the shipped ones: caltech101"):
        zm.templates("imagenet")
    assert (zm.for_tfds("imagenet2012"), zm.for_tfds("oxford_iiit_pet"), zm.for_tfds("coco")) == \
        ("imagenet1k", "pets", None)


def test_zeroshot_with_the_papers_templates_and_imagenet_names_from_the_command_line(tmp_path, model_dir):
    """`--templates=imagenet1k --classnames=imagenet1k` on a folder whose class folders are
    ImageNet wnids: 80 templates, OpenAI's curated names; the report says where they came
    from; a config.evals entry takes the same names, and an unknown one is refused."""
    root = write_imagefolder(tmp_path / "imagenet", classes=("n01443537", "n02123045", "n15075141"),
                             per_class=2, groups=("a",))
    out = evaluate.main(["zeroshot", "--checkpoint", model_dir, f"--data={root}", "--templates=imagenet1k",
                         "--classnames=imagenet1k", "--no-progress", "--json"])
    assert out["templates"] == 80 and out["templates_from"] == "imagenet1k, shipped"
    assert [r["class"] for r in out["per_class"]] == ["goldfish", "tabby cat", "toilet paper"]
    assert out["n"] == 6
    config = tiny_config()
    config.evals = ml_collections.ConfigDict({"inet": dict(
        task="zeroshot", data=root, templates="imagenet1k_7", classnames="imagenet1k")})
    validation.validate(config, 1)
    config.evals.inet.templates = "imagenet2"
    with pytest.raises(config_lib.ConfigError, match=r"config.evals.inet.templates: no such file 'imagenet2' "
                                                     r"\(nor a shipped name\)"):
        validation.validate(config, 1)


def test_zeroshot_on_clip_benchmark_shards_equals_the_same_images_in_a_folder(tmp_path, model_dir, loaded):
    """The images and classes of an ImageFolder written as CLIP_benchmark's shards (webp and
    png, two shards) have its image features and score as it does, the shards' templates
    file taking the place of --templates (and named in the report); the suite finds the
    shards as a named dataset under --data-root, with their class names and templates."""
    folder = write_imagefolder(tmp_path / "folder", per_class=3, groups=("a",))
    images = data_lib.open_eval_data(folder)
    samples = [(Image.open(io.BytesIO(images.image(i))), int(images.labels[i])) for i in range(len(images))]
    templates = ["a drawing of a {c}.", "itap of the {c}."]
    root = tmp_path / "root"
    write_wds(root / "shapes", "test", samples, classnames=images.classnames, templates=templates,
              image_format=("webp", "png"), per_shard=4)
    (tmp_path / "templates.txt").write_text("\n".join(t.replace("{c}", "{}") for t in templates))
    shards = data_lib.open_eval_data(str(root / "shapes"))
    assert shards.labels.tolist() == images.labels.tolist() and shards.classnames == images.classnames
    np.testing.assert_array_equal(features.image_features(loaded, shards, progress=False),
                                  features.image_features(loaded, images, progress=False))
    run = lambda data, *flags: evaluate.main(["zeroshot", "--checkpoint", model_dir, f"--data={data}",  # noqa: E731
                                              "--no-progress", *flags])
    want = run(folder, f"--templates={tmp_path / 'templates.txt'}")
    got = run(root / "shapes")
    assert got["n"] == len(images) == 6 and got["templates"] == 2
    assert {k: got[k] for k in ("top1", "top5", "mean_per_class", "per_class")} == \
        {k: want[k] for k in ("top1", "top5", "mean_per_class", "per_class")}
    assert got["templates_from"] == str(root / "shapes" / "zeroshot_classification_templates.txt")
    entry = suite.resolve("shapes", str(root))
    assert data_lib.open_eval_data(entry.spec).name == str(root / "shapes" / "test")
    assert (entry.classnames_file, entry.templates_file) == (
        str(root / "shapes" / "classnames.txt"), got["templates_from"])


def test_a_known_tfds_dataset_takes_its_shipped_templates_and_names(tmp_path, monkeypatch):
    """A TFDS dataset the metadata knows gets its templates (and its curated class names where
    shipped, wnid labels mapped) without being asked, and the report says so."""
    from clip_jax.data import zeroshot_metadata as zm
    from tests.helpers import build_tfds_dataset, encode_image
    examples = [(encode_image(drawn_image(i, 24, 20), "PNG"), f"picture {i}", i % 2) for i in range(4)]
    build_tfds_dataset(tmp_path, "eval_wnids", ["n01443537", "n15075141"], examples)
    monkeypatch.setitem(zm.TFDS_NAMES, "eval_wnids", "imagenet1k")
    data = data_lib.open_eval_data("tfds:eval_wnids:train", data_dir=str(tmp_path))
    assert data.metadata == "imagenet1k" and data.templates == zm.templates("imagenet1k")
    assert data.classnames == ["goldfish", "toilet paper"]
    fake = dataclasses.replace(fake_data(2, [0, 1], ["cat", "dog"]), templates=("a {}.", "the {}."),
                               metadata="pets")
    texts = {t.format(c): np.eye(4)[i] for i, c in enumerate(["cat", "dog"]) for t in fake.templates}
    out = zeroshot.evaluate(FakeModel(np.eye(4)[:2], texts), fake, progress=False)
    assert out["templates"] == 2 and out["templates_from"] == "pets, shipped, for fake"
    monkeypatch.setitem(zm.TFDS_NAMES, "eval_wnids", "cifar10")      # templates only, not names
    data = data_lib.open_eval_data("tfds:eval_wnids:train", data_dir=str(tmp_path))
    assert data.templates == zm.templates("cifar10") and data.classnames == ["n01443537", "n15075141"]


def test_the_suite_writes_clip_benchmark_json_and_one_table(tmp_path, model_dir):
    """Two local datasets in one command: a named one under --data-root (ImageNet wnid folders
    in its val/ split: the paper's templates and names) scored zero-shot, and a CSV of
    captions scored by retrieval; one CLIP_benchmark-schema JSON per dataset and task, whose
    metrics are the single-task commands' figures, and one table."""
    root = tmp_path / "root"
    write_imagefolder(root / "imagenet1k" / "val", classes=("n01443537", "n02123045"), per_class=2,
                      groups=("a",))
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for i, cls in enumerate(["n01443537", "n02123045"]):
            w.writerow([f"root/imagenet1k/val/{cls}/a/0.png", f"picture {i}"])
            w.writerow([f"root/imagenet1k/val/{cls}/a/1.png", f"image {i}"])
    out = tmp_path / "results"
    rows = evaluate.main(["suite", "--checkpoint", model_dir, f"--datasets=imagenet1k,{pairs}",
                          f"--data-root={root}", f"--out={out}", "--no-progress", "--json"])["rows"]
    assert [(r["dataset"], r["task"]) for r in rows] == [("imagenet1k", "zeroshot_classification"),
                                                         ("pairs", "zeroshot_retrieval")]
    pretrained = os.path.basename(model_dir)
    zs = json.loads((out / f"imagenet1k_{pretrained}_clip_jax_en_zeroshot_classification.json").read_text())
    assert set(zs) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert set(zs["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} and zs["language"] == "en"
    single = evaluate.main(["zeroshot", "--checkpoint", model_dir, f"--data={root}/imagenet1k/val",
                            "--templates=imagenet1k", "--classnames=imagenet1k", "--no-progress"])
    assert np.isnan(zs["metrics"].pop("acc5"))          # as CLIP_benchmark below 5 classes
    assert zs["metrics"] == {"acc1": single["top1"], "mean_per_class_recall": single["mean_per_class"]}
    ret = json.loads((out / f"pairs_{pretrained}_clip_jax_en_zeroshot_retrieval.json").read_text())
    single = evaluate.main(["retrieval", "--checkpoint", model_dir, f"--data={pairs}", "--no-progress"])
    assert ret["metrics"] == {"image_retrieval_recall@5": single["text_to_image_R@5"],
                              "text_retrieval_recall@5": single["image_to_text_R@5"]}
    table = list(csv.DictReader(open(out / "suite.csv")))
    assert [t["dataset"] for t in table] == ["imagenet1k", "pairs"] and "acc1" in table[0]
    assert (out / "suite.md").read_text().startswith("| dataset | task | n |")
    with pytest.raises(SystemExit, match="--datasets cifar10: no folder .*cifar10 under --data-root"):
        evaluate.main(["suite", "--checkpoint", model_dir, "--datasets=cifar10", f"--data-root={root}"])


def test_the_suite_adds_a_linear_probe_where_a_train_split_sits_beside_the_data(tmp_path, model_dir):
    """CLIP_benchmark's shards with train/ and test/ splits, and an ImageFolder with train/ and
    val/: zero-shot and a linear probe each (CLIP_benchmark's lp_* metrics, equal to the
    linear_probe command's on the same splits); --tasks leaves tasks out."""
    root = tmp_path / "root"
    for split, n in (("train", 24), ("test", 8)):
        samples = [(drawn_image(i + (100 if split == "test" else 0), 24 + i % 5, 20), i % 3)
                   for i in range(n)]
        write_wds(root / "shapes", split, samples, classnames=["red", "green", "blue"], per_shard=10)
        write_imagefolder(root / "pets" / ("val" if split == "test" else split),
                          classes=("cat", "dog"), per_class=n // 4, groups=("a",))
    out = tmp_path / "results"
    run = lambda *flags: evaluate.main(["suite", "--checkpoint", model_dir, "--datasets=shapes,pets",  # noqa: E731
                                        f"--data-root={root}", f"--out={out}", "--no-progress", *flags])
    rows = run()["rows"]
    assert [(r["dataset"], r["task"]) for r in rows] == [
        ("shapes", "zeroshot_classification"), ("shapes", "linear_probe"),
        ("pets", "zeroshot_classification"), ("pets", "linear_probe")]
    pretrained = os.path.basename(model_dir)
    for name, train_split, test in (("shapes", root / "shapes" / "train", root / "shapes"),
                                    ("pets", root / "pets" / "train", root / "pets" / "val")):
        lp = json.loads((out / f"{name}_{pretrained}_clip_jax_en_linear_probe.json").read_text())
        single = evaluate.main(["linear_probe", "--checkpoint", model_dir, f"--train-data={train_split}",
                                f"--data={test}", "--no-progress"])
        assert lp["task"] == "linear_probe" and np.isnan(lp["metrics"].pop("lp_acc5"))
        assert lp["metrics"] == {"lp_acc1": single["top1"], "lp_mean_per_class_recall": single["mean_per_class"]}
    assert [r["task"] for r in run("--tasks=zeroshot")["rows"]] == ["zeroshot_classification"] * 2
    with pytest.raises(SystemExit, match="--tasks 'captions': not a task of the suite"):
        run("--tasks=zeroshot,captions")
    with pytest.raises(SystemExit, match="--datasets shapes: .* has nothing for the tasks retrieval"):
        run("--tasks=retrieval")
