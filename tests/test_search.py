"""clip_jax.apps.search: the on-disk index (top-k, crash safety), build_index over a folder of
images with a tiny random CLIP, and the command line end to end."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import clip_jax
from clip_jax.apps import search
from tests.helpers import REPO, device_env, drawn_image, run_cli, write_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("model") / "clip")


@pytest.fixture(scope="module")
def model(model_dir):
    return clip_jax.load(model_dir)


def _brute_force(vectors, queries):
    """float64 cosine similarities [q, n]."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return q.astype(np.float64) @ v.astype(np.float64).T


def test_search_matches_brute_force_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "BLOCK_ROWS", 64)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(1000, 8)) * rng.uniform(0.1, 10, size=(1000, 1))   # unnormalised
    queries = rng.normal(size=(3, 8))
    index = search.Index.create(tmp_path / "idx", "/some/checkpoint", 8)
    index.add([f"/img/{i}.jpg" for i in range(600)], vectors[:600])
    index.add([f"/img/{i}.jpg" for i in range(600, 1000)], vectors[600:])
    index = search.Index.open(tmp_path / "idx")
    assert index.count == 1000 and index.paths[999] == "/img/999.jpg"
    assert isinstance(index.embeddings, np.memmap)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-6)
    expected = _brute_force(vectors, queries)
    for k in (1, 7, 100, 1000, 1500):
        scores, indices = index.search(queries, k)
        assert scores.shape == indices.shape == (3, min(k, 1000))
        for q in range(3):
            best = np.sort(expected[q])[::-1][:k]
            np.testing.assert_allclose(scores[q], best, atol=1e-6)
            # Each index really has its score: the top-k set is right up to float32 near-ties.
            np.testing.assert_allclose(expected[q, indices[q]], scores[q], atol=1e-6)
            assert len(set(indices[q].tolist())) == len(indices[q])


@pytest.mark.parametrize("block", [8, 1024])
def test_equal_scores_rank_the_lower_index_first(tmp_path, monkeypatch, block):
    monkeypatch.setattr(search, "BLOCK_ROWS", block)
    n = 2000
    rows = np.eye(4)[np.arange(n) % 4]   # scores exactly 0 or 1: hundreds of ties
    index = search.Index.create(tmp_path / "idx", "/ckpt", 4)
    index.add([f"/{i}" for i in range(n)], rows)
    queries = np.eye(4)[[1, 3]]
    for k in (3, 5, 600):
        scores, indices = index.search(queries, k)
        for q in range(2):
            exact = rows @ queries[q]
            expected = np.lexsort((np.arange(n), -exact))[:k]   # by score, then lower index
            assert indices[q].tolist() == expected.tolist()
            assert scores[q].tolist() == exact[expected].tolist()


def test_a_crashed_add_is_ignored_on_open_and_cut_off_by_the_next_add(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "idx"
    index = search.Index.create(d, "/ckpt", 6)
    rows = rng.normal(size=(5, 6))
    index.add([f"/a/{i}.png" for i in range(5)], rows)
    good = (d / "embeddings.f32").read_bytes()
    # A crash after appending rows and paths but before index.json was replaced:
    with open(d / "embeddings.f32", "ab") as f:
        f.write(rng.normal(size=(3, 6)).astype(np.float32).tobytes() + b"\x01\x02")
    with open(d / "paths.txt", "ab") as f:
        f.write(b"/a/x.png\n/a/y.png\n/a/partial")
    index = search.Index.open(d)
    assert index.count == 5 and index.paths == [f"/a/{i}.png" for i in range(5)]
    assert index.embeddings.tobytes() == good
    assert index.search(rng.normal(size=(1, 6)), 10)[1].max() == 4 and index.damage is None
    with pytest.raises(search.SearchError, match="opened read-only"):
        index.add(["/b/new.png"], rng.normal(size=(1, 6)))
    index = search.Index.open(d, write=True)
    index.add(["/b/new.png"], rng.normal(size=(1, 6)))
    index.close()
    index = search.Index.open(d)
    assert index.count == 6 and index.paths[-1] == "/b/new.png"
    assert (d / "paths.txt").read_text() == "".join(p + "\n" for p in index.paths)
    assert os.path.getsize(d / "embeddings.f32") == 6 * 6 * 4
    assert (d / "embeddings.f32").read_bytes()[:len(good)] == good
    with pytest.raises(search.SearchError, match="already holds an index"):
        search.Index.create(d, "/ckpt", 6)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"")
    with pytest.raises(search.SearchError, match="not empty"):   # --out pointed at the wrong folder
        search.Index.create(tmp_path / "photos", "/ckpt", 6)


@pytest.mark.parametrize("damage", ["paths_cut", "paths_short", "rows_cut", "count_high"])
def test_a_damaged_tail_is_cut_off_never_extended(tmp_path, damage, capsys):
    rng = np.random.default_rng(2)
    d = tmp_path / "idx"
    names = [f"/photos/album/{i}.png" for i in range(5)]
    rows = rng.normal(size=(5, 6))
    with search.Index.create(d, "/ckpt", 6) as index:
        index.add(names, rows)
    if damage == "paths_cut":     # the last path cut short: "/photos/al", a directory
        os.truncate(d / "paths.txt", os.path.getsize(d / "paths.txt") - 10)
    elif damage == "paths_short":
        (d / "paths.txt").write_text("".join(n + "\n" for n in names[:4]))
    elif damage == "rows_cut":
        os.truncate(d / "embeddings.f32", os.path.getsize(d / "embeddings.f32") - 1)
    else:                         # index.json counting rows that are not there
        meta = json.loads((d / "index.json").read_text())
        (d / "index.json").write_text(json.dumps({**meta, "count": 9}))
    whole = 5 if damage == "count_high" else 4
    files = {f: (d / f).read_bytes() for f in ("index.json", "paths.txt", "embeddings.f32")}

    index = search.Index.open(d)   # a query: searches the whole entries, changes nothing
    assert index.count == whole and index.paths == names[:whole]
    assert "is damaged" in index.damage and f"searching the first {whole}" in index.damage
    assert index.search(rng.normal(size=(1, 6)), 10)[1].max() == whole - 1
    assert {f: (d / f).read_bytes() for f in files} == files

    with search.Index.open(d, write=True) as index:   # an `index` run: repairs, says so
        dropped = "4 entries" if damage == "count_high" else "1 entry"
        assert f"dropped the last {dropped} (path and vector)" in capsys.readouterr().err
        assert json.loads((d / "index.json").read_text())["count"] == whole
        assert (d / "paths.txt").read_text() == "".join(n + "\n" for n in names[:whole])
        assert os.path.getsize(d / "embeddings.f32") == whole * 6 * 4
        index.add(["/photos/new.png"], rng.normal(size=(1, 6)))
    index = search.Index.open(d)
    assert index.damage is None and index.paths == names[:whole] + ["/photos/new.png"]
    assert (d / "paths.txt").read_bytes() == b"".join(os.fsencode(p) + b"\n" for p in index.paths)
    np.testing.assert_allclose(index.embeddings[:whole], search.l2_normalize(rows[:whole]), atol=1e-6)
    assert os.path.getsize(d / "embeddings.f32") == (whole + 1) * 6 * 4


def test_one_writer_at_a_time_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys):
    d = tmp_path / "idx"
    writer = search.Index.create(d, "/ckpt", 3)
    writer.add(["/a.png"], np.ones((1, 3)))
    holder = f"pid {os.getpid()} on {socket.gethostname()} since "
    for second in (lambda: search.Index.open(d, write=True), lambda: search.lock_index(d)):
        with pytest.raises(search.SearchError, match=f"^{d} is being written by another process "
                                                     f"\\({holder}.*\\): wait for it to finish$"):
            second()   # the lock's holder is named (here this very process)
    writer.add(["/b.png"], np.ones((1, 3)))   # the first writer is untouched
    writer.close()
    assert (d / "lock").read_text() == ""     # released cleanly: nothing recorded
    writer = search.Index.open(d, write=True)
    assert capsys.readouterr().err == ""
    assert json.loads((d / "lock").read_text())["pid"] == os.getpid()
    writer.close()
    # A command that fails after taking the lock releases it: the next writer does not warn.
    with pytest.raises(SystemExit, match="was built with --checkpoint /ckpt"):
        search.main(["index", "--checkpoint", str(tmp_path / "none"), "--images", str(tmp_path),
                     "--out", str(d)])
    assert (d / "lock").read_text() == ""
    for remote in (search.Index.open, lambda p: search.Index.create(p, "/ckpt", 3)):
        with pytest.raises(search.SearchError, match="must be a local directory"):
            remote("gs://bucket/idx")


@pytest.mark.slow
def test_a_second_index_run_is_refused_while_another_process_writes(tmp_path, capsys):
    d = tmp_path / "idx"
    # The first writer, in another process: adds, waits, adds again, then is SIGKILLed.
    script = ("import sys, numpy as np; from clip_jax.apps import search\n"
              "index = search.Index.create(sys.argv[1], '/no/such/checkpoint', 3)\n"
              "index.add(['/a.png', '/b.png'], np.ones((2, 3))); print('added', flush=True)\n"
              "sys.stdin.readline(); index.add(['/c.png'], np.ones((1, 3))); print('added', flush=True)\n"
              "sys.stdin.read()\n")
    first = subprocess.Popen([sys.executable, "-c", script, str(d)], cwd=REPO, env=device_env(1),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "added\n"
        # The checkpoint does not exist: refused before any model is loaded.
        proc = run_cli(["clip_jax.apps.search", "index", "--checkpoint", "/no/such/checkpoint",
                        "--images", str(tmp_path), "--out", str(d)], check=False)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith(f"error: {d} is being written by another process (pid {first.pid} "
                                      f"on {socket.gethostname()} since ")
        assert proc.stderr.endswith("): wait for it to finish\n") and proc.stderr.count("\n") == 1
        first.stdin.write("go on\n")
        first.stdin.flush()
        assert first.stdout.readline() == "added\n"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with search.Index.open(d, write=True) as index:   # the dead writer's lock is taken over
        assert index.paths == ["/a.png", "/b.png", "/c.png"] and index.count == 3
    err = capsys.readouterr().err
    assert f"warning: {d}: took over the lock of " in err and f"from pid {first.pid} on" in err
    assert "ended without releasing it" in err
    assert os.path.getsize(d / "embeddings.f32") == 3 * 3 * 4
    assert (d / "paths.txt").read_text() == "/a.png\n/b.png\n/c.png\n"


def _write_images(root, names, start):
    for i, name in enumerate(names, start):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if name.lower().endswith(".jpg") else "PNG"
        drawn_image(i, 40 + 3 * i, 36 + (i % 4) * 5).save(path, fmt)
    return [str(root / name) for name in names]


def test_build_index_embeds_new_images_and_skips_broken_ones(tmp_path, model, capsys):
    root = tmp_path / "photos"
    names = ["b.png", "a.jpg", "UPPER.PNG", "c.png", "sub/z.jpg", "sub/m.png", "sub/deeper/k.png",
             "sub/deeper/j.jpg", "other/q.png", "other/p.png", "other/r.jpg", "s.jpg"]
    _write_images(root, names, 0)
    (root / "sub" / "x.jpg").write_text("not a picture")
    (root / "other" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image extension: not looked at")
    os.mkfifo(root / "pipe.png")                    # would hang a plain open().read()
    os.symlink("/dev/zero", root / "zero.jpg")      # would fill memory
    encoded = []
    encode = model.encode_image
    model.encode_image = lambda x, normalize=False: (encoded.append(len(x)), encode(x, normalize))[1]
    try:
        stats = search.build_index(model, root, tmp_path / "idx", batch_size=8, progress=False)
        err = capsys.readouterr().err
        assert stats == {"added": 12, "skipped": {"not_an_image": 1, "empty_file": 1, "not_a_file": 2},
                         "total": 12}
        assert f"{root / 'sub' / 'x.jpg'}: not_an_image" in err
        assert f"{root / 'pipe.png'}: not_a_file" in err
        assert f"{root / 'other' / 'empty.png'}: empty_file" in err
        index = search.Index.open(tmp_path / "idx")
        order = ["UPPER.PNG", "a.jpg", "b.png", "c.png", "s.jpg", "other/p.png", "other/q.png",
                 "other/r.jpg", "sub/m.png", "sub/z.jpg", "sub/deeper/j.jpg", "sub/deeper/k.png"]
        assert index.paths == [str(root / n) for n in order]
        assert index.meta["checkpoint"] == model.source and index.meta["dim"] == 32
        old_rows = (tmp_path / "idx" / "embeddings.f32").read_bytes()
        expected = encode(np.stack([model.preprocess(open(p, "rb").read()) for p in index.paths]),
                          normalize=True)
        np.testing.assert_allclose(index.embeddings, expected, atol=1e-5)

        new = _write_images(root, ["d.png", "sub/deeper/a.jpg", "new/n.png"], 20)
        encoded.clear()
        stats = search.build_index(model, root, tmp_path / "idx", batch_size=8, progress=False)
        assert stats == {"added": 3, "skipped": {"not_an_image": 1, "empty_file": 1, "not_a_file": 2},
                         "total": 15}
        assert sum(encoded) == 3   # only the new images were embedded
    finally:
        model.encode_image = encode
    index = search.Index.open(tmp_path / "idx")
    assert sorted(index.paths[12:]) == sorted(new)
    assert (tmp_path / "idx" / "embeddings.f32").read_bytes()[:len(old_rows)] == old_rows

    results = search.query(index, model, image=index.paths[4], k=4)
    assert results[0][0] == index.paths[4] and results[0][1] == pytest.approx(1, abs=1e-5)
    assert len(results) == 4 and [s for _, s in results] == sorted((s for _, s in results), reverse=True)
    text = search.query(index, model, text="a photo of a red circle.", k=100)
    assert len(text) == 15 and {p for p, _ in text} == set(index.paths)
    with pytest.raises(search.SearchError, match="was built with"):
        search.build_index(model, root, tmp_path / "idx", checkpoint=str(tmp_path / "other"))


@pytest.mark.slow
def test_command_line(tmp_path, model_dir):
    images = _write_images(tmp_path / "photos", [f"{i}.png" for i in range(6)], 0)
    out = str(tmp_path / "idx")
    proc = run_cli(["clip_jax.apps.search", "index", "--checkpoint", model_dir, "--images",
                    str(tmp_path / "photos"), "--out", out])
    assert "added 6 images" in proc.stdout
    proc = run_cli(["clip_jax.apps.search", "query", out, "a red circle", "-k", "3", "--json"])
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["query"] == "a red circle" and len(result["results"]) == 3 and len(lines) == 4
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(r["path"] in images for r in result["results"])

    missing = str(tmp_path / "nowhere")
    proc = run_cli(["clip_jax.apps.search", "query", missing, "a red circle"], check=False)
    assert proc.returncode != 0 and missing in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["clip_jax.apps.search", "query", out], check=False)
    assert proc.returncode != 0 and "--image" in proc.stderr and "Traceback" not in proc.stderr
