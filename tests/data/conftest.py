"""Small generated images and configs for the data tests."""

import os

import numpy as np
import pytest
from PIL import Image

from hyperiqa_jax import config_defaults


def make_image(path, height=48, width=64, seed=0, fmt=None, **save_kwargs):
    """A random-texture RGB image file; returns its path."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    img.save(str(path), fmt, **save_kwargs)
    return str(path)


def data_config(**overrides):
    """hyperiqa_jax/config_defaults.py's data section, shrunk to the tests' small images."""
    c = config_defaults.reference_config().data
    c.name = "manifest"
    c.resize = (40, 48)
    c.crop_size = 32
    c.train_crops = 4
    c.test_crops = 3
    c.eval_protocol = "random"
    c.max_bad_fraction = 0.0
    c.num_workers = 2
    c.worker_processes = 0
    c.mix_images = 4
    for k, v in overrides.items():
        c[k] = v
    return c


def write_manifest(folder, n=8, bad=(), split_every=4, size=(48, 64)):
    """n images + manifest.csv (path, score, ref, split); `bad` indices are not images."""
    rows = ["path,score,ref,split"]
    for i in range(n):
        rel = f"img/{i:03d}.jpg"
        if i in bad:
            os.makedirs(os.path.join(folder, "img"), exist_ok=True)
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(b"this is not a jpeg")
        else:
            make_image(os.path.join(folder, rel), *size, seed=i)
        split = "test" if i % split_every == split_every - 1 else "train"
        rows.append(f"{rel},{i * 10.0},r{i // 2},{split}")
    with open(os.path.join(folder, "manifest.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(folder)


@pytest.fixture
def manifest_dir(tmp_path):
    return write_manifest(tmp_path / "ds")
