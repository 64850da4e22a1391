"""TFDS array_record builders without TensorFlow, read back into the same pipeline."""

import sys

import numpy as np
import pytest

from hyperiqa_jax.data.pipeline import average_by_image, make_eval_batches, make_train_dataset
from hyperiqa_jax.data.records import load_records
from hyperiqa_jax.data.tfds_builders import build_tfds, load_tfds_source
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
    avg = average_by_image(np.zeros(6), a[0]["image_index"], a[0]["valid"], len(recs))
    assert avg.shape == (2,)
    with pytest.raises(ValueError, match="has splits"):
        load_tfds_source(builder_dir, "val")


def test_build_koniq_official_split(tmp_path):
    root = make_koniq(tmp_path / "koniq")
    builder_dir = build_tfds("koniq10k", root, str(tmp_path / "tfds"),
                             splits=("train", "val", "test"))
    sizes = [len(load_tfds_source(builder_dir, s)) for s in ("train", "val", "test")]
    assert sizes == [6, 2, 2]
    assert len(load_tfds_source(builder_dir, "all")) == 10  # every split built
    assert sorted(r.score for r in load_tfds_source(builder_dir, "test").records()) == [44.0, 49.0]


def test_missing_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_tfds"):
        load_tfds_source(str(tmp_path), "train", name="spaq")
