"""clip_jax.data.ingest_beam: the Beam ingest (DirectRunner, one worker or several, threads or
processes) writes exactly what the local ingest writes for the same input: the same shard
files, the same skipped.jsonl, the same manifest; a row that raises is skipped in both;
training reads the Beam output."""
import os

import pytest

pytest.importorskip("apache_beam")

from clip_jax.data import ingest, ingest_beam  # noqa: E402
from tests.helpers import read_jsonl, run_cli, tiny_flags  # noqa: E402
from tests.test_ingest import (TFDS_NAME, run, tfds_dir, write_csv_corpus,  # noqa: E402,F401 (fixture)
                               write_wds_corpus)

RUNNERS = {   # Beam's DirectRunner: in this process, on 2 threads, on 2 processes
    "in_memory": ["--direct_running_mode=in_memory"],
    "2_threads": ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
    "2_processes": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def files(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


def beam(format, source, out, runner="in_memory", **options):
    return ingest.run(format, source, str(out), runner="beam", beam_args=RUNNERS[runner],
                      **options)


@pytest.mark.parametrize("runner", RUNNERS)
def test_broken_csv_corpus_on_beam_equals_the_local_ingest(tmp_path, monkeypatch, runner):
    """Every kind of broken row, several output shards and (in this process) several blocks
    per part: byte-identical shards, skipped.jsonl and manifest."""
    monkeypatch.setattr(ingest_beam, "BLOCK_ROWS", 5)    # only this process sees it
    csv_path, _ = write_csv_corpus(tmp_path / "corpus")
    local = run("csv", csv_path, tmp_path / "local", records_per_shard=4)
    manifest = beam("csv", csv_path, tmp_path / "beam", runner, records_per_shard=4)
    assert manifest == local
    assert local["rows"] == 24 and len(local["shards"]) == 4 and sum(local["skipped"].values()) == 11
    assert files(tmp_path / "beam") == files(tmp_path / "local")


def test_wds_shards_on_beam_equal_the_local_ingest(tmp_path):
    """One part per shard, a truncated shard's corrupt_archive row among them."""
    patterns = write_wds_corpus(tmp_path)
    local = run("wds", patterns, tmp_path / "local", records_per_shard=3)
    manifest = beam("wds", patterns, tmp_path / "beam", "2_threads", records_per_shard=3)
    assert manifest == local and local["skipped"]["corrupt_archive"] == 1
    assert files(tmp_path / "beam") == files(tmp_path / "local")


def test_tfds_on_beam_equals_the_local_ingest(tfds_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(ingest, "TFDS_PART_ROWS", 4)     # 6 examples: 2 parts
    local = run("tfds", TFDS_NAME, tmp_path / "local", data_dir=tfds_dir, label_key="label")
    manifest = beam("tfds", TFDS_NAME, tmp_path / "beam", data_dir=tfds_dir, label_key="label")
    assert manifest == local and local["rows"] == 6
    assert files(tmp_path / "beam") == files(tmp_path / "local")


@pytest.mark.parametrize("runner", ["local", "beam"])
def test_a_row_that_raises_is_skipped_and_the_ingest_goes_on(tmp_path, monkeypatch, runner):
    """An error nothing expected (here: the JPEG encoder failing on the one tall image) skips
    that row as unexpected_error and counts it; the other rows are written."""
    csv_path, _ = write_csv_corpus(tmp_path / "corpus")
    encode = ingest.images.encode_jpeg

    def failing_on_tall_images(img, quality=95):
        if img.size[1] > 1.5 * img.size[0]:
            raise RuntimeError("encoder crashed")
        return encode(img, quality)

    monkeypatch.setattr(ingest.images, "encode_jpeg", failing_on_tall_images)
    if runner == "beam":
        manifest = beam("csv", csv_path, tmp_path / "out")
    else:
        manifest = run("csv", csv_path, tmp_path / "out")
    assert manifest["skipped"]["unexpected_error"] == 1
    assert manifest["rows"] == 24 and manifest["num_records"] == 12
    entries = [e for e in read_jsonl(tmp_path / "out" / "skipped.jsonl")
               if e["reason"] == "unexpected_error"]
    assert [(e["source"].endswith("tall.png"), e["detail"]) for e in entries] == \
        [(True, "RuntimeError: encoder crashed")]


@pytest.mark.slow
def test_cli_runs_beam_and_training_reads_its_output(tmp_path):
    csv_path, _ = write_csv_corpus(tmp_path / "corpus")
    out = tmp_path / "ingested"
    proc = run_cli(["clip_jax.ingest", "csv", csv_path, "--out", str(out), "--runner=beam",
                    "--no-progress", "--", "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing"])
    assert "13 records from 24 rows" in proc.stdout
    bad = run_cli(["clip_jax.ingest", "csv", csv_path, "--out", str(tmp_path / "x"), "--",
                   "--direct_num_workers=2"], check=False)
    assert bad.returncode == 2 and "need --runner=beam" in bad.stderr
    wd = tmp_path / "run"
    run_cli(["clip_jax.train", "--config=configs/smoke.py", f"--workdir={wd}",
             *tiny_flags(batch_size=8, total_steps=2), f"--config.data.source={out}"])
    steps = read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2]
