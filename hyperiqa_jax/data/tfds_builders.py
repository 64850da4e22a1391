"""Build a data set as TFDS array_record files (no TensorFlow needed) and train from it.

    python -m hyperiqa_jax.data.tfds_builders --config=configs/base.py \\
        --config.data.root=/data/koniq10k --data_dir=/data/tfds
    python -m hyperiqa_jax.train --config=configs/base.py \\
        --config.data.tfds_dir=/data/tfds --workdir=runs/koniq

The first command writes the config's data set (data.name, data.root,
data.label; the splits data.train_split and data.test_split, or --splits; the
config's seed for random splits) to DATA_DIR/hyperiqa_<name>/1.1.0. Images are
decoded and resized to data.resize once, as the training pipeline would (same
pixels), and stored as BMP (uncompressed: the same pixels, decoded in well under
a millisecond, but h x w x 3 bytes each) or, with --image_format=jpeg, as
quality-95 JPEG (about 10x smaller, decoded in about a millisecond, slightly
different pixels); training then only decodes them. --nopre_resize stores the
original files.
The second trains from the built splits instead of the files; a build whose
settings do not fit the config (data set, label, resize, seed of a random
split) is refused with a message saying so. DATA_DIR may be gs://bucket/folder.

From Python::

    builder_dir = build_tfds("koniq10k", "/data/koniq10k", "/data/tfds",
                             splits=("train", "test"), resize=(512, 384))
    source = load_tfds_source(builder_dir, "train")     # or (data_dir, name=...)
    ds = make_train_dataset(source, config.data, batch_size=32, seed=0)

Items of a `TfdsSource` are (encoded bytes, score, 'tfds:<image_id>'): the bytes
are read undecoded (`SkipDecoding`) and decoded by this package's `load_image`,
as files are. Each split keeps the label file's order. Next to TFDS's own files,
hyperiqa_jax.json holds the build settings and each split's labels (read without
a pass over the images). Split names: 'train', 'test', 'val', 'full' (for 'all',
a name TFDS reserves); other split specs ('random:train', 'json:x.json') are
stored under a sanitised name ('random_train', 'json_x_json').
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from etils import epath
from PIL import Image

from hyperiqa_jax.data.image import load_resized
from hyperiqa_jax.data.records import DatasetNotFoundError, Record, select_records
from hyperiqa_jax.errors import ConfigError
from hyperiqa_jax.paths import is_url, join, read_bytes

VERSION = "1.1.0"
SETTINGS_FILE = "hyperiqa_jax.json"
IMAGE_FORMATS = ("bmp", "jpeg")
JPEG_QUALITY = 95


def tfds_split_name(split: str) -> str:
    """The TFDS split name a split spec is stored under ('all' is reserved by TFDS: 'full')."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_").lower()
    return "full" if name == "all" else name


def builder_name(name: str) -> str:
    """The TFDS name of data set `name`'s builder: 'hyperiqa_<name>'."""
    return f"hyperiqa_{re.sub(r'[^a-z0-9]+', '_', name.lower())}"


def _plain_resize(resize):
    """data.resize as JSON stores it: None, an int or [h, w]."""
    if resize is None:
        return None
    if isinstance(resize, (int, np.integer)):
        return int(resize)
    return [int(v) for v in resize]


def builder_class(name: str):
    """A TFDS GeneratorBasedBuilder class for data set `name` ('hyperiqa_<name>')."""
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {
            "1.0.0": "Original encoded images, score, image_id, ref.",
            "1.1.0": "Label-file order; optionally pre-resized images; hyperiqa_jax.json.",
        }

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            # TFDS's own lookup needs the optional `importlib_resources` package.
            return epath.Path(__file__)

        def __init__(self, *, root: str, splits: Sequence[str], settings: dict, **kwargs):
            self._root, self._splits, self.settings = root, tuple(splits), settings
            self.split_labels: dict[str, dict] = {}
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
                disable_shuffling=True,  # keep the label file's order
            )

        def _split_generators(self, dl_manager):
            s = self.settings
            out = {}
            for split in self._splits:
                records, mode = select_records(
                    name, self._root, split, label=s["label"] or None, seed=s["seed"],
                    split_ratio=s["split_ratio"], path_column=s["path_column"] or None)
                self.split_labels[tfds_split_name(split)] = {
                    "split": split, "mode": mode, "image_id": [r.image_id for r in records],
                    "score": [r.score for r in records], "ref": [r.ref or "" for r in records]}
                out[tfds_split_name(split)] = self._generate_examples(records)
            return out

        def _generate_examples(self, records):
            for r, image in zip(records, _encoded_images(records, self.settings)):
                yield r.image_id, {"image": image, "score": np.float32(r.score),
                                   "image_id": r.image_id, "ref": r.ref or ""}

    camel = "".join(p.capitalize() for p in re.split(r"[^A-Za-z0-9]+", name))
    _Builder.__name__ = _Builder.__qualname__ = f"Hyperiqa{camel}"
    _Builder.name = builder_name(name)
    return _Builder


def _encoded_images(records: list[Record], settings: dict):
    """Each record's image as stored: the file's bytes, or resized and re-encoded."""
    if settings["resize"] is None:
        for r in records:
            yield read_bytes(r.path)
        return

    def encode(r: Record) -> bytes:
        # load_resized is what the training pipeline runs, so the pixels are the same.
        pixels = load_resized(r.path, settings["resize"], settings["crop_size"], name=r.path,
                              draft=settings["decode_draft"])
        buf = io.BytesIO()
        if settings["image_format"] == "jpeg":
            Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY)
        else:  # uncompressed: PIL decodes a BMP ~50x faster than a PNG of the same pixels
            Image.fromarray(pixels).save(buf, "BMP")
        return buf.getvalue()

    # PIL releases the GIL while decoding, resizing and encoding: one thread per core.
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(records), 64):
            yield from pool.map(encode, records[start:start + 64])


def build_tfds(name: str, root, data_dir, *, splits: Sequence[str] = ("train", "test"),
               label: str | None = None, seed: int = 0, split_ratio: float = 0.8,
               path_column: str | None = None, resize=None, crop_size: int = 224,
               image_format: str = "bmp", decode_draft: bool = False,
               overwrite: bool = False) -> str:
    """Write data set `name` (files under `root`) as array_record; returns the builder dir.

    Labels and splits come from `load_records` (same arguments), so every check
    there applies. resize: None stores the original files; (h, w) or an int
    stores every image decoded and resized as the pipeline does with
    data.resize=resize, data.crop_size=crop_size, data.decode_draft=decode_draft,
    encoded as `image_format` ('bmp': same pixels; 'jpeg': quality 95). A
    finished build with the same settings is reused; one with other settings
    raises ConfigError unless `overwrite`. root and data_dir may be gs:// URLs.
    """
    import tensorflow_datasets as tfds

    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
    root = os.fspath(root) if root else ""
    if name == "demo" and not root:
        from hyperiqa_jax.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset()
    if root and not is_url(root):
        root = os.path.abspath(root)
    splits = tuple(dict.fromkeys(splits))
    resize = _plain_resize(resize)
    settings = {
        "name": name, "label": label or "", "seed": int(seed), "split_ratio": float(split_ratio),
        "path_column": path_column or "", "resize": resize,
        "crop_size": int(crop_size) if resize is not None else None,
        "image_format": image_format if resize is not None else "original",
        "decode_draft": bool(decode_draft) if resize is not None else False,
    }
    builder = builder_class(name)(data_dir=os.fspath(data_dir), file_format="array_record",
                                  root=root, splits=splits, settings=settings)
    out = epath.Path(builder.data_dir)
    built = _read_settings(out)
    if built is not None and not overwrite:
        # seed and split_ratio matter only to random splits.
        seeded = any(t["mode"] == "random" for t in built["splits"].values())
        differ = [f"{k}: built {built.get(k)!r}, asked {v!r}" for k, v in settings.items()
                  if built.get(k) != v and (seeded or k not in ("seed", "split_ratio"))]
        differ += [f"no split {s!r}" for s in splits if tfds_split_name(s) not in built["splits"]]
        if not differ:
            return os.fspath(out)
        raise ConfigError(f"{out} was built with other settings ({'; '.join(differ)}); pass "
                          "overwrite=True (--overwrite) to rebuild it, or use another data_dir")
    # Regenerate (TFDS deletes what is there): also a build interrupted before its settings.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS, try_download_gcs=False))
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "splits": builder.split_labels}))
    return os.fspath(out)


def _read_settings(builder_dir: epath.Path) -> dict | None:
    path = builder_dir / SETTINGS_FILE
    if not (builder_dir / "dataset_info.json").exists() or not path.exists():
        return None
    return json.loads(path.read_text())


class TfdsSource:
    """Random-access grain source over a built split: items (encoded bytes, score, image_id)."""

    def __init__(self, data_source, labels: dict | None = None):
        self._ds = data_source
        # {"image_id": [...], "score": [...], "ref": [...]} in item order, or None: read
        # from the examples on first use (builds without hyperiqa_jax.json).
        self._labels = labels

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int):
        ex = self._ds[int(index)]
        return ex["image"], float(ex["score"]), f"tfds:{_text(ex['image_id'])}"

    def _label_table(self) -> dict:
        if self._labels is None:
            examples = [self._ds[i] for i in range(len(self._ds))]
            self._labels = {"image_id": [_text(e["image_id"]) for e in examples],
                            "score": [float(e["score"]) for e in examples],
                            "ref": [_text(e["ref"]) for e in examples]}
        return self._labels

    @property
    def scores(self) -> np.ndarray:
        """float64 [N] labels in item order (as written: not rounded to float32)."""
        return np.asarray(self._label_table()["score"], np.float64)

    def records(self) -> list[Record]:
        """Records (path = 'tfds:<image_id>') in source order, e.g. for evaluation labels."""
        t = self._label_table()
        return [Record(f"tfds:{i}", float(s), i, r or None)
                for i, s, r in zip(t["image_id"], t["score"], t["ref"])]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_tfds_source(builder_dir, split: str, *, name: str | None = None, data_config=None,
                     seed: int | None = None) -> TfdsSource:
    """A TfdsSource over `split` of a built data set.

    builder_dir: the folder build_tfds returned (data_dir/hyperiqa_<name>/1.1.0), or
    data_dir together with `name`. data_config (and seed): refuse a build whose
    settings do not fit this config (ConfigError saying which).
    """
    import tensorflow_datasets as tfds

    builder_dir = os.fspath(builder_dir)
    if name is not None and not epath.Path(join(builder_dir, "dataset_info.json")).exists():
        builder_dir = join(builder_dir, builder_name(name), VERSION)
    path = epath.Path(builder_dir)
    if not (path / "dataset_info.json").exists():
        raise DatasetNotFoundError(
            f"no built TFDS data set in {builder_dir}; build it with `python -m "
            "hyperiqa_jax.data.tfds_builders --config=CONFIG --data_dir=DIR` or "
            "hyperiqa_jax.data.build_tfds(name, root, data_dir)")
    settings = _read_settings(path)
    builder = tfds.builder_from_directory(builder_dir)
    built, wanted = list(builder.info.splits), tfds_split_name(split)
    if wanted in built:
        parts = [wanted]
    elif wanted == "full":  # 'all' without a 'full' split: every split built
        parts = built
    else:
        raise ConfigError(f"{builder_dir} has splits {built}, not {wanted!r}; build it with "
                          f"--splits={split}")
    if settings is not None and data_config is not None:
        _check_fits(settings, parts, data_config, seed, builder_dir)
    labels = None
    if settings is not None:
        tables = [settings["splits"][p] for p in parts]
        labels = {k: [v for t in tables for v in t[k]] for k in ("image_id", "score", "ref")}
    ds = builder.as_data_source(split="+".join(parts),
                                decoders={"image": tfds.decode.SkipDecoding()})
    return TfdsSource(ds, labels if labels and len(labels["score"]) == len(ds) else None)


def _check_fits(settings: dict, parts: list[str], data_config, seed, builder_dir: str) -> None:
    """ConfigError unless the build fits the config (what training expects from it)."""
    get = data_config.get  # a ConfigDict or a dict
    problems = []
    if settings["name"] != get("name"):
        problems.append(f"data set {settings['name']!r}, config.data.name {get('name')!r}")
    if settings["label"] != (get("label") or ""):
        problems.append(f"label {settings['label'] or '(default)'!r}, config.data.label "
                        f"{get('label') or '(default)'!r}")
    if settings["resize"] is not None:
        resize = _plain_resize(get("resize"))
        if resize != settings["resize"] or (not isinstance(resize, list)
                                            and settings["crop_size"] != get("crop_size")):
            problems.append(f"images pre-resized for resize={settings['resize']} crop_size="
                            f"{settings['crop_size']}, config.data.resize={resize} "
                            f"crop_size={get('crop_size')}")
    random = [p for p in parts if settings["splits"][p]["mode"] == "random"]
    if random and seed is not None and int(seed) != settings["seed"]:
        problems.append(f"random split {random[0]!r} drawn with seed {settings['seed']}, "
                        f"config seed {seed}")
    if problems:
        raise ConfigError(
            f"the data set in {builder_dir} was built for another config ({'; '.join(problems)})"
            ": build one for this config (python -m hyperiqa_jax.data.tfds_builders) or "
            "change the config")


# --------------------------------------------------------------------------- command line


def define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Training config file: its data section (name, root, label, resize, "
        "crop_size, decode_draft, train_split, test_split) and seed say what to build.")
    flags.DEFINE_string("data_dir", None, "Folder to write into (local or gs://); train with "
                        "--config.data.tfds_dir=<this folder>.")
    flags.DEFINE_list("splits", None, "Splits to write (default: the config's "
                      "data.train_split and data.test_split), e.g. train,val,test.")
    flags.DEFINE_bool("pre_resize", True, "Store images resized to data.resize (training "
                      "skips the resize); --nopre_resize stores the original files.")
    flags.DEFINE_enum("image_format", "bmp", list(IMAGE_FORMATS), "Encoding of pre-resized "
                      "images: bmp (uncompressed, same pixels) or jpeg (quality 95, 10x "
                      "smaller, slightly different pixels).")
    flags.DEFINE_bool("overwrite", False, "Rebuild even if DATA_DIR holds a build with other "
                      "settings.")


def main(argv):
    from absl import app, flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.data_dir:
        raise app.UsageError("--config and --data_dir are required, e.g. --config=configs/"
                             "base.py --config.data.root=/data/koniq10k --data_dir=/data/tfds")
    config, dc = FLAGS.config, FLAGS.config.data
    splits = FLAGS.splits or [dc.train_split, dc.test_split]
    builder_dir = build_tfds(
        dc.name, dc.root, FLAGS.data_dir, splits=splits, label=dc.label or None,
        seed=config.seed, resize=dc.resize if FLAGS.pre_resize else None,
        crop_size=dc.crop_size, image_format=FLAGS.image_format,
        decode_draft=bool(dc.get("decode_draft", False)), overwrite=FLAGS.overwrite)
    for split in dict.fromkeys(splits):
        print(f"{split}: {len(load_tfds_source(builder_dir, split))} images")
    print(f"built {builder_dir}\ntrain from it with --config.data.tfds_dir={FLAGS.data_dir}")


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)
