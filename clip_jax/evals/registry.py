"""The evaluators by task name: what `python -m clip_jax.evaluate TASK` and the `task` of a
`config.evals` entry choose from.

A new task: a module with an `evaluator.Evaluator` subclass, and one line below. The
command line's flags and the keys a `config.evals` entry may have are the options the
evaluators declare, checked here for both (`check`).
"""
from clip_jax.evals import linear_probe, retrieval, suite, zeroshot

REGISTRY = {cls.task: cls for cls in (
    zeroshot.ZeroShot,
    retrieval.Retrieval,
    linear_probe.LinearProbe,
    suite.Suite,
)}


def get(task):
    """The evaluator class of `task`; ValueError for an unknown one."""
    if task not in REGISTRY:
        raise ValueError(f"unknown task {task!r} (available: {', '.join(REGISTRY)})")
    return REGISTRY[task]


def all_options():
    """name -> Option of every evaluator's options. One name means one option: evaluators
    that share an option declare the same `Option` (the command line has one flag for it)."""
    out = {}
    for cls in REGISTRY.values():
        for key, option in cls.options.items():
            if out.setdefault(key, option) != option:
                raise TypeError(f"option {key!r}: {cls.task} declares it unlike another evaluator")
    return out


def flag(key):
    return "--" + key.replace("_", "-")


def check(task, options, where, flags=False):
    """The `options` (name -> value) that `task` takes; ValueError, prefixed with `where`,
    for an unknown task or option, an option another task takes set to a value other
    than its default, or a required option left unset. Options are named as flags
    (--train-data) with `flags`, as keys (train_data) otherwise."""
    name = flag if flags else str
    try:
        cls = get(task)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    known = all_options()
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"{where}: unknown option {key!r} (options: {', '.join(known)})")
        if key not in cls.options and value != known[key].default:
            raise ValueError(f"{where}: {name(key)} does not apply to {task}")
    for key in cls.required:
        if not options.get(key):
            raise ValueError(f"{where}: {task} needs {name(key)}")
    return {key: value for key, value in options.items() if key in cls.options}


def create(task, data, config, options, where, flags=False):
    """The evaluator of `task` on the data spec `data`, options checked (`check`) first."""
    options = check(task, options, where, flags)
    return REGISTRY[task](data, config, **options)
