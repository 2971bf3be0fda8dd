"""Applications built on the inference API (`clip_jax.load`), not part of the library:
nothing in training, evaluation or inference imports them (tests/test_imports.py)."""
