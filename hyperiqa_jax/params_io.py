"""Parameter trees on disk: what the conversion commands write and training/scoring read.

A params directory is an Orbax checkpoint of a nested dict of float32 arrays,
plus `meta.json` saying what it holds (model name, source file, format).
"""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "meta.json"
PARAMS_DIR = "params"


def save_params(directory: str | os.PathLike, params, meta: dict | None = None) -> Path:
    """Writes `params` (and `meta`) atomically: a partial write never replaces a good one."""
    directory = Path(directory).absolute()
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    params = jax.tree.map(np.asarray, params)  # host copies: Orbax writes plain arrays
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load_params(directory: str | os.PathLike):
    """Reads a params directory written by `save_params`; returns (params, meta)."""
    directory = Path(directory)
    if not (directory / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"no converted parameters in {directory} (expected {directory / PARAMS_DIR}). "
            "Convert PyTorch weights first, e.g.\n  python -m weights_conversion.convert_timm "
            "--model swin_base_patch4_window7_224 --checkpoint swin_base.pth "
            f"--out {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory.absolute() / PARAMS_DIR)
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return params, meta

