"""Input data: the synthetic dataset, the tokenizer contract, and an exact, topology-free pipeline."""
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from clip_jax import config_lib, validation
from clip_jax.data import pipeline, records, sources, synthetic
from clip_jax.data import tokenizer as tokenizer_lib
from tests.helpers import (build_tfds_dataset, drawn_image, encode_image, free_port,
                           run_scripts_together, write_ingested)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = set(synthetic._HELDOUT_IDS)


def _contiguous_rows(global_batch_size, process_index, process_count):
    """Rows [p*B/P, (p+1)*B/P) of a global batch: process p's share under a plain batch
    sharding (what `pipeline.process_rows` gives on such a mesh)."""
    per = global_batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


def _config(batch_size=16, seed=0, workers=0, num_train=100, ctx=16, source="synthetic",
            image_size=16):
    c = config_lib.base_config()
    c.seed = seed
    c.batch_size = batch_size
    c.model = ml_collections.ConfigDict(dict(
        text=dict(context_length=ctx, vocab_size=256), vision=dict(image_size=image_size)))
    c.data.update(source=source, workers=workers, prefetch=2)
    c.data.synthetic.update(num_train=num_train, num_eval=16)
    return c


@pytest.fixture(scope="module")
def tok():
    corpus = synthetic.caption_corpus(2000, 0)
    return tokenizer_lib.SentencePieceTokenizer(
        tokenizer_lib.SentencePieceTokenizer.train(corpus, None, 256), context_length=16)


# ----------------------------------------------------------------------------- synthetic

def test_examples_are_pure_functions_of_seed_and_index():
    a = synthetic.SyntheticSource("train", image_size=32, num_records=50, seed=3)
    b = synthetic.SyntheticSource("train", image_size=32, num_records=50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["image"].dtype == np.uint8 and x["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(x["image"], y["image"])
        assert (x["caption"], x["shape"], x["color"]) == (y["caption"], y["shape"], y["color"])
    other = synthetic.SyntheticSource("train", image_size=32, num_records=50, seed=4)
    assert any(not np.array_equal(a[i]["image"], other[i]["image"]) for i in range(5))
    assert len(a) == 50
    with pytest.raises(IndexError):
        a[50]


def test_captions_name_shape_and_colour_and_image_shows_them():
    for i in range(300):
        ex = synthetic.example(i, seed=1, image_size=32)
        shape, color = synthetic.SHAPES[ex["shape"]], synthetic.COLORS[ex["color"]]
        assert shape in ex["caption"] and color in ex["caption"], ex["caption"]
        assert " a orange" not in ex["caption"]
        rgb = np.array(synthetic._COLOR_RGB[color])
        dist = np.abs(ex["image"].astype(int) - rgb).max(axis=-1)
        frac = (dist <= 15).mean()
        assert 0.03 < frac < 0.6, (i, frac)        # the shape is there, and not everything


def test_small_and_large_are_distinguishable():
    def area(size):
        return np.mean([synthetic.shape_mask(s, 32, 16, 16, synthetic._RADIUS[size] * 32).mean()
                        for s in synthetic.SHAPES])
    assert area("large") > 2 * area("small") and area("small") > 0.05


def test_train_never_yields_heldout_and_covers_every_attribute():
    combos = set()
    for i in range(2000):
        a = synthetic.attributes(i, seed=0, split="train")
        combos.add((a["shape"], a["color"]))
    assert not combos & HELDOUT
    assert {s for s, _ in combos} == set(range(len(synthetic.SHAPES)))
    assert {c for _, c in combos} == set(range(len(synthetic.COLORS)))
    assert len(HELDOUT) == 8 and len(combos) == 48 - 8


def test_heldout_only_yields_heldout_combinations():
    heldout = synthetic.SyntheticSource("heldout", 16, 40, 0)
    examples = [heldout[i] for i in range(40)]
    assert all(e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8 for e in examples)
    assert {(e["shape"], e["color"]) for e in examples} == HELDOUT
    train = synthetic.SyntheticSource("train", 16, 40, 0)
    assert not any(np.array_equal(examples[i]["image"], train[i]["image"]) for i in range(40))


def test_zeroshot_tasks_and_corpus():
    tasks = synthetic.zeroshot_tasks()
    assert tasks["shape"][0] == list(synthetic.SHAPES) and tasks["color"][0] == list(synthetic.COLORS)
    corpus = synthetic.caption_corpus(500, 0)
    assert corpus == synthetic.caption_corpus(500, 0) and len(set(corpus)) > 100
    words = set(" ".join(corpus).replace(".", " ").replace(",", " ").replace(":", " ").split())
    for _, (names, templates) in tasks.items():
        for t in templates:     # prompts use only words the captions use
            for name in names:
                assert set(t.format(name).replace(".", " ").replace(":", " ").split()) <= words, t


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_contract(tok):
    assert tok.pad_id == 0 and tok.eot_id == tok.vocab_size - 1 and tok.sot_id == tok.eot_id - 1
    assert tok.vocab_size <= 256
    texts = ["a photo of an orange circle.", "", "A LARGE Red Star", "a red star " * 40]
    ids = tok(texts)
    assert ids.dtype == np.int32 and ids.shape == (4, 16)
    assert (ids[:, 0] == tok.sot_id).all()
    for row in ids:
        n = int((row != 0).sum())
        assert (row[n:] == 0).all() and row[n - 1] == tok.eot_id
        assert row.max() == tok.eot_id and int(np.argmax(row)) == n - 1   # argmax pooling
        assert (row[1:n - 1] > 0).all() and (row[1:n - 1] < tok.sot_id).all()
    np.testing.assert_array_equal(ids[1, :3], [tok.sot_id, tok.eot_id, 0])
    assert ids[3, -1] == tok.eot_id                      # truncated, eot kept last
    np.testing.assert_array_equal(ids[2], tok(["a large red star"])[0])   # lowercased
    assert tok.decode(ids[0]) == "a photo of an orange circle."


def test_tokenizer_training_is_reproducible(tmp_path):
    corpus = synthetic.caption_corpus(2000, 0)
    p1, p2 = tmp_path / "a" / "spm.model", tmp_path / "b" / "spm.model"
    tokenizer_lib.SentencePieceTokenizer.train(corpus, str(p1), 200)
    tokenizer_lib.SentencePieceTokenizer.train(corpus, str(p2), 200)
    assert p1.read_bytes() == p2.read_bytes()
    t = tokenizer_lib.SentencePieceTokenizer.load(str(p1), 8)
    assert t.vocab_size <= 200


def test_get_tokenizer_caches_and_rejects_unknown(tmp_path):
    c = _config()
    t1 = tokenizer_lib.get_tokenizer(c, str(tmp_path))
    path = tmp_path / "tokenizer" / "spm.model"
    assert path.exists() and t1.context_length == 16 and t1.vocab_size <= 256
    before = path.read_bytes()
    t2 = tokenizer_lib.get_tokenizer(c, str(tmp_path))
    assert path.read_bytes() == before and t2.model_proto == before
    c.data.tokenizer = "nope"
    with pytest.raises(ValueError, match=r"data\.tokenizer.*nope"):
        tokenizer_lib.get_tokenizer(c, str(tmp_path))


# ----------------------------------------------------------------------------- pipeline

def _host_batches(config, tok, n, rows=None):
    it = iter(pipeline.make_host_dataset(config, tok, rows))
    return [next(it) for _ in range(n)]


def test_global_batch_is_identical_for_one_or_two_processes(tok):
    c = _config(batch_size=16, num_train=40)     # 40 % 16 != 0: batches straddle epochs
    whole = _host_batches(c, tok, 6)
    halves = [_host_batches(c, tok, 6, _contiguous_rows(16, p, 2)) for p in range(2)]
    for k in range(6):
        for key in ("images", "tokens", "indices"):
            np.testing.assert_array_equal(
                whole[k][key], np.concatenate([halves[0][k][key], halves[1][k][key]]))
    idx = np.concatenate([b["indices"] for b in whole])
    assert sorted(idx[:40].tolist()) == list(range(40))          # epoch 1: each record once
    assert sorted(idx[40:80].tolist()) == list(range(40))        # epoch 2: each record once
    assert idx[:40].tolist() != idx[40:80].tolist()              # ... in a new order
    assert whole[0]["images"].dtype == np.uint8 and whole[0]["tokens"].dtype == np.int32


def test_different_seed_gives_different_order(tok):
    a = _host_batches(_config(seed=0), tok, 1)[0]["indices"]
    b = _host_batches(_config(seed=1), tok, 1)[0]["indices"]
    assert a.tolist() != b.tolist()


def test_bad_source_names_the_key(tok):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match=r"data\.source.*'tfds'"):
        pipeline.make_train_iterator(_config(source="tfds"), tok, NamedSharding(mesh, P("data")))


def test_normalize_images_uses_clip_mean_and_std():
    pixels = np.stack([synthetic.SyntheticSource("heldout", 16, 16, 0)[i]["image"] for i in range(16)])
    images = pipeline.normalize_images(pixels)
    np.testing.assert_allclose(images[..., 0], (pixels[..., 0] / 255 - 0.48145466) / 0.26862954,
                               rtol=1e-5)


# ----------------------------------------------------------------------------- ingested data

@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    return write_ingested(tmp_path_factory.mktemp("ingested") / "ds", 45)


@pytest.fixture(scope="module")
def ingested_broken(tmp_path_factory):
    return write_ingested(tmp_path_factory.mktemp("broken") / "ds", 30, broken=(3, 4, 17))


def test_ingested_batches_are_cropped_tokenised_and_topology_free(ingested, tok):
    c = _config(batch_size=16, source=ingested)
    whole = _host_batches(c, tok, 4)
    assert whole[0]["images"].shape == (16, 16, 16, 3) and whole[0]["images"].dtype == np.uint8
    halves = [_host_batches(c, tok, 4, _contiguous_rows(16, p, 2)) for p in range(2)]
    quarters = [_host_batches(c, tok, 4, _contiguous_rows(16, p, 4)) for p in range(4)]
    for k in range(4):
        for key in ("images", "tokens", "indices", "replaced"):
            np.testing.assert_array_equal(whole[k][key], np.concatenate([h[k][key] for h in halves]))
            np.testing.assert_array_equal(whole[k][key], np.concatenate([q[k][key] for q in quarters]))
    # Each row's caption is its record's: the tokens are the tokenised caption.
    b = whole[0]
    np.testing.assert_array_equal(b["tokens"], tok([f"picture number {i}" for i in b["indices"]]))
    # The crop is a random 90-100% view: the same record differs between epochs, and its
    # picture matches the centre view far better than another record's does.
    from clip_jax.data import images as images_lib, records
    src = records.IngestedSource(ingested)
    for row in range(4):
        i = int(b["indices"][row])
        centre = images_lib.center_crop(src[i]["image"], 16).astype(float)
        other = images_lib.center_crop(src[(i + 1) % 45]["image"], 16).astype(float)
        got = b["images"][row].astype(float)
        assert np.abs(got - centre).mean() < 0.5 * np.abs(got - other).mean()
    idx = np.concatenate([x["indices"] for x in whole])
    first_row_again = {int(i): n for n, i in enumerate(idx[45:64])}
    j = next(j for j in range(16) if int(idx[j]) in first_row_again)
    k2, r2 = divmod(45 + first_row_again[int(idx[j])], 16)
    assert not np.array_equal(whole[0]["images"][j], whole[k2]["images"][r2])
    assert not any(x["replaced"].any() for x in whole)


def test_broken_records_are_replaced_by_the_next_and_counted(ingested_broken, tok):
    c = _config(batch_size=15, source=ingested_broken)
    batches = _host_batches(c, tok, 6)    # 90 rows = 3 epochs of 30 records
    planned = np.concatenate([np.asarray(b) for b in
                              [pipeline.index_batches(30, 15, 0)[k] for k in range(6)]])
    used = np.concatenate([b["indices"] for b in batches])
    replaced = np.concatenate([b["replaced"] for b in batches])
    expected_used = np.array([{3: 5, 4: 5, 17: 18}.get(int(i), int(i)) for i in planned])
    np.testing.assert_array_equal(used, expected_used)
    np.testing.assert_array_equal(replaced, np.isin(planned, (3, 4, 17)).astype(np.int32))
    assert replaced.sum() == 9                      # 3 broken records x 3 epochs
    assert all(b["images"].shape == (15, 16, 16, 3) for b in batches)


def test_a_dataset_of_broken_records_stops_with_a_clear_error(tmp_path, tok):
    d = write_ingested(tmp_path / "ds", 5, broken=range(5))
    with pytest.raises(pipeline.BrokenDataset,
                       match=r"all unreadable, in .*ds/data-00000.array_record \(last error"):
        _host_batches(_config(batch_size=5, source=d), tok, 1)


def test_a_truncated_or_replaced_shard_is_named_when_the_dataset_opens(tmp_path, tok):
    # A truncated shard has lost its index (ArrayRecord keeps it at the end): it cannot be
    # opened, and one source over all shards made every record of all of them unreadable.
    d = write_ingested(tmp_path / "ds", 20, records_per_shard=5)
    shard = os.path.join(d, "data-00002.array_record")
    os.truncate(shard, os.path.getsize(shard) // 2)
    c = _config(source=d)
    with pytest.raises(ValueError, match=r"ds/data-00002.array_record: damaged shard .* cannot "
                                         r"be opened .*--overwrite"):
        records.IngestedSource(d)
    with pytest.raises(ValueError, match="data-00002.array_record: damaged shard"):
        tokenizer_lib.get_tokenizer(c, str(tmp_path / "wd"))   # trains on the source's captions
    # With the tokenizer given, training opens the source first in the pipeline: the same
    # error, as the one line `error: ...` of a config error (was a traceback).
    from clip_jax import train
    from tests.helpers import tiny_config
    model = tmp_path / "tok.model"
    model.write_bytes(tok.model_proto)
    with pytest.raises(config_lib.ConfigError, match="data-00002.array_record: damaged shard"):
        train.train(tiny_config(data__source=d, data__tokenizer_path=str(model)),
                    str(tmp_path / "run"))
    other = write_ingested(tmp_path / "other", 3, records_per_shard=5)   # a 3-record shard
    shutil.copy(os.path.join(other, "data-00000.array_record"), shard)
    with pytest.raises(ValueError, match=r"data-00002.array_record: .* holds 3 records, "
                                         r"manifest.json says 5"):
        records.IngestedSource(d)


def test_a_corrupt_record_is_named_and_replaced_the_rest_of_its_shard_read(tmp_path, tok):
    d = write_ingested(tmp_path / "ds", 20, records_per_shard=5)
    shard = os.path.join(d, "data-00001.array_record")
    data = bytearray(open(shard, "rb").read())
    data[data.index(b"picture number 7")] ^= 0xFF  # in record 7's chunk; the index is intact
    open(shard, "wb").write(bytes(data))
    src = records.IngestedSource(d)
    bad = {}
    for i in range(20):
        try:
            assert src[i]["caption"] == f"picture number {i}"
        except ValueError as e:
            bad[i] = str(e)
    i = 7
    assert list(bad) == [i]
    assert "data-00001.array_record: record 2 (record 7 of the dataset) is unreadable" in bad[i]
    load = pipeline.HostBatchLoader(src, tok, [0], 16, 0, (0.9, 1.0), (0.75, 1.33))
    assert load.load_or_replace(i, [0])[2:] == (i + 1, 1)
    assert src.record_files([4, 5, 12]) == [os.path.join(d, f"data-0000{j}.array_record")
                                            for j in (0, 1, 2)]


def test_an_unreadable_corpus_is_an_error_not_an_empty_tokenizer():
    class Unreadable:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            raise ValueError(f"record {i} is unreadable")

    with pytest.raises(ValueError, match=r"none of the 10 records .* \(first error: record 0 "):
        sources.tokenizer_corpus(Unreadable(), 100)
    with pytest.raises(ValueError, match="no captions to train the tokenizer on"):
        tokenizer_lib.SentencePieceTokenizer.train([], None, 64)


def test_iterator_state_resumes_mid_epoch_on_another_process_count(ingested, tok):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    c = _config(batch_size=16, source=ingested)        # 45 records: batch 3 straddles epochs
    it = pipeline.make_train_iterator(c, tok, sharding)
    for _ in range(2):
        next(it)
    state = it.get_state()
    assert state["next_batch"] == 2 and state["num_records"] == 45
    expected = [next(it) for _ in range(3)]
    # A fresh iterator restored from the state continues with the same batches.
    again = pipeline.make_train_iterator(c, tok, sharding)
    again.set_state(json.loads(json.dumps(state)))        # survives a JSON round trip
    for e in expected:
        got = next(again)
        np.testing.assert_array_equal(np.asarray(got["images"]), np.asarray(e["images"]))
        np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(e["tokens"]))
    # Two processes restarting from that position read exactly their halves.
    halves = [next(iter(pipeline.make_host_dataset(c, tok, _contiguous_rows(16, p, 2),
                                                   start=state["next_batch"]))) for p in range(2)]
    np.testing.assert_array_equal(pipeline.pixel_rows(np.concatenate([h["images"] for h in halves])),
                                  np.asarray(expected[0]["images"]))
    # A state saved over other data is refused, naming what differs.
    other = pipeline.make_train_iterator(_config(batch_size=8, source=ingested), tok, sharding)
    with pytest.raises(ValueError, match="batch_size: saved 16, now 8"):
        other.set_state(state)
    for x in (it, again, other):
        x.close()


def test_replaced_records_are_counted_by_the_global_iterator(ingested_broken, tok):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    it = pipeline.make_train_iterator(_config(batch_size=15, source=ingested_broken), tok,
                                      NamedSharding(mesh, P("data")))
    for _ in range(4):
        next(it)
    assert it.replaced_records == 6 and it.get_state()["replaced_records"] == 6
    it.close()


def test_weighted_mixture_follows_the_weights(ingested, tok, tmp_path):
    small = write_ingested(tmp_path / "small", 10)
    c = _config(batch_size=20, source=f"{ingested},{small}")
    c.data.weights = "1,3"
    idx = np.concatenate([np.asarray(pipeline.index_batches(
        55, 20, 0, weights=np.array([0.25, 0.75]), part_sizes=[45, 10])[k]) for k in range(50)])
    frac_small = np.mean(idx >= 45)
    assert 0.7 < frac_small < 0.8, frac_small       # the 10-record source gets 3/4 of the rows
    assert set(idx[idx >= 45].tolist()) == set(range(45, 55))
    batch = _host_batches(c, tok, 1)[0]
    np.testing.assert_array_equal(batch["indices"], idx[:20])
    # Concatenation without weights: one shuffled pool, every record once per epoch.
    c.data.weights = ""
    whole = np.concatenate([b["indices"] for b in _host_batches(c, tok, 11)])
    assert sorted(whole[:55].tolist()) == list(range(55)) != whole[:55].tolist()


def test_tfds_source(tmp_path, tok):
    data_dir = make_tfds_dataset(tmp_path)
    c = _config(batch_size=4, source="tfds:tiny_captions")
    c.data.tfds.data_dir = data_dir
    b = _host_batches(c, tok, 2)
    assert b[0]["images"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(np.sort(np.concatenate([x["indices"] for x in b])), np.arange(8))
    src = sources.make_source(c)[0]
    assert {src[i]["caption"] for i in range(8)} == {f"tfds picture {i}" for i in range(8)}
    # The spec's forms reach TFDS: a pinned version and an explicit, sliced split.
    c.data.source = "tfds:tiny_captions:1.0.0:train[:3]"
    assert len(sources.make_source(c)[0]) == 3
    c.data.source = "tfds:tiny_captions:9.9.9"
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'tiny_captions:9.9.9' split 'train'"):
        sources.make_source(c)
    c.data.source = "tfds:tiny_captions"
    c.data.tfds.label_key = "label"
    src = sources.make_source(c)[0]
    from clip_jax.data import prompts
    assert all(src[i]["caption"] in [t.format(n) for t in prompts.DEFAULT_TEMPLATES
                                     for n in ("cat", "sea lion")] for i in range(8))
    c.data.tfds.label_key = "nope"
    with pytest.raises(ValueError, match="no feature 'nope'"):
        sources.make_source(c)[0]


def make_tfds_dataset(tmp_path):
    """A tiny TFDS dataset 'tiny_captions' (8 PNGs, captions, labels) in array_record format."""
    pngs = [encode_image(drawn_image(i, 40, 30), "PNG") for i in range(8)]
    return build_tfds_dataset(tmp_path / "tfds", "tiny_captions", ["cat", "sea_lion"],
                              [(png, f"tfds picture {i}", i % 2) for i, png in enumerate(pngs)])


# ----------------------------------------------------------------------------- workdir tokenizer

def test_workdir_tokenizer_is_trained_on_the_sources_captions(ingested, tmp_path):
    c = _config(source=ingested)
    tok_dir = tmp_path / "wd"
    t = tokenizer_lib.get_tokenizer(c, str(tok_dir))
    ids = t(["picture number 12"])[0]
    assert int((ids != 0).sum()) <= 2 + 4           # whole words, not letters
    assert t.decode(ids) == "picture number 12"
    c2 = _config(source="synthetic")
    with pytest.raises(ValueError, match="trained for .*ds.*delete"):
        tokenizer_lib.get_tokenizer(c2, str(tok_dir))
    c2.data.tokenizer_path = str(tok_dir / "tokenizer" / "spm.model")   # an explicit file
    assert tokenizer_lib.get_tokenizer(c2, str(tmp_path / "other")).model_proto == t.model_proto
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    c2.data.tokenizer_path = str(bad)
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model"):
        tokenizer_lib.get_tokenizer(c2, str(tmp_path / "other"))


# ----------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("key,value,message", [
    ("source", "/no/such/dir", r"data\.source.*'/no/such/dir'"),
    ("source", "EMPTY", r"manifest\.json does not exist"),
    ("source", "synthetic,", r"data\.source.*empty entry"),
    ("weights", "1,2", r"data\.weights.*2 entries for 1 sources"),
    ("weights", "1,x", r"data\.weights.*not a comma-separated list"),
    ("crop_scale", (0.5, 1.5), r"data\.crop_scale"),
    ("tokenizer", "wordpiece", r"data\.tokenizer: must be one of"),
    ("tokenizer_path", "/no/such.model", r"data\.tokenizer_path: no such file"),
])
def test_bad_data_config_names_the_key(tmp_path, key, value, message):
    c = config_lib.base_config()
    c.model = config_lib.model_config("vit_b32")
    if value == "EMPTY":
        value = str(tmp_path)
    c.data[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        validation.validate(c)


_SUBPROCESS = r'''
import json, sys
import numpy as np

def main():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tests.test_data import _config
    from clip_jax.data import pipeline, synthetic, tokenizer as tokenizer_lib
    corpus = synthetic.caption_corpus(2000, 0)
    proto = tokenizer_lib.SentencePieceTokenizer.train(corpus, None, 256)
    tok = tokenizer_lib.SentencePieceTokenizer(proto, context_length=16)
    out = {"spm": __import__("hashlib").sha256(proto).hexdigest()}
    runs = {}
    source = sys.argv[1]        # an ingested directory (with broken records): crops + replacement
    for workers in (0, 2):
        it = iter(pipeline.make_host_dataset(_config(workers=workers, source=source), tok))
        batches = [next(it) for _ in range(5)]
        state = it.get_state()
        after = next(it)
        it.set_state(state)
        again = next(it)
        assert all(np.array_equal(after[k], again[k]) for k in after), "resume"
        if hasattr(it, "close"):
            it.close()
        runs[workers] = batches + [after]
    out["workers_equal"] = all(np.array_equal(a[k], b[k]) for a, b in zip(runs[0], runs[2]) for k in a)
    out["replaced"] = int(sum(b["replaced"].sum() for b in runs[2]))
    # Global arrays on a 4-device mesh equal the host batch (uint8: the step normalises).
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    git = pipeline.make_train_iterator(_config(source=source), tok, sharding)
    first = next(git)
    host = runs[0][0]
    out["sharding_ok"] = first["images"].sharding == sharding and first["tokens"].sharding == sharding
    out["images_ok"] = bool(np.array_equal(np.asarray(first["images"]), pipeline.pixel_rows(host["images"])))
    out["tokens_ok"] = bool(np.array_equal(np.asarray(first["tokens"]), host["tokens"]))
    out["dtypes"] = [str(first["images"].dtype), str(first["tokens"].dtype)]
    print(json.dumps(out))

if __name__ == "__main__":
    main()
'''


def test_workers_and_device_arrays_in_subprocess(tmp_path, tok, ingested_broken):
    """0 vs 2 Grain workers give the same batches (crops and replacements included)."""
    script = tmp_path / "run_pipeline.py"
    script.write_text(_SUBPROCESS)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), ingested_broken], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import hashlib
    assert out["spm"] == hashlib.sha256(tok.model_proto).hexdigest()   # same bytes in another process
    assert out["workers_equal"] and out["replaced"] > 0
    assert out["sharding_ok"] and out["images_ok"] and out["tokens_ok"]
    assert out["dtypes"] == ["uint8", "int32"]      # pixels normalised by the train step


_DISTRIBUTED = r'''
import hashlib, json, sys
import numpy as np

def main():
    import jax
    nproc, pid, port, mesh_shape = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=nproc, process_id=pid)
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tests.test_data import _config
    from clip_jax.data import pipeline, synthetic, tokenizer as tokenizer_lib
    tok = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.SentencePieceTokenizer.train(
        synthetic.caption_corpus(2000, 0), None, 256), context_length=16)
    shape = tuple(int(x) for x in mesh_shape.split("x"))
    mesh = jax.make_mesh(shape, ("data", "model")[:len(shape)],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    it = pipeline.make_train_iterator(_config(num_train=40), tok, NamedSharding(mesh, P("data")))
    h = hashlib.sha256()
    for _ in range(4):
        b = next(it)
        for k in ("images", "tokens"):
            h.update(np.asarray(multihost_utils.process_allgather(b[k], tiled=True)).tobytes())
    print(json.dumps({"hash": h.hexdigest(), "processes": jax.process_count(),
                      "devices": jax.device_count()}))

if __name__ == "__main__":
    main()
'''


def test_global_arrays_identical_with_two_real_processes(tmp_path):
    """1 process x 4 devices (mesh data=4) vs 2 processes x 2 devices (mesh data=2 x model=2)."""
    script = tmp_path / "dist.py"
    script.write_text(_DISTRIBUTED)
    port = free_port()
    outs = run_scripts_together(script, [(4, (1, 0, 0, "4")), (2, (2, 0, port, "2x2")),
                                         (2, (2, 1, port, "2x2"))], timeout=180)
    assert [o["processes"] for o in outs] == [1, 2, 2] and {o["devices"] for o in outs} == {4}
    assert outs[0]["hash"] == outs[1]["hash"] == outs[2]["hash"]


def test_training_opens_its_source_once(tmp_path, monkeypatch):
    """Opening an ingested dataset opens every shard (a request each on a bucket): the
    workdir tokenizer's captions and the pipeline use one opening."""
    from clip_jax import train
    from tests.helpers import tiny_config
    ingested = write_ingested(tmp_path / "ing", 64, records_per_shard=16)
    opened = []
    real = sources.make_source
    monkeypatch.setattr(sources, "make_source", lambda *a, **k: opened.append(a) or real(*a, **k))
    train.train(tiny_config(total_steps=1, data__source=ingested), str(tmp_path / "wd"))
    assert len(opened) == 1
    assert os.path.exists(tmp_path / "wd" / "tokenizer" / "spm.model")   # trained on its captions
