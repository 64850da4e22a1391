"""TFDS builders writing array_record (no TensorFlow needed), and a grain source over them.

Build once (e.g. onto shared storage for a pod), read anywhere::

    builder_dir = build_tfds("koniq10k", "/data/koniq10k", "/shared/tfds",
                             splits=("train", "test"))
    source = load_tfds_source(builder_dir, "train")     # or (data_dir, name)
    ds = make_train_dataset(source, config.data, batch_size=32, seed=0)

Images are stored as their original encoded files (the TFDS `Image` feature given
a path copies the bytes, which needs no TensorFlow; encoding a pixel array would
need it) and read back undecoded (`SkipDecoding`), then decoded by this
package's `load_image`, exactly as files on disk are. Split names: 'train',
'test', 'val', 'full' (for 'all', a name TFDS reserves); other split specs
('random:train', 'json:x.json') are stored under a sanitised name ('random_train',
'json_x_json').
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from hyperiqa_jax.data.records import DOWNLOAD_HELP, Record, load_records

VERSION = "1.0.0"


def tfds_split_name(split: str) -> str:
    """The TFDS split name a split spec is stored under ('all' is reserved by TFDS: 'full')."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_").lower()
    return "full" if name == "all" else name


def builder_class(name: str):
    """A TFDS GeneratorBasedBuilder class for data set `name` ('hyperiqa_<name>')."""
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Original encoded images, score, image_id, ref."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = DOWNLOAD_HELP[name].replace("ROOT", "manual_dir")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # TFDS's own lookup needs the optional `importlib_resources` package.
            from etils import epath

            return epath.Path(__file__)

        def __init__(self, *, splits: Sequence[str] = ("all",), label: str | None = None,
                     seed: int = 0, split_ratio: float = 0.8, path_column: str | None = None,
                     **kwargs):
            self._splits, self._label, self._seed = tuple(splits), label, seed
            self._ratio, self._path_column = split_ratio, path_column
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{name} for hyperiqa_jax (encoded images, scores).",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(),
                    "score": tfds.features.Scalar(np.float32),
                    "image_id": tfds.features.Text(),
                    "ref": tfds.features.Text(),
                }),
                supervised_keys=("image", "score"),
            )

        def _split_generators(self, dl_manager):
            root = os.fspath(dl_manager.manual_dir)
            out = {}
            for split in self._splits:
                records = load_records(name, root, split, label=self._label, seed=self._seed,
                                       split_ratio=self._ratio, path_column=self._path_column)
                out[tfds_split_name(split)] = self._generate_examples(records)
            return out

        def _generate_examples(self, records):
            for r in records:
                yield r.image_id, {"image": r.path, "score": np.float32(r.score),
                                   "image_id": r.image_id, "ref": r.ref or ""}

    camel = "".join(p.capitalize() for p in re.split(r"[^A-Za-z0-9]+", name))
    _Builder.__name__ = _Builder.__qualname__ = f"Hyperiqa{camel}"
    _Builder.name = f"hyperiqa_{re.sub(r'[^a-z0-9]+', '_', name.lower())}"
    return _Builder


def build_tfds(name: str, root: str, data_dir: str, *, splits: Sequence[str] = ("train", "test"),
               label: str | None = None, seed: int = 0, split_ratio: float = 0.8,
               path_column: str | None = None, overwrite: bool = False) -> str:
    """Write data set `name` (files under `root`) as array_record; returns the builder dir.

    Labels and splits come from `load_records`, so every check there applies.
    """
    import tensorflow_datasets as tfds

    cls = builder_class(name)
    builder = cls(data_dir=data_dir, file_format="array_record", splits=splits, label=label,
                  seed=seed, split_ratio=split_ratio, path_column=path_column)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(root), download_mode=mode, try_download_gcs=False))
    return os.fspath(builder.data_dir)


class TfdsSource:
    """Random-access grain source over a built split: items (encoded bytes, score, image_id)."""

    def __init__(self, data_source):
        self._ds = data_source

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int):
        ex = self._ds[int(index)]
        image_id = ex["image_id"]
        image_id = image_id.decode("utf-8") if isinstance(image_id, bytes) else str(image_id)
        return ex["image"], float(ex["score"]), f"tfds:{image_id}"

    def records(self) -> list[Record]:
        """Records (path = 'tfds:<image_id>') in source order, e.g. for evaluation labels."""
        out = []
        for i in range(len(self._ds)):
            ex = self._ds[i]
            image_id = ex["image_id"].decode("utf-8") if isinstance(ex["image_id"], bytes) \
                else str(ex["image_id"])
            ref = ex["ref"].decode("utf-8") if isinstance(ex["ref"], bytes) else str(ex["ref"])
            out.append(Record(f"tfds:{image_id}", float(ex["score"]), image_id, ref or None))
        return out


def load_tfds_source(builder_dir: str, split: str, *, name: str | None = None) -> TfdsSource:
    """A TfdsSource over `split` of a built data set.

    builder_dir: the folder build_tfds returned (data_dir/hyperiqa_<name>/1.0.0), or
    data_dir together with `name`.
    """
    import tensorflow_datasets as tfds

    if name is not None:
        builder_dir = os.path.join(builder_dir, builder_class(name).name, VERSION)
    if not os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):
        raise FileNotFoundError(
            f"no built TFDS data set in {builder_dir}; build it with "
            "hyperiqa_jax.data.build_tfds(name, root, data_dir)")
    builder = tfds.builder_from_directory(builder_dir)
    split = tfds_split_name(split)
    if split == "full" and "full" not in builder.info.splits:
        split = "+".join(builder.info.splits)  # every written split
    elif split not in builder.info.splits:
        raise ValueError(f"{builder_dir} has splits {list(builder.info.splits)}, not {split!r}")
    ds = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return TfdsSource(ds)
