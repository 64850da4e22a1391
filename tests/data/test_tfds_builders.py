"""TFDS array_record builders without TensorFlow, read back into the same pipeline."""

import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax.data.image import load_image
from hyperiqa_jax.data.pipeline import make_eval_batches, make_train_dataset
from hyperiqa_jax.data.records import load_records
from hyperiqa_jax.data.sources import load_split, split_scores
from hyperiqa_jax.data.tfds_builders import TfdsSource, build_tfds, load_tfds_source
from hyperiqa_jax.errors import ConfigError
from tests.data.conftest import data_config, write_manifest
from tests.data.test_records import make_koniq


def test_build_and_read_manifest(tmp_path):
    root = write_manifest(tmp_path / "m", n=8)
    builder_dir = build_tfds("manifest", root, str(tmp_path / "tfds"),
                             splits=("train", "test", "all"))
    assert "tensorflow" not in sys.modules
    train = load_tfds_source(builder_dir, "train")
    assert len(train) == 6 and len(load_tfds_source(builder_dir, "all")) == 8
    data, score, name = train[0]
    assert isinstance(data, bytes) and data[:2] == b"\xff\xd8" and name.startswith("tfds:img/")
    by_id = {r.image_id: r.score for r in load_records("manifest", root, "all")}
    assert all(by_id[r.image_id] == r.score for r in train.records())
    batch = next(iter(make_train_dataset(train, data_config(), batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 32, 32, 3)
    # Same pixels as reading the files directly.
    test_src = load_tfds_source(str(tmp_path / "tfds"), "test", name="manifest")
    recs = test_src.records()
    file_recs = [r for r in load_records("manifest", root, "test")]
    file_recs = sorted(file_recs, key=lambda r: [x.image_id for x in recs].index(r.image_id))
    a = list(make_eval_batches(test_src, data_config(), batch_size=6))
    b = list(make_eval_batches(file_recs, data_config(), batch_size=6))
    np.testing.assert_array_equal(a[0]["image"], b[0]["image"])
    np.testing.assert_array_equal(a[0]["image_index"], b[0]["image_index"])
    assert len(recs) == 2 and a[0]["valid"].sum() == 2 * 3  # 2 images x 3 test crops
    with pytest.raises(ValueError, match="has splits"):
        load_tfds_source(builder_dir, "val")


def test_build_koniq_official_split(tmp_path):
    root = make_koniq(tmp_path / "koniq")
    builder_dir = build_tfds("koniq10k", root, str(tmp_path / "tfds"),
                             splits=("train", "val", "test"))
    # No random split: another seed reuses the build and trains from it.
    assert build_tfds("koniq10k", root, str(tmp_path / "tfds"), splits=("test",),
                      seed=5) == builder_dir
    cfg = data_config(name="koniq10k", tfds_dir=str(tmp_path / "tfds"))
    assert [r.image_id for r in load_split(cfg, "val", seed=5).records()] == [
        "1003.jpg", "1008.jpg"]
    sizes = [len(load_tfds_source(builder_dir, s)) for s in ("train", "val", "test")]
    assert sizes == [6, 2, 2]
    assert len(load_tfds_source(builder_dir, "all")) == 10  # every split built
    assert sorted(r.score for r in load_tfds_source(builder_dir, "test").records()) == [44.0, 49.0]


def test_missing_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_tfds"):
        load_tfds_source(str(tmp_path), "train", name="spaq")


# ----------------------------------------------------------------------------- pre-resized


def _pil_resized(path, h, w):
    """PyTorch Resize((h, w)) on a PIL image, done with PIL alone (the reference)."""
    return np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR))


def test_pre_resized_split_matches_the_files(tmp_path):
    root = write_manifest(tmp_path / "m", n=8)
    data_dir = str(tmp_path / "tfds")
    build_tfds("manifest", root, data_dir, splits=("train", "test"), resize=(40, 48),
               crop_size=32)
    files_cfg = data_config(root=root)
    tfds_cfg = data_config(root="", tfds_dir=data_dir)
    for split in ("train", "test"):
        recs = load_split(files_cfg, split, seed=0)
        src = load_split(tfds_cfg, split, seed=0)
        assert isinstance(recs, list) and isinstance(src, TfdsSource)
        # The label file's order, the exact scores, the resized pixels (lossless BMP).
        assert [src[i][2] for i in range(len(src))] == [f"tfds:{r.image_id}" for r in recs]
        np.testing.assert_array_equal(split_scores(src), [r.score for r in recs])
        assert split_scores(src).dtype == np.float64
        for i, r in enumerate(recs):
            data, score, _ = src[i]
            assert data[:2] == b"BM" and score == r.score
            np.testing.assert_array_equal(load_image(data), _pil_resized(r.path, 40, 48))
    # Picklable, for grain's worker processes.
    copy = pickle.loads(pickle.dumps(src))
    assert copy[1][0] == src[1][0] and list(copy.scores) == list(src.scores)
    # The pipeline gives the same evaluation crops from either source.
    test_recs, test_src = load_split(files_cfg, "test"), load_split(tfds_cfg, "test")
    cfg = data_config(eval_protocol="grid")
    a = list(make_eval_batches(test_src, cfg, batch_size=6))
    b = list(make_eval_batches(test_recs, cfg, batch_size=6))
    np.testing.assert_array_equal(a[0]["image"], b[0]["image"])
    # 'all' of a build without it: every split, labels in item order.
    full = load_tfds_source(data_dir, "all", name="manifest")
    ids = [full[i][2][len("tfds:"):] for i in range(len(full))]
    assert ids == [r.image_id for r in full.records()] and len(ids) == 8
    np.testing.assert_array_equal(full.scores, [float(i[4:7]) * 10 for i in ids])


def test_jpeg_and_original_images(tmp_path):
    root = write_manifest(tmp_path / "m", n=4)
    recs = load_records("manifest", root, "train")
    jpeg = load_tfds_source(build_tfds("manifest", root, str(tmp_path / "j"), splits=("train",),
                                       resize=(40, 48), crop_size=32, image_format="jpeg"),
                            "train")
    data = jpeg[0][0]
    assert data[:2] == b"\xff\xd8"
    # Quality 95: close to the resized file (a random-texture image: a few grey levels),
    # far from another image.
    diff = np.abs(load_image(data).astype(int) - _pil_resized(recs[0].path, 40, 48)).mean()
    other = np.abs(load_image(data).astype(int) - _pil_resized(recs[1].path, 40, 48)).mean()
    assert 0 < diff < 4 and other > 20
    original = load_tfds_source(build_tfds("manifest", root, str(tmp_path / "o"),
                                           splits=("train",)), "train")
    with open(recs[0].path, "rb") as f:
        assert original[0][0] == f.read()


def test_build_settings_must_fit_the_config(tmp_path):
    root = write_manifest(tmp_path / "m", n=8)
    data_dir = str(tmp_path / "tfds")
    builder_dir = build_tfds("manifest", root, data_dir, splits=("random:train", "test"),
                             resize=(40, 48), crop_size=32, seed=3)
    cfg = data_config(tfds_dir=data_dir)
    assert len(load_split(cfg, "random:train", seed=3)) == len(
        load_records("manifest", root, "random:train", seed=3))
    with pytest.raises(ConfigError, match="drawn with seed 3, config seed 4"):
        load_split(cfg, "random:train", seed=4)
    assert len(load_split(cfg, "test", seed=4)) == 2  # the column split has no seed
    with pytest.raises(ConfigError, match=r"pre-resized for resize=\[40, 48\]"):
        load_split(data_config(tfds_dir=data_dir, resize=(64, 64)), "test")
    with pytest.raises(ConfigError, match="label 'ssim'"):
        load_split(data_config(tfds_dir=builder_dir, label="ssim"), "test")
    with pytest.raises(ConfigError, match=r"has splits .*not 'val'"):
        load_split(cfg, "val")
    # The same settings reuse the build; others need overwrite=True.
    info = os.path.join(builder_dir, "hyperiqa_jax.json")
    stamp = os.stat(info).st_mtime_ns
    assert build_tfds("manifest", root, data_dir, splits=("test",), resize=(40, 48),
                      crop_size=32, seed=3) == builder_dir
    assert os.stat(info).st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"resize: built \[40, 48\], asked None"):
        build_tfds("manifest", root, data_dir, splits=("test",), seed=3)
    build_tfds("manifest", root, data_dir, splits=("test",), seed=3, overwrite=True)
    assert load_tfds_source(builder_dir, "test")[0][0][:2] == b"\xff\xd8"  # originals now


def test_train_loads_either_source(tmp_path):
    from hyperiqa_jax.train import load_train_test_records

    root = write_manifest(tmp_path / "m", n=8)
    build_tfds("manifest", root, str(tmp_path / "tfds"), resize=(40, 48), crop_size=32)
    config = ml_collections.ConfigDict({"seed": 0, "data": data_config(root=root)})
    files = load_train_test_records(config)
    config.data.tfds_dir = str(tmp_path / "tfds")
    built = load_train_test_records(config)
    assert [len(s) for s in files] == [len(s) for s in built] == [6, 2]
    for a, b in zip(files, built):
        np.testing.assert_array_equal(split_scores(a), split_scores(b))


def test_command_line(tmp_path):
    root = write_manifest(tmp_path / "m", n=4)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo)
    cmd = [sys.executable, "-m", "hyperiqa_jax.data.tfds_builders"]
    help_text = subprocess.run(cmd + ["--help"], cwd=repo, env=env, capture_output=True,
                               text=True).stdout
    assert "--config.data.tfds_dir" in help_text and "--data_dir" in help_text
    done = subprocess.run(cmd + ["--config=configs/tiny.py", "--config.data.name=manifest",
                                 f"--config.data.root={root}", "--config.data.resize=(40, 48)",
                                 "--config.data.crop_size=32", f"--data_dir={tmp_path / 't'}"],
                          cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train: 3 images" in done.stdout and "test: 1 images" in done.stdout
    src = load_tfds_source(str(tmp_path / "t"), "train", name="manifest")
    np.testing.assert_array_equal(load_image(src[0][0]),
                                  _pil_resized(os.path.join(root, "img/000.jpg"), 40, 48))
