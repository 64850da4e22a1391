"""grain input pipelines: training (infinite, shuffled, checkpointable) and evaluation.

Training, per process:

    records[process_index::process_count]           per-process shard of images
      -> MapDataset.source -> shuffle(seed) -> repeat()   new order every epoch
      -> batch(mix_images, list)                      groups of images
      -> random_map(decode+resize each image ONCE,     worker threads
                    N random crops + flips, shuffle the group's crops together)
      -> to_iter_dataset(threads)
      [-> mp_prefetch(worker processes)]              data.worker_processes
      -> rebatch(batch)                               fixed-size uint8 batches

Crops stay uint8 (a quarter of float32's bytes to copy to the device); the
train and scoring steps normalise them on the device (`image.normalize`).

Randomness comes from grain's per-element seeds, so the stream depends only on
the seed (not on thread timing) and the iterator's get_state/set_state (grain
checkpointing, `grain.checkpoint.CheckpointSave`) restores it exactly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from hyperiqa_jax.data.image import (
    PROTOCOLS,
    ImageDecodeError,
    crop_positions,
    eval_crops,
    extract_crops,
    load_resized,
    num_eval_crops,
)
from hyperiqa_jax.data.records import Record
from hyperiqa_jax.errors import ConfigError, TooManyBadImagesError

log = logging.getLogger(__name__)


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


def steps_per_epoch(num_records: int, data_config, batch_size: int) -> int:
    """Training steps in one epoch: num_records * train_crops // batch_size.

    Use global counts (all records, the global batch); per process the result is the
    same since each process has ~1/process_count of both.
    """
    crops = int(data_config.train_crops)
    return max(1, (int(num_records) * crops) // int(batch_size))


# --------------------------------------------------------------------------- training


class _TrainGroup:
    """Decode a group of images once, take N crops each, shuffle all crops together."""

    def __init__(self, data_config, tracker: BadImageTracker):
        self.resize = data_config.resize
        self.crop = int(data_config.crop_size)
        self.crops = int(data_config.train_crops)
        self.flip = bool(data_config.random_flip)
        self.crop_step = int(data_config.crop_step)
        self.draft = bool(data_config.decode_draft)
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


def usable_cpu_count() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a SLURM
    task's --cpus-per-task, a container's or taskset's CPU set), else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_worker_processes() -> int:
    """data.worker_processes=-1: decoding processes that fit this process's CPUs.

    On the CPU backend the model's own step needs the cores, so decoding stays
    in threads (0). With a GPU or TPU, the cores go to decoding: one process
    per usable CPU (`usable_cpu_count`) left after one per local device, at
    most 16.
    """
    import jax

    if jax.default_backend() == "cpu":
        return 0
    return max(0, min(16, usable_cpu_count() - jax.local_device_count()))


def mark_flags_parsed():
    """Lets grain's worker processes start outside an absl program (the Python API, tests).

    They read grain's absl flags, which only `app.run` parses; this leaves them at
    their defaults. Called once where a training run starts.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(records, data_config, *, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite training stream of {'image': uint8 [b, crop, crop, 3], 'score': float32 [b]}.

    records: list of Records (or a source such as `TfdsSource`): ALL the images;
    each process reads its own shard records[process_index::process_count].
    batch_size: rows per batch yielded by THIS process (the per-process batch, i.e.
    global batch // process_count), b below.
    data_config: a config's data section (crop_size, resize, train_crops,
    mix_images, random_flip, crop_step, decode_draft, max_bad_fraction,
    num_workers: decoding threads, worker_processes: decoding processes, -1 =
    `default_worker_processes()`, prefetch: groups buffered per thread).
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
    tracker = BadImageTracker(len(source), float(data_config.max_bad_fraction))
    mix = max(1, min(int(data_config.mix_images), len(source)))
    threads = max(1, int(data_config.num_workers))
    prefetch = max(1, int(data_config.prefetch))
    processes = int(data_config.worker_processes)
    if processes < 0:
        processes = default_worker_processes()

    ds = grain.MapDataset.source(source).seed(seed + 7919 * process_index)
    ds = ds.shuffle().repeat(None)
    ds = ds.batch(mix, batch_fn=list)
    ds = ds.random_map(_TrainGroup(data_config, tracker))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=threads * prefetch))
    if processes:
        if not flags.FLAGS.is_parsed():
            raise RuntimeError("grain's worker processes read absl flags: call "
                               "pipeline.mark_flags_parsed() where the program starts")
        # Each process decodes every `processes`-th group; the order, and with it the
        # checkpointed position, is the same as with threads alone.
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes,
                                                         per_worker_buffer_size=prefetch))
    it = grain.experimental.RebatchIterDataset(it, local_batch, drop_remainder=True)
    it.bad_images = tracker  # for logging (with worker processes, each counts its own)
    return it


# --------------------------------------------------------------------------- evaluation


class _EvalImage:
    """Image slot k of this process -> (data set index, uint8 crops or None, error or None)."""

    def __init__(self, source, data_config, *, seed, protocol, num_crops, process_index,
                 process_count):
        self.source = source
        self.config = data_config
        self.seed, self.protocol, self.num_crops = seed, protocol, num_crops
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, slot: int):
        index = slot * self.process_count + self.process_index
        if index >= len(self.source):
            return -1, None, None  # padding: every process yields as many batches
        data, _, name = self.source[index]
        try:
            return index, eval_crops(data, self.config, index=index, seed=self.seed,
                                     protocol=self.protocol, num_crops=self.num_crops,
                                     name=name), None
        except ImageDecodeError as e:
            return index, None, e


def make_eval_batches(records, data_config, *, batch_size: int, seed: int = 0,
                      protocol: str | None = None, num_crops: int | None = None,
                      process_index: int = 0, process_count: int = 1,
                      max_bad_fraction: float | None = None,
                      on_error=None) -> Iterator[dict[str, np.ndarray]]:
    """This process's evaluation batches: every crop of its share of the images.

    Yields {'image': uint8 [B, crop, crop, 3], 'image_index': int32 [B] (into
    records; -1 on padding rows), 'valid': bool [B]}, B = batch_size (this
    process's rows). Process p takes images p, p + process_count, ...; each
    image fills `num_eval_crops` consecutive rows made by `image.eval_crops`
    (the one definition of evaluation crops), so every process yields the same
    number of batches and collective steps line up. An image that fails to
    decode keeps its rows, marked invalid (`on_error(index, reason)` is called
    for it); beyond max_bad_fraction (default data.max_bad_fraction) of all
    images, TooManyBadImagesError.
    """
    protocol = protocol or data_config.eval_protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown eval protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    source = as_source(records)
    crop = int(data_config.crop_size)
    num = num_eval_crops(data_config, protocol, num_crops)
    limit = data_config.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
    tracker = BadImageTracker(len(source), float(limit))
    slots = -(-len(source) // process_count)
    load = _EvalImage(source, data_config, seed=seed, protocol=protocol, num_crops=num,
                      process_index=process_index, process_count=process_count)
    threads = max(1, int(data_config.num_workers))

    def batches():
        if slots == 0:
            return
        images = grain.MapDataset.range(slots).map(load).to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
        image = np.zeros((batch_size, crop, crop, 3), np.uint8)
        index = np.full((batch_size,), -1, np.int32)
        valid = np.zeros((batch_size,), bool)
        fill = 0
        for i, crops, error in images:
            if error is not None:
                tracker.report(error)
                if on_error is not None:
                    on_error(i, error.reason)
            for row in range(num):
                image[fill] = crops[row] if crops is not None else 0
                index[fill], valid[fill] = i, crops is not None
                fill += 1
                if fill == batch_size:
                    yield {"image": image.copy(), "image_index": index.copy(),
                           "valid": valid.copy()}
                    fill = 0
        if fill:
            image[fill:], index[fill:], valid[fill:] = 0, -1, False
            yield {"image": image, "image_index": index, "valid": valid}

    return batches()
