"""`clip_jax.summary`: counts equal the paper table for all nine configs, computed abstractly."""
import os

import pytest

from clip_jax import summary
from tests.helpers import REPO, run_cli
from tests.test_config import load
from tests.test_models import PAPER_COUNTS


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_summary_counts_match_reference(name):
    s = summary.summarize(load(os.path.join(REPO, "configs", f"{name}.py")), memory=False)
    image, text, total = PAPER_COUNTS[name]
    assert s["params"] == {"image": image, "text": text, "total": total}
    assert s["gflops"]["image"] > 0 and s["gflops"]["text"] > 0
    # The paper's text encoder reads CLIP's BPE: every id of the 49,408-row embedding table.
    assert s["tokenizer"]["name"] == "clip_bpe" and s["tokenizer"]["vocab_size"] == 49408


def test_the_smoke_config_keeps_its_sentencepiece_tokenizer():
    s = summary.summarize(load(os.path.join(REPO, "configs", "smoke.py")), memory=False)
    assert s["tokenizer"]["name"] == "sentencepiece" and s["tokenizer"]["vocab_size"] is None
    assert "256 pieces" in summary.format_summary("smoke", s)


def test_gflops_scale_with_resolution():
    g = {n: summary.summarize(load(os.path.join(REPO, "configs", f"{n}.py")), memory=False)["gflops"]
         for n in ("vit_b32", "vit_b16")}
    # 4x the patches: at least ~4x the image FLOPs, identical text FLOPs.
    assert g["vit_b16"]["image"] > 3.9 * g["vit_b32"]["image"]
    assert g["vit_b16"]["text"] == pytest.approx(g["vit_b32"]["text"])


@pytest.mark.parametrize("variant", ["vit", "resnet"])
def test_cli_json_last_line_with_memory_estimate(variant):
    """The README's command on a mesh larger than this machine, for a ViT and a ResNet (whose
    BatchNorm statistics the memory estimate must carry through its backward)."""
    import json
    config = "configs/smoke.py" + (":resnet" if variant == "resnet" else "")
    proc = run_cli(["clip_jax.summary", f"--config={config}", "--json", "--devices=4"],
                   timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["params"]["total"] == out["params"]["image"] + out["params"]["text"] + 1
    m = out["memory"]
    assert m["devices"] == 4 and m["local_batch"] == 128 // 4
    assert m["total_gib"] > m["state_gib"] > 0 and m["activation_mib_per_example"] > 0


def test_memory_estimate_holds_one_micro_batch_of_activations():
    """With micro-batches (the gradient cache) the towers hold one micro-batch's activations;
    the state and the loss's logits stay as they are."""
    config = load(os.path.join(REPO, "configs", "smoke.py"))
    whole = summary.summarize(config, num_devices=4)["memory"]
    with config.unlocked():
        config.micro_batches = 4
    split = summary.summarize(config, num_devices=4)["memory"]
    assert (whole["micro_batch"], split["micro_batch"]) == (32, 8)
    assert split["activations_gib"] < whole["activations_gib"]
    assert split["state_gib"] == whole["state_gib"] and split["logits_gib"] == whole["logits_gib"]
