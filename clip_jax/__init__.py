"""clip_jax: exact, sharded CLIP training in JAX/Flax."""
__version__ = "0.1.0"
