"""Split sources: the images of a split from the data set's files or from array_record.

`load_split(data_config, split, seed=)` returns the images of a split either
from the data set's own files (a list of `Record`s) or, when
``data_config.tfds_dir`` is set, from an array_record data set written by
`build_tfds` (a `TfdsSource`); `split_scores` gives the labels of either.
"""

import os

import numpy as np

from hyperiqa_jax.data.records import load_records


def load_split(data_config, split: str, *, seed: int = 0):
    """The images of `split` (any `load_records` split) for `data_config`.

    data_config: a config's data section. tfds_dir '': the data set's
    files under data_config.root (name, root, label read), a list of Records in
    label-file order. Otherwise the array_record data set that `build_tfds` wrote
    there (its data_dir or the builder
    folder): a `TfdsSource`, after checking that it was built for this config
    (data set, label, resize of pre-resized images, `seed` of random splits).
    Both go to make_train_dataset / make_eval_batches as they are; their labels are
    `split_scores(source)`. seed: of random splits (train.py passes config.seed).
    """
    tfds_dir = data_config.tfds_dir
    if tfds_dir:
        # Lazy: TFDS is slow to import, and `python -m hyperiqa_jax.data.tfds_builders`
        # must not find itself imported already.
        from hyperiqa_jax.data.tfds_builders import load_tfds_source

        return load_tfds_source(os.fspath(tfds_dir), split, name=data_config.name,
                                data_config=data_config, seed=seed)
    return load_records(data_config.name, data_config.root, split,
                        label=data_config.label or None, seed=seed)


def split_scores(source) -> np.ndarray:
    """float64 [N] labels of a `load_split` result (Records or a TfdsSource), in item order."""
    if isinstance(source, (list, tuple)):
        return np.array([r.score for r in source], np.float64)
    return np.asarray(source.scores, np.float64)
