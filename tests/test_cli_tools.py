"""The small command lines: `clip_jax.tokenizer` (train / encode) and `clip_jax.benchmark`
(its modes, timing and generated photos)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clip_jax.data import tokenizer as tokenizer_lib
from tests.helpers import REPO, device_env, write_ingested


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=device_env(1),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_tokenizer_train_from_ingested_dir_and_text_file(tmp_path):
    data = write_ingested(tmp_path / "ds", 40)
    out = tmp_path / "spm.model"
    proc = cli("clip_jax.tokenizer", "train", "--captions", data, "--vocab-size", "48", "--out", str(out))
    assert "trained on 40 captions" in proc.stdout
    tok = tokenizer_lib.SentencePieceTokenizer.load(str(out), 16)
    assert tok.vocab_size <= 48 and tok.decode(tok(["picture number 7"])[0]) == "picture number 7"
    # encode prints [sot] + pieces + [eot], as the tokenizer produces them.
    printed = cli("clip_jax.tokenizer", "encode", "--model", str(out), "--context-length", "16",
                  "picture number 7").stdout.split()
    ids = tok(["picture number 7"])[0]
    assert [int(x) for x in printed] == ids[:int((ids != 0).sum())].tolist()
    # A text file of captions trains the same model as the same captions from the dataset.
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(f"picture number {i}" for i in range(40)) + "\n\n")
    cli("clip_jax.tokenizer", "train", "--captions", str(text), "--vocab-size", "48",
        "--out", str(tmp_path / "from_text.model"))
    assert (tmp_path / "from_text.model").read_bytes() == out.read_bytes()


def test_tokenizer_cli_errors_name_the_input(tmp_path):
    proc = cli("clip_jax.tokenizer", "train", "--captions", str(tmp_path / "nope"), "--vocab-size", "48",
               "--out", str(tmp_path / "x.model"), check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr and not (tmp_path / "x.model").exists()


def test_benchmark_data_and_train_report_json(tmp_path):
    data = write_ingested(tmp_path / "ds", 30)
    proc = cli("clip_jax.benchmark", "data", f"--source={data}", "--workers=0", "--batches=2",
               "--repeats=1", "--config.batch_size=8", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "data" and result["batch_size"] == 8 and result["image_size"] == 32
    assert np.isfinite(result["workers"]["0"]["images_per_sec"]) and result["workers"]["0"]["images_per_sec"] > 0
    assert set(result["per_core"]) == {"simplejpeg", "pil"} and min(result["per_core"].values()) > 0
    assert "images/s per core" in proc.stdout
    proc = cli("clip_jax.benchmark", "--steps=1", "--warmup=0", "--repeats=1", "--config.batch_size=8",
               "--config.model.remat=True", "--peak-tflops=0.5", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "train" and result["batch_size"] == 8 and result["samples_per_sec"] > 0
    assert result["step_seconds_min"] <= result["step_seconds_median"] <= result["step_seconds_max"]
    # FLOPs from XLA's cost analysis: rematerialisation executes more than the model needs;
    # MFU = model FLOP/s over the given peak.
    assert result["remat"] == "full" and result["flops_per_step"] > result["model_flops_per_step"] > 0
    assert result["peak_source"] == "given" and result["peak_tflops_per_device"] == 0.5
    model_tflops = result["model_flops_per_step"] * result["samples_per_sec"] / 8 / 1e12
    np.testing.assert_allclose(result["model_tflops"], model_tflops, rtol=1e-6)
    np.testing.assert_allclose(result["mfu"], model_tflops / 0.5, rtol=1e-6)
    assert "MFU" in proc.stdout and "GFLOP/s" in proc.stdout
    # The figure records the allocator settings it ran under, which the entry point left as
    # they were (launch/cpu_env.sh is how to opt in to huge pages).
    assert result["glibc_tunables"] == device_env(1).get("GLIBC_TUNABLES", "")
    proc = cli("clip_jax.benchmark", "checkpoint", "--repeats=2", f"--checkpoint_dir={tmp_path}", "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "checkpoint" and result["parameters"] == 484_321
    assert 0 < result["save_blocking_seconds"] <= result["save_seconds"] and result["restore_seconds"] > 0
    # Parameters + two AdamW moments in float32, compressed a little on disk.
    assert result["state_bytes"] > 3 * 4 * 484_321 and 0.3 * result["state_bytes"] < result["checkpoint_bytes"]
    assert os.listdir(tmp_path) == ["ds"]        # the temporary checkpoints are gone
    bad = cli("clip_jax.benchmark", "lossy", check=False)
    assert bad.returncode != 0 and "lossy" in bad.stderr
    bad = cli("clip_jax.benchmark", "data", "--config.data.sourse=x", check=False)
    assert bad.returncode != 0 and "data.sourse" in bad.stderr and "data.source" in bad.stderr


def test_benchmark_evaluate_times_the_generated_photos(tmp_path):
    """The evaluate mode's default images are the photo corpus; every rate is measured."""
    proc = cli("clip_jax.benchmark", "evaluate", "--images=6", "--repeats=1", "--eval_batch_size=4",
               "--probe_rows=300", "--probe_dim=16", "--probe_classes=20", "--probe_iterations=3",
               "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "evaluate" and result["images"] == 6 and "generated photos" in result["data"]
    assert min(result[k] for k in ("images_per_sec", "decode_images_per_sec",
                                   "encode_images_per_sec", "texts_per_sec")) > 0
    probe = result["probe"]     # the probe's solver timed for exactly 3 iterations, both solvers
    assert (probe["rows"], probe["iterations"]) == (300, 3)
    assert probe["seconds_per_iteration"] > 0 and probe["sklearn_seconds_per_iteration"] > 0
    assert probe["imagenet_seconds_per_iteration"] == pytest.approx(
        probe["seconds_per_iteration"] * 1_281_167 / 300)
    assert "linear probe (JAX L-BFGS" in proc.stdout


def test_photo_corpus_is_real_jpegs_listed_in_a_csv(tmp_path):
    import csv

    from PIL import Image

    from clip_jax.benchmark import photos
    captions = photos.make_corpus(str(tmp_path), 4, seed=1)
    with open(captions, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["caption"].startswith("a ") for r in rows)
    sizes = [Image.open(tmp_path / r["filepath"]).size for r in rows]
    assert all(256 <= min(s) <= 512 for s in sizes) and len(set(sizes)) > 1
    assert photos.make_corpus(str(tmp_path / "again"), 4, seed=1) and all(
        (tmp_path / "again" / r["filepath"]).read_bytes() == (tmp_path / r["filepath"]).read_bytes()
        for r in rows)


def test_measured_peak_is_a_matmul_rate():
    from clip_jax.benchmark.train import measure_peak_tflops
    for dtype in ("float32", "bfloat16"):
        peak = measure_peak_tflops(dtype, sizes=(64, 128), repeats=2)
        assert np.isfinite(peak) and peak > 0


def test_measured_peak_is_the_best_size(monkeypatch):
    """With no sizes given, the peak is the fastest of the backend's PEAK_SIZES (not the
    first or the last), each size timed by the median of its repeats."""
    from clip_jax.benchmark import train as benchmark
    monkeypatch.setattr(benchmark, "PEAK_SIZES", {"cpu": (64, 96, 128)})
    seconds = {64: [1.0, 9.0, 1.0], 96: [1e-3, 1e-3, 5.0], 128: [2.0, 2.0, 2.0]}

    def fake_timings(fn, repeats, warmup=1):       # keyed by the size of the product `fn` computes
        return seconds[fn().shape[0]]
    monkeypatch.setattr(benchmark, "timings", fake_timings)
    assert benchmark.measure_peak_tflops("float32", repeats=3) == 2 * 96 ** 3 / 1e-3 / 1e12


def test_profile_summary_groups_ops_by_kind_and_layer(tmp_path):
    """benchmarks/profile_step.py's trace summary: durations summed per HLO op kind and per
    layer (block indices folded, backward told from forward), runtime bookkeeping left out."""
    import gzip
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "profile_step.py")
    spec = importlib.util.spec_from_file_location("profile_step", path)
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    hlo = "\n".join([
        '  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%a), kind=kCustom, metadata={op_name="jit(step_fn)/jvp(CLIP)/text/transformer/resblocks_0/mlp/c_fc/dot_general"}',
        '  %ynn_fusion.7 = f32[8,4]{1,0} fusion(%b), kind=kCustom, metadata={op_name="jit(step_fn)/jvp(CLIP)/text/transformer/resblocks_11/mlp/c_fc/dot_general"}',
        '  %add_fusion.2 = f32[8,4]{1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(step_fn)/transpose(jvp(CLIP))/text/transformer/resblocks_3/mlp/c_fc/dot_general"}'])
    events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 100}, {"ph": "X", "name": "ynn_fusion.7", "dur": 50},
              {"ph": "X", "name": "add_fusion.2", "dur": 30}, {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 999},
              {"ph": "i", "name": "ynn_fusion.3"}]
    trace = tmp_path / "t.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    by_kind, by_layer = profile_step.summarize(str(trace), profile_step.op_names(hlo))
    assert dict(by_kind) == {"ynn_fusion": 150, "add_fusion": 30}
    assert by_layer == {"forward  mlp/c_fc/dot_general": 150, "backward mlp/c_fc/dot_general": 30}


def test_side_by_side_variants_keep_commas_inside_a_flag():
    """benchmarks/side_by_side.py --variant LABEL=FLAG,FLAG: a new flag starts at '--' (or is
    'env'), so a value with commas (`cpu_ops_off=a,b`, how the CPU kernels' pieces are
    measured) stays one flag."""
    import importlib.util
    path = os.path.join(REPO, "benchmarks", "side_by_side.py")
    spec = importlib.util.spec_from_file_location("side_by_side", path)
    side_by_side = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(side_by_side)
    assert side_by_side._variant("off=--config.kernels.cpu_ops_off=im2col,pool_as_mean,env") == \
        ("off", ("--config.kernels.cpu_ops_off=im2col,pool_as_mean", "env"))
    assert side_by_side._variant("plain=--config.kernels.ops=xla,--config.model.scan_layers=False") == \
        ("plain", ("--config.kernels.ops=xla", "--config.model.scan_layers=False"))
