"""Linear probe (the paper's appendix A.3): logistic regression on frozen image features.

As the paper: L-BFGS multinomial logistic regression (at most 1,000 iterations) on the
image tower's features, its L2 strength chosen on a held-out split of the training data by
a parametric binary search over C = 1/lambda in [1e-6, 1e6]: C = 1e-6, 1e-4, ..., 1e6
first, then the step around the best value is halved until it is 1/8 of a decade. The
held-out split is `val_fraction` of the training images, drawn with `seed`; the chosen C
is then refitted on all the training images and scored on `--data`. Ties in held-out
accuracy go to the smaller C (stronger regularisation).

Two solvers of the same problem, scikit-learn's objective (`LogisticRegression(C)`: the
mean cross-entropy + ||W||^2 / (2 C n), intercept unpenalised; two classes as its binary
model, which is the multinomial one at C / 2) and stopping rule (largest gradient entry
<= 1e-4, or 1,000 iterations):
  jax      (default) optax's L-BFGS (memory 10, zoom line search) on the devices: the
           features laid over every device by rows, each device's rows in blocks of
           `BLOCK` (memory O(rows x dim) + one block of logits), the loss and its gradient
           (written out, one pass) summed with one psum; float32 products at full precision. The search's fits
           share one compiled solver (the held-out rows are masked, not copied) and each
           starts from the solution of the nearest C already fitted (the problem is convex:
           the start changes the iterations, not the answer).
  sklearn  scikit-learn's lbfgs on the host: the paper's own tool, the reference the JAX
           solver is tested against (tests/test_evaluate.py), hours at ImageNet size.
"""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax.evals import features, report
from clip_jax.evals.evaluator import Classification, Option

EIGHTHS = 8                    # grid resolution: steps per decade
LOG_C_RANGE = (-6, 6)          # decades
MAX_ITER = 1000                # as the paper (scikit-learn's max_iter)
TOL = 1e-4                     # scikit-learn's tol: the largest gradient entry at a solution
BLOCK = 4096                   # rows per device per block of the JAX solver's loss
SOLVERS = ("jax", "sklearn")


def fit(x, y, c, max_iter=MAX_ITER, tol=TOL):
    """scikit-learn's fit (the reference solver)."""
    # lazy: scikit-learn takes about a second to import, and only the probe uses it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=max_iter, tol=tol, solver="lbfgs").fit(x, y)


class JaxSolver:
    """Multinomial logistic regression of float32 [n, d] features `x` on integer labels `y`
    (classes: those present, in sorted order, as scikit-learn's `classes_`), on the devices.

    `fit(c, rows)` fits on the rows `rows` (a bool mask, default all) and returns
    (params, iterations); `accuracy(params, rows)` scores it on other rows;
    `logits(params, x)` -> float64 [m, classes] on the host."""

    def __init__(self, x, y, devices=None, block=BLOCK, max_iter=MAX_ITER, tol=TOL):
        x = np.asarray(x, np.float32)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"linear_probe: the training data has {len(self.classes_)} class; "
                             "a probe needs 2 or more")
        self.n, self.dim = x.shape
        self.k = len(self.classes_)
        self.max_iter, self.tol = max_iter, tol
        self.mesh = Mesh(np.array(devices or jax.devices()), ("rows",))
        shards = self.mesh.size
        self.block = max(1, min(block, -(-self.n // shards)))
        per_device = -(-self.n // (shards * self.block)) * self.block
        self.padded = per_device * shards
        spec = NamedSharding(self.mesh, P("rows"))
        pad = self.padded - self.n
        put = lambda a: jax.make_array_from_callback(a.shape, spec, lambda i: a[i])  # noqa: E731
        self.x = put(np.pad(x, ((0, pad), (0, 0))))
        self.y = put(np.pad(np.searchsorted(self.classes_, y).astype(np.int32), (0, pad)))
        self._fit = jax.jit(self._solve)
        self._correct = jax.jit(self._count_correct)

    def _mask(self, rows):
        rows = np.ones(self.n, bool) if rows is None else np.asarray(rows, bool)
        mask = np.pad(rows.astype(np.float32), (0, self.padded - self.n))
        return jax.make_array_from_callback(mask.shape, self.x.sharding, lambda i: mask[i])

    def _blocks(self, a):
        """This device's rows as [blocks, BLOCK, ...] (inside shard_map)."""
        return a.reshape((-1, self.block) + a.shape[1:])

    def _sums(self, params, x, y, mask, with_grad):
        """sum over rows of mask * cross-entropy (and, `with_grad`, its gradient in (W, b)), per
        device over its rows block by block, psummed: the gradient is written out,
        X^T (softmax - onehot), so no block's logits outlive it and nothing is recomputed."""
        w, b = params

        def local(x, y, mask, w, b):
            def body(carry, blk):
                xb, yb, mb = blk
                z = jnp.dot(xb, w, precision="highest") + b
                lse = jax.nn.logsumexp(z, axis=1)
                total = carry[0] + jnp.sum(mb * (lse - jnp.take_along_axis(z, yb[:, None], 1)[:, 0]))
                if not with_grad:
                    return (total,), None
                dz = mb[:, None] * (jnp.exp(z - lse[:, None]) - jax.nn.one_hot(yb, self.k, dtype=z.dtype))
                return (total, carry[1] + jnp.dot(xb.T, dz, precision="highest"),
                        carry[2] + jnp.sum(dz, axis=0)), None
            varying = lambda a: jax.lax.pcast(a, ("rows",), to="varying")  # noqa: E731  (as the body's)
            init = (varying(jnp.zeros((), jnp.float32)),) + (
                (varying(jnp.zeros_like(w)), varying(jnp.zeros_like(b))) if with_grad else ())
            sums, _ = jax.lax.scan(body, init, (self._blocks(x), self._blocks(y), self._blocks(mask)))
            return jax.lax.psum(sums, "rows")

        return jax.shard_map(local, mesh=self.mesh, in_specs=(P("rows"),) * 3 + (P(), P()),
                             out_specs=P())(x, y, mask, w, b)

    def _loss_sum(self, params, x, y, mask):
        """sum over rows of mask * cross-entropy; differentiable in `params` only (its
        gradient from `_sums`, computed with the value: ~4 x rows x dim x classes FLOPs)."""
        @jax.custom_vjp
        def loss_sum(params, x, y, mask):
            return self._sums(params, x, y, mask, False)[0]

        def forward(params, x, y, mask):
            total, gw, gb = self._sums(params, x, y, mask, True)
            return total, ((gw, gb), x, y, mask)

        def backward(residual, g):
            (gw, gb), x, y, mask = residual
            return ((g * gw, g * gb), jnp.zeros_like(x), np.zeros(y.shape, jax.dtypes.float0),
                    jnp.zeros_like(mask))

        loss_sum.defvjp(forward, backward)
        return loss_sum(params, x, y, mask)

    def _solve(self, x, y, mask, c, init):
        import optax
        import optax.tree_utils as otu
        n = jnp.sum(mask)
        c = c / 2 if self.k == 2 else c     # scikit-learn's binary model = multinomial at C / 2
        lam = 1.0 / (c * n)

        def objective(params):
            return self._loss_sum(params, x, y, mask) / n + 0.5 * lam * jnp.sum(params[0] ** 2)

        opt = optax.lbfgs(memory_size=10,
                          linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=50))
        value_and_grad = optax.value_and_grad_from_state(objective)

        def step(carry):
            params, state, i = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                        value_fn=objective)
            return optax.apply_updates(params, updates), state, i + 1

        def more(carry):
            _, state, i = carry
            grad = otu.tree_get(state, "grad")
            largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
            return (i == 0) | ((i < self.max_iter) & (largest > self.tol))

        params, _, iterations = jax.lax.while_loop(more, step, (init, opt.init(init), 0))
        return params, iterations

    def _count_correct(self, params, x, y, mask):
        def local(x, y, mask, w, b):
            z = jnp.dot(x, w, precision="highest") + b
            return jax.lax.psum(jnp.sum(mask * (jnp.argmax(z, axis=1) == y)), "rows")
        return jax.shard_map(local, mesh=self.mesh, in_specs=(P("rows"),) * 3 + (P(), P()),
                             out_specs=P())(x, y, mask, *params)

    def zeros(self):
        return (jnp.zeros((self.dim, self.k), jnp.float32), jnp.zeros((self.k,), jnp.float32))

    def fit(self, c, rows=None, init=None):
        params, iterations = self._fit(self.x, self.y, self._mask(rows), jnp.float32(c),
                                       self.zeros() if init is None else init)
        return params, int(iterations)

    def accuracy(self, params, rows):
        return float(self._correct(params, self.x, self.y, self._mask(rows))) / int(np.sum(rows))

    def logits(self, params, x):
        w, b = (np.asarray(p, np.float64) for p in params)
        return np.asarray(x, np.float64) @ w + b


def search_c(score):
    """(best C, {C: held-out accuracy} of every C tried) by the paper's binary search;
    `score(C, nearest)` fits at C and returns its held-out accuracy, `nearest` being the C
    already tried closest to it (None for the first), for a warm start."""
    lo, hi = (d * EIGHTHS for d in LOG_C_RANGE)
    scores = {}    # log10(C) in eighths of a decade -> held-out accuracy

    def try_(e):
        if lo <= e <= hi and e not in scores:
            nearest = min(scores, key=lambda s: (abs(s - e), s), default=None)
            scores[e] = score(10.0 ** (e / EIGHTHS),
                              None if nearest is None else 10.0 ** (nearest / EIGHTHS))

    def best():
        return max(sorted(scores), key=lambda e: scores[e])   # first max = smallest C

    step = 2 * EIGHTHS
    for e in range(lo, hi + 1, step):
        try_(e)
    while step > 1:
        step //= 2
        centre = best()
        try_(centre - step)
        try_(centre + step)
    return 10.0 ** (best() / EIGHTHS), {10.0 ** (e / EIGHTHS): s for e, s in sorted(scores.items())}


def split_train_val(n, val_fraction, seed):
    """(train indices, held-out indices): a seeded random `val_fraction` of range(n) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"linear_probe: {n} training images are too few to hold out {val_fraction:.0%}")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _probe_sklearn(train_x, train_y, tr, va, max_iter, tol):
    def score(c, nearest):
        clf = fit(train_x[tr], train_y[tr], c, max_iter, tol)
        return float(np.mean(clf.predict(train_x[va]) == train_y[va]))
    c, sweep = search_c(score)
    clf = fit(train_x, train_y, c, max_iter, tol)
    scores = clf.decision_function
    return c, sweep, clf.classes_, lambda x: (np.stack([-scores(x), scores(x)], 1)
                                              if len(clf.classes_) == 2 else scores(x))


def _probe_jax(train_x, train_y, tr, va, max_iter, tol):
    solver = JaxSolver(train_x, train_y, max_iter=max_iter, tol=tol)
    fit_rows, held_out = np.zeros(len(train_x), bool), np.zeros(len(train_x), bool)
    fit_rows[tr], held_out[va] = True, True
    fitted = {}

    def score(c, nearest):
        fitted[c], _ = solver.fit(c, fit_rows, fitted.get(nearest))
        return solver.accuracy(fitted[c], held_out)
    c, sweep = search_c(score)
    params, _ = solver.fit(c, None, fitted[c])
    return c, sweep, solver.classes_, functools.partial(solver.logits, params)


def probe(train_x, train_y, test_x, test_y, classnames, val_fraction=0.2, seed=0,
          max_iter=MAX_ITER, solver="jax", tol=TOL):
    """Fits the probe (C chosen on held-out training data) and scores it on the test features.

    Returns (report dict, bool [n_test] correct)."""
    if solver not in SOLVERS:
        raise ValueError(f"linear_probe: --solver {solver!r}: one of {', '.join(SOLVERS)}")
    tr, va = split_train_val(len(train_x), val_fraction, seed)
    run = _probe_jax if solver == "jax" else _probe_sklearn
    c, sweep, classes, decision = run(train_x, train_y, tr, va, max_iter, tol)
    logits = np.full((len(test_x), len(classnames)), -np.inf, np.float64)
    logits[:, classes] = decision(test_x)
    out, top1 = report.classification_report(logits, test_y, classnames)
    return {"C": c, "val_top1": sweep[c], "C_tried": len(sweep), "solver": solver, **out}, top1


def evaluate(model, train_data, data, val_fraction=0.2, seed=0, group_by="", cache_dir="",
             progress=True, solver="jax"):
    for d in (train_data, data):
        d.need_labels("linear_probe")
    if list(train_data.classnames) != list(data.classnames):
        raise ValueError(f"linear_probe: --train-data {train_data.name} and --data {data.name} have "
                         f"different classes ({len(train_data.classnames)} vs {len(data.classnames)}, "
                         "or another order)")
    groups = data.group_values(group_by) if group_by else None
    train_x = features.image_features(model, train_data, cache_dir, progress, "train features")
    test_x = features.image_features(model, data, cache_dir, progress, "test features")
    out, top1 = probe(train_x, train_data.labels, test_x, data.labels, data.classnames,
                      val_fraction, seed, solver=solver)
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
               "solver": Option("jax", "jax (L-BFGS on the devices, the default) or sklearn "
                                "(scikit-learn's on the host, the reference)"),
               **Classification.options}
    required = ("train_data",)

    def __init__(self, data, config=None, **settings):
        super().__init__(data, config, **settings)
        if self.settings["solver"] not in SOLVERS:      # before any data is read or step taken
            raise ValueError(f"linear_probe: --solver {self.settings['solver']!r}: one of "
                             f"{', '.join(SOLVERS)}")
        self.train_data = self.open_data(self.settings["train_data"], "--train-data")

    def run(self, model, cache_dir="", progress=True):
        return evaluate(model, self.train_data, self.data, float(self.settings["val_fraction"]), 0,
                        self.settings["group_by"], cache_dir, progress,
                        self.settings["solver"])

    @classmethod
    def describe(cls, result):
        return (f"; trained on {result['train_data']} ({result['train_n']} images), C={result['C']:.3g} "
                f"(held-out top-1 {100 * result['val_top1']:.2f}%, {result['C_tried']} values tried, "
                f"{result['solver']} solver)")
