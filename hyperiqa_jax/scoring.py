"""Scoring images with a trained checkpoint: the `QualityModel` Python API.

    from hyperiqa_jax import QualityModel
    model = QualityModel.from_checkpoint("runs/demo")   # a workdir, best/, or a step folder
    scores = model.score(["a.jpg", "b.png", some_uint8_array])

Scores are on the label scale of the training set, higher = better quality
(KonIQ-10k MOS: 0-100; the demo's SSIM x 100: 0-100). An image's score is the
mean over its crops; by default crops sit on a fixed grid (deterministic), as
many per image as the run's `data.test_crops`, after the run's resize.
Crops of many images are batched together to fill the devices.

Quality maps say where in an image quality is lost: `model.quality_maps(images,
stride)` scores crops on a dense grid (every `stride` pixels of the resized
image) and yields a `QualityMap` of their scores per image.
"""

import dataclasses
import os
from collections.abc import Iterable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from hyperiqa_jax import checkpointing
from hyperiqa_jax.data import image as image_lib
from hyperiqa_jax.data import pipeline
from hyperiqa_jax.data.records import Record


def predict_scores(model, variables, images, label_stats):
    """Scores in label units and attention weights (or None) for a batch of uint8 crops.

    The scoring forward pass of training-time evaluation and `QualityModel`.
    """
    mean, std = label_stats
    out = model.apply(variables, image_lib.normalize(images), train=False)
    attention = out.get("attention")
    score = out["score"].astype(jnp.float32) * std + mean
    return score, (None if attention is None else attention.astype(jnp.float32))


def iter_image_scores(batch_outputs, num_images: int, crops_per_image: int) -> Iterator[tuple]:
    """Per image, in index order: (index, mean crop score, mean attention or None).

    batch_outputs: (scores [B], attention [B, K] or None, image_index [B], valid
    [B]) per batch of `pipeline.make_eval_batches` (numpy). An image is yielded
    once all its rows have come by; one whose crops are all invalid (it did not
    decode) gets score NaN.
    """
    sums = np.zeros(num_images)
    valid_rows = np.zeros(num_images, np.int64)
    rows = np.zeros(num_images, np.int64)
    attention_sums = None
    next_index = 0
    for score, attention, index, valid in batch_outputs:
        real = index >= 0
        idx, ok = index[real], valid[real]
        np.add.at(rows, idx, 1)
        np.add.at(sums, idx[ok], np.asarray(score, np.float64)[real][ok])
        np.add.at(valid_rows, idx[ok], 1)
        if attention is not None:
            if attention_sums is None:
                attention_sums = np.zeros((num_images, attention.shape[-1]))
            np.add.at(attention_sums, idx[ok], np.asarray(attention, np.float64)[real][ok])
        while next_index < num_images and rows[next_index] == crops_per_image:
            n = valid_rows[next_index]
            mean = sums[next_index] / n if n else np.nan
            att = (None if attention_sums is None or not n
                   else attention_sums[next_index] / n)
            yield next_index, float(mean), att
            next_index += 1


def overlapped(batches, dispatch):
    """numpy outputs of `dispatch(batch)` per batch, dispatching batch k + 1 before reading k.

    dispatch returns a tuple of device arrays (or None / numpy); reading them
    waits for the device, so the device computes one batch while the host
    decodes and sends the next.
    """
    pending = None
    for batch in batches:
        launched = dispatch(batch)
        if pending is not None:
            yield _to_numpy(pending)
        pending = launched
    if pending is not None:
        yield _to_numpy(pending)


def _to_numpy(outputs):
    return tuple(None if x is None else np.asarray(x) for x in outputs)


class _ImageList:
    """A list of paths, encoded bytes or arrays as an image source: (image, NaN, name)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], float("nan"), _name(self.images[i])


MAP_THUMBNAIL_SIZE = 384  # pixels, the longer side of a map's picture


def dense_positions(height: int, width: int, crop: int, stride: int):
    """(tops, lefts): crop corners every `stride` pixels down and across, the last ones
    flush with the far edges so that every pixel is covered."""
    def corners(size):
        last = size - crop
        out = list(range(0, last + 1, stride))
        return np.array(out if out[-1] == last else [*out, last], np.int64)

    return corners(height), corners(width)


@dataclasses.dataclass(frozen=True)
class QualityMap:
    """Scores of crops on a dense grid over one image: where its quality is lost.

    scores[r, c] (label units, higher = better) is the crop whose top-left corner
    is (tops[r], lefts[c]) in the image resized as for scoring (`image_size`).
    """

    scores: np.ndarray          # float64 [rows, cols]
    tops: np.ndarray            # int [rows]
    lefts: np.ndarray           # int [cols]
    crop_size: int
    stride: int
    image_size: tuple           # (height, width) the corners refer to
    thumbnail: np.ndarray       # uint8 [h, w, 3]: the resized image, longer side <= 384

    def coverage_mean(self, height: int, width: int) -> np.ndarray:
        """float64 [height, width]: each pixel's mean score over the crops that cover it,
        the image scaled to height x width."""
        sy, sx = height / self.image_size[0], width / self.image_size[1]
        total = np.zeros((height, width))
        count = np.zeros((height, width))
        for r, top in enumerate(self.tops):
            y0, y1 = round(top * sy), round((top + self.crop_size) * sy)
            for c, left in enumerate(self.lefts):
                x0, x1 = round(left * sx), round((left + self.crop_size) * sx)
                total[y0:y1, x0:x1] += self.scores[r, c]
                count[y0:y1, x0:x1] += 1
        return total / np.maximum(count, 1)

    def to_json(self) -> dict:
        return {"crop_size": self.crop_size, "stride": self.stride,
                "image_size": list(self.image_size), "tops": self.tops.tolist(),
                "lefts": self.lefts.tolist(), "scores": self.scores.tolist()}


class _DenseCrops:
    """Image index -> (index, DenseCrops or None, error or None): every crop of a map."""

    def __init__(self, source, data_config, stride):
        self.source, self.config, self.stride = source, data_config, stride

    def __call__(self, index):
        image, _, name = self.source[index]
        try:
            pixels = image_lib.eval_pixels(image, self.config, name=name)
        except image_lib.ImageDecodeError as e:
            return index, None, e.reason
        crop = int(self.config.crop_size)
        tops, lefts = dense_positions(pixels.shape[0], pixels.shape[1], crop, self.stride)
        corners = np.stack(np.meshgrid(tops, lefts, indexing="ij"), -1).reshape(-1, 2)
        return index, DenseCrops(image_lib.extract_crops(pixels, corners, crop), tops, lefts,
                                 tuple(int(x) for x in pixels.shape[:2]),
                                 _thumbnail(pixels)), None


@dataclasses.dataclass(frozen=True)
class DenseCrops:
    """The crops of one image's quality map, before they are scored."""

    crops: np.ndarray           # uint8 [rows * cols, crop, crop, 3], row-major
    tops: np.ndarray
    lefts: np.ndarray
    image_size: tuple
    thumbnail: np.ndarray


def _batches_of_rows(loaded, batch_size, crop, images_seen):
    """Batches in `pipeline.make_eval_batches`' layout from images with any number of crops.

    Each image of `loaded` goes into images_seen[index] = (DenseCrops or None,
    error, []) before its rows are batched; the last batch is padded (index -1).
    """
    image = np.zeros((batch_size, crop, crop, 3), np.uint8)
    index = np.full((batch_size,), -1, np.int32)
    fill = 0
    for i, dense, error in loaded:
        images_seen[i] = (dense, error, [])
        for row in (dense.crops if dense is not None else ()):
            image[fill], index[fill] = row, i
            fill += 1
            if fill == batch_size:
                yield {"image": image.copy(), "image_index": index.copy(), "valid": index >= 0}
                fill = 0
    if fill:
        image[fill:], index[fill:] = 0, -1
        yield {"image": image, "image_index": index, "valid": index >= 0}


def _all_scored(seen):
    dense, _, scores = seen
    return len(scores) == (0 if dense is None else len(dense.crops))


def _quality_map(index, dense, error, scores, stride):
    if dense is None:
        return index, None, error
    grid = np.asarray(scores, np.float64).reshape(len(dense.tops), len(dense.lefts))
    return index, QualityMap(grid, dense.tops, dense.lefts, int(dense.crops.shape[1]), stride,
                             dense.image_size, dense.thumbnail), None


class QualityModel:
    """A trained model plus its preprocessing; `score` maps images to quality scores."""

    def __init__(self, model, variables, config, label_stats=(0.0, 1.0), *, batch_size=None,
                 protocol="grid", num_crops=None, num_workers=None, source=None):
        self.model = model
        self.config = config
        self.label_stats = tuple(float(x) for x in label_stats)
        self.protocol = protocol or config.data.eval_protocol
        self.num_crops = image_lib.num_eval_crops(config.data, self.protocol, num_crops)
        self.num_workers = num_workers or min(8, pipeline.usable_cpu_count())
        self.source = source
        devices = jax.local_devices()
        # Default: the run's evaluation batch (its numbers then match training-time
        # evaluation's exactly); whole batches on every local device.
        batch_size = batch_size or config.train.eval_batch_size or config.train.batch_size
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, P("data"))
        self.variables = jax.device_put(variables, NamedSharding(mesh, P()))
        self._forward = jax.jit(
            lambda variables, images: predict_scores(model, variables, images, self.label_stats),
            out_shardings=NamedSharding(mesh, P()))

    @property
    def crop_size(self):
        return int(self.config.data.crop_size)

    @classmethod
    def from_checkpoint(cls, path, **kwargs):
        """Loads a training workdir (best checkpoint, else latest), best/, or a step folder."""
        ckpt = checkpointing.load_for_inference(path)
        return cls(ckpt.model, ckpt.variables, ckpt.config, ckpt.label_stats,
                   source=ckpt.source, **kwargs)

    def crops(self, image, index=0):
        """uint8 [num_crops, crop, crop, 3]: the crops scored for one path / bytes / array."""
        return image_lib.eval_crops(image, self.config.data, index=index, protocol=self.protocol,
                                    num_crops=self.num_crops)

    def iter_scores(self, images: Iterable, *, return_attention=False) -> Iterator[tuple]:
        """Yields (index, score, error[, attention]) per input, in input order.

        images: paths, encoded bytes or uint8 arrays, or a data set's records
        (then 'random' crops are those of training-time evaluation). A file
        that cannot be decoded yields score NaN and its error message instead
        of stopping the run.
        """
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], Record):
            source = pipeline.as_source(images)
        elif hasattr(images, "records"):  # a TfdsSource: items are already (bytes, score, name)
            source = images
        else:  # paths, bytes or arrays, including the images of one [N, H, W, 3] array
            source = _ImageList(list(images))
        errors = {}
        data_config = self.config.data.copy_and_resolve_references()
        data_config.num_workers = self.num_workers
        batches = pipeline.make_eval_batches(
            source, data_config, batch_size=self.batch_size, protocol=self.protocol,
            num_crops=self.num_crops, max_bad_fraction=1.0, on_error=errors.__setitem__)
        results = iter_image_scores(overlapped(batches, self._score_batch), len(source),
                                    self.num_crops)
        for index, score, attention in results:
            row = (index, score, errors.pop(index, None))
            yield (*row, attention) if return_attention else row

    def _score_batch(self, batch):
        score, attention = self._forward(self.variables,
                                         jax.device_put(batch["image"], self._batch_sharding))
        return score, attention, batch["image_index"], batch["valid"]

    def quality_maps(self, images: Iterable, stride: int) -> Iterator[tuple]:
        """Yields (index, QualityMap or None, error or None) per input, in input order.

        Crops of `crop_size` every `stride` pixels over each image (resized as for
        scoring), batched across images like `iter_scores`.
        """
        source = _ImageList(list(images))
        loaded = grain.MapDataset.range(len(source)).map(
            _DenseCrops(source, self.config.data, stride)).to_iter_dataset(
            grain.ReadOptions(num_threads=self.num_workers,
                              prefetch_buffer_size=2 * self.num_workers))
        images_seen = {}  # index -> (dense crops or None, error, crop scores so far)
        batches = _batches_of_rows(loaded, self.batch_size, self.crop_size, images_seen)
        next_index = 0
        for score, _, index, _ in overlapped(batches, self._score_batch):
            for s, i in zip(score[index >= 0], index[index >= 0]):
                images_seen[int(i)][2].append(float(s))
            # An image is done once all its rows are scored (none: it failed to decode).
            while next_index in images_seen and _all_scored(images_seen[next_index]):
                yield _quality_map(next_index, *images_seen.pop(next_index), stride)
                next_index += 1
        while next_index < len(source):  # images after the last row: failed ones
            yield _quality_map(next_index, *images_seen.pop(next_index), stride)
            next_index += 1

    def score(self, images, *, return_attention=False, errors="raise"):
        """Quality scores (float64 [N], higher = better) for paths, bytes or uint8 arrays.

        errors: 'raise' (default) raises ImageDecodeError for the first bad
        input; 'nan' gives NaN for it. return_attention: also return the
        per-image mean attention weights ([N, C] or [N, 4]; None without attention).
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        scores, attention = [], []
        for i, s, err, att in self.iter_scores(images, return_attention=True):
            if err is not None and errors == "raise":
                raise image_lib.ImageDecodeError(_name(images[i]), err)
            scores.append(s)
            attention.append(att)
        scores = np.asarray(scores, np.float64)
        if not return_attention:
            return scores
        if any(a is None for a in attention):
            return scores, None
        return scores, np.stack(attention)


def _thumbnail(pixels, size=MAP_THUMBNAIL_SIZE):
    img = Image.fromarray(pixels)
    img.thumbnail((size, size))
    return np.asarray(img)


def _name(x):
    return os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__}>"
