"""Scores images with a model exported by `python -m hyperiqa_jax.export`; needs only JAX.

This one file is meant to be copied: it imports jax, numpy and pillow and
nothing of the hyperiqa_jax package (nor flax, orbax or grain). Install
`pip install jax flatbuffers numpy pillow` (jax[cuda12] or jax[tpu] on an
accelerator; flatbuffers reads the artifact).

    python exported.py model_dir/ photo.jpg shots/*.png > scores.csv

    from exported import ExportedModel
    model = ExportedModel("model_dir/")
    scores = model.score(["a.jpg", "b.png"])      # float64 [N], higher = better quality

model_dir/ holds what the export wrote: scoring.jax (the jax.export artifact),
weights.npz and model.json (crop size, resize, crop count, score scale). Each
image is decoded, resized and cut into a grid of crops exactly as hyperiqa_jax
does (`hyperiqa_jax.data.image.eval_crops`, protocol "grid"); its score is the
mean of its crops' scores, on the training labels' scale.

An artifact loads in JAX releases up to 6 months newer than the one that
exported it (model.json, "export"); re-export the checkpoint after that.
"""

import argparse
import concurrent.futures
import csv
import io
import json
import math
import os
import sys

import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoding limits of hyperiqa_jax.data.image: a JPEG above MAX_PIXELS is decoded at a
# reduced DCT scale (other formats are reduced after decoding), so only its own limit
# applies; PIL's global limit is replaced by these two checks.
MAX_JPEG_PIXELS = 1_000_000_000
MAX_OTHER_PIXELS = 2 * 89_478_485
Image.MAX_IMAGE_PIXELS = None


class ExportedModel:
    """The exported scoring function, its weights and preprocessing."""

    def __init__(self, model_dir, *, batch_size=8, num_crops=None, workers=None):
        with open(os.path.join(model_dir, "model.json"), encoding="utf-8") as f:
            self.card = json.load(f)
        pre = self.card["preprocessing"]
        self.crop_size = int(pre["crop_size"])
        self.resize = pre["resize"]
        self.num_crops = int(num_crops or pre["num_crops"])
        self.max_pixels = pre["max_pixels"]
        self.decode_draft = bool(pre["decode_draft"])
        self.batch_size = int(batch_size)
        self.workers = workers or min(8, os.cpu_count() or 1)
        with open(os.path.join(model_dir, self.card["function"]), "rb") as f:
            self.exported = jax.export.deserialize(bytearray(f.read()))
        with np.load(os.path.join(model_dir, self.card["weights"])) as weights:
            self.variables = jax.device_put(nest({k: weights[k] for k in weights.files}))
        self._call = jax.jit(self.exported.call)

    def __call__(self, crops):
        """{"score": [B], "crop_scores": [B, C]} (numpy) for uint8 crops [B, C, S, S, 3]."""
        return jax.tree.map(np.asarray, self._call(self.variables, np.asarray(crops, np.uint8)))

    def crops(self, image):
        """uint8 [num_crops, S, S, 3]: the grid crops of a path, encoded bytes or uint8 array."""
        return grid_crops(image, self.resize, self.crop_size, self.num_crops,
                          max_pixels=self.max_pixels, draft=self.decode_draft)

    def iter_scores(self, images):
        """Yields (index, score, error or None) per image, in order; a file that cannot be
        decoded gets score NaN and the reason.

        While the model scores one batch, the next is decoded and queued behind it
        (JAX dispatches asynchronously), so the device never waits for the host.
        """
        images = list(images)
        chunks = [images[i:i + self.batch_size]
                  for i in range(0, len(images), self.batch_size)]
        queued = None  # (first index, decode results, scores not yet read)
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            pending = [pool.submit(self._crops_or_error, x) for x in chunks[0]] if chunks else []
            for k in range(len(chunks)):
                decoded = [f.result() for f in pending]
                if k + 1 < len(chunks):
                    pending = [pool.submit(self._crops_or_error, x) for x in chunks[k + 1]]
                batch = np.zeros((self.batch_size, self.num_crops, self.crop_size,
                                  self.crop_size, 3), np.uint8)  # a whole batch: one compile
                for row, (crops, _) in enumerate(decoded):
                    if crops is not None:
                        batch[row] = crops
                launched = (k * self.batch_size, decoded,
                            self._call(self.variables, batch)["score"])
                if queued is not None:
                    yield from _rows(*queued)
                queued = launched
        if queued is not None:
            yield from _rows(*queued)

    def score(self, images, errors="raise"):
        """float64 [N] scores (higher = better quality) of paths, encoded bytes or uint8 arrays.

        errors: 'raise' raises ValueError for the first image that cannot be
        decoded; 'nan' gives it NaN.
        """
        if isinstance(images, (str, bytes, os.PathLike)) or (
                isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]
        out = []
        for i, score, error in self.iter_scores(images):
            if error and errors == "raise":
                raise ValueError(f"cannot decode image {_name(images[i])}: {error}")
            out.append(score)
        return np.asarray(out, np.float64)

    def _crops_or_error(self, image):
        try:
            return self.crops(image), None
        except (OSError, ValueError, SyntaxError, MemoryError, EOFError,
                UnidentifiedImageError, Image.DecompressionBombError) as e:
            return None, _reason(e)


def _rows(first, decoded, scores):
    scores = np.asarray(scores)
    for row, (_, error) in enumerate(decoded):
        yield first + row, (math.nan if error else float(scores[row])), error


def nest(flat):
    """{"params/a/b": x} -> {"params": {"a": {"b": x}}}: weights.npz back into variables."""
    out = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


# ------------------------------------------------------------------------- preprocessing
# Each step below does what its namesake in hyperiqa_jax/data/image.py does, pixel for
# pixel (tests/test_export.py compares the crops).


def open_rgb(source, *, min_size=None, max_pixels=None, draft=False):
    """Decodes a path or bytes to an RGB PIL image, EXIF-rotated, reduced when huge."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("empty file (0 bytes)")
        img = Image.open(io.BytesIO(bytes(source)))
    else:
        path = os.fspath(source)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        img = Image.open(path)
    width, height = img.size
    limit = MAX_JPEG_PIXELS if img.format == "JPEG" else MAX_OTHER_PIXELS
    if width * height > limit:
        raise ValueError(f"too many pixels ({width}x{height} > {limit} for {img.format})")
    factor = reduce_factor(width, height, min_size, max_pixels, draft and img.format == "JPEG")
    if factor > 1 and img.format == "JPEG":
        img.draft(img.mode if img.mode in ("RGB", "L") else None,
                  (math.ceil(width / factor), math.ceil(height / factor)))
        factor = 1
    img.load()
    if factor > 1:
        img = img.reduce(factor)
    img = to_rgb(ImageOps.exif_transpose(img))
    img.load()
    return img


def reduce_factor(width, height, min_size, max_pixels, draft=False):
    """Largest power-of-two reduction (<= 8) that keeps the image above min_size."""
    big = bool(max_pixels) and width * height > max_pixels
    if not (big or (draft and min_size)):
        return 1
    short_need, long_need = sorted(min_size) if min_size else (1, 1)
    short, long = sorted((width, height))
    factor = 1
    while (factor < 8 and short // (factor * 2) >= short_need
           and long // (factor * 2) >= long_need
           and (draft or width * height / (factor * factor) > max_pixels)):
        factor *= 2
    return factor


def to_rgb(img):
    """RGB; 16/32-bit grey scaled by its type's range; alpha dropped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 1.0 if arr.max(initial=0) <= 1.0 else 255.0)
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
            arr8 = np.round(arr * scale).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            top = 65535 if arr.max(initial=0) > 255 else 255
            arr8 = np.round(np.clip(arr, 0, top) * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(np.stack([arr8] * 3, axis=-1), "RGB")
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def target_size(width, height, resize, crop_size):
    """(h, w) after the resize: [h, w] exactly, an int the shorter side, None as is; then
    upscaled (aspect kept) when smaller than the crop."""
    if isinstance(resize, (list, tuple)):
        return int(resize[0]), int(resize[1])
    h, w = height, width
    if isinstance(resize, int):
        if h <= w:
            h, w = resize, max(1, int(resize * w / h))
        else:
            h, w = max(1, int(resize * h / w)), resize
    if min(h, w) < crop_size:
        scale = crop_size / min(h, w)
        h = max(crop_size, math.ceil(h * scale - 1e-6))
        w = max(crop_size, math.ceil(w * scale - 1e-6))
    return h, w


def resized_pixels(image, resize, crop_size, *, max_pixels, draft=False):
    """uint8 [h, w, 3] of a path, bytes or uint8 array after the model's resize."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        img = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    else:
        if isinstance(resize, (list, tuple)):
            min_size = (resize[1], resize[0])
        elif isinstance(resize, int):
            min_size = (resize, resize)
        else:
            min_size = (crop_size, crop_size) if max_pixels else None
        img = open_rgb(image, min_size=min_size, max_pixels=max_pixels,
                       draft=draft and resize is not None)
        w0, h0 = img.size
        if resize is None and max_pixels and w0 * h0 > max_pixels:
            scale = math.sqrt(max_pixels / (w0 * h0))
            img = img.resize((max(crop_size, int(w0 * scale)), max(crop_size, int(h0 * scale))),
                             Image.BILINEAR)
    h, w = target_size(img.size[0], img.size[1], resize, crop_size)
    if (h, w) != (img.size[1], img.size[0]):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img)


def grid_crops(image, resize, crop_size, num_crops, *, max_pixels, draft=False):
    """uint8 [num_crops, crop_size, crop_size, 3]: decode, resize, grid crops."""
    pixels = resized_pixels(image, resize, crop_size, max_pixels=max_pixels, draft=draft)
    positions = grid_positions(pixels.shape[0], pixels.shape[1], crop_size, num_crops)
    return np.stack([pixels[top:top + crop_size, left:left + crop_size]
                     for top, left in positions])


def grid_positions(height, width, crop, num):
    """[num, 2] (top, left): rows x cols corner-to-corner grid, row-major; 1 = the centre."""
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}")
    if num == 1:
        return np.array([[int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))]])
    rows = max(1, int(math.floor(math.sqrt(num))))
    cols = int(math.ceil(num / rows))
    ys = np.round(np.linspace(0, height - crop, rows)).astype(np.int64)
    xs = np.round(np.linspace(0, width - crop, cols)).astype(np.int64)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)[:num]


def _reason(error):
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    return f"{type(error).__name__}: {error}"


def _name(x):
    return os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__}>"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Score images with an exported hyperiqa_jax model; CSV path,score,error "
                    "to stdout (higher scores = better quality). Exit status 1 if any image "
                    "failed.")
    parser.add_argument("model_dir", help="folder written by python -m hyperiqa_jax.export")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--batch_size", type=int, default=8, help="images per model call")
    args = parser.parse_args(argv)
    try:
        model = ExportedModel(args.model_dir, batch_size=args.batch_size)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot load the exported model in {args.model_dir}: {_reason(e)}",
              file=sys.stderr)
        return 2
    writer = csv.writer(sys.stdout)
    writer.writerow(["path", "score", "error"])
    failed = 0
    for i, score, error in model.iter_scores(args.images):
        failed += error is not None
        writer.writerow([args.images[i], "" if error else f"{score:.4f}", error or ""])
    print(f"scored {len(args.images) - failed} of {len(args.images)} images ({failed} failed) "
          f"with {args.model_dir}; higher scores = better quality", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
