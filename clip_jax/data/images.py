"""Image bytes -> RGB pixels, shared by ingest (write time) and the pipeline (read time).

`load_rgb(data)` is the one decoder. It checks what can go wrong with an image file and
raises `BadImage` with a stable `reason` string (the key of the ingest manifest's
`skipped` mapping):

  empty_file     0 bytes
  not_an_image   PIL cannot identify the bytes (text, HTML, random bytes under a .jpg name)
  too_large      width x height > max_pixels: a decompression bomb. Only the header has been
                 read at that point, so memory stays bounded
  too_small      the short side < min_size
  corrupt_image  the header parses but the pixels do not decode (truncated file, bad data)

`read_file(path, max_bytes)` reads a file a user named (an image, a caption sidecar) and
adds two reasons of its own:

  not_a_file     the path names a FIFO, a device, a socket or a folder: it is not opened
                 (a FIFO would block the reader forever, /dev/zero never ends)
  file_too_large the file has more than max_bytes bytes (default 64 MiB, --max-bytes of the
                 ingest): its size is checked before reading, and no more is ever read

Images that decode but are not 8-bit RGB are converted and kept: CMYK, 16-bit and 32-bit
greyscale (scaled, not clipped), palette, 1-bit, and images with alpha (composited on
white, as a browser shows them). EXIF orientation is applied. The conversion made, if any,
is returned so that ingest can count it.

The crops (`random_resized_crop` for training, `center_crop` for evaluation) use PIL's
antialiased bicubic resampling, like CLIP's preprocessing. They ask the JPEG decoder for
a reduced-size decode (`Image.draft`: DCT scaling) when the output is much smaller than
the file, which makes decoding several times faster and never decodes below the output
resolution.
"""
import io
import math
import os
import stat
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps

from clip_jax import paths

# File extensions read as images (any case) by ingest, evaluation and search.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Same defaults as `clip_jax.ingest`'s --min-size / --max-pixels / --max-bytes. 64 MiB holds
# a 100-megapixel JPEG several times over; a bigger file is a mistake or an attack.
DEFAULT_MIN_SIZE = 32
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 64 << 20

# The paper's "random square crop from resized images", as OpenCLIP implements it:
# RandomResizedCrop(scale=(0.9, 1.0)) with torchvision's default aspect-ratio range.
TRAIN_CROP_SCALE = (0.9, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)


class BadImage(ValueError):
    """An image that cannot be used; `reason` is one of the names in the module docstring."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a folder"))


def _not_regular(mode):
    return BadImage("not_a_file", next((kind for test, kind in _FILE_KINDS if test(mode)),
                                       "not a regular file"))


def _too_large(size, max_bytes):
    return BadImage("file_too_large", f"{size} bytes > max_bytes={max_bytes}")


def read_file(path, max_bytes=DEFAULT_MAX_BYTES):
    """The bytes of the regular file `path` (str or bytes; local, or a URL: `clip_jax.paths`).

    Raises `BadImage` `not_a_file` for anything but a regular file (symlinks followed), which
    is never opened, and `file_too_large` for a file over `max_bytes`, known from its size
    before reading, or from reading max_bytes + 1 of a file that grew (nothing more is read).
    A missing or unreadable file raises the OSError (FileNotFoundError, PermissionError).
    """
    if isinstance(path, str) and paths.is_remote(path):
        size = paths.size(path)          # an object store holds regular files only
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        with paths.path(path).open("rb") as f:
            data = f.read(max_bytes + 1)
    else:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(mode)
        # O_NONBLOCK: should a FIFO have replaced the file since stat, open does not wait.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(info.st_mode)
            if info.st_size > max_bytes:
                raise _too_large(info.st_size, max_bytes)
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadImage("file_too_large", f"more than max_bytes={max_bytes} bytes (it grew "
                                         "while read)")
    return data


def open_image(data, min_size=DEFAULT_MIN_SIZE, max_pixels=DEFAULT_MAX_PIXELS):
    """Reads only the header of `data` (bytes) and checks its size. Returns a lazy PIL image."""
    if not data:
        raise BadImage("empty_file", "0 bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images "
                           "would be silently kept; unset it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except Image.UnidentifiedImageError:   # its message holds the BytesIO's memory address
        raise BadImage("not_an_image", "PIL recognises no image format in the bytes") from None
    except Exception as e:   # PIL raises UnidentifiedImageError, SyntaxError, struct.error, ...
        raise BadImage("not_an_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage("too_large", f"{w}x{h} pixels > max_pixels={max_pixels}")
    if min(w, h) < min_size:
        raise BadImage("too_small", f"{w}x{h}, short side < min_size={min_size}")
    return img


def to_rgb(img):
    """A loaded PIL image -> (8-bit RGB image, name of the conversion made or None)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit) greyscale: scale to 8 bits; convert('L') would clip at 255.
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode != "I" or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), "16bit"
    if mode == "F":
        a = np.asarray(img)
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), "16bit"
    if mode == "P":
        has_alpha = "transparency" in img.info or img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return img, "palette"
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), "alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    # L, 1, YCbCr, LAB, HSV: plain conversions.
    return img.convert("RGB"), ("grayscale" if mode in ("L", "1") else mode.lower())


# EXIF orientations that swap width and height.
_TRANSPOSED = (5, 6, 7, 8)


def load_rgb(data, min_size=DEFAULT_MIN_SIZE, max_pixels=DEFAULT_MAX_PIXELS, plan=None):
    """bytes -> (RGB PIL image, conversion name or None); raises `BadImage`.

    `plan(width, height)`, if given, is called with the upright (EXIF-rotated) size before
    any pixel is decoded and returns the resolution (w, h) of the whole image the caller
    needs; JPEGs are then decoded at the smallest DCT scale that still gives it.
    """
    img = open_image(data, min_size, max_pixels)
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:   # unreadable EXIF: exif_transpose below reports it
        orientation = "unreadable"
    transposed = orientation in _TRANSPOSED
    if plan is not None:
        w, h = img.size[::-1] if transposed else img.size
        need = plan(w, h)
        if img.format == "JPEG":
            need = need[::-1] if transposed else need
            img.draft(None, (max(1, int(need[0])), max(1, int(need[1]))))
    if img.format == "JPEG" and img.mode == "RGB" and orientation in (None, 1):
        pixels = _decode_jpeg(data, img.size)
        if pixels is not None:
            return Image.fromarray(pixels), None
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as e:   # truncated file, corrupt data stream, bad EXIF
        raise BadImage("corrupt_image", f"{type(e).__name__}: {e}") from None
    return to_rgb(img)


def _decode_jpeg(data, size):
    """An upright colour JPEG's RGB pixels at `size` (PIL's `draft` choice: the full size or
    a 1/2, 1/4, 1/8 DCT scale) by simplejpeg, or None where it reports any problem (PIL then
    decodes, and decides). simplejpeg and PIL both run libjpeg-turbo with the same DCT and
    upsampling, so the pixels are the same (tested), and simplejpeg is ~1.5x faster: PIL
    decodes through its generic, chunked image-file machinery (BUILD_NOTES, "JPEG
    decoding")."""
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0],
                                        min_height=size[1], strict=True)
    except (ValueError, RuntimeError):
        return None
    return pixels if pixels.shape[1::-1] == tuple(size) else None


def _short_side_size(width, height, short_side):
    """(w, h) with the short side scaled to `short_side`, aspect ratio kept."""
    scale = short_side / min(width, height)
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def load_for_storage(data, max_size, min_size=DEFAULT_MIN_SIZE, max_pixels=DEFAULT_MAX_PIXELS):
    """Ingest's decode: bytes -> (RGB image with short side <= max_size, conversion or None)."""
    def plan(width, height):
        return (width, height) if min(width, height) <= max_size else _short_side_size(width, height, max_size)

    img, conversion = load_rgb(data, min_size, max_pixels, plan)
    if min(img.size) > max_size:
        img = img.resize(_short_side_size(*img.size, max_size), Image.BICUBIC, reducing_gap=3.0)
    return img, conversion


def encode_jpeg(img, quality=95):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- crops

def random_crop_box(width, height, rng, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO):
    """torchvision's RandomResizedCrop.get_params with a numpy Generator: (left, top, w, h).

    Ten tries at a random area fraction in `scale` and log-uniform aspect ratio in
    `ratio`; then a centre crop clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width, height, size):
    """The evaluation view's box in the image's own pixels: exactly the region that
    OpenAI's / OpenCLIP's `Resize(size)` (short side to `size`, the long side to
    int(size * long / short), bicubic) then `CenterCrop(size)` (offsets
    round((new - size) / 2)) keeps. Resampling that box straight to size x size samples
    the same points with the same filter scale, so the pixels equal the reference's."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    sx, sy = width / new_w, height / new_h
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return left * sx, top * sy, size * sx, size * sy


def _crop(image, size, box_fn, reduced_decode=True):
    """Encoded bytes or a uint8 array -> uint8 [size, size, 3]: `box_fn(width, height)` picks
    the crop in the upright image's pixel coordinates; it is resized to size x size.
    `reduced_decode`: JPEGs may be decoded at a smaller DCT scale that still covers the box."""
    if not isinstance(image, (bytes, bytearray, memoryview)) or not reduced_decode:
        img = array_to_pil(image) if not isinstance(image, (bytes, bytearray, memoryview)) \
            else load_rgb(bytes(image), min_size=1)[0]
        box = box_fn(*img.size)
        return resize_box(img, box, img.size, size)
    planned = []

    def plan(width, height):
        box = box_fn(width, height)
        planned.append((box, (width, height)))
        # The whole-image resolution at which the box still covers size x size pixels.
        return math.ceil(width * size / box[2]), math.ceil(height * size / box[3])

    img, _ = load_rgb(bytes(image), min_size=1, plan=plan)
    (box, original_size), = planned
    return resize_box(img, box, original_size, size)


def resize_box(img, box, original_size, size):
    """Crops `box` (coordinates in an image of `original_size`) out of `img`, which may be a
    reduced decode of it, and resizes it to size x size. Returns uint8 [size, size, 3]."""
    sx, sy = img.size[0] / original_size[0], img.size[1] / original_size[1]
    left, top, w, h = box
    region = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = img.resize((size, size), Image.BICUBIC, box=region, reducing_gap=None)
    return np.asarray(out, np.uint8)


def random_resized_crop(image, size, rng, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO):
    """Training view of an image (encoded bytes or uint8 array): uint8 [size, size, 3]."""
    return _crop(image, size, lambda w, h: random_crop_box(w, h, rng, scale, ratio))


def center_crop(image, size):
    """Evaluation view (short side resized to `size`, centre crop): uint8 [size, size, 3],
    the reference's pixels (`center_crop_box`); JPEGs are decoded at full scale for that
    (a reduced DCT decode changes pixels by a few levels)."""
    return _crop(image, size, lambda w, h: center_crop_box(w, h, size), reduced_decode=False)


def array_to_pil(image):
    """uint8 [H, W, 3] (or [H, W] / [H, W, 1]) array -> RGB PIL image."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        raise BadImage("corrupt_image", f"array image of dtype {a.dtype}, expected uint8")
    return Image.fromarray(a).convert("RGB")
