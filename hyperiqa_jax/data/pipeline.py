"""grain input pipelines: training (infinite, shuffled, checkpointable) and evaluation.

Training, per process:

    records[process_index::process_count]           per-process shard of images
      -> MapDataset.source -> shuffle(seed) -> repeat()   new order every epoch
      -> batch(mix_images, list)                      groups of images
      -> random_map(decode+resize each image ONCE,     worker threads
                    N random crops + flips, shuffle the group's crops together)
      -> to_iter_dataset(threads) -> rebatch(batch)    fixed-size batches
      -> map(ImageNet normalise)

Randomness comes from grain's per-element seeds, so the stream depends only on
the seed (not on thread timing) and the iterator's get_state/set_state (grain
checkpointing, `grain.checkpoint.CheckpointSave`) restores it exactly.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from hyperiqa_jax.cli import ConfigError, UserError
from hyperiqa_jax.data.image import (
    ImageDecodeError,
    crop_positions,
    extract_crops,
    load_resized,
    normalize,
)
from hyperiqa_jax.data.records import Record

log = logging.getLogger(__name__)


class TooManyBadImagesError(UserError, RuntimeError):
    """More images failed to decode than data.max_bad_fraction allows."""


# --------------------------------------------------------------------------- sources


class RecordSource:
    """Random-access source over Records (files on disk). Items: (path, score, name)."""

    def __init__(self, records: Sequence[Record]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[Any, float, str]:
        r = self._records[index]
        return r.path, float(r.score), r.path


def as_source(records) -> Any:
    """A list of Records, or any source whose items are (path-or-bytes, score, name)."""
    if isinstance(records, (list, tuple)):
        if records and not isinstance(records[0], Record):
            raise TypeError(f"expected Records, got {type(records[0]).__name__}")
        return RecordSource(records)
    if hasattr(records, "__getitem__") and hasattr(records, "__len__"):
        return records
    raise TypeError(f"cannot read images from {type(records).__name__}")


class _Shard:
    """Every `count`-th item of a source starting at `index` (per-process sharding)."""

    def __init__(self, source, index: int, count: int):
        self._source, self._index, self._count = source, index, count
        self._len = len(range(index, len(source), count))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        return self._source[self._index + i * self._count]


class BadImageTracker:
    """Counts images that fail to decode; raises beyond `max_fraction` of `num_images`."""

    def __init__(self, num_images: int, max_fraction: float):
        self.num_images = max(1, num_images)
        self.max_fraction = float(max_fraction)
        self.bad: dict[str, str] = {}
        self.failures = 0
        self._lock = threading.Lock()

    def __getstate__(self):  # picklable for grain's mp_prefetch (one tracker per worker)
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def report(self, error: ImageDecodeError) -> None:
        with self._lock:
            self.failures += 1
            new = error.path not in self.bad
            self.bad[error.path] = error.reason
            count = len(self.bad)
        if new:
            log.warning("skipping image %s (%s); %d bad image(s) so far", error.path,
                        error.reason, count)
        if count > self.max_fraction * self.num_images:
            shown = "; ".join(f"{p}: {r}" for p, r in list(self.bad.items())[:5])
            raise TooManyBadImagesError(
                f"{count} of {self.num_images} images failed to decode, more than "
                f"data.max_bad_fraction={self.max_fraction}: {shown}. Fix or remove these files "
                "or raise data.max_bad_fraction.")


# --------------------------------------------------------------------------- config


def _cfg(data_config, key: str, default):
    try:
        value = data_config[key] if isinstance(data_config, dict) else getattr(data_config, key)
    except (KeyError, AttributeError):
        return default
    return default if value is None and default is not None else value


def steps_per_epoch(num_records: int, data_config, batch_size: int) -> int:
    """Training steps in one epoch: num_records * train_crops // batch_size.

    Use global counts (all records, the global batch); per process the result is the
    same since each process has ~1/process_count of both.
    """
    crops = int(_cfg(data_config, "train_crops", 20))
    return max(1, (int(num_records) * crops) // int(batch_size))


# --------------------------------------------------------------------------- training


class _TrainGroup:
    """Decode a group of images once, take N crops each, shuffle all crops together."""

    def __init__(self, data_config, tracker: BadImageTracker):
        self.resize = _cfg(data_config, "resize", None)
        self.crop = int(data_config.crop_size)
        self.crops = int(_cfg(data_config, "train_crops", 20))
        self.flip = bool(_cfg(data_config, "random_flip", True))
        self.crop_step = int(_cfg(data_config, "crop_step", 1))
        self.draft = bool(_cfg(data_config, "decode_draft", False))
        self.tracker = tracker

    def __call__(self, items, rng: np.random.Generator):
        images, scores = [], []
        for data, score, name in items:
            try:
                img = load_resized(data, self.resize, self.crop, name=name, draft=self.draft)
            except ImageDecodeError as e:
                self.tracker.report(e)
                continue
            pos = crop_positions(img.shape[0], img.shape[1], self.crop, self.crops, "random", rng,
                                 self.crop_step)
            flips = rng.random(self.crops) < 0.5 if self.flip else None
            images.append(extract_crops(img, pos, self.crop, flips))
            scores.append(np.full((self.crops,), score, np.float32))
        if not images:
            return None
        crops = np.concatenate(images)
        order = rng.permutation(len(crops))
        return {"image": crops[order], "score": np.concatenate(scores)[order]}


def _normalize_batch(batch):
    return {"image": normalize(batch["image"]), "score": batch["score"]}


def make_train_dataset(records, data_config, *, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite training stream of {'image': float32 [b, crop, crop, 3], 'score': float32 [b]}.

    records: list of Records (or a source such as `TfdsSource`): ALL the images;
    each process reads its own shard records[process_index::process_count].
    batch_size: rows per batch yielded by THIS process (the per-process batch, i.e.
    global batch // process_count), b below.
    data_config: crop_size, resize, train_crops, max_bad_fraction, num_workers and
    optionally mix_images (images whose crops are shuffled together, default 16),
    random_flip (default True), prefetch (groups buffered per thread, default 2),
    decode_draft (JPEG DCT-scaled decoding for big photos such as SPAQ, default False).
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local_batch = batch_size
    source = as_source(records)
    total = len(source)
    if process_count > 1:
        source = _Shard(source, process_index, process_count)
    if len(source) == 0:
        raise ValueError(f"no training images for process {process_index} of {process_count} "
                         f"({total} images in all)")
    tracker = BadImageTracker(len(source), float(_cfg(data_config, "max_bad_fraction", 0.0)))
    mix = int(_cfg(data_config, "mix_images", 16))
    mix = max(1, min(mix, len(source)))
    workers = int(_cfg(data_config, "num_workers", 2))
    prefetch = int(_cfg(data_config, "prefetch", 2))

    ds = grain.MapDataset.source(source).seed(seed + 7919 * process_index)
    ds = ds.shuffle().repeat(None)
    ds = ds.batch(mix, batch_fn=list)
    ds = ds.random_map(_TrainGroup(data_config, tracker))
    read = grain.ReadOptions(num_threads=max(1, workers),
                             prefetch_buffer_size=max(1, workers) * max(1, prefetch))
    it = ds.to_iter_dataset(read)
    it = grain.experimental.RebatchIterDataset(it, local_batch, drop_remainder=True)
    it = it.map(_normalize_batch)
    it.bad_images = tracker  # for logging: it.bad_images.bad / .failures
    return it


# --------------------------------------------------------------------------- evaluation


class _EvalImage:
    def __init__(self, source, data_config, seed: int, protocol: str, tracker):
        self.source = source
        self.resize = _cfg(data_config, "resize", None)
        self.crop = int(data_config.crop_size)
        self.num = 1 if protocol == "center" else int(_cfg(data_config, "test_crops", 20))
        self.protocol = protocol
        self.draft = bool(_cfg(data_config, "decode_draft", False))
        self.seed = seed
        self.tracker = tracker

    def __call__(self, index: int):
        data, _, name = self.source[index]
        try:
            img = load_resized(data, self.resize, self.crop, name=name, draft=self.draft)
        except ImageDecodeError as e:
            self.tracker.report(e)
            return index, None
        rng = np.random.default_rng([self.seed, index])
        pos = crop_positions(img.shape[0], img.shape[1], self.crop, self.num, self.protocol, rng)
        return index, extract_crops(img, pos, self.crop)


def make_eval_batches(records, data_config, *, batch_size: int, seed: int = 0,
                      protocol: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches over all crops of all images, in record order.

    Yields {'image': float32 [B, crop, crop, 3], 'image_index': int32 [B] (into
    records), 'valid': bool [B]}; the last batch is padded (valid False) so every
    batch has exactly batch_size rows. protocol: 'random' (data.test_crops crops per
    image, seeded by (seed, image index), so independent of batch size and
    threads), 'center' (one centre crop) or 'grid' (test_crops on a uniform grid);
    default data_config.eval_protocol. Images that fail to decode are logged and
    skipped (they get no rows; `average_by_image` gives NaN for them), aborting
    beyond data.max_bad_fraction.
    """
    protocol = protocol or _cfg(data_config, "eval_protocol", "random")
    if protocol not in ("random", "center", "grid"):
        raise ConfigError(f"unknown eval protocol {protocol!r}; use random, center or grid")
    source = as_source(records)
    crop = int(data_config.crop_size)
    tracker = BadImageTracker(len(source), float(_cfg(data_config, "max_bad_fraction", 0.0)))
    fn = _EvalImage(source, data_config, seed, protocol, tracker)
    workers = max(1, int(_cfg(data_config, "num_workers", 2)))

    def _gen():
        if len(source) == 0:
            return
        ds = grain.MapDataset.range(len(source)).map(fn).to_iter_dataset(
            grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers))
        buf_img = np.zeros((batch_size, crop, crop, 3), np.uint8)
        buf_idx = np.zeros((batch_size,), np.int32)
        fill = 0
        for index, crops in ds:
            if crops is None:
                continue
            start = 0
            while start < len(crops):
                take = min(batch_size - fill, len(crops) - start)
                buf_img[fill:fill + take] = crops[start:start + take]
                buf_idx[fill:fill + take] = index
                fill += take
                start += take
                if fill == batch_size:
                    yield {"image": normalize(buf_img), "image_index": buf_idx.copy(),
                           "valid": np.ones((batch_size,), bool)}
                    fill = 0
        if fill:
            buf_img[fill:] = 0
            buf_idx[fill:] = 0
            valid = np.arange(batch_size) < fill
            yield {"image": normalize(buf_img), "image_index": buf_idx.copy(), "valid": valid}

    return _gen()


def num_eval_crops(data_config, protocol: str | None = None) -> int:
    """Crops per image that make_eval_batches produces."""
    protocol = protocol or _cfg(data_config, "eval_protocol", "random")
    return 1 if protocol == "center" else int(_cfg(data_config, "test_crops", 20))


def average_by_image(pred_per_crop, image_index, valid, num_images: int) -> np.ndarray:
    """Per-image mean of crop predictions: float64 [num_images]; NaN for images with no crop."""
    pred = np.asarray(pred_per_crop, np.float64).reshape(-1)
    idx = np.asarray(image_index, np.int64).reshape(-1)
    ok = np.asarray(valid, bool).reshape(-1)
    if not (len(pred) == len(idx) == len(ok)):
        raise ValueError(f"lengths differ: {len(pred)} predictions, {len(idx)} indices, "
                         f"{len(ok)} valid flags")
    sums = np.bincount(idx[ok], weights=pred[ok], minlength=num_images)
    counts = np.bincount(idx[ok], minlength=num_images)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums / counts
    out[counts == 0] = math.nan
    return out
