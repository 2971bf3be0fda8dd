"""The paper's rn101: architecture and training recipe at real scale (batch 32,768)."""
from clip_jax import config_lib


def get_config():
    return config_lib.paper_config("rn101")
