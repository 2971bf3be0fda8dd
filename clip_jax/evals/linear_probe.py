"""Linear probe (the paper's appendix A.3): logistic regression on frozen image features.

As the paper: scikit-learn's L-BFGS logistic regression (at most 1,000 iterations) on the
image tower's features, its L2 strength chosen on a held-out split of the training data by
a parametric binary search over C = 1/lambda in [1e-6, 1e6]: C = 1e-6, 1e-4, ..., 1e6
first, then the step around the best value is halved until it is 1/8 of a decade. The
held-out split is `val_fraction` of the training images, drawn with `seed`; the chosen C
is then refitted on all the training images and scored on `--data`. Ties in held-out
accuracy go to the smaller C (stronger regularisation).
"""
import warnings

import numpy as np

from clip_jax.evals import features, report
from clip_jax.evals.evaluator import Classification, Option

EIGHTHS = 8                    # grid resolution: steps per decade
LOG_C_RANGE = (-6, 6)          # decades


def fit(x, y, c, max_iter=1000):
    # lazy: scikit-learn takes about a second to import, and only the probe uses it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs").fit(x, y)


def search_c(train_x, train_y, val_x, val_y, max_iter=1000):
    """(best C, {C: held-out accuracy} of every C tried) by the paper's binary search."""
    lo, hi = (d * EIGHTHS for d in LOG_C_RANGE)
    scores = {}    # log10(C) in eighths of a decade -> held-out accuracy

    def score(e):
        if lo <= e <= hi and e not in scores:
            clf = fit(train_x, train_y, 10.0 ** (e / EIGHTHS), max_iter)
            scores[e] = float(np.mean(clf.predict(val_x) == val_y))

    def best():
        return max(sorted(scores), key=lambda e: scores[e])   # first max = smallest C

    step = 2 * EIGHTHS
    for e in range(lo, hi + 1, step):
        score(e)
    while step > 1:
        step //= 2
        centre = best()
        score(centre - step)
        score(centre + step)
    return 10.0 ** (best() / EIGHTHS), {10.0 ** (e / EIGHTHS): s for e, s in sorted(scores.items())}


def split_train_val(n, val_fraction, seed):
    """(train indices, held-out indices): a seeded random `val_fraction` of range(n) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"linear_probe: {n} training images are too few to hold out {val_fraction:.0%}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def probe(train_x, train_y, test_x, test_y, classnames, val_fraction=0.2, seed=0, max_iter=1000):
    """Fits the probe (C chosen on held-out training data) and scores it on the test features.

    Returns (report dict, fitted classifier, bool [n_test] correct)."""
    tr, va = split_train_val(len(train_x), val_fraction, seed)
    c, sweep = search_c(train_x[tr], train_y[tr], train_x[va], train_y[va], max_iter)
    clf = fit(train_x, train_y, c, max_iter)
    logits = np.full((len(test_x), len(classnames)), -np.inf, np.float64)
    scores = clf.decision_function(test_x)
    logits[:, clf.classes_] = np.stack([-scores, scores], 1) if scores.ndim == 1 else scores
    out, top1 = report.classification_report(logits, test_y, classnames)
    return {"C": c, "val_top1": sweep[c], "C_tried": len(sweep), **out}, clf, top1


def evaluate(model, train_data, data, val_fraction=0.2, seed=0, group_by="", cache_dir="",
             progress=True):
    for d in (train_data, data):
        d.need_labels("linear_probe")
    if list(train_data.classnames) != list(data.classnames):
        raise ValueError(f"linear_probe: --train-data {train_data.name} and --data {data.name} have "
                         f"different classes ({len(train_data.classnames)} vs {len(data.classnames)}, "
                         "or another order)")
    groups = data.group_values(group_by) if group_by else None
    train_x = features.image_features(model, train_data, cache_dir, progress, "train features")
    test_x = features.image_features(model, data, cache_dir, progress, "test features")
    out, _, top1 = probe(train_x, train_data.labels, test_x, data.labels, data.classnames,
                         val_fraction, seed)
    out = {"task": "linear_probe", "data": data.name, "train_data": train_data.name,
           "train_n": len(train_data), **out}
    if groups is not None:
        out.update(group_by=group_by, **report.group_report(top1, groups))
    return out


class LinearProbe(Classification):
    task = "linear_probe"
    options = {"train_data": Option("", "the data the probe is trained on"),
               "val_fraction": Option(0.2, "the fraction of --train-data held out to choose the "
                                      "regularisation (default 0.2)"),
               **Classification.options}
    required = ("train_data",)

    def __init__(self, data, config=None, **settings):
        super().__init__(data, config, **settings)
        self.train_data = self.open_data(self.settings["train_data"], "--train-data")

    def run(self, model, cache_dir="", progress=True):
        return evaluate(model, self.train_data, self.data, float(self.settings["val_fraction"]), 0,
                        self.settings["group_by"], cache_dir, progress)

    @classmethod
    def describe(cls, result):
        return (f"; trained on {result['train_data']} ({result['train_n']} images), C={result['C']:.3g} "
                f"(held-out top-1 {100 * result['val_top1']:.2f}%, {result['C_tried']} values tried)")
