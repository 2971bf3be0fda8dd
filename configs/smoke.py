"""A tiny CLIP that learns the embedded synthetic dataset on 2 CPU cores in a few minutes.

Float32, no remat. `--config=configs/smoke.py:resnet` swaps the ViT for a tiny modified
ResNet (attention pooling, BatchNorm) with the same text tower. Held-out (shape, colour) combinations are never seen in training;
the zero-shot evaluation classifies them by shape and by colour from prompts alone.
"""
import ml_collections

from clip_jax import config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        embed_dim=64,
        vision=dict(kind="vit", image_size=32, layers=3, width=96, patch_size=8, heads=3),
        text=dict(vocab_size=256, context_length=24, width=64, heads=2, layers=2),
        dtype="float32",
        remat=config_lib.remat_field("none"),
        scan_layers=False,
        activation="quick_gelu",
    ))
    if arg == "resnet":
        c.model.vision = ml_collections.ConfigDict(dict(
            kind="resnet", image_size=32, layers=(1, 1, 1, 1), width=16, patch_size=0, heads=8))
    elif arg:
        raise ValueError(f"--config=configs/smoke.py:{arg}: the only variant is 'resnet'")
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.max_to_keep = 2
    c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.1)
    c.data.synthetic.update(num_train=200_000, num_eval=512)
    c.data.tokenizer_vocab_size = 256
    return c
