"""Shared test helpers: running code under N fake CPU devices in a fresh interpreter."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def deadline(seconds):
    """Raises TimeoutError in the main thread after `seconds`, then every second (SIGALRM:
    it interrupts a blocking system call, such as opening a FIFO), so code that hangs fails
    the test instead of hanging CI, even where it catches the first error."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: hung")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def device_env(n_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_scripts_together(script, runs, timeout=300):
    """Starts `python SCRIPT ARGS...` once per (n_devices, args) in `runs`, all at once (so
    that processes of one jax.distributed group meet), and returns the JSON each prints on
    its last line, in order. Fails with a process's stderr if it fails."""
    env = lambda n: dict(device_env(n), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env(n),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, args in runs]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def run_python(code, n_devices=1, timeout=600):
    """Runs `code` with `n_devices` fake devices; returns the JSON its last line prints."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=device_env(n_devices), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(args, n_devices=1, timeout=900, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**device_env(n_devices), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


# A CLIP small enough that a train() call compiles in seconds (smoke config otherwise).
TINY_OVERRIDES = {
    "model.embed_dim": 32, "model.vision.image_size": 16, "model.vision.patch_size": 8,
    "model.vision.width": 32, "model.vision.layers": 1, "model.vision.heads": 2,
    "model.text.width": 32, "model.text.layers": 1, "model.text.heads": 2,
    "model.text.context_length": 16, "batch_size": 16, "total_steps": 4, "log_every": 1,
    "eval_every": 0, "progress": False, "data.synthetic.num_train": 4096,
    "data.synthetic.num_eval": 32,
}


def tiny_config(resnet=False, **overrides):
    """configs/smoke.py with a tiny model (`resnet`: the smoke ResNet, tiny already, with the
    tiny text tower); keyword overrides use '__' for '.' (model__dtype)."""
    from configs import smoke
    config = smoke.get_config("resnet" if resnet else None)
    tiny = {k: v for k, v in TINY_OVERRIDES.items() if not (resnet and k.startswith("model.vision."))}
    for key, value in {**tiny, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_flags(**overrides):
    """TINY_OVERRIDES (+ overrides) as --config.key=value command-line flags."""
    items = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in items.items()]


def start_cli(args, n_devices=1, log=None, env=None):
    """Starts `python -m ARGS` in the background (stdout+stderr to the file `log`)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO,
                            env={**device_env(n_devices), **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)


def wait_for(condition, timeout, what, proc=None, log=None):
    """Polls `condition()` every 20 ms; fails the test after `timeout` s or if `proc` exits
    first, with the end of the file `log` (the process's output) in the message."""
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        failure = None
        if proc is not None and proc.poll() is not None:
            failure = f"the process exited (status {proc.returncode}) before {what}"
        elif time.monotonic() > deadline:
            failure = f"timed out waiting for {what}"
        if failure:
            if log is not None:
                failure += "; its output ends:\n" + open(log).read()[-3000:]
            raise AssertionError(failure)
        time.sleep(0.02)


def logged_steps(workdir):
    """Steps in WORKDIR/metrics.jsonl so far (tolerates a line being written)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_image(img, fmt, **options):
    """A PIL image -> its file bytes in format `fmt` ('JPEG', 'PNG', ...)."""
    import io
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def drawn_image(i, width, height):
    """A smooth, distinct RGB picture for index i (gradient background + a coloured disc)."""
    import numpy as np
    from PIL import Image, ImageDraw
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.array([(37 * i) % 256, (91 * i) % 256, (151 * i) % 256], np.float64)
    arr = (base * 0.5 + 100 * x + 60 * y) % 256
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    r = min(width, height) // 4
    cx, cy = width // 2 + (i % 3 - 1) * r // 2, height // 2
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255 - (29 * i) % 256, 40, 200))
    return img


WDS_FORMATS = {"webp": ("WEBP", {"lossless": True}), "png": ("PNG", {}), "jpg": ("JPEG", {}),
               "jpeg": ("JPEG", {})}


def tar_add(tar, name, data):
    """Adds a regular member `name` holding `data` (bytes or str) to the open TarFile `tar`."""
    import io
    import tarfile
    data = data.encode() if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root, split, samples, classnames=None, templates=None, dataset_type=None,
              image_format="webp", per_shard=3):
    """CLIP_benchmark's WebDataset layout, as its webdataset_builder writes it: samples =
    [(PIL image, integer label or list of captions)] into ROOT/SPLIT/{0..N-1}.tar (`per_shard`
    each; keys s0000000, ...; the captions of a sample joined by newlines in KEY.txt) and
    nshards.txt; classnames.txt, zeroshot_classification_templates.txt (lists) and
    dataset_type.txt (str) in ROOT when given. `image_format`: webp (lossless), png, jpg,
    jpeg, or a sequence of them cycled over the samples. Returns the split folder."""
    import tarfile
    split_dir = os.path.join(str(root), split)
    os.makedirs(split_dir, exist_ok=True)
    formats = [image_format] if isinstance(image_format, str) else list(image_format)
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for s, shard in enumerate(shards):
        with tarfile.open(os.path.join(split_dir, f"{s}.tar"), "w") as tar:
            for j, (image, target) in enumerate(shard):
                index = s * per_shard + j
                ext = formats[index % len(formats)]
                key, (fmt, options) = "s%07d" % index, WDS_FORMATS[ext]
                tar_add(tar, f"{key}.{ext}", encode_image(image, fmt, **options))
                if isinstance(target, (list, tuple)):
                    tar_add(tar, f"{key}.txt", "\n".join(target))
                else:
                    tar_add(tar, f"{key}.cls", str(int(target)))
    with open(os.path.join(split_dir, "nshards.txt"), "w") as f:
        f.write(f"{len(shards)}\n")
    for name, value in (("classnames.txt", classnames), ("dataset_type.txt", dataset_type),
                        ("zeroshot_classification_templates.txt", templates)):
        if value is not None:
            with open(os.path.join(root, name), "w") as f:
                f.write((value if isinstance(value, str) else "\n".join(value)) + "\n")
    return split_dir


def write_ingested(directory, n, records_per_shard=7, broken=(), size=(52, 48)):
    """An ingested dataset written directly in the record format (no ingest run): record i is
    `drawn_image(i)` as JPEG with caption 'picture number i'. Records in `broken` get bytes
    that are not an image, standing in for corruption after ingest."""
    from clip_jax.data import records
    os.makedirs(directory, exist_ok=True)
    writer = records.ShardWriter(str(directory), records_per_shard)
    for i in range(n):
        jpeg = encode_image(drawn_image(i, *size), "JPEG", quality=95)
        image = b"this is not a jpeg" if i in broken else jpeg
        writer.write(records.encode_record(image, f"picture number {i}", key=f"img{i}.jpg"))
    shards = writer.close()
    records.write_manifest(str(directory), {"num_records": n, "rows": n, "shards": shards,
                                            "skipped": {}, "repaired": {}, "max_size": 256})
    return str(directory)


def export_synthetic_csv(directory, n, image_size=48, seed=0):
    """Writes n synthetic training examples as PNG files + captions.csv (a corpus to ingest)."""
    import csv
    from PIL import Image
    from clip_jax.data import synthetic
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    path = os.path.join(directory, "captions.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for i in range(n):
            ex = synthetic.example(i, seed=seed, image_size=image_size)
            name = f"images/{i:05d}.png"
            Image.fromarray(ex["image"]).save(os.path.join(directory, name))
            writer.writerow([name, ex["caption"]])
    return path


def build_tfds_dataset(data_dir, name, classes, examples):
    """Prepares a TFDS dataset `name` (snake_case) in array_record format, without TensorFlow.

    `examples`: (encoded image bytes, caption str or bytes, label) tuples; features 'image',
    'caption' and 'label' (a ClassLabel over `classes`). Images go in encoded: encoding a
    numpy image would need TensorFlow. Note that TFDS shuffles the stored order.
    """
    import io
    import tensorflow_datasets as tfds

    def info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(classes))}))

    def generate(self):
        for i, (image, caption, label) in enumerate(examples):
            yield i, {"image": io.BytesIO(image), "caption": caption, "label": label}

    class_name = "".join(part.title() for part in name.split("_"))   # TFDS names it back
    # A one-part module name: TFDS then looks for no source folder (checksums, metadata)
    # beside the builder, which a class made here has not.
    builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"), "__module__": name, "_info": info,
        "_split_generators": lambda self, dl_manager: {"train": self._generate_examples()},
        "_generate_examples": generate}, skip_registration=True)   # built once per module
    builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def write_model_dir(directory, seed=0, **overrides):
    """A randomly initialised tiny CLIP saved as `clip_jax.load` opens it (no training): the
    parameters (`checkpoint.save_params`), config.json and a SentencePiece tokenizer trained
    on synthetic captions. Returns the directory."""
    import jax
    from clip_jax import checkpoint
    from clip_jax.data import synthetic
    from clip_jax.data.tokenizer import SentencePieceTokenizer
    from clip_jax import models
    config = tiny_config(seed=seed, **overrides)
    model = models.from_config(config)
    variables = models.init_variables(model, config.model, jax.random.key(seed))
    spm = os.path.join(str(directory) + ".tokenizer", "spm.model")
    os.makedirs(os.path.dirname(spm), exist_ok=True)
    SentencePieceTokenizer.train(synthetic.caption_corpus(2000, seed), spm,
                                 config.data.tokenizer_vocab_size)
    checkpoint.save_params(str(directory), variables["params"], variables.get("batch_stats"),
                           config=config, tokenizer_file=spm)
    return str(directory)


GCS_BUCKET = "clip-jax-test"


def gcs_emulator():
    """A local Google Cloud Storage (gcp-storage-emulator, in memory, on a free port) with
    the bucket GCS_BUCKET, as a context manager; inside it, this process and the
    subprocesses it starts reach it for gs:// paths: gcsfs (etils.epath) and
    google-cloud-storage by STORAGE_EMULATOR_HOST, Orbax's TensorStore by
    TENSORSTORE_GCS_HTTP_URL. Yields the URL."""
    import contextlib

    @contextlib.contextmanager
    def running():
        from gcp_storage_emulator.server import create_server
        _emulator_sends_generations()
        port = free_port()
        server = create_server("localhost", port, in_memory=True, default_bucket=GCS_BUCKET)
        server.start()
        url = f"http://localhost:{port}"
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_CLOUD_PROJECT": "clip-jax-test", "GCE_METADATA_HOST": "localhost:1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield url
        finally:
            server.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return running()


def _emulator_sends_generations():
    """gcp-storage-emulator answers a media download without the object's generation
    header, which GCS sends and TensorStore's GCS driver requires (it reads a stored OCDBT
    manifest as 'Malformed StorageGeneration' without it): add it to its download handler."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    if getattr(objects.download, "sends_generation", False):
        return
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
    download.sends_generation = True
    objects.download = download         # objects.get's ?alt=media calls it by this name
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is plain:
                handlers[method] = download


def gcs_fs():
    """The gcsfs file system that etils.epath uses for gs:// here, its listing cache dropped
    (files written by another process or by TensorStore are not in it)."""
    import fsspec
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return fs
