"""Image decoding and the crop/normalise steps shared by training, evaluation and prediction.

Everything here works on numpy uint8 HxWx3 arrays (or PIL images internally) and
needs neither JAX nor TensorFlow.

Resizing follows PyTorch's `transforms.Resize((h, w))` on a PIL image exactly:
PIL's bilinear filter with antialiasing, so the pixels match the reference
loader's.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from hyperiqa_jax.errors import ConfigError, ImageDecodeError
from hyperiqa_jax.paths import is_url, read_bytes

# Where evaluation crops sit (`crop_positions`): seeded random corners, the centre, or a
# fixed grid from corner to corner. Every flag and config check that takes a protocol
# lists these.
PROTOCOLS = ("random", "center", "grid")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Above this many pixels an image is decoded at a reduced scale (JPEG DCT scaling via
# `Image.draft`, else `Image.reduce`), so a 50-megapixel photo never needs its full
# decoded size in memory at once when the pipeline resizes it anyway.
DEFAULT_MAX_PIXELS = 4096 * 4096

# JPEGs are decoded at reduced scale when huge, so their size is not a risk up to
# this many pixels; other formats must be decoded in full, so PIL's usual limit
# (2 x 89.5 MP) applies to them. PIL's own check (which would also refuse a
# 12000x9000 JPEG) is replaced by these two, done in `open_rgb`.
MAX_JPEG_PIXELS = 1_000_000_000
MAX_OTHER_PIXELS = 2 * 89_478_485


@functools.cache
def _configure_pillow():
    """PIL's process-wide settings this module's decoding relies on, made on first decode.

    PIL's pixel limit gives way to MAX_JPEG_PIXELS / MAX_OTHER_PIXELS, and a
    truncated file never passes as a (partly grey) image.
    """
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _open(source, name: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        return Image.open(io.BytesIO(bytes(source)))
    path = os.fspath(source)
    # A URL (gs://...) is read through etils.epath; open_rgb turns its FileNotFoundError
    # into "file not found", as for a local file.
    if is_url(path):
        return _open(read_bytes(path), name)
    if not os.path.exists(path):
        raise ImageDecodeError(name, "file not found")
    if os.path.isdir(path):
        raise ImageDecodeError(name, "is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    return Image.open(path)


def _reduce_factor(width: int, height: int, min_size: tuple[int, int] | None,
                   max_pixels: int | None, draft: bool = False) -> int:
    """Largest power-of-two reduction (<= 8) that keeps the image above the needed size.

    Without `draft`, only images above `max_pixels` are reduced, and only until they
    fit. Sizes are compared orientation-free (EXIF rotation happens after decoding).
    """
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


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit grey: scale to 8 bits by the type's range, not per image.
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
    # L, LA, 1, P, PA, RGBA, CMYK, YCbCr, LAB, HSV...: alpha is dropped, as in the
    # reference loader's `Image.open(path).convert("RGB")`.
    if mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_rgb(source, *, name: str | None = None, min_size: tuple[int, int] | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = False) -> Image.Image:
    """Decode `source` (a path or encoded bytes) to an RGB PIL image, EXIF-rotated.

    min_size: (width, height) the caller still needs after any reduction; images
    larger than `max_pixels` are decoded at 1/2, 1/4 or 1/8 scale while staying
    at least that big. draft=True: JPEGs are always decoded at the smallest such
    scale (libjpeg DCT scaling: much faster for big photos, slightly different
    pixels from a full decode + resize). Raises ImageDecodeError naming `name`.
    """
    name = name if name is not None else (
        "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source))
    _configure_pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(source, name)
            width, height = img.size
            limit = MAX_JPEG_PIXELS if img.format == "JPEG" else MAX_OTHER_PIXELS
            if width * height > limit:
                raise ImageDecodeError(name, f"too many pixels ({width}x{height} > {limit} "
                                       f"for {img.format})")
            factor = _reduce_factor(width, height, min_size, max_pixels,
                                    draft and img.format == "JPEG")
            if factor > 1 and img.format == "JPEG":
                img.draft(img.mode if img.mode in ("RGB", "L") else None,
                          (math.ceil(width / factor), math.ceil(height / factor)))
                factor = 1
            img.load()
            if factor > 1:
                img = img.reduce(factor)
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img.load()
            return img
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(name, f"too many pixels ({e})") from None
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except (OSError, ValueError, SyntaxError, MemoryError, EOFError) as e:
        raise ImageDecodeError(name, f"corrupt or truncated ({type(e).__name__}: {e})") from None


def load_image(path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file (or encoded bytes) to uint8 [H, W, 3] RGB.

    EXIF orientation is applied; grey, RGBA, palette, 16-bit and CMYK images become
    RGB; images above `max_pixels` are decoded at a reduced scale. Raises
    `ImageDecodeError` (with `.path`) for missing, empty, corrupt or non-image files.
    """
    return np.asarray(open_rgb(path, max_pixels=max_pixels))


def _check_resize(resize) -> tuple[int, int] | int | None:
    if resize is None:
        return None
    if isinstance(resize, (int, np.integer)):
        if resize <= 0:
            raise ConfigError(f"data.resize must be positive, got {resize}")
        return int(resize)
    resize = tuple(int(v) for v in resize)
    if len(resize) != 2 or min(resize) <= 0:
        raise ConfigError(f"data.resize must be (height, width), an int or None, got {resize}")
    return resize


def target_size(width: int, height: int, resize, crop_size: int) -> tuple[int, int]:
    """(height, width) an image of `width` x `height` is resized to.

    resize=(h, w): exactly that (PyTorch `Resize((h, w))`); an int: shorter side to
    it, keeping the aspect ratio (PyTorch `Resize(int)`); None: unchanged. In every
    case an image smaller than the crop is upscaled (aspect kept) so a crop fits.
    """
    resize = _check_resize(resize)
    if isinstance(resize, tuple):
        h, w = resize
        if min(h, w) < crop_size:
            raise ConfigError(f"data.resize {resize} is smaller than data.crop_size {crop_size}")
        return h, w
    h, w = height, width
    if isinstance(resize, int):  # as torchvision: the longer side truncated, not rounded
        if h <= w:
            h, w = resize, max(1, int(resize * w / h))
        else:
            h, w = max(1, int(resize * h / w)), resize
    if min(h, w) < crop_size:
        scale = crop_size / min(h, w)
        h = max(crop_size, math.ceil(h * scale - 1e-6))
        w = max(crop_size, math.ceil(w * scale - 1e-6))
    return h, w


def load_resized(source, resize, crop_size: int, *, name: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: bool = False) -> np.ndarray:
    """Decode and resize (see `target_size`) in one go: uint8 [h, w, 3].

    draft: decode JPEGs at a reduced DCT scale that still covers the target size
    (data.decode_draft; off by default to match the reference loader's pixels).
    """
    resize = _check_resize(resize)
    if isinstance(resize, tuple):
        min_size = (resize[1], resize[0])
    elif isinstance(resize, int):
        min_size = (resize, resize)
    else:
        min_size = (crop_size, crop_size) if max_pixels else None
    img = open_rgb(source, name=name, min_size=min_size, max_pixels=max_pixels,
                   draft=draft and resize is not None)
    w0, h0 = img.size
    if resize is None and max_pixels and w0 * h0 > max_pixels:
        # No resize asked for but the image is huge: keep it within max_pixels.
        scale = math.sqrt(max_pixels / (w0 * h0))
        img = img.resize((max(crop_size, int(w0 * scale)), max(crop_size, int(h0 * scale))),
                         Image.BILINEAR)
        w0, h0 = img.size
    h, w = target_size(w0, h0, resize, crop_size)
    if (h, w) != (h0, w0):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img)


def center_crop_position(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top-left corner of torchvision's CenterCrop."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def crop_positions(height: int, width: int, crop: int, num: int, protocol: str,
                   rng: np.random.Generator | None = None, step: int = 1) -> np.ndarray:
    """[num, 2] int (top, left) crop corners.

    'random': uniform like torchvision RandomCrop (needs `rng`), corners on
    multiples of `step` (8 keeps JPEG's block grid in place); 'center': `num`
    copies of the centre crop; 'grid': a deterministic uniform grid of rows x cols
    positions (rows = floor(sqrt(num)), cols = ceil(num / rows)) from corner to
    corner, the first `num` in row-major order.
    """
    if height < crop or width < crop:
        raise ValueError(f"image {height}x{width} is smaller than the crop {crop}")
    if num <= 0:
        raise ConfigError(f"number of crops must be positive, got {num}")
    if protocol == "random":
        if rng is None:
            raise ValueError("random crops need an rng")
        tops = rng.integers(0, (height - crop) // step + 1, size=num) * step
        lefts = rng.integers(0, (width - crop) // step + 1, size=num) * step
        return np.stack([tops, lefts], axis=1).astype(np.int64)
    if protocol == "center":
        return np.tile(np.array(center_crop_position(height, width, crop)), (num, 1))
    if protocol == "grid":
        if num == 1:
            return np.array([center_crop_position(height, width, crop)])
        rows = max(1, int(math.floor(math.sqrt(num))))
        cols = int(math.ceil(num / rows))
        ys = np.round(np.linspace(0, height - crop, rows)).astype(np.int64)
        xs = np.round(np.linspace(0, width - crop, cols)).astype(np.int64)
        grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
        return grid[:num]
    raise ConfigError(f"unknown crop protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def extract_crops(image: np.ndarray, positions: np.ndarray, crop: int,
                  flips: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
    """uint8 [N, crop, crop, 3] crops at `positions`, optionally flipped left-right."""
    out = np.empty((len(positions), crop, crop, image.shape[-1]), image.dtype)
    for i, (top, left) in enumerate(positions):
        patch = image[top:top + crop, left:left + crop]
        out[i] = patch[:, ::-1] if flips is not None and flips[i] else patch
    return out


def normalize(images):
    """uint8 [..., 3] -> float32 ImageNet-normalised ((x / 255 - mean) / std).

    Works on numpy and JAX arrays alike: the train and scoring steps call it on
    the device, so uint8 crops (a quarter of float32's bytes) cross to it.
    """
    scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
    offset = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
    return images.astype(np.float32) * scale - offset


def num_eval_crops(data_config, protocol: str | None = None, num_crops: int | None = None) -> int:
    """Crops per image at evaluation: 1 for 'center', else `num_crops` or data.test_crops."""
    if (protocol or data_config.eval_protocol) == "center":
        return 1
    return int(num_crops or data_config.test_crops)


def eval_pixels(image, data_config, *, name: str | None = None) -> np.ndarray:
    """uint8 [h, w, 3]: the image evaluation crops are cut from, after data.resize.

    image: a path, encoded bytes or a uint8 [H, W(, 3)] array; JPEGs honour
    data.decode_draft.
    """
    crop = int(data_config.crop_size)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        pil = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
        h, w = target_size(pil.size[0], pil.size[1], data_config.resize, crop)
        if (h, w) != (pil.size[1], pil.size[0]):
            pil = pil.resize((w, h), Image.BILINEAR)
        return np.asarray(pil)
    return load_resized(image, data_config.resize, crop, name=name,
                        draft=bool(data_config.decode_draft))


def eval_crops(image, data_config, *, index: int = 0, seed: int = 0, protocol: str | None = None,
               num_crops: int | None = None, name: str | None = None) -> np.ndarray:
    """The evaluation crops of one image: uint8 [N, crop, crop, 3].

    The one definition used by training-time evaluation, `evaluate` and
    `predict`. image: a path, encoded bytes or a uint8 [H, W(, 3)] array,
    resized per data.resize (`eval_pixels`); then `num_eval_crops` crops by
    `protocol` (default data.eval_protocol). 'random' crops are seeded by
    (seed, index), `index` being the image's position in its data set or list,
    so they do not depend on batching.
    """
    crop = int(data_config.crop_size)
    protocol = protocol or data_config.eval_protocol
    num = num_eval_crops(data_config, protocol, num_crops)
    pixels = eval_pixels(image, data_config, name=name)
    rng = np.random.default_rng([seed, index])
    positions = crop_positions(pixels.shape[0], pixels.shape[1], crop, num, protocol, rng)
    return extract_crops(pixels, positions, crop)
