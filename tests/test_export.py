"""The exported model: crops as the package makes them, scores as QualityModel's, loadable
without the package, any batch size from one artifact."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax import export, exported
from hyperiqa_jax.data import image as image_lib
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]
LOADER = REPO / "hyperiqa_jax" / "exported.py"
train_utils.enable_compilation_cache()


# ---------------------------------------------------------------------------- crops


def _photo(height, width, seed):
    """Smooth colour noise: a few JPEG blocks of real content at any size."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Every decoding path of image.open_rgb: modes, EXIF rotation, upscaling, huge files."""
    d = tmp_path_factory.mktemp("odd")
    photo = _photo(90, 120, 0)
    Image.fromarray(photo).save(d / "rgb.jpg", quality=90)
    Image.fromarray(photo).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(photo[:, :, 0]).save(d / "grey.png")
    Image.fromarray(np.dstack([photo, photo[:, :, :1]])).save(d / "rgba.png")
    Image.fromarray(photo).quantize(16).save(d / "palette.png", transparency=3)
    Image.fromarray(photo[:, :, 1].astype(np.uint16) * 257).save(d / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(photo).save(d / "rotated.jpg", exif=exif)
    Image.fromarray(_photo(30, 44, 1)).save(d / "small.png")  # smaller than every crop
    # Above image.DEFAULT_MAX_PIXELS: decoded at a reduced scale.
    Image.fromarray(_photo(4100, 4200, 2)).save(d / "huge.jpg", quality=80)
    Image.fromarray(_photo(4100, 4200, 3)).save(d / "huge.png", compress_level=1)
    return sorted(str(p) for p in d.iterdir())


@pytest.mark.parametrize("resize,draft", [(None, False), (80, False), (80, True),
                                          ((96, 72), False), ((96, 72), True)])
def test_loader_crops_equal_eval_crops(odd_images, resize, draft):
    """The copyable loader decodes, resizes and crops exactly as the package does."""
    data = train_utils.tiny_config().data
    data.resize, data.decode_draft, data.eval_protocol = resize, draft, "grid"
    arrays = [_photo(70, 50, 4), _photo(64, 64, 5)[:, :, 0]]
    for image in [*odd_images, *arrays, Path(odd_images[0]).read_bytes()]:
        want = image_lib.eval_crops(image, data, num_crops=5)
        got = exported.grid_crops(image, resize, data.crop_size, 5,
                                  max_pixels=image_lib.DEFAULT_MAX_PIXELS, draft=draft)
        assert got.dtype == np.uint8 and got.shape == want.shape, image
        np.testing.assert_array_equal(got, want, err_msg=str(image)[:80])


def test_loader_grid_equals_crop_positions():
    for height, width in [(56, 56), (57, 200), (300, 90), (768, 1024)]:
        for num in range(1, 26):
            np.testing.assert_array_equal(
                exported.grid_positions(height, width, 56, num),
                image_lib.crop_positions(height, width, 56, num, "grid"))


def test_weights_round_trip_through_npz_paths():
    variables = {"params": {"a": {"kernel": np.ones((2, 3))}, "b": np.zeros(4)},
                 "batch_stats": {"bn": {"mean": np.arange(3.0)}}}
    flat = export.flat_weights(variables)
    assert set(flat) == {"params/a/kernel", "params/b", "batch_stats/bn/mean"}
    back = exported.nest(flat)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


# ---------------------------------------------------------------------------- the artifact


def family_config(name):
    """A tiny model of each family: E6 (Swin, channel attention), A2 (stage 3 alone, no
    attention), SMART-IQA (scale attention), C0 (ResNet-50; its heads need 224-px crops)."""
    if name == "c0":
        c = train_utils.load_config("resnet50_hyperiqa")
        c.data.update(name="demo", resize=None, test_crops=2, num_workers=1)
        c.train.update(batch_size=4, eval_batch_size=4)
    else:
        c = train_utils.tiny_config()
        if name == "a2":
            c.model.update(multi_scale=False, attention="none")
        elif name == "smart_iqa":
            c.model.attention = "scale"
    c.data.eval_protocol = "grid"
    c.model.dtype = "float32"
    return c


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    paths, _ = train_utils.write_images(tmp_path_factory.mktemp("images"), 5, size=(90, 70))
    return paths


@pytest.mark.parametrize("family", ["e6", "a2", "smart_iqa", "c0"])
def test_exported_scores_equal_quality_model(family, images, tmp_path):
    from hyperiqa_jax import QualityModel

    train_utils.save_init_checkpoint(tmp_path / "run", family_config(family))
    card = export.export_checkpoint(tmp_path / "run", tmp_path / "model")
    want = QualityModel.from_checkpoint(tmp_path / "run").score(images)
    model = exported.ExportedModel(tmp_path / "model", batch_size=2)
    got = model.score(images)
    assert card["preprocessing"]["num_crops"] == model.num_crops == 2
    # Measured: at most 5.7e-6 (E6), 1.9e-6 (A2), 3.8e-6 (SMART-IQA), 0 (C0) on scores of
    # 47-66, i.e. 1-2 float32 ulps: the same crops through differently batched programs.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The E6 tiny model exported by the command line."""
    tmp = tmp_path_factory.mktemp("export")
    train_utils.save_init_checkpoint(tmp / "run", family_config("e6"))
    proc = subprocess.run([sys.executable, "-m", "hyperiqa_jax.export", "--checkpoint",
                           str(tmp / "run"), "--out", str(tmp / "model")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported" in proc.stderr and "higher scores = better" in proc.stderr
    return tmp / "model"


BLOCKED = ("hyperiqa_jax", "flax", "orbax", "grain", "ml_collections", "optax", "tensorflow",
           "tensorflow_datasets", "torch")

ISOLATED = """
import importlib.util, json, sys
BLOCKED = {blocked!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked")
        return None

sys.meta_path.insert(0, Blocker())
spec = importlib.util.spec_from_file_location("exported", {loader!r})
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
status = loader.main({argv!r})
print(json.dumps({{"status": status, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
"""


def test_artifact_runs_without_the_package(model_dir, images, tmp_path):
    """A copy of exported.py scores in a Python that cannot import hyperiqa_jax, flax,
    orbax or grain (-I: no PYTHONPATH or working folder on the path; a meta-path
    blocker for the installed packages), as QualityModel does."""
    from hyperiqa_jax import QualityModel

    loader = tmp_path / "exported.py"
    shutil.copy(LOADER, loader)
    missing = str(tmp_path / "missing.jpg")
    code = ISOLATED.format(blocked=BLOCKED, loader=str(loader),
                           argv=[str(model_dir), *images, missing])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    *rows, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == {"status": 1, "loaded": []}, proc.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO("\n".join(rows))))
    assert [r["path"] for r in rows] == [*images, missing]
    assert rows[-1]["score"] == "" and "not found" in rows[-1]["error"]
    want = QualityModel.from_checkpoint(model_dir.parent / "run").score(images)
    np.testing.assert_allclose([float(r["score"]) for r in rows[:-1]], want, atol=1e-4)
    assert "scored 5 of 6 images (1 failed)" in proc.stderr


def test_batch_and_crop_count_are_symbolic(model_dir, images):
    """One artifact, any batch and crop count, for cpu, cuda and tpu."""
    model = exported.ExportedModel(model_dir)
    art = model.exported
    assert art.platforms == ("cpu", "cuda", "tpu")
    crops_aval = art.in_avals[-1]
    assert [jax.export.is_symbolic_dim(d) for d in crops_aval.shape] == [
        True, True, False, False, False]
    crops = np.stack([model.crops(p) for p in images])  # [5, 2, 56, 56, 3]
    five = model(crops)
    two = model(crops[:2])
    assert five["score"].shape == (5,) and two["score"].shape == (2,)
    # Other shapes compile other programs: measured up to 7.6e-6 apart (2 ulps at ~60).
    np.testing.assert_allclose(two["crop_scores"], five["crop_scores"][:2], atol=1e-4)
    # Crops are scored independently: one crop per image gives that crop's score.
    one = model(crops[:, :1])
    np.testing.assert_allclose(one["score"], five["crop_scores"][:, 0], atol=1e-4)
    np.testing.assert_allclose(five["score"], five["crop_scores"].mean(axis=1), rtol=1e-6)
    card = json.loads((model_dir / "model.json").read_text())
    assert card["export"]["jax_version"] == jax.__version__
    assert card["preprocessing"]["crop_size"] == 56 and card["scores"]["higher_is_better"]
    assert card["training"]["checkpoint"].endswith("checkpoints/0")


def test_export_command_reports_a_missing_checkpoint_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hyperiqa_jax.export", "--checkpoint",
                           str(tmp_path / "no_run"), "--out", str(tmp_path / "model")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    assert not (tmp_path / "model").exists()
