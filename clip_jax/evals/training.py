"""The evaluations of a training run: each entry of `config.evals`, run on the live training
state every `config.eval_every` steps and at the end (`TrainingEvaluators`), logging
`<task>/<name>/<figure>` (and `zeroshot/top1`, the mean top-1 of the zero-shot entries).

The evaluators are those of `python -m clip_jax.evaluate`, built by the same registry from the
same option names, and run on a `CLIPModel` that holds the state's variables, so the command
line on a saved checkpoint reproduces the logged figures.

NaN or infinite embeddings are never scored: the encoders raise
`inference.NonFiniteEmbeddings`; the entry's figures are then logged as NaN with a WARNING
line and training goes on -- whether the run itself is lost is for its own non-finite guard
(`config.max_bad_steps`) to decide, not for an evaluation.
"""
import numpy as np

from clip_jax import distributed, inference
from clip_jax.data import spec as spec_lib
from clip_jax.evals import registry


def uses_synthetic(config):
    return str(config.data.source) == "synthetic"


def training_evaluators(config):
    """[(name, Evaluator)] of `config.evals`; entries on synthetic[:ATTR] data run only when
    training on the synthetic data (they measure the embedded task)."""
    evaluators = []
    for name, entry in config.get("evals", {}).items():
        entry = dict(entry)
        task, spec = entry.pop("task", ""), str(entry.pop("data", ""))
        if not spec:
            raise ValueError(f"config.evals.{name}: needs data")
        if spec_lib.names_synthetic(spec) and not uses_synthetic(config):
            continue
        evaluators.append((name, registry.create(task, spec, config, entry, f"config.evals.{name}")))
    return evaluators


class TrainingEvaluators:
    """`config.evals`, run on the training state: state -> {metric name: value}."""

    def __init__(self, config, tokenizer, mesh, rules):
        self.evaluators = training_evaluators(config)
        # At most the training batch (CLIPModel rounds it to the mesh's batch shards).
        self.model = inference.CLIPModel(config, None, tokenizer, mesh, rules, min(256, config.batch_size))

    def __bool__(self):
        return bool(self.evaluators)

    def __call__(self, state):
        params, batch_stats = state.params, state.batch_stats
        self.model.variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        out, averaged = {}, {}
        try:
            for name, evaluator in self.evaluators:
                try:
                    result = evaluator.run(self.model, progress=False)
                except inference.NonFiniteEmbeddings as e:
                    distributed.log(f"WARNING: evaluation {evaluator.task}/{name} logged as NaN: {e}")
                    result = {key: float("nan") for key in evaluator.figures()}
                for key in evaluator.logged:
                    if key in result:
                        out[f"{evaluator.task}/{name}/{key}"] = float(result[key])
                for key in evaluator.averaged:
                    averaged.setdefault(f"{evaluator.task}/{key}", []).append(result[key])
        finally:
            self.model.variables = None
        out.update({key: float(np.mean(values)) for key, values in averaged.items()})
        return out
