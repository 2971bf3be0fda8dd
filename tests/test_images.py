"""clip_jax.data.images: the JPEG fast path (simplejpeg) gives PIL's pixels, at every DCT
scale PIL would choose, and leaves to PIL what it does not handle (EXIF rotation, grey and
CMYK JPEGs, damaged files), so that what is kept, skipped or converted does not change."""
import io

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import images
from tests.helpers import encode_image


def photo(width, height, seed=0):
    """A smooth image with some texture, as a photo has (flat drawings compress to nothing)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg(array, **options):
    return encode_image(Image.fromarray(array), "JPEG", quality=options.pop("quality", 90), **options)


def decoded_by_pil(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(images, "_decode_jpeg", lambda data, size: None)
        return images.load_rgb(*args, **kwargs)


@pytest.fixture
def fast_path_calls(monkeypatch):
    calls = []
    decode = images._decode_jpeg

    def spy(data, size):
        pixels = decode(data, size)
        calls.append(pixels is not None)
        return pixels
    monkeypatch.setattr(images, "_decode_jpeg", spy)
    return calls


@pytest.mark.parametrize("options", [
    {"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2},        # 4:4:4, 4:2:2, 4:2:0
    {"progressive": True}, {"optimize": True, "quality": 60}])
@pytest.mark.parametrize("need", [None, (300, 240), (150, 100), (70, 50), (20, 20)])
def test_fast_jpeg_decode_gives_pils_pixels_at_every_scale(monkeypatch, fast_path_calls, options, need):
    data = jpeg(photo(613, 451), **options)            # odd sizes: partial DCT blocks
    plan = None if need is None else (lambda w, h: need)
    img, conversion = images.load_rgb(data, plan=plan)
    want, want_conversion = decoded_by_pil(monkeypatch, data, plan=plan)
    assert fast_path_calls == [True]
    assert conversion is want_conversion is None and img.size == want.size
    np.testing.assert_array_equal(np.asarray(img), np.asarray(want))
    if need:                                           # a reduced decode that still covers `need`
        assert need[0] <= img.size[0] < 613 or img.size[0] == 613


def test_training_and_evaluation_crops_are_unchanged(monkeypatch, fast_path_calls):
    data = jpeg(photo(500, 375, seed=3))
    rng = lambda: np.random.default_rng(7)
    train = images.random_resized_crop(data, 64, rng())
    evaluation = images.center_crop(data, 96)
    assert fast_path_calls == [True, True]
    with monkeypatch.context() as m:
        m.setattr(images, "_decode_jpeg", lambda data, size: None)
        np.testing.assert_array_equal(train, images.random_resized_crop(data, 64, rng()))
        np.testing.assert_array_equal(evaluation, images.center_crop(data, 96))


def rotated_jpeg(array, orientation):
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_what_the_fast_path_does_not_handle_goes_to_pil(fast_path_calls):
    array = photo(80, 60)
    # EXIF orientation 6 (rotate 90 clockwise): PIL turns it upright.
    img, _ = images.load_rgb(rotated_jpeg(array, 6))
    assert img.size == (60, 80) and fast_path_calls == []
    # Grey and CMYK JPEGs: PIL's conversions, counted as before.
    grey = encode_image(Image.fromarray(array[..., 0]), "JPEG")
    assert images.load_rgb(grey)[1] == "grayscale"
    cmyk = encode_image(Image.fromarray(np.concatenate([array, array[..., :1]], -1), "CMYK"), "JPEG")
    assert images.load_rgb(cmyk)[1] == "cmyk"
    assert fast_path_calls == []
    # Orientation 1 (upright) takes the fast path.
    images.load_rgb(rotated_jpeg(array, 1))
    assert fast_path_calls == [True]


def test_damaged_jpegs_are_decided_by_pil(fast_path_calls):
    data = jpeg(photo(200, 150))
    with pytest.raises(images.BadImage) as e:
        images.load_rgb(data[: len(data) * 2 // 3])                  # truncated
    assert e.value.reason == "corrupt_image" and fast_path_calls == [False]
    # Extraneous bytes before a marker: libjpeg warns; simplejpeg (strict) refuses, PIL keeps
    # the image, as it always did.
    eoi = data.rindex(b"\xff\xd9")
    noisy = data[:eoi] + b"\x00\x01\x02" + data[eoi:]
    img, _ = images.load_rgb(noisy)
    assert img.size == (200, 150) and fast_path_calls == [False, False]
