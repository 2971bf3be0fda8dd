"""Evaluators: `evaluator.Evaluator` (the interface), one subclass per task in its module,
registered by task name in `registry`; `data` opens what --data names, `features` embeds it.

Nothing is imported here: `clip_jax.inference` imports `features` alone, without every
evaluator.
"""
