"""Weights & Biases as a training logger (`config.wandb`), in W&B's offline mode: nothing
leaves the machine. Skipped without the wandb extra (`pip install -e '.[wandb]'`)."""
import glob
import json
import os

import pytest

from clip_jax import metrics, train, validation
from clip_jax.config_lib import ConfigError
from tests.helpers import tiny_config

wandb = pytest.importorskip("wandb")


def records(path):
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", key, version), then
    LevelDB's log format (32 KiB blocks of chunks: crc32c, length, type FULL/FIRST/MIDDLE/LAST),
    which wandb 0.31 no longer reads back in Python."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:                    # a block's tail too short for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:                  # zero padding
            continue
        pending += chunk
        if kind in (1, 4):                             # FULL or LAST: a whole record
            yield pending
            pending = b""


def offline_history(workdir, run_id):
    """{step: {key: value}} and the config, read back from the offline run's record files
    (one per invocation, in order)."""
    from wandb.proto import wandb_internal_pb2
    files = sorted(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}",
                                          f"run-{run_id}.wandb")))
    assert files, os.listdir(os.path.join(workdir, "wandb"))
    history, config = {}, {}
    for data in (d for f in files for d in records(f)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
        elif kind in ("run", "config"):          # the config: with the run, then updates
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


def test_a_run_logs_the_same_scalars_and_its_config_to_wandb_offline(tmp_path, monkeypatch):
    """Every metrics.jsonl line at its step, and the config; resumed, the same W&B run
    (its id kept in the workdir) goes on from the checkpoint."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = tiny_config(total_steps=3, **{"wandb.project": "clip_jax_test", "wandb.mode": "offline"})
    wd = str(tmp_path / "run")
    train.train(config, wd)
    run_id = open(os.path.join(wd, "wandb_run_id")).read().strip()
    with config.unlocked():
        config.total_steps = 5                  # the same run, resumed to step 5
    train.train(config, wd)
    assert open(os.path.join(wd, "wandb_run_id")).read().strip() == run_id
    logged = metrics.read_metrics(wd)
    history, saved = offline_history(wd, run_id)
    assert sorted(history) == [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    for record in logged:
        for key, value in record.items():
            if key != "step":
                assert history[record["step"]][key] == pytest.approx(value, rel=1e-6), key
    assert saved["batch_size"] == config.batch_size and saved["total_steps"] == 5
    assert saved["wandb"]["project"] == "clip_jax_test" and saved["model"]["remat"] == "none"


def test_wandb_settings_are_checked_before_the_run():
    config = tiny_config(**{"wandb.project": "p", "wandb.mode": "sometimes"})
    with pytest.raises(ConfigError, match="config.wandb.mode: must be 'online', 'offline' or 'disabled'"):
        validation.validate(config, 1)
