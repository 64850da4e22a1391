"""Data sets and input pipelines for hyperiqa_jax (no TensorFlow, no torch).

Public API
----------

Labels and splits (`records.py`)::

    load_records(name, root, split, *, label=None, seed=0, split_ratio=0.8,
                 path_column=None) -> list[Record]

    Record(path: str, score: float, image_id: str, ref: str | None)   # frozen

  name: 'koniq10k', 'spaq', 'kadid10k', 'agiqa3k', 'livec', 'manifest' (CSV/JSON
  with path + score columns, optional ref/split columns) or 'demo' (root '' =
  generate/reuse the cached demo set). split: one of the forms in docs/data.md
  ("Splits"). Bad label files raise LabelFileError naming file, row and column; a
  missing data set raises DatasetNotFoundError saying what to download and where.
  Both, like ImageDecodeError and TooManyBadImagesError, are hyperiqa_jax.errors.UserError:
  the commands print them as one `error:` line (exit status 2).

Split sources (`sources.py`): files or array_record, chosen by data.tfds_dir::

    load_split(data_config, split, *, seed=0) -> list[Record] | TfdsSource
        # tfds_dir '' : load_records(data.name, data.root, split, label=data.label,
        # seed=seed); else the split of the build_tfds data set in tfds_dir, refused
        # (ConfigError) when built for another data set, label, resize or seed.
        # Either goes to make_train_dataset / make_eval_batches as it is.
    split_scores(source) -> float64 [N]   # labels of either, in item order

  Roots, label files and images may be gs:// (or other etils.epath) URLs.

Images (`image.py`)::

    load_image(path_or_bytes, *, max_pixels=DEFAULT_MAX_PIXELS) -> uint8 [H, W, 3]
    ImageDecodeError(path, reason)        # .path, .reason
    load_resized(source, resize, crop_size, *, name=None, draft=False) -> uint8 [h, w, 3]
    eval_crops(image, data_config, *, index=0, seed=0, protocol=None, num_crops=None,
               name=None) -> uint8 [N, crop, crop, 3]
        # THE evaluation crops (training-time evaluation, evaluate, predict); 'random'
        # is seeded by (seed, index), index = the image's position in its split or list
    num_eval_crops(data_config, protocol=None, num_crops=None) -> int
    crop_positions(height, width, crop, num, protocol, rng=None) -> int [N, 2]
    extract_crops(image, positions, crop, flips=None) -> uint8 [N, crop, crop, 3]
    normalize(uint8 images) -> float32 (ImageNet mean/std; numpy or JAX arrays)
    target_size(width, height, resize, crop_size) -> (h, w)

  resize: (h, w) exactly like PyTorch Resize((h, w)) (PIL bilinear, antialiased);
  an int: shorter side; None: native size. Images smaller than the crop are
  upscaled (aspect kept) so a crop fits.

Pipelines (`pipeline.py`)::

    make_train_dataset(records, data_config, *, batch_size, seed,
                       process_index=0, process_count=1) -> grain.IterDataset
        # infinite; dicts {'image': uint8 [b, crop, crop, 3], 'score': float32 [b]},
        # b = batch_size = the PER-PROCESS batch (global batch // process_count);
        # records = all images, this process reads records[process_index::process_count].
        # iter(ds) has get_state()/set_state() (grain.checkpoint.CheckpointSave).
    steps_per_epoch(num_records, data_config, batch_size) -> int
        # num_records * train_crops // batch_size (global counts: all records, global batch)
    make_eval_batches(records, data_config, *, batch_size, seed=0, protocol=None,
                      num_crops=None, process_index=0, process_count=1,
                      max_bad_fraction=None, on_error=None)
        -> Iterator[{'image': uint8 [B, c, c, 3], 'image_index': int32 [B] (-1: padding),
                     'valid': bool [B]}]
        # this process's share (images p, p + P, ...); the same batch count on every process
    TooManyBadImagesError        # raised from next() beyond data.max_bad_fraction

  `records` may also be a `TfdsSource`. data_config is a config's data
  section; decode_draft decodes JPEGs at a reduced DCT scale when the resize
  target allows (e.g. 4000x3000 SPAQ photos to 1000x750 before Resize).

Device feed (`device.py`)::

    to_global(local_batch, sharding) -> global jax.Arrays
    DeviceBatches(host_iter, sharding, size=2)  # batches on the device ahead; checkpointable

Demo data set (`demo.py`)::

    ensure_demo_dataset(cache_dir=None) -> str   # root with manifest.csv
        # default $HYPERIQA_JAX_CACHE/demo-v3 or ~/.cache/hyperiqa_jax/demo-v3

TFDS array_record (`tfds_builders.py`, no TensorFlow)::

    build_tfds(name, root, data_dir, *, splits=('train', 'test'), label=None,
               seed=0, split_ratio=0.8, path_column=None, resize=None,
               crop_size=224, image_format='bmp', decode_draft=False,
               overwrite=False) -> builder_dir
        # resize=None: the original files; else pre-resized as the pipeline would.
        # Command line: python -m hyperiqa_jax.data.tfds_builders --help
    load_tfds_source(builder_dir, split, *, name=None, data_config=None,
                     seed=None) -> TfdsSource   # .scores, .records()
"""

from hyperiqa_jax.data.demo import ensure_demo_dataset
from hyperiqa_jax.data.image import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROTOCOLS,
    ImageDecodeError,
    crop_positions,
    eval_crops,
    extract_crops,
    load_image,
    load_resized,
    normalize,
    num_eval_crops,
    target_size,
)
from hyperiqa_jax.data.pipeline import (
    TooManyBadImagesError,
    make_eval_batches,
    make_train_dataset,
    steps_per_epoch,
)
from hyperiqa_jax.data.records import (
    DATASETS,
    DatasetNotFoundError,
    LabelFileError,
    Record,
    load_records,
)
from hyperiqa_jax.data.sources import load_split, split_scores

__all__ = [
    "DATASETS",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetNotFoundError",
    "ImageDecodeError",
    "LabelFileError",
    "PROTOCOLS",
    "Record",
    "TfdsSource",
    "TooManyBadImagesError",
    "build_tfds",
    "crop_positions",
    "eval_crops",
    "ensure_demo_dataset",
    "extract_crops",
    "load_image",
    "load_records",
    "load_split",
    "load_tfds_source",
    "load_resized",
    "make_eval_batches",
    "make_train_dataset",
    "normalize",
    "num_eval_crops",
    "split_scores",
    "steps_per_epoch",
    "target_size",
]

_TFDS_NAMES = ("TfdsSource", "build_tfds", "load_tfds_source")


def __getattr__(name):
    # Lazy, so that `python -m hyperiqa_jax.data.tfds_builders` runs that module once
    # (imported here eagerly, runpy would warn and load a second copy as __main__).
    if name in _TFDS_NAMES:
        from hyperiqa_jax.data import tfds_builders

        return getattr(tfds_builders, name)
    raise AttributeError(f"module 'hyperiqa_jax.data' has no attribute {name!r}")
