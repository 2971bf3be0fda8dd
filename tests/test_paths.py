"""paths.py, and a whole run on a non-POSIX file system: gs:// on a local GCS emulator.

The run test trains with its workdir (checkpoints, metrics, TensorBoard, tokenizer,
config.json) and its data in the bucket, kills it, resumes it, damages its newest
checkpoint and resumes again, and compares every logged figure with the same run on local
disk, bit for bit.
"""
import os
import signal

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from clip_jax import paths  # noqa: E402
from tests.helpers import (GCS_BUCKET, gcs_emulator, gcs_fs, run_cli, start_cli,  # noqa: E402
                           tiny_flags, wait_for, write_ingested)


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator():
        yield f"gs://{GCS_BUCKET}"


def test_files_and_directories_on_gcs(gcs, tmp_path):
    base = f"{gcs}/unit"
    paths.write_text(f"{base}/a/config.json", "{}")
    paths.write_bytes(f"{base}/a/sub/b.bin", b"\x00\x01")
    assert paths.read_text(f"{base}/a/config.json") == "{}"
    assert paths.listdir(f"{base}/a") == ["config.json", "sub"]
    assert paths.isdir(f"{base}/a/sub") and paths.isfile(f"{base}/a/sub/b.bin")
    assert not paths.exists(f"{base}/missing") and not paths.isfile(f"{base}/a/sub")
    paths.rename(f"{base}/a", f"{base}/moved/a-1")      # a directory, to a new parent
    assert not paths.exists(f"{base}/a")
    assert paths.read_bytes(f"{base}/moved/a-1/sub/b.bin") == b"\x00\x01"
    local = paths.local_copy(f"{base}/moved/a-1/sub/b.bin", tmp_path)
    assert open(local, "rb").read() == b"\x00\x01" and local.startswith(str(tmp_path))
    os.utime(local, (0, 0))
    assert paths.local_copy(f"{base}/moved/a-1/sub/b.bin", tmp_path) == local   # reused
    assert os.stat(local).st_mtime == 0
    paths.write_bytes(f"{base}/moved/a-1/sub/b.bin", b"\x00\x01\x02")              # changed size
    assert open(paths.local_copy(f"{base}/moved/a-1/sub/b.bin", tmp_path), "rb").read() == b"\x00\x01\x02"


def test_local_paths_are_absolute_and_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("run") == str(tmp_path / "run")
    assert paths.resolve("gs://b/run") == "gs://b/run"
    assert paths.join("gs://b/run", "checkpoints", "4") == "gs://b/run/checkpoints/4"
    assert paths.local_copy("x.bin") == str(tmp_path / "x.bin")


# ---------------------------------------------------------------- a whole run on gs://

TOTAL = 40


def _flags(data, workdir):
    return ["clip_jax.train", "--config=configs/smoke.py",
            *tiny_flags(total_steps=TOTAL, checkpoint_every=10, data__source=data),
            f"--workdir={workdir}"]


def _metrics(workdir):
    import io
    import json
    return [json.loads(line) for line in io.StringIO(paths.read_text(paths.join(workdir, "metrics.jsonl")))
            if line.strip()]


def _history(records):
    """The figures a resumed run must reproduce exactly (not its timings)."""
    keys = ("step", "loss", "lr", "grad_norm", "temperature", "nonfinite_steps", "zeroshot/top1")
    return [{k: r[k] for k in keys if k in r} for r in records]


def _checkpoints(workdir):
    fs = gcs_fs()
    d = paths.join(workdir, "checkpoints")
    return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(d) if p.rsplit("/", 1)[1].isdigit()) \
        if fs.exists(d) else []


def _flip_a_byte(step_dir):
    """Flips one bit in the middle of the largest array file of a checkpoint on GCS."""
    fs = gcs_fs()
    files = [f for f in fs.find(f"{step_dir}/state") if "/d/" in f]
    big = max(files, key=lambda f: fs.size(f))
    data = bytearray(fs.cat_file(big))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(big, bytes(data))


@pytest.mark.slow
def test_a_run_on_gcs_resumes_after_a_kill_and_past_a_corrupt_checkpoint(gcs, tmp_path):
    local_data = write_ingested(tmp_path / "data", 96, records_per_shard=20)
    data = f"{gcs}/data"
    for name in os.listdir(local_data):
        paths.write_bytes(f"{data}/{name}", open(os.path.join(local_data, name), "rb").read())
    reference = tmp_path / "reference"
    run_cli(_flags(local_data, reference))
    want = _metrics(str(reference))
    assert [r["step"] for r in want] == list(range(1, TOTAL + 1))

    workdir = f"{gcs}/run"
    env = {"CLIP_JAX_CACHE": str(tmp_path / "cache")}
    proc = start_cli(_flags(data, workdir), log=tmp_path / "log1", env=env)
    wait_for(lambda: 20 in _checkpoints(workdir), 300, "checkpoint 20 on gs://", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert _checkpoints(workdir)[-1] < TOTAL, "the run finished before it was killed"
    assert len(os.listdir(tmp_path / "cache")) == 5           # the 5 shards, copied once
    resumed = run_cli(_flags(data, workdir), env=env)
    assert f"resumed from {workdir}/checkpoints/" in resumed.stdout
    assert _history(_metrics(workdir)) == _history(want)       # one history, bit for bit
    assert paths.exists(f"{workdir}/tokenizer/spm.model") and paths.exists(f"{workdir}/config.json")
    assert [n for n in paths.listdir(f"{workdir}/tensorboard") if n.startswith("events.out")]

    _flip_a_byte(f"{workdir}/checkpoints/{TOTAL}")
    again = run_cli(_flags(data, workdir), env=env)
    assert f"checkpoints/{TOTAL} is unusable" in again.stdout and "resumed from" in again.stdout
    moved = paths.listdir(f"{workdir}/checkpoints.corrupt")
    assert len(moved) == 1 and moved[0].startswith(f"{TOTAL}-")   # kept, not deleted
    assert _checkpoints(workdir)[-1] == TOTAL                         # saved again
    assert _history(_metrics(workdir)) == _history(want)


def _upload_tree(local, remote):
    for rel in paths.walk_files(local):
        paths.write_bytes(f"{remote}/{rel}", open(os.path.join(local, rel), "rb").read())
    return remote


def test_ingest_into_gcs_writes_what_a_local_ingest_writes(gcs, tmp_path):
    from clip_jax.data import ingest
    from tests.helpers import export_synthetic_csv
    source = export_synthetic_csv(str(tmp_path / "corpus"), 30)
    with open(source, "a") as f:
        f.write("images/missing.png,a broken row\n")
    local = ingest.run("csv", source, str(tmp_path / "local"), workers=0, records_per_shard=8)
    remote = ingest.run("csv", source, f"{gcs}/ingested", workers=0, records_per_shard=8)
    assert remote == local and local["skipped"] == {"missing_file": 1}
    names = paths.listdir(f"{gcs}/ingested")
    assert names == sorted(os.listdir(tmp_path / "local"))
    for name in names:
        assert paths.read_bytes(f"{gcs}/ingested/{name}") == open(tmp_path / "local" / name, "rb").read()
    with pytest.raises(ingest.OptionError, match="already holds an ingested dataset"):
        ingest.run("csv", source, f"{gcs}/ingested", workers=0)


def _shards(directory):
    return {n: paths.read_bytes(paths.join(directory, n)) for n in paths.listdir(directory)
            if n.endswith(".array_record")}


def test_csv_and_webdataset_inputs_on_gcs_ingest_as_local_ones(gcs, tmp_path):
    from clip_jax.data import ingest
    from tests.helpers import export_synthetic_csv
    from tests.test_ingest import write_wds_corpus
    corpus = tmp_path / "corpus"
    source = export_synthetic_csv(str(corpus), 12)
    with open(source, "a") as f:
        f.write("images/missing.png,a broken row\n")
    wds = tmp_path / "wds"
    wds.mkdir()
    patterns = write_wds_corpus(wds)
    remote = _upload_tree(str(tmp_path), f"{gcs}/inputs")
    for fmt, local_source, remote_source in (
            ("csv", source, f"{remote}/corpus/captions.csv"),
            ("wds", patterns, [p.replace(str(tmp_path), remote) for p in patterns])):
        want = ingest.run(fmt, local_source, str(tmp_path / f"{fmt}-local"), workers=0)
        got = ingest.run(fmt, remote_source, str(tmp_path / f"{fmt}-remote"), workers=0)
        for key in ("num_records", "rows", "shards", "skipped", "repaired"):
            assert got[key] == want[key], (fmt, key)
        assert _shards(str(tmp_path / f"{fmt}-remote")) == _shards(str(tmp_path / f"{fmt}-local"))
        assert sum(got["skipped"].values()) > 0


def test_evaluation_data_on_gcs_equals_local(gcs, tmp_path):
    import csv
    from clip_jax.evals import data as data_lib
    from tests.test_evaluate import write_imagefolder
    folder = write_imagefolder(tmp_path / "folder")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerow(["folder/red_circle/a/0.png", "a red circle"])
        w.writerow(["folder/blue_square/b/2.png", "a blue square"])
    remote = _upload_tree(str(tmp_path), f"{gcs}/evaldata")
    for local_spec, remote_spec in ((folder, f"{remote}/folder"),
                                    (str(tmp_path / "pairs.csv"), f"{remote}/pairs.csv")):
        want, got = data_lib.open_eval_data(local_spec), data_lib.open_eval_data(remote_spec)
        assert got.keys == want.keys and got.classnames == want.classnames
        assert got.captions == want.captions
        assert (got.labels is None) == (want.labels is None)
        assert got.labels is None or got.labels.tolist() == want.labels.tolist()
        assert [got.reader[i] for i in range(len(got))] == [want.reader[i] for i in range(len(want))]
    paths.path(f"{remote}/folder/red_circle/a/0.png").unlink()
    with pytest.raises(ValueError, match="image file .*0.png does not exist"):
        data_lib.open_eval_data(f"{remote}/pairs.csv")


def test_a_model_saved_to_gcs_loads_as_from_local_disk(gcs, tmp_path):
    import numpy as np
    import clip_jax
    from tests.helpers import write_model_dir
    local = write_model_dir(tmp_path / "model")
    remote = _upload_tree(local, f"{gcs}/model")
    a, b = clip_jax.load(local, batch_size=4), clip_jax.load(remote, batch_size=4)
    texts = ["a red circle", "a blue square"]
    np.testing.assert_array_equal(a.tokenize(texts), b.tokenize(texts))
    np.testing.assert_array_equal(a.encode_text(a.tokenize(texts)), b.encode_text(b.tokenize(texts)))
    assert b.source == remote


def test_a_clip_bpe_merges_file_on_gcs_reads_as_the_local_one(gcs):
    from clip_jax.data import bpe
    remote = f"{gcs}/vocab/{os.path.basename(bpe.VENDORED_VOCAB)}"
    paths.write_bytes(remote, open(bpe.VENDORED_VOCAB, "rb").read())
    assert bpe.read_merges(remote) == bpe.read_merges(bpe.VENDORED_VOCAB)
    with pytest.raises(ValueError, match="cannot be read"):
        bpe.read_merges(f"{gcs}/vocab/missing.txt.gz")


def test_sources_that_cannot_be_remote_say_so():
    from clip_jax.data import ingest, sources
    with pytest.raises(ingest.OptionError, match="folder sources are read from this machine"):
        ingest.run("imagefolder", "gs://bucket/photos", "/tmp/unused-out", workers=0)
    with pytest.raises(ValueError, match="array_record#120"):
        sources.TfdsSource("mnist", data_dir="gs://bucket/tfds")
