"""clip_jax.data.spec: one grammar for training sources, evaluation data and ingest inputs.
Every documented form parses to its fields; a bad spec's error names it, where it came
from and the accepted forms; a spec string means the same split in every user, and
evaluation refuses a TFDS spec without one."""
import os

import pytest

from clip_jax import validation
from clip_jax.config_lib import ConfigError, base_config
from clip_jax.data import ingest, records, sources
from clip_jax.data import spec as spec_lib
from clip_jax.data.spec import DataSpec, SpecError, for_ingest, parse, parse_sources
from clip_jax.evals import data as eval_data
from tests.helpers import REPO
from tests.test_config import load


@pytest.fixture
def local(tmp_path):
    """An ingested directory (a manifest is what marks one), an ImageFolder and a CSV file."""
    ingested, folder = tmp_path / "ingested", tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    ingested.mkdir()
    (ingested / records.MANIFEST).write_text("{}")
    (tmp_path / "pairs.csv").write_text("filepath,caption\n")
    return {"ingested": str(ingested), "folder": str(folder), "csv": str(tmp_path / "pairs.csv"),
            "missing": str(tmp_path / "missing")}


TFDS_FORMS = {   # spec -> (name, split) for training; evaluation: the same, or refused
    "tfds:cifar10": ("cifar10", "train"),
    "tfds:cifar10:test": ("cifar10", "test"),
    "tfds:cifar10:train[:90%]": ("cifar10", "train[:90%]"),
    "tfds:cifar10:3.0.2": ("cifar10:3.0.2", "train"),
    "tfds:cifar10:3.*.*:test": ("cifar10:3.*.*", "test"),
    "tfds:cifar10:3.0.2:train[10%:]": ("cifar10:3.0.2", "train[10%:]"),
}


@pytest.mark.parametrize("text", sorted(TFDS_FORMS))
def test_tfds_forms_parse_to_name_version_and_split(text):
    name, split = TFDS_FORMS[text]
    assert parse(text, "train") == DataSpec("tfds", text, name=name, split=split)
    if text in ("tfds:cifar10", "tfds:cifar10:3.0.2"):     # no split written
        with pytest.raises(SpecError, match=f"{text} needs a split for evaluation: write {text}:test"):
            parse(text, "eval", "--data")
    else:
        assert parse(text, "eval") == DataSpec("tfds", text, name=name, split=split)


def test_synthetic_and_path_forms(local):
    assert parse("synthetic", "train") == DataSpec("synthetic", "synthetic")
    assert parse("synthetic", "eval").attribute == spec_lib.SYNTHETIC_ATTRIBUTE == "shape"
    assert parse("synthetic:color", "eval") == DataSpec("synthetic", "synthetic:color", attribute="color")
    assert parse(local["ingested"], "train") == DataSpec("ingested", local["ingested"], path=local["ingested"])
    assert parse(local["ingested"], "eval").kind == "ingested"
    assert parse(local["folder"], "eval") == DataSpec("imagefolder", local["folder"], path=local["folder"])
    assert parse(local["csv"], "eval") == DataSpec("csv", local["csv"], path=local["csv"])
    mixture = parse_sources(f" synthetic , {local['ingested']},tfds:x:test")
    assert [s.kind for s in mixture] == ["synthetic", "ingested", "tfds"]


def test_clip_benchmark_webdataset_folders_are_wds_evaluation_data(tmp_path):
    """CLIP_benchmark's layout: a split folder (it holds nshards.txt) or a dataset folder
    whose test/ holds it is kind wds, the split folder its path; without nshards.txt the same
    folders are ImageFolders, and training reads none of them as anything but ingested."""
    dataset = tmp_path / "cifar10"
    for split in ("test", "train"):
        (dataset / split).mkdir(parents=True)
        (dataset / split / "nshards.txt").write_text("1\n")
    test, train = str(dataset / "test"), str(dataset / "train")
    assert parse(str(dataset), "eval", "--data") == DataSpec("wds", str(dataset), path=test)
    assert parse(test, "eval") == DataSpec("wds", test, path=test)
    assert parse(train, "eval") == DataSpec("wds", train, path=train)
    assert parse(str(dataset), "train").kind == "ingested"
    (dataset / "test" / "nshards.txt").unlink()
    assert parse(str(dataset), "eval").kind == parse(test, "eval").kind == "imagefolder"
    assert any("nshards.txt" in form for form in spec_lib.FORMS["eval"])


def test_ingest_forms():
    assert for_ingest("csv", "a.csv") == DataSpec("csv", "a.csv", path="a.csv")
    assert for_ingest("captions", "d").kind == "captions" and for_ingest("imagefolder", "d").path == "d"
    assert for_ingest("wds", ["a.tar", "b-{0..3}.tar"]).patterns == ("a.tar", "b-{0..3}.tar")
    assert for_ingest("wds", "a.tar").patterns == ("a.tar",)
    assert for_ingest("tfds", "cifar10") == DataSpec("tfds", "cifar10", name="cifar10", split="train")
    assert for_ingest("tfds", "cifar10:3.0.2", "test[:5]") == DataSpec(
        "tfds", "cifar10:3.0.2", name="cifar10:3.0.2", split="test[:5]")


@pytest.mark.parametrize("text, use, origin, problem", [
    ("laion", "train", "config.data.source", "no such directory"),
    ("synthetic:shape", "train", "config.data.source", "train on 'synthetic'"),
    ("tfds:", "train", "config.data.source", "no dataset NAME"),
    ("tfds:", "eval", "--data", "no dataset NAME"),
    ("synthetic:size", "eval", "--train-data", "no label 'size'"),
    ("nowhere/at/all", "eval", "config.evals.probe.data", "no such file or directory"),
    ("", "eval", "--data", "empty"),
])
def test_a_bad_spec_is_named_with_its_origin_and_the_accepted_forms(text, use, origin, problem):
    with pytest.raises(SpecError) as e:
        parse(text, use, origin)
    message = str(e.value)
    assert message.startswith(f"{origin} {text!r}: ") and problem in message
    assert all(form in message for form in spec_lib.FORMS[use])


def test_bad_lists_and_ingest_inputs_are_named():
    with pytest.raises(SpecError, match=r"config.data.source='synthetic,,x' has an empty entry"):
        parse_sources("synthetic,,x")
    with pytest.raises(SpecError, match=r"config.data.source entry 'x': no such directory"):
        parse_sources("synthetic,x")
    with pytest.raises(SpecError, match=r"SOURCE 'cifar10:test': expected NAME or NAME:VERSION "
                                        r"\(the split goes in --split\)"):
        for_ingest("tfds", "cifar10:test")
    with pytest.raises(SpecError, match="unknown format 'parquet'.*csv FILE; captions DIR"):
        for_ingest("parquet", "x")
    with pytest.raises(SpecError, match="--split applies to tfds, not csv"):
        for_ingest("csv", "a.csv", "train")


class Opened(Exception):
    """Raised by the recording TfdsSource: what a user asked TFDS for."""


def recording_tfds(name, split, *args, **kwargs):
    raise Opened(name, split)


@pytest.mark.parametrize("text, version, split", [("tfds:tiny", "", "train"),
                                                  ("tfds:tiny:1.0.0:test", ":1.0.0", "test")])
def test_a_spec_means_the_same_split_in_every_user(monkeypatch, tmp_path, text, version, split):
    """Training, evaluation and ingest open the TFDS split the spec names, the same one;
    without a split, training and ingest read train and evaluation refuses."""
    monkeypatch.setattr(sources, "TfdsSource", recording_tfds)
    monkeypatch.setattr(eval_data, "TfdsSource", recording_tfds)
    config = base_config()
    config.data.source = text
    with pytest.raises(Opened) as training:
        sources.make_source(config)
    ingest_split = {"split": split} if version else {}      # the ingest CLI's --split
    with pytest.raises(Opened) as ingesting:
        ingest.run("tfds", "tiny" + version, str(tmp_path / "out"), workers=0, **ingest_split)
    assert training.value.args == ingesting.value.args == ("tiny" + version, split)
    if version:
        with pytest.raises(Opened) as evaluating:
            eval_data.open_eval_data(text)
        assert evaluating.value.args == training.value.args
    else:
        with pytest.raises(SpecError, match="--data 'tfds:tiny': tfds:tiny needs a split for "
                                            "evaluation: write tfds:tiny:test"):
            eval_data.open_eval_data(text)


def test_users_report_spec_errors_in_their_own_terms(tmp_path):
    config = load(os.path.join(REPO, "configs", "smoke.py"))
    config.data.source = "synthetic:shape"
    with pytest.raises(ConfigError, match=r"config.data.source entry 'synthetic:shape'.*train on 'synthetic'"):
        validation.validate(config, num_devices=1)
    with pytest.raises(ingest.OptionError, match="SOURCE 'tiny:test': expected NAME or NAME:VERSION"):
        ingest.run("tfds", "tiny:test", str(tmp_path / "out"), workers=0)
    with pytest.raises(ValueError, match="--train-data 'tfds:x': tfds:x needs a split"):
        eval_data.open_eval_data("tfds:x", origin="--train-data")
