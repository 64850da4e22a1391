"""The generated demo data set: deterministic, split by reference, cached."""

import hashlib
import os

import numpy as np

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
    assert len(train) == 3 * 6 and len(test) == 1 * 6
    assert not {r.ref for r in train} & {r.ref for r in test}
    scores = {r.image_id: r.score for r in train}
    assert all(0 < s <= 100 for s in scores.values())
    for kind in ("blur", "noise", "jpeg"):  # stronger level -> lower SSIM
        mild, strong = (scores[f"images/astronaut_0_{kind}_{lv}.jpg"] for lv in (1, 2))
        assert strong < mild


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
