"""Decoding of every kind of awkward input file, resizing, crops, normalisation."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax.data import image as im
from hyperiqa_jax.data.image import ImageDecodeError, load_image, load_resized
from tests.data.conftest import data_config, make_image


def _jpeg_bytes(h=48, w=64, seed=0):
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _expect_error(path, words):
    with pytest.raises(ImageDecodeError) as e:
        load_image(path)
    assert e.value.path == str(path)
    assert str(path) in str(e.value)
    assert words in str(e.value)


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated")


def test_corrupt_jpeg(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(data[:2] + b"\x00" * (len(data) - 2))
    _expect_error(p, "not a recognised image")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _expect_error(p, "empty file")


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("just some text, not pixels\n")
    _expect_error(p, "not a recognised image")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nowhere.jpg", "file not found")


def test_bytes_input_and_error_name():
    assert load_image(_jpeg_bytes()).shape == (48, 64, 3)
    with pytest.raises(ImageDecodeError, match="empty file"):
        im.open_rgb(b"", name="tfds:x.jpg")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    src = Image.open(make_image(tmp_path / "src.png", 20, 30))
    p = tmp_path / f"{mode}.png"
    src.convert(mode).save(p)
    out = load_image(p)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "L":
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    if mode == "RGBA":  # alpha dropped, colours kept (like .convert("RGB"))
        np.testing.assert_array_equal(out, np.asarray(src.convert("RGB")))


def test_palette_with_transparency(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.open(make_image(tmp_path / "src.png", 20, 30)).convert("P")
    img.info["transparency"] = 0
    img.save(p, transparency=0)
    assert load_image(p).shape == (20, 30, 3)


def test_16bit_png(tmp_path):
    arr = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    expected = np.round(arr.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    out = load_image(p)
    assert out.shape == (30, 40, 3)
    r, g, b = out[15, 20].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_exif_rotated_jpeg(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.open(make_image(tmp_path / "src.png", 30, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(p, exif=exif.tobytes())
    assert Image.open(p).size == (50, 30)
    assert load_image(p).shape == (50, 30, 3)  # displayed upright: portrait


def test_smaller_than_crop_is_upscaled(tmp_path):
    p = make_image(tmp_path / "tiny.png", 10, 20)
    out = load_resized(p, None, 32)
    assert out.shape == (32, 64, 3)
    assert load_resized(p, (40, 48), 32).shape == (40, 48, 3)
    assert im.target_size(20, 10, 16, 8) == (16, 32)
    with pytest.raises(ValueError, match="smaller than data.crop_size"):
        load_resized(p, (16, 48), 32)


def test_huge_image_bounded_memory(tmp_path):
    """12000x9000 JPEG (above PIL's 89 MP bomb limit): decoded at reduced scale, peak
    memory far below the 324 MB of a full decode."""
    p = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (120, 80, 40)).save(p, quality=50)
    code = (
        "import resource, json, sys\n"
        "from hyperiqa_jax.data.image import load_resized, load_image\n"
        "import numpy as np\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"a = load_resized({str(p)!r}, (512, 384), 224)\n"
        f"b = load_image({str(p)!r})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps([list(a.shape), list(b.shape), (after - before) / 1024]))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         check=True, timeout=120)
    shape_a, shape_b, grew_mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert shape_a == [512, 384, 3]
    assert shape_b[0] * shape_b[1] <= im.DEFAULT_MAX_PIXELS
    assert grew_mb < 100, f"peak memory grew {grew_mb:.0f} MB"


def test_too_many_pixels_for_png(tmp_path, monkeypatch):
    p = make_image(tmp_path / "big.png", 40, 50)
    monkeypatch.setattr(im, "MAX_OTHER_PIXELS", 1000)
    _expect_error(p, "too many pixels (50x40 > 1000 for PNG)")


@pytest.mark.parametrize("height,width,resize", [
    (60, 80, (50, 30)),    # Resize((h, w)): down, the aspect ratio changed
    (60, 80, (97, 131)),   # up by non-integer factors
    (60, 80, 50),          # Resize(int): shorter side 50, longer int(50 * 80 / 60) = 66
    (101, 77, 64),         # portrait: longer side int(64 * 101 / 77) = 83 (rounding gives 84)
])
def test_resize_matches_torchvision(tmp_path, height, width, resize):
    """The PyTorch reference's preprocessing: torchvision Resize on the decoded PIL image."""
    transforms = pytest.importorskip("torchvision.transforms")
    p = make_image(tmp_path / "a.jpg", height, width, quality=95)
    ref = np.asarray(transforms.Resize(resize)(Image.open(p).convert("RGB")))
    got = load_resized(p, resize, 16)
    assert got.shape == ref.shape
    # Measured: identical pixels (torchvision resizes a PIL image with PIL's bilinear filter).
    np.testing.assert_array_equal(got, ref)


def test_crop_positions():
    rng = np.random.default_rng(0)
    pos = im.crop_positions(50, 60, 32, 100, "random", rng)
    assert pos.shape == (100, 2) and pos[:, 0].max() <= 18 and pos[:, 1].max() <= 28
    assert {0, 18} <= set(pos[:, 0].tolist())
    np.testing.assert_array_equal(im.crop_positions(50, 60, 32, 2, "center"), [[9, 14], [9, 14]])
    grid = im.crop_positions(50, 60, 32, 20, "grid")
    assert grid.shape == (20, 2) and len({tuple(g) for g in grid}) == 20
    assert tuple(grid[0]) == (0, 0) and tuple(grid[-1]) == (18, 28)
    with pytest.raises(ValueError, match="unknown crop protocol"):
        im.crop_positions(50, 60, 32, 2, "diagonal")


def test_random_crop_corners_on_a_step():
    """step=8 keeps every corner on JPEG's 8x8 block grid, and still reaches the far edge."""
    pos = im.crop_positions(50, 60, 32, 200, "random", np.random.default_rng(0), step=8)
    assert set(pos[:, 0].tolist()) == {0, 8, 16}  # 16 <= 50 - 32 = 18 < 24
    assert set(pos[:, 1].tolist()) == {0, 8, 16, 24}


def test_extract_crops_and_flip():
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    c = im.extract_crops(img, np.array([[1, 2], [1, 2]]), 4, flips=[False, True])
    np.testing.assert_array_equal(c[0], img[1:5, 2:6])
    np.testing.assert_array_equal(c[1], img[1:5, 2:6][:, ::-1])


def test_normalize():
    x = np.full((2, 2, 3), 255, np.uint8)
    y = im.normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0, 0], (1 - im.IMAGENET_MEAN) / im.IMAGENET_STD, rtol=1e-6)


def test_eval_crops_of_a_path_and_of_its_pixels(tmp_path):
    p = make_image(tmp_path / "a.jpg", 60, 80)
    cfg = data_config(resize=None, crop_size=32, test_crops=6, eval_protocol="grid")
    a = im.eval_crops(p, cfg)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8
    b = im.eval_crops(load_image(p), cfg)
    np.testing.assert_array_equal(a, b)
    # The grid's first crop is the top-left corner, its last the bottom-right one.
    pixels = load_image(p)
    np.testing.assert_array_equal(a[0], pixels[:32, :32])
    np.testing.assert_array_equal(a[-1], pixels[-32:, -32:])
    assert im.eval_crops(p, cfg, protocol="center").shape == (1, 32, 32, 3)


def test_draft_decoding_for_big_jpegs(tmp_path):
    p = make_image(tmp_path / "big.jpg", 1200, 1600, quality=90)
    img = im.open_rgb(p, min_size=(384, 512), draft=True)
    assert img.size == (800, 600)  # 1/2 scale still covers 384x512 (orientation-free)
    a = load_resized(p, (512, 384), 224, draft=True)
    b = load_resized(p, (512, 384), 224)
    assert a.shape == b.shape == (512, 384, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0
    assert im.open_rgb(p, min_size=(384, 512)).size == (1600, 1200)  # off by default
