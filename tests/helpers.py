"""Shared test helpers: running code under N fake CPU devices in a fresh interpreter."""
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_env(n_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_python(code, n_devices=1, timeout=600):
    """Runs `code` with `n_devices` fake devices; returns the JSON its last line prints."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=device_env(n_devices), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(args, n_devices=1, timeout=900, check=True):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=device_env(n_devices),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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


def write_ingested(directory, n, records_per_shard=7, broken=(), size=(52, 48)):
    """An ingested dataset written directly in the record format (no ingest run): record i is
    `drawn_image(i)` as JPEG with caption 'picture number i'. Records in `broken` get bytes
    that are not an image, standing in for corruption after ingest."""
    import io
    from clip_jax.data import records
    os.makedirs(directory, exist_ok=True)
    writer = records.ShardWriter(str(directory), records_per_shard)
    for i in range(n):
        buf = io.BytesIO()
        drawn_image(i, *size).save(buf, "JPEG", quality=95)
        image = b"this is not a jpeg" if i in broken else buf.getvalue()
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
