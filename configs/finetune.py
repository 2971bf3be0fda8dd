"""Fine-tune converted pretrained weights: `--config=configs/finetune.py:DIR`.

DIR is what `python -m clip_jax.convert` wrote (or any run's workdir / checkpoint with a
config.json): the model comes from DIR/config.json, the parameters from DIR
(`init_from`), the tokenizer is the model's own. The recipe is a gentle one for
continued contrastive training (lr 1e-5, 500 warm-up steps, cosine to 0, weight decay
0.1, batch 4,096, bfloat16 compute with rematerialisation and scanned layers, AdamW b2
0.98 / eps 1e-6);
set the data with `--config.data.source=...` and override anything else as usual, e.g.
`--config.model.dtype=float32 --config.model.remat=False` on a CPU.
"""
import json
import os

from clip_jax import config_lib


def get_config(arg=None):
    if not arg:
        raise ValueError("use --config=configs/finetune.py:DIR, DIR being converted weights "
                         "(python -m clip_jax.convert) or a run's workdir")
    path = os.path.join(arg, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--config=configs/finetune.py:{arg}: no {path} (convert the weights "
                         "with python -m clip_jax.convert first)")
    with open(path) as f:
        saved = config_lib.from_json(json.load(f))
    c = config_lib.base_config()
    c.model = saved.model
    c.model.dtype, c.model.scan_layers = "bfloat16", True
    config_lib.set_remat(c.model, "full")
    c.model.activation = saved.model.get("activation", "quick_gelu")
    c.init_from = os.path.abspath(arg)
    c.data.tokenizer = saved.data.tokenizer
    c.data.tokenizer_path = saved.data.tokenizer_path
    c.data.tokenizer_vocab_size = saved.data.tokenizer_vocab_size
    workdir_spm = os.path.join(arg, "tokenizer", "spm.model")
    if c.data.tokenizer == "sentencepiece" and not c.data.tokenizer_path and os.path.isfile(workdir_spm):
        c.data.tokenizer_path = os.path.abspath(workdir_spm)   # the run's own, not a new one
    c.batch_size = 4096
    c.total_steps = 10_000
    c.checkpoint_every = 1000
    c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6)
    return c
