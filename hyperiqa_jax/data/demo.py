"""A small IQA data set generated on first use, so the whole project runs anywhere.

Content: photographs that ship with scikit-image and matplotlib (no download),
several 256x256 reference crops per photo plus one zoomed-out view of the whole
photo. Distortions: six types at four graded levels (Gaussian blur, Gaussian
noise, JPEG, contrast reduction, darkening, pixelation), spread from barely
visible to severe.

Label (v3): the score of the image's condition (distortion, level): the mean
over all references of SSIM x 100 of the distorted image (as saved and decoded
again) against its pristine reference, with the settings of Wang et al. 2004
(Gaussian window sigma 1.5, K1 0.01, K2 0.03, RGB channels averaged). Like the
opinion score of a condition in a subjective study, it is the same for every
photograph: how much SSIM one photo loses depends on content a no-reference
model cannot see (noise costs a flat sky more than grass), so per-image SSIM
labels cap even an oracle that knows the condition at test SRCC 0.84 (v2).
Each image's own SSIM x 100 stays in the ``ssim`` column.

Split: by source photograph (all crops of a photo fall in the same split), so
test content is unseen in training; both splits mix greyscale and colour,
smooth and textured photos. Files: ``manifest.csv`` (columns path, score, ssim,
ref, split, distortion, level, source), ``refs/*.png``, ``images/*.jpg``.

Everything is deterministic (fixed noise seeds, fixed crop positions); images
are stored as quality-95 JPEG and SSIM is computed on the stored pixels.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFilter

DEMO_VERSION = 3
REF_SIZE = 256
LEVELS = 4
# Bundled photographs (name -> (max reference crops, split)): scikit-image's, except
# grace_hopper (matplotlib's sample data). Those needing a pooch download (eagle,
# lily, kidney, skin, ...) are left out, and so is skimage's clock, which is
# motion-blurred as shipped. Each photo also gives one zoomed-out reference.
SOURCES = {
    "astronaut": (4, "train"),
    "coffee": (3, "train"),
    "hubble_deep_field": (4, "train"),
    "retina": (4, "train"),
    "motorcycle": (4, "train"),
    "camera": (4, "train"),
    "brick": (2, "train"),
    "coins": (1, "train"),
    "cell": (2, "train"),
    "moon": (3, "train"),
    "gravel": (2, "train"),
    "page": (1, "train"),
    "rocket": (3, "test"),
    "immunohistochemistry": (4, "test"),
    "grass": (2, "test"),
    "chelsea": (2, "test"),
    "grace_hopper": (2, "test"),
}
DISTORTIONS = ("blur", "noise", "jpeg", "contrast", "darken", "pixelate")


def default_cache_dir() -> str:
    base = os.environ.get("HYPERIQA_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hyperiqa_jax")
    return os.path.join(base, f"demo-v{DEMO_VERSION}")  # a new design never reuses an old cache


def _load_source(name: str) -> np.ndarray:
    if name == "grace_hopper":
        from matplotlib import cbook

        img = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    else:
        from skimage import data

        img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype.kind == "f" else \
            img.astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _resize_short_side(img: np.ndarray, short: int, resample) -> np.ndarray:
    """img resized (aspect kept) so that its shorter side is `short` pixels."""
    h, w = img.shape[:2]
    scale = short / min(h, w)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, resample))


def _reference_crops(img: np.ndarray, max_crops: int, size: int) -> list[np.ndarray]:
    if min(img.shape[:2]) < size:
        img = _resize_short_side(img, size, Image.BICUBIC)
    # Large photos: shrink so that `max_crops` crops cover most of the picture.
    if min(img.shape[:2]) > 2 * size and max_crops > 1:
        img = _resize_short_side(img, 2 * size, Image.LANCZOS)
    h, w = img.shape[:2]
    rows = 2 if h >= 2 * size and max_crops > 1 else 1
    cols = max(1, min(max_crops // rows, w // size))
    ys = np.round(np.linspace(0, h - size, rows + 2)[1:-1] if rows == 1 else
                  np.linspace(0, h - size, rows)).astype(int)
    xs = np.round(np.linspace(0, w - size, cols + 2)[1:-1] if cols == 1 else
                  np.linspace(0, w - size, cols)).astype(int)
    crops = []
    for y in ys:
        for x in xs:
            c = img[y:y + size, x:x + size]
            if c.std() >= 8.0:  # skip featureless patches (black borders)
                crops.append(np.ascontiguousarray(c))
    return crops[:max_crops]


def _zoomed_out_crop(img: np.ndarray, size: int) -> np.ndarray | None:
    """The whole photo shrunk to `size` on its short side, centre crop: coarser content
    than the crops above. None when the photo is too small for that to differ."""
    if min(img.shape[:2]) < 1.5 * size:
        return None
    small = _resize_short_side(img, size, Image.LANCZOS)
    y, x = (small.shape[0] - size) // 2, (small.shape[1] - size) // 2
    return np.ascontiguousarray(small[y:y + size, x:x + size])


def _jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def distort(img: np.ndarray, kind: str, level: int, seed: int) -> np.ndarray:
    """Distortion `kind` at `level` (1 = mild ... LEVELS = strong) of a uint8 RGB image."""
    f = img.astype(np.float32)
    if kind == "blur":
        radius = [0.5, 1.2, 2.5, 5.0][level - 1]
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    if kind == "noise":
        sigma = [4.0, 12.0, 30.0, 70.0][level - 1]
        noise = np.random.default_rng(seed).normal(0.0, sigma, img.shape).astype(np.float32)
        out = f + noise
    elif kind == "jpeg":
        return _jpeg_roundtrip(img, [50, 20, 8, 3][level - 1])
    elif kind == "contrast":
        alpha = [0.8, 0.55, 0.3, 0.12][level - 1]
        out = (f - f.mean()) * alpha + f.mean()
    elif kind == "darken":  # unlike a saturation change, it affects greyscale photos too
        out = f * [0.85, 0.65, 0.45, 0.25][level - 1]
    elif kind == "pixelate":
        factor = [2, 3, 6, 12][level - 1]
        h, w = img.shape[:2]
        small = Image.fromarray(img).resize((max(1, w // factor), max(1, h // factor)), Image.BOX)
        return np.asarray(small.resize((w, h), Image.NEAREST))
    else:
        raise ValueError(f"unknown distortion {kind!r}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def ssim_score(ref: np.ndarray, img: np.ndarray) -> float:
    """SSIM x 100 (Wang et al. settings) of img against ref, RGB channels averaged."""
    from skimage.metrics import structural_similarity

    s = structural_similarity(ref, img, channel_axis=-1, data_range=255, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
    return float(100.0 * s)


def _make_one(args):
    ref, out_path, kind, level, seed = args
    img = distort(ref, kind, level, seed)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    with open(out_path, "wb") as f:
        f.write(data)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return ssim_score(ref, stored)


def generate_demo_dataset(out_dir: str, *, sources: dict | None = None, size: int = REF_SIZE,
                          distortions=DISTORTIONS, levels: int = LEVELS,
                          num_threads: int = 2) -> str:
    """Write the demo data set into `out_dir` (created); returns the manifest path."""
    sources = SOURCES if sources is None else sources
    os.makedirs(os.path.join(out_dir, "refs"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jobs, rows = [], []
    for src, (max_crops, split) in sources.items():
        photo = _load_source(src)
        refs = _reference_crops(photo, max_crops, size)
        zoomed = _zoomed_out_crop(photo, size) if max_crops > 1 else None
        for k, ref in enumerate(refs + ([zoomed] if zoomed is not None else [])):
            ref_id = f"{src}_{k}"
            Image.fromarray(ref).save(os.path.join(out_dir, "refs", f"{ref_id}.png"))
            for kind in distortions:
                for level in range(1, levels + 1):
                    rel = f"images/{ref_id}_{kind}_{level}.jpg"
                    seed = int(hashlib.md5(f"{ref_id}/{kind}/{level}".encode()).hexdigest()[:8], 16)
                    jobs.append((ref, os.path.join(out_dir, rel), kind, level, seed))
                    rows.append({"path": rel, "ref": ref_id, "split": split, "distortion": kind,
                                 "level": level, "source": src})
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        ssims = list(pool.map(_make_one, jobs))
    # The label of a (distortion, level) condition: its mean SSIM over all references.
    by_condition = collections.defaultdict(list)
    for row, ssim in zip(rows, ssims):
        by_condition[row["distortion"], row["level"]].append(ssim)
    condition_score = {key: np.mean(values) for key, values in by_condition.items()}
    manifest = os.path.join(out_dir, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "score", "ssim", "ref", "split", "distortion", "level",
                               "source"])
        w.writeheader()
        for row, ssim in zip(rows, ssims):
            score = condition_score[row["distortion"], row["level"]]
            w.writerow({**row, "score": f"{score:.4f}", "ssim": f"{ssim:.4f}"})
    return manifest


def ensure_demo_dataset(cache_dir: str | None = None) -> str:
    """The demo data set's root folder (holding manifest.csv), generating it if needed.

    cache_dir: where it lives; default $HYPERIQA_JAX_CACHE/demo-v<version>, else
    ~/.cache/hyperiqa_jax/demo-v<version>. Generated once (about 20 s on 2 cores) into a
    temporary folder and moved into place, so concurrent callers are safe.
    Read it with load_records('demo', root, split) (or 'manifest').
    """
    root = os.path.abspath(cache_dir or default_cache_dir())
    stamp = os.path.join(root, f"COMPLETE_v{DEMO_VERSION}")
    if os.path.isfile(stamp):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-tmp-", dir=parent)
    try:
        t0 = time.time()
        generate_demo_dataset(tmp)
        with open(os.path.join(tmp, f"COMPLETE_v{DEMO_VERSION}"), "w") as f:
            f.write(f"generated in {time.time() - t0:.1f}s\n")
        if os.path.isdir(root) and not os.path.isfile(stamp):
            shutil.rmtree(root, ignore_errors=True)  # an older version or a broken attempt
        try:
            os.replace(tmp, root)
        except OSError:
            if not os.path.isfile(stamp):  # someone else won only if their copy is complete
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root
