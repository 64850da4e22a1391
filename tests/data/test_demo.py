"""The generated demo data set: deterministic, split by reference, cached."""

import collections
import csv
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax.data import demo
from hyperiqa_jax.data.records import load_records

SMALL = {"astronaut": (2, "train"), "camera": (1, "train"), "chelsea": (1, "test")}


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_generation_is_deterministic_and_split_by_reference(tmp_path):
    kw = dict(sources=SMALL, size=64, distortions=("blur", "noise", "jpeg"), levels=2)
    demo.generate_demo_dataset(str(tmp_path / "a"), **kw)
    demo.generate_demo_dataset(str(tmp_path / "b"), num_threads=1, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    train = load_records("demo", str(tmp_path / "a"), "train")
    test = load_records("demo", str(tmp_path / "a"), "test")
    # astronaut: 2 crops + its zoomed-out view; camera and chelsea: 1 crop, no zoomed view.
    assert len(train) == (3 + 1) * 6 and len(test) == 1 * 6
    assert len({r.ref for r in train}) == 4
    assert not {r.ref for r in train} & {r.ref for r in test}
    scores = {r.image_id: r.score for r in train}
    assert all(0 < s <= 100 for s in scores.values())
    for kind in ("blur", "noise", "jpeg"):  # stronger level -> lower score
        mild, strong = (scores[f"images/astronaut_0_{kind}_{lv}.jpg"] for lv in (1, 2))
        assert strong < mild


def test_label_is_the_conditions_mean_ssim(tmp_path):
    demo.generate_demo_dataset(str(tmp_path), sources=SMALL, size=64,
                               distortions=("blur", "noise"), levels=2)
    with open(tmp_path / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    by_condition = collections.defaultdict(list)
    for row in rows:
        by_condition[row["distortion"], row["level"]].append(float(row["ssim"]))
    assert len(by_condition) == 4 and all(len(v) == 5 for v in by_condition.values())
    for row in rows:
        assert float(row["score"]) == pytest.approx(
            np.mean(by_condition[row["distortion"], row["level"]]), abs=1e-3)
    # The ssim column is the image's own SSIM x 100 against its reference, as stored.
    row = rows[0]
    ref = np.asarray(Image.open(tmp_path / "refs" / f"{row['ref']}.png"))
    img = np.asarray(Image.open(tmp_path / row["path"]).convert("RGB"))
    assert float(row["ssim"]) == pytest.approx(demo.ssim_score(ref, img), abs=1e-3)


def test_zoomed_out_view_shows_the_whole_photo():
    photo = demo._load_source("astronaut")  # 512 x 512
    view = demo._zoomed_out_crop(photo, 128)
    assert view.shape == (128, 128, 3)
    shrunk = np.asarray(Image.fromarray(photo).resize((128, 128), Image.LANCZOS))
    np.testing.assert_array_equal(view, shrunk)
    assert demo._zoomed_out_crop(photo[:150, :150], 128) is None


def test_every_source_photo_loads_without_a_download():
    for name in demo.SOURCES:
        img = demo._load_source(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert min(img.shape[:2]) >= 128, name


def test_distortions_graded():
    # Every distortion must also degrade greyscale photos (camera), not only colour ones.
    for src in ("astronaut", "camera"):
        ref = demo._reference_crops(demo._load_source(src), 1, 96)[0]
        for kind in demo.DISTORTIONS:
            s = [demo.ssim_score(ref, demo.distort(ref, kind, lv, seed=0)) for lv in (1, 4)]
            assert s[1] < s[0] < 100.0 + 1e-6 and s[1] < 95.0, (src, kind)
            assert demo.distort(ref, kind, 2, seed=0).dtype == np.uint8


def test_ensure_demo_dataset_caches(tmp_path, monkeypatch):
    calls = []
    real = demo.generate_demo_dataset

    def small(out_dir):
        calls.append(out_dir)
        return real(out_dir, sources={"coffee": (1, "train"), "moon": (1, "test")}, size=48,
                    distortions=("blur",), levels=2)

    monkeypatch.setattr(demo, "generate_demo_dataset", small)
    monkeypatch.setenv("HYPERIQA_JAX_CACHE", str(tmp_path / "cache"))
    root = demo.ensure_demo_dataset()
    assert root == str(tmp_path / "cache" / f"demo-v{demo.DEMO_VERSION}")
    assert os.path.isfile(os.path.join(root, "manifest.csv"))
    assert demo.ensure_demo_dataset() == root and len(calls) == 1
    assert len(load_records("demo", root, "all")) == 4
    assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".demo-tmp")] == []
    assert demo.ensure_demo_dataset(str(tmp_path / "elsewhere")).endswith("elsewhere")
